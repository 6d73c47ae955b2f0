//! The boundary, tried as an attacker would from a root shell in the inner:
//! each test runs one attack from inside a real inner and asserts that it
//! fails and that hulld still answers. Network attacks stay on the test's
//! own veth and namespaces; nothing leaves the machine.

use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use hull_tests::{
    block_on, connect_nonblocking, current_upper, inner_pids_running, install_probe,
    listen_in_inner, probe, require_root, wait_until, Limits, RootKey, TestHull,
};

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

const EPERM: &str = "errno 1";

/// Calls no workload needs that reach past the inner: the keyrings (the
/// filter keeps the inner from even its own namespace's), BPF, perf,
/// io_uring, userfaultfd, kexec, file handles and the VM's vsock ports.
/// A nested user namespace is not among them while the inner has one of
/// its own: it gives nothing beyond it (tests/userns.rs).
const DENIED: [&str; 12] = [
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

/// hulld's open file descriptors, counted from outside.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The inner's service socket as the inner sees it, reached through the
/// inner's root: the same endpoint a process inside connects to.
fn inner_socket(hull: &TestHull) -> std::path::PathBuf {
    let inner_pid = inner_pid(hull);
    std::path::PathBuf::from(format!("/proc/{inner_pid}/root/run/hull/hull.sock"))
}

fn inner_pid(hull: &TestHull) -> i32 {
    hull.wait_running(Duration::from_secs(10))
        .inner_pid
        .expect("the inner's pid")
}

/// 20,000 connections to the inner's service socket took every fd hulld
/// had: each was accepted and served by a task of its own.
#[test]
fn a_connection_flood_on_the_inner_socket_leaves_hulld_its_fds() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let path = inner_socket(&hull);
    flood_and_count_fds(&hull, "connections to the inner's socket", 100, || {
        connect_nonblocking(&path)
    });
}

/// Opens up to 2,000 connections with `connect` (20 s at most), holds
/// them while hulld takes what it would, and asserts that hulld gained
/// fewer than `bound` fds and still answers.
fn flood_and_count_fds<T>(
    hull: &TestHull,
    what: &str,
    bound: usize,
    mut connect: impl FnMut() -> Option<T>,
) {
    let hulld = hull.hulld_pid();
    let before = fd_count(hulld);
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..2000 {
        if Instant::now() > deadline {
            break;
        }
        held.extend(connect());
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = fd_count(hulld);
    assert_responsive(hull);
    assert!(
        during < before + bound,
        "hulld went from {before} to {during} fds under {} {what}",
        held.len()
    );
}

/// 400 connections each holding an almost complete 4 MiB frame took hulld
/// from 167 MB to 1.67 GB: a declared length was buffered as it came.
#[test]
fn half_sent_frames_on_the_inner_socket_do_not_grow_hulld() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let path = inner_socket(&hull);
    let hulld = hull.hulld_pid();
    let rss_before = hull_tests::rss_kib(hulld) * 1024;
    let conns = hull_tests::hold_half_sent_frames(&path, 100);
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = hull_tests::rss_kib(hulld) * 1024;
    assert_responsive(&hull);
    assert!(
        rss_after < rss_before + (64 << 20),
        "hulld grew from {} MiB to {} MiB under {} half-sent frames",
        rss_before >> 20,
        rss_after >> 20,
        conns.len()
    );
}

/// 20,000 listening ports in the inner made hulld open a listener for each.
#[test]
fn a_thousand_listening_ports_leave_hulld_its_fds() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let inner_pid = inner_pid(&hull);
    let hulld = hull.hulld_pid();
    let before = fd_count(hulld);
    let listeners = listen_in_inner(inner_pid, 30000..31000);
    // Scans run every 250 ms; the forwarder follows within a second.
    let deadline = Instant::now() + Duration::from_secs(15);
    let report = loop {
        let report = block_on(async { hull.client().await.ports().await.expect("ports") });
        let settled =
            report.ports.len() >= 1000 && report.ports.iter().all(|p| p.exposure != "pending");
        if settled || Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let during = fd_count(hulld);
    assert_responsive(&hull);
    assert!(
        during < before + 300,
        "hulld went from {before} to {during} fds for {} listening ports",
        listeners.len()
    );
    let capped = report
        .ports
        .iter()
        .filter(|p| p.exposure == "not-forwarded")
        .count();
    assert!(
        capped >= 1000 - 256,
        "only {capped} of {} ports are listed as not forwarded",
        report.ports.len()
    );
    drop(listeners);
}

