//! hulld's start-up, listeners and shutdown.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hull_cgroups::{CgroupError, CpuLimits, CpuMax, HullCgroups};
use hull_checkpoint::Storage;
use hull_image::ImageStore;
use hull_proto::Limits;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use crate::config::{DaemonSettings, Settings};
use crate::hulld::{Hulld, Parts};
use crate::launch::{LaunchError, SealedExe};
use crate::server::Endpoint;
use crate::supervisor::{InnerConfig, Supervisor};
use hull_network::FdBudget;
use hull_services::ServiceManager;

/// The bytes of request frames over 64 KiB that hulld reads at once, over
/// every connection: a few large execs or stdin chunks at a time, while
/// 256 connections each half way through a 4 MiB frame would be 1 GiB.
const LARGE_FRAMES_IN_FLIGHT: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create state directory {path} (hulld needs a writable state dir: set state_dir in the config or pass --state-dir)")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("another hulld holds {path} (pid {holder}); stop it with `hull down`")]
    AlreadyRunning { path: PathBuf, holder: String },
    #[error("cannot lock {path}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot protect hulld ({what})")]
    Protect {
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot open the log store in {path}")]
    LogStore {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot install hulld's {signal} handler")]
    SignalHandler {
        signal: &'static str,
        #[source]
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
    #[error("cannot listen on {path}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("cannot listen on vsock port {port}")]
    Vsock { port: u32, source: io::Error },
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error(transparent)]
    ServicesSocket(#[from] crate::services_socket::ServicesSocketError),
    #[error(transparent)]
    Seccomp(#[from] hull_inner::SeccompError),
    #[error("{0}; set [api] listen in the config (\"off\" for no HTTP API)")]
    Api(#[source] hull_api::StartError),
    #[error(transparent)]
    Tokens(hull_api::TokenError),
    #[error("cannot install the host's token (api.host_token)")]
    HostToken(#[source] hull_api::TokenError),
    #[error("hulld's {task} task {how}; hulld exits so that the next start recovers from the persisted state")]
    TaskFailed { task: &'static str, how: String },
}

/// Every forwarded connection costs two fds; the default soft limit of 1024
/// would cap ingress at a few hundred connections. Returns the limit now in
/// force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!(error = %e, "cannot raise the open file limit");
            return soft;
        }
    }
    hard
}

/// The fds the inner's requests may take: the limit less what hulld holds
/// once started and the reserve. Listing /proc/self/fd once, here, is
/// cheap; every accept after it asks the counter.
fn fd_budget(limit: u64, reserve: usize) -> Arc<FdBudget> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let open = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count());
    // A reserve larger than half the limit would leave the inner nothing.
    let reserve = reserve.min(limit / 2);
    let budget = FdBudget::new(limit, open, reserve);
    tracing::info!(
        limit,
        open,
        reserve,
        for_requests = budget.total(),
        "file descriptor budget"
    );
    budget
}

/// The egress policy to enforce from the start: the stored one, none when
/// none was set, and everything denied when the stored one cannot be read
/// (a policy hulld cannot read is no reason to open the sandbox). Blocks.
fn stored_egress_policy(path: &Path) -> Arc<hull_network::EgressPolicy> {
    use hull_network::egress::{EgressAction, EgressPolicy};
    match crate::net_policy::load(path) {
        Ok(Some(stored)) => Arc::new(stored.policy),
        Ok(None) => Arc::new(EgressPolicy::default()),
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "denying all egress until a valid network policy is set");
            Arc::new(EgressPolicy {
                rules: Vec::new(),
                default: Some(EgressAction::Deny),
            })
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
fn lock_state_dir(state_dir: &crate::StateDir) -> Result<Flock<std::fs::File>, DaemonError> {
    let path = state_dir.lock();
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

/// hulld's group gets its memory limit and a CPU weight over the inner's;
/// the inner a CPU cap that leaves hulld room. A missing cpu controller
/// (not delegated to hull's group) costs the CPU bounds, with a warning.
fn limit_groups(
    cgroups: &HullCgroups,
    config: &DaemonSettings,
    inner_cpus: f64,
) -> Result<(), DaemonError> {
    // Where hulld's binary is sealed by a memfd copy (no overlayfs), the
    // copy is made in its group and charged to it: the limit is for
    // everything else.
    let exe = std::env::current_exe()
        .and_then(std::fs::metadata)
        .map_or(0, |m| m.len());
    let memory_max = config.memory_max.saturating_add(exe);
    cgroups.daemon.set_limits(Some(memory_max), None)?;
    let cpu = [
        (
            &cgroups.daemon,
            CpuLimits {
                weight: Some(config.cpu_weight),
                max: None,
            },
        ),
        (
            &cgroups.inner,
            CpuLimits {
                weight: Some(INNER_CPU_WEIGHT),
                max: Some(CpuMax::cpus(inner_cpus)),
            },
        ),
    ];
    for (group, limits) in cpu {
        match group.set_cpu(&limits) {
            Ok(()) => {}
            Err(e @ CgroupError::NoController { .. }) => {
                tracing::warn!(error = %crate::error_chain(&e), "no CPU weight or cap: the cpu controller is not available to hull's cgroups");
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(
        daemon_memory_max = memory_max,
        daemon_cpu_weight = config.cpu_weight,
        inner_cpu_weight = INNER_CPU_WEIGHT,
        inner_cpus,
        "hull's cgroups limited"
    );
    Ok(())
}

/// The inner's CPU weight: the kernel's default, against which
/// `daemon.cpu_weight` is read.
const INNER_CPU_WEIGHT: u64 = 100;

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

/// The inner's seccomp filter, compiled once for every inner this hulld
/// starts.
fn compile_seccomp(
    options: Option<hull_inner::SeccompOptions>,
) -> Result<Option<hull_inner::SeccompFilter>, DaemonError> {
    let Some(options) = options else {
        tracing::warn!("seccomp is off ([inner] seccomp = false): the inner's processes may make any system call their capabilities allow");
        return Ok(None);
    };
    let filter = hull_inner::seccomp::compile(options, hull_inner::seccomp::native_arch()?)?;
    tracing::debug!(
        instructions = filter.instructions(),
        io_uring = options.io_uring,
        nested_user_namespaces = options.nested_user_namespaces,
        "seccomp filter for the inner compiled"
    );
    Ok(Some(filter))
}

/// Runs hulld until `hull down` or SIGTERM.
pub async fn run(settings: Settings) -> Result<(), DaemonError> {
    let Settings {
        daemon: config,
        storage: storage_settings,
        inner: inner_settings,
        logs: logs_settings,
        network: network_settings,
        api: api_settings,
        remote: remote_settings,
    } = settings;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    create_state_dir(config.state_dir.root())?;
    let _lock = lock_state_dir(&config.state_dir)?;
    protect_self()?;
    // First, so that hulld's own start-up is in `hull logs --daemon` too.
    let exec_dir = logs_settings.dir.join(hull_logs::EXEC_SOURCE);
    let logs = hull_logs::LogStore::open(logs_settings.dir.clone(), logs_settings.limits).map_err(
        |source| DaemonError::LogStore {
            path: logs_settings.dir,
            source,
        },
    )?;
    // Reads the exec log's newest records for the last id: off the runtime.
    let store = logs.clone();
    let exec_log = tokio::task::spawn_blocking(move || hull_logs::ExecLog::open(&store))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map(Arc::new)
        .map_err(|source| DaemonError::StateDir {
            path: exec_dir,
            source,
        })?;
    match logs.source(hull_logs::DAEMON_SOURCE) {
        Ok(own) => hull_logs::set_daemon_log(own),
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot keep hulld's own log in the log store")
        }
    }

    let cgroups = HullCgroups::locate(&config.cgroup_name)?;
    let moved_to_leaf = cgroups.create_base()?;
    cgroups.daemon.create()?;
    cgroups.inner.create()?;
    // Root in the inner may make groups below its own and move its
    // processes into them, as systemd or a container runtime inside does.
    if let Some(map) = inner_settings.user_namespace {
        cgroups.inner.delegate(map.base, map.base)?;
    }
    cgroups.daemon.join(std::process::id() as i32)?;
    limit_groups(&cgroups, &config, inner_settings.cpus)?;
    tracing::info!(
        daemon = %cgroups.daemon.display_path(),
        inner = %cgroups.inner.display_path(),
        leaf = %cgroups.leaf.as_ref().map_or_else(|| "none".to_owned(), |l| l.display_path()),
        ?moved_to_leaf,
        "hull's cgroups are ready"
    );
    clean_up_stale_inner(&cgroups)?;

    let kind = inner_settings.image;
    let store = ImageStore::new(inner_settings.image_dir.clone());
    let image = store.rootfs(kind);
    if !store.is_built(kind) {
        return Err(DaemonError::ImageMissing {
            kind: kind.name(),
            path: image,
        });
    }
    let (storage, recovery) = tokio::task::block_in_place(|| {
        Storage::open(
            &storage_settings.paths,
            storage_settings.volume_size,
            storage_settings.disk_reserve,
            storage_settings.quota,
        )
    })?;
    if !recovery.actions.is_empty() {
        tracing::warn!(
            repaired = recovery.actions.len(),
            "storage was repaired after a crash"
        );
    }
    let storage = Arc::new(storage);
    let pusher = remote_settings.map(|remote| {
        tracing::info!(url = %remote.settings.url, "checkpoints are pushed to the remote");
        crate::pusher::Pusher::start(storage.clone(), remote.settings, remote.index)
    });
    let registry = hull_services::Registry::open(&config.state_dir.services_db())?
        .with_max(config.max_services);
    let rootfs = config.state_dir.rootfs();
    create_state_dir(&rootfs)?;
    let listener = bind_socket(&config.socket)?;
    let services_socket = crate::services_socket::ServicesSocket::open(
        &config.state_dir.services_socket_dir(),
        inner_settings.user_namespace.map(|m| m.base),
    )?;
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

    let seccomp = compile_seccomp(inner_settings.seccomp)?;
    let limits = Limits {
        memory_max_bytes: Some(inner_settings.memory_max),
        pids_max: inner_settings.pids_max,
    };
    let budget = fd_budget(raise_fd_limit(), config.fd_reserve);
    // hulld's own listeners are bound before any inner starts, and their
    // ports are never forwarded: the inner cannot take them.
    let scheme = match api_settings.tls {
        Some(_) => "https",
        None => "http",
    };
    let host_token = api_settings.host_token.clone();
    let api = hull_api::Api::bind(api_settings)
        .await
        .map_err(DaemonError::Api)?;
    let (running_tx, running) = tokio::sync::watch::channel(false);
    let egress_policy = {
        let path = config.state_dir.network_policy();
        tokio::task::spawn_blocking(move || stored_egress_policy(&path))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    };
    let network = crate::network::Network::start(
        network_settings,
        running,
        budget.clone(),
        api.local_addr(),
        egress_policy,
    )
    .await?;
    let port_events = {
        let inner = cgroups.inner.clone();
        crate::port_events::PortEvents::start(network.ports.clone(), move || {
            inner.pids().unwrap_or_default()
        })
    };
    let (current_tx, current) = tokio::sync::watch::channel(None);
    let (services, services_task) =
        ServiceManager::start(registry, logs.clone(), current, network.port_probe())?;
    network.follow_services(services.definitions(), services.failed());
    let (supervisor, supervisor_task) = Supervisor::start(
        InnerConfig {
            exe: SealedExe::create().map_err(LaunchError::SealedExe)?,
            cgroup: cgroups.inner.clone(),
            memory_max: limits.memory_max_bytes,
            pids_max: limits.pids_max,
            lower: image.clone(),
            storage: storage.clone(),
            pusher: pusher.clone(),
            auto_checkpoints_keep: storage_settings.auto_checkpoints_keep,
            services: services.clone(),
            rootfs,
            hostname: inner_settings.hostname,
            netns: Some(network.netns.clone()),
            resolv_conf: network.resolv_conf.clone(),
            api_dir: Some(services_socket.dir.clone()),
            seccomp,
            user_namespace: inner_settings.user_namespace,
            cgroup_view: Some(match cgroups.inner.v1_hierarchies()? {
                None => hull_inner::CgroupView::Unified,
                Some(hierarchies) => hull_inner::CgroupView::V1(hierarchies),
            }),
        },
        current_tx,
    );
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
    let tokens_path = config.state_dir.tokens_db();
    let tokens = tokio::task::spawn_blocking(move || {
        let tokens = hull_api::TokenStore::open(&tokens_path).map_err(DaemonError::Tokens)?;
        if let Some(host) = host_token {
            tokens.install_host(&host).map_err(DaemonError::HostToken)?;
            tracing::info!(id = %host.id, "installed the host's admin token");
        }
        Ok::<_, DaemonError>(tokens)
    })
    .await
    .map_err(|e| DaemonError::TaskFailed {
        task: "token store",
        how: e.to_string(),
    })??;
    let hulld = Hulld::new(Parts {
        state_dir: config.state_dir.clone(),
        socket: config.socket.clone(),
        storage,
        pusher,
        services,
        logs,
        exec_log,
        cgroups,
        supervisor,
        limits,
        image,
        user_namespace: inner_settings.user_namespace,
        network,
        tokens: tokens.clone(),
        sessions: crate::sessions::Sessions::new(
            port_events,
            crate::sessions::SessionBounds {
                max_sessions: config.max_sessions,
                scrollback_total: config.scrollback_total,
            },
        ),
        frame_budget: hull_proto::FrameBudget::new(LARGE_FRAMES_IN_FLIGHT),
    });
    // The API is served before the control socket answers, so a client
    // that sees hulld up through `status` also sees where the API is.
    let api = api
        .serve(crate::in_process::InProcessConnector::new(&hulld), tokens)
        .map_err(DaemonError::Api)?;
    if let Some(addr) = api.local_addr() {
        let url = format!("{scheme}://{addr}");
        tracing::info!(%url, "HTTP API listening");
        hulld.set_api_url(url);
    }
    tokio::spawn(crate::server::accept_loop(
        hulld.clone(),
        listener,
        Endpoint::control("control socket", config.control_connections),
        budget.clone(),
    ));
    tokio::spawn(crate::server::accept_loop(
        hulld.clone(),
        services_socket.listener,
        Endpoint::inner(config.inner_connections),
        budget.clone(),
    ));
    if let Some(vsock) = vsock {
        tokio::spawn(crate::server::accept_loop(
            hulld.clone(),
            vsock,
            Endpoint::control("vsock", config.control_connections),
            budget.clone(),
        ));
    }
    let mut tasks = Tasks {
        supervisor: Some(supervisor_task),
        services: Some(services_task),
    };
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|source| DaemonError::SignalHandler {
            signal: "SIGTERM",
            source,
        })?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|source| DaemonError::SignalHandler {
            signal: "SIGINT",
            source,
        })?;
    loop {
        tokio::select! {
            (task, how) = tasks.failed() => {
                // The guard of a select branch is read when the select
                // starts, so a task that ends during a shutdown is told
                // apart here.
                if hulld.is_shutting_down() {
                    continue;
                }
                // A supervisor or service manager that is gone would leave
                // hulld half alive (every bounce answering "shutting
                // down"). Exit instead: the inner and the volume are left
                // as after a kill -9, which the next start recovers from.
                tracing::error!(task, how = %how, "a core task of hulld failed; exiting");
                hulld.logs().flush();
                return Err(DaemonError::TaskFailed { task, how });
            }
            _ = sigterm.recv() => {
                hulld.shutdown(Duration::from_secs(2)).await;
                break;
            }
            _ = sigint.recv() => {
                hulld.shutdown(Duration::from_secs(2)).await;
                break;
            }
            _ = hulld.exited() => break,
        }
    }
    tracing::info!("hulld stopped");
    Ok(())
}

/// hulld's core tasks, watched for an end that is not a shutdown.
struct Tasks {
    supervisor: Option<JoinHandle<()>>,
    services: Option<JoinHandle<()>>,
}

impl Tasks {
    /// Resolves when a task ends: its name, and whether it panicked (with
    /// the panic's message) or returned.
    async fn failed(&mut self) -> (&'static str, String) {
        let watched = [
            ("supervisor", &mut self.supervisor),
            ("service manager", &mut self.services),
        ];
        let pending: Vec<_> = watched
            .into_iter()
            .filter_map(|(name, slot)| {
                slot.as_mut()
                    .map(|h| Box::pin(async move { (name, h.await) }))
            })
            .collect();
        if pending.is_empty() {
            return std::future::pending().await;
        }
        let ((name, result), _, _) = futures::future::select_all(pending).await;
        match name {
            "supervisor" => self.supervisor = None,
            _ => self.services = None,
        }
        let how = match result {
            Ok(()) => "ended".to_string(),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                format!("panicked: {message}")
            }
            Err(_) => "was cancelled".to_string(),
        };
        (name, how)
    }
}
