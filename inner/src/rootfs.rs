//! The inner's root filesystem, built inside its own mount namespace so that
//! every mount vanishes with the namespace: overlay, /proc, /sys, /dev, then
//! pivot_root. Each step has its own error saying what failed on which path.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, pivot_root, sethostname};

use crate::spec::{CgroupView, InnerSpec, INNER_API_BIN, INNER_API_DIR};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot make the mount tree private")]
    PrivateMounts(#[source] nix::Error),
    #[error("overlay path {path} contains a ',' or ':' that overlayfs cannot take")]
    OverlayPath { path: PathBuf },
    #[error("cannot mount the overlay (lower {lower}, upper {upper}) on {target}")]
    Overlay {
        lower: PathBuf,
        upper: PathBuf,
        target: PathBuf,
        source: nix::Error,
    },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        source: nix::Error,
    },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create device node {path}")]
    DeviceNode { path: PathBuf, source: nix::Error },
    #[error("cannot mask {path}")]
    Mask { path: PathBuf, source: nix::Error },
    #[error("cannot set the hostname to {hostname:?}")]
    Hostname {
        hostname: String,
        source: nix::Error,
    },
    #[error("cannot bring the loopback interface up")]
    Loopback(#[source] std::io::Error),
    #[error("cannot pivot_root into {path}")]
    PivotRoot { path: PathBuf, source: nix::Error },
    #[error("cannot detach the old root")]
    DetachOldRoot(#[source] nix::Error),
    #[error(transparent)]
    Privileges(#[from] crate::security::PrivilegeError),
}

impl SetupError {
    /// A short name of the step, for the `SetupFailed` report.
    pub fn step(&self) -> &'static str {
        match self {
            SetupError::PrivateMounts(_) => "private-mounts",
            SetupError::OverlayPath { .. } | SetupError::Overlay { .. } => "overlay",
            SetupError::Mount { .. } => "mount",
            SetupError::Create { .. } => "create",
            SetupError::DeviceNode { .. } => "dev",
            SetupError::Mask { .. } => "mask",
            SetupError::Hostname { .. } => "hostname",
            SetupError::Loopback(_) => "loopback",
            SetupError::PivotRoot { .. } | SetupError::DetachOldRoot(_) => "pivot-root",
            SetupError::Privileges(_) => "privileges",
        }
    }
}

type Result<T> = std::result::Result<T, SetupError>;

/// Builds the root filesystem and pivots into it. Runs as PID 1 of the new
/// pid namespace, in the new mount namespace, before any thread exists.
/// Returns how long each step took, in microseconds.
pub fn prepare(spec: &InnerSpec) -> Result<Vec<(String, u64)>> {
    let root = spec.rootfs.as_path();
    let mut timings = Vec::new();
    let mut clock = std::time::Instant::now();
    let mut step = |name: &str, result: Result<()>| {
        let micros = u64::try_from(clock.elapsed().as_micros()).unwrap_or(u64::MAX);
        timings.push((name.to_string(), micros));
        clock = std::time::Instant::now();
        result
    };
    step("private-mounts", make_mounts_private())?;
    step("overlay", mount_overlay(spec))?;
    step("proc", mount_proc(root))?;
    step("sys", mount_sys(root))?;
    if let Some(view) = &spec.cgroup_view {
        step("cgroup", mount_cgroup(root, view))?;
    }
    step("dev", mount_dev(root))?;
    step("mask", mask_kernel_interfaces(root))?;
    step("hostname", set_hostname(&spec.hostname))?;
    if let Some(resolv) = &spec.resolv_conf {
        step("resolv-conf", bind_resolv_conf(root, resolv))?;
    }
    step("run", mount_run(root))?;
    if let Some(api) = &spec.api_dir {
        step("api", bind_api(root, api))?;
    }
    step(
        "loopback",
        crate::security::loopback_up().map_err(SetupError::Loopback),
    )?;
    step("pivot-root", enter_root(root))?;
    Ok(timings)
}

fn make_mounts_private() -> Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(SetupError::PrivateMounts)
}

