//! The sandbox's network policy, as the HTTP API sets it: JSON text kept
//! exactly as sent, in hulld's state dir, so it survives restarts. Nothing
//! enforces it yet; the API says so on every answer.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the network policy is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("cannot read the network policy {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the network policy {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The stored policy at `path` (`StateDir::network_policy`); `None` when
/// none was ever set. Blocks.
pub fn load(path: &Path) -> Result<Option<String>, PolicyError> {
    let path = path.to_path_buf();
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PolicyError::Read { path, source }),
    }
}

/// Replaces the stored policy with `text`: written to a temporary file,
/// synced and renamed over the old one, so a crash leaves one or the other
/// whole. Blocks.
pub fn save(path: &Path, text: &str) -> Result<(), PolicyError> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(PolicyError::NotJson)?;
    let path = path.to_path_buf();
    let state_dir = path.parent().unwrap_or(Path::new("."));
    let write = |source| PolicyError::Write {
        path: path.clone(),
        source,
    };
    let mut file = tempfile::NamedTempFile::new_in(state_dir).map_err(write)?;
    file.write_all(text.as_bytes()).map_err(write)?;
    file.as_file().sync_all().map_err(write)?;
    file.persist(&path).map_err(|e| write(e.error))?;
    std::fs::File::open(state_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_is_kept_byte_for_byte_and_refused_unless_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).network_policy();
        assert_eq!(load(&path).unwrap(), None);
        let text = "{ \"rules\" : [ {\"domain\":\"a.example\", \"action\":\"allow\"} ] }";
        save(&path, text).unwrap();
        assert_eq!(load(&path).unwrap().as_deref(), Some(text));
        assert!(matches!(
            save(&path, "{not json"),
            Err(PolicyError::NotJson(_))
        ));
        assert_eq!(load(&path).unwrap().as_deref(), Some(text));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
