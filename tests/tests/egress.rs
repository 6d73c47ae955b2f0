//! The egress policy, enforced by hulld: the inner's one name server is
//! hulld's on its gateway, which answers from an upstream this test runs
//! on a loopback address of its own, refuses what the policy denies, and
//! lets the firewall through to what it allowed; a policy set through the
//! API counts from the next lookup and connection.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use hull_tests::http::{request, sprite_name};
use hull_tests::{block_on, require_root, Limits, TestHull};

/// A name server on `addr`:53 that knows a few A records and counts the
/// queries it got, on a thread of its own.
struct Upstream {
    asked: Arc<AtomicUsize>,
}

fn upstream(addr: IpAddr, table: &[(&str, Ipv4Addr)]) -> Upstream {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(addr, 53)).unwrap();
    let table: HashMap<String, Ipv4Addr> =
        table.iter().map(|(n, ip)| (n.to_string(), *ip)).collect();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((len, from)) = socket.recv_from(&mut buf) {
            let Ok(request) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let q = request.queries[0].clone();
            let name = q.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
            let mut m = Message::response(request.metadata.id, OpCode::Query);
            m.metadata.recursion_desired = request.metadata.recursion_desired;
            m.metadata.recursion_available = true;
            m.queries.push(q.clone());
            match table.get(&name) {
                Some(ip) if q.query_type == RecordType::A => {
                    m.answers
                        .push(Record::from_rdata(q.name.clone(), 60, RData::A(A(*ip))));
                }
                Some(_) => {}
                None => m.metadata.response_code = ResponseCode::NXDomain,
            }
            let _ = socket.send_to(&m.to_vec().unwrap(), from);
        }
    });
    Upstream { asked }
}

/// `nslookup NAME` in the inner: its output and whether it succeeded.
fn lookup(hull: &TestHull, name: &str) -> (bool, String) {
    let out = block_on(hull.exec(&["nslookup", name]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.end == hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0));
    (ok, text)
}

fn set_policy(hull: &TestHull, policy: &str) {
    let addr = block_on(hull.api_addr());
    let admin = hull.api_token("admin");
    let name = sprite_name(addr, &admin);
    let r = request(
        addr,
        "POST",
        &format!("/v1/sprites/{name}/policy/network"),
        Some(&admin),
        Some(policy),
    );
    assert_eq!(r.status, 204, "{r:?}");
}

