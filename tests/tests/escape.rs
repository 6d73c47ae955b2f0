//! The boundary, tried as an attacker would from a root shell in the inner:
//! each test runs one attack from inside a real inner and asserts that it
//! fails and that hulld still answers. Network attacks stay on the test's
//! own veth and namespaces; nothing leaves the machine.

use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use hull_tests::{block_on, inner_pids_running, require_root, wait_until, Limits, TestHull};

/// `status` must keep answering within this while an attack runs.
const RESPONSIVE: Duration = Duration::from_secs(1);

fn nat_hull() -> TestHull {
    TestHull::start_with(Limits {
        network: "nat",
        ..Limits::default()
    })
}

fn assert_responsive(hull: &TestHull) {
    block_on(async {
        let mut c = hull.client().await;
        let asked = Instant::now();
        c.status().await.expect("status after the attack");
        assert!(
            asked.elapsed() < RESPONSIVE,
            "status took {:?} after the attack",
            asked.elapsed()
        );
    });
}

/// The host end of the test's veth: the root namespace's interface that
/// holds the first address of the subnet.
fn host_end(hull: &TestHull) -> (String, Ipv4Addr) {
    let network: Ipv4Addr = hull
        .subnet
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("subnet");
    let gateway = Ipv4Addr::from(u32::from(network) + 1);
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show", "to", &gateway.to_string()])
        .output()
        .expect("run ip");
    let text = String::from_utf8_lossy(&out.stdout);
    let name = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no interface holds {gateway}: {text}"))
        .to_string();
    (name, gateway)
}

/// IPv6 addresses of `interface` in the root namespace, from
/// /proc/net/if_inet6 (empty when the interface has IPv6 off).
fn ipv6_addresses(interface: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/net/if_inet6")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().last() == Some(interface))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Sends one router advertisement for 2001:db8:1::/64 (a documentation
/// prefix) out of the inner's eth0, from inside the inner's network
/// namespace: the packet the inner's root can send with CAP_NET_RAW.
fn send_router_advertisement(inner_pid: i32) {
    let netns = std::fs::File::open(format!("/proc/{inner_pid}/ns/net")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        // The router's source must be a link-local address that passed
        // duplicate address detection, or the receiver drops the RA.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // thread-self: /proc/net follows the main thread, still in the
            // root namespace.
            let ready = std::fs::read_to_string("/proc/thread-self/net/if_inet6")
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    // fields: address, ifindex, prefix len, scope, flags, name;
                    // scope 20 = link, flag 0x40 = tentative.
                    f.len() == 6
                        && f[5] == "eth0"
                        && f[3] == "20"
                        && u8::from_str_radix(f[4], 16).is_ok_and(|fl| fl & 0x40 == 0)
                });
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "eth0 got no link-local address");
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: a NUL-terminated name that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        assert_ne!(ifindex, 0, "no eth0 in the inner");
        // SAFETY: plain socket(2); the fd is owned and closed below.
        let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6) };
        assert!(
            fd >= 0,
            "raw ICMPv6 socket: {}",
            std::io::Error::last_os_error()
        );
        let hops: libc::c_int = 255;
        for (opt, val) in [
            (libc::IPV6_MULTICAST_HOPS, hops),
            (libc::IPV6_MULTICAST_IF, ifindex as libc::c_int),
        ] {
            // SAFETY: the option value is a c_int that lives across the call.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_IPV6,
                    opt,
                    (&val as *const libc::c_int).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap(),
                )
            };
            assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
        }
        let mut ra = vec![
            134, 0, 0, 0, // type RA, code, checksum (the kernel fills it)
            64, 0, 0x07, 0x08, // hop limit, flags, router lifetime 1800 s
            0, 0, 0, 0, 0, 0, 0, 0, // reachable, retrans timers
            3, 4, 64, 0xc0, // prefix information: len 64, on-link + autonomous
            0, 0, 0x0e, 0x10, 0, 0, 0x0e, 0x10, // valid, preferred lifetimes
            0, 0, 0, 0, // reserved
        ];
        ra.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut dest: libc::sockaddr_in6 =
            // SAFETY: sockaddr_in6 is plain data; all zeros is valid.
            unsafe { std::mem::zeroed() };
        dest.sin6_family = libc::sa_family_t::try_from(libc::AF_INET6).unwrap();
        dest.sin6_addr.s6_addr = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        dest.sin6_scope_id = ifindex;
        // SAFETY: buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                fd,
                ra.as_ptr().cast(),
                ra.len(),
                0,
                (&dest as *const libc::sockaddr_in6).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in6>()).unwrap(),
            )
        };
        assert_eq!(
            sent,
            ra.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is ours and used no more.
        unsafe { libc::close(fd) };
    })
    .join()
    .unwrap();
}

