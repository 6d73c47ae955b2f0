//! What exec sessions may cost hulld, tried as an attacker with an exec
//! token would over the HTTP API: detached terminal sessions with full
//! scrollback, and clients that never read their exec's output. And who a
//! session's `session_info` says owns it.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hull_tests::attacks::sessions::{detached_terminal_sessions, never_reading_execs};
use hull_tests::http::request;
use hull_tests::siege::Siege;
use hull_tests::ws::connect;
use hull_tests::{block_on, require_root, rss_kib, TestHull};
use tokio_tungstenite::tungstenite::Message;

/// `daemon.max_sessions`'s default.
const MAX_SESSIONS: usize = 128;
/// `daemon.scrollback_total`'s default.
const SCROLLBACK_TOTAL: u64 = 8 << 20;

use hull_tests::http::sprite_name;

async fn session_info(ws: &mut hull_tests::ws::Ws) -> serde_json::Value {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                if v["type"] == "session_info" {
                    return v;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("expected session_info, got {other:?}"),
        }
    }
}

#[test]
fn a_watcher_is_not_told_it_owns_the_session() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let token = hull.api_token("exec");
    let name = sprite_name(addr, &token);
    block_on(async {
        let path = format!("/v1/sprites/{name}/exec?cmd=cat&tty=true&rows=24&cols=80");
        let mut owner = connect(addr, &path, &token).await.unwrap();
        let info = session_info(&mut owner).await;
        assert_eq!(info["is_owner"], true, "the client that started it: {info}");
        let id = info["session_id"].as_str().unwrap().to_string();
        let attach = format!("/v1/sprites/{name}/exec/{id}");
        let mut watcher = connect(addr, &format!("{attach}?watch=true"), &token)
            .await
            .unwrap();
        let info = session_info(&mut watcher).await;
        assert_eq!(info["is_owner"], false, "a watcher: {info}");
        owner.send(Message::binary(b"\x04".to_vec())).await.unwrap();
    });
}

/// 1.1 MB a session, as the attack printed: more than a session's
/// scrollback of 1 MiB.
const PRINTED: usize = 1_100_000;

#[test]
fn detached_terminal_sessions_are_capped_in_number_and_scrollback() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let token = hull.api_token("exec");
    let name = sprite_name(addr, &token);
    let extra = 12;
    let before = rss_kib(hull.hulld_pid());
    let siege = Siege::begin(&hull);
    let report = block_on(detached_terminal_sessions(
        addr,
        &token,
        &name,
        MAX_SESSIONS + extra,
        PRINTED,
    ));
    eprintln!(
        "hulld RSS {before} KiB before, {} KiB after {} sessions",
        rss_kib(hull.hulld_pid()),
        report.started
    );
    siege.assert_held(&hull, "detached terminal sessions with full scrollback");
    assert_eq!(
        report.started, MAX_SESSIONS,
        "sessions started past the cap: {report:?}"
    );
    assert_eq!(report.refused.len(), extra, "{report:?}");
    for refusal in &report.refused {
        assert_eq!(refusal.status, 503, "{refusal:?}");
        assert!(
            refusal.message.contains("daemon.max_sessions")
                && refusal.message.contains(&MAX_SESSIONS.to_string()),
            "a refusal that does not say why or what raises the bound: {refusal:?}"
        );
    }
    let listed = request(
        addr,
        "GET",
        &format!("/v1/sprites/{name}/exec"),
        Some(&token),
        None,
    )
    .json();
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), MAX_SESSIONS);
    let kept: u64 = sessions
        .iter()
        .map(|s| s["scrollback_bytes"].as_u64().unwrap())
        .sum();
    assert!(
        kept <= SCROLLBACK_TOTAL,
        "{kept} bytes of scrollback kept, past daemon.scrollback_total ({SCROLLBACK_TOTAL})"
    );
    assert!(
        sessions
            .iter()
            .all(|s| s["scrollback_bytes"].as_u64().unwrap() > 0),
        "a session was left with no scrollback at all"
    );
}

/// The exec WebSockets the attack holds open, each never read.
const NEVER_READ: usize = 120;
/// What one such exec may cost hulld, in KiB of RSS.
const PER_EXEC_KIB: u64 = 512;

/// hulld's RSS once it stops growing: read every half second until two
/// readings in a row are within 256 KiB of the one before, for at most
/// 20 s.
fn settled_rss_kib(pid: i32) -> u64 {
    let mut last = rss_kib(pid);
    let mut steady = 0;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss_kib(pid);
        steady = if now.abs_diff(last) < 256 {
            steady + 1
        } else {
            0
        };
        last = now;
        if steady == 2 {
            break;
        }
    }
    last
}

#[test]
fn exec_clients_that_never_read_cost_hulld_a_few_hundred_kib_each() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let token = hull.api_token("exec");
    let name = sprite_name(addr, &token);
    let pid = hull.hulld_pid();
    // One exec first, so what every exec shares is in the baseline.
    block_on(async {
        let path = format!("/v1/sprites/{name}/exec?cmd=true");
        let mut ws = connect(addr, &path, &token).await.unwrap();
        hull_tests::ws::collect(&mut ws).await.unwrap();
    });
    let before = settled_rss_kib(pid);
    let siege = Siege::begin(&hull);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let held = rt
        .block_on(never_reading_execs(addr, &token, &name, NEVER_READ))
        .unwrap();
    let after = settled_rss_kib(pid);
    let per_exec = after.saturating_sub(before) / u64::try_from(NEVER_READ).unwrap();
    eprintln!("hulld RSS {before} KiB -> {after} KiB: {per_exec} KiB per exec never read");
    let report = siege.assert_held(&hull, "exec WebSockets that are never read");
    assert!(
        per_exec <= PER_EXEC_KIB,
        "an exec whose client never reads cost hulld {per_exec} KiB (bound {PER_EXEC_KIB} KiB); peak RSS {} KiB",
        report.peak_rss_kib
    );
    drop(held);
    drop(rt);
}
