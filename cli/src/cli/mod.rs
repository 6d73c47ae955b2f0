//! The `hull` commands. Each is a thin layer over [`crate::client`].

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::SinkExt;
use hull_image::{ImageKind, ImageStore};
use hull_proto::{ClientMsg, DaemonMsg, StatusReport, Stream};

use crate::client::{self, Client, ClientError};
use crate::config::ClientConfig;

/// `println!` that returns a closed stdout as an error instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))?
    };
}

/// `eprintln!` that never panics: with stderr closed (`hull ... 2>&1 |
/// head -1`) a diagnostic is lost, not turned into a crash.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod cp;
mod exec;
mod push;
mod report;
pub mod vm;

pub use cp::cp;
pub use exec::{exec, AttachTo, ExecOptions};
pub use push::checkpoint_push;
use report::stdout_error;
pub use report::*;

/// Options every command shares.
#[derive(Debug, Clone)]
pub struct Global {
    pub config_path: Option<PathBuf>,
    pub config: ClientConfig,
    pub json: bool,
    /// Set by --url: hulld is reached through its HTTP API.
    pub remote: Option<client::Remote>,
}

impl Global {
    pub async fn connect(&self) -> Result<Client> {
        match &self.remote {
            Some(remote) => Ok(Client::connect_remote(remote).await?),
            None => Ok(Client::connect(&self.config.socket).await?),
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_status(g: &Global, s: &StatusReport) -> Result<()> {
    if g.json {
        return print_json(s);
    }
    outln!(
        "hulld      pid {} (version {})",
        s.daemon_pid,
        s.daemon_version
    );
    outln!("inner      {}", s.state);
    if let Some(pid) = s.inner_pid {
        outln!("inner pid  {pid}");
    }
    if let Some(ms) = s.inner_uptime_ms {
        outln!("uptime     {:.1} s", ms as f64 / 1000.0);
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
    outln!("limits     memory {mem}, pids {pids}");
    outln!(
        "bounces    {} (unplanned restarts {})",
        s.bounces,
        s.unplanned_restarts
    );
    match s.last_oom_kill_ms {
        Some(last) => {
            let at =
                std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(last).unwrap_or(0));
            outln!(
                "oom kills  {} (the last at {}, {} s ago; hull logs --daemon has each)",
                s.oom_kills,
                httpdate::fmt_http_date(at),
                (hull_proto::now_ms() - last).max(0) / 1000
            )
        }
        None => outln!("oom kills  0"),
    }
    match &s.user_namespace {
        Some(m) => outln!(
            "user ns    inner ids 0-{} are the VM's {}-{}",
            m.count - 1,
            m.base,
            m.base + (m.count - 1)
        ),
        None => outln!("user ns    none: the inner's root is the VM's root"),
    }
    outln!("image      {}", s.image);
    outln!("state      {}", s.state_dir);
    outln!("cgroup     {}", s.cgroup);
    outln!("volume     {}", s.volume);
    match (s.layer_used, s.layer_quota) {
        (Some(used), Some(quota)) => outln!(
            "layer      {} MiB used of a {} MiB quota ({:.0}%)",
            used >> 20,
            quota >> 20,
            used as f64 * 100.0 / quota.max(1) as f64
        ),
        (Some(used), None) => outln!("layer      {} MiB used, no quota", used >> 20),
        _ => outln!("layer      no quota"),
    }
    if let Some(remote) = &s.remote {
        match &remote.pushing {
            Some(p) => outln!(
                "remote     pushing {}: {} read, {} chunks uploaded, {} already there",
                p.checkpoint,
                cp::human(p.bytes_read),
                p.chunks_uploaded,
                p.chunks_present
            ),
            None => outln!(
                "remote     {} pushed since start, none under way",
                remote.pushed
            ),
        }
        for failed in &remote.failed {
            outln!(
                "           push of {} failed, retrying: {}",
                failed.checkpoint,
                failed.error.as_deref().unwrap_or("")
            );
        }
    }
    if let Some(head) = &s.head {
        outln!("from       checkpoint {head}");
    }
    if let Some(e) = &s.last_error {
        outln!("last error {e}");
    }
    Ok(())
}

pub async fn status(g: &Global) -> Result<()> {
    let mut c = g.connect().await?;
    let s = c.status().await?;
    print_status(g, &s)
}

/// Builds (if needed) the configured base image, printing progress.
pub fn build_image(config: &ClientConfig, kind: ImageKind, rebuild: bool) -> Result<PathBuf> {
    let store = ImageStore::new(config.image_dir());
    if store.is_built(kind) && !rebuild {
        return Ok(store.rootfs(kind));
    }
    errln!(
        "hull: building the {} base image in {}",
        kind.name(),
        config.image_dir().display()
    );
    let start = Instant::now();
    let path = store.ensure(kind, rebuild, &mut |line| errln!("  {line}"))?;
    errln!(
        "hull: image built in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(path)
}

pub fn image_build(g: &Global, kind: Option<String>, rebuild: bool) -> Result<()> {
    let kind: ImageKind = match kind {
        Some(k) => k.parse()?,
        None => g.config.image.parse()?,
    };
    let path = build_image(&g.config, kind, rebuild)?;
    if g.json {
        print_json(&serde_json::json!({ "kind": kind.name(), "rootfs": path }))?;
    } else {
        outln!("{}", path.display());
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
    match Client::connect(&g.config.socket).await {
        Ok(mut c) => {
            let s = c.status().await?;
            if !g.json {
                outln!("hulld is already running");
            }
            return print_status(g, &s);
        }
        Err(e @ ClientError::NeedsRoot { .. }) => return Err(e.into()),
        Err(_) => {}
    }
    // hulld needs root; building an image first would only fail later.
    if !nix::unistd::geteuid().is_root() {
        bail!(CliError::NeedsRoot);
    }
    build_image(&g.config, g.config.image.parse()?, false)?;
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
        Err(ClientError::NotRunning { .. }) => {
            if !g.json {
                outln!("hulld is not running");
            } else {
                print_json(&serde_json::json!({ "stopped": false, "running": false }))?;
            }
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let pid = c.status().await?.daemon_pid;
    c.shutdown(seconds_to_millis(grace)).await?;
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
        outln!("stopped hulld (pid {pid}) and the inner");
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

/// A duration in milliseconds, as the protocol carries it.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A grace period given in (fractional) seconds; a negative one is none.
fn seconds_to_millis(seconds: f64) -> u64 {
    millis(Duration::try_from_secs_f64(seconds).unwrap_or_default())
}

pub async fn bounce(g: &Global, grace: f64) -> Result<()> {
    let mut c = g.connect().await?;
    let r = c.bounce(seconds_to_millis(grace)).await?;
    if g.json {
        return print_json(&r);
    }
    outln!(
        "bounced in {:.1} ms (stop {:.1} ms, start {:.1} ms); inner pid {}, bounce #{}",
        r.total_ms,
        r.stop_ms,
        r.start_ms,
        r.inner_pid,
        r.bounces
    );
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

/// `hull console`: the login shell as a detachable session, or an attach
/// to one; `reconnect`: a new shell after a bounce or restore.
pub fn console_options(attach: Option<AttachTo>, reconnect: bool) -> ExecOptions {
    ExecOptions {
        argv: console_argv(),
        env: Vec::new(),
        cwd: Some("/root".into()),
        user: None,
        tty: true,
        interactive: true,
        linger: None,
        timeout: None,
        no_log: false,
        detach: false,
        reconnect,
        attach,
        writer: true,
        detach_key: true,
    }
}

/// `hull sessions list`.
pub async fn sessions_list(g: &Global) -> Result<()> {
    let mut c = g.connect().await?;
    let list = c.sessions_list().await?;
    if g.json {
        return print_json(&list);
    }
    if list.is_empty() {
        outln!("no sessions are running");
        return Ok(());
    }
    outln!(
        "{:<8} {:<8} {:<4} {:<8} {:<10} {:<10} {:<12} COMMAND",
        "ID",
        "PID",
        "TTY",
        "CLIENTS",
        "AGE",
        "IDLE",
        "STARTED_BY"
    );
    let now = hull_proto::now_ms();
    let ago = |ms: i64| short_duration(Duration::from_millis(u64::try_from(now - ms).unwrap_or(0)));
    for s in list {
        // A token's name is chosen by whoever made the token: shown
        // without what would move the cursor or hide the columns.
        let started_by: String = s
            .started_by
            .chars()
            .map(|c| {
                if c.is_control() || c.is_whitespace() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        outln!(
            "{:<8} {:<8} {:<4} {:<8} {:<10} {:<10} {:<12} {}",
            s.id,
            s.pid,
            if s.tty { "yes" } else { "no" },
            s.clients,
            ago(s.created_ms),
            ago(s.last_activity_ms),
            started_by,
            s.argv.join(" ")
        );
    }
    Ok(())
}

/// "3s", "4m", "2h", "5d".
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `hull sessions attach`: this terminal on session `id`.
pub async fn sessions_attach(g: &Global, id: u64, writer: bool) -> Result<i32> {
    let mut opts = console_options(Some(AttachTo::Id(id)), false);
    opts.writer = writer;
    opts.interactive = writer;
    exec(g, opts).await
}

/// `hull sessions kill`.
pub async fn sessions_kill(g: &Global, id: u64, signal: i32, timeout: Duration) -> Result<()> {
    let mut c = g.connect().await?;
    let forced = c.session_kill(id, signal, millis(timeout)).await?;
    if g.json {
        return print_json(&serde_json::json!({ "id": id, "forced": forced }));
    }
    match forced {
        true => outln!(
            "session {id} ended (it took a SIGKILL after {} s)",
            timeout.as_secs_f64()
        ),
        false => outln!("session {id} ended"),
    }
    Ok(())
}

/// Commands for the VM only: inside the inner, hulld's socket there serves
/// `hull services`, `hull ports` and `hull ingress`, and the help does not
/// offer the rest.
pub const VM_ONLY_COMMANDS: [&str; 10] = [
    "up",
    "status",
    "exec",
    "cp",
    "console",
    "bounce",
    "down",
    "checkpoint",
    "logs",
    "image",
];

/// True inside the inner: hulld mounts its `hull` client there, at a path
/// the VM itself never has.
pub fn in_inner() -> bool {
    Path::new(hull_proto::INNER_API_BIN).join("hull").exists()
}

pub fn flush_stdout() {
    let _ = std::io::stdout().flush();
}

/// Formats an error and its causes, joined with ": ". Errors keep their
/// cause as `source()` and do not repeat it, so each appears once.
pub fn error_chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// `hull ports`: a table of the inner's listening ports.
pub async fn ports(g: &Global) -> Result<()> {
    let mut c = g.connect().await?;
    let r = c.ports().await?;
    if g.json {
        return print_json(&r);
    }
    if r.ports.is_empty() {
        outln!(
            "nothing listens on a TCP port in the inner (network: {})",
            r.network
        );
        return Ok(());
    }
    outln!(
        "{:<6} {:<16} {:<8} {:<16} {:<22} HTTP",
        "PORT",
        "ADDRESS",
        "PID",
        "COMMAND",
        "OUTSIDE"
    );
    for p in &r.ports {
        let outside = match (p.exposure.as_str(), &p.outer) {
            ("forwarded", Some(outer)) => outer.clone(),
            ("taken", Some(outer)) => format!("{outer} taken"),
            (other, _) => other.to_string(),
        };
        let http = match (&p.http_url, &p.http_host) {
            (Some(url), Some(host)) => format!("curl -H 'Host: {host}' {url}"),
            (Some(url), None) => url.clone(),
            (None, _) => "-".into(),
        };
        let http = if p.private {
            format!("{http} (private)")
        } else {
            http
        };
        outln!(
            "{:<6} {:<16} {:<8} {:<16} {:<22} {}",
            p.port,
            p.address,
            p.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            p.command.as_deref().unwrap_or("-"),
            outside,
            http
        );
    }
    for p in &r.ports {
        match (p.exposure.as_str(), &p.detail) {
            ("taken", detail) => outln!(
                "port {}: the outer address is taken ({}); reach it through HTTP ingress",
                p.port,
                detail.as_deref().unwrap_or("in use")
            ),
            ("not-forwarded", Some(reason)) => outln!("port {}: not forwarded: {reason}", p.port),
            _ => {}
        }
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
            outln!("HTTP ingress   http://{addr}/ (Host PORT.<anything> picks the inner port)")
        }
        None => outln!("HTTP ingress   off"),
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
    outln!("private        {private}");
    if r.token.is_empty() {
        outln!("token          (not given inside the inner)");
    } else {
        outln!(
            "token          {}  (send: Authorization: Bearer TOKEN)",
            r.token
        );
    }
    if let (Some(inner), Some(gw)) = (&r.inner_address, &r.gateway) {
        outln!("inner address  {inner} (gateway {gw})");
    }
    Ok(())
}

pub async fn policy_show(g: &Global) -> Result<()> {
    let mut c = g.connect().await?;
    let (policy, enforced) = c.network_policy(None).await?;
    if g.json {
        // The stored text is JSON hulld checked; shown as a value.
        let policy: serde_json::Value = match &policy {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| ClientError::Unexpected(format!("the stored policy: {e}")))?,
            None => serde_json::Value::Null,
        };
        return print_json(&serde_json::json!({"policy": policy, "enforced": enforced}));
    }
    match policy {
        Some(text) => outln!("{}", text.trim_end()),
        None => outln!("no policy: the inner may reach anything"),
    }
    if !enforced {
        outln!("(not enforced: the inner has no network of its own to leave by)");
    }
    Ok(())
}

pub async fn policy_set(g: &Global, file: &str) -> Result<()> {
    let text = if file == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the policy from standard input")?;
        text
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read the policy {file}"))?
    };
    let mut c = g.connect().await?;
    let (_, enforced) = c.network_policy(Some(text)).await?;
    if g.json {
        return print_json(&serde_json::json!({"set": true, "enforced": enforced}));
    }
    if enforced {
        outln!("policy set and enforced");
    } else {
        outln!("policy set (not enforced: the inner has no network of its own to leave by)");
    }
    Ok(())
}

async fn tokens(g: &Global, request: hull_proto::TokenRequest) -> Result<DaemonMsg> {
    let mut c = g.connect().await?;
    Ok(c.request(ClientMsg::Tokens(request)).await?)
}

fn unexpected(reply: DaemonMsg) -> anyhow::Error {
    ClientError::Unexpected(format!("{reply:?}")).into()
}

fn time_ms(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    httpdate::fmt_http_date(at)
}

pub async fn token_create(
    g: &Global,
    scope: hull_proto::TokenScope,
    ttl: Option<Duration>,
    name: Option<String>,
) -> Result<()> {
    let ttl_ms = ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    let request = hull_proto::TokenRequest::Create {
        scope,
        ttl_ms,
        name,
    };
    let (token, info) = match tokens(g, request).await? {
        DaemonMsg::TokenCreated { token, info } => (token, info),
        other => return Err(unexpected(other)),
    };
    if g.json {
        return print_json(&serde_json::json!({ "token": token, "info": info }));
    }
    outln!("{token}");
    errln!(
        "hull: token {} ({scope}{}) made; it is not shown again",
        info.id,
        info.expires_ms
            .map(|at| format!(", expires {}", time_ms(at)))
            .unwrap_or_default()
    );
    Ok(())
}

pub async fn token_list(g: &Global) -> Result<()> {
    let list = match tokens(g, hull_proto::TokenRequest::List).await? {
        DaemonMsg::Tokens(list) => list,
        other => return Err(unexpected(other)),
    };
    if g.json {
        return print_json(&list);
    }
    if list.is_empty() {
        outln!("no tokens: the HTTP API refuses every request (make one with `hull token create --scope exec`)");
        return Ok(());
    }
    outln!(
        "{:<10} {:<6} {:<30} {:<30} NAME",
        "ID",
        "SCOPE",
        "CREATED",
        "EXPIRES"
    );
    for t in list {
        outln!(
            "{:<10} {:<6} {:<30} {:<30} {}",
            t.id,
            t.scope.as_str(),
            time_ms(t.created_ms),
            t.expires_ms.map(time_ms).unwrap_or_else(|| "never".into()),
            t.name.unwrap_or_default()
        );
    }
    Ok(())
}

pub async fn token_revoke(g: &Global, id: &str) -> Result<()> {
    let request = hull_proto::TokenRequest::Revoke { id: id.to_string() };
    match tokens(g, request).await? {
        DaemonMsg::TokenRevoked { id } if g.json => {
            print_json(&serde_json::json!({ "revoked": id }))
        }
        DaemonMsg::TokenRevoked { id } => {
            outln!("token {id} revoked");
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

pub async fn checkpoint_create(g: &Global, comment: Option<String>) -> Result<()> {
    let mut c = g.connect().await?;
    let r = c.checkpoint_create(comment).await?;
    if g.json {
        return print_json(&r);
    }
    outln!(
        "checkpoint {} created in {:.1} ms (inner frozen {:.1} ms)",
        r.checkpoint.id,
        r.total_ms,
        r.frozen_ms
    );
    Ok(())
}

pub async fn checkpoint_restore(g: &Global, id: &str) -> Result<()> {
    let mut c = g.connect().await?;
    let r = c.checkpoint_restore(id).await?;
    if g.json {
        return print_json(&r);
    }
    outln!(
        "restored {} in {:.1} ms (stop {:.1} ms, start {:.1} ms); undo with: hull checkpoint restore {}",
        r.restored, r.total_ms, r.stop_ms, r.start_ms, r.undo
    );
    if !r.services_removed.is_empty() {
        outln!(
            "services removed (not in {}): {}",
            r.restored,
            r.services_removed.join(", ")
        );
    }
    if !r.services_added.is_empty() {
        outln!(
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
    outln!("deleted checkpoint {id}");
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

/// The checkpoints as a tree, one line each, in creation order. A chain
/// (each checkpoint the only child of the one before) stays in one column;
/// only a checkpoint with several children opens branches, drawn like
/// `tree(1)`.
pub fn checkpoint_tree(listing: &hull_proto::CheckpointListing) -> Vec<String> {
    use std::collections::HashMap;
    let known: std::collections::HashSet<&str> =
        listing.checkpoints.iter().map(|c| c.id.as_str()).collect();
    let mut children: HashMap<Option<&str>, Vec<&hull_proto::CheckpointInfo>> = HashMap::new();
    for cp in &listing.checkpoints {
        // A checkpoint whose parent was deleted starts a tree of its own.
        let parent = cp.parent.as_deref().filter(|p| known.contains(p));
        children.entry(parent).or_default().push(cp);
    }
    let line = |cp: &hull_proto::CheckpointInfo, prefix: &str| {
        let marker = if listing.head.as_deref() == Some(cp.id.as_str()) {
            "*"
        } else {
            " "
        };
        let orphan = match &cp.parent {
            Some(p) if !known.contains(p.as_str()) => format!(" (from deleted {p})"),
            _ => String::new(),
        };
        // Where it stands with the remote, when there is one to say.
        let remote = match (cp.remote_state.as_str(), &cp.remote_error) {
            (_, Some(error)) => format!(" [push failed, retrying: {error}]"),
            ("pushing" | "pushed", None) => format!(" [{}]", cp.remote_state),
            _ => String::new(),
        };
        format!(
            "{marker} {prefix}{:<6} {:>8}  {}{}{}{}",
            cp.id,
            age(listing.now_ms, cp.created_ms),
            if cp.auto { "[auto] " } else { "" },
            cp.comment.as_deref().unwrap_or(""),
            orphan,
            remote,
        )
        .trim_end()
        .to_string()
    };
    let mut out = Vec::new();
    // (siblings still to draw, the prefix of their lines, whether they
    // hang off a fork): an explicit stack, so a chain of thousands does
    // not recurse thousands deep.
    let roots = children.get(&None).cloned().unwrap_or_default();
    let mut stack: Vec<(
        std::vec::IntoIter<&hull_proto::CheckpointInfo>,
        String,
        bool,
    )> = vec![(roots.into_iter(), String::new(), false)];
    while let Some((siblings, prefix, fork)) = stack.last_mut() {
        let Some(cp) = siblings.next() else {
            stack.pop();
            continue;
        };
        let last = siblings.len() == 0;
        let (own, below) = match (*fork, last) {
            (false, _) => (prefix.clone(), prefix.clone()),
            (true, false) => (format!("{prefix}├─ "), format!("{prefix}│  ")),
            (true, true) => (format!("{prefix}└─ "), format!("{prefix}   ")),
        };
        out.push(line(cp, &own));
        let kids = children
            .get(&Some(cp.id.as_str()))
            .cloned()
            .unwrap_or_default();
        let forks = kids.len() > 1;
        stack.push((kids.into_iter(), below, forks));
    }
    out
}

/// Prints checkpoints as a tree: each under its parent, in creation order.
pub async fn checkpoint_list(g: &Global) -> Result<()> {
    let mut c = g.connect().await?;
    let listing = c.checkpoint_list().await?;
    if g.json {
        return print_json(&listing);
    }
    if listing.checkpoints.is_empty() {
        outln!("no checkpoints yet; take one with: hull checkpoint create -m COMMENT");
        return Ok(());
    }
    for line in checkpoint_tree(&listing) {
        outln!("{line}");
    }
    if let Some(head) = &listing.head {
        outln!("(* the current state came from {head})");
    }
    Ok(())
}

/// Services as a table, one in detail (`show`), or JSON: an array for
/// `list`, an object for a request about one service.
fn print_services(
    g: &Global,
    list: &[hull_proto::ServiceStatus],
    detail: bool,
    single: bool,
) -> Result<()> {
    if g.json {
        return match (single, list) {
            (true, [one]) => print_json(one),
            _ => print_json(&list),
        };
    }
    if list.is_empty() {
        outln!("no services; register one with: hull services add NAME --cmd \"...\"");
        return Ok(());
    }
    if !detail {
        outln!(
            "{:<16} {:<9} {:>7} {:>9} {:>8} {:>6}  last exit",
            "NAME",
            "STATE",
            "PID",
            "UPTIME",
            "RESTARTS",
            "STARTS"
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
            outln!(
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
        outln!("name       {}", s.spec.name);
        outln!("command    {}", s.spec.cmd);
        let waiting_for_port = s.state == "running" && !s.ready;
        outln!(
            "state      {}{}",
            s.state,
            if waiting_for_port {
                " (port not listening yet)"
            } else {
                ""
            }
        );
        outln!(
            "pid        {pid}   uptime {uptime}   restarts {} (after exits)   starts {} (on a new inner)",
            s.restarts, s.inner_starts
        );
        outln!("restart    {}", s.spec.restart.name());
        if !s.spec.after.is_empty() {
            outln!("after      {}", s.spec.after.join(", "));
        }
        if let Some(port) = s.spec.http_port {
            outln!("http port  {port}");
        }
        outln!("last exit  {last}");
        if let Some(reason) = &s.reason {
            outln!("reason     {reason}");
        }
        if !s.last_lines.is_empty() {
            outln!("last output:");
            for line in &s.last_lines {
                outln!("  | {}", shown(line));
            }
        }
    }
    Ok(())
}

pub async fn services(g: &Global, request: hull_proto::ServiceRequest) -> Result<()> {
    use hull_proto::ServiceRequest as R;
    let detail = matches!(request, R::Show(_));
    // Every request but List is about one service: its answer is an object.
    let single = !matches!(request, R::List);
    let mut c = g.connect().await?;
    let list = c.services(request).await?;
    print_services(g, &list, detail, single)
}

/// A logged line as the reader's terminal gets it: the inner chose its
/// bytes, so control characters (escape sequences that retitle, clear or
/// write the clipboard; C1 controls) are shown as `\x1b`, never obeyed.
/// Tabs stay. `--json` keeps the exact text.
fn shown(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.chars().any(|c| c.is_control() && c != '\t') {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        match c {
            '\t' => out.push(c),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// One record of `hull logs --json` (docs/guide/json.md).
#[derive(serde::Serialize)]
struct LogLine<'a> {
    /// "line", beside the "marker" records of starts and bounces.
    #[serde(rename = "type")]
    kind: &'static str,
    ts_ms: i64,
    stream: &'static str,
    line: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exec_id: Option<u64>,
}

impl<'a> From<&'a hull_proto::LogRecord> for LogLine<'a> {
    fn from(r: &'a hull_proto::LogRecord) -> Self {
        LogLine {
            kind: "line",
            ts_ms: r.ts_ms,
            stream: match r.stream {
                Stream::Stdout => "stdout",
                Stream::Stderr => "stderr",
            },
            line: &r.line,
            exec_id: r.exec.as_ref().map(|e| e.id),
        }
    }
}

/// What a marker record of an exec says, for `hull logs --json`: only the
/// fields it has (docs/guide/json.md).
fn exec_json(tag: &hull_proto::ExecTag) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    obj.insert("id".into(), tag.id.into());
    if let Some(argv) = &tag.argv {
        obj.insert("argv".into(), argv.clone().into());
    }
    match tag.exit {
        Some(hull_proto::ExitStatus::Code(c)) => obj.insert("exit_code".into(), c.into()),
        Some(hull_proto::ExitStatus::Signal(s)) => obj.insert("signal".into(), s.into()),
        None => None,
    };
    if let Some(ms) = tag.duration_ms {
        obj.insert("duration_ms".into(), ms.into());
    }
    if let Some(bytes) = tag.bytes {
        obj.insert("bytes".into(), bytes.into());
    }
    if let Some(hash) = &tag.sha256 {
        obj.insert("sha256".into(), hash.clone().into());
    }
    if let Some(bytes) = tag.unlogged_bytes {
        obj.insert("unlogged_bytes".into(), bytes.into());
    }
    serde_json::Value::Object(obj)
}

/// `NAME`, or `exec:ID` for the records of one exec (`hull exec --detach`
/// prints the id).
fn log_source(name: String) -> Result<(String, Option<u64>)> {
    let id = name
        .strip_prefix(hull_proto::EXEC_SOURCE)
        .and_then(|rest| rest.strip_prefix(':'));
    let Some(id) = id else {
        return Ok((name, None));
    };
    match id.parse() {
        Ok(id) => Ok((hull_proto::EXEC_SOURCE.to_string(), Some(id))),
        Err(_) => {
            bail!("{name:?}: an exec's log is exec:ID, ID the number hull exec --detach printed")
        }
    }
}

/// `hull logs`: every line to stdout (the output is what the user asked
/// for, whichever stream wrote it; `--stream` picks one), or JSON records;
/// with `follow`, until interrupted (across bounces and restores).
pub async fn logs(
    g: &Global,
    source: String,
    follow: bool,
    tail: Option<u64>,
    stream: Option<Stream>,
    since: Option<Duration>,
) -> Result<()> {
    let (source, exec_id) = log_source(source)?;
    let mut c = g.connect().await?;
    let since_ms = since.map(|d| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(now.saturating_sub(d).as_millis()).unwrap_or(i64::MAX)
    });
    c.writer
        .send(ClientMsg::Logs {
            source,
            follow,
            tail,
            stream,
            since_ms,
            exec_id,
        })
        .await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        match client::next(&mut c.reader).await? {
            DaemonMsg::LogRecords(records) => {
                for r in records {
                    if let Some(marker) = r.marker {
                        // Something that happened to the service, not its output.
                        if g.json {
                            let mut record = serde_json::json!({
                                "type": "marker",
                                "ts_ms": r.ts_ms,
                                "event": marker.name(),
                                "text": r.line,
                            });
                            if let Some(tag) = &r.exec {
                                record["exec"] = exec_json(tag);
                            }
                            writeln!(out, "{record}").map_err(stdout_error)?;
                        } else {
                            writeln!(out, "-- {} --", shown(&r.line)).map_err(stdout_error)?;
                        }
                    } else if g.json {
                        let text = serde_json::to_string(&LogLine::from(&r))?;
                        writeln!(out, "{text}").map_err(stdout_error)?;
                    } else {
                        writeln!(out, "{}", shown(&r.line)).map_err(stdout_error)?;
                    }
                }
                out.flush().map_err(stdout_error)?;
            }
            DaemonMsg::LogsEnd => return Ok(()),
            other => bail!("unexpected message from hulld: {other:?}"),
        }
    }
}

/// "500ms", "90s", "10m", "2h", "1d" (a bare number is seconds).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 30s, 10m, 2h or 1d"))?;
    let ms = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{text:?} is not a duration like 500ms, 30s, 10m, 2h or 1d"
            ))
        }
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hull_proto::{CheckpointInfo, CheckpointListing};

    #[test]
    fn error_chain_shows_every_cause_once() {
        // A cause whose text the message happens to contain is still a
        // cause of its own.
        let e = anyhow::Error::from(std::io::Error::other("denied")).context("access denied");
        assert_eq!(error_chain(&e), "access denied: denied");
        #[derive(Debug, thiserror::Error)]
        #[error("bad service definition")]
        struct BadDefinition(#[source] serde_json::Error);
        let e = anyhow::Error::from(BadDefinition(serde_json::from_str::<u8>("x").unwrap_err()));
        let chain = error_chain(&e);
        assert_eq!(chain.matches("expected value").count(), 1, "{chain}");
    }

    fn listing(parents: &[(&str, Option<&str>)]) -> CheckpointListing {
        CheckpointListing {
            checkpoints: parents
                .iter()
                .map(|(id, parent)| CheckpointInfo {
                    id: id.to_string(),
                    parent: parent.map(str::to_string),
                    created_ms: 0,
                    comment: None,
                    auto: false,
                    services: Vec::new(),
                    remote_id: String::new(),
                    parent_remote_id: None,
                    remote_state: "local".into(),
                    remote_error: None,
                    origin: "here".into(),
                })
                .collect(),
            head: Some("v3".into()),
            now_ms: 0,
        }
    }

    #[test]
    fn cli_checkpoint_tree_keeps_chains_flat_and_draws_forks() {
        let tree = checkpoint_tree(&listing(&[
            ("v1", None),
            ("v2", Some("v1")),
            ("v3", Some("v2")),
            ("v4", Some("v3")),
            ("v5", Some("v2")),
            ("v6", Some("v5")),
            ("v7", Some("gone")),
        ]));
        assert_eq!(
            tree,
            [
                "  v1       0s ago",
                "  v2       0s ago",
                "* ├─ v3       0s ago",
                "  │  v4       0s ago",
                "  └─ v5       0s ago",
                "     v6       0s ago",
                "  v7       0s ago   (from deleted gone)",
            ]
        );
    }

    #[test]
    fn cli_durations_take_milliseconds_to_days() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("5x").is_err());
    }
}
