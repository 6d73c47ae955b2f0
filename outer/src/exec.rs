//! Starting an exec: hulld asks the init to spawn, receives the process's
//! stdio fds and hands them to a session ([`crate::sessions`]), which pumps
//! bytes between them and its clients until the process has exited and its
//! output is drained.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, SinkExt, Stream};
use hull_proto::{
    fdpass, ClientMsg, DaemonMsg, ErrorKind, ExecEnd, ExecRequest, SessionInfo, WinSize,
    DEFAULT_LINGER_MS,
};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::launch::{InitProcess, Inner, StartFailure};
use crate::sessions::{Outcome, SessionTerms, Sessions, Started};
use crate::supervisor::Supervisor;
use hull_logs::{ExecLog, ExecRecorder};

/// The most output one read of a process's pipe takes, and so the largest
/// `Output` message. Every hop between the pipe and a client's socket
/// (the client's queue, the frame writer, the HTTP API's in-process pipe,
/// its frame reader, the WebSocket's write buffer) holds up to one such
/// message while the client does not read: at 64 KiB an exec whose client
/// never read cost hulld about 730 KiB, at 16 KiB about 200 KiB.
pub(crate) const CHUNK: usize = 16 * 1024;
/// How long to wait for an inner that is starting or bouncing.
const WAIT_FOR_INNER: Duration = Duration::from_secs(10);

/// Client stdin chunks buffered towards the process. When full, hulld stops
/// reading the client (backpressure) but keeps pumping output, so a process
/// that writes before it reads can never deadlock the session.
const STDIN_QUEUE: usize = 16;

/// Input for the process, as its clients send it.
pub(crate) enum Input {
    Data(Vec<u8>),
    /// A new terminal size, in the same queue as the input so that a
    /// process reads its input with the size the client had set before
    /// sending it (`stty size` after a resize and a newline).
    Resize(WinSize),
    /// End of input. On a PTY the terminal stays open (the shell's EOF is
    /// a ^D the user types); on pipes the process sees end of file.
    Eof,
}

/// The process's output end of things, as hulld holds it; its input is
/// the sender [`ProcessIo::from_fds`] returns beside it.
pub(crate) struct ProcessIo {
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    pub master: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl ProcessIo {
    fn from_fds(fds: Vec<OwnedFd>, tty: bool) -> io::Result<(Self, mpsc::Sender<Input>)> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected fds from init");
        let (tx, rx) = mpsc::channel::<Input>(STDIN_QUEUE);
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
            let io = ProcessIo {
                stdout: None,
                stderr: None,
                master: Some(master),
            };
            return Ok((io, tx));
        }
        let [stdin, stdout, stderr]: [OwnedFd; 3] = fds.try_into().map_err(|_| bad())?;
        tokio::spawn(feed_pipe(pipe::Sender::from_owned_fd(stdin)?, rx));
        let io = ProcessIo {
            stdout: Some(pipe::Receiver::from_owned_fd(stdout)?),
            stderr: Some(pipe::Receiver::from_owned_fd(stderr)?),
            master: None,
        };
        Ok((io, tx))
    }

    pub fn output_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some() || self.master.is_some()
    }

    pub fn close_output(&mut self, source: Source) {
        match source {
            Source::Stdout => self.stdout = None,
            Source::Stderr => self.stderr = None,
            Source::Pty => self.master = None,
        }
    }
}

