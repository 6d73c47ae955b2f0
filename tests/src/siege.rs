//! Watching hulld through an attack: a thread that asks `status` over the
//! control socket every 50 ms, timing each answer, and reads hulld's RSS
//! between them. The escape tests hold every attack to the same three
//! bounds ([`Siege::assert_held`]), and `hull-bench bounds` prints the
//! same figures as rows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hull_outer::client::Client;

use crate::TestHull;

/// hulld's resident memory may not pass this during an attack.
pub const MAX_RSS_KIB: u64 = 64 * 1024;

/// `status` must answer within this during an attack.
pub const MAX_STATUS: Duration = Duration::from_secs(1);

/// How often the watcher asks.
const PERIOD: Duration = Duration::from_millis(50);

/// What the watcher saw.
#[derive(Debug, Clone, Default)]
pub struct SiegeReport {
    /// hulld's pid when the watch began, and whether it was the same
    /// process (alive, not a zombie) every time it was looked at.
    pub pid: i32,
    pub survived: bool,
    /// The largest VmRSS seen, in KiB.
    pub peak_rss_kib: u64,
    /// Each `status` round trip (connect included); a call that failed or
    /// passed [`MAX_STATUS`] is recorded as its time so far and counted in
    /// `failed`.
    pub status: Vec<Duration>,
    pub failed: Vec<String>,
}

impl SiegeReport {
    pub fn slowest(&self) -> Duration {
        self.status.iter().copied().max().unwrap_or_default()
    }

    /// The `q` quantile (0..=1) of the status round trips.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.status.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = ((sorted.len() - 1) as f64 * q).round() as usize;
        sorted[i.min(sorted.len() - 1)]
    }
}

/// A running watch; [`Siege::end`] stops it and gives the report.
pub struct Siege {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<SiegeReport>>,
}

impl Siege {
    /// Starts watching `hull`'s hulld. Call before the attack begins.
    pub fn begin(hull: &TestHull) -> Siege {
        let pid = hull.hulld_pid();
        let socket = hull.socket.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("siege-watch".into())
            .spawn(move || watch(pid, &socket, &stopped))
            .expect("spawn the siege watcher");
        Siege {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the watch (after one more look) and returns what it saw.
    pub fn end(mut self) -> SiegeReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("a siege ends once")
            .join()
            .expect("the siege watcher panicked")
    }

    /// Ends the watch and asserts that hulld held: the same process
    /// throughout, RSS ≤ [`MAX_RSS_KIB`], and every `status` answered
    /// within [`MAX_STATUS`]. `what` names the attack in the failure.
    pub fn assert_held(self, hull: &TestHull, what: &str) -> SiegeReport {
        let report = self.end();
        assert!(
            report.survived,
            "{what}: hulld (pid {}) died; log:\n{}",
            report.pid,
            hull.log()
        );
        assert!(
            report.failed.is_empty(),
            "{what}: status failed or took over {MAX_STATUS:?}: {:?}",
            report.failed
        );
        assert!(
            report.peak_rss_kib <= MAX_RSS_KIB,
            "{what}: hulld's RSS reached {} KiB (bound {MAX_RSS_KIB} KiB)",
            report.peak_rss_kib
        );
        assert!(
            !report.status.is_empty(),
            "{what}: the watcher never got to ask status"
        );
        eprintln!(
            "{what}: hulld held: peak RSS {} KiB, {} status calls, slowest {:?}",
            report.peak_rss_kib,
            report.status.len(),
            report.slowest()
        );
        report
    }
}

impl Drop for Siege {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn rss(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn watch(pid: i32, socket: &std::path::Path, stop: &AtomicBool) -> SiegeReport {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the watcher's runtime");
    let mut report = SiegeReport {
        pid,
        survived: true,
        ..SiegeReport::default()
    };
    loop {
        let last = stop.load(Ordering::Relaxed);
        if !alive(pid) {
            report.survived = false;
            break;
        }
        if let Some(kib) = rss(pid) {
            report.peak_rss_kib = report.peak_rss_kib.max(kib);
        }
        let started = Instant::now();
        let answer = rt.block_on(async {
            tokio::time::timeout(MAX_STATUS, async {
                let mut c = Client::connect(socket).await?;
                c.status().await?;
                anyhow::Ok(())
            })
            .await
        });
        let took = started.elapsed();
        report.status.push(took);
        match answer {
            Ok(Ok(())) => {}
            Ok(Err(e)) => report.failed.push(format!("after {took:?}: {e:#}")),
            Err(_) => report
                .failed
                .push(format!("no answer within {MAX_STATUS:?}")),
        }
        if last {
            break;
        }
        std::thread::sleep(PERIOD.saturating_sub(took));
    }
    report
}
