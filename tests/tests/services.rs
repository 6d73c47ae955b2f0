//! The service manager: order, replay after bounce and restore, restart
//! policy, stop and bad definitions.

use std::time::Duration;

use hull_proto::{RestartPolicy, ServiceRequest, ServiceStatus};
use hull_tests::{
    block_on, require_root, wait_until, TestHull, SERVICE_BACKOFF_FIRST, SERVICE_CRASH_LOOP_EXITS,
};

fn list(hull: &TestHull) -> Vec<ServiceStatus> {
    block_on(async {
        hull.client()
            .await
            .services(ServiceRequest::List)
            .await
            .unwrap()
    })
}

fn wait_states(hull: &TestHull, what: &str, pred: impl Fn(&[ServiceStatus]) -> bool) {
    wait_until(Duration::from_secs(15), what, || pred(&list(hull)));
}

fn all_running(names: &'static [&'static str]) -> impl Fn(&[ServiceStatus]) -> bool {
    move |l: &[ServiceStatus]| {
        l.len() == names.len()
            && names.iter().all(|n| {
                l.iter()
                    .any(|s| s.spec.name == *n && s.state == "running" && s.ready)
            })
    }
}

#[test]
fn three_services_come_back_in_order_after_a_bounce_and_two_after_a_restore() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    // Each logs its start; a and b are ready only once their port listens,
    // so the order in the file is the start order.
    hull.add_service(
        "a",
        "echo a >> /root/order; exec httpd -f -p 8001",
        &[],
        Some(8001),
        RestartPolicy::OnFailure,
    );
    hull.add_service(
        "b",
        "sleep 0.2; echo b >> /root/order; exec httpd -f -p 8002",
        &["a"],
        Some(8002),
        RestartPolicy::OnFailure,
    );
    wait_states(&hull, "a and b running", all_running(&["a", "b"]));
    let v1 = block_on(async { hull.client().await.checkpoint_create(None).await.unwrap() });
    assert!(
        v1.checkpoint.services.iter().any(|s| s.name == "b"),
        "{:?}",
        v1.checkpoint.services
    );
    hull.add_service(
        "c",
        "echo c >> /root/order; exec sleep 1000",
        &["b"],
        None,
        RestartPolicy::OnFailure,
    );
    wait_states(&hull, "all three running", all_running(&["a", "b", "c"]));
    assert_eq!(block_on(hull.sh("cat /root/order")), "a\nb\nc\n");

    block_on(async {
        hull.sh("rm /root/order").await;
        hull.client().await.bounce(0).await.unwrap();
    });
    wait_states(
        &hull,
        "all three back after the bounce",
        all_running(&["a", "b", "c"]),
    );
    assert_eq!(block_on(hull.sh("cat /root/order")), "a\nb\nc\n");

    block_on(async { hull.client().await.checkpoint_restore("v1").await.unwrap() });
    wait_states(
        &hull,
        "a and b back after the restore",
        all_running(&["a", "b"]),
    );
    let ps = block_on(hull.sh("ps -o args"));
    assert!(
        !ps.contains("sleep 1000"),
        "c runs after a restore to before it existed: {ps}"
    );
}

