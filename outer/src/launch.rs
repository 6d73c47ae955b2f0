//! Starting one inner container from hulld: the sealed copy of our binary,
//! the helper exec, the handshake with the inner init, and the link to it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lock;
use futures::{SinkExt, StreamExt};
use hull_inner::{InnerSpec, FD_CHANNEL_FD, INIT_LINK_FD, NETNS_FD};
use hull_proto::fdpass::{self, FdReceiver};
use hull_proto::{
    frame_reader, frame_writer, ExecSpec, ExitStatus, FrameWriter, FromInit, Hello, SpawnErrorKind,
    ToInit, PROTOCOL_VERSION,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

/// The argv[1] that turns hulld's binary into the single-threaded helper.
pub const HELPER_ARG: &str = "__inner-helper";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot create a sealed copy of hulld's binary")]
    SealedExe(#[source] io::Error),
    #[error("cannot create the init link socketpair")]
    Socketpair(#[source] io::Error),
    #[error("cannot start the inner helper {path}")]
    SpawnHelper { path: PathBuf, source: io::Error },
    #[error("the inner helper failed ({status}): {stderr}")]
    Helper { status: String, stderr: String },
    #[error("the inner helper printed no init pid: {0:?}")]
    HelperOutput(String),
    #[error("cannot open a pidfd for the inner init (pid {pid})")]
    Pidfd { pid: i32, source: io::Error },
    #[error("handshake with the inner init failed: {0}")]
    Handshake(String),
    #[error("the inner init failed to set up the container at step {step}: {message}")]
    Setup { step: String, message: String },
}

/// hulld's binary copied into a sealed memfd. The inner's processes can see
/// their init's /proc/1/exe; pointing it at a sealed anonymous file instead
/// of hulld's binary on disk closes the CVE-2019-5736 path back out.
pub struct SealedExe {
    fd: OwnedFd,
}

impl SealedExe {
    pub fn create() -> Result<Self, LaunchError> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(
            "hull-init",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| LaunchError::SealedExe(e.into()))?;
        let mut src = std::fs::File::open("/proc/self/exe").map_err(LaunchError::SealedExe)?;
        let mut dst = std::fs::File::from(fd);
        io::copy(&mut src, &mut dst).map_err(LaunchError::SealedExe)?;
        let fd = OwnedFd::from(dst);
        seal(&fd).map_err(LaunchError::SealedExe)?;
        Ok(SealedExe { fd })
    }

    /// A path that execs the sealed copy. The memfd is close-on-exec, so the
    /// helper does not keep it open after its own exec.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.fd.as_raw_fd()
        ))
    }
}

