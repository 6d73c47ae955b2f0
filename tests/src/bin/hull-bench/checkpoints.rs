//! The storage stack: checkpoint create on layers of growing size and
//! right after an unsynced write, restore, and `cp -a` as the anchor.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hull_checkpoint::volume::{DirtyBound, DIRTY_MAX_BYTES};
use hull_tests::{block_on, Limits, TestHull};

use crate::report::{ms, p50_of, percentile, print_rows, Row};

const CREATE_EMPTY: &str = "checkpoint create, empty layer";
const CREATE_DIRTY: &str = "checkpoint create, right after 1 GiB unsynced";
const WRITE_DIRTY: &str = "  writing that 1 GiB (dd, no sync)";
const KEPT_DIRTY: &str = "  writing it and checkpointing it";
const CREATE_DIRTY_UNBOUNDED: &str = "same, dirty data unbounded (as before)";
const WRITE_DIRTY_UNBOUNDED: &str = "  writing that 1 GiB, unbounded";
const KEPT_DIRTY_UNBOUNDED: &str = "  writing it and checkpointing it, unbounded";
const CREATE_BIG: &str = "checkpoint create, 1 GiB written and synced";
const CREATE_FULL: &str = "checkpoint create, 1 GiB + 100k files";
const CREATE_AGAIN: &str = "checkpoint create, emptied again";
const COPY: &str = "anchor: cp -a of that layer";
const FROZEN: &str = "  inner frozen during it";

pub fn run(rounds: usize, dirty_rounds: usize) -> Result<()> {
    let mut rows = bench_checkpoints(rounds, dirty_rounds)?;
    for mode in &QUOTA_MODES {
        eprintln!("checkpoints with the layer quota {}...", mode.name);
        rows.extend(bench_quota(mode, rounds)?);
    }
    print_rows(&rows);
    let p50 = |name: &str| p50_of(&rows, name);
    let empty = p50(CREATE_EMPTY);
    println!();
    println!(
        "checkpoint create right after writing 1 GiB (p50): {:.1} ms with the volume's dirty data bounded to {} MiB, {:.1} ms unbounded  (target <= 100 ms)",
        p50(CREATE_DIRTY),
        DIRTY_MAX_BYTES >> 20,
        p50(CREATE_DIRTY_UNBOUNDED)
    );
    println!(
        "ratio write throughput bounded / unbounded (p50): {:.2} for the write alone, {:.2} until it is in a checkpoint  (target >= 0.8)",
        p50(WRITE_DIRTY) / p50(WRITE_DIRTY_UNBOUNDED),
        p50(KEPT_DIRTY) / p50(KEPT_DIRTY_UNBOUNDED)
    );
    println!(
        "ratio create 1 GiB / empty (p50): {:.2}  (target <= 1.5)",
        p50(CREATE_BIG) / empty
    );
    println!(
        "ratio create 1 GiB + 100k files / empty (p50): {:.2}  (target <= 1.5)",
        p50(CREATE_FULL) / empty
    );
    println!(
        "ratio create emptied again / empty (p50): {:.2}  (the volume's age, not the layer's size)",
        p50(CREATE_AGAIN) / empty
    );
    println!(
        "ratio cp -a / create full (p50): {:.0}x slower than a checkpoint",
        p50(COPY) / p50(CREATE_FULL)
    );
    let off = &QUOTA_MODES[0];
    for mode in &QUOTA_MODES[1..] {
        println!(
            "ratio quota {} / {} (p50): create after an overwrite {:.2}, restore {:.2}  (target <= 1.2)",
            mode.name,
            off.name,
            p50(mode.create) / p50(off.create),
            p50(mode.restore) / p50(off.restore),
        );
    }
    Ok(())
}

/// A `[storage] quota_mode` compared and its rows.
struct QuotaBench {
    name: &'static str,
    create: &'static str,
    restore: &'static str,
}

/// The quota off first: the others are compared with it.
const QUOTA_MODES: [QuotaBench; 3] = [
    QuotaBench {
        name: "off",
        create: "create after an 8 MiB overwrite, no quota",
        restore: "restore, no quota",
    },
    QuotaBench {
        name: "simple",
        create: "create after an 8 MiB overwrite, simple quota",
        restore: "restore, simple quota",
    },
    QuotaBench {
        name: "full",
        create: "create after an 8 MiB overwrite, full qgroups",
        restore: "restore, full qgroups",
    },
];

