//! The hull VM end to end, on pure cgroup v2 under QEMU: `hull vm
//! build` makes the image, `hull vm run` boots it with a fresh data disk
//! and hands the host an admin token, and through QEMU's forwarded ports
//! the host drives exec, a service behind the guest's HTTP ingress,
//! checkpoints and restores. The inner's memory limit is seen and enforced
//! (the OOM kill reported), its root makes child groups of its own but
//! cannot raise its limits, a clean power-off leaves the data disk marked
//! clean for the next boot, and a power cut in the middle of writes is
//! followed by a boot that recovers with every checkpoint intact. QEMU is
//! killed by its pid if the test fails on the way.

use std::process::Output;
use std::time::{Duration, Instant};

use hull_tests::vm::{
    free_port, http_get, hull, init_lines, init_time, require_qemu, text, vm_image, Vm,
};

/// What `hull vm run --json` printed.
struct Run {
    json: serde_json::Value,
    api_port: u16,
    http_port: u16,
}

impl Run {
    fn url(&self) -> &str {
        self.json["url"].as_str().unwrap()
    }

    fn token(&self) -> &str {
        self.json["token"].as_str().unwrap()
    }

    /// `hull ARGS` through the forwarded API with the host's token, never
    /// a local socket.
    fn hull(&self, args: &[&str]) -> Output {
        hull_tests::remote(self.url(), self.token(), args, b"")
    }

    /// Like `hull`, and it must succeed: its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.hull(args);
        assert!(
            out.status.success(),
            "hull {args:?}: {}\n{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        text(&out.stdout)
    }

