use serde::{Deserialize, Serialize};

/// The first frame each way on every connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    /// Who is speaking, for logs: "hull 0.1.0", "hulld 0.1.0", "hull-init".
    pub peer: String,
}

impl Hello {
    pub fn new(peer: impl Into<String>) -> Self {
        Hello {
            version: crate::PROTOCOL_VERSION,
            peer: peer.into(),
        }
    }
}

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// How a process ended: `{"exit_code": N}` or `{"signal": N}` in JSON.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ExitStatus {
    #[serde(rename = "exit_code")]
    Code(i32),
    #[serde(rename = "signal")]
    Signal(i32),
}

impl ExitStatus {
    /// The exit code a shell would report: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// What to run in the inner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    /// Added to (and overriding) the inner's default environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the inner; `/` when absent.
    pub cwd: Option<String>,
    /// Run as this user of the inner's /etc/passwd; root when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// A PTY of this size instead of pipes.
    pub tty: Option<WinSize>,
}

/// An exec as a client asks for it: what to run, and how hulld runs the
/// session around it (the init only ever sees the [`ExecSpec`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    pub spec: ExecSpec,
    /// After the process exits, how long hulld keeps passing on output of
    /// processes it left behind that still hold its stdout/stderr; hulld's
    /// default ([`DEFAULT_LINGER_MS`]) when absent.
    #[serde(default)]
    pub linger_ms: Option<u64>,
    /// Kill the process group after this long (the session then ends with
    /// [`ExecEnd::TimedOut`]).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Keep nothing of this exec in the `exec` log.
    #[serde(default)]
    pub no_log: bool,
    /// Run it in the background: hulld answers `ExecStarted` and runs the
    /// session on its own (no input; the output goes to the `exec` log only).
    #[serde(default)]
    pub detach: bool,
    /// How long the session runs on once its last client has gone: 0 ends
    /// it with the client. When absent, a session with a terminal runs on
    /// until its process exits, and one without runs on 10 s after its
    /// client detached ([`ClientMsg::Detach`]) and ends when the client
    /// just hung up.
    #[serde(default)]
    pub max_run_after_disconnect_ms: Option<u64>,
    /// Tell this session's clients when a process of the command (it or a
    /// descendant) starts or stops listening on a TCP port
    /// ([`DaemonMsg::Port`]).
    #[serde(default)]
    pub port_events: bool,
}

/// How long a session without a terminal runs on after an explicit detach
/// unless the request says otherwise.
pub const DEFAULT_DETACHED_RUN_MS: u64 = 10_000;

/// How long output is kept after the process exits unless the client asks
/// otherwise.
pub const DEFAULT_LINGER_MS: u64 = 2000;

