//! Mounts made and attached by fd with the new mount API (fsopen, fsmount,
//! open_tree, move_mount, mount_setattr): the target is an fd found in the
//! layer by [`crate::layer::Layer`], never a path the kernel resolves again
//! with the init's privilege, and a mount gets its flags (read-only,
//! nosuid ...) before it is attached, so it is never seen without them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::CWD;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags};

pub const NOSUID: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_NOSUID;
pub const NODEV: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_NODEV;
pub const NOEXEC: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_NOEXEC;
pub const RDONLY: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_RDONLY;
/// What every mount of data (not programs, not devices) gets.
pub const HARDENED: MountAttrFlags = NOSUID.union(NODEV).union(NOEXEC);

/// A new, detached instance of `fstype`. `options` are as mount(8) takes
/// them: `key=value` or a bare flag, separated by commas.
pub fn new_fs(fstype: &str, options: &str, attrs: MountAttrFlags) -> io::Result<OwnedFd> {
    let fs = rustix::mount::fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC)?;
    // Named as mount(8) names them (the device column of /proc/mounts).
    rustix::mount::fsconfig_set_string(&fs, "source", fstype)?;
    for option in options.split(',').filter(|o| !o.is_empty()) {
        match option.split_once('=') {
            Some((key, value)) => rustix::mount::fsconfig_set_string(&fs, key, value)?,
            None => rustix::mount::fsconfig_set_flag(&fs, option)?,
        }
    }
    rustix::mount::fsconfig_create(&fs)?;
    Ok(rustix::mount::fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        attrs,
    )?)
}

/// A detached copy of the mount at `at` (an fd), as a bind mount would make.
pub fn clone_fd(at: &impl AsFd, recursive: bool) -> io::Result<OwnedFd> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    Ok(rustix::mount::open_tree(at, "", flags)?)
}

/// A detached copy of hulld's own `path` (outside the layer).
pub fn clone_path(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::mount::open_tree(
        CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )?)
}

/// Attaches the detached mount `mount` on `target`.
pub fn attach(mount: &impl AsFd, target: &impl AsFd) -> io::Result<()> {
    Ok(rustix::mount::move_mount(
        mount,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?)
}

/// Attaches the detached mount `mount` over hulld's own `path` (outside
/// the layer) in the caller's mount namespace, and opens it there.
pub fn attach_over(mount: &impl AsFd, path: &Path) -> io::Result<OwnedFd> {
    rustix::mount::move_mount(
        mount,
        "",
        CWD,
        path,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(rustix::fs::open(
        path,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

/// Adds `attrs` to the mount `mount` (and every mount below it when
/// `recursive`).
pub fn set_attrs(mount: &impl AsFd, attrs: MountAttrFlags, recursive: bool) -> io::Result<()> {
    mount_setattr(mount, attrs, None, recursive)
}

/// A detached copy of hulld's `path` whose ids read through the user
/// namespace `userns`: its id 0 is the namespace's root.
pub fn clone_idmapped(path: &Path, userns: &impl AsFd) -> io::Result<OwnedFd> {
    let copy = clone_path(path)?;
    mount_setattr(
        &copy,
        MountAttrFlags::MOUNT_ATTR_IDMAP,
        Some(userns.as_fd()),
        false,
    )?;
    Ok(copy)
}

/// rustix has no mount_setattr(2), hence the raw call.
fn mount_setattr(
    mount: &impl AsFd,
    attrs: MountAttrFlags,
    userns: Option<std::os::fd::BorrowedFd<'_>>,
    recursive: bool,
) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: u64::from(attrs.bits()),
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |fd| u64::from(fd.as_raw_fd().unsigned_abs())),
    };
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: the fds are open for the call's duration, the path is a
    // NUL-terminated empty string, and `attr` is a valid mount_attr whose
    // size is passed with it; the kernel only reads both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_fd().as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
