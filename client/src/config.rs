//! What a client reads of hulld's config file (`hull.toml`): where the
//! control socket is, the state dir (hulld's log), and the base image
//! `hull up` builds. The defaults, the names of those files in the state
//! dir and the values shared with hulld's own keys are decided here;
//! hulld's `Config` (hull-outer) takes them from this module and checks
//! the rest of the file when it starts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/hull/hull.toml";
pub const DEFAULT_SOCKET: &str = "/run/hull/hull.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hull";
/// The inner's base image when `image` is unset.
pub const DEFAULT_IMAGE: &str = "debian";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// The keys of `hull.toml` a client reads, with hulld's defaults. Other
/// keys are hulld's: a client leaves them to hulld, which refuses a file
/// with a bad or unknown one at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientConfig {
    /// hulld's own state: the writable layer, images, logs, lock file.
    pub state_dir: PathBuf,
    /// The control socket (mode 0600).
    pub socket: PathBuf,
    /// Where base images are built; `<state_dir>/images` when unset.
    pub image_dir: Option<PathBuf>,
    /// The base image of the inner: "debian" (default) or "busybox".
    pub image: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            socket: PathBuf::from(DEFAULT_SOCKET),
            image_dir: None,
            image: DEFAULT_IMAGE.to_string(),
        }
    }
}

impl ClientConfig {
    /// Reads `path`, or the default config file if it exists, or the
    /// defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some((path, text)) = read(path)? else {
            return Ok(ClientConfig::default());
        };
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })
    }

    /// Where base images are built.
    pub fn image_dir(&self) -> PathBuf {
        image_dir(&self.state_dir, self.image_dir.as_deref())
    }

    /// hulld's own log.
    pub fn log_file(&self) -> PathBuf {
        hulld_log(&self.state_dir)
    }
}

/// The text of the config file `path`, or of the default one if it
/// exists (`None` if not), with the path it was read from.
pub fn read(path: Option<&Path>) -> Result<Option<(PathBuf, String)>, ConfigError> {
    let (path, required) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some((path, text))),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

/// hulld's own log in `state_dir`, rotated like a log source.
pub fn hulld_log(state_dir: &Path) -> PathBuf {
    state_dir.join("hulld.log")
}

/// Where base images are built: `configured`, or `images` in `state_dir`.
pub fn image_dir(state_dir: &Path, configured: Option<&Path>) -> PathBuf {
    configured.map_or_else(|| state_dir.join("images"), Path::to_path_buf)
}

/// How the inner reaches the world (`network.mode`, `--network`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A veth pair to the root namespace, masqueraded (nftables).
    #[default]
    Nat,
    /// Loopback only. Ingress still works: it dials from inside.
    None,
}

pub fn parse_network_mode(s: &str) -> Result<NetworkMode, String> {
    match s {
        "nat" => Ok(NetworkMode::Nat),
        "none" => Ok(NetworkMode::None),
        other => Err(format!("{other:?}: expected nat or none")),
    }
}

impl NetworkMode {
    pub fn name(self) -> &'static str {
        match self {
            NetworkMode::Nat => "nat",
            NetworkMode::None => "none",
        }
    }
}

/// A size as hull.toml and hull's flags write it: "512M", "2G",
/// "1048576" -> bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}
