//! What hulld is once started: the handles of its services (supervisor,
//! storage, service manager, logs, network), composed. Connections call the
//! `do_*` methods; none of them owns state of its own or blocks a runtime
//! worker.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hull_cgroups::HullCgroups;
use hull_checkpoint::{Storage, StorageError};
use hull_logs::{ExecLog, LogStore};
use hull_proto::{
    BounceReport, CheckpointInfo, CheckpointListing, CheckpointReport, DaemonMsg, ErrorKind,
    ExecRequest, IngressReport, Limits, PortsReport, RestoreReport, ServiceRequest, ServiceStatus,
    SessionRequest, StatusReport, TokenRequest,
};
use hull_services::{ServiceError, ServiceManager};
use tokio::sync::Notify;

use crate::network::Network;
use crate::sessions::{Outcome, Replies, Requests, SessionError, Sessions};
use crate::supervisor::{Supervisor, SupervisorError};

/// The parts [`Hulld`] is made of, as start-up built them.
pub(crate) struct Parts {
    pub state_dir: crate::StateDir,
    pub socket: PathBuf,
    pub storage: Arc<Storage>,
    /// Pushes checkpoints to the remote; `None` without `[remote]`.
    pub pusher: Option<crate::pusher::Pusher>,
    pub services: ServiceManager,
    pub logs: Arc<LogStore>,
    pub exec_log: Arc<ExecLog>,
    pub cgroups: HullCgroups,
    pub supervisor: Supervisor,
    pub limits: Limits,
    pub image: PathBuf,
    pub user_namespace: Option<hull_proto::IdMapping>,
    pub network: Network,
    pub tokens: hull_api::TokenStore,
    pub sessions: Sessions,
    /// The bytes of large request frames read at once, over every
    /// connection of every endpoint.
    pub frame_budget: Arc<hull_proto::FrameBudget>,
}

pub struct Hulld {
    parts: Parts,
    /// The HTTP API's base URL, once it listens.
    api_url: std::sync::OnceLock<String>,
    stopped: Notify,
    shutdown_lock: tokio::sync::Mutex<bool>,
    shutting_down: AtomicBool,
}

use crate::blocking;

impl Hulld {
    pub(crate) fn new(parts: Parts) -> Arc<Self> {
        Arc::new(Hulld {
            parts,
            api_url: std::sync::OnceLock::new(),
            stopped: Notify::new(),
            shutdown_lock: tokio::sync::Mutex::new(false),
            shutting_down: AtomicBool::new(false),
        })
    }

    pub(crate) fn set_api_url(&self, url: String) {
        let _ = self.api_url.set(url);
    }

    /// An upload's writer process, moved into the inner's cgroup before
    /// it is given a byte; `None` (and hulld writes the upload itself)
    /// when it cannot be started or moved.
    pub fn charged_writer(&self, file: &std::fs::File) -> Option<std::process::Child> {
        let mut child = match crate::files_writer::spawn(file) {
            Ok(child) => child,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start an upload's writer; hulld writes it");
                return None;
            }
        };
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        match self.parts.cgroups.inner.join(pid) {
            Ok(()) => Some(child),
            Err(e) => {
                tracing::debug!(error = %e, "an upload's writer cannot join the inner's cgroup; hulld writes it");
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        }
    }

    /// A TCP connection into the inner's network, for the API's port proxy.
    pub async fn dial_inner(
        &self,
        target: std::net::SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        self.parts.network.dial(target).await
    }

    pub fn frame_budget(&self) -> Arc<hull_proto::FrameBudget> {
        self.parts.frame_budget.clone()
    }

    pub fn supervisor(&self) -> &Supervisor {
        &self.parts.supervisor
    }

    pub fn logs(&self) -> &Arc<LogStore> {
        &self.parts.logs
    }

    pub fn exec_log(&self) -> &Arc<ExecLog> {
        &self.parts.exec_log
    }

    pub async fn do_status(&self) -> StatusReport {
        let p = self.parts.supervisor.published_now().await;
        let inner = self.parts.supervisor.current();
        let head = self.parts.storage.head();
        let volume = self.parts.storage.volume();
        let storage = self.parts.storage.clone();
        let usage = tokio::task::spawn_blocking(move || storage.layer_usage())
            .await
            .ok()
            .flatten();
        StatusReport {
            daemon_pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            daemon_version: env!("CARGO_PKG_VERSION").to_string(),
            state: p.state,
            inner_pid: inner.as_ref().map(|i| i.pid),
            inner_uptime_ms: inner
                .as_ref()
                .map(|i| u64::try_from(i.started.elapsed().as_millis()).unwrap_or(u64::MAX)),
            bounces: p.bounces,
            unplanned_restarts: p.unplanned_restarts,
            limits: self.parts.limits.clone(),
            image: self.parts.image.display().to_string(),
            state_dir: self.parts.state_dir.root().display().to_string(),
            cgroup: self.parts.cgroups.inner.display_path(),
            volume: match &volume.image {
                Some(image) => format!(
                    "btrfs loop image {} at {}",
                    image.display(),
                    volume.root.display()
                ),
                None => format!("btrfs at {}", volume.root.display()),
            },
            head,
            layer_used: usage.map(|u| u.used),
            layer_quota: usage.and_then(|u| u.limit),
            last_error: p.last_error,
            oom_kills: p.oom_kills,
            last_oom_kill_ms: p.last_oom_kill_ms,
            api: self.api_url.get().cloned(),
            user_namespace: self.parts.user_namespace,
            remote: self.parts.pusher.as_ref().map(|p| p.status()),
        }
    }

