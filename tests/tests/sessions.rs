//! Exec sessions: a terminal session outlives its client and replays its
//! screen on attach, one writer among several clients, kill, detach, the
//! end a bounce gives, and bounds on what a client that never reads costs.

use std::time::{Duration, Instant};

use futures::SinkExt;
use hull_outer::client::{next, Client, ClientError};
use hull_proto::{
    ClientMsg, DaemonMsg, ErrorKind, ExecEnd, ExecRequest, ExecSpec, ExitStatus, SessionInfo,
    WinSize,
};
use hull_tests::{block_on, inner_pids_running, read_until, require_root, wait_until, TestHull};

fn request(argv: &[&str], tty: bool) -> ExecRequest {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        cwd: None,
        user: None,
        tty: tty.then_some(WinSize { rows: 24, cols: 80 }),
    }
    .into()
}

/// Reads until the session ends; returns its end and the output before.
async fn wait_end(c: &mut Client) -> (ExecEnd, String) {
    let mut seen = String::new();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match next(&mut c.reader).await.unwrap() {
                DaemonMsg::Output { data, .. } => seen.push_str(&String::from_utf8_lossy(&data)),
                DaemonMsg::ExecEnded(end) => return end,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the session did not end; seen {seen:?}"));
    (end, seen)
}

async fn send(c: &mut Client, msg: ClientMsg) {
    c.writer.send(msg).await.unwrap();
}

fn list(hull: &TestHull) -> Vec<SessionInfo> {
    block_on(async { hull.client().await.sessions_list().await.unwrap() })
}

fn listed(hull: &TestHull, id: u64) -> Option<SessionInfo> {
    list(hull).into_iter().find(|s| s.id == id)
}

/// Waits until session `id` is gone and its process `argv` with it.
fn wait_gone(hull: &TestHull, id: u64, argv: &[&str], what: &str) {
    wait_until(Duration::from_secs(5), what, || {
        listed(hull, id).is_none() && inner_pids_running(hull, argv).is_empty()
    });
}

fn vm_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_terminal_session_outlives_its_client_and_attach_brings_the_screen_back() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let id = block_on(async {
        let mut c = hull.client().await;
        let started = c.exec_begin(request(&["sh"], true)).await.unwrap();
        send(&mut c, ClientMsg::Stdin(b"echo mark-$((6*7))\n".to_vec())).await;
        read_until(&mut c, "mark-42").await;
        started.session
        // The client goes without a word.
    });
    wait_until(Duration::from_secs(5), "the client to be gone", || {
        listed(&hull, id).is_some_and(|s| s.clients == 0)
    });
    let info = listed(&hull, id).expect("the session ended with its client");
    assert!(info.tty && info.argv == ["sh"], "{info:?}");
    assert!(info.scrollback_bytes > 0, "{info:?}");
    block_on(async {
        let mut c = hull.client().await;
        let (info, writer) = c.session_attach(id, false).await.unwrap();
        assert_eq!(info.id, id);
        assert!(writer, "the only client is the writer");
        // The scrollback: what the screen showed before.
        read_until(&mut c, "mark-42").await;
        send(&mut c, ClientMsg::Stdin(b"echo back-$((1+2))\n".to_vec())).await;
        read_until(&mut c, "back-3").await;
        send(&mut c, ClientMsg::Stdin(b"exit 5\n".to_vec())).await;
        let (end, _) = wait_end(&mut c).await;
        assert_eq!(end, ExecEnd::Exited(ExitStatus::Code(5)));
    });
    wait_until(Duration::from_secs(5), "the ended session to go", || {
        listed(&hull, id).is_none()
    });
}

#[test]
fn only_the_writers_input_reaches_the_process() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut a = hull.client().await;
        let id = a.exec_begin(request(&["sh"], true)).await.unwrap().session;
        let mut b = hull.client().await;
        let (_, b_writes) = b.session_attach(id, false).await.unwrap();
        assert!(!b_writes, "a second client watches");
        // The watcher types first; had it reached the shell, its answer
        // would come before the writer's.
        send(&mut b, ClientMsg::Stdin(b"echo from-b-$((1+1))\n".to_vec())).await;
        send(&mut a, ClientMsg::Stdin(b"echo from-a-$((2+2))\n".to_vec())).await;
        let seen_a = read_until(&mut a, "from-a-4").await;
        let seen_b = read_until(&mut b, "from-a-4").await;
        for seen in [&seen_a, &seen_b] {
            assert!(
                !seen.contains("from-b"),
                "the watcher's input arrived: {seen:?}"
            );
        }
        // A third client that asks for the writer's role gets it.
        let mut c = hull.client().await;
        let (_, c_writes) = c.session_attach(id, true).await.unwrap();
        assert!(c_writes);
        send(&mut a, ClientMsg::Stdin(b"echo old-$((3+3))\n".to_vec())).await;
        send(&mut c, ClientMsg::Stdin(b"echo new-$((4+4))\n".to_vec())).await;
        let seen = read_until(&mut a, "new-8").await;
        assert!(
            !seen.contains("old-6"),
            "the old writer's input arrived: {seen:?}"
        );
        send(&mut c, ClientMsg::Stdin(b"exit 7\n".to_vec())).await;
        for client in [&mut a, &mut b, &mut c] {
            let (end, _) = wait_end(client).await;
            assert_eq!(
                end,
                ExecEnd::Exited(ExitStatus::Code(7)),
                "every client sees the end"
            );
        }
    });
}