/// Seals the copy against any change of size or content.
///
/// F_SEAL_FUTURE_WRITE, not F_SEAL_WRITE: the latter also waits for every
/// other reference to the file's pages to go (the kernel's own short-lived
/// ones included) and fails with EBUSY after about 70 ms, which once
/// stopped a hulld from starting. The copy is ours alone until it is
/// sealed, with no mapping, so refusing every later write or writable
/// mapping is the whole of what F_SEAL_WRITE would add.
fn seal(fd: &OwnedFd) -> io::Result<()> {
    let seals =
        libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE;
    // SAFETY: F_ADD_SEALS on our own memfd with an integer argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

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

pub use hull_services::SpawnFailure;

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

/// One running inner container.
pub struct Inner {
    pub pid: i32,
    pub generation: u64,
    pub started: Instant,
    /// Time from the helper's spawn to the init's Ready.
    pub start_time: Duration,
    pub link: Arc<InitLink>,
    /// Signals go through the pidfd: the init's pid could be reused once
    /// it has been reaped, the pidfd never points elsewhere.
    pidfd: OwnedFd,
    exit: watch::Receiver<Option<ExitStatus>>,
    stop_reason: Mutex<Option<String>>,
    /// Why it was started, for the services' logs.
    cause: hull_services::InnerCause,
    /// The inner's mount namespace, held so that the init's exit does not
    /// unmount its root: unmounting an overlay whose files were touched
    /// frees every cached dentry (a third of a second after 100k files),
    /// and a stop need not wait for that. See [`Inner::take_mount_ns`].
    mount_ns: Mutex<Option<std::fs::File>>,
    /// The ids its user namespace maps (none: its root is the VM's).
    user_namespace: Option<hull_proto::IdMapping>,
}

impl Inner {
    /// The held mount namespace; dropping it unmounts the inner's root
    /// filesystem (in the dropping thread) once the init is gone.
    pub fn take_mount_ns(&self) -> Option<std::fs::File> {
        lock(&self.mount_ns).take()
    }

    /// The inner's `/` as an `O_PATH` directory fd, opened through the
    /// init's /proc entry, so it is the root the inner sees (its mount
    /// namespace, its mounts).
    pub fn open_root(&self) -> io::Result<OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        let root = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(format!("/proc/{}/root", self.pid))?;
        // Alive after the open: the pid was still the init's when opened
        // (a pid is reused only after hulld reaps it).
        pidfd_send_signal(&self.pidfd, 0)?;
        Ok(root.into())
    }

    /// The host uid and gid of the inner's root user: what a file hulld
    /// makes in the inner on the user's behalf is owned by.
    pub fn root_owner(&self) -> hull_api::Owner {
        let base = self.user_namespace.map_or(0, |ids| ids.base);
        hull_api::Owner {
            uid: base,
            gid: base,
        }
    }

    /// Sends `signal` to the init (ESRCH once it is gone, which is fine).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        pidfd_send_signal(&self.pidfd, signal)
    }

    /// Why the inner stopped, for sessions that it ended.
    pub fn stop_reason(&self) -> String {
        lock(&self.stop_reason)
            .clone()
            .unwrap_or_else(|| "the inner's init died".to_string())
    }

    pub fn set_stop_reason(&self, reason: &str) {
        *lock(&self.stop_reason) = Some(reason.to_string());
    }

    /// Waits until the init has exited and been reaped.
    pub async fn wait_exit(&self) -> Option<ExitStatus> {
        let mut exit = self.exit.clone();
        let result = exit.wait_for(|s| s.is_some()).await;
        result.ok().and_then(|s| *s)
    }
}

