//! Checkpoint and restore on a real btrfs loop volume, including crashes
//! injected at every step.

use std::time::Duration;

use hull_outer::client::ClientError;
use hull_proto::ErrorKind;
use hull_tests::{block_on, require_root, TestHull};

/// The snapshot directories on the volume, sorted.
fn subvolumes(hull: &TestHull) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(hull.state_dir.join("volume/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// The ids `hull checkpoint list` shows, sorted.
fn listed(hull: &TestHull) -> Vec<String> {
    let mut ids: Vec<String> =
        block_on(async { hull.client().await.checkpoint_list().await.unwrap() })
            .checkpoints
            .into_iter()
            .map(|c| c.id)
            .collect();
    ids.sort();
    ids
}

fn assert_catalog_agrees(hull: &TestHull) {
    assert_eq!(
        listed(hull),
        subvolumes(hull),
        "catalog and subvolumes disagree"
    );
}

const TREE: &str = "mkdir -p /root/proj/src /root/data && \
    echo 'fn main() {}' > /root/proj/src/main.rs && \
    seq 1 20000 > /root/proj/numbers && \
    dd if=/dev/urandom of=/root/data/blob bs=64k count=16 2>/dev/null && \
    echo original > /root/config";
const SUMS: &str = "cd /root && find proj data config -type f | sort | xargs md5sum";

#[test]
fn the_sprites_scenario_comes_back_byte_for_byte() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        hull.sh(TREE).await;
        let before = hull.sh(SUMS).await;
        let mut c = hull.client().await;
        let made = c.checkpoint_create(Some("clean".into())).await.unwrap();
        assert_eq!(made.checkpoint.id, "v1");
        assert_eq!(made.checkpoint.comment.as_deref(), Some("clean"));

        hull.sh("rm -rf /root/proj && echo broken > /root/config && dd if=/dev/zero of=/root/data/blob bs=1k count=1 conv=notrunc 2>/dev/null")
            .await;
        assert_ne!(hull.sh(SUMS).await, before);

        let report = c.checkpoint_restore("v1").await.unwrap();
        assert_eq!(report.restored, "v1");
        assert_eq!(
            hull.sh(SUMS).await,
            before,
            "restore did not bring everything back"
        );
        assert_eq!(hull.sh("cat /root/config").await, "original\n");
        let listing = c.checkpoint_list().await.unwrap();
        assert_eq!(listing.head.as_deref(), Some("v1"));
        let undo = listing
            .checkpoints
            .iter()
            .find(|c| c.id == report.undo)
            .unwrap();
        assert!(undo.auto);
    });
    assert_catalog_agrees(&hull);
}

#[test]
fn a_checkpoint_taken_during_appends_holds_a_prefix() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        hull.sh("(i=0; while true; do echo \"line $i\" >> /root/log; i=$((i+1)); done) >/dev/null 2>&1 & echo $! > /tmp/writer")
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let made = hull.client().await.checkpoint_create(None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        hull.sh("kill $(cat /tmp/writer)").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let fin = hull.sh("cat /root/log").await;
        hull.client()
            .await
            .checkpoint_restore(&made.checkpoint.id)
            .await
            .unwrap();
        let snap = hull.sh("cat /root/log").await;
        assert!(
            !snap.is_empty(),
            "the writer had written nothing at checkpoint time"
        );
        assert!(
            snap.len() < fin.len(),
            "writes after the checkpoint are missing from the final file"
        );
        assert!(
            fin.starts_with(&snap),
            "the checkpoint's file is not a prefix of the final file"
        );
        assert!(
            snap.ends_with('\n'),
            "a torn line in the checkpoint: {:?}",
            &snap[snap.len().saturating_sub(40)..]
        );
    });
}

#[test]
fn a_restore_can_itself_be_restored() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut c = hull.client().await;
        hull.sh("echo one > /root/state").await;
        c.checkpoint_create(Some("one".into())).await.unwrap();
        hull.sh("echo two > /root/state && touch /root/only-in-two")
            .await;
        let v2 = c.checkpoint_create(Some("two".into())).await.unwrap();
        assert_eq!(v2.checkpoint.parent.as_deref(), Some("v1"));

        let back = c.checkpoint_restore("v1").await.unwrap();
        assert_eq!(hull.sh("cat /root/state").await, "one\n");
        hull.sh("test ! -e /root/only-in-two").await;

        c.checkpoint_restore(&back.undo).await.unwrap();
        assert_eq!(hull.sh("cat /root/state").await, "two\n");
        hull.sh("test -e /root/only-in-two").await;
    });
    assert_catalog_agrees(&hull);
}

