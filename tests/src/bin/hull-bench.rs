//! hull's benchmarks: inner cold start, exec round-trip, bounce and hulld's
//! idle memory, against `runc run` of the same busybox root filesystem in the
//! same run. Prints a table with p50 and p99. Run as root, release build:
//!
//!     cargo build --release --workspace --bins && sudo ./target/release/hull-bench
//!     sudo ./target/release/hull-bench --checkpoints   # the storage stack
//!     sudo ./target/release/hull-bench --services      # service replay
//!     sudo ./target/release/hull-bench --logs          # log capture throughput

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_tests::{block_on, require_root, spec, Limits, TestHull};

struct Row {
    name: &'static str,
    samples: Vec<f64>,
    unit: &'static str,
    target: &'static str,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

impl Row {
    fn p(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        percentile(&s, p)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn arg_usize(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench_hull(hull: &TestHull, rounds: usize, execs: usize) -> Result<Vec<Row>> {
    let mut start = Vec::new();
    let mut bounce = Vec::new();
    let mut exec_conn = Vec::new();
    let mut exec_new = Vec::new();
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
        for _ in 0..10 {
            c.exec_collect(spec(&["true"]), b"").await?;
        }
        for _ in 0..execs {
            let t = Instant::now();
            let out = c.exec_collect(spec(&["true"]), b"").await?;
            exec_conn.push(ms(t.elapsed()));
            if !matches!(
                out.end,
                hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0))
            ) {
                bail!("true failed: {:?}", out.end);
            }
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
        Row {
            name: "inner cold start (spawn to init ready)",
            samples: start,
            unit: "ms",
            target: "<= 15 ms",
        },
        Row {
            name: "bounce, no services (request to ready)",
            samples: bounce,
            unit: "ms",
            target: "<= 30 ms",
        },
        Row {
            name: "exec `true`, open connection",
            samples: exec_conn,
            unit: "ms",
            target: "<= 3 ms",
        },
        Row {
            name: "exec `true`, new connection",
            samples: exec_new,
            unit: "ms",
            target: "",
        },
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
    Ok(Some(Row {
        name: "anchor: runc run /bin/true (same rootfs)",
        samples,
        unit: "ms",
        target: "",
    }))
}

/// Creates `n` checkpoints; returns (total ms, frozen ms) samples.
async fn creates(hull: &TestHull, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut c = hull.client().await;
    let (mut total, mut frozen) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let r = c.checkpoint_create(None).await?;
        total.push(ms(t.elapsed()));
        frozen.push(r.frozen_ms);
    }
    Ok((total, frozen))
}

fn bench_checkpoints(rounds: usize) -> Result<Vec<Row>> {
    let hull = TestHull::start_with(Limits {
        memory_max: "1G",
        pids_max: 1024,
        volume_size: "8G",
        auto_checkpoints_keep: 10,
        ..Limits::default()
    });
    let mut rows = Vec::new();
    block_on(async {
        let (empty, empty_frozen) = creates(&hull, rounds).await?;
        eprintln!("writing 1 GiB and 100k small files into the layer...");
        hull.sh("dd if=/dev/zero of=/root/big bs=1M count=1024 2>/dev/null && mkdir -p /root/many && cd /root/many && seq 1 100000 | xargs touch && sync")
            .await;
        let (full, full_frozen) = creates(&hull, rounds).await?;
        rows.push(Row {
            name: "checkpoint create, empty layer",
            samples: empty,
            unit: "ms",
            target: "<= 20 ms",
        });
        rows.push(Row {
            name: "  inner frozen during it",
            samples: empty_frozen,
            unit: "ms",
            target: "",
        });
        rows.push(Row {
            name: "checkpoint create, 1 GiB + 100k files",
            samples: full,
            unit: "ms",
            target: "<= 1.5x empty",
        });
        rows.push(Row {
            name: "  inner frozen during it",
            samples: full_frozen,
            unit: "ms",
            target: "",
        });

        // The naive baseline: copy the layer.
        let layers = hull.state_dir.join("volume/layers");
        let layer = std::fs::read_dir(&layers)?
            .next()
            .context("no layer")??
            .path();
        let mut copies = Vec::new();
        for i in 0..3 {
            let dest = hull.state_dir.join(format!("volume/copy{i}"));
            let t = Instant::now();
            let status = Command::new("cp")
                .arg("-a")
                .arg(layer.join("upper"))
                .arg(&dest)
                .status()?;
            copies.push(ms(t.elapsed()));
            if !status.success() {
                bail!("cp -a failed");
            }
            std::fs::remove_dir_all(&dest)?;
        }
        rows.push(Row {
            name: "anchor: cp -a of that layer",
            samples: copies,
            unit: "ms",
            target: "",
        });

        let mut c = hull.client().await;
        let target = c
            .checkpoint_create(Some("bench".into()))
            .await?
            .checkpoint
            .id;
        let mut restores = Vec::new();
        for _ in 0..rounds.min(30) {
            let t = Instant::now();
            c.checkpoint_restore(&target).await?;
            restores.push(ms(t.elapsed()));
        }
        rows.push(Row {
            name: "restore incl. bounce (1 GiB layer)",
            samples: restores,
            unit: "ms",
            target: "<= 150 ms",
        });
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(rows)
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
        rows.push(Row {
            name: "bounce to 10 services running",
            samples: ten,
            unit: "ms",
            target: "<= 50 ms",
        });
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
        rows.push(Row {
            name: "restore to 3 services running",
            samples: restores,
            unit: "ms",
            target: "<= 150 ms",
        });
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(rows)
}

/// One service writes `lines` lines of 71 bytes as fast as it can.
fn bench_logs(lines: u64) -> Result<()> {
    let hull = TestHull::start();
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
            let s = c
                .services(hull_proto::ServiceRequest::Show("firehose".into()))
                .await?;
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
    let hwm = std::fs::read_to_string(format!("/proc/{}/status", hull.hulld_pid()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(f64::NAN)
        / 1024.0;
    println!();
    println!("log capture: {lines} lines, {mb:.0} MB in {elapsed:.2} s = {:.0} MB/s (target >= 200 MB/s)", mb / elapsed);
    println!("lines lost: {} (target 0)", lines - got.min(lines));
    println!("hulld peak RSS: {hwm:.1} MiB (target <= 64 MiB)");
    Ok(())
}

fn rss_kib(pid: i32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn print_rows(rows: &[Row]) {
    print_table(&rows.iter().collect::<Vec<_>>());
}

fn print_table(rows: &[&Row]) {
    println!();
    println!(
        "{:<44} {:>5} {:>10} {:>10}  target",
        "benchmark", "n", "p50", "p99"
    );
    println!("{}", "-".repeat(84));
    for row in rows {
        println!(
            "{:<44} {:>5} {:>7.2} {:<2} {:>7.2} {:<2}  {}",
            row.name,
            row.samples.len(),
            row.p(0.5),
            row.unit,
            row.p(0.99),
            row.unit,
            row.target
        );
    }
}

fn main() -> Result<()> {
    if !require_root() {
        bail!("hull-bench needs root");
    }
    let rounds = arg_usize("--rounds", 50);
    let execs = arg_usize("--execs", 300);
    if std::env::args().any(|a| a == "--logs") {
        return bench_logs(arg_usize("--lines", 2_000_000) as u64);
    }
    if std::env::args().any(|a| a == "--services") {
        print_rows(&bench_services(rounds)?);
        return Ok(());
    }
    if std::env::args().any(|a| a == "--checkpoints") {
        let rows = bench_checkpoints(rounds)?;
        print_rows(&rows);
        let p50 = |name: &str| {
            rows.iter()
                .find(|r| r.name == name)
                .map(|r| r.p(0.5))
                .unwrap_or(f64::NAN)
        };
        let empty = p50("checkpoint create, empty layer");
        let full = p50("checkpoint create, 1 GiB + 100k files");
        let copy = p50("anchor: cp -a of that layer");
        println!();
        println!(
            "ratio create full / empty (p50): {:.2}  (target <= 1.5)",
            full / empty
        );
        println!(
            "ratio cp -a / create full (p50): {:.0}x slower than a checkpoint",
            copy / full
        );
        return Ok(());
    }
    let hull = TestHull::start();
    let rows = bench_hull(&hull, rounds, execs)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_kib(hull.hulld_pid()).unwrap_or(f64::NAN) / 1024.0;
    let rootfs = hull_tests::image_dir().join("busybox/rootfs");
    let runc = bench_runc(&rootfs, rounds)?;

    let all: Vec<&Row> = rows.iter().chain(runc.iter()).collect();
    print_table(&all);
    println!(
        "{:<44} {:>5} {:>7.2} {:<2} {:>10}  <= 20 MiB",
        "hulld idle RSS", 1, rss, "MiB", ""
    );
    if let Some(runc) = &runc {
        let start = &rows[0];
        let bounce = &rows[1];
        println!();
        println!(
            "ratio hull cold start / runc run (p50): {:.2}  (hull {:.2} ms, runc {:.2} ms)",
            start.p(0.5) / runc.p(0.5),
            start.p(0.5),
            runc.p(0.5)
        );
        println!(
            "ratio hull bounce / runc run (p50):     {:.2}",
            bounce.p(0.5) / runc.p(0.5)
        );
    }
    Ok(())
}
