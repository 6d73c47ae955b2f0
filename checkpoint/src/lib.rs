//! The storage stack: the user's writable layer as a btrfs subvolume, and
//! checkpoints as read-only snapshots of it, recorded in a SQLite catalog.
//! Checkpoint and restore shuffle metadata only: their cost does not grow
//! with the data in the layer.
//!
//! On the volume:
//!
//! ```text
//! layers/<lN>/upper, layers/<lN>/work   the writable layer(s); one is current
//! checkpoints/<vN>                       read-only snapshots of a layer
//! ```
//!
//! Each checkpoint also has a global id (a UUID, `remote_id`) and a state
//! with the remote (`local`, `pushing`, `pushed`); a checkpoint being
//! pushed, and the parent its stream is sent against, cannot be deleted.
//! [`btrfs::send`] and [`btrfs::receive`] give a snapshot's stream.

pub mod btrfs;
pub mod catalog;
pub mod quota;
mod store;
mod stream;
pub mod volume;

pub use btrfs::QuotaMode;
pub use catalog::{CheckpointRow, CheckpointState, LayerState, Origin, RemoteState};
pub use quota::{LayerQuota, LayerUsage, QuotaError, QuotaSettings};
pub use store::{
    failpoint, CheckpointMade, PendingLayer, Quiesce, QuiesceError, Recovery, Storage,
    StorageError, WritableLayer,
};
pub use volume::{StoragePaths, Volume, VolumeError};
