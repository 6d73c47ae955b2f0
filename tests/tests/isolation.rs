//! What the inner sees, and what of hulld it must not see or reach.

use hull_tests::{bin_dir, block_on, require_root, TestHull};

#[test]
fn the_inner_has_its_own_pid_1_hostname_and_mounts() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        // The shell is a child of the inner's init: pid 2 or a little more.
        let shell_pid: i32 = hull.sh("echo $$").await.trim().parse().unwrap();
        assert!((2..10).contains(&shell_pid), "shell pid {shell_pid}");
        assert_eq!(hull.sh("hostname").await, "hull-test\n");
        let comm = hull.sh("cat /proc/1/comm").await;
        assert_eq!(comm, "hull-init\n", "pid 1 is {comm:?}");
        // Only the inner's own processes are visible: init, sh, ps.
        let pids: Vec<i32> = hull
            .sh("ls /proc | grep -E '^[0-9]+$'")
            .await
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert!(pids.contains(&1));
        assert!(
            !pids.contains(&(hull.hulld_pid())) || hull.hulld_pid() < 5,
            "pids {pids:?}"
        );
        assert!(pids.len() < 6, "the inner sees foreign processes: {pids:?}");
        let mounts = hull.sh("cat /proc/mounts").await;
        let first = mounts.lines().next().unwrap();
        assert!(first.starts_with("overlay / overlay"), "{first}");
        assert!(mounts.contains("proc /proc proc"), "{mounts}");
        assert!(mounts.contains("devpts /dev/pts devpts"), "{mounts}");
        assert!(
            mounts.lines().any(|l| l.starts_with("sysfs /sys sysfs ro")),
            "{mounts}"
        );
        for dev in [
            "null", "zero", "full", "random", "urandom", "tty", "ptmx", "shm", "pts",
        ] {
            hull.sh(&format!("test -e /dev/{dev}")).await;
        }
        assert_eq!(hull.sh("head -c 5 /dev/zero | wc -c").await.trim(), "5");
        let lo = hull
            .sh("cat /sys/class/net/lo/operstate; ls /sys/class/net")
            .await;
        assert!(lo.lines().any(|l| l == "lo"), "{lo}");
        assert!(
            !lo.contains("eth") && !lo.contains("ens"),
            "host interfaces visible: {lo}"
        );
    });
}

#[test]
fn hulld_socket_state_and_binary_are_out_of_reach() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let hulld = bin_dir().join("hulld");
        for path in [&hull.socket, &hull.state_dir, &hulld, &hull.config] {
            let out = hull.exec(&["test", "-e", path.to_str().unwrap()]).await;
            assert_eq!(
                out.end,
                hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(1)),
                "{} is visible in the inner",
                path.display()
            );
        }
        // The init runs from a sealed memfd, not hulld's binary on disk.
        let exe = hull.exec(&["readlink", "/proc/1/exe"]).await;
        let exe = String::from_utf8_lossy(&exe.stdout).to_string();
        assert!(
            !exe.contains("hulld") && !exe.contains("target"),
            "init exe: {exe}"
        );
        let write = hull.exec(&["sh", "-c", "echo x >> /proc/1/exe"]).await;
        assert_ne!(
            write.end,
            hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0))
        );
        // No fd of init's is reachable, and only stdio is open in a process.
        let fds = hull.sh("ls /proc/self/fd | wc -l").await;
        assert!(fds.trim().parse::<u32>().unwrap() <= 4, "leaked fds: {fds}");
        // The init is not dumpable: its fds (the link to hulld), memory and
        // environment are closed to the inner's root, which lacks CAP_SYS_PTRACE.
        for probe in [
            "readlink /proc/1/fd/3",
            "cat /proc/1/fd/3 </dev/null",
            "head -c 1 /proc/1/mem",
            "cat /proc/1/environ",
        ] {
            let out = hull.exec(&["sh", "-c", probe]).await;
            assert_ne!(
                out.end,
                hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
                "{probe} succeeded in the inner: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    });
}

#[test]
fn the_inner_root_cannot_reconfigure_the_vm() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        for script in [
            // core_pattern would run a program in the root namespace.
            "echo '|/bin/sh' > /proc/sys/kernel/core_pattern",
            "echo 1 > /proc/sysrq-trigger && test -s /proc/sysrq-trigger",
            "mount -t tmpfs none /mnt",
            "mknod /tmp/disk b 8 0",
            "sethostname x 2>/dev/null || hostname other",
        ] {
            let out = hull.exec(&["sh", "-c", script]).await;
            assert_ne!(
                out.end,
                hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
                "the inner could run {script:?}"
            );
        }
        assert_eq!(hull.sh("hostname").await, "hull-test\n");
        // Ordinary root work still works.
        hull.sh("chown nobody /tmp && touch /root/x && chmod 600 /root/x")
            .await;
    });
}
