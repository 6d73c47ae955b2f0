//! Checkpoints that outlive the VM: a `btrfs send` stream pushed to an
//! S3-compatible object store (or a directory) and pulled back, with
//! nothing in the bucket readable without the key file.
//!
//! A push cuts the stream into content-defined chunks whose boundaries
//! depend on a secret ([`chunker`]), names each after a keyed BLAKE3 of
//! its plaintext, uploads only the chunks the remote lacks (zstd, then
//! XChaCha20-Poly1305: [`seal`]), and writes an encrypted [`manifest`]
//! last. A pull fetches the chunks in parallel and verifies each against
//! its name before writing it. The caller names each manifest: hulld gives
//! the checkpoint's global id from its catalog. The format and the threat
//! model are in docs/design/remote.md.
//!
//! In the bucket, under the url's prefix:
//!
//! ```text
//! keycheck                 proves a key file is this remote's
//! chunks/<nn>/<name>       one chunk; <name> is 64 hex digits, <nn> its first two
//! manifests/<uuid>         one pushed checkpoint
//! gc/mark                  chunks the garbage collector will delete if still unreferenced
//! gc/clock                 an empty object whose time is the store's clock
//! ```

pub mod chunker;
mod error;
mod gc;
mod index;
pub mod keys;
pub mod manifest;
mod remote;
mod seal;
mod settings;

#[cfg(test)]
mod pipeline_tests;

pub use chunker::ChunkSizes;
pub use error::{RemoteError, Result};
pub use gc::{GcOptions, GcReport};
pub use keys::Keys;
pub use manifest::{CheckpointMeta, ChunkRef, Manifest, ManifestId};
pub use object_store;
pub use remote::{PullProgress, PushProgress, Pushed, Remote, RemoteOptions};
pub use settings::RemoteSettings;
