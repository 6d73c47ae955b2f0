//! The supervisor owns the inner's lifecycle: start, stop, bounce, restart
//! after an unplanned death, and shutdown. One task runs it, so lifecycle
//! operations never overlap; everyone else reads its published state.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hull_cgroups::{Cgroup, CgroupError};
use hull_checkpoint::{
    failpoint, CheckpointMade, Quiesce, QuiesceError, Storage, StorageError, WritableLayer,
};
use hull_inner::InnerSpec;
use hull_proto::{BounceReport, ExitStatus, InnerState, RestoreReport};
use hull_services::{InnerCause, Replaced, ServiceError, ServiceManager};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::launch::{launch, Inner, LaunchError, SealedExe};
use crate::lock;

const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long after a restore its old layer is deleted.
const GC_DELAY: Duration = Duration::from_secs(2);
/// An inner that lived this long resets the restart backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// What hulld needs to create inners.
pub struct InnerConfig {
    pub exe: SealedExe,
    pub cgroup: Cgroup,
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
    pub lower: PathBuf,
    /// Where the writable layer comes from, fresh at every start.
    pub storage: Arc<Storage>,
    /// Takes every new checkpoint to the remote; `None` without one.
    pub pusher: Option<crate::pusher::Pusher>,
    /// Automatic checkpoints kept before the oldest are deleted.
    pub auto_checkpoints_keep: usize,
    /// The service manager: asked for the definitions recorded with each
    /// checkpoint, and told to replace them on a restore.
    pub services: ServiceManager,
    pub rootfs: PathBuf,
    pub hostname: String,
    /// hulld's network namespace for the inner (None: a fresh one per
    /// inner, loopback only and lost at every bounce).
    pub netns: Option<Arc<hull_network::InnerNetns>>,
    /// Bind-mounted on the inner's /etc/resolv.conf.
    pub resolv_conf: Option<PathBuf>,
    /// The service socket and client, mounted read-only at /run/hull.
    pub api_dir: Option<PathBuf>,
    /// The inner's own cgroup, mounted read-only at its /sys/fs/cgroup.
    pub cgroup_view: Option<hull_inner::CgroupView>,
    /// Compiled at hulld's start; every init installs it.
    pub seccomp: Option<hull_inner::SeccompFilter>,
    /// The inner's user namespace; `None`: its root is the VM's.
    pub user_namespace: Option<hull_proto::IdMapping>,
}

/// Counters and state for `hull status`.
#[derive(Debug, Clone)]
pub struct Published {
    pub state: InnerState,
    pub bounces: u64,
    pub unplanned_restarts: u64,
    pub last_error: Option<String>,
    /// Out-of-memory kills in the inner's cgroup since hulld started.
    pub oom_kills: u64,
    /// When the last was seen, Unix time in milliseconds.
    pub last_oom_kill_ms: Option<i64>,
}

