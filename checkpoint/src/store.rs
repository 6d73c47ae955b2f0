use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::btrfs;
use crate::catalog::{
    new_remote_id, now_ms, Catalog, CheckpointRow, CheckpointState, LayerState, Origin, RemoteState,
};
use crate::quota::{LayerUsage, QuotaError, QuotaSettings, Quotas};
use crate::volume::{StoragePaths, Volume, VolumeError};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error("the catalog {path} failed")]
    Catalog {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("no checkpoint {id:?}; `hull checkpoint list` shows the ids")]
    UnknownCheckpoint { id: String },
    #[error("checkpoint {id} is not ready (state {state}); try again when that is done")]
    NotReady { id: String, state: CheckpointState },
    #[error("cannot {what} {path}")]
    Subvolume {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot freeze the inner for a consistent checkpoint")]
    Freeze(#[source] QuiesceError),
    #[error("cannot open the writable layer {path} to flush it to disk")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "checkpoint {id} {why}; delete it once the push is done (`hull checkpoint list` shows it)"
    )]
    Pinned { id: String, why: String },
    #[error("no space left on the volume {path}: free some by deleting checkpoints (`hull checkpoint delete ID`)")]
    NoSpace { path: PathBuf },
}

type Result<T> = std::result::Result<T, StorageError>;

/// Why the writers could not be stopped or resumed.
pub type QuiesceError = Box<dyn std::error::Error + Send + Sync>;

/// Stops and resumes the processes that write to the layer.
pub trait Quiesce {
    fn freeze(&mut self) -> std::result::Result<(), QuiesceError>;
    fn thaw(&mut self) -> std::result::Result<(), QuiesceError>;
}

/// The overlay upper and work directories of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritableLayer {
    pub id: String,
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// What a finished checkpoint cost.
#[derive(Debug, Clone)]
pub struct CheckpointMade {
    pub row: CheckpointRow,
    pub frozen: Duration,
    pub total: Duration,
    /// How long each step took, in order: where a slow checkpoint spent
    /// its time.
    pub steps: Vec<(&'static str, Duration)>,
}

/// A new layer made from a checkpoint, not yet current.
#[derive(Debug)]
pub struct PendingLayer {
    pub layer: WritableLayer,
    pub checkpoint: String,
}

/// What start-up repaired, for the log.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    pub actions: Vec<String>,
}

