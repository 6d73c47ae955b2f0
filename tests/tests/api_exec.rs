//! Exec over the HTTP API: the Sprites SDK's scenarios (tests/sdk/exec_*.py)
//! with control mode off and on, and what a misbehaving client does to a
//! real hulld: a token without the scope, a frame of the wrong kind, a
//! client that vanishes mid-exec.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hull_tests::http::request;
use hull_tests::ws::{collect, connect, Ws};
use hull_tests::{
    block_on, inner_pids_running, require_root, sdk_python, wait_until, workspace_dir, TestHull,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use hull_tests::http::sprite_name;

/// Runs tests/sdk/`script` against `hull` through the SDK, in control
/// mode or not.
fn sdk(
    hull: &TestHull,
    python: &std::path::Path,
    script: &str,
    control: bool,
    env: &[(&str, &str)],
) -> Output {
    let addr = block_on(hull.api_addr());
    let token = hull.api_token("exec");
    let out = Command::new(python)
        .arg(workspace_dir().join("tests/sdk").join(script))
        .env("SPRITES_URL", format!("http://{addr}"))
        .env("SPRITES_TOKEN", &token)
        .env("SPRITE_NAME", sprite_name(addr, &token))
        .env("SPRITES_CONTROL_MODE", if control { "1" } else { "0" })
        .env("SPRITES_CLIENT_SIGNALS", "0")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} (control mode {control}) failed: {}\n{}\nhulld log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        hull.log()
    );
    out
}

fn sdk_both_modes(script: &str, expect: &str) {
    if !require_root() {
        return;
    }
    let Some(python) = sdk_python() else { return };
    let hull = TestHull::start();
    for control in [false, true] {
        let out = sdk(&hull, &python, script, control, &[]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(expect), "{script}: {stdout}");
    }
}

#[test]
fn sdk_runs_commands_with_their_output_exit_codes_and_stdin() {
    sdk_both_modes("exec_run.py", "exec_run ok");
}

#[test]
fn sdk_tty_session_has_its_size_and_sees_a_resize() {
    sdk_both_modes("exec_tty.py", "exec_tty ok");
}

#[test]
fn sdk_signal_reaches_the_command() {
    sdk_both_modes("exec_signal.py", "exec_signal ok");
}

#[test]
fn sdk_streams_50_mb_while_hulld_rss_stays_bounded() {
    if !require_root() {
        return;
    }
    let Some(python) = sdk_python() else { return };
    let hull = TestHull::start();
    let pid = hull.hulld_pid();
    let bytes = 50 * 1024 * 1024;
    for control in [false, true] {
        let before = hull_tests::rss_kib(pid);
        let done = std::sync::atomic::AtomicBool::new(false);
        let peak = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut peak = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(hull_tests::rss_kib(pid));
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak
            });
            // Stops the sampler even when the script fails, so that the
            // failure is reported instead of the scope waiting for ever.
            struct Done<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let stop = Done(&done);
            let out = sdk(
                &hull,
                &python,
                "exec_stream.py",
                control,
                &[("EXEC_STREAM_BYTES", &bytes.to_string())],
            );
            drop(stop);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains(&format!("streamed {bytes} bytes")),
                "{stdout}"
            );
            sampler.join().unwrap()
        });
        // 50 MB passed through: had it been buffered, RSS would show it.
        eprintln!(
            "hulld RSS: {before} KiB before, {peak} KiB at the peak (control mode {control})"
        );
        let grew_mib = peak.saturating_sub(before) / 1024;
        assert!(
            grew_mib < 24,
            "hulld's RSS grew {grew_mib} MiB streaming {bytes} bytes (control mode {control})"
        );
    }
}

