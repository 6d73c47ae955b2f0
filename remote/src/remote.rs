//! The handle: push a stream, pull it back, list and read manifests.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::chunker::{ChunkSizes, Chunker};
use crate::error::{RemoteError, Result};
use crate::gc::read_mark;
use crate::index::ChunkIndex;
use crate::keys::Keys;
use crate::manifest::{
    CheckpointMeta, ChunkRef, Manifest, ManifestId, MANIFEST_FORMAT, MANIFEST_MAX,
};
use crate::seal::{self, OpenError};
use crate::settings::{open_store, RemoteSettings};

/// Where a push is; passed to the progress callback after every chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushProgress {
    /// Bytes of the stream chunked so far.
    pub bytes_read: u64,
    /// Chunks done (uploaded or found in the remote).
    pub chunks: u64,
    /// Chunks uploaded by this push, and their bytes as stored.
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Chunks the local index knew were up (no request made).
    pub chunks_known: u64,
    /// Chunks a HEAD request found up (another push, another sandbox).
    pub chunks_present: u64,
}

/// A finished push.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub id: ManifestId,
    pub manifest: Manifest,
    pub progress: PushProgress,
}

/// Where a pull is; passed to the progress callback after every chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullProgress {
    pub chunks: u64,
    pub chunks_total: u64,
    pub bytes_written: u64,
    pub bytes_total: u64,
}

/// Options of a handle made over a store given by the caller.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub concurrency: usize,
    pub chunk_sizes: ChunkSizes,
    /// The local chunk index (see [`crate::index`]); `None` asks the
    /// store about every chunk.
    pub index: Option<PathBuf>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            concurrency: 8,
            chunk_sizes: ChunkSizes::default(),
            index: None,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn ObjectStore>,
    /// hull's objects live under it: no leading or trailing slash.
    pub(crate) prefix: String,
    /// For messages: the url, or the store's description.
    url: String,
    pub(crate) keys: Keys,
    key_file: PathBuf,
    index: Option<ChunkIndex>,
    /// The index's first line but for the collector's generation.
    index_header: String,
    concurrency: usize,
    sizes: ChunkSizes,
}

/// An object store holding checkpoints, opened with its key. Cheap to
/// clone; every method can run concurrently with the others.
#[derive(Clone)]
pub struct Remote {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.shared.url)
            .finish_non_exhaustive()
    }
}

pub(crate) fn task_err(e: tokio::task::JoinError) -> RemoteError {
    RemoteError::Task(e)
}

impl Remote {
    /// Opens the remote the settings name: loads the key file (making it
    /// when there is none and the bucket has no key yet), then checks the
    /// key against the bucket's key check object (writing it at the first
    /// use). `index` is where this machine keeps its chunk index.
    pub async fn open(settings: &RemoteSettings, index: Option<&Path>) -> Result<Remote> {
        let s = settings.clone();
        let (store, prefix) = tokio::task::spawn_blocking(move || open_store(&s))
            .await
            .map_err(task_err)??;
        let options = RemoteOptions {
            concurrency: settings.concurrency.max(1),
            chunk_sizes: settings.chunk_sizes,
            index: index.map(Path::to_path_buf),
        };
        Remote::open_store(store, &prefix, &settings.url, &settings.key_file, options).await
    }

