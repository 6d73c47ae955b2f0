//! The btrfs volume under the state directory: the state directory itself
//! when it is on btrfs (a VM booted from vm-image), otherwise a sparse image
//! file formatted with mkfs.btrfs and loop-mounted at `<state>/volume`.

use std::fs;
use std::os::unix::fs::MetadataExt;
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

impl Volume {
    /// Finds or creates the volume; `image_size` is the sparse image's size.
    pub fn open(state_dir: &Path, image_size: u64) -> Result<Self, VolumeError> {
        let create = |path: &Path| {
            fs::create_dir_all(path).map_err(|source| VolumeError::Create {
                path: path.to_path_buf(),
                source,
            })
        };
        let mount_point = state_dir.join("volume");
        create(&mount_point)?;
        if btrfs::is_btrfs(state_dir) && !is_mount_point(&mount_point) {
            return Ok(Volume {
                root: mount_point,
                image: None,
            });
        }
        let image = state_dir.join("volume.img");
        if is_mount_point(&mount_point) && btrfs::is_btrfs(&mount_point) {
            // Mounted by an earlier hulld that was killed before `hull down`.
            return Ok(Volume {
                root: mount_point,
                image: Some(image),
            });
        }
        if !image.exists() {
            tracing::warn!(
                state_dir = %state_dir.display(),
                image = %image.display(),
                size_gib = image_size as f64 / (1u64 << 30) as f64,
                "the state dir is not on btrfs: creating a sparse btrfs image for the writable layer and its checkpoints"
            );
            let partial = state_dir.join("volume.img.partial");
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
