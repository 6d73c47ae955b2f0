//! hulld's start-up, listeners and shutdown.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hull_cgroups::{CgroupError, HullCgroups};
use hull_checkpoint::Storage;
use hull_image::ImageStore;
use hull_proto::Limits;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use crate::config::{Config, ConfigError};
use crate::launch::{LaunchError, SealedExe};
use crate::server::Scope;
use crate::services::ServiceManager;
use crate::supervisor::{InnerConfig, Supervisor};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create state directory {path}: {source}; hulld needs a writable state dir (set state_dir in the config or pass --state-dir)")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("another hulld holds {path} (pid {holder}); stop it with `hull down`")]
    AlreadyRunning { path: PathBuf, holder: String },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot protect hulld ({what}): {source}")]
    Protect {
        what: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("base image {kind} is not built at {path}; build it with `hull image build --kind {kind}` (or `hull up`, which builds it)")]
    ImageMissing { kind: &'static str, path: PathBuf },
    #[error(transparent)]
    Storage(#[from] hull_checkpoint::StorageError),
    #[error(transparent)]
    Services(#[from] hull_services::ServiceError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("a hulld already answers on {path}; stop it with `hull down`")]
    SocketInUse { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("cannot listen on vsock port {port}: {source}")]
    Vsock { port: u32, source: io::Error },
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error(transparent)]
    InnerApi(#[from] crate::inner_api::InnerApiError),
}

/// Shared state of the running daemon.
pub struct Daemon {
    pub config: Config,
    pub storage: Arc<Storage>,
    pub services: ServiceManager,
    pub logs: Arc<crate::logs::LogStore>,
    pub cgroups: HullCgroups,
    pub supervisor: Supervisor,
    pub limits: Limits,
    pub image: PathBuf,
    pub network: crate::network::Network,
    pub registry: Arc<std::sync::Mutex<hull_services::Registry>>,
    stopped: Notify,
    shutdown_lock: tokio::sync::Mutex<bool>,
}

impl Daemon {
    /// Stops the inner and removes hull's cgroups and the socket.
    /// Idempotent; returns once everything is gone. The main loop keeps
    /// running until [`Daemon::exit`], so the caller can still answer.
    pub async fn shutdown(&self, grace: Duration) {
        let mut done = self.shutdown_lock.lock().await;
        if *done {
            return;
        }
        tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down");
        self.supervisor.shutdown(grace).await;
        self.network.shutdown().await;
        if let Err(e) = self.cgroups.teardown() {
            tracing::warn!(error = %e, "cannot remove hull's cgroups");
        }
        if let Err(e) = self.storage.close() {
            tracing::warn!(error = %e, "cannot unmount the btrfs volume");
        }
        let _ = std::fs::remove_file(&self.config.socket);
        self.logs.flush();
        *done = true;
    }

    /// Points HTTP ingress at the services that declare a port now (after
    /// start, a change of the registry, a restore).
    pub fn refresh_routes(&self) {
        let specs = match self.registry.lock() {
            Ok(registry) => registry.list(),
            Err(_) => return,
        };
        match specs {
            Ok(specs) => self.network.set_routes(&specs),
            Err(e) => tracing::warn!(error = %e, "cannot read the services for HTTP routing"),
        }
    }

    /// Lets the main loop return (after [`Daemon::shutdown`]).
    pub fn exit(&self) {
        self.stopped.notify_one();
    }
}

/// Every forwarded connection costs two fds; the default soft limit of 1024
/// would cap ingress at a few hundred connections.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, "cannot raise the open file limit");
            }
        }
    }
}

fn create_state_dir(path: &Path) -> Result<(), DaemonError> {
    std::fs::create_dir_all(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| DaemonError::StateDir {
            path: path.to_path_buf(),
            source,
        })
}

/// One hulld per state directory, enforced by an flock held for life.
fn lock_state_dir(state_dir: &Path) -> Result<Flock<std::fs::File>, DaemonError> {
    let path = state_dir.join("hulld.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| DaemonError::Lock {
            path: path.clone(),
            source,
        })?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(file, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            drop(file);
            DaemonError::AlreadyRunning {
                path: path.clone(),
                holder: holder.trim().to_string(),
            }
        } else {
            DaemonError::Lock {
                path: path.clone(),
                source: errno.into(),
            }
        }
    })?;
    let _ = lock.set_len(0);
    let _ = std::fs::write(&path, std::process::id().to_string());
    Ok(lock)
}

