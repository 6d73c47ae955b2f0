//! Checkpoints pushed to a remote (a directory here, `file://`) by hulld's
//! pusher: in the background, incrementally, through a kill -9, pinned
//! while pushed, and harmless when the remote is down.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use hull_proto::CheckpointInfo;
use hull_remote::{Manifest, ManifestId, Remote, RemoteSettings};
use hull_tests::http::{request, sprite_name};
use hull_tests::{block_on, require_root, wait_until, Limits, TestHull};

/// A bucket directory and a key file outside the hull's state dir.
struct Bucket {
    dir: tempfile::TempDir,
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            dir: tempfile::Builder::new()
                .prefix("hull-remote-")
                .tempdir()
                .unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().join("bucket").display())
    }

    fn key_file(&self) -> PathBuf {
        self.dir.path().join("remote.key")
    }

    fn table(&self, extra: &str) -> String {
        format!(
            "[remote]\nurl = {:?}\nkey_file = {:?}\n{extra}\n",
            self.url(),
            self.key_file()
        )
    }

    /// The remote as another machine with the key file sees it.
    fn open(&self) -> Remote {
        let settings = RemoteSettings::new(self.url(), self.key_file());
        block_on(Remote::open(&settings, None)).unwrap()
    }
}

fn start(bucket: &Bucket, extra: &str) -> TestHull {
    TestHull::start_with(Limits {
        tables: bucket.table(extra),
        ..Limits::default()
    })
}

fn checkpoint(hull: &TestHull, id: &str) -> CheckpointInfo {
    block_on(async { hull.client().await.checkpoint_list().await.unwrap() })
        .checkpoints
        .into_iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no checkpoint {id}"))
}

fn wait_state(hull: &TestHull, id: &str, state: &str, timeout: Duration) -> CheckpointInfo {
    wait_until(timeout, &format!("{id} {state}"), || {
        checkpoint(hull, id).remote_state == state
    });
    checkpoint(hull, id)
}

fn create(hull: &TestHull) -> String {
    block_on(async { hull.client().await.checkpoint_create(None).await.unwrap() })
        .checkpoint
        .id
}

/// Random bytes in a new file of the inner's layer.
fn write_random(hull: &TestHull, path: &str, mib: usize) {
    block_on(hull.sh(&format!(
        "head -c {} /dev/urandom > {path} && sync",
        mib << 20
    )));
}

fn manifest(remote: &Remote, remote_id: &str) -> Manifest {
    let id: ManifestId = remote_id.parse().unwrap();
    block_on(remote.manifest(id)).unwrap()
}

fn chunk_names(m: &Manifest) -> HashSet<String> {
    m.chunks.iter().map(|c| c.name.clone()).collect()
}

