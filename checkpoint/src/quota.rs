//! The quota on the writable layer: btrfs qgroups on the volume, a limit
//! on the bytes each new layer references, and its usage for `status`.
//! Every layer gets the limit when it is made (empty, by a restore, by
//! recovery), because a snapshot otherwise inherits whatever limit its
//! source had; checkpoints keep the one they inherit, which a read-only
//! snapshot can never reach.

use std::fs;
use std::path::{Path, PathBuf};

use crate::btrfs::{self, QuotaMode};
use crate::volume::Volume;

/// `[storage] layer_quota`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerQuota {
    /// No limit (quotas already on stay on, with no limit on new layers).
    Off,
    /// The volume less a margin for checkpoints' metadata: see [`auto_limit`].
    Auto,
    Bytes(u64),
}

/// How the layer's quota is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSettings {
    pub size: LayerQuota,
    pub mode: QuotaMode,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        QuotaSettings {
            size: LayerQuota::Auto,
            mode: QuotaMode::Simple,
        }
    }
}

/// What the current layer holds and may hold, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerUsage {
    pub used: u64,
    pub limit: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("cannot read the size of the volume {path}")]
    Size { path: PathBuf, source: nix::Error },
    #[error("cannot turn on btrfs quotas on the volume {path}")]
    Enable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the btrfs filesystem id of {path}")]
    FsId {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set the quota of the layer {path}")]
    Limit {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The least room the default quota leaves on the volume: a snapshot, the
/// checkpoint that follows a full layer, needs metadata space.
const MIN_MARGIN: u64 = 128 << 20;

/// The default quota: the volume's size less a tenth of it (at least
/// 128 MiB) and, when the volume is the state dir's own filesystem, less
/// `disk_reserve` too, so a full layer leaves room to checkpoint it and
/// for hulld's own files.
pub fn auto_limit(volume_size: u64, shares_state_dir: bool, disk_reserve: u64) -> u64 {
    let margin = (volume_size / 10).max(MIN_MARGIN);
    let reserve = if shares_state_dir { disk_reserve } else { 0 };
    volume_size
        .saturating_sub(margin)
        .saturating_sub(reserve)
        .max(volume_size / 2)
}

/// The volume's quota state, fixed at start.
#[derive(Debug)]
pub(crate) struct Quotas {
    /// The limit every new layer gets; `None`: none.
    limit: Option<u64>,
    /// `/sys/fs/btrfs/<fsid>/qgroups`, when quotas are on.
    qgroups: Option<PathBuf>,
}

impl Quotas {
    /// Turns quotas on when a limit is wanted (a commit, and for full
    /// accounting on a volume with data a rescan the kernel runs in the
    /// background) and works out the limit.
    pub(crate) fn open(
        volume: &Volume,
        settings: QuotaSettings,
        disk_reserve: u64,
    ) -> Result<Quotas, QuotaError> {
        let root = &volume.root;
        let limit = match settings.size {
            LayerQuota::Off => None,
            LayerQuota::Bytes(n) => Some(n),
            LayerQuota::Auto => {
                let stat = nix::sys::statvfs::statvfs(root).map_err(|source| QuotaError::Size {
                    path: root.clone(),
                    source,
                })?;
                let size = stat.blocks().saturating_mul(stat.fragment_size());
                Some(auto_limit(size, volume.image.is_none(), disk_reserve))
            }
        };
        let fsid = btrfs::fsid(root).map_err(|source| QuotaError::FsId {
            path: root.clone(),
            source,
        })?;
        let qgroups = Path::new("/sys/fs/btrfs").join(fsid).join("qgroups");
        if limit.is_some() && !qgroups.is_dir() {
            enable(root, settings.mode)?;
        }
        let on = qgroups.is_dir();
        if on {
            let mode = fs::read_to_string(qgroups.join("mode")).unwrap_or_default();
            tracing::info!(mode = mode.trim(), limit, volume = %root.display(), "layer quota");
            rescan_if_inconsistent(root, &qgroups);
        }
        Ok(Quotas {
            limit,
            qgroups: on.then_some(qgroups),
        })
    }

    /// Gives the layer subvolume at `dir` the configured limit (or takes
    /// away the one it inherited when there is none).
    pub(crate) fn apply(&self, dir: &Path) -> Result<(), QuotaError> {
        if self.qgroups.is_none() {
            return Ok(());
        }
        btrfs::limit_referenced(dir, self.limit).map_err(|source| QuotaError::Limit {
            path: dir.to_path_buf(),
            source,
        })
    }

    /// Takes the limit off the layer at `dir` for a moment (nothing when
    /// there is none).
    pub(crate) fn lift(&self, dir: &Path) -> Result<(), QuotaError> {
        if self.qgroups.is_none() || self.limit.is_none() {
            return Ok(());
        }
        btrfs::limit_referenced(dir, None).map_err(|source| QuotaError::Limit {
            path: dir.to_path_buf(),
            source,
        })
    }

    /// The sysfs directory of the qgroup of the layer at `dir`, read by
    /// [`read_usage`] without touching the volume.
    pub(crate) fn usage_dir(&self, dir: &Path) -> Option<PathBuf> {
        let qgroups = self.qgroups.as_ref()?;
        match btrfs::subvolume_id(dir) {
            Ok(id) => Some(qgroups.join(format!("0_{id}"))),
            Err(e) => {
                tracing::warn!(layer = %dir.display(), "cannot find the layer's subvolume id, its usage goes unreported: {e}");
                None
            }
        }
    }
}

fn enable(root: &Path, mode: QuotaMode) -> Result<(), QuotaError> {
    let enabled = match btrfs::enable_quotas(root, mode) {
        // Simple quotas came with Linux 6.7; older kernels refuse the
        // command as invalid and get full accounting instead.
        Err(e) if mode == QuotaMode::Simple && e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(volume = %root.display(), "this kernel has no simple quotas; using full qgroup accounting, which makes checkpoints after large writes slower");
            btrfs::enable_quotas(root, QuotaMode::Full)
        }
        other => other,
    };
    enabled.map_err(|source| QuotaError::Enable {
        path: root.to_path_buf(),
        source,
    })?;
    tracing::info!(volume = %root.display(), ?mode, "turned on btrfs quotas on the volume");
    Ok(())
}

/// Full accounting gives up on exact counts where tracing a change would
/// cost too much (deleting a tall subvolume, see the kernel's
/// `drop_subtree_threshold`) and marks them inconsistent; a rescan, which
/// the kernel runs in the background, makes them right again.
fn rescan_if_inconsistent(root: &Path, qgroups: &Path) {
    let inconsistent =
        fs::read_to_string(qgroups.join("inconsistent")).is_ok_and(|flag| flag.trim() == "1");
    if !inconsistent {
        return;
    }
    match btrfs::start_quota_rescan(root) {
        Ok(()) => {
            tracing::warn!(volume = %root.display(), "the volume's quota counts are inconsistent; rescanning them in the background")
        }
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => {
            tracing::warn!(volume = %root.display(), "the volume's quota counts are inconsistent and a rescan was refused, the layer's usage may be off: {e}")
        }
    }
}

/// The usage and limit in a qgroup's sysfs directory.
pub(crate) fn read_usage(dir: &Path) -> std::io::Result<LayerUsage> {
    let number = |name: &str| -> std::io::Result<u64> {
        fs::read_to_string(dir.join(name))?
            .trim()
            .parse()
            .map_err(std::io::Error::other)
    };
    let limited = number("limit_flags")? & 1 != 0;
    Ok(LayerUsage {
        used: number("referenced")?,
        limit: if limited {
            Some(number("max_referenced")?)
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_quota_leaves_room_on_the_volume() {
        assert_eq!(
            auto_limit(64 << 30, false, 2 << 30),
            (64 << 30) - (64 << 30) / 10
        );
        assert_eq!(auto_limit(300 << 20, false, 2 << 30), 172 << 20);
        // The state dir's own filesystem keeps the reserve too.
        assert_eq!(
            auto_limit(64 << 30, true, 2 << 30),
            (64 << 30) - (64 << 30) / 10 - (2 << 30)
        );
        // Never below half the volume.
        assert_eq!(auto_limit(256 << 20, true, 2 << 30), 128 << 20);
    }
}