#[test]
fn unknown_ids_get_a_clear_error_and_change_nothing() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut c = hull.client().await;
        c.checkpoint_create(None).await.unwrap();
        for result in [
            c.checkpoint_restore("v42").await.map(|_| ()),
            c.checkpoint_delete("v42").await,
        ] {
            match result {
                Err(ClientError::Daemon(report)) => {
                    assert_eq!(report.kind, ErrorKind::NotFound);
                    assert!(report.message.contains("v42"), "{}", report.message);
                }
                other => panic!("expected NotFound, got {other:?}"),
            }
        }
        assert_eq!(c.checkpoint_list().await.unwrap().checkpoints.len(), 1);
    });
    let out = hull.hull(&["checkpoint", "restore", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint \"nope\""));
    assert_catalog_agrees(&hull);
}

#[test]
fn any_checkpoint_can_be_deleted_and_the_list_is_json() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        let mut c = hull.client().await;
        for i in 1..=3 {
            hull.sh(&format!("echo {i} > /root/n")).await;
            c.checkpoint_create(Some(format!("n={i}"))).await.unwrap();
        }
        c.checkpoint_restore("v2").await.unwrap();
        // v2 is where the current state came from; it can go all the same.
        c.checkpoint_delete("v2").await.unwrap();
        assert_eq!(hull.sh("cat /root/n").await, "2\n");
        // What the current state descends from is now v2's parent: a head
        // naming a deleted checkpoint would be the parent of the next one.
        assert_eq!(c.status().await.unwrap().head.as_deref(), Some("v1"));
    });
    let out = hull.hull(&["--json", "checkpoint", "list"]);
    assert!(out.status.success());
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = listing["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["v1", "v3", "v4"]);
    assert_eq!(
        listing["checkpoints"][1]["parent"], "v2",
        "the tree keeps its shape"
    );
    // Every checkpoint has its global id; without [remote] none is pushed.
    let v1 = &listing["checkpoints"][0];
    assert_eq!(v1["remote_id"].as_str().map(str::len), Some(36), "{v1}");
    assert_eq!(v1["remote_state"], "local");
    assert_eq!(v1["origin"], "here");
    assert_eq!(
        listing["checkpoints"][2]["parent_remote_id"], listing["checkpoints"][1]["remote_id"],
        "v4's parent is v3"
    );
    let push = hull.hull(&["checkpoint", "push"]);
    assert!(!push.status.success());
    assert!(
        String::from_utf8_lossy(&push.stderr).contains("add a [remote] table"),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );
    let human = hull.hull(&["checkpoint", "list"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("n=3"));
    assert_catalog_agrees(&hull);
}

/// Kill hulld at `failpoint` during `op`, restart it, and check the state
/// is consistent; returns the content of /root/state afterwards.
fn crash_at(failpoint: &str, op: &str) -> (TestHull, String) {
    let mut hull = TestHull::start();
    block_on(async {
        hull.sh("echo old > /root/state").await;
        hull.client()
            .await
            .checkpoint_create(Some("old".into()))
            .await
            .unwrap();
        hull.sh("echo new > /root/state").await;
    });
    hull.kill9_hulld();
    hull.spawn_hulld_env(&[("HULL_FAILPOINT", failpoint)]);
    hull.wait_running(Duration::from_secs(20));
    block_on(async {
        let mut c = hull.client().await;
        let result = match op {
            "create" => c.checkpoint_create(None).await.map(|_| ()),
            "restore" => c.checkpoint_restore("v1").await.map(|_| ()),
            "delete" => c.checkpoint_delete("v1").await,
            _ => unreachable!(),
        };
        assert!(
            result.is_err(),
            "{op} succeeded although hulld died at {failpoint}"
        );
    });
    hull.wait_hulld_exit(Duration::from_secs(10));
    assert!(hull.log().contains("failpoint reached"), "{}", hull.log());
    hull.spawn_hulld();
    hull.wait_running(Duration::from_secs(20));
    assert_catalog_agrees(&hull);
    let state = block_on(async { hull.sh("cat /root/state").await });
    (hull, state)
}

#[test]
fn a_crash_while_creating_rolls_the_checkpoint_back() {
    if !require_root() {
        return;
    }
    for failpoint in ["create:after-row", "create:after-snapshot"] {
        let (hull, state) = crash_at(failpoint, "create");
        assert_eq!(state, "new\n", "{failpoint}");
        assert_eq!(listed(&hull), ["v1"], "{failpoint}");
        assert!(
            hull.log().contains("creation was interrupted; rolled back"),
            "{failpoint}"
        );
        // The next checkpoint works and does not reuse the id.
        let next = block_on(async { hull.client().await.checkpoint_create(None).await.unwrap() });
        assert_eq!(next.checkpoint.id, "v3", "{failpoint}");
    }
}

#[test]
fn a_crash_while_restoring_keeps_a_whole_layer() {
    if !require_root() {
        return;
    }
    // Before the swap, the current state stays; the auto checkpoint, once
    // recorded, stays too (it is a complete checkpoint of that state).
    for (failpoint, expected_state) in [
        ("restore:after-auto-checkpoint", "new\n"),
        ("restore:after-layer-snapshot", "new\n"),
        ("restore:after-stop", "new\n"),
        ("restore:after-swap", "old\n"),
    ] {
        let (hull, state) = crash_at(failpoint, "restore");
        assert_eq!(state, expected_state, "{failpoint}");
        assert_eq!(listed(&hull), ["v1", "v2"], "{failpoint}");
        if failpoint != "restore:after-auto-checkpoint" {
            let log = hull.log();
            assert!(
                log.contains("rolled back") || log.contains("retired; deleted"),
                "{failpoint}: no repair logged"
            );
        }
        // The inner is usable, and the restore can be done now.
        block_on(async {
            hull.client().await.checkpoint_restore("v1").await.unwrap();
            assert_eq!(hull.sh("cat /root/state").await, "old\n");
        });
    }
}

#[test]
fn a_crash_while_deleting_finishes_the_deletion() {
    if !require_root() {
        return;
    }
    for failpoint in ["delete:after-mark", "delete:after-destroy"] {
        let (hull, state) = crash_at(failpoint, "delete");
        assert_eq!(state, "new\n", "{failpoint}");
        assert!(listed(&hull).is_empty(), "{failpoint}");
        assert!(
            hull.log().contains("deletion was interrupted; finished it"),
            "{failpoint}"
        );
    }
}

#[test]
fn automatic_checkpoints_are_kept_to_the_retention() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(hull_tests::Limits {
        auto_checkpoints_keep: 2,
        ..Default::default()
    });
    block_on(async {
        let mut c = hull.client().await;
        c.checkpoint_create(Some("base".into())).await.unwrap();
        for _ in 0..5 {
            c.checkpoint_restore("v1").await.unwrap();
        }
    });
    // Retention runs in the background after each restore.
    hull_tests::wait_until(Duration::from_secs(10), "retention", || {
        let listing = block_on(async { hull.client().await.checkpoint_list().await.unwrap() });
        listing.checkpoints.iter().filter(|c| c.auto).count() == 2
    });
    let listing = block_on(async { hull.client().await.checkpoint_list().await.unwrap() });
    let autos: Vec<&str> = listing
        .checkpoints
        .iter()
        .filter(|c| c.auto)
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(autos, ["v5", "v6"], "the newest automatic checkpoints stay");
    assert!(
        listing.checkpoints.iter().any(|c| c.id == "v1"),
        "a manual checkpoint went"
    );
    assert_catalog_agrees(&hull);
}

