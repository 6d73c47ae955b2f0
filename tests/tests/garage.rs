//! A real subvolume through a real S3 server: `btrfs send` of a
//! checkpoint and of an incremental one pushed to Garage on loopback
//! (`hull_tests::garage`), pulled back into `btrfs receive`, and the
//! received trees compared with the originals by their manifests
//! (`hull_tests::tree_manifest`); the same through a `file://` remote.
//! Without garage the Garage test skips, and under CI=true fails.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hull_checkpoint::btrfs;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use hull_remote::object_store::local::LocalFileSystem;
use hull_remote::object_store::path::Path as ObjectPath;
use hull_remote::object_store::ObjectStore;
use hull_remote::{
    CheckpointMeta, GcOptions, ManifestId, Pushed, Remote, RemoteError, RemoteSettings,
};
use hull_tests::garage::{self, Garage};
use hull_tests::stream::{self, noise, LoopVolume};
use hull_tests::{assert_same_tree, require_root, tree_manifest};

/// A layer with what a send stream must carry: a big file, text, a
/// directory tree, a symlink, modes, owners, an xattr, a hard link and a
/// sparse file.
fn make_layer(src: &Path) {
    btrfs::create_subvolume(src).unwrap();
    fs::create_dir_all(src.join("home/alice/.ssh")).unwrap();
    fs::write(src.join("home/alice/big.bin"), noise(1, 6 << 20)).unwrap();
    fs::write(
        src.join("home/alice/notes.txt"),
        "remember the milk\n".repeat(1000),
    )
    .unwrap();
    fs::write(src.join("home/alice/.ssh/id_ed25519"), "not really a key").unwrap();
    fs::set_permissions(
        src.join("home/alice/.ssh/id_ed25519"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::chown(src.join("home/alice"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::chown(
        src.join("home/alice/.ssh/id_ed25519"),
        Some(1000),
        Some(100),
    )
    .unwrap();
    std::os::unix::fs::symlink("notes.txt", src.join("home/alice/link")).unwrap();
    fs::hard_link(
        src.join("home/alice/notes.txt"),
        src.join("home/alice/notes-again.txt"),
    )
    .unwrap();
    rustix::fs::setxattr(
        src.join("home/alice/notes.txt"),
        "user.origin",
        b"the garage test",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let mut sparse = fs::File::create(src.join("home/alice/sparse.img")).unwrap();
    sparse.write_all(&noise(3, 64 << 10)).unwrap();
    sparse.seek(SeekFrom::Start(8 << 20)).unwrap();
    sparse.write_all(&noise(4, 64 << 10)).unwrap();
}

/// The child: a megabyte of the big file rewritten, a file added, one
/// name of the hard link removed.
fn change_layer(src: &Path) {
    let mut big = fs::OpenOptions::new()
        .write(true)
        .open(src.join("home/alice/big.bin"))
        .unwrap();
    big.seek(SeekFrom::Start(2 << 20)).unwrap();
    big.write_all(&noise(2, 1 << 20)).unwrap();
    drop(big);
    fs::write(src.join("home/alice/new.txt"), "new").unwrap();
    fs::remove_file(src.join("home/alice/notes.txt")).unwrap();
}

/// Two checkpoints of a layer (the second incremental) pushed to the
/// remote `settings` name and received by a fresh handle into the same
/// volume; the received trees must equal the originals.
fn roundtrip(dir: &Path, settings: impl FnOnce(PathBuf) -> RemoteSettings) {
    let volume = LoopVolume::new(dir, 1 << 30);
    let root = volume.root().to_path_buf();
    let src = root.join("src");
    make_layer(&src);
    btrfs::snapshot(&src, &root.join("v1"), true).unwrap();
    change_layer(&src);
    btrfs::snapshot(&src, &root.join("v2"), true).unwrap();

    let settings = settings(dir.join("remote.key"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let index = dir.join("chunk-index");
    rt.block_on(async {
        let remote = Remote::open(&settings, Some(&index)).await.unwrap();
        let v1 = stream::push(&remote, &root.join("v1"), None).await.id;
        let v2 = stream::push(&remote, &root.join("v2"), Some((&root.join("v1"), v1)))
            .await
            .id;
        assert_eq!(remote.list().await.unwrap().len(), 2);
        let m2 = remote.manifest(v2).await.unwrap();
        assert_eq!(m2.meta.parent, Some(v1));
        // Incremental: the child's stream is about the changed megabyte,
        // not the 6 MiB file.
        assert!(
            m2.stream_len < 3 << 20,
            "incremental stream of {} bytes",
            m2.stream_len
        );

        // Received elsewhere on the volume, by a handle that knows only
        // the settings and the key file (as another VM would).
        let fresh = Remote::open(&settings, None).await.unwrap();
        let recv = root.join("recv");
        fs::create_dir(&recv).unwrap();
        let chain = fresh.chain(v2).await.unwrap();
        assert_eq!(chain.iter().map(|m| m.id).collect::<Vec<_>>(), [v1, v2]);
        for manifest in chain {
            stream::pull(&fresh, manifest.id, &recv)
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    });
    let original = tree_manifest(&root.join("v2"));
    assert_eq!(original.entries.len(), 10, "{:?}", original.entries.keys());
    assert_same_tree(&root.join("v1"), &root.join("recv/v1"));
    assert_same_tree(&root.join("v2"), &root.join("recv/v2"));

    for sub in ["recv/v2", "recv/v1", "v2", "v1", "src"] {
        btrfs::destroy_subvolume(&root.join(sub)).unwrap();
    }
}

#[test]
fn checkpoints_pushed_to_a_directory_are_received_identical() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    roundtrip(dir.path(), |key_file| {
        RemoteSettings::new(format!("file://{}", bucket.display()), key_file)
    });
}

#[test]
fn checkpoints_pushed_to_garage_are_received_identical() {
    if !require_root() {
        return;
    }
    let Some(bin) = garage::find() else {
        garage::missing();
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let garage = Garage::start(&bin, &dir.path().join("garage"));
    roundtrip(dir.path(), |key_file| {
        garage.settings("sandbox-a", &key_file)
    });
    drop(garage);
}

/// Longer than the store's time resolution and than a push here takes.
const GRACE: Duration = Duration::from_secs(2);

async fn after_the_grace() {
    tokio::time::sleep(GRACE + Duration::from_millis(500)).await;
}

async fn push_bytes(remote: &Remote, data: &[u8]) -> Pushed {
    remote
        .push(
            std::io::Cursor::new(data.to_vec()),
            ManifestId::new(),
            CheckpointMeta::default(),
            &|_| {},
        )
        .await
        .unwrap()
}

fn names(pushed: &Pushed) -> BTreeSet<String> {
    pushed
        .manifest
        .chunks
        .iter()
        .map(|c| c.name.clone())
        .collect()
}

async fn chunks_in(store: &dyn ObjectStore, prefix: &str) -> BTreeSet<String> {
    let dir = ObjectPath::from(format!("{prefix}/chunks"));
    let listed: Vec<_> = store.list(Some(&dir)).try_collect().await.unwrap();
    listed
        .into_iter()
        .filter_map(|m| m.location.filename().map(str::to_string))
        .collect()
}

/// Two pushes sharing chunks, one deleted: the collection deletes only
/// the chunks the other does not name, and not before its mark is older
/// than the grace; chunks a push uploaded without (yet) a manifest stay
/// through the grace; the survivor still pulls and verifies.
async fn collect(remote: &Remote, store: &dyn ObjectStore, prefix: &str) {
    let options = GcOptions { grace: GRACE };
    let a = noise(30, 8 << 20);
    let mut b = a[..5 << 20].to_vec();
    b.extend(noise(31, 3 << 20));
    let pa = push_bytes(remote, &a).await;
    let pb = push_bytes(remote, &b).await;
    let only_a: BTreeSet<String> = names(&pa).difference(&names(&pb)).cloned().collect();
    assert!(!only_a.is_empty());
    assert!(
        names(&pa).intersection(&names(&pb)).count() > 0,
        "no shared chunks"
    );
    remote.delete(pa.id).await.unwrap();

    // No mark yet: nothing is deleted; what is older than the grace is
    // marked (how much of A that is depends on how long the pushes took).
    let first = remote.gc(&options).await.unwrap();
    assert_eq!(first.deleted, 0, "{first:?}");
    let mut deleted = 0;

    // A push in progress: chunks up, no manifest yet (its stream stays
    // open after 8 MiB).
    let before = chunks_in(store, prefix).await;
    let pending = {
        let remote = remote.clone();
        let (reader, mut writer) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut writer, &noise(32, 8 << 20))
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            remote
                .push(
                    reader,
                    ManifestId::new(),
                    CheckpointMeta::default(),
                    &move |p| {
                        let _ = tx.send(p.chunks_uploaded);
                    },
                )
                .await
        });
        while let Some(uploaded) = rx.recv().await {
            if uploaded >= 3 {
                break;
            }
        }
        task.abort();
        let _ = task.await;
        writer.abort();
        let after = chunks_in(store, prefix).await;
        after.difference(&before).cloned().collect::<BTreeSet<_>>()
    };
    assert!(pending.len() >= 3, "{pending:?}");

    // Sweeps what the first run marked, marks the rest of A's chunks and
    // the pending ones (all older than the grace now): those were not in
    // the first mark and stay.
    after_the_grace().await;
    let second = remote.gc(&options).await.unwrap();
    deleted += second.deleted;
    let left = chunks_in(store, prefix).await;
    assert!(
        pending.is_subset(&left),
        "a chunk of a push in progress was deleted within the grace"
    );
    assert!(
        names(&pb).is_subset(&left),
        "a chunk the other manifest names was deleted"
    );
    assert_eq!(
        second.marked,
        only_a.intersection(&left).count() + pending.len(),
        "{second:?}"
    );
    // The mark it left is younger than the grace: the next run waits.
    let waiting = remote.gc(&options).await.unwrap();
    assert_eq!(waiting.deleted, 0, "{waiting:?}");
    assert!(waiting.wait.is_some(), "{waiting:?}");

    // Twice the grace after their upload, with no manifest naming them,
    // the pending chunks go too; nothing the other manifest names does.
    after_the_grace().await;
    let third = remote.gc(&options).await.unwrap();
    deleted += third.deleted;
    let left = chunks_in(store, prefix).await;
    assert!(
        left.is_disjoint(&only_a),
        "a chunk only the deleted manifest named is left"
    );
    assert!(
        left.is_disjoint(&pending),
        "an abandoned push's chunk is left"
    );
    assert!(
        names(&pb).is_subset(&left),
        "a chunk the other manifest names was deleted"
    );
    assert_eq!(deleted, only_a.len() + pending.len());

    let mut out = Vec::new();
    remote.pull(pb.id, &mut out, &|_| {}).await.unwrap();
    assert!(out == b, "the surviving checkpoint differs");
    let err = remote
        .pull(pa.id, &mut Vec::new(), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::ManifestMissing { .. }), "{err}");
}

#[test]
fn garbage_collection_in_a_directory_keeps_what_is_named_or_young() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    fs::create_dir(&bucket).unwrap();
    let settings = RemoteSettings::new(
        format!("file://{}", bucket.display()),
        dir.path().join("remote.key"),
    );
    let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&bucket).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The same objects under a prefix, as an s3:// url would have.
        let remote = Remote::open_store(
            store.clone(),
            "sandbox-a",
            &settings.url,
            &settings.key_file,
            Default::default(),
        )
        .await
        .unwrap();
        collect(&remote, store.as_ref(), "sandbox-a").await;
    });
}

#[test]
fn garbage_collection_in_garage_keeps_what_is_named_or_young() {
    let Some(bin) = garage::find() else {
        garage::missing();
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let garage = Garage::start(&bin, &dir.path().join("garage"));
    let settings = garage.settings("sandbox-a", &dir.path().join("remote.key"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let remote = Remote::open(&settings, Some(&dir.path().join("index")))
            .await
            .unwrap();
        collect(&remote, garage.store().as_ref(), "sandbox-a").await;
    });
}
