//! `hull exec` and `hull console`: one session, wired to this terminal or
//! collected for `--json`.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::SinkExt;
use hull_proto::{
    ClientMsg, DaemonMsg, ErrorKind, ExecEnd, ExecRequest, ExecSpec, ExitStatus, Stream, WinSize,
};
use nix::sys::termios;
use tokio::sync::mpsc;

use super::report::{daemon_code, report_error, stdout_error, CliError, TIMED_OUT};
use super::{print_json, Global};
use crate::client::{self, Client, ClientError};

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

pub struct ExecOptions {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    pub interactive: bool,
    /// How long to keep output after the command exits (hulld's default
    /// when absent).
    pub linger: Option<Duration>,
    /// Kill the command's process group after this long.
    pub timeout: Option<Duration>,
    /// Keep nothing of it in the `exec` log.
    pub no_log: bool,
    /// Start it in the background and print its exec id.
    pub detach: bool,
    /// With a terminal: after the inner stopped under the session (a
    /// bounce, a restore), start the command again (`hull console`).
    pub reconnect: bool,
    /// Attach to a running session instead of starting the command
    /// (the first session only: a reconnect starts the command).
    pub attach: Option<AttachTo>,
    /// Ask to be the session's writer when attaching (else a watcher,
    /// unless nobody else is attached).
    pub writer: bool,
    /// With a terminal: Ctrl+\ detaches from the session, which runs on.
    pub detach_key: bool,
}

/// The session an attach is for.
#[derive(Debug, Clone, Copy)]
pub enum AttachTo {
    Id(u64),
    /// The newest running `hull console` session.
    LatestConsole,
}

/// Ctrl+\ on a raw terminal.
const DETACH_KEY: u8 = 0x1c;

/// Runs one command in the inner, wired to this terminal. Returns the exit
/// code hull should exit with.
pub async fn exec(g: &Global, mut opts: ExecOptions) -> Result<i32> {
    if opts.tty && !std::io::stdin().is_terminal() {
        // A PTY only ends its input when a user types ^D; with a pipe or a
        // file on stdin the session would wait for that forever.
        if !g.json {
            errln!("hull: stdin is not a terminal: running with pipes instead of a terminal");
        }
        opts.tty = false;
    }
    // --json collects the output into one object: no terminal to draw on.
    opts.tty &= !g.json;
    let input = Input::default();
    let mut wired = false;
    loop {
        match session(g, &opts, &input, &mut wired).await {
            Err(e) if opts.reconnect => match e.downcast_ref::<CliError>() {
                Some(CliError::TerminalEnded(reason)) => {
                    errln!("hull: session ended: {reason}; here is a new shell\r");
                    opts.attach = None;
                }
                _ => return Err(e),
            },
            other => return other,
        }
    }
}

/// Where this terminal's input and signals go: the current session, and
/// after a reconnect the next one. The stdin thread outlives a session,
/// so keys typed while the inner comes back reach the new shell.
#[derive(Clone, Default)]
struct Input(Arc<Mutex<Option<mpsc::Sender<ClientMsg>>>>);

impl Input {
    fn set(&self, tx: mpsc::Sender<ClientMsg>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
    }