#[test]
fn concurrent_restores_are_serialised() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(async {
        hull.sh("echo a > /root/which").await;
        hull.client().await.checkpoint_create(None).await.unwrap();
        hull.sh("echo b > /root/which").await;
        hull.client().await.checkpoint_create(None).await.unwrap();
        let (mut c1, mut c2) = (hull.client().await, hull.client().await);
        let (r1, r2) = tokio::join!(c1.checkpoint_restore("v1"), c2.checkpoint_restore("v2"));
        let (r1, r2) = (r1.unwrap(), r2.unwrap());
        // Each took its own automatic checkpoint, one after the other.
        assert_ne!(r1.undo, r2.undo);
        let which = hull.sh("cat /root/which").await;
        assert!(which == "a\n" || which == "b\n", "{which:?}");
    });
    assert_catalog_agrees(&hull);
}

#[test]
fn a_snapshot_lost_behind_hullds_back_is_dropped_from_the_list() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start();
    block_on(async {
        let mut c = hull.client().await;
        c.checkpoint_create(None).await.unwrap();
        c.checkpoint_create(None).await.unwrap();
    });
    hull.kill9_hulld();
    hull_checkpoint::btrfs::destroy_subvolume(&hull.state_dir.join("volume/checkpoints/v1"))
        .unwrap();
    hull.spawn_hulld();
    hull.wait_running(Duration::from_secs(20));
    assert_eq!(listed(&hull), ["v2"]);
    assert!(hull
        .log()
        .contains("its snapshot is missing; removed from the catalog"));
}