/// Starts an inner and completes the handshake. `on_exit` receives the
/// generation when its init has been reaped.
pub async fn launch(
    exe: &SealedExe,
    spec: &InnerSpec,
    generation: u64,
    cause: hull_services::InnerCause,
    netns: Option<RawFd>,
    on_exit: mpsc::UnboundedSender<(u64, ExitStatus)>,
) -> Result<Arc<Inner>, LaunchError> {
    let begin = Instant::now();
    let (link_parent, link_child) =
        std::os::unix::net::UnixStream::pair().map_err(LaunchError::Socketpair)?;
    let (fds_parent, fds_child) = fdpass::fd_channel_pair().map_err(LaunchError::Socketpair)?;

    let pid = run_helper(exe, spec, OwnedFd::from(link_child), fds_child, netns).await?;
    let pidfd = pidfd_open(pid).map_err(|source| LaunchError::Pidfd { pid, source })?;
    let pidfd_err = |source| LaunchError::Pidfd { pid, source };
    let watched = pidfd.try_clone().map_err(pidfd_err)?;
    let link_guard = pidfd.try_clone().map_err(pidfd_err)?;
    let (exit_tx, exit_rx) = watch::channel(None);
    tokio::spawn(watch_exit(watched, generation, exit_tx, on_exit));

    link_parent
        .set_nonblocking(true)
        .map_err(LaunchError::Socketpair)?;
    let stream = UnixStream::from_std(link_parent).map_err(LaunchError::Socketpair)?;
    let (read_half, write_half) = stream.into_split();
    let mut reader = frame_reader::<_, FromInit>(read_half);
    let mut writer = frame_writer::<_, ToInit>(write_half);

    // The init sends Hello (or Hello then SetupFailed), waits for ours,
    // then reports Ready.
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        match reader.next().await {
            Some(Ok(FromInit::Hello(h))) if h.version == PROTOCOL_VERSION => Ok(()),
            Some(Ok(FromInit::Hello(h))) => Err(LaunchError::Handshake(format!(
                "init speaks protocol {} (hulld: {PROTOCOL_VERSION})",
                h.version
            ))),
            other => Err(LaunchError::Handshake(format!(
                "expected Hello, got {other:?}"
            ))),
        }
    })
    .await
    .map_err(|_| LaunchError::Handshake("no Hello from the init within 10 s".into()))?;
    first?;
    // A failed send is not final: an init whose setup failed has already
    // queued its SetupFailed report and exited, and that report says more.
    let sent = writer
        .send(ToInit::Hello(Hello::new(concat!(
            "hulld ",
            env!("CARGO_PKG_VERSION")
        ))))
        .await;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(FromInit::Ready { steps }))) => {
            tracing::debug!(?steps, "inner setup steps (microseconds)");
        }
        Ok(Some(Ok(FromInit::SetupFailed { step, message }))) => {
            return Err(LaunchError::Setup { step, message })
        }
        Ok(other) => {
            return Err(LaunchError::Handshake(match sent {
                Err(e) => format!("sending Hello: {e}"),
                Ok(()) => format!("expected Ready, got {other:?}"),
            }))
        }
        Err(_) => return Err(LaunchError::Handshake("no Ready within 10 s".into())),
    }

    let link = Arc::new(InitLink {
        writer: tokio::sync::Mutex::new(writer),
        sessions: Mutex::new(Some(HashMap::new())),
    });
    tokio::spawn(read_link(reader, link.clone(), link_guard));
    let receiver = FdReceiver::new(fds_parent).map_err(LaunchError::Socketpair)?;
    tokio::spawn(read_fds(receiver, link.clone()));
    let mount_ns = hold_mount_ns(pid, &pidfd);
    Ok(Arc::new(Inner {
        pid,
        generation,
        started: Instant::now(),
        start_time: begin.elapsed(),
        link,
        pidfd,
        exit: exit_rx,
        stop_reason: Mutex::new(None),
        cause,
        mount_ns: Mutex::new(mount_ns),
        user_namespace: spec.user_namespace,
    }))
}

