//! The supervisor owns the inner's lifecycle: start, stop, bounce, restart
//! after an unplanned death, and shutdown. One task runs it, so lifecycle
//! operations never overlap; everyone else reads its published state.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hull_cgroups::Cgroup;
use hull_checkpoint::{failpoint, CheckpointMade, Quiesce, Storage, StorageError};
use hull_inner::InnerSpec;
use hull_proto::{BounceReport, ExitStatus, InnerState, RestoreReport};
use tokio::sync::{mpsc, oneshot, watch};

use crate::launch::{launch, Inner, SealedExe};

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
    /// Automatic checkpoints kept before the oldest are deleted.
    pub auto_checkpoints_keep: usize,
    /// The service definitions: recorded with each checkpoint, replaced by
    /// a restore.
    pub registry: Arc<Mutex<hull_services::Registry>>,
    pub rootfs: PathBuf,
    pub hostname: String,
    /// hulld's network namespace for the inner (None: a fresh one per
    /// inner, loopback only and lost at every bounce).
    pub netns: Option<Arc<hull_ingress::InnerNetns>>,
    /// Bind-mounted on the inner's /etc/resolv.conf.
    pub resolv_conf: Option<PathBuf>,
    /// The service socket and client, mounted read-only at /run/hull.
    pub api_dir: Option<PathBuf>,
}

/// Counters and state for `hull status`.
#[derive(Debug, Clone)]
pub struct Published {
    pub state: InnerState,
    pub bounces: u64,
    pub unplanned_restarts: u64,
    pub last_error: Option<String>,
}

enum Request {
    Bounce {
        grace: Duration,
        reply: oneshot::Sender<Result<BounceReport, String>>,
    },
    Shutdown {
        grace: Duration,
        reply: oneshot::Sender<()>,
    },
    Checkpoint {
        comment: Option<String>,
        reply: oneshot::Sender<Result<CheckpointMade, StorageError>>,
    },
    Restore {
        id: String,
        reply: oneshot::Sender<Result<RestoreReport, StorageError>>,
    },
    Retry,
}

/// Freezes the inner's cgroup around a snapshot.
struct FreezeInner<'a>(&'a Cgroup);

impl Quiesce for FreezeInner<'_> {
    fn freeze(&mut self) -> Result<(), String> {
        self.0
            .freeze(Duration::from_secs(5))
            .map_err(|e| e.to_string())
    }

    fn thaw(&mut self) -> Result<(), String> {
        self.0.thaw().map_err(|e| e.to_string())
    }
}

fn gone() -> StorageError {
    StorageError::Freeze("hulld is shutting down".into())
}

/// The handle everyone else holds.
#[derive(Clone)]
pub struct Supervisor {
    requests: mpsc::UnboundedSender<Request>,
    current: watch::Receiver<Option<Arc<Inner>>>,
    published: Arc<Mutex<Published>>,
}