impl From<ExecSpec> for ExecRequest {
    fn from(spec: ExecSpec) -> Self {
        ExecRequest {
            spec,
            linger_ms: None,
            timeout_ms: None,
            no_log: false,
            detach: false,
            max_run_after_disconnect_ms: None,
            port_events: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Why a program could not be started.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum SpawnErrorKind {
    /// The program does not exist (a shell says 127).
    NotFound,
    /// The program exists but cannot be executed (a shell says 126).
    PermissionDenied,
    /// The working directory does not exist or is not a directory.
    BadCwd,
    Other,
}

impl SpawnErrorKind {
    pub fn shell_code(self) -> i32 {
        match self {
            SpawnErrorKind::NotFound => 127,
            SpawnErrorKind::PermissionDenied => 126,
            SpawnErrorKind::BadCwd | SpawnErrorKind::Other => 126,
        }
    }
}

/// The state of the inner container as hulld sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InnerState {
    Starting,
    Running,
    Stopping,
    Stopped,
    /// Start failed; hulld retries with a backoff.
    Failed,
}

impl std::fmt::Display for InnerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            InnerState::Starting => "starting",
            InnerState::Running => "running",
            InnerState::Stopping => "stopping",
            InnerState::Stopped => "stopped",
            InnerState::Failed => "failed",
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    pub memory_max_bytes: Option<u64>,
    pub pids_max: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusReport {
    pub daemon_pid: i32,
    pub daemon_version: String,
    pub state: InnerState,
    /// The inner init's pid as seen from the root namespace.
    pub inner_pid: Option<i32>,
    pub inner_uptime_ms: Option<u64>,
    pub bounces: u64,
    /// Inner starts that were not asked for (its init died).
    pub unplanned_restarts: u64,
    pub limits: Limits,
    pub image: String,
    pub state_dir: String,
    pub cgroup: String,
    /// Where the writable layer and checkpoints live.
    pub volume: String,
    /// The checkpoint the current state came from.
    pub head: Option<String>,
    /// Bytes the writable layer references now, when the volume has
    /// quotas on (btrfs's count: see `layer_quota`).
    #[serde(default)]
    pub layer_used: Option<u64>,
    /// The writable layer's quota in bytes; writes past it fail with
    /// EDQUOT. `None`: no limit.
    #[serde(default)]
    pub layer_quota: Option<u64>,
    pub last_error: Option<String>,
    /// Processes the out-of-memory killer killed in the inner since hulld
    /// started (the kernel's count for the inner's cgroup).
    #[serde(default)]
    pub oom_kills: u64,
    /// When hulld saw the last of them, Unix time in milliseconds.
    #[serde(default)]
    pub last_oom_kill_ms: Option<i64>,
    /// The HTTP API's base URL, when it listens.
    #[serde(default)]
    pub api: Option<String>,
    /// The inner's user namespace; `None`: the inner's root is the VM's.
    #[serde(default)]
    pub user_namespace: Option<IdMapping>,
    /// Pushes to the remote; `None` without `[remote]` in hull.toml.
    #[serde(default)]
    pub remote: Option<RemoteStatus>,
}

/// The pusher's work since hulld started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteStatus {
    /// The push under way, if one is.
    pub pushing: Option<PushReport>,
    /// Checkpoints pushed since hulld started, and the last of them.
    pub pushed: u64,
    pub last_pushed: Option<PushReport>,
    /// Pushes that failed last time, each with its error (retried).
    pub failed: Vec<PushReport>,
}

/// How the inner's user namespace maps its ids: inner id `n` (user and
/// group alike) is the VM's `base + n`, for `n` below `count`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdMapping {
    pub base: u32,
    pub count: u32,
}

impl IdMapping {
    /// One line of /proc/PID/uid_map (or gid_map).
    pub fn map_line(&self) -> String {
        format!("0 {} {}\n", self.base, self.count)
    }
}

/// A finished bounce.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BounceReport {
    /// Time spent stopping the old inner (grace included).
    pub stop_ms: f64,
    /// Time from the new inner's creation to its init reporting ready.
    pub start_ms: f64,
    pub total_ms: f64,
    pub inner_pid: i32,
    pub bounces: u64,
}