/// Sets the terminal size on a PTY's master; the kernel signals SIGWINCH
/// to the terminal's foreground group.
fn set_winsize(master: &AsyncFd<OwnedFd>, size: WinSize) {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

async fn feed_pipe(mut pipe: pipe::Sender, mut rx: mpsc::Receiver<Input>) {
    while let Some(input) = rx.recv().await {
        match input {
            Input::Data(chunk) => {
                if pipe.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            // Dropping the pipe is the process's end of file.
            Input::Eof => return,
            Input::Resize(_) => {}
        }
    }
}

async fn feed_pty(master: Arc<AsyncFd<OwnedFd>>, mut rx: mpsc::Receiver<Input>) {
    while let Some(input) = rx.recv().await {
        match input {
            Input::Data(chunk) => {
                if write_all_fd(&master, &chunk).await.is_err() {
                    return;
                }
            }
            Input::Resize(size) => set_winsize(&master, size),
            Input::Eof => {}
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

/// The next output of `pipe`, up to `max` bytes, read straight into the
/// buffer that becomes its message (empty at the end of file). Memory is
/// taken only once there is something to read, and no buffer is kept
/// between reads. Cancel-safe: nothing is read before the last await.
pub(crate) async fn read_opt_pipe(
    pipe: Option<&pipe::Receiver>,
    max: usize,
) -> io::Result<Vec<u8>> {
    let Some(pipe) = pipe else {
        return std::future::pending().await;
    };
    loop {
        pipe.readable().await?;
        let mut data = Vec::with_capacity(max);
        match pipe.try_read_buf(&mut data) {
            Ok(_) => {
                // A short read keeps only its bytes: a queued message is
                // counted by its length.
                if data.capacity() - data.len() > data.len() {
                    data.shrink_to_fit();
                }
                return Ok(data);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

pub(crate) async fn read_opt_fd(
    fd: Option<&AsyncFd<OwnedFd>>,
    buf: &mut [u8],
) -> io::Result<usize> {
    match fd {
        Some(fd) => read_fd(fd, buf).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Source {
    Stdout,
    Stderr,
    Pty,
}

/// Starts an exec as a session with this connection as its first client
/// and carries it until it ends or the client detaches or goes. Errors are
/// connection errors: the caller drops the connection.
pub async fn run<R, W>(
    supervisor: &Supervisor,
    sessions: &Sessions,
    exec_log: &ExecLog,
    request: ExecRequest,
    started_by: &str,
    reader: &mut R,
    writer: &mut W,
) -> io::Result<Outcome>
where
    R: Stream<Item = io::Result<ClientMsg>> + Unpin,
    W: Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    let spec = &request.spec;
    let mut slot = match sessions.reserve(spec.tty.is_some()) {
        Ok(slot) => Some(slot),
        Err(e) => {
            writer
                .send(DaemonMsg::error(ErrorKind::Busy, e.to_string()))
                .await?;
            return Ok(Outcome::Ended);
        }
    };
    let deadline = tokio::time::Instant::now() + WAIT_FOR_INNER;
    let mut stopped: Option<Arc<Inner>> = None;
    loop {
        let Some(inner) = next_inner(supervisor, stopped.as_ref(), deadline).await else {
            let p = supervisor.published();
            let detail = p.last_error.map(|e| format!(": {e}")).unwrap_or_default();
            writer
                .send(DaemonMsg::error(
                    ErrorKind::InnerUnavailable,
                    format!("the inner is not running (state {}){detail}", p.state),
                ))
                .await?;
            return Ok(Outcome::Ended);
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
                writer
                    .send(DaemonMsg::error(ErrorKind::Spawn(kind), message))
                    .await?;
                return Ok(Outcome::Ended);
            }
            Err(StartFailure::Lost) => {
                writer.send(inner_stopped(&inner)).await?;
                return Ok(Outcome::Ended);
            }
        };
        // Non-interactive execs are also kept in the `exec` log source,
        // unless asked not to; a terminal session is the user's own screen
        // and is not.
        let record =
            (spec.tty.is_none() && !request.no_log).then(|| exec_log.start(&spec.argv, requested));
        let exec_id = record.as_ref().map(ExecRecorder::id);
        let terms = SessionTerms {
            tty: spec.tty.is_some(),
            linger: Duration::from_millis(request.linger_ms.unwrap_or(DEFAULT_LINGER_MS)),
            timeout: request.timeout_ms.map(Duration::from_millis),
            max_run_after_disconnect: request
                .max_run_after_disconnect_ms
                .map(Duration::from_millis),
            background: request.detach,
            oom: supervisor.oom_check().await,
            port_events: request.port_events,
        };
        let slot = slot.take().expect("a session starts once");
        let Some(mut started) =
            begin(inner, process, terms, record, slot, &request, writer).await?
        else {
            return Ok(Outcome::Ended);
        };
        started.info.started_by = started_by.to_string();
        let attachment = sessions.start(started);
        writer
            .send(DaemonMsg::ExecStarted {
                pid: attachment.info.pid,
                session: attachment.id,
                exec_id,
            })
            .await?;
        if request.detach {
            attachment.leave_in_background().await;
            return Ok(Outcome::Detached);
        }
        return attachment.pump(reader, writer).await;
    }
}

/// The process's fds made into a session's parts; `None` (and the client
/// told why) when they are unusable.
async fn begin<W>(
    inner: Arc<Inner>,
    mut process: InitProcess,
    terms: SessionTerms,
    record: Option<ExecRecorder>,
    slot: crate::sessions::SessionSlot,
    request: &ExecRequest,
    writer: &mut W,
) -> io::Result<Option<Started>>
where
    W: Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    let fds = std::mem::take(&mut process.fds);
    let (io, stdin) = match ProcessIo::from_fds(fds, terms.tty) {
        Ok(io) => io,
        Err(e) => {
            inner.link.kill(process.id, libc::SIGKILL).await;
            writer
                .send(DaemonMsg::error(
                    ErrorKind::Internal,
                    format!("exec stdio: {e}"),
                ))
                .await?;
            return Ok(None);
        }
    };
    let now = hull_checkpoint::catalog::now_ms();
    let info = SessionInfo {
        id: process.id,
        argv: request.spec.argv.clone(),
        cwd: request.spec.cwd.clone(),
        tty: terms.tty,
        pid: process.pid,
        created_ms: now,
        last_activity_ms: now,
        clients: 0,
        output_bytes: 0,
        scrollback_bytes: 0,
        max_run_after_disconnect_ms: request.max_run_after_disconnect_ms,
        // Who asked is the connection's, not the request's: the caller
        // of `begin` sets it.
        started_by: String::new(),
    };
    Ok(Some(Started {
        inner,
        process,
        io,
        stdin,
        terms,
        record,
        info,
        slot,
    }))
}

/// Starts `request` with no client attached: answers what a client gets
/// first (`ExecStarted`, or why it did not start); the session runs on
/// with its input ended and its output in the `exec` log (and with
/// whoever attaches).
pub async fn detach(
    supervisor: Supervisor,
    sessions: Sessions,
    exec_log: Arc<ExecLog>,
    request: ExecRequest,
    started_by: &str,
) -> DaemonMsg {
    if request.no_log || request.spec.tty.is_some() {
        return DaemonMsg::error(
            ErrorKind::BadRequest,
            "a detached exec has no terminal, and its log is where its output goes",
        );
    }
    // The session leaves its client as soon as it started: the answer is
    // the one message written.
    let mut sent: Vec<DaemonMsg> = Vec::new();
    let mut writer = (&mut sent).sink_map_err(|never| -> io::Error { match never {} });
    let mut reader = futures::stream::pending();
    let ran = run(
        &supervisor,
        &sessions,
        &exec_log,
        request,
        started_by,
        &mut reader,
        &mut writer,
    )
    .await;
    drop(writer);
    match (ran, sent.into_iter().next()) {
        (Ok(_), Some(msg)) => msg,
        (Err(e), _) => DaemonMsg::error(ErrorKind::Internal, format!("the detached exec: {e}")),
        (Ok(_), None) => DaemonMsg::error(
            ErrorKind::Internal,
            "the detached exec ended before it answered",
        ),
    }
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
