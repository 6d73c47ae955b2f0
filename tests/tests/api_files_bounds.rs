//! The files API keeps to the user's layer at the last name too: a mount
//! point of the inner (/proc, /sys, /dev, the read-only /etc/resolv.conf,
//! /run/hull) is `outside_layer` for every operation, so no client can
//! unmount what the inner's start-up mounted by deleting, renaming or
//! writing over its mount point from hulld's mount namespace.

use std::net::SocketAddr;

use hull_tests::http::{raw, request, Response};
use hull_tests::siege::Siege;
use hull_tests::{block_on, require_root, Limits, TestHull};

/// The inner's mount points the attacks aim at.
const MOUNT_POINTS: [&str; 5] = ["/proc", "/sys", "/dev", "/etc/resolv.conf", "/run/hull"];

/// A running hulld, its API's address, an exec token and the sprite's name.
fn start() -> Option<(TestHull, SocketAddr, String, String)> {
    if !require_root() {
        return None;
    }
    // "nat": the inner gets its read-only /etc/resolv.conf.
    let hull = TestHull::start_with(Limits {
        network: "nat",
        ..Limits::default()
    });
    let addr = block_on(hull.api_addr());
    let token = hull.api_token("exec");
    let r = request(addr, "GET", "/v1/sprites", Some(&token), None);
    assert_eq!(r.status, 200, "{r:?}; log:\n{}", hull.log());
    let name = r.json()["sprites"][0]["name"].as_str().unwrap().to_string();
    Some((hull, addr, token, name))
}

use hull_tests::http::q;

fn put(addr: SocketAddr, sprite: &str, token: &str, path: &str, body: &[u8]) -> Response {
    let head = format!(
        "PUT /v1/sprites/{sprite}/fs/write?path={}&mkdirParents=true HTTP/1.1\r\nHost: {addr}\r\n\
         Connection: close\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        q(path),
        body.len()
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes)
}

fn delete(addr: SocketAddr, sprite: &str, token: &str, path: &str, recursive: bool) -> Response {
    let url = format!(
        "/v1/sprites/{sprite}/fs/delete?path={}&recursive={recursive}",
        q(path)
    );
    request(addr, "DELETE", &url, Some(token), None)
}

fn post(addr: SocketAddr, sprite: &str, token: &str, op: &str, body: &str) -> Response {
    let url = format!("/v1/sprites/{sprite}/fs/{op}");
    request(addr, "POST", &url, Some(token), Some(body))
}

fn get(addr: SocketAddr, sprite: &str, token: &str, op: &str, path: &str) -> Response {
    let url = format!("/v1/sprites/{sprite}/fs/{op}?path={}", q(path));
    request(addr, "GET", &url, Some(token), None)
}

