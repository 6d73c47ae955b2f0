//! The inner's root filesystem, built inside its own mount namespace so that
//! every mount vanishes with the namespace: overlay, /proc, /sys, /dev, then
//! pivot_root. Each step has its own error saying what failed on which path.
//!
//! Everything under the overlay is the user's layer and runs with the
//! init's full privilege before pivot_root: paths there are resolved by
//! [`Layer`] (openat2 with RESOLVE_IN_ROOT), mounts are attached to the fds
//! it returns ([`mounts`]), and files are made relative to those fds. A
//! symlink in the layer therefore resolves as it would inside the inner.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use hull_proto::IdMapping;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, pivot_root, sethostname};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::mount::MountAttrFlags;

use crate::layer::Layer;
use crate::mounts::{self, HARDENED, NOEXEC, NOSUID, RDONLY};
use crate::spec::{CgroupView, InnerSpec, INNER_API_BIN, INNER_API_DIR};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot make the mount tree private")]
    PrivateMounts(#[source] nix::Error),
    #[error("cannot open the overlay layer {path}")]
    OverlayLayer { path: PathBuf, source: io::Error },
    #[error("cannot mount the overlay (lower {lower}, upper {upper}) on {target}")]
    Overlay {
        lower: PathBuf,
        upper: PathBuf,
        target: PathBuf,
        source: nix::Error,
    },
    #[error("cannot open the inner's root {path}")]
    OpenRoot { path: PathBuf, source: io::Error },
    #[error("cannot mount {fstype} on {target} in the inner")]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        source: io::Error,
    },
    #[error("cannot create {path} in the inner")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot make the mount point {path} in the inner's layer")]
    MountPoint { path: PathBuf, source: io::Error },
    #[error("cannot create device node {path} in the inner")]
    DeviceNode { path: PathBuf, source: io::Error },
    #[error("cannot mask {path} in the inner")]
    Mask { path: PathBuf, source: io::Error },
    #[error("cannot copy {path} for the inner's /etc/resolv.conf")]
    ResolvCopy { path: PathBuf, source: io::Error },
    #[error("cannot bind {source_path} on {target} in the inner")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        source: io::Error,
    },
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
    #[error("cannot set {path} in the inner's network namespace")]
    Sysctl { path: PathBuf, source: io::Error },
    #[error("cannot make an idmapped mount of {path} for the inner's user namespace (its filesystem may not support them; [inner] user_namespace = false runs the inner without one)")]
    Idmap { path: PathBuf, source: io::Error },
    #[error("cannot keep the capabilities with the inner root's filesystem ids")]
    FsIds(#[source] caps::errors::CapsError),
    #[error(transparent)]
    UserNamespace(crate::userns::UsernsError),
    #[error(transparent)]
    Privileges(#[from] crate::security::PrivilegeError),
}

impl SetupError {
    /// A short name of the step, for the `SetupFailed` report.
    pub fn step(&self) -> &'static str {
        match self {
            SetupError::PrivateMounts(_) => "private-mounts",
            SetupError::OverlayLayer { .. } => "layers",
            SetupError::Overlay { .. } => "overlay",
            SetupError::OpenRoot { .. } => "open-root",
            SetupError::Mount { .. } => "mount",
            SetupError::Create { .. } => "create",
            SetupError::MountPoint { .. } => "mount-point",
            SetupError::DeviceNode { .. } => "dev",
            SetupError::Mask { .. } => "mask",
            SetupError::ResolvCopy { .. } => "resolv-conf",
            SetupError::Bind { .. } => "bind",
            SetupError::Hostname { .. } => "hostname",
            SetupError::Loopback(_) => "loopback",
            SetupError::PivotRoot { .. } | SetupError::DetachOldRoot(_) => "pivot-root",
            SetupError::Sysctl { .. } => "sysctl",
            SetupError::Idmap { .. } => "layers",
            SetupError::FsIds(_) => "fs-ids",
            SetupError::UserNamespace(_) => "user-namespace",
            SetupError::Privileges(_) => "privileges",
        }
    }
}

type Result<T> = std::result::Result<T, SetupError>;

/// How long each step took, in microseconds.
struct Timings {
    steps: Vec<(String, u64)>,
    clock: std::time::Instant,
}