    /// Makes, lists or revokes an HTTP API token.
    pub async fn do_tokens(&self, request: TokenRequest) -> Result<DaemonMsg, Failed> {
        let tokens = self.parts.tokens.clone();
        let reply = blocking(move || match request {
            TokenRequest::Create {
                scope,
                ttl_ms,
                name,
            } => tokens
                .create(scope, ttl_ms, name)
                .map(|(token, info)| DaemonMsg::TokenCreated { token, info }),
            TokenRequest::List => tokens.list().map(DaemonMsg::Tokens),
            TokenRequest::Revoke { id } => {
                tokens.revoke(&id).map(|()| DaemonMsg::TokenRevoked { id })
            }
        })
        .await;
        Ok(reply?)
    }

    /// Runs an exec as a session with this connection as its client;
    /// `started_by` names the connection's caller in the session list.
    pub async fn do_exec(
        &self,
        request: ExecRequest,
        started_by: &str,
        reader: &mut impl Requests,
        writer: &mut impl Replies,
    ) -> std::io::Result<Outcome> {
        let p = &self.parts;
        crate::exec::run(
            &p.supervisor,
            &p.sessions,
            &p.exec_log,
            request,
            started_by,
            reader,
            writer,
        )
        .await
    }

    /// Attaches this connection to session `id` and carries it, as
    /// [`Hulld::do_exec`] does an exec's.
    pub async fn do_session_attach(
        &self,
        id: u64,
        take_writer: bool,
        watch: bool,
        reader: &mut impl Requests,
        writer: &mut impl Replies,
    ) -> std::io::Result<Outcome> {
        use futures::SinkExt;
        match self.parts.sessions.attach(id, take_writer, watch).await {
            Ok(attachment) => {
                writer.send(attachment.attached()).await?;
                attachment.pump(reader, writer).await
            }
            Err(e) => {
                writer.send(Failed::from(e).answer()).await?;
                Ok(Outcome::Ended)
            }
        }
    }

    /// Lists or kills sessions (attaching is [`Hulld::do_session_attach`]).
    pub async fn do_sessions(&self, request: SessionRequest) -> Result<DaemonMsg, Failed> {
        let sessions = &self.parts.sessions;
        match request {
            SessionRequest::List => Ok(DaemonMsg::Sessions(sessions.list())),
            SessionRequest::Kill {
                id,
                signal,
                timeout_ms,
            } => Ok(sessions
                .kill(id, signal, Duration::from_millis(timeout_ms))
                .await
                .map(|forced| DaemonMsg::SessionKilled { id, forced })?),
            SessionRequest::Attach { .. } => Err(Failed::Misrouted("an attach")),
        }
    }

    /// Starts a detached exec: the answer a client gets first (started,
    /// or why not); the session runs on without one.
    pub async fn do_exec_detached(&self, request: ExecRequest, started_by: &str) -> DaemonMsg {
        crate::exec::detach(
            self.parts.supervisor.clone(),
            self.parts.sessions.clone(),
            self.parts.exec_log.clone(),
            request,
            started_by,
        )
        .await
    }

    pub async fn do_bounce(&self, grace: Duration) -> Result<BounceReport, Failed> {
        Ok(self.parts.supervisor.bounce(grace).await?)
    }

    pub async fn do_checkpoint_create(
        &self,
        comment: Option<String>,
    ) -> Result<CheckpointReport, Failed> {
        let made = self.parts.supervisor.checkpoint(comment).await?;
        Ok(CheckpointReport {
            checkpoint: info(made.row),
            frozen_ms: made.frozen.as_secs_f64() * 1e3,
            total_ms: made.total.as_secs_f64() * 1e3,
        })
    }

    pub async fn do_checkpoint_restore(&self, id: String) -> Result<RestoreReport, Failed> {
        Ok(self.parts.supervisor.restore(id).await?)
    }