#[test]
fn kill_ends_a_session_and_sigkill_follows_an_ignored_signal() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut a = hull.client().await;
        let id = a
            .exec_begin(request(&["sleep", "1001"], true))
            .await
            .unwrap()
            .session;
        let mut k = hull.client().await;
        let forced = k.session_kill(id, libc::SIGTERM, 5000).await.unwrap();
        assert!(!forced, "sleep dies of SIGTERM");
        let (end, _) = wait_end(&mut a).await;
        assert_eq!(end, ExecEnd::Exited(ExitStatus::Signal(libc::SIGTERM)));

        let script = "trap '' TERM; echo ready; while :; do sleep 1; done";
        let mut b = hull.client().await;
        let id = b
            .exec_begin(request(&["sh", "-c", script], false))
            .await
            .unwrap()
            .session;
        read_until(&mut b, "ready").await;
        let forced = k.session_kill(id, libc::SIGTERM, 300).await.unwrap();
        assert!(forced, "an ignored SIGTERM is followed by SIGKILL");
        let (end, _) = wait_end(&mut b).await;
        assert_eq!(end, ExecEnd::Exited(ExitStatus::Signal(libc::SIGKILL)));

        match k.session_kill(id, libc::SIGTERM, 300).await {
            Err(ClientError::Daemon(report)) => assert_eq!(report.kind, ErrorKind::NotFound),
            other => panic!("a kill of an ended session: {other:?}"),
        }
    });
    // The CLI says the same.
    let out = hull.hull(&["--json", "sessions", "kill", "999999"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"not_found\""),
        "{out:?}"
    );
}

#[test]
fn a_plain_exec_without_a_terminal_ends_with_its_client() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let id = block_on(async {
        let mut c = hull.client().await;
        c.exec_begin(request(&["sleep", "1002"], false))
            .await
            .unwrap()
            .session
    });
    wait_gone(
        &hull,
        id,
        &["sleep", "1002"],
        "the session to end with its client",
    );
}

#[test]
fn an_explicit_detach_keeps_a_pipe_session_ten_seconds_and_max_run_overrides() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let detached_at = block_on(async {
        let mut c = hull.client().await;
        let id = c
            .exec_begin(request(&["sleep", "1003"], false))
            .await
            .unwrap()
            .session;
        send(&mut c, ClientMsg::Detach).await;
        match next(&mut c.reader).await.unwrap() {
            DaemonMsg::Detached { id: d } => assert_eq!(d, id),
            other => panic!("expected Detached, got {other:?}"),
        }
        let at = Instant::now();
        // The connection serves requests again.
        c.status().await.unwrap();
        at
    });
    std::thread::sleep(Duration::from_secs(5).saturating_sub(detached_at.elapsed()));
    assert_eq!(
        inner_pids_running(&hull, &["sleep", "1003"]).len(),
        1,
        "the detached session ended before its 10 s"
    );
    wait_until(
        Duration::from_secs(15),
        "the session to end after 10 s",
        || inner_pids_running(&hull, &["sleep", "1003"]).is_empty(),
    );
    assert!(
        detached_at.elapsed() >= Duration::from_secs(10),
        "it ended after {:?}",
        detached_at.elapsed()
    );
    // A terminal session with a deadline of its own ends after it.
    let id = block_on(async {
        let mut c = hull.client().await;
        let mut req = request(&["sleep", "1004"], true);
        req.max_run_after_disconnect_ms = Some(300);
        c.exec_begin(req).await.unwrap().session
    });
    wait_gone(
        &hull,
        id,
        &["sleep", "1004"],
        "the session to end after its deadline",
    );
}

#[test]
fn a_bounce_ends_every_session_with_a_reason() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut a = hull.client().await;
        let id = a.exec_begin(request(&["sh"], true)).await.unwrap().session;
        let mut b = hull.client().await;
        b.session_attach(id, false).await.unwrap();
        let mut detached = hull.client().await;
        detached
            .exec_begin(request(&["sleep", "1005"], true))
            .await
            .unwrap();
        drop(detached);
        hull.client().await.bounce(0).await.unwrap();
        for client in [&mut a, &mut b] {
            match wait_end(client).await.0 {
                ExecEnd::InnerStopped { reason } => {
                    assert!(reason.contains("bounce"), "reason: {reason:?}")
                }
                other => panic!("a bounce ended a session with {other:?}"),
            }
        }
    });
    wait_until(Duration::from_secs(5), "the sessions to go", || {
        list(&hull).is_empty()
    });
}