/// The close frame the server ends with, skipping what comes before it.
async fn close_frame(ws: &mut Ws) -> CloseFrame {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => return frame.expect("a close frame with a reason"),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// A hulld with an exec token: the API's address, the token, the sprite.
fn api_hull() -> Option<(TestHull, SocketAddr, String, String)> {
    if !require_root() {
        return None;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let token = hull.api_token("exec");
    let name = sprite_name(addr, &token);
    Some((hull, addr, token, name))
}

#[test]
fn exec_needs_an_exec_token_and_a_read_token_runs_nothing() {
    let Some((hull, addr, exec, name)) = api_hull() else {
        return;
    };
    let read = hull.api_token("read");
    let path = format!("/v1/sprites/{name}/exec?cmd=touch&cmd=/tmp/ran-it");
    block_on(async {
        let refused = connect(addr, &path, &read).await.unwrap_err();
        let tokio_tungstenite::tungstenite::Error::Http(response) = refused else {
            panic!("expected an HTTP refusal, got {refused:?}");
        };
        assert_eq!(response.status(), 403);
        let body: serde_json::Value =
            serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
        assert_eq!(body["error"], "insufficient_scope", "{body}");
        for route in ["control"] {
            let refused = connect(addr, &format!("/v1/sprites/{name}/{route}"), &read).await;
            assert!(
                matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 403)
            );
        }
    });
    // An exec token on a request that is not a WebSocket: told so.
    let r = request(addr, "GET", &path, Some(&exec), None);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (426, "websocket_required".into()),
        "{r:?}"
    );
    let out = block_on(hull.exec(&["ls", "/tmp/ran-it"]));
    assert!(!out.stderr.is_empty(), "the read token's exec ran: {out:?}");

    // The same request with an exec token runs, as a check on the above.
    block_on(async {
        let mut ws = connect(addr, &path, &exec).await.unwrap();
        assert_eq!(collect(&mut ws).await.unwrap().1, 0);
    });
    assert_eq!(block_on(hull.sh("ls /tmp/ran-it")), "/tmp/ran-it\n");
}