    pub async fn do_checkpoint_list(&self) -> Result<CheckpointListing, Failed> {
        let storage = self.parts.storage.clone();
        let (rows, head) =
            blocking(move || Ok::<_, StorageError>((storage.list()?, storage.head()))).await?;
        Ok(CheckpointListing {
            checkpoints: rows
                .into_iter()
                .filter(|r| r.state == hull_checkpoint::CheckpointState::Ready)
                .map(info)
                .collect(),
            head,
            now_ms: hull_checkpoint::catalog::now_ms(),
        })
    }

    /// Pushes checkpoint `id` (the newest when `None`) now, calling
    /// `progress` as it goes.
    pub async fn do_checkpoint_push(
        &self,
        id: Option<String>,
        progress: impl Fn(&hull_proto::PushReport),
    ) -> Result<hull_proto::PushReport, Failed> {
        Ok(self.push(id, progress).await?)
    }

    async fn push(
        &self,
        id: Option<String>,
        progress: impl Fn(&hull_proto::PushReport),
    ) -> Result<hull_proto::PushReport, crate::pusher::PushError> {
        use crate::pusher::PushError;
        let pusher = self.parts.pusher.as_ref().ok_or(PushError::NoRemote)?;
        let id = match id {
            Some(id) => id,
            None => {
                let storage = self.parts.storage.clone();
                let rows = blocking(move || storage.list()).await?;
                rows.into_iter()
                    .rev()
                    .find(|r| r.state == hull_checkpoint::CheckpointState::Ready)
                    .map(|r| r.id)
                    .ok_or(PushError::NoCheckpoint)?
            }
        };
        {
            // An unknown id is refused here, by name, not queued.
            let storage = self.parts.storage.clone();
            let id = id.clone();
            blocking(move || storage.checkpoint(&id)).await?;
        }
        pusher
            .push_now(id, progress)
            .await
            .map_err(PushError::Failed)
    }

    pub async fn do_checkpoint_delete(&self, id: String) -> Result<(), Failed> {
        let storage = self.parts.storage.clone();
        Ok(blocking(move || storage.delete_checkpoint(&id)).await?)
    }

    /// A service request; without `secrets` (a read token) the answer
    /// keeps each variable's name but not its value, and none of what the
    /// service printed.
    pub async fn do_services(
        &self,
        request: ServiceRequest,
        secrets: bool,
    ) -> Result<Vec<ServiceStatus>, Failed> {
        let mut statuses = self.parts.services.request(request).await?;
        if !secrets {
            statuses.iter_mut().for_each(ServiceStatus::redact);
        }
        Ok(statuses)
    }

    /// The network policy, replaced first by `set`: stored, then
    /// enforced before the answer.
    pub async fn do_network_policy(&self, set: Option<String>) -> Result<DaemonMsg, Failed> {
        let path = self.parts.state_dir.network_policy();
        let setting = set.is_some();
        let stored = blocking(move || match set {
            Some(text) => crate::net_policy::save(&path, &text).map(Some),
            None => crate::net_policy::load(&path),
        })
        .await?;
        let enforced = match (&stored, setting) {
            (Some(s), true) => {
                let policy = Arc::new(s.policy.clone());
                self.parts
                    .network
                    .set_egress_policy(policy)
                    .await
                    .map_err(Failed::Egress)?
            }
            _ => self.parts.network.enforces_egress(),
        };
        Ok(DaemonMsg::NetworkPolicy {
            policy: stored.map(|s| s.text),
            enforced,
        })
    }

    pub async fn do_ports(&self) -> PortsReport {
        let cgroup = self.parts.cgroups.inner.clone();
        let pids = blocking(move || cgroup.pids().unwrap_or_default()).await;
        self.parts.network.report(&pids)
    }

    /// The ingress report; `token` false leaves the bearer token out.
    pub fn do_ingress(&self, token: bool) -> IngressReport {
        let mut report = self.parts.network.ingress_report();
        if !token {
            report.token.clear();
        }
        report
    }

    /// Whether a shutdown has begun: tasks that end now are not failures.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Stops the inner and removes hull's cgroups and the socket.
    /// Idempotent; returns once everything is gone. The main loop keeps
    /// running until [`Hulld::exit`], so the caller can still answer.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::Release);
        let mut done = self.shutdown_lock.lock().await;
        if *done {
            return;
        }
        tracing::info!(
            grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            "shutting down"
        );
        self.parts.supervisor.shutdown(grace).await;
        if let Some(pusher) = &self.parts.pusher {
            // Its `btrfs send` must be gone before the volume is unmounted.
            pusher.stop().await;
        }
        self.parts.network.shutdown().await;
        let cgroups = self.parts.cgroups.clone();
        let storage = self.parts.storage.clone();
        let socket = self.parts.socket.clone();
        let logs = self.parts.logs.clone();
        let exec_log = self.parts.exec_log.clone();
        blocking(move || {
            if let Err(e) = cgroups.teardown() {
                tracing::warn!(error = %crate::error_chain(&e), "cannot remove hull's cgroups");
            }
            if let Err(e) = storage.close() {
                tracing::warn!(error = %crate::error_chain(&e), "cannot unmount the btrfs volume");
            }
            let _ = std::fs::remove_file(&socket);
            // The exec records still queued for its writer thread.
            exec_log.sync();
            logs.flush();
        })
        .await;
        *done = true;
    }

    /// Lets the main loop return (after [`Hulld::shutdown`]).
    pub fn exit(&self) {
        self.stopped.notify_one();
    }

    /// Resolves when [`Hulld::exit`] was called.
    pub async fn exited(&self) {
        self.stopped.notified().await
    }
}