/// Why an inner did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot prepare the inner's cgroup")]
    Cgroup(#[source] CgroupError),
    #[error("cannot find the writable layer")]
    Layer(#[source] StorageError),
    #[error("cannot launch the inner")]
    Launch(#[source] LaunchError),
}

/// What a lifecycle operation failed at. Each operation has its own
/// variants, so "hulld is shutting down" never reads as a storage error.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("hulld is shutting down")]
    ShuttingDown,
    #[error("the inner did not start again after the bounce: {reason}")]
    BounceStart { reason: String },
    #[error("cannot read the service definitions to record with the checkpoint")]
    CheckpointServices(#[source] ServiceError),
    #[error("cannot take the checkpoint")]
    Checkpoint(#[source] StorageError),
    #[error("cannot take the automatic checkpoint before restoring {id}")]
    RestoreUndo {
        id: String,
        #[source]
        source: Box<SupervisorError>,
    },
    #[error("cannot restore checkpoint {id}")]
    Restore {
        id: String,
        #[source]
        source: StorageError,
    },
    #[error("restored {id}, but the inner did not start: {reason}")]
    RestoredNotStarted { id: String, reason: String },
}

impl SupervisorError {
    /// The storage error underneath, if that is what failed.
    pub fn storage(&self) -> Option<&StorageError> {
        match self {
            SupervisorError::Checkpoint(e) | SupervisorError::Restore { source: e, .. } => Some(e),
            SupervisorError::RestoreUndo { source, .. } => source.storage(),
            _ => None,
        }
    }
}

enum Request {
    Bounce {
        grace: Duration,
        reply: oneshot::Sender<Result<BounceReport, SupervisorError>>,
    },
    Shutdown {
        grace: Duration,
        reply: oneshot::Sender<()>,
    },
    Checkpoint {
        comment: Option<String>,
        reply: oneshot::Sender<Result<CheckpointMade, SupervisorError>>,
    },
    Restore {
        id: String,
        reply: oneshot::Sender<Result<RestoreReport, SupervisorError>>,
    },
    Retry,
}

/// Freezes the inner's cgroup around a snapshot.
struct FreezeInner(Cgroup);

impl Quiesce for FreezeInner {
    fn freeze(&mut self) -> Result<(), QuiesceError> {
        Ok(self.0.freeze(Duration::from_secs(5))?)
    }

    fn thaw(&mut self) -> Result<(), QuiesceError> {
        Ok(self.0.thaw()?)
    }
}

/// The handle everyone else holds.
#[derive(Clone)]
pub struct Supervisor {
    requests: mpsc::UnboundedSender<Request>,
    current: watch::Receiver<Option<Arc<Inner>>>,
    published: Arc<Mutex<Published>>,
    /// The inner's cgroup and memory limit, for [`OomCheck`].
    cgroup: Cgroup,
    memory_max: Option<u64>,
    oom: Arc<OomCounter>,
}

/// Tells whether an exec's process was the out-of-memory killer's victim:
/// it died of SIGKILL and the inner's cgroup counted a kill meanwhile (the
/// kernel counts it before the victim dies, so the count is read when the
/// exit is known; another process killed at the same time would be taken
/// for it).
pub struct OomCheck {
    cgroup: Cgroup,
    before: Option<u64>,
    memory_max: Option<u64>,
}

impl OomCheck {
    /// The line to print on the exec's stderr, if its process was killed by
    /// the out-of-memory killer.
    pub async fn victim_note(&self, status: ExitStatus) -> Option<String> {
        if status != ExitStatus::Signal(libc::SIGKILL) {
            return None;
        }
        let cgroup = self.cgroup.clone();
        let after = tokio::task::spawn_blocking(move || cgroup.oom_kills())
            .await
            .ok()
            .flatten();
        match (self.before, after) {
            (Some(before), Some(after)) if after > before => Some(format!(
                "hull: killed by the out-of-memory killer (memory_max {})\n",
                memory_text(self.memory_max)
            )),
            _ => None,
        }
    }
}

/// A memory limit as the config writes it: 64M, 2G.
fn memory_text(bytes: Option<u64>) -> String {
    match bytes {
        None => "none".into(),
        Some(b) if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        Some(b) if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        Some(b) => format!("{b} bytes"),
    }
}

/// The inner's out-of-memory kills since hulld started, counted by whoever
/// reads the kernel's count first: the watcher thread on the kernel's
/// notification, or a status request, so `hull status` right after an
/// exec that was killed already counts the kill.
struct OomCounter {
    cgroup: Cgroup,
    memory_max: Option<u64>,
    published: Arc<Mutex<Published>>,
    /// The kernel's count when last read.
    seen: Mutex<Option<u64>>,
}

impl OomCounter {
    /// Reads the kernel's count (a file read: on a blocking thread) and
    /// publishes what is new.
    fn account(&self) {
        let Some(now) = self.cgroup.oom_kills() else {
            return;
        };
        let killed = {
            let mut seen = lock(&self.seen);
            let killed = match *seen {
                Some(before) if now > before => now - before,
                _ => 0,
            };
            *seen = Some(now);
            killed
        };
        if killed == 0 {
            return;
        }
        let total = {
            let mut p = lock(&self.published);
            p.oom_kills += killed;
            p.last_oom_kill_ms = Some(hull_logs::now_ms());
            p.oom_kills
        };
        tracing::warn!(
            killed,
            total,
            memory_max = %memory_text(self.memory_max),
            "the out-of-memory killer killed {killed} process(es) in the inner: it reached its memory limit"
        );
    }
}

/// How often the OOM watcher looks again without a notification: the
/// count is read after every wait, so a kernel that never notifies is
/// still noticed within this.
const OOM_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Watches the inner's cgroup for out-of-memory kills on a thread of its
/// own (the waits block), until the supervisor is gone.
fn spawn_oom_watcher(weak: std::sync::Weak<OomCounter>) {
    let run = move || {
        let mut watch = None;
        let mut warned = false;
        loop {
            let Some(counter) = weak.upgrade() else {
                return;
            };
            if watch.is_none() {
                match counter.cgroup.watch_oom() {
                    Ok(w) => watch = Some(w),
                    // The group is made by the first start; until then,
                    // and where it cannot be watched, the count is read
                    // every OOM_CHECK_EVERY.
                    Err(e) if !warned && counter.cgroup.exists() => {
                        warned = true;
                        tracing::debug!(error = %crate::error_chain(&e), "cannot watch the inner's cgroup for out-of-memory kills; reading its count every second");
                    }
                    Err(_) => {}
                }
            }
            drop(counter);
            let waited = match watch.as_mut().map(|w| w.wait(OOM_CHECK_EVERY)) {
                Some(Ok(_)) => true,
                Some(Err(_)) => {
                    watch = None;
                    false
                }
                None => false,
            };
            if !waited {
                std::thread::sleep(OOM_CHECK_EVERY);
            }
            match weak.upgrade() {
                Some(counter) => counter.account(),
                None => return,
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("hull-oom-watch".into())
        .spawn(run)
    {
        tracing::warn!(error = %e, "cannot start the out-of-memory watcher; OOM kills will not be reported");
    }
}

impl Supervisor {
    /// Starts the supervisor task, which starts the first inner at once
    /// and publishes it on `current_tx`. The join handle tells the caller
    /// if the task panicked.
    pub fn start(
        config: InnerConfig,
        current_tx: watch::Sender<Option<Arc<Inner>>>,
    ) -> (Self, JoinHandle<()>) {
        let (requests, rx) = mpsc::unbounded_channel();
        let current = current_tx.subscribe();
        let published = Arc::new(Mutex::new(Published {
            state: InnerState::Stopped,
            bounces: 0,
            unplanned_restarts: 0,
            last_error: None,
            oom_kills: 0,
            last_oom_kill_ms: None,
        }));
        let (cgroup, memory_max) = (config.cgroup.clone(), config.memory_max);
        let oom = Arc::new(OomCounter {
            seen: Mutex::new(cgroup.oom_kills()),
            cgroup: cgroup.clone(),
            memory_max,
            published: published.clone(),
        });
        spawn_oom_watcher(Arc::downgrade(&oom));
        let task = Task {
            config,
            current: current_tx,
            published: published.clone(),
            requests: requests.clone(),
            generation: 0,
            backoff: RETRY_FIRST,
            retry_pending: false,
            cause: InnerCause::Boot,
        };
        let join = tokio::spawn(task.run(rx));
        (
            Supervisor {
                requests,
                current,
                published,
                cgroup,
                memory_max,
                oom,
            },
            join,
        )
    }

    /// Call before an exec's process starts; ask the result once it ended.
    pub async fn oom_check(&self) -> OomCheck {
        let cgroup = self.cgroup.clone();
        let before = tokio::task::spawn_blocking(move || cgroup.oom_kills())
            .await
            .ok()
            .flatten();
        OomCheck {
            cgroup: self.cgroup.clone(),
            before,
            memory_max: self.memory_max,
        }
    }

    pub fn published(&self) -> Published {
        lock(&self.published).clone()
    }

    /// [`Self::published`] with the kernel's OOM count read now, not when
    /// the watcher last woke.
    pub async fn published_now(&self) -> Published {
        let oom = self.oom.clone();
        let _ = tokio::task::spawn_blocking(move || oom.account()).await;
        self.published()
    }

    /// Follows the running inner: `None` while stopped or starting.
    pub fn watch_current(&self) -> watch::Receiver<Option<Arc<Inner>>> {
        self.current.clone()
    }

    pub fn current(&self) -> Option<Arc<Inner>> {
        self.current.borrow().clone()
    }

    /// The running inner, waiting up to `timeout` for one (during a bounce
    /// or a restart) instead of failing at once.
    pub async fn wait_running(&self, timeout: Duration) -> Option<Arc<Inner>> {
        let mut current = self.current.clone();
        let found = tokio::time::timeout(timeout, current.wait_for(|c| c.is_some())).await;
        match found {
            Ok(Ok(inner)) => inner.clone(),
            _ => None,
        }
    }

    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, SupervisorError>>) -> Request,
    ) -> Result<T, SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(request(reply))
            .map_err(|_| SupervisorError::ShuttingDown)?;
        rx.await.map_err(|_| SupervisorError::ShuttingDown)?
    }

    pub async fn bounce(&self, grace: Duration) -> Result<BounceReport, SupervisorError> {
        self.ask(|reply| Request::Bounce { grace, reply }).await
    }

    /// Takes a checkpoint; lifecycle operations wait while it runs.
    pub async fn checkpoint(
        &self,
        comment: Option<String>,
    ) -> Result<CheckpointMade, SupervisorError> {
        self.ask(|reply| Request::Checkpoint { comment, reply })
            .await
    }

    /// Restores checkpoint `id`; a second restore waits for the first.
    /// The report says which service definitions the restore changed.
    pub async fn restore(&self, id: String) -> Result<RestoreReport, SupervisorError> {
        self.ask(|reply| Request::Restore { id, reply }).await
    }

    pub async fn shutdown(&self, grace: Duration) {
        let (reply, rx) = oneshot::channel();
        if self
            .requests
            .send(Request::Shutdown { grace, reply })
            .is_ok()
        {
            let _ = rx.await;
        }
    }
}

/// Whether a stop waits for the old inner's root to be unmounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnmountWait {
    /// The next inner mounts the same layer (a bounce, a restart), or
    /// hulld is going down and must leave nothing mounted.
    Wait,
    /// The next inner runs on a new layer (a restore).
    Background,
}

/// Drops hulld's reference to a dead inner's mount namespace, which
/// unmounts its root (on a blocking thread: it can take a third of a
/// second). A restore's next inner runs on another layer and need not wait
/// for that; any other start reuses this layer, whose overlay must be gone
/// first.
async fn release_mounts(inner: &Inner, wait: UnmountWait) {
    let Some(ns) = inner.take_mount_ns() else {
        return;
    };
    let unmount = tokio::task::spawn_blocking(move || {
        let begin = Instant::now();
        drop(ns);
        tracing::debug!(
            ms = begin.elapsed().as_secs_f64() * 1e3,
            "the stopped inner's mounts are gone"
        );
    });
    if wait == UnmountWait::Wait {
        let _ = unmount.await;
    }
}

struct Task {
    config: InnerConfig,
    current: watch::Sender<Option<Arc<Inner>>>,
    published: Arc<Mutex<Published>>,
    requests: mpsc::UnboundedSender<Request>,
    generation: u64,
    backoff: Duration,
    retry_pending: bool,
    /// Why the next inner starts; back to `Boot` once one has started.
    cause: InnerCause,
}

impl Task {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        let (exit_tx, mut exits) = mpsc::unbounded_channel::<(u64, ExitStatus)>();
        self.start(&exit_tx).await;
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    Some(Request::Bounce { grace, reply }) => {
                        let report = self.bounce(grace, &exit_tx).await;
                        let _ = reply.send(report);
                    }
                    Some(Request::Shutdown { grace, reply }) => {
                        self.stop(grace, "hulld is shutting down (hull down)", UnmountWait::Wait).await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(Request::Checkpoint { comment, reply }) => {
                        let _ = reply.send(self.checkpoint(comment, false).await);
                    }
                    Some(Request::Restore { id, reply }) => {
                        let result = self.restore(&id, &exit_tx).await;
                        let _ = reply.send(result);
                    }
                    Some(Request::Retry) => {
                        self.retry_pending = false;
                        if self.current.borrow().is_none() {
                            self.start(&exit_tx).await;
                        }
                    }
                    None => return,
                },
                Some((generation, status)) = exits.recv() => {
                    self.on_exit(generation, status, &exit_tx).await;
                }
            }
        }
    }

    fn set_state(&self, state: InnerState) {
        lock(&self.published).state = state;
    }

    /// Kills whatever is left in the inner's cgroup: a loop that sleeps,
    /// so on a blocking thread.
    async fn kill_cgroup(&self) -> Result<(), CgroupError> {
        let cgroup = self.config.cgroup.clone();
        tokio::task::spawn_blocking(move || cgroup.kill_all(Duration::from_secs(5)))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    fn spec(&self, layer: WritableLayer) -> InnerSpec {
        InnerSpec {
            lower: self.config.lower.clone(),
            upper: layer.upper,
            work: layer.work,
            rootfs: self.config.rootfs.clone(),
            hostname: self.config.hostname.clone(),
            cgroup_procs: self.config.cgroup.procs_files(),
            join_netns: self.config.netns.is_some(),
            resolv_conf: self.config.resolv_conf.clone(),
            api_dir: self.config.api_dir.clone(),
            cgroup_view: self.config.cgroup_view.clone(),
            seccomp: self.config.seccomp.clone(),
            user_namespace: self.config.user_namespace,
        }
    }

    /// Starts an inner; on failure schedules a retry with backoff.
    async fn start(&mut self, exit_tx: &mpsc::UnboundedSender<(u64, ExitStatus)>) -> bool {
        self.set_state(InnerState::Starting);
        self.generation += 1;
        let prepared = self
            .config
            .cgroup
            .create()
            .and_then(|()| {
                self.config
                    .cgroup
                    .set_limits(self.config.memory_max, self.config.pids_max)
            })
            .map_err(StartError::Cgroup);
        let layer = prepared.and_then(|()| {
            self.config
                .storage
                .current_layer()
                .map_err(StartError::Layer)
        });
        let result = match layer {
            Err(e) => Err(e),
            Ok(layer) => {
                let storage = &self.config.storage;
                let lifted = layer.clone();
                if let Err(e) = on_storage(storage, move |s| s.lift_layer_quota(&lifted)).await {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot lift the layer's quota while the inner mounts it; a full layer mounts read-only");
                }
                let launched = launch(
                    &self.config.exe,
                    &self.spec(layer.clone()),
                    self.generation,
                    self.cause.clone(),
                    self.config.netns.as_ref().map(|ns| ns.fd()),
                    exit_tx.clone(),
                )
                .await
                .map_err(StartError::Launch);
                if let Err(e) = on_storage(storage, move |s| s.limit_layer(&layer)).await {
                    tracing::error!(error = %crate::error_chain(&e), "cannot put the layer's quota back; it has none until hulld starts again");
                }
                launched
            }
        };
        match result {
            Ok(inner) => {
                tracing::info!(
                    pid = inner.pid,
                    start_ms = inner.start_time.as_secs_f64() * 1e3,
                    "inner ready"
                );
                lock(&self.published).last_error = None;
                self.cause = InnerCause::Boot;
                self.set_state(InnerState::Running);
                self.current.send_replace(Some(inner));
                true
            }
            Err(e) => {
                let message = crate::error_chain(&e);
                tracing::error!(error = %message, retry_in_ms = u64::try_from(self.backoff.as_millis()).unwrap_or(u64::MAX), "inner failed to start");
                // Whatever the failed attempt left in the cgroup must go
                // before the next one.
                let _ = self.kill_cgroup().await;
                {
                    let mut p = lock(&self.published);
                    p.state = InnerState::Failed;
                    p.last_error = Some(message);
                }
                self.schedule_retry();
                false
            }
        }
    }

    fn schedule_retry(&mut self) {
        if self.retry_pending {
            return;
        }
        self.retry_pending = true;
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
        let requests = self.requests.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = requests.send(Request::Retry);
        });
    }

    /// SIGTERM to everything (the init forwards it), SIGKILL after `grace`,
    /// then wait for the init to be reaped and the cgroup to be empty.
    async fn stop(&mut self, grace: Duration, reason: &str, unmount_wait: UnmountWait) {
        let Some(inner) = self.current.send_replace(None) else {
            let _ = self.kill_cgroup().await;
            self.set_state(InnerState::Stopped);
            return;
        };
        self.set_state(InnerState::Stopping);
        inner.set_stop_reason(reason);
        if !grace.is_zero() {
            let _ = inner.signal(libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                // pids_current is one small file read; listing every pid
                // of a 4,000-process inner on a worker is not.
                match self.config.cgroup.pids_current() {
                    Some(n) if n <= 1 => break,
                    None => break,
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        // Killing the pid namespace's init kills every process in it.
        let _ = inner.signal(libc::SIGKILL);
        inner.wait_exit().await;
        if let Err(e) = self.kill_cgroup().await {
            tracing::warn!(error = %crate::error_chain(&e), "inner cgroup not empty after its init died");
        }
        release_mounts(&inner, unmount_wait).await;
        self.set_state(InnerState::Stopped);
    }

    async fn bounce(
        &mut self,
        grace: Duration,
        exit_tx: &mpsc::UnboundedSender<(u64, ExitStatus)>,
    ) -> Result<BounceReport, SupervisorError> {
        hull_proto::panic_point("supervisor:bounce-panics");
        let begin = Instant::now();
        self.stop(grace, "the inner was bounced", UnmountWait::Wait)
            .await;
        let stop_ms = begin.elapsed().as_secs_f64() * 1e3;
        self.backoff = RETRY_FIRST;
        self.cause = InnerCause::Bounce;
        self.start(exit_tx).await;
        let started = self.current.borrow().clone();
        let Some(inner) = started else {
            let reason = lock(&self.published).last_error.clone();
            return Err(SupervisorError::BounceStart {
                reason: reason.unwrap_or_default(),
            });
        };
        let bounces = {
            let mut p = lock(&self.published);
            p.bounces += 1;
            p.bounces
        };
        let report = BounceReport {
            stop_ms,
            start_ms: inner.start_time.as_secs_f64() * 1e3,
            total_ms: begin.elapsed().as_secs_f64() * 1e3,
            inner_pid: inner.pid,
            bounces,
        };
        tracing::info!(total_ms = report.total_ms, "inner bounced");
        Ok(report)
    }

    /// Freeze, snapshot, thaw. The work (syncfs of a dirty layer, ioctls,
    /// SQLite) runs on a blocking thread; this task waits for it, so no
    /// other lifecycle operation overlaps it.
    async fn checkpoint(
        &self,
        comment: Option<String>,
        auto: bool,
    ) -> Result<CheckpointMade, SupervisorError> {
        let storage = self.config.storage.clone();
        let services = self
            .config
            .services
            .snapshot()
            .await
            .map_err(SupervisorError::CheckpointServices)?;
        let mut freeze = FreezeInner(self.config.cgroup.clone());
        let made = tokio::task::spawn_blocking(move || {
            storage.create_checkpoint(comment, auto, &services, &mut freeze)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(SupervisorError::Checkpoint)?;
        tracing::info!(
            id = %made.row.id,
            auto,
            frozen_ms = made.frozen.as_secs_f64() * 1e3,
            total_ms = made.total.as_secs_f64() * 1e3,
            steps_us = %made
                .steps
                .iter()
                .map(|(name, d)| format!("{name}={}", d.as_micros()))
                .collect::<Vec<_>>()
                .join(","),
            "checkpoint created"
        );
        if let Some(pusher) = &self.config.pusher {
            pusher.queue(made.row.id.clone());
        }
        Ok(made)
    }

    /// Auto-checkpoint, writable snapshot of the target, stop, swap, start.
    async fn restore(
        &mut self,
        id: &str,
        exit_tx: &mpsc::UnboundedSender<(u64, ExitStatus)>,
    ) -> Result<RestoreReport, SupervisorError> {
        let begin = Instant::now();
        let storage = self.config.storage.clone();
        let failed = |source| SupervisorError::Restore {
            id: id.to_string(),
            source,
        };
        let target = on_storage(&storage, {
            let id = id.to_string();
            move |s| s.checkpoint(&id)
        })
        .await
        .map_err(failed)?;
        let undo = self
            .checkpoint(Some(format!("before restore to {id}")), true)
            .await
            .map_err(|e| SupervisorError::RestoreUndo {
                id: id.to_string(),
                source: Box::new(e),
            })?;
        failpoint("restore:after-auto-checkpoint");
        let pending = on_storage(&storage, {
            let id = id.to_string();
            move |s| s.prepare_restore(&id)
        })
        .await
        .map_err(failed)?;
        let stop_begin = Instant::now();
        self.stop(
            Duration::ZERO,
            &format!("the inner was restored to checkpoint {id}"),
            UnmountWait::Background,
        )
        .await;
        let stop_ms = stop_begin.elapsed().as_secs_f64() * 1e3;
        failpoint("restore:after-stop");
        if let Err(e) = on_storage(&storage, move |s| s.commit_restore(pending)).await {
            // The old layer is still current: bring the inner back on it.
            self.cause = InnerCause::Bounce;
            self.start(exit_tx).await;
            return Err(failed(e));
        }
        failpoint("restore:after-swap");
        // The services recorded with the checkpoint replace the registry;
        // the service manager replays them on the new inner.
        let replaced = match self.config.services.replace(target.services).await {
            Ok(replaced) => replaced,
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), checkpoint = id, "cannot restore the services recorded with the checkpoint");
                Replaced::default()
            }
        };
        self.backoff = RETRY_FIRST;
        self.cause = InnerCause::Restore(id.to_string());
        self.start(exit_tx).await;
        let current = self.current.borrow().clone();
        let Some(inner) = current else {
            let reason = lock(&self.published).last_error.clone();
            return Err(SupervisorError::RestoredNotStarted {
                id: id.to_string(),
                reason: reason.unwrap_or_default(),
            });
        };
        let keep = self.config.auto_checkpoints_keep;
        // Deleting a retired layer makes btrfs's cleaner walk its whole
        // tree; done at once it slows the next checkpoint or restore down,
        // so it waits until restores have paused.
        tokio::spawn(async move {
            tokio::time::sleep(GC_DELAY).await;
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = storage.collect_garbage() {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot delete retired layers");
                }
                match storage.apply_retention(keep) {
                    Ok(deleted) if !deleted.is_empty() => {
                        tracing::info!(
                            ?deleted,
                            keep,
                            "deleted automatic checkpoints beyond retention"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "retention of automatic checkpoints failed")
                    }
                }
            })
            .await;
        });
        let report = RestoreReport {
            restored: id.to_string(),
            undo: undo.row.id,
            stop_ms,
            start_ms: inner.start_time.as_secs_f64() * 1e3,
            total_ms: begin.elapsed().as_secs_f64() * 1e3,
            inner_pid: inner.pid,
            services_removed: replaced.removed,
            services_added: replaced.added,
        };
        tracing::info!(restored = id, undo = %report.undo, total_ms = report.total_ms, "restored");
        Ok(report)
    }

    async fn on_exit(
        &mut self,
        generation: u64,
        status: ExitStatus,
        exit_tx: &mpsc::UnboundedSender<(u64, ExitStatus)>,
    ) {
        let current = self.current.borrow().clone();
        let Some(inner) = current.filter(|i| i.generation == generation) else {
            return; // a stop we asked for, already handled
        };
        tracing::warn!(pid = inner.pid, %status, "the inner's init died; restarting the inner");
        self.current.send_replace(None);
        let _ = self.kill_cgroup().await;
        // The next inner mounts the same layer: the old root goes first.
        release_mounts(&inner, UnmountWait::Wait).await;
        lock(&self.published).unplanned_restarts += 1;
        self.cause = InnerCause::Recovery;
        if inner.started.elapsed() > STABLE_AFTER {
            self.backoff = RETRY_FIRST;
            self.start(exit_tx).await;
        } else {
            self.set_state(InnerState::Failed);
            lock(&self.published).last_error =
                Some(format!("the inner's init died ({status}) soon after start"));
            self.schedule_retry();
        }
    }
}

/// Runs a storage call on a blocking thread: the catalog is SQLite with
/// synchronous=FULL, and snapshots are ioctls that may flush.
pub(crate) async fn on_storage<T: Send + 'static>(
    storage: &Arc<Storage>,
    f: impl FnOnce(&Storage) -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    let storage = storage.clone();
    crate::blocking(move || f(&storage)).await
}