impl Timings {
    fn step<T>(&mut self, name: &str, result: Result<T>) -> Result<T> {
        let micros = u64::try_from(self.clock.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.steps.push((name.to_string(), micros));
        self.clock = std::time::Instant::now();
        result
    }
}

/// Builds the root filesystem and pivots into it. Runs as PID 1 of the new
/// pid namespace, in the new mount namespace, before any thread exists.
/// Returns how long each step took, in microseconds. With `userns` (the
/// inner's user namespace) the layers are idmapped through it and hull's
/// own mounts are owned by its root; the init enters it afterwards.
pub fn prepare(spec: &InnerSpec, userns: Option<&OwnedFd>) -> Result<Vec<(String, u64)>> {
    let root = spec.rootfs.as_path();
    let mut t = Timings {
        steps: Vec::new(),
        clock: std::time::Instant::now(),
    };
    let owner = Owner(spec.user_namespace.map(|m| m.base));
    t.step("private-mounts", make_mounts_private())?;
    if let Some(map) = &spec.user_namespace {
        t.step("sysctl", unprivileged_network(map))?;
        t.step("fs-ids", act_as_mapped_root(map.base))?;
    }
    let layers = t.step("layers", open_layers(spec, userns))?;
    t.step("overlay", mount_overlay(spec, &layers))?;
    drop(layers);
    let layer = t.step("open-root", open_root(root))?;
    t.step(
        "proc",
        mount_new(&layer, "proc", "proc", "", HARDENED).map(drop),
    )?;
    t.step(
        "sys",
        mount_new(&layer, "sysfs", "sys", "", HARDENED | RDONLY).map(drop),
    )?;
    if let Some(view) = &spec.cgroup_view {
        t.step("cgroup", mount_cgroup(&layer, view))?;
    }
    let dev = t.step("dev", mount_dev(&layer, owner))?;
    t.step("mask", mask_kernel_interfaces(&layer, &dev))?;
    t.step("hostname", set_hostname(&spec.hostname))?;
    if let Some(resolv) = &spec.resolv_conf {
        t.step("resolv-conf", bind_resolv_conf(&layer, resolv))?;
    }
    let run = t.step("run", mount_run(&layer, owner))?;
    if let Some(api) = &spec.api_dir {
        t.step("api", bind_api(&layer, &run, api))?;
    }
    t.step(
        "loopback",
        crate::security::loopback_up().map_err(SetupError::Loopback),
    )?;
    t.step("pivot-root", enter_root(root))?;
    Ok(t.steps)
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

/// The inner's user namespace is not the owner of its network namespace,
/// so its capabilities do not bind ports below 1024 or open raw sockets
/// there: the namespace lets every port and the inner's groups' ICMP
/// sockets (ping) go without them. The files are the init's network
/// namespace's, whichever /proc they are opened through.
fn unprivileged_network(map: &IdMapping) -> Result<()> {
    let last = map.base + map.count.saturating_sub(1);
    for (file, value) in [
        ("ip_unprivileged_port_start", "0".to_string()),
        ("ping_group_range", format!("{} {last}", map.base)),
    ] {
        let path = Path::new("/proc/sys/net/ipv4").join(file);
        std::fs::write(&path, value).map_err(|source| SetupError::Sysctl { path, source })?;
    }
    Ok(())
}

/// The layers go to overlayfs as /proc/self/fd/N (see [`open_layers`]):
/// overlayfs shows its options as given in the inner's
/// /proc/self/mountinfo, so host paths there would tell the inner where
/// hulld keeps its images and volumes (and a ',' or ':' in them would
/// split the options).
fn mount_overlay(spec: &InnerSpec, layers: &Layers) -> Result<()> {
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        layers.lower.display(),
        layers.upper.display(),
        layers.work.display()
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

/// The overlay's layers as the paths it is given, and the fds that keep
/// those paths valid until it is mounted.
struct Layers {
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    _held: Vec<OwnedFd>,
}

/// Opens hulld's paths of the layers. With a user namespace each is an
/// idmapped copy of its mount instead (upper and work share one, as
/// overlayfs requires): on disk the inner's root stays uid 0, so a layer
/// or checkpoint reads the same with the namespace on or off, and what the
/// inner writes as its user 1000 is 1000 on disk.
fn open_layers(spec: &InnerSpec, userns: Option<&OwnedFd>) -> Result<Layers> {
    let open = |path: &Path| {
        let opened = match userns {
            // Attached over hulld's own path in this (private) mount
            // namespace before overlayfs takes it: up to Linux 6.14
            // overlayfs refuses a layer on a detached mount ("failed to
            // clone upperpath").
            Some(userns) => mounts::clone_idmapped(path, userns)
                .and_then(|idmapped| mounts::attach_over(&idmapped, path))
                .map_err(|source| SetupError::Idmap {
                    path: path.to_path_buf(),
                    source,
                }),
            None => rustix::fs::open(
                path,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| SetupError::OverlayLayer {
                path: path.to_path_buf(),
                source: e.into(),
            }),
        };
        opened.map(|fd| {
            use std::os::fd::AsRawFd;
            let shown = format!("/proc/self/fd/{}", fd.as_raw_fd());
            (fd, PathBuf::from(shown))
        })
    };
    let (lower_fd, lower) = open(&spec.lower)?;
    let (mut held, upper, work) = match (userns, shared_parent(&spec.upper, &spec.work)) {
        (Some(_), Some((parent, upper_name, work_name))) => {
            let (fd, at) = open(parent)?;
            (vec![fd], at.join(upper_name), at.join(work_name))
        }
        _ => {
            let (upper_fd, upper) = open(&spec.upper)?;
            let (work_fd, work) = open(&spec.work)?;
            (vec![upper_fd, work_fd], upper, work)
        }
    };
    held.push(lower_fd);
    Ok(Layers {
        lower,
        upper,
        work,
        _held: held,
    })
}

/// From here on the init makes files with the filesystem ids of the
/// inner's root (the VM's `id`), every capability still effective.
/// Through idmapped layers only an id the map covers can own a file, and
/// the VM's root is not one of them: overlayfs keeps its mounter's ids for
/// its own work in the layers (the work directory, copy-up), and a mount
/// point or link the init makes in the layer is then the inner's root's,
/// uid 0 on disk.
fn act_as_mapped_root(id: u32) -> Result<()> {
    use nix::unistd::{setfsgid, setfsuid, Gid, Uid};
    setfsgid(Gid::from_raw(id));
    setfsuid(Uid::from_raw(id));
    // Leaving fsuid 0 cleared the filesystem capabilities from the
    // effective set; the init still needs them for hulld's files.
    caps::read(None, caps::CapSet::Permitted)
        .and_then(|all| caps::set(None, caps::CapSet::Effective, &all))
        .map_err(SetupError::FsIds)
}

/// The directory holding both `upper` and `work`, and their names in it.
fn shared_parent<'a>(upper: &'a Path, work: &'a Path) -> Option<(&'a Path, &'a OsStr, &'a OsStr)> {
    let parent = upper.parent()?;
    (work.parent()? == parent).then_some((parent, upper.file_name()?, work.file_name()?))
}

/// The VM's id of the inner's root, when it has a user namespace of its
/// own: hull's tmpfs mounts must belong to it, or the inner's root could
/// not write its own /run or /dev/shm.
#[derive(Debug, Clone, Copy)]
struct Owner(Option<u32>);

impl Owner {
    /// tmpfs `options` with the owner's uid and gid added.
    fn tmpfs(self, options: &str) -> String {
        match self.0 {
            Some(id) => format!("{options},uid={id},gid={id}"),
            None => options.to_string(),
        }
    }

    /// The VM's id of the inner's group `gid`.
    fn gid(self, gid: u32) -> u32 {
        self.0.map_or(gid, |base| base + gid)
    }
}

fn open_root(root: &Path) -> Result<Layer> {
    Layer::open(root).map_err(|source| SetupError::OpenRoot {
        path: root.to_path_buf(),
        source,
    })
}

/// A new instance of `fstype` on the layer's directory `rel`, made where
/// missing. Returns the attached mount, the directory of what goes in it.
fn mount_new(
    layer: &Layer,
    fstype: &'static str,
    rel: &str,
    options: &str,
    attrs: MountAttrFlags,
) -> Result<OwnedFd> {
    let target = mount_point(layer, rel)?;
    mount_on(fstype, &target, rel, options, attrs)
}

/// The layer's directory `rel`, made where missing, to mount on: never the
/// root itself (a link to / there would cover the whole layer).
fn mount_point(layer: &Layer, rel: &str) -> Result<OwnedFd> {
    let err = |source| SetupError::MountPoint {
        path: inner_path(rel),
        source,
    };
    let target = layer.make_dir(Path::new(rel), 0o755).map_err(err)?;
    if layer.is_root(&target).map_err(err)? {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a symlink there leads to the root itself",
        )));
    }
    Ok(target)
}

