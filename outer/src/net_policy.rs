//! The sandbox's egress policy in hulld's state dir, so it survives
//! restarts: checked as a [`EgressPolicy`] before it is stored and when it
//! is loaded, and kept as the JSON text that was sent, which is what the
//! API answers. Nothing enforces it yet; the API says so on every answer.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use hull_network::egress::EgressPolicyError;
use hull_network::EgressPolicy;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the network policy is not valid")]
    Invalid(#[source] EgressPolicyError),
    #[error("cannot read the network policy {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the stored network policy {path} is not valid; set a new one")]
    Stored {
        path: PathBuf,
        #[source]
        source: EgressPolicyError,
    },
    #[error("cannot write the network policy {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A stored policy: its rules, and the text they were read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub policy: EgressPolicy,
    pub text: String,
}

/// The stored policy at `path` (`StateDir::network_policy`); `None` when
/// none was ever set. Blocks.
pub fn load(path: &Path) -> Result<Option<StoredPolicy>, PolicyError> {
    let path = path.to_path_buf();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PolicyError::Read { path, source }),
    };
    match EgressPolicy::parse(&text) {
        Ok(policy) => Ok(Some(StoredPolicy { policy, text })),
        Err(source) => Err(PolicyError::Stored { path, source }),
    }
}

/// Replaces the stored policy with `text` once it parses: written to a
/// temporary file, synced and renamed over the old one, so a crash leaves
/// one or the other whole. Blocks.
pub fn save(path: &Path, text: &str) -> Result<StoredPolicy, PolicyError> {
    let policy = EgressPolicy::parse(text).map_err(PolicyError::Invalid)?;
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
        .map_err(write)?;
    Ok(StoredPolicy {
        policy,
        text: text.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_is_kept_byte_for_byte_and_refused_unless_valid() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).network_policy();
        assert_eq!(load(&path).unwrap(), None);
        let text = "{ \"rules\" : [ {\"domain\":\"A.example\", \"action\":\"allow\"} ] }";
        let saved = save(&path, text).unwrap();
        assert_eq!(load(&path).unwrap().as_ref(), Some(&saved));
        assert_eq!(saved.text, text);
        assert_eq!(saved.policy, EgressPolicy::parse(text).unwrap());
        for bad in [
            "{not json",
            r#"{"rules":[{"domain":"a..b","action":"allow"}]}"#,
        ] {
            assert!(
                matches!(save(&path, bad), Err(PolicyError::Invalid(_))),
                "{bad}"
            );
        }
        assert_eq!(load(&path).unwrap().map(|s| s.text).as_deref(), Some(text));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A stored policy that no longer parses is named, not served.
        std::fs::write(&path, "[]").unwrap();
        assert!(matches!(load(&path), Err(PolicyError::Stored { .. })));
    }
}
