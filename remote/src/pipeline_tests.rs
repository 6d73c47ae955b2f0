//! The pipeline against a directory store: roundtrip, dedup, resume,
//! damage, the wrong key, garbage collection. What the bucket shows is
//! tested with real send streams in tests/tests/bucket.rs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use object_store::local::LocalFileSystem;

use crate::chunker::tests::noise;
use crate::*;

struct Bucket {
    _dir: tempfile::TempDir,
    root: PathBuf,
    key_file: PathBuf,
    index: PathBuf,
}

impl Bucket {
    fn new() -> Bucket {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("bucket");
        std::fs::create_dir(&root).unwrap();
        Bucket {
            key_file: dir.path().join("remote.key"),
            index: dir.path().join("index"),
            root,
            _dir: dir,
        }
    }

    async fn open_with(&self, key_file: &Path, index: bool) -> Result<Remote> {
        let store = Arc::new(LocalFileSystem::new_with_prefix(&self.root).unwrap());
        let options = RemoteOptions {
            index: index.then(|| self.index.clone()),
            ..RemoteOptions::default()
        };
        Remote::open_store(store, "hull/sandbox", "file:///test", key_file, options).await
    }

    async fn open(&self) -> Remote {
        self.open_with(&self.key_file, false).await.unwrap()
    }

    /// Every object file under the bucket, with its path relative to it.
    fn objects(&self) -> Vec<(String, Vec<u8>)> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, Vec<u8>)>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else {
                    let rel = path
                        .strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    out.push((rel, std::fs::read(&path).unwrap()));
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out);
        out.sort();
        out
    }

    fn chunk_file(&self, name: &str) -> PathBuf {
        self.root
            .join("hull/sandbox/chunks")
            .join(&name[..2])
            .join(name)
    }
}

fn meta(comment: &str) -> CheckpointMeta {
    CheckpointMeta {
        checkpoint: Some("v1".into()),
        parent: None,
        comment: Some(comment.into()),
        created_ms: 1_700_000_000_000,
        services: serde_json::json!([{"name": "web", "cmd": "python3 -m http.server"}]),
    }
}

async fn push(remote: &Remote, data: &[u8]) -> Pushed {
    remote
        .push(
            std::io::Cursor::new(data.to_vec()),
            ManifestId::new(),
            meta("test"),
            &|_| {},
        )
        .await
        .unwrap()
}