async fn run_helper(
    exe: &SealedExe,
    spec: &InnerSpec,
    link_child: OwnedFd,
    fds_child: OwnedFd,
    netns: Option<RawFd>,
) -> Result<i32, LaunchError> {
    let spec_json = serde_json::to_string(spec).expect("InnerSpec serialises");
    let path = exe.path();
    let mut cmd = tokio::process::Command::new(&path);
    cmd.arg0("hull-inner-helper")
        .arg(HELPER_ARG)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let pairs = [
        (link_child.as_raw_fd(), INIT_LINK_FD),
        (fds_child.as_raw_fd(), FD_CHANNEL_FD),
        (netns.unwrap_or(-1), NETNS_FD),
    ];
    let placed = if netns.is_some() { 3 } else { 2 };
    // SAFETY: between fork and exec the closure only runs `place_fds`, which
    // makes raw fcntl/dup2/close calls (async-signal-safe) on a copied array
    // and allocates nothing; the source fds stay open in the parent until
    // spawn returns because we hold them (the namespace fd is held by the
    // InnerNetns for hulld's lifetime).
    unsafe {
        cmd.pre_exec(move || place_fds(&pairs[..placed]));
    }
    let mut child = cmd
        .spawn()
        .map_err(|source| LaunchError::SpawnHelper { path, source })?;
    drop(link_child);
    drop(fds_child);
    // The spec travels on stdin, not argv: the init's /proc/1/cmdline is
    // readable inside the inner and should not spell out hulld's paths.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(spec_json.as_bytes()).await;
    }
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line).await;
    }
    let status = child.wait().await.map_err(|e| LaunchError::Helper {
        status: "unknown".into(),
        stderr: e.to_string(),
    })?;
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr).await;
        }
        return Err(LaunchError::Helper {
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    line.trim()
        .parse::<i32>()
        .map_err(|_| LaunchError::HelperOutput(line.clone()))
}

/// The most fds [`place_fds`] moves at once (the helper gets three); a
/// fixed bound, as the child between fork and exec must not allocate.
const MAX_PLACED_FDS: usize = 8;

/// In a child between fork and exec: makes each pair's target fd refer to
/// what its source fd referred to on entry, and stay open across exec.
///
/// Plain dup2(source, target) in turn gets two cases wrong: dup2(fd, fd)
/// does nothing, so an fd already in place keeps its close-on-exec flag and
/// is gone after exec; and a source that is also an earlier pair's target
/// (3 -> 4 after 4 -> 3) has been overwritten by the time it is read. So
/// every source is first copied above the highest target, and the targets
/// are then filled from the copies only.
///
/// Only raw fcntl, dup2 and close, and no allocation: safe between fork and
/// exec in a multi-threaded parent.
fn place_fds(pairs: &[(RawFd, RawFd)]) -> io::Result<()> {
    let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
    if pairs.len() > MAX_PLACED_FDS {
        return Err(invalid());
    }
    for (i, &(_, target)) in pairs.iter().enumerate() {
        // Two sources for one target would leave it to the last one silently.
        if target < 0 || pairs[..i].iter().any(|&(_, t)| t == target) {
            return Err(invalid());
        }
    }
    let above = pairs.iter().map(|&(_, t)| t).max().unwrap_or(0) + 1;
    let mut copies: [RawFd; MAX_PLACED_FDS] = [-1; MAX_PLACED_FDS];
    let close_copies = |copies: &[RawFd]| {
        for &fd in copies.iter().filter(|&&fd| fd >= 0) {
            // SAFETY: each copy is an fd this function made and nothing else uses.
            unsafe { libc::close(fd) };
        }
    };
    for (i, &(source, _)) in pairs.iter().enumerate() {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) only reads `source` and returns a
        // new fd numbered at least `above`, so no target is touched yet.
        let fd = unsafe { libc::fcntl(source, libc::F_DUPFD_CLOEXEC, above) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            close_copies(&copies[..i]);
            return Err(e);
        }
        copies[i] = fd;
    }
    for (&copy, &(_, target)) in copies.iter().zip(pairs) {
        // SAFETY: `copy` is above every target, so this dup2 is never the
        // no-op of dup2(fd, fd): the target is replaced and its
        // close-on-exec flag cleared.
        if unsafe { libc::dup2(copy, target) } < 0 {
            let e = io::Error::last_os_error();
            close_copies(&copies);
            return Err(e);
        }
    }
    close_copies(&copies);
    Ok(())
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the init's mount namespace. Without it (no /proc, or a kernel
/// that refuses) the inner works the same, its stop just waits for the
/// unmount.
fn hold_mount_ns(pid: i32, pidfd: &OwnedFd) -> Option<std::fs::File> {
    let path = format!("/proc/{pid}/ns/mnt");
    match std::fs::File::open(&path) {
        // Alive after the open: the pid was still the init's when opened
        // (a pid is reused only after hulld reaps it).
        Ok(ns) if pidfd_send_signal(pidfd, 0).is_ok() => Some(ns),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(path, error = %e, "cannot hold the inner's mount namespace");
            None
        }
    }
}

fn pidfd_send_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, a NULL siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps the init through its pidfd (it is our child: hulld is a child
/// subreaper and the helper that forked it has exited).
fn reap_pidfd(pidfd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own pidfd with a valid siginfo pointer.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded, so si_pid/si_status are initialised.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        ExitStatus::Code(status)
    } else {
        ExitStatus::Signal(status)
    }))
}

async fn watch_exit(
    pidfd: OwnedFd,
    generation: u64,
    exit_tx: watch::Sender<Option<ExitStatus>>,
    on_exit: mpsc::UnboundedSender<(u64, ExitStatus)>,
) {
    let status = match fdpass::register_async(pidfd) {
        Ok(afd) => loop {
            let Ok(mut guard) = afd.readable().await else {
                break ExitStatus::Signal(0);
            };
            match reap_pidfd(afd.get_ref()) {
                Ok(Some(status)) => break status,
                Ok(None) => guard.clear_ready(),
                Err(_) => break ExitStatus::Signal(0),
            }
        },
        Err(_) => ExitStatus::Signal(0),
    };
    let _ = exit_tx.send(Some(status));
    let _ = on_exit.send((generation, status));
}

