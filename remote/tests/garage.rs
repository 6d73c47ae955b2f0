//! A real subvolume through a real S3 server: `btrfs send` of a
//! checkpoint and of an incremental one pushed to Garage on loopback,
//! pulled back into `btrfs receive`, and the received trees compared
//! with the originals.
//!
//! Garage (AGPL) runs as a separate process, never linked. It is found
//! through `HULL_GARAGE`, then PATH, then /var/cache/hull-ci/garage/bin
//! (where .ci/run installs it); without it the test skips, and under
//! CI=true fails.

// Test code: a failed unwrap is the report.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hull_checkpoint::{btrfs, StoragePaths, Volume};
use hull_remote::{CheckpointMeta, ManifestId, Remote, RemoteSettings};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn skip(why: &str) -> bool {
    if ci() {
        panic!("{why}, and CI=true forbids skipping");
    }
    eprintln!("skipping: {why}");
    true
}

fn find_garage() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("HULL_GARAGE") {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("garage"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let cached = PathBuf::from("/var/cache/hull-ci/garage/bin/garage");
        cached.is_file().then_some(cached)
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A single-node Garage on loopback with one bucket and one key.
struct Garage {
    bin: PathBuf,
    config: PathBuf,
    server: Child,
    endpoint: String,
    bucket: String,
    key_id: String,
    secret: String,
}

impl Garage {
    fn start(bin: &Path, dir: &Path) -> Garage {
        fs::create_dir_all(dir).unwrap();
        let (rpc, s3) = (free_port(), free_port());
        let config = dir.join("garage.toml");
        let secret: String =
            hex::encode(blake3::hash(dir.as_os_str().as_encoded_bytes()).as_bytes());
        fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\n\
                 data_dir = \"{data}\"\n\
                 db_engine = \"lmdb\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\n\
                 s3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                meta = dir.join("meta").display(),
                data = dir.join("data").display(),
            ),
        )
        .unwrap();
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
        let log = fs::File::create(dir.join("server.log")).unwrap();
        let server = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut garage = Garage {
            bin: bin.to_path_buf(),
            config,
            server,
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: "hull-test".into(),
            key_id: String::new(),
            secret: String::new(),
        };
        // The CLI reaches the server over RPC once it listens (`node id`
        // reads the node's key from disk and works before that).
        let started = Instant::now();
        loop {
            if garage
                .cli()
                .arg("status")
                .output()
                .unwrap()
                .status
                .success()
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "garage did not come up: {}",
                fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let node = run(garage.cli().args(["node", "id", "-q"]));
        let node = node.trim().split('@').next().unwrap().to_string();
        run(garage
            .cli()
            .args(["layout", "assign", "-z", "dc1", "-c", "1G", &node]));
        run(garage.cli().args(["layout", "apply", "--version", "1"]));
        let created = run(garage.cli().args(["key", "create", "hull-test-key"]));
        let field = |label: &str| {
            created
                .lines()
                .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {label} in `garage key create`: {created}"))
        };
        garage.key_id = field("Key ID:");
        garage.secret = field("Secret key:");
        run(garage.cli().args(["bucket", "create", &garage.bucket]));
        run(garage.cli().args([
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &garage.bucket,
            "--key",
            "hull-test-key",
        ]));
        garage
    }

    fn cli(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c").arg(&self.config).env("RUST_LOG", "warn");
        cmd
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A loop-mounted btrfs volume in the test's temp dir, unmounted on drop.
struct LoopVolume(Volume);

impl Drop for LoopVolume {
    fn drop(&mut self) {
        if let Err(e) = self.0.close() {
            eprintln!("cannot unmount the test volume: {e}");
        }
    }
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Every entry under `root`: relative path, kind, mode, and content (a
/// file's bytes or a symlink's target).
fn tree(root: &Path) -> Vec<(PathBuf, &'static str, u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, &'static str, u32, Vec<u8>)>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.mode() & 0o7777;
            if meta.is_dir() {
                out.push((rel, "dir", mode, Vec::new()));
                walk(root, &path, out);
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.push((
                    rel,
                    "symlink",
                    0,
                    target.as_os_str().as_encoded_bytes().to_vec(),
                ));
            } else {
                out.push((rel, "file", mode, fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

fn push(
    rt: &tokio::runtime::Runtime,
    remote: &Remote,
    snapshot: &Path,
    parent: Option<(&Path, ManifestId)>,
) -> ManifestId {
    let _in_runtime = rt.enter();
    let mut send = btrfs::send(snapshot, parent.map(|(p, _)| p)).unwrap();
    let stdout = send.take_stdout().unwrap();
    let meta = CheckpointMeta {
        checkpoint: Some(snapshot.file_name().unwrap().to_string_lossy().into_owned()),
        parent: parent.map(|(_, id)| id),
        comment: Some("garage test".into()),
        created_ms: 0,
        services: serde_json::json!([]),
    };
    rt.block_on(async {
        let pushed = remote
            .push(stdout, ManifestId::new(), meta, &|_| {})
            .await
            .unwrap();
        send.finish().await.unwrap();
        pushed.id
    })
}

fn pull(rt: &tokio::runtime::Runtime, remote: &Remote, id: ManifestId, into: &Path) {
    let _in_runtime = rt.enter();
    let mut receive = btrfs::receive(into).unwrap();
    let mut stdin = receive.take_stdin().unwrap();
    rt.block_on(async {
        remote.pull(id, &mut stdin, &|_| {}).await.unwrap();
        drop(stdin);
        receive.finish().await.unwrap();
    });
}

fn need_root() -> bool {
    nix::unistd::geteuid().is_root()
        || !skip("the remote's btrfs tests mount a loop volume, which needs root")
}

/// Two checkpoints of a layer (the second incremental) pushed to the
/// remote `settings` name and received by a fresh handle into the same
/// volume; the received trees must equal the originals.
fn roundtrip(dir: &Path, settings: impl FnOnce(PathBuf) -> RemoteSettings) {
    let paths = StoragePaths {
        state_dir: dir.to_path_buf(),
        volume: dir.join("volume"),
        volume_image: dir.join("volume.img"),
        catalog: dir.join("catalog.db"),
    };
    let volume = LoopVolume(Volume::open(&paths, 1 << 30, 0).unwrap());
    let root = volume.0.root.clone();

    // A layer with a big file, text, a directory tree, a symlink, modes.
    let src = root.join("src");
    btrfs::create_subvolume(&src).unwrap();
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
    std::os::unix::fs::symlink("notes.txt", src.join("home/alice/link")).unwrap();
    btrfs::snapshot(&src, &root.join("v1"), true).unwrap();

    // The child: a megabyte of the big file rewritten, a file added, one removed.
    let mut big = fs::OpenOptions::new()
        .write(true)
        .open(src.join("home/alice/big.bin"))
        .unwrap();
    std::io::Seek::seek(&mut big, std::io::SeekFrom::Start(2 << 20)).unwrap();
    big.write_all(&noise(2, 1 << 20)).unwrap();
    drop(big);
    fs::write(src.join("home/alice/new.txt"), "new").unwrap();
    fs::remove_file(src.join("home/alice/notes.txt")).unwrap();
    btrfs::snapshot(&src, &root.join("v2"), true).unwrap();

    let settings = settings(dir.join("remote.key"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let index = dir.join("chunk-index");
    let remote = rt.block_on(Remote::open(&settings, Some(&index))).unwrap();
    let v1 = push(&rt, &remote, &root.join("v1"), None);
    let v2 = push(&rt, &remote, &root.join("v2"), Some((&root.join("v1"), v1)));
    assert_eq!(rt.block_on(remote.list()).unwrap().len(), 2);
    let m2 = rt.block_on(remote.manifest(v2)).unwrap();
    assert_eq!(m2.meta.parent, Some(v1));
    // Incremental: the child's stream is about the changed megabyte, not the 6 MiB file.
    assert!(
        m2.stream_len < 3 << 20,
        "incremental stream of {} bytes",
        m2.stream_len
    );

    // Received elsewhere on the volume, by a handle that knows only the
    // settings and the key file (as another VM would).
    let fresh = rt.block_on(Remote::open(&settings, None)).unwrap();
    let recv = root.join("recv");
    fs::create_dir(&recv).unwrap();
    let chain = rt.block_on(fresh.chain(v2)).unwrap();
    assert_eq!(chain.iter().map(|m| m.id).collect::<Vec<_>>(), [v1, v2]);
    for manifest in chain {
        pull(&rt, &fresh, manifest.id, &recv);
    }
    let original = tree(&root.join("v2"));
    let names: Vec<_> = original.iter().map(|e| e.0.clone()).collect();
    assert_eq!(names.len(), 7, "{names:?}");
    assert!(
        tree(&recv.join("v1")) == tree(&root.join("v1")),
        "v1 differs after the round trip"
    );
    assert!(
        tree(&recv.join("v2")) == original,
        "v2 differs after the round trip"
    );

    for sub in ["recv/v2", "recv/v1", "v2", "v1", "src"] {
        btrfs::destroy_subvolume(&root.join(sub)).unwrap();
    }
}

#[test]
fn checkpoints_pushed_to_a_directory_are_received_identical() {
    if !need_root() {
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
    if !need_root() {
        return;
    }
    let Some(bin) = find_garage() else {
        skip("no garage binary (HULL_GARAGE, PATH, /var/cache/hull-ci/garage/bin): cargo install --locked garage");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let garage = Garage::start(&bin, &dir.path().join("garage"));
    let creds = dir.path().join("credentials.toml");
    fs::write(
        &creds,
        format!(
            "access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            garage.key_id, garage.secret
        ),
    )
    .unwrap();
    fs::set_permissions(&creds, fs::Permissions::from_mode(0o600)).unwrap();
    roundtrip(dir.path(), |key_file| RemoteSettings {
        endpoint: Some(garage.endpoint.clone()),
        region: Some("garage".into()),
        credentials_file: Some(creds),
        ..RemoteSettings::new(format!("s3://{}/sandbox-a", garage.bucket), key_file)
    });
    drop(garage);
}