#[test]
fn a_failed_checkpoint_names_each_cause_once() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    // A directory where the next snapshot goes: the snapshot ioctl fails
    // with EEXIST, deep in the storage stack.
    let taken = hull.state_dir.join("volume/checkpoints/v1");
    std::fs::create_dir(&taken).unwrap();
    let message = block_on(async {
        match hull.client().await.checkpoint_create(None).await {
            Err(ClientError::Daemon(report)) => report.message,
            other => panic!("expected the snapshot to fail, got {other:?}"),
        }
    });
    let os_error = std::io::Error::from_raw_os_error(libc::EEXIST).to_string();
    for part in [
        "cannot take the checkpoint",
        &format!("cannot snapshot {}", taken.display()),
        &os_error,
    ] {
        assert_eq!(
            message.matches(part).count(),
            1,
            "{part:?} should appear once in {message:?}"
        );
    }
    std::fs::remove_dir(&taken).unwrap();
    block_on(async {
        let made = hull.client().await.checkpoint_create(None).await.unwrap();
        assert_eq!(made.checkpoint.id, "v1", "the failed attempt left a gap");
    });
    assert_catalog_agrees(&hull);
}

#[test]
fn a_full_volume_gives_a_clear_error_and_a_consistent_catalog() {
    if !require_root() {
        return;
    }
    // Without a quota on the layer: the volume itself fills up.
    let hull = TestHull::start_with(hull_tests::Limits {
        volume_size: "300M",
        tables: "[storage]\nlayer_quota = \"none\"\n".into(),
        ..Default::default()
    });
    block_on(async {
        let fill = hull
            .exec(&["dd", "if=/dev/zero", "of=/root/fill", "bs=1M", "count=400"])
            .await;
        assert_ne!(
            fill.end,
            hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
            "the volume did not fill up"
        );
        let mut c = hull.client().await;
        let made = match c.checkpoint_create(None).await {
            // A snapshot needs little space; btrfs may still have it.
            Ok(made) => {
                assert_eq!(made.checkpoint.id, "v1");
                true
            }
            Err(ClientError::Daemon(report)) => {
                assert_eq!(report.kind, ErrorKind::Storage);
                assert!(report.message.contains("no space"), "{}", report.message);
                false
            }
            Err(e) => panic!("{e}"),
        };
        eprintln!("a checkpoint was made on the full volume: {made}");
        // Making room makes everything work again: the file, and the
        // checkpoint that holds it too if one was made (as the error says).
        hull.sh("rm /root/fill && sync").await;
        if made {
            c.checkpoint_delete("v1").await.unwrap();
        }
        // A deleted snapshot's space comes back once btrfs's cleaner ran.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match c.checkpoint_create(None).await {
                Ok(done) => {
                    // Failed attempts leave no gap in the ids.
                    assert_eq!(done.checkpoint.id, if made { "v2" } else { "v1" });
                    break;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("not yet (checkpoint made: {made}): {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no room after the file and checkpoint were deleted: {e}"),
            }
        }
    });
    assert_catalog_agrees(&hull);
}

