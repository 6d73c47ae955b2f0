//! The files API (`/v1/sprites/{name}/fs/...`) against a real hulld:
//! through the Sprites SDK, and with raw HTTP for what must never work
//! (paths that try to leave the inner's root, a cut-off upload, a token
//! without the scope).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use hull_tests::http::{raw, request, Response};
use hull_tests::{block_on, require_root, sdk_python, wait_until, workspace_dir, TestHull};

/// What the host's marker file holds: a response that carries it came
/// from outside the inner's root.
const HOST_SECRET: &str = "host-only-secret-3f1c";

/// A running hulld with its API's address, a token of `scope` and the
/// sprite's name; `None` when the test cannot run here.
fn start(scope: &str) -> Option<(TestHull, SocketAddr, String, String)> {
    if !require_root() {
        return None;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let token = hull.api_token(scope);
    let r = request(addr, "GET", "/v1/sprites", Some(&token), None);
    assert_eq!(r.status, 200, "{r:?}; log:\n{}", hull.log());
    let name = r.json()["sprites"][0]["name"].as_str().unwrap().to_string();
    Some((hull, addr, token, name))
}

use hull_tests::http::q;

fn read(addr: SocketAddr, sprite: &str, token: &str, path: &str) -> Response {
    let url = format!("/v1/sprites/{sprite}/fs/read?path={}", q(path));
    request(addr, "GET", &url, Some(token), None)
}

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

/// A host directory with the marker in it, and its path as the inner
/// would name it if a lookup escaped to the host.
fn host_marker() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("marker"), HOST_SECRET).unwrap();
    let rel = dir
        .path()
        .to_str()
        .unwrap()
        .trim_start_matches('/')
        .to_string();
    (dir, rel)
}

fn assert_not_escaped(r: &Response, what: &str) {
    assert!(
        !String::from_utf8_lossy(&r.body).contains(HOST_SECRET),
        "{what} read the host's marker: {r:?}"
    );
}

/// Runs `tests/sdk/{script}` against the API; panics with its output
/// unless it exits 0 and prints `{ok}`.
fn run_script(
    hull: &TestHull,
    python: &std::path::Path,
    addr: SocketAddr,
    token: &str,
    name: &str,
    script: &str,
    ok: &str,
) {
    let out = Command::new(python)
        .arg(workspace_dir().join("tests/sdk").join(script))
        .env("SPRITES_URL", format!("http://{addr}"))
        .env("SPRITES_TOKEN", token)
        .env("SPRITE_NAME", name)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains(ok),
        "{script}: {:?}\nstdout: {stdout}\nstderr: {stderr}\nhulld log:\n{}",
        out.status,
        hull.log()
    );
}

#[test]
fn the_sprites_sdk_writes_reads_lists_renames_copies_chmods_and_deletes() {
    let Some(python) = sdk_python() else {
        return;
    };
    let Some((hull, addr, token, name)) = start("exec") else {
        return;
    };
    run_script(&hull, &python, addr, &token, &name, "files.py", "files ok");
    // What the SDK wrote is in the inner, as the inner sees it, owned by
    // the inner's root.
    let listed = block_on(hull.sh("stat -c '%s %a %u:%g' /work/deep/dir/blob.bin"));
    assert!(listed.ends_with("640 0:0\n"), "{listed}");
}

#[test]
fn a_watch_streams_the_changes_under_a_directory() {
    let Some(python) = sdk_python() else {
        return;
    };
    let Some((hull, addr, token, name)) = start("exec") else {
        return;
    };
    run_script(&hull, &python, addr, &token, &name, "watch.py", "watch ok");
}

