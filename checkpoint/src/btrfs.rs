//! The btrfs ioctls the storage stack needs: create a subvolume, snapshot
//! one (read-only or writable), destroy one, and the quota calls (enable
//! quotas, limit a subvolume, find its id and the filesystem's). Hand-written over
//! nix's ioctl macros: the only crate wrapping them (btrfsutil) needs the C
//! libbtrfsutil and lags the kernel, and these are a few stable structs.
//! The send stream of a snapshot goes through the btrfs tool as a child
//! process ([`send`], [`receive`]).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub use crate::stream::{receive, send, Receive, Send, SendStream, StreamError};

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
nix::ioctl_none!(ioc_sync, 0x94, 8);
nix::ioctl_readwrite!(ioc_ino_lookup, 0x94, 18, InoLookupArgs);
nix::ioctl_read!(ioc_fs_info, 0x94, 31, FsInfoArgs);
nix::ioctl_readwrite!(ioc_quota_ctl, 0x94, 40, QuotaCtlArgs);
// The kernel declares BTRFS_IOC_QGROUP_LIMIT as _IOR although it only
// reads the struct; the number must match its declaration.
nix::ioctl_read!(ioc_qgroup_limit, 0x94, 43, QgroupLimitArgs);
nix::ioctl_write_ptr!(ioc_quota_rescan, 0x94, 44, QuotaRescanArgs);

/// `struct btrfs_ioctl_quota_rescan_args`.
#[repr(C)]
pub struct QuotaRescanArgs {
    flags: u64,
    progress: u64,
    reserved: [u64; 6],
}

/// `struct btrfs_ioctl_ino_lookup_args`.
#[repr(C)]
pub struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; INO_LOOKUP_PATH_MAX],
}

/// `struct btrfs_ioctl_fs_info_args`, of which only the fsid is read.
#[repr(C)]
pub struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    rest: [u8; 1024 - 32],
}

/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
pub struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

/// `struct btrfs_ioctl_qgroup_limit_args` with its `struct btrfs_qgroup_limit`.
#[repr(C)]
pub struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

const INO_LOOKUP_PATH_MAX: usize = 4080;
/// The objectid of every subvolume's root directory.
const FIRST_FREE_OBJECTID: u64 = 256;
const QUOTA_CTL_ENABLE: u64 = 1;
const QUOTA_CTL_ENABLE_SIMPLE_QUOTA: u64 = 4;
const QGROUP_LIMIT_MAX_RFER: u64 = 1;
/// A limit of this value removes the limit.
const QGROUP_LIMIT_CLEAR: u64 = u64::MAX;

/// How btrfs counts a subvolume's bytes once quotas are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// Simple quotas (Linux 6.7+): an extent is charged to the subvolume
    /// that wrote it, for its life. Nearly free, but a snapshot starts at
    /// zero: the data it shares stays charged to its writer.
    Simple,
    /// Full qgroup accounting: a subvolume is charged for every extent it
    /// references, shared or not, as `df` inside it would suggest; every
    /// commit walks the back references of the extents it changed.
    Full,
}

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

/// Commits the filesystem holding `path` and wakes its transaction
/// thread, which wakes the cleaner: a deleted subvolume's extents are
/// freed now rather than after the next periodic commit (30 s).
pub fn sync_and_clean(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    // SAFETY: BTRFS_IOC_SYNC takes no argument; the fd stays open for the
    // call.
    unsafe { ioc_sync(dir.as_raw_fd()) }?;
    Ok(())
}

/// Turns quotas on for the filesystem holding `path` (a transaction
/// commit; nothing when they are on already, in either mode). Full
/// accounting starts a rescan of the existing data in the kernel's
/// background; simple quotas charge only extents written from now on.
pub fn enable_quotas(path: &Path, mode: QuotaMode) -> io::Result<()> {
    let dir = File::open(path)?;
    let mut args = QuotaCtlArgs {
        cmd: match mode {
            QuotaMode::Simple => QUOTA_CTL_ENABLE_SIMPLE_QUOTA,
            QuotaMode::Full => QUOTA_CTL_ENABLE,
        },
        status: 0,
    };
    // SAFETY: BTRFS_IOC_QUOTA_CTL reads and writes a
    // btrfs_ioctl_quota_ctl_args, which `args` is, for the call's duration.
    unsafe { ioc_quota_ctl(dir.as_raw_fd(), &mut args) }?;
    Ok(())
}