/// Why a request hulld served failed: the error of the part that failed,
/// and, in [`Failed::kind`], the one place that says what kind of error
/// each is to a client.
#[derive(Debug, thiserror::Error)]
pub enum Failed {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Token(#[from] hull_api::TokenError),
    #[error(transparent)]
    Policy(#[from] crate::net_policy::PolicyError),
    #[error("the network policy is stored but not enforced")]
    Egress(#[source] hull_network::enforcer::EnforcerError),
    #[error(transparent)]
    Push(#[from] crate::pusher::PushError),
    /// A request sent to the method that does not serve it.
    #[error("{0} is not served here")]
    Misrouted(&'static str),
}

impl Failed {
    /// What kind of failure this is to a client.
    pub fn kind(&self) -> ErrorKind {
        use crate::net_policy::PolicyError;
        match self {
            Failed::Storage(StorageError::UnknownCheckpoint { .. }) => ErrorKind::NotFound,
            Failed::Storage(_) => ErrorKind::Storage,
            Failed::Supervisor(
                SupervisorError::ShuttingDown
                | SupervisorError::BounceStart { .. }
                | SupervisorError::RestoredNotStarted { .. },
            ) => ErrorKind::InnerUnavailable,
            Failed::Supervisor(SupervisorError::CheckpointServices(_)) => ErrorKind::Internal,
            Failed::Supervisor(e) => match e.storage() {
                Some(StorageError::UnknownCheckpoint { .. }) => ErrorKind::NotFound,
                _ => ErrorKind::Storage,
            },
            Failed::Service(ServiceError::NotFound(_)) => ErrorKind::NotFound,
            Failed::Service(ServiceError::NotRunning(_)) => ErrorKind::NotRunning,
            Failed::Service(ServiceError::ManagerGone) => ErrorKind::Internal,
            Failed::Service(_) => ErrorKind::Service,
            Failed::Session(SessionError::NotFound(_)) => ErrorKind::NotFound,
            Failed::Session(SessionError::TooMany(_)) => ErrorKind::Busy,
            Failed::Token(hull_api::TokenError::NotFound(_)) => ErrorKind::NotFound,
            Failed::Token(_) => ErrorKind::Internal,
            Failed::Policy(PolicyError::Invalid(_)) => ErrorKind::BadRequest,
            Failed::Policy(_) => ErrorKind::Storage,
            Failed::Egress(_) => ErrorKind::Internal,
            Failed::Push(e) => {
                use crate::pusher::PushError;
                match e {
                    PushError::Storage(StorageError::UnknownCheckpoint { .. })
                    | PushError::NoCheckpoint => ErrorKind::NotFound,
                    PushError::NoRemote => ErrorKind::NotPermitted,
                    _ => ErrorKind::Storage,
                }
            }
            Failed::Misrouted(_) => ErrorKind::Internal,
        }
    }

    /// The error a client is answered with: its kind and the whole chain.
    pub fn answer(&self) -> DaemonMsg {
        DaemonMsg::error(self.kind(), hull_proto::error_chain(self))
    }
}

fn info(row: hull_checkpoint::CheckpointRow) -> CheckpointInfo {
    CheckpointInfo {
        services: services_of(&row.id, &row.services),
        id: row.id,
        parent: row.parent,
        created_ms: row.created_ms,
        comment: row.comment,
        auto: row.auto,
        remote_id: row.remote_id,
        parent_remote_id: row.parent_remote_id,
        remote_state: row.remote_state.to_string(),
        remote_error: row.remote_error,
        origin: row.origin.to_string(),
    }
}

/// The definitions a checkpoint recorded, stored as the registry's JSON.
fn services_of(id: &str, json: &str) -> Vec<hull_proto::ServiceSpec> {
    serde_json::from_str(json).unwrap_or_else(|e| {
        tracing::warn!(checkpoint = id, error = %e, "unreadable service definitions in the catalog");
        Vec::new()
    })
}
