//! The inner's limits protect hulld: a fork bomb and a memory hog.

use std::time::Duration;

use hull_proto::{ExecEnd, ExitStatus};
use hull_tests::{block_on, require_root, spec, wait_until, Limits, TestHull};

#[test]
fn a_fork_bomb_hits_the_pids_limit_and_hulld_keeps_answering() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        memory_max: "256M",
        pids_max: 64,
        ..Limits::default()
    });
    block_on(async {
        let mut bomb = hull.client().await;
        // Every copy keeps forking forever and survives failed forks, so
        // the inner stays pinned at its limit while we watch.
        bomb.exec_start(spec(&[
            "sh",
            "-c",
            "b() { while :; do b & sleep 0.01; done; }; b",
        ]))
        .await
        .unwrap();
        let mut most = 0;
        for _ in 0..100 {
            most = most.max(hull.cgroups().inner.pids_current().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(most <= 64, "pids limit not enforced: {most} processes");
        assert!(
            most >= 48,
            "the bomb never came near the limit: {most} processes"
        );
        // hulld answers promptly while the bomb runs.
        let status = tokio::time::timeout(Duration::from_secs(5), async {
            hull.client().await.status().await.unwrap()
        })
        .await
        .expect("hulld stopped answering during a fork bomb");
        assert!(status.inner_pid.is_some());
        // A bounce clears the bomb.
        let report = tokio::time::timeout(Duration::from_secs(20), async {
            hull.client().await.bounce(0).await.unwrap()
        })
        .await
        .expect("bounce during a fork bomb");
        assert_eq!(report.bounces, 1);
        assert_eq!(hull.sh("echo calm").await, "calm\n");
    });
}

#[test]
fn a_memory_hog_is_oom_killed_inside_the_inner() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        memory_max: "96M",
        pids_max: 128,
        ..Limits::default()
    });
    block_on(async {
        let out = hull
            .exec(&["dd", "if=/dev/zero", "of=/dev/null", "bs=300M", "count=1"])
            .await;
        assert_eq!(
            out.end,
            ExecEnd::Exited(ExitStatus::Signal(libc::SIGKILL)),
            "the hog was not OOM-killed; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = hull.client().await.status().await.unwrap();
        assert_eq!(
            status.unplanned_restarts, 0,
            "the OOM took the inner's init down"
        );
        assert_eq!(hull.sh("echo still-here").await, "still-here\n");
    });
}

/// Programs in the inner read their own limit at /sys/fs/cgroup (the
/// inner's group, through its cgroup namespace), not the VM's, and cannot
/// change it.
#[test]
fn the_inner_sees_its_own_memory_limit_at_sys_fs_cgroup_and_cannot_raise_it() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        memory_max: "96M",
        ..Limits::default()
    });
    block_on(async {
        // v2: cgroup2 at /sys/fs/cgroup; v1 (a hybrid host): a directory
        // per hierarchy.
        let limit = hull
            .sh("cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
            .await;
        assert_eq!(limit.trim(), (96u64 << 20).to_string());
        let v1 = hull
            .sh("test -d /sys/fs/cgroup/memory && echo v1 || echo v2")
            .await;
        let file = if v1.trim() == "v1" {
            "/sys/fs/cgroup/memory/memory.limit_in_bytes"
        } else {
            "/sys/fs/cgroup/memory.max"
        };
        let write = hull
            .sh(&format!(
                "(echo 1G > {file}) 2>&1; echo exit=$?; cat {file}"
            ))
            .await;
        assert!(write.contains(&(96u64 << 20).to_string()), "{write}");
        assert!(!write.contains("exit=0"), "{write}");
        if v1.trim() == "v1" {
            assert!(write.contains("Read-only file system"), "{write}");
            let mkdir = hull.sh("mkdir /sys/fs/cgroup/x 2>&1; echo exit=$?").await;
            assert!(mkdir.contains("Read-only file system"), "{mkdir}");
        }
        // On v2 the group is delegated (its child groups are the inner's
        // to make): tests/vm.rs checks that in a hull VM.
        // Its cgroup namespace is rooted at its own group.
        let own = hull.sh("cat /proc/self/cgroup").await;
        assert!(
            own.lines().all(|l| l.ends_with(":/")),
            "the inner sees cgroup paths above its own group: {own}"
        );
    });
}

/// An OOM kill is not silent: the exec whose process it was says so on its
/// stderr, `hull status` counts it, and hulld's log has a line for it. A
/// process that dies of SIGKILL for another reason gets no such note.
#[test]
fn an_oom_kill_is_reported_on_stderr_in_status_and_in_hullds_log() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        memory_max: "64M",
        ..Limits::default()
    });
    block_on(async {
        let killed = hull.exec(&["sh", "-c", "kill -9 $$"]).await;
        assert_eq!(
            killed.end,
            ExecEnd::Exited(ExitStatus::Signal(libc::SIGKILL))
        );
        let stderr = String::from_utf8_lossy(&killed.stderr);
        assert!(!stderr.contains("out-of-memory"), "{stderr}");

        let out = hull
            .exec(&["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"])
            .await;
        assert_eq!(out.end, ExecEnd::Exited(ExitStatus::Signal(libc::SIGKILL)));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("hull: killed by the out-of-memory killer (memory_max 64M)"),
            "no OOM note on stderr: {stderr:?}"
        );
    });
    wait_until(
        Duration::from_secs(10),
        "status to count the OOM kill",
        || block_on(async { hull.client().await.status().await.unwrap() }).oom_kills >= 1,
    );
    let status = hull.hull(&["--json", "status"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(json["oom_kills"].as_u64() >= Some(1), "{json}");
    assert!(json["last_oom_kill_ms"].as_i64().is_some(), "{json}");
    let text = String::from_utf8_lossy(&hull.hull(&["status"]).stdout).to_string();
    assert!(text.contains("oom kills  1 (the last at "), "{text}");
    assert!(text.contains(" GMT, "), "{text}");
    // Until `hull logs --daemon` prints hulld's lines on stdout, they are on
    // stderr: either will do here.
    let daemon = hull.hull(&["logs", "--daemon"]);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&daemon.stdout),
        String::from_utf8_lossy(&daemon.stderr)
    );
    assert!(
        log.contains("the out-of-memory killer killed 1 process(es) in the inner"),
        "{log}"
    );
}
