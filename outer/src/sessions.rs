//! Exec sessions that outlive their clients. Each running exec is a task
//! that owns its process's fds and reads its output whether or not anyone
//! is attached; clients attach and detach. The registry maps ids to those
//! tasks' handles and is the only shared state: a session's own state
//! (clients, scrollback, writer) lives in its task alone.
//!
//! Output goes to each client through a queue bounded in bytes
//! ([`CLIENT_QUEUE_BYTES`]). A watcher that lets its queue fill is cut;
//! the writer is waited for (backpressure, as a plain exec has always
//! had), with a terminal session only for [`WRITER_STALL`] before it is
//! cut too, so nothing grows without bound and a detached terminal never
//! stalls its process.
//!
//! hulld holds at most `daemon.max_sessions` sessions, and the terminal
//! sessions share `daemon.scrollback_total` bytes of scrollback: each
//! keeps up to [`SCROLLBACK`], less when many are open, and gives back
//! what it holds past its share as soon as another one starts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hull_checkpoint::catalog::now_ms;

use futures::{Sink, SinkExt, Stream, StreamExt};
use hull_proto::{
    ClientMsg, DaemonMsg, ErrorKind, ExecEnd, ExitStatus, PortNotice, SessionInfo, Stream as Out,
    DEFAULT_DETACHED_RUN_MS,
};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::launch::{InitEvent, InitProcess, Inner};
use crate::port_events::{PortChange, PortEvents};
use crate::process_io::{Input, ProcessIo, Source, CHUNK};
use crate::supervisor::OomCheck;
use hull_logs::ExecRecorder;

/// Commands queued towards one session.
const COMMAND_QUEUE: usize = 64;
/// What a message costs in a client's queue beside its output's bytes, so
/// that a queue of small messages is bounded too.
const MESSAGE_COST: usize = 256;
/// Bytes queued towards one client: two of the largest output chunks,
/// so the session reads on while the connection writes one.
const CLIENT_QUEUE_BYTES: usize = 2 * (CHUNK + MESSAGE_COST);
/// The least a pipe is read for: below it, the session waits for the
/// writer's queue to have room for this much.
const MIN_PIPE_READ: usize = CHUNK / 4;
/// What a read of [`MIN_PIPE_READ`] costs in a client's queue.
#[allow(clippy::cast_possible_truncation, reason = "a few KiB")]
const PIPE_READ_COST: u32 = (MIN_PIPE_READ + MESSAGE_COST) as u32;
/// The most a terminal session reads at once: the line discipline's
/// buffer (N_TTY_BUF_SIZE) seldom gives more, and an idle session holds it.
const PTY_CHUNK: usize = 4 * 1024;
/// Output of a terminal session kept for replay on attach, at most: less
/// when `daemon.scrollback_total` is shared by many.
pub const SCROLLBACK: usize = 1 << 20;
/// How long a terminal session waits for a writer that reads nothing
/// before it cuts the writer off.
const WRITER_STALL: Duration = Duration::from_secs(5);
/// How long the end of a session waits for a watcher's queue.
const WATCHER_END_WAIT: Duration = Duration::from_secs(1);
/// After the SIGKILL of a kill whose signal was not enough.
const AFTER_SIGKILL: Duration = Duration::from_secs(5);
/// A timer that never fires in practice.
const NEVER: Duration = Duration::from_secs(86400 * 365);

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// A client's requests, as a connection reads them.
pub trait Requests: Stream<Item = io::Result<ClientMsg>> + Unpin {}
impl<T: Stream<Item = io::Result<ClientMsg>> + Unpin> Requests for T {}

/// Where a client's replies go.
pub trait Replies: Sink<DaemonMsg, Error = io::Error> + Unpin {}
impl<T: Sink<DaemonMsg, Error = io::Error> + Unpin> Replies for T {}

/// The running sessions by id.
#[derive(Clone)]
pub struct Sessions {
    map: Arc<Mutex<BTreeMap<u64, Handle>>>,
    /// New and closed listening ports, for sessions that pass them on.
    ports: Option<Arc<PortEvents>>,
    bounds: Arc<Bounds>,
}

/// What all sessions together may hold (the `[daemon]` table).
#[derive(Debug, Clone, Copy)]
pub struct SessionBounds {
    /// `daemon.max_sessions`.
    pub max_sessions: usize,
    /// `daemon.scrollback_total`, in bytes.
    pub scrollback_total: usize,
}

/// The sessions' shared counts, which [`SessionSlot`]s hold a share of.
struct Bounds {
    limits: SessionBounds,
    /// Sessions started or starting.
    open: AtomicUsize,
    /// Terminal sessions among them: they share the scrollback.
    terminals: Mutex<usize>,
    /// What each terminal session may keep now.
    scrollback: watch::Sender<usize>,
}

impl Bounds {
    fn new(limits: SessionBounds) -> Self {
        Bounds {
            limits,
            open: AtomicUsize::new(0),
            terminals: Mutex::new(0),
            scrollback: watch::Sender::new(SCROLLBACK.min(limits.scrollback_total)),
        }
    }

