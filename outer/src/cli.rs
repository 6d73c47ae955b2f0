//! The `hull` commands. Each is a thin layer over [`crate::client`].

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::SinkExt;
use hull_image::{ImageKind, ImageStore};
use hull_proto::{
    ClientMsg, DaemonMsg, ErrorKind, ExecEnd, ExecSpec, StatusReport, Stream, WinSize,
};
use nix::sys::termios;
use tokio::sync::mpsc;

use crate::client::{self, Client, ClientError};
use crate::config::Config;

/// Options every command shares.
#[derive(Debug, Clone)]
pub struct Global {
    pub config_path: Option<PathBuf>,
    pub config: Config,
    pub json: bool,
}

impl Global {
    pub async fn connect(&self) -> Result<Client> {
        Ok(Client::connect(&self.config.socket).await?)
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_status(g: &Global, s: &StatusReport) -> Result<()> {
    if g.json {
        return print_json(s);
    }
    println!(
        "hulld      pid {} (version {})",
        s.daemon_pid, s.daemon_version
    );
    println!("inner      {}", s.state);
    if let Some(pid) = s.inner_pid {
        println!("inner pid  {pid}");
    }
    if let Some(ms) = s.inner_uptime_ms {
        println!("uptime     {:.1} s", ms as f64 / 1000.0);
    }
    let mem = s
        .limits
        .memory_max_bytes
        .map(|b| format!("{} MiB", b >> 20))
        .unwrap_or_else(|| "none".into());
    let pids = s
        .limits
        .pids_max
        .map(|p| p.to_string())
        .unwrap_or_else(|| "none".into());
    println!("limits     memory {mem}, pids {pids}");
    println!(
        "bounces    {} (unplanned restarts {})",
        s.bounces, s.unplanned_restarts
    );
    match s.last_oom_kill_ms {
        Some(last) => {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(last.max(0) as u64);
            println!(
                "oom kills  {} (the last at {}, {} s ago; hull logs --daemon has each)",
                s.oom_kills,
                httpdate::fmt_http_date(at),
                (hull_logs::now_ms() - last).max(0) / 1000
            )
        }
        None => println!("oom kills  0"),
    }
    println!("image      {}", s.image);
    println!("state      {}", s.state_dir);
    println!("cgroup     {}", s.cgroup);
    println!("volume     {}", s.volume);
    if let Some(head) = &s.head {
        println!("from       checkpoint {head}");
    }
    if let Some(e) = &s.last_error {
        println!("last error {e}");
    }
    Ok(())
}

pub async fn status(g: &Global) -> Result<()> {
    let mut c = g.connect().await?;
    let s = c.status().await?;
    print_status(g, &s)
}

/// Builds (if needed) the configured base image, printing progress.
pub fn build_image(config: &Config, kind: ImageKind, rebuild: bool) -> Result<PathBuf> {
    let store = ImageStore::new(config.image_dir());
    if store.is_built(kind) && !rebuild {
        return Ok(store.rootfs(kind));
    }
    eprintln!(
        "hull: building the {} base image in {}",
        kind.name(),
        config.image_dir().display()
    );
    let start = Instant::now();
    let path = store.ensure(kind, rebuild, &mut |line| eprintln!("  {line}"))?;
    eprintln!(
        "hull: image built in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(path)
}

pub fn image_build(g: &Global, kind: Option<String>, rebuild: bool) -> Result<()> {
    let kind: ImageKind = match kind {
        Some(k) => k.parse()?,
        None => g.config.image_kind()?,
    };
    let path = build_image(&g.config, kind, rebuild)?;
    if g.json {
        print_json(&serde_json::json!({ "kind": kind.name(), "rootfs": path }))?;
    } else {
        println!("{}", path.display());
    }
    Ok(())
}

fn hulld_path() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating the hull binary")?;
    let path = me.with_file_name("hulld");
    if !path.exists() {
        bail!(
            "hulld is not next to {} (expected {})",
            me.display(),
            path.display()
        );
    }
    Ok(path)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts hulld in the background unless it runs, then waits for the inner.
pub async fn up(g: &Global, hulld_args: Vec<String>) -> Result<()> {
    if let Ok(mut c) = Client::connect(&g.config.socket).await {
        let s = c.status().await?;
        if !g.json {
            eprintln!("hull: hulld is already running");
        }
        return print_status(g, &s);
    }
    build_image(&g.config, g.config.image_kind()?, false)?;
    std::fs::create_dir_all(&g.config.state_dir)
        .with_context(|| format!("creating {}", g.config.state_dir.display()))?;
    let log_path = g.config.log_file();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(hulld_path()?);
    cmd.args(&hulld_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid(2) is async-signal-safe; it detaches hulld from our
    // terminal and session so it outlives this command.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting hulld")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "hulld exited ({status}) during start-up; its log {} ends with:\n{}",
                log_path.display(),
                tail(&log_path, 10)
            );
        }
        if let Ok(mut c) = Client::connect(&g.config.socket).await {
            let s = c.status().await?;
            if s.state == hull_proto::InnerState::Running {
                return print_status(g, &s);
            }
            if Instant::now() > deadline {
                bail!(
                    "the inner did not start: {}",
                    s.last_error.unwrap_or_default()
                );
            }
        } else if Instant::now() > deadline {
            bail!(
                "hulld did not answer within 30 s; see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn down(g: &Global, grace: f64) -> Result<()> {
    let mut c = match Client::connect(&g.config.socket).await {
        Ok(c) => c,
        Err(ClientError::Connect { .. }) => {
            if !g.json {
                eprintln!("hull: hulld is not running");
            } else {
                print_json(&serde_json::json!({ "stopped": false, "running": false }))?;
            }
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let pid = c.status().await?.daemon_pid;
    c.shutdown((grace * 1000.0) as u64).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) {
        if Instant::now() > deadline {
            bail!("hulld (pid {pid}) did not exit within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if g.json {
        print_json(&serde_json::json!({ "stopped": true, "daemon_pid": pid }))?;
    } else {
        eprintln!("hull: stopped hulld (pid {pid}) and the inner");
    }
    Ok(())
}

/// True while `pid` runs; a zombie (exited, not yet reaped by whoever
/// adopted it) counts as gone.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

pub async fn bounce(g: &Global, grace: f64) -> Result<()> {
    let mut c = g.connect().await?;
    let r = c.bounce((grace * 1000.0) as u64).await?;
    if g.json {
        return print_json(&r);
    }
    println!(
        "bounced in {:.1} ms (stop {:.1} ms, start {:.1} ms); inner pid {}, bounce #{}",
        r.total_ms, r.stop_ms, r.start_ms, r.inner_pid, r.bounces
    );
    Ok(())
}

/// Puts the local terminal in raw mode for the session's lifetime.
struct RawTerminal {
    saved: termios::Termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(
            std::io::stdin().as_fd(),
            termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

fn local_winsize() -> WinSize {
    // SAFETY: winsize is plain data and TIOCGWINSZ fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes into `ws`, a valid winsize.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 && ws.ws_col > 0 {
        WinSize {
            rows: ws.ws_row,
            cols: ws.ws_col,
        }
    } else {
        WinSize { rows: 24, cols: 80 }
    }
}

/// Exit code hull uses when hull itself (not the command) failed.
pub const HULL_FAILED: i32 = 125;
/// Exit code when the inner stopped underneath the session.
pub const INNER_STOPPED: i32 = 255;

pub struct ExecOptions {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    pub interactive: bool,
}

/// Runs one command in the inner, wired to this terminal. Returns the exit
/// code hull should exit with.
pub async fn exec(g: &Global, opts: ExecOptions) -> Result<i32> {
    let mut c = g.connect().await?;
    let tty = opts.tty.then(local_winsize);
    let spec = ExecSpec {
        argv: opts.argv,
        env: opts.env,
        cwd: opts.cwd,
        user: opts.user,
        tty,
    };
    match c.exec_start(spec).await {
        Ok(_pid) => {}
        Err(ClientError::Daemon(report)) => {
            eprintln!("hull: {}", report.message);
            return Ok(match report.kind {
                ErrorKind::Spawn(kind) => kind.shell_code(),
                _ => HULL_FAILED,
            });
        }
        Err(e) => return Err(e.into()),
    }
    let Client {
        mut reader,
        mut writer,
        ..
    } = c;
    let (tx, mut rx) = mpsc::channel::<ClientMsg>(16);
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if writer.send(msg).await.is_err() {
                break;
            }
        }
    });
    let _raw = if opts.tty { RawTerminal::enter() } else { None };
    if opts.interactive {
        let tx = tx.clone();
        let tty = opts.tty;
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        if !tty {
                            let _ = tx.blocking_send(ClientMsg::StdinEof);
                        }
                        return;
                    }
                    Ok(n) => {
                        if tx
                            .blocking_send(ClientMsg::Stdin(buf[..n].to_vec()))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    } else {
        tx.send(ClientMsg::StdinEof).await?;
    }
    spawn_signal_forwarding(tx.clone(), opts.tty)?;
    // Blocking writes: the terminal is the session's only sink, and a slow
    // terminal should slow the session down, not buffer without bound.
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        match client::next(&mut reader).await {
            Ok(DaemonMsg::Output { stream, data }) => match stream {
                Stream::Stdout => {
                    stdout.write_all(&data)?;
                    stdout.flush()?;
                }
                Stream::Stderr => {
                    stderr.write_all(&data)?;
                    stderr.flush()?;
                }
            },
            Ok(DaemonMsg::ExecEnded(ExecEnd::Exited(status))) => return Ok(status.shell_code()),
            Ok(DaemonMsg::ExecEnded(ExecEnd::InnerStopped { reason })) => {
                drop(_raw);
                eprintln!("\r\nhull: session ended: {reason}");
                return Ok(INNER_STOPPED);
            }
            Ok(other) => bail!("unexpected message from hulld: {other:?}"),
            Err(ClientError::Closed) => {
                drop(_raw);
                eprintln!("\r\nhull: hulld closed the connection");
                return Ok(HULL_FAILED);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// With a PTY, Ctrl-C travels as a byte and only window changes need
/// forwarding; with pipes, SIGINT/SIGTERM/SIGHUP go to the process.
fn spawn_signal_forwarding(tx: mpsc::Sender<ClientMsg>, tty: bool) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    if tty {
        let mut winch = signal(SignalKind::window_change())?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if tx.send(ClientMsg::Resize(local_winsize())).await.is_err() {
                    return;
                }
            }
        });
        return Ok(());
    }
    for (kind, number) in [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
    ] {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(ClientMsg::Signal(number)).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// The login shell of `hull console`: bash when the image has it.
pub fn console_argv() -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        "if [ -x /bin/bash ]; then exec /bin/bash -l; else exec /bin/sh -l; fi".into(),
    ]
}

pub fn flush_stdout() {
    let _ = std::io::stdout().flush();
}

/// Formats an error and its causes, skipping a cause whose text the message
/// above it already includes (thiserror messages often embed their source).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// `hull ports`: a table of the inner's listening ports.
pub async fn ports(g: &Global) -> Result<()> {
    let mut c = g.connect().await?;
    let r = c.ports().await?;
    if g.json {
        return print_json(&r);
    }
    if r.ports.is_empty() {
        println!(
            "nothing listens on a TCP port in the inner (network: {})",
            r.network
        );
        return Ok(());
    }
    println!(
        "{:<6} {:<16} {:<8} {:<16} {:<22} HTTP",
        "PORT", "ADDRESS", "PID", "COMMAND", "OUTSIDE"
    );
    for p in &r.ports {
        let outside = match (p.exposure.as_str(), &p.outer) {
            ("forwarded", Some(outer)) => outer.clone(),
            ("taken", Some(outer)) => format!("{outer} taken"),
            (other, _) => other.to_string(),
        };
        let http = match &p.http_url {
            Some(url) if p.private => format!("{url} (private)"),
            Some(url) => url.clone(),
            None => "-".into(),
        };
        println!(
            "{:<6} {:<16} {:<8} {:<16} {:<22} {}",
            p.port,
            p.address,
            p.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            p.command.as_deref().unwrap_or("-"),
            outside,
            http
        );
    }
    for p in r.ports.iter().filter(|p| p.exposure == "taken") {
        println!(
            "port {}: the outer address is taken ({}); reach it through HTTP ingress",
            p.port,
            p.detail.as_deref().unwrap_or("in use")
        );
    }
    Ok(())
}

/// `hull ingress`: where HTTP ingress listens and the private-URL token.
pub async fn ingress(g: &Global) -> Result<()> {
    let mut c = g.connect().await?;
    let r = c.ingress().await?;
    if g.json {
        return print_json(&r);
    }
    match &r.http {
        Some(addr) => {
            println!("HTTP ingress   http://{addr}/ (Host PORT.<anything> picks the inner port)")
        }
        None => println!("HTTP ingress   off"),
    }
    let private = if r.private_all {
        "every port".to_string()
    } else if r.private_ports.is_empty() {
        "none".to_string()
    } else {
        r.private_ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("private        {private}");
    println!(
        "token          {}  (send: Authorization: Bearer TOKEN)",
        r.token
    );
    if let (Some(inner), Some(gw)) = (&r.inner_address, &r.gateway) {
        println!("inner address  {inner} (gateway {gw})");
    }
    Ok(())
}

pub async fn checkpoint_create(g: &Global, comment: Option<String>) -> Result<()> {
    let mut c = g.connect().await?;
    let r = c.checkpoint_create(comment).await?;
    if g.json {
        return print_json(&r);
    }
    println!(
        "checkpoint {} created in {:.1} ms (inner frozen {:.1} ms)",
        r.checkpoint.id, r.total_ms, r.frozen_ms
    );
    Ok(())
}

pub async fn checkpoint_restore(g: &Global, id: &str) -> Result<()> {
    let mut c = g.connect().await?;
    let r = c.checkpoint_restore(id).await?;
    if g.json {
        return print_json(&r);
    }
    println!(
        "restored {} in {:.1} ms (stop {:.1} ms, start {:.1} ms); undo with: hull checkpoint restore {}",
        r.restored, r.total_ms, r.stop_ms, r.start_ms, r.undo
    );
    if !r.services_removed.is_empty() {
        println!(
            "services removed (not in {}): {}",
            r.restored,
            r.services_removed.join(", ")
        );
    }
    if !r.services_added.is_empty() {
        println!(
            "services brought back (recorded in {}): {}",
            r.restored,
            r.services_added.join(", ")
        );
    }
    Ok(())
}

pub async fn checkpoint_delete(g: &Global, id: &str) -> Result<()> {
    let mut c = g.connect().await?;
    c.checkpoint_delete(id).await?;
    if g.json {
        return print_json(&serde_json::json!({ "deleted": id }));
    }
    println!("deleted checkpoint {id}");
    Ok(())
}

fn age(now_ms: i64, then_ms: i64) -> String {
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// Prints checkpoints as a tree: each under its parent, in creation order.
pub async fn checkpoint_list(g: &Global) -> Result<()> {
    let mut c = g.connect().await?;
    let listing = c.checkpoint_list().await?;
    if g.json {
        return print_json(&listing);
    }
    if listing.checkpoints.is_empty() {
        println!("no checkpoints yet; take one with: hull checkpoint create -m COMMENT");
        return Ok(());
    }
    let ids: Vec<&str> = listing.checkpoints.iter().map(|c| c.id.as_str()).collect();
    fn walk(
        listing: &hull_proto::CheckpointListing,
        ids: &[&str],
        parent: Option<&str>,
        depth: usize,
    ) {
        for cp in listing.checkpoints.iter().filter(|c| {
            let p = c.parent.as_deref().filter(|p| ids.contains(p));
            p == parent
        }) {
            let marker = if listing.head.as_deref() == Some(cp.id.as_str()) {
                "*"
            } else {
                " "
            };
            let orphan = match (&cp.parent, depth) {
                (Some(p), 0) => format!(" (from deleted {p})"),
                _ => String::new(),
            };
            println!(
                "{marker} {:indent$}{:<6} {:>8}  {}{}{}",
                "",
                cp.id,
                age(listing.now_ms, cp.created_ms),
                if cp.auto { "[auto] " } else { "" },
                cp.comment.as_deref().unwrap_or(""),
                orphan,
                indent = depth * 2
            );
            walk(listing, ids, Some(&cp.id), depth + 1);
        }
    }
    walk(&listing, &ids, None, 0);
    if let Some(head) = &listing.head {
        println!("(* the current state came from {head})");
    }
    Ok(())
}

fn print_services(g: &Global, list: &[hull_proto::ServiceStatus], detail: bool) -> Result<()> {
    if g.json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("no services; register one with: hull services add NAME --cmd \"...\"");
        return Ok(());
    }
    if !detail {
        println!(
            "{:<16} {:<9} {:>7} {:>9} {:>8} {:>6}  last exit",
            "NAME", "STATE", "PID", "UPTIME", "RESTARTS", "STARTS"
        );
    }
    for s in list {
        let pid = s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let uptime = s
            .uptime_ms
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let last = s
            .last_exit
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into());
        if !detail {
            // What a waiting service waits for goes last: it is long.
            let waiting = s.reason.as_deref().filter(|_| s.state == "waiting");
            println!(
                "{:<16} {:<9} {:>7} {:>9} {:>8} {:>6}  {last}{}",
                s.spec.name,
                s.state,
                pid,
                uptime,
                s.restarts,
                s.inner_starts,
                waiting.map(|w| format!("  ({w})")).unwrap_or_default()
            );
            continue;
        }
        println!("name       {}", s.spec.name);
        println!("command    {}", s.spec.cmd);
        let waiting_for_port = s.state == "running" && !s.ready;
        println!(
            "state      {}{}",
            s.state,
            if waiting_for_port {
                " (port not listening yet)"
            } else {
                ""
            }
        );
        println!(
            "pid        {pid}   uptime {uptime}   restarts {} (after exits)   starts {} (on a new inner)",
            s.restarts, s.inner_starts
        );
        println!("restart    {}", s.spec.restart.name());
        if !s.spec.after.is_empty() {
            println!("after      {}", s.spec.after.join(", "));
        }
        if let Some(port) = s.spec.http_port {
            println!("http port  {port}");
        }
        println!("last exit  {last}");
        if let Some(reason) = &s.reason {
            println!("reason     {reason}");
        }
        if !s.last_lines.is_empty() {
            println!("last output:");
            for line in &s.last_lines {
                println!("  | {line}");
            }
        }
    }
    Ok(())
}

pub async fn services(g: &Global, request: hull_proto::ServiceRequest) -> Result<()> {
    let detail = matches!(request, hull_proto::ServiceRequest::Show(_));
    let mut c = g.connect().await?;
    let list = c.services(request).await?;
    print_services(g, &list, detail)
}

/// `hull logs`: stdout lines to stdout, stderr lines to stderr, or JSON
/// records; with `follow`, until interrupted (across bounces and restores).
pub async fn logs(
    g: &Global,
    source: String,
    follow: bool,
    tail: Option<u64>,
    stream: Option<Stream>,
    since: Option<Duration>,
) -> Result<()> {
    let mut c = g.connect().await?;
    let since_ms = since.map(|d| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.saturating_sub(d).as_millis() as i64
    });
    c.writer
        .send(ClientMsg::Logs {
            source,
            follow,
            tail,
            stream,
            since_ms,
        })
        .await?;
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    loop {
        match client::next(&mut c.reader).await? {
            DaemonMsg::LogRecords(records) => {
                for r in records {
                    if let Some(marker) = r.marker {
                        // Something that happened to the service, not its output.
                        if g.json {
                            let record = serde_json::json!({
                                "type": "marker",
                                "ts_ms": r.ts_ms,
                                "event": marker.name(),
                                "text": r.line,
                            });
                            writeln!(out, "{record}")?;
                        } else {
                            writeln!(out, "-- {} --", r.line)?;
                        }
                    } else if g.json {
                        writeln!(out, "{}", serde_json::to_string(&r)?)?;
                    } else if r.stream == Stream::Stderr {
                        writeln!(err, "{}", r.line)?;
                    } else {
                        writeln!(out, "{}", r.line)?;
                    }
                }
                out.flush()?;
            }
            DaemonMsg::LogsEnd => return Ok(()),
            other => bail!("unexpected message from hulld: {other:?}"),
        }
    }
}

/// "90s", "10m", "2h", "1d" (a bare number is seconds).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 10m, 2h or 1d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration like 30s, 10m, 2h or 1d"
            ))
        }
    };
    Ok(Duration::from_secs(n * secs))
}
