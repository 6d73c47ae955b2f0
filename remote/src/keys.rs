//! The key file: three independent 256-bit secrets, made at the first
//! push and never stored in the bucket.
//!
//! - `data_key` encrypts every object (XChaCha20-Poly1305);
//! - `chunker_key` derives the chunker's gear table, so chunk boundaries
//!   (and with them chunk sizes) depend on the key, not the data alone;
//! - `name_key` keys the BLAKE3 hash that names a chunk after its
//!   plaintext, so a name says nothing to whoever lacks the key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{RemoteError, Result};

/// Bumped when the format of objects in the bucket changes.
const KEY_FILE_VERSION: u32 = 1;

const HEADER: &str =
    "# hull remote key: whoever holds this file can read the remote's checkpoints,\n\
# and without it nobody can, hull included. Keep a copy outside the VM.\n";

/// The secrets of one remote.
#[derive(Clone)]
pub struct Keys {
    pub(crate) data: [u8; 32],
    pub(crate) chunker: [u8; 32],
    pub(crate) name: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys { .. }")
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    version: u32,
    data_key: String,
    chunker_key: String,
    name_key: String,
}

fn random32() -> [u8; 32] {
    let mut key = [0; 32];
    // The OS's generator failing is not something hull can work around;
    // a key of zeros would be far worse than stopping.
    getrandom::fill(&mut key).expect("the OS random number generator failed");
    key
}

impl Keys {
    /// New random keys.
    pub fn generate() -> Keys {
        Keys {
            data: random32(),
            chunker: random32(),
            name: random32(),
        }
    }

    /// Loads the key file at `path`, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Keys> {
        let read_err = |source| RemoteError::KeyRead {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(read_err)?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(RemoteError::KeyMode {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(read_err)?;
        let corrupt = |reason: String| RemoteError::KeyCorrupt {
            path: path.to_path_buf(),
            reason,
        };
        let file: KeyFile = toml::from_str(&text).map_err(|e| corrupt(e.message().to_string()))?;
        if file.version != KEY_FILE_VERSION {
            return Err(corrupt(format!(
                "version {} (this hull reads version {KEY_FILE_VERSION})",
                file.version
            )));
        }
        let key = |field: &str, hex_text: &str| -> Result<[u8; 32]> {
            let mut out = [0; 32];
            hex::decode_to_slice(hex_text, &mut out)
                .map_err(|e| corrupt(format!("{field}: {e} (64 hex digits expected)")))?;
            Ok(out)
        };
        Ok(Keys {
            data: key("data_key", &file.data_key)?,
            chunker: key("chunker_key", &file.chunker_key)?,
            name: key("name_key", &file.name_key)?,
        })
    }

    /// Loads the key file, or makes one with new keys when there is none.
    /// Returns whether it was made.
    pub fn load_or_create(path: &Path) -> Result<(Keys, bool)> {
        match Keys::load(path) {
            Err(RemoteError::KeyRead { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let keys = Keys::generate();
                match keys.create(path) {
                    Ok(()) => Ok((keys, true)),
                    // Another process made it first: use that one.
                    Err(RemoteError::KeyCreate { source, .. })
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        Ok((Keys::load(path)?, false))
                    }
                    Err(e) => Err(e),
                }
            }
            other => other.map(|keys| (keys, false)),
        }
    }

    /// Writes the keys to a new file at `path`, mode 0600, all at once: a
    /// crash leaves either no key file or a whole one (a temporary file,
    /// synced, then linked into place, which fails if `path` exists).
    pub fn create(&self, path: &Path) -> Result<()> {
        let create_err = |source| RemoteError::KeyCreate {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(create_err)?;
        let file = KeyFile {
            version: KEY_FILE_VERSION,
            data_key: hex::encode(self.data),
            chunker_key: hex::encode(self.chunker),
            name_key: hex::encode(self.name),
        };
        let body = toml::to_string(&file).map_err(|e| create_err(std::io::Error::other(e)))?;
        let tmp = tempfile_path(path);
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(HEADER.as_bytes())?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
            fs::hard_link(&tmp, path)?;
            fs::File::open(&dir)?.sync_all()
        })();
        let _ = fs::remove_file(&tmp);
        result.map_err(create_err)
    }

    /// The gear table of the chunker, 256 words from BLAKE3's XOF over the
    /// chunker key: a whole secret table, not a public table XORed with
    /// a 64-bit seed, which changes every entry alike.
    pub(crate) fn gear_table(&self) -> [u64; 256] {
        let mut bytes = [0u8; 256 * 8];
        blake3::Hasher::new_derive_key("hull-remote v1 chunker gear table")
            .update(&self.chunker)
            .finalize_xof()
            .fill(&mut bytes);
        let mut table = [0u64; 256];
        for (word, b) in table.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            *word = u64::from_le_bytes(le);
        }
        table
    }

    /// The name of a chunk: BLAKE3 of its plaintext keyed with the name key.
    pub(crate) fn chunk_name(&self, plaintext: &[u8]) -> String {
        blake3::keyed_hash(&self.name, plaintext)
            .to_hex()
            .to_string()
    }

    /// What the key check object holds: a digest of the two keys that do
    /// not encrypt, so a key file with the right data key but another
    /// chunker or name key is caught too.
    pub(crate) fn check_value(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("hull-remote v1 key check");
        h.update(&self.chunker).update(&self.name);
        *h.finalize().as_bytes()
    }
}

fn tempfile_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_file_loads_back_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/remote.key");
        let (made, created) = Keys::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let (loaded, created) = Keys::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(made.data, loaded.data);
        assert_eq!(made.chunker, loaded.chunker);
        assert_eq!(made.name, loaded.name);
        // Three independent keys.
        assert_ne!(made.data, made.name);
        assert_ne!(made.data, made.chunker);
        // No temporary file left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_readable_or_damaged_key_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remote.key");
        Keys::generate().create(&path).unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let err = Keys::load(&path).unwrap_err();
        assert!(
            matches!(err, RemoteError::KeyMode { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("remote.key"), "{err}");

        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replacen("data_key = \"", "data_key = \"zz", 1)).unwrap();
        let err = Keys::load(&path).unwrap_err();
        assert!(
            matches!(&err, RemoteError::KeyCorrupt { reason, .. } if reason.contains("data_key")),
            "{err}"
        );
    }

    #[test]
    fn the_gear_table_depends_on_the_key() {
        let a = Keys::generate();
        let b = Keys::generate();
        assert_eq!(a.gear_table(), a.gear_table());
        assert_ne!(a.gear_table(), b.gear_table());
        assert_ne!(a.chunk_name(b"x"), b.chunk_name(b"x"));
    }
}
