//! A boot's timeline, read off the serial console: hull-init's lines carry
//! the boot clock (`hull-init: [  uptime] step (N ms)`), hulld's the
//! realtime clock (tracing's RFC 3339 stamps), and hull-init's `clocks:`
//! line, which reads both at once, lines the two up.

use hull_tests::vm::init_lines;
use serde_json::json;

/// One line of hull-init's, or one of hulld's milestones.
#[derive(Debug, Clone)]
pub struct Step {
    /// The line without its numbers, durations and parentheses, so that
    /// the same step of two boots has the same label.
    pub label: String,
    /// Seconds since the kernel started (the guest's boot clock).
    pub at: f64,
    /// The step's own "(N ms)", else the time since the line before.
    pub took_ms: f64,
}

/// What one boot's console says.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub steps: Vec<Step>,
    /// hull-init's first line: the kernel has exec'd it.
    pub init_start: f64,
    /// Its mounts: from its first line on the tmpfs root (or its first line
    /// where it does not switch roots) to the cgroup2 mount's line.
    pub mounts_ms: Option<f64>,
    /// The mounts' own "(N ms)" added up: the system calls without the
    /// logging between them.
    pub mounts_sum_ms: Option<f64>,
    pub hulld_spawned: Option<f64>,
    pub hulld_listening: Option<f64>,
    pub api_listening: Option<f64>,
    pub inner_ready: Option<f64>,
}

/// hulld's console lines that mark its start-up, with the labels they get.
const HULLD_MILESTONES: [(&str, &str); 3] = [
    ("hulld listening", "hulld: control socket listening"),
    (
        "HTTP API listening",
        "hulld: HTTP API listening (API ready)",
    ),
    ("inner ready", "hulld: inner ready (its init runs)"),
];

impl Timeline {
    /// hull's own share of the boot: from hull-init's exec to the API
    /// listening with the inner running.
    pub fn share_ms(&self) -> Option<f64> {
        let ready = self.api_listening?.max(self.inner_ready?);
        Some((ready - self.init_start) * 1e3)
    }

    pub fn init_to_hulld_ms(&self) -> Option<f64> {
        Some((self.hulld_spawned? - self.init_start) * 1e3)
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "steps": self.steps.iter().map(|s| json!({
                "step": s.label, "at_s": s.at, "took_ms": s.took_ms,
            })).collect::<Vec<_>>(),
            "kernel_to_init_ms": self.init_start * 1e3,
            "init_to_hulld_spawned_ms": self.init_to_hulld_ms(),
            "mounts_ms": self.mounts_ms,
            "mounts_syscalls_ms": self.mounts_sum_ms,
            "hulld_spawned_s": self.hulld_spawned,
            "hulld_listening_s": self.hulld_listening,
            "api_listening_s": self.api_listening,
            "inner_ready_s": self.inner_ready,
            "hull_share_ms": self.share_ms(),
        })
    }
}

