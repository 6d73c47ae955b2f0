//! Booting a built image under QEMU, in the background: the serial
//! console in `DIR/console.log`, QEMU's pid in `DIR/qemu.pid`, its QMP
//! socket at `DIR/qmp.sock`, and hulld's HTTP API forwarded from
//! 127.0.0.1 by user-mode networking.
//!
//! TCG only for now: /dev/kvm may exist on a host whose KVM guests hang
//! (nested virtualisation), and a boot that hangs is worse than a slow one.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The guest's API port (hull-init's config for hulld).
pub const GUEST_API_PORT: u16 = 7700;
/// The address user-mode networking gives the guest, and its gateway.
pub const KERNEL_IP: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off";
const QEMU: &str = "qemu-system-x86_64";
const STATE: &str = "vm.json";
const PID_FILE: &str = "qemu.pid";
const QMP_SOCKET: &str = "qmp.sock";
pub const CONSOLE_LOG: &str = "console.log";
const QEMU_LOG: &str = "qemu.log";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// QEMU's minimal machine: virtio-mmio, no PCI. Debian 6.1's cloud
    /// kernel hangs there under TCG, unable to calibrate the TSC.
    Microvm,
    /// The i440FX PC: PCI, a full firmware.
    Pc,
}

impl std::str::FromStr for Machine {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "microvm" => Ok(Machine::Microvm),
            "pc" => Ok(Machine::Pc),
            other => Err(format!("{other:?}: expected microvm or pc")),
        }
    }
}

impl Machine {
    pub fn name(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm",
            Machine::Pc => "pc",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmRunError {
    #[error("{path} is missing: build the image first (hull vm build --out {dir})", dir = .path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    MissingImage { path: PathBuf },
    #[error("a VM from {dir} is already running (QEMU pid {pid})")]
    AlreadyRunning { dir: PathBuf, pid: i32 },
    #[error("cannot start {QEMU} (install it with: apt-get install qemu-system-x86)")]
    Spawn(#[source] io::Error),
    #[error("QEMU exited ({status}) before hulld's API answered; {QEMU_LOG}: {qemu_log}; the console ends with:\n{console}")]
    Exited {
        status: String,
        qemu_log: String,
        console: String,
    },
    #[error("hulld's API did not answer on {url} within {secs} s (QEMU killed); the console ends with:\n{console}")]
    NotReady {
        url: String,
        secs: u64,
        console: String,
    },
    #[error("no VM is running from {dir}")]
    NotRunning { dir: PathBuf },
    #[error("cannot talk QMP on {path}")]
    Qmp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP refused {command}: {reply}")]
    QmpRefused { command: String, reply: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, VmRunError>;

/// How to boot.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub dir: PathBuf,
    /// QEMU's `-m` ("1G", "2048M").
    pub memory: String,
    pub cpus: u32,
    /// The host port on 127.0.0.1 forwarded to the guest's API.
    pub api_port: u16,
    pub machine: Machine,
    /// How long to wait for the API before giving up.
    pub ready_timeout: Duration,
    /// Kernel arguments after hull's own (`hull.cgroup=...`).
    pub append: Vec<String>,
}

/// `DIR/vm.json`: what `hull vm run` started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub pid: i32,
    pub api_port: u16,
    pub machine: Machine,
    pub accel: String,
    pub memory: String,
    pub cpus: u32,
}

/// A VM that answered.
#[derive(Debug, Clone, Serialize)]
pub struct Started {
    pub pid: i32,
    pub url: String,
    pub machine: Machine,
    pub accel: String,
    /// Why KVM was not used.
    pub accel_note: String,
    /// From QEMU's start to the API's first answer.
    pub ready_ms: u64,
    pub console: PathBuf,
}

/// `hull vm status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub dir: PathBuf,
    pub running: bool,
    pub pid: Option<i32>,
    pub url: Option<String>,
    pub api_answers: bool,
    pub machine: Option<Machine>,
    pub accel: Option<String>,
    pub console: PathBuf,
}

/// `hull vm stop`.
#[derive(Debug, Clone, Serialize)]
pub struct Stopped {
    pub pid: i32,
    pub stop_ms: u64,
    /// The guest did not power off in time and QEMU was told to quit.
    pub forced: bool,
}

pub fn api_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The kernel command line: the serial console, and eth0's address from
/// user-mode networking.
pub fn kernel_cmdline() -> String {
    format!("console=ttyS0 {KERNEL_IP} quiet")
}

/// QEMU's arguments for `options` (without the program).
pub fn qemu_args(options: &RunOptions) -> Vec<String> {
    let dir = &options.dir;
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));
    match options.machine {
        // microvm has no keyboard controller of its own: the i8042 is
        // where ctrl-alt-del (hull vm stop) reaches the guest's init.
        Machine::Microvm => push(&["-M", "microvm", "-device", "i8042"]),
        Machine::Pc => push(&["-M", "pc"]),
    }
    let nic = match options.machine {
        Machine::Microvm => "virtio-net-device,netdev=n0",
        Machine::Pc => "virtio-net-pci,netdev=n0",
    };
    let hostfwd = format!(
        "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{GUEST_API_PORT}",
        options.api_port
    );
    let memory = options.memory.clone();
    let cpus = options.cpus.to_string();
    let mut cmdline = kernel_cmdline();
    for arg in &options.append {
        cmdline.push(' ');
        cmdline.push_str(arg);
    }
    let kernel = path("vmlinuz");
    let initrd = path("initramfs.img");
    let serial = format!("file:{}", path(CONSOLE_LOG));
    let qmp = format!("unix:{},server=on,wait=off", path(QMP_SOCKET));
    let pid_file = path(PID_FILE);
    push(&[
        "-accel",
        "tcg",
        "-m",
        &memory,
        "-smp",
        &cpus,
        "-nographic",
        "-no-reboot",
        "-kernel",
        &kernel,
        "-initrd",
        &initrd,
        "-append",
        &cmdline,
        "-serial",
        &serial,
        "-monitor",
        "none",
        "-qmp",
        &qmp,
        "-pidfile",
        &pid_file,
        "-netdev",
        &hostfwd,
        "-device",
        nic,
    ]);
    args
}