/// Checkpoints of a 256 MiB + 10k files layer, each after an overwrite
/// of 8 MiB of it (the extents a commit must account for, shared with
/// the checkpoints before), and restores, on a volume whose layer quota
/// is `mode`: what the quota's accounting costs them.
fn bench_quota(mode: &QuotaBench, rounds: usize) -> Result<Vec<Row>> {
    let table = match mode.name {
        "off" => "[storage]\nlayer_quota = \"none\"\n".to_string(),
        mode => format!("[storage]\nlayer_quota = \"2G\"\nquota_mode = \"{mode}\"\n"),
    };
    let hull = TestHull::start_with(Limits {
        memory_max: "1G",
        pids_max: 1024,
        volume_size: "4G",
        tables: table,
        ..Limits::default()
    });
    block_on(async {
        hull.sh("dd if=/dev/urandom of=/root/data bs=1M count=256 2>/dev/null && mkdir /root/many && cd /root/many && seq 1 10000 | xargs touch && sync")
            .await;
        let mut c = hull.client().await;
        let mut creates = Vec::new();
        for i in 0..rounds {
            let seek = (i * 8) % 248;
            hull.sh(&format!(
                "dd if=/dev/urandom of=/root/data bs=1M count=8 seek={seek} conv=notrunc 2>/dev/null && touch /root/many/{i}"
            ))
            .await;
            let t = Instant::now();
            c.checkpoint_create(None).await?;
            creates.push(ms(t.elapsed()));
        }
        let mut restores = Vec::new();
        for _ in 0..rounds.min(20) {
            let t = Instant::now();
            c.checkpoint_restore("v1").await?;
            restores.push(ms(t.elapsed()));
        }
        Ok(vec![
            Row::new(mode.create, creates, "ms").target("<= 1.2x no quota"),
            Row::new(mode.restore, restores, "ms").target("<= 1.2x no quota"),
        ])
    })
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

/// A create row and the frozen-time row under it.
fn push_create(
    rows: &mut Vec<Row>,
    name: &'static str,
    target: &'static str,
    (total, frozen): (Vec<f64>, Vec<f64>),
) {
    rows.push(Row::new(name, total, "ms").target(target));
    rows.push(Row::new(FROZEN, frozen, "ms"));
}

/// `rounds` times: write 1 GiB into the layer and create a checkpoint
/// right after, without a sync between, so the create pays for whatever
/// the write left dirty.
async fn dirty_creates(hull: &TestHull, rounds: usize) -> Result<DirtyRounds> {
    let mut c = hull.client().await;
    let mut out = DirtyRounds::default();
    for _ in 0..rounds {
        let write = Instant::now();
        hull.sh("dd if=/dev/zero of=/root/dirty bs=1M count=1024")
            .await;
        out.write_rate.push(1024.0 / write.elapsed().as_secs_f64());
        let t = Instant::now();
        let r = c.checkpoint_create(None).await?;
        out.create.push(ms(t.elapsed()));
        out.frozen.push(r.frozen_ms);
        out.kept_rate.push(1024.0 / write.elapsed().as_secs_f64());
        // Give the space back, so every round starts from the same volume:
        // btrfs frees a deleted snapshot's extents in its cleaner thread,
        // later, and ten rounds of 1 GiB would otherwise fill 8 GiB.
        c.checkpoint_delete(&r.checkpoint.id).await?;
        hull.sh("rm /root/dirty && sync").await;
        let volume = hull.state_dir.join("volume");
        let status = Command::new("btrfs")
            .args(["subvolume", "sync"])
            .arg(&volume)
            .stdout(std::process::Stdio::null())
            .status()
            .context("run btrfs subvolume sync")?;
        if !status.success() {
            bail!("btrfs subvolume sync {} failed", volume.display());
        }
    }
    Ok(out)
}

/// Samples of [`dirty_creates`]; the rates in MiB/s.
#[derive(Default)]
struct DirtyRounds {
    /// Of the write alone: what a writer in the inner sees.
    write_rate: Vec<f64>,
    /// Of the write and the checkpoint after it, whose syncfs flushes what
    /// the write left dirty: the rate at which data becomes durable.
    kept_rate: Vec<f64>,
    create: Vec<f64>,
    frozen: Vec<f64>,
}

fn bench_checkpoints(rounds: usize, dirty_rounds: usize) -> Result<Vec<Row>> {
    let hull = TestHull::start_with(Limits {
        memory_max: "1G",
        pids_max: 1024,
        volume_size: "8G",
        auto_checkpoints_keep: 10,
        ..Limits::default()
    });
    let mut rows = Vec::new();
    let mut phases = Vec::new();
    block_on(async {
        push_create(
            &mut rows,
            CREATE_EMPTY,
            "<= 20 ms",
            creates(&hull, rounds).await?,
        );
        phases.push(("empty", rounds));

        // hulld bounds the volume's dirty data when it mounts it; lifting
        // the bound for a second set of rounds shows what it costs and
        // saves in the same run.
        let bound = DirtyBound::find(&hull.state_dir.join("volume"))
            .context("find the volume's loop device and bdi")?;
        for bounded in [true, false] {
            bound.set_direct_io(bounded)?;
            bound.limit(bounded.then_some(DIRTY_MAX_BYTES))?;
            eprintln!(
                "writing 1 GiB into the layer {dirty_rounds} times, {} ...",
                if bounded { "bounded" } else { "unbounded" }
            );
            let d = dirty_creates(&hull, dirty_rounds).await?;
            let (create, write, kept) = if bounded {
                (CREATE_DIRTY, WRITE_DIRTY, KEPT_DIRTY)
            } else {
                (
                    CREATE_DIRTY_UNBOUNDED,
                    WRITE_DIRTY_UNBOUNDED,
                    KEPT_DIRTY_UNBOUNDED,
                )
            };
            push_create(&mut rows, create, "<= 100 ms", (d.create, d.frozen));
            let target = if bounded { ">= 0.8x unbounded" } else { "" };
            rows.push(Row::new(write, d.write_rate, "MiB/s").target(target));
            rows.push(Row::new(kept, d.kept_rate, "MiB/s").target(target));
            phases.push((if bounded { "dirty" } else { "unbound" }, dirty_rounds));
        }
        bound.set_direct_io(true)?;
        bound.limit(Some(DIRTY_MAX_BYTES))?;

        eprintln!("writing 1 GiB into the layer...");
        hull.sh("dd if=/dev/zero of=/root/big bs=1M count=1024 2>/dev/null && sync")
            .await;
        push_create(
            &mut rows,
            CREATE_BIG,
            "<= 1.5x empty",
            creates(&hull, rounds).await?,
        );
        phases.push(("1 GiB", rounds));
        eprintln!("adding 100k small files...");
        hull.sh("mkdir -p /root/many && cd /root/many && seq 1 100000 | xargs touch && sync")
            .await;
        push_create(
            &mut rows,
            CREATE_FULL,
            "<= 1.5x empty",
            creates(&hull, rounds).await?,
        );
        phases.push(("+100k", rounds));
        rows.push(restores(&hull, rounds).await?);
        // The checkpoint the restores go back to.
        phases.push(("", 1));
        // After the restores: deleting the copies leaves btrfs work behind
        // (delayed refs, the cleaner) that a restore would wait on.
        rows.push(copies(&hull)?);

        // The same volume with the data gone from the layer (the snapshots
        // keep it): tells the layer's size from the volume's age.
        hull.sh("rm -rf /root/big /root/many && sync").await;
        let again = creates(&hull, rounds).await?;
        rows.push(Row::new(CREATE_AGAIN, again.0, "ms"));
        phases.push(("again", rounds));
        print_create_steps(&hull.log(), &phases);
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(rows)
}

async fn restores(hull: &TestHull, rounds: usize) -> Result<Row> {
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
    Ok(Row::new("restore incl. bounce (1 GiB layer)", restores, "ms").target("<= 150 ms"))
}

/// The naive baseline: copy the current layer.
fn copies(hull: &TestHull) -> Result<Row> {
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
    Ok(Row::new(COPY, copies, "ms"))
}

/// p50 of each step of checkpoint create, from hulld's "checkpoint
/// created" log lines (not the automatic ones a restore makes): each phase
/// is a name and how many creates it made, in order; one without a name
/// is left out of the table.
fn print_create_steps(log: &str, phases: &[(&str, usize)]) {
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
    let wanted: usize = phases.iter().map(|p| p.1).sum();
    if phases.iter().any(|p| p.1 == 0) || runs.len() < wanted {
        eprintln!("no step timings in hulld's log");
        return;
    }
    println!();
    print!("checkpoint create steps, p50 ms:");
    for (phase, _) in phases.iter().filter(|p| !p.0.is_empty()) {
        print!(" {phase:>9}");
    }
    println!();
    let mut groups = Vec::new();
    let mut rest = &runs[..];
    for (phase, n) in phases {
        let (group, after) = rest.split_at(*n);
        if !phase.is_empty() {
            groups.push(group);
        }
        rest = after;
    }
    for (i, (name, _)) in runs[0].iter().enumerate() {
        print!("  {name:<31}");
        for group in &groups {
            let mut v: Vec<f64> = group.iter().filter_map(|r| r.get(i).map(|s| s.1)).collect();
            v.sort_by(f64::total_cmp);
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
