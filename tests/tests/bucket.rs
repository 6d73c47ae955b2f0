//! What the remote's design promises of the bucket, through the library
//! with real `btrfs send` streams: it reveals no name, path or block of a
//! layer; an incremental push uploads the change, not the layer; and a
//! corrupt chunk, a missing one or the wrong key is an error naming it,
//! leaving nothing received but what the caller removes.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hull_checkpoint::btrfs;
use hull_remote::object_store::local::LocalFileSystem;
use hull_remote::object_store::ObjectStore;
use hull_remote::{Keys, Remote, RemoteError, RemoteOptions};
use hull_tests::stream::{self, BlockScanner, CountingStore, LoopVolume};
use hull_tests::{assert_same_tree, require_root};

/// A directory as the bucket, counted.
struct Bucket {
    root: PathBuf,
    key_file: PathBuf,
    counted: Arc<CountingStore>,
}

impl Bucket {
    fn new(dir: &Path) -> Bucket {
        let root = dir.join("bucket");
        fs::create_dir(&root).unwrap();
        let local: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(&root).unwrap());
        Bucket {
            counted: Arc::new(CountingStore::new(local)),
            key_file: dir.join("remote.key"),
            root,
        }
    }

    async fn open_with(&self, key_file: &Path) -> Result<Remote, RemoteError> {
        Remote::open_store(
            self.counted.clone(),
            "sandbox",
            "file:///bucket",
            key_file,
            RemoteOptions::default(),
        )
        .await
    }

    async fn open(&self) -> Remote {
        self.open_with(&self.key_file).await.unwrap()
    }

    /// Every object: its path under the bucket and its bytes.
    fn objects(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut todo = vec![self.root.clone()];
        while let Some(dir) = todo.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else {
                    let rel = path.strip_prefix(&self.root).unwrap();
                    out.push((rel.to_string_lossy().into_owned(), fs::read(&path).unwrap()));
                }
            }
        }
        out
    }

    fn chunk_file(&self, name: &str) -> PathBuf {
        self.root.join("sandbox/chunks").join(&name[..2]).join(name)
    }
}

fn random_into(path: &Path, offset: u64, len: u64) {
    stream::random_into(path, offset, len)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// File and directory names of the layer: none shorter than 6 bytes (a
/// shorter string turns up by chance in megabytes of ciphertext).
const NAMES: [&str; 6] = [
    "alice-home",
    "secret-plans.txt",
    "home/alice-home/secret-plans.txt",
    "id_ed25519",
    "home/alice-home/.ssh/id_ed25519",
    "quarterly-report",
];

fn make_home(src: &Path) {
    btrfs::create_subvolume(src).unwrap();
    let home = src.join("home/alice-home");
    fs::create_dir_all(home.join(".ssh")).unwrap();
    fs::create_dir_all(home.join("quarterly-report")).unwrap();
    fs::write(
        home.join("secret-plans.txt"),
        "the quick brown fox jumps over the lazy dog. ".repeat(20_000),
    )
    .unwrap();
    fs::write(home.join(".ssh/id_ed25519"), stream::noise(1, 411)).unwrap();
    for i in 0..16 {
        random_into(
            &home.join(format!("quarterly-report/part-{i:04}.bin")),
            0,
            256 << 10,
        );
    }
}

/// A volume under `dir` whose root holds the layer `src` and its
/// read-only snapshot `v1`.
fn home_snapshot(dir: &Path) -> (LoopVolume, PathBuf) {
    let volume = LoopVolume::new(dir, 1 << 30);
    let root = volume.root().to_path_buf();
    make_home(&root.join("src"));
    btrfs::snapshot(&root.join("src"), &root.join("v1"), true).unwrap();
    (volume, root)
}

/// Fails naming the object that holds one of `NAMES`, one of `words` or
/// a block `scanner` knows.
fn assert_hidden(bucket: &Bucket, scanner: &BlockScanner, words: &[&str]) {
    for (path, body) in bucket.objects() {
        for name in NAMES {
            assert!(!path.contains(name), "object name {path} holds {name}");
        }
        for word in NAMES.iter().chain(words) {
            let found = body.windows(word.len()).any(|w| w == word.as_bytes());
            assert!(!found, "object {path} holds {word:?}");
        }
        assert_eq!(
            scanner.find(&body),
            None,
            "object {path} holds a block of the data"
        );
    }
}

/// Every whole 4 KiB block of every file under `root`.
fn blocks_of(root: &Path) -> BlockScanner {
    let mut scanner = BlockScanner::default();
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            todo.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            scanner.add(&fs::read(&path).unwrap());
        }
    }
    scanner
}