/// One checkpoint in the catalog.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub id: String,
    pub parent: Option<String>,
    /// Unix time in milliseconds.
    pub created_ms: i64,
    pub comment: Option<String>,
    /// Taken by hull itself (before a restore), subject to retention.
    pub auto: bool,
    /// The service definitions recorded with it.
    pub services: Vec<ServiceSpec>,
    /// Its global id (a UUID): the name of its manifest in the remote.
    #[serde(default)]
    pub remote_id: String,
    /// The parent's global id: known even when the parent is not here.
    #[serde(default)]
    pub parent_remote_id: Option<String>,
    /// `local`, `pushing` or `pushed`.
    #[serde(default)]
    pub remote_state: String,
    /// Why its last push failed, until one succeeds.
    #[serde(default)]
    pub remote_error: Option<String>,
    /// `here` (taken on this machine) or `pulled` (from the remote).
    #[serde(default)]
    pub origin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointReport {
    pub checkpoint: CheckpointInfo,
    /// How long the inner was frozen.
    pub frozen_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestoreReport {
    pub restored: String,
    /// The automatic checkpoint of the state before the restore: restoring
    /// it undoes this restore.
    pub undo: String,
    pub stop_ms: f64,
    pub start_ms: f64,
    pub total_ms: f64,
    pub inner_pid: i32,
    /// Service definitions the restore removed (not in the checkpoint).
    #[serde(default)]
    pub services_removed: Vec<String>,
    /// Service definitions it brought back (in the checkpoint only).
    #[serde(default)]
    pub services_added: Vec<String>,
}

/// Where the push of one checkpoint to the remote is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PushReport {
    pub checkpoint: String,
    /// Its manifest's id in the remote.
    pub remote_id: String,
    /// The pushed checkpoint its stream is incremental from (a remote
    /// id); `None`: a full stream.
    pub base: Option<String>,
    /// `pushing`, `pushed`, or `local` after a failure (see `error`).
    pub state: String,
    /// Bytes of the `btrfs send` stream read so far.
    pub bytes_read: u64,
    /// Chunks done: uploaded by this push, or found already there.
    pub chunks: u64,
    pub chunks_uploaded: u64,
    /// Bytes uploaded (compressed and encrypted).
    pub bytes_uploaded: u64,
    /// Chunks already in the remote (known to this machine's index, or
    /// found there), not uploaded again.
    pub chunks_present: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointListing {
    pub checkpoints: Vec<CheckpointInfo>,
    /// The checkpoint the current state came from.
    pub head: Option<String>,
    pub now_ms: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ErrorKind {
    /// The peer speaks another protocol version.
    Version,
    /// A frame could not be decoded or was too large.
    BadFrame,
    /// A well-formed request that makes no sense here.
    BadRequest,
    /// The inner is not running, so the request cannot be served now.
    InnerUnavailable,
    /// The program could not be started.
    Spawn(SpawnErrorKind),
    /// No such checkpoint or service.
    NotFound,
    /// A service definition or request that is refused.
    Service,
    /// Storage failed (full volume, a failed snapshot, ...).
    Storage,
    /// The request is not served on this endpoint (the inner's service
    /// socket answers service requests only).
    NotPermitted,
    Internal,
    /// The endpoint is at its connection cap, or hulld has no fds to spare
    /// for it: try again later.
    Busy,
    /// The service is not running, so the request (a signal) has no target.
    NotRunning,
    /// A file operation in the inner failed with this errno.
    File(i32),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorReport {
    pub kind: ErrorKind,
    pub message: String,
}

/// Client to hulld.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ClientMsg {
    Hello(Hello),
    Status,
    /// Starts an exec session; the connection carries it until `ExecEnded`.
    Exec(ExecRequest),
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    StdinEof,
    Resize(WinSize),
    /// Deliver this signal to the exec'd process.
    Signal(i32),
    Bounce {
        grace_ms: u64,
    },
    CheckpointCreate {
        comment: Option<String>,
    },
    CheckpointRestore {
        id: String,
    },
    CheckpointList,
    CheckpointDelete {
        id: String,
    },
    /// Pushes checkpoint `id` (the newest when `None`) to the remote now
    /// and answers `PushProgress` as it goes, then `CheckpointPushed`.
    CheckpointPush {
        id: Option<String>,
    },
    Services(ServiceRequest),
    /// A service's log: the last `tail` lines (all when absent), then new
    /// ones as they come with `follow`, until the client hangs up.
    Logs {
        source: String,
        follow: bool,
        tail: Option<u64>,
        stream: Option<Stream>,
        /// Only records at or after this Unix time in milliseconds.
        since_ms: Option<i64>,
        /// Only the records of this exec (source `exec`); a follow ends
        /// with its end.
        #[serde(default)]
        exec_id: Option<u64>,
    },
    /// Stop the inner (SIGKILL after the grace) and hulld (`hull down`).
    Shutdown {
        grace_ms: u64,
    },
    /// The inner's listening TCP ports and how each is exposed.
    Ports,
    /// Where the HTTP ingress listens and the bearer token of private URLs.
    Ingress,
    /// The HTTP API's tokens.
    Tokens(TokenRequest),
    /// The sandbox's egress policy: `None` reads it, `Some` replaces it
    /// with this JSON text, once hulld has parsed it as an egress policy
    /// (`hull_network::EgressPolicy`); kept as sent.
    NetworkPolicy(Option<String>),
    /// Exec sessions: list, attach to one, kill one.
    Sessions(SessionRequest),
    /// Leave the current exec session without ending it; it runs on as its
    /// `max_run_after_disconnect_ms` says. The connection gets no more of
    /// it (no `ExecEnded`) and serves requests again.
    Detach,
    /// A file of the inner's: its entry, its contents, or a new content.
    Files(FileRequest),
    /// The next bytes of a `FileRequest::Write` (at most [`FILE_CHUNK`]).
    FileData(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The end of a `FileRequest::Write`'s bytes: the file is put in place.
    FileEnd,
}

/// The bytes of a file carried in one frame, each way: under the 64 KiB
/// past which a frame takes from hulld's budget for large frames.
pub const FILE_CHUNK: usize = 60 * 1024;

/// A file request. Every path is the inner's, absolute, resolved by hulld
/// under the inner's root (openat2 with RESOLVE_IN_ROOT, never by joining
/// strings) and confined to the user's layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FileRequest {
    /// Answered with `FileEntry`.
    Stat { path: String },
    /// A directory's entries sorted by name, or a file's own: answered
    /// with `FileList`.
    List { path: String },
    /// A regular file's contents: `FileOpened`, then `FileData` up to its
    /// size, then `FileEnd` (or an `Error` that ends it short).
    Read { path: String },
    /// Replaces `path` with the bytes that follow: hulld answers
    /// `FileReady` once it can write there, then takes `FileData` and a
    /// `FileEnd`, and answers `FileWritten` once the file is in place
    /// whole (a write cut short leaves what was there).
    Write {
        path: String,
        /// Permission bits of the file made.
        mode: u32,
        /// Make missing parent directories first, as mkdir -p.
        make_parents: bool,
    },
    /// Removes `path` (a directory and all in it with `recursive`; a
    /// recursive delete stops at a mount point): `FilesChanged`.
    Delete { path: String, recursive: bool },
    /// Renames `from` to `to`, replacing what is there as rename(2) does.
    Rename { from: String, to: String },
    /// Copies `from` to `to` (a directory only with `recursive`, merged
    /// into `to` when it exists; symlinks as symlinks, special files
    /// skipped): `FilesChanged`.
    Copy {
        from: String,
        to: String,
        recursive: bool,
    },
    /// Sets permission bits (below a directory too, symlinks aside, with
    /// `recursive`): `FilesChanged`.
    Chmod {
        path: String,
        mode: u32,
        recursive: bool,
    },
    /// Makes the directory `path` and its missing parents, as mkdir -p
    /// (one that exists is left as it is): answered with its `FileEntry`.
    MakeDir {
        path: String,
        /// Permission bits of the directories made.
        mode: u32,
    },
    /// Makes `path` a symlink to `target` (its text as given, never
    /// resolved), replacing a file or symlink there: answered with its
    /// `FileEntry`.
    Symlink { path: String, target: String },
    /// Watches the directory `path` (and every directory under it with
    /// `recursive`): `FileWatching`, then a `FileEvent` for each change
    /// until the client closes the connection, which serves nothing else,
    /// or the watch ends (`FileEvent::Gone` or `FileEvent::Failed`, the
    /// last message before hulld closes it).
    Watch { path: String, recursive: bool },
}

/// What happened to a watched entry, as inotify names it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum FileChange {
    Create,
    Delete,
    Modify,
    CloseWrite,
    Attrib,
    MovedFrom,
    MovedTo,
    DeleteSelf,
}

impl FileChange {
    /// Its name in the HTTP API's watch messages.
    pub fn name(self) -> &'static str {
        match self {
            FileChange::Create => "create",
            FileChange::Delete => "delete",
            FileChange::Modify => "modify",
            FileChange::CloseWrite => "close_write",
            FileChange::Attrib => "attrib",
            FileChange::MovedFrom => "moved_from",
            FileChange::MovedTo => "moved_to",
            FileChange::DeleteSelf => "delete_self",
        }
    }
}