fn hull_json(hull: &TestHull, args: &[&str]) -> serde_json::Value {
    let out = hull.hull(args);
    assert!(
        out.status.success(),
        "hull {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn checkpoints_are_pushed_in_the_background_and_the_next_incrementally() {
    if !require_root() {
        return;
    }
    let bucket = Bucket::new();
    let hull = start(&bucket, "");
    write_random(&hull, "/root/big", 8);
    let v1 = create(&hull);
    let c1 = wait_state(&hull, &v1, "pushed", Duration::from_secs(120));
    assert_eq!(c1.remote_error, None);
    assert_eq!(c1.origin, "here");
    let remote = bucket.open();
    let listed: Vec<String> = block_on(remote.list())
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        listed,
        std::slice::from_ref(&c1.remote_id),
        "the manifest is named by remote_id"
    );
    let m1 = manifest(&remote, &c1.remote_id);
    assert_eq!(m1.meta.parent, None, "the first push is a full stream");
    assert_eq!(m1.meta.checkpoint.as_deref(), Some(v1.as_str()));

    write_random(&hull, "/root/small", 1);
    let v2 = create(&hull);
    let c2 = wait_state(&hull, &v2, "pushed", Duration::from_secs(120));
    assert_eq!(c2.parent_remote_id.as_ref(), Some(&c1.remote_id));
    let m2 = manifest(&remote, &c2.remote_id);
    assert_eq!(
        m2.meta.parent.map(|p| p.to_string()),
        Some(c1.remote_id.clone()),
        "the second push is incremental from the first"
    );
    let new_chunks = chunk_names(&m2).difference(&chunk_names(&m1)).count();
    let first_chunks = chunk_names(&m1).len();
    assert!(
        new_chunks < first_chunks,
        "{new_chunks} new chunks for 1 MiB changed, {first_chunks} for the first 8 MiB"
    );
    assert!(
        m2.stream_len < m1.stream_len / 2,
        "{} vs {}",
        m2.stream_len,
        m1.stream_len
    );

    // Pushed again on request: everything is there already.
    let again = hull_json(&hull, &["--json", "checkpoint", "push", &v2]);
    assert_eq!(again["state"], "pushed");
    assert_eq!(again["remote_id"], c2.remote_id.as_str());
    assert_eq!(again["chunks_uploaded"], 0, "{again}");
    assert_eq!(again["chunks_present"], again["chunks"], "{again}");
    // The newest is the default; the list shows the state.
    let newest = hull_json(&hull, &["--json", "checkpoint", "push"]);
    assert_eq!(newest["checkpoint"], v2.as_str());
    let list = hull.hull(&["checkpoint", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("[pushed]"), "{text}");

    // Over the HTTP API: the scope of create, and NDJSON progress.
    let addr = block_on(hull.api_addr());
    let read = hull.api_token("read");
    let admin = hull.api_token("admin");
    let name = sprite_name(addr, &read);
    let path = format!("/v1/sprites/{name}/checkpoints/{v1}/push");
    let refused = request(addr, "POST", &path, Some(&read), None);
    assert_eq!(refused.status, 403, "{refused:?}");
    let pushed = request(addr, "POST", &path, Some(&admin), None);
    assert_eq!(pushed.status, 200, "{pushed:?}");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&pushed.body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = events.last().unwrap();
    assert_eq!(last["type"], "complete", "{events:?}");
    assert_eq!(last["remote_id"], c1.remote_id.as_str());
    let listed = request(
        addr,
        "GET",
        &format!("/v1/sprites/{name}/checkpoints/{v1}"),
        Some(&read),
        None,
    );
    assert_eq!(listed.json()["remote_state"], "pushed");
    // And `hull --url`, which speaks the control protocol through the API.
    let url = format!("http://{addr}");
    let out = hull_tests::remote(&url, &admin, &["--json", "checkpoint", "push", &v1], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let via_url: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(via_url["remote_id"], c1.remote_id.as_str());
    let status = hull_json(&hull, &["--json", "status"]);
    assert!(status["remote"]["pushed"].as_u64() >= Some(2), "{status}");
    assert_eq!(
        status["remote"]["pushing"],
        serde_json::Value::Null,
        "{status}"
    );
    let json = hull_json(&hull, &["--json", "checkpoint", "list"]);
    assert_eq!(json["checkpoints"][0]["remote_id"], c1.remote_id.as_str());
    assert_eq!(json["checkpoints"][0]["remote_state"], "pushed");
}

#[test]
fn a_push_killed_with_hulld_resumes_at_the_next_start() {
    if !require_root() {
        return;
    }
    let bucket = Bucket::new();
    let mut hull = start(&bucket, "");
    hull.kill9_hulld();
    hull.spawn_hulld_env(&[("HULL_FAILPOINT", "push:after-chunks")]);
    hull.wait_running(Duration::from_secs(20));
    write_random(&hull, "/root/big", 8);
    let v1 = create(&hull);
    hull.wait_hulld_exit(Duration::from_secs(120));
    assert!(hull.log().contains("failpoint reached"), "{}", hull.log());
    hull.spawn_hulld();
    hull.wait_running(Duration::from_secs(20));
    let c1 = wait_state(&hull, &v1, "pushed", Duration::from_secs(120));
    let m1 = manifest(&bucket.open(), &c1.remote_id);
    assert_eq!(m1.meta.checkpoint.as_deref(), Some(v1.as_str()));
    // The chunks that went up before the kill were not uploaded again.
    let status = hull_json(&hull, &["--json", "status"]);
    let resumed = &status["remote"]["last_pushed"];
    assert_eq!(resumed["checkpoint"], v1.as_str(), "{status}");
    let present = resumed["chunks_present"].as_u64().unwrap();
    let uploaded = resumed["chunks_uploaded"].as_u64().unwrap();
    assert!(present >= 2, "{resumed}");
    assert_eq!(present + uploaded, m1.chunks.len() as u64, "{resumed}");
}

#[test]
fn a_checkpoint_being_pushed_and_its_base_cannot_be_deleted() {
    if !require_root() {
        return;
    }
    let bucket = Bucket::new();
    // Slow enough that the pushes are still going when deleted.
    let hull = start(&bucket, "bandwidth_limit = 1000000");
    write_random(&hull, "/root/big", 4);
    let v1 = create(&hull);
    wait_state(&hull, &v1, "pushing", Duration::from_secs(60));
    let refused = hull.hull(&["checkpoint", "delete", &v1]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&format!("checkpoint {v1} is being pushed")),
        "{err}"
    );
    wait_state(&hull, &v1, "pushed", Duration::from_secs(120));
    write_random(&hull, "/root/more", 8);
    let v2 = create(&hull);
    wait_state(&hull, &v2, "pushing", Duration::from_secs(60));
    let refused = hull.hull(&["checkpoint", "delete", &v1]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&format!("is the base of the push of checkpoint {v2}")),
        "{err}"
    );
    wait_state(&hull, &v2, "pushed", Duration::from_secs(120));
    // Once pushed, it goes like any other.
    let deleted = hull.hull(&["checkpoint", "delete", &v1]);
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
}

