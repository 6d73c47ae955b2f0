//! The sandbox's network policy, as the HTTP API sets it: JSON text kept
//! exactly as sent, in hulld's state dir, so it survives restarts. Nothing
//! enforces it yet; the API says so on every answer.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Its file in the state dir.
pub const FILE: &str = "network-policy.json";

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

/// The stored policy; `None` when none was ever set. Blocks.
pub fn load(state_dir: &Path) -> Result<Option<String>, PolicyError> {
    let path = state_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PolicyError::Read { path, source }),
    }
}

/// Replaces the stored policy with `text`: written to a temporary file,
/// synced and renamed over the old one, so a crash leaves one or the other
/// whole. Blocks.
pub fn save(state_dir: &Path, text: &str) -> Result<(), PolicyError> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(PolicyError::NotJson)?;
    let path = state_dir.join(FILE);
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
        assert_eq!(load(dir.path()).unwrap(), None);
        let text = "{ \"rules\" : [ {\"domain\":\"a.example\", \"action\":\"allow\"} ] }";
        save(dir.path(), text).unwrap();
        assert_eq!(load(dir.path()).unwrap().as_deref(), Some(text));
        assert!(matches!(
            save(dir.path(), "{not json"),
            Err(PolicyError::NotJson(_))
        ));
        assert_eq!(load(dir.path()).unwrap().as_deref(), Some(text));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
