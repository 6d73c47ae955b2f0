//! Garbage collection: deleting the chunks no manifest names, safe
//! against pushes from other sandboxes sharing the bucket. The design and
//! why it is safe are in docs/design/remote.md#garbage-collection.
//!
//! In short: a run marks the chunks that no manifest names and that are
//! older than the grace (a duration longer than any push), in one
//! encrypted `gc/mark` object; a later run, once the mark itself is older
//! than the grace, deletes each marked chunk that is still unreferenced
//! and was not uploaded again since the mark. A push reads the mark when
//! it starts and uploads a marked chunk it needs again rather than
//! trusting that it is there, so a chunk it refers to is either named by
//! a manifest before the sweep lists them or newer than the mark. Times
//! are the store's (objects' last-modified), never this machine's clock.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{RemoteError, Result};
use crate::keys::Keys;
use crate::manifest::ManifestId;
use crate::remote::{object_path, store_err, task_err, Remote};
use crate::seal::{self, OpenError};

/// How a collection runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcOptions {
    /// Longer than any push from any sandbox sharing the prefix takes
    /// (from its first chunk to its manifest): a chunk younger than this
    /// may belong to a push in progress and is never marked, and a mark
    /// younger than this is not swept.
    pub grace: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a collection found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub manifests: usize,
    pub chunks: usize,
    /// Chunks no manifest names (young ones included).
    pub unreferenced: usize,
    /// Chunks deleted by this run, and their bytes as stored.
    pub deleted: usize,
    pub deleted_bytes: u64,
    /// Chunks in the mark this run left, to delete on a later run.
    pub marked: usize,
    /// The mark found was younger than the grace: nothing was swept, and
    /// the mark was left as it was; how long until it can be.
    pub wait: Option<Duration>,
}

/// The mark's plaintext.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Mark {
    /// Bumped by every sweep that deleted a chunk: a chunk index built
    /// under another generation may name deleted chunks and is dropped.
    pub(crate) generation: u64,
    pub(crate) chunks: Vec<String>,
}

/// A mark read from the store, with its time (the store's clock, in ms).
pub(crate) struct ReadMark {
    pub(crate) mark: Mark,
    pub(crate) at_ms: i64,
}

const MARK: &str = "gc/mark";
const CLOCK: &str = "gc/clock";
pub(crate) const MARK_AAD: &[u8] = b"hull-remote gc-mark";
/// A mark's plaintext may not pass this: 10 million names.
const MARK_MAX: usize = 700 << 20;

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The mark under `prefix`, when there is one.
pub(crate) async fn read_mark(
    store: &dyn ObjectStore,
    prefix: &str,
    keys: &Keys,
) -> Result<Option<ReadMark>> {
    let path = object_path(prefix, MARK);
    let got = match store.get(&path).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(store_err("read", &path)(e)),
    };
    let at_ms = got.meta.last_modified.timestamp_millis();
    let object = got.bytes().await.map_err(store_err("read", &path))?;
    let keys = keys.clone();
    let plain = tokio::task::spawn_blocking(move || seal::open(&keys, MARK_AAD, &object, MARK_MAX))
        .await
        .map_err(task_err)?;
    let corrupt = |reason: &'static str| RemoteError::MarkCorrupt {
        object: path.to_string(),
        reason,
    };
    let mark: Mark = serde_json::from_slice(&plain.map_err(|e: OpenError| corrupt(e.reason()))?)
        .map_err(|_| corrupt("it decrypts but does not decode"))?;
    Ok(Some(ReadMark { mark, at_ms }))
}

impl Remote {
    /// The mark, when there is one.
    pub(crate) async fn read_mark(&self) -> Result<Option<ReadMark>> {
        read_mark(
            self.shared.store.as_ref(),
            &self.shared.prefix,
            &self.shared.keys,
        )
        .await
    }

    async fn write_mark(&self, mark: &Mark) -> Result<()> {
        let shared = &self.shared;
        let path = object_path(&shared.prefix, MARK);
        let keys = shared.keys.clone();
        let json =
            serde_json::to_vec(mark).unwrap_or_else(|_| unreachable!("a mark is plain data"));
        let object = tokio::task::spawn_blocking(move || seal::seal(&keys, MARK_AAD, &json))
            .await
            .map_err(task_err)?;
        shared
            .store
            .put(&path, PutPayload::from(object))
            .await
            .map_err(store_err("write", &path))?;
        Ok(())
    }

