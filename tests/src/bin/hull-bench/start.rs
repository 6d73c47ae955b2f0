//! Inner cold start, exec round-trip, bounce and hulld's idle memory,
//! against `runc run` of the same busybox root filesystem in the same run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_tests::{block_on, spec, TestHull};

use crate::report::{ms, print_single, print_table, proc_status_kib, Row};

const COLD_START: &str = "cold start, client-observed (bounce + exec `true`)";

pub fn run(rounds: usize, execs: usize) -> Result<()> {
    let hull = TestHull::start();
    let rows = bench_hull(&hull, rounds, execs)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss = proc_status_kib(hull.hulld_pid(), "VmRSS").unwrap_or(f64::NAN) / 1024.0;
    let rootfs = hull_tests::image_dir().join("busybox/rootfs");
    let runc = bench_runc(&rootfs, rounds)?;

    let all: Vec<&Row> = rows.iter().chain(runc.iter()).collect();
    print_table(&all);
    print_single("hulld idle RSS", rss, "MiB", "<= 20 MiB");
    if let Some(runc) = &runc {
        let p50 = |name: &str| crate::report::p50_of(&rows, name);
        let (cold, bounce) = (p50(COLD_START), p50(BOUNCE));
        println!();
        // Both sides measured from the client: the request until the
        // command in the fresh container has run.
        println!(
            "ratio hull cold start, client-observed / runc run (p50): {:.2}  (hull {cold:.2} ms, runc {:.2} ms; target <= 1)",
            cold / runc.p50(),
            runc.p50()
        );
        println!(
            "ratio hull bounce / runc run (p50): {:.2}",
            bounce / runc.p50()
        );
    }
    Ok(())
}

const BOUNCE: &str = "bounce, no services (request to ready)";

fn exited_zero(out: &hull_outer::client::ExecOutput) -> Result<()> {
    if !matches!(
        out.end,
        hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0))
    ) {
        bail!("true failed: {:?}", out.end);
    }
    Ok(())
}

fn bench_hull(hull: &TestHull, rounds: usize, execs: usize) -> Result<Vec<Row>> {
    let (mut start, mut bounce, mut cold) = (Vec::new(), Vec::new(), Vec::new());
    let (mut exec_conn, mut exec_new) = (Vec::new(), Vec::new());
    block_on(async {
        let mut c = hull.client().await;
        for _ in 0..3 {
            c.bounce(0).await?;
        }
        for _ in 0..rounds {
            let t = Instant::now();
            let report = c.bounce(0).await?;
            bounce.push(ms(t.elapsed()));
            start.push(report.start_ms);
        }
        // What a client waits for before a fresh inner has run something,
        // the way `runc run` is timed below.
        for _ in 0..rounds {
            let t = Instant::now();
            c.bounce(0).await?;
            let out = c.exec_collect(spec(&["true"]), b"").await?;
            cold.push(ms(t.elapsed()));
            exited_zero(&out)?;
        }
        for _ in 0..10 {
            c.exec_collect(spec(&["true"]), b"").await?;
        }
        for _ in 0..execs {
            let t = Instant::now();
            let out = c.exec_collect(spec(&["true"]), b"").await?;
            exec_conn.push(ms(t.elapsed()));
            exited_zero(&out)?;
        }
        for _ in 0..execs {
            let t = Instant::now();
            let mut fresh = hull_outer::client::Client::connect(&hull.socket).await?;
            fresh.exec_collect(spec(&["true"]), b"").await?;
            exec_new.push(ms(t.elapsed()));
        }
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(vec![
        Row::new(COLD_START, cold, "ms").target("<= runc run"),
        Row::new("  internal: inner start (spawn to init ready)", start, "ms").target("<= 15 ms"),
        Row::new(BOUNCE, bounce, "ms").target("<= 30 ms"),
        Row::new("exec `true`, open connection", exec_conn, "ms").target("<= 3 ms"),
        Row::new("exec `true`, new connection", exec_new, "ms"),
    ])
}

/// `runc run` of /bin/true in the same busybox root filesystem.
fn bench_runc(rootfs: &Path, rounds: usize) -> Result<Option<Row>> {
    if Command::new("runc").arg("--version").output().is_err() {
        eprintln!("runc not found (apt-get install runc): no anchor this run");
        return Ok(None);
    }
    let bundle = tempfile::tempdir()?;
    let status = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(bundle.path())
        .status()?;
    if !status.success() {
        bail!("runc spec failed");
    }
    let config_path = bundle.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(["/bin/true"]);
    config["root"]["path"] = rootfs.display().to_string().into();
    config["root"]["readonly"] = true.into();
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let mut samples = Vec::new();
    for i in 0..rounds + 3 {
        let id = format!("hull-bench-{}-{i}", std::process::id());
        let t = Instant::now();
        let status = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(bundle.path())
            .arg(&id)
            .stdin(Stdio::null())
            .status()
            .context("runc run")?;
        let elapsed = ms(t.elapsed());
        if !status.success() {
            bail!("runc run failed: {status}");
        }
        if i >= 3 {
            samples.push(elapsed);
        }
    }
    Ok(Some(Row::new(
        "anchor: runc run /bin/true (same rootfs)",
        samples,
        "ms",
    )))
}
