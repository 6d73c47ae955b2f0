//! hulld under a flood from the inner: 2,000 connections held on the
//! inner's service socket, 100 of them holding an almost complete 4 MiB
//! frame, and 1,000 listening ports. `hull status` latency during it and
//! hulld's peak RSS; the anchor is the same call on an idle hulld, in the
//! same run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hull_tests::{block_on, connect_nonblocking, hold_half_sent_frames, listen_in_inner, TestHull};

use crate::report::{ms, p50_of, print_rows, print_single, proc_status_kib, Row};

const IDLE: &str = "anchor: status, hulld idle";
const FLOOD: &str = "status during the inner's flood";

pub fn run(rounds: usize) -> Result<()> {
    let hull = TestHull::start();
    let hulld = hull.hulld_pid();
    let samples = |n: usize, peak: &mut f64| {
        block_on(async {
            let mut c = hull.client().await;
            let mut out = Vec::new();
            for _ in 0..n {
                let t = Instant::now();
                c.status().await?;
                out.push(ms(t.elapsed()));
                *peak = peak.max(proc_status_kib(hulld, "VmRSS").unwrap_or(0.0));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, anyhow::Error>(out)
        })
    };
    let mut idle_peak = 0.0;
    let idle = samples(rounds.max(100), &mut idle_peak)?;
    let status = hull.wait_running(Duration::from_secs(10));
    let inner_pid = status.inner_pid.context("the inner's pid")?;
    let socket = std::path::PathBuf::from(format!("/proc/{inner_pid}/root/run/hull/hull.sock"));
    eprintln!("flooding: 1,000 ports, 100 half-sent frames, 2,000 connections...");
    let _ports = listen_in_inner(inner_pid, 30000..31000);
    let _frames = hold_half_sent_frames(&socket, 100);
    let _conns: Vec<_> = (0..2000)
        .filter_map(|_| connect_nonblocking(&socket))
        .collect();
    let mut flood_peak = 0.0;
    let flood = samples(rounds.max(100), &mut flood_peak)?;
    let rows = vec![
        Row::new(IDLE, idle, "ms"),
        Row::new(FLOOD, flood, "ms").target("p99 <= 50 ms"),
    ];
    print_rows(&rows);
    println!();
    print_single("hulld RSS, idle (peak)", idle_peak / 1024.0, "MiB", "");
    print_single(
        "hulld RSS during the flood (peak)",
        flood_peak / 1024.0,
        "MiB",
        "<= 64 MiB",
    );
    println!(
        "status under the flood / idle (p50): {:.2}",
        p50_of(&rows, FLOOD) / p50_of(&rows, IDLE)
    );
    Ok(())
}