/// One message of a watch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FileEvent {
    /// `path` (a directory: `is_dir`) changed.
    Change {
        change: FileChange,
        path: String,
        is_dir: bool,
    },
    /// Events were dropped since the last one: the client fell behind
    /// (hulld queues a bounded number for it), or the kernel's queue
    /// overflowed.
    Overflow,
    /// A cap on watched directories left some unwatched; the watch goes
    /// on for the others.
    Incomplete { message: String },
    /// Every watched directory is gone: the last event.
    Gone,
    /// The watch failed: the last event.
    Failed { message: String },
}

impl FileEvent {
    /// Whether nothing follows it.
    pub fn is_last(&self) -> bool {
        matches!(self, FileEvent::Gone | FileEvent::Failed { .. })
    }
}

/// What a file is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    Other,
}

/// One entry of the inner's filesystem.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    /// Absolute, as the inner sees it.
    pub path: String,
    pub size: u64,
    /// Permission bits (and setuid, setgid, sticky).
    pub mode: u32,
    /// Last modified, in seconds since the epoch.
    pub mtime: i64,
    pub kind: FileKind,
    /// A symlink's target, as it is written (never followed); `None` for
    /// other kinds, and for a target that is not UTF-8.
    #[serde(default)]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum SessionRequest {
    List,
    /// Attach this connection to a running session: `SessionAttached`, the
    /// scrollback of a terminal session as `Output`, then the session as an
    /// exec's (`Output`, `ExecEnded`). The first client attached is the
    /// writer (its stdin, resizes and signals reach the process; others'
    /// are dropped); `writer` takes that role from the current one.
    Attach {
        id: u64,
        writer: bool,
        /// Only watch: never the writer, not even of a session with no
        /// other client (so a read-only token may ask for it).
        #[serde(default)]
        watch: bool,
    },
    /// Send `signal` to the session's process; if the session has not
    /// ended `timeout_ms` later, SIGKILL. The reply comes once it ended.
    Kill {
        id: u64,
        signal: i32,
        timeout_ms: u64,
    },
}

