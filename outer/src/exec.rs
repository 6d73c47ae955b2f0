//! One exec session on a client connection: hulld asks the init to spawn,
//! receives the process's stdio fds, and pumps bytes between them and the
//! client until the process has exited and its output is drained.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use hull_proto::{
    fdpass, ClientMsg, DaemonMsg, ErrorKind, ErrorReport, ExecEnd, ExecRequest, ExitStatus,
    Stream as Out, WinSize, DEFAULT_LINGER_MS,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::launch::{InitEvent, InitProcess, Inner, StartFailure};
use crate::supervisor::{OomCheck, Supervisor};
use hull_logs::{ExecLog, ExecRecorder};

const CHUNK: usize = 64 * 1024;
/// How long to wait for an inner that is starting or bouncing.
const WAIT_FOR_INNER: Duration = Duration::from_secs(10);

fn error(kind: ErrorKind, message: impl Into<String>) -> DaemonMsg {
    DaemonMsg::Error(ErrorReport {
        kind,
        message: message.into(),
    })
}

/// Client stdin chunks buffered towards the process. When full, hulld stops
/// reading the client (backpressure) but keeps pumping output, so a process
/// that writes before it reads can never deadlock the session.
const STDIN_QUEUE: usize = 16;

/// The process's end of things, as hulld holds it.
struct ProcessIo {
    /// Feeds the stdin writer task; dropped on the client's EOF.
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
    /// Kept for resizes after the output side reached end of file.
    tty: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl ProcessIo {
    fn from_fds(fds: Vec<OwnedFd>, tty: bool) -> io::Result<Self> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected fds from init");
        let (tx, rx) = mpsc::channel::<Vec<u8>>(STDIN_QUEUE);
        if tty {
            let [master]: [OwnedFd; 1] = fds.try_into().map_err(|_| bad())?;
            nix::fcntl::fcntl(
                &master,
                nix::fcntl::FcntlArg::F_SETFL(
                    nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_RDWR,
                ),
            )?;
            let master = Arc::new(fdpass::register_async(master)?);
            tokio::spawn(feed_pty(master.clone(), rx));
            return Ok(ProcessIo {
                stdin: Some(tx),
                stdout: None,
                stderr: None,
                master: Some(master.clone()),
                tty: Some(master),
            });
        }
        let [stdin, stdout, stderr]: [OwnedFd; 3] = fds.try_into().map_err(|_| bad())?;
        tokio::spawn(feed_pipe(pipe::Sender::from_owned_fd(stdin)?, rx));
        Ok(ProcessIo {
            stdin: Some(tx),
            stdout: Some(pipe::Receiver::from_owned_fd(stdout)?),
            stderr: Some(pipe::Receiver::from_owned_fd(stderr)?),
            master: None,
            tty: None,
        })
    }

    fn output_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some() || self.master.is_some()
    }

    fn stdin_full(&self) -> bool {
        self.stdin.as_ref().is_some_and(|tx| tx.capacity() == 0)
    }

    /// Queues a chunk; the caller checked there is room.
    fn write_stdin(&mut self, data: Vec<u8>) {
        if let Some(tx) = &self.stdin {
            if tx.try_send(data).is_err() {
                // The writer task ended: the process closed its stdin.
                self.stdin = None;
            }
        }
    }

    fn close_output(&mut self, source: Source) {
        match source {
            Source::Stdout => self.stdout = None,
            Source::Stderr => self.stderr = None,
            Source::Pty => self.master = None,
        }
    }

    /// End of input. On a PTY the terminal stays open (the shell's EOF is a
    /// ^D the user types); on pipes the process sees end of file.
    fn close_stdin(&mut self) {
        if self.tty.is_none() {
            self.stdin = None;
        }
    }

    fn resize(&self, size: WinSize) {
        if let Some(m) = &self.tty {
            let ws = libc::winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; the
            // kernel signals SIGWINCH to the terminal's foreground group.
            unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        }
    }
}

async fn feed_pipe(mut pipe: pipe::Sender, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(chunk) = rx.recv().await {
        if pipe.write_all(&chunk).await.is_err() {
            return;
        }
    }
}