#[test]
fn a_frame_of_the_wrong_kind_closes_clearly_and_kills_the_command() {
    let Some((hull, addr, token, name)) = api_hull() else {
        return;
    };
    let argv = ["sleep", "4243"];
    block_on(async {
        let mut ws = connect(
            addr,
            &format!("/v1/sprites/{name}/exec?cmd=sleep&cmd=4243"),
            &token,
        )
        .await
        .unwrap();
        // session_info first: the command runs.
        let info = ws.next().await.unwrap().unwrap();
        let info: serde_json::Value = serde_json::from_str(info.to_text().unwrap()).unwrap();
        assert_eq!(info["type"], "session_info", "{info}");
        // Stream 1 is stdout, which only the server sends.
        ws.send(Message::Binary(vec![1, b'x'].into()))
            .await
            .unwrap();
        let close = close_frame(&mut ws).await;
        assert_eq!(close.code, CloseCode::Unsupported, "{close:?}");
        assert!(close.reason.contains("stream 1"), "{close:?}");
    });
    wait_until(Duration::from_secs(10), "the sleep to be killed", || {
        inner_pids_running(&hull, &argv).is_empty()
    });
    // A text frame that is not JSON on a TTY exec: the same.
    block_on(async {
        let mut ws = connect(
            addr,
            &format!("/v1/sprites/{name}/exec?cmd=sleep&cmd=4243&tty=true"),
            &token,
        )
        .await
        .unwrap();
        ws.send(Message::text("resize please")).await.unwrap();
        let close = close_frame(&mut ws).await;
        assert!(close.reason.contains("not JSON"), "{close:?}");
    });
    wait_until(
        Duration::from_secs(10),
        "the TTY sleep to be killed",
        || inner_pids_running(&hull, &argv).is_empty(),
    );
    // hulld is unaffected.
    assert_eq!(block_on(hull.sh("echo fine")), "fine\n");
    let r = request(
        addr,
        "GET",
        &format!("/v1/sprites/{name}"),
        Some(&token),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn a_client_that_vanishes_leaves_its_command_running_only_as_long_as_it_asked() {
    let Some((hull, addr, token, name)) = api_hull() else {
        return;
    };
    let start = |secs: &str, grace: Option<&str>| {
        let mut path = format!("/v1/sprites/{name}/exec?cmd=sleep&cmd={secs}");
        if let Some(grace) = grace {
            path.push_str(&format!("&max_run_after_disconnect={grace}"));
        }
        block_on(async {
            let mut ws = connect(addr, &path, &token).await.unwrap();
            let info = ws.next().await.unwrap().unwrap();
            assert!(info.to_text().unwrap().contains("session_info"));
            // Gone without a close frame, as a crashed client goes.
            drop(ws);
        });
    };

    // Nothing after the disconnect: killed at once.
    start("4301", Some("0"));
    wait_until(
        Duration::from_secs(5),
        "the sleep 4301 to be killed",
        || inner_pids_running(&hull, &["sleep", "4301"]).is_empty(),
    );

    // Two seconds: alive a while after the client left, then killed.
    start("4302", Some("2s"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        inner_pids_running(&hull, &["sleep", "4302"]).len(),
        1,
        "killed before its 2 s"
    );
    wait_until(
        Duration::from_secs(10),
        "the sleep 4302 to be killed",
        || inner_pids_running(&hull, &["sleep", "4302"]).is_empty(),
    );

    // The default without a TTY runs on (10 s).
    start("4303", None);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        inner_pids_running(&hull, &["sleep", "4303"]).len(),
        1,
        "the default let it run on for no time"
    );

    // hulld is fine.
    assert_eq!(block_on(hull.sh("echo fine")), "fine\n");
}

#[test]
fn a_client_that_does_not_read_stalls_the_command_not_hulld() {
    let Some((hull, addr, token, name)) = api_hull() else {
        return;
    };
    let pid = hull.hulld_pid();
    let argv = ["head", "-c", "1073741824", "/dev/zero"];
    let before = hull_tests::rss_kib(pid);
    block_on(async {
        let path = format!(
            "/v1/sprites/{name}/exec?cmd=head&cmd=-c&cmd=1073741824&cmd=/dev/zero&max_run_after_disconnect=0"
        );
        let ws = connect(addr, &path, &token).await.unwrap();
        // Not a frame read for two seconds: 1 GiB would pass in that time.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            inner_pids_running(&hull, &argv).len(),
            1,
            "the command did not wait for its reader"
        );
        let grew_mib = hull_tests::rss_kib(pid).saturating_sub(before) / 1024;
        eprintln!("hulld RSS grew {grew_mib} MiB under a client that does not read");
        assert!(
            grew_mib < 24,
            "hulld's RSS grew {grew_mib} MiB holding output for a client that does not read"
        );
        drop(ws);
    });
    wait_until(
        Duration::from_secs(10),
        "the stalled head to be killed",
        || inner_pids_running(&hull, &argv).is_empty(),
    );
}

/// The next control message on `control`, skipping data frames.
async fn control_message(control: &mut Ws) -> serde_json::Value {
    while let Some(frame) = control.next().await {
        if let Message::Text(text) = frame.unwrap() {
            if let Some(msg) = text.as_str().strip_prefix("control:") {
                return serde_json::from_str(msg).unwrap();
            }
        }
    }
    panic!("the control connection closed");
}

#[test]
fn the_control_connection_runs_execs_in_turn_and_refuses_what_it_does_not_serve() {
    let Some((hull, addr, token, name)) = api_hull() else {
        return;
    };
    block_on(async {
        let mut control = connect(addr, &format!("/v1/sprites/{name}/control"), &token)
            .await
            .unwrap();
        let start = |args: serde_json::Value, op: &str| {
            Message::text(format!(
                "control:{}",
                serde_json::json!({"type": "op.start", "op": op, "args": args})
            ))
        };
        control
            .send(start(serde_json::json!({"path": "/tmp"}), "fs.read"))
            .await
            .unwrap();
        let refused = control_message(&mut control).await;
        assert_eq!(refused["type"], "op.error", "{refused}");
        assert!(
            refused["args"]["error"]
                .as_str()
                .unwrap()
                .contains("not served"),
            "{refused}"
        );

        for code in [0, 3] {
            let script = format!("cat; exit {code}");
            control
                .send(start(
                    serde_json::json!({"cmd": ["sh", "-c", script]}),
                    "exec",
                ))
                .await
                .unwrap();
            control
                .send(Message::Binary(b"\0hello".to_vec().into()))
                .await
                .unwrap();
            control.send(Message::Binary(vec![4].into())).await.unwrap();
            let mut stdout = Vec::new();
            let done = loop {
                match control.next().await.unwrap().unwrap() {
                    Message::Binary(data) if data[0] == 1 => stdout.extend_from_slice(&data[1..]),
                    Message::Text(text) if text.as_str().starts_with("control:") => {
                        break serde_json::from_str::<serde_json::Value>(&text.as_str()[8..])
                            .unwrap()
                    }
                    _ => {}
                }
            };
            assert_eq!(stdout, b"hello");
            assert_eq!(done["type"], "op.complete", "{done}");
            assert_eq!(done["args"]["exitCode"], code, "{done}");
            // A frame after the end (a late stdin EOF) is dropped.
            control.send(Message::Binary(vec![4].into())).await.unwrap();
        }

        // A second op.start while one runs: a clear close.
        control
            .send(start(serde_json::json!({"cmd": ["sleep", "4401"]}), "exec"))
            .await
            .unwrap();
        control
            .send(start(serde_json::json!({"cmd": ["true"]}), "exec"))
            .await
            .unwrap();
        let close = close_frame(&mut control).await;
        assert_eq!(close.code, CloseCode::Unsupported, "{close:?}");
        assert!(
            close.reason.contains("one operation at a time"),
            "{close:?}"
        );
    });
    wait_until(
        Duration::from_secs(10),
        "the sleep 4401 to be killed",
        || inner_pids_running(&hull, &["sleep", "4401"]).is_empty(),
    );
    assert_eq!(block_on(hull.sh("echo fine")), "fine\n");
}

#[test]
fn an_inner_that_stops_under_the_command_closes_with_the_reason() {
    let Some((hull, addr, token, name)) = api_hull() else {
        return;
    };
    block_on(async {
        let path = format!("/v1/sprites/{name}/exec?cmd=sleep&cmd=4501");
        let mut ws = connect(addr, &path, &token).await.unwrap();
        let info = ws.next().await.unwrap().unwrap();
        assert!(info.to_text().unwrap().contains("session_info"));
        hull.client().await.bounce(0).await.unwrap();
        let close = close_frame(&mut ws).await;
        assert_eq!(close.code, CloseCode::Error, "{close:?}");
        assert!(close.reason.contains("sandbox stopped"), "{close:?}");
    });
    hull.wait_running(Duration::from_secs(10));
    assert_eq!(block_on(hull.sh("echo fine")), "fine\n");
}

/// Reads a terminal's bytes from `ws` until they hold `needle`.
async fn read_tty_until(ws: &mut Ws, needle: &str) -> String {
    let mut seen = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains(needle) {
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => seen.push_str(&String::from_utf8_lossy(&data)),
                Some(Ok(_)) => {}
                other => panic!("the socket ended ({other:?}) before {needle:?}; seen {seen:?}"),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no {needle:?} in {seen:?}");
    seen
}

#[test]
fn a_terminal_session_outlives_its_websocket_and_is_attached_again_with_its_screen() {
    let Some((hull, addr, token, name)) = api_hull() else {
        return;
    };
    let path = format!("/v1/sprites/{name}/exec?cmd=cat&tty=true&rows=24&cols=80");
    let session = block_on(async {
        let mut ws = connect(addr, &path, &token).await.unwrap();
        let info: serde_json::Value =
            serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
        ws.send(Message::binary(b"before-the-break\n".to_vec()))
            .await
            .unwrap();
        read_tty_until(&mut ws, "before-the-break").await;
        // Gone without a close frame, as a crashed client goes.
        drop(ws);
        info["session_id"].as_str().unwrap().to_string()
    });
    // The session is listed and its process lives on.
    let listed = request(
        addr,
        "GET",
        &format!("/v1/sprites/{name}/exec"),
        Some(&token),
        None,
    );
    assert_eq!(listed.status, 200, "{listed:?}");
    let ids: Vec<String> = listed.json()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].to_string().trim_matches('"').to_string())
        .collect();
    assert!(ids.contains(&session), "{session} not in {ids:?}");
    assert_eq!(inner_pids_running(&hull, &["cat"]).len(), 1);

    // Attached again: the earlier screen first, then input reaches it.
    block_on(async {
        let attach = format!("/v1/sprites/{name}/exec/{session}");
        let mut ws = connect(addr, &attach, &token).await.unwrap();
        read_tty_until(&mut ws, "before-the-break").await;
        ws.send(Message::binary(b"after-the-attach\n".to_vec()))
            .await
            .unwrap();
        read_tty_until(&mut ws, "after-the-attach").await;
        // ^D ends cat, and with it the session: the exit comes as on a
        // session started here.
        ws.send(Message::binary(b"\x04".to_vec())).await.unwrap();
        let mut exit = None;
        while let Some(Ok(frame)) = ws.next().await {
            if let Message::Text(text) = &frame {
                let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                if v["type"] == "exit" {
                    exit = Some(v["exit_code"].clone());
                }
            }
        }
        assert_eq!(exit, Some(serde_json::json!(0)));
    });
    // An unknown session is a refusal before the upgrade.
    let refused = block_on(connect(
        addr,
        &format!("/v1/sprites/{name}/exec/999999"),
        &token,
    ));
    assert!(
        matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 404),
        "attach to an unknown session"
    );
}

