//! Checkpoint streams for the remote's tests and `hull-bench remote`: a
//! loop-mounted btrfs volume in a temp dir, `btrfs send` of a snapshot
//! pushed to a [`Remote`], and a pull into `btrfs receive`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use hull_checkpoint::{StoragePaths, Volume};
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

/// `btrfs send` of the read-only `snapshot`, incremental from `parent`:
/// the one place the tests and the bench make a send stream. Its stdout
/// is piped. Called within a tokio runtime.
pub fn send(snapshot: &Path, parent: Option<&Path>) -> std::io::Result<tokio::process::Child> {
    let mut send = tokio::process::Command::new("btrfs");
    send.args(["send", "-q"]);
    if let Some(parent) = parent {
        send.arg("-p").arg(parent);
    }
    send.arg(snapshot)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
}

/// `btrfs receive` into the directory `into`, its stdin piped.
pub fn receive(into: &Path) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new("btrfs")
        .args(["receive", "-q"])
        .arg(into)
        .stdin(Stdio::piped())
        .spawn()
}

/// Pushes the stream of `snapshot` (incremental from `parent`, the
/// snapshot and its pushed id).
pub async fn push(remote: &Remote, snapshot: &Path, parent: Option<(&Path, ManifestId)>) -> Pushed {
    let mut child = send(snapshot, parent.map(|p| p.0)).expect("spawn btrfs send");
    let stdout = child.stdout.take().expect("piped stdout");
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
    let pushed = remote
        .push(stdout, meta, &|_| {})
        .await
        .unwrap_or_else(|e| panic!("push {}: {e}", snapshot.display()));
    assert!(
        child.wait().await.expect("wait for btrfs send").success(),
        "btrfs send {} failed",
        snapshot.display()
    );
    pushed
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
    let mut child = receive(into).expect("spawn btrfs receive");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let pulled = remote.pull(id, &mut stdin, &|_| {}).await;
    drop(stdin);
    let received = child.wait().await.expect("wait for btrfs receive");
    match pulled {
        Ok(manifest) => {
            assert!(received.success(), "btrfs receive of {id} failed");
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