async fn pull(remote: &Remote, id: ManifestId) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    remote.pull(id, &mut out, &|_| {}).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_stream_pulls_back_identical_with_its_manifest() {
    let bucket = Bucket::new();
    let remote = bucket.open().await;
    // Incompressible and compressible parts, not a multiple of anything.
    let mut data = noise(7, 5 << 20);
    data.extend(b"all work and no play ".repeat(200_000));
    data.extend(noise(8, 12345));
    let progress = Mutex::new(Vec::new());
    // The caller names the manifest: hulld gives its checkpoint's id.
    let id: ManifestId = "6f1c0a52-3d4e-4b7a-9c1d-2e3f4a5b6c7d".parse().unwrap();
    let pushed = remote
        .push(
            std::io::Cursor::new(data.clone()),
            id,
            meta("first"),
            &|p| progress.lock().unwrap().push(*p),
        )
        .await
        .unwrap();
    assert_eq!(pushed.id, id);
    assert_eq!(pushed.manifest.id, id);
    let progress = progress.into_inner().unwrap();
    assert_eq!(progress.len() as u64, pushed.progress.chunks);
    assert_eq!(progress.last().unwrap().bytes_read, data.len() as u64);
    assert!(pushed.progress.chunks > 3);
    assert_eq!(pushed.progress.chunks_uploaded, pushed.progress.chunks);

    assert_eq!(remote.list().await.unwrap(), vec![pushed.id]);
    let manifest = remote.manifest(pushed.id).await.unwrap();
    assert_eq!(manifest, pushed.manifest);
    assert_eq!(manifest.meta, meta("first"));
    assert_eq!(manifest.stream_len, data.len() as u64);

    // A handle opened afresh from the key file reads it back.
    let again = bucket.open().await;
    let pulled_progress = Mutex::new(None);
    let mut out = Vec::new();
    again
        .pull(pushed.id, &mut out, &|p| {
            *pulled_progress.lock().unwrap() = Some(*p)
        })
        .await
        .unwrap();
    assert!(out == data, "the pulled stream differs");
    let last = pulled_progress.into_inner().unwrap().unwrap();
    assert_eq!(last.bytes_written, data.len() as u64);
    assert_eq!(last.chunks, last.chunks_total);

    // The empty stream is a stream too.
    let empty = push(&remote, &[]).await;
    assert_eq!(empty.progress.chunks, 0);
    assert!(pull(&remote, empty.id).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_changed_in_64_uploads_about_a_megabyte() {
    let bucket = Bucket::new();
    let remote = bucket.open().await;
    let mut data = noise(1, 64 << 20);
    let first = push(&remote, &data).await;
    assert!(first.progress.bytes_uploaded >= 64 << 20);

    // The same stream again: nothing new goes up.
    let same = push(&remote, &data).await;
    assert_eq!(same.progress.chunks_uploaded, 0);
    assert_eq!(same.progress.chunks_present, same.progress.chunks);

    let changed = 1 << 20;
    data[30 << 20..(30 << 20) + changed].copy_from_slice(&noise(2, changed));
    let second = push(&remote, &data).await;
    let max = ChunkSizes::default().max as u64;
    let uploaded = second.progress.bytes_uploaded;
    eprintln!(
        "1 MiB changed in 64 MiB: {uploaded} bytes in {} chunks uploaded",
        second.progress.chunks_uploaded
    );
    // The changed megabyte, and at most the chunk either side that a new
    // boundary splits differently.
    assert!(
        uploaded >= changed as u64 && uploaded <= changed as u64 + 2 * max,
        "{uploaded} bytes uploaded"
    );
    assert!(pull(&remote, second.id).await.unwrap() == data);
    assert!(pull(&remote, first.id).await.unwrap() != data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_killed_part_way_resumes_from_the_chunk_index() {
    let bucket = Bucket::new();
    let data = noise(3, 24 << 20);
    let remote = bucket.open_with(&bucket.key_file, true).await.unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        remote
            .push(
                std::io::Cursor::new(data),
                ManifestId::new(),
                meta("killed"),
                &move |p| {
                    let _ = done_tx.send(p.chunks);
                },
            )
            .await
    });
    // Killed once five chunks are up.
    while let Some(chunks) = done_rx.recv().await {
        if chunks >= 5 {
            break;
        }
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());

    // Nothing names the half-pushed stream.
    let remote = bucket.open_with(&bucket.key_file, true).await.unwrap();
    assert!(remote.list().await.unwrap().is_empty());

    let data = noise(3, 24 << 20);
    let resumed = push(&remote, &data).await;
    let p = resumed.progress;
    assert!(p.chunks_known >= 5, "{p:?}");
    assert_eq!(
        p.chunks_known + p.chunks_present + p.chunks_uploaded,
        p.chunks
    );
    assert!(p.chunks_uploaded < p.chunks, "{p:?}");
    // A third push of the same stream asks nothing: all in the index.
    let third = push(&remote, &data).await;
    assert_eq!(third.progress.chunks_known, third.progress.chunks);
    assert_eq!(third.progress.chunks_uploaded, 0);
    assert!(pull(&remote, resumed.id).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_missing_chunk_is_named_and_never_written() {
    let bucket = Bucket::new();
    let remote = bucket.open().await;
    let data = noise(4, 6 << 20);
    let pushed = push(&remote, &data).await;
    let chunks = &pushed.manifest.chunks;
    assert!(chunks.len() >= 3);

    let victim = &chunks[1].name;
    let file = bucket.chunk_file(victim);
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    std::fs::write(&file, &bad).unwrap();
    let mut out = Vec::new();
    let err = remote.pull(pushed.id, &mut out, &|_| {}).await.unwrap_err();
    assert!(
        matches!(&err, RemoteError::ChunkCorrupt { name, .. } if name == victim),
        "{err}"
    );
    assert!(err.to_string().contains(victim.as_str()), "{err}");
    // Only the chunk before the bad one reached the sink.
    assert_eq!(out.len() as u64, chunks[0].len);

    // A chunk stored under another's name fails too (its AEAD binds the name).
    std::fs::write(
        &file,
        std::fs::read(bucket.chunk_file(&chunks[2].name)).unwrap(),
    )
    .unwrap();
    let err = pull(&remote, pushed.id).await.unwrap_err();
    assert!(
        matches!(&err, RemoteError::ChunkCorrupt { name, .. } if name == victim),
        "{err}"
    );

    std::fs::remove_file(&file).unwrap();
    let err = pull(&remote, pushed.id).await.unwrap_err();
    assert!(
        matches!(&err, RemoteError::ChunkMissing { name } if name == victim),
        "{err}"
    );
    assert!(err.to_string().contains("missing"), "{err}");

    std::fs::write(&file, &good).unwrap();
    assert!(pull(&remote, pushed.id).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_key_or_no_key_is_a_clear_error() {
    let bucket = Bucket::new();
    let remote = bucket.open().await;
    let pushed = push(&remote, &noise(5, 1 << 20)).await;

    let other_key = bucket.root.parent().unwrap().join("other.key");
    Keys::generate().create(&other_key).unwrap();
    let err = bucket.open_with(&other_key, false).await.unwrap_err();
    assert!(matches!(err, RemoteError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("other.key"), "{err}");

    // No key file at all: refused, and none is made beside the bucket's.
    let missing = bucket.root.parent().unwrap().join("missing.key");
    let err = bucket.open_with(&missing, false).await.unwrap_err();
    assert!(matches!(err, RemoteError::KeyMissing { .. }), "{err}");
    assert!(!missing.exists());

    // A manifest that does not decrypt is named.
    let path = bucket
        .root
        .join("hull/sandbox/manifests")
        .join(pushed.id.to_string());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = remote.manifest(pushed.id).await.unwrap_err();
    assert!(
        matches!(err, RemoteError::ManifestCorrupt { id } if id == pushed.id),
        "{err}"
    );
    let unknown: ManifestId = "00000000-0000-4000-8000-000000000000".parse().unwrap();
    let err = pull(&remote, unknown).await.unwrap_err();
    assert!(matches!(err, RemoteError::ManifestMissing { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_refuses_the_key_check_leaves_no_key_file() {
    let bucket = Bucket::new();
    // A directory where the key check object would go: no object there
    // to read, and none can be written.
    std::fs::create_dir_all(bucket.root.join("hull/sandbox/keycheck/in-the-way")).unwrap();
    let err = bucket.open_with(&bucket.key_file, false).await.unwrap_err();
    assert!(
        matches!(err, RemoteError::Store { what: "write", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("keycheck"), "{err}");
    assert!(
        !bucket.key_file.exists(),
        "a key file was left for a remote that refused it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunk_sizes_and_a_newer_manifest_format_are_refused() {
    let bucket = Bucket::new();
    let store = Arc::new(LocalFileSystem::new_with_prefix(&bucket.root).unwrap());
    let options = RemoteOptions {
        chunk_sizes: ChunkSizes {
            min: 1 << 20,
            avg: 1 << 10,
            max: 4 << 20,
        },
        ..RemoteOptions::default()
    };
    let err = Remote::open_store(store, "p", "file:///test", &bucket.key_file, options)
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Settings { .. }), "{err}");

    let remote = bucket.open().await;
    let pushed = push(&remote, b"a small stream").await;
    let mut newer = pushed.manifest.clone();
    newer.format = 2;
    let keys = Keys::load(&bucket.key_file).unwrap();
    let id = pushed.id.to_string();
    let object = crate::seal::seal(
        &keys,
        &crate::seal::manifest_aad(&id),
        &serde_json::to_vec(&newer).unwrap(),
    );
    std::fs::write(bucket.root.join("hull/sandbox/manifests").join(&id), object).unwrap();
    let err = pull(&remote, pushed.id).await.unwrap_err();
    assert!(
        matches!(err, RemoteError::ManifestFormat { format: 2, .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_runs_from_the_full_stream_to_the_checkpoint() {
    let bucket = Bucket::new();
    let remote = bucket.open().await;
    let mut parent = None;
    let mut ids = Vec::new();
    for round in 0..3u8 {
        let meta = CheckpointMeta {
            parent,
            ..meta("chain")
        };
        let pushed = remote
            .push(
                std::io::Cursor::new(vec![round; 1000]),
                ManifestId::new(),
                meta,
                &|_| {},
            )
            .await
            .unwrap();
        parent = Some(pushed.id);
        ids.push(pushed.id);
    }
    let chain = remote.chain(ids[2]).await.unwrap();
    assert_eq!(chain.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    assert_eq!(remote.chain(ids[0]).await.unwrap().len(), 1);

    std::fs::remove_file(
        bucket
            .root
            .join("hull/sandbox/manifests")
            .join(ids[1].to_string()),
    )
    .unwrap();
    let err = remote.chain(ids[2]).await.unwrap_err();
    assert!(
        matches!(err, RemoteError::ManifestMissing { id } if id == ids[1]),
        "{err}"
    );
}

/// Longer than the store's time resolution and than a push here takes.
const GRACE: std::time::Duration = std::time::Duration::from_millis(1500);

async fn after_the_grace() {
    tokio::time::sleep(GRACE + std::time::Duration::from_millis(300)).await;
}

fn chunk_files(bucket: &Bucket) -> std::collections::BTreeSet<String> {
    bucket
        .objects()
        .into_iter()
        .filter(|(path, _)| path.contains("/chunks/"))
        .map(|(path, _)| path.rsplit('/').next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marked_chunk_a_push_needs_is_uploaded_again_and_survives_the_sweep() {
    let bucket = Bucket::new();
    let remote = bucket.open_with(&bucket.key_file, true).await.unwrap();
    let options = GcOptions { grace: GRACE };
    let data = noise(20, 6 << 20);
    let first = push(&remote, &data).await;
    let names: std::collections::BTreeSet<String> = first
        .manifest
        .chunks
        .iter()
        .map(|c| c.name.clone())
        .collect();
    remote.delete(first.id).await.unwrap();
    let err = remote.delete(first.id).await.unwrap_err();
    assert!(matches!(err, RemoteError::ManifestMissing { .. }), "{err}");
    after_the_grace().await;
    let report = remote.gc(&options).await.unwrap();
    assert_eq!((report.deleted, report.marked), (0, names.len()));

    // The same data pushed again while its chunks are marked: the index
    // knows them and a HEAD would find them, but they go up again.
    let again = push(&remote, &data).await;
    assert_eq!(
        again.progress.chunks_uploaded, again.progress.chunks,
        "{:?}",
        again.progress
    );
    // Its manifest gone too: unreferenced, but newer than the mark.
    remote.delete(again.id).await.unwrap();
    after_the_grace().await;
    let report = remote.gc(&options).await.unwrap();
    assert_eq!(report.deleted, 0, "{report:?}");
    assert_eq!(chunk_files(&bucket), names);

    // Marked again by that run, swept by the next.
    after_the_grace().await;
    let report = remote.gc(&options).await.unwrap();
    assert_eq!(report.deleted, names.len(), "{report:?}");
    assert!(chunk_files(&bucket).is_empty());

    // The index named every deleted chunk; the sweep's new generation
    // drops it, and the next push uploads everything.
    let third = push(&remote, &data).await;
    assert_eq!(third.progress.chunks_known, 0, "{:?}", third.progress);
    assert_eq!(third.progress.chunks_uploaded, third.progress.chunks);
    assert!(pull(&remote, third.id).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_that_does_not_decrypt_is_named_and_nothing_is_deleted() {
    let bucket = Bucket::new();
    let remote = bucket.open().await;
    let pushed = push(&remote, &noise(21, 1 << 20)).await;
    remote.gc(&GcOptions::default()).await.unwrap();
    let mark = bucket.root.join("hull/sandbox/gc/mark");
    let mut bytes = std::fs::read(&mark).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&mark, bytes).unwrap();
    let err = remote.gc(&GcOptions::default()).await.unwrap_err();
    assert!(matches!(err, RemoteError::MarkCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("gc/mark"), "{err}");
    assert!(pull(&remote, pushed.id).await.is_ok());
}