#[test]
fn no_path_leaves_the_inner_root() {
    let Some((hull, addr, token, name)) = start("exec") else {
        return;
    };
    let (host_dir, rel) = host_marker();
    block_on(hull.sh(
        "mkdir -p /tmp/t && ln -s / /tmp/t/escape && ln -s ../../../../../.. /tmp/t/up \
         && ln -s loop /tmp/t/loop && echo inner > /tmp/t/file",
    ));

    // The control: a plain file in the inner is served.
    let r = read(addr, &name, &token, "/tmp/t/file");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"inner\n"[..]),
        "{r:?}"
    );

    for path in [
        format!("/../../../../{rel}/marker"),
        format!("/tmp/t/../../../../../{rel}/marker"),
        format!("/tmp/t/escape/{rel}/marker"),
        format!("/tmp/t/up/{rel}/marker"),
        format!("/proc/1/root/{rel}/marker"),
        format!("/proc/self/root/{rel}/marker"),
        format!("/proc/self/cwd/{rel}/marker"),
    ] {
        let r = read(addr, &name, &token, &path);
        assert_not_escaped(&r, &path);
        assert!(
            matches!(r.status, 400 | 404),
            "{path}: want 400 or 404, got {r:?}"
        );
    }
    // A relative path against a working directory that climbs.
    let url = format!(
        "/v1/sprites/{name}/fs/read?path={}&workingDir=/../../..",
        q(&format!("{rel}/marker"))
    );
    let r = request(addr, "GET", &url, Some(&token), None);
    assert_not_escaped(&r, "workingDir /../../..");
    assert_eq!(r.status, 404, "{r:?}");

    // The inner's own /etc/passwd through the symlink, not the host's.
    let r = read(addr, &name, &token, "/tmp/t/escape/etc/passwd");
    let inner_passwd = block_on(hull.sh("cat /etc/passwd"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(String::from_utf8_lossy(&r.body), inner_passwd);

    let r = read(addr, &name, &token, "/tmp/t/loop");
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (400, "ELOOP".into()),
        "{r:?}"
    );

    // Writes through the same links land inside the inner, never on the host.
    for path in [
        format!("/tmp/t/escape/{rel}/written"),
        format!("/tmp/t/up/{rel}/written"),
    ] {
        let r = put(addr, &name, &token, &path, b"from the api");
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert!(
            !host_dir.path().join("written").exists(),
            "{path} wrote on the host"
        );
    }
    let inside = block_on(hull.sh(&format!("cat /{rel}/written")));
    assert_eq!(inside, "from the api");
    let r = put(
        addr,
        &name,
        &token,
        &format!("/proc/1/root/{rel}/written2"),
        b"x",
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(!host_dir.path().join("written2").exists());

    // Deleting, renaming and chmodding through the links touch the inner only.
    let url = format!(
        "/v1/sprites/{name}/fs/delete?path={}&recursive=true",
        q(&format!("/tmp/t/escape/{rel}"))
    );
    let r = request(addr, "DELETE", &url, Some(&token), None);
    assert_eq!(r.status, 200, "{r:?}");
    let body = format!(r#"{{"path": "/tmp/t/up/{rel}/marker", "mode": "0777"}}"#);
    let url = format!("/v1/sprites/{name}/fs/chmod");
    let r = request(addr, "POST", &url, Some(&token), Some(&body));
    assert_eq!(r.status, 404, "{r:?}");
    assert!(host_dir.path().join("marker").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(host_dir.path().join("marker"))
        .unwrap()
        .permissions()
        .mode();
    assert_ne!(mode & 0o777, 0o777);
}

#[test]
fn a_symlink_swapped_during_reads_never_leads_out() {
    let Some((hull, addr, token, name)) = start("exec") else {
        return;
    };
    let (_host_dir, rel) = host_marker();
    // In the inner, `link` flips between / and a directory that has the
    // marker's path with the inner's own content, as fast as it can.
    block_on(hull.sh(&format!(
        "mkdir -p /race/real/{rel} && echo inner > /race/real/{rel}/marker \
         && (while [ ! -e /race/stop ]; do ln -sfn / /race/link; ln -sfn /race/real /race/link; done) \
            >/dev/null 2>&1 &"
    )));
    let path = format!("/race/link/{rel}/marker");
    let (mut inner, mut missing) = (0, 0);
    for _ in 0..400 {
        let r = read(addr, &name, &token, &path);
        assert_not_escaped(&r, &path);
        match r.status {
            200 => {
                assert_eq!(r.body, b"inner\n", "{r:?}");
                inner += 1;
            }
            404 => missing += 1,
            _ => panic!("{path}: {r:?}"),
        }
    }
    block_on(hull.sh("touch /race/stop"));
    // Both sides of the swap were seen, so the race was run.
    assert!(inner > 0 && missing > 0, "inner {inner}, missing {missing}");
}

#[test]
fn an_upload_cut_off_leaves_no_file() {
    let Some((hull, addr, token, name)) = start("exec") else {
        return;
    };
    block_on(hull.sh("mkdir -p /up && echo old > /up/target"));
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "PUT /v1/sprites/{name}/fs/write?path=/up/target HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {token}\r\nContent-Length: 10000000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&vec![b'x'; 1 << 20]).unwrap();
    // The temporary file exists while the body arrives...
    wait_until(Duration::from_secs(10), "the upload to begin", || {
        block_on(hull.sh("ls -A /up")).contains(".hull-upload-")
    });
    drop(stream);
    // ...and is gone once the client is, the old content untouched.
    wait_until(
        Duration::from_secs(10),
        "the upload's temporary file to go",
        || block_on(hull.sh("ls -A /up")) == "target\n",
    );
    assert_eq!(block_on(hull.sh("cat /up/target")), "old\n");
}

#[test]
fn a_read_token_lists_files_but_cannot_read_or_change_them() {
    let Some((hull, addr, reader, name)) = start("read") else {
        return;
    };
    block_on(hull.sh("mkdir -p /ro && echo kept > /ro/file"));

    // A file's contents may be a secret: reading them needs exec.
    let r = read(addr, &name, &reader, "/ro/file");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (403, "insufficient_scope".into()),
        "{r:?}"
    );
    let r = put(addr, &name, &reader, "/ro/new", b"nope");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (403, "insufficient_scope".into())
    );
    let r = request(
        addr,
        "GET",
        &format!("/v1/sprites/{name}/fs/list?path=/"),
        Some(&reader),
        None,
    );
    let ro = r.json()["entries"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "ro").cloned())
        .unwrap_or_else(|| panic!("no /ro in {r:?}"));
    assert_eq!(
        (ro["type"].clone(), ro["isDir"].clone()),
        ("directory".into(), true.into()),
        "{ro}"
    );
    let url = format!("/v1/sprites/{name}/fs/delete?path=/ro/file");
    let r = request(addr, "DELETE", &url, Some(&reader), None);
    assert_eq!(r.status, 403, "{r:?}");
    let url = format!("/v1/sprites/{name}/fs/rename");
    let body = r#"{"source": "/ro/file", "dest": "/ro/moved"}"#;
    let r = request(addr, "POST", &url, Some(&reader), Some(body));
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(block_on(hull.sh("ls -A /ro")), "file\n");
    assert_eq!(block_on(hull.sh("cat /ro/file")), "kept\n");
}

