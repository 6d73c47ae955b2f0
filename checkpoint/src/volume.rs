//! The btrfs volume under the state directory: the state directory itself
//! when it is on btrfs (a VM booted from vm-image), otherwise a sparse image
//! file formatted with mkfs.btrfs and loop-mounted at `<state>/volume`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::btrfs;

/// One copy of the metadata: both copies of DUP would sit in the same file
/// on the same host disk, and every commit (each checkpoint is one) would
/// write them twice. Below 1 GiB data and metadata share block groups
/// (as mkfs.btrfs advises for small filesystems): otherwise data can take
/// every chunk, and a full volume stays unable to snapshot even after the
/// data is deleted, for want of metadata space.
fn mkfs_profile(size: u64) -> &'static [&'static str] {
    if size < 1 << 30 {
        &["--mixed", "--metadata", "single", "--data", "single"]
    } else {
        &["--metadata", "single"]
    }
}

/// Dirty data the loop volume may hold before writers wait for writeback.
/// A checkpoint's syncfs writes out whatever is dirty, so this bounds its
/// cost: 64 MiB is about 60 ms of this VM's disk, where an unbounded page
/// cache let a checkpoint right after a 1 GiB write take 1.5 s or more.
pub const DIRTY_MAX_BYTES: u64 = 64 << 20;

// LOOP_SET_DIRECT_IO from <linux/loop.h>; the libc crate does not have it.
nix::ioctl_write_int_bad!(loop_set_direct_io, 0x4C08);

/// Makes a checkpoint wait for at most a bounded flush of the loop volume
/// mounted at `mount_point`, in two steps, both needed:
///
/// - the loop device does direct I/O on its image: otherwise btrfs's
///   writeback only moves its dirty pages into the image file's page cache
///   on the host filesystem, where they stay dirty (no limit of the
///   volume's applies there) until the flush a syncfs sends down the loop
///   device writes all of them;
/// - btrfs's own bdi gets `max_bytes` with `strict_limit`: without the
///   strict limit a bdi's share counts only once the whole machine's dirty
///   memory passes its background threshold, gigabytes on a large VM.
///
/// Either can be missing (an older kernel has no `max_bytes`, a host
/// filesystem without O_DIRECT refuses direct I/O); the volume works
/// without them, its checkpoints just pay for the page cache's backlog,
/// so a failure is logged, not returned.
fn bound_dirty(mount_point: &Path) {
    let bound = match DirtyBound::find(mount_point) {
        Ok(bound) => bound,
        Err(e) => {
            tracing::warn!(mount = %mount_point.display(), "cannot find the volume's loop device or bdi, its dirty data stays unbounded: {e}");
            return;
        }
    };
    if let Err(e) = bound.set_direct_io(true) {
        tracing::warn!(device = %bound.device.display(), "direct I/O for the loop volume refused, a checkpoint flushes the image file's page cache too: {e}");
    }
    if let Err(e) = bound.limit(Some(DIRTY_MAX_BYTES)) {
        tracing::warn!(bdi = %bound.bdi.display(), "cannot bound the volume's dirty data: {e}");
    }
}

/// The two places that decide how much of a loop volume can be dirty.
#[derive(Debug, Clone)]
pub struct DirtyBound {
    /// The loop device, `/dev/loopN`.
    pub device: PathBuf,
    /// The sysfs directory of the btrfs filesystem's bdi.
    pub bdi: PathBuf,
}

impl DirtyBound {
    /// Those of the loop volume mounted at `mount_point`.
    pub fn find(mount_point: &Path) -> std::io::Result<DirtyBound> {
        let device = loop_device(mount_point)?;
        let name = device.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let bdi = btrfs_bdi(name)?;
        Ok(DirtyBound { device, bdi })
    }

    pub fn set_direct_io(&self, on: bool) -> std::io::Result<()> {
        let file = fs::File::open(&self.device)?;
        // SAFETY: LOOP_SET_DIRECT_IO takes its argument by value (no pointer
        // for the kernel to follow) and the fd is a loop device opened here
        // and held for the duration of the call.
        unsafe { loop_set_direct_io(file.as_raw_fd(), on.into()) }?;
        Ok(())
    }

