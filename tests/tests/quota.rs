//! The quota on the inner's writable layer (`[storage] layer_quota`): a
//! write past it fails inside with EDQUOT while hulld carries on, on
//! every layer, including one a restore made.

use std::time::Duration;

use hull_proto::{ExecEnd, ExitStatus};
use hull_tests::{block_on, require_root, Limits, TestHull};

const QUOTA: u64 = 64 << 20;

fn start(mode: &str) -> TestHull {
    let hull = TestHull::start_with(Limits {
        volume_size: "1G",
        tables: format!("[storage]\nlayer_quota = \"64M\"\nquota_mode = \"{mode}\"\n"),
        ..Limits::default()
    });
    hull.wait_running(Duration::from_secs(10));
    hull
}

/// `hull status --json` as JSON.
fn status_json(hull: &TestHull) -> serde_json::Value {
    let out = hull.hull(&["status", "--json"]);
    assert!(
        out.status.success(),
        "hull status --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// Writes `mib` MiB to `path` in the inner with dd and syncs it; the exec's
/// end and stderr.
async fn write(hull: &TestHull, path: &str, mib: u32) -> (ExecEnd, String) {
    let of = format!("of={path}");
    let count = format!("count={mib}");
    let out = hull
        .exec(&["dd", "if=/dev/zero", &of, "bs=1M", &count, "conv=fsync"])
        .await;
    (out.end, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_quota_exceeded(end: &ExecEnd, stderr: &str) {
    assert_ne!(
        *end,
        ExecEnd::Exited(ExitStatus::Code(0)),
        "a write past the quota succeeded"
    );
    assert!(
        stderr.contains("Disk quota exceeded"),
        "dd's error does not say the quota was reached: {stderr}"
    );
}

fn assert_ok(end: &ExecEnd, stderr: &str) {
    assert_eq!(
        *end,
        ExecEnd::Exited(ExitStatus::Code(0)),
        "the write failed: {stderr}"
    );
}

/// Fills the layer past its quota (in `/root/fill`), and checks hulld and
/// a checkpoint of the full layer.
async fn fill_checkpoint_and_remove(hull: &TestHull) {
    let (end, err) = write(hull, "/root/fill", 100).await;
    assert_quota_exceeded(&end, &err);

    // hulld is untouched: status answers and tells how full the layer is.
    let status = status_json(hull);
    let used = status["layer_used"].as_u64().expect("layer_used");
    assert!(
        used > QUOTA / 2 && used <= QUOTA + (1 << 20),
        "the layer holds {used} bytes after filling a {QUOTA}-byte quota"
    );
    // A full layer can still be checkpointed.
    let mut c = hull.client().await;
    let made = c
        .checkpoint_create(None)
        .await
        .expect("checkpoint a full layer");
    assert_eq!(made.checkpoint.id, "v1");
    let human = hull.hull(&["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("MiB used of a 64 MiB quota"),
        "hull status does not show the layer's quota:\n{human}"
    );
}

/// Full accounting counts what the layer references: removing a file
/// makes room at once, even while a checkpoint still holds it.
#[test]
fn a_write_past_the_full_qgroup_quota_fails_with_edquot_and_rm_makes_room() {
    if !require_root() {
        return;
    }
    let hull = start("full");
    assert_eq!(status_json(&hull)["layer_quota"], QUOTA);
    block_on(async {
        fill_checkpoint_and_remove(&hull).await;
        // The full checkpoint restores, and the layer made from it is as
        // full as the checkpoint: it references the same bytes.
        let mut c = hull.client().await;
        c.checkpoint_restore("v1")
            .await
            .expect("restore the full layer");
        let (end, err) = write(&hull, "/root/more", 16).await;
        assert_quota_exceeded(&end, &err);
        hull.sh("rm /root/fill && sync").await;
        let (end, err) = write(&hull, "/root/after", 16).await;
        assert_ok(&end, &err);
    });
}

/// Simple quotas charge a layer for what it wrote until the last copy is
/// gone: a file a checkpoint still holds counts until that checkpoint is
/// deleted (as docs/guide/configuration.md says).
#[test]
fn a_write_past_the_simple_quota_fails_with_edquot_and_room_comes_back() {
    if !require_root() {
        return;
    }
    let hull = start("simple");
    assert_eq!(status_json(&hull)["layer_quota"], QUOTA);
    block_on(async {
        fill_checkpoint_and_remove(&hull).await;
        hull.sh("rm /root/fill && sync").await;
        let (end, err) = write(&hull, "/root/after", 16).await;
        assert_quota_exceeded(&end, &err);
        let mut c = hull.client().await;
        c.checkpoint_delete("v1").await.expect("delete v1");
        // btrfs's cleaner frees a deleted snapshot's extents in the
        // background, woken by the periodic commit every 30 s unless hulld
        // wakes it; half that tells the two apart on a loaded machine.
        let begin = std::time::Instant::now();
        let deadline = begin + Duration::from_secs(15);
        loop {
            hull.sh("rm -f /root/after && sync").await;
            let (end, err) = write(&hull, "/root/after", 16).await;
            if end == ExecEnd::Exited(ExitStatus::Code(0)) {
                eprintln!("room came back after {:?}", begin.elapsed());
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no room 15 s after the checkpoint holding the file was deleted: {err}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// overlayfs makes its work directory at every mount and, when it cannot,
/// mounts read-only: an inner started on a full layer (a bounce, a
/// restart of hulld) would then not even let the user remove a file.
#[test]
fn a_full_layer_stays_writable_across_a_bounce() {
    if !require_root() {
        return;
    }
    let hull = start("simple");
    block_on(async {
        let (end, err) = write(&hull, "/root/fill", 100).await;
        assert_quota_exceeded(&end, &err);
        hull.client().await.bounce(0).await.expect("bounce");
        let (end, err) = write(&hull, "/root/more", 1).await;
        assert_quota_exceeded(&end, &err);
        hull.sh("rm /root/fill && sync").await;
        let (end, err) = write(&hull, "/root/after", 16).await;
        assert_ok(&end, &err);
    });
}

/// A restore makes the layer anew, as a snapshot of the checkpoint,
/// which carries the limit its layer had when it was taken: the new layer
/// gets the quota configured now.
#[test]
fn a_layer_made_by_a_restore_has_the_quota_configured_now() {
    if !require_root() {
        return;
    }
    let mut hull = start("simple");
    block_on(async {
        let (end, err) = write(&hull, "/root/some", 8).await;
        assert_ok(&end, &err);
        let mut c = hull.client().await;
        c.checkpoint_create(None).await.expect("checkpoint");
    });
    restart_with_quota(&mut hull, "64M", "96M");
    block_on(async {
        let mut c = hull.client().await;
        c.checkpoint_restore("v1").await.expect("restore");
    });
    let status = status_json(&hull);
    assert_eq!(
        status["layer_quota"],
        96 << 20,
        "status after restore: {status}"
    );
    block_on(async {
        let (end, err) = write(&hull, "/root/fill", 120).await;
        assert_quota_exceeded(&end, &err);
        hull.sh("rm /root/fill && sync").await;
        let (end, err) = write(&hull, "/root/after", 16).await;
        assert_ok(&end, &err);
    });
}

/// Stops hulld, changes `layer_quota` from `from` to `to` in its config,
/// starts it again on the same volume.
fn restart_with_quota(hull: &mut TestHull, from: &str, to: &str) {
    let out = hull.down();
    assert!(out.status.success(), "hull down: {out:?}");
    let config = std::fs::read_to_string(&hull.config).unwrap();
    let from = format!("layer_quota = \"{from}\"");
    assert!(config.contains(&from), "{config}");
    std::fs::write(
        &hull.config,
        config.replace(&from, &format!("layer_quota = \"{to}\"")),
    )
    .unwrap();
    hull.spawn_hulld();
    hull.wait_running(Duration::from_secs(10));
}

/// A quota set after the volume was made (an existing volume without
/// quotas) applies to the current layer from the next start.
#[test]
fn an_existing_volume_gets_the_quota_at_start() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start_with(Limits {
        volume_size: "1G",
        tables: "[storage]\nlayer_quota = \"none\"\n".into(),
        ..Limits::default()
    });
    hull.wait_running(Duration::from_secs(10));
    assert_eq!(status_json(&hull)["layer_quota"], serde_json::Value::Null);
    restart_with_quota(&mut hull, "none", "64M");
    assert_eq!(status_json(&hull)["layer_quota"], QUOTA);
    block_on(async {
        let (end, err) = write(&hull, "/root/fill", 100).await;
        assert_quota_exceeded(&end, &err);
    });
}