/// An exec tells its client when its command starts or stops listening on
/// a port (`port_opened` / `port_closed` with the owner's pid), as the
/// SDKs' port proxies expect, and says nothing of a port another process
/// opens meanwhile.
#[test]
fn an_exec_tells_of_the_ports_its_command_opens_and_closes() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let token = hull.api_token("exec");
    let name = sprite_name(addr, &token);
    let script = "httpd -f -p 127.0.0.1:9410 -h / & read x; kill $!; wait; read y; echo done";
    let encoded: String = script
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let path = format!("/v1/sprites/{name}/exec?cmd=sh&cmd=-c&cmd={encoded}&stdin=true");
    let inner_pid = hull
        .wait_running(Duration::from_secs(10))
        .inner_pid
        .unwrap();

    block_on(async {
        let mut ws = connect(addr, &path, &token).await.unwrap();
        let opened = next_port_frame(&mut ws).await;
        assert_eq!(opened["type"], "port_opened", "{opened}");
        assert_eq!(opened["port"], 9410, "{opened}");
        assert_eq!(opened["address"], "127.0.0.1", "{opened}");
        let pid = opened["pid"].as_i64().unwrap();
        assert!(pid > 1, "the owner's pid: {opened}");

        // A port of a process outside the command's tree, seen by hulld
        // before the command's port closes.
        let _other = hull_tests::listen_in_inner(inner_pid, 9411..9412);
        wait_until(Duration::from_secs(10), "hull ports lists 9411", || {
            String::from_utf8_lossy(&hull.hull(&["ports", "--json"]).stdout).contains("9411")
        });
        ws.send(Message::binary(b"\0go\n".to_vec())).await.unwrap();
        let closed = next_port_frame(&mut ws).await;
        assert_eq!(
            (closed["type"].as_str(), closed["port"].as_i64()),
            (Some("port_closed"), Some(9410)),
            "{closed}"
        );
        ws.send(Message::binary(b"\0go\n".to_vec())).await.unwrap();
        ws.send(Message::binary(vec![4])).await.unwrap();
        let (stdout, code) = collect(&mut ws).await.expect("the exit frame");
        assert_eq!((String::from_utf8_lossy(&stdout).trim(), code), ("done", 0));
    });
}

