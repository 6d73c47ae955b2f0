//! `hull exec` and `hull console`: one session, wired to this terminal or
//! collected for `--json`.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
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
}

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
    let mut c = g.connect().await?;
    let started = Instant::now();
    let tty = opts.tty.then(local_winsize);
    let spec = ExecSpec {
        argv: opts.argv,
        env: opts.env,
        cwd: opts.cwd,
        user: opts.user,
        tty,
    };
    let request = ExecRequest {
        spec,
        linger_ms: opts.linger.map(super::millis),
        timeout_ms: opts.timeout.map(super::millis),
        no_log: opts.no_log,
        detach: opts.detach,
    };
    let start = if opts.detach {
        c.exec_detach(request).await.map(Some)
    } else {
        c.exec_start(request).await.map(|_pid| None)
    };
    match start {
        Ok(Some((id, pid))) => return detached(g, id, pid),
        Ok(None) => {}
        Err(ClientError::Daemon(report)) => {
            let ErrorKind::Spawn(kind) = report.kind else {
                return Err(ClientError::Daemon(report).into());
            };
            // The command's failure, with the code a shell gives it.
            report_error(g.json, daemon_code(report.kind), &report.message);
            return Ok(kind.shell_code());
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
    let raw = if opts.tty { RawTerminal::enter() } else { None };
    if opts.interactive {
        spawn_stdin_reader(tx.clone(), opts.tty);
    } else {
        tx.send(ClientMsg::StdinEof).await?;
    }
    spawn_signal_forwarding(tx.clone(), opts.tty)?;
    let mut sink = if g.json {
        OutputSink::Collect(Vec::new(), Vec::new())
    } else {
        OutputSink::Terminal
    };
    let mut output_cut = None;
    let end = loop {
        match client::next(&mut reader).await {
            Ok(DaemonMsg::Output { stream, data }) => sink.write(stream, &data)?,
            Ok(DaemonMsg::OutputCut { linger_ms }) => output_cut = Some(linger_ms),
            Ok(DaemonMsg::ExecEnded(end)) => break end,
            Ok(other) => bail!(ClientError::Unexpected(format!("{other:?}"))),
            Err(e) => {
                drop(raw);
                if opts.tty {
                    errln!("\r");
                }
                return Err(e.into());
            }
        }
    };
    drop(raw);
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
        ExecEnd::InnerStopped { reason } => {
            if opts.tty {
                errln!("\r");
            }
            return Err(CliError::SessionEnded(reason).into());
        }
    };
    match &sink {
        OutputSink::Collect(stdout, stderr) => {
            print_json(&exec_json(&ended, stdout, stderr, started.elapsed()))?
        }
        OutputSink::Terminal => ended.tell(),
    }
    Ok(ended.code())
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
fn exec_json(ended: &Ended, stdout: &[u8], stderr: &[u8], elapsed: Duration) -> serde_json::Value {
    use base64::Engine;
    let mut obj = serde_json::Map::new();
    obj.insert("exit_code".into(), ended.code().into());
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
fn spawn_stdin_reader(tx: mpsc::Sender<ClientMsg>, tty: bool) {
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