/// The timeline of the boot `console` holds (one boot: `hull vm run`
/// starts each console anew). None without hull-init's first line.
pub fn parse(console: &str) -> Option<Timeline> {
    let lines: Vec<(f64, &str)> = init_lines(console)
        .filter_map(|l| {
            let (at, text) = l.split_once(']')?;
            Some((at.trim().parse().ok()?, text.trim()))
        })
        .collect();
    let init_start = lines
        .iter()
        .find(|(_, t)| t.starts_with("started as pid"))?
        .0;
    let mut steps = vec![Step {
        label: "kernel: start to hull-init's first line".into(),
        at: init_start,
        took_ms: init_start * 1e3,
    }];
    let mut offset = None;
    let mut prev = init_start;
    let mut mounts_from = init_start;
    let mut mounts_ms = None;
    let mut mounts_sum = 0.0;
    let mut hulld_spawned = None;
    for &(at, text) in &lines {
        if let Some(clocks) = text.strip_prefix("clocks:") {
            offset = clock_offset(clocks);
            continue;
        }
        if text.starts_with("started as pid") {
            continue;
        }
        let (body, own_ms) = split_ms(text);
        // Each module is in the total line "loaded N kernel modules".
        if body.starts_with("loaded kernel/") {
            continue;
        }
        if body == "running on the tmpfs root" {
            mounts_from = at;
        }
        if body.starts_with("mounted ") && mounts_ms.is_none() {
            mounts_sum += own_ms.unwrap_or(0.0);
        }
        if body.starts_with("mounted cgroup2 ") {
            mounts_ms = Some((at - mounts_from) * 1e3);
        }
        if body.starts_with("started hulld as pid") && hulld_spawned.is_none() {
            hulld_spawned = Some(at);
        }
        steps.push(Step {
            label: format!("init: {}", label(body)),
            at,
            took_ms: own_ms.unwrap_or((at - prev) * 1e3),
        });
        prev = at;
    }
    // hulld's lines up to the inner's start, each a step, on the boot
    // clock through the offset.
    let mut marks = [None; 3];
    let mut prev = hulld_spawned.unwrap_or(prev);
    for (real, message) in hulld_lines(console) {
        let Some(offset) = offset else { break };
        let at = real - offset;
        let milestone = HULLD_MILESTONES
            .iter()
            .position(|(needle, _)| message.starts_with(needle));
        let label = match milestone {
            Some(index) => {
                marks[index].get_or_insert(at);
                HULLD_MILESTONES[index].1.to_owned()
            }
            None => format!("hulld: {message}"),
        };
        steps.push(Step {
            label,
            at,
            took_ms: (at - prev) * 1e3,
        });
        prev = at;
        if marks[2].is_some() {
            break;
        }
    }
    Some(Timeline {
        steps,
        init_start,
        mounts_ms,
        mounts_sum_ms: mounts_ms.map(|_| mounts_sum),
        hulld_spawned,
        hulld_listening: marks[0],
        api_listening: marks[1],
        inner_ready: marks[2],
    })
}

/// hulld's log lines (tracing's `STAMP LEVEL target: message key=value`)
/// as their realtime and their message without its fields.
fn hulld_lines(console: &str) -> impl Iterator<Item = (f64, String)> + '_ {
    console.lines().filter_map(|line| {
        let mut words = line.split_whitespace();
        let real = rfc3339_secs(words.next()?)?;
        let _level = words.next()?;
        let target = words.next()?;
        if !target.ends_with(':') {
            return None;
        }
        let message: Vec<&str> = words
            .take_while(|w| {
                !w.split_once('=').is_some_and(|(key, _)| {
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
            })
            .collect();
        Some((real, message.join(" ")))
    })
}

/// realtime − boottime from hull-init's `clocks: boottime B realtime R`.
fn clock_offset(clocks: &str) -> Option<f64> {
    let mut words = clocks.split_whitespace();
    let mut value = |name: &str| -> Option<f64> {
        (words.next()? == name).then_some(())?;
        words.next()?.parse().ok()
    };
    let boot = value("boottime")?;
    let real = value("realtime")?;
    Some(real - boot)
}

/// A line's text and its trailing "(N ms)".
fn split_ms(text: &str) -> (&str, Option<f64>) {
    if let Some(open) = text.rfind(" (") {
        if let Some(ms) = text[open + 2..]
            .strip_suffix(" ms)")
            .and_then(|n| n.parse().ok())
        {
            return (&text[..open], Some(ms));
        }
    }
    (text, None)
}

/// A line as a label two boots share: without parenthesised remarks,
/// numbers (pids, counts) and hashes.
fn label(text: &str) -> String {
    let mut out = String::new();
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace()
        .filter(|w| {
            let digits = w.chars().all(|c| c.is_ascii_digit());
            let hash = w.len() >= 8 && w.chars().all(|c| c.is_ascii_hexdigit());
            !digits && !hash
        })
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(':')
        .to_owned()
}

/// Seconds since the epoch of an RFC 3339 UTC stamp such as
/// `2026-12-06T22:49:55.504001Z`.
pub fn rfc3339_secs(stamp: &str) -> Option<f64> {
    // Console lines may carry escape sequences before the stamp.
    let stamp = &stamp[stamp.find(|c: char| c.is_ascii_digit())?..];
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.split('-').map(str::parse::<i64>);
    let (year, month, day) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let mut time = time.split(':');
    let hours: i64 = time.next()?.parse().ok()?;
    let minutes: i64 = time.next()?.parse().ok()?;
    let seconds: f64 = time.next()?.parse().ok()?;
    let whole = days_from_civil(year, month, day) * 86_400 + hours * 3_600 + minutes * 60;
    #[allow(
        clippy::cast_precision_loss,
        reason = "seconds since 1970 fit f64's 53 bits"
    )]
    Some(whole as f64 + seconds)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "\x1bc\x1b[?7l\x1b[2Jhull-init: [    3.420] started as pid 1
