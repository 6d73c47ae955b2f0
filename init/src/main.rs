//! `hull-init`: PID 1 of a hull VM.
//!
//! The kernel runs it from the initramfs, which it first moves into a
//! tmpfs root (pivot_root refuses the initramfs, and the inner pivots its
//! root), executing itself again there. It mounts the API filesystems and
//! cgroup2 alone (with `nsdelegate`, every controller enabled for the
//! tree), turns transparent hugepages off (unless the command line names
//! a mode: khugepaged's reserve would be 44 MiB of a 1 GiB VM), loads the
//! kernel modules the image carries, mounts the data disk, seeds the
//! random pool from the seed the last boot left there (`seed`), copies the
//! base image to the disk, removes from the tmpfs root what the boot has
//! used (the modules' files; the image's copy, with a data disk), brings
//! up `lo` and `eth0` (a static `ip=`, or DHCP: `dhcp`), writes hulld's
//! config (with a vsock port when the VM has a vsock
//! device) and starts hulld (in the root cgroup, or with `hull.cgroup=` in
//! a delegated group: `delegate`), restarting it with a backoff when it
//! dies. It reaps every orphan: hulld never reaps blindly, its tokio child
//! handling and pidfds own their exit statuses. It never exits: a fatal
//! error is written to the console and the VM reboots. SIGTERM, SIGPWR or
//! ctrl-alt-del (SIGINT) stop hulld (SIGKILL after 10 s), write the next
//! random seed, sync, unmount and power off.
//!
//! Every step is one console line with its duration and the time since the
//! kernel started, so a boot's timeline can be read off the serial log.
//! Synchronous and small on purpose: no runtime between the kernel and hulld.

mod cmdline;
mod data_disk;
mod delegate;
mod dhcp;
mod modules;
mod net;
mod seed;
mod switch_root;

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Where the image puts hulld; `hull` (the client hulld hands the inner)
/// sits beside it.
const HULLD: &str = "/usr/bin/hulld";
const HULLD_CONFIG: &str = "/etc/hull/hull.toml";
/// Where a DHCP lease's name servers go.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// hulld's API on vsock, when the VM has a vsock device: the TCP port's
/// number, in vsock's own port space.
const VSOCK_API_PORT: u32 = 7700;
/// The kernel starts init with no PATH: the one its children get.
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// The VM's hostname, which is also the sandbox's name in hulld's API.
const HOSTNAME: &str = "hull";
/// hulld's state: the data disk, or a tmpfs without one.
const STATE_DIR: &str = "/var/lib/hull";
/// The base images the image builder put in ...
const IMAGE_DIR: &str = "/usr/share/hull/images";
/// ... and their copy on the data disk, where the inner's user namespace
/// can take an idmapped mount of them (6.1's tmpfs cannot).
const DISK_IMAGE_DIR: &str = "/var/lib/hull/images";
/// The base image hulld runs.
const IMAGE: &str = "busybox";
/// How long hulld has to stop on shutdown before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// hulld's restart backoff: doubling from the first to the last, and back
/// to the first once it has run for `BACKOFF_RESET`.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const BACKOFF_RESET: Duration = Duration::from_secs(60);

/// One filesystem PID 1 mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MountSpec {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The boot's mounts, in order: /sys before the cgroup2 mount point in it.
const MOUNTS: &[MountSpec] = &[
    MountSpec {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755",
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
    // Alone, with nsdelegate: a cgroup namespace's root is a delegation
    // boundary the inner cannot write limits across.
    MountSpec {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: "nsdelegate",
    },
];

/// The state directory when there is no data disk: lost at power-off.
const STATE_TMPFS: MountSpec = MountSpec {
    fstype: "tmpfs",
    target: STATE_DIR,
    flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
    data: "mode=0700,size=60%",
};

/// The boot's steps, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Mount(MountSpec),
    EnableControllers,
    DelegateCgroup,
    TransparentHugepages,
    LoadModules,
    DataDisk,
    RandomSeed,
    BaseImage,
    Loopback,
    Ethernet,
    Hostname,
    WriteConfig,
}

fn boot_steps() -> Vec<Step> {
    let mut steps: Vec<Step> = MOUNTS.iter().copied().map(Step::Mount).collect();
    steps.extend([
        Step::EnableControllers,
        Step::DelegateCgroup,
        // Before hulld and the inner map anything.
        Step::TransparentHugepages,
        // Before the network: virtio_net makes eth0; virtio_blk and
        // btrfs the data disk.
        Step::LoadModules,
        Step::DataDisk,
        // As early as the seed's disk allows: before anything draws keys.
        Step::RandomSeed,
        Step::BaseImage,
        Step::Loopback,
        Step::Ethernet,
        // hulld names its sandbox after the machine.
        Step::Hostname,
        Step::WriteConfig,
    ]);
    steps
}