/// Kill-9 in the middle of an operation, for crash tests: when the
/// environment variable HULL_FAILPOINT names this point, the process dies
/// here as abruptly as a power cut lets it.
pub fn failpoint(name: &str) {
    if hull_proto::failpoint_named(name) {
        tracing::error!(failpoint = name, "failpoint reached: killing hulld");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Stalls here for two seconds if HULL_SLOW_POINT names this point: a test
/// stands in for a slow disk to prove that nothing else waits for storage.
pub fn slow_point(name: &str) {
    if hull_proto::slow_point(name) {
        tracing::warn!(slow_point = name, "slow point reached: stalling 2 s");
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

pub struct Storage {
    volume: Volume,
    catalog_path: PathBuf,
    catalog: Mutex<Catalog>,
    /// The catalog's `head`, kept in memory by the only code that writes
    /// it, so readers (`hull status` on every call) never wait behind the
    /// catalog lock while a checkpoint or restore holds it.
    head: Mutex<Option<String>>,
    quotas: Quotas,
    /// The sysfs directory of the current layer's qgroup, kept like
    /// `head`, so `status` reads the layer's usage without the catalog.
    usage_dir: Mutex<Option<PathBuf>>,
}

const CURRENT_LAYER: &str = "current_layer";
const HEAD: &str = "head";

impl Storage {
    /// Opens (creating if needed) the volume and catalog, then finishes or
    /// rolls back whatever a crash left half done. A new loop image leaves
    /// `disk_reserve` bytes free on the state dir's filesystem. Quotas are
    /// turned on when `quota` asks for a limit, and every layer gets it.
    pub fn open(
        paths: &StoragePaths,
        image_size: u64,
        disk_reserve: u64,
        quota: QuotaSettings,
    ) -> Result<(Self, Recovery)> {
        let volume = Volume::open(paths, image_size, disk_reserve)?;
        let quotas = Quotas::open(&volume, quota, disk_reserve)?;
        for dir in ["layers", "checkpoints"] {
            let path = volume.root.join(dir);
            fs::create_dir_all(&path).map_err(|source| StorageError::Subvolume {
                what: "create",
                path,
                source,
            })?;
        }
        let catalog_path = paths.catalog.clone();
        let catalog = Catalog::open(&catalog_path).map_err(|source| StorageError::Catalog {
            path: catalog_path.clone(),
            source,
        })?;
        let storage = Storage {
            volume,
            catalog_path,
            catalog: Mutex::new(catalog),
            head: Mutex::new(None),
            quotas,
            usage_dir: Mutex::new(None),
        };
        let recovery = storage.recover()?;
        let head = storage.catalog().meta(HEAD).map_err(storage.db_err())?;
        storage.set_head_cache(head);
        // The limit may have changed since the layer was made, or quotas
        // may be new on this volume.
        let current = storage.current_layer()?;
        let dir = storage.layer_dir(&current.id);
        storage.quotas.apply(&dir)?;
        storage.set_usage_dir(&dir);
        Ok((storage, recovery))
    }

    /// The catalog, locked. Every change to it is one SQLite statement or
    /// transaction and each row's state says how far its operation got, so
    /// a panic while it was held leaves the catalog consistent (readers
    /// skip rows that are not ready; the next start's recovery repairs
    /// them): a poisoned lock is taken over.
    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn db_err(&self) -> impl Fn(rusqlite::Error) -> StorageError + '_ {
        move |source| StorageError::Catalog {
            path: self.catalog_path.clone(),
            source,
        }
    }

    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    fn layer_dir(&self, id: &str) -> PathBuf {
        self.volume.root.join("layers").join(id)
    }

    fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.volume.root.join("checkpoints").join(id)
    }

    fn layer(&self, id: &str) -> WritableLayer {
        let dir = self.layer_dir(id);
        WritableLayer {
            id: id.to_string(),
            upper: dir.join("upper"),
            work: dir.join("work"),
        }
    }

    /// The layer the inner runs on now.
    pub fn current_layer(&self) -> Result<WritableLayer> {
        let catalog = self.catalog();
        let id = catalog
            .meta(CURRENT_LAYER)
            .map_err(self.db_err())?
            .expect("recovery guarantees a current layer");
        Ok(self.layer(&id))
    }

    /// The checkpoint the current state descends from. Never waits for
    /// storage work in progress.
    pub fn head(&self) -> Option<String> {
        self.head.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Called after every committed change of the catalog's `head`.
    fn set_head_cache(&self, head: Option<String>) {
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = head;
    }

    fn set_usage_dir(&self, layer_dir: &Path) {
        let dir = self.quotas.usage_dir(layer_dir);
        *self.usage_dir.lock().unwrap_or_else(|p| p.into_inner()) = dir;
    }

    /// Lifts the quota of `layer` while an inner mounts it: overlayfs
    /// makes its work directory at every mount and falls back to a
    /// read-only mount when it cannot, which a full layer would cause (and
    /// the user could not then remove a file to make room).
    /// [`Storage::limit_layer`] puts the quota back once the inner is up.
    pub fn lift_layer_quota(&self, layer: &WritableLayer) -> Result<()> {
        Ok(self.quotas.lift(&self.layer_dir(&layer.id))?)
    }

    /// Gives `layer` the configured quota.
    pub fn limit_layer(&self, layer: &WritableLayer) -> Result<()> {
        Ok(self.quotas.apply(&self.layer_dir(&layer.id))?)
    }

    /// What the current layer holds and its quota; `None` when quotas are
    /// off on the volume. Reads the qgroup's sysfs files, never the volume.
    pub fn layer_usage(&self) -> Option<LayerUsage> {
        let dir = self
            .usage_dir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        crate::quota::read_usage(&dir)
            .map_err(
                |e| tracing::warn!(qgroup = %dir.display(), "cannot read the layer's usage: {e}"),
            )
            .ok()
    }

    pub fn list(&self) -> Result<Vec<CheckpointRow>> {
        self.catalog().checkpoints().map_err(self.db_err())
    }

    fn destroy(&self, path: &Path) -> Result<()> {
        match btrfs::destroy_subvolume(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StorageError::Subvolume {
                what: "delete subvolume",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn subvolume_error(what: &'static str, path: &Path, source: std::io::Error) -> StorageError {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return StorageError::NoSpace {
                path: path.to_path_buf(),
            };
        }
        StorageError::Subvolume {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Creates an empty layer subvolume with its upper and work dirs.
    fn make_empty_layer(&self, id: &str) -> Result<WritableLayer> {
        let dir = self.layer_dir(id);
        btrfs::create_subvolume(&dir)
            .map_err(|e| Self::subvolume_error("create subvolume", &dir, e))?;
        self.quotas.apply(&dir)?;
        let layer = self.layer(id);
        for d in [&layer.upper, &layer.work] {
            fs::create_dir(d).map_err(|e| Self::subvolume_error("create", d, e))?;
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(&layer.upper, fs::Permissions::from_mode(0o755));
        Ok(layer)
    }

    /// Brings the catalog and the subvolumes into agreement after a crash.
    fn recover(&self) -> Result<Recovery> {
        let mut recovery = Recovery::default();
        let catalog = self.catalog();
        let db = self.db_err();
        for row in catalog.checkpoints().map_err(&db)? {
            let dir = self.checkpoint_dir(&row.id);
            match row.state {
                CheckpointState::Ready if dir.exists() => {}
                CheckpointState::Ready => {
                    catalog.delete_checkpoint(&row.id).map_err(&db)?;
                    recovery.actions.push(format!(
                        "checkpoint {}: its snapshot is missing; removed from the catalog",
                        row.id
                    ));
                }
                CheckpointState::Creating => {
                    self.destroy(&dir)?;
                    catalog.delete_checkpoint(&row.id).map_err(&db)?;
                    recovery.actions.push(format!(
                        "checkpoint {}: creation was interrupted; rolled back",
                        row.id
                    ));
                }
                CheckpointState::Deleting => {
                    self.destroy(&dir)?;
                    catalog.delete_checkpoint(&row.id).map_err(&db)?;
                    recovery.actions.push(format!(
                        "checkpoint {}: deletion was interrupted; finished it",
                        row.id
                    ));
                }
            }
        }
        let current = catalog.meta(CURRENT_LAYER).map_err(&db)?;
        for layer in catalog.layers().map_err(&db)? {
            if Some(&layer.id) == current.as_ref() {
                continue;
            }
            self.destroy(&self.layer_dir(&layer.id))?;
            catalog.delete_layer(&layer.id).map_err(&db)?;
            if layer.state == LayerState::Creating {
                recovery.actions.push(format!(
                    "layer {}: a restore to {} was interrupted before the swap; rolled back",
                    layer.id,
                    layer.origin.as_deref().unwrap_or("?")
                ));
            } else {
                recovery
                    .actions
                    .push(format!("layer {}: retired; deleted", layer.id));
            }
        }
        let current_ok = current
            .as_ref()
            .is_some_and(|id| self.layer(id).upper.is_dir() && self.layer(id).work.is_dir());
        if !current_ok {
            // The newest state that is still whole: the checkpoint the lost
            // layer came from or was last saved as (missing ones are gone
            // from the catalog by now). A volume that lost its last writes
            // (a power loss under a disk cache that ignored flushes) comes
            // back as it was then, not empty.
            let head = catalog
                .meta(HEAD)
                .map_err(&db)?
                .filter(|h| self.checkpoint_dir(h).is_dir());
            let id = format!("l{}", catalog.next_seq("layer_seq").map_err(&db)?);
            catalog
                .insert_layer(&id, head.as_deref(), LayerState::Creating)
                .map_err(&db)?;
            let dest = self.layer_dir(&id);
            match &head {
                Some(h) => {
                    btrfs::snapshot(&self.checkpoint_dir(h), &dest, false)
                        .map_err(|e| Self::subvolume_error("snapshot", &dest, e))?;
                    self.quotas.apply(&dest)?;
                }
                None => {
                    self.make_empty_layer(&id)?;
                }
            }
            catalog
                .set_layer_state(&id, LayerState::Active)
                .map_err(&db)?;
            catalog.set_meta(CURRENT_LAYER, &id).map_err(&db)?;
            if let Some(old) = current {
                catalog.delete_layer(&old).map_err(&db)?;
                recovery.actions.push(match &head {
                    Some(h) => format!(
                        "the current layer {old} was missing; made layer {id} from checkpoint {h}"
                    ),
                    None => format!(
                        "the current layer {old} was missing and no checkpoint is left; started an empty layer {id}"
                    ),
                });
            }
        }
        // Subvolumes the catalog does not know (a crash between the ioctl
        // and the catalog write is impossible by ordering, but a hand-made
        // directory is not): report, never delete user data silently.
        let known: Vec<String> = catalog
            .checkpoints()
            .map_err(&db)?
            .into_iter()
            .map(|r| r.id)
            .collect();
        if let Ok(entries) = fs::read_dir(self.volume.root.join("checkpoints")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !known.contains(&name) {
                    self.destroy(&e.path())?;
                    recovery
                        .actions
                        .push(format!("snapshot {name}: not in the catalog; deleted"));
                }
            }
        }
        for action in &recovery.actions {
            tracing::warn!(action = %action, "storage recovery");
        }
        if recovery.actions.is_empty() {
            // Said at every start, so a start after a crash shows that the
            // check ran and what it found.
            tracing::info!(
                checkpoints = known.len(),
                "storage checked: every checkpoint and the current layer are whole, nothing to recover"
            );
        }
        Ok(recovery)
    }

    /// Freeze, flush, snapshot, thaw, record.
    pub fn create_checkpoint(
        &self,
        comment: Option<String>,
        auto: bool,
        services: &str,
        quiesce: &mut dyn Quiesce,
    ) -> Result<CheckpointMade> {
        let begin = Instant::now();
        let mut steps = Vec::with_capacity(6);
        let mut clock = begin;
        let mut step = |name: &'static str| {
            let now = Instant::now();
            steps.push((name, now - clock));
            clock = now;
        };
        // The catalog is locked for its own steps only: a syncfs of a dirty
        // layer can take seconds, and `hull status` and `checkpoint list`
        // read the catalog meanwhile. Creates never overlap (the caller
        // serialises them with restores).
        let catalog = self.catalog();
        let db = self.db_err();
        let seq = catalog.next_seq("checkpoint_seq").map_err(&db)?;
        let parent = catalog.meta(HEAD).map_err(&db)?;
        let parent_remote_id = match &parent {
            Some(p) => catalog.checkpoint(p).map_err(&db)?.map(|r| r.remote_id),
            None => None,
        };
        let row = CheckpointRow {
            id: format!("v{seq}"),
            seq,
            parent,
            created_ms: now_ms(),
            comment,
            auto,
            services: services.to_string(),
            state: CheckpointState::Creating,
            remote_id: new_remote_id(),
            parent_remote_id,
            remote_state: RemoteState::Local,
            remote_error: None,
            origin: Origin::Here,
        };
        catalog.insert_checkpoint(&row).map_err(&db)?;
        step("row");
        failpoint("create:after-row");
        let current = catalog
            .meta(CURRENT_LAYER)
            .map_err(&db)?
            .expect("recovery guarantees a current layer");
        drop(catalog);
        let source = self.layer_dir(&current);
        let dest = self.checkpoint_dir(&row.id);

        // Flush what is already written before freezing, so the frozen
        // window holds only what was written in the last moment.
        let layer_dir = fs::File::open(&source).map_err(|e| StorageError::Sync {
            path: source.clone(),
            source: e,
        })?;
        let _ = nix::unistd::syncfs(&layer_dir);
        slow_point("create:syncfs");
        step("syncfs");
        let freeze_start = Instant::now();
        let frozen_ok = quiesce.freeze();
        step("freeze");
        if let Err(e) = frozen_ok {
            let _ = quiesce.thaw();
            let catalog = self.catalog();
            catalog.delete_checkpoint(&row.id).map_err(&db)?;
            catalog.give_back_seq("checkpoint_seq", seq).map_err(&db)?;
            return Err(StorageError::Freeze(e));
        }
        // No second syncfs here: the snapshot ioctl itself flushes the
        // subvolume's delayed allocations and waits for their ordered
        // extents before it copies the root, so buffered writes made up to
        // the freeze are in the snapshot; a syncfs would add a transaction
        // commit to the frozen window.
        let snap = btrfs::snapshot(&source, &dest, true)
            .map_err(|e| Self::subvolume_error("snapshot", &dest, e));
        step("snapshot");
        let thawed = quiesce.thaw();
        let frozen = freeze_start.elapsed();
        step("thaw");
        let catalog = self.catalog();
        if let Err(e) = snap {
            let _ = self.destroy(&dest);
            catalog.delete_checkpoint(&row.id).map_err(&db)?;
            // The id was never shown as a checkpoint: the next one takes it.
            catalog.give_back_seq("checkpoint_seq", seq).map_err(&db)?;
            return Err(e);
        }
        failpoint("create:after-snapshot");
        catalog
            .set_checkpoint_state(&row.id, CheckpointState::Ready)
            .map_err(&db)?;
        catalog.set_meta(HEAD, &row.id).map_err(&db)?;
        self.set_head_cache(Some(row.id.clone()));
        step("record");
        if let Err(e) = thawed {
            tracing::error!(
                error = &*e as &(dyn std::error::Error + 'static),
                "cannot thaw the inner after a checkpoint"
            );
        }
        let row = CheckpointRow {
            state: CheckpointState::Ready,
            ..row
        };
        Ok(CheckpointMade {
            row,
            frozen,
            total: begin.elapsed(),
            steps,
        })
    }

    fn ready_checkpoint(&self, catalog: &Catalog, id: &str) -> Result<CheckpointRow> {
        match catalog.checkpoint(id).map_err(self.db_err())? {
            None => Err(StorageError::UnknownCheckpoint { id: id.to_string() }),
            Some(row) if row.state != CheckpointState::Ready => Err(StorageError::NotReady {
                id: id.to_string(),
                state: row.state,
            }),
            Some(row) => Ok(row),
        }
    }

    /// Looks a checkpoint up (ready ones only).
    pub fn checkpoint(&self, id: &str) -> Result<CheckpointRow> {
        let catalog = self.catalog();
        self.ready_checkpoint(&catalog, id)
    }

    /// The read-only snapshot of ready checkpoint `id`: what `btrfs send`
    /// reads when it is pushed.
    pub fn snapshot_path(&self, id: &str) -> Result<PathBuf> {
        let catalog = self.catalog();
        self.ready_checkpoint(&catalog, id)?;
        Ok(self.checkpoint_dir(id))
    }

    /// Makes a writable snapshot of checkpoint `id`: the layer a restore
    /// will swap in. The inner keeps running meanwhile.
    pub fn prepare_restore(&self, id: &str) -> Result<PendingLayer> {
        let catalog = self.catalog();
        let db = self.db_err();
        self.ready_checkpoint(&catalog, id)?;
        let layer_id = format!("l{}", catalog.next_seq("layer_seq").map_err(&db)?);
        catalog
            .insert_layer(&layer_id, Some(id), LayerState::Creating)
            .map_err(&db)?;
        let dest = self.layer_dir(&layer_id);
        if let Err(e) = btrfs::snapshot(&self.checkpoint_dir(id), &dest, false) {
            catalog.delete_layer(&layer_id).map_err(&db)?;
            return Err(Self::subvolume_error("snapshot", &dest, e));
        }
        // Under full accounting the snapshot carries the checkpoint's limit
        // (its layer's when it was taken), under simple quotas none: the
        // new layer gets the one configured now.
        if let Err(e) = self.quotas.apply(&dest) {
            self.destroy(&dest)?;
            catalog.delete_layer(&layer_id).map_err(&db)?;
            return Err(e.into());
        }
        failpoint("restore:after-layer-snapshot");
        Ok(PendingLayer {
            layer: self.layer(&layer_id),
            checkpoint: id.to_string(),
        })
    }

    /// The atomic swap: the pending layer becomes current, the old one is
    /// retired (deleted by [`Storage::collect_garbage`]).
    pub fn commit_restore(&self, pending: PendingLayer) -> Result<WritableLayer> {
        let mut catalog = self.catalog();
        let old = catalog
            .meta(CURRENT_LAYER)
            .map_err(self.db_err())?
            .expect("recovery guarantees a current layer");
        catalog
            .swap_layer(&old, &pending.layer.id, &pending.checkpoint)
            .map_err(self.db_err())?;
        self.set_head_cache(Some(pending.checkpoint.clone()));
        drop(catalog);
        self.set_usage_dir(&self.layer_dir(&pending.layer.id));
        Ok(pending.layer)
    }

    /// Records where checkpoint `id` stands with the remote. A checkpoint
    /// `pushing` is pinned, and so is its parent, the base of its
    /// incremental stream (see [`Storage::delete_checkpoint`]).
    pub fn set_remote_state(
        &self,
        id: &str,
        state: RemoteState,
        error: Option<&str>,
    ) -> Result<()> {
        self.catalog()
            .set_remote_state(id, state, error)
            .map_err(self.db_err())
    }

    /// Why checkpoint `id` may not be deleted now, if it may not: its push
    /// is under way, or it is the base of one.
    fn pinned(&self, catalog: &Catalog, id: &str) -> Result<Option<String>> {
        for row in catalog.checkpoints().map_err(self.db_err())? {
            if row.remote_state != RemoteState::Pushing {
                continue;
            }
            if row.id == id {
                return Ok(Some("is being pushed to the remote".to_string()));
            }
            if row.parent.as_deref() == Some(id) {
                return Ok(Some(format!(
                    "is the base of the push of checkpoint {} to the remote",
                    row.id
                )));
            }
        }
        Ok(None)
    }

    /// Deletes checkpoint `id`. Snapshots are independent: any may go,
    /// except one a push needs (pinned): that is refused, naming the push.
    pub fn delete_checkpoint(&self, id: &str) -> Result<()> {
        let catalog = self.catalog();
        let db = self.db_err();
        let row = self.ready_checkpoint(&catalog, id)?;
        if let Some(why) = self.pinned(&catalog, id)? {
            return Err(StorageError::Pinned {
                id: id.to_string(),
                why,
            });
        }
        catalog
            .set_checkpoint_state(id, CheckpointState::Deleting)
            .map_err(&db)?;
        failpoint("delete:after-mark");
        self.destroy(&self.checkpoint_dir(id))?;
        failpoint("delete:after-destroy");
        catalog.delete_checkpoint(id).map_err(&db)?;
        // The current state still descends from the deleted checkpoint's
        // parent; a head naming a checkpoint that is gone would become the
        // parent of the next one and mark nothing in the list.
        if self.head().as_deref() == Some(id) {
            let ancestor = self.nearest_existing(&catalog, row.parent)?;
            match &ancestor {
                Some(a) => catalog.set_meta(HEAD, a).map_err(&db)?,
                None => catalog.delete_meta(HEAD).map_err(&db)?,
            }
            self.set_head_cache(ancestor);
        }
        drop(catalog);
        // A checkpoint is deleted to make room (the volume or a layer's
        // quota is full): btrfs's cleaner, which frees the extents, would
        // otherwise wait for the next periodic commit. Outside the catalog
        // lock: the commit flushes the layer's dirty data.
        if let Err(e) = btrfs::sync_and_clean(&self.volume.root) {
            tracing::warn!(volume = %self.volume.root.display(), "cannot wake btrfs's cleaner; the deleted checkpoint's space comes back within 30 s: {e}");
        }
        Ok(())
    }

    /// `id` or, if it is gone, its closest ancestor that is still there.
    fn nearest_existing(
        &self,
        catalog: &Catalog,
        mut id: Option<String>,
    ) -> Result<Option<String>> {
        while let Some(candidate) = id {
            match catalog.checkpoint(&candidate).map_err(self.db_err())? {
                Some(row) if row.state == CheckpointState::Ready => return Ok(Some(candidate)),
                Some(row) => id = row.parent,
                None => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Deletes the oldest automatic checkpoints beyond `keep`, passing
    /// over those a push needs (they go at a later round).
    pub fn apply_retention(&self, keep: usize) -> Result<Vec<String>> {
        let head = self.head();
        let autos: Vec<String> = self
            .list()?
            .into_iter()
            .filter(|r| r.auto && r.state == CheckpointState::Ready && Some(&r.id) != head.as_ref())
            .map(|r| r.id)
            .collect();
        let excess = autos.len().saturating_sub(keep);
        let mut deleted = Vec::new();
        for id in autos.into_iter().take(excess) {
            match self.delete_checkpoint(&id) {
                Ok(()) => deleted.push(id),
                Err(StorageError::Pinned { id, why }) => {
                    tracing::info!(checkpoint = %id, "kept beyond retention for now: it {why}")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Deletes retired layers. Slow on big layers (btrfs cleans up in the
    /// background anyway), so hulld calls it off the restore path.
    pub fn collect_garbage(&self) -> Result<usize> {
        let catalog = self.catalog();
        let db = self.db_err();
        let mut n = 0;
        for layer in catalog.layers().map_err(&db)? {
            if layer.state == LayerState::Retired {
                self.destroy(&self.layer_dir(&layer.id))?;
                catalog.delete_layer(&layer.id).map_err(&db)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Unmounts the volume if hull mounted it (`hull down`).
    pub fn close(&self) -> Result<()> {
        Ok(self.volume.close()?)
    }
}