    fn count_terminal(&self, change: impl FnOnce(usize) -> usize) {
        let mut terminals = crate::lock(&self.terminals);
        *terminals = change(*terminals);
        let share = (self.limits.scrollback_total / (*terminals).max(1)).min(SCROLLBACK);
        self.scrollback.send_if_modified(|limit| {
            let changed = *limit != share;
            *limit = share;
            changed
        });
    }
}

/// One session's share of [`SessionBounds`], taken before its process is
/// spawned and given back when the session ends.
pub(crate) struct SessionSlot {
    bounds: Arc<Bounds>,
    terminal: bool,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.bounds.open.fetch_sub(1, Ordering::AcqRel);
        if self.terminal {
            self.bounds.count_terminal(|n| n.saturating_sub(1));
        }
    }
}

#[derive(Clone)]
struct Handle {
    commands: mpsc::Sender<Command>,
    info: watch::Receiver<SessionInfo>,
}

/// Why a kill or attach found nothing, or an exec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no session {0} (`hull sessions list` shows the running ones)")]
    NotFound(u64),
    #[error("exec refused: {0} exec sessions are open (attached or detached), the most daemon.max_sessions allows; end one (`hull sessions list`, `hull sessions kill ID`) or raise daemon.max_sessions")]
    TooMany(usize),
}

impl Sessions {
    pub fn new(ports: Arc<PortEvents>, bounds: SessionBounds) -> Self {
        Sessions {
            map: Arc::default(),
            ports: Some(ports),
            bounds: Arc::new(Bounds::new(bounds)),
        }
    }

    /// A slot for a new session, before its process is spawned; refused
    /// when `daemon.max_sessions` are open.
    pub(crate) fn reserve(&self, terminal: bool) -> Result<SessionSlot, SessionError> {
        let max = self.bounds.limits.max_sessions;
        self.bounds
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| SessionError::TooMany(max))?;
        if terminal {
            self.bounds.count_terminal(|n| n + 1);
        }
        Ok(SessionSlot {
            bounds: self.bounds.clone(),
            terminal,
        })
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        crate::lock(&self.map)
            .values()
            .map(|h| h.info.borrow().clone())
            .collect()
    }

    fn get(&self, id: u64) -> Result<Handle, SessionError> {
        crate::lock(&self.map)
            .get(&id)
            .cloned()
            .ok_or(SessionError::NotFound(id))
    }

    fn remove(&self, id: u64) {
        crate::lock(&self.map).remove(&id);
    }

    /// Attaches a new client to session `id`.
    pub async fn attach(
        &self,
        id: u64,
        writer: bool,
        watch: bool,
    ) -> Result<Attachment, SessionError> {
        let handle = self.get(id)?;
        let (reply, answer) = oneshot::channel();
        handle
            .commands
            .send(Command::Attach {
                writer,
                watch,
                reply,
            })
            .await
            .map_err(|_| SessionError::NotFound(id))?;
        answer.await.map_err(|_| SessionError::NotFound(id))
    }

    /// Sends `signal` to session `id`'s process and waits for the session
    /// to end; SIGKILL if it has not after `timeout`. True: it took the
    /// SIGKILL.
    pub async fn kill(
        &self,
        id: u64,
        signal: i32,
        timeout: Duration,
    ) -> Result<bool, SessionError> {
        let handle = self.get(id)?;
        let mut ended = handle.info.clone();
        let send = |signal| {
            handle.commands.send(Command::Signal {
                client: None,
                signal,
            })
        };
        if send(signal).await.is_err() {
            return Ok(false);
        }
        let wait_end = |ended: &mut watch::Receiver<SessionInfo>, limit| {
            let mut ended = ended.clone();
            async move {
                tokio::time::timeout(limit, async { while ended.changed().await.is_ok() {} })
                    .await
                    .is_ok()
            }
        };
        if wait_end(&mut ended, timeout).await {
            return Ok(false);
        }
        let _ = send(libc::SIGKILL).await;
        wait_end(&mut ended, AFTER_SIGKILL).await;
        Ok(true)
    }

    /// Registers a session that has just started and runs it in a task
    /// of its own; the caller is its first client, and its writer.
    pub(crate) fn start(&self, started: Started) -> Attachment {
        let Started {
            inner,
            mut process,
            io,
            stdin,
            terms,
            record,
            info,
            slot,
        } = started;
        let id = info.id;
        let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (info_tx, info_rx) = watch::channel(info);
        let writer = Arc::new(AtomicU64::new(0));
        let link = Link {
            commands: commands.clone(),
            stdin,
            writer,
        };
        let mut session = Session {
            id,
            inner,
            process_id: process.id,
            exit: process.exited,
            events: std::mem::replace(&mut process.events, mpsc::unbounded_channel().1),
            _process: process,
            io,
            scrollback: terms
                .tty
                .then(|| Scrollback::new(*self.bounds.scrollback.borrow())),
            scrollback_share: self.bounds.scrollback.subscribe(),
            _slot: slot,
            terms,
            record,
            clients: Vec::new(),
            link,
            registry: self.clone(),
            info: info_tx,
            pending: None,
            orphaned_for: None,
            ports: None,
            ports_reported: BTreeSet::new(),
        };
        session.ports = self
            .ports
            .as_ref()
            .filter(|_| session.terms.port_events)
            .map(|p| p.subscribe());
        let first = session.add_client(true, false);
        crate::lock(&self.map).insert(
            id,
            Handle {
                commands,
                info: info_rx,
            },
        );
        tokio::spawn(async move {
            session.run(commands_rx).await;
        });
        first
    }
}