#[test]
fn the_bucket_reveals_no_name_path_or_block_of_the_layer() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_volume, root) = home_snapshot(dir.path());
    let scanner = blocks_of(&root.join("v1"));
    assert!(scanner.len() > 1000, "{} blocks", scanner.len());

    let bucket = Bucket::new(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pushed = rt.block_on(async {
        let remote = bucket.open().await;
        stream::push(&remote, &root.join("v1"), None).await
    });
    // The stream itself holds them in the clear: the checks below could fail.
    let mut send = std::process::Command::new("btrfs")
        .args(["send", "-q"])
        .arg(root.join("v1"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut plain = Vec::new();
    send.stdout.take().unwrap().read_to_end(&mut plain).unwrap();
    assert!(send.wait().unwrap().success());
    assert!(scanner.find(&plain).is_some());
    for name in ["secret-plans.txt", "id_ed25519"] {
        assert!(plain.windows(name.len()).any(|w| w == name.as_bytes()));
    }

    assert!(bucket.objects().len() as u64 >= pushed.progress.chunks + 2);
    assert_hidden(
        &bucket,
        &scanner,
        &["quick brown fox", "user.", "btrfs-stream"],
    );
    for sub in ["v1", "src"] {
        btrfs::destroy_subvolume(&root.join(sub)).unwrap();
    }
}

/// The layer's size: large against the change, modest for CI.
const LAYER_MIB: u64 = 256;

#[test]
fn ten_incremental_pushes_of_a_megabyte_upload_about_ten_megabytes() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let volume = LoopVolume::new(dir.path(), 2 << 30);
    let root = volume.root().to_path_buf();
    let src = root.join("src");
    btrfs::create_subvolume(&src).unwrap();
    // Many files: 1 MiB each.
    for i in 0..LAYER_MIB {
        random_into(&src.join(format!("file-{i:04}")), 0, 1 << 20);
    }
    btrfs::snapshot(&src, &root.join("c0"), true).unwrap();
    let bucket = Bucket::new(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let uploads = rt.block_on(async {
        let remote = bucket.open().await;
        let mut parent = stream::push(&remote, &root.join("c0"), None).await.id;
        let full = bucket.counted.put_bytes();
        assert!(full >= LAYER_MIB << 20, "the full push stored {full} bytes");
        let mut uploads = Vec::new();
        for i in 1..=10u64 {
            // A megabyte rewritten in place, across two files.
            random_into(
                &src.join(format!("file-{:04}", i * 7)),
                512 << 10,
                512 << 10,
            );
            random_into(&src.join(format!("file-{:04}", i * 7 + 1)), 0, 512 << 10);
            let snap = root.join(format!("c{i}"));
            btrfs::snapshot(&src, &snap, true).unwrap();
            let before = bucket.counted.put_bytes();
            let prev = root.join(format!("c{}", i - 1));
            let pushed = stream::push(&remote, &snap, Some((&prev, parent))).await;
            parent = pushed.id;
            uploads.push(bucket.counted.put_bytes() - before);
        }
        uploads
    });
    let total: u64 = uploads.iter().sum();
    eprintln!(
        "a {LAYER_MIB} MiB layer, 10 incremental pushes of a 1 MiB change: the store received {total} bytes ({:.1} MiB): {uploads:?}",
        total as f64 / f64::from(1 << 20)
    );
    // The ten changed megabytes went up, and not much more: a whole
    // layer each time would be 2.5 GiB.
    assert!(total >= 10 << 20, "{total} bytes");
    assert!(total <= 16 << 20, "{total} bytes");
    for i in (0..=10).rev() {
        btrfs::destroy_subvolume(&root.join(format!("c{i}"))).unwrap();
    }
    btrfs::destroy_subvolume(&src).unwrap();
}

/// A half-received subvolume: `btrfs receive` marks a subvolume
/// read-only only once its stream ended well.
fn read_only(path: &Path) -> bool {
    let out = std::process::Command::new("btrfs")
        .args(["property", "get", "-ts"])
        .arg(path)
        .arg("ro")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "ro=true"
}

#[test]
fn a_corrupt_or_missing_chunk_or_the_wrong_key_is_named_and_nothing_is_left_received() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_volume, root) = home_snapshot(dir.path());
    let recv = root.join("recv");
    fs::create_dir(&recv).unwrap();
    let bucket = Bucket::new(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let remote = bucket.open().await;
        let pushed = stream::push(&remote, &root.join("v1"), None).await;
        let chunks = &pushed.manifest.chunks;
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());

        // A byte changed in the second chunk: the first reached receive.
        let victim = &chunks[1].name;
        let file = bucket.chunk_file(victim);
        let good = fs::read(&file).unwrap();
        let mut bad = good.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x40;
        fs::write(&file, &bad).unwrap();
        let (err, made) = stream::pull(&remote, pushed.id, &recv).await.unwrap_err();
        assert!(
            matches!(&err, RemoteError::ChunkCorrupt { name, .. } if name == victim),
            "{err}"
        );
        assert!(err.to_string().contains(victim.as_str()), "{err}");
        assert!(err.to_string().contains("does not decrypt"), "{err}");
        // What receive made of the prefix: one subvolume, not finished;
        // the caller removes it and nothing else is left.
        assert!(made.len() <= 1, "{made:?}");
        for partial in &made {
            assert!(!read_only(partial), "{} looks received", partial.display());
            btrfs::destroy_subvolume(partial).unwrap();
        }
        assert_eq!(fs::read_dir(&recv).unwrap().count(), 0);
        fs::write(&file, &good).unwrap();

        // The first chunk missing: nothing reaches receive at all.
        let first = bucket.chunk_file(&chunks[0].name);
        let kept = fs::read(&first).unwrap();
        fs::remove_file(&first).unwrap();
        let (err, made) = stream::pull(&remote, pushed.id, &recv).await.unwrap_err();
        assert!(
            matches!(&err, RemoteError::ChunkMissing { name } if *name == chunks[0].name),
            "{err}"
        );
        assert!(err.to_string().contains(&chunks[0].name), "{err}");
        assert!(made.is_empty(), "{made:?}");
        fs::write(&first, kept).unwrap();

        // The wrong key: refused at open by the key check, before a pull.
        let other = dir.path().join("other.key");
        Keys::generate().create(&other).unwrap();
        let err = bucket.open_with(&other).await.unwrap_err();
        assert!(matches!(err, RemoteError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("key check"), "{err}");
        assert!(err.to_string().contains("other.key"), "{err}");

        // Repaired, the same pull receives the layer whole.
        stream::pull(&remote, pushed.id, &recv)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    });
    assert_same_tree(&root.join("v1"), &recv.join("v1"));
    for sub in ["recv/v1", "v1", "src"] {
        btrfs::destroy_subvolume(&root.join(sub)).unwrap();
    }
}

