//! A core task of hulld that panics takes hulld down cleanly, saying
//! which, instead of leaving it half alive; the next hulld recovers.

use std::time::Duration;

use hull_proto::ServiceRequest;
use hull_tests::{block_on, require_root, TestHull};

/// Runs `poke` against a hulld started with a failpoint that panics one of
/// its core tasks, and checks that hulld exits (saying why) and that the
/// next hulld comes up on the same state.
fn a_panicking_task_takes_hulld_down(failpoint: &str, task: &str, poke: fn(&TestHull)) {
    if !require_root() {
        return;
    }
    let mut hull = TestHull::start();
    block_on(async { hull.sh("echo kept > /root/state").await });
    hull.kill9_hulld();
    hull.spawn_hulld_env(&[("HULL_FAILPOINT", failpoint)]);
    hull.wait_running(Duration::from_secs(20));
    poke(&hull);
    // Without the watch on its core tasks, hulld lived on half alive.
    hull.wait_hulld_exit(Duration::from_secs(10));
    let log = hull.log();
    assert!(
        log.contains("a core task of hulld failed") && log.contains(task),
        "hulld did not say which task failed; log:\n{log}"
    );
    hull.spawn_hulld();
    hull.wait_running(Duration::from_secs(20));
    let state = block_on(async { hull.sh("cat /root/state").await });
    assert_eq!(state.trim(), "kept");
}

#[test]
fn a_panicking_supervisor_takes_hulld_down_and_the_next_one_recovers() {
    a_panicking_task_takes_hulld_down("supervisor:bounce-panics", "supervisor", |hull| {
        let bounced = block_on(async { hull.client().await.bounce(0).await });
        assert!(bounced.is_err(), "the bounce succeeded past its failpoint");
    });
}

#[test]
fn a_panicking_service_manager_takes_hulld_down_and_the_next_one_recovers() {
    a_panicking_task_takes_hulld_down("services:list-panics", "service manager", |hull| {
        let listed = block_on(async { hull.client().await.services(ServiceRequest::List).await });
        assert!(listed.is_err(), "the list succeeded past its failpoint");
    });
}