/// One RA from the inner made the root namespace autoconfigure an address
/// (and a route) on hull's veth, whose host end accepted RAs.
#[test]
fn a_router_advertisement_from_the_inner_configures_nothing_in_the_vm() {
    if !require_root() {
        return;
    }
    let hull = nat_hull();
    let (host_if, _) = host_end(&hull);
    let before = ipv6_addresses(&host_if);
    let inner_pid = hull
        .wait_running(Duration::from_secs(10))
        .inner_pid
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..3 {
        send_router_advertisement(inner_pid);
        std::thread::sleep(Duration::from_secs(1));
    }
    let after = ipv6_addresses(&host_if);
    let global: Vec<&String> = after.iter().filter(|a| a.starts_with("20010db8")).collect();
    assert!(
        global.is_empty(),
        "the host end {host_if} took an address from the inner's RA: {after:?} (before: {before:?})"
    );
    // This kernel counted the RAs received and did not act on them here,
    // where it did on other VMs: the host end must refuse them by its
    // settings, not by luck. IPv6 off on it also means no link-local
    // address through which the inner reaches root-namespace services.
    let conf = |family: &str, key: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/{family}/conf/{host_if}/{key}"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|e| format!("unreadable: {e}"))
    };
    assert_eq!(
        conf("ipv6", "disable_ipv6"),
        "1",
        "IPv6 on the host end {host_if}"
    );
    assert_eq!(conf("ipv6", "accept_ra"), "0", "RAs accepted on {host_if}");
    assert_eq!(
        conf("ipv6", "accept_redirects"),
        "0",
        "IPv6 redirects accepted on {host_if}"
    );
    assert_eq!(
        conf("ipv4", "accept_redirects"),
        "0",
        "IPv4 redirects accepted on {host_if}"
    );
    assert_responsive(&hull);
}

/// Services of the root namespace on 0.0.0.0 answered the inner through the
/// gateway address and the VM's own addresses: the table filtered forwarded
/// traffic only.
#[test]
fn root_namespace_services_are_out_of_the_inner_reach() {
    if !require_root() {
        return;
    }
    let hull = nat_hull();
    let (host_if, gateway) = host_end(&hull);
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    // Every IPv4 address of the root namespace but loopback: the gateway
    // and whatever the VM's own interfaces hold.
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    let mut targets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .split('/')
                .next()
                .map(str::to_string)
        })
        .filter(|a| a.parse::<Ipv4Addr>().is_ok_and(|ip| !ip.is_loopback()))
        .collect();
    assert!(targets.contains(&gateway.to_string()), "{targets:?}");
    targets.dedup();
    block_on(async {
        for target in &targets {
            // The listener is the judge: a SYN that got through completes
            // the handshake in the kernel, whatever nc prints.
            hull.exec(&[
                "sh",
                "-c",
                &format!("timeout 3 nc {target} {port} </dev/null; true"),
            ])
            .await;
            if let Ok((_, peer)) = listener.accept() {
                panic!("the inner reached a root-namespace service at {target}:{port} (from {peer}, through {host_if})");
            }
        }
    });
    // The way out still works for what the inner starts: replies come back.
    assert_responsive(&hull);
}

/// Runs `script` in the inner and asserts that it fails.
fn assert_fails(hull: &TestHull, script: &str) {
    let out = block_on(hull.exec(&["sh", "-c", script]));
    assert_ne!(
        out.end,
        hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
        "`{script}` succeeded in the inner"
    );
}

/// The options of the mount on `path` in the inner's mountinfo `mounts`.
fn mount_options(mounts: &str, path: &str) -> Vec<String> {
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(path))
        .unwrap_or_else(|| panic!("no mount on {path}:\n{mounts}"));
    line.split(' ')
        .nth(5)
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect()
}

