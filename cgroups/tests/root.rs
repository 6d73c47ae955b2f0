//! Real cgroups, created below this test process's own cgroup and removed
//! by a guard's `Drop` even when a test fails. They need root; under
//! CI=true a run without it fails instead of passing by skipping.

// Test code: a failed unwrap is the test failing.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hull_cgroups::{v2, Cgroup, CgroupManager, CpuLimits, CpuMax, HullCgroups, Version};

fn can_run(what: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        "root"
    } else if what.is_empty() {
        return true;
    } else {
        what
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs {why} and CI=true forbids skipping");
    }
    eprintln!("skipping: this test needs {why}");
    false
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// hull's layout (base, daemon, inner) under a name of the test's own,
/// killed and removed when dropped.
struct Groups(HullCgroups);

impl Groups {
    fn new() -> Self {
        let groups = HullCgroups::locate(&unique("hull-cgtest")).expect("locate");
        let guard = Groups(groups);
        guard.0.create_base().expect("create the base group");
        guard.0.inner.create().expect("create the inner group");
        guard
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        for g in [&self.0.inner, &self.0.daemon, &self.0.base] {
            let _ = g.kill_all(Duration::from_secs(5));
        }
        for g in [&self.0.inner, &self.0.daemon, &self.0.base] {
            if let Err(e) = g.remove() {
                eprintln!("cannot remove test cgroup {}: {e}", g.display_path());
            }
        }
    }
}

