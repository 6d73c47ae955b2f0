//! Booting a built image under QEMU, in the background: the serial
//! console in `DIR/console.log`, QEMU's pid in `DIR/qemu.pid`, its QMP
//! socket at `DIR/qmp.sock`, the data disk `DIR/data.img` (made sparse
//! and empty when missing; hull-init formats it on first boot), and
//! hulld's HTTP API and HTTP ingress forwarded from 127.0.0.1 by
//! user-mode networking.
//!
//! Each run makes a new admin token for the host and writes it, with the
//! API's URL, to `DIR/api.env` (mode 0600). Only the token's id and the
//! SHA-256 of its secret go to the guest, on the kernel command line (the
//! one channel Firecracker and Cloud Hypervisor have too): hulld stores
//! nothing else of a token, and the inner, which can read /proc/cmdline,
//! learns nothing it could present.
//!
//! Every VM gets a virtio RNG (the host's /dev/urandom), so the guest's
//! pool is ready as soon as its driver loads. When this host has
//! /dev/vhost-vsock, the VM also gets a vsock device with a context id no
//! other VM here holds, and hulld's API listens on vsock port 7700 besides
//! TCP; without it the API goes through the forwarded TCP port only.
//!
//! KVM where the kernel is seen to boot under it, TCG otherwise
//! ([`accel`]): /dev/kvm may exist on a host whose KVM guests hang.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::accel::{self, Accel, AccelChoice};
use super::hex;
use std::os::unix::fs::OpenOptionsExt;

/// The guest's API port (hull-init's config for hulld).
pub const GUEST_API_PORT: u16 = 7700;
/// The guest's HTTP ingress port (hull-init's config for hulld).
pub const GUEST_HTTP_PORT: u16 = 8080;
/// The data disk, and where the guest finds it: the first virtio disk.
pub const DATA_DISK: &str = "data.img";
pub const GUEST_DATA_DEVICE: &str = "/dev/vda";
/// The size of a data disk made by `run` (sparse: it takes what is written).
pub const DEFAULT_DISK_SIZE: u64 = 8 << 30;
/// The host's URL and admin token, for `hull --url --token` and scripts.
pub const API_ENV: &str = "api.env";
/// The address user-mode networking gives the guest, and its gateway.
pub const KERNEL_IP: &str = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off";
/// ... or the same from user-mode networking's DHCP server (`--dhcp`).
pub const KERNEL_IP_DHCP: &str = "ip=dhcp";
/// The host's side of vsock, which QEMU's vhost-vsock device needs.
pub const VHOST_VSOCK: &str = "/dev/vhost-vsock";
/// The guest's API on vsock (hull-init's config for hulld).
pub const GUEST_VSOCK_API_PORT: u32 = 7700;
/// Said when the host has no vhost-vsock.
pub const NO_VSOCK_NOTE: &str =
    "no vhost-vsock on this host: the API goes through the forwarded TCP port";
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
    #[error("cannot draw random bytes for the host's token: {0}")]
    Random(String),
    #[error("cannot make the data disk {path}")]
    DataDisk {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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
    /// The host port on 127.0.0.1 forwarded to the guest's HTTP ingress.
    pub http_port: Option<u16>,
    /// The size of the data disk when `run` makes it.
    pub disk_size: u64,
    pub machine: Machine,
    /// How long to wait for the API before giving up.
    pub ready_timeout: Duration,
    /// KVM, TCG, or KVM where the kernel is seen to boot under it.
    pub accel: AccelChoice,
    /// Kernel arguments after hull's own (`hull.cgroup=...`).
    pub append: Vec<String>,
    /// eth0's address from DHCP (`ip=dhcp`) instead of the static `ip=`.
    pub dhcp: bool,
}

/// The guest's vsock address for hulld's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    pub cid: u32,
    pub port: u32,
}

/// `DIR/vm.json`: what `hull vm run` started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub pid: i32,
    pub api_port: u16,
    #[serde(default)]
    pub http_port: Option<u16>,
    pub machine: Machine,
    pub accel: String,
    pub memory: String,
    pub cpus: u32,
    #[serde(default)]
    pub vsock: Option<Vsock>,
}