/// A cgroup's page cache, from its memory.stat: `file` on cgroup v2,
/// `total_cache` (itself and its descendants) on v1.
fn page_cache(group: &hull_cgroups::Cgroup) -> u64 {
    let paths = group.display_path();
    for dir in paths.split(',') {
        let Ok(stat) = std::fs::read_to_string(format!("{dir}/memory.stat")) else {
            continue;
        };
        let field = |name: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let Some(bytes) = field("file ").or_else(|| field("total_cache ")) {
            return bytes;
        }
    }
    panic!("no page cache figure in the memory.stat of {paths}");
}

/// An upload is the sandbox's data: its page cache is charged to the
/// inner's cgroup, not to hulld's, whose small memory limit would push it
/// out (and make hulld reclaim) as it is written.
#[test]
fn an_uploads_page_cache_is_charged_to_the_inner() {
    let Some((hull, addr, token, name)) = start("exec") else {
        return;
    };
    let groups = hull.cgroups();
    let size = 96 << 20;
    let (inner_before, daemon_before) = (page_cache(&groups.inner), page_cache(&groups.daemon));
    let r = put(addr, &name, &token, "/charged.bin", &vec![7u8; size]);
    assert_eq!(r.status, 200, "{r:?}");
    let (inner_after, daemon_after) = (page_cache(&groups.inner), page_cache(&groups.daemon));
    let inner_grew = inner_after.saturating_sub(inner_before);
    let daemon_grew = daemon_after.saturating_sub(daemon_before);
    assert!(
        inner_grew >= (size as u64) * 3 / 4,
        "the inner's page cache grew by {inner_grew} bytes for a {size}-byte upload (hulld's by {daemon_grew})"
    );
    assert!(
        daemon_grew < (size as u64) / 4,
        "hulld's page cache grew by {daemon_grew} bytes for a {size}-byte upload"
    );
    let back = read(addr, &name, &token, "/charged.bin");
    assert_eq!(back.body.len(), size);
    assert!(back.body.iter().all(|&b| b == 7));
}
