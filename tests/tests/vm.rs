//! The hull VM end to end: `hull vm build` makes the image (cached under
//! the test binaries' directory, like the inner's test images), `hull vm
//! run` boots it under QEMU (TCG) on a free loopback port, hulld's API
//! answers through QEMU's forwarded port, and `hull vm stop` powers it off
//! cleanly. QEMU is killed by its pid if the test fails on the way.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hull_tests::bin_dir;

/// Whether QEMU is installed; under CI=true its absence fails the test.
fn require_qemu() -> bool {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the VM test needs qemu-system-x86_64 (apt-get install qemu-system-x86) and CI=true forbids skipping");
    }
    eprintln!("skipping: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
    false
}

fn hull(args: &[&str]) -> Output {
    Command::new(bin_dir().join("hull"))
        .args(args)
        .output()
        .expect("run hull")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The VM image, built once per set of binaries (an flock serialises test
/// processes; `hull vm build` itself reuses a build of the same inputs).
fn vm_image() -> PathBuf {
    let dir = bin_dir().join("hull-test-vm");
    std::fs::create_dir_all(&dir).unwrap();
    let lock_file = std::fs::File::create(dir.join(".lock")).unwrap();
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the VM image dir");
    let image = dir.join("image");
    let cache = dir.join("cache");
    let build = || {
        let out = hull(&[
            "--json",
            "vm",
            "build",
            "--out",
            image.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "hull vm build failed: {}",
            text(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = build();
    // The same inputs: the cached build, the same key.
    let second = build();
    assert_eq!(second["reused"], true, "{second}");
    assert_eq!(second["manifest"]["key"], first["manifest"]["key"]);
    image
}

/// A QEMU started from `dir`, killed by its pid when dropped if it still runs.
struct Vm {
    dir: PathBuf,
}

impl Vm {
    fn qemu_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("qemu.pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    fn console(&self) -> String {
        text(&std::fs::read(self.dir.join("console.log")).unwrap_or_default())
    }

    fn console_tail(&self) -> String {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(pid) = self.qemu_pid() {
            if qemu_alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn qemu_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && text(&cmdline).contains("qemu-system")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` on 127.0.0.1:`port`: the status line and the body.
fn http_get(port: u16, path: &str) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = text(&response[..split]);
    let status = head.lines().next().unwrap_or_default().to_owned();
    let body = response[split + 4..].to_vec();
    // hyper sends a body of unknown length chunked: take the chunks out.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (status, dechunk(&body));
    }
    (status, body)
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(text(&body[..line_end]).trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[line_end + 2..line_end + 2 + size]);
        body = &body[line_end + 2 + size + 2..];
    }
}

/// hull-init's console lines (the first may follow the firmware's
/// escape sequences on the same line), from their boot clock on.
fn init_lines(console: &str) -> impl Iterator<Item = &str> {
    console.lines().filter_map(|l| {
        l.find("hull-init: [")
            .map(|at| &l[at + "hull-init: [".len()..])
    })
}

/// The boot clock of hull-init's first console line that contains `what`.
fn init_time(console: &str, what: &str) -> Option<f64> {
    init_lines(console)
        .filter(|l| l.contains(what))
        .find_map(|l| l.split(']').next()?.trim().parse().ok())
}

fn link_or_copy(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

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
    let run_dir = tempfile::tempdir().unwrap();
    for name in ["vmlinuz", "initramfs.img", "manifest.json"] {
        link_or_copy(&image.join(name), &run_dir.path().join(name));
    }
    let vm = Vm {
        dir: run_dir.path().to_path_buf(),
    };
    let port = free_port();
    let started = Instant::now();
    let out = hull(&[
        "--json",
        "vm",
        "run",
        run_dir.path().to_str().unwrap(),
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
    let (status, body) = http_get(port, "/v1/openapi.json");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let openapi: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        openapi["paths"]["/v1/openapi.json"].is_object(),
        "{openapi}"
    );

    let out = hull(&["--json", "vm", "status", run_dir.path().to_str().unwrap()]);
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

    let out = hull(&["--json", "vm", "stop", run_dir.path().to_str().unwrap()]);
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
    let out = hull(&["--json", "vm", "status", run_dir.path().to_str().unwrap()]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["running"], false, "{status}");
}
