//! The hull VM from a test: the image `hull vm build` makes (cached under
//! the test binaries' directory and keyed by its inputs), a QEMU booted
//! from a directory of the test's own and killed by its pid when the test
//! ends, and what the serial console says.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::bin_dir;

/// Whether QEMU is installed; under CI=true its absence fails the test.
pub fn require_qemu() -> bool {
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

/// `hull ARGS` from the binaries under test.
pub fn hull(args: &[&str]) -> Output {
    Command::new(bin_dir().join("hull"))
        .args(args)
        .output()
        .expect("run hull")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Where `hull vm build` keeps its downloads and builds for the tests:
/// `HULL_VM_CACHE` (CI points it at a directory that outlives the clone),
/// else beside the test binaries.
pub fn build_cache() -> PathBuf {
    std::env::var_os("HULL_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("hull-test-vm").join("cache"))
}

/// The VM image, built once per set of binaries (an flock serialises test
/// processes; `hull vm build` itself reuses a build of the same inputs).
/// Builds twice and checks that the second is the first, reused.
pub fn vm_image() -> PathBuf {
    let dir = bin_dir().join("hull-test-vm");
    std::fs::create_dir_all(&dir).unwrap();
    let lock_file = std::fs::File::create(dir.join(".lock")).unwrap();
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the VM image dir");
    let image = dir.join("image");
    let cache = build_cache();
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

fn link_or_copy(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

/// A VM directory of the test's own: the image's files linked in, its
/// run files (console, pid, QMP socket, data disk) beside them. QEMU is
/// killed by its pid when this is dropped if it still runs.
pub struct Vm {
    pub dir: PathBuf,
    _temp: tempfile::TempDir,
}

impl Vm {
    /// A directory holding `image`'s kernel, initramfs and manifest.
    pub fn new(image: &Path) -> Vm {
        let temp = tempfile::tempdir().unwrap();
        for name in ["vmlinuz", "initramfs.img", "manifest.json"] {
            link_or_copy(&image.join(name), &temp.path().join(name));
        }
        Vm {
            dir: temp.path().to_path_buf(),
            _temp: temp,
        }
    }

    pub fn dir_str(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    pub fn qemu_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("qemu.pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    pub fn console(&self) -> String {
        text(&std::fs::read(self.dir.join("console.log")).unwrap_or_default())
    }

    pub fn console_tail(&self) -> String {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits up to `timeout` for the console to contain `what`.
    pub fn wait_console(&self, what: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(what) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `hull --json vm run` of this directory with its API on `api_port`,
    /// a 2G data disk when it makes one, and `extra` arguments: the JSON
    /// it printed, or why it failed with the console's end.
    pub fn run(&self, api_port: u16, extra: &[&str]) -> Result<serde_json::Value, String> {
        let started = Instant::now();
        let port = api_port.to_string();
        let mut args = vec![
            "--json",
            "vm",
            "run",
            self.dir_str(),
            "--api-port",
            &port,
            "--disk-size",
            "2G",
            "--timeout",
            "300s",
        ];
        args.extend_from_slice(extra);
        let out = hull(&args);
        if !out.status.success() {
            return Err(format!(
                "hull vm run {extra:?} failed after {:.1} s: {}\nconsole:\n{}",
                started.elapsed().as_secs_f64(),
                text(&out.stderr),
                self.console_tail()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("hull vm run printed no JSON: {e}"))
    }

    /// `hull vm stop`, which must power the guest off by itself (not
    /// forced), and QEMU gone after it.
    pub fn stop_cleanly(&self) {
        let pid = self.qemu_pid().expect("QEMU's pid file");
        let out = hull(&["--json", "vm", "stop", self.dir_str()]);
        assert!(
            out.status.success(),
            "hull vm stop failed: {}\nconsole:\n{}",
            text(&out.stderr),
            self.console_tail()
        );
        let stopped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            stopped["forced"],
            false,
            "the guest did not power off by itself: {stopped}\n{}",
            self.console_tail()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while qemu_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!qemu_alive(pid), "QEMU {pid} still runs after hull vm stop");
    }

    /// Kills QEMU now (a power cut) and waits for it to be gone.
    pub fn kill(&self) {
        let Some(pid) = self.qemu_pid() else { return };
        if qemu_alive(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while qemu_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn qemu_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && text(&cmdline).contains("qemu-system")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` on 127.0.0.1:`port` with `headers`: the status line and the
/// body.
pub fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
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
pub fn init_lines(console: &str) -> impl Iterator<Item = &str> {
    console.lines().filter_map(|l| {
        l.find("hull-init: [")
            .map(|at| &l[at + "hull-init: [".len()..])
    })
}

/// The boot clock of hull-init's first console line that contains `what`.
pub fn init_time(console: &str, what: &str) -> Option<f64> {
    init_lines(console)
        .filter(|l| l.contains(what))
        .find_map(|l| l.split(']').next()?.trim().parse().ok())
}