/// What [`Sessions::start`] takes over from the exec that spawned it.
pub(crate) struct Started {
    pub inner: Arc<Inner>,
    pub process: InitProcess,
    pub io: ProcessIo,
    pub stdin: mpsc::Sender<Input>,
    pub terms: SessionTerms,
    pub record: Option<ExecRecorder>,
    pub info: SessionInfo,
    pub slot: SessionSlot,
}

/// The terms of one session: whether it has a terminal, how long it may
/// run, how long it passes on output after the process exited (processes
/// it left behind may hold its stdout/stderr, and must not keep the
/// session alive for ever), how long it runs on with no client, and how
/// an out-of-memory kill is told.
pub(crate) struct SessionTerms {
    pub tty: bool,
    pub linger: Duration,
    pub timeout: Option<Duration>,
    pub max_run_after_disconnect: Option<Duration>,
    /// Started with `detach`: it runs until it exits, reading its output
    /// (into the `exec` log) with or without a client.
    pub background: bool,
    pub oom: OomCheck,
    /// Tell clients when the command's processes open or close a port.
    pub port_events: bool,
}

impl SessionTerms {
    /// How long the session runs on once its last client has gone;
    /// `None`: until its process exits.
    fn run_on(&self, explicit: bool) -> Option<Duration> {
        match (self.max_run_after_disconnect, self.tty, explicit) {
            _ if self.background => None,
            (Some(d), _, _) => Some(d),
            (None, true, _) => None,
            (None, false, true) => Some(Duration::from_millis(DEFAULT_DETACHED_RUN_MS)),
            // A plain exec ends with its client, as it always has.
            (None, false, false) => Some(Duration::ZERO),
        }
    }
}

enum Command {
    Attach {
        writer: bool,
        watch: bool,
        reply: oneshot::Sender<Attachment>,
    },
    /// `client: None`: a kill, honoured whoever asks.
    Signal { client: Option<u64>, signal: i32 },
    /// `done` is answered once the client is gone from the session, so
    /// whoever detached sees it gone in the list.
    Detach {
        client: u64,
        explicit: bool,
        done: Option<oneshot::Sender<()>>,
    },
}

/// A client's way into its session.
#[derive(Clone)]
struct Link {
    commands: mpsc::Sender<Command>,
    /// The process's input, shared by the clients: only the writer's
    /// connection sends on it, and a full queue holds back that client
    /// alone while output still flows.
    stdin: mpsc::Sender<Input>,
    /// The writer's client id; 0 when nobody is attached.
    writer: Arc<AtomicU64>,
}

/// The end of a session as a client's connection holds it.
pub struct Attachment {
    pub id: u64,
    client: u64,
    pub info: SessionInfo,
    pub writer: bool,
    queue: mpsc::UnboundedReceiver<Queued>,
    link: Link,
    detached: bool,
}

/// How a connection's part in a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The session ended and the client was told.
    Ended,
    /// The client detached; the connection serves requests again.
    Detached,
    /// The client hung up, or was cut off.
    Gone,
}

impl Attachment {
    /// What an attaching client is told first.
    pub fn attached(&self) -> DaemonMsg {
        DaemonMsg::SessionAttached {
            info: self.info.clone(),
            writer: self.writer,
        }
    }

    fn is_writer(&self) -> bool {
        self.link.writer.load(Ordering::Acquire) == self.client
    }

    async fn command(&self, command: Command) {
        let _ = self.link.commands.send(command).await;
    }