/// The next `port_*` text frame, skipping others.
async fn next_port_frame(ws: &mut Ws) -> serde_json::Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                if value["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("port_"))
                {
                    return value;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no port frame: {other:?}"),
        }
    }
}

/// `GET .../exec/ID?watch=true` attaches a viewer: it sees the screen and
/// what follows, and its input reaches nothing while the writer's does.
/// A session's output may hold secrets, so even watching needs an exec
/// token; a read token is refused either way.
#[test]
fn a_watcher_needs_an_exec_token_and_cannot_type_into_the_session() {
    let Some((hull, addr, token, name)) = api_hull() else {
        return;
    };
    let read = hull.api_token("read");
    let other = hull.api_token("exec");
    let path = format!("/v1/sprites/{name}/exec?cmd=cat&tty=true&rows=24&cols=80");
    block_on(async {
        let mut writer = connect(addr, &path, &token).await.unwrap();
        let info: serde_json::Value =
            serde_json::from_str(writer.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
        let session = info["session_id"].as_str().unwrap().to_string();
        writer
            .send(Message::binary(b"before-the-watcher\n".to_vec()))
            .await
            .unwrap();
        read_tty_until(&mut writer, "before-the-watcher").await;

        let attach = format!("/v1/sprites/{name}/exec/{session}");
        for path in [attach.clone(), format!("{attach}?watch=true")] {
            let refused = connect(addr, &path, &read).await;
            assert!(
                matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 403),
                "a read token attached to {path}: {refused:?}"
            );
        }
        let mut watcher = connect(addr, &format!("{attach}?watch=true"), &other)
            .await
            .unwrap();
        read_tty_until(&mut watcher, "before-the-watcher").await;
        watcher
            .send(Message::binary(b"typed-by-the-watcher\n".to_vec()))
            .await
            .unwrap();
        writer
            .send(Message::binary(b"typed-by-the-writer\n".to_vec()))
            .await
            .unwrap();
        let seen = read_tty_until(&mut watcher, "typed-by-the-writer").await;
        assert!(!seen.contains("typed-by-the-watcher"), "{seen:?}");
        let seen = read_tty_until(&mut writer, "typed-by-the-writer").await;
        assert!(!seen.contains("typed-by-the-watcher"), "{seen:?}");
        writer
            .send(Message::binary(b"\x04".to_vec()))
            .await
            .unwrap();
    });
}