    /// The store's time now, and the mark's time if there is one, in ms:
    /// the last-modified of an empty object written for it and of the
    /// mark, as a listing gives them (a listing's times have the same
    /// precision as the chunks'; a HEAD's are whole seconds on S3).
    async fn store_times(&self) -> Result<(i64, Option<i64>)> {
        let shared = &self.shared;
        let clock = object_path(&shared.prefix, CLOCK);
        let mark = object_path(&shared.prefix, MARK);
        shared
            .store
            .put(&clock, PutPayload::default())
            .await
            .map_err(store_err("write", &clock))?;
        let listed = self.list_objects("gc").await?;
        let time = |path: &ObjectPath| {
            listed
                .iter()
                .find(|m| m.location == *path)
                .map(|m| m.last_modified.timestamp_millis())
        };
        let now = time(&clock).ok_or_else(|| {
            store_err("list", &clock)(object_store::Error::NotFound {
                path: clock.to_string(),
                source: "not listed right after it was written".into(),
            })
        })?;
        Ok((now, time(&mark)))
    }

    /// Deletes the manifest `id`: the checkpoint is gone from the remote
    /// (its chunks stay until a collection finds no other manifest names
    /// them). A checkpoint whose parent is deleted cannot be pulled.
    pub async fn delete(&self, id: ManifestId) -> Result<()> {
        let path = self.manifest_path(id);
        match self.shared.store.head(&path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::ManifestMissing { id })
            }
            Err(e) => return Err(store_err("look up", &path)(e)),
        }
        self.shared
            .store
            .delete(&path)
            .await
            .map_err(store_err("delete", &path))
    }

    /// One collection: sweeps the mark a previous run left once it is
    /// older than the grace, then marks what is garbage now. Deletes
    /// nothing unless every manifest reads: a manifest that does not is
    /// an error naming it.
    pub async fn gc(&self, options: &GcOptions) -> Result<GcReport> {
        let shared = &self.shared;
        let previous = self.read_mark().await?;
        let (now, mark_ms) = self.store_times().await?;
        let grace = ms(options.grace);

        let listed = self.list_objects("chunks").await?;
        // name -> (last modified, size)
        let chunks: HashMap<String, (i64, u64)> = listed
            .iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                let ok = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
                ok.then(|| {
                    (
                        name.to_string(),
                        (m.last_modified.timestamp_millis(), m.size),
                    )
                })
            })
            .collect();

        // Listed after the chunks: a push writes its chunks before its
        // manifest, so every chunk a listed manifest names is listed too,
        // and a chunk listed without its manifest is young or marked.
        let ids = self.list().await?;
        let mut referenced = HashSet::new();
        for id in &ids {
            for chunk in self.manifest(*id).await?.chunks {
                referenced.insert(chunk.name);
            }
        }
        let unreferenced: HashSet<&String> = chunks
            .keys()
            .filter(|name| !referenced.contains(*name))
            .collect();
        let mut report = GcReport {
            manifests: ids.len(),
            chunks: chunks.len(),
            unreferenced: unreferenced.len(),
            ..GcReport::default()
        };

        let mut generation = 0;
        let mut deleted = HashSet::new();
        if let Some(mut previous) = previous {
            if let Some(listed) = mark_ms {
                previous.at_ms = listed;
            }
            let age = now - previous.at_ms;
            if age < grace {
                report.marked = previous.mark.chunks.len();
                report.wait = Some(Duration::from_millis(
                    u64::try_from(grace - age).unwrap_or(0),
                ));
                return Ok(report);
            }
            generation = previous.mark.generation;
            for name in &previous.mark.chunks {
                let Some(&(modified, _)) = chunks.get(name) else {
                    continue;
                };
                if !unreferenced.contains(name) || modified >= previous.at_ms {
                    continue;
                }
                // Asked again just before the delete: a push that read the
                // mark uploads the chunk again, and its new time saves it.
                let path = self.chunk_path(name);
                let meta = match shared.store.head(&path).await {
                    Ok(meta) => meta,
                    Err(object_store::Error::NotFound { .. }) => continue,
                    Err(e) => return Err(store_err("look up", &path)(e)),
                };
                if meta.last_modified.timestamp_millis() >= previous.at_ms {
                    continue;
                }
                match shared.store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(store_err("delete", &path)(e)),
                }
                report.deleted += 1;
                report.deleted_bytes += meta.size;
                deleted.insert(name.clone());
            }
            if !deleted.is_empty() {
                generation += 1;
            }
        }
        let mut marked: Vec<String> = unreferenced
            .into_iter()
            .filter(|name| !deleted.contains(*name))
            .filter(|name| chunks.get(*name).is_some_and(|(m, _)| now - m >= grace))
            .cloned()
            .collect();
        marked.sort();
        report.marked = marked.len();
        self.write_mark(&Mark {
            generation,
            chunks: marked,
        })
        .await?;
        tracing::info!(
            manifests = report.manifests,
            chunks = report.chunks,
            deleted = report.deleted,
            deleted_bytes = report.deleted_bytes,
            marked = report.marked,
            "collected the remote's garbage"
        );
        Ok(report)
    }
}