/// One running exec session, as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: u64,
    pub argv: Vec<String>,
    pub cwd: Option<String>,
    pub tty: bool,
    /// The pid inside the inner.
    pub pid: i32,
    /// Unix time in milliseconds.
    pub created_ms: i64,
    /// The last output or input, Unix time in milliseconds.
    pub last_activity_ms: i64,
    /// Clients attached now.
    pub clients: u32,
    /// Output bytes since it started.
    pub output_bytes: u64,
    /// Bytes of output kept for replay on attach (terminal sessions).
    pub scrollback_bytes: u64,
    /// How long it runs on with no client; `None`: until it exits.
    pub max_run_after_disconnect_ms: Option<u64>,
    /// Who started it, as hulld knows the connection that asked: the
    /// name of the HTTP API token (its id when it has no name), or
    /// [`STARTED_LOCALLY`] for the control socket. Any exec token may
    /// attach to or kill any session; this says whose it was.
    #[serde(default)]
    pub started_by: String,
}

/// [`SessionInfo::started_by`] of a session started over the control
/// socket (or vsock), which need no token.
pub const STARTED_LOCALLY: &str = "local";

/// What a token lets its bearer do on the HTTP API; each scope includes
/// the ones before it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum TokenScope {
    /// Status, listings, logs, reading files.
    Read,
    /// Also exec, sessions and writing files.
    Exec,
    /// Also checkpoints, restores, services, policy.
    Admin,
}

impl TokenScope {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::Read => "read",
            TokenScope::Exec => "exec",
            TokenScope::Admin => "admin",
        }
    }
}

impl std::fmt::Display for TokenScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TokenScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(TokenScope::Read),
            "exec" => Ok(TokenScope::Exec),
            "admin" => Ok(TokenScope::Admin),
            other => Err(format!("unknown scope {other:?}: use read, exec or admin")),
        }
    }
}

/// A token as listed: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub scope: TokenScope,
    pub name: Option<String>,
    /// Unix time in milliseconds.
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum TokenRequest {
    Create {
        scope: TokenScope,
        ttl_ms: Option<u64>,
        name: Option<String>,
    },
    List,
    Revoke {
        id: String,
    },
}

/// How an exec session ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ExecEnd {
    Exited(ExitStatus),
    /// The inner stopped underneath the session (a bounce, a crash, `hull down`).
    InnerStopped {
        reason: String,
    },
    /// The timeout of the request passed: hulld killed the process group.
    TimedOut {
        timeout_ms: u64,
    },
}

