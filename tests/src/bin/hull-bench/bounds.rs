//! hulld under attack: one row per attack, each holding hulld to its two
//! targets, peak RSS ≤ 64 MiB and `status` p99 ≤ 50 ms, with the same
//! figures for an idle hulld (the anchor) in the same run.
//!
//! Method. Every row gets a hulld of its own (`TestHull::start`, release
//! binaries, default limits), so no attack inherits what another left:
//! sessions, registered services, a grown allocator. The API's tokens, its
//! address and the sandbox's name are made before the watch begins. Then
//! a `hull_tests::siege::Siege` watches that hulld, the same watcher the
//! escape tests hold each attack to: every 50 ms it connects to the
//! control socket, asks `status` and times the round trip (connection
//! included), and reads hulld's VmRSS between calls; a call that fails or
//! takes over 1 s is counted as failed. While it watches, the attack runs
//! once, through the attack functions of `hull_tests::attacks` (the
//! escape tests' own, not a copy), and what it holds open (connections,
//! WebSockets, listeners) stays open for `--rounds` more periods (100 at
//! least: about 5 s), so the watch sees the attack and what it left, and
//! a row has enough samples for a p99. The anchor row is the same watch over
//! the same span on a hulld that nothing attacks.
//!
//! A row gives the status round trip's p50 and p99 (the maximum under
//! 100 samples), the calls that failed, hulld's peak RSS as sampled every
//! 50 ms (a spike shorter than that can pass unseen), and whether hulld
//! lived through it; under the table, what each attack got back from
//! hulld, so a row whose attack was refused early says so.

use std::any::Any;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use hull_proto::{DaemonMsg, ErrorKind, RestartPolicy};
use hull_tests::attacks::{api, requests, sessions};
use hull_tests::siege::{Siege, SiegeReport, MAX_RSS_KIB};
use hull_tests::{connect_nonblocking, hold_half_sent_frames, listen_in_inner, TestHull};
use tokio::runtime::Runtime;

use crate::report::{print_siege_rows, SiegeRow};

/// The `status` p99 each row is held to.
const STATUS_P99_TARGET: Duration = Duration::from_millis(50);

/// How often the siege asks `status` (`hull_tests::siege`'s period).
const SIEGE_PERIOD: Duration = Duration::from_millis(50);

/// What an attack left behind: what it holds open until its row's watch
/// ends, and in a few words what hulld answered it.
struct Mounted {
    held: Box<dyn Any>,
    outcome: String,
}

impl Mounted {
    fn new(held: impl Any, outcome: String) -> Mounted {
        Mounted {
            held: Box::new(held),
            outcome,
        }
    }
}

/// One attack's row.
struct Attack {
    name: &'static str,
    mount: fn(&Target) -> Result<Mounted>,
}

/// The hulld an attack is mounted on, and what it needs ready before the
/// watch begins.
struct Target<'a> {
    hull: &'a TestHull,
    rt: &'a Runtime,
    api: SocketAddr,
    read_token: String,
    exec_token: String,
    sprite: String,
}

/// Every attack, in the order they run. Each is one of
/// `hull_tests::attacks`' functions, with the counts its escape test uses
/// (the API's floods at the default caps).
const ATTACKS: &[Attack] = &[
    Attack {
        name: "inner: 2,000 conns, 100 half-sent frames, 1,000 ports",
        mount: inner_flood,
    },
    Attack {
        name: "tunnel: 32 x 4 MiB empty-argv execs, read token",
        mount: tunnel_execs_read,
    },
    Attack {
        name: "tunnel: 8 x 4 MiB empty-argv execs, exec token",
        mount: tunnel_execs_exec,
    },
    Attack {
        name: "inner: 40 definitions of 21,500 empty vars",
        mount: empty_variable_definitions,
    },
    Attack {
        name: "inner: 256 definitions of 200 x 48 B vars",
        mount: legitimate_definitions,
    },
    Attack {
        name: "api: 140 detached tty sessions of 1.1 MB",
        mount: detached_terminal_sessions,
    },
    Attack {
        name: "api: 120 exec WebSockets never read",
        mount: never_reading_execs,
    },
    Attack {
        name: "api: 300 idle /hull tunnels, read token",
        mount: idle_tunnels,
    },
    Attack {
        name: "api: 140 fs/watch of /tmp, read token",
        mount: watches,
    },
    Attack {
        name: "api: 256 anonymous clients sending nothing, 5 s",
        mount: silent_clients,
    },
    Attack {
        name: "api: 256 anonymous clients trickling headers, 5 s",
        mount: slow_clients,
    },
];