/// Every path under `dir`, with `d`/`f`/`l` for its type, sorted: what a
/// host directory holds, to compare before and after an attack.
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let kind = entry.file_type().unwrap();
            let rel = entry
                .path()
                .strip_prefix(dir)
                .unwrap()
                .display()
                .to_string();
            if kind.is_dir() {
                todo.push(entry.path());
                out.push(format!("d {rel}"));
            } else if kind.is_symlink() {
                out.push(format!("l {rel}"));
            } else {
                out.push(format!("f {rel}"));
            }
        }
    }
    out.sort();
    out
}

/// The upper directory of the layer the inner runs on: the one that holds
/// a file the inner just made at its root.
fn current_upper(hull: &TestHull) -> std::path::PathBuf {
    let marker = format!(".escape-marker-{}", std::process::id());
    block_on(hull.sh(&format!("touch /{marker}")));
    let mut todo = vec![(hull.state_dir.clone(), 0)];
    while let Some((dir, depth)) = todo.pop() {
        if dir.file_name().is_some_and(|n| n == "upper") && dir.join(&marker).exists() {
            return dir;
        }
        if depth < 5 {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push((entry.path(), depth + 1));
                }
            }
        }
    }
    panic!(
        "no layer upper dir under {} holds {marker}",
        hull.state_dir.display()
    );
}

/// Start-up resolved the layer's paths (usr/local/bin, etc, proc, sys,
/// dev, run) as the root namespace sees them: a symlink planted in the layer
/// made hulld create directories and root-owned files at host paths of the
/// user's choosing. A symlink in the layer now resolves inside the layer,
/// as it would after pivot_root, and the inner still starts.
#[test]
fn symlinks_in_the_layer_lead_setup_nowhere_on_the_host() {
    if !require_root() {
        return;
    }
    let hull = nat_hull();
    let bait = tempfile::Builder::new()
        .prefix("hull-escape-bait-")
        .tempdir()
        .unwrap();
    // Existing directories invite mounts and files into them.
    for name in ["usr-local-bin", "etc", "proc", "sys", "dev", "run"] {
        std::fs::create_dir(bait.path().join(name)).unwrap();
    }
    let before = tree(bait.path());
    // What the inner can plant itself, it plants through exec.
    block_on(hull.sh(&format!(
        "mkdir -p /usr/local && rm -rf /usr/local/bin && ln -s {}/usr-local-bin /usr/local/bin",
        bait.path().display()
    )));
    // Mount points and the directory of a bind cannot be replaced from
    // inside while the inner runs, but the layer is the user's: an image
    // or a restored checkpoint carries whatever it holds.
    let upper = current_upper(&hull);
    for name in ["etc", "proc", "sys", "dev", "run"] {
        let at = upper.join(name);
        if at.is_dir() && !at.is_symlink() {
            std::fs::remove_dir_all(&at).unwrap();
        } else {
            let _ = std::fs::remove_file(&at);
        }
        std::os::unix::fs::symlink(bait.path().join(name), &at).unwrap();
    }
    let bounced = block_on(async { hull.client().await.bounce(0).await });
    assert_eq!(
        tree(bait.path()),
        before,
        "the inner's start-up changed {} on the host (bounce: {bounced:?})",
        bait.path().display()
    );
    bounced.expect("bounce with symlinks in the layer");
    hull.wait_running(Duration::from_secs(10));
    // The inner sees its own mounts through its own symlinks.
    let out = block_on(hull.sh(
        "test -e /proc/self/status && test -c /dev/null && test -d /sys/fs && grep -q 'Written by hulld' /etc/resolv.conf && test -d /run/hull && echo ok",
    ));
    assert_eq!(out.trim(), "ok");
    assert_responsive(&hull);
}

