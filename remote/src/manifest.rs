//! The manifest of one pushed checkpoint: what it is (its parent, the
//! service definitions, comment and time) and how to rebuild its stream
//! (the chunks in order and the hash of the whole). Stored as JSON, then
//! compressed and encrypted like a chunk, under `manifests/<uuid>`.

use serde::{Deserialize, Serialize};

/// The id of a pushed checkpoint: a random UUID, so two sandboxes sharing
/// a bucket never collide, and the id says nothing about the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ManifestId(pub uuid::Uuid);

impl ManifestId {
    /// A fresh random id. A caller that names its checkpoints already
    /// (hulld's catalog gives each a UUID at creation) passes that instead.
    pub fn new() -> Self {
        ManifestId(uuid::Uuid::new_v4())
    }
}

impl Default for ManifestId {
    fn default() -> Self {
        ManifestId::new()
    }
}

impl std::fmt::Display for ManifestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl std::str::FromStr for ManifestId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(ManifestId)
    }
}

/// What the caller says about a checkpoint it pushes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The checkpoint's id where it was made (`v3`), for people.
    pub checkpoint: Option<String>,
    /// The pushed checkpoint this stream is incremental from (`btrfs send
    /// -p`); `None` for a full stream. A pull receives the parent first.
    pub parent: Option<ManifestId>,
    pub comment: Option<String>,
    /// When the checkpoint was made, in ms since the epoch.
    pub created_ms: i64,
    /// The service definitions recorded with it, to replay after a restore.
    pub services: serde_json::Value,
}

/// One chunk of the stream, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Keyed BLAKE3 of the plaintext, hex.
    pub name: String,
    /// Plaintext length in bytes.
    pub len: u64,
}

/// A decoded manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The format of the manifest and of the objects it names.
    pub format: u32,
    pub id: ManifestId,
    #[serde(flatten)]
    pub meta: CheckpointMeta,
    /// When the push finished, in ms since the epoch.
    pub pushed_ms: i64,
    /// The whole stream's length and BLAKE3 (hex), checked after a pull.
    pub stream_len: u64,
    pub stream_hash: String,
    pub chunks: Vec<ChunkRef>,
}

pub(crate) const MANIFEST_FORMAT: u32 = 1;

/// A manifest's plaintext may not pass this: a bound on what a pull
/// allocates for one, ~10 million chunks.
pub(crate) const MANIFEST_MAX: usize = 1 << 30;