async fn feed_pty(master: Arc<AsyncFd<OwnedFd>>, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(chunk) = rx.recv().await {
        if write_all_fd(&master, &chunk).await.is_err() {
            return;
        }
    }
}

async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| nix::unistd::read(inner.get_ref(), buf).map_err(io::Error::from))
        {
            // EIO: every slave fd is closed; that is a PTY's end of file.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all_fd(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

async fn read_opt_pipe(pipe: Option<&mut pipe::Receiver>, buf: &mut [u8]) -> io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn read_opt_fd(fd: Option<&AsyncFd<OwnedFd>>, buf: &mut [u8]) -> io::Result<usize> {
    match fd {
        Some(fd) => read_fd(fd, buf).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Stdout,
    Stderr,
    Pty,
}

enum Step {
    Client(Option<io::Result<ClientMsg>>),
    Output(Source, io::Result<usize>),
    Event(Option<InitEvent>),
    StdinRoom,
    DrainOver,
    Timeout,
}

/// Runs one exec session to its end. Errors are connection errors: the
/// caller drops the connection.
pub async fn run<R, W>(
    supervisor: &Supervisor,
    exec_log: &ExecLog,
    request: ExecRequest,
    reader: &mut R,
    writer: &mut W,
) -> io::Result<()>
where
    R: Stream<Item = io::Result<ClientMsg>> + Unpin,
    W: Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    let spec = &request.spec;
    let deadline = tokio::time::Instant::now() + WAIT_FOR_INNER;
    let mut stopped: Option<Arc<Inner>> = None;
    loop {
        let Some(inner) = next_inner(supervisor, stopped.as_ref(), deadline).await else {
            let p = supervisor.published();
            let detail = p.last_error.map(|e| format!(": {e}")).unwrap_or_default();
            return writer
                .send(error(
                    ErrorKind::InnerUnavailable,
                    format!("the inner is not running (state {}){detail}", p.state),
                ))
                .await;
        };
        // A request the init never got ran nowhere: it goes to the next
        // inner. One it may have acted on is not repeated.
        let requested = std::time::Instant::now();
        let process = match inner.link.start(spec.clone()).await {
            Ok(p) => p,
            Err(StartFailure::NotSent) => {
                tracing::debug!(
                    generation = inner.generation,
                    "exec raced a stop; retrying on the next inner"
                );
                stopped = Some(inner);
                continue;
            }
            Err(StartFailure::Refused(kind, message)) => {
                return writer.send(error(ErrorKind::Spawn(kind), message)).await
            }
            Err(StartFailure::Lost) => return writer.send(inner_stopped(&inner)).await,
        };
        // Non-interactive execs are also kept in the `exec` log source,
        // unless asked not to; a terminal session is the user's own screen
        // and is not.
        let record =
            (spec.tty.is_none() && !request.no_log).then(|| exec_log.start(&spec.argv, requested));
        let terms = SessionTerms {
            tty: spec.tty.is_some(),
            linger: Duration::from_millis(request.linger_ms.unwrap_or(DEFAULT_LINGER_MS)),
            timeout: request.timeout_ms.map(Duration::from_millis),
            oom: supervisor.oom_check().await,
        };
        return session(&inner, process, terms, record, reader, writer).await;
    }
}

/// Starts `request` with no client attached: answers what a client gets
/// first (`ExecStarted`, or why it did not start) and runs the rest of the
/// session in a task of its own, with no input, its output in the `exec`
/// log only.
pub async fn detach(
    supervisor: Supervisor,
    exec_log: Arc<ExecLog>,
    request: ExecRequest,
) -> DaemonMsg {
    if request.no_log || request.spec.tty.is_some() {
        return error(
            ErrorKind::BadRequest,
            "a detached exec has no terminal, and its log is where its output goes",
        );
    }
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    // The first message goes to the client; the rest (output, the end) is
    // in the log already.
    let writer = futures::sink::unfold(Some(first_tx), |first, msg: DaemonMsg| async move {
        let mut first = first;
        if let Some(tx) = first.take() {
            let _ = tx.send(msg);
        }
        Ok::<_, io::Error>(first)
    });
    tokio::spawn(async move {
        let mut writer = Box::pin(writer);
        let mut reader =
            futures::stream::iter([Ok(ClientMsg::StdinEof)]).chain(futures::stream::pending());
        if let Err(e) = run(&supervisor, &exec_log, request, &mut reader, &mut writer).await {
            tracing::debug!(error = %e, "a detached exec ended with an error");
        }
    });
    first_rx.await.unwrap_or_else(|_| {
        error(
            ErrorKind::Internal,
            "the detached exec ended before it answered",
        )
    })
}

/// The running inner, other than `stopped` (one a request just missed),
/// waiting for one until `deadline`.
async fn next_inner(
    supervisor: &Supervisor,
    stopped: Option<&Arc<Inner>>,
    deadline: tokio::time::Instant,
) -> Option<Arc<Inner>> {
    let mut current = supervisor.watch_current();
    let found = tokio::time::timeout_at(
        deadline,
        current.wait_for(|c| {
            c.as_ref()
                .is_some_and(|c| !stopped.is_some_and(|s| Arc::ptr_eq(c, s)))
        }),
    )
    .await;
    match found {
        Ok(Ok(inner)) => inner.clone(),
        _ => None,
    }
}

/// The end of a session whose inner stopped underneath it.
fn inner_stopped(inner: &Inner) -> DaemonMsg {
    DaemonMsg::ExecEnded(ExecEnd::InnerStopped {
        reason: inner.stop_reason(),
    })
}

/// The terms of one session: whether it has a terminal, how long it may
/// run, how long it passes on output after the process exited (processes
/// it left behind may hold its stdout/stderr, and must not keep the
/// session alive for ever), and how an out-of-memory kill is told.
struct SessionTerms {
    tty: bool,
    linger: Duration,
    timeout: Option<Duration>,
    oom: OomCheck,
}

async fn session<R, W>(
    inner: &Arc<Inner>,
    mut process: InitProcess,
    limits: SessionTerms,
    mut record: Option<ExecRecorder>,
    reader: &mut R,
    writer: &mut W,
) -> io::Result<()>
where
    R: Stream<Item = io::Result<ClientMsg>> + Unpin,
    W: Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    let fds = std::mem::take(&mut process.fds);
    let (id, pid) = (process.id, process.pid);
    let mut exit: Option<ExitStatus> = process.exited;
    let events = &mut process.events;
    let tty = limits.tty;
    let mut io = match ProcessIo::from_fds(fds, tty) {
        Ok(io) => io,
        Err(e) => {
            inner.link.kill(id, libc::SIGKILL).await;
            return writer
                .send(error(ErrorKind::Internal, format!("exec stdio: {e}")))
                .await;
        }
    };
    let exec_id = record.as_ref().map(ExecRecorder::id);
    writer.send(DaemonMsg::ExecStarted { pid, exec_id }).await?;

    let mut out_buf = vec![0u8; CHUNK];
    let mut err_buf = vec![0u8; CHUNK];
    let mut pty_buf = vec![0u8; if tty { CHUNK } else { 0 }];
    let drain = tokio::time::sleep(Duration::from_secs(86400 * 365));
    tokio::pin!(drain);
    if exit.is_some() {
        drain
            .as_mut()
            .reset(tokio::time::Instant::now() + limits.linger);
    }
    let timeout = tokio::time::sleep(limits.timeout.unwrap_or(Duration::from_secs(86400 * 365)));
    tokio::pin!(timeout);
    let mut timed_out = false;
    let mut cut = false;
    loop {
        if exit.is_some() && !io.output_open() {
            break;
        }
        let stdin_full = io.stdin_full();
        let step = {
            let (has_out, has_err, has_pty) = (
                io.stdout.is_some(),
                io.stderr.is_some(),
                io.master.is_some(),
            );
            let stdin_room = async {
                match &io.stdin {
                    Some(tx) => drop(tx.reserve().await),
                    None => std::future::pending().await,
                }
            };
            let (stdout, stderr, master) =
                (io.stdout.as_mut(), io.stderr.as_mut(), io.master.as_deref());
            tokio::select! {
                msg = reader.next(), if !stdin_full => Step::Client(msg),
                _ = stdin_room, if stdin_full => Step::StdinRoom,
                n = read_opt_pipe(stdout, &mut out_buf), if has_out => Step::Output(Source::Stdout, n),
                n = read_opt_pipe(stderr, &mut err_buf), if has_err => Step::Output(Source::Stderr, n),
                n = read_opt_fd(master, &mut pty_buf), if has_pty => Step::Output(Source::Pty, n),
                ev = events.recv(), if exit.is_none() => Step::Event(ev),
                _ = &mut drain, if exit.is_some() => Step::DrainOver,
                _ = &mut timeout, if limits.timeout.is_some() && exit.is_none() && !timed_out => Step::Timeout,
            }
        };
        match step {
            Step::Client(Some(Ok(msg))) => match msg {
                ClientMsg::Stdin(data) => io.write_stdin(data),
                ClientMsg::StdinEof => io.close_stdin(),
                ClientMsg::Resize(size) => io.resize(size),
                ClientMsg::Signal(signal) => {
                    inner.link.kill(id, signal).await;
                }
                other => {
                    writer
                        .send(error(
                            ErrorKind::BadRequest,
                            format!("{other:?} is not allowed during an exec session"),
                        ))
                        .await?;
                }
            },
            Step::Client(Some(Err(e))) => {
                inner.link.kill(id, libc::SIGHUP).await;
                let _ = writer.send(error(ErrorKind::BadFrame, e.to_string())).await;
                return Err(e);
            }
            Step::Client(None) => {
                // The client went away: hang up on the process, as a
                // closing terminal does, and stop pumping.
                inner.link.kill(id, libc::SIGHUP).await;
                if let Some(record) = record {
                    record.finish(None, Some("the client went away; sent SIGHUP"));
                }
                return Ok(());
            }
            Step::Output(source, Ok(n)) if n > 0 => {
                let (stream, buf) = match source {
                    Source::Stderr => (Out::Stderr, &err_buf),
                    Source::Stdout => (Out::Stdout, &out_buf),
                    Source::Pty => (Out::Stdout, &pty_buf),
                };
                if let Some(record) = &mut record {
                    record.push(stream, &buf[..n]);
                }
                writer
                    .send(DaemonMsg::Output {
                        stream,
                        data: buf[..n].to_vec(),
                    })
                    .await?;
            }
            Step::Output(source, _) => io.close_output(source),
            Step::Event(Some(InitEvent::Exited(status))) => {
                exit = Some(status);
                drain
                    .as_mut()
                    .reset(tokio::time::Instant::now() + limits.linger);
            }
            Step::Event(Some(_)) => {}
            Step::Event(None) => {
                if let Some(record) = record {
                    let note = format!("the inner stopped: {}", inner.stop_reason());
                    record.finish(None, Some(&note));
                }
                return writer.send(inner_stopped(inner)).await;
            }
            Step::StdinRoom => {}
            Step::DrainOver => {
                cut = io.output_open();
                break;
            }
            Step::Timeout => {
                timed_out = true;
                inner.link.kill(id, libc::SIGKILL).await;
            }
        }
    }
    if cut {
        writer
            .send(DaemonMsg::OutputCut {
                linger_ms: u64::try_from(limits.linger.as_millis()).unwrap_or(u64::MAX),
            })
            .await?;
    }
    let status = exit.expect("loop ends after exit");
    if let Some(note) = limits.oom.victim_note(status).await {
        writer
            .send(DaemonMsg::Output {
                stream: Out::Stderr,
                data: note.into_bytes(),
            })
            .await?;
    }
    let end = match limits.timeout {
        Some(t) if timed_out => ExecEnd::TimedOut {
            timeout_ms: u64::try_from(t.as_millis()).unwrap_or(u64::MAX),
        },
        _ => ExecEnd::Exited(status),
    };
    if let Some(record) = record {
        let note = match &end {
            ExecEnd::TimedOut { timeout_ms } => Some(format!("timed out after {timeout_ms} ms")),
            _ if cut => Some("output cut after the linger".to_string()),
            _ => None,
        };
        record.finish(Some(status), note.as_deref());
    }
    writer.send(DaemonMsg::ExecEnded(end)).await
}