fn overlay_safe(path: &Path) -> Result<&str> {
    let s = path.to_str().unwrap_or(",");
    if s.contains(',') || s.contains(':') {
        return Err(SetupError::OverlayPath {
            path: path.to_path_buf(),
        });
    }
    Ok(s)
}

fn mount_overlay(spec: &InnerSpec) -> Result<()> {
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        overlay_safe(&spec.lower)?,
        overlay_safe(&spec.upper)?,
        overlay_safe(&spec.work)?
    );
    mount(
        Some("overlay"),
        &spec.rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|source| SetupError::Overlay {
        lower: spec.lower.clone(),
        upper: spec.upper.clone(),
        target: spec.rootfs.clone(),
        source,
    })
}

fn ensure_dir(path: &Path, mode: u32) -> Result<()> {
    if !path.is_dir() {
        fs::create_dir_all(path).map_err(|source| SetupError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode));
    }
    Ok(())
}

fn mount_fs(fstype: &'static str, target: &Path, flags: MsFlags, data: Option<&str>) -> Result<()> {
    ensure_dir(target, 0o755)?;
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(|source| SetupError::Mount {
        fstype,
        target: target.to_path_buf(),
        source,
    })
}

const HARDENED: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

fn mount_proc(root: &Path) -> Result<()> {
    mount_fs("proc", &root.join("proc"), HARDENED, None)
}

fn mount_sys(root: &Path) -> Result<()> {
    mount_fs(
        "sysfs",
        &root.join("sys"),
        HARDENED | MsFlags::MS_RDONLY,
        None,
    )
}

/// The inner's own cgroup at /sys/fs/cgroup, read-only. The helper
/// unshared the cgroup namespace after joining the inner's group, so each
/// hierarchy mounted here has that group as its root: `memory.max` (or
/// v1's `memory/memory.limit_in_bytes`) reads the inner's limit.
fn mount_cgroup(root: &Path, view: &CgroupView) -> Result<()> {
    let target = root.join("sys/fs/cgroup");
    let read_only = HARDENED | MsFlags::MS_RDONLY;
    let hierarchies = match view {
        CgroupView::Unified => return mount_fs("cgroup2", &target, read_only, None),
        CgroupView::V1(hierarchies) => hierarchies,
    };
    mount_fs("tmpfs", &target, HARDENED, Some("mode=755,size=64k"))?;
    for options in hierarchies {
        mount_fs("cgroup", &target.join(options), read_only, Some(options))?;
        if !options.contains(',') {
            continue;
        }
        for controller in options.split(',') {
            let path = target.join(controller);
            symlink(options, &path).map_err(|source| SetupError::Create { path, source })?;
        }
    }
    mount(
        None::<&str>,
        &target,
        None::<&str>,
        MsFlags::MS_REMOUNT | read_only,
        Some("mode=755,size=64k"),
    )
    .map_err(|source| SetupError::Mount {
        fstype: "tmpfs",
        target,
        source,
    })
}

/// (name, major, minor) of the character devices every program expects.
const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn mount_dev(root: &Path) -> Result<()> {
    let dev = root.join("dev");
    mount_fs(
        "tmpfs",
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=65536k"),
    )?;
    for (name, major, minor) in DEVICES {
        let path = dev.join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(|source| SetupError::DeviceNode {
            path: path.clone(),
            source,
        })?;
        // mknod honours the umask; the nodes must be usable by everyone.
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o666));
    }
    mount_fs(
        "devpts",
        &dev.join("pts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount_fs(
        "tmpfs",
        &dev.join("shm"),
        HARDENED,
        Some("mode=1777,size=65536k"),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let path = dev.join(link);
        symlink(target, &path).map_err(|source| SetupError::Create { path, source })?;
    }
    Ok(())
}

/// Files of /proc that would let the inner's root read kernel memory or
/// reconfigure the whole VM (core_pattern runs a program in the root
/// namespace!). Masked with /dev/null or made read-only, as runc does.
const MASKED: [&str; 5] = [
    "proc/kcore",
    "proc/keys",
    "proc/timer_list",
    "proc/sched_debug",
    "proc/sysrq-trigger",
];
const READ_ONLY: [&str; 4] = ["proc/sys", "proc/irq", "proc/bus", "proc/fs"];

