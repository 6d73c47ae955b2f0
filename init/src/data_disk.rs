//! The VM's data disk: hulld's state directory, on btrfs, kept across
//! boots. An empty disk is formatted at first boot; a disk that holds
//! something other than btrfs is never formatted (its data may matter):
//! the state then lives on a tmpfs and the console says so.
//!
//! A clean shutdown leaves a marker on the disk after the last write; the
//! next boot reads and removes it, so the console says whether the last
//! run ended in a power-off or a crash (after which btrfs replays its log
//! tree and hulld recovers what it was doing).

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The data disk when the command line names none: the first virtio disk
/// (QEMU, Firecracker and Cloud Hypervisor all name it so).
pub const DEFAULT_DEVICE: &str = "/dev/vda";
/// The file a clean shutdown leaves on the disk.
pub const CLEAN_MARKER: &str = ".clean-shutdown";
/// The btrfs label a formatted disk gets.
pub const LABEL: &str = "hull-data";

/// Where btrfs keeps its primary superblock, and its magic within it.
const SUPERBLOCK_OFFSET: u64 = 0x1_0000;
const MAGIC_OFFSET: u64 = SUPERBLOCK_OFFSET + 0x40;
const MAGIC: &[u8; 8] = b"_BHRfS_M";
/// How much of the start of the disk must be zero for it to count as
/// empty: every filesystem and partition table hull could meet writes its
/// signature in the first MiB.
const BLANK_PROBE: usize = 1 << 20;
/// How long to wait for the device node after the virtio modules load.
const DEVICE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Btrfs,
    /// All zero where a signature would be.
    Blank,
    /// Something else: never formatted over.
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum DataDiskError {
    #[error("the data disk {path} did not appear within {} s", DEVICE_WAIT.as_secs())]
    NoDevice { path: PathBuf },
    #[error("{path} is not a block device")]
    NotABlockDevice { path: PathBuf },
    #[error("cannot read the data disk {path}")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the data disk {path} holds something that is not btrfs: not formatting it")]
    Foreign { path: PathBuf },
    #[error("cannot run mkfs.btrfs on {path}")]
    MkfsSpawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mkfs.btrfs failed on {path}: {stderr}")]
    Mkfs { path: PathBuf, stderr: String },
    #[error("cannot mount the data disk {path} at {target}")]
    Mount {
        path: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// What `content` says of the bytes at the start of a disk: the first
/// `BLANK_PROBE` bytes, which include the primary superblock.
pub fn classify(head: &[u8]) -> Content {
    let magic_at = usize::try_from(MAGIC_OFFSET).unwrap_or(usize::MAX);
    if head.get(magic_at..magic_at + MAGIC.len()) == Some(MAGIC.as_slice()) {
        return Content::Btrfs;
    }
    if head.iter().all(|b| *b == 0) {
        Content::Blank
    } else {
        Content::Other
    }
}

/// Waits for `path` to appear as a block device.
pub fn wait_for(path: &Path) -> Result<(), DataDiskError> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        match fs::metadata(path) {
            Ok(meta) if meta.file_type().is_block_device() => return Ok(()),
            Ok(_) => {
                return Err(DataDiskError::NotABlockDevice {
                    path: path.to_path_buf(),
                })
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => {
                return Err(DataDiskError::NoDevice {
                    path: path.to_path_buf(),
                })
            }
        }
    }
}

pub fn probe(path: &Path) -> Result<Content, DataDiskError> {
    let error = |source| DataDiskError::Probe {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(path).map_err(error)?;
    file.seek(SeekFrom::Start(0)).map_err(error)?;
    let mut head = Vec::with_capacity(BLANK_PROBE);
    file.take(BLANK_PROBE as u64)
        .read_to_end(&mut head)
        .map_err(error)?;
    Ok(classify(&head))
}

/// No discard: the disk is new and empty, and discarding gigabytes of a
/// sparse file takes seconds under emulation. One copy of metadata: the
/// disk is one file on the host, where DUP's
/// second copy guards against nothing and doubles every commit's writes.
pub fn format(path: &Path, search_path: &str) -> Result<(), DataDiskError> {
    let output = Command::new("mkfs.btrfs")
        .env("PATH", search_path)
        .args(["-q", "--nodiscard", "-L", LABEL, "--metadata", "single"])
        .arg(path)
        .output()
        .map_err(|source| DataDiskError::MkfsSpawn {
            path: path.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(DataDiskError::Mkfs {
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

pub fn mount(path: &Path, target: &Path) -> Result<(), DataDiskError> {
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(path),
        target,
        Some("btrfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|source| DataDiskError::Mount {
        path: path.to_path_buf(),
        target: target.to_path_buf(),
        source,
    })
}

/// Whether the last run ended in a clean shutdown; takes the marker away,
/// so a crash from here on is seen at the next boot.
pub fn take_clean_marker(state_dir: &Path) -> bool {
    let marker = state_dir.join(CLEAN_MARKER);
    let clean = marker.exists();
    if clean {
        let _ = fs::remove_file(&marker);
        nix::unistd::sync();
    }
    clean
}

/// Leaves the marker, after everything else is written.
pub fn mark_clean(state_dir: &Path) -> io::Result<()> {
    fs::write(state_dir.join(CLEAN_MARKER), b"")?;
    nix::unistd::sync();
    Ok(())
}

/// Copies the tree at `from` to `to` (which must not exist): directories,
/// regular files with their modes, symlinks. Anything else is skipped and
/// counted.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<usize> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(from)?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
        return Ok(0);
    }
    if kind.is_file() {
        fs::copy(from, to)?;
        return Ok(0);
    }
    if !kind.is_dir() {
        return Ok(1);
    }
    fs::create_dir(to)?;
    let mut skipped = 0;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        skipped += copy_tree(&entry.path(), &to.join(entry.file_name()))?;
    }
    fs::set_permissions(to, fs::Permissions::from_mode(meta.permissions().mode()))?;
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_btrfs_blank_or_left_alone() {
        let mut head = vec![0u8; BLANK_PROBE];
        assert_eq!(classify(&head), Content::Blank);
        let at = usize::try_from(MAGIC_OFFSET).unwrap();
        head[at..at + 8].copy_from_slice(MAGIC);
        assert_eq!(classify(&head), Content::Btrfs);
        // ext4's magic, in its superblock at 1 KiB.
        let mut ext4 = vec![0u8; BLANK_PROBE];
        ext4[1024 + 0x38..1024 + 0x3a].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(classify(&ext4), Content::Other);
        // A partition table at the very start.
        let mut mbr = vec![0u8; BLANK_PROBE];
        mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(classify(&mbr), Content::Other);
    }

    #[test]
    fn a_tree_is_copied_with_its_modes_and_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        fs::create_dir_all(from.join("bin")).unwrap();
        fs::write(from.join("bin/busybox"), b"elf").unwrap();
        fs::set_permissions(from.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("busybox", from.join("bin/sh")).unwrap();
        fs::set_permissions(from.join("bin"), fs::Permissions::from_mode(0o711)).unwrap();
        let to = dir.path().join("to");
        assert_eq!(copy_tree(&from, &to).unwrap(), 0);
        assert_eq!(fs::read(to.join("bin/busybox")).unwrap(), b"elf");
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&to.join("bin/busybox")), 0o755);
        assert_eq!(mode(&to.join("bin")), 0o711);
        assert_eq!(
            fs::read_link(to.join("bin/sh")).unwrap(),
            PathBuf::from("busybox")
        );
    }

    #[test]
    fn the_clean_marker_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!take_clean_marker(dir.path()));
        mark_clean(dir.path()).unwrap();
        assert!(take_clean_marker(dir.path()));
        assert!(!take_clean_marker(dir.path()));
    }
}