#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error("cannot create the mount point {path}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {fstype} at {path}")]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot order the modules of {path}")]
    ModulesDep {
        path: PathBuf,
        #[source]
        source: modules::DepError,
    },
    #[error("cannot load the module {path}")]
    Module {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a socket to configure interfaces")]
    ControlSocket(#[source] io::Error),
    #[error("cannot bring {interface} up")]
    LinkUp {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot give {interface} the address {address}/{netmask}")]
    Address {
        interface: String,
        address: std::net::Ipv4Addr,
        netmask: std::net::Ipv4Addr,
        #[source]
        source: io::Error,
    },
    #[error("cannot add the default route through {gateway}")]
    Route {
        gateway: std::net::Ipv4Addr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    DataDisk(#[from] data_disk::DataDiskError),
    #[error("cannot copy the base image {from} to {to}")]
    CopyImage {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the hostname to {HOSTNAME}")]
    Hostname(#[source] nix::Error),
    #[error("cannot turn transparent hugepages off in {path}")]
    TransparentHugepages {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write hulld's config {path}")]
    Config {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot take signals through a signalfd")]
    Signals(#[source] nix::Error),
    #[error(transparent)]
    Delegate(#[from] delegate::DelegateError),
    #[error("cannot write {path}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Seconds since the kernel started, as the console shows them.
fn uptime() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| Duration::from(t).as_secs_f64())
        .unwrap_or(0.0)
}

fn log(message: fmt::Arguments) {
    // One write per line, so lines from hulld on the same console do not
    // interleave with it.
    let line = format!("hull-init: [{:9.3}] {message}\n", uptime());
    let _ = io::stderr().write_all(line.as_bytes());
}

macro_rules! log {
    ($($arg:tt)*) => { log(format_args!($($arg)*)) };
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn millis(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn main() {
    let switched = std::env::var_os(switch_root::SWITCHED_ENV).is_some();
    if switched {
        // hulld and what it starts need not see it.
        std::env::remove_var(switch_root::SWITCHED_ENV);
        log!("running on the tmpfs root");
    } else {
        log!("started as pid {}", std::process::id());
    }
    if std::process::id() != 1 {
        log!("not PID 1: a test run, nothing is mounted or started");
        std::process::exit(2);
    }
    if !switched && switch_root::needed() {
        let started = Instant::now();
        let result = switch_root::switch(&mut |bytes| {
            log!(
                "moved the initramfs ({:.1} MiB) to a tmpfs root ({:.1} ms)",
                bytes as f64 / f64::from(1u32 << 20),
                millis(started)
            );
        });
        let Err(e) = result;
        fatal(&e);
    }
    // Ctrl-alt-del becomes SIGINT to us, for a clean power-off, instead of
    // an immediate reboot.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        log!("cannot turn ctrl-alt-del into a signal: {e}");
    }
    let mut signals = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
    ] {
        signals.add(signal);
    }
    let signal_fd = match signals.thread_block().and_then(|()| {
        SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
    }) {
        Ok(fd) => fd,
        Err(e) => fatal(&InitError::Signals(e)),
    };
    let mut boot = Boot::default();
    for step in boot_steps() {
        if let Err(e) = run_step(step, &mut boot) {
            fatal(&e);
        }
    }
    log_clocks();
    supervise(&signal_fd, &boot);
}

/// The realtime clock beside the boot clock, read together: hulld's log
/// lines carry the one and hull-init's the other, and `hull-bench vm`
/// lines the boot's timeline up with it.
fn log_clocks() {
    use nix::time::{clock_gettime, ClockId};
    let secs = |clock| clock_gettime(clock).map_or(0.0, |t| Duration::from(t).as_secs_f64());
    let (boot, real) = (secs(ClockId::CLOCK_BOOTTIME), secs(ClockId::CLOCK_REALTIME));
    log!("clocks: boottime {boot:.6} realtime {real:.6}");
}

/// What the boot found that later steps and the shutdown need.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Boot {
    /// The state directory is on the data disk (else on a tmpfs).
    on_disk: bool,
    /// `hull.host_token=` from the command line: the host's admin token's
    /// id and hash, for hulld.
    host_token: Option<String>,
    /// The VM's vsock context id, when it has a vsock device.
    vsock_cid: Option<u32>,
    /// `hull.failpoint=`: HULL_FAILPOINT for hulld's first start.
    failpoint: Option<String>,
}

impl Boot {
    /// What hulld gets from the kernel command line.
    fn take_params(&mut self, cmdline: &str) {
        self.host_token = cmdline::param(cmdline, "hull.host_token").map(str::to_owned);
        self.failpoint = cmdline::param(cmdline, "hull.failpoint").map(str::to_owned);
    }
}

fn read_cmdline() -> Result<String, InitError> {
    let path = Path::new("/proc/cmdline");
    fs::read_to_string(path).map_err(|source| InitError::Read {
        path: path.into(),
        source,
    })
}

fn run_step(step: Step, boot: &mut Boot) -> Result<(), InitError> {
    let started = Instant::now();
    match step {
        Step::Mount(spec) => {
            mount_one(&spec)?;
            if spec.target == "/dev" {
                reopen_console();
            }
            log!(
                "mounted {} at {} ({:.1} ms)",
                spec.fstype,
                spec.target,
                millis(started)
            );
        }
        Step::EnableControllers => {
            let enabled = delegate::enable_all(Path::new("/sys/fs/cgroup"))?;
            log!(
                "enabled cgroup controllers {enabled} ({:.1} ms)",
                millis(started)
            );
        }
        Step::DelegateCgroup => {
            let cmdline_path = Path::new("/proc/cmdline");
            let cmdline = fs::read_to_string(cmdline_path).map_err(|source| InitError::Read {
                path: cmdline_path.into(),
                source,
            })?;
            if let Some((group, controllers)) = delegate::set_up(&cmdline)? {
                log!(
                    "created cgroup {} for hulld, with controllers {controllers} ({:.1} ms)",
                    group.display(),
                    millis(started)
                );
            }
        }
        Step::TransparentHugepages => {
            let cmdline = read_cmdline()?;
            match thp_mode(&cmdline) {
                ThpMode::AsAsked(mode) => log!(
                    "transparent hugepages: {mode}, as the command line says; vm.min_free_kbytes {}",
                    min_free_kbytes()
                ),
                ThpMode::Never => {
                    let path = Path::new(THP_ENABLED);
                    match fs::write(path, "never") {
                        Ok(()) => log!(
                            "transparent hugepages: never; vm.min_free_kbytes {} ({:.1} ms)",
                            min_free_kbytes(),
                            millis(started)
                        ),
                        // A kernel built without them.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(source) => {
                            return Err(InitError::TransparentHugepages {
                                path: path.into(),
                                source,
                            })
                        }
                    }
                }
            }
        }
        Step::LoadModules => {
            let (loaded, dir) = load_modules()?;
            log!("loaded {loaded} kernel modules ({:.1} ms)", millis(started));
            // Every module the image carries is loaded, and nothing loads
            // one later (there is no modprobe): their files would only
            // hold the tmpfs root's memory.
            if let Some(dir) = dir {
                drop_from_root(&dir, "the kernel modules' files");
            }
        }
        Step::Loopback => {
            let sock = net::control_socket().map_err(InitError::ControlSocket)?;
            net::link_up(&sock, "lo").map_err(|source| InitError::LinkUp {
                interface: "lo".into(),
                source,
            })?;
            log!("brought lo up ({:.1} ms)", millis(started));
        }
        Step::DataDisk => {
            boot.on_disk = mount_data_disk(started)?;
            if !boot.on_disk {
                mount_one(&STATE_TMPFS)?;
                log!(
                    "mounted tmpfs at {STATE_DIR}: hulld's state is lost at power-off ({:.1} ms)",
                    millis(started)
                );
            }
        }
        Step::RandomSeed => seed_random_pool(boot, started),
        Step::BaseImage => {
            // hulld takes the image from the data disk's copy, and only
            // hull-init copies it, at boot, from the initramfs a later
            // boot brings again: the root's copy is dead weight after
            // this. Without a data disk it is the one hulld runs.
            if boot.on_disk {
                copy_base_image(started)?;
                drop_from_root(&Path::new(IMAGE_DIR).join(IMAGE), "the base image's copy");
            }
        }
        Step::Ethernet => configure_ethernet(started)?,
        Step::Hostname => {
            nix::unistd::sethostname(HOSTNAME).map_err(InitError::Hostname)?;
            log!("set the hostname to {HOSTNAME} ({:.1} ms)", millis(started));
        }
        Step::WriteConfig => {
            boot.take_params(&read_cmdline()?);
            if boot.host_token.is_none() {
                log!("no hull.host_token= on the command line: the API has no token until one is made with `hull token create`");
            }
            boot.vsock_cid = net::vsock_local_cid();
            match boot.vsock_cid {
                Some(cid) => log!("vsock: this VM is context {cid}; hulld's API also listens on vsock port {VSOCK_API_PORT}"),
                None => log!("no vsock device: hulld's API is on TCP only"),
            }
            write_config(Path::new(HULLD_CONFIG), boot)?;
            log!("wrote {HULLD_CONFIG} ({:.1} ms)", millis(started));
        }
    }
    Ok(())
}

fn mount_one(spec: &MountSpec) -> Result<(), InitError> {
    fs::create_dir_all(spec.target).map_err(|source| InitError::MountPoint {
        path: spec.target.into(),
        source,
    })?;
    let data = (!spec.data.is_empty()).then_some(spec.data);
    mount(
        Some(spec.fstype),
        spec.target,
        Some(spec.fstype),
        spec.flags,
        data,
    )
    .map_err(|source| InitError::Mount {
        fstype: spec.fstype,
        path: spec.target.into(),
        source,
    })
}

/// Points fds 0 to 2 at /dev/console: the kernel opened it for us only if
/// the initramfs had the node, and hulld inherits them.
fn reopen_console() {
    let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
    else {
        return;
    };
    for target in 0..=2 {
        // SAFETY: dup2(2) on an fd we own onto the standard fds, which
        // nothing in this single-threaded process holds a Rust owner of.
        unsafe {
            libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&console), target);
        }
    }
}

/// Loads every module the image carries; returns how many and their
/// directory (none when the image has no modules).
fn load_modules() -> Result<(usize, Option<PathBuf>), InitError> {
    let release_path = Path::new("/proc/sys/kernel/osrelease");
    let release = fs::read_to_string(release_path).map_err(|source| InitError::Read {
        path: release_path.into(),
        source,
    })?;
    let dir = Path::new("/lib/modules").join(release.trim());
    let dep_path = dir.join("modules.dep");
    let dep = match fs::read_to_string(&dep_path) {
        Ok(text) => text,
        // An image whose kernel has everything built in ships none.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, None)),
        Err(source) => {
            return Err(InitError::Read {
                path: dep_path,
                source,
            })
        }
    };
    let order = modules::load_order(&dep).map_err(|source| InitError::ModulesDep {
        path: dep_path,
        source,
    })?;
    let mut loaded = 0;
    for module in order {
        let path = dir.join(&module);
        let started = Instant::now();
        let file = fs::File::open(&path).map_err(|source| InitError::Module {
            path: path.clone(),
            source,
        })?;
        match nix::kmod::finit_module(file.as_fd(), c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) => {
                loaded += 1;
                log!("loaded {module} ({:.1} ms)", millis(started));
            }
            // Built in, or loaded already.
            Err(nix::Error::EEXIST) => {}
            Err(source) => {
                return Err(InitError::Module {
                    path,
                    source: source.into(),
                })
            }
        }
    }
    Ok((loaded, Some(dir)))
}

/// Where the kernel takes the transparent hugepage mode.
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// What hull-init does about transparent hugepages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThpMode<'a> {
    /// `transparent_hugepage=` is on the command line: the kernel took it.
    AsAsked(&'a str),
    /// Turn them off. With them on (Debian's kernel: `always`), khugepaged
    /// raises vm.min_free_kbytes to its recommendation, 44 MiB of a 1 GiB
    /// VM, which the kernel keeps free and MemAvailable leaves out: more
    /// than hull itself uses. Turning them off restores the kernel's
    /// default (3.8 MiB at 1 GiB); a sandbox's processes are small, and a
    /// workload that wants huge pages asks with `transparent_hugepage=`.
    Never,
}

fn thp_mode(cmdline: &str) -> ThpMode<'_> {
    match cmdline::param(cmdline, "transparent_hugepage") {
        Some(mode) => ThpMode::AsAsked(mode),
        None => ThpMode::Never,
    }
}

fn min_free_kbytes() -> String {
    fs::read_to_string("/proc/sys/vm/min_free_kbytes")
        .map_or_else(|_| "unknown".to_owned(), |v| format!("{} kB", v.trim()))
}

/// Removes `path`, which the boot no longer needs, from the tmpfs root,
/// whose files are the VM's memory, and says how much the root holds
/// after. Not fatal: the boot goes on with the memory still held.
fn drop_from_root(path: &Path, what: &str) {
    let started = Instant::now();
    let held = || {
        nix::sys::statfs::statfs("/").map_or(f64::NAN, |s| {
            #[allow(clippy::cast_precision_loss, reason = "MiB for a log line")]
            let bytes = (s.blocks() - s.blocks_free()) as f64 * s.block_size() as f64;
            bytes / f64::from(1u32 << 20)
        })
    };
    let before = held();
    match fs::remove_dir_all(path) {
        Ok(()) => log!(
            "removed {what} from the root ({}): it holds {:.1} MiB, {:.1} MiB less ({:.1} ms)",
            path.display(),
            held(),
            before - held(),
            millis(started)
        ),
        Err(e) => log!(
            "cannot remove {what} ({}) from the root: {e}",
            path.display()
        ),
    }
}

/// Mounts the data disk at the state directory, formatting it first when
/// it is empty; false when there is no data disk to use.
fn mount_data_disk(started: Instant) -> Result<bool, InitError> {
    use data_disk::{Content, DataDiskError};
    let cmdline = read_cmdline()?;
    let device =
        PathBuf::from(cmdline::param(&cmdline, "hull.data").unwrap_or(data_disk::DEFAULT_DEVICE));
    let state_dir = Path::new(STATE_DIR);
    fs::create_dir_all(state_dir).map_err(|source| InitError::MountPoint {
        path: state_dir.into(),
        source,
    })?;
    let unusable = |e: DataDiskError| {
        log!("no data disk: {}", error_chain(&e));
        Ok(false)
    };
    if let Err(e) = data_disk::wait_for(&device) {
        return unusable(e);
    }
    let formatted = match data_disk::probe(&device)? {
        Content::Btrfs => false,
        Content::Blank => {
            let mkfs = Instant::now();
            data_disk::format(&device, PATH)?;
            log!(
                "formatted the empty data disk {} btrfs ({:.1} ms)",
                device.display(),
                millis(mkfs)
            );
            true
        }
        Content::Other => return unusable(DataDiskError::Foreign { path: device }),
    };
    data_disk::mount(&device, state_dir)?;
    let how = if formatted {
        "first boot"
    } else if data_disk::take_clean_marker(state_dir) {
        "the last run shut down cleanly"
    } else {
        "the last run did not shut down cleanly: btrfs replayed its log, hulld recovers"
    };
    log!(
        "mounted the data disk {} at {STATE_DIR} ({how}) ({:.1} ms)",
        device.display(),
        millis(started)
    );
    Ok(true)
}

/// Puts the base image on the data disk unless the copy there is of the
/// same image (its SHA-256 stamp); a copy is made beside and renamed in,
/// so a crash never leaves half an image in use.
fn copy_base_image(started: Instant) -> Result<(), InitError> {
    let from = Path::new(IMAGE_DIR).join(IMAGE);
    let stamp = Path::new(IMAGE_DIR).join(format!("{IMAGE}.sha256"));
    let to_dir = Path::new(DISK_IMAGE_DIR);
    let to = to_dir.join(IMAGE);
    let to_stamp = to_dir.join(format!("{IMAGE}.sha256"));
    let wanted = fs::read_to_string(&stamp).map_err(|source| InitError::Read {
        path: stamp.clone(),
        source,
    })?;
    if fs::read_to_string(&to_stamp).is_ok_and(|have| have == wanted) && to.is_dir() {
        log!(
            "the data disk has the base image {} ({:.1} ms)",
            wanted.trim().get(..12).unwrap_or_default(),
            millis(started)
        );
        return Ok(());
    }
    let copy_error = |source| InitError::CopyImage {
        from: from.clone(),
        to: to.clone(),
        source,
    };
    let staging = to_dir.join(format!(".{IMAGE}.new"));
    fs::create_dir_all(to_dir).map_err(copy_error)?;
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(copy_error)?;
    }
    let skipped = data_disk::copy_tree(&from, &staging).map_err(copy_error)?;
    if to.exists() {
        fs::remove_dir_all(&to).map_err(copy_error)?;
    }
    fs::rename(&staging, &to).map_err(copy_error)?;
    fs::write(&to_stamp, &wanted).map_err(copy_error)?;
    nix::unistd::sync();
    log!(
        "copied the base image {} to the data disk{} ({:.1} ms)",
        wanted.trim().get(..12).unwrap_or_default(),
        if skipped > 0 {
            format!(", {skipped} special files skipped")
        } else {
            String::new()
        },
        millis(started)
    );
    Ok(())
}

fn configure_ethernet(started: Instant) -> Result<(), InitError> {
    use cmdline::IpConfig;
    let cmdline = read_cmdline()?;
    let config = match cmdline::parse_ip(&cmdline) {
        Ok(Some(IpConfig::Off)) => {
            log!("ip=off: eth0 stays down");
            return Ok(());
        }
        Ok(Some(config)) => config,
        // No ip=: what QEMU, Firecracker and Cloud Hypervisor users who
        // give none expect is a network when there is a NIC; the DHCP
        // client gives up within seconds where no server answers.
        Ok(None)
            if Path::new("/sys/class/net")
                .join(cmdline::DEFAULT_DEVICE)
                .exists() =>
        {
            log!(
                "no ip= on the kernel command line: asking DHCP for {}",
                cmdline::DEFAULT_DEVICE
            );
            IpConfig::Dhcp {
                device: cmdline::DEFAULT_DEVICE.to_owned(),
            }
        }
        Ok(None) => {
            log!("no ip= on the kernel command line and no eth0: no network");
            return Ok(());
        }
        // Not fatal: hulld still serves its local socket.
        Err(e) => {
            log!("{e}: eth0 stays down");
            return Ok(());
        }
    };
    let device = match &config {
        IpConfig::Static(ip) => &ip.device,
        IpConfig::Dhcp { device } => device,
        IpConfig::Off => return Ok(()),
    };
    if !Path::new("/sys/class/net").join(device).exists() {
        log!("no interface {device}: ip= ignored");
        return Ok(());
    }
    let sock = net::control_socket().map_err(InitError::ControlSocket)?;
    let ip = match config {
        IpConfig::Static(ip) => ip,
        IpConfig::Dhcp { device } => {
            net::link_up(&sock, &device).map_err(|source| InitError::LinkUp {
                interface: device.clone(),
                source,
            })?;
            let lease = match dhcp::acquire(&device, &mut |line| log!("{line}")) {
                Ok(lease) => lease,
                // Not fatal: hulld still serves its local socket (and
                // vsock), and a boot never waits for a network.
                Err(e) => {
                    log!(
                        "{}: {device} stays up without an address ({:.1} ms)",
                        error_chain(&e),
                        millis(started)
                    );
                    return Ok(());
                }
            };
            log!(
                "DHCP lease on {device}: {}/{} via {} from {}, DNS {}, {} ({:.1} ms)",
                lease.address,
                lease.netmask,
                lease
                    .gateway
                    .map_or_else(|| "no gateway".to_owned(), |g| g.to_string()),
                lease.server,
                if lease.dns.is_empty() {
                    "none".to_owned()
                } else {
                    lease
                        .dns
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                },
                lease.lease_secs.map_or_else(
                    || "no lease time: kept for good".to_owned(),
                    |s| format!("lease {s} s, not renewed: the address is kept past its end")
                ),
                millis(started)
            );
            if let Some(text) = dhcp::resolv_conf(&lease.dns) {
                // hulld's own lookups (remotes) and the inner's resolv.conf
                // in the "nat" mode take the machine's name servers.
                let path = Path::new(RESOLV_CONF);
                fs::write(path, text).map_err(|source| InitError::ResolvConf {
                    path: path.into(),
                    source,
                })?;
                log!("wrote {RESOLV_CONF}");
            }
            cmdline::StaticIp {
                device,
                address: lease.address,
                netmask: lease.netmask,
                gateway: lease.gateway,
            }
        }
        IpConfig::Off => return Ok(()),
    };
    net::set_address(&sock, &ip.device, ip.address, ip.netmask).map_err(|source| {
        InitError::Address {
            interface: ip.device.clone(),
            address: ip.address,
            netmask: ip.netmask,
            source,
        }
    })?;
    net::link_up(&sock, &ip.device).map_err(|source| InitError::LinkUp {
        interface: ip.device.clone(),
        source,
    })?;
    if let Some(gateway) = ip.gateway {
        net::add_default_route(&sock, gateway)
            .map_err(|source| InitError::Route { gateway, source })?;
    }
    log!(
        "brought {} up as {}/{} via {} ({:.1} ms)",
        ip.device,
        ip.address,
        ip.netmask,
        ip.gateway
            .map_or_else(|| "no gateway".to_owned(), |g| g.to_string()),
        millis(started)
    );
    Ok(())
}

/// Mixes the seed the last boot left on the data disk into the kernel's
/// pool (credited only when fresh: `seed`) and leaves a new one. Never
/// fatal: the kernel seeds itself, only later.
fn seed_random_pool(boot: &Boot, started: Instant) {
    let ready_before = seed::pool_ready();
    let pool = if ready_before {
        "the pool was ready already"
    } else {
        "the pool was not ready yet"
    };
    if !boot.on_disk {
        log!(
            "no data disk: no random seed carried between boots; {pool} ({:.1} ms)",
            millis(started)
        );
        return;
    }
    let dir = Path::new(STATE_DIR);
    let path = dir.join(seed::FILE);
    match seed::take(dir) {
        Ok(None) => log!("no random seed in {} (first boot); {pool}", path.display()),
        Ok(Some(found)) => {
            let credit = found.credit_bits();
            let origin = match (found.written, found.removed) {
                (Some(written), true) => written.describe(),
                (Some(_), false) => {
                    "not credited: it could not be removed, so a later boot could read it again"
                }
                (None, _) => "not credited: not written by hull-init",
            };
            match seed::mix(&found.bytes, credit) {
                Ok(()) => log!(
                    "seeded the random pool with {} bytes from {} ({origin}), {credit} bits credited; {}",
                    found.bytes.len(),
                    path.display(),
                    match (ready_before, seed::pool_ready()) {
                        (true, _) => "the pool was ready already",
                        (false, true) => "the pool was not ready and is now",
                        (false, false) => "the pool is not ready yet",
                    }
                ),
                Err(e) => log!("{}", error_chain(&e)),
            }
        }
        Err(e) => log!("{}", error_chain(&e)),
    }
    // Never waits: PID 1 does not block on the pool.
    let draw = Instant::now();
    match seed::save(dir, seed::Written::Boot) {
        Ok(true) => log!(
            "wrote a new random seed to {} (getrandom and the write {:.1} ms; {:.1} ms in all)",
            path.display(),
            millis(draw),
            millis(started)
        ),
        Ok(false) => log!(
            "the random pool is not ready yet: no new seed until the shutdown ({:.1} ms)",
            millis(started)
        ),
        Err(e) => log!("{}", error_chain(&e)),
    }
}

/// hulld's config in the VM: its state on the data disk (a tmpfs without
/// one), the busybox image, and the HTTP API and ingress on every address,
/// which is how the host reaches them through QEMU's forwarded ports.
/// The inner gets a user namespace of its own when its image is on the
/// data disk's btrfs: 6.1's tmpfs takes no idmapped mount (6.3 does).
fn hulld_config(boot: &Boot) -> String {
    let image_dir = if boot.on_disk {
        DISK_IMAGE_DIR
    } else {
        IMAGE_DIR
    };
    let host_token = boot
        .host_token
        .as_deref()
        .map(|t| format!("host_token = \"{t}\"\n"))
        .unwrap_or_default();
    // Only with a device: hulld fails to start on a vsock port it cannot
    // bind.
    let vsock = boot
        .vsock_cid
        .map(|_| format!("vsock_port = {VSOCK_API_PORT}\n"))
        .unwrap_or_default();
    format!(
        "# Written by hull-init at every boot.\n\
         state_dir = \"{STATE_DIR}\"\n\
         image_dir = \"{image_dir}\"\n\
         image = \"{IMAGE}\"\n\
         hostname = \"{HOSTNAME}\"\n\
         \n\
         [network]\n\
         mode = \"none\"\n\
         outer_address = \"0.0.0.0\"\n\
         \n\
         [daemon]\n\
         disk_reserve = \"32M\"\n\
         \n\
         [inner]\n\
         user_namespace = {}\n\
         \n\
         [api]\n\
         listen = \"0.0.0.0:7700\"\n\
         {host_token}{vsock}",
        boot.on_disk
    )
}

fn write_config(path: &Path, boot: &Boot) -> Result<(), InitError> {
    let error = |source| InitError::Config {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(error)?;
    }
    // The host token's hash is no secret, but the file is hulld's alone.
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(hulld_config(boot).as_bytes()))
        .map_err(error)
}

/// hulld under supervision, and every orphan reaped, until a signal asks
/// for a power-off.
fn supervise(signal_fd: &SignalFd, boot: &Boot) -> ! {
    let mut hulld: Option<(Pid, Instant)> = None;
    let mut backoff = BACKOFF_FIRST;
    let mut next_start = Instant::now();
    let mut failpoint = boot.failpoint.as_deref();
    loop {
        if hulld.is_none() && Instant::now() >= next_start {
            hulld = start_hulld(failpoint.take()).map(|pid| (pid, Instant::now()));
            if hulld.is_none() {
                next_start = Instant::now() + backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        let wait = match hulld {
            Some(_) => PollTimeout::NONE,
            None => poll_timeout(next_start.saturating_duration_since(Instant::now())),
        };
        wait_for_signal(signal_fd, wait);
        while let Ok(Some(info)) = signal_fd.read_signal() {
            let signal = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0));
            match signal {
                Ok(Signal::SIGCHLD) => {}
                Ok(signal) => power_off(signal_fd, hulld.map(|(pid, _)| pid), signal, boot),
                Err(_) => {}
            }
        }
        for (pid, status) in reap() {
            let Some((hulld_pid, since)) = hulld else {
                continue;
            };
            if pid != hulld_pid {
                continue;
            }
            let ran = since.elapsed();
            if ran >= BACKOFF_RESET {
                backoff = BACKOFF_FIRST;
            }
            log!(
                "hulld (pid {pid}) {} after {:.1} s; restarting it in {:.1} s",
                describe(status),
                ran.as_secs_f64(),
                backoff.as_secs_f64()
            );
            hulld = None;
            next_start = Instant::now() + backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

fn poll_timeout(wait: Duration) -> PollTimeout {
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX).max(1);
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

fn wait_for_signal(signal_fd: &SignalFd, timeout: PollTimeout) {
    let mut fds = [PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN)];
    // EINTR or a timeout: the caller looks at the clock and reaps anyway.
    let _ = poll(&mut fds, timeout);
}

/// Starts hulld; `failpoint` (`hull.failpoint=` on the command line, a
/// test hook) goes to its first start only, as HULL_FAILPOINT: that hulld
/// dies at the point, and the restarted one recovers.
fn start_hulld(failpoint: Option<&str>) -> Option<Pid> {
    let started = Instant::now();
    let cgroup = match delegate::prepare_start() {
        Ok(cgroup) => cgroup,
        Err(e) => {
            log!("cannot start hulld: {}", error_chain(&e));
            return None;
        }
    };
    if let Some(start) = cgroup.as_ref().filter(|s| s.cleared) {
        log!(
            "killed what the hulld before left in cgroup {} and removed its groups",
            start.group.display()
        );
    }
    let join_fd = cgroup
        .as_ref()
        .map(|s| std::os::fd::AsRawFd::as_raw_fd(&s.procs));
    let mut command = Command::new(HULLD);
    // SAFETY: between fork and exec the closure only calls
    // pthread_sigmask(2), sigaction(2) and write(2), all async-signal-safe,
    // and allocates nothing. hulld must not inherit the mask this process
    // takes its signals through a signalfd with (its SIGTERM would never
    // arrive), nor std's ignored SIGPIPE: spawn resets neither here.
    unsafe {
        command.pre_exec(move || {
            SigSet::all().thread_unblock()?;
            nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)?;
            if let Some(fd) = join_fd {
                // "0" moves the writer, this child, into the group, so hulld
                // is a member from its first instruction.
                // SAFETY: a one-byte static buffer, and an fd `cgroup`
                // keeps open until spawn has returned.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    if let Some(point) = failpoint {
        log!("hulld's first start gets HULL_FAILPOINT={point} (hull.failpoint=, a test hook)");
        command.env("HULL_FAILPOINT", point);
    }
    match command
        .args(["--config", HULLD_CONFIG])
        // hulld runs mkfs.btrfs, mount and ldd by name.
        .env("PATH", PATH)
        // The console is a serial log, not a terminal that shows colours.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .spawn()
    {
        Ok(child) => {
            // The Child is dropped without a wait: the reaper below takes
            // its exit status with everyone else's.
            let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            log!("started hulld as pid {pid} ({:.1} ms)", millis(started));
            if cgroup.is_some() {
                log!(
                    "hulld (pid {pid}) runs in cgroup {}",
                    delegate::cgroup_of(pid.as_raw())
                );
            }
            Some(pid)
        }
        Err(e) => {
            log!("cannot start {HULLD}: {e}");
            None
        }
    }
}

/// Every child that has exited, with its status.
fn reap() -> Vec<(Pid, WaitStatus)> {
    let mut reaped = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return reaped,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    reaped.push((pid, status));
                }
            }
        }
    }
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("was killed by {signal}"),
        other => format!("ended ({other:?})"),
    }
}