/// The inner's /etc/resolv.conf was a writable bind of hulld's file: the
/// inner appended to it and made it setuid.
#[test]
fn resolv_conf_cannot_be_changed_from_the_inner() {
    if !require_root() {
        return;
    }
    let hull = nat_hull();
    let host_file = hull.state_dir.join("resolv.conf");
    let meta = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.mode(), m.uid(), m.gid(), std::fs::read(p).unwrap())
    };
    let before = meta(&host_file);
    for attack in [
        "echo nameserver 6.6.6.6 >> /etc/resolv.conf",
        "chmod u+s /etc/resolv.conf",
        "chown 1:1 /etc/resolv.conf",
        "touch -d 2001-01-01 /etc/resolv.conf",
        "echo x > /etc/resolv.conf",
    ] {
        assert_fails(&hull, attack);
    }
    assert_eq!(meta(&host_file), before, "{} changed", host_file.display());
    let mounts = block_on(hull.sh("cat /proc/self/mountinfo"));
    let options = mount_options(&mounts, "/etc/resolv.conf");
    for want in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(
            options.iter().any(|o| o == want),
            "{want} missing: {options:?}"
        );
    }
    assert!(
        String::from_utf8_lossy(&before.3).contains("Written by hulld"),
        "{:?}",
        before.3
    );
    assert_responsive(&hull);
}

/// runc's masks: kernel files that read kernel memory, configuration or
/// hardware state read empty, and the files that reconfigure the whole VM
/// are read-only. /sys/firmware and /proc/config.gz were readable.
#[test]
fn kernel_interfaces_are_masked_or_read_only() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let masked = [
        "/proc/acpi",
        "/proc/asound",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/scsi",
        "/proc/config.gz",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
    ];
    let mut checked = 0;
    for path in masked {
        let Ok(host) = std::fs::metadata(path) else {
            continue;
        };
        checked += 1;
        let script = if host.is_dir() {
            format!("ls -A {path}")
        } else {
            format!("cat {path} | wc -c")
        };
        let out = block_on(hull.sh(&script));
        let empty = if host.is_dir() { "" } else { "0" };
        assert_eq!(out.trim(), empty, "{path} is not masked in the inner");
    }
    assert!(checked >= 3, "too few of {masked:?} exist here to test");
    let mounts = block_on(hull.sh("cat /proc/self/mountinfo"));
    for path in [
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ] {
        if std::fs::metadata(path).is_err() {
            continue;
        }
        let options = mount_options(&mounts, path);
        assert!(
            options.iter().any(|o| o == "ro"),
            "{path} is writable: {options:?}"
        );
    }
    // A write that the read-only mount refuses (core_pattern runs a
    // program in the root namespace).
    assert_fails(&hull, "echo x > /proc/sys/kernel/core_pattern");
    assert_responsive(&hull);
}

/// The overlay's options named the image, the layer and the work directory
/// by their host paths in the inner's /proc/self/mountinfo.
#[test]
fn mountinfo_in_the_inner_names_no_host_path_of_the_layers() {
    if !require_root() {
        return;
    }
    let hull = nat_hull();
    let mounts = block_on(hull.sh("cat /proc/self/mountinfo"));
    let images = hull_tests::image_dir();
    let upper = current_upper(&hull);
    for host in [
        images.display().to_string(),
        upper.display().to_string(),
        hull.state_dir.join("resolv.conf").display().to_string(),
    ] {
        assert!(
            !mounts.contains(&host),
            "the inner's mountinfo names {host}:\n{mounts}"
        );
    }
    assert_responsive(&hull);
}

/// A `Logs` request took its source as a path under the log store: `..`
/// and `/` in it reached (and made segment files in) any directory.
#[test]
fn a_logs_request_for_a_path_outside_the_store_is_refused() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let bait = hull.dir.path().join("bait");
    std::fs::create_dir(&bait).unwrap();
    let absolute = bait.display().to_string();
    let inner_api = hull.state_dir.join("inner-api");
    let inner_api_before = tree(&inner_api);
    for source in [
        "../../bait",
        "../inner-api",
        absolute.as_str(),
        "a/b",
        "..",
        ".",
        "",
        "web\0",
    ] {
        let reply = block_on(async {
            hull.client()
                .await
                .request(hull_proto::ClientMsg::Logs {
                    source: source.to_string(),
                    follow: false,
                    tail: None,
                    stream: None,
                    since_ms: None,
                    exec_id: None,
                })
                .await
        });
        match reply {
            Err(hull_outer::client::ClientError::Daemon(report)) => {
                assert_eq!(
                    report.kind,
                    hull_proto::ErrorKind::BadRequest,
                    "{source:?}: {report:?}"
                );
                assert!(
                    report.message.contains("not a log source name"),
                    "{source:?}: {}",
                    report.message
                );
            }
            other => panic!("a Logs request for {source:?} was answered {other:?}"),
        }
    }
    assert_eq!(
        tree(&bait),
        Vec::<String>::new(),
        "files made in {}",
        bait.display()
    );
    assert_eq!(
        tree(&inner_api),
        inner_api_before,
        "files made in {}",
        inner_api.display()
    );
    assert_responsive(&hull);
}

