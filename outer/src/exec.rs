//! Starting an exec: hulld asks the init to spawn, receives the process's
//! stdio fds ([`crate::process_io`]) and hands them to a session
//! ([`crate::sessions`]), which pumps bytes between them and its clients
//! until the process has exited and its output is drained.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, SinkExt, Stream};
use hull_proto::{
    ClientMsg, DaemonMsg, ErrorKind, ExecEnd, ExecRequest, SessionInfo, DEFAULT_LINGER_MS,
};

use crate::launch::{InitProcess, Inner, StartFailure};
use crate::process_io::ProcessIo;
use crate::sessions::{Outcome, SessionTerms, Sessions, Started};
use crate::supervisor::Supervisor;
use hull_logs::{ExecLog, ExecRecorder};

/// How long to wait for an inner that is starting or bouncing.
const WAIT_FOR_INNER: Duration = Duration::from_secs(10);

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