/// Stops hulld (SIGKILL after `STOP_GRACE`) and what is left, syncs,
/// unmounts and powers off.
fn power_off(signal_fd: &SignalFd, hulld: Option<Pid>, signal: Signal, boot: &Boot) -> ! {
    log!("{signal}: shutting down");
    if let Some(pid) = hulld {
        let started = Instant::now();
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = started + STOP_GRACE;
        let mut gone = false;
        while !gone && Instant::now() < deadline {
            wait_for_signal(
                signal_fd,
                poll_timeout(deadline.saturating_duration_since(Instant::now())),
            );
            while let Ok(Some(_)) = signal_fd.read_signal() {}
            gone = reap().iter().any(|(p, _)| *p == pid);
        }
        if gone {
            log!("hulld stopped ({:.1} ms)", millis(started));
        } else {
            log!(
                "hulld did not stop within {} s: killing it",
                STOP_GRACE.as_secs()
            );
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
    // Whatever is left (an inner hulld did not get to stop): kill(-1)
    // reaches every process but PID 1.
    let started = Instant::now();
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    let deadline = started + Duration::from_secs(2);
    while Instant::now() < deadline {
        if matches!(waitpid(None, None), Err(nix::Error::ECHILD)) {
            break;
        }
    }
    nix::unistd::sync();
    log!(
        "killed the remaining processes and synced ({:.1} ms)",
        millis(started)
    );
    if boot.on_disk {
        // After every process is gone: what they drew is not in it.
        let started = Instant::now();
        match seed::save(Path::new(STATE_DIR), seed::Written::Shutdown) {
            Ok(_) => log!(
                "wrote the random seed for the next boot ({:.1} ms)",
                millis(started)
            ),
            Err(e) => log!("{}", error_chain(&e)),
        }
        match data_disk::mark_clean(Path::new(STATE_DIR)) {
            Ok(()) => log!("marked the data disk clean"),
            Err(e) => log!("cannot mark the data disk clean: {e}"),
        }
    }
    let started = Instant::now();
    let (unmounted, busy) = unmount_all();
    log!(
        "unmounted {unmounted} filesystems, {busy} still busy ({:.1} ms)",
        millis(started)
    );
    nix::unistd::sync();
    log!("powering off");
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Only if the kernel refused: nothing left to do but wait.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Unmounts every mount but the root, innermost first; returns how many
/// went and how many stayed.
fn unmount_all() -> (usize, usize) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return (0, 0);
    };
    let targets: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|target| *target != "/")
        .map(unescape_mountinfo)
        .collect();
    let mut unmounted = 0;
    let mut busy = 0;
    for target in targets.iter().rev() {
        let Ok(path) = CString::new(target.as_str()) else {
            continue;
        };
        if umount2(path.as_c_str(), MntFlags::empty()).is_ok() {
            unmounted += 1;
        } else {
            // Still referenced (the console on /dev): detached, so its
            // superblock goes once the last user does.
            let _ = umount2(path.as_c_str(), MntFlags::MNT_DETACH);
            busy += 1;
        }
    }
    (unmounted, busy)
}