/// A symlink in the layer that would put one of the inner's mount points
/// into another mount (/proc/sys ...) or on the root itself is refused with
/// an error naming the path; once it is gone the inner starts again.
#[test]
fn a_mount_point_leading_into_proc_or_to_the_root_is_refused_by_name() {
    if !require_root() {
        return;
    }
    let hull = nat_hull();
    let upper = current_upper(&hull);
    for (name, target, message) in [
        ("etc", "/proc/sys/kernel", "out of the layer"),
        ("run", "/", "to the root itself"),
    ] {
        let at = upper.join(name);
        let _ = std::fs::remove_dir_all(&at);
        std::os::unix::fs::symlink(target, &at).unwrap();
        let bounced = block_on(async { hull.client().await.bounce(0).await });
        let err = bounced.expect_err("the inner started with a mount point out of its layer");
        let text = err.to_string();
        assert!(
            text.contains(&format!("/{name}")) && text.contains(message),
            "{name} -> {target}: {text}"
        );
        assert_responsive(&hull);
        std::fs::remove_file(&at).unwrap();
        std::fs::create_dir(&at).unwrap();
        block_on(async { hull.client().await.bounce(0).await }).expect("bounce without the link");
    }
    hull.wait_running(Duration::from_secs(10));
    assert_responsive(&hull);
}

/// Where the test's own probe (`hull-probe`) goes in the inner's layer.
const PROBE: &str = "/tmp/hull-probe";

/// Copies `hull-probe` into the inner. It runs through the ELF interpreter
/// and C library hulld mounts at /run/hull for its own client, so it runs
/// on the busybox image, which has neither.
fn install_probe(hull: &TestHull) {
    let probe = std::fs::read(hull_tests::bin_dir().join("hull-probe"))
        .expect("hull-probe next to hulld: cargo build --workspace --bins");
    block_on(async {
        let out = hull
            .exec_with_stdin(
                &["sh", "-c", &format!("cat > {PROBE} && chmod 755 {PROBE}")],
                &probe,
            )
            .await;
        assert_eq!(
            out.end,
            hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
            "copy the probe: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Runs the probe in the inner on `calls`; the answer for each, `ok` or
/// `errno N`, by call.
fn probe(hull: &TestHull, calls: &[&str]) -> std::collections::HashMap<String, String> {
    let script = format!(
        "for l in /run/hull/lib/ld-*; do exec \"$l\" --library-path /run/hull/lib {PROBE} \"$@\"; done"
    );
    let mut argv = vec!["sh", "-c", &script, "probe"];
    argv.extend_from_slice(calls);
    let out = block_on(hull.exec(&argv));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let answers: std::collections::HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        answers.len(),
        calls.len(),
        "the probe answered {text:?} for {calls:?}; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answers
}

/// A key root added to its user keyring in the root namespace, invalidated
/// when the test ends, however it ends.
struct RootKey(i64);

impl RootKey {
    fn add() -> RootKey {
        let description = format!("hull-test-{}", std::process::id());
        let description = std::ffi::CString::new(description).unwrap();
        let payload = b"root's secret";
        // SAFETY: add_key reads the two strings and the payload, all alive
        // for the call.
        let id = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                c"user".as_ptr(),
                description.as_ptr(),
                payload.as_ptr(),
                payload.len(),
                libc::KEY_SPEC_USER_KEYRING,
            )
        };
        assert!(id > 0, "add_key: {}", std::io::Error::last_os_error());
        let key = RootKey(id);
        // Readable and writable by uid 0 without possessing it, as a key
        // that root's processes share; any of them, the inner's included
        // until now, could read and update it.
        const POS_ALL: u32 = 0x3f00_0000;
        const USR_VIEW_READ_WRITE: u32 = 0x0007_0000;
        // SAFETY: KEYCTL_SETPERM takes the key's id and a mask.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_SETPERM,
                id,
                POS_ALL | USR_VIEW_READ_WRITE,
            )
        };
        assert_eq!(rc, 0, "keyctl setperm: {}", std::io::Error::last_os_error());
        key
    }

    fn payload(&self) -> Vec<u8> {
        let mut buf = [0u8; 64];
        // SAFETY: KEYCTL_READ writes at most buf.len() bytes into buf.
        let n = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_READ,
                self.0,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        assert!(n >= 0, "keyctl read: {}", std::io::Error::last_os_error());
        buf[..usize::try_from(n).unwrap().min(buf.len())].to_vec()
    }
}