    /// The VM's transparent hugepage modes, the one in force bracketed.
    fn thp_mode(&self) -> String {
        self.ok(&[
            "exec",
            "--",
            "cat",
            "/sys/kernel/mm/transparent_hugepage/enabled",
        ])
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// GET / through the guest's HTTP ingress, forwarded to this machine.
    fn web(&self) -> (String, String) {
        let (status, body) = http_get(self.http_port, "/", &[]);
        (status, text(&body))
    }
}

/// Boots the VM in `vm` (with `append` on the kernel command line) and
/// waits for its inner.
fn boot(vm: &Vm, append: &[&str]) -> Run {
    let api_port = free_port();
    let http_port = free_port();
    let http = http_port.to_string();
    let mut extra = vec!["--http-port", &http];
    for arg in append {
        extra.extend(["--append", arg]);
    }
    let json = vm.run(api_port, &extra).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(json["url"], format!("http://127.0.0.1:{api_port}"));
    // KVM where the kernel boots under it, TCG otherwise; either way the
    // output says which and why.
    let accel = json["accel"].as_str().unwrap().to_owned();
    assert!(accel == "tcg" || accel == "kvm", "{json}");
    assert!(
        json["accel_note"]
            .as_str()
            .is_some_and(|n| n.contains(&accel.to_uppercase())),
        "the output says which accelerator: {json}"
    );
    // The inner starts too: its root pivots, which needs hull-init to have
    // moved off the initramfs.
    assert!(
        vm.wait_console("inner ready", Duration::from_secs(90)),
        "the inner did not start:\n{}",
        vm.console_tail()
    );
    Run {
        json,
        api_port,
        http_port,
    }
}

fn assert_init_says(vm: &Vm, lines: &[&str]) {
    let console = vm.console();
    for line in lines {
        assert!(
            init_lines(&console).any(|l| l.contains(line)),
            "the console has no hull-init line with {line:?}:\n{}",
            vm.console_tail()
        );
    }
}

/// The ids of the checkpoints hulld lists.
fn checkpoint_ids(run: &Run) -> Vec<String> {
    run.json(&["checkpoint", "list"])["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits for the web service to answer through the ingress with `want`.
fn web_answers(run: &Run, want: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = run.web();
        if (status.contains(" 200 ") && body.contains(want)) || Instant::now() >= deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_hull_vm_serves_the_host_keeps_its_disk_and_survives_a_power_cut() {
    if !require_qemu() {
        return;
    }
    let image = vm_image();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json")).unwrap()).unwrap();
    assert!(
        manifest["kernel"]["version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{manifest}"
    );
    assert_eq!(manifest["image"]["kind"], "busybox");
    // The accelerator probe can tell a kernel that boots from one that
    // does not: under TCG the image's kernel boots as far as its panic.
    let scratch = tempfile::tempdir().unwrap();
    assert!(hull_image::vm::accel::kernel_boots(
        "qemu-system-x86_64",
        hull_image::vm::accel::Accel::Tcg,
        &image.join("vmlinuz"),
        scratch.path()
    )
    .unwrap());
    // The run's files (console, pid, QMP socket, data disk) go in a
    // directory of the test's own.
    let vm = Vm::new(&image);

    // --- First boot: an empty data disk.
    let run = boot(&vm, &[]);
    assert_eq!(run.json["data_disk_created"], true, "{}", run.json);
    let pid = i32::try_from(run.json["pid"].as_i64().unwrap()).unwrap();
    assert_eq!(vm.qemu_pid(), Some(pid));
    assert_init_says(
        &vm,
        &[
            "started as pid 1",
            "mounted proc at /proc",
            "mounted cgroup2 at /sys/fs/cgroup",
            "enabled cgroup controllers",
            "kernel modules",
            "formatted the empty data disk /dev/vda btrfs",
            "mounted the data disk /dev/vda at /var/lib/hull (first boot)",
            "copied the base image",
            // What the tmpfs root held only for the boot is gone from it.
            "removed the kernel modules' files from the root",
            "removed the base image's copy from the root",
            "transparent hugepages: never",
            "brought lo up",
            "brought eth0 up as 10.0.2.15/255.255.255.0 via 10.0.2.2",
            "started hulld as pid",
        ],
    );
    let console = vm.console();
    assert!(
        console.contains("hulld listening") && console.contains("cgroup_version=v2"),
        "hulld's start-up on pure cgroup v2 is on the console:\n{}",
        vm.console_tail()
    );

    // The host's token: in DIR/api.env, for its owner alone, and it works.
    let env_path = vm.dir.join("api.env");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&env_path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(&env_path).unwrap(),
        format!("HULL_URL={}\nHULL_TOKEN={}\n", run.url(), run.token())
    );
    let (status, _) = http_get(run.api_port, "/v1/sprites", &[]);
    assert!(status.contains(" 401 "), "no token: {status}");
    let bearer = format!("Bearer {}", run.token());
    let (status, _) = http_get(run.api_port, "/v1/sprites", &[("Authorization", &bearer)]);
    assert!(status.contains(" 200 "), "the host's token: {status}");
    assert_eq!(run.ok(&["exec", "--", "echo", "hello"]), "hello\n");
    // Transparent hugepages are off unless the command line asks for
    // them: khugepaged would keep 44 MiB of a 1 GiB VM free.
    let thp = run.thp_mode();
    assert!(thp.contains("[never]"), "{thp}");
    // The inner never sees the token's secret: not on the kernel's
    // command line (which has its hash), not in hulld's config.
    let secret = run.token().rsplit('_').next().unwrap().to_owned();
    let cmdline = run.ok(&["exec", "--", "cat", "/proc/cmdline"]);
    assert!(cmdline.contains("hull.host_token="), "{cmdline}");
    assert!(!cmdline.contains(&secret), "{cmdline}");
    let etc = run.ok(&[
        "exec",
        "--",
        "sh",
        "-c",
        "cat /etc/hull/hull.toml 2>&1; ls /var/lib/hull 2>&1; true",
    ]);
    assert!(
        !etc.contains(&secret) && !etc.contains("host_token"),
        "{etc}"
    );

    // The inner's root is not the VM's: a user namespace, which needs the
    // image on the data disk's btrfs.
    let uid_map = run.ok(&["exec", "--", "cat", "/proc/self/uid_map"]);
    assert!(
        uid_map
            .split_whitespace()
            .nth(1)
            .is_some_and(|base| base != "0"),
        "the inner's root is the VM's: {uid_map}"
    );

    // The memory limit, from inside, and enforced: an OOM kill is
    // reported on the exec's stderr and counted in status.
    let status = run.json(&["status"]);
    let memory_max = status["limits"]["memory_max_bytes"].as_u64().unwrap();
    let seen = run.ok(&["exec", "--", "cat", "/sys/fs/cgroup/memory.max"]);
    assert_eq!(seen.trim(), memory_max.to_string());
    assert_eq!(status["oom_kills"], 0, "{status}");
    let hog = format!("bs={}M", (memory_max >> 20) + 64);
    let out = run.hull(&[
        "exec",
        "--",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        &hog,
        "count=1",
    ]);
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("out-of-memory"),
        "{}",
        text(&out.stderr)
    );
    let status = run.json(&["status"]);
    assert_eq!(status["oom_kills"], 1, "{status}");

    // Delegation: root in the inner makes a group and moves itself into
    // it, but cannot raise its own limit.
    let moved = run.ok(&[
        "exec",
        "--",
        "sh",
        "-c",
        "mkdir /sys/fs/cgroup/job && echo $$ > /sys/fs/cgroup/job/cgroup.procs && cat /proc/self/cgroup",
    ]);
    assert_eq!(moved.trim(), "0::/job");
    let raise = run.hull(&[
        "exec",
        "--",
        "sh",
        "-c",
        "echo max > /sys/fs/cgroup/memory.max",
    ]);
    assert!(
        !raise.status.success(),
        "the inner raised its own memory.max"
    );
    let seen = run.ok(&["exec", "--", "cat", "/sys/fs/cgroup/memory.max"]);
    assert_eq!(seen.trim(), memory_max.to_string());

    // How many groups it may make is bounded, and it cannot lift that.
    let bounds = run.ok(&[
        "exec",
        "--",
        "sh",
        "-c",
        "cat /sys/fs/cgroup/cgroup.max.descendants /sys/fs/cgroup/cgroup.max.depth; echo max > /sys/fs/cgroup/cgroup.max.descendants 2>/dev/null && echo lifted; true",
    ]);
    assert_eq!(bounds, "256\n8\n", "{bounds}");

    // A service with an HTTP port, reached from this machine through the
    // guest's ingress.
    run.ok(&[
        "exec",
        "--",
        "sh",
        "-c",
        "mkdir -p /www && echo first > /www/index.html",
    ]);
    run.ok(&[
        "services",
        "add",
        "web",
        "--http-port",
        "8000",
        "--cmd",
        "httpd -f -p 8000 -h /www",
    ]);
    let (status, body) = web_answers(&run, "first");
    assert!(
        status.contains(" 200 ") && body == "first\n",
        "{status} {body}"
    );

    // A checkpoint (the inner frozen through cgroup.freeze), something
    // broken, a restore: the service and its page are back.
    let made = run.json(&["checkpoint", "create", "-m", "served"]);
    assert!(made["frozen_ms"].as_f64().unwrap() > 0.0, "{made}");
    let served = made["checkpoint"]["id"].as_str().unwrap().to_owned();
    run.ok(&["exec", "--", "rm", "-rf", "/www"]);
    let (status, _) = run.web();
    assert!(status.contains(" 404 "), "{status}");
    run.ok(&["checkpoint", "restore", &served]);
    let (status, body) = web_answers(&run, "first");
    assert!(
        status.contains(" 200 ") && body == "first\n",
        "{status} {body}"
    );
    // The inner's group was emptied of what it made: a fresh inner.
    let groups = run.ok(&[
        "exec",
        "--",
        "sh",
        "-c",
        "ls -d /sys/fs/cgroup/*/ 2>/dev/null; true",
    ]);
    assert!(!groups.contains("job"), "{groups}");

    let first_token = run.token().to_owned();
    vm.stop_cleanly();
    assert_init_says(
        &vm,
        &[
            "SIGINT: shutting down",
            "hulld stopped",
            "marked the data disk clean",
            "unmounted",
            "powering off",
        ],
    );
    let console = vm.console();
    assert!(
        !console.contains("hulld did not stop"),
        "{}",
        vm.console_tail()
    );
    assert!(
        console.contains("reboot: Power down"),
        "{}",
        vm.console_tail()
    );
    let out = hull(&["--json", "vm", "status", vm.dir_str()]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["running"], false, "{status}");

    // --- Second boot: the disk was shut down cleanly and kept it all.
    let run = boot(&vm, &[]);
    assert_eq!(run.json["data_disk_created"], false, "{}", run.json);
    assert_init_says(
        &vm,
        &[
            "(the last run shut down cleanly)",
            "the data disk has the base image",
            "removed the base image's copy from the root",
            "(written at the last shutdown), 4096 bits credited",
        ],
    );
    assert!(checkpoint_ids(&run).contains(&served));
    let (status, body) = web_answers(&run, "first");
    assert!(
        status.contains(" 200 ") && body == "first\n",
        "{status} {body}"
    );
    // Each run's token replaces the last.
    let old = format!("Bearer {first_token}");
    let (status, _) = http_get(run.api_port, "/v1/sprites", &[("Authorization", &old)]);
    assert!(status.contains(" 401 "), "the last run's token: {status}");

    // A power cut in the middle of writes, just after a checkpoint.
    run.ok(&["exec", "--", "sh", "-c", "echo second > /www/index.html"]);
    run.ok(&[
        "services",
        "add",
        "writer",
        "--cmd",
        "while true; do dd if=/dev/zero of=/scratch bs=1M count=32 2>/dev/null; sync; done",
    ]);
    let made = run.json(&["checkpoint", "create", "-m", "second"]);
    let second = made["checkpoint"]["id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_secs(2));
    vm.kill();

    // --- Third boot: recovery, and every checkpoint intact. hulld's first
    // start here dies in the middle of its next checkpoint (a failpoint),
    // and hull-init starts it again.
    let run = boot(
        &vm,
        &[
            "hull.failpoint=create:after-snapshot",
            "transparent_hugepage=madvise",
        ],
    );
    assert_init_says(
        &vm,
        &[
            "(the last run did not shut down cleanly",
            "transparent hugepages: madvise, as the command line says",
        ],
    );
    let thp = run.thp_mode();
    assert!(thp.contains("[madvise]"), "{thp}");
    // No shutdown wrote the seed: the one the last boot left in its place
    // is credited, and it was removed before, so no boot credits it twice.
    assert_init_says(
        &vm,
        &["written at the last boot, which did not shut down cleanly), 4096 bits credited"],
    );
    let console = vm.console();
    assert!(
        console.contains("storage checked") || console.contains("storage recovery"),
        "hulld's storage recovery is logged:\n{}",
        vm.console_tail()
    );
    let ids = checkpoint_ids(&run);
    assert!(ids.contains(&served) && ids.contains(&second), "{ids:?}");
    // hulld dies in the middle of a checkpoint; hull-init restarts it, and
    // the restarted hulld recovers: the half-made checkpoint is gone, the
    // rest are intact and the inner serves again.
    let dying = run.hull(&["checkpoint", "create", "-m", "dies"]);
    assert!(!dying.status.success(), "the failpoint did not fire");
    assert!(
        vm.wait_console("restarting it", Duration::from_secs(30)),
        "hull-init did not restart hulld:\n{}",
        vm.console_tail()
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while !run.hull(&["status"]).status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_init_says(
        &vm,
        &[
            "hulld's first start gets HULL_FAILPOINT=create:after-snapshot",
            "was killed by SIGKILL",
        ],
    );
    assert!(
        vm.console().contains("storage recovery"),
        "the restarted hulld's recovery is logged:\n{}",
        vm.console_tail()
    );
    let after = run.json(&["checkpoint", "list"]);
    let comments: Vec<&str> = after["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["comment"].as_str())
        .collect();
    assert!(!comments.contains(&"dies"), "{after}");
    assert!(
        comments.contains(&"served") && comments.contains(&"second"),
        "{after}"
    );

    run.ok(&["checkpoint", "restore", &served]);
    let (status, body) = web_answers(&run, "first");
    assert!(
        status.contains(" 200 ") && body == "first\n",
        "{status} {body}"
    );
    run.ok(&["checkpoint", "restore", &second]);
    let (status, body) = web_answers(&run, "second");
    assert!(
        status.contains(" 200 ") && body == "second\n",
        "{status} {body}"
    );

    let console = vm.console();
    let kernel_to_init = init_time(&console, "started as pid 1").unwrap();
    let hulld_started = init_time(&console, "started hulld as pid").unwrap();
    eprintln!(
        "boot: kernel to init {kernel_to_init:.2} s, init to hulld {:.2} s, QEMU start to API {:.1} s",
        hulld_started - kernel_to_init,
        run.json["ready_ms"].as_f64().unwrap() / 1000.0
    );
    vm.stop_cleanly();
}
