//! The storage stack. Today: the user's writable layer (the overlay upper and
//! work directories) in hulld's state directory, which every bounce reuses.
//! Checkpoints as copy-on-write snapshots of this layer come next.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
}

/// The user's writable layer: survives every bounce of the inner.
#[derive(Debug, Clone)]
pub struct WritableLayer {
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl WritableLayer {
    /// The layer under `state_dir`, created if missing. The directories are
    /// 0700: only root in the root namespace may look into them directly.
    pub fn open(state_dir: &Path) -> Result<Self, LayerError> {
        let base = state_dir.join("layer");
        let layer = WritableLayer {
            upper: base.join("upper"),
            work: base.join("work"),
        };
        for dir in [&base, &layer.upper, &layer.work] {
            create_private_dir(dir)?;
        }
        // The upper directory is the inner's "/": it must look like one.
        let _ = fs::set_permissions(&layer.upper, fs::Permissions::from_mode(0o755));
        Ok(layer)
    }
}

fn create_private_dir(dir: &Path) -> Result<(), LayerError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|source| LayerError::Create {
        path: dir.to_path_buf(),
        source,
    })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
        LayerError::Create {
            path: dir.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_creates_the_layer_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let layer = WritableLayer::open(tmp.path()).unwrap();
        assert!(layer.upper.is_dir() && layer.work.is_dir());
        fs::write(layer.upper.join("kept"), "x").unwrap();
        let again = WritableLayer::open(tmp.path()).unwrap();
        assert_eq!(fs::read_to_string(again.upper.join("kept")).unwrap(), "x");
        let mode = fs::metadata(tmp.path().join("layer"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