/// hulld to client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum DaemonMsg {
    Hello(Hello),
    /// Boxed: the largest answer, and rare, so every other frame stays small.
    Status(Box<StatusReport>),
    ExecStarted {
        /// The pid inside the inner.
        pid: i32,
        /// Its session id (`hull sessions attach ID`).
        #[serde(default)]
        session: u64,
        /// Its id in the `exec` log (`hull logs exec:ID`), when it is logged.
        exec_id: Option<u64>,
    },
    Output {
        stream: Stream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Sent before `ExecEnded` when processes the command left behind still
    /// held its stdout/stderr `linger_ms` after it exited: what they write
    /// from then on is not passed on.
    OutputCut {
        linger_ms: u64,
    },
    ExecEnded(ExecEnd),
    /// During a session that asked for `port_events`: a process of its
    /// command opened or closed a listening TCP port. A client may ignore it.
    Port(PortNotice),
    Bounced(BounceReport),
    CheckpointCreated(CheckpointReport),
    Restored(RestoreReport),
    Checkpoints(CheckpointListing),
    CheckpointDeleted {
        id: String,
    },
    /// A push under way (`hull checkpoint push`); any number, then
    /// `CheckpointPushed` or an error.
    PushProgress(PushReport),
    CheckpointPushed(PushReport),
    /// The services a request touched (all of them for List).
    Services(Vec<ServiceStatus>),
    LogRecords(Vec<LogRecord>),
    /// The end of a `Logs` reply without `follow`.
    LogsEnd,
    ShuttingDown,
    Ports(PortsReport),
    Ingress(IngressReport),
    /// A new token: the whole token, shown this once, and its listing.
    TokenCreated {
        token: String,
        info: TokenInfo,
    },
    Tokens(Vec<TokenInfo>),
    TokenRevoked {
        id: String,
    },
    /// The stored network policy (JSON text as it was set; `None`: never
    /// set) and whether hulld enforces it.
    NetworkPolicy {
        policy: Option<String>,
        enforced: bool,
    },
    Sessions(Vec<SessionInfo>),
    /// This connection is attached to the session; `writer`: its input
    /// reaches the process.
    SessionAttached {
        info: SessionInfo,
        writer: bool,
    },
    /// The session a `Kill` named has ended; `forced`: it took a SIGKILL
    /// after the timeout.
    SessionKilled {
        id: u64,
        forced: bool,
    },
    /// The answer to `Detach`: the session runs on without this client.
    Detached {
        id: u64,
    },
    FileEntry(FileEntry),
    FileList(Vec<FileEntry>),
    /// A delete, rename, copy or chmod is done: `count` entries.
    FilesChanged {
        count: u64,
    },
    /// The file a `Read` named is open: `size` bytes follow.
    FileOpened {
        size: u64,
        mode: u32,
    },
    /// The next bytes of a file being read (at most [`FILE_CHUNK`]).
    FileData(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A read's last bytes were sent.
    FileEnd,
    /// A `Write` may send its bytes.
    FileReady,
    /// A `Watch` is set up: its events follow.
    FileWatching,
    FileEvent(FileEvent),
    /// A `Write` is in place: `size` bytes.
    FileWritten {
        size: u64,
    },
    Error(ErrorReport),
}

impl DaemonMsg {
    /// The answer that refuses a request, or ends one that failed.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        DaemonMsg::Error(ErrorReport {
            kind,
            message: message.into(),
        })
    }
}

/// A listening port a session's command opened or closed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortNotice {
    pub opened: bool,
    pub port: u16,
    /// The address it is bound to, as the inner sees it.
    pub address: String,
    /// The owning process, pid inside the inner (0 when unknown).
    pub pid: i32,
}