    /// Carries the session over the client's connection until it ends,
    /// the client detaches or goes. Errors are connection errors.
    pub async fn pump(
        mut self,
        reader: &mut impl Requests,
        writer: &mut impl Replies,
    ) -> io::Result<Outcome> {
        // Input waiting for room in the process's queue: the client is not
        // read meanwhile, but output still flows, so a process that writes
        // before it reads never deadlocks the session.
        let mut pending: Option<Input> = None;
        loop {
            let stdin = self.link.stdin.clone();
            tokio::select! {
                msg = reader.next(), if pending.is_none() => match msg {
                    Some(Ok(ClientMsg::Stdin(data))) => {
                        if self.is_writer() {
                            pending = Some(Input::Data(data));
                        }
                    }
                    Some(Ok(ClientMsg::StdinEof)) => {
                        if self.is_writer() {
                            pending = Some(Input::Eof);
                        }
                    }
                    Some(Ok(ClientMsg::Resize(size))) => {
                        if self.is_writer() {
                            pending = Some(Input::Resize(size));
                        }
                    }
                    Some(Ok(ClientMsg::Signal(signal))) => {
                        self.command(Command::Signal { client: Some(self.client), signal }).await
                    }
                    Some(Ok(ClientMsg::Detach)) => {
                        self.detach(true).await;
                        writer.send(DaemonMsg::Detached { id: self.id }).await?;
                        return Ok(Outcome::Detached);
                    }
                    Some(Ok(other)) => {
                        writer
                            .send(DaemonMsg::error(
                                ErrorKind::BadRequest,
                                format!("{other:?} is not allowed during an exec session"),
                            ))
                            .await?;
                    }
                    Some(Err(e)) => {
                        self.detach(false).await;
                        let _ = writer.send(DaemonMsg::error(ErrorKind::BadFrame, e.to_string())).await;
                        return Err(e);
                    }
                    None => {
                        self.detach(false).await;
                        return Ok(Outcome::Gone);
                    }
                },
                permit = stdin.reserve(), if pending.is_some() => {
                    // An error: the process closed its input; what was
                    // for it goes nowhere.
                    if let (Ok(permit), Some(input)) = (permit, pending.take()) {
                        permit.send(input);
                    }
                }
                out = self.queue.recv() => match out {
                    Some(Queued { msg, room }) => {
                        let end = matches!(msg, DaemonMsg::ExecEnded(_));
                        writer.send(msg).await?;
                        // The bytes count against the queue until the
                        // connection has taken them.
                        drop(room);
                        if end {
                            self.detached = true;
                            return Ok(Outcome::Ended);
                        }
                    }
                    None => {
                        self.detached = true;
                        writer
                            .send(DaemonMsg::error(
                                ErrorKind::Busy,
                                format!(
                                    "this client fell too far behind the output of session {} and was detached from it; `hull sessions attach {}` attaches again",
                                    self.id, self.id
                                ),
                            ))
                            .await?;
                        return Ok(Outcome::Gone);
                    }
                },
            }
        }
    }

    /// Leaves a session started in the background: its input ends, and it
    /// runs on with no client.
    pub async fn leave_in_background(mut self) {
        let _ = self.link.stdin.send(Input::Eof).await;
        self.detach(true).await;
    }

    /// Leaves the session, returning once it has let this client go.
    async fn detach(&mut self, explicit: bool) {
        self.detached = true;
        let (done, gone) = oneshot::channel();
        self.command(Command::Detach {
            client: self.client,
            explicit,
            done: Some(done),
        })
        .await;
        // An error: the session ended, and its clients with it.
        let _ = gone.await;
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        // The connection died mid-session (a write failed): the session
        // must still learn its client is gone.
        let command = Command::Detach {
            client: self.client,
            explicit: false,
            done: None,
        };
        if let Err(mpsc::error::TrySendError::Full(command)) = self.link.commands.try_send(command)
        {
            let commands = self.link.commands.clone();
            tokio::spawn(async move {
                let _ = commands.send(command).await;
            });
        }
    }
}

/// The last `limit` bytes of a terminal session's output; grows as
/// output comes, so an idle session holds only what it wrote, and never
/// holds room for more than its limit.
struct Scrollback {
    ring: VecDeque<u8>,
    limit: usize,
}

impl Scrollback {
    fn new(limit: usize) -> Self {
        Scrollback {
            ring: VecDeque::new(),
            limit,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(self.limit)..];
        let over = (self.ring.len() + data.len()).saturating_sub(self.limit);
        self.ring.drain(..over);
        let need = self.ring.len() + data.len();
        if self.ring.capacity() < need {
            // Doubling as a Vec does, but never past the limit.
            let room = (self.ring.capacity() * 2).clamp(need, self.limit.max(need));
            self.ring.reserve_exact(room - self.ring.len());
        }
        self.ring.extend(data);
    }

    /// Keeps only the last `limit` bytes from now on, and gives back the
    /// memory past them.
    fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
        let over = self.ring.len().saturating_sub(limit);
        self.ring.drain(..over);
        if self.ring.capacity() > limit {
            self.ring.shrink_to(limit);
        }
    }

    fn len(&self) -> usize {
        self.ring.len()
    }

    fn replay(&self) -> impl Iterator<Item = DaemonMsg> + '_ {
        let (a, b) = self.ring.as_slices();
        a.chunks(CHUNK)
            .chain(b.chunks(CHUNK))
            .map(|c| DaemonMsg::Output {
                stream: Out::Stdout,
                data: c.to_vec(),
            })
    }
}

