//! Bounce, down, up and recovery after hulld is killed.

use std::time::Duration;

use hull_outer::client::next;
use hull_proto::{ClientMsg, DaemonMsg, ExecEnd};
use hull_tests::{
    alive, block_on, host_mounts_containing, require_root, spec, wait_until, TestHull,
};

#[test]
fn files_survive_a_bounce_and_processes_do_not() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        hull.sh("mkdir -p /root/work && echo kept > /root/work/file")
            .await;
        hull.sh("sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/sleeper")
            .await;
        let before = hull.client().await.status().await.unwrap();
        let old_init = before.inner_pid.unwrap();
        let report = hull.client().await.bounce(0).await.unwrap();
        assert_eq!(report.bounces, 1);
        assert_ne!(report.inner_pid, old_init);
        assert!(!alive(old_init), "the old inner's init survived the bounce");
        assert_eq!(hull.sh("cat /root/work/file").await, "kept\n");
        let ps = hull.sh("ps -o comm").await;
        assert!(!ps.contains("sleep"), "a process survived the bounce: {ps}");
        let status = hull.client().await.status().await.unwrap();
        assert_eq!(status.bounces, 1);
        assert_eq!(status.inner_pid, Some(report.inner_pid));
    });
}

#[test]
fn bounce_with_grace_lets_processes_exit_on_sigterm() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        // The trap runs on the SIGTERM the init forwards and leaves a mark
        // in the writable layer, which survives.
        hull.sh("(trap 'echo graceful > /root/mark; exit 0' TERM; while true; do sleep 0.05; done) >/dev/null 2>&1 &")
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        hull.client().await.bounce(3000).await.unwrap();
        assert_eq!(hull.sh("cat /root/mark").await, "graceful\n");
    });
}

#[test]
fn bounce_ends_an_attached_session_and_keeps_other_clients() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut attached = hull.client().await;
        attached.exec_start(spec(&["sleep", "100"])).await.unwrap();
        let mut bystander = hull.client().await;
        bystander.status().await.unwrap();

        hull.client().await.bounce(0).await.unwrap();

        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match next(&mut attached.reader).await.unwrap() {
                    DaemonMsg::ExecEnded(end) => return end,
                    DaemonMsg::Output { .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        })
        .await
        .expect("the attached session did not end");
        match end {
            ExecEnd::InnerStopped { reason } => assert!(reason.contains("bounced"), "{reason}"),
            other => panic!("expected InnerStopped, got {other:?}"),
        }
        // The same connections still work.
        let status = bystander.status().await.unwrap();
        assert_eq!(status.bounces, 1);
        let out = attached
            .exec_collect(spec(&["echo", "again"]), b"")
            .await
            .unwrap();
        assert_eq!(out.stdout, b"again\n");
    });
}

#[test]
fn down_leaves_nothing_behind_and_up_starts_clean() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start();
    let status = block_on(async { hull.client().await.status().await.unwrap() });
    let init = status.inner_pid.unwrap();
    let cgroups = hull.cgroups();
    assert!(cgroups.inner.exists());
    let out = hull.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!alive(init), "the inner's init outlived hull down");
    assert!(
        !cgroups.base.exists(),
        "hull's cgroup {} is left",
        cgroups.base.display_path()
    );
    assert!(!hull.socket.exists(), "the socket is left");
    assert!(host_mounts_containing(&hull.state_dir).is_empty());
    // down again: nothing to do, still success.
    assert!(hull.down().status.success());

    // `hull up` starts it again (through the CLI this time), idempotently.
    let up = hull.hull(&["up", "--json"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&up.stdout).unwrap();
    assert_eq!(report["state"], "running");
    let again = hull.hull(&["up", "--json"]);
    assert!(again.status.success());
    let report2: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        report["daemon_pid"], report2["daemon_pid"],
        "up started a second hulld"
    );
    let down = hull.hull(&["down", "--grace", "0"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let pid = i32::try_from(report["daemon_pid"].as_i64().unwrap()).unwrap();
    wait_until(Duration::from_secs(10), "hulld to exit", || !alive(pid));
}

#[test]
fn a_restarted_hulld_cleans_up_the_inner_of_a_killed_one() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start();
    let old_init = block_on(async {
        hull.sh("echo before > /root/kept; sleep 1000 >/dev/null 2>&1 &")
            .await;
        hull.client()
            .await
            .status()
            .await
            .unwrap()
            .inner_pid
            .unwrap()
    });
    hull.kill9_hulld();
    assert!(alive(old_init), "the inner should outlive a killed hulld");

    hull.spawn_hulld();
    let status = hull.wait_running(Duration::from_secs(20));
    assert!(!alive(old_init), "the old inner was not cleaned up");
    let new_init = status.inner_pid.unwrap();
    assert_ne!(new_init, old_init);
    let pids = hull.cgroups().inner.pids().unwrap();
    assert!(
        pids.iter().all(|p| *p != old_init),
        "old processes remain in the cgroup: {pids:?}"
    );
    block_on(async {
        assert_eq!(hull.sh("cat /root/kept").await, "before\n");
        let ps = hull.sh("ps -o comm").await;
        assert!(!ps.contains("sleep"), "{ps}");
    });
    assert!(hull
        .log()
        .contains("found an inner left by a previous hulld"));
}

#[test]
fn the_inner_comes_back_when_its_init_dies() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let old = block_on(async { hull.client().await.status().await.unwrap() });
    let old_init = old.inner_pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_init),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(15), "the inner to be restarted", || {
        block_on(async {
            let mut c = hull.client().await;
            let s = c.status().await.unwrap();
            s.inner_pid.is_some_and(|p| p != old_init) && s.unplanned_restarts == 1
        })
    });
    block_on(async { assert_eq!(hull.sh("echo alive").await, "alive\n") });
}

#[test]
fn stdin_frames_outside_a_session_are_refused() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut c = hull.client().await;
        let err = c.request(ClientMsg::StdinEof).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("only valid inside an exec session"),
            "{err}"
        );
        // The connection stays usable.
        c.status().await.unwrap();
    });
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_read_only_state_dir_is_refused_with_what_to_do() {
    if !require_root() {
        return;
    }
    use nix::mount::{mount, MsFlags};
    let tmp = tempfile::tempdir().unwrap();
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    mount(Some(&ro), &ro, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
    let _guard = Mounted(ro.clone());
    mount(
        None::<&str>,
        &ro,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    let config = tmp.path().join("hull.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nsocket = {:?}\nimage = \"busybox\"\ncgroup_name = \"hull-test-ro-{}\"\n",
            ro.join("state"),
            tmp.path().join("hull.sock"),
            std::process::id()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(hull_tests::bin_dir().join("hulld"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable state dir"), "{err}");
    assert!(!tmp.path().join("hull.sock").exists());
}