/// The inner registered hundreds of services a second, with no bound.
#[test]
fn services_past_the_cap_are_refused() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        pids_max: 1024,
        ..Limits::default()
    });
    block_on(async {
        let mut c = hull.client().await;
        let add = |i: usize| {
            hull_proto::ServiceRequest::Add(hull_proto::ServiceSpec {
                name: format!("s{i}"),
                cmd: "true".into(),
                env: vec![],
                cwd: None,
                user: None,
                http_port: None,
                restart: hull_proto::RestartPolicy::Never,
                after: vec![],
            })
        };
        for i in 0..256 {
            c.services(add(i))
                .await
                .unwrap_or_else(|e| panic!("service {i} of 256: {e}"));
        }
        let err = c
            .services(add(256))
            .await
            .expect_err("the 257th service was registered");
        assert!(err.to_string().contains("256"), "{err}");
    });
    assert_responsive(&hull);
}

/// A removed service's log directory stayed, so names ever used piled up.
#[test]
fn removing_a_service_removes_its_logs() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    hull.add_service(
        "talker",
        "echo hello; sleep 1000",
        &[],
        None,
        hull_proto::RestartPolicy::Never,
    );
    let dir = hull.state_dir.join("logs").join("talker");
    hull_tests::wait_until(Duration::from_secs(10), "the service's log", || {
        dir.is_dir()
    });
    block_on(async {
        hull.client()
            .await
            .services(hull_proto::ServiceRequest::Remove("talker".into()))
            .await
            .expect("remove")
    });
    hull_tests::wait_until(Duration::from_secs(5), "its log directory to go", || {
        !dir.exists()
    });
    assert_responsive(&hull);
}

/// hulld's stderr file (`hulld.log`) had no cap: an accept loop's warnings
/// filled it by the gigabyte.
#[test]
fn hulld_log_stays_under_its_cap() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        tables: "[logs]\nsegment_size = \"64K\"\nmax_per_source = \"256K\"\n".into(),
        ..Limits::default()
    });
    // Every refused request on the inner's socket is a line in hulld's log.
    let path = inner_socket(&hull);
    block_on(async {
        let mut c = hull_outer::client::Client::connect(&path)
            .await
            .expect("connect to the inner's socket");
        for _ in 0..8000 {
            let _ = c.status().await;
        }
    });
    let logs: u64 = std::fs::read_dir(hull.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("hulld.log"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let current = std::fs::metadata(hull.dir.path().join("hulld.log"))
        .unwrap()
        .len();
    assert!(
        logs <= 320 * 1024 && current <= 96 * 1024,
        "hulld.log and its rotations hold {logs} bytes (current {current}), capped at 256K"
    );
    assert_responsive(&hull);
}

/// The directory of `group` that holds `file` (v1: one per controller).
fn cgroup_file(group: &hull_cgroups::Cgroup, file: &str) -> std::path::PathBuf {
    group
        .procs_files()
        .iter()
        .filter_map(|p| p.parent())
        .map(|dir| dir.join(file))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no {file} for {}", group.display_path()))
}

fn read_number(path: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{}: {text:?}", path.display()))
}

/// CPU time the inner's processes have used, in microseconds, from their
/// /proc/PID/stat (v1 here has no cpuacct group for the inner).
fn inner_cpu_usage(hull: &TestHull) -> u64 {
    // SAFETY: sysconf reads a constant.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    let ticks: u64 = hull
        .cgroups()
        .inner
        .pids()
        .unwrap()
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // utime and stime: fields 14 and 15, 12 and 13 after the name.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks * 1_000_000 / hz
}

/// hulld's cgroup had no memory limit and no more CPU weight than the
/// inner, and the inner no CPU cap: a busy inner took every CPU.
#[test]
fn a_busy_inner_leaves_hulld_cpu_and_hulld_has_its_own_limits() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let cgroups = hull.cgroups();
    let cpus = std::thread::available_parallelism().unwrap().get();
    let (memory, weights) = match cgroups.daemon.version() {
        hull_cgroups::Version::V1 => (
            read_number(&cgroup_file(&cgroups.daemon, "memory.limit_in_bytes")),
            (
                read_number(&cgroup_file(&cgroups.daemon, "cpu.shares")),
                read_number(&cgroup_file(&cgroups.inner, "cpu.shares")),
            ),
        ),
        hull_cgroups::Version::V2 => (
            read_number(&cgroup_file(&cgroups.daemon, "memory.max")),
            (
                read_number(&cgroup_file(&cgroups.daemon, "cpu.weight")),
                read_number(&cgroup_file(&cgroups.inner, "cpu.weight")),
            ),
        ),
    };
    let exe = std::fs::metadata(hull_tests::bin_dir().join("hulld"))
        .unwrap()
        .len();
    assert!(
        memory <= (256 << 20) + exe + (1 << 20),
        "hulld's group may use {memory} bytes"
    );
    assert!(
        weights.0 >= 10 * weights.1,
        "hulld's CPU weight {} against the inner's {}",
        weights.0,
        weights.1
    );
    let cap = (cpus as f64 - 0.5).max(cpus as f64 * 0.75);
    let (quota, period) = match cgroups.inner.version() {
        hull_cgroups::Version::V1 => (
            std::fs::read_to_string(cgroup_file(&cgroups.inner, "cpu.cfs_quota_us")).unwrap(),
            read_number(&cgroup_file(&cgroups.inner, "cpu.cfs_period_us")),
        ),
        hull_cgroups::Version::V2 => {
            let max = std::fs::read_to_string(cgroup_file(&cgroups.inner, "cpu.max")).unwrap();
            let (quota, period) = max.trim().split_once(' ').unwrap();
            (quota.to_string(), period.parse().unwrap())
        }
    };
    let quota: f64 = quota.trim().parse().unwrap_or(f64::INFINITY);
    assert!(
        quota > 0.0 && quota / period as f64 <= cap + 0.01,
        "the inner's CPU cap is {quota}/{period} with {cpus} CPUs"
    );
    // More busy loops than CPUs; the inner gets at most all but half a CPU.
    let loops = (cpus + 2).to_string();
    block_on(hull.sh(&format!(
        "i=0; while [ $i -lt {loops} ]; do (while :; do :; done) & i=$((i+1)); done"
    )));
    std::thread::sleep(Duration::from_millis(500));
    let (t0, u0) = (Instant::now(), inner_cpu_usage(&hull));
    std::thread::sleep(Duration::from_secs(2));
    let (used, wall) = (inner_cpu_usage(&hull) - u0, t0.elapsed());
    assert_responsive(&hull);
    let share = used as f64 / wall.as_micros() as f64;
    assert!(
        share <= cap + 0.1,
        "the inner used {share:.2} CPUs of {cpus}; its cap is {cap}"
    );
}