/// The next port change; a session that fell behind skips what it missed.
async fn next_port_change(
    ports: &mut Option<broadcast::Receiver<Arc<PortChange>>>,
) -> Option<Arc<PortChange>> {
    let Some(rx) = ports else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(change) => return Some(change),
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

struct Client {
    id: u64,
    tx: ClientTx,
    /// Never the writer.
    watch: bool,
}

/// A message in a client's queue, with the room it takes there.
struct Queued {
    msg: DaemonMsg,
    room: Option<OwnedSemaphorePermit>,
}

/// The sending end of a client's queue, bounded in bytes by a semaphore
/// of [`CLIENT_QUEUE_BYTES`] permits that a message holds until the
/// client's connection has taken it.
#[derive(Clone)]
struct ClientTx {
    tx: mpsc::UnboundedSender<Queued>,
    room: Arc<Semaphore>,
}

/// What `msg` takes of a client's queue.
fn cost(msg: &DaemonMsg) -> u32 {
    let data = match msg {
        DaemonMsg::Output { data, .. } => data.len(),
        _ => 0,
    };
    u32::try_from((data + MESSAGE_COST).min(CLIENT_QUEUE_BYTES)).unwrap_or(u32::MAX)
}

impl ClientTx {
    fn new() -> (Self, mpsc::UnboundedReceiver<Queued>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(CLIENT_QUEUE_BYTES));
        (ClientTx { tx, room }, rx)
    }

    #[allow(
        clippy::result_large_err,
        reason = "a full queue hands the message back, to be held as pending"
    )]
    fn try_send(&self, msg: DaemonMsg) -> Result<(), TrySendError<DaemonMsg>> {
        if self.tx.is_closed() {
            return Err(TrySendError::Closed(msg));
        }
        match self.room.clone().try_acquire_many_owned(cost(&msg)) {
            Ok(room) => self
                .tx
                .send(Queued {
                    msg,
                    room: Some(room),
                })
                .map_err(|e| TrySendError::Closed(e.0.msg)),
            Err(_) => Err(TrySendError::Full(msg)),
        }
    }

    /// Queues `msg` outside the bound: a scrollback's replay, one copy
    /// of what the scrollback holds.
    fn send_unbounded(&self, msg: DaemonMsg) {
        let _ = self.tx.send(Queued { msg, room: None });
    }

    /// The bytes the queue has room for now.
    fn room(&self) -> usize {
        self.room.available_permits()
    }

    /// Waits until the queue has room for `cost` bytes, or the client is
    /// gone.
    async fn room_for(&self, cost: u32) {
        tokio::select! {
            _ = self.room.acquire_many(cost) => {}
            () = self.tx.closed() => {}
        }
    }

    /// Queues `msg` once there is room; false: the client is gone.
    async fn send(&self, msg: DaemonMsg) -> bool {
        let room = tokio::select! {
            room = self.room.clone().acquire_many_owned(cost(&msg)) => room.ok(),
            () = self.tx.closed() => None,
        };
        room.is_some_and(|room| {
            self.tx
                .send(Queued {
                    msg,
                    room: Some(room),
                })
                .is_ok()
        })
    }
}

/// One session's state, owned by its task.
struct Session {
    id: u64,
    inner: Arc<Inner>,
    /// The init's id for the process.
    process_id: u64,
    exit: Option<ExitStatus>,
    /// The init's reports about the process (its exit).
    events: mpsc::UnboundedReceiver<InitEvent>,
    /// Unregisters the process from the init link when the session ends.
    _process: InitProcess,
    io: ProcessIo,
    scrollback: Option<Scrollback>,
    /// What a terminal session's scrollback may hold now.
    scrollback_share: watch::Receiver<usize>,
    /// Its place under `daemon.max_sessions`, given back when it ends.
    _slot: SessionSlot,
    terms: SessionTerms,
    record: Option<ExecRecorder>,
    /// Attached clients, oldest first.
    clients: Vec<Client>,
    link: Link,
    registry: Sessions,
    info: watch::Sender<SessionInfo>,
    /// Output the writer's queue had no room for; nothing more is read
    /// until it has.
    pending: Option<DaemonMsg>,
    /// With no client: how long it may run on (`None`: no deadline).
    orphaned_for: Option<Duration>,
    /// Listening ports opened and closed in the inner, when the session
    /// tells its clients of its command's.
    ports: Option<broadcast::Receiver<Arc<PortChange>>>,
    /// The ports it told of as opened, to tell of their closing.
    ports_reported: BTreeSet<(u16, std::net::IpAddr)>,
}

enum Step {
    Command(Option<Command>),
    /// `None`: the port events ended (hulld stopping).
    Port(Option<Arc<PortChange>>),
    WriterRoom,
    WriterStalled,
    ScrollbackShare,
    Output(Source, io::Result<Vec<u8>>),
    Event(Option<InitEvent>),
    DrainOver,
    Timeout,
    Orphaned,
}

/// How the process side of a session ended.
enum End {
    Exited {
        cut: bool,
        timed_out: bool,
    },
    InnerStopped,
    /// No client came back in time.
    Abandoned,
}

impl End {
    fn name(&self) -> &'static str {
        match self {
            End::Exited { .. } => "exited",
            End::InnerStopped => "inner stopped",
            End::Abandoned => "no client came back",
        }
    }
}

impl Session {
    fn writer_id(&self) -> u64 {
        self.link.writer.load(Ordering::Acquire)
    }