    /// [`Remote::open`] over a store the caller made (a local directory or
    /// memory in tests, or a store hulld configured itself).
    pub async fn open_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        url: &str,
        key_file: &Path,
        options: RemoteOptions,
    ) -> Result<Remote> {
        options
            .chunk_sizes
            .validate()
            .map_err(|reason| RemoteError::Settings { reason })?;
        let prefix = prefix.trim_matches('/').to_string();
        let keycheck = object_path(&prefix, "keycheck");
        let existing = match store.get(&keycheck).await {
            Ok(r) => Some(r.bytes().await.map_err(store_err("read", &keycheck))?),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(store_err("read", &keycheck)(e)),
        };
        let path = key_file.to_path_buf();
        let have_key = existing.is_some();
        let owned_url = url.to_string();
        let (keys, created) = tokio::task::spawn_blocking(move || {
            if have_key {
                // The bucket has a key: never make a new one beside it.
                match Keys::load(&path) {
                    Err(RemoteError::KeyRead { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        Err(RemoteError::KeyMissing {
                            key_file: path,
                            url: owned_url,
                        })
                    }
                    other => other.map(|k| (k, false)),
                }
            } else {
                Keys::load_or_create(&path)
            }
        })
        .await
        .map_err(task_err)??;
        if created {
            tracing::info!(key_file = %key_file.display(), url, "made a new remote key; keep a copy of it outside the VM");
        }
        match existing {
            Some(object) => {
                let check = keys.check_value();
                match seal::open(&keys, seal::KEYCHECK_AAD, &object, check.len()) {
                    Ok(plain) if plain == check => {}
                    Ok(_) | Err(OpenError::Decrypt) => {
                        return Err(RemoteError::WrongKey {
                            key_file: key_file.to_path_buf(),
                            url: url.to_string(),
                        })
                    }
                    Err(_) => {
                        return Err(RemoteError::KeyCheckCorrupt {
                            object: keycheck.to_string(),
                        })
                    }
                }
            }
            None => {
                let object = seal::seal(&keys, seal::KEYCHECK_AAD, &keys.check_value());
                if let Err(e) = store.put(&keycheck, PutPayload::from(object)).await {
                    // A key file made for a remote that refused it (a
                    // mistyped bucket, no write access) would be taken for
                    // that remote's key later: it goes with the failure.
                    if created {
                        let path = key_file.to_path_buf();
                        let _ =
                            tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
                    }
                    return Err(store_err("write", &keycheck)(e));
                }
            }
        }
        // The index is of this remote with this key: a digest of both
        // heads it, so another's index is never trusted; and of the
        // collector's generation, so an index that may name chunks a
        // collection deleted is dropped.
        let index_header = format!(
            "hull-remote chunk index v1 {}",
            blake3::keyed_hash(&keys.name, format!("{url}\n{prefix}").as_bytes()).to_hex()
        );
        let index = match options.index {
            Some(path) => {
                let generation = read_mark(store.as_ref(), &prefix, &keys)
                    .await?
                    .map_or(0, |m| m.mark.generation);
                let header = index_header_for(&index_header, generation);
                Some(
                    tokio::task::spawn_blocking(move || ChunkIndex::open(&path, &header))
                        .await
                        .map_err(task_err)??,
                )
            }
            None => None,
        };
        Ok(Remote {
            shared: Arc::new(Shared {
                store,
                prefix,
                url: url.to_string(),
                keys,
                key_file: key_file.to_path_buf(),
                index,
                index_header,
                concurrency: options.concurrency.max(1),
                sizes: options.chunk_sizes,
            }),
        })
    }

    pub fn url(&self) -> &str {
        &self.shared.url
    }

    pub fn key_file(&self) -> &Path {
        &self.shared.key_file
    }

    pub(crate) fn chunk_path(&self, name: &str) -> ObjectPath {
        object_path(
            &self.shared.prefix,
            &format!("chunks/{}/{name}", &name[..2]),
        )
    }

    pub(crate) fn manifest_path(&self, id: ManifestId) -> ObjectPath {
        object_path(&self.shared.prefix, &format!("manifests/{id}"))
    }

    /// Pushes `stream` (a `btrfs send` stream) and writes its manifest
    /// under `id`, the checkpoint's global id (pushing to an id that has a
    /// manifest replaces it). Chunks already in the remote are not uploaded
    /// again; a push that died part way is resumed by pushing the same
    /// stream again (the chunk index remembers what went up). Nothing names
    /// the stream until its manifest is written, last.
    pub async fn push<R>(
        &self,
        stream: R,
        id: ManifestId,
        meta: CheckpointMeta,
        progress: &(dyn Fn(&PushProgress) + Send + Sync),
    ) -> Result<Pushed>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let shared = &self.shared;
        // Chunks a collection marked may be deleted once this push is
        // under way: the ones it needs are uploaded again (which makes
        // them newer than the mark), never taken as present.
        let mark = self.read_mark().await?;
        if let (Some(index), Some(mark)) = (&shared.index, &mark) {
            let index = index.clone();
            let header = index_header_for(&shared.index_header, mark.mark.generation);
            tokio::task::spawn_blocking(move || index.rebase(&header))
                .await
                .map_err(task_err)??;
        }
        let marked: HashSet<String> = mark
            .map(|m| m.mark.chunks.into_iter().collect())
            .unwrap_or_default();
        let marked = &marked;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(shared.concurrency);
        let keys = shared.keys.clone();
        let sizes = shared.sizes;
        // Chunking is CPU work on a stream read through a blocking bridge:
        // a thread of the blocking pool, never a runtime worker.
        let chunker = tokio::task::spawn_blocking(move || {
            let mut chunker = Chunker::new(tokio_util::io::SyncIoBridge::new(stream), &keys, sizes);
            let mut hasher = blake3::Hasher::new();
            let mut len = 0u64;
            loop {
                match chunker.next_chunk() {
                    Ok(Some(chunk)) => {
                        hasher.update(&chunk);
                        len += chunk.len() as u64;
                        if tx.blocking_send(Ok(chunk)).is_err() {
                            return None;
                        }
                    }
                    Ok(None) => return Some((len, hasher.finalize())),
                    Err(e) => {
                        let _ = tx.blocking_send(Err(RemoteError::ReadStream(e)));
                        return None;
                    }
                }
            }
        });
        let chunks = futures::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|item| (item, rx))
        });
        let results = chunks
            .map(|chunk| async move { self.store_chunk(chunk?, marked).await })
            .buffered(shared.concurrency);
        let mut results = std::pin::pin!(results);
        let mut state = PushProgress::default();
        let mut refs = Vec::new();
        while let Some(stored) = results.next().await {
            let stored = stored?;
            state.bytes_read += stored.len;
            state.chunks += 1;
            match stored.how {
                How::Known => state.chunks_known += 1,
                How::Present => state.chunks_present += 1,
                How::Uploaded(bytes) => {
                    state.chunks_uploaded += 1;
                    state.bytes_uploaded += bytes;
                }
            }
            refs.push(ChunkRef {
                name: stored.name,
                len: stored.len,
            });
            progress(&state);
        }
        let Some((stream_len, hash)) = chunker.await.map_err(task_err)? else {
            // The chunker stops early only after sending its error, which
            // the loop above returned; reaching here means it was lost.
            return Err(RemoteError::ReadStream(std::io::Error::other(
                "the stream's reader stopped without a reason",
            )));
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            id,
            meta,
            pushed_ms: now_ms(),
            stream_len,
            stream_hash: hash.to_hex().to_string(),
            chunks: refs,
        };
        let keys = shared.keys.clone();
        let encoded = manifest.clone();
        let object = tokio::task::spawn_blocking(move || {
            let json = serde_json::to_vec(&encoded)
                .unwrap_or_else(|_| unreachable!("a manifest is plain data"));
            seal::seal(&keys, &seal::manifest_aad(&id.to_string()), &json)
        })
        .await
        .map_err(task_err)?;
        let path = self.manifest_path(id);
        shared
            .store
            .put(&path, PutPayload::from(object))
            .await
            .map_err(store_err("write", &path))?;
        tracing::info!(%id, chunks = state.chunks, uploaded = state.chunks_uploaded, bytes_uploaded = state.bytes_uploaded, "pushed a checkpoint");
        Ok(Pushed {
            id,
            manifest,
            progress: state,
        })
    }

    async fn store_chunk(&self, data: Bytes, marked: &HashSet<String>) -> Result<Stored> {
        let shared = &self.shared;
        let keys = shared.keys.clone();
        let len = data.len() as u64;
        let (name, data) = tokio::task::spawn_blocking(move || (keys.chunk_name(&data), data))
            .await
            .map_err(task_err)?;
        let is_marked = marked.contains(&name);
        if !is_marked && shared.index.as_ref().is_some_and(|i| i.contains(&name)) {
            return Ok(Stored {
                name,
                len,
                how: How::Known,
            });
        }
        let path = self.chunk_path(&name);
        let found = if is_marked {
            Err(object_store::Error::NotFound {
                path: path.to_string(),
                source: "marked by the garbage collector: uploaded again".into(),
            })
        } else {
            shared.store.head(&path).await
        };
        let how = match found {
            Ok(_) => How::Present,
            Err(object_store::Error::NotFound { .. }) => {
                let keys = shared.keys.clone();
                let aad = seal::chunk_aad(&name);
                let object = tokio::task::spawn_blocking(move || seal::seal(&keys, &aad, &data))
                    .await
                    .map_err(task_err)?;
                let bytes = object.len() as u64;
                shared
                    .store
                    .put(&path, PutPayload::from(object))
                    .await
                    .map_err(store_err("upload", &path))?;
                How::Uploaded(bytes)
            }
            Err(e) => return Err(store_err("look up", &path)(e)),
        };
        if let Some(index) = shared.index.clone() {
            let recorded = name.clone();
            tokio::task::spawn_blocking(move || index.insert(&recorded))
                .await
                .map_err(task_err)??;
        }
        Ok(Stored { name, len, how })
    }

    /// Every object under `rel` (a folder under the prefix).
    pub(crate) async fn list_objects(&self, rel: &str) -> Result<Vec<object_store::ObjectMeta>> {
        let dir = object_path(&self.shared.prefix, rel);
        self.shared
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(store_err("list", &dir))
    }

    /// The ids of the manifests in the remote, sorted.
    pub async fn list(&self) -> Result<Vec<ManifestId>> {
        let metas = self.list_objects("manifests").await?;
        let mut ids: Vec<ManifestId> = metas
            .iter()
            .filter_map(|m| m.location.filename()?.parse().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Reads and decrypts one manifest.
    pub async fn manifest(&self, id: ManifestId) -> Result<Manifest> {
        let path = self.manifest_path(id);
        let object = match self.shared.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(store_err("read", &path))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::ManifestMissing { id })
            }
            Err(e) => return Err(store_err("read", &path)(e)),
        };
        let keys = self.shared.keys.clone();
        let json = tokio::task::spawn_blocking(move || {
            seal::open(
                &keys,
                &seal::manifest_aad(&id.to_string()),
                &object,
                MANIFEST_MAX,
            )
        })
        .await
        .map_err(task_err)?
        .map_err(|_| RemoteError::ManifestCorrupt { id })?;
        let manifest: Manifest = serde_json::from_slice(&json)
            .map_err(|source| RemoteError::ManifestDecode { id, source })?;
        if manifest.id != id {
            return Err(RemoteError::ManifestCorrupt { id });
        }
        if manifest.format != MANIFEST_FORMAT {
            return Err(RemoteError::ManifestFormat {
                id,
                format: manifest.format,
            });
        }
        Ok(manifest)
    }

    /// The manifests a restore of `id` receives, in order: its oldest
    /// ancestor (a full stream) first, `id` last. A parent that is missing
    /// is an error naming it; a cycle (only a forged bucket has one) is
    /// refused as a corrupt manifest.
    pub async fn chain(&self, id: ManifestId) -> Result<Vec<Manifest>> {
        let mut chain = vec![self.manifest(id).await?];
        let mut seen = std::collections::HashSet::from([id]);
        while let Some(parent) = chain.last().and_then(|m| m.meta.parent) {
            if !seen.insert(parent) {
                return Err(RemoteError::ManifestCorrupt { id: parent });
            }
            chain.push(self.manifest(parent).await?);
        }
        chain.reverse();
        Ok(chain)
    }

    /// Writes the stream of manifest `id` to `sink` (`btrfs receive`'s
    /// stdin), fetching chunks in parallel and verifying each against its
    /// name before a byte of it is written, and the whole stream against
    /// the manifest's hash at the end. On an error the sink has a prefix
    /// of the stream: the caller discards what it received.
    pub async fn pull<W>(
        &self,
        id: ManifestId,
        sink: &mut W,
        progress: &(dyn Fn(&PullProgress) + Send + Sync),
    ) -> Result<Manifest>
    where
        W: AsyncWrite + Unpin,
    {
        let manifest = self.manifest(id).await?;
        let mut state = PullProgress {
            chunks_total: manifest.chunks.len() as u64,
            bytes_total: manifest.stream_len,
            ..PullProgress::default()
        };
        let mut chunks = futures::stream::iter(manifest.chunks.clone())
            .map(|c| self.fetch_chunk(c))
            .buffered(self.shared.concurrency);
        let mut hasher = blake3::Hasher::new();
        while let Some(data) = chunks.next().await {
            let data = data?;
            let (h, data) = tokio::task::spawn_blocking(move || {
                hasher.update(&data);
                (hasher, data)
            })
            .await
            .map_err(task_err)?;
            hasher = h;
            sink.write_all(&data)
                .await
                .map_err(RemoteError::WriteStream)?;
            state.chunks += 1;
            state.bytes_written += data.len() as u64;
            progress(&state);
        }
        sink.flush().await.map_err(RemoteError::WriteStream)?;
        if state.bytes_written != manifest.stream_len
            || hasher.finalize().to_hex().as_str() != manifest.stream_hash
        {
            return Err(RemoteError::StreamHash { id });
        }
        Ok(manifest)
    }

    async fn fetch_chunk(&self, chunk: ChunkRef) -> Result<Vec<u8>> {
        let name = chunk.name;
        let corrupt = |reason| RemoteError::ChunkCorrupt {
            name: name.clone(),
            reason,
        };
        if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(corrupt("the manifest names it wrongly"));
        }
        let len = usize::try_from(chunk.len).map_err(|_| corrupt("its length is too large"))?;
        let path = self.chunk_path(&name);
        let object = match self.shared.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(store_err("read", &path))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::ChunkMissing { name })
            }
            Err(e) => return Err(store_err("read", &path)(e)),
        };
        let keys = self.shared.keys.clone();
        let aad = seal::chunk_aad(&name);
        let expected = name.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let plain = seal::open(&keys, &aad, &object, len).map_err(OpenError::reason)?;
            if plain.len() != len {
                return Err("it is not the length the manifest records");
            }
            if keys.chunk_name(&plain) != expected {
                return Err("its content does not match its name");
            }
            Ok(plain)
        })
        .await
        .map_err(task_err)?;
        opened.map_err(corrupt)
    }
}

struct Stored {
    name: String,
    len: u64,
    how: How,
}

enum How {
    Known,
    Present,
    Uploaded(u64),
}

pub(crate) fn object_path(prefix: &str, rel: &str) -> ObjectPath {
    if prefix.is_empty() {
        ObjectPath::from(rel)
    } else {
        ObjectPath::from(format!("{prefix}/{rel}"))
    }
}

pub(crate) fn store_err(
    what: &'static str,
    path: &ObjectPath,
) -> impl Fn(object_store::Error) -> RemoteError {
    let object = path.to_string();
    move |source| RemoteError::Store {
        what,
        object: object.clone(),
        source,
    }
}

fn index_header_for(base: &str, generation: u64) -> String {
    format!("{base} gc {generation}")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