#[test]
fn the_bucket_reveals_nothing_of_a_stream_of_names_text_and_noise() {
    let dir = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(dir.path());
    // A stream like a send stream of a home directory: paths and names
    // in the clear, text that compresses, and blocks that do not.
    let mut input = Vec::new();
    for round in 0..64u32 {
        for name in NAMES {
            input.extend(format!("\0\0mkfile {name}\0{round}\0").as_bytes());
        }
        input.extend(
            format!("round {round}: the quick brown fox jumps over the lazy dog. ")
                .repeat(400)
                .as_bytes(),
        );
        input.extend(stream::noise(u64::from(round), 48 << 10));
    }
    let mut scanner = BlockScanner::default();
    scanner.add(&input);
    // The scanner finds what it looks for: a block of the input inside
    // other bytes.
    let mut planted = stream::noise(99, 100_001);
    planted.extend_from_slice(&input[8192 * 3..8192 * 3 + 4096]);
    assert_eq!(scanner.find(&planted), Some(100_001));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let remote = bucket.open().await;
        let pushed = remote
            .push(
                std::io::Cursor::new(input.clone()),
                hull_remote::ManifestId::new(),
                hull_remote::CheckpointMeta::default(),
                &|_| {},
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        remote.pull(pushed.id, &mut out, &|_| {}).await.unwrap();
        assert!(out == input);
    });
    assert_hidden(&bucket, &scanner, &["quick brown fox", "mkfile"]);
}