    /// A new client: the writer when it asks to be or there is none,
    /// unless it only watches.
    fn add_client(&mut self, want_writer: bool, watch: bool) -> Attachment {
        let (tx, queue) = ClientTx::new();
        let client = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
        if let Some(scrollback) = &self.scrollback {
            for msg in scrollback.replay() {
                tx.send_unbounded(msg);
            }
        }
        let writer = !watch && (want_writer || self.writer_id() == 0);
        if writer {
            self.link.writer.store(client, Ordering::Release);
        }
        self.clients.push(Client {
            id: client,
            tx,
            watch,
        });
        self.orphaned_for = None;
        self.publish_clients();
        Attachment {
            id: self.id,
            client,
            info: self.info.borrow().clone(),
            writer,
            queue,
            link: self.link.clone(),
            detached: false,
        }
    }

    fn publish_clients(&self) {
        let n = u32::try_from(self.clients.len()).unwrap_or(u32::MAX);
        self.info.send_modify(|i| i.clients = n);
    }

    /// Takes `client` off; the writer's role passes to the oldest one left.
    /// True when it was the last.
    fn remove_client(&mut self, client: u64, explicit: bool) -> bool {
        let before = self.clients.len();
        self.clients.retain(|c| c.id != client);
        if self.clients.len() == before {
            return false;
        }
        if self.writer_id() == client {
            self.pending = None;
            let next = self.clients.iter().find(|c| !c.watch).map_or(0, |c| c.id);
            self.link.writer.store(next, Ordering::Release);
        }
        self.publish_clients();
        if !self.clients.is_empty() {
            return false;
        }
        self.orphaned_for = self.terms.run_on(explicit);
        true
    }