fn mount_on(
    fstype: &'static str,
    target: &impl AsFd,
    rel: &str,
    options: &str,
    attrs: MountAttrFlags,
) -> Result<OwnedFd> {
    let mount_err = |source| SetupError::Mount {
        fstype,
        target: inner_path(rel),
        source,
    };
    let mount = mounts::new_fs(fstype, options, attrs).map_err(mount_err)?;
    mounts::attach(&mount, target).map_err(mount_err)?;
    Ok(mount)
}

/// The directory `name` in the directory `parent` hull just mounted (so
/// nothing of the user's is in it), made if missing.
fn subdir(parent: &OwnedFd, name: &str, mode: u32, shown: &str) -> Result<OwnedFd> {
    let create = |source: io::Error| SetupError::Create {
        path: inner_path(shown),
        source,
    };
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(create(e.into())),
    }
    // mkdir honours the umask.
    rustix::fs::chmodat(parent, name, Mode::from_raw_mode(mode), AtFlags::empty())
        .map_err(|e| create(e.into()))?;
    rustix::fs::openat(
        parent,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| create(e.into()))
}

/// How a path of the layer reads in an error: as the inner sees it.
fn inner_path(rel: &str) -> PathBuf {
    Path::new("/").join(rel)
}

/// The inner's own cgroup at /sys/fs/cgroup, read-only. The helper
/// unshared the cgroup namespace after joining the inner's group, so each
/// hierarchy mounted here has that group as its root: `memory.max` (or
/// v1's `memory/memory.limit_in_bytes`) reads the inner's limit.
fn mount_cgroup(layer: &Layer, view: &CgroupView) -> Result<()> {
    const AT: &str = "sys/fs/cgroup";
    let read_only = HARDENED | RDONLY;
    // In the sysfs just mounted, not in the layer.
    let target = layer
        .path_fd(Path::new(AT))
        .map_err(|source| SetupError::MountPoint {
            path: inner_path(AT),
            source,
        })?;
    let hierarchies = match view {
        // Writable: hulld delegated the group (its directory and
        // cgroup.procs) to the inner's root, and nsdelegate keeps the
        // group's own limits out of reach from inside its namespace.
        CgroupView::Unified => {
            return mount_on("cgroup2", &target, AT, "", HARDENED).map(drop);
        }
        CgroupView::V1(hierarchies) => hierarchies,
    };
    let tmpfs = mount_on("tmpfs", &target, AT, "mode=755,size=64k", HARDENED)?;
    for options in hierarchies {
        let shown = format!("{AT}/{options}");
        let dir = subdir(&tmpfs, options, 0o755, &shown)?;
        mount_on("cgroup", &dir, &shown, options, read_only)?;
        if !options.contains(',') {
            continue;
        }
        for controller in options.split(',') {
            rustix::fs::symlinkat(options.as_str(), &tmpfs, controller).map_err(|e| {
                SetupError::Create {
                    path: inner_path(&format!("{AT}/{controller}")),
                    source: e.into(),
                }
            })?;
        }
    }
    mounts::set_attrs(&tmpfs, RDONLY, false).map_err(|source| SetupError::Mount {
        fstype: "tmpfs",
        target: inner_path(AT),
        source,
    })
}

