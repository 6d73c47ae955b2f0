//! hulld stays responsive while heavy lifecycle work runs: nothing slow
//! runs on its runtime workers or holds what `status` needs. A file of its
//! own, so that no other test of the suite loads the machine meanwhile.
//!
//! The test tells "blocked" from "not blocked", not fast from slow: the
//! checkpoint's flush is stretched to two seconds (a slow disk, by the
//! HULL_SLOW_POINT hook), so a `status` that waited for storage would take
//! seconds, while the bound it asserts leaves room for a busy 2-CPU
//! machine. The 50 ms target lives in `hull-bench`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hull_tests::{block_on, require_root, Limits, TestHull};

/// Far below the two seconds a blocked `status` would take; far above a
/// scheduling hiccup on a loaded machine.
const BLOCKED: Duration = Duration::from_millis(500);

/// `hull status` keeps answering while the supervisor checkpoints a layer
/// with unflushed writes over a slow disk and then kills an inner of 4,000
/// processes. Before the core moved blocking work off the runtime, `status`
/// waited on the catalog lock for the whole flush.
#[test]
fn status_answers_while_a_dirty_checkpoint_and_a_big_kill_run() {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start_with(Limits {
        memory_max: "2G",
        pids_max: 5000,
        volume_size: "4G",
        ..Limits::default()
    });
    hull.kill9_hulld();
    hull.spawn_hulld_env(&[("HULL_SLOW_POINT", "create:syncfs")]);
    hull.wait_running(Duration::from_secs(20));
    block_on(async {
        // 4,000 sleepers, and 512 MiB written without a sync.
        let spawned = hull
            .sh("i=0; while [ $i -lt 4000 ]; do sleep 1000 </dev/null >/dev/null 2>&1 & i=$((i+1)); done; echo started")
            .await;
        assert!(spawned.contains("started"), "{spawned}");
        let pids = hull.cgroups().inner.pids_current().unwrap_or(0);
        assert!(pids >= 4000, "only {pids} processes in the inner");
        hull.sh("dd if=/dev/zero of=/root/dirty bs=1M count=512 2>/dev/null; echo written")
            .await;
    });
    let busy = Arc::new(AtomicBool::new(true));
    let worker = {
        let socket = hull.socket.clone();
        let busy = busy.clone();
        std::thread::spawn(move || {
            block_on(async {
                let mut c = hull_outer::client::Client::connect(&socket).await.unwrap();
                let made = c.checkpoint_create(Some("dirty".into())).await;
                let bounced = c.bounce(0).await;
                busy.store(false, Ordering::Release);
                (made.map(|m| m.total_ms), bounced.map(|b| b.stop_ms))
            })
        })
    };
    let mut latencies = Vec::new();
    let mut at = Vec::new();
    let began = Instant::now();
    block_on(async {
        let mut c = hull.client().await;
        while busy.load(Ordering::Acquire) {
            let asked = Instant::now();
            c.status().await.expect("status during the load");
            latencies.push(asked.elapsed());
            at.push(began.elapsed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let (made, bounced) = worker.join().unwrap();
    let checkpoint_ms = made.expect("checkpoint of the dirty layer");
    let stop_ms = bounced.expect("bounce of the 4,000-process inner");
    let worst = latencies.iter().max().copied().unwrap_or_default();
    let mut slowest: Vec<(Duration, Duration)> =
        latencies.iter().copied().zip(at.iter().copied()).collect();
    slowest.sort();
    eprintln!(
        "slowest (latency, at): {:?}",
        &slowest[slowest.len().saturating_sub(5)..]
    );
    eprintln!(
        "checkpoint {checkpoint_ms:.1} ms, stop {stop_ms:.1} ms, {} status calls, slowest {worst:?}",
        latencies.len()
    );
    assert!(
        latencies.len() >= 3,
        "status was asked only {} times while the work ran",
        latencies.len()
    );
    assert!(
        checkpoint_ms >= 2000.0,
        "the slow point did not stretch the checkpoint ({checkpoint_ms:.0} ms)"
    );
    assert!(
        worst < BLOCKED,
        "a status took {worst:?} while a checkpoint ({checkpoint_ms:.0} ms) and a kill ({stop_ms:.0} ms) ran; log:\n{}",
        hull.log()
    );
}