impl Supervisor {
    /// Starts the supervisor task, which starts the first inner at once.
    pub fn start(config: InnerConfig) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        let (current_tx, current) = watch::channel(None);
        let published = Arc::new(Mutex::new(Published {
            state: InnerState::Stopped,
            bounces: 0,
            unplanned_restarts: 0,
            last_error: None,
        }));
        let task = Task {
            config,
            current: current_tx,
            published: published.clone(),
            requests: requests.clone(),
            generation: 0,
            backoff: RETRY_FIRST,
            retry_pending: false,
        };
        tokio::spawn(task.run(rx));
        Supervisor {
            requests,
            current,
            published,
        }
    }

    pub fn published(&self) -> Published {
        self.published.lock().unwrap().clone()
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

    pub async fn bounce(&self, grace: Duration) -> Result<BounceReport, String> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Bounce { grace, reply })
            .map_err(|_| "hulld is shutting down".to_string())?;
        rx.await.map_err(|_| "hulld is shutting down".to_string())?
    }

    /// Takes a checkpoint; lifecycle operations wait while it runs.
    pub async fn checkpoint(
        &self,
        comment: Option<String>,
    ) -> Result<CheckpointMade, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Checkpoint { comment, reply })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Restores checkpoint `id`; a second restore waits for the first.
    pub async fn restore(&self, id: String) -> Result<RestoreReport, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Restore { id, reply })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
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
                        let _ = reply.send(self.checkpoint(comment, false));
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
        self.published.lock().unwrap().state = state;
    }

    fn spec(&self) -> Result<InnerSpec, StorageError> {
        let layer = self.config.storage.current_layer()?;
        Ok(InnerSpec {
            lower: self.config.lower.clone(),
            upper: layer.upper,
            work: layer.work,
            rootfs: self.config.rootfs.clone(),
            hostname: self.config.hostname.clone(),
            cgroup_procs: self.config.cgroup.procs_files(),
            join_netns: self.config.netns.is_some(),
            resolv_conf: self.config.resolv_conf.clone(),
            api_dir: self.config.api_dir.clone(),
        })
    }

    /// Starts an inner; on failure schedules a retry with backoff.
    async fn start(&mut self, exit_tx: &mpsc::UnboundedSender<(u64, ExitStatus)>) -> bool {
        self.set_state(InnerState::Starting);
        self.generation += 1;
        let prepared = self.config.cgroup.create().and_then(|()| {
            self.config
                .cgroup
                .set_limits(self.config.memory_max, self.config.pids_max)
        });
        let spec = prepared
            .map_err(|e| e.to_string())
            .and_then(|()| self.spec().map_err(|e| e.to_string()));
        let result = match spec {
            Err(e) => Err(e),
            Ok(spec) => launch(
                &self.config.exe,
                &spec,
                self.generation,
                self.config.netns.as_ref().map(|ns| ns.fd()),
                exit_tx.clone(),
            )
            .await
            .map_err(|e| e.to_string()),
        };
        match result {
            Ok(inner) => {
                tracing::info!(
                    pid = inner.pid,
                    start_ms = inner.start_time.as_secs_f64() * 1e3,
                    "inner ready"
                );
                self.published.lock().unwrap().last_error = None;
                self.set_state(InnerState::Running);
                self.current.send_replace(Some(inner));
                true
            }
            Err(message) => {
                tracing::error!(error = %message, retry_in_ms = self.backoff.as_millis() as u64, "inner failed to start");
                // Whatever the failed attempt left in the cgroup must go
                // before the next one.
                let _ = self.config.cgroup.kill_all(Duration::from_secs(5));
                {
                    let mut p = self.published.lock().unwrap();
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
            let _ = self.config.cgroup.kill_all(Duration::from_secs(5));
            self.set_state(InnerState::Stopped);
            return;
        };
        self.set_state(InnerState::Stopping);
        inner.set_stop_reason(reason);
        if !grace.is_zero() {
            let _ = inner.signal(libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                match self.config.cgroup.pids() {
                    Ok(pids) if pids.len() <= 1 => break,
                    Err(_) => break,
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        // Killing the pid namespace's init kills every process in it.
        let _ = inner.signal(libc::SIGKILL);
        inner.wait_exit().await;
        if let Err(e) = self.config.cgroup.kill_all(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "inner cgroup not empty after its init died");
        }
        release_mounts(&inner, unmount_wait).await;
        self.set_state(InnerState::Stopped);
    }

    async fn bounce(
        &mut self,
        grace: Duration,
        exit_tx: &mpsc::UnboundedSender<(u64, ExitStatus)>,
    ) -> Result<BounceReport, String> {
        let begin = Instant::now();
        self.stop(grace, "the inner was bounced", UnmountWait::Wait)
            .await;
        let stop_ms = begin.elapsed().as_secs_f64() * 1e3;
        self.backoff = RETRY_FIRST;
        if !self.start(exit_tx).await {
            let p = self.published.lock().unwrap();
            return Err(p.last_error.clone().unwrap_or_default());
        }
        let inner = self.current.borrow().clone().expect("just started");
        let bounces = {
            let mut p = self.published.lock().unwrap();
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

    /// Freeze, snapshot, thaw. Blocking work (ioctls, fsync, SQLite) runs
    /// in place on this worker; it takes milliseconds.
    fn checkpoint(
        &self,
        comment: Option<String>,
        auto: bool,
    ) -> Result<CheckpointMade, StorageError> {
        let storage = &self.config.storage;
        let services = self
            .config
            .registry
            .lock()
            .unwrap()
            .to_json()
            .map_err(|e| StorageError::Freeze(format!("reading the service registry: {e}")))?;
        let made = tokio::task::block_in_place(|| {
            storage.create_checkpoint(
                comment,
                auto,
                &services,
                &mut FreezeInner(&self.config.cgroup),
            )
        })?;
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
        Ok(made)
    }

    /// Auto-checkpoint, writable snapshot of the target, stop, swap, start.
    async fn restore(
        &mut self,
        id: &str,
        exit_tx: &mpsc::UnboundedSender<(u64, ExitStatus)>,
    ) -> Result<RestoreReport, StorageError> {
        let begin = Instant::now();
        let storage = self.config.storage.clone();
        let target = storage.checkpoint(id)?;
        let undo = self.checkpoint(Some(format!("before restore to {id}")), true)?;
        failpoint("restore:after-auto-checkpoint");
        let pending = tokio::task::block_in_place(|| storage.prepare_restore(id))?;
        let stop_begin = Instant::now();
        self.stop(
            Duration::ZERO,
            &format!("the inner was restored to checkpoint {id}"),
            UnmountWait::Background,
        )
        .await;
        let stop_ms = stop_begin.elapsed().as_secs_f64() * 1e3;
        failpoint("restore:after-stop");
        if let Err(e) = storage.commit_restore(pending) {
            // The old layer is still current: bring the inner back on it.
            self.start(exit_tx).await;
            return Err(e);
        }
        failpoint("restore:after-swap");
        // The services recorded with the checkpoint replace the registry;
        // the service manager replays them on the new inner.
        if let Err(e) = self
            .config
            .registry
            .lock()
            .unwrap()
            .replace_all(&target.services)
        {
            tracing::error!(error = %e, checkpoint = id, "cannot restore the services recorded with the checkpoint");
        }
        self.backoff = RETRY_FIRST;
        self.start(exit_tx).await;
        let current = self.current.borrow().clone();
        let Some(inner) = current else {
            let reason = self.published.lock().unwrap().last_error.clone();
            return Err(StorageError::Freeze(format!(
                "restored {id}, but the inner did not start: {}",
                reason.unwrap_or_default()
            )));
        };
        let keep = self.config.auto_checkpoints_keep;
        // Deleting a retired layer makes btrfs's cleaner walk its whole
        // tree; done at once it slows the next checkpoint or restore down,
        // so it waits until restores have paused.
        tokio::spawn(async move {
            tokio::time::sleep(GC_DELAY).await;
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = storage.collect_garbage() {
                    tracing::warn!(error = %e, "cannot delete retired layers");
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
                        tracing::warn!(error = %e, "retention of automatic checkpoints failed")
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
        let _ = self.config.cgroup.kill_all(Duration::from_secs(5));
        // The next inner mounts the same layer: the old root goes first.
        release_mounts(&inner, UnmountWait::Wait).await;
        self.published.lock().unwrap().unplanned_restarts += 1;
        if inner.started.elapsed() > STABLE_AFTER {
            self.backoff = RETRY_FIRST;
            self.start(exit_tx).await;
        } else {
            self.set_state(InnerState::Failed);
            self.published.lock().unwrap().last_error =
                Some(format!("the inner's init died ({status}) soon after start"));
            self.schedule_retry();
        }
    }
}