    /// Bounds the bdi's dirty data to `max_bytes`, strictly; `None` puts
    /// back the kernel's defaults (a share of the machine's limit).
    pub fn limit(&self, max_bytes: Option<u64>) -> std::io::Result<()> {
        let Some(bytes) = max_bytes else {
            // max_bytes is stored as a ratio: writing the ratio resets both.
            fs::write(self.bdi.join("max_ratio"), "100")?;
            return fs::write(self.bdi.join("strict_limit"), "0");
        };
        let knob = self.bdi.join("max_bytes");
        if knob.exists() {
            fs::write(&knob, bytes.to_string())?;
        } else {
            // Before Linux 6.2 only a share of the machine's dirty limit can
            // be set; 1% of a 20% limit is tens of MiB on a VM of a few GiB.
            fs::write(self.bdi.join("max_ratio"), "1")?;
        }
        fs::write(self.bdi.join("strict_limit"), "1")
    }
}

/// The source device of the mount at `mount_point`, from mountinfo (the
/// st_dev of a btrfs file is an anonymous device, not the loop device).
fn loop_device(mount_point: &Path) -> std::io::Result<PathBuf> {
    let target = fs::canonicalize(mount_point)?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    // The last match: a mount on top of another is listed after it.
    mountinfo
        .lines()
        .rev()
        .find_map(|line| {
            let (ours, theirs) = line.split_once(" - ")?;
            let point = unescape_mountinfo(ours.split(' ').nth(4)?);
            let source = theirs.split(' ').nth(1)?;
            (Path::new(&point) == target && source.starts_with("/dev/loop"))
                .then(|| PathBuf::from(source))
        })
        .ok_or_else(|| std::io::Error::other(format!("no loop mount at {}", target.display())))
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The bdi of the btrfs filesystem on `device` (btrfs gives each
/// filesystem a bdi of its own, `btrfs-N`, rather than the device's).
fn btrfs_bdi(device: &str) -> std::io::Result<PathBuf> {
    for fs_dir in fs::read_dir("/sys/fs/btrfs")? {
        let fs_dir = fs_dir?.path();
        if fs_dir.join("devices").join(device).exists() {
            return Ok(fs_dir.join("bdi"));
        }
    }
    Err(std::io::Error::other(format!(
        "no btrfs filesystem on {device} in /sys/fs/btrfs"
    )))
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not on btrfs and hull cannot create its loop image there (put the state dir on btrfs or make it writable)")]
    Image {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot run {program} (install btrfs-progs and mount: apt-get install btrfs-progs mount)"
    )]
    Tool {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{program} failed on {path}: {detail}")]
    ToolFailed {
        program: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{path} has {free} bytes free; hull keeps {reserve} of them for its own state (daemon.disk_reserve), which leaves less than the {min} bytes the volume needs: free some space or lower the reserve")]
    NoRoom {
        path: PathBuf,
        free: u64,
        reserve: u64,
        min: u64,
    },
    #[error("cannot read the free space of {path}")]
    FreeSpace { path: PathBuf, source: nix::Error },
    #[error("cannot unmount {path}")]
    Unmount { path: PathBuf, source: nix::Error },
}

/// Where layers and checkpoints live.
#[derive(Debug, Clone)]
pub struct Volume {
    /// The btrfs directory holding `layers/` and `checkpoints/`.
    pub root: PathBuf,
    /// The loop image backing it, when the state dir is not on btrfs.
    pub image: Option<PathBuf>,
}

fn is_mount_point(path: &Path) -> bool {
    match (fs::metadata(path), path.parent().map(fs::metadata)) {
        (Ok(m), Some(Ok(p))) => m.dev() != p.dev(),
        _ => false,
    }
}

fn run(program: &'static str, cmd: &mut Command, path: &Path) -> Result<(), VolumeError> {
    let out = cmd
        .output()
        .map_err(|source| VolumeError::Tool { program, source })?;
    if !out.status.success() {
        return Err(VolumeError::ToolFailed {
            program,
            path: path.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The smallest loop image hull makes: mkfs.btrfs's mixed profile and a
/// layer worth having.
pub const MIN_IMAGE: u64 = 256 << 20;

/// The size of a new sparse image: `wanted`, or less so that the state
/// dir's filesystem keeps `reserve` free when the image has filled up (the
/// inner could otherwise fill the disk hulld's catalog and logs live on).
fn image_size(state_dir: &Path, wanted: u64, reserve: u64) -> Result<u64, VolumeError> {
    let stat = nix::sys::statvfs::statvfs(state_dir).map_err(|source| VolumeError::FreeSpace {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let free = stat.blocks_available().saturating_mul(stat.fragment_size());
    let room = free.saturating_sub(reserve);
    if room < MIN_IMAGE.min(wanted) {
        return Err(VolumeError::NoRoom {
            path: state_dir.to_path_buf(),
            free,
            reserve,
            min: MIN_IMAGE.min(wanted),
        });
    }
    if room < wanted {
        tracing::warn!(
            wanted,
            size = room,
            free,
            reserve,
            "the volume image is sized to the free space less hull's reserve, not to volume_size"
        );
    }
    Ok(wanted.min(room))
}

/// Where the storage stack keeps its files, as hulld's state dir names
/// them (`hull_outer::StateDir`): the volume's mount point (or the btrfs
/// directory itself), its image when the state dir is not on btrfs, and
/// the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoragePaths {
    /// The directory the paths are in, whose filesystem decides whether
    /// an image is needed and how large it may be.
    pub state_dir: PathBuf,
    pub volume: PathBuf,
    pub volume_image: PathBuf,
    pub catalog: PathBuf,
}

impl Volume {
    /// Finds or creates the volume; a new sparse image is `image_size`
    /// bytes, or less so that `reserve` bytes stay free beside it.
    pub fn open(paths: &StoragePaths, image_size: u64, reserve: u64) -> Result<Self, VolumeError> {
        let state_dir = paths.state_dir.as_path();
        let create = |path: &Path| {
            fs::create_dir_all(path).map_err(|source| VolumeError::Create {
                path: path.to_path_buf(),
                source,
            })
        };
        let mount_point = paths.volume.clone();
        create(&mount_point)?;
        if btrfs::is_btrfs(state_dir) && !is_mount_point(&mount_point) {
            return Ok(Volume {
                root: mount_point,
                image: None,
            });
        }
        let image = paths.volume_image.clone();
        if is_mount_point(&mount_point) && btrfs::is_btrfs(&mount_point) {
            // Mounted by an earlier hulld that was killed before `hull down`.
            bound_dirty(&mount_point);
            return Ok(Volume {
                root: mount_point,
                image: Some(image),
            });
        }
        if !image.exists() {
            let image_size = self::image_size(state_dir, image_size, reserve)?;
            tracing::warn!(
                state_dir = %state_dir.display(),
                image = %image.display(),
                size_gib = image_size as f64 / (1u64 << 30) as f64,
                "the state dir is not on btrfs: creating a sparse btrfs image for the writable layer and its checkpoints"
            );
            let partial = image.with_extension("img.partial");
            let file = fs::File::create(&partial).map_err(|source| VolumeError::Image {
                path: partial.clone(),
                source,
            })?;
            file.set_len(image_size)
                .map_err(|source| VolumeError::Image {
                    path: partial.clone(),
                    source,
                })?;
            drop(file);
            run(
                "mkfs.btrfs",
                Command::new("mkfs.btrfs")
                    .args(["-q", "-f"])
                    .args(mkfs_profile(image_size))
                    .arg(&partial),
                &partial,
            )?;
            fs::rename(&partial, &image).map_err(|source| VolumeError::Image {
                path: image.clone(),
                source,
            })?;
        }
        // mount(8) sets up the loop device with autoclear: unmounting frees it.
        run(
            "mount",
            Command::new("mount")
                .args(["-t", "btrfs", "-o", "loop,noatime"])
                .arg(&image)
                .arg(&mount_point),
            &mount_point,
        )?;
        tracing::info!(image = %image.display(), mount = %mount_point.display(), "mounted the btrfs volume");
        bound_dirty(&mount_point);
        Ok(Volume {
            root: mount_point,
            image: Some(image),
        })
    }

    /// Unmounts a loop-backed volume (the loop device goes with it).
    pub fn close(&self) -> Result<(), VolumeError> {
        if self.image.is_some() && is_mount_point(&self.root) {
            nix::mount::umount(&self.root).map_err(|source| VolumeError::Unmount {
                path: self.root.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(
            unescape_mountinfo(r"/tmp/a\040b\134c/volume"),
            r"/tmp/a b\c/volume"
        );
        // A backslash not followed by three octal digits stays as it is.
        assert_eq!(unescape_mountinfo(r"/x\9"), r"/x\9");
    }
}