/// (name, major, minor) of the character devices every program expects.
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// A fresh /dev. Returns its mount, where the masks find /dev/null.
fn mount_dev(layer: &Layer, owner: Owner) -> Result<OwnedFd> {
    let dev = mount_new(
        layer,
        "tmpfs",
        "dev",
        &owner.tmpfs("mode=755,size=65536k"),
        NOSUID | NOEXEC,
    )?;
    for (name, major, minor) in DEVICES {
        let node_err = |e: rustix::io::Errno| SetupError::DeviceNode {
            path: inner_path(&format!("dev/{name}")),
            source: e.into(),
        };
        let mode = Mode::from_raw_mode(0o666);
        rustix::fs::mknodat(
            &dev,
            name,
            FileType::CharacterDevice,
            mode,
            rustix::fs::makedev(major, minor),
        )
        .map_err(node_err)?;
        // mknod honours the umask; the nodes must be usable by everyone.
        rustix::fs::chmodat(&dev, name, mode, AtFlags::empty()).map_err(node_err)?;
    }
    let pts = subdir(&dev, "pts", 0o755, "dev/pts")?;
    // The tty group, 5 in the inner: devpts reads ids in the mounter's
    // namespace.
    let pts_options = format!("newinstance,ptmxmode=0666,mode=0620,gid={}", owner.gid(5));
    mount_on("devpts", &pts, "dev/pts", &pts_options, NOSUID | NOEXEC)?;
    let shm = subdir(&dev, "shm", 0o1777, "dev/shm")?;
    let shm_options = owner.tmpfs("mode=1777,size=65536k");
    mount_on("tmpfs", &shm, "dev/shm", &shm_options, HARDENED)?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        rustix::fs::symlinkat(target, &dev, link).map_err(|e| SetupError::Create {
            path: inner_path(&format!("dev/{link}")),
            source: e.into(),
        })?;
    }
    Ok(dev)
}

