//! hull's benchmarks: inner cold start, exec round-trip, bounce and hulld's
//! idle memory, against `runc run` of the same busybox root filesystem in the
//! same run. Prints a table with p50 and p99. Run as root, release build:
//!
//!     cargo build --release --workspace --bins && sudo ./target/release/hull-bench
//!     sudo ./target/release/hull-bench --checkpoints   # the storage stack
//!     sudo ./target/release/hull-bench --services      # service replay
//!     sudo ./target/release/hull-bench --logs          # log capture throughput
//!     sudo ./target/release/hull-bench --ingress       # forwarding and HTTP ingress vs a direct connection
//!
//! hulld runs at its default log level (info) unless HULL_LOG says otherwise.

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
    // p is in 0..=1, so the index is within the slice.
    #[allow(clippy::cast_possible_truncation)]
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

/// p50 of each step of checkpoint create, from hulld's "checkpoint
/// created" log lines (not the automatic ones a restore makes): `rounds`
/// lines per phase, phases in order.
fn print_create_steps(log: &str, rounds: usize, phases: &[&str]) {
    let runs: Vec<Vec<(String, f64)>> = log
        .lines()
        .filter(|l| l.contains("checkpoint created"))
        .map(strip_ansi)
        .filter(|l| !l.contains("auto=true"))
        .filter_map(|l| {
            let steps = l.split("steps_us=").nth(1)?.split_whitespace().next()?;
            Some(
                steps
                    .split(',')
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        Some((k.to_owned(), v.parse::<f64>().ok()? / 1e3))
                    })
                    .collect(),
            )
        })
        .collect();
    if rounds == 0 || runs.len() < phases.len() * rounds {
        eprintln!("no step timings in hulld's log");
        return;
    }
    println!();
    print!("checkpoint create steps, p50 ms:");
    for phase in phases {
        print!(" {phase:>9}");
    }
    println!();
    for (i, (name, _)) in runs[0].iter().enumerate() {
        print!("  {name:<31}");
        for group in runs.chunks(rounds).take(phases.len()) {
            let mut v: Vec<f64> = group.iter().filter_map(|r| r.get(i).map(|s| s.1)).collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            print!(" {:>9.3}", percentile(&v, 0.5));
        }
        println!();
    }
}

/// hulld's stderr log is coloured: drop the escape sequences.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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
        push_create(
            &mut rows,
            CREATE_EMPTY,
            "<= 20 ms",
            creates(&hull, rounds).await?,
        );
        eprintln!("writing 1 GiB into the layer...");
        hull.sh("dd if=/dev/zero of=/root/big bs=1M count=1024 2>/dev/null && sync")
            .await;
        push_create(
            &mut rows,
            CREATE_BIG,
            "<= 1.5x empty",
            creates(&hull, rounds).await?,
        );
        eprintln!("adding 100k small files...");
        hull.sh("mkdir -p /root/many && cd /root/many && seq 1 100000 | xargs touch && sync")
            .await;
        push_create(
            &mut rows,
            CREATE_FULL,
            "<= 1.5x empty",
            creates(&hull, rounds).await?,
        );
        let mut c = hull.client().await;
        let target = c
            .checkpoint_create(Some("bench".into()))
            .await?
            .checkpoint
            .id;
        let mut restores = Vec::new();
        let mut slowest: Option<(usize, f64, hull_proto::RestoreReport)> = None;
        for i in 0..rounds.min(30) {
            let t = Instant::now();
            let report = c.checkpoint_restore(&target).await?;
            let took = ms(t.elapsed());
            restores.push(took);
            if slowest.as_ref().is_none_or(|(_, worst, _)| took > *worst) {
                slowest = Some((i, took, report));
            }
        }
        if let Some((i, took, r)) = slowest {
            eprintln!(
                "slowest restore (number {}) {took:.1} ms: stop {:.1}, start {:.1}, the rest (auto checkpoint, layer snapshot, swap, services) {:.1}",
                i + 1,
                r.stop_ms,
                r.start_ms,
                r.total_ms - r.stop_ms - r.start_ms
            );
        }
        rows.push(Row {
            name: "restore incl. bounce (1 GiB layer)",
            samples: restores,
            unit: "ms",
            target: "<= 150 ms",
        });
        // After the restores: deleting the copies leaves btrfs work behind
        // (delayed refs, the cleaner) that a restore would wait on.
        // The naive baseline: copy the layer.
        let layers = hull.state_dir.join("volume/layers");
        // The current layer: the newest (retired ones are being deleted).
        let layer = std::fs::read_dir(&layers)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n: u64 = e.file_name().to_str()?.strip_prefix('l')?.parse().ok()?;
                Some((n, e.path()))
            })
            .max()
            .context("no layer")?
            .1;
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

        // The same volume with the data gone from the layer (the snapshots
        // keep it): tells the layer's size from the volume's age.
        hull.sh("rm -rf /root/big /root/many && sync").await;
        let again = creates(&hull, rounds).await?;
        rows.push(Row {
            name: CREATE_AGAIN,
            samples: again.0,
            unit: "ms",
            target: "",
        });
        print_create_steps(&hull.log(), rounds, &["empty", "1 GiB", "+100k", "again"]);
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(rows)
}