#[test]
fn a_client_that_never_reads_is_cut_and_hulld_stays_bounded() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let hulld = hull.hulld_pid();
    let (id, idle) = block_on(async {
        let mut c = hull.client().await;
        let id = c
            .exec_begin(request(&["sh", "-c", "yes 0123456789abcdef"], true))
            .await
            .unwrap()
            .session;
        // `c` never reads again, and stays connected.
        (id, c)
    });
    let rss_before = vm_rss_kib(hulld);
    let first = listed(&hull, id).unwrap().output_bytes;
    wait_until(Duration::from_secs(120), "64 MiB of output", || {
        listed(&hull, id).is_some_and(|s| s.output_bytes > first + (64 << 20))
    });
    let info = listed(&hull, id).unwrap();
    assert_eq!(info.scrollback_bytes, 1 << 20, "{info:?}");
    assert_eq!(
        info.clients, 0,
        "the client that reads nothing was cut: {info:?}"
    );
    let grown_kib = vm_rss_kib(hulld).saturating_sub(rss_before);
    assert!(
        grown_kib < 32 << 10,
        "hulld grew by {grown_kib} KiB while passing on {} bytes",
        info.output_bytes - first
    );
    drop(idle);
    block_on(async {
        let forced = hull
            .client()
            .await
            .session_kill(id, libc::SIGKILL, 5000)
            .await
            .unwrap();
        assert!(!forced);
    });
}

#[test]
fn the_cli_lists_sessions_and_attaches_to_a_detached_one() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    // A pipe session that writes while nobody is attached: its output
    // waits in the pipe for whoever attaches within the 10 s.
    let id = block_on(async {
        let mut c = hull.client().await;
        let script = "sleep 1; echo early; sleep 1; echo late; exit 4";
        let id = c
            .exec_begin(request(&["sh", "-c", script], false))
            .await
            .unwrap()
            .session;
        send(&mut c, ClientMsg::Detach).await;
        assert!(matches!(
            next(&mut c.reader).await.unwrap(),
            DaemonMsg::Detached { .. }
        ));
        id
    });
    let out = hull.hull(&["sessions", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with(&id.to_string()))
        .unwrap_or_else(|| panic!("session {id} not in {table:?}"));
    assert!(row.contains("sh -c sleep 1; echo early"), "{row:?}");
    let out = hull.hull(&["--json", "sessions", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id && s["tty"] == false),
        "{list}"
    );
    let out = hull.hull(&["sessions", "attach", &id.to_string()]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "early\nlate\n");
}

#[test]
fn a_background_exec_is_a_session_nobody_holds_and_attach_follows_it() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let out = hull.hull(&[
        "--json",
        "exec",
        "--detach",
        "--",
        "sh",
        "-c",
        "sleep 1; echo from-the-background; exit 3",
    ]);
    assert!(out.status.success(), "{out:?}");
    let listed = list(&hull);
    let job = listed
        .iter()
        .find(|s| s.argv[0] == "sh")
        .unwrap_or_else(|| panic!("the background exec is not a session: {listed:?}"));
    assert_eq!(job.clients, 0, "{job:?}");
    let out = hull.hull(&["sessions", "attach", "--watch", &job.id.to_string()]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from-the-background\n"
    );
}

/// `hull exec --detach` returns once its session has let its client go,
/// however busy the session's task is: a list right after shows nobody
/// attached. The slow point holds the session's task back from handling
/// the detach for a second.
#[test]
fn a_detach_returns_only_once_the_session_has_let_its_client_go() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start();
    hull.kill9_hulld();
    hull.spawn_hulld_env(&[("HULL_SLOW_POINT", "session:detach")]);
    hull.wait_running(std::time::Duration::from_secs(20));
    let out = hull.hull(&["--json", "exec", "--detach", "--", "sleep", "100"]);
    assert!(out.status.success(), "{out:?}");
    let listed = list(&hull);
    let job = listed
        .iter()
        .find(|s| s.argv == ["sleep", "100"])
        .unwrap_or_else(|| panic!("the background exec is not a session: {listed:?}"));
    assert_eq!(job.clients, 0, "{job:?}");
}

#[test]
fn a_restore_ends_every_session_with_a_reason_that_names_it() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let id = hull
            .client()
            .await
            .checkpoint_create(None)
            .await
            .unwrap()
            .checkpoint
            .id;
        let mut a = hull.client().await;
        a.exec_begin(request(&["sh"], true)).await.unwrap();
        hull.client().await.checkpoint_restore(&id).await.unwrap();
        match wait_end(&mut a).await.0 {
            ExecEnd::InnerStopped { reason } => {
                assert!(
                    reason.contains(&format!("restored to checkpoint {id}")),
                    "{reason:?}"
                )
            }
            other => panic!("a restore ended a session with {other:?}"),
        }
    });
    wait_until(Duration::from_secs(5), "the sessions to go", || {
        list(&hull).is_empty()
    });
}