fn allowed_set(table: &str) -> String {
    let out = Command::new("nft")
        .args(["list", "set", "ip", table, "egress_allowed"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn denied_names_are_refused_and_allowed_answers_open_the_firewall() {
    if !require_root() {
        return;
    }
    // A loopback address of this test's own for its upstream.
    let pid = std::process::id();
    let [_, _, hi, lo] = pid.to_be_bytes();
    let dns = IpAddr::V4(Ipv4Addr::new(127, 77, hi, lo));
    let up = upstream(
        dns,
        &[
            ("allowed.test", Ipv4Addr::new(203, 0, 113, 5)),
            ("denied.test", Ipv4Addr::new(203, 0, 113, 6)),
        ],
    );
    let interface = format!("hve{:06x}", pid & 0xff_ffff);
    let hull = TestHull::start_with(Limits {
        network: "nat",
        network_extra: format!("dns = [\"{dns}\"]\ninterface = \"{interface}\""),
        ..Limits::default()
    });
    let table = format!("hull_{interface}");
    let resolv = block_on(hull.sh("cat /etc/resolv.conf"));
    assert!(
        resolv
            .lines()
            .filter(|l| l.starts_with("nameserver"))
            .count()
            == 1
            && !resolv.contains(&dns.to_string()),
        "the inner's one name server should be the gateway: {resolv}"
    );

    // No policy: every name resolves through hulld's name server.
    let (ok, text) = lookup(&hull, "denied.test");
    assert!(ok && text.contains("203.0.113.6"), "{text}");

    set_policy(
        &hull,
        r#"{"rules":[{"domain":"allowed.test","action":"allow"}]}"#,
    );
    let asked = up.asked.load(Ordering::SeqCst);
    let (ok, text) = lookup(&hull, "denied.test");
    assert!(
        !ok && text.contains("REFUSED"),
        "a denied name resolved: {text}"
    );
    assert_eq!(
        up.asked.load(Ordering::SeqCst),
        asked,
        "a denied name reached the upstream"
    );
    let (ok, text) = lookup(&hull, "allowed.test");
    assert!(ok && text.contains("203.0.113.5"), "{text}");
    assert!(
        allowed_set(&table).contains("203.0.113.5"),
        "{}",
        allowed_set(&table)
    );

    // A connection the policy does not allow is reset at once, not left
    // to time out: nc says so in well under its 5 s.
    let out = block_on(hull.exec(&["sh", "-c", "nc -w 5 203.0.113.6 80 </dev/null; echo rc=$?"]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("rc=1") && text.contains("refused"), "{text}");

    // The policy counts from the next lookup.
    set_policy(&hull, r#"{"rules":[{"domain":"*.test","action":"allow"}]}"#);
    let (ok, text) = lookup(&hull, "denied.test");
    assert!(ok && text.contains("203.0.113.6"), "{text}");
    let denied_before = hull
        .log()
        .matches("egress policy refused a DNS lookup")
        .count();
    assert!(
        denied_before >= 1,
        "the refusal was not logged:\n{}",
        hull.log()
    );
}

#[test]
fn the_policy_the_sdk_sets_is_enforced_alike() {
    if !require_root() {
        return;
    }
    let Some(python) = hull_tests::sdk_python() else {
        return;
    };
    let pid = std::process::id();
    // Another address than the other test's, which may run at once.
    let [_, _, hi, lo] = pid.to_be_bytes();
    let dns = IpAddr::V4(Ipv4Addr::new(127, 78, hi, lo));
    let _up = upstream(
        dns,
        &[
            ("example.com", Ipv4Addr::new(203, 0, 113, 7)),
            ("x.evil.test", Ipv4Addr::new(203, 0, 113, 8)),
            ("other.test", Ipv4Addr::new(203, 0, 113, 9)),
        ],
    );
    let hull = TestHull::start_with(Limits {
        network: "nat",
        network_extra: format!(
            "dns = [\"{dns}\"]\ninterface = \"hvf{:06x}\"",
            pid & 0xff_ffff
        ),
        ..Limits::default()
    });
    let admin = hull.api_token("admin");
    // sprites-py's update_network_policy: example.com allowed, *.evil.test
    // denied, the defaults preset included (tests/sdk/admin.py).
    hull_tests::sdk_admin(&python, &hull, &admin, &["policy"]);
    let (ok, text) = lookup(&hull, "example.com");
    assert!(ok && text.contains("203.0.113.7"), "{text}");
    for denied in ["x.evil.test", "other.test"] {
        let (ok, text) = lookup(&hull, denied);
        assert!(!ok && text.contains("REFUSED"), "{denied} resolved: {text}");
    }
}

/// Two hosts "outside", on 198.18.N.2 and .3 in a network namespace this
/// test makes, reached from the root namespace through a veth pair of its
/// own (removed when this drops), each counting the bytes it receives.
struct Outside {
    root_end: String,
    received: [Arc<AtomicUsize>; 2],
    stop: std::sync::mpsc::Sender<()>,
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_end])
            .status();
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn outside(n: u8, tag: u32) -> Outside {
    let root_end = format!("ho{tag:06x}");
    let far_end = format!("hf{tag:06x}");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
    let (moved_tx, moved_rx) = std::sync::mpsc::channel::<()>();
    let received = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let counters = received.clone();
    let far = far_end.clone();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        ready_tx.send(tid).unwrap();
        // The root namespace moves the far end here, then says so.
        moved_rx.recv().unwrap();
        run(&["ip", "link", "set", "lo", "up"]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.{n}.2/29"),
            "dev",
            &far,
        ]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.{n}.3/29"),
            "dev",
            &far,
        ]);
        run(&["ip", "link", "set", &far, "up"]);
        for (i, counter) in counters.into_iter().enumerate() {
            let listener = std::net::TcpListener::bind(format!("198.18.{n}.{}:80", i + 2)).unwrap();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { return };
                    let counter = counter.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 1024];
                        while let Ok(got) = std::io::Read::read(&mut conn, &mut buf) {
                            if got == 0 {
                                return;
                            }
                            counter.fetch_add(got, Ordering::SeqCst);
                        }
                    });
                }
            });
        }
        // The namespace lives as long as this thread.
        let _ = stop_rx.recv();
    });
    let tid = ready_rx.recv().unwrap();
    run(&[
        "ip", "link", "add", &root_end, "type", "veth", "peer", "name", &far_end,
    ]);
    let guard = Outside {
        root_end: root_end.clone(),
        received,
        stop,
    };
    run(&["ip", "link", "set", &far_end, "netns", &tid.to_string()]);
    moved_tx.send(()).unwrap();
    run(&[
        "ip",
        "addr",
        "add",
        &format!("198.18.{n}.1/29"),
        "dev",
        &root_end,
    ]);
    run(&["ip", "link", "set", &root_end, "up"]);
    guard
}