/// Starts a rescan of the qgroup counts of the filesystem holding `path`
/// in the kernel's background (EINPROGRESS when one runs already).
pub fn start_quota_rescan(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    let args = QuotaRescanArgs {
        flags: 0,
        progress: 0,
        reserved: [0; 6],
    };
    // SAFETY: BTRFS_IOC_QUOTA_RESCAN reads a btrfs_ioctl_quota_rescan_args,
    // which `args` is, for the call's duration.
    unsafe { ioc_quota_rescan(dir.as_raw_fd(), &args) }?;
    Ok(())
}

/// Limits the bytes the subvolume at `path` references to `max` (`None`
/// lifts the limit). A write past it fails with EDQUOT.
pub fn limit_referenced(path: &Path, max: Option<u64>) -> io::Result<()> {
    let subvol = File::open(path)?;
    let mut args = QgroupLimitArgs {
        // 0: the qgroup of the subvolume the fd is in.
        qgroupid: 0,
        flags: QGROUP_LIMIT_MAX_RFER,
        max_rfer: max.unwrap_or(QGROUP_LIMIT_CLEAR),
        max_excl: 0,
        rsv_rfer: 0,
        rsv_excl: 0,
    };
    // SAFETY: BTRFS_IOC_QGROUP_LIMIT reads a btrfs_ioctl_qgroup_limit_args,
    // which `args` is (repr(C), the kernel's layout), for the call.
    unsafe { ioc_qgroup_limit(subvol.as_raw_fd(), &mut args) }?;
    Ok(())
}

/// The id of the subvolume whose root is `path`.
pub fn subvolume_id(path: &Path) -> io::Result<u64> {
    let dir = File::open(path)?;
    let mut args = Box::new(InoLookupArgs {
        treeid: 0,
        objectid: FIRST_FREE_OBJECTID,
        name: [0; INO_LOOKUP_PATH_MAX],
    });
    // SAFETY: BTRFS_IOC_INO_LOOKUP reads and writes a
    // btrfs_ioctl_ino_lookup_args, which `args` is; treeid 0 asks for the
    // tree of the fd's own subvolume, which the kernel writes back.
    unsafe { ioc_ino_lookup(dir.as_raw_fd(), &mut *args) }?;
    Ok(args.treeid)
}

/// The filesystem's UUID as /sys/fs/btrfs names its directory.
pub fn fsid(path: &Path) -> io::Result<String> {
    let dir = File::open(path)?;
    let mut args = Box::new(FsInfoArgs {
        max_id: 0,
        num_devices: 0,
        fsid: [0; 16],
        rest: [0; 1024 - 32],
    });
    // SAFETY: BTRFS_IOC_FS_INFO writes a btrfs_ioctl_fs_info_args (1024
    // bytes, which `args` is) and reads its flags, zero here: the v1 reply.
    unsafe { ioc_fs_info(dir.as_raw_fd(), &mut *args) }?;
    let hex: String = args.fsid.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernels_sizes() {
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
        assert_eq!(std::mem::size_of::<VolArgsV2>(), 4096);
        assert_eq!(std::mem::size_of::<InoLookupArgs>(), 4096);
        assert_eq!(std::mem::size_of::<FsInfoArgs>(), 1024);
        assert_eq!(std::mem::size_of::<QuotaCtlArgs>(), 16);
        assert_eq!(std::mem::size_of::<QgroupLimitArgs>(), 48);
        assert_eq!(std::mem::size_of::<QuotaRescanArgs>(), 64);
    }
}