    /// Passes output on: watchers that cannot take it are cut; the
    /// writer's share waits for room when it has none.
    fn deliver(&mut self, msg: DaemonMsg) {
        let writer = self.writer_id();
        let mut gone = Vec::new();
        for c in self.clients.iter().filter(|c| c.id != writer) {
            if c.tx.try_send(msg.clone()).is_err() {
                gone.push(c.id);
            }
        }
        if let Some(w) = self.clients.iter().find(|c| c.id == writer) {
            match w.tx.try_send(msg) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(msg)) => self.pending = Some(msg),
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(writer),
            }
        }
        for id in gone {
            self.remove_client(id, false);
        }
    }

    async fn run(&mut self, mut commands: mpsc::Receiver<Command>) {
        // Pipes are read straight into each message's own buffer; a
        // terminal's reads are small and an idle one should cost little.
        let mut pty_buf = vec![0u8; if self.terms.tty { PTY_CHUNK } else { 0 }];
        let drain = tokio::time::sleep(NEVER);
        tokio::pin!(drain);
        if self.exit.is_some() {
            drain
                .as_mut()
                .reset(tokio::time::Instant::now() + self.terms.linger);
        }
        let timeout = tokio::time::sleep(self.terms.timeout.unwrap_or(NEVER));
        tokio::pin!(timeout);
        let stall = tokio::time::sleep(NEVER);
        tokio::pin!(stall);
        let orphan = tokio::time::sleep(NEVER);
        tokio::pin!(orphan);
        let mut orphan_armed = false;
        let mut timed_out = false;
        let end = loop {
            if self.exit.is_some() && !self.io.output_open() {
                break End::Exited {
                    cut: false,
                    timed_out,
                };
            }
            // A session without a terminal and without a client keeps its
            // output in the pipes until one comes (or the deadline).
            let reading = self.pending.is_none()
                && (self.terms.tty || self.terms.background || !self.clients.is_empty());
            let (has_out, has_err, has_pty) = (
                self.io.stdout.is_some(),
                self.io.stderr.is_some(),
                self.io.master.is_some(),
            );
            let writer = self.clients.iter().find(|c| c.id == self.writer_id());
            // A pipe is read only as far as the writer's queue has room,
            // so that what is read is queued at once: nothing is held
            // beside the queue while the writer does not read.
            let pipe_read = writer.map_or(CHUNK, |w| {
                w.tx.room().saturating_sub(MESSAGE_COST).min(CHUNK)
            });
            let pipes_have_room = pipe_read >= MIN_PIPE_READ;
            let writer_tx = match (&self.pending, writer) {
                (Some(msg), Some(w)) => Some((w.tx.clone(), cost(msg))),
                (None, Some(w)) if reading && (has_out || has_err) && !pipes_have_room => {
                    Some((w.tx.clone(), PIPE_READ_COST))
                }
                _ => None,
            };
            match (self.clients.is_empty(), self.orphaned_for, orphan_armed) {
                (true, Some(d), false) => {
                    orphan.as_mut().reset(tokio::time::Instant::now() + d);
                    orphan_armed = true;
                }
                (false, _, true) => orphan_armed = false,
                _ => {}
            }
            let step = {
                let (stdout, stderr, master) = (
                    self.io.stdout.as_ref(),
                    self.io.stderr.as_ref(),
                    self.io.master.as_deref(),
                );
                let room = async {
                    match &writer_tx {
                        Some((tx, cost)) => tx.room_for(*cost).await,
                        None => std::future::pending().await,
                    }
                };
                let terminal = self.scrollback.is_some();
                tokio::select! {
                    cmd = commands.recv() => Step::Command(cmd),
                    _ = room, if writer_tx.is_some() => Step::WriterRoom,
                    _ = &mut stall, if self.pending.is_some() && self.terms.tty => Step::WriterStalled,
                    Ok(()) = self.scrollback_share.changed(), if terminal => Step::ScrollbackShare,
                    data = crate::process_io::read_opt_pipe(stdout, pipe_read), if reading && has_out && pipes_have_room => Step::Output(Source::Stdout, data),
                    data = crate::process_io::read_opt_pipe(stderr, pipe_read), if reading && has_err && pipes_have_room => Step::Output(Source::Stderr, data),
                    n = crate::process_io::read_opt_fd(master, &mut pty_buf), if reading && has_pty => Step::Output(Source::Pty, n.map(|n| pty_buf[..n].to_vec())),
                    ev = self.events.recv(), if self.exit.is_none() => Step::Event(ev),
                    _ = &mut drain, if self.exit.is_some() => Step::DrainOver,
                    _ = &mut timeout, if self.terms.timeout.is_some() && self.exit.is_none() && !timed_out => Step::Timeout,
                    _ = &mut orphan, if orphan_armed => Step::Orphaned,
                    change = next_port_change(&mut self.ports), if self.ports.is_some() => Step::Port(change),
                }
            };
            match step {
                Step::Command(Some(cmd)) => self.command(cmd).await,
                // The registry's handle holds a sender for as long as the
                // session is listed.
                Step::Command(None) => {}
                // Room for what is pending, or for the next read of a pipe.
                Step::WriterRoom => {
                    if let Some(msg) = self.pending.take() {
                        self.deliver(msg);
                    }
                }
                Step::ScrollbackShare => {
                    let share = *self.scrollback_share.borrow_and_update();
                    if let Some(scrollback) = &mut self.scrollback {
                        scrollback.set_limit(share);
                        let kept = u64::try_from(scrollback.len()).unwrap_or(u64::MAX);
                        self.info.send_modify(|i| i.scrollback_bytes = kept);
                    }
                }
                Step::WriterStalled => {
                    if self.pending.is_some() {
                        let writer = self.writer_id();
                        tracing::debug!(session = self.id, "cutting a writer that reads nothing");
                        self.remove_client(writer, false);
                    }
                }
                Step::Output(source, Ok(data)) if !data.is_empty() => {
                    let stream = match source {
                        Source::Stderr => Out::Stderr,
                        Source::Stdout | Source::Pty => Out::Stdout,
                    };
                    if let Some(record) = &mut self.record {
                        record.push(stream, &data);
                    }
                    if let Some(scrollback) = &mut self.scrollback {
                        scrollback.push(&data);
                    }
                    let bytes = u64::try_from(data.len()).unwrap_or(u64::MAX);
                    self.info.send_modify(|i| {
                        i.output_bytes += bytes;
                        i.last_activity_ms = now_ms();
                        if let Some(s) = &self.scrollback {
                            i.scrollback_bytes = u64::try_from(s.len()).unwrap_or(u64::MAX);
                        }
                    });
                    self.deliver(DaemonMsg::Output { stream, data });
                    if self.pending.is_some() {
                        stall
                            .as_mut()
                            .reset(tokio::time::Instant::now() + WRITER_STALL);
                    }
                }
                Step::Output(source, _) => self.io.close_output(source),
                Step::Event(Some(InitEvent::Exited(status))) => {
                    self.exit = Some(status);
                    drain
                        .as_mut()
                        .reset(tokio::time::Instant::now() + self.terms.linger);
                }
                Step::Event(Some(_)) => {}
                Step::Event(None) => break End::InnerStopped,
                Step::DrainOver => {
                    break End::Exited {
                        cut: self.io.output_open(),
                        timed_out,
                    }
                }
                Step::Timeout => {
                    timed_out = true;
                    self.inner.link.kill(self.process_id, libc::SIGKILL).await;
                }
                Step::Orphaned => break End::Abandoned,
                Step::Port(change) => self.port_changed(change),
            }
        };
        self.finish(end).await;
    }

    /// Passes on a port change when the port is the command's: opened by
    /// its process or a descendant, or closed after being told of.
    fn port_changed(&mut self, change: Option<Arc<PortChange>>) {
        let Some(change) = change else {
            self.ports = None;
            return;
        };
        let key = (change.port, change.address);
        let ours = if change.opened {
            change.lineage.contains(&self.info.borrow().pid) && self.ports_reported.insert(key)
        } else {
            self.ports_reported.remove(&key)
        };
        if ours {
            self.deliver(DaemonMsg::Port(PortNotice {
                opened: change.opened,
                port: change.port,
                address: change.address.to_string(),
                pid: change.pid(),
            }));
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Attach {
                writer,
                watch,
                reply,
            } => {
                let attachment = self.add_client(writer, watch);
                // A client that gave up waiting drops its attachment,
                // which detaches it again.
                let _ = reply.send(attachment);
            }
            Command::Signal { client, signal } => {
                if client.is_none_or(|c| c == self.writer_id()) {
                    self.inner.link.kill(self.process_id, signal).await;
                }
            }
            // The last client gone arms the deadline the loop keeps.
            Command::Detach {
                client,
                explicit,
                done,
            } => {
                if hull_proto::slow_point("session:detach") {
                    tracing::warn!(session = self.id, "slow point reached: a detach waits 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                self.remove_client(client, explicit);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Tells every client how the session ended (what the writer had no
    /// room for first), and closes the record.
    async fn finish(&mut self, end: End) {
        self.registry.remove(self.id);
        tracing::info!(session = self.id, end = end.name(), "session ended");
        let mut last = Vec::new();
        let mut note = None;
        let status = match end {
            End::Abandoned => {
                // As a closing terminal does.
                self.inner.link.kill(self.process_id, libc::SIGHUP).await;
                if let Some(record) = self.record.take() {
                    // No client is told of the end: nothing waits for it.
                    drop(record.finish(None, Some("the client went away; sent SIGHUP")));
                }
                return;
            }
            End::InnerStopped => {
                let reason = self.inner.stop_reason();
                note = Some(format!("the inner stopped: {reason}"));
                last.push(DaemonMsg::ExecEnded(ExecEnd::InnerStopped { reason }));
                None
            }
            End::Exited { cut, timed_out } => {
                let status = self.exit.expect("the loop ends after the exit");
                let linger_ms = u64::try_from(self.terms.linger.as_millis()).unwrap_or(u64::MAX);
                if cut {
                    last.push(DaemonMsg::OutputCut { linger_ms });
                    note = Some("output cut after the linger".to_string());
                }
                if let Some(oom) = self.terms.oom.victim_note(status).await {
                    last.push(DaemonMsg::Output {
                        stream: Out::Stderr,
                        data: oom.into_bytes(),
                    });
                }
                let end = match self.terms.timeout {
                    Some(t) if timed_out => {
                        let timeout_ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
                        note = Some(format!("timed out after {timeout_ms} ms"));
                        ExecEnd::TimedOut { timeout_ms }
                    }
                    _ => ExecEnd::Exited(status),
                };
                last.push(DaemonMsg::ExecEnded(end));
                Some(status)
            }
        };
        if let Some(record) = self.record.take() {
            // The log is written on a thread of its own: a client told of
            // the end finds it there. A writer stuck on the disk only
            // delays the end, never holds it.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                record.finish(status, note.as_deref()),
            )
            .await;
        }
        let writer = self.writer_id();
        let pending = self.pending.take();
        let sends = std::mem::take(&mut self.clients).into_iter().map(|c| {
            let mut msgs = Vec::new();
            if c.id == writer {
                msgs.extend(pending.clone());
            }
            msgs.extend(last.iter().cloned());
            async move {
                let send_all = async {
                    for msg in msgs {
                        if !c.tx.send(msg).await {
                            return;
                        }
                    }
                };
                // The writer gets the end however slowly it reads: its
                // exit code is the command's.
                if c.id == writer {
                    send_all.await;
                } else {
                    let _ = tokio::time::timeout(WATCHER_END_WAIT, send_all).await;
                }
            }
        });
        futures::future::join_all(sends).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed(s: &Scrollback) -> Vec<u8> {
        s.replay()
            .flat_map(|m| match m {
                DaemonMsg::Output { data, .. } => data,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_scrollback_keeps_the_last_mebibyte_in_order() {
        let mut s = Scrollback::new(SCROLLBACK);
        let mut all = Vec::new();
        for i in 0..8000u32 {
            let chunk = format!(
                "line {i:05} {}\n",
                "x".repeat(usize::try_from(i % 700).unwrap())
            );
            s.push(chunk.as_bytes());
            all.extend_from_slice(chunk.as_bytes());
        }
        assert!(all.len() > 2 * SCROLLBACK);
        assert_eq!(s.len(), SCROLLBACK);
        assert_eq!(s.ring.capacity(), SCROLLBACK);
        assert_eq!(replayed(&s), all[all.len() - SCROLLBACK..]);
        // A smaller share keeps the end, and gives the rest back.
        s.set_limit(SCROLLBACK / 8);
        assert_eq!(replayed(&s), all[all.len() - SCROLLBACK / 8..]);
        assert!(s.ring.capacity() <= SCROLLBACK / 8);
        s.push(b"more");
        assert_eq!(s.len(), SCROLLBACK / 8);
    }

    #[test]
    fn a_chunk_larger_than_the_scrollback_leaves_its_end() {
        let mut s = Scrollback::new(SCROLLBACK);
        s.push(b"old");
        let big: Vec<u8> = (0..SCROLLBACK + 10)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        s.push(&big);
        assert_eq!(replayed(&s), big[10..]);
    }
}