/// A VM that answered.
#[derive(Debug, Clone, Serialize)]
pub struct Started {
    pub pid: i32,
    pub url: String,
    /// The host's admin token (also in `env_file`).
    pub token: String,
    /// `DIR/api.env`: `HULL_URL=` and `HULL_TOKEN=` lines, mode 0600.
    pub env_file: PathBuf,
    /// The guest's HTTP ingress on this machine, when forwarded.
    pub http_url: Option<String>,
    /// The data disk, and whether this run made it.
    pub data_disk: PathBuf,
    pub data_disk_created: bool,
    pub machine: Machine,
    pub accel: String,
    /// Which accelerator, and why.
    pub accel_note: String,
    /// From QEMU's start to the API's first answer.
    pub ready_ms: u64,
    pub console: PathBuf,
    /// hulld's API on vsock, when the host has vhost-vsock ...
    pub vsock: Option<Vsock>,
    /// ... and why not, when it has not.
    pub vsock_note: Option<String>,
}

/// `hull vm status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub dir: PathBuf,
    pub running: bool,
    pub pid: Option<i32>,
    pub url: Option<String>,
    pub http_url: Option<String>,
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

/// The kernel command line: the serial console, eth0's address from
/// user-mode networking (static, or from its DHCP server), the data disk,
/// and the host token's id and hash.
pub fn kernel_cmdline(host_token: &HostToken, dhcp: bool) -> String {
    let ip = if dhcp { KERNEL_IP_DHCP } else { KERNEL_IP };
    format!(
        "console=ttyS0 {ip} hull.data={GUEST_DATA_DEVICE} hull.host_token={} quiet",
        host_token.guest_param()
    )
}

/// `VHOST_VSOCK_SET_GUEST_CID`: `_IOW(VHOST_VIRTIO, 0x60, __u64)`.
const VHOST_VSOCK_SET_GUEST_CID: libc::c_ulong = 0x4008_af60;

/// A guest context id no other VM on this host holds, from `VHOST_VSOCK`:
/// the kernel refuses one in use with EADDRINUSE. The probe's device is
/// closed before QEMU takes the id, so a VM started in between could take
/// it first; QEMU then fails and says so. Starts from this process's id,
/// so concurrent runs start apart.
pub fn free_vsock_cid() -> io::Result<u32> {
    let device = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(VHOST_VSOCK)?;
    let start = 3 + std::process::id() % 0x0100_0000;
    let mut last = io::Error::from(io::ErrorKind::AddrInUse);
    for cid in start..start + 64 {
        let mut value = u64::from(cid);
        // SAFETY: the request reads one u64 from the pointer, which points
        // at `value` for the whole call.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&device),
                VHOST_VSOCK_SET_GUEST_CID,
                &mut value as *mut u64,
            )
        };
        if rc == 0 {
            return Ok(cid);
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EADDRINUSE) {
            break;
        }
    }
    Err(last)
}

/// The vsock device this run gets, or why none.
fn vsock_plan() -> (Option<u32>, Option<String>) {
    if !Path::new(VHOST_VSOCK).exists() {
        return (None, Some(NO_VSOCK_NOTE.to_owned()));
    }
    match free_vsock_cid() {
        Ok(cid) => (Some(cid), None),
        Err(e) => (
            None,
            Some(format!(
                "cannot take a vsock context id from {VHOST_VSOCK} ({e}): the API goes through the forwarded TCP port"
            )),
        ),
    }
}

/// An admin token made on the host for one run: `hull_<id>_<secret>`,
/// the format hulld's tokens have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostToken {
    pub id: String,
    secret: String,
}

impl HostToken {
    pub fn generate() -> Result<HostToken> {
        let mut bytes = [0u8; 28];
        getrandom::fill(&mut bytes).map_err(|e| VmRunError::Random(e.to_string()))?;
        Ok(HostToken {
            id: hex(&bytes[..4]),
            secret: hex(&bytes[4..]),
        })
    }

    /// What the host presents.
    pub fn bearer(&self) -> String {
        format!("hull_{}_{}", self.id, self.secret)
    }

    /// What the guest is told: `<id>:<sha256 of the secret>`.
    pub fn guest_param(&self) -> String {
        format!(
            "{}:{}",
            self.id,
            hex(&Sha256::digest(self.secret.as_bytes()))
        )
    }
}

/// Makes `DIR/data.img` sparse and empty unless it exists; whether it did.
pub fn ensure_data_disk(dir: &Path, size: u64) -> Result<bool> {
    let path = dir.join(DATA_DISK);
    let error = |source| VmRunError::DataDisk {
        path: path.clone(),
        source,
    };
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(file) => {
            file.set_len(size).map_err(error)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(error(e)),
    }
}