impl Drop for RootKey {
    fn drop(&mut self) {
        // SAFETY: KEYCTL_INVALIDATE takes the key's id and nothing else.
        unsafe { libc::syscall(libc::SYS_keyctl, libc::KEYCTL_INVALIDATE, self.0) };
    }
}

const EPERM: &str = "errno 1";

/// Calls no workload needs that reach past the inner: the keyrings (not
/// namespaced), BPF, perf, io_uring, userfaultfd, kexec, file handles, the
/// VM's vsock ports and a user namespace with every capability in it.
const DENIED: [&str; 13] = [
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "userfaultfd",
    "kexec_load",
    "kexec_file_load",
    "open_by_handle_at",
    "vsock",
    "unshare-user",
];

/// The inner's root read and overwrote a key root added to its user
/// keyring in the root namespace; nor did anything stop the rest of
/// DENIED. Each must now fail with EPERM (never a kill), while threads
/// (glibc's clone3, answered ENOSYS so it falls back to clone) and the
/// ordinary tools still work.
#[test]
fn the_inner_cannot_reach_root_keys_or_kernel_calls_past_its_boundary() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let key = RootKey::add();
    install_probe(&hull);
    let read = format!("keyctl-read:{}", key.0);
    let update = format!("keyctl-update:{}", key.0);
    let mut calls: Vec<&str> = DENIED.to_vec();
    calls.extend([read.as_str(), update.as_str(), "thread", "mseal"]);
    let answers = probe(&hull, &calls);
    let wrong: Vec<String> = calls
        .iter()
        .filter(|c| !["thread", "mseal"].contains(c))
        .filter(|c| answers[**c] != EPERM)
        .map(|c| format!("{c}: {}", answers[*c]))
        .collect();
    assert!(wrong.is_empty(), "not refused with EPERM: {wrong:?}");
    assert_eq!(answers["thread"], "ok", "threads must still start");
    // A call newer than the list: ENOSYS, as on an older kernel, so
    // programs fall back.
    assert_eq!(answers["mseal"], "errno 38", "a call newer than the list");
    assert_eq!(
        key.payload(),
        b"root's secret",
        "the inner changed root's key"
    );
    // The ordinary tools run as before.
    let out = block_on(hull.sh(
        "ls / >/dev/null && dd if=/dev/zero of=/tmp/z bs=4k count=16 2>/dev/null && \
         (nc -l -p 7000 >/tmp/got &) && \
         for i in 1 2 3 4 5 6 7 8 9 10; do echo hi | nc 127.0.0.1 7000 && break; sleep 0.2; done; \
         for i in 1 2 3 4 5 6 7 8 9 10; do [ -s /tmp/got ] && break; sleep 0.2; done; \
         cat /tmp/got; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status",
    ));
    assert!(out.starts_with("hi\n"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    // Loaded without no_new_privs: setuid programs (su, sudo) and file
    // capabilities (ping) still raise privileges as the image expects.
    assert!(out.contains("NoNewPrivs:\t0"), "{out}");
    assert_responsive(&hull);
}

/// The seccomp mode of every process in the inner's cgroup, init included,
/// from the root namespace.
fn seccomp_modes(hull: &TestHull) -> Vec<(i32, String)> {
    hull.cgroups()
        .inner
        .pids()
        .unwrap()
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))?
                .trim()
                .to_string();
            Some((pid, mode))
        })
        .collect()
}