hull-init: [    4.109] moved the initramfs (128.1 MiB) to a tmpfs root (681.7 ms)
hull-init: [    4.162] running on the tmpfs root
hull-init: [    4.173] mounted proc at /proc (5.5 ms)
hull-init: [    4.175] mounted sysfs at /sys (1.2 ms)
hull-init: [    4.184] mounted cgroup2 at /sys/fs/cgroup (3.6 ms)
hull-init: [    4.234] loaded kernel/crypto/xor.ko (23.8 ms)
hull-init: [    5.806] loaded 19 kernel modules (1609.8 ms)
hull-init: [   12.893] copied the base image d0b78d903779 to the data disk (300.6 ms)
hull-init: [   12.970] clocks: boottime 12.970000 realtime 1796597390.000000
hull-init: [   12.991] started hulld as pid 107 (25.3 ms)
2026-12-06T22:49:50.886838Z  INFO hull_outer::daemon: hull's cgroups limited daemon_memory_max=337717744
2026-12-06T22:49:54.756933Z  INFO hull_outer::daemon: hulld listening socket=/run/hull/hull.sock
2026-12-06T22:49:55.504001Z  INFO hull_outer::daemon: HTTP API listening url=http://0.0.0.0:7700
2026-12-06T22:49:56.232349Z  INFO hull_outer::supervisor: inner ready pid=127 start_ms=1447.69896
";

    #[test]
    fn a_console_gives_the_steps_and_hullds_milestones_on_the_boot_clock() {
        let t = parse(CONSOLE).unwrap();
        assert!((t.init_start - 3.42).abs() < 1e-9);
        assert!((t.mounts_ms.unwrap() - 22.0).abs() < 1e-6);
        assert!((t.mounts_sum_ms.unwrap() - 10.3).abs() < 1e-6);
        let labels: Vec<&str> = t.steps.iter().map(|s| s.label.as_str()).collect();
        assert!(labels.contains(&"init: moved the initramfs to a tmpfs root"));
        assert!(labels.contains(&"init: loaded kernel modules"));
        assert!(labels.contains(&"init: copied the base image to the data disk"));
        assert!(labels.contains(&"init: started hulld as pid"));
        assert!(!labels
            .iter()
            .any(|l| l.contains("xor") || l.contains("clocks")));
        // 2026-12-06T22:49:50Z is 1796597390.
        let api = t.api_listening.unwrap();
        assert!((api - (12.97 + 5.504001)).abs() < 1e-6, "{api}");
        assert!(t.inner_ready.unwrap() > api);
        let share = t.share_ms().unwrap();
        assert!((share - (12.97 + 6.232349 - 3.42) * 1e3).abs() < 1e-3);
        let running = t
            .steps
            .iter()
            .find(|s| s.label == "init: running on the tmpfs root");
        assert!((running.unwrap().took_ms - 53.0).abs() < 1e-6);
    }

    #[test]
    fn rfc3339_stamps_are_seconds_since_the_epoch() {
        assert_eq!(rfc3339_secs("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(rfc3339_secs("2000-03-01T00:00:01.5Z"), Some(951_868_801.5));
        assert_eq!(rfc3339_secs("2026-12-06T22:49:50Z"), Some(1_796_597_390.0));
        assert_eq!(rfc3339_secs("not a stamp"), None);
    }
}
