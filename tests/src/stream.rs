//! Checkpoint streams for the remote's tests and `hull-bench remote`: a
//! loop-mounted btrfs volume in a temp dir, `btrfs send` of a snapshot
//! pushed to a [`Remote`], a pull into `btrfs receive`, a store that
//! counts what it was sent, and a scanner for data in the clear.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::BoxStream;
use hull_remote::object_store::{
    self, path::Path as ObjectPath, CopyOptions, GetOptions, GetResult, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult,
};

use hull_checkpoint::{btrfs, StoragePaths, Volume};
use hull_remote::{CheckpointMeta, Manifest, ManifestId, Pushed, Remote, RemoteError};

/// A loop-mounted btrfs volume under `dir`, unmounted on drop.
pub struct LoopVolume(pub Volume);

impl LoopVolume {
    /// A volume of `size` bytes (a sparse image) under `dir`.
    pub fn new(dir: &Path, size: u64) -> LoopVolume {
        let paths = StoragePaths {
            state_dir: dir.to_path_buf(),
            volume: dir.join("volume"),
            volume_image: dir.join("volume.img"),
            catalog: dir.join("catalog.db"),
        };
        LoopVolume(
            Volume::open(&paths, size, 0)
                .unwrap_or_else(|e| panic!("a btrfs volume under {}: {e}", dir.display())),
        )
    }

    pub fn root(&self) -> &Path {
        &self.0.root
    }
}

impl Drop for LoopVolume {
    fn drop(&mut self) {
        if let Err(e) = self.0.close() {
            eprintln!("cannot unmount the test volume: {e}");
        }
    }
}

/// Deterministic bytes that do not compress.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut block = [0u8; 32];
    use sha2::Digest as _;
    for (i, chunk) in out.chunks_mut(32).enumerate() {
        let mut hasher = sha2::Sha256::new();
        hasher.update(seed.to_le_bytes());
        hasher.update((i as u64).to_le_bytes());
        block.copy_from_slice(&hasher.finalize());
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
    out
}

/// `len` bytes from the kernel's generator written into `path` (made if
/// missing) at `offset`: data that does not compress, quick to make.
pub fn random_into(path: &Path, offset: u64, len: u64) -> std::io::Result<()> {
    use std::io::{Read as _, Seek as _};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut random = std::fs::File::open("/dev/urandom")?.take(len);
    std::io::copy(&mut random, &mut file)?;
    Ok(())
}

/// Pushes the stream of `snapshot` (incremental from `parent`, the
/// snapshot and its pushed id).
pub async fn push(remote: &Remote, snapshot: &Path, parent: Option<(&Path, ManifestId)>) -> Pushed {
    let send = btrfs::send(snapshot, parent.map(|p| p.0))
        .unwrap_or_else(|e| panic!("btrfs send {}: {e}", snapshot.display()));
    // A send that fails is a read error at the stream's end: the push fails.
    let stream = send.into_stream();
    let meta = CheckpointMeta {
        checkpoint: Some(
            snapshot
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        parent: parent.map(|(_, id)| id),
        comment: Some("pushed by hull-tests".into()),
        created_ms: 0,
        services: serde_json::json!([]),
    };
    remote
        .push(stream, ManifestId::new(), meta, &|_| {})
        .await
        .unwrap_or_else(|e| panic!("push {}: {e}", snapshot.display()))
}

/// Pulls `id` into `btrfs receive` in `into`. On an error, what receive
/// made of the prefix it got is left for the caller, with the path of the
/// subvolume it was making (if any).
pub async fn pull(
    remote: &Remote,
    id: ManifestId,
    into: &Path,
) -> Result<Manifest, (RemoteError, Vec<PathBuf>)> {
    let before: Vec<PathBuf> = std::fs::read_dir(into)
        .expect("read the receiving dir")
        .map(|e| e.unwrap().path())
        .collect();
    let mut receive = btrfs::receive(into)
        .unwrap_or_else(|e| panic!("btrfs receive into {}: {e}", into.display()));
    let mut stdin = receive.take_stdin().expect("piped stdin");
    let pulled = remote.pull(id, &mut stdin, &|_| {}).await;
    drop(stdin);
    let received = receive.finish().await;
    match pulled {
        Ok(manifest) => {
            if let Err(e) = received {
                panic!("btrfs receive of {id}: {e}");
            }
            Ok(manifest)
        }
        Err(e) => {
            let made = std::fs::read_dir(into)
                .expect("read the receiving dir")
                .map(|e| e.unwrap().path())
                .filter(|p| !before.contains(p))
                .collect();
            Err((e, made))
        }
    }
}

/// An object store that counts the bytes and objects PUT through it: what
/// the server received, whatever the client thinks it sent.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    put_bytes: AtomicU64,
    puts: AtomicU64,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> CountingStore {
        CountingStore {
            inner,
            put_bytes: AtomicU64::new(0),
            puts: AtomicU64::new(0),
        }
    }

    /// Bytes PUT so far (object bodies).
    pub fn put_bytes(&self) -> u64 {
        self.put_bytes.load(Ordering::Relaxed)
    }

    /// Objects PUT so far.
    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::Relaxed)
    }
}

impl std::fmt::Display for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "counting({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let len = payload.content_length() as u64;
        let result = self.inner.put_opts(location, payload, opts).await?;
        self.put_bytes.fetch_add(len, Ordering::Relaxed);
        self.puts.fetch_add(1, Ordering::Relaxed);
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        // hull-remote never uploads in parts; one would go uncounted.
        Err(object_store::Error::NotImplemented {
            operation: format!("a multipart upload of {location} through a counting store"),
            implementer: "CountingStore".into(),
        })
    }

    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// Finds any aligned 4 KiB block of some data anywhere in other bytes.
#[derive(Default)]
pub struct BlockScanner {
    blocks: Vec<Vec<u8>>,
    /// The first 8 bytes of each block, to the blocks that start so.
    heads: HashMap<u64, Vec<usize>>,
}

fn head(bytes: &[u8]) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(head)
}

impl BlockScanner {
    /// Adds every whole aligned 4 KiB block of `data` but runs of one
    /// byte (zeros turn up by chance in a format's framing).
    pub fn add(&mut self, data: &[u8]) {
        for block in data.chunks_exact(4096) {
            if block.iter().all(|b| *b == block[0]) {
                continue;
            }
            self.heads
                .entry(head(block))
                .or_default()
                .push(self.blocks.len());
            self.blocks.push(block.to_vec());
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The offset in `haystack` of a block, if one is there.
    pub fn find(&self, haystack: &[u8]) -> Option<usize> {
        (0..haystack.len().saturating_sub(4095)).find(|&at| {
            self.heads.get(&head(&haystack[at..])).is_some_and(|ids| {
                ids.iter()
                    .any(|&id| haystack[at..at + 4096] == self.blocks[id][..])
            })
        })
    }
}