/// A local user held 20,000 half-sent requests open on the HTTP ingress
/// and took every fd hulld had: status, exec and checkpoint timed out.
#[test]
fn half_sent_requests_on_the_ingress_leave_hulld_its_fds() {
    use std::io::Write;
    if !require_root() {
        return;
    }
    // Below the default (1024), so that a flood of 2,000 shows the cap.
    let hull = TestHull::start_with(Limits {
        network_extra: "max_connections_per_source = 128\n".into(),
        ..Limits::default()
    });
    flood_and_count_fds(&hull, "half-sent requests", 300, || {
        let mut s = std::net::TcpStream::connect((hull.outer, hull.http_port)).ok()?;
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: 8000.localhost\r\n");
        Some(s)
    });
}

/// The sparse volume's default size (64G) exceeded the host's free space:
/// the inner could fill the disk that hulld's own state lives on.
#[test]
fn the_volume_leaves_hulld_disk_space_of_its_own() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        volume_size: "10000G",
        ..Limits::default()
    });
    let image = std::fs::metadata(hull.state_dir.join("volume.img"))
        .expect("the volume image")
        .len();
    let stat = nix::sys::statvfs::statvfs(&hull.state_dir).unwrap();
    let free = stat.blocks_available() * stat.fragment_size();
    // The image is sparse: what it may still grow by must leave the
    // default reserve (2G) free.
    let used = std::fs::metadata(hull.state_dir.join("volume.img"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap();
    // Others share this disk: its free space moves by the minute.
    assert!(
        image - used + (2 << 30) <= free + (1 << 30),
        "a {image}-byte volume image with {free} bytes free on its disk"
    );
    assert_responsive(&hull);
}

/// The inner could fill the volume: then no checkpoint could be taken
/// (a snapshot needs metadata space) until the user deleted data. The
/// default layer quota keeps a margin of the volume out of its reach.
#[test]
fn the_inner_filling_its_layer_leaves_the_volume_room_to_checkpoint() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        volume_size: "300M",
        ..Limits::default()
    });
    block_on(async {
        let fill = hull
            .exec(&["dd", "if=/dev/zero", "of=/root/fill", "bs=1M", "count=400"])
            .await;
        let stderr = String::from_utf8_lossy(&fill.stderr);
        assert!(
            stderr.contains("Disk quota exceeded"),
            "filling the layer did not stop at its quota: {stderr}"
        );
        let mut c = hull.client().await;
        c.checkpoint_create(None)
            .await
            .expect("checkpoint the full layer");
        c.checkpoint_restore("v1")
            .await
            .expect("restore the full layer's checkpoint");
    });
    assert_responsive(&hull);
}