fn assert_all_filtered(hull: &TestHull, when: &str) {
    let modes = seccomp_modes(hull);
    assert!(
        modes.len() >= 2,
        "{when}: the init and the service at least: {modes:?}"
    );
    assert!(
        modes.iter().all(|(_, mode)| mode == "2"),
        "{when}: processes outside the filter (pid, mode): {modes:?}"
    );
}

/// The filter is the init's, so it holds for services, execs and consoles
/// alike, on every inner: after a bounce and a restore too.
#[test]
fn every_process_of_every_inner_runs_under_the_filter() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    hull.add_service(
        "sleeper",
        "sleep 1000",
        &[],
        None,
        hull_proto::RestartPolicy::Always,
    );
    let has_sleeper = |hull: &TestHull| !inner_pids_running(hull, &["sleep", "1000"]).is_empty();
    wait_until(Duration::from_secs(10), "the service runs", || {
        has_sleeper(&hull)
    });
    assert_all_filtered(&hull, "first start");
    let out = hull.hull(&["checkpoint", "create"]);
    assert!(out.status.success(), "{out:?}");
    let out = hull.hull(&["bounce"]);
    assert!(out.status.success(), "{out:?}");
    hull.wait_running(Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "the service runs again", || {
        has_sleeper(&hull)
    });
    assert_all_filtered(&hull, "after a bounce");
    let out = hull.hull(&["checkpoint", "restore", "v1"]);
    assert!(out.status.success(), "{out:?}");
    hull.wait_running(Duration::from_secs(10));
    wait_until(
        Duration::from_secs(10),
        "the service runs after the restore",
        || has_sleeper(&hull),
    );
    assert_all_filtered(&hull, "after a restore");
    let exec = block_on(hull.sh("grep Seccomp: /proc/self/status"));
    assert_eq!(exec.trim(), "Seccomp:\t2");
}

fn hull_with_inner_table(table: &str) -> TestHull {
    TestHull::start_with(Limits {
        tables: format!("[inner]\n{table}\n"),
        ..Limits::default()
    })
}

/// `[inner] io_uring = true` lets io_uring through, and
/// `nested_user_namespaces = true` a user namespace (rootless containers
/// in the inner); the rest stays refused.
#[test]
fn the_inner_table_opens_io_uring_and_nested_user_namespaces() {
    if !require_root() {
        return;
    }
    let hull = hull_with_inner_table("io_uring = true\nnested_user_namespaces = true");
    install_probe(&hull);
    let answers = probe(
        &hull,
        &["io_uring_setup", "unshare-user", "thread", "bpf", "add_key"],
    );
    // A null params pointer: the kernel's own EFAULT, past the filter.
    assert_eq!(answers["io_uring_setup"], "errno 14", "{answers:?}");
    assert_eq!(answers["unshare-user"], "ok", "{answers:?}");
    assert_eq!(answers["thread"], "ok", "{answers:?}");
    assert_eq!(answers["bpf"], EPERM, "{answers:?}");
    assert_eq!(answers["add_key"], EPERM, "{answers:?}");
    // root of a user namespace of its own, as a rootless container is.
    let exec = block_on(hull.sh("unshare -r id -u 2>&1 || true"));
    assert_eq!(exec.trim(), "0", "unshare -r");
    // ... and mounts in a mount namespace of its own, as a container does.
    let exec = block_on(
        hull.sh("unshare -rm sh -c 'mount -t tmpfs none /tmp && echo mounted' 2>&1 || true"),
    );
    assert_eq!(exec.trim(), "mounted", "a mount in a nested namespace");
    let exec =
        block_on(hull.sh("unshare -ru sh -c 'hostname nested && hostname' 2>&1 || true; hostname"));
    assert_eq!(
        exec, "nested\nhull-test\n",
        "a hostname in a nested namespace"
    );
}

/// `[inner] seccomp = false` turns the filter off.
#[test]
fn seccomp_can_be_turned_off() {
    if !require_root() {
        return;
    }
    let hull = hull_with_inner_table("seccomp = false");
    let exec = block_on(hull.sh("grep Seccomp: /proc/self/status"));
    assert_eq!(exec.trim(), "Seccomp:\t0");
    install_probe(&hull);
    let answers = probe(&hull, &["unshare-user", "add_key"]);
    assert_eq!(answers["unshare-user"], "ok", "{answers:?}");
    assert_eq!(answers["add_key"], "ok", "{answers:?}");
}
