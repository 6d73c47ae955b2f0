//! Inner cold start, exec round-trip, bounce and hulld's idle memory,
//! against `runc run` of the same busybox root filesystem in the same run,
//! and the same with the inner's user namespace off, then with the seccomp
//! filter off as well, for what each costs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_tests::{block_on, spec, Limits, TestHull};

use crate::report::{ms, print_single, print_table, proc_status_kib, Row};

const COLD_START: &str = "cold start, client-observed (bounce + exec `true`)";
const BOUNCE: &str = "bounce, no services (request to ready)";

/// The names of one hull's rows.
struct Labels {
    cold: &'static str,
    start: &'static str,
    bounce: &'static str,
    exec_conn: &'static str,
    exec_new: &'static str,
}

/// One way to isolate the inner, as its `[inner]` table says.
struct Isolation {
    table: &'static str,
    labels: Labels,
}

/// The default inner (seccomp and user namespace on), the same without
/// the user namespace, and without both.
const ISOLATIONS: [Isolation; 3] = [
    Isolation {
        table: "",
        labels: Labels {
            cold: COLD_START,
            start: "  internal: inner start (spawn to init ready)",
            bounce: BOUNCE,
            exec_conn: "exec `true`, open connection",
            exec_new: "exec `true`, new connection",
        },
    },
    Isolation {
        table: "user_namespace = false",
        labels: Labels {
            cold: "no userns: cold start, client-observed",
            start: "no userns: internal inner start",
            bounce: "no userns: bounce",
            exec_conn: "no userns: exec `true`, open connection",
            exec_new: "no userns: exec `true`, new connection",
        },
    },
    Isolation {
        table: "user_namespace = false\nseccomp = false",
        labels: Labels {
            cold: "no userns, no seccomp: cold start, client-observed",
            start: "no userns, no seccomp: internal inner start",
            bounce: "no userns, no seccomp: bounce",
            exec_conn: "no userns, no seccomp: exec `true`, open connection",
            exec_new: "no userns, no seccomp: exec `true`, new connection",
        },
    },
];

/// The hulls take turns this many times, so a shared machine's drift in
/// speed falls on all alike.
const TURNS: usize = 5;

pub fn run(rounds: usize, execs: usize) -> Result<()> {
    let hulls: Vec<TestHull> = ISOLATIONS
        .iter()
        .map(|isolation| {
            TestHull::start_with(Limits {
                tables: format!("[inner]\n{}\n", isolation.table),
                ..Limits::default()
            })
        })
        .collect();
    let mut samples: Vec<Samples> = ISOLATIONS.iter().map(|_| Samples::default()).collect();
    let (turn_rounds, turn_execs) = (rounds.div_ceil(TURNS), execs.div_ceil(TURNS));
    for _ in 0..TURNS {
        for (hull, to) in hulls.iter().zip(samples.iter_mut()) {
            measure(hull, turn_rounds, turn_execs, to)?;
        }
    }
    let mut hulls = hulls.into_iter();
    let hull = hulls.next().context("the default hull")?;
    drop(hulls);
    let rows: Vec<Row> = samples
        .into_iter()
        .zip(&ISOLATIONS)
        .flat_map(|(s, isolation)| s.rows(&isolation.labels))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let rss = proc_status_kib(hull.hulld_pid(), "VmRSS").unwrap_or(f64::NAN) / 1024.0;
    let rootfs = hull_tests::image_dir().join("busybox/rootfs");
    let runc = bench_runc(&rootfs, rounds)?;
    let install = bench_seccomp_install(rounds * 4)?;

    let all: Vec<&Row> = rows.iter().chain(runc.iter()).chain([&install]).collect();
    print_table(&all);
    print_single("hulld idle RSS", rss, "MiB", "<= 20 MiB");
    let [both, seccomp_only, neither] = &ISOLATIONS;
    print_cost("user namespace", &rows, &both.labels, &seccomp_only.labels);
    print_cost("seccomp", &rows, &seccomp_only.labels, &neither.labels);
    print_cost(
        "seccomp + user namespace",
        &rows,
        &both.labels,
        &neither.labels,
    );
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

/// The seccomp(SECCOMP_SET_MODE_FILTER) of the inner's filter alone, each
/// on a thread of its own (filters stack on a thread): the kernel's checks,
/// its JIT and the cache of calls always allowed it builds by running the
/// filter for every call number, part of what the filter adds to the start.
fn bench_seccomp_install(rounds: usize) -> Result<Row> {
    let options = hull_inner::SeccompOptions::default();
    let filter = hull_inner::seccomp::compile(options, hull_inner::seccomp::native_arch()?)?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let filter = filter.clone();
        let took = std::thread::spawn(move || {
            // SAFETY: a plain prctl on this thread, which ends after the
            // install: no_new_privs lets it install without CAP_SYS_ADMIN's
            // say, and the filter goes with the thread.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let started = Instant::now();
            filter.install().map(|()| ms(started.elapsed()))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the install thread panicked"))??;
        samples.push(took);
    }
    let name = "seccomp: installing the inner's filter alone";
    Ok(Row::new(name, samples, "ms").target("<= 0.5 ms"))
}

/// What `what` adds, p50 with it minus p50 without, row by row.
fn print_cost(what: &str, rows: &[Row], with: &Labels, without: &Labels) {
    let p50 = |name: &str| crate::report::p50_of(rows, name);
    println!();
    for (row, on, off, target) in [
        ("inner start", with.start, without.start, "<= 1 ms"),
        ("cold start", with.cold, without.cold, "<= 1 ms"),
        ("bounce", with.bounce, without.bounce, ""),
        (
            "exec, open connection",
            with.exec_conn,
            without.exec_conn,
            "nothing measurable",
        ),
    ] {
        let (a, b) = (p50(on), p50(off));
        println!(
            "{what} cost, {row} (p50 on - off): {:+.3} ms  ({a:.3} vs {b:.3} ms; target {target})",
            a - b
        );
    }
}

fn exited_zero(out: &hull_outer::client::ExecOutput) -> Result<()> {
    if !matches!(
        out.end,
        hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0))
    ) {
        bail!("true failed: {:?}", out.end);
    }
    Ok(())
}