/// FIFREEZE and FITHAW: _IOWR('X', 119/120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A copy of the volume's image as the disk holds it now: the filesystem is
/// frozen (everything committed is written, nothing new starts) meanwhile.
fn save_volume(hull: &TestHull) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    let volume = std::fs::File::open(hull.state_dir.join("volume")).unwrap();
    let saved = hull.dir.path().join("volume.saved");
    // SAFETY: FIFREEZE takes an int argument the kernel ignores, on an fd
    // that stays open for the call.
    let frozen = unsafe { libc::ioctl(volume.as_raw_fd(), FIFREEZE as _, 0) };
    assert_eq!(frozen, 0, "FIFREEZE: {}", std::io::Error::last_os_error());
    let copied = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(hull.state_dir.join("volume.img"))
        .arg(&saved)
        .status();
    // SAFETY: as above, FITHAW on the same open fd.
    let thawed = unsafe { libc::ioctl(volume.as_raw_fd(), FITHAW as _, 0) };
    assert_eq!(thawed, 0, "FITHAW: {}", std::io::Error::last_os_error());
    assert!(copied.unwrap().success(), "cp of the volume image failed");
    saved
}

/// A power loss under a disk cache that had not written what btrfs
/// committed since `saved` was taken (a VM whose host caches writes): the
/// volume goes back to `saved`, while the catalog (SQLite with
/// synchronous=FULL, on the state dir's own disk) keeps every commit. Then
/// hulld starts again.
fn lose_power(hull: &mut TestHull, saved: &std::path::Path) {
    hull.kill9_hulld();
    hull.cgroups()
        .inner
        .kill_all(Duration::from_secs(5))
        .expect("kill the inner");
    let volume = hull.state_dir.join("volume");
    // The inner's mount namespace, which holds the overlay on the volume,
    // goes away just after its last process.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = nix::mount::umount(&volume) {
        assert!(
            std::time::Instant::now() < deadline,
            "cannot unmount {}: {e}",
            volume.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::rename(saved, hull.state_dir.join("volume.img")).unwrap();
    hull.spawn_hulld();
    hull.wait_running(Duration::from_secs(20));
}

#[test]
fn a_deletion_a_power_loss_undid_is_finished_at_restart() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start();
    block_on(async {
        hull.sh("echo one > /root/f").await;
        hull.client().await.checkpoint_create(None).await.unwrap();
    });
    let saved = save_volume(&hull);
    block_on(async { hull.client().await.checkpoint_delete("v1").await.unwrap() });
    lose_power(&mut hull, &saved);
    // v1's snapshot is back on the disk, but its deletion was recorded.
    assert_catalog_agrees(&hull);
    assert_eq!(listed(&hull), Vec::<String>::new());
    assert!(
        hull.log()
            .contains("snapshot v1: not in the catalog; deleted"),
        "{}",
        hull.log()
    );
    assert_eq!(block_on(hull.sh("cat /root/f")), "one\n");
}

#[test]
fn a_restore_a_power_loss_undid_comes_back_from_its_checkpoint() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start();
    block_on(async {
        let mut c = hull.client().await;
        hull.sh("echo one > /root/f").await;
        c.checkpoint_create(Some("one".into())).await.unwrap();
        hull.sh("echo two > /root/f").await;
        c.checkpoint_create(Some("two".into())).await.unwrap();
    });
    let saved = save_volume(&hull);
    block_on(async {
        let mut c = hull.client().await;
        let restored = c.checkpoint_restore("v1").await.unwrap();
        assert_eq!(restored.undo, "v3");
        hull.sh("echo three > /root/f").await;
    });
    // The disk lost the restore's layer and its automatic checkpoint v3;
    // the catalog still names that layer as current.
    lose_power(&mut hull, &saved);
    assert_catalog_agrees(&hull);
    assert_eq!(listed(&hull), vec!["v1".to_string(), "v2".to_string()]);
    let log = hull.log();
    assert!(
        log.contains("checkpoint v3: its snapshot is missing; removed from the catalog"),
        "{log}"
    );
    assert!(log.contains("made layer"), "{log}");
    // The restore's target, the newest state still whole on the disk.
    assert_eq!(block_on(hull.sh("cat /root/f")), "one\n");
    // And everything works on from there.
    block_on(async {
        let mut c = hull.client().await;
        c.checkpoint_restore("v2").await.unwrap();
        assert_eq!(hull.sh("cat /root/f").await, "two\n");
    });
}