fn mask_kernel_interfaces(root: &Path) -> Result<()> {
    let null = root.join("dev/null");
    for rel in MASKED {
        let path = root.join(rel);
        if !path.exists() || path.is_dir() {
            continue;
        }
        mount(
            Some(&null),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| SetupError::Mask {
            path: path.clone(),
            source,
        })?;
    }
    for rel in READ_ONLY {
        let path = root.join(rel);
        if !path.exists() {
            continue;
        }
        let bind = |flags: MsFlags| {
            mount(Some(&path), &path, None::<&str>, flags, None::<&str>).map_err(|source| {
                SetupError::Mask {
                    path: path.clone(),
                    source,
                }
            })
        };
        bind(MsFlags::MS_BIND | MsFlags::MS_REC)?;
        bind(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | HARDENED)?;
    }
    Ok(())
}

/// Bind-mounts hulld's resolv.conf over the inner's. A symlink there (to a
/// resolver stub that does not run in the inner) would be followed in the
/// root namespace's view, so it is replaced by a plain file first.
fn bind_resolv_conf(root: &Path, source: &Path) -> Result<()> {
    let etc = root.join("etc");
    ensure_dir(&etc, 0o755)?;
    let target = etc.join("resolv.conf");
    let create = |path: &Path, source| SetupError::Create {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(&target) {
        Ok(meta) if meta.file_type().is_file() => {}
        Ok(_) => {
            fs::remove_file(&target).map_err(|e| create(&target, e))?;
            fs::write(&target, b"").map_err(|e| create(&target, e))?;
        }
        Err(_) => fs::write(&target, b"").map_err(|e| create(&target, e))?,
    }
    mount(
        Some(source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|source| SetupError::Mount {
        fstype: "bind",
        target,
        source,
    })
}

/// /run is volatile, as on a booted system: whatever the image or an
/// earlier inner left there is gone, and hull's own mount point under it
/// is made without touching the user's layer.
fn mount_run(root: &Path) -> Result<()> {
    let run = root.join("run");
    mount_fs(
        "tmpfs",
        &run,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=755,size=65536k"),
    )?;
    // Debian's tools expect it, as systemd-tmpfiles would make it.
    ensure_dir(&run.join("lock"), 0o1777)
}

/// hulld's directory for the inner, read-only: the service socket (a
/// socket can be connected to on a read-only mount) and the client.
fn bind_api(root: &Path, source: &Path) -> Result<()> {
    let target = root.join(INNER_API_DIR.trim_start_matches('/'));
    ensure_dir(&target, 0o755)?;
    let mount_err = |source| SetupError::Mount {
        fstype: "bind",
        target: target.clone(),
        source,
    };
    mount(
        Some(source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(mount_err)?;
    mount(
        None::<&str>,
        &target,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(mount_err)?;
    link_client(root)
}

/// A login shell resets PATH (Debian's /etc/profile does), so `hull` is
/// also linked from /usr/local/bin when the image has that directory and
/// nothing of the user's is called hull there.
fn link_client(root: &Path) -> Result<()> {
    let bin = root.join("usr/local/bin");
    let link = bin.join("hull");
    if !bin.is_dir() || fs::symlink_metadata(&link).is_ok() {
        return Ok(());
    }
    let client = Path::new(INNER_API_BIN).join("hull");
    symlink(&client, &link).map_err(|source| SetupError::Create { path: link, source })
}

fn set_hostname(hostname: &str) -> Result<()> {
    sethostname(hostname).map_err(|source| SetupError::Hostname {
        hostname: hostname.to_string(),
        source,
    })
}

/// pivot_root(".", ".") stacks the old root under the new one; detaching it
/// leaves nothing of the root namespace's tree reachable from the inner.
fn enter_root(root: &Path) -> Result<()> {
    let pivot_err = |source| SetupError::PivotRoot {
        path: root.to_path_buf(),
        source,
    };
    chdir(root).map_err(pivot_err)?;
    pivot_root(".", ".").map_err(pivot_err)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(SetupError::DetachOldRoot)?;
    chdir("/").map_err(pivot_err)?;
    Ok(())
}
