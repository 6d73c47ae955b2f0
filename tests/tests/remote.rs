//! `hull --url`: the CLI driving hulld through the HTTP API gives the same
//! output and exit codes as over the control socket, within what its
//! token's scope allows.

use std::process::Output;

use hull_tests::{block_on, remote, require_root, run_with_input, TestHull};

fn local(hull: &TestHull, args: &[&str], stdin: &[u8]) -> Output {
    let mut command = hull.hull_command();
    command.args(args);
    run_with_input(command, stdin)
}

/// A hulld, its API's URL, and a read and an exec token for it.
fn with_tokens() -> (TestHull, String, String, String) {
    let hull = TestHull::start();
    let url = format!("http://{}", block_on(hull.api_addr()));
    let read = hull.api_token("read");
    let exec = hull.api_token("exec");
    (hull, url, read, exec)
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn the_cli_over_the_api_answers_as_it_does_locally() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let url = format!("http://{}", block_on(hull.api_addr()));
    let admin = hull.api_token("admin");

    // Same stdout, stderr and exit code for commands that say the same
    // thing every time.
    let same: &[(&[&str], &[u8])] = &[
        (
            &["exec", "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
            b"",
        ),
        (&["exec", "--", "/no/such/binary"], b""),
        (
            &["exec", "-i", "--", "sh", "-c", "tr a-z A-Z; exit 7"],
            b"piped through\n",
        ),
        (&["services", "list"], b""),
        (&["--json", "checkpoint", "delete", "v99"], b""),
        (&["checkpoint", "restore", "v99"], b""),
    ];
    for (args, stdin) in same {
        let (l, r) = (local(&hull, args, stdin), remote(&url, &admin, args, stdin));
        assert_eq!(
            l.status.code(),
            r.status.code(),
            "{args:?}: local {l:?}\nremote {r:?}"
        );
        assert_eq!(text(&l.stdout), text(&r.stdout), "{args:?}");
        assert_eq!(text(&l.stderr), text(&r.stderr), "{args:?}");
    }

    // Commands whose answers change between runs (durations, ids): the
    // same content.
    let args = [
        "--json",
        "exec",
        "--",
        "sh",
        "-c",
        "printf '\\001\\002'; exit 4",
    ];
    let (l, r) = (local(&hull, &args, b""), remote(&url, &admin, &args, b""));
    assert_eq!(
        (l.status.code(), r.status.code()),
        (Some(4), Some(4)),
        "{l:?} {r:?}"
    );
    let (l, r): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&l.stdout).unwrap(),
        serde_json::from_slice(&r.stdout).unwrap(),
    );
    assert_eq!(l["stdout"], "\u{1}\u{2}", "{l}");
    assert_eq!(
        (&l["stdout"], &l["exit_code"]),
        (&r["stdout"], &r["exit_code"]),
        "{r}"
    );
    let status = remote(&url, &admin, &["--json", "status"], b"");
    assert!(status.status.success(), "{status:?}");
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    let made = remote(
        &url,
        &admin,
        &["--json", "checkpoint", "create", "-m", "remote"],
        b"",
    );
    assert!(made.status.success(), "{made:?}");
    let listed = local(&hull, &["--json", "checkpoint", "list"], b"");
    assert!(text(&listed.stdout).contains("\"remote\""), "{listed:?}");
    let logs = remote(&url, &admin, &["logs", "exec", "--tail", "50"], b"");
    assert!(
        text(&logs.stdout).contains("piped through") || text(&logs.stdout).contains("exec"),
        "{logs:?}"
    );
}

#[test]
fn the_cli_over_the_api_is_held_to_its_tokens_scope() {
    if !require_root() {
        return;
    }
    let (hull, url, read, exec) = with_tokens();

    // A read token sees; it cannot run anything.
    let out = remote(&url, &read, &["--json", "status"], b"");
    assert!(out.status.success(), "{out:?}");
    let out = remote(&url, &read, &["exec", "--", "touch", "/made-by-read"], b"");
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(text(&out.stderr).contains("scope exec"), "{out:?}");
    // An exec token runs commands and cannot checkpoint or bounce.
    let out = remote(&url, &exec, &["exec", "--", "true"], b"");
    assert!(out.status.success(), "{out:?}");
    let out = remote(&url, &exec, &["--json", "checkpoint", "create"], b"");
    assert!(!out.status.success(), "{out:?}");
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["code"], "not_permitted", "{err}");
    let out = remote(&url, &exec, &["bounce"], b"");
    assert!(!out.status.success(), "{out:?}");
    let check = block_on(hull.exec(&[
        "sh",
        "-c",
        "test -e /made-by-read && echo made || echo absent",
    ]));
    assert_eq!(text(&check.stdout).trim(), "absent");
    let listed = local(&hull, &["--json", "checkpoint", "list"], b"");
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(v["checkpoints"].as_array().map(Vec::len), Some(0), "{v}");

    // What runs only on the VM says so; a bad token is refused with a code.
    let out = remote(&url, &exec, &["down"], b"");
    assert!(
        text(&out.stderr).contains("runs on the VM itself"),
        "{out:?}"
    );
    let out = remote(&url, "hull_00000000_bad", &["--json", "status"], b"");
    assert!(!out.status.success(), "{out:?}");
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["code"], "unauthorized", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("invalid_token"),
        "{err}"
    );
    hull.wait_running(std::time::Duration::from_secs(5));
}

#[test]
fn sessions_over_the_api_follow_the_tokens_scope() {
    if !require_root() {
        return;
    }
    let (hull, url, read, exec) = with_tokens();
    let id = block_on(async {
        let mut spec = hull_tests::spec(&["sleep", "1008"]);
        spec.tty = Some(hull_proto::WinSize { rows: 24, cols: 80 });
        hull.client().await.exec_begin(spec).await.unwrap().session
    });
    let out = remote(&url, &read, &["--json", "sessions", "list"], b"");
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"].as_u64() == Some(id)),
        "{list}"
    );
    let id = id.to_string();
    let out = remote(&url, &read, &["--json", "sessions", "kill", &id], b"");
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(err["code"], "not_permitted", "{out:?}");
    let out = remote(&url, &exec, &["--json", "sessions", "kill", &id], b"");
    assert!(out.status.success(), "{out:?}");
    let killed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(killed["forced"], false, "{killed}");
}
