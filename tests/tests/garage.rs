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
use hull_remote::{Remote, RemoteSettings};
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