/// mountinfo writes a space, tab, newline and backslash in a path as
/// `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            digits.iter().try_fold(0u8, |value, d| match d {
                b'0'..=b'7' => value.checked_mul(8).map(|v| v + (d - b'0')),
                _ => None,
            })
        });
        match (bytes[i], octal) {
            (b'\\', Some(value)) => {
                out.push(value);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Logs the error and reboots: PID 1 must not exit (the kernel would
/// panic), and a fresh boot is the one retry that can help.
fn fatal(error: &dyn std::error::Error) -> ! {
    log!("fatal: {}", error_chain(error));
    log!("rebooting");
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount_index(steps: &[Step], target: &str) -> usize {
        steps
            .iter()
            .position(|s| matches!(s, Step::Mount(m) if m.target == target))
            .unwrap_or_else(|| panic!("no mount of {target}"))
    }

    #[test]
    fn mounts_come_first_and_in_an_order_that_works() {
        let steps = boot_steps();
        for target in ["/proc", "/sys", "/dev", "/run", "/tmp", "/sys/fs/cgroup"] {
            mount_index(&steps, target);
        }
        assert!(mount_index(&steps, "/sys") < mount_index(&steps, "/sys/fs/cgroup"));
        let controllers = steps
            .iter()
            .position(|s| *s == Step::EnableControllers)
            .expect("controllers step");
        assert!(mount_index(&steps, "/sys/fs/cgroup") < controllers);
        let modules = steps.iter().position(|s| *s == Step::LoadModules);
        let ethernet = steps.iter().position(|s| *s == Step::Ethernet);
        assert!(
            modules < ethernet,
            "virtio_net must load before eth0 is set up"
        );
        assert_eq!(steps.last(), Some(&Step::WriteConfig));
        let data_disk = steps.iter().position(|s| *s == Step::DataDisk);
        let base_image = steps.iter().position(|s| *s == Step::BaseImage);
        assert!(
            modules < data_disk && data_disk < base_image,
            "virtio_blk and btrfs load before the data disk is mounted, and the image goes on it"
        );
        let seed = steps.iter().position(|s| *s == Step::RandomSeed);
        assert!(
            data_disk < seed && seed < base_image && seed < ethernet,
            "the seed is on the data disk, and goes in before the rest of the boot"
        );
    }

    #[test]
    fn cgroup2_is_mounted_alone_with_nsdelegate() {
        let cgroup: Vec<_> = MOUNTS
            .iter()
            .filter(|m| m.target.starts_with("/sys/fs/cgroup"))
            .collect();
        assert_eq!(cgroup.len(), 1, "one cgroup mount, no v1 hierarchies");
        assert_eq!(cgroup[0].fstype, "cgroup2");
        assert_eq!(cgroup[0].data, "nsdelegate");
    }

    #[test]
    fn enables_every_controller_the_root_lists() {
        let dir = std::env::temp_dir().join(format!("hull-init-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let written = delegate::enable_all(&dir).unwrap();
        assert_eq!(written, "+cpuset +cpu +io +memory +pids");
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap(),
            written
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hulld_gets_the_host_token_and_the_failpoint_from_the_command_line() {
        let mut boot = Boot::default();
        boot.take_params(
            "console=ttyS0 hull.host_token=0123abcd:ff quiet hull.failpoint=create:after-snapshot",
        );
        assert_eq!(boot.host_token.as_deref(), Some("0123abcd:ff"));
        assert_eq!(boot.failpoint.as_deref(), Some("create:after-snapshot"));
        let mut plain = Boot::default();
        plain.take_params("console=ttyS0 quiet");
        assert_eq!(plain, Boot::default());
    }

    #[test]
    fn hulld_config_is_what_hulld_needs_in_the_vm() {
        let on_disk = Boot {
            on_disk: true,
            host_token: Some(format!("0123abcd:{}", "ab".repeat(32))),
            failpoint: None,
            vsock_cid: Some(3),
        };
        let config: toml::Value = toml::from_str(&hulld_config(&on_disk)).unwrap();
        assert_eq!(config["api"]["listen"].as_str(), Some("0.0.0.0:7700"));
        assert_eq!(
            config["api"]["host_token"].as_str(),
            on_disk.host_token.as_deref()
        );
        assert_eq!(config["state_dir"].as_str(), Some(STATE_DIR));
        assert_eq!(config["image"].as_str(), Some("busybox"));
        assert_eq!(config["image_dir"].as_str(), Some(DISK_IMAGE_DIR));
        assert_eq!(config["inner"]["user_namespace"].as_bool(), Some(true));
        assert_eq!(config["network"]["outer_address"].as_str(), Some("0.0.0.0"));

        let on_tmpfs: toml::Value = toml::from_str(&hulld_config(&Boot::default())).unwrap();
        assert_eq!(on_tmpfs["image_dir"].as_str(), Some(IMAGE_DIR));
        assert_eq!(on_tmpfs["inner"]["user_namespace"].as_bool(), Some(false));
        assert!(on_tmpfs["api"].get("host_token").is_none());
        assert_eq!(config["api"]["vsock_port"].as_integer(), Some(7700));
        assert!(
            on_tmpfs["api"].get("vsock_port").is_none(),
            "no vsock port without a vsock device"
        );
    }

    #[test]
    fn transparent_hugepages_go_off_unless_the_command_line_names_a_mode() {
        assert_eq!(thp_mode("console=ttyS0 quiet"), ThpMode::Never);
        assert_eq!(
            thp_mode("console=ttyS0 transparent_hugepage=madvise quiet"),
            ThpMode::AsAsked("madvise")
        );
        assert_eq!(
            thp_mode("transparent_hugepage=always"),
            ThpMode::AsAsked("always")
        );
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/trailing\\"), "/trailing\\");
    }
}