/// A create row and the frozen-time row under it.
fn push_create(
    rows: &mut Vec<Row>,
    name: &'static str,
    target: &'static str,
    (total, frozen): (Vec<f64>, Vec<f64>),
) {
    rows.push(Row {
        name,
        samples: total,
        unit: "ms",
        target,
    });
    rows.push(Row {
        name: "  inner frozen during it",
        samples: frozen,
        unit: "ms",
        target: "",
    });
}

const CREATE_EMPTY: &str = "checkpoint create, empty layer";
const CREATE_BIG: &str = "checkpoint create, 1 GiB written";
const CREATE_FULL: &str = "checkpoint create, 1 GiB + 100k files";
const CREATE_AGAIN: &str = "checkpoint create, emptied again";

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

/// One GET on a new connection; returns the time to the last byte and the
/// body length.
fn timed_get(addr: std::net::SocketAddr, host: &str, path: &str) -> Result<(f64, usize)> {
    use std::io::{Read, Write};
    let begin = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let elapsed = ms(begin.elapsed());
    let head_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP head")?;
    if !out.starts_with(b"HTTP/1.1 200") && !out.starts_with(b"HTTP/1.0 200") {
        bail!(
            "{addr} {host}{path}: {}",
            String::from_utf8_lossy(&out[..head_end])
        );
    }
    Ok((elapsed, out.len() - head_end - 4))
}