/// The state of the service `name`.
fn state(hull: &TestHull, name: &str) -> String {
    list(hull)
        .into_iter()
        .find(|s| s.spec.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
        .state
}

/// Lines in a file of the inner (0 when it does not exist).
fn lines_in(hull: &TestHull, path: &str) -> usize {
    block_on(hull.sh(&format!("cat {path} 2>/dev/null || true")))
        .lines()
        .count()
}

/// The inner's /proc/uptime has centiseconds: a measured gap can be short
/// of the real one by up to this much.
const UPTIME_RESOLUTION_MS: f64 = 10.0;

/// Catches a restart without backoff, a fixed delay, or a delay that does
/// not double: each start is timestamped inside the inner (the kernel's
/// uptime clock, so the times do not depend on when the test looks), and
/// the gap before restart N must be at least the Nth delay (100, 200, 400,
/// 800 ms) and exceed the gap before it by a quarter of the delay's growth.
/// Those are lower bounds, which load on the machine only makes easier to
/// meet; a restart with no delay gives gaps of a few ms that do not grow.
/// It also catches a crash-loop limit other than five exits.
#[test]
fn a_crashing_service_backs_off_then_fails_with_its_last_lines() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    hull.add_service(
        "crasher",
        "read up _ < /proc/uptime; echo $up >> /root/starts; echo boom at $up; exit 1",
        &[],
        None,
        RestartPolicy::OnFailure,
    );
    wait_states(&hull, "the crasher to be marked failed", |l| {
        l.iter().any(|s| s.state == "failed")
    });
    let starts: Vec<f64> = block_on(hull.sh("cat /root/starts"))
        .lines()
        .map(|l| l.parse::<f64>().unwrap() * 1e3)
        .collect();
    assert_eq!(
        starts.len(),
        SERVICE_CRASH_LOOP_EXITS,
        "starts (ms of uptime) before the crash loop was declared: {starts:?}"
    );
    let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("gaps between starts (ms): {gaps:?}");
    let first = SERVICE_BACKOFF_FIRST.as_secs_f64() * 1e3;
    for (n, gap) in gaps.iter().enumerate() {
        let delay = first * f64::from(1u32 << n);
        assert!(
            gap + UPTIME_RESOLUTION_MS >= delay,
            "restart {} came {gap:.0} ms after the start before it, under its {delay:.0} ms backoff; gaps {gaps:?}",
            n + 1
        );
    }
    for (n, pair) in gaps.windows(2).enumerate() {
        // The delay grew by `first << n`; jitter in the time a start takes
        // may eat some of that, not three quarters of it.
        let margin = first * f64::from(1u32 << n) / 4.0;
        assert!(
            pair[1] > pair[0] + margin,
            "the gap before restart {} ({:.0} ms) is not {margin:.0} ms longer than the one before ({:.0} ms); gaps {gaps:?}",
            n + 2,
            pair[1],
            pair[0]
        );
    }
    let shown = block_on(async {
        hull.client()
            .await
            .services(ServiceRequest::Show("crasher".into()))
            .await
            .unwrap()
    });
    let s = &shown[0];
    assert_eq!(s.restarts as usize, SERVICE_CRASH_LOOP_EXITS - 1);
    assert!(
        s.reason.as_deref().unwrap_or("").contains("crash loop"),
        "{:?}",
        s.reason
    );
    assert!(
        s.last_lines.iter().any(|l| l.starts_with("boom at")),
        "{:?}",
        s.last_lines
    );
    assert_eq!(s.last_exit, Some(hull_proto::ExitStatus::Code(1)));
    // The CLI shows them too.
    let out = hull.hull(&["services", "show", "crasher"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("failed") && text.contains("boom at"),
        "{text}"
    );
    // Failed is final: no start comes after it, not even after twice the
    // delay a next restart would have had.
    std::thread::sleep(SERVICE_BACKOFF_FIRST * (1 << SERVICE_CRASH_LOOP_EXITS));
    assert_eq!(lines_in(&hull, "/root/starts"), SERVICE_CRASH_LOOP_EXITS);
}

/// Catches a stop that does not stick: one the manager takes for a crash
/// and restarts after the first backoff, and one a bounce forgets (the
/// service replayed on the new inner). Each start of `pair` is counted in
/// the inner, so a restart that came and went still shows; `witness`
/// proves the new inner's services were replayed before `pair` is checked.
#[test]
fn stop_reaches_the_whole_process_group_and_start_brings_it_back() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    hull.add_service(
        "pair",
        "echo >> /root/pair-starts; sleep 1001 & sleep 1002",
        &[],
        None,
        RestartPolicy::Always,
    );
    hull.add_service(
        "witness",
        "echo >> /root/witness-starts; exec sleep 2000",
        &[],
        None,
        RestartPolicy::Always,
    );
    wait_states(&hull, "both running", all_running(&["pair", "witness"]));
    wait_until(Duration::from_secs(5), "both sleeps", || {
        block_on(hull.sh("ps -o args")).contains("sleep 1001")
    });
    let stopped = block_on(async {
        hull.client()
            .await
            .services(ServiceRequest::Stop("pair".into()))
            .await
            .unwrap()
    });
    assert_eq!(stopped[0].state, "stopped");
    let ps = block_on(hull.sh("ps -o args"));
    assert!(!ps.contains("sleep 100"), "the group survived stop: {ps}");
    // The reply came after the exit was handled, so a restart, if the exit
    // were taken for a crash, is due one backoff later; wait ten (a bound,
    // not a measurement).
    let past_a_restart = SERVICE_BACKOFF_FIRST * 10;
    std::thread::sleep(past_a_restart);
    assert_eq!(state(&hull, "pair"), "stopped", "stop did not stick");
    assert_eq!(
        lines_in(&hull, "/root/pair-starts"),
        1,
        "stop did not stick"
    );
    let ps = block_on(hull.sh("ps -o args"));
    assert!(!ps.contains("sleep 100"), "pair came back after stop: {ps}");

    // A stopped service stays stopped across a bounce: once the witness has
    // been replayed on the new inner, pair would have been too.
    block_on(async { hull.client().await.bounce(0).await.unwrap() });
    wait_until(Duration::from_secs(15), "the witness replayed", || {
        lines_in(&hull, "/root/witness-starts") == 2
    });
    std::thread::sleep(past_a_restart);
    assert_eq!(
        state(&hull, "pair"),
        "stopped",
        "the bounce started a stopped service"
    );
    assert_eq!(
        lines_in(&hull, "/root/pair-starts"),
        1,
        "the bounce started a stopped service"
    );
    let ps = block_on(hull.sh("ps -o args"));
    assert!(
        !ps.contains("sleep 100"),
        "pair runs after the bounce: {ps}"
    );

    let out = hull.hull(&["services", "start", "pair"]);
    assert!(out.status.success());
    wait_states(
        &hull,
        "pair running again",
        all_running(&["pair", "witness"]),
    );
    assert_eq!(lines_in(&hull, "/root/pair-starts"), 2);
    let out = hull.hull(&["services", "restart", "pair"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_states(
        &hull,
        "pair running after restart",
        all_running(&["pair", "witness"]),
    );
    wait_until(Duration::from_secs(5), "pair's third start", || {
        lines_in(&hull, "/root/pair-starts") == 3
    });
    let out = hull.hull(&["services", "remove", "pair"]);
    assert!(out.status.success());
    let names: Vec<String> = list(&hull).into_iter().map(|s| s.spec.name).collect();
    assert_eq!(names, ["witness"]);
    let ps = block_on(hull.sh("ps -o args"));
    assert!(!ps.contains("sleep 100"), "remove left the processes: {ps}");
}

#[test]
fn bad_definitions_are_refused_at_add_and_nothing_is_stored() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let ok = hull.hull(&["services", "add", "db", "--cmd", "sleep 1000"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (args, needle) in [
        (
            vec!["services", "add", "db", "--cmd", "true"],
            "already registered",
        ),
        (
            vec!["services", "add", "web", "--cmd", "true", "--after", "nope"],
            "no such service",
        ),
        (
            vec!["services", "add", "me", "--cmd", "true", "--after", "me"],
            "cycle",
        ),
        (
            vec!["services", "add", "blank", "--cmd", " "],
            "command is empty",
        ),
        (
            vec![
                "services",
                "add",
                "x",
                "--cmd",
                "true",
                "--restart",
                "sometimes",
            ],
            "expected always",
        ),
        (vec!["services", "stop", "ghost"], "no service named ghost"),
    ] {
        let out = hull.hull(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let names: Vec<String> = list(&hull).into_iter().map(|s| s.spec.name).collect();
    assert_eq!(names, ["db"]);
    let json = hull.hull(&["--json", "services", "list"]);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed[0]["spec"]["name"], "db");
}

#[test]
fn a_service_registered_from_inside_the_inner_runs_and_nothing_else_is_reachable() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    // The user's shell: `hull` on PATH, the socket at its default path.
    let added = block_on(hull.sh(
        "hull services add ticker --cmd 'while true; do echo tick; sleep 1; done' --restart always",
    ));
    assert!(added.contains("ticker"), "add printed {added:?}");
    wait_states(&hull, "ticker running", all_running(&["ticker"]));
    let listed = block_on(hull.sh("hull --json services list"));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["spec"]["name"], "ticker", "{listed}");

    // Everything but the service API is refused, with a reason.
    for command in ["status", "bounce", "checkpoint list", "logs ticker", "down"] {
        let out = block_on(hull.exec(&["sh", "-c", &format!("hull {command}")]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(
            out.end,
            hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
            "hull {command} worked from inside the inner"
        );
        assert!(
            stderr.contains("not available from inside the inner"),
            "hull {command}: {stderr}"
        );
        eprintln!("hull {command} in the inner: {}", stderr.trim());
    }
    assert_eq!(
        hull.wait_running(Duration::from_secs(5)).bounces,
        0,
        "the inner bounced itself"
    );

    // hulld's control socket and state are not in the inner's view, and its
    // own mount is read-only.
    let socket = hull.socket.display().to_string();
    let out = block_on(hull.exec(&["sh", "-c", &format!("test -e {socket}")]));
    assert_ne!(
        out.end,
        hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
        "{socket} is visible in the inner"
    );
    let out = block_on(hull.exec(&["sh", "-c", "touch /run/hull/x"]));
    assert_ne!(
        out.end,
        hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
        "/run/hull is writable from the inner"
    );

    // A bounce mounts it again: the shell can still reach the service API,
    // and remove what it added.
    let bounced = hull.hull(&["bounce"]);
    assert!(
        bounced.status.success(),
        "{}",
        String::from_utf8_lossy(&bounced.stderr)
    );
    assert_eq!(hull.wait_running(Duration::from_secs(5)).bounces, 1);
    wait_states(
        &hull,
        "ticker back after the bounce",
        all_running(&["ticker"]),
    );
    block_on(hull.sh("hull services remove ticker"));
    wait_states(&hull, "ticker removed", |l| l.is_empty());
}

/// A raw GET through HTTP ingress: the status and the body.
fn ingress_get(hull: &TestHull, host: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from((hull.outer, hull.http_port));
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// What a user sees of a failed service: what waits on it says so, HTTP
/// ingress answers 503 at once naming it, a bounce is no restart, and
/// `--restart never` is documented as it behaves.
#[test]
fn a_failed_service_is_named_by_what_waits_for_it_and_by_ingress() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    hull.add_service("web", "exit 3", &[], Some(8050), RestartPolicy::Never);
    hull.add_service(
        "worker",
        "exec sleep 1000",
        &["web"],
        None,
        RestartPolicy::Always,
    );
    hull.add_service("idle", "exec sleep 1000", &[], None, RestartPolicy::Always);
    wait_states(&hull, "web failed, idle running", |l| {
        l.iter()
            .any(|s| s.spec.name == "web" && s.state == "failed")
            && l.iter()
                .any(|s| s.spec.name == "idle" && s.state == "running")
    });
    let out = hull.hull(&["services", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("waiting for web (failed)"), "{table}");

    let begin = std::time::Instant::now();
    let (status, body) = ingress_get(&hull, "web.localhost");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("service web (port 8050) has failed"),
        "{body}"
    );
    assert!(
        begin.elapsed() < Duration::from_secs(5),
        "503 took {:?}: it waited for the port",
        begin.elapsed()
    );
    let (status, body) = ingress_get(&hull, "99999.localhost");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a port"), "{body}");

    block_on(async { hull.client().await.bounce(1).await.unwrap() });
    wait_states(&hull, "idle back after the bounce", |l| {
        l.iter()
            .any(|s| s.spec.name == "idle" && s.state == "running" && s.inner_starts == 2)
    });
    let out = hull.hull(&["--json", "services", "list"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let idle = json
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["spec"]["name"] == "idle")
        .unwrap();
    assert_eq!(idle["restarts"], 0, "a bounce counted as a restart: {idle}");
    assert_eq!(idle["inner_starts"], 2, "{idle}");

    let help = hull.hull(&["services", "add", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("every new inner") && help.contains("not restarted after it exits"),
        "{help}"
    );
}