/// One TCP port the inner listens on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortInfo {
    pub port: u16,
    /// The inner address it is bound to (0.0.0.0, ::, 127.0.0.1, ...).
    pub address: String,
    /// The owning process, its pid as the inner's own tools show it.
    pub pid: Option<i32>,
    pub command: Option<String>,
    /// "forwarded", "taken" (reach it through HTTP ingress), "not-allowed"
    /// (left out by the config), or "pending" (not yet handled).
    pub exposure: String,
    /// The outer address when forwarded, or the one that is taken.
    pub outer: Option<String>,
    /// Why the outer port could not be bound.
    pub detail: Option<String>,
    /// A URL that reaches this port as pasted: its forwarded address when
    /// it is forwarded, else its route through HTTP ingress, if that is on.
    pub http_url: Option<String>,
    /// The Host header to send to `http_url` when it is HTTP ingress's and
    /// its host does not name the port (the ingress listens on an address
    /// `PORT.localhost` does not reach).
    pub http_host: Option<String>,
    /// Whether HTTP ingress needs the bearer token for it.
    pub private: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortsReport {
    /// "nat" or "none".
    pub network: String,
    pub ports: Vec<PortInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IngressReport {
    /// The HTTP ingress address, if it is on.
    pub http: Option<String>,
    pub token: String,
    pub private_ports: Vec<u16>,
    pub private_all: bool,
    /// The inner's address and gateway on its veth, when it has one.
    pub inner_address: Option<String>,
    pub gateway: Option<String>,
}

/// hulld to the inner init.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ToInit {
    Hello(Hello),
    Spawn { id: u64, spec: ExecSpec },
    Kill { id: u64, signal: i32 },
}

/// The inner init to hulld.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FromInit {
    Hello(Hello),
    /// Setup finished; the inner is ready for work. `steps` says how long
    /// each setup step took, in microseconds, for the daemon's log.
    Ready {
        steps: Vec<(String, u64)>,
    },
    /// Setup failed at `step`; init exits after sending this.
    SetupFailed {
        step: String,
        message: String,
    },
    /// A `Spawn` was read; sent before anything of it runs, so a `Spawn`
    /// hulld never got this for never started anything.
    Received {
        id: u64,
    },
    /// The process runs; its stdio fds were sent on the fd channel first,
    /// tagged with the same id.
    Spawned {
        id: u64,
        pid: i32,
    },
    SpawnFailed {
        id: u64,
        kind: SpawnErrorKind,
        message: String,
    },
    Exited {
        id: u64,
        status: ExitStatus,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    #[default]
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn name(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "never" => Ok(RestartPolicy::Never),
            other => Err(format!("{other:?}: expected always, on-failure or never")),
        }
    }
}

/// One registered service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    /// Run with `/bin/sh -c`.
    pub cmd: String,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// The port it serves HTTP on; it counts as ready once this port listens.
    #[serde(default)]
    pub http_port: Option<u16>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Services that must be running (ready, if they declare a port) first.
    #[serde(default)]
    pub after: Vec<String>,
}

/// Most environment variables one service definition sets.
pub const MAX_SERVICE_ENV: usize = 1024;

/// Most services one definition waits for (`--after`).
pub const MAX_SERVICE_AFTER: usize = 64;

/// Most bytes of text in one definition: its command, variables,
/// directory, user and names together.
pub const MAX_SERVICE_TEXT: usize = 64 * 1024;

impl ServiceSpec {
    /// The bytes of text the definition holds.
    pub fn text_len(&self) -> usize {
        let env: usize = self.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        let after: usize = self.after.iter().map(String::len).sum();
        self.name.len()
            + self.cmd.len()
            + env
            + after
            + self.cwd.as_ref().map_or(0, String::len)
            + self.user.as_ref().map_or(0, String::len)
    }

    /// Which bound the definition breaks, as its user reads it; `None`
    /// when it keeps them all.
    pub fn broken_bound(&self) -> Option<String> {
        if self.env.len() > MAX_SERVICE_ENV {
            return Some(format!(
                "{} environment variables; a service sets at most {MAX_SERVICE_ENV}",
                self.env.len()
            ));
        }
        if self.after.len() > MAX_SERVICE_AFTER {
            return Some(format!(
                "{} --after names; a service waits for at most {MAX_SERVICE_AFTER}",
                self.after.len()
            ));
        }
        let text = self.text_len();
        (text > MAX_SERVICE_TEXT).then(|| {
            format!(
                "{text} bytes of command, variables and names; a definition holds at most {MAX_SERVICE_TEXT}"
            )
        })
    }
}