/// Small requests and a 256 MiB download through the three ways in: a
/// direct connection to the inner's veth address (the anchor), TCP
/// forwarding, and HTTP ingress.
fn bench_ingress(rounds: usize) -> Result<()> {
    let hull = TestHull::start_with(Limits {
        network: "nat",
        memory_max: "1G",
        ..Limits::default()
    });
    block_on(hull.sh(
        "mkdir -p /b && head -c 1024 /dev/zero > /b/small && dd if=/dev/zero of=/b/big bs=1M count=256 2>/dev/null",
    ));
    hull.add_service(
        "b",
        "exec httpd -f -p 8600 -h /b",
        &[],
        None,
        hull_proto::RestartPolicy::Always,
    );
    let out = hull.hull(&["ingress", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let inner: std::net::IpAddr = report["inner_address"]
        .as_str()
        .context("no inner address")?
        .parse()?;
    let direct = std::net::SocketAddr::new(inner, 8600);
    let forwarded = std::net::SocketAddr::from((hull.outer, 8600));
    let http = std::net::SocketAddr::from((hull.outer, hull.http_port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while timed_get(forwarded, "x", "/small").is_err() {
        if Instant::now() > deadline {
            bail!("port 8600 not forwarded; log:\n{}", hull.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ways: [(&'static str, &'static str, std::net::SocketAddr, &str); 3] = [
        (
            "anchor: direct to the inner's address",
            "anchor: 256 MiB direct",
            direct,
            "x",
        ),
        (
            "TCP forwarding",
            "256 MiB through TCP forwarding",
            forwarded,
            "x",
        ),
        (
            "HTTP ingress",
            "256 MiB through HTTP ingress",
            http,
            "8600.localhost",
        ),
    ];
    let mut rows = Vec::new();
    let mut rates = Vec::new();
    for (name, big_name, addr, host) in ways {
        let mut samples = Vec::new();
        for _ in 0..rounds * 4 {
            samples.push(timed_get(addr, host, "/small")?.0);
        }
        rows.push(Row {
            name: match name {
                "TCP forwarding" => "GET 1 KiB, new connection, TCP forwarding",
                "HTTP ingress" => "GET 1 KiB, new connection, HTTP ingress",
                _ => "anchor: GET 1 KiB, new connection, direct",
            },
            samples,
            unit: "ms",
            target: "",
        });
        let mut big = Vec::new();
        for _ in 0..3 {
            let (t, len) = timed_get(addr, host, "/big")?;
            if len != 256 << 20 {
                bail!("{big_name}: got {len} bytes");
            }
            big.push(t);
        }
        big.sort_by(|a, b| a.partial_cmp(b).unwrap());
        rates.push((big_name, 256.0 / (big[1] / 1e3)));
    }
    print_rows(&rows);
    println!();
    let anchor = rows[0].p(0.5);
    for row in &rows[1..] {
        println!(
            "ratio {} / direct (p50): {:.2}",
            row.name,
            row.p(0.5) / anchor
        );
    }
    println!();
    for (name, rate) in &rates {
        println!("{name:<44} {rate:>8.0} MiB/s (median of 3)");
    }
    println!(
        "ratio forwarding / direct throughput: {:.2}",
        rates[1].1 / rates[0].1
    );
    println!(
        "ratio HTTP ingress / direct throughput: {:.2}",
        rates[2].1 / rates[0].1
    );
    let inner_pid = hull
        .wait_running(Duration::from_secs(10))
        .inner_pid
        .context("the inner has no pid")?;
    bench_keepalive(&hull, inner_pid, direct.ip())
}

/// The port of the keep-alive server the wrk rows measure.
const KEEPALIVE_PORT: u16 = 8700;

/// wrk against a keep-alive HTTP server in the inner's network namespace:
/// direct, through HTTP ingress and through TCP forwarding with 64
/// connections, then 1,000 connections held through TCP forwarding.
fn bench_keepalive(hull: &TestHull, inner_pid: i32, inner: std::net::IpAddr) -> Result<()> {
    raise_nofile();
    let listener = listen_in_netns(inner_pid, KEEPALIVE_PORT)?;
    let server = KeepAliveServer::start(listener)?;
    let forwarded = std::net::SocketAddr::from((hull.outer, KEEPALIVE_PORT));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&forwarded, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("port {KEEPALIVE_PORT} not forwarded; log:\n{}", hull.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = arg_usize("--wrk-secs", 5);
    let host = format!("{KEEPALIVE_PORT}.localhost");
    let hulld = hull.hulld_pid();
    let urls = WrkUrls {
        direct: format!("http://{inner}:{KEEPALIVE_PORT}/"),
        http: format!("http://{}:{}/", hull.outer, hull.http_port),
        forwarded: format!("http://{forwarded}/"),
        host,
    };
    for connections in [1, 64] {
        wrk_paths(&urls, hulld, connections, secs, None)?;
    }
    // On two shared cores the ratios above are CPU ratios: whatever hulld
    // spends per request is taken from wrk and the server. The usual proxy
    // methodology gives the proxy a core of its own instead, with the
    // client and the server on the same core(s) in both runs.
    if let Some(cores) = ProxyCores::split() {
        let placement = cores.apply(hulld, &server)?;
        let result = wrk_paths(&urls, hulld, 64, secs, Some(&cores));
        placement.undo(&server)?;
        result?;
    } else {
        println!("\n(one CPU only: no run with hulld on a core of its own)");
    }
    let held = wrk(&format!("http://{forwarded}/"), None, 1000, 10)?;
    println!();
    println!(
        "1000 keep-alive connections through TCP forwarding, 10 s: {} requests, {} errors  (target 0 errors)",
        held.requests, held.errors
    );
    Ok(())
}

struct WrkUrls {
    direct: String,
    http: String,
    forwarded: String,
    /// The Host that routes an HTTP ingress request to the server.
    host: String,
}

/// wrk on each path (direct, HTTP ingress, TCP forwarding), `--wrk-runs`
/// times in turn, and their ratios; with `cores`, wrk runs on the client
/// cores.
fn wrk_paths(
    urls: &WrkUrls,
    hulld: i32,
    connections: usize,
    secs: usize,
    cores: Option<&ProxyCores>,
) -> Result<()> {
    let run = |url: &str, host: Option<&str>| -> Result<WrkRun> {
        // Progress, and a mark for a profiler to start at.
        eprintln!("wrk: {connections} connection(s) to {url} for {secs} s");
        match cores {
            Some(c) => c.on_client_cores(|| wrk(url, host, connections, secs)),
            None => wrk(url, host, connections, secs),
        }
    };
    // The paths take turns, so a slow phase of a shared VM hits all three
    // alike; each row is the run with the median req/s.
    let runs = arg_usize("--wrk-runs", 3).max(1);
    let (mut direct, mut http, mut fwd) = (Vec::new(), Vec::new(), Vec::new());
    let (mut http_cpu, mut fwd_cpu) = (0, 0);
    for _ in 0..runs {
        direct.push(run(&urls.direct, None)?);
        let cpu = cpu_ticks(hulld)?;
        http.push(run(&urls.http, Some(&urls.host))?);
        http_cpu += cpu_ticks(hulld)? - cpu;
        let cpu = cpu_ticks(hulld)?;
        fwd.push(run(&urls.forwarded, None)?);
        fwd_cpu += cpu_ticks(hulld)? - cpu;
    }
    let cpu_per_req = |ticks: u64, runs: &[WrkRun]| {
        ticks as f64 * 1e6 / clock_ticks() / runs.iter().map(|r| r.requests).sum::<u64>() as f64
    };
    let (http_cpu, fwd_cpu) = (cpu_per_req(http_cpu, &http), cpu_per_req(fwd_cpu, &fwd));
    let (direct, http, fwd) = (median_run(direct), median_run(http), median_run(fwd));
    println!();
    let placement = match cores {
        None => "all on every CPU".to_owned(),
        Some(c) => format!(
            "wrk and the server on CPU {}, hulld on CPU {}",
            c.client_list(),
            c.proxy
        ),
    };
    println!(
        "wrk, {connections} keep-alive connection(s), {secs} s, 1 KiB responses, {placement}, median of {runs} runs:"
    );
    println!(
        "{:<40} {:>9} {:>10} {:>10} {:>6} {:>14}",
        "path", "req/s", "p50", "p99", "errors", "hulld CPU/req"
    );
    println!("{}", "-".repeat(94));
    for (name, r, cpu) in [
        ("anchor: direct to the inner's address", &direct, None),
        ("HTTP ingress", &http, Some(http_cpu)),
        ("TCP forwarding", &fwd, Some(fwd_cpu)),
    ] {
        let per_req = cpu.map(|us| format!("{us:.1} us")).unwrap_or_default();
        println!(
            "{:<40} {:>9.0} {:>7.3} ms {:>7.3} ms {:>6} {:>14}",
            name, r.rps, r.p50_ms, r.p99_ms, r.errors, per_req
        );
    }
    println!(
        "ratio HTTP ingress / direct throughput: {:.2}  (target >= 0.8)",
        http.rps / direct.rps
    );
    println!(
        "HTTP ingress added p50 latency: {:.3} ms  (target <= 0.2 ms)",
        http.p50_ms - direct.p50_ms
    );
    println!(
        "ratio TCP forwarding / direct throughput: {:.2}",
        fwd.rps / direct.rps
    );
    Ok(())
}

/// The run with the median req/s (the upper one of an even count).
fn median_run(mut runs: Vec<WrkRun>) -> WrkRun {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    runs.swap_remove(runs.len() / 2)
}

/// The CPUs of a run where hulld has a core of its own: the last allowed
/// CPU for hulld, the others for wrk and the server.
struct ProxyCores {
    client: Vec<usize>,
    proxy: usize,
}

/// What `ProxyCores::apply` changed, to put back.
struct Placement {
    hulld: i32,
    hulld_before: nix::sched::CpuSet,
    server_before: nix::sched::CpuSet,
}

impl ProxyCores {
    fn split() -> Option<ProxyCores> {
        let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
        let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
            .filter(|&c| allowed.is_set(c).unwrap_or(false))
            .collect();
        let (&proxy, client) = cpus.split_last()?;
        (!client.is_empty()).then(|| ProxyCores {
            client: client.to_vec(),
            proxy,
        })
    }

    fn client_list(&self) -> String {
        let list: Vec<String> = self.client.iter().map(|c| c.to_string()).collect();
        list.join(",")
    }

    fn set(cpus: &[usize]) -> Result<nix::sched::CpuSet> {
        let mut set = nix::sched::CpuSet::new();
        for &c in cpus {
            set.set(c)?;
        }
        Ok(set)
    }

    /// Pins every thread of hulld to the proxy core and the server's
    /// threads to the client cores.
    fn apply(&self, hulld: i32, server: &KeepAliveServer) -> Result<Placement> {
        use nix::sched::sched_getaffinity;
        use nix::unistd::Pid;
        let hulld_before = sched_getaffinity(Pid::from_raw(hulld))
            .context("read the CPUs of hulld's main thread")?;
        set_threads_affinity(hulld, &Self::set(&[self.proxy])?)?;
        let server_before = server.set_affinity(&Self::set(&self.client)?)?;
        Ok(Placement {
            hulld,
            hulld_before,
            server_before,
        })
    }

    /// Runs `f` with the calling thread on the client cores, so that what
    /// it spawns (wrk) starts there.
    fn on_client_cores<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        use nix::sched::{sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        let me = Pid::from_raw(0);
        let before = sched_getaffinity(me)?;
        sched_setaffinity(me, &Self::set(&self.client)?)
            .context("pin the bench to the client cores")?;
        let result = f();
        sched_setaffinity(me, &before)?;
        result
    }
}

impl Placement {
    /// Threads hulld started meanwhile inherited the pinned mask, so every
    /// thread it has now gets the main thread's mask back.
    fn undo(self, server: &KeepAliveServer) -> Result<()> {
        set_threads_affinity(self.hulld, &self.hulld_before)?;
        server.set_affinity(&self.server_before)?;
        Ok(())
    }
}

/// Sets the CPUs of every thread a process has.
fn set_threads_affinity(pid: i32, cpus: &nix::sched::CpuSet) -> Result<()> {
    for tid in threads(pid)? {
        match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), cpus) {
            // A thread that ended since the listing has nothing to set.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => bail!("set the CPUs of thread {tid} of process {pid}: {e}"),
        }
    }
    Ok(())
}

/// The thread ids of a process.
fn threads(pid: i32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/task");
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("list {dir}"))? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command, which may hold spaces, start at state (3).
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// What one wrk run reports.
struct WrkRun {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx answers.
    errors: u64,
}

fn wrk(url: &str, host: Option<&str>, connections: usize, secs: usize) -> Result<WrkRun> {
    let mut cmd = Command::new("wrk");
    cmd.args(["--latency", "--timeout", "5s"])
        .arg(format!("-t{}", connections.min(2)))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"));
    if let Some(host) = host {
        cmd.args(["-H", &format!("Host: {host}")]);
    }
    let out = cmd
        .arg(url)
        .stderr(Stdio::inherit())
        .output()
        .context("run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk {url} failed: {text}");
    }
    parse_wrk(&text).with_context(|| format!("parse wrk's output:\n{text}"))
}

fn parse_wrk(text: &str) -> Result<WrkRun> {
    let mut run = WrkRun {
        rps: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        requests: 0,
        errors: 0,
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", n] => run.rps = n.parse()?,
            ["50%", t] => run.p50_ms = wrk_ms(t)?,
            ["99%", t] => run.p99_ms = wrk_ms(t)?,
            [n, "requests", "in", ..] => run.requests = n.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => run.errors += n.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                for n in rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                {
                    run.errors += n;
                }
            }
            _ => {}
        }
    }
    if run.rps.is_nan() || run.p50_ms.is_nan() {
        bail!("no Requests/sec or 50% line");
    }
    Ok(run)
}

/// wrk's durations: 812.00us, 1.20ms, 2.01s.
fn wrk_ms(t: &str) -> Result<f64> {
    let split = t
        .find(|c: char| c.is_ascii_alphabetic())
        .context("a duration without a unit")?;
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse()?;
    Ok(match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        other => bail!("unknown unit {other}"),
    })
}

/// 1,000 connections need more descriptors than the usual soft limit of
/// 1024, here and in wrk, which inherits it.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A listening socket made inside the inner's network namespace. busybox
/// httpd closes every connection after one answer, so keep-alive is
/// measured against a server of our own whose socket lives where a
/// service's would: the forwarder and the ingress treat it like any other.
fn listen_in_netns(inner_pid: i32, port: u16) -> Result<std::net::TcpListener> {
    let ns = std::fs::File::open(format!("/proc/{inner_pid}/ns/net"))
        .with_context(|| format!("open /proc/{inner_pid}/ns/net"))?;
    // A thread of its own: setns moves only the calling thread, and this one
    // ends right after, so no other work runs in the inner's namespace.
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns into the inner's network namespace")?;
        let listener = std::net::TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("bind 0.0.0.0:{port} in the inner"))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the setns thread panicked"))?
}

/// hyper serving a fixed 1 KiB body on its own runtime; dropped, it stops.
struct KeepAliveServer {
    runtime: Option<tokio::runtime::Runtime>,
    /// Its runtime's threads, to pin them.
    threads: std::sync::Arc<std::sync::Mutex<Vec<i32>>>,
}

impl KeepAliveServer {
    fn start(listener: std::net::TcpListener) -> Result<KeepAliveServer> {
        let threads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = threads.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || {
                record.lock().unwrap().push(nix::unistd::gettid().as_raw());
            })
            .build()?;
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let body = bytes::Bytes::from(vec![b'x'; 1024]);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let body = body.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(body),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(KeepAliveServer {
            runtime: Some(runtime),
            threads,
        })
    }

    /// Sets the CPUs of the server's threads; returns what the first had.
    fn set_affinity(&self, cpus: &nix::sched::CpuSet) -> Result<nix::sched::CpuSet> {
        use nix::sched::{sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        let threads = self.threads.lock().unwrap().clone();
        let first = *threads.first().context("the server has no threads")?;
        let before = sched_getaffinity(Pid::from_raw(first))?;
        for tid in threads {
            sched_setaffinity(Pid::from_raw(tid), cpus)
                .with_context(|| format!("set the CPUs of the server's thread {tid}"))?;
        }
        Ok(before)
    }
}

impl Drop for KeepAliveServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
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
    // hulld's default level: debug logging of every request is not what a
    // user runs.
    if std::env::var_os("HULL_LOG").is_none() {
        std::env::set_var("HULL_LOG", "info");
    }
    let rounds = arg_usize("--rounds", 50);
    let execs = arg_usize("--execs", 300);
    if std::env::args().any(|a| a == "--logs") {
        return bench_logs(arg_usize("--lines", 2_000_000) as u64);
    }
    if std::env::args().any(|a| a == "--ingress") {
        return bench_ingress(rounds);
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
        let empty = p50(CREATE_EMPTY);
        let big = p50(CREATE_BIG);
        let full = p50(CREATE_FULL);
        let again = p50(CREATE_AGAIN);
        let copy = p50("anchor: cp -a of that layer");
        println!();
        println!(
            "ratio create 1 GiB / empty (p50): {:.2}  (target <= 1.5)",
            big / empty
        );
        println!(
            "ratio create 1 GiB + 100k files / empty (p50): {:.2}  (target <= 1.5)",
            full / empty
        );
        println!(
            "ratio create emptied again / empty (p50): {:.2}  (the volume's age, not the layer's size)",
            again / empty
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
