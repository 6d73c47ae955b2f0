//! The three btrfs ioctls the storage stack needs: create a subvolume,
//! snapshot one (read-only or writable), destroy one. Hand-written over
//! nix's ioctl macros: the only crate wrapping them (btrfsutil) needs the C
//! libbtrfsutil and lags the kernel, and these are a few stable structs.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;
const PATH_NAME_MAX: usize = 4087;
const SUBVOL_NAME_MAX: usize = 4039;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
pub struct VolArgs {
    fd: i64,
    name: [u8; PATH_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args_v2`.
#[repr(C)]
pub struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; SUBVOL_NAME_MAX + 1],
}

nix::ioctl_write_ptr!(ioc_subvol_create, 0x94, 14, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_destroy, 0x94, 15, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_create_v2, 0x94, 23, VolArgsV2);

pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BTRFS_SUPER_MAGIC)
        .unwrap_or(false)
}

fn split(path: &Path) -> io::Result<(File, &OsStr)> {
    let parent = path.parent().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a subvolume needs a parent directory",
        )
    })?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a subvolume needs a name"))?;
    if name.len() > SUBVOL_NAME_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "subvolume name too long",
        ));
    }
    Ok((File::open(parent)?, name))
}

fn vol_args(name: &OsStr) -> Box<VolArgs> {
    let mut args = Box::new(VolArgs {
        fd: 0,
        name: [0; PATH_NAME_MAX + 1],
    });
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    args
}

/// Creates an empty subvolume at `path`.
pub fn create_subvolume(path: &Path) -> io::Result<()> {
    let (parent, name) = split(path)?;
    let args = vol_args(name);
    // SAFETY: BTRFS_IOC_SUBVOL_CREATE reads a btrfs_ioctl_vol_args, which
    // `args` is (repr(C), the kernel's size), for the call's duration.
    unsafe { ioc_subvol_create(parent.as_raw_fd(), &*args) }?;
    Ok(())
}

/// Snapshots subvolume `source` to `dest`: a metadata operation whose cost
/// does not depend on how much data the subvolume holds.
pub fn snapshot(source: &Path, dest: &Path, read_only: bool) -> io::Result<()> {
    let src = File::open(source)?;
    let (parent, name) = split(dest)?;
    let mut args = Box::new(VolArgsV2 {
        fd: src.as_raw_fd() as i64,
        transid: 0,
        flags: if read_only { BTRFS_SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; SUBVOL_NAME_MAX + 1],
    });
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: BTRFS_IOC_SNAP_CREATE_V2 reads a btrfs_ioctl_vol_args_v2,
    // which `args` is; `src` stays open for the call.
    unsafe { ioc_snap_create_v2(parent.as_raw_fd(), &*args) }?;
    Ok(())
}

/// Destroys the subvolume at `path` (read-only ones too; needs root).
pub fn destroy_subvolume(path: &Path) -> io::Result<()> {
    let (parent, name) = split(path)?;
    let args = vol_args(name);
    // SAFETY: BTRFS_IOC_SNAP_DESTROY reads a btrfs_ioctl_vol_args.
    unsafe { ioc_snap_destroy(parent.as_raw_fd(), &*args) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernels_sizes() {
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
        assert_eq!(std::mem::size_of::<VolArgsV2>(), 4096);
    }
}