#[test]
fn a_policy_change_cuts_connections_it_newly_denies_and_keeps_the_others() {
    if !require_root() {
        return;
    }
    let pid = std::process::id();
    let [_, _, hi, lo] = pid.to_be_bytes();
    let n = lo;
    let out = outside(n, pid & 0xff_ffff);
    let dns = IpAddr::V4(Ipv4Addr::new(127, 79, hi, lo));
    let _up = upstream(
        dns,
        &[
            ("kept.test", Ipv4Addr::new(198, 18, n, 2)),
            ("cut.test", Ipv4Addr::new(198, 18, n, 3)),
        ],
    );
    let hull = TestHull::start_with(Limits {
        network: "nat",
        network_extra: format!(
            "dns = [\"{dns}\"]\ninterface = \"hvg{:06x}\"",
            pid & 0xff_ffff
        ),
        ..Limits::default()
    });
    set_policy(
        &hull,
        r#"{"rules":[{"domain":"kept.test","action":"allow"},{"domain":"cut.test","action":"allow"}]}"#,
    );
    for name in ["kept.test", "cut.test"] {
        let (ok, text) = lookup(&hull, name);
        assert!(ok, "{text}");
    }
    // Two connections that send a line every 0.2 s, each leaving a mark
    // when its nc ends.
    for (host, mark) in [(2, "kept"), (3, "cut")] {
        block_on(hull.sh(&format!(
            "setsid sh -c '(while true; do echo ping; sleep 0.2; done) | nc 198.18.{n}.{host} 80; echo ended > /tmp/{mark}' </dev/null >/dev/null 2>&1 &"
        )));
    }
    let flowing = |i: usize| {
        let before = out.received[i].load(Ordering::SeqCst);
        hull_tests::wait_until(std::time::Duration::from_secs(20), "bytes to flow", || {
            out.received[i].load(Ordering::SeqCst) > before
        });
    };
    flowing(0);
    flowing(1);

    set_policy(
        &hull,
        r#"{"rules":[{"domain":"kept.test","action":"allow"}]}"#,
    );
    hull_tests::wait_until(
        std::time::Duration::from_secs(20),
        "the denied connection to end",
        || {
            block_on(hull.exec(&["cat", "/tmp/cut"]))
                .stdout
                .starts_with(b"ended")
        },
    );
    // The one still allowed goes on, unbroken.
    flowing(0);
    let kept = block_on(hull.exec(&["cat", "/tmp/kept"]));
    assert!(kept.stdout.is_empty(), "the allowed connection ended too");
    // And a new connection to the denied host is reset at once.
    let again = block_on(hull.exec(&[
        "sh",
        "-c",
        &format!("nc -w 5 198.18.{n}.3 80 </dev/null; echo rc=$?"),
    ]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&again.stdout),
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(text.contains("refused"), "{text}");
}

#[test]
fn hull_policy_sets_and_shows_the_policy_and_refuses_a_bad_one() {
    if !require_root() {
        return;
    }
    let pid = std::process::id();
    let [_, _, hi, lo] = pid.to_be_bytes();
    let dns = IpAddr::V4(Ipv4Addr::new(127, 80, hi, lo));
    let _up = upstream(dns, &[("other.test", Ipv4Addr::new(203, 0, 113, 9))]);
    let hull = TestHull::start_with(Limits {
        network: "nat",
        network_extra: format!(
            "dns = [\"{dns}\"]\ninterface = \"hvh{:06x}\"",
            pid & 0xff_ffff
        ),
        ..Limits::default()
    });
    let shown = hull.hull(&["--json", "policy", "show"]);
    assert!(shown.status.success(), "{shown:?}");
    let json: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(json, serde_json::json!({"policy": null, "enforced": true}));

    let file = hull.dir.path().join("policy.json");
    let text = r#"{"rules":[{"domain":"allowed.test","action":"allow"}]}"#;
    std::fs::write(&file, text).unwrap();
    let set = hull.hull(&["policy", "set", file.to_str().unwrap()]);
    assert!(set.status.success(), "{set:?}");
    let (ok, out) = lookup(&hull, "other.test");
    assert!(!ok && out.contains("REFUSED"), "{out}");
    let shown = hull.hull(&["--json", "policy", "show"]);
    let json: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(
        json["policy"],
        serde_json::from_str::<serde_json::Value>(text).unwrap()
    );
    let human = hull.hull(&["policy", "show"]);
    assert_eq!(String::from_utf8_lossy(&human.stdout).trim(), text);

    // A bad policy: exit 1 as any failed command, the rule and why named,
    // nothing changed.
    std::fs::write(&file, r#"{"rules":[{"domain":"a..b","action":"allow"}]}"#).unwrap();
    let bad = hull.hull(&["policy", "set", file.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("rule 0") && stderr.contains("a..b"),
        "{stderr}"
    );
    let human = hull.hull(&["policy", "show"]);
    assert_eq!(String::from_utf8_lossy(&human.stdout).trim(), text);
    let missing = hull.hull(&["policy", "set", "/nonexistent/policy.json"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/policy.json"));
}