/// One hull's samples, row by row.
#[derive(Default)]
struct Samples {
    start: Vec<f64>,
    bounce: Vec<f64>,
    cold: Vec<f64>,
    exec_conn: Vec<f64>,
    exec_new: Vec<f64>,
}

impl Samples {
    fn rows(self, labels: &Labels) -> Vec<Row> {
        vec![
            Row::new(labels.cold, self.cold, "ms").target("<= runc run"),
            Row::new(labels.start, self.start, "ms").target("<= 15 ms"),
            Row::new(labels.bounce, self.bounce, "ms").target("<= 30 ms"),
            Row::new(labels.exec_conn, self.exec_conn, "ms").target("<= 3 ms"),
            Row::new(labels.exec_new, self.exec_new, "ms"),
        ]
    }
}

/// Adds `rounds` bounces and cold starts and `execs` of each exec to `to`.
fn measure(hull: &TestHull, rounds: usize, execs: usize, to: &mut Samples) -> Result<()> {
    block_on(async {
        let mut c = hull.client().await;
        for _ in 0..3 {
            c.bounce(0).await?;
        }
        for _ in 0..rounds {
            let t = Instant::now();
            let report = c.bounce(0).await?;
            to.bounce.push(ms(t.elapsed()));
            to.start.push(report.start_ms);
        }
        // What a client waits for before a fresh inner has run something,
        // the way `runc run` is timed below.
        for _ in 0..rounds {
            let t = Instant::now();
            c.bounce(0).await?;
            let out = c.exec_collect(spec(&["true"]), b"").await?;
            to.cold.push(ms(t.elapsed()));
            exited_zero(&out)?;
        }
        for _ in 0..10 {
            c.exec_collect(spec(&["true"]), b"").await?;
        }
        for _ in 0..execs {
            let t = Instant::now();
            let out = c.exec_collect(spec(&["true"]), b"").await?;
            to.exec_conn.push(ms(t.elapsed()));
            exited_zero(&out)?;
        }
        for _ in 0..execs {
            let t = Instant::now();
            let mut fresh = hull_outer::client::Client::connect(&hull.socket).await?;
            fresh.exec_collect(spec(&["true"]), b"").await?;
            to.exec_new.push(ms(t.elapsed()));
        }
        Ok::<(), anyhow::Error>(())
    })
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