/// Dispatches the init's reports. The link ends when the init dies, or when
/// it sends something undecodable: an init that cannot be understood cannot
/// be trusted with the inner, so it is killed and the supervisor restarts
/// the inner.
async fn read_link(
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

async fn read_fds(receiver: FdReceiver, link: Arc<InitLink>) {
    while let Ok(Some((id, fds))) = receiver.recv().await {
        link.dispatch(id, InitEvent::Fds(fds));
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

/// The service manager starts services through the init link, like execs.
impl hull_services::InnerHost for Inner {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn cause(&self) -> hull_services::InnerCause {
        self.cause.clone()
    }

    async fn spawn(&self, spec: ExecSpec) -> Result<hull_services::HostProcess, SpawnFailure> {
        let mut process = self.link.spawn(spec).await?;
        let fds = std::mem::take(&mut process.fds);
        let (id, pid) = (process.id, process.pid);
        // The process guard moves into the future: its session stays
        // registered on the link until the exit is seen.
        let exit = Box::pin(async move { process.wait_exit().await });
        Ok(hull_services::HostProcess { id, pid, fds, exit })
    }

    async fn kill(&self, id: u64, signal: i32) {
        self.link.kill(id, signal).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    type Pairs = [(RawFd, RawFd); MAX_PLACED_FDS];

    /// A page of the copy that something else still references (here a
    /// pipe it was spliced into; in hulld's start-up, the kernel's own
    /// short-lived references) must not make sealing fail: F_SEAL_WRITE
    /// waits about 70 ms for such references and then fails with EBUSY,
    /// which once stopped a hulld from starting.
    #[test]
    fn sealing_does_not_depend_on_page_references() {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(
            "seal-test",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let mut file = std::fs::File::from(fd);
        io::Write::write_all(&mut file, &[7u8; 16384]).unwrap();
        let fd = OwnedFd::from(file);
        let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
        // SAFETY: a fresh read-only shared mapping of our memfd; nothing else uses it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "{}", io::Error::last_os_error());
        let iov = libc::iovec {
            iov_base: map,
            iov_len: 4096,
        };
        // SAFETY: the iovec points at the 4096 bytes mapped above.
        let spliced = unsafe { libc::vmsplice(pipe_w.as_raw_fd(), &iov, 1, 0) };
        assert_eq!(spliced, 4096, "{}", io::Error::last_os_error());
        // SAFETY: unmapping the mapping made above; the pipe keeps its page.
        assert_eq!(unsafe { libc::munmap(map, 4096) }, 0);

        seal(&fd).expect("sealing with a page still in a pipe");

        let written = nix::unistd::write(&fd, b"x");
        assert_eq!(
            written,
            Err(nix::errno::Errno::EPERM),
            "a write after sealing"
        );
        // SAFETY: F_GET_SEALS on our own memfd.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        for wanted in [libc::F_SEAL_SEAL, libc::F_SEAL_SHRINK, libc::F_SEAL_GROW] {
            assert_ne!(
                seals & wanted,
                0,
                "seal {wanted:#x} missing from {seals:#x}"
            );
        }
        drop(pipe_r);
    }

    fn fixed(pairs: &[(RawFd, RawFd)]) -> (Pairs, usize) {
        let mut out = [(-1, -1); MAX_PLACED_FDS];
        out[..pairs.len()].copy_from_slice(pairs);
        (out, pairs.len())
    }

    /// Files x, y, z held at fds from 100 up (close-on-exec, like all of
    /// hulld's), so they never sit where a case wants its fds.
    struct Objects {
        dir: tempfile::TempDir,
        fds: Vec<OwnedFd>,
    }

    impl Objects {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let fds = ["x", "y", "z"]
                .iter()
                .map(|name| {
                    let file = std::fs::File::create(dir.path().join(name)).unwrap();
                    // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd or -1.
                    let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
                    assert!(fd >= 100, "{}", io::Error::last_os_error());
                    // SAFETY: the kernel just returned this fd; nothing else owns it.
                    unsafe { OwnedFd::from_raw_fd(fd) }
                })
                .collect();
            Objects { dir, fds }
        }

        fn fd(&self, name: char) -> RawFd {
            self.fds[(name as u8 - b'x') as usize].as_raw_fd()
        }

        /// In a child: `start` puts the named files at the fd numbers a case
        /// starts from, then `place_fds(pairs)`, then exec of a shell that
        /// reports which of its fds refer to one of the files. Fds that did
        /// not survive the exec (close-on-exec) are missing from the answer.
        fn run(
            &self,
            start: &[(char, RawFd)],
            pairs: &[(RawFd, RawFd)],
        ) -> io::Result<BTreeMap<RawFd, String>> {
            let start: Vec<(RawFd, RawFd)> = start
                .iter()
                .map(|&(name, at)| (self.fd(name), at))
                .collect();
            let (start, start_len) = fixed(&start);
            let (pairs, pairs_len) = fixed(pairs);
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(
                r#"for f in /proc/$$/fd/*; do l=$(readlink "$f") && echo "${f##*/} $l"; done"#,
            );
            // SAFETY: between fork and exec the closure makes raw dup3 calls
            // and runs `place_fds`, all async-signal-safe and allocation-free
            // on arrays copied into the closure.
            unsafe {
                cmd.pre_exec(move || {
                    for &(fd, at) in &start[..start_len] {
                        if libc::dup3(fd, at, libc::O_CLOEXEC) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    place_fds(&pairs[..pairs_len])
                });
            }
            let out = cmd.stdin(Stdio::null()).output()?;
            assert!(out.status.success(), "{out:?}");
            let prefix = format!("{}/", self.dir.path().display());
            Ok(String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .filter_map(|line| {
                    let (fd, path) = line.split_once(' ')?;
                    Some((fd.parse().ok()?, path.strip_prefix(&prefix)?.to_owned()))
                })
                .collect())
        }
    }

    #[test]
    fn every_target_refers_to_its_source_and_survives_exec() {
        let o = Objects::new();
        type Case<'a> = (
            &'a str,
            &'a [(char, RawFd)],
            &'a [(RawFd, RawFd)],
            &'a [(RawFd, &'a str)],
        );
        let cases: [Case; 6] = [
            (
                "sources far from the targets (hulld's case)",
                &[('x', 20), ('y', 21), ('z', 22)],
                &[(20, 3), (21, 4), (22, 5)],
                &[(3, "x"), (4, "y"), (5, "z")],
            ),
            // dup2(3, 3) alone leaves fd 3 close-on-exec.
            ("already in place", &[('x', 3)], &[(3, 3)], &[(3, "x")]),
            (
                "a source an earlier target overwrites",
                &[('x', 3), ('y', 7)],
                &[(7, 3), (3, 4)],
                &[(3, "y"), (4, "x")],
            ),
            (
                "a swap",
                &[('x', 3), ('y', 4)],
                &[(3, 4), (4, 3)],
                &[(3, "y"), (4, "x")],
            ),
            (
                "a three-cycle",
                &[('x', 3), ('y', 4), ('z', 5)],
                &[(3, 4), (4, 5), (5, 3)],
                &[(3, "z"), (4, "x"), (5, "y")],
            ),
            (
                "one in place next to one moving",
                &[('x', 3), ('y', 5)],
                &[(5, 5), (3, 4)],
                &[(4, "x"), (5, "y")],
            ),
        ];
        // Every case runs, so a failure names all the orders that break.
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|&(what, start, pairs, want)| {
                let want: BTreeMap<RawFd, String> =
                    want.iter().map(|&(fd, n)| (fd, n.to_owned())).collect();
                let got = o.run(start, pairs).unwrap();
                (got != want).then(|| format!("{what}: got {got:?}, want {want:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn a_bad_source_or_a_doubled_target_fails_the_spawn() {
        let o = Objects::new();
        let err = o.run(&[], &[(1 << 20, 3)]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        let err = o.run(&[('x', 3), ('y', 4)], &[(3, 5), (4, 5)]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }
}