/// Why KVM is not used, for the output.
pub fn accel_note() -> String {
    if Path::new("/dev/kvm").exists() {
        "TCG (software emulation): /dev/kvm exists but is not used, since KVM guests hang on this host".into()
    } else {
        "TCG (software emulation): there is no /dev/kvm".into()
    }
}

/// Boots the image in `options.dir` and returns once hulld's API answers.
pub fn run(options: &RunOptions, progress: &mut dyn FnMut(&str)) -> Result<Started> {
    let dir = &options.dir;
    for name in ["vmlinuz", "initramfs.img"] {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(VmRunError::MissingImage { path });
        }
    }
    if let Some(pid) = running_pid(dir) {
        return Err(VmRunError::AlreadyRunning {
            dir: dir.clone(),
            pid,
        });
    }
    for name in [CONSOLE_LOG, QMP_SOCKET, PID_FILE, STATE] {
        let _ = fs::remove_file(dir.join(name));
    }
    let qemu_log_path = dir.join(QEMU_LOG);
    let qemu_log = fs::File::create(&qemu_log_path).map_err(|source| VmRunError::Write {
        path: qemu_log_path.clone(),
        source,
    })?;
    let qemu_log_err = qemu_log.try_clone().map_err(|source| VmRunError::Write {
        path: qemu_log_path.clone(),
        source,
    })?;
    progress(&accel_note());
    let started = Instant::now();
    let mut child = Command::new(QEMU)
        .args(qemu_args(options))
        .stdin(Stdio::null())
        .stdout(qemu_log)
        .stderr(qemu_log_err)
        // Its own process group: a ctrl-c meant for this command does not
        // reach the VM.
        .process_group(0)
        .spawn()
        .map_err(VmRunError::Spawn)?;
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let state = VmState {
        pid,
        api_port: options.api_port,
        machine: options.machine,
        accel: "tcg".into(),
        memory: options.memory.clone(),
        cpus: options.cpus,
    };
    let state_path = dir.join(STATE);
    let text = serde_json::to_string_pretty(&state).unwrap_or_default();
    fs::write(&state_path, text).map_err(|source| VmRunError::Write {
        path: state_path,
        source,
    })?;
    progress(&format!(
        "QEMU pid {pid} ({} machine), console in {}",
        options.machine.name(),
        dir.join(CONSOLE_LOG).display()
    ));
    let url = api_url(options.api_port);
    let deadline = started + options.ready_timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(VmRunError::Exited {
                status: status.to_string(),
                qemu_log: fs::read_to_string(&qemu_log_path)
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
                console: console_tail(dir, 30),
            });
        }
        if api_answers(options.api_port) {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmRunError::NotReady {
                url,
                secs: options.ready_timeout.as_secs(),
                console: console_tail(dir, 30),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Started {
        pid,
        url,
        machine: options.machine,
        accel: "tcg".into(),
        accel_note: accel_note(),
        ready_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        console: dir.join(CONSOLE_LOG),
    })
}

/// Whether `GET /v1/openapi.json` on 127.0.0.1:`port` answers 200.
pub fn api_answers(port: u16) -> bool {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!(
        "GET /v1/openapi.json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    // User-mode networking accepts at once and closes when the guest
    // refuses: no status line means not yet.
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// The last `lines` lines of the serial console.
pub fn console_tail(dir: &Path, lines: usize) -> String {
    let text = fs::read(dir.join(CONSOLE_LOG)).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// QEMU's pid when a QEMU of `dir` is alive.
pub fn running_pid(dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(dir.join(PID_FILE)).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    is_qemu(pid).then_some(pid)
}

/// Whether `pid` is a live QEMU (not a zombie, not a reused pid).
fn is_qemu(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'));
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmdline).contains("qemu-system")
}

/// A QMP connection after the capabilities handshake.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let error = |source| VmRunError::Qmp {
            path: path.to_path_buf(),
            source,
        };
        let writer = UnixStream::connect(path).map_err(error)?;
        writer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(error)?;
        let reader = BufReader::new(writer.try_clone().map_err(error)?);
        let mut qmp = Qmp {
            reader,
            writer,
            path: path.to_path_buf(),
        };
        qmp.line()?; // the greeting
        qmp.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<Option<String>> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| VmRunError::Qmp {
                path: self.path.clone(),
                source,
            })?;
        Ok((n > 0).then_some(line))
    }

    /// Sends a command and waits for its answer, past any events.
    fn execute(&mut self, command: &str) -> Result<()> {
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|source| VmRunError::Qmp {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let Some(line) = self.line()? else {
                return Err(VmRunError::Qmp {
                    path: self.path.clone(),
                    source: io::Error::new(io::ErrorKind::UnexpectedEof, "QEMU closed QMP"),
                });
            };
            if line.contains("\"return\"") {
                return Ok(());
            }
            if line.contains("\"error\"") {
                return Err(VmRunError::QmpRefused {
                    command: command.to_owned(),
                    reply: line.trim().to_owned(),
                });
            }
        }
    }
}

