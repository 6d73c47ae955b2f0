//! The hull VM end to end: `hull vm build` makes the image, `hull vm run`
//! boots it under QEMU (TCG) on a free loopback port, hulld's API answers
//! through QEMU's forwarded port, and `hull vm stop` powers it off
//! cleanly. QEMU is killed by its pid if the test fails on the way.

use std::time::{Duration, Instant};

use hull_tests::vm::{
    free_port, http_get, hull, init_lines, init_time, qemu_alive, require_qemu, text, vm_image, Vm,
};

#[test]
fn a_hull_vm_boots_serves_its_api_and_powers_off_cleanly() {
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

    // The run's files (console, pid, QMP socket) go in a directory of the
    // test's own.
    let vm = Vm::new(&image);
    let port = free_port();
    let started = Instant::now();
    let out = hull(&[
        "--json",
        "vm",
        "run",
        vm.dir_str(),
        "--api-port",
        &port.to_string(),
        "--timeout",
        "120s",
    ]);
    assert!(
        out.status.success(),
        "hull vm run failed after {:.1} s: {}\nconsole:\n{}",
        started.elapsed().as_secs_f64(),
        text(&out.stderr),
        vm.console_tail()
    );
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["url"], format!("http://127.0.0.1:{port}"));
    assert_eq!(run["accel"], "tcg");
    assert!(
        text(&out.stderr).contains("TCG"),
        "the output says which accelerator: {}",
        text(&out.stderr)
    );
    let pid = i32::try_from(run["pid"].as_i64().unwrap()).unwrap();
    assert_eq!(vm.qemu_pid(), Some(pid));
    assert!(qemu_alive(pid));

    let console = vm.console();
    for step in [
        "started as pid 1",
        "mounted proc at /proc",
        "mounted cgroup2 at /sys/fs/cgroup",
        "enabled cgroup controllers",
        "kernel modules",
        "brought lo up",
        "brought eth0 up as 10.0.2.15/255.255.255.0 via 10.0.2.2",
        "started hulld as pid",
    ] {
        assert!(
            init_lines(&console).any(|l| l.contains(step)),
            "the console has no hull-init line with {step:?}:\n{}",
            vm.console_tail()
        );
    }
    assert!(
        console.contains("hulld listening") && console.contains("cgroup_version=v2"),
        "hulld's start-up on pure cgroup v2 is on the console:\n{}",
        vm.console_tail()
    );
    assert!(
        console.contains("HTTP API listening"),
        "{}",
        vm.console_tail()
    );

    // The API, from this machine, through QEMU's forwarded port.
    let (status, body) = http_get(port, "/v1/openapi.json", &[]);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let openapi: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        openapi["paths"]["/v1/openapi.json"].is_object(),
        "{openapi}"
    );

    let out = hull(&["--json", "vm", "status", vm.dir_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(status["api_answers"], true, "{status}");
    assert_eq!(status["pid"], pid);

    // The inner starts too: its root pivots, which needs hull-init to have
    // moved off the initramfs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !vm.console().contains("inner ready") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        vm.console().contains("inner ready"),
        "the inner did not start:\n{}",
        vm.console_tail()
    );

    let kernel_to_init = init_time(&console, "started as pid 1").unwrap();
    let hulld_started = init_time(&console, "started hulld as pid").unwrap();
    eprintln!(
        "boot: kernel to init {kernel_to_init:.2} s, init to hulld {:.2} s, QEMU start to API {:.1} s",
        hulld_started - kernel_to_init,
        run["ready_ms"].as_f64().unwrap() / 1000.0
    );

    let out = hull(&["--json", "vm", "stop", vm.dir_str()]);
    assert!(
        out.status.success(),
        "hull vm stop failed: {}\nconsole:\n{}",
        text(&out.stderr),
        vm.console_tail()
    );
    let stopped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        stopped["forced"],
        false,
        "the guest powered off by itself: {stopped}\n{}",
        vm.console_tail()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while qemu_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!qemu_alive(pid), "QEMU {pid} still runs after hull vm stop");
    let console = vm.console();
    // hulld stopped on its SIGTERM, not killed after the grace period.
    for line in [
        "SIGINT: shutting down",
        "hulld stopped",
        "unmounted",
        "powering off",
    ] {
        assert!(
            init_time(&console, line).is_some(),
            "no hull-init line with {line:?} on the console:\n{}",
            vm.console_tail()
        );
    }
    assert!(
        !console.contains("hulld did not stop"),
        "{}",
        vm.console_tail()
    );
    assert!(
        console.contains("reboot: Power down"),
        "the kernel powered off:\n{}",
        vm.console_tail()
    );
    let out = hull(&["--json", "vm", "status", vm.dir_str()]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["running"], false, "{status}");
}