/// The Go SDK attaches to a session on its control connection: an exec
/// operation with the session's `id` instead of a command.
#[test]
fn a_control_connection_attaches_to_a_session_by_id() {
    let Some((_hull, addr, token, name)) = api_hull() else {
        return;
    };
    let path = format!("/v1/sprites/{name}/exec?cmd=cat&tty=true&rows=24&cols=80");
    block_on(async {
        let mut ws = connect(addr, &path, &token).await.unwrap();
        let info: serde_json::Value =
            serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
        let session = info["session_id"].as_str().unwrap().to_string();
        ws.send(Message::binary(b"before-the-attach\n".to_vec()))
            .await
            .unwrap();
        read_tty_until(&mut ws, "before-the-attach").await;
        drop(ws);

        let mut control = connect(addr, &format!("/v1/sprites/{name}/control"), &token)
            .await
            .unwrap();
        let op = serde_json::json!({"type": "op.start", "op": "exec", "args": {"id": session}});
        control
            .send(Message::text(format!("control:{op}")))
            .await
            .unwrap();
        read_tty_until(&mut control, "before-the-attach").await;
        control
            .send(Message::binary(b"typed-over-control\n".to_vec()))
            .await
            .unwrap();
        read_tty_until(&mut control, "typed-over-control").await;
        control
            .send(Message::binary(b"\x04".to_vec()))
            .await
            .unwrap();
        let complete = control_message(&mut control).await;
        assert_eq!(complete["type"], "op.complete", "{complete}");
        assert_eq!(complete["args"]["exitCode"], 0, "{complete}");
    });
}
