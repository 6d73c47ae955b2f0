//! Replay of registered services after a bounce and a restore.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hull_tests::{block_on, TestHull};

use crate::report::{ms, print_rows, Row};

pub fn run(rounds: usize) -> Result<()> {
    print_rows(&bench_services(rounds)?);
    Ok(())
}

/// Waits until `n` services run; returns how long that took.
async fn until_running(hull: &TestHull, n: usize, since: Instant) -> Result<f64> {
    let mut c = hull.client().await;
    loop {
        let list = c.services(hull_proto::ServiceRequest::List).await?;
        if list.len() == n && list.iter().all(|s| s.state == "running" && s.ready) {
            return Ok(ms(since.elapsed()));
        }
        if since.elapsed() > Duration::from_secs(30) {
            bail!("services did not all start: {list:?}");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

fn bench_services(rounds: usize) -> Result<Vec<Row>> {
    let hull = TestHull::start();
    let mut rows = Vec::new();
    block_on(async {
        let mut c = hull.client().await;
        for i in 0..10 {
            let spec = hull_proto::ServiceSpec {
                name: format!("s{i}"),
                cmd: "exec sleep 100000".into(),
                env: vec![],
                cwd: None,
                user: None,
                http_port: None,
                restart: hull_proto::RestartPolicy::Always,
                after: vec![],
            };
            c.services(hull_proto::ServiceRequest::Add(spec)).await?;
        }
        until_running(&hull, 10, Instant::now()).await?;
        let mut ten = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            c.bounce(0).await?;
            ten.push(until_running(&hull, 10, t).await?);
        }
        rows.push(Row::new("bounce to 10 services running", ten, "ms").target("<= 50 ms"));
        // Restore with three services: keep three, checkpoint, restore it.
        for i in 3..10 {
            c.services(hull_proto::ServiceRequest::Remove(format!("s{i}")))
                .await?;
        }
        let id = c.checkpoint_create(None).await?.checkpoint.id;
        let mut restores = Vec::new();
        for _ in 0..rounds.min(30) {
            let t = Instant::now();
            c.checkpoint_restore(&id).await?;
            restores.push(until_running(&hull, 3, t).await?);
        }
        rows.push(Row::new("restore to 3 services running", restores, "ms").target("<= 150 ms"));
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(rows)
}
