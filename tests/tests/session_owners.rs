//! Who started each session. Any exec token may attach to or kill any
//! session, so the session list says who started each one: the API
//! token's name (its id when it has none), or "local" for the control
//! socket. The label comes from the connection, never from the request.

use futures::StreamExt;
use hull_tests::attacks::requests::sprite_name;
use hull_tests::http::request;
use hull_tests::ws::connect;
use hull_tests::{block_on, require_root, TestHull};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// A token of `scope` named `name` (none when `None`): the token, and its id.
fn token(hull: &TestHull, scope: &str, name: Option<&str>) -> (String, String) {
    let mut args = vec!["--json", "token", "create", "--scope", scope];
    if let Some(name) = name {
        args.extend(["--name", name]);
    }
    let out = hull.hull(&args);
    assert!(out.status.success(), "token create: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["token"].as_str().unwrap().to_string(),
        v["info"]["id"].as_str().unwrap().to_string(),
    )
}

/// Starts a terminal session over the exec WebSocket with `token` and
/// leaves it detached; its pid in the inner.
fn api_session(addr: std::net::SocketAddr, token: &str, sprite: &str) -> i64 {
    block_on(async {
        let path = format!("/v1/sprites/{sprite}/exec?cmd=sleep&cmd=3600&tty=true");
        let mut ws = connect(addr, &path, token).await.unwrap();
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let v: Value = serde_json::from_str(text.as_str()).unwrap();
                    if v["type"] == "session_info" {
                        // Hanging up leaves a terminal's session detached.
                        return v["pid"].as_i64().expect("session_info has the pid");
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("expected session_info, got {other:?}"),
            }
        }
    })
}

/// Starts `sleep 3600` in the background with the CLI (`extra` before the
/// command: `--url` and `--token`, or nothing for the control socket);
/// its pid in the inner.
fn cli_session(hull: &TestHull, extra: &[&str]) -> i64 {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    args.extend(["exec", "-d", "--", "sleep", "3600"]);
    let out = hull.hull(&args);
    assert!(out.status.success(), "hull {args:?}: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["pid"].as_i64().unwrap()
}

/// The `started_by` of the session with `pid` in `sessions`.
fn started_by(sessions: &Value, pid: i64) -> Value {
    sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["pid"].as_i64() == Some(pid))
        .unwrap_or_else(|| panic!("no session with pid {pid} in {sessions}"))["started_by"]
        .clone()
}

#[test]
fn the_session_list_says_who_started_each_session() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let (alice, _) = token(&hull, "exec", Some("alice"));
    let (bob, _) = token(&hull, "exec", Some("bob"));
    let (unnamed, unnamed_id) = token(&hull, "exec", None);
    let sprite = sprite_name(addr, &alice);

    let by_alice = api_session(addr, &alice, &sprite);
    let by_unnamed = api_session(addr, &unnamed, &sprite);
    let url = format!("http://{addr}");
    let by_bob = cli_session(&hull, &["--url", &url, "--token", &bob]);
    let local = cli_session(&hull, &[]);

    // The API's list, read with another exec token than alice's.
    let listed = request(
        addr,
        "GET",
        &format!("/v1/sprites/{sprite}/exec"),
        Some(&bob),
        None,
    );
    assert_eq!(listed.status, 200, "{listed:?}");
    let sessions = &listed.json()["sessions"];
    assert_eq!(started_by(sessions, by_alice), "alice", "{sessions}");
    assert_eq!(started_by(sessions, by_bob), "bob", "through the tunnel");
    assert_eq!(started_by(sessions, by_unnamed), unnamed_id.as_str());
    assert_eq!(started_by(sessions, local), "local");

    // `hull sessions list --json` says the same.
    let out = hull.hull(&["--json", "sessions", "list"]);
    assert!(out.status.success(), "{out:?}");
    let sessions: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(started_by(&sessions, by_alice), "alice", "{sessions}");
    assert_eq!(started_by(&sessions, local), "local");

    // And the table, in a column of its own.
    let out = hull.hull(&["sessions", "list"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert!(header.contains(&"STARTED_BY"), "{table}");
    let row = |pid: i64| {
        table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(&pid.to_string()))
            .unwrap_or_else(|| panic!("no row for pid {pid}:\n{table}"))
            .to_string()
    };
    assert!(
        row(by_alice).split_whitespace().any(|w| w == "alice"),
        "{table}"
    );
    assert!(
        row(local).split_whitespace().any(|w| w == "local"),
        "{table}"
    );
}