const CTRL_ALT_DEL: &str = r#"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"ctrl"},{"type":"qcode","data":"alt"},{"type":"qcode","data":"delete"}]}}"#;

/// Sends ctrl-alt-del (hull-init powers off cleanly on it) and waits up to
/// `timeout` for QEMU to exit; then tells QEMU to quit.
pub fn stop(dir: &Path, timeout: Duration) -> Result<Stopped> {
    let Some(pid) = running_pid(dir) else {
        return Err(VmRunError::NotRunning {
            dir: dir.to_path_buf(),
        });
    };
    let started = Instant::now();
    let mut qmp = Qmp::connect(&dir.join(QMP_SOCKET))?;
    qmp.execute(CTRL_ALT_DEL)?;
    let deadline = started + timeout;
    while Instant::now() < deadline {
        if !is_qemu(pid) {
            return Ok(Stopped {
                pid,
                stop_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                forced: false,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // QEMU may close QMP as it quits: an error here is no news.
    let _ = qmp.execute(r#"{"execute":"quit"}"#);
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_qemu(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Stopped {
        pid,
        stop_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        forced: true,
    })
}

pub fn status(dir: &Path) -> Status {
    let state: Option<VmState> = fs::read(dir.join(STATE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let pid = running_pid(dir);
    let running = pid.is_some();
    let port = state.as_ref().map(|s| s.api_port);
    Status {
        dir: dir.to_path_buf(),
        running,
        pid,
        url: port.filter(|_| running).map(api_url),
        api_answers: running && port.is_some_and(api_answers),
        machine: state.as_ref().map(|s| s.machine),
        accel: state.map(|s| s.accel),
        console: dir.join(CONSOLE_LOG),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(machine: Machine) -> RunOptions {
        RunOptions {
            dir: PathBuf::from("/vm"),
            memory: "1G".into(),
            cpus: 2,
            api_port: 17700,
            machine,
            ready_timeout: Duration::from_secs(1),
            append: Vec::new(),
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> &'a str {
        let at = args.iter().position(|a| a == flag).expect(flag);
        &args[at + 1]
    }

    #[test]
    fn qemu_gets_tcg_the_console_file_and_the_forwarded_api() {
        let args = qemu_args(&options(Machine::Microvm));
        assert_eq!(after(&args, "-accel"), "tcg");
        assert_eq!(after(&args, "-M"), "microvm");
        assert_eq!(after(&args, "-serial"), "file:/vm/console.log");
        assert_eq!(after(&args, "-pidfile"), "/vm/qemu.pid");
        assert_eq!(
            after(&args, "-netdev"),
            "user,id=n0,hostfwd=tcp:127.0.0.1:17700-:7700"
        );
        assert!(after(&args, "-append").contains(KERNEL_IP));
        assert!(args.iter().any(|a| a == "-no-reboot"));
        assert!(args.iter().any(|a| a == "virtio-net-device,netdev=n0"));
        let pc = qemu_args(&options(Machine::Pc));
        assert!(pc.iter().any(|a| a == "virtio-net-pci,netdev=n0"));
    }

    #[test]
    fn appended_kernel_arguments_come_after_hulls_own() {
        let args = qemu_args(&RunOptions {
            append: vec![
                "hull.cgroup=/system.slice/hull.service".into(),
                "a b".into(),
            ],
            ..options(Machine::Pc)
        });
        assert_eq!(
            after(&args, "-append"),
            format!(
                "{} hull.cgroup=/system.slice/hull.service a b",
                kernel_cmdline()
            )
        );
    }

    #[test]
    fn nothing_runs_from_an_empty_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(running_pid(dir.path()), None);
        let status = status(dir.path());
        assert!(!status.running && !status.api_answers);
        assert!(matches!(
            stop(dir.path(), Duration::from_secs(1)),
            Err(VmRunError::NotRunning { .. })
        ));
        let missing = run(
            &RunOptions {
                dir: dir.path().to_path_buf(),
                ..options(Machine::Pc)
            },
            &mut |_| {},
        );
        assert!(matches!(missing, Err(VmRunError::MissingImage { .. })));
    }
}