/// Starts `script` under sh, moves it into `group` while it waits on its
/// stdin, then lets it go, so everything it starts is in the group.
fn spawn_in(group: &Cgroup, script: &str) -> Child {
    let mut child = Command::new("/bin/sh")
        .args(["-c", &format!("read go; {script}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sh");
    group.join(child.id() as i32).expect("join");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    child
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn limits_freeze_and_kill_on_a_real_group() {
    if !can_run("") {
        return;
    }
    let groups = Groups::new();
    let inner = &groups.0.inner;
    inner.set_limits(Some(256 << 20), Some(64)).unwrap();
    let mut child = spawn_in(inner, "sleep 1000 & sleep 1000 & exec sleep 1000");
    wait_for("three sleeps in the group", || {
        inner.pids().unwrap().len() == 3
    });
    assert_eq!(inner.pids_current(), Some(3));
    assert_eq!(inner.oom_kills(), Some(0));

    inner.freeze(Duration::from_secs(5)).unwrap();
    inner.thaw().unwrap();

    let pids = inner.pids().unwrap();
    let start = Instant::now();
    inner.kill_all(Duration::from_secs(5)).unwrap();
    eprintln!(
        "{} kill_all of 3 processes: {:?}",
        inner.version(),
        start.elapsed()
    );
    assert!(inner.pids().unwrap().is_empty());
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    wait_for("the orphaned sleeps to be reaped", || {
        pids.iter().all(|&p| !alive(p))
    });
    // Empty and thawed: a new process runs in it.
    let mut again = spawn_in(inner, "exit 7");
    assert_eq!(again.wait().unwrap().code(), Some(7));
}

#[test]
fn kill_all_takes_a_group_left_frozen() {
    if !can_run("") {
        return;
    }
    let groups = Groups::new();
    let inner = &groups.0.inner;
    let mut child = spawn_in(inner, "exec sleep 1000");
    wait_for("the sleep in the group", || {
        inner.pids().unwrap().len() == 1
    });
    inner.freeze(Duration::from_secs(5)).unwrap();
    inner.kill_all(Duration::from_secs(5)).unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
}

#[test]
fn an_oom_kill_is_counted() {
    if !can_run("") {
        return;
    }
    let groups = Groups::new();
    let inner = &groups.0.inner;
    inner.set_limits(Some(32 << 20), None).unwrap();
    // tail keeps the last "line" of /dev/zero, which never ends.
    let mut child = spawn_in(inner, "exec tail /dev/zero");
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    wait_for("the OOM kill to be counted", || {
        inner.oom_kills() == Some(1)
    });
}

#[test]
fn cpu_limits_reach_the_kernel() {
    if !can_run("") {
        return;
    }
    let groups = Groups::new();
    let inner = &groups.0.inner;
    inner
        .set_cpu(&CpuLimits {
            weight: Some(50),
            max: Some(CpuMax::cpus(0.5)),
        })
        .unwrap();
    let dirs = inner.manager().dirs();
    let read = |dir: &std::path::Path, f: &str| {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        text.trim().to_string()
    };
    match inner.version() {
        Version::V1 => {
            let dir = dirs
                .iter()
                .find(|d| d.starts_with("/sys/fs/cgroup/cpu"))
                .expect("a v1 cpu hierarchy");
            assert_eq!(read(dir, "cpu.shares"), "512");
            assert_eq!(read(dir, "cpu.cfs_quota_us"), "50000");
            assert_eq!(read(dir, "cpu.cfs_period_us"), "100000");
        }
        Version::V2 => {
            assert_eq!(read(dirs[0], "cpu.weight"), "50");
            assert_eq!(read(dirs[0], "cpu.max"), "50000 100000");
        }
    }
    // A process still runs under the cap.
    let mut child = spawn_in(inner, "exit 3");
    assert_eq!(child.wait().unwrap().code(), Some(3));
}

/// The v2 core (cgroup.kill, cgroup.freeze, cgroup.events) needs no
/// controller, so it is exercised on a hybrid host's empty unified tree too.
#[test]
fn v2_freeze_and_kill_where_a_unified_tree_is_mounted() {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    });
    let Some(mount) = mount else {
        if can_run("a cgroup2 mount") {
            unreachable!()
        }
        return;
    };
    if !can_run("") {
        return;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a v2 row in /proc/self/cgroup");
    let group = v2::Manager::new(
        mount
            .join(own.trim_start_matches('/'))
            .join(unique("hull-cgtest-v2")),
    );
    struct Remove(v2::Manager);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = self.0.kill_all(Duration::from_secs(5));
            let _ = self.0.remove();
        }
    }
    let group = Remove(group);
    group.0.create().unwrap();
    let handle = Cgroup::from(group.0.clone());
    let mut child = spawn_in(&handle, "sleep 1000 & exec sleep 1000");
    wait_for("two sleeps in the group", || {
        handle.pids().unwrap().len() == 2
    });
    handle.freeze(Duration::from_secs(5)).unwrap();
    let events = std::fs::read_to_string(group.0.dir().join("cgroup.events")).unwrap();
    assert!(events.contains("frozen 1"), "{events}");
    handle.thaw().unwrap();
    let start = Instant::now();
    handle.kill_all(Duration::from_secs(5)).unwrap();
    eprintln!("v2 kill_all of 2 processes: {:?}", start.elapsed());
    assert!(handle.pids().unwrap().is_empty());
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
}

/// The OOM watch wakes for a kill in the group, and the kill is counted.
#[test]
fn an_oom_kill_wakes_the_watch_and_is_counted() {
    if !can_run("") {
        return;
    }
    let groups = Groups::new();
    let inner = &groups.0.inner;
    inner
        .set_limits(Some(32 << 20), None)
        .expect("memory limit");
    let before = inner
        .oom_kills()
        .expect("a kernel that counts OOM kills (4.13 or later)");
    let mut watch = inner.watch_oom().expect("watch");
    // Nothing happens yet: the wait ends at its timeout.
    assert!(!watch.wait(Duration::from_millis(100)).unwrap());
    let mut hog = spawn_in(inner, "exec dd if=/dev/zero of=/dev/null bs=100M count=1");
    let begin = Instant::now();
    let mut woke = false;
    while !woke && begin.elapsed() < Duration::from_secs(10) {
        woke = watch.wait(Duration::from_secs(1)).unwrap();
    }
    assert!(woke, "no OOM notification within 10 s");
    let status = hog.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(inner.oom_kills().unwrap() > before);
}
