//! hulld's side of the init link: requests to the inner init, and its
//! reports and fds dispatched to the exec or service that each is for.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use crate::lock;
use futures::{SinkExt, StreamExt};
use hull_proto::fdpass::FdReceiver;
use hull_proto::{ExecSpec, ExitStatus, FrameWriter, FromInit, SpawnErrorKind, ToInit};
use hull_services::SpawnFailure;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

use super::pidfd::pidfd_send_signal;

/// What the init link delivers to one exec session.
#[derive(Debug)]
pub enum InitEvent {
    /// The init read the `Spawn`: from here on it may have run.
    Received,
    Spawned(i32),
    SpawnFailed(SpawnErrorKind, String),
    Fds(Vec<OwnedFd>),
    Exited(ExitStatus),
}

type Sessions = HashMap<u64, mpsc::UnboundedSender<InitEvent>>;

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A process the init started for hulld; unregistered from the link on drop.
pub struct InitProcess {
    pub id: u64,
    /// The pid inside the inner.
    pub pid: i32,
    /// [stdin writer, stdout reader, stderr reader], or [PTY master].
    pub fds: Vec<OwnedFd>,
    /// Set when it exited before its fds arrived.
    pub exited: Option<ExitStatus>,
    /// Later reports about it (its exit).
    pub events: mpsc::UnboundedReceiver<InitEvent>,
    link: Arc<InitLink>,
}

impl Drop for InitProcess {
    fn drop(&mut self) {
        self.link.unregister(self.id);
    }
}

/// Why [`InitLink::start`] has no process.
#[derive(Debug)]
pub enum StartFailure {
    /// The inner refused (missing program, bad cwd, unknown user).
    Refused(SpawnErrorKind, String),
    /// The inner was gone before the init read the request: nothing ran.
    NotSent,
    /// The inner went away after the init read the request: it may have run.
    Lost,
}

/// hulld's side of the link to one inner init.
pub struct InitLink {
    writer: tokio::sync::Mutex<FrameWriter<OwnedWriteHalf, ToInit>>,
    /// `None` once the link is closed: every session's channel is dropped.
    sessions: Mutex<Option<Sessions>>,
}

impl InitLink {
    pub(super) fn new(writer: FrameWriter<OwnedWriteHalf, ToInit>) -> Self {
        InitLink {
            writer: tokio::sync::Mutex::new(writer),
            sessions: Mutex::new(Some(HashMap::new())),
        }
    }

    /// Asks the init to run `spec` and waits for its pid and stdio fds.
    pub async fn spawn(self: &Arc<Self>, spec: ExecSpec) -> Result<InitProcess, SpawnFailure> {
        self.start(spec).await.map_err(|e| match e {
            StartFailure::Refused(kind, message) => SpawnFailure::Refused(kind, message),
            StartFailure::NotSent | StartFailure::Lost => SpawnFailure::InnerGone,
        })
    }

    /// Like [`InitLink::spawn`], telling apart a request the init never got
    /// (safe to run elsewhere) from one it may have acted on.
    pub async fn start(self: &Arc<Self>, spec: ExecSpec) -> Result<InitProcess, StartFailure> {
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(events) = self.register(id) else {
            return Err(StartFailure::NotSent);
        };
        // From here on the guard's drop unregisters `id` on every path.
        let mut process = InitProcess {
            id,
            pid: 0,
            fds: Vec::new(),
            exited: None,
            events,
            link: self.clone(),
        };
        // A failed write delivers no whole frame: the init cannot act on it.
        if self.send(ToInit::Spawn { id, spec }).await.is_err() {
            return Err(StartFailure::NotSent);
        }
        let (mut pid, mut fds, mut received) = (None, None, false);
        while pid.is_none() || fds.is_none() {
            match process.events.recv().await {
                Some(InitEvent::Received) => received = true,
                Some(InitEvent::Spawned(p)) => pid = Some(p),
                Some(InitEvent::Fds(f)) => fds = Some(f),
                Some(InitEvent::Exited(s)) => process.exited = Some(s),
                Some(InitEvent::SpawnFailed(kind, message)) => {
                    return Err(StartFailure::Refused(kind, message))
                }
                None if received => return Err(StartFailure::Lost),
                // The init died with the request unread.
                None => return Err(StartFailure::NotSent),
            }
        }
        process.pid = pid.unwrap_or_default();
        process.fds = fds.unwrap_or_default();
        Ok(process)
    }

    /// Registers exec `id`; `None` when the inner is already gone.
    fn register(&self, id: u64) -> Option<mpsc::UnboundedReceiver<InitEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sessions = lock(&self.sessions);
        sessions.as_mut()?.insert(id, tx);
        Some(rx)
    }

    fn unregister(&self, id: u64) {
        if let Some(s) = lock(&self.sessions).as_mut() {
            s.remove(&id);
        }
    }

    /// Signals the process group of exec `id` (the init ignores an id whose
    /// process is gone).
    pub async fn kill(&self, id: u64, signal: i32) {
        let _ = self.send(ToInit::Kill { id, signal }).await;
    }

    pub async fn send(&self, msg: ToInit) -> io::Result<()> {
        self.writer.lock().await.send(msg).await
    }

    fn dispatch(&self, id: u64, event: InitEvent) {
        if let Some(tx) = lock(&self.sessions).as_ref().and_then(|s| s.get(&id)) {
            let _ = tx.send(event);
        }
    }

    fn close(&self) {
        lock(&self.sessions).take();
    }
}

impl InitProcess {
    /// Waits for the exit; `None` when the inner went away first.
    pub async fn wait_exit(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.exited {
            return Some(status);
        }
        loop {
            match self.events.recv().await {
                Some(InitEvent::Exited(status)) => return Some(status),
                Some(_) => continue,
                None => return None,
            }
        }
    }
}

/// Dispatches the init's reports. The link ends when the init dies, or when
/// it sends something undecodable: an init that cannot be understood cannot
/// be trusted with the inner, so it is killed and the supervisor restarts
/// the inner.
pub(super) async fn read_link(
    mut reader: hull_proto::FrameReader<tokio::net::unix::OwnedReadHalf, FromInit>,
    link: Arc<InitLink>,
    pidfd: OwnedFd,
) {
    loop {
        let msg = match reader.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                tracing::error!(error = %e, "undecodable frame from the inner init; killing the inner");
                let _ = pidfd_send_signal(&pidfd, libc::SIGKILL);
                break;
            }
            None => break,
        };
        match msg {
            FromInit::Received { id } => link.dispatch(id, InitEvent::Received),
            FromInit::Spawned { id, pid } => link.dispatch(id, InitEvent::Spawned(pid)),
            FromInit::SpawnFailed { id, kind, message } => {
                link.dispatch(id, InitEvent::SpawnFailed(kind, message))
            }
            FromInit::Exited { id, status } => link.dispatch(id, InitEvent::Exited(status)),
            FromInit::Hello(_) | FromInit::Ready { .. } | FromInit::SetupFailed { .. } => {}
        }
    }
    link.close();
}

pub(super) async fn read_fds(receiver: FdReceiver, link: Arc<InitLink>) {
    while let Ok(Some((id, fds))) = receiver.recv().await {
        link.dispatch(id, InitEvent::Fds(fds));
    }
}