/// What the service manager says about one service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceStatus {
    pub spec: ServiceSpec,
    /// waiting, starting, running, backoff, stopped, exited, failed.
    pub state: String,
    /// The pid inside the inner.
    pub pid: Option<i32>,
    pub uptime_ms: Option<u64>,
    /// Starts by its restart policy after it exited on a running inner.
    pub restarts: u32,
    /// Inners it was started on: the first start, and one per bounce,
    /// restore or restart of a dead inner. Not counted in `restarts`.
    #[serde(default)]
    pub inner_starts: u32,
    pub last_exit: Option<ExitStatus>,
    /// Its port accepts connections (always true without --http-port).
    pub ready: bool,
    /// Why it failed, or what it waits for (`waiting for web (failed)`).
    pub reason: Option<String>,
    /// The last lines it printed (stdout and stderr).
    pub last_lines: Vec<String>,
}

/// What a redacted value reads as.
pub const REDACTED: &str = "[redacted]";

impl ServiceStatus {
    /// For a caller who may see the service but not its secrets: every
    /// variable's value and the lines it printed go.
    pub fn redact(&mut self) {
        for (_, value) in &mut self.spec.env {
            value.clear();
            value.push_str(REDACTED);
        }
        self.last_lines.clear();
    }
}

/// A request to the service manager.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ServiceRequest {
    Add(ServiceSpec),
    Remove(String),
    Start(String),
    Stop(String),
    /// Stop it with this long between SIGTERM and SIGKILL instead of
    /// the manager's default.
    StopWithin {
        name: String,
        timeout_ms: u64,
    },
    Restart(String),
    List,
    Show(String),
    /// Deliver a signal to the service's process group.
    Signal {
        name: String,
        signal: i32,
    },
}

/// One line of a log, as stored and as sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogRecord {
    /// Unix time in milliseconds when hulld received it.
    pub ts_ms: i64,
    pub stream: Stream,
    pub line: String,
    /// Set on a record hulld wrote about the service (it started, the
    /// inner was bounced), whose `line` then says what happened; absent
    /// on the service's own output. Absent in a segment file when unset;
    /// always on the wire, where fields are positional.
    #[serde(default)]
    pub marker: Option<LogMarker>,
    /// On the records of an exec (`hull logs exec`): which exec wrote the
    /// line, and on its marker records what it ran and how it ended. Last,
    /// so a record without it decodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecTag>,
}

/// What an exec's record in the `exec` log says about the exec. Only `id`
/// is set on its output lines; the marker records fill in the rest.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecTag {
    /// Numbers the execs of one state dir, from 1.
    pub id: u64,
    /// On `exec_start` and `exec_end`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// On `exec_end`: how the process ended; absent when the session ended
    /// first (the inner stopped, the client went away).
    #[serde(default)]
    pub exit: Option<ExitStatus>,
    /// On `exec_end`: from the spawn to the end of the session.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// On `exec_output`: the size of a stream that was not text, in all.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// On `exec_output`: the SHA-256 of all of that stream, in hex;
    /// absent when some of it was not logged.
    #[serde(default)]
    pub sha256: Option<String>,
    /// On `exec_end`: the bytes of output not logged because the log fell
    /// behind the process; absent when all of it was.
    #[serde(default)]
    pub unlogged_bytes: Option<u64>,
}

/// What a marker record in a service's log marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogMarker {
    /// The service started on a new inner (or by `hull services start`).
    Start,
    /// Its restart policy started it again after it exited.
    Restart,
    /// The inner was bounced; what follows ran on the new one.
    Bounce,
    /// The inner was restored to a checkpoint.
    Restore,
    /// The inner's init died and hulld started a new inner.
    InnerRestart,
    /// An exec started (in the `exec` log, with its [`ExecTag`]).
    ExecStart,
    /// A stream of an exec was not text: its size and hash, not its bytes.
    ExecOutput,
    /// An exec ended: its exit and duration.
    ExecEnd,
}

impl LogMarker {
    pub fn name(self) -> &'static str {
        match self {
            LogMarker::Start => "start",
            LogMarker::Restart => "restart",
            LogMarker::Bounce => "bounce",
            LogMarker::Restore => "restore",
            LogMarker::InnerRestart => "inner_restart",
            LogMarker::ExecStart => "exec_start",
            LogMarker::ExecOutput => "exec_output",
            LogMarker::ExecEnd => "exec_end",
        }
    }
}