#[test]
fn an_unreachable_remote_leaves_checkpoints_local_and_usable() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials.toml");
    std::fs::write(&creds, "access_key_id = \"a\"\nsecret_access_key = \"b\"\n").unwrap();
    std::fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // A port on loopback nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let table = format!(
        "[remote]\nurl = \"s3://bucket/box\"\nendpoint = \"http://127.0.0.1:{port}\"\nregion = \"test\"\ncredentials_file = {creds:?}\nkey_file = {:?}\n",
        dir.path().join("remote.key")
    );
    let hull = TestHull::start_with(Limits {
        tables: table,
        ..Limits::default()
    });
    block_on(hull.sh("echo kept > /root/state"));
    let v1 = create(&hull);
    wait_until(Duration::from_secs(120), "the push error", || {
        checkpoint(&hull, &v1).remote_error.is_some()
    });
    let c1 = checkpoint(&hull, &v1);
    assert_eq!(c1.remote_state, "local");
    let error = c1.remote_error.unwrap();
    assert!(
        error.contains("keycheck") || error.contains("127.0.0.1"),
        "{error}"
    );
    let list = hull.hull(&["checkpoint", "list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("push failed"),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    let status = hull_json(&hull, &["--json", "status"]);
    assert_eq!(
        status["remote"]["failed"][0]["checkpoint"],
        v1.as_str(),
        "{status}"
    );
    let text = String::from_utf8_lossy(&hull.hull(&["status"]).stdout).to_string();
    assert!(text.contains(&format!("push of {v1} failed")), "{text}");
    // An explicit push says why it failed.
    let push = hull.hull(&["checkpoint", "push", &v1]);
    assert!(!push.status.success());
    assert!(
        String::from_utf8_lossy(&push.stderr).contains("push failed"),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    // The checkpoint itself is whole.
    block_on(hull.sh("echo changed > /root/state"));
    let restored = hull.hull(&["checkpoint", "restore", &v1]);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    hull.wait_running(Duration::from_secs(20));
    assert_eq!(block_on(hull.sh("cat /root/state")), "kept\n");
    // A key made for a remote that never answered is not kept for it.
    assert!(!dir.path().join("remote.key").exists());
}

#[test]
fn hull_down_during_a_push_leaves_nothing_mounted_and_the_push_resumes() {
    if !require_root() {
        return;
    }
    /// Unmounts what a failed `hull down` left, so a failure leaves
    /// nothing behind either.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if !hull_tests::host_mounts_containing(&self.0).is_empty() {
                let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
    let bucket = Bucket::new();
    let mut hull = start(&bucket, "bandwidth_limit = 1000000");
    let _unmount = Unmount(hull.state_dir.join("volume"));
    write_random(&hull, "/root/big", 8);
    let v1 = create(&hull);
    wait_state(&hull, &v1, "pushing", Duration::from_secs(60));
    let out = hull.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let volume = hull.state_dir.join("volume");
    assert_eq!(
        hull_tests::host_mounts_containing(&volume),
        Vec::<String>::new(),
        "{}",
        hull.log()
    );
    hull.spawn_hulld();
    hull.wait_running(Duration::from_secs(20));
    wait_state(&hull, &v1, "pushed", Duration::from_secs(120));
}
