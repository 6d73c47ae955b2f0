//! The egress firewall's parts in network namespaces the test makes (their
//! nftables and conntrack are their own): set elements over netlink with
//! their timeouts, the enforced ruleset as nft loads it, conntrack entries
//! listed and cut, and the enforcer that ties them to the policy. Needs
//! root and nft; under CI=true, their absence fails.

// Test code: a failed unwrap is the test failing.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use hull_network::nft_set::{NftSetError, SetWriter, TableFamily};

fn can_run() -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        "needs root (a network namespace)"
    } else if Command::new("nft").arg("--version").output().is_err() {
        "needs nft (apt-get install nftables)"
    } else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test {why}, and CI=true forbids skipping");
    }
    eprintln!("skipping: this test {why}");
    false
}

/// Runs `f` on a thread of its own in a new network namespace; the
/// namespace goes when the thread ends.
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn nft(args: &[&str]) -> String {
    // A child forked from this thread lives in this thread's namespace.
    let out = Command::new("nft").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// (address, timeout in ms) of every element of a set, as nft lists it.
fn elements(set: &str) -> Vec<(String, u64)> {
    let json: serde_json::Value =
        serde_json::from_str(&nft(&["-j", "list", "set", "inet", "hulltest", set])).unwrap();
    let set = json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.get("set"))
        .unwrap()
        .clone();
    let mut out: Vec<(String, u64)> = set["elem"]
        .as_array()
        .map(|a| a.to_vec())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let e = &e["elem"];
            (
                e["val"].as_str().unwrap().to_string(),
                e["timeout"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

const TABLE: &str = "table inet hulltest {
    set allowed4 { type ipv4_addr; flags timeout; }
    set allowed6 { type ipv6_addr; flags timeout; }
}";

#[test]
fn addresses_go_into_the_set_with_their_timeouts_and_a_flush_empties_it() {
    if !can_run() {
        return;
    }
    in_new_netns(|| {
        let script = std::env::temp_dir().join(format!("hull-nft-set-{}.nft", std::process::id()));
        std::fs::write(&script, TABLE).unwrap();
        nft(&["-f", script.to_str().unwrap()]);
        std::fs::remove_file(&script).unwrap();

        let mut w = SetWriter::open().unwrap();
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        w.add(
            TableFamily::Inet,
            "hulltest",
            "allowed4",
            &[
                (v4("203.0.113.5"), Duration::from_secs(300)),
                (v4("198.51.100.7"), Duration::from_secs(60)),
            ],
        )
        .unwrap();
        // nft shows timeouts in whole seconds.
        assert_eq!(
            elements("allowed4"),
            [
                ("198.51.100.7".to_string(), 60),
                ("203.0.113.5".to_string(), 300)
            ]
        );
        // Again, with another timeout: no error, and the first stays.
        w.add(
            TableFamily::Inet,
            "hulltest",
            "allowed4",
            &[(v4("203.0.113.5"), Duration::from_secs(30))],
        )
        .unwrap();
        assert_eq!(elements("allowed4").len(), 2);
        w.add(
            TableFamily::Inet,
            "hulltest",
            "allowed6",
            &[(v4("2001:db8::1"), Duration::from_secs(120))],
        )
        .unwrap();
        assert_eq!(elements("allowed6"), [("2001:db8::1".to_string(), 120)]);

        w.flush(TableFamily::Inet, "hulltest", "allowed4").unwrap();
        assert_eq!(elements("allowed4"), []);
        assert_eq!(
            elements("allowed6").len(),
            1,
            "flushing one set emptied another"
        );

        let e = w
            .add(
                TableFamily::Inet,
                "hulltest",
                "nonesuch",
                &[(v4("203.0.113.9"), Duration::from_secs(1))],
            )
            .unwrap_err();
        assert!(matches!(e, NftSetError::Refused { .. }), "{e:?}");
        assert!(e.to_string().contains("hulltest/nonesuch"), "{e}");
        // The socket still works after a refusal.
        w.add(
            TableFamily::Inet,
            "hulltest",
            "allowed4",
            &[(v4("203.0.113.9"), Duration::from_secs(10))],
        )
        .unwrap();
        assert_eq!(elements("allowed4"), [("203.0.113.9".to_string(), 10)]);
    });
}

#[test]
fn the_enforced_ruleset_loads_and_its_allowed_set_takes_elements() {
    if !can_run() {
        return;
    }
    in_new_netns(|| {
        let plan = hull_network::link::VethPlan::new("100.96.0.0/30", "hv1").unwrap();
        let policy = hull_network::EgressPolicy::parse(
            r#"{"rules":[{"include":"defaults"},{"cidr":"10.1.0.0/16","action":"allow"},{"cidr":"203.0.113.7/32","action":"deny"}]}"#,
        )
        .unwrap();
        let table = hull_network::nat::NatTable::new("hulltest");
        table.install(&plan, Some(&policy)).unwrap();
        let listed = nft(&["list", "table", "ip", "hulltest"]);
        assert!(listed.contains("vmap"), "{listed}");
        assert!(listed.contains("203.0.113.7 : jump denied"), "{listed}");
        let mut w = SetWriter::open().unwrap();
        w.add(
            TableFamily::Ip,
            "hulltest",
            hull_network::nat::ALLOWED_SET,
            &[("140.82.112.3".parse().unwrap(), Duration::from_secs(60))],
        )
        .unwrap();
        let set = nft(&[
            "list",
            "set",
            "ip",
            "hulltest",
            hull_network::nat::ALLOWED_SET,
        ]);
        assert!(set.contains("140.82.112.3"), "{set}");
        // Installing again replaces the table whole: the set starts empty.
        table.install(&plan, Some(&policy)).unwrap();
        let set = nft(&[
            "list",
            "set",
            "ip",
            "hulltest",
            hull_network::nat::ALLOWED_SET,
        ]);
        assert!(!set.contains("140.82.112.3"), "{set}");
        table.remove().unwrap();
    });
}

/// Brings up loopback in the calling thread's namespace.
fn lo_up() {
    let out = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn conntrack_lists_the_inner_s_connections_and_cuts_the_denied_ones() {
    if !can_run() {
        return;
    }
    in_new_netns(|| {
        use hull_network::conntrack::Conntrack;
        use hull_network::enforcer::CutConnections;
        lo_up();
        // A rule that looks at conntrack makes the namespace track.
        let script = std::env::temp_dir().join(format!("hull-ct-{}.nft", std::process::id()));
        std::fs::write(
            &script,
            "table ip hulltest {\n chain out {\n type filter hook output priority 0; ct state established accept\n }\n}\n",
        )
        .unwrap();
        nft(&["-f", script.to_str().unwrap()]);
        std::fs::remove_file(&script).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _server = listener.accept().unwrap();

        let mut ct = Conntrack::open().unwrap();
        let lo: std::net::Ipv4Addr = "127.0.0.1".parse().unwrap();
        let before = ct.list_from(lo).unwrap();
        assert!(!before.is_empty(), "the connection is not tracked");
        assert!(before.iter().all(|t| t.dst == lo));
        // Nothing denied: nothing cut.
        assert_eq!(ct.cut(lo, &|_| false).unwrap(), 0);
        assert_eq!(ct.list_from(lo).unwrap().len(), before.len());
        assert_eq!(ct.cut(lo, &|dst| dst == lo).unwrap(), before.len() as u64);
        assert!(
            ct.list_from(lo).unwrap().is_empty(),
            "the entries are still there"
        );
        // Deleting what is already gone is no error.
        assert_eq!(ct.cut(lo, &|dst| dst == lo).unwrap(), 0);
    });
}

/// Records what a policy change asked to cut.
struct Judged(std::sync::Arc<std::sync::Mutex<Vec<(std::net::Ipv4Addr, bool)>>>);

impl hull_network::enforcer::CutConnections for Judged {
    fn cut(
        &mut self,
        _from: std::net::Ipv4Addr,
        denied: &dyn Fn(std::net::Ipv4Addr) -> bool,
    ) -> std::io::Result<u64> {
        let mut seen = self.0.lock().unwrap();
        for a in ["140.82.112.3", "104.16.0.1", "10.1.2.3", "8.8.8.8"] {
            let a = a.parse().unwrap();
            seen.push((a, denied(a)));
        }
        Ok(0)
    }
}

#[test]
fn the_enforcer_admits_answers_and_a_policy_change_keeps_only_what_it_still_allows() {
    if !can_run() {
        return;
    }
    in_new_netns(|| {
        use hull_network::dns::{Admit, Admitted};
        use hull_network::enforcer::Enforcer;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let plan = hull_network::link::VethPlan::new("100.96.0.0/30", "hv1").unwrap();
        let parse = |t: &str| std::sync::Arc::new(hull_network::EgressPolicy::parse(t).unwrap());
        let judged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let enforcer = Enforcer::start(
            hull_network::nat::NatTable::new("hulltest"),
            plan,
            parse(r#"{"rules":[{"domain":"github.com","action":"allow"},{"domain":"npmjs.org","action":"allow"}]}"#),
            Judged(judged.clone()),
        )
        .unwrap();
        let set = || {
            nft(&[
                "list",
                "set",
                "ip",
                "hulltest",
                hull_network::nat::ALLOWED_SET,
            ])
        };
        rt.block_on(async {
            for (name, ip) in [("github.com", "140.82.112.3"), ("npmjs.org", "104.16.0.1")] {
                enforcer
                    .admit(Admitted {
                        name: name.into(),
                        addrs: vec![(ip.parse().unwrap(), Duration::from_secs(300))],
                    })
                    .await
                    .unwrap();
            }
        });
        let listed = set();
        assert!(
            listed.contains("140.82.112.3") && listed.contains("104.16.0.1"),
            "{listed}"
        );
        assert_eq!(enforcer.state().borrow().admitted, 2);

        // npm is no longer allowed; a CIDR rule allows 10.1.0.0/16.
        rt.block_on(enforcer.set_policy(parse(
            r#"{"rules":[{"domain":"github.com","action":"allow"},{"cidr":"10.1.0.0/16","action":"allow"}]}"#,
        )))
        .unwrap();
        let listed = set();
        assert!(
            listed.contains("140.82.112.3"),
            "an address still allowed was dropped: {listed}"
        );
        assert!(
            !listed.contains("104.16.0.1"),
            "a newly denied address stayed: {listed}"
        );
        assert_eq!(
            *judged.lock().unwrap(),
            [
                ("140.82.112.3".parse().unwrap(), false),
                ("104.16.0.1".parse().unwrap(), true),
                ("10.1.2.3".parse().unwrap(), false),
                ("8.8.8.8".parse().unwrap(), true),
            ]
        );
        let state = enforcer.state().borrow().clone();
        assert_eq!((state.admitted, state.policies, state.error), (1, 1, None));
        // The table follows the policy: the CIDR rule is in its map.
        // nft lists a range that is a whole network as its prefix.
        let table = nft(&["list", "table", "ip", "hulltest"]);
        assert!(table.contains("10.1.0.0/16 : accept"), "{table}");
        hull_network::nat::NatTable::new("hulltest")
            .remove()
            .unwrap();
    });
}
