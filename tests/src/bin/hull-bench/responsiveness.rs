//! `hull status` latency while hulld does its heaviest lifecycle work: a
//! checkpoint of a layer full of unflushed writes, then a bounce that kills
//! an inner of 4,000 processes. The anchor is the same call on an idle
//! hulld, in the same run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_tests::{block_on, Limits, TestHull};

use crate::report::{ms, p50_of, print_rows, Row};

const IDLE: &str = "anchor: status, hulld idle";
const BUSY: &str = "status during dirty checkpoint + 4,000-proc kill";
const CHECKPOINT: &str = "  the checkpoint (512 MiB unsynced)";
const STOP: &str = "  the bounce's stop (4,000 processes)";

pub fn run(rounds: usize) -> Result<()> {
    let hull = TestHull::start_with(Limits {
        memory_max: "2G",
        pids_max: 5000,
        volume_size: "4G",
        ..Limits::default()
    });
    let idle = block_on(async {
        let mut c = hull.client().await;
        let mut samples = Vec::new();
        for _ in 0..300 {
            let t = Instant::now();
            c.status().await?;
            samples.push(ms(t.elapsed()));
        }
        Ok::<_, anyhow::Error>(samples)
    })?;
    let (mut busy, mut checkpoints, mut stops) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        eprintln!(
            "round {}/{rounds}: 4,000 sleepers and 512 MiB unsynced...",
            round + 1
        );
        let r = busy_round(&hull)?;
        busy.extend(r.status);
        checkpoints.push(r.checkpoint_ms);
        stops.push(r.stop_ms);
    }
    let rows = vec![
        Row::new(IDLE, idle, "ms"),
        Row::new(BUSY, busy, "ms").target("p99 <= 50 ms"),
        Row::new(CHECKPOINT, checkpoints, "ms"),
        Row::new(STOP, stops, "ms"),
    ];
    print_rows(&rows);
    println!();
    let busy_row = &rows[1];
    let (label, tail) = busy_row.tail();
    println!(
        "status under load / idle (p50): {:.2}; {label} under load {tail:.1} ms  (target p99 <= 50 ms)",
        p50_of(&rows, BUSY) / p50_of(&rows, IDLE)
    );
    Ok(())
}

struct BusyRound {
    status: Vec<f64>,
    checkpoint_ms: f64,
    stop_ms: f64,
}

fn busy_round(hull: &TestHull) -> Result<BusyRound> {
    block_on(async {
        let spawned = hull
            .sh("i=0; while [ $i -lt 4000 ]; do sleep 1000 </dev/null >/dev/null 2>&1 & i=$((i+1)); done; echo started")
            .await;
        if !spawned.contains("started") {
            bail!("the sleepers did not start: {spawned}");
        }
        hull.sh("dd if=/dev/zero of=/root/dirty bs=1M count=512 2>/dev/null")
            .await;
        Ok(())
    })?;
    let working = Arc::new(AtomicBool::new(true));
    let worker = {
        let socket = hull.socket.clone();
        let working = working.clone();
        std::thread::spawn(move || {
            block_on(async {
                let mut c = hull_outer::client::Client::connect(&socket).await?;
                let made = c.checkpoint_create(None).await?;
                let bounced = c.bounce(0).await?;
                working.store(false, Ordering::Release);
                c.checkpoint_delete(&made.checkpoint.id).await?;
                Ok::<_, anyhow::Error>((made.total_ms, bounced.stop_ms))
            })
        })
    };
    let status = block_on(async {
        let mut c = hull.client().await;
        let mut samples = Vec::new();
        while working.load(Ordering::Acquire) {
            let t = Instant::now();
            c.status().await?;
            samples.push(ms(t.elapsed()));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok::<_, anyhow::Error>(samples)
    });
    let (checkpoint_ms, stop_ms) = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the checkpoint and bounce thread panicked"))?
        .context("checkpoint and bounce")?;
    block_on(async { hull.sh("rm -f /root/dirty").await });
    Ok(BusyRound {
        status: status?,
        checkpoint_ms,
        stop_ms,
    })
}