/// `what` was refused as outside the layer, or the reason it was not.
fn refused_outside(what: &str, r: &Response) -> Option<String> {
    let code = serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string));
    if r.status == 400 && code.as_deref() == Some("outside_layer") {
        None
    } else {
        Some(format!(
            "{what}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        ))
    }
}

/// The mount points of the inner, as its own mountinfo lists them (none
/// when /proc is gone).
fn inner_mount_points(hull: &TestHull) -> Vec<String> {
    let out = block_on(hull.exec(&["cat", "/proc/self/mountinfo"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

/// What an append to /etc/resolv.conf from inside says, and its content.
fn resolv_conf_inside(hull: &TestHull) -> (bool, String) {
    let out = block_on(hull.exec(&["sh", "-c", "echo nameserver 6.6.6.6 >> /etc/resolv.conf"]));
    let appended = out.end == hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0));
    let text = block_on(hull.sh("cat /etc/resolv.conf; echo END"));
    (appended, text)
}

#[test]
fn deleting_the_inners_mount_points_is_refused_and_unmounts_nothing() {
    let Some((hull, addr, token, name)) = start() else {
        return;
    };
    let before = inner_mount_points(&hull);
    for path in MOUNT_POINTS.iter().chain(&["/proc/keys"]) {
        assert!(before.iter().any(|m| m == path), "{path} in {before:?}");
    }
    let siege = Siege::begin(&hull);
    let mut wrong = Vec::new();
    for path in MOUNT_POINTS {
        for recursive in [false, true] {
            let r = delete(addr, &name, &token, path, recursive);
            wrong.extend(refused_outside(
                &format!("delete {path} recursive={recursive}"),
                &r,
            ));
        }
    }
    // A tree with a mount point in it stops there (what came before it in
    // the walk is gone, as with rm -r inside), and the mount stays.
    let r = delete(addr, &name, &token, "/etc", true);
    wrong.extend(refused_outside("delete /etc recursive=true", &r));
    siege.assert_held(&hull, "deleting mount points through the files API");
    let after = inner_mount_points(&hull);
    let lost: Vec<&String> = before.iter().filter(|m| !after.contains(m)).collect();
    assert!(
        wrong.is_empty() && lost.is_empty(),
        "refusals wrong: {wrong:#?}\nmounts the inner lost: {lost:?}"
    );
}

#[test]
fn nothing_is_written_renamed_copied_or_chmodded_onto_a_mount_point() {
    let Some((hull, addr, token, name)) = start() else {
        return;
    };
    let before = inner_mount_points(&hull);
    let (appended, resolv_before) = resolv_conf_inside(&hull);
    assert!(!appended, "the control: resolv.conf is read-only inside");
    block_on(hull.sh("echo mine > /tmp/own && mkdir -p /tmp/d"));

    let siege = Siege::begin(&hull);
    let mut wrong = Vec::new();
    let mut check = |what: String, r: Response| wrong.extend(refused_outside(&what, &r));
    for path in MOUNT_POINTS {
        check(
            format!("write {path}"),
            put(addr, &name, &token, path, b"nameserver 6.6.6.6\n"),
        );
        for (from, to) in [("/tmp/own", path), (path, "/tmp/moved")] {
            let body = format!(r#"{{"source": "{from}", "dest": "{to}"}}"#);
            check(
                format!("rename {from} to {to}"),
                post(addr, &name, &token, "rename", &body),
            );
        }
        let body = format!(r#"{{"source": "/tmp/own", "dest": "{path}", "recursive": true}}"#);
        check(
            format!("copy onto {path}"),
            post(addr, &name, &token, "copy", &body),
        );
        let body = format!(r#"{{"path": "{path}", "mode": "0666"}}"#);
        check(
            format!("chmod {path}"),
            post(addr, &name, &token, "chmod", &body),
        );
        for op in ["read", "list", "stat"] {
            check(format!("{op} {path}"), get(addr, &name, &token, op, path));
        }
    }
    siege.assert_held(&hull, "writing over mount points through the files API");

    let after = inner_mount_points(&hull);
    let lost: Vec<&String> = before.iter().filter(|m| !after.contains(m)).collect();
    let (appended, resolv_after) = resolv_conf_inside(&hull);
    assert!(
        wrong.is_empty() && lost.is_empty() && !appended && resolv_after == resolv_before,
        "refusals wrong: {wrong:#?}\nmounts the inner lost: {lost:?}\n\
         resolv.conf writable inside: {appended}; it reads {resolv_after:?}, was {resolv_before:?}"
    );
    // Nothing was moved away either.
    assert_eq!(block_on(hull.sh("cat /tmp/own")), "mine\n");
}

#[test]
fn ordinary_files_beside_mount_points_still_work() {
    let Some((hull, addr, token, name)) = start() else {
        return;
    };
    let r = put(addr, &name, &token, "/etc/hull-own.conf", b"one\n");
    assert_eq!(r.status, 200, "{r:?}");
    let body = r#"{"source": "/etc/hull-own.conf", "dest": "/etc/hull-two.conf"}"#;
    assert_eq!(post(addr, &name, &token, "rename", body).status, 200);
    let body = r#"{"source": "/etc/hull-two.conf", "dest": "/tmp/three", "recursive": false}"#;
    assert_eq!(post(addr, &name, &token, "copy", body).status, 200);
    let body = r#"{"path": "/tmp/three", "mode": "0600"}"#;
    assert_eq!(post(addr, &name, &token, "chmod", body).status, 200);
    let r = put(addr, &name, &token, "/tmp/tree/a/b", b"deep\n");
    assert_eq!(r.status, 200, "{r:?}");
    let r = delete(addr, &name, &token, "/tmp/tree", true);
    assert_eq!(
        (r.status, r.json()["count"].as_u64()),
        (200, Some(3)),
        "{r:?}"
    );
    let r = delete(addr, &name, &token, "/etc/hull-two.conf", false);
    assert_eq!(r.status, 200, "{r:?}");
    let listing = get(addr, &name, &token, "list", "/");
    assert_eq!(listing.status, 200, "{listing:?}");
    let out =
        block_on(hull.sh(
            "cat /tmp/three; stat -c %a /tmp/three; ls /tmp/tree /etc/hull-two.conf 2>&1 || true",
        ));
    assert!(
        out.starts_with("one\n600\n") && out.matches("No such file").count() == 2,
        "{out}"
    );
}
