//! Log capture: throughput, lines lost and hulld's peak memory.

use std::time::{Duration, Instant};

use anyhow::Result;
use hull_tests::{block_on, Limits, TestHull};

use crate::report::proc_status_kib;

/// One service writes `lines` lines of 71 bytes as fast as it can.
pub fn run(lines: u64) -> Result<()> {
    // Room for the whole run: the file in the inner's page cache, and every
    // line in the log (the default 64 MiB cap would drop the oldest).
    let hull = TestHull::start_with(Limits {
        memory_max: "2G",
        volume_size: "4G",
        tables: "[logs]\nmax_per_source = \"4G\"\n".into(),
        ..Limits::default()
    });
    let line = "0123456789012345678901234567890123456789012345678901234567890123456789";
    let spec = hull_proto::ServiceSpec {
        name: "firehose".into(),
        // cat of a file prepared beforehand: busybox's yes | head tops out
        // near 190 MB/s here, below what is being measured.
        cmd: "cat /tmp/firehose".into(),
        env: vec![],
        cwd: None,
        user: None,
        http_port: None,
        restart: hull_proto::RestartPolicy::Never,
        after: vec![],
    };
    block_on(hull.sh(&format!("yes {line} | head -n {lines} > /tmp/firehose")));
    let t = Instant::now();
    let elapsed = block_on(async {
        let mut c = hull.client().await;
        c.services(hull_proto::ServiceRequest::Add(spec)).await?;
        loop {
            // List, not Show: Show reads the log's newest segment, which
            // would be hulld's work competing with the capture.
            let s = c.services(hull_proto::ServiceRequest::List).await?;
            if s[0].state == "exited" {
                return Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })?;
    let out = hull.hull(&["logs", "firehose"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let got = text.lines().filter(|l| *l == line).count() as u64;
    let mb = (lines * (line.len() as u64 + 1)) as f64 / 1e6;
    let hwm = proc_status_kib(hull.hulld_pid(), "VmHWM").unwrap_or(f64::NAN) / 1024.0;
    println!();
    println!("log capture: {lines} lines, {mb:.0} MB in {elapsed:.2} s = {:.0} MB/s (target >= 200 MB/s)", mb / elapsed);
    println!("lines lost: {} (target 0)", lines - got.min(lines));
    println!("hulld peak RSS: {hwm:.1} MiB (target <= 64 MiB)");
    Ok(())
}