/// What runc masks: kernel memory, keys, timers and scheduler internals,
/// the kernel's configuration, firmware tables and power capping. A file
/// gets /dev/null over it, a directory an empty read-only tmpfs.
const MASKED: [&str; 12] = [
    "proc/acpi",
    "proc/asound",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "proc/config.gz",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];
/// What runc makes read-only: the files that reconfigure the whole VM
/// (core_pattern runs a program in the root namespace!).
const READ_ONLY: [&str; 5] = [
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

fn mask_kernel_interfaces(layer: &Layer, dev: &OwnedFd) -> Result<()> {
    for rel in MASKED {
        let mask_err = |source| SetupError::Mask {
            path: inner_path(rel),
            source,
        };
        let Some(target) = existing(layer, rel).map_err(mask_err)? else {
            continue;
        };
        let is_dir = rustix::fs::fstat(&target)
            .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
            .map_err(|e| mask_err(e.into()))?;
        let mask = if is_dir {
            mounts::new_fs("tmpfs", "size=4k,nr_inodes=1", HARDENED | RDONLY)
        } else {
            rustix::fs::openat(
                dev,
                "null",
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io::Error::from)
            .and_then(|null| mounts::clone_fd(&null, false))
            .and_then(|null| {
                mounts::set_attrs(&null, NOSUID | NOEXEC | RDONLY, false).map(|()| null)
            })
        }
        .map_err(mask_err)?;
        mounts::attach(&mask, &target).map_err(mask_err)?;
    }
    for rel in READ_ONLY {
        let mask_err = |source| SetupError::Mask {
            path: inner_path(rel),
            source,
        };
        let Some(target) = existing(layer, rel).map_err(mask_err)? else {
            continue;
        };
        let copy = mounts::clone_fd(&target, true).map_err(mask_err)?;
        mounts::set_attrs(&copy, HARDENED | RDONLY, true).map_err(mask_err)?;
        mounts::attach(&copy, &target).map_err(mask_err)?;
    }
    Ok(())
}

/// An O_PATH fd of `rel`, or None where this kernel has no such file.
fn existing(layer: &Layer, rel: &str) -> io::Result<Option<OwnedFd>> {
    match layer.path_fd(Path::new(rel)) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A read-only copy of hulld's resolv.conf on /etc/resolv.conf. The copy
/// is on a tmpfs of the inner's own, so nothing the inner does (even a
/// remount, should it ever get the privilege) reaches hulld's file; a
/// kernel that cannot bind from a detached mount gets hulld's file bound
/// read-only instead. A symlink at /etc/resolv.conf (to a resolver stub
/// that does not run in the inner) is replaced by a plain file first.
fn bind_resolv_conf(layer: &Layer, source: &Path) -> Result<()> {
    const AT: &str = "etc/resolv.conf";
    let create = |source: io::Error| SetupError::Create {
        path: inner_path(AT),
        source,
    };
    let etc = layer
        .make_dir(Path::new("etc"), 0o755)
        .map_err(|source| SetupError::MountPoint {
            path: inner_path("etc"),
            source,
        })?;
    let name = "resolv.conf";
    match rustix::fs::statat(&etc, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {}
        Ok(_) => {
            rustix::fs::unlinkat(&etc, name, AtFlags::empty()).map_err(|e| create(e.into()))?;
            create_empty(&etc, name).map_err(create)?;
        }
        Err(rustix::io::Errno::NOENT) => create_empty(&etc, name).map_err(create)?,
        Err(e) => return Err(create(e.into())),
    }
    let target = rustix::fs::openat(
        &etc,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| create(e.into()))?;
    let copy = private_copy(source).map_err(|source_err| SetupError::ResolvCopy {
        path: source.to_path_buf(),
        source: source_err,
    })?;
    let bind_err = |e| SetupError::Bind {
        source_path: source.to_path_buf(),
        target: inner_path(AT),
        source: e,
    };
    mounts::set_attrs(&copy, HARDENED | RDONLY, false).map_err(bind_err)?;
    mounts::attach(&copy, &target).map_err(bind_err)
}

fn create_empty(dir: &OwnedFd, name: &str) -> io::Result<()> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    Ok(())
}

/// The largest resolv.conf copied: hulld writes a few lines.
const RESOLV_MAX: u64 = 64 * 1024;

/// A detached mount of a copy of `source` on a tmpfs of its own.
fn private_copy(source: &Path) -> io::Result<OwnedFd> {
    use std::io::{Read, Write};
    let mut text = Vec::new();
    std::fs::File::open(source)?
        .take(RESOLV_MAX)
        .read_to_end(&mut text)?;
    let tmpfs = mounts::new_fs("tmpfs", "mode=755,size=64k,nr_inodes=4", HARDENED)?;
    let file = rustix::fs::openat(
        &tmpfs,
        "resolv.conf",
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    rustix::fs::fchmod(&file, Mode::from_raw_mode(0o644))?;
    std::fs::File::from(file).write_all(&text)?;
    match rustix::mount::open_tree(
        &tmpfs,
        "resolv.conf",
        rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
            | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
    ) {
        Ok(copy) => Ok(copy),
        // Older kernels clone only from mounts in the caller's
        // namespace: bind hulld's file itself, read-only all the same.
        Err(rustix::io::Errno::INVAL) => mounts::clone_path(source),
        Err(e) => Err(e.into()),
    }
}

/// /run is volatile, as on a booted system: whatever the image or an
/// earlier inner left there is gone, and hull's own mount point under it
/// is made without touching the user's layer. Returns its mount.
fn mount_run(layer: &Layer, owner: Owner) -> Result<OwnedFd> {
    let run = mount_new(
        layer,
        "tmpfs",
        "run",
        &owner.tmpfs("mode=755,size=65536k"),
        NOSUID | mounts::NODEV,
    )?;
    // Debian's tools expect it, as systemd-tmpfiles would make it.
    subdir(&run, "lock", 0o1777, "run/lock")?;
    Ok(run)
}

/// hulld's directory for the inner, read-only: the service socket (a
/// socket can be connected to on a read-only mount) and the client.
fn bind_api(layer: &Layer, run: &OwnedFd, source: &Path) -> Result<()> {
    let name = INNER_API_DIR.trim_start_matches("/run/");
    let shown = INNER_API_DIR.trim_start_matches('/');
    let target = subdir(run, name, 0o755, shown)?;
    let bind_err = |e| SetupError::Bind {
        source_path: source.to_path_buf(),
        target: inner_path(shown),
        source: e,
    };
    let copy = mounts::clone_path(source).map_err(bind_err)?;
    mounts::set_attrs(&copy, NOSUID | mounts::NODEV | RDONLY, false).map_err(bind_err)?;
    mounts::attach(&copy, &target).map_err(bind_err)?;
    link_client(layer)
}

/// A login shell resets PATH (Debian's /etc/profile does), so `hull` is
/// also linked from /usr/local/bin when the image has that directory and
/// nothing of the user's is called hull there.
fn link_client(layer: &Layer) -> Result<()> {
    const AT: &str = "usr/local/bin";
    let Ok(bin) = layer.open_at(Path::new(AT), OFlags::PATH | OFlags::DIRECTORY) else {
        return Ok(());
    };
    if rustix::fs::statat(&bin, "hull", AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return Ok(());
    }
    let client = Path::new(INNER_API_BIN).join("hull");
    rustix::fs::symlinkat(&client, &bin, "hull").map_err(|e| SetupError::Create {
        path: inner_path(&format!("{AT}/hull")),
        source: e.into(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_and_work_share_a_mount_only_under_one_parent() {
        let (upper, work) = (
            Path::new("/v/layers/l1/upper"),
            Path::new("/v/layers/l1/work"),
        );
        let (parent, u, w) = shared_parent(upper, work).unwrap();
        assert_eq!(parent, Path::new("/v/layers/l1"));
        assert_eq!((u, w), (OsStr::new("upper"), OsStr::new("work")));
        assert!(shared_parent(upper, Path::new("/v/layers/l2/work")).is_none());
    }

    #[test]
    fn hull_s_mounts_belong_to_the_inner_s_root() {
        let mapped = Owner(Some(100_000));
        assert_eq!(mapped.tmpfs("mode=755"), "mode=755,uid=100000,gid=100000");
        assert_eq!(mapped.gid(5), 100_005);
        let unmapped = Owner(None);
        assert_eq!(unmapped.tmpfs("mode=755"), "mode=755");
        assert_eq!(unmapped.gid(5), 5);
    }
}