const IDLE: &str = "anchor: hulld idle";

pub fn run(rounds: usize) -> Result<()> {
    // A few periods over the samples wanted: a slow status call takes
    // its period's place.
    let hold = SIEGE_PERIOD * (u32::try_from(rounds.max(100))? + 10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("the bench's runtime")?;
    let mut rows = Vec::new();
    let mut outcomes = Vec::new();

    eprintln!("anchor: watching an idle hulld for {hold:?}...");
    {
        let hull = TestHull::start();
        let siege = Siege::begin(&hull);
        std::thread::sleep(hold);
        rows.push(row(IDLE, siege.end()));
    }

    for attack in ATTACKS {
        eprintln!("{}...", attack.name);
        let hull = TestHull::start();
        let api = rt.block_on(hull.api_addr());
        let read_token = hull.api_token("read");
        let exec_token = hull.api_token("exec");
        let sprite = requests::sprite_name(api, &read_token);
        let target = Target {
            hull: &hull,
            rt: &rt,
            api,
            read_token,
            exec_token,
            sprite,
        };
        let siege = Siege::begin(&hull);
        let mounted = (attack.mount)(&target);
        std::thread::sleep(hold);
        let report = siege.end();
        let mounted = mounted.with_context(|| attack.name)?;
        outcomes.push((attack.name, mounted.outcome));
        // Closed inside the runtime that opened them, before the hulld
        // they are connected to goes.
        rt.block_on(async move { drop(mounted.held) });
        rows.push(row(attack.name, report));
    }

    print_siege_rows(&rows, STATUS_P99_TARGET, MAX_RSS_KIB);
    println!();
    println!("what each attack got back:");
    for (name, outcome) in outcomes {
        println!("  {name}: {outcome}");
    }
    Ok(())
}

fn row(name: &'static str, report: SiegeReport) -> SiegeRow {
    SiegeRow {
        name,
        status_ms: report
            .status
            .iter()
            .map(|d| crate::report::ms(*d))
            .collect(),
        failed: report.failed.len(),
        peak_rss_kib: report.peak_rss_kib,
        survived: report.survived,
    }
}

/// The inner floods its service socket and listens on many ports.
fn inner_flood(t: &Target) -> Result<Mounted> {
    let socket = requests::inner_socket(t.hull);
    let inner_pid = t
        .hull
        .wait_running(Duration::from_secs(10))
        .inner_pid
        .context("the inner's pid")?;
    let ports = listen_in_inner(inner_pid, 30000..31000);
    let frames = hold_half_sent_frames(&socket, 100);
    let conns: Vec<_> = (0..2000)
        .filter_map(|_| connect_nonblocking(&socket))
        .collect();
    let outcome = format!(
        "{} ports listened on, {} half-sent frames and {} more connections held",
        ports.len(),
        frames.len(),
        conns.len()
    );
    Ok(Mounted::new((ports, frames, conns), outcome))
}

/// What a tunnel flood got back, counted by kind.
fn answers(answers: &[Option<DaemonMsg>]) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for answer in answers {
        let kind = match answer {
            Some(DaemonMsg::Error(e)) => format!("{:?}", e.kind),
            Some(other) => format!("answered {}", message_name(other)),
            None => "closed without an answer".to_string(),
        };
        *counts.entry(kind).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn message_name(msg: &DaemonMsg) -> String {
    format!("{msg:?}")
        .split(['(', ' ', '{'])
        .next()
        .unwrap_or_default()
        .to_string()
}

fn tunnel_execs(t: &Target, token: &str, conns: usize) -> Result<Mounted> {
    let payload = requests::empty_argv_exec(4_190_000);
    let got =
        t.rt.block_on(requests::tunnel_flood(t.api, token, conns, &payload));
    Ok(Mounted::new((), answers(&got)))
}

fn tunnel_execs_read(t: &Target) -> Result<Mounted> {
    tunnel_execs(t, &t.read_token, 32)
}

fn tunnel_execs_exec(t: &Target) -> Result<Mounted> {
    tunnel_execs(t, &t.exec_token, 8)
}

/// How the inner's registrations were answered, counted.
fn registrations(answers: &[Result<(), (ErrorKind, String)>]) -> String {
    let ok = answers.iter().filter(|a| a.is_ok()).count();
    let mut refused = std::collections::BTreeMap::<String, usize>::new();
    for (kind, _) in answers.iter().filter_map(|a| a.as_ref().err()) {
        *refused.entry(format!("{kind:?}")).or_default() += 1;
    }
    let mut parts = vec![format!("{ok} registered")];
    parts.extend(refused.into_iter().map(|(k, n)| format!("{n} refused {k}")));
    parts.join(", ")
}

fn empty_variable_definitions(t: &Target) -> Result<Mounted> {
    let socket = requests::inner_socket(t.hull);
    let specs = (0..40)
        .map(|i| {
            let mut spec = requests::service_with_env(&format!("s{i}"), 0, 0);
            spec.env = vec![(String::new(), String::new()); 21_500];
            spec
        })
        .collect();
    let got = t.rt.block_on(requests::register_all(&socket, specs));
    Ok(Mounted::new((), registrations(&got)))
}

fn legitimate_definitions(t: &Target) -> Result<Mounted> {
    let socket = requests::inner_socket(t.hull);
    let specs = (0..256)
        .map(|i| {
            let mut spec = requests::service_with_env(&format!("svc{i}"), 200, 48);
            spec.cmd = "exit 0".into();
            spec.restart = RestartPolicy::Never;
            spec
        })
        .collect();
    let got = t.rt.block_on(requests::register_all(&socket, specs));
    Ok(Mounted::new((), registrations(&got)))
}

/// `daemon.max_sessions`' default and a dozen more.
const SESSIONS: usize = 128 + 12;

fn detached_terminal_sessions(t: &Target) -> Result<Mounted> {
    let got = t.rt.block_on(sessions::detached_terminal_sessions(
        t.api,
        &t.exec_token,
        &t.sprite,
        SESSIONS,
        1_100_000,
    ));
    let mut outcome = format!("{} started and left", got.started);
    if let Some(first) = got.refused.first() {
        outcome += &format!(
            ", {} refused ({}: {})",
            got.refused.len(),
            first.status,
            first.message
        );
    }
    Ok(Mounted::new((), outcome))
}

fn never_reading_execs(t: &Target) -> Result<Mounted> {
    let held =
        t.rt.block_on(sessions::never_reading_execs(
            t.api,
            &t.exec_token,
            &t.sprite,
            120,
        ))
        .context("open the exec WebSockets")?;
    let outcome = format!("{} exec WebSockets running yes, never read", held.len());
    Ok(Mounted::new(held, outcome))
}

/// How many WebSockets opened, and how the others were turned away.
fn held_outcome(held: &api::Held) -> String {
    let mut outcome = format!("{} open", held.open.len());
    if let Some((status, body)) = held.refused.first() {
        let code = body.split('"').nth(3).unwrap_or("");
        outcome += &format!(", {} refused ({status} {code})", held.refused.len());
    }
    if !held.closed.is_empty() {
        outcome += &format!(", {} closed unanswered", held.closed.len());
    }
    outcome
}

fn idle_tunnels(t: &Target) -> Result<Mounted> {
    let path = format!("/v1/sprites/{}/hull", t.sprite);
    let held =
        t.rt.block_on(api::hold_websockets(t.api, &path, &t.read_token, 300));
    let outcome = held_outcome(&held);
    Ok(Mounted::new(held, outcome))
}

fn watches(t: &Target) -> Result<Mounted> {
    let path = format!("/v1/sprites/{}/fs/watch?path=/tmp", t.sprite);
    let held =
        t.rt.block_on(api::hold_websockets(t.api, &path, &t.read_token, 140));
    let outcome = format!(
        "{}; hulld holds {} inotify instance(s)",
        held_outcome(&held),
        api::inotify_instances(t.hull.hulld_pid())
    );
    Ok(Mounted::new(held, outcome))
}

fn anonymous(t: &Target, kind: api::Anonymous) -> Result<Mounted> {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let got =
        t.rt.block_on(api::anonymous_flood(t.api, 256, &[], kind, until, 50_000));
    let outcome = format!(
        "{} connections, {} closed by hulld, the longest held {:.1} s",
        got.connections,
        got.closed_by_server,
        got.longest.as_secs_f64()
    );
    Ok(Mounted::new((), outcome))
}

fn silent_clients(t: &Target) -> Result<Mounted> {
    anonymous(t, api::Anonymous::Silent)
}

fn slow_clients(t: &Target) -> Result<Mounted> {
    anonymous(t, api::Anonymous::Slow)
}
