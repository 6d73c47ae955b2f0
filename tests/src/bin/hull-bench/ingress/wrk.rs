//! Running wrk and reading what it reports.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// What one wrk run reports.
pub struct WrkRun {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx answers.
    pub errors: u64,
}

pub fn wrk(url: &str, host: Option<&str>, connections: usize, secs: usize) -> Result<WrkRun> {
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

/// The run with the median req/s (the upper one of an even count).
pub fn median_run(mut runs: Vec<WrkRun>) -> WrkRun {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    runs.swap_remove(runs.len() / 2)
}