/// An inner OOM or fork bomb must never take hulld down, and the inner's
/// init must come back to hulld when the helper that forked it exits.
fn protect_self() -> Result<(), DaemonError> {
    // Lowering the score needs CAP_SYS_RESOURCE, which some sandboxes do not
    // grant; the inner's memory limit still confines its OOM kills to its
    // own cgroup, so this is a warning, not a failure.
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!(error = %e, "cannot set oom_score_adj to -1000; hulld relies on the inner's memory limit alone");
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(DaemonError::Protect {
            what: "child subreaper",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Kills what a previous hulld (killed with -9, or lost with the power) left
/// in the inner cgroup. The inner's mounts live in its own mount namespace
/// and vanish with its last process.
fn clean_up_stale_inner(cgroups: &HullCgroups) -> Result<(), DaemonError> {
    let pids = cgroups.inner.pids()?;
    if !pids.is_empty() {
        tracing::warn!(?pids, cgroup = %cgroups.inner.display_path(), "found an inner left by a previous hulld; killing it");
        cgroups.inner.kill_all(Duration::from_secs(10))?;
        tracing::info!("stale inner cleaned up");
    }
    Ok(())
}

fn bind_socket(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Runs hulld until `hull down` or SIGTERM.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    config.validate()?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    create_state_dir(&config.state_dir)?;
    let _lock = lock_state_dir(&config.state_dir)?;
    protect_self()?;
    // First, so that hulld's own start-up is in `hull logs --daemon` too.
    let (segment_max, source_max) = config.logs.limits()?;
    let limits = crate::logs::LogLimits {
        segment_max,
        source_max,
    };
    let logs =
        crate::logs::LogStore::open(config.state_dir.join("logs"), limits).map_err(|source| {
            DaemonError::StateDir {
                path: config.state_dir.join("logs"),
                source,
            }
        })?;
    match logs.source(crate::logs::DAEMON_SOURCE) {
        Ok(own) => crate::logs::set_daemon_log(own),
        Err(e) => tracing::warn!(error = %e, "cannot keep hulld's own log in the log store"),
    }

    let cgroups = HullCgroups::locate(&config.cgroup_name)?;
    cgroups.create_base()?;
    cgroups.daemon.create()?;
    cgroups.inner.create()?;
    cgroups.daemon.join(std::process::id() as i32)?;
    clean_up_stale_inner(&cgroups)?;

    let kind = config.image_kind()?;
    let store = ImageStore::new(config.image_dir());
    let image = store.rootfs(kind);
    if !store.is_built(kind) {
        return Err(DaemonError::ImageMissing {
            kind: kind.name(),
            path: image,
        });
    }
    let (storage, recovery) = tokio::task::block_in_place(|| {
        Storage::open(&config.state_dir, config.volume_size_bytes()?).map_err(DaemonError::from)
    })?;
    if !recovery.actions.is_empty() {
        tracing::warn!(
            repaired = recovery.actions.len(),
            "storage was repaired after a crash"
        );
    }
    let storage = Arc::new(storage);
    let registry_path = config.state_dir.join("services.db");
    let registry = Arc::new(std::sync::Mutex::new(hull_services::Registry::open(
        &registry_path,
    )?));
    let rootfs = config.state_dir.join("rootfs");
    create_state_dir(&rootfs)?;
    let listener = bind_socket(&config.socket)?;
    let inner_api = crate::inner_api::InnerApi::open(&config.state_dir)?;
    let vsock = match config.vsock_port {
        Some(port) => Some(
            tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                tokio_vsock::VMADDR_CID_ANY,
                port,
            ))
            .map_err(|source| DaemonError::Vsock { port, source })?,
        ),
        None => None,
    };

    let limits = Limits {
        memory_max_bytes: Some(config.memory_max_bytes()?),
        pids_max: config.pids_max,
    };
    raise_fd_limit();
    let (running_tx, running) = tokio::sync::watch::channel(false);
    let network = crate::network::Network::start(&config, running).await?;
    let supervisor = Supervisor::start(InnerConfig {
        exe: SealedExe::create()?,
        cgroup: cgroups.inner.clone(),
        memory_max: limits.memory_max_bytes,
        pids_max: limits.pids_max,
        lower: image.clone(),
        storage: storage.clone(),
        auto_checkpoints_keep: config.auto_checkpoints_keep,
        registry: registry.clone(),
        rootfs,
        hostname: config.hostname.clone(),
        netns: Some(network.netns.clone()),
        resolv_conf: network.resolv_conf.clone(),
        api_dir: Some(inner_api.dir.clone()),
    });
    let mut current = supervisor.watch_current();
    tokio::spawn(async move {
        loop {
            let up = current.borrow_and_update().is_some();
            running_tx.send_if_modified(|now| std::mem::replace(now, up) != up);
            if current.changed().await.is_err() {
                break;
            }
        }
    });

    tracing::info!(
        socket = %config.socket.display(),
        vsock_port = ?config.vsock_port,
        cgroup = %cgroups.base.display_path(),
        cgroup_version = %cgroups.base.version(),
        image = %image.display(),
        "hulld listening"
    );
    let services =
        ServiceManager::start(registry.clone(), logs.clone(), supervisor.watch_current());
    let daemon = Arc::new(Daemon {
        config,
        storage,
        services,
        logs,
        cgroups,
        supervisor,
        limits,
        image,
        network,
        registry,
        stopped: Notify::new(),
        shutdown_lock: tokio::sync::Mutex::new(false),
    });

    daemon.refresh_routes();
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| DaemonError::Protect {
        what: "SIGTERM handler",
        source,
    })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Protect {
        what: "SIGINT handler",
        source,
    })?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(crate::server::serve_connection(daemon.clone(), stream, Scope::Control));
                }
                Err(e) => tracing::warn!(error = %e, "accept on the unix socket failed"),
            },
            accepted = inner_api.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(crate::server::serve_connection(daemon.clone(), stream, Scope::InnerServices));
                }
                Err(e) => tracing::warn!(error = %e, "accept on the inner's service socket failed"),
            },
            accepted = accept_vsock(vsock.as_ref()) => match accepted {
                Ok(stream) => {
                    tokio::spawn(crate::server::serve_connection(daemon.clone(), stream, Scope::Control));
                }
                Err(e) => tracing::warn!(error = %e, "accept on vsock failed"),
            },
            _ = sigterm.recv() => {
                daemon.shutdown(Duration::from_secs(2)).await;
                break;
            }
            _ = sigint.recv() => {
                daemon.shutdown(Duration::from_secs(2)).await;
                break;
            }
            _ = daemon.stopped.notified() => break,
        }
    }
    tracing::info!("hulld stopped");
    Ok(())
}

async fn accept_vsock(
    listener: Option<&tokio_vsock::VsockListener>,
) -> io::Result<tokio_vsock::VsockStream> {
    match listener {
        Some(l) => l.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}
