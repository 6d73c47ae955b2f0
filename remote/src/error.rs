use std::path::PathBuf;

use crate::manifest::ManifestId;

/// What went wrong with the remote, one variant per step; the cause is the
/// `source()`, never repeated in the message.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot read the remote key file {path}")]
    KeyRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the remote key file {path} is not a hull key file: {reason}")]
    KeyCorrupt { path: PathBuf, reason: String },
    #[error("cannot create the remote key file {path}")]
    KeyCreate {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the remote key file {path} is readable by others (mode {mode:o}): chmod 600 it")]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("cannot read the remote credentials file {path}")]
    CredentialsRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the remote credentials file {path} is readable by others (mode {mode:o}): chmod 600 it"
    )]
    CredentialsMode { path: PathBuf, mode: u32 },
    #[error("the remote credentials file {path} is not valid (it needs access_key_id and secret_access_key)")]
    CredentialsParse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("the remote url {url:?} is not s3://BUCKET/PREFIX or file:///DIR")]
    Url { url: String },
    #[error("cannot set up the object store for {url}")]
    StoreSetup {
        url: String,
        source: object_store::Error,
    },
    #[error("cannot {what} {object} in the remote")]
    Store {
        what: &'static str,
        object: String,
        source: object_store::Error,
    },
    #[error("the key in {key_file} is not the key of the remote {url}: its key check object does not decrypt with it (a different key file, or a corrupt key)")]
    WrongKey { key_file: PathBuf, url: String },
    #[error("the remote {url} has a key but there is no key file at {key_file}: copy the key file from the machine that first pushed to it")]
    KeyMissing { key_file: PathBuf, url: String },
    #[error("invalid [remote] settings: {reason}")]
    Settings { reason: String },
    #[error("the remote's key check object {object} is corrupt")]
    KeyCheckCorrupt { object: String },
    #[error("the garbage collector's mark {object} is corrupt: {reason}")]
    MarkCorrupt {
        object: String,
        reason: &'static str,
    },
    #[error("chunk {name} is missing from the remote")]
    ChunkMissing { name: String },
    #[error("chunk {name} is corrupt: {reason}")]
    ChunkCorrupt { name: String, reason: &'static str },
    #[error("no manifest {id} in the remote")]
    ManifestMissing { id: ManifestId },
    #[error("manifest {id} does not decrypt: it is corrupt or was written with another key")]
    ManifestCorrupt { id: ManifestId },
    #[error("manifest {id} decrypts but does not decode")]
    ManifestDecode {
        id: ManifestId,
        source: serde_json::Error,
    },
    #[error("manifest {id} is of format {format}, which this hull does not read (a newer hull wrote it)")]
    ManifestFormat { id: ManifestId, format: u32 },
    #[error("the stream of manifest {id} does not match its recorded hash after all its chunks verified (the manifest lists the wrong chunks)")]
    StreamHash { id: ManifestId },
    #[error("cannot read the stream to push")]
    ReadStream(#[source] std::io::Error),
    #[error("cannot write the pulled stream")]
    WriteStream(#[source] std::io::Error),
    #[error("cannot {what} the chunk index {path}")]
    Index {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a remote worker task failed")]
    Task(#[source] tokio::task::JoinError),
}

pub type Result<T, E = RemoteError> = std::result::Result<T, E>;
