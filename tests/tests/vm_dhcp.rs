//! The rest of hull-init's boot duties, in a hull VM under QEMU (TCG):
//! `hull vm run --dhcp` boots with `ip=dhcp`, and hull-init's DHCP client
//! gets eth0's address, gateway and name server from user-mode
//! networking's DHCP server, through which the host's forwarded port
//! reaches the API. The virtio RNG is loaded; the first boot finds no
//! random seed and leaves one, the clean shutdown writes the next, and the
//! second boot (the static `ip=`) credits it. vsock is there when this
//! host has vhost-vsock, and `hull vm run` says so plainly when it has
//! not.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use hull_tests::vm::{free_port, hull, init_lines, require_qemu, text, vm_image, Vm};

const SEED: &str = "/var/lib/hull/.random-seed";

/// `hull vm run` in `vm` with `extra` arguments; its JSON.
fn boot(vm: &Vm, api_port: u16, extra: &[&str]) -> serde_json::Value {
    vm.run(api_port, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// hull-init's console line that contains every one of `parts`.
fn init_line<'a>(console: &'a str, parts: &[&str]) -> &'a str {
    init_lines(console)
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .unwrap_or_else(|| panic!("no hull-init line with {parts:?}:\n{console}"))
}

/// `hull ARGS` through the forwarded API with the run's token.
fn remote(run: &serde_json::Value, args: &[&str]) -> Output {
    let mut all = vec![
        "--socket",
        "/nonexistent/hull.sock",
        "--url",
        run["url"].as_str().unwrap(),
        "--token",
        run["token"].as_str().unwrap(),
    ];
    all.extend_from_slice(args);
    hull(&all)
}

#[test]
fn dhcp_the_random_seed_and_vsock_in_a_booted_vm() {
    if !require_qemu() {
        return;
    }
    let image = vm_image();
    let vm = Vm::new(&image);

    // First boot: DHCP, a fresh data disk.
    let api_port = free_port();
    let run = boot(&vm, api_port, &["--dhcp"]);
    assert_eq!(run["url"], format!("http://127.0.0.1:{api_port}"));
    let console = vm.console();
    init_line(
        &console,
        &[
            "DHCP lease on eth0: 10.0.2.15/255.255.255.0 via 10.0.2.2 from 10.0.2.2",
            "DNS 10.0.2.3",
            "lease 86400 s",
        ],
    );
    init_line(
        &console,
        &["brought eth0 up as 10.0.2.15/255.255.255.0 via 10.0.2.2"],
    );
    init_line(&console, &["wrote /etc/resolv.conf"]);
    // The API answered through the forwarded port (hull vm run waits for
    // it); the token and the inner behind it work too.
    assert!(
        vm.wait_console("inner ready", Duration::from_secs(90)),
        "the inner did not start:\n{}",
        vm.console_tail()
    );
    let out = remote(&run, &["exec", "--", "echo", "over dhcp"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "over dhcp\n");

    // The virtio RNG, and the first boot's seed.
    init_line(&console, &["loaded ", "virtio-rng.ko"]);
    init_line(
        &console,
        &[&format!("no random seed in {SEED} (first boot)")],
    );
    init_line(&console, &[&format!("wrote a new random seed to {SEED}")]);

    // vsock: there when the host has vhost-vsock, said plainly when not.
    if Path::new("/dev/vhost-vsock").exists() {
        let cid = run["vsock"]["cid"].as_u64().expect("a vsock CID");
        assert!(cid >= 3, "{run}");
        assert_eq!(run["vsock"]["port"], 7700);
        init_line(
            &console,
            &[&format!("vsock: this VM is context {cid}"), "port 7700"],
        );
    } else {
        assert!(run["vsock"].is_null(), "{run}");
        assert_eq!(
            run["vsock_note"],
            "no vhost-vsock on this host: the API goes through the forwarded TCP port"
        );
        init_line(&console, &["no vsock device: hulld's API is on TCP only"]);
    }

    vm.stop_cleanly();
    init_line(&vm.console(), &["wrote the random seed for the next boot"]);

    // Second boot, the static ip=: the seed the shutdown wrote is credited.
    let api_port = free_port();
    let run = boot(&vm, api_port, &[]);
    let console = vm.console();
    init_line(
        &console,
        &["brought eth0 up as 10.0.2.15/255.255.255.0 via 10.0.2.2"],
    );
    assert!(
        !init_lines(&console).any(|l| l.contains("DHCP")),
        "no DHCP with the static ip=:\n{console}"
    );
    let seeded = init_line(
        &console,
        &[
            &format!("seeded the random pool with 512 bytes from {SEED}"),
            "written at the last shutdown",
            "4096 bits credited",
        ],
    );
    eprintln!("{seeded}");
    for line in init_lines(&console).filter(|l| l.contains("random")) {
        eprintln!("{line}");
    }
    let out = remote(&run, &["--json", "checkpoint", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    vm.stop_cleanly();
}