/// Writes `DIR/api.env`, readable by its owner only.
fn write_api_env(dir: &Path, url: &str, token: &HostToken) -> Result<PathBuf> {
    let path = dir.join(API_ENV);
    let error = |source| VmRunError::Write {
        path: path.clone(),
        source,
    };
    let _ = fs::remove_file(&path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(error)?;
    file.write_all(format!("HULL_URL={url}\nHULL_TOKEN={}\n", token.bearer()).as_bytes())
        .map_err(error)?;
    Ok(path)
}

/// QEMU's arguments for `options` (without the program).
/// `vsock_cid`: give the guest a vsock device with that context id.
pub fn qemu_args(
    options: &RunOptions,
    accel: Accel,
    host_token: &HostToken,
    vsock_cid: Option<u32>,
) -> Vec<String> {
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
    let (nic, disk, rng, vsock) = match options.machine {
        Machine::Microvm => (
            "virtio-net-device,netdev=n0",
            "virtio-blk-device,drive=data",
            "virtio-rng-device",
            "vhost-vsock-device",
        ),
        Machine::Pc => (
            "virtio-net-pci,netdev=n0",
            "virtio-blk-pci,drive=data",
            "virtio-rng-pci",
            "vhost-vsock-pci",
        ),
    };
    let mut hostfwd = format!(
        "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{GUEST_API_PORT}",
        options.api_port
    );
    if let Some(http_port) = options.http_port {
        hostfwd.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{http_port}-:{GUEST_HTTP_PORT}"
        ));
    }
    // Writeback caching with the guest's flushes honoured: btrfs's commits
    // reach the host's disk, so a killed QEMU leaves a consistent volume.
    let drive = format!(
        "file={},format=raw,if=none,id=data,cache=writeback",
        path(DATA_DISK)
    );
    let memory = options.memory.clone();
    let cpus = options.cpus.to_string();
    let mut cmdline = kernel_cmdline(host_token, options.dhcp);
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
        accel.name(),
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
        "-drive",
        &drive,
        "-device",
        disk,
        // The host's /dev/urandom behind it.
        "-device",
        rng,
    ]);
    if let Some(cid) = vsock_cid {
        args.extend(["-device".to_owned(), format!("{vsock},guest-cid={cid}")]);
    }
    args
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
    for name in [CONSOLE_LOG, QMP_SOCKET, PID_FILE, STATE, API_ENV] {
        let _ = fs::remove_file(dir.join(name));
    }
    let data_disk_created = ensure_data_disk(dir, options.disk_size)?;
    if data_disk_created {
        progress(&format!(
            "made an empty {} GiB data disk {} (formatted btrfs at first boot)",
            options.disk_size >> 30,
            dir.join(DATA_DISK).display()
        ));
    }
    let host_token = HostToken::generate()?;
    let qemu_log_path = dir.join(QEMU_LOG);
    let qemu_log = fs::File::create(&qemu_log_path).map_err(|source| VmRunError::Write {
        path: qemu_log_path.clone(),
        source,
    })?;
    let qemu_log_err = qemu_log.try_clone().map_err(|source| VmRunError::Write {
        path: qemu_log_path.clone(),
        source,
    })?;
    let picked = accel::pick(QEMU, options.accel, &dir.join("vmlinuz"), dir);
    progress(&picked.note);
    let (vsock_cid, vsock_note) = vsock_plan();
    if let Some(note) = &vsock_note {
        progress(note);
    }
    let vsock = vsock_cid.map(|cid| Vsock {
        cid,
        port: GUEST_VSOCK_API_PORT,
    });
    let started = Instant::now();
    let mut child = Command::new(QEMU)
        .args(qemu_args(options, picked.accel, &host_token, vsock_cid))
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
        http_port: options.http_port,
        machine: options.machine,
        accel: picked.accel.name().into(),
        memory: options.memory.clone(),
        cpus: options.cpus,
        vsock,
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
    let env_file = write_api_env(dir, &url, &host_token)?;
    Ok(Started {
        pid,
        url,
        token: host_token.bearer(),
        env_file,
        http_url: options.http_port.map(api_url),
        data_disk: dir.join(DATA_DISK),
        data_disk_created,
        machine: options.machine,
        accel: picked.accel.name().into(),
        accel_note: picked.note,
        ready_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        console: dir.join(CONSOLE_LOG),
        vsock,
        vsock_note,
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
        http_url: state
            .as_ref()
            .and_then(|s| s.http_port)
            .filter(|_| running)
            .map(api_url),
        api_answers: running && port.is_some_and(api_answers),
        machine: state.as_ref().map(|s| s.machine),
        accel: state.map(|s| s.accel),
        console: dir.join(CONSOLE_LOG),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn options(machine: Machine) -> RunOptions {
        RunOptions {
            dir: PathBuf::from("/vm"),
            memory: "1G".into(),
            cpus: 2,
            api_port: 17700,
            http_port: Some(18080),
            disk_size: 1 << 30,
            machine,
            ready_timeout: Duration::from_secs(1),
            accel: AccelChoice::Auto,
            append: Vec::new(),
            dhcp: false,
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> &'a str {
        let at = args.iter().position(|a| a == flag).expect(flag);
        &args[at + 1]
    }

    #[test]
    fn qemu_gets_tcg_the_console_file_and_the_forwarded_api() {
        let token = HostToken::generate().unwrap();
        let args = qemu_args(&options(Machine::Microvm), Accel::Tcg, &token, None);
        assert_eq!(after(&args, "-accel"), "tcg");
        assert_eq!(after(&args, "-M"), "microvm");
        assert_eq!(after(&args, "-serial"), "file:/vm/console.log");
        assert_eq!(after(&args, "-pidfile"), "/vm/qemu.pid");
        assert_eq!(
            after(&args, "-netdev"),
            "user,id=n0,hostfwd=tcp:127.0.0.1:17700-:7700,hostfwd=tcp:127.0.0.1:18080-:8080"
        );
        assert!(after(&args, "-append").contains(KERNEL_IP));
        assert!(after(&args, "-drive").starts_with("file=/vm/data.img,format=raw"));
        assert!(args.iter().any(|a| a == "virtio-blk-device,drive=data"));
        assert!(args.iter().any(|a| a == "-no-reboot"));
        assert!(args.iter().any(|a| a == "virtio-net-device,netdev=n0"));
        let pc = qemu_args(&options(Machine::Pc), Accel::Tcg, &token, None);
        assert!(pc.iter().any(|a| a == "virtio-net-pci,netdev=n0"));
        assert!(pc.iter().any(|a| a == "virtio-rng-pci"));
        assert!(args.iter().any(|a| a == "virtio-rng-device"));
        assert!(
            !pc.iter().any(|a| a.contains("vsock")),
            "no vsock device without a context id: {pc:?}"
        );
    }

    #[test]
    fn a_vsock_device_with_its_context_id_and_dhcp_on_request() {
        let token = HostToken::generate().unwrap();
        let pc = qemu_args(&options(Machine::Pc), Accel::Tcg, &token, Some(4242));
        assert!(
            pc.iter().any(|a| a == "vhost-vsock-pci,guest-cid=4242"),
            "{pc:?}"
        );
        let dhcp = qemu_args(
            &RunOptions {
                dhcp: true,
                ..options(Machine::Pc)
            },
            Accel::Tcg,
            &token,
            None,
        );
        let cmdline = after(&dhcp, "-append");
        assert!(cmdline.contains(" ip=dhcp "), "{cmdline}");
        assert!(!cmdline.contains(KERNEL_IP), "{cmdline}");
    }

    #[test]
    fn the_guest_gets_the_tokens_hash_never_its_secret() {
        let token = HostToken::generate().unwrap();
        let bearer = token.bearer();
        let (id, secret) = bearer
            .strip_prefix("hull_")
            .and_then(|rest| rest.split_once('_'))
            .unwrap();
        assert_eq!(id, token.id);
        assert_eq!(secret.len(), 48);
        let cmdline = kernel_cmdline(&token, false);
        assert!(!cmdline.contains(secret), "{cmdline}");
        let expected = hex(&Sha256::digest(secret.as_bytes()));
        assert!(
            cmdline.contains(&format!("hull.host_token={id}:{expected}")),
            "{cmdline}"
        );
        assert_ne!(HostToken::generate().unwrap(), token);
    }

    #[test]
    fn api_env_is_its_owners_alone_and_the_data_disk_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let token = HostToken::generate().unwrap();
        let path = write_api_env(dir.path(), "http://127.0.0.1:1", &token).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!(
                "HULL_URL=http://127.0.0.1:1\nHULL_TOKEN={}\n",
                token.bearer()
            )
        );
        assert!(ensure_data_disk(dir.path(), 1 << 30).unwrap());
        fs::write(dir.path().join(DATA_DISK), b"kept").unwrap();
        assert!(!ensure_data_disk(dir.path(), 1 << 30).unwrap());
        assert_eq!(fs::read(dir.path().join(DATA_DISK)).unwrap(), b"kept");
    }

    #[test]
    fn appended_kernel_arguments_come_after_hulls_own() {
        let token = HostToken::generate().unwrap();
        let args = qemu_args(
            &RunOptions {
                append: vec![
                    "hull.cgroup=/system.slice/hull.service".into(),
                    "a b".into(),
                ],
                ..options(Machine::Pc)
            },
            Accel::Tcg,
            &token,
            None,
        );
        assert_eq!(
            after(&args, "-append"),
            format!(
                "{} hull.cgroup=/system.slice/hull.service a b",
                kernel_cmdline(&token, false)
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