    fn current(&self) -> Option<mpsc::Sender<ClientMsg>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// From a blocking thread: waits for a session that takes `msg`.
    fn blocking_send(&self, mut msg: ClientMsg) {
        loop {
            if let Some(tx) = self.current() {
                match tx.blocking_send(msg) {
                    Ok(()) => return,
                    Err(mpsc::error::SendError(back)) => msg = back,
                }
            }
            // Between sessions (a reconnect): the next one is on its way.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn send(&self, msg: ClientMsg) -> bool {
        match self.current() {
            Some(tx) => tx.send(msg).await.is_ok(),
            None => false,
        }
    }
}

/// One session; `wired` says whether stdin and signals are already routed
/// to `input` (by an earlier session of a reconnecting console).
async fn session(g: &Global, opts: &ExecOptions, input: &Input, wired: &mut bool) -> Result<i32> {
    let mut c = g.connect().await?;
    let started = Instant::now();
    let (exec_id, session_id, tty) = match opts.attach {
        // --json collects the output: no terminal to draw on.
        Some(to) => {
            let (exec_id, session, tty) = attach(&mut c, to, opts.writer).await?;
            (exec_id, session, tty && !g.json)
        }
        None => match start(g, &mut c, opts).await? {
            Begun::Running { exec_id, session } => (exec_id, session, opts.tty),
            Begun::Done(code) => return Ok(code),
        },
    };
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
    let raw = if tty { RawTerminal::enter() } else { None };
    if opts.attach.is_some() && tty {
        // The session's terminal takes this one's size; the program redraws.
        tx.send(ClientMsg::Resize(local_winsize())).await?;
    }
    // A watcher leaves the input alone: it may be the writer's to end.
    if !opts.interactive && opts.attach.is_none() {
        tx.send(ClientMsg::StdinEof).await?;
    }
    input.set(tx);
    if !*wired {
        if opts.interactive {
            spawn_stdin_reader(input.clone(), tty, opts.detach_key && tty);
        }
        spawn_signal_forwarding(input.clone(), tty)?;
        *wired = true;
    }
    let mut sink = if g.json {
        OutputSink::Collect(Vec::new(), Vec::new())
    } else {
        OutputSink::Terminal
    };
    let mut screen = AltScreen::default();
    let mut output_cut = None;
    let end = loop {
        match client::next(&mut reader).await {
            Ok(DaemonMsg::Output { stream, data }) => {
                if tty {
                    screen.see(&data);
                }
                sink.write(stream, &data)?
            }
            Ok(DaemonMsg::OutputCut { linger_ms }) => output_cut = Some(linger_ms),
            // A session started over the API may tell of its ports.
            Ok(DaemonMsg::Port(_)) => {}
            Ok(DaemonMsg::ExecEnded(end)) => break end,
            Ok(DaemonMsg::Detached { id }) => {
                if tty {
                    screen.restore();
                }
                drop(raw);
                return detached_from(g, id);
            }
            Ok(other) => bail!(ClientError::Unexpected(format!("{other:?}"))),
            Err(e) => {
                if tty {
                    screen.restore();
                }
                drop(raw);
                return Err(e.into());
            }
        }
    };
    let ended = match end {
        ExecEnd::Exited(status) => Ended {
            status: Some(status),
            timed_out: None,
            output_cut,
        },
        ExecEnd::TimedOut { timeout_ms } => Ended {
            status: None,
            timed_out: Some(timeout_ms),
            output_cut,
        },
        ExecEnd::InnerStopped { reason } if tty => {
            // What ran there (vim, less) had no chance to undo its modes.
            screen.restore();
            drop(raw);
            return Err(CliError::TerminalEnded(reason).into());
        }
        ExecEnd::InnerStopped { reason } => return Err(CliError::SessionEnded(reason).into()),
    };
    drop(raw);
    match &sink {
        OutputSink::Collect(stdout, stderr) => print_json(&exec_json(
            &ended,
            exec_id,
            session_id,
            stdout,
            stderr,
            started.elapsed(),
        ))?,
        OutputSink::Terminal => ended.tell(),
    }
    Ok(ended.code())
}

/// How a start went: running on this connection, or over already (in
/// the background, or it could not start) with the code hull exits with.
enum Begun {
    Running { exec_id: Option<u64>, session: u64 },
    Done(i32),
}

/// Attaches `c` to a session: its exec id (none), session id and whether
/// it has a terminal.
async fn attach(c: &mut Client, to: AttachTo, writer: bool) -> Result<(Option<u64>, u64, bool)> {
    let id = match to {
        AttachTo::Id(id) => id,
        AttachTo::LatestConsole => {
            let console = super::console_argv();
            let list = c.sessions_list().await?;
            let newest = list
                .iter()
                .filter(|s| s.tty && s.argv == console)
                .map(|s| s.id)
                .max();
            match newest {
                Some(id) => id,
                None => bail!(CliError::NoConsole),
            }
        }
    };
    // A watcher asks never to be the writer, which a read token allows.
    let info = if writer {
        c.session_attach(id, true).await?.0
    } else {
        c.session_watch(id).await?
    };
    Ok((None, info.id, info.tty))
}

/// `hull console --attach`, `hull sessions attach`: said when the user
/// detached, with how to come back.
fn detached_from(g: &Global, id: u64) -> Result<i32> {
    if g.json {
        print_json(&serde_json::json!({ "detached": id }))?;
    } else {
        errln!("hull: detached from session {id}; it runs on. Back to it: hull console --attach {id} (or hull sessions attach {id})");
    }
    Ok(0)
}

/// Starts the command on `c`.
async fn start(g: &Global, c: &mut Client, opts: &ExecOptions) -> Result<Begun> {
    let tty = opts.tty.then(local_winsize);
    let spec = ExecSpec {
        argv: opts.argv.clone(),
        env: opts.env.clone(),
        cwd: opts.cwd.clone(),
        user: opts.user.clone(),
        tty,
    };
    let request = ExecRequest {
        spec,
        linger_ms: opts.linger.map(super::millis),
        timeout_ms: opts.timeout.map(super::millis),
        no_log: opts.no_log,
        detach: opts.detach,
        max_run_after_disconnect_ms: None,
        port_events: false,
    };
    let start = if opts.detach {
        c.exec_detach(request)
            .await
            .map(|(id, pid)| Started::Detached { id, pid })
    } else {
        c.exec_begin(request).await.map(Started::Attached)
    };
    match start {
        Ok(Started::Detached { id, pid }) => detached(g, id, pid).map(Begun::Done),
        Ok(Started::Attached(s)) => Ok(Begun::Running {
            exec_id: s.exec_id,
            session: s.session,
        }),
        Err(ClientError::Daemon(report)) => {
            let ErrorKind::Spawn(kind) = report.kind else {
                return Err(ClientError::Daemon(report).into());
            };
            // The command's failure, with the code a shell gives it.
            report_error(g.json, daemon_code(report.kind), &report.message);
            Ok(Begun::Done(kind.shell_code()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Sequences that switch the terminal to the alternate screen (xterm's
/// three ways) and back.
const ALT_ON: [&[u8]; 3] = [b"\x1b[?1049h", b"\x1b[?1047h", b"\x1b[?47h"];
const ALT_OFF: [&[u8]; 3] = [b"\x1b[?1049l", b"\x1b[?1047l", b"\x1b[?47l"];
/// What full-screen programs turn on and a terminal keeps after they are
/// gone: a hidden cursor, bracketed paste, mouse reporting (four modes),
/// application cursor keys and keypad, colours. Turned off or reset after a
/// session the inner's end cut short; harmless when they were never on.
const MODES_RESET: &[u8] =
    b"\x1b[?25h\x1b[?2004l\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?1l\x1b>\x1b[0m";

/// Whether the session left this terminal on the alternate screen: the
/// last switch in its output wins. Leaving it also restores the cursor
/// saved on entry, so hull does it only when it was entered.
#[derive(Default)]
struct AltScreen {
    on: bool,
    /// The end of the previous chunk, for a sequence split between two.
    tail: Vec<u8>,
}

impl AltScreen {
    fn see(&mut self, data: &[u8]) {
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(data);
        let last = |seqs: &[&[u8]]| {
            seqs.iter()
                .filter_map(|s| memchr::memmem::rfind(&buf, s))
                .max()
        };
        match (last(&ALT_ON), last(&ALT_OFF)) {
            (Some(on), Some(off)) => self.on = on > off,
            (Some(_), None) => self.on = true,
            (None, Some(_)) => self.on = false,
            (None, None) => {}
        }
        let keep = buf.len().saturating_sub(ALT_ON[0].len() - 1);
        self.tail = buf.split_off(keep);
    }

    /// Puts the terminal back as a shell prompt expects it.
    fn restore(&self) {
        let mut out = std::io::stdout().lock();
        if self.on {
            let _ = out.write_all(ALT_OFF[0]);
        }
        let _ = out
            .write_all(MODES_RESET)
            .and_then(|()| out.write_all(b"\r\n"))
            .and_then(|()| out.flush());
    }
}

/// A session hulld started: in the background, or on this connection.
enum Started {
    /// Its exec id and pid in the inner.
    Detached { id: u64, pid: i32 },
    /// Running on this connection.
    Attached(client::ExecStarted),
}

/// `hull exec --detach`: the id alone on stdout (`{"id": N, "pid": P}`
/// with `--json`), where to read its output on stderr.
fn detached(g: &Global, id: u64, pid: i32) -> Result<i32> {
    if g.json {
        print_json(&serde_json::json!({ "id": id, "pid": pid }))?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{id}")
            .and_then(|()| out.flush())
            .map_err(stdout_error)?;
        errln!("hull: exec {id} runs in the background (pid {pid} in the inner); its output: hull logs exec:{id}");
    }
    Ok(0)
}

/// How an exec that ran ended, as the CLI reports it.
struct Ended {
    /// `None` when the timeout killed it.
    status: Option<ExitStatus>,
    timed_out: Option<u64>,
    /// The linger after which output was cut, if it was.
    output_cut: Option<u64>,
}

impl Ended {
    fn code(&self) -> i32 {
        match self.status {
            Some(status) => status.shell_code(),
            None => TIMED_OUT,
        }
    }

    /// Says on stderr what the output alone does not show.
    fn tell(&self) {
        if let Some(ms) = self.output_cut {
            errln!(
                "hull: output cut: processes the command left behind still held its output {} after it exited (wait longer with --linger)",
                millis(ms)
            );
        }
        if let Some(ms) = self.timed_out {
            errln!(
                "hull: timed out after {}; killed the command's process group",
                millis(ms)
            );
        }
    }
}

/// "2 s", "1.5 s", "300 ms".
fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{} s", ms as f64 / 1000.0)
    }
}

/// Where a session's output goes: this terminal, or memory for `--json`.
enum OutputSink {
    Terminal,
    Collect(Vec<u8>, Vec<u8>),
}

impl OutputSink {
    /// Blocking writes: the terminal is the session's only sink, and a slow
    /// terminal should slow the session down, not buffer without bound.
    fn write(&mut self, stream: Stream, data: &[u8]) -> Result<()> {
        match (self, stream) {
            (OutputSink::Terminal, Stream::Stdout) => {
                let mut out = std::io::stdout().lock();
                out.write_all(data)
                    .and_then(|()| out.flush())
                    .map_err(stdout_error)
            }
            (OutputSink::Terminal, Stream::Stderr) => {
                let mut err = std::io::stderr().lock();
                // A closed stderr loses diagnostics, not the session.
                let _ = err.write_all(data).and_then(|()| err.flush());
                Ok(())
            }
            (OutputSink::Collect(out, _), Stream::Stdout) => {
                out.extend_from_slice(data);
                Ok(())
            }
            (OutputSink::Collect(_, err), Stream::Stderr) => {
                err.extend_from_slice(data);
                Ok(())
            }
        }
    }
}

/// `hull --json exec`: the exit and both streams in one object. A stream
/// that is not UTF-8 comes as `NAME_base64` instead of `NAME`.
fn exec_json(
    ended: &Ended,
    exec_id: Option<u64>,
    session: u64,
    stdout: &[u8],
    stderr: &[u8],
    elapsed: Duration,
) -> serde_json::Value {
    use base64::Engine;
    let mut obj = serde_json::Map::new();
    obj.insert("exit_code".into(), ended.code().into());
    obj.insert("exec_id".into(), exec_id.into());
    obj.insert("session".into(), session.into());
    if let Some(ExitStatus::Signal(n)) = ended.status {
        obj.insert("signal".into(), n.into());
    }
    obj.insert("timed_out".into(), ended.timed_out.is_some().into());
    obj.insert("output_cut".into(), ended.output_cut.is_some().into());
    for (name, bytes) in [("stdout", stdout), ("stderr", stderr)] {
        match std::str::from_utf8(bytes) {
            Ok(text) => obj.insert(name.into(), text.into()),
            Err(_) => obj.insert(
                format!("{name}_base64"),
                base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .into(),
            ),
        };
    }
    obj.insert(
        "duration_ms".into(),
        (elapsed.as_secs_f64() * 1000.0).into(),
    );
    serde_json::Value::Object(obj)
}

/// Streams this terminal's stdin to the session from a thread (stdin reads
/// block). On a PTY the end of input is a ^D the user types, not an EOF.
/// With `detach_key`, Ctrl+\ asks to detach instead of reaching the
/// program (and ends the reading: the session is left).
fn spawn_stdin_reader(input: Input, tty: bool, detach_key: bool) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    if !tty {
                        input.blocking_send(ClientMsg::StdinEof);
                    }
                    return;
                }
                Ok(n) => {
                    let data = &buf[..n];
                    let key = detach_key
                        .then(|| memchr::memchr(DETACH_KEY, data))
                        .flatten();
                    let before = &data[..key.unwrap_or(n)];
                    if !before.is_empty() {
                        input.blocking_send(ClientMsg::Stdin(before.to_vec()));
                    }
                    if key.is_some() {
                        input.blocking_send(ClientMsg::Detach);
                        return;
                    }
                }
            }
        }
    });
}

/// With a PTY, Ctrl-C travels as a byte and only window changes need
/// forwarding; with pipes, SIGINT/SIGTERM/SIGHUP go to the process.
fn spawn_signal_forwarding(input: Input, tty: bool) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    if tty {
        let mut winch = signal(SignalKind::window_change())?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                input.send(ClientMsg::Resize(local_winsize())).await;
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
        let input = input.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                input.send(ClientMsg::Signal(number)).await;
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alt_screen_follows_the_last_switch_even_split_between_chunks() {
        let mut screen = AltScreen::default();
        screen.see(b"plain");
        assert!(!screen.on);
        screen.see(b"vim starts \x1b[?10");
        screen.see(b"49h and draws");
        assert!(screen.on, "a switch split between chunks");
        screen.see(b"\x1b[?1049l bye \x1b[?47h");
        assert!(screen.on, "the last switch wins");
        screen.see(b"\x1b[?47l");
        assert!(!screen.on);
    }
}
