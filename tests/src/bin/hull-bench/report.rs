//! Rows of samples and the table they print as.

use std::time::Duration;

/// Below this many samples a p99 is the maximum under another name, so
/// the table says "max" instead.
const P99_MIN_SAMPLES: usize = 100;

pub struct Row {
    pub name: &'static str,
    pub samples: Vec<f64>,
    pub unit: &'static str,
    pub target: &'static str,
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // p is in 0..=1, so the index is within the slice.
    #[allow(clippy::cast_possible_truncation)]
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

impl Row {
    pub fn new(name: &'static str, samples: Vec<f64>, unit: &'static str) -> Row {
        Row {
            name,
            samples,
            unit,
            target: "",
        }
    }

    pub fn target(self, target: &'static str) -> Row {
        Row { target, ..self }
    }

    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    pub fn p(&self, p: f64) -> f64 {
        percentile(&self.sorted(), p)
    }

    pub fn p50(&self) -> f64 {
        self.p(0.5)
    }

    /// p99 where there are enough samples for one, else the maximum, with
    /// the label that says which.
    pub fn tail(&self) -> (&'static str, f64) {
        let sorted = self.sorted();
        if sorted.len() >= P99_MIN_SAMPLES {
            ("p99", percentile(&sorted, 0.99))
        } else {
            ("max", sorted.last().copied().unwrap_or(f64::NAN))
        }
    }
}

/// The p50 of the row called `name`, NaN when there is none.
pub fn p50_of(rows: &[Row], name: &str) -> f64 {
    rows.iter()
        .find(|r| r.name == name)
        .map(Row::p50)
        .unwrap_or(f64::NAN)
}

/// The CPU time (user + system) of this process, or of the children it
/// waited for so far, in ms (getrusage).
pub fn cpu_ms(who: nix::sys::resource::UsageWho) -> nix::Result<f64> {
    let usage = nix::sys::resource::getrusage(who)?;
    #[allow(clippy::cast_precision_loss, reason = "seconds and microseconds")]
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
    Ok(ms(usage.user_time()) + ms(usage.system_time()))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn print_table(rows: &[&Row]) {
    println!();
    println!(
        "{:<50} {:>5} {:>13} {:>17}  target",
        "benchmark", "n", "p50", "p99 (or max)"
    );
    println!("{}", "-".repeat(100));
    for row in rows {
        let (label, tail) = row.tail();
        println!(
            "{:<50} {:>5} {:>7.2} {:<5} {label} {:>7.2} {:<5}  {}",
            row.name,
            row.samples.len(),
            row.p50(),
            row.unit,
            tail,
            row.unit,
            row.target
        );
    }
}

pub fn print_rows(rows: &[Row]) {
    print_table(&rows.iter().collect::<Vec<_>>());
}

/// A line of the table for a single figure (no percentiles).
pub fn print_single(name: &str, value: f64, unit: &str, target: &str) {
    println!(
        "{name:<50} {:>5} {value:>7.2} {unit:<5} {:>17}  {target}",
        1, ""
    );
}

/// A value from a `/proc/<pid>/status` line such as `VmRSS:  1234 kB`, in KiB.
pub fn proc_status_kib(pid: i32, key: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One row of a siege table: a `status` watch over hulld through one
/// attack (`bounds`).
pub struct SiegeRow {
    pub name: &'static str,
    /// Each `status` round trip, in ms.
    pub status_ms: Vec<f64>,
    /// Calls that failed or passed the watcher's deadline.
    pub failed: usize,
    pub peak_rss_kib: u64,
    /// hulld was the same live process throughout.
    pub survived: bool,
}

/// The siege rows as a table: status p50 and p99 (or max), failed calls,
/// peak RSS, each figure past its target marked with `!`.
pub fn print_siege_rows(rows: &[SiegeRow], p99_target: Duration, max_rss_kib: u64) {
    let p99_target_ms = ms(p99_target);
    println!();
    println!(
        "{:<56} {:>5} {:>10} {:>16} {:>6} {:>12}  hulld",
        "attack", "n", "status p50", "p99 (or max)", "failed", "peak RSS"
    );
    println!("{}", "-".repeat(118));
    for row in rows {
        let samples = Row::new(row.name, row.status_ms.clone(), "ms");
        let (label, tail) = samples.tail();
        let tail_mark = if tail > p99_target_ms { "!" } else { " " };
        #[allow(clippy::cast_precision_loss, reason = "KiB to MiB for display")]
        let rss_mib = row.peak_rss_kib as f64 / 1024.0;
        let rss_mark = if row.peak_rss_kib > max_rss_kib {
            "!"
        } else {
            " "
        };
        println!(
            "{:<56} {:>5} {:>7.2} ms {label} {:>8.2} ms{tail_mark} {:>6} {:>7.1} MiB{rss_mark}  {}",
            row.name,
            row.status_ms.len(),
            samples.p50(),
            tail,
            row.failed,
            rss_mib,
            if row.survived { "lived" } else { "DIED" },
        );
    }
    #[allow(clippy::cast_precision_loss, reason = "KiB to MiB for display")]
    let max_rss_mib = max_rss_kib as f64 / 1024.0;
    println!(
        "targets: status p99 <= {p99_target_ms:.0} ms, peak RSS <= {max_rss_mib:.0} MiB, hulld lives (! marks a miss)"
    );
}
