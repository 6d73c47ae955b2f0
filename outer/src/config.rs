//! hulld's configuration: a TOML file, every field optional, every path
//! overridable (tests point them all into a temporary directory).
//!
//! [`Config`] is the file as written; [`Config::resolve`] turns it, once at
//! start, into the typed [`Settings`] each part of hulld takes, and is where
//! every bad value is reported, by its key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hull_checkpoint::{LayerQuota, QuotaMode, QuotaSettings};
use hull_image::ImageKind;
use hull_inner::SeccompOptions;
use hull_logs::LogLimits;
use hull_network::forward::PortFilter;
use hull_network::link::VethPlan;
use hull_proto::IdMapping;
use serde::{Deserialize, Serialize};

pub use hull_client::config::{
    parse_network_mode, parse_size, NetworkMode, DEFAULT_CONFIG_PATH, DEFAULT_IMAGE,
    DEFAULT_SOCKET, DEFAULT_STATE_DIR,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] hull_client::config::ConfigError),
    #[error("{field} = {value:?} is not a size: use bytes or a number with K, M or G (logs sizes: at least 64K)")]
    Size { field: &'static str, value: String },
    #[error("{field} = {cap:?} is smaller than logs.segment_size = {segment:?}: the cap must hold at least one segment")]
    LogCap {
        field: &'static str,
        segment: String,
        cap: String,
    },
    #[error("daemon.cpu_weight = {0}: use 1 to 10000 (the inner's is 100)")]
    CpuWeight(u64),
    #[error("cpus = {0}: use a number of CPUs such as 1.5 (at least 0.01)")]
    Cpus(f64),
    #[error("{field} = 0: it must be at least 1")]
    Zero { field: &'static str },
    #[error("image = {0:?}: expected \"busybox\" or \"debian\"")]
    Image(String),
    #[error("inner.uid_base = {base}, inner.id_count = {count}: use a base above 0 and a count of at least 1 whose range ends below 2^32 - 1 (e.g. 100000 and 65536)")]
    IdRange { base: u32, count: u32 },
    #[error("storage.layer_quota = {0:?}: use a size (\"8G\"), \"auto\" (the volume less a margin) or \"none\"")]
    LayerQuota(String),
    #[error("hostname = {0:?}: use 1 to 63 letters, digits and '-'")]
    Hostname(String),
    #[error("api.listen = {0:?}: use an address and port such as \"127.0.0.1:7700\", or \"off\"")]
    ApiListen(String),
    #[error("api.name = {0:?}: use letters, digits, '.', '_' and '-'")]
    ApiName(String),
    #[error("api.host_token")]
    HostToken(#[source] hull_api::tokens::BadHostToken),
    #[error("api.tls_cert and api.tls_key go together: set both for HTTPS, or neither")]
    ApiTls,
    #[error("remote.{0}")]
    Remote(String),
    #[error("network.{field} = {value:?}: {why}")]
    Network {
        field: &'static str,
        value: String,
        why: String,
    },
}

/// The `[network]` table: the inner's network and ingress.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub mode: NetworkMode,
    /// The veth pair's subnet; the host end takes the first address, the
    /// inner the second. From 100.64.0.0/10 (shared address space), so it
    /// does not collide with the private networks users run.
    pub subnet: String,
    /// Name of the host end of the veth; derived from cgroup_name if unset.
    pub interface: Option<String>,
    /// Name servers for the inner's resolv.conf; the host's when empty.
    pub dns: Vec<String>,
    /// Where forwarded ports and the HTTP ingress listen: 127.0.0.1 on a
    /// development machine, the VM's interface address in an image.
    pub outer_address: String,
    /// Inner ports that may be forwarded: "8000-8999,3000"; all when empty.
    pub expose: String,
    /// The HTTP ingress port on the outer address; 0 turns it off.
    pub http_port: u16,
    /// How long a request waits for a port while the inner comes back.
    pub wait_secs: u64,
    /// Inner ports whose HTTP ingress needs the bearer token.
    pub private_ports: Vec<u16>,
    /// Every port's HTTP ingress needs the bearer token.
    pub private_all: bool,
    /// Inner ports forwarded at most (one outer listener each); more are
    /// listed as not forwarded and reached through HTTP ingress.
    pub max_forwarded_ports: usize,
    /// Connections through forwarded ports and the HTTP ingress at once.
    pub max_connections: usize,
    /// ... of them from one client address.
    pub max_connections_per_source: usize,
    /// Relay forwarded connections in the kernel (a BPF sockmap redirect)
    /// instead of copying through hulld.
    pub forward_in_kernel: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mode: NetworkMode::Nat,
            subnet: "100.96.0.0/30".to_string(),
            interface: None,
            dns: Vec::new(),
            outer_address: "127.0.0.1".to_string(),
            expose: String::new(),
            http_port: 8080,
            wait_secs: 10,
            private_ports: Vec::new(),
            private_all: false,
            max_forwarded_ports: 256,
            max_connections: 4096,
            max_connections_per_source: 1024,
            // Measured on 6.18: no less CPU per request than copying, and
            // half the throughput with the proxy on a CPU of its own (the
            // kworker that sends redirected bytes runs on the client's).
            forward_in_kernel: false,
        }
    }
}

fn ip_address(field: &'static str, value: &str) -> Result<IpAddr, ConfigError> {
    value.parse().map_err(|_| ConfigError::Network {
        field,
        value: value.to_string(),
        why: "not an IP address".into(),
    })
}

impl NetworkConfig {
    /// The host end of the veth: configured, or "hv" and a hash of the
    /// cgroup name (interface names are at most 15 bytes).
    fn interface_name(&self, cgroup_name: &str) -> String {
        self.interface
            .clone()
            .unwrap_or_else(|| format!("hv{:08x}", fnv1a(cgroup_name) & 0xffff_ffff))
    }

    fn resolve(
        &self,
        cgroup_name: &str,
        state_dir: &crate::StateDir,
    ) -> Result<NetworkSettings, ConfigError> {
        let name = self.interface_name(cgroup_name);
        let veth = VethPlan::new(&self.subnet, &name).map_err(|e| ConfigError::Network {
            field: "subnet",
            value: self.subnet.clone(),
            why: e.to_string(),
        })?;
        let expose = PortFilter::parse(&self.expose).map_err(|why| ConfigError::Network {
            field: "expose",
            value: self.expose.clone(),
            why,
        })?;
        Ok(NetworkSettings {
            mode: self.mode,
            veth,
            dns: self
                .dns
                .iter()
                .map(|server| ip_address("dns", server))
                .collect::<Result<_, _>>()?,
            outer_ip: ip_address("outer_address", &self.outer_address)?,
            expose,
            http_port: self.http_port,
            wait: Duration::from_secs(self.wait_secs),
            private_ports: self.private_ports.clone(),
            private_all: self.private_all,
            max_forwarded_ports: self.max_forwarded_ports,
            max_connections: positive("network.max_connections", self.max_connections)?,
            max_connections_per_source: positive(
                "network.max_connections_per_source",
                self.max_connections_per_source,
            )?,
            forward_in_kernel: self.forward_in_kernel,
            token_file: state_dir.ingress_token(),
            resolv_conf: state_dir.resolv_conf(),
        })
    }
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// hulld's own state: the writable layer, images, logs, lock file.
    pub state_dir: PathBuf,
    /// The control socket (mode 0600).
    pub socket: PathBuf,
    /// Also serve the control protocol on this vsock port.
    pub vsock_port: Option<u32>,
    /// Where base images are built; `<state_dir>/images` when unset.
    pub image_dir: Option<PathBuf>,
    /// The base image of the inner: "debian" (default) or "busybox".
    pub image: String,
    pub hostname: String,
    /// Memory limit of the inner ("2G", "512M", bytes); 3/4 of RAM when unset.
    pub memory_max: Option<String>,
    pub pids_max: Option<u64>,
    /// CPUs' worth of time the inner may use (1.5: one and a half); by
    /// default all but half a CPU (a quarter of one on a single CPU), so
    /// hulld always has room.
    pub cpus: Option<f64>,
    /// The name of hull's cgroup below the one hulld starts in.
    pub cgroup_name: String,
    pub log_format: LogFormat,
    /// Size of the sparse btrfs image when the state dir is not on btrfs.
    pub volume_size: String,
    /// Automatic checkpoints (taken before each restore) to keep.
    pub auto_checkpoints_keep: usize,
    pub network: NetworkConfig,
    pub logs: LogsConfig,
    pub inner: InnerTable,
    pub daemon: DaemonConfig,
    pub api: ApiConfig,
    pub storage: StorageTable,
    /// `[remote]`: where checkpoints are pushed; none when absent.
    pub remote: Option<hull_remote::RemoteSettings>,
}

/// The `[api]` table: the HTTP API (the Sprites v1 API) for clients
/// outside the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// The TCP address to serve on ("127.0.0.1:7700"); "off": no HTTP API.
    pub listen: String,
    /// The sandbox's name in `/v1/sprites/{name}`; the machine's hostname
    /// when unset.
    pub name: Option<String>,
    /// HTTP connections served at once, WebSockets included.
    pub max_connections: usize,
    /// ... of them from one client address. Behind a proxy or router
    /// every client has its address: raise it to `max_connections` there.
    pub max_connections_per_source: usize,
    /// Milliseconds a new connection has to send a request with a valid
    /// token (its TLS handshake included); one that has not is closed.
    pub anonymous_header_timeout_ms: u64,
    /// Also serve the API on this vsock port.
    pub vsock_port: Option<u32>,
    /// Serve HTTPS: the certificate chain (PEM) ...
    pub tls_cert: Option<PathBuf>,
    /// ... and its private key (PEM). Both or neither.
    pub tls_key: Option<PathBuf>,
    /// An admin token given as `ID:SHA256` of its secret (hull-init sets
    /// it from the kernel command line in a hull VM); installed at start
    /// as the token named "host", replacing the previous one.
    pub host_token: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:7700".into(),
            name: None,
            max_connections: 256,
            max_connections_per_source: 128,
            anonymous_header_timeout_ms: 2000,
            vsock_port: None,
            tls_cert: None,
            tls_key: None,
            host_token: None,
        }
    }
}

/// The `[storage]` table: the quota on the inner's writable layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageTable {
    /// Bytes the writable layer may reference ("8G"); "auto": the volume
    /// less a tenth (at least 128 MiB), and less `daemon.disk_reserve`
    /// when the state dir is the volume; "none" or "0": no limit.
    pub layer_quota: String,
    /// How btrfs counts the layer's bytes: "simple" (simple quotas: what
    /// the layer wrote itself; nearly free) or "full" (qgroups: all it
    /// references, shared with checkpoints or not; slower checkpoints).
    pub quota_mode: QuotaModeName,
}

impl Default for StorageTable {
    fn default() -> Self {
        StorageTable {
            layer_quota: "auto".into(),
            quota_mode: QuotaModeName::Simple,
        }
    }
}

impl ApiConfig {
    fn resolve(&self) -> Result<hull_api::ApiSettings, ConfigError> {
        let listen = match self.listen.as_str() {
            "off" | "" => None,
            addr => Some(
                addr.parse()
                    .map_err(|_| ConfigError::ApiListen(self.listen.clone()))?,
            ),
        };
        let sandbox_name = match &self.name {
            Some(name) => name.clone(),
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "hull".to_string()),
        };
        if !hull_proto::valid_name(&sandbox_name) {
            return Err(ConfigError::ApiName(sandbox_name));
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(hull_api::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            _ => return Err(ConfigError::ApiTls),
        };
        Ok(hull_api::ApiSettings {
            listen,
            sandbox_name,
            max_connections: positive("api.max_connections", self.max_connections)?,
            max_connections_per_source: positive(
                "api.max_connections_per_source",
                self.max_connections_per_source,
            )?,
            anonymous_header_timeout: Duration::from_millis(positive_u64(
                "api.anonymous_header_timeout_ms",
                self.anonymous_header_timeout_ms,
            )?),
            vsock_port: self.vsock_port,
            tls,
            host_token: self
                .host_token
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(ConfigError::HostToken)?,
        })
    }
}

/// `storage.quota_mode` as written in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaModeName {
    #[default]
    Simple,
    Full,
}

impl StorageTable {
    fn resolve(&self) -> Result<QuotaSettings, ConfigError> {
        let size = match self.layer_quota.trim() {
            "auto" => LayerQuota::Auto,
            "none" | "off" => LayerQuota::Off,
            text => match parse_size(text) {
                Some(0) => LayerQuota::Off,
                Some(n) => LayerQuota::Bytes(n),
                None => return Err(ConfigError::LayerQuota(self.layer_quota.clone())),
            },
        };
        Ok(QuotaSettings {
            size,
            mode: match self.quota_mode {
                QuotaModeName::Simple => QuotaMode::Simple,
                QuotaModeName::Full => QuotaMode::Full,
            },
        })
    }
}

/// The `[inner]` table: what the inner's processes may ask of the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InnerTable {
    /// Run every process of the inner under hull's seccomp filter.
    pub seccomp: bool,
    /// Let the filter through io_uring (its setup, enter and register).
    pub io_uring: bool,
    /// Let the filter through namespace flags to clone and unshare, setns
    /// and mount: `unshare -r` and rootless containers inside the inner.
    /// Unset: on when the inner has a user namespace of its own, where a
    /// nested one gives nothing beyond it.
    pub nested_user_namespaces: Option<bool>,
    /// Give the inner a user namespace: its root is `uid_base` in the VM,
    /// root only over the inner's own files.
    pub user_namespace: bool,
    /// The VM's id of the inner's root (user and group alike).
    pub uid_base: u32,
    /// How many ids the inner has: its 0 to `id_count - 1`.
    pub id_count: u32,
}

impl Default for InnerTable {
    fn default() -> Self {
        InnerTable {
            seccomp: true,
            io_uring: false,
            nested_user_namespaces: None,
            user_namespace: true,
            uid_base: 100_000,
            id_count: 65_536,
        }
    }
}

impl InnerTable {
    fn seccomp(&self) -> Option<SeccompOptions> {
        self.seccomp.then_some(SeccompOptions {
            io_uring: self.io_uring,
            nested_user_namespaces: self.nested_user_namespaces.unwrap_or(self.user_namespace),
        })
    }

    fn user_namespace(&self) -> Result<Option<IdMapping>, ConfigError> {
        if !self.user_namespace {
            return Ok(None);
        }
        let (base, count) = (self.uid_base, self.id_count);
        match base.checked_add(count) {
            Some(end) if base > 0 && count > 0 && end < u32::MAX => {
                Ok(Some(IdMapping { base, count }))
            }
            _ => Err(ConfigError::IdRange { base, count }),
        }
    }
}

/// The `[daemon]` table: hulld's own bounds, which nothing in the inner
/// can spend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Connections the control socket (and vsock) serve at once.
    pub control_connections: usize,
    /// Connections the inner's service socket serves at once.
    pub inner_connections: usize,
    /// File descriptors hulld keeps for itself: the inner's requests
    /// (its service socket, forwarded ports and connections, HTTP ingress)
    /// are refused rather than take them.
    pub fd_reserve: usize,
    /// Services the registry holds at most.
    pub max_services: usize,
    /// Exec sessions at once, attached or detached; an exec past it is
    /// refused.
    pub max_sessions: usize,
    /// The output all terminal sessions keep for replay together; each
    /// keeps up to 1 MiB, less when many share this.
    pub scrollback_total: String,
    /// Disk space on the state dir's filesystem that a new volume image
    /// leaves free for hulld's own state (catalog, logs, hulld.log).
    pub disk_reserve: String,
    /// hulld's own memory limit (its cgroup's), beyond the sealed copy of
    /// its binary, which is charged to it too.
    pub memory_max: String,
    /// hulld's CPU weight against the inner's (100), so a busy inner never
    /// takes hulld's share of contended CPU.
    pub cpu_weight: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            control_connections: 256,
            inner_connections: 16,
            fd_reserve: 512,
            max_services: hull_services::MAX_SERVICES,
            max_sessions: 128,
            scrollback_total: "8M".into(),
            memory_max: "256M".into(),
            cpu_weight: 1000,
            disk_reserve: "2G".into(),
        }
    }
}

/// The `[logs]` table: how much of each source's log is kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogsConfig {
    /// A segment file is closed and a new one started at this size.
    pub segment_size: String,
    /// Each source's segments together; the oldest go first beyond it.
    pub max_per_source: String,
    /// The `exec` source's cap instead (every non-interactive exec's
    /// output): apart, so a flood of exec output drops only old execs.
    pub max_exec: String,
    /// Sources (services, `exec`, `hulld`) kept on disk at most.
    pub max_sources: usize,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            segment_size: "8M".into(),
            max_per_source: "64M".into(),
            max_exec: "32M".into(),
            max_sources: hull_logs::store::MAX_SOURCES,
        }
    }
}

impl LogsConfig {
    fn resolve(&self) -> Result<LogLimits, ConfigError> {
        let size = |field, value: &String| {
            parse_size(value)
                .filter(|&n| n >= 64 * 1024)
                .ok_or_else(|| ConfigError::Size {
                    field,
                    value: value.clone(),
                })
        };
        let segment = size("logs.segment_size", &self.segment_size)?;
        let cap = |field, value: &String| {
            let cap = size(field, value)?;
            if cap < segment {
                return Err(ConfigError::LogCap {
                    field,
                    segment: self.segment_size.clone(),
                    cap: value.clone(),
                });
            }
            Ok(cap)
        };
        Ok(LogLimits {
            segment_max: segment,
            source_max: cap("logs.max_per_source", &self.max_per_source)?,
            exec_max: cap("logs.max_exec", &self.max_exec)?,
            max_sources: positive("logs.max_sources", self.max_sources)?,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            socket: PathBuf::from(DEFAULT_SOCKET),
            vsock_port: None,
            image_dir: None,
            image: DEFAULT_IMAGE.to_string(),
            hostname: "hull".to_string(),
            memory_max: None,
            pids_max: Some(4096),
            cpus: None,
            cgroup_name: "hull".to_string(),
            log_format: LogFormat::Human,
            volume_size: "64G".to_string(),
            auto_checkpoints_keep: 10,
            network: NetworkConfig::default(),
            logs: LogsConfig::default(),
            inner: InnerTable::default(),
            daemon: DaemonConfig::default(),
            api: ApiConfig::default(),
            storage: StorageTable::default(),
            remote: None,
        }
    }
}

impl Config {
    /// Reads `path`, or the default config file if it exists, or the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some((path, text)) = hull_client::config::read(path)? else {
            return Ok(Config::default());
        };
        toml::from_str(&text)
            .map_err(|source| hull_client::config::ConfigError::Parse { path, source }.into())
    }

    /// Checks every value (see [`Config::resolve`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.resolve().map(drop)
    }

    /// The typed settings of each part of hulld; the first bad value is
    /// the error, named by its key.
    pub fn resolve(&self) -> Result<Settings, ConfigError> {
        let h = &self.hostname;
        if h.is_empty() || h.len() > 63 || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ConfigError::Hostname(h.clone()));
        }
        let memory_max = match &self.memory_max {
            Some(v) => size("memory_max", v)?,
            // Whole pages, as the kernel would round it: status then
            // reports the limit memory.max holds.
            None => physical_memory() / 4 * 3 / 4096 * 4096,
        };
        let state_dir = self.state();
        Ok(Settings {
            daemon: DaemonSettings {
                state_dir: state_dir.clone(),
                socket: self.socket.clone(),
                vsock_port: self.vsock_port,
                cgroup_name: self.cgroup_name.clone(),
                control_connections: positive(
                    "daemon.control_connections",
                    self.daemon.control_connections,
                )?,
                inner_connections: positive(
                    "daemon.inner_connections",
                    self.daemon.inner_connections,
                )?,
                fd_reserve: self.daemon.fd_reserve,
                max_services: positive("daemon.max_services", self.daemon.max_services)?,
                max_sessions: positive("daemon.max_sessions", self.daemon.max_sessions)?,
                scrollback_total: match size(
                    "daemon.scrollback_total",
                    &self.daemon.scrollback_total,
                )? {
                    0 => {
                        return Err(ConfigError::Zero {
                            field: "daemon.scrollback_total",
                        })
                    }
                    n => usize::try_from(n).unwrap_or(usize::MAX),
                },
                memory_max: size("daemon.memory_max", &self.daemon.memory_max)?,
                cpu_weight: match self.daemon.cpu_weight {
                    w @ 1..=10_000 => w,
                    w => return Err(ConfigError::CpuWeight(w)),
                },
            },
            storage: StorageSettings {
                paths: state_dir.storage(),
                volume_size: size("volume_size", &self.volume_size)?,
                disk_reserve: size("daemon.disk_reserve", &self.daemon.disk_reserve)?,
                auto_checkpoints_keep: self.auto_checkpoints_keep,
                quota: self.storage.resolve()?,
            },
            inner: InnerSettings {
                image: self.image_kind()?,
                image_dir: self.image_dir(),
                hostname: self.hostname.clone(),
                memory_max,
                pids_max: self.pids_max,
                seccomp: self.inner.seccomp(),
                user_namespace: self.inner.user_namespace()?,
                cpus: match self.cpus {
                    Some(c) if c.is_finite() && c >= 0.01 => c,
                    Some(c) => return Err(ConfigError::Cpus(c)),
                    None => default_cpus(online_cpus()),
                },
            },
            logs: LogsSettings {
                dir: state_dir.logs(),
                limits: self.logs.resolve()?,
            },
            network: self.network.resolve(&self.cgroup_name, &state_dir)?,
            api: self.api.resolve()?,
            remote: match &self.remote {
                Some(remote) => Some(RemoteConfig {
                    settings: remote
                        .validate()
                        .map(|()| remote.clone())
                        .map_err(ConfigError::Remote)?,
                    index: state_dir.remote_index(),
                }),
                None => None,
            },
        })
    }

    pub fn image_dir(&self) -> PathBuf {
        hull_client::config::image_dir(&self.state_dir, self.image_dir.as_deref())
    }

    pub fn image_kind(&self) -> Result<ImageKind, ConfigError> {
        self.image
            .parse()
            .map_err(|_| ConfigError::Image(self.image.clone()))
    }

    pub fn log_file(&self) -> PathBuf {
        self.state().hulld_log()
    }

    /// The paths in `state_dir`.
    pub fn state(&self) -> crate::StateDir {
        crate::StateDir::new(&self.state_dir)
    }
}

fn positive(field: &'static str, value: usize) -> Result<usize, ConfigError> {
    match value {
        0 => Err(ConfigError::Zero { field }),
        n => Ok(n),
    }
}

fn positive_u64(field: &'static str, value: u64) -> Result<u64, ConfigError> {
    match value {
        0 => Err(ConfigError::Zero { field }),
        n => Ok(n),
    }
}

fn size(field: &'static str, value: &str) -> Result<u64, ConfigError> {
    parse_size(value).ok_or_else(|| ConfigError::Size {
        field,
        value: value.to_string(),
    })
}

/// Everything hulld runs on, resolved from a [`Config`] at start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub daemon: DaemonSettings,
    pub storage: StorageSettings,
    pub inner: InnerSettings,
    pub logs: LogsSettings,
    pub network: NetworkSettings,
    pub api: hull_api::ApiSettings,
    pub remote: Option<RemoteConfig>,
}

/// Where checkpoints are pushed, and this machine's index of the chunks
/// already there.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub settings: hull_remote::RemoteSettings,
    pub index: PathBuf,
}

/// hulld's own: where it keeps state, listens, and its cgroup.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    pub state_dir: crate::StateDir,
    pub socket: PathBuf,
    pub vsock_port: Option<u32>,
    /// The name of hull's cgroup below the one hulld starts in.
    pub cgroup_name: String,
    pub control_connections: usize,
    pub inner_connections: usize,
    /// File descriptors kept from the inner's requests.
    pub fd_reserve: usize,
    pub max_services: usize,
    /// Exec sessions at once.
    pub max_sessions: usize,
    /// Bytes of scrollback all terminal sessions keep together.
    pub scrollback_total: usize,
    /// Bytes: hulld's cgroup gets this plus the size of its binary.
    pub memory_max: u64,
    pub cpu_weight: u64,
}

/// The btrfs volume and its checkpoints.
#[derive(Debug, Clone)]
pub struct StorageSettings {
    /// The volume, its image and the catalog in the state dir.
    pub paths: hull_checkpoint::StoragePaths,
    /// Bytes of the sparse image when the state dir is not on btrfs.
    pub volume_size: u64,
    /// Bytes a new image leaves free on the state dir's filesystem.
    pub disk_reserve: u64,
    pub auto_checkpoints_keep: usize,
    /// The quota on the writable layer.
    pub quota: QuotaSettings,
}

/// What every inner is made of and limited to.
#[derive(Debug, Clone)]
pub struct InnerSettings {
    pub image: ImageKind,
    pub image_dir: PathBuf,
    pub hostname: String,
    /// Bytes.
    pub memory_max: u64,
    pub pids_max: Option<u64>,
    /// What the inner's seccomp filter lets through; `None`: no filter.
    pub seccomp: Option<SeccompOptions>,
    /// The inner's user namespace; `None`: its root is the VM's.
    pub user_namespace: Option<IdMapping>,
    /// CPUs' worth of time per period.
    pub cpus: f64,
}

/// The log store.
#[derive(Debug, Clone)]
pub struct LogsSettings {
    pub dir: PathBuf,
    pub limits: LogLimits,
}

/// The inner's network and the ingress.
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    pub mode: NetworkMode,
    /// The veth pair and its addresses (used in "nat" mode).
    pub veth: VethPlan,
    /// Name servers for the inner; the host's when empty.
    pub dns: Vec<IpAddr>,
    /// Where forwarded ports and the HTTP ingress listen.
    pub outer_ip: IpAddr,
    /// Inner ports that may be forwarded.
    pub expose: PortFilter,
    /// The HTTP ingress port on the outer address; 0: off.
    pub http_port: u16,
    /// How long a request waits for a port while the inner comes back.
    pub wait: Duration,
    pub private_ports: Vec<u16>,
    pub private_all: bool,
    pub max_forwarded_ports: usize,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub forward_in_kernel: bool,
    /// The bearer token of private URLs.
    pub token_file: PathBuf,
    /// The inner's resolv.conf ("nat" mode).
    pub resolv_conf: PathBuf,
}

/// The inner's default CPU cap: all but half a CPU, or three quarters of
/// the only one.
fn default_cpus(online: usize) -> f64 {
    let n = online.max(1) as f64;
    (n - 0.5).max(n * 0.75)
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn physical_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size(""), None);
    }

    fn from_toml(text: &str) -> Config {
        toml::from_str(text).unwrap()
    }

    /// Each key of a TOML text as `table.key`, commented-out ones too.
    fn documented_keys(text: &str) -> std::collections::BTreeSet<String> {
        let mut table = String::new();
        let mut keys = std::collections::BTreeSet::new();
        for line in text.lines() {
            let line = line.trim_start_matches('#').trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
                table = format!("{name}.");
            } else if let Some((key, _)) = line.split_once('=') {
                let key = key.trim();
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    keys.insert(format!("{table}{key}"));
                }
            }
        }
        keys
    }

    #[test]
    fn the_example_config_loads_and_names_every_key() {
        let text = include_str!("../../hull.example.toml");
        let config: Config = toml::from_str(text).unwrap();
        config.resolve().unwrap();
        let documented = documented_keys(text);
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let mut missing = Vec::new();
        for (key, value) in defaults.as_table().unwrap() {
            match value.as_table() {
                Some(table) => missing.extend(
                    table
                        .keys()
                        .map(|k| format!("{key}.{k}"))
                        .filter(|k| !documented.contains(k)),
                ),
                None if !documented.contains(key) => missing.push(key.clone()),
                None => {}
            }
        }
        assert!(
            missing.is_empty(),
            "hull.example.toml leaves out {missing:?}"
        );
    }

    #[test]
    fn logs_limits_parse_and_bad_ones_name_the_field() {
        let limits = |text: &str| from_toml(text).resolve().map(|s| s.logs.limits);
        let l = limits("[logs]\nsegment_size = \"1M\"\nmax_per_source = \"4M\"\n").unwrap();
        assert_eq!((l.segment_max, l.source_max), (1 << 20, 4 << 20));
        let l = Config::default().resolve().unwrap().logs.limits;
        assert_eq!((l.segment_max, l.source_max), (8 << 20, 64 << 20));
        let err = limits("[logs]\nsegment_size = \"8M\"\nmax_per_source = \"1M\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::LogCap { .. }), "{err}");
        let l = limits("[logs]\nmax_exec = \"16M\"\n").unwrap();
        assert_eq!((l.source_max, l.exec_max), (64 << 20, 16 << 20));
        let err = limits("[logs]\nsegment_size = \"8M\"\nmax_exec = \"1M\"\n").unwrap_err();
        assert!(err.to_string().starts_with("logs.max_exec = "), "{err}");
        // Below 64 KiB a segment would rotate on nearly every batch.
        let err = limits("[logs]\nsegment_size = \"1K\"\n").unwrap_err();
        assert!(err.to_string().contains("logs.segment_size"), "{err}");
    }

    #[test]
    fn the_example_remote_table_holds_only_keys_the_remote_crate_reads() {
        // The table is commented out in the example (no remote by default):
        // uncommented, it must load and resolve as it stands.
        let text = include_str!("../../hull.example.toml");
        let table: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# [remote]"))
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
            .collect();
        assert!(table.contains("bandwidth_limit"), "{table}");
        let remote = from_toml(&table).resolve().unwrap().remote.unwrap();
        assert_eq!(remote.settings.concurrency, 8);
        assert_eq!(remote.settings.bandwidth_limit, Some(10_000_000));
    }

    #[test]
    fn the_remote_table_is_read_by_the_remote_crate_and_checked_at_resolve() {
        assert!(Config::default().resolve().unwrap().remote.is_none());
        let text = "state_dir = \"/var/lib/box\"\n[remote]\nurl = \"s3://bucket/box\"\nendpoint = \"http://127.0.0.1:3900\"\nkey_file = \"/etc/hull/remote.key\"\nconcurrency = 4\nbandwidth_limit = 1000000\n";
        let remote = from_toml(text).resolve().unwrap().remote.unwrap();
        assert_eq!(remote.settings.url, "s3://bucket/box");
        assert_eq!(remote.settings.concurrency, 4);
        assert_eq!(remote.settings.bandwidth_limit, Some(1_000_000));
        assert_eq!(remote.index, PathBuf::from("/var/lib/box/remote-index"));
        let err = from_toml("[remote]\nurl = \"s3://b\"\nkey_file = \"k\"\nconcurrency = 0\n")
            .resolve()
            .unwrap_err();
        assert!(
            err.to_string().starts_with("remote.concurrency = 0"),
            "{err}"
        );
        let unknown = toml::from_str::<Config>(
            "[remote]\nurl = \"s3://b\"\nkey_file = \"k\"\nbucket = \"x\"\n",
        );
        assert!(unknown.is_err());
    }

    #[test]
    fn the_layer_quota_is_a_size_auto_or_none() {
        let quota = |text: &str| from_toml(text).resolve().unwrap().storage.quota;
        assert_eq!(quota("").size, LayerQuota::Auto);
        assert_eq!(quota("").mode, QuotaMode::Simple);
        let q = quota("[storage]\nlayer_quota = \"8G\"\nquota_mode = \"full\"\n");
        assert_eq!(q.size, LayerQuota::Bytes(8 << 30));
        assert_eq!(q.mode, QuotaMode::Full);
        for off in ["none", "0", "off"] {
            let text = format!("[storage]\nlayer_quota = \"{off}\"\n");
            assert_eq!(quota(&text).size, LayerQuota::Off, "{off}");
        }
    }

    #[test]
    fn a_bad_value_in_each_group_is_reported_by_resolve_with_its_key() {
        for (text, key) in [
            ("volume_size = \"big\"\n", "volume_size"),
            ("memory_max = \"lots\"\n", "memory_max"),
            ("image = \"arch\"\n", "image"),
            ("hostname = \"no spaces\"\n", "hostname"),
            ("[logs]\nsegment_size = \"lots\"\n", "logs.segment_size"),
            ("[logs]\nmax_per_source = \"9Q\"\n", "logs.max_per_source"),
            (
                "[network]\nouter_address = \"localhost\"\n",
                "network.outer_address",
            ),
            ("[network]\nexpose = \"80-\"\n", "network.expose"),
            ("[storage]\nlayer_quota = \"most\"\n", "storage.layer_quota"),
            (
                "[daemon]\ninner_connections = 0\n",
                "daemon.inner_connections",
            ),
            ("[network]\nsubnet = \"10.0.0.0/31\"\n", "network.subnet"),
            (
                "[network]\ndns = [\"1.1.1.1\", \"dns.google\"]\n",
                "network.dns",
            ),
        ] {
            let config = from_toml(text);
            let err = config.resolve().unwrap_err().to_string();
            assert!(err.starts_with(&format!("{key} = ")), "{text:?}: {err}");
            assert!(config.validate().is_err(), "{text:?}");
        }
    }

    #[test]
    fn the_api_connection_bounds_parse_and_zero_is_refused() {
        let api = |text: &str| from_toml(text).resolve().map(|s| s.api);
        let d = api("").unwrap();
        assert_eq!(
            (d.max_connections, d.max_connections_per_source),
            (256, 128)
        );
        assert_eq!(d.anonymous_header_timeout, Duration::from_secs(2));
        let a = api(
            "[api]\nmax_connections = 32\nmax_connections_per_source = 4\n\
             anonymous_header_timeout_ms = 500\n",
        )
        .unwrap();
        assert_eq!((a.max_connections, a.max_connections_per_source), (32, 4));
        assert_eq!(a.anonymous_header_timeout, Duration::from_millis(500));
        for key in [
            "max_connections",
            "max_connections_per_source",
            "anonymous_header_timeout_ms",
        ] {
            let err = api(&format!("[api]\n{key} = 0\n")).unwrap_err().to_string();
            assert!(err.starts_with(&format!("api.{key} = 0")), "{err}");
        }
    }

    #[test]
    fn resolve_types_every_group() {
        let s = from_toml(
            "state_dir = \"/s\"\nimage = \"busybox\"\nmemory_max = \"256M\"\n\
             volume_size = \"2G\"\ncgroup_name = \"t\"\n\
             [network]\nouter_address = \"127.0.0.2\"\nexpose = \"8000-8999\"\n\
             dns = [\"9.9.9.9\"]\nwait_secs = 3\n",
        )
        .resolve()
        .unwrap();
        assert_eq!(s.inner.memory_max, 256 << 20);
        assert_eq!(s.inner.image, ImageKind::Busybox);
        assert_eq!(s.inner.image_dir, Path::new("/s/images"));
        assert_eq!(s.storage.volume_size, 2 << 30);
        assert_eq!(s.logs.dir, Path::new("/s/logs"));
        assert_eq!(s.network.outer_ip, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(s.network.expose, PortFilter::parse("8000-8999").unwrap());
        assert_eq!(s.network.dns, ["9.9.9.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.network.wait, Duration::from_secs(3));
        assert_eq!(
            s.network.veth.host_if,
            format!("hv{:08x}", fnv1a("t") & 0xffff_ffff)
        );
        assert_eq!(s.network.token_file, Path::new("/s/ingress.token"));
    }

    #[test]
    fn seccomp_is_on_by_default_and_the_inner_table_shapes_it() {
        let default = from_toml("[inner]\nuser_namespace = false\n")
            .resolve()
            .unwrap();
        assert_eq!(default.inner.seccomp, Some(SeccompOptions::default()));
        let open = from_toml("[inner]\nio_uring = true\nnested_user_namespaces = true\n")
            .resolve()
            .unwrap();
        assert_eq!(
            open.inner.seccomp,
            Some(SeccompOptions {
                io_uring: true,
                nested_user_namespaces: true
            })
        );
        let off = from_toml("[inner]\nseccomp = false\n").resolve().unwrap();
        assert_eq!(off.inner.seccomp, None);
        let typo = toml::from_str::<Config>("[inner]\nio_urings = true\n");
        assert!(typo.is_err());
    }

    #[test]
    fn the_inner_has_a_user_namespace_by_default_which_opens_nested_ones() {
        let default = from_toml("").resolve().unwrap();
        assert_eq!(
            default.inner.user_namespace,
            Some(IdMapping {
                base: 100_000,
                count: 65_536
            })
        );
        assert_eq!(
            default.inner.seccomp.map(|s| s.nested_user_namespaces),
            Some(true)
        );
        let closed = from_toml("[inner]\nnested_user_namespaces = false\n")
            .resolve()
            .unwrap();
        assert_eq!(
            closed.inner.seccomp.map(|s| s.nested_user_namespaces),
            Some(false)
        );
        let off = from_toml("[inner]\nuser_namespace = false\n")
            .resolve()
            .unwrap();
        assert_eq!(off.inner.user_namespace, None);
        let moved = from_toml("[inner]\nuid_base = 200000\nid_count = 1000\n")
            .resolve()
            .unwrap();
        assert_eq!(
            moved.inner.user_namespace,
            Some(IdMapping {
                base: 200_000,
                count: 1000
            })
        );
        for bad in [
            "uid_base = 0",
            "id_count = 0",
            "uid_base = 4294967000\nid_count = 65536",
        ] {
            let err = from_toml(&format!("[inner]\n{bad}\n"))
                .resolve()
                .unwrap_err();
            assert!(matches!(err, ConfigError::IdRange { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn the_inner_leaves_hulld_cpu_by_default() {
        assert_eq!(default_cpus(1), 0.75);
        assert_eq!(default_cpus(2), 1.5);
        assert_eq!(default_cpus(16), 15.5);
        let s = from_toml("cpus = 0.5\n[daemon]\nmemory_max = \"128M\"\n")
            .resolve()
            .unwrap();
        assert_eq!(s.inner.cpus, 0.5);
        assert_eq!(s.daemon.memory_max, 128 << 20);
        assert_eq!(s.daemon.cpu_weight, 1000);
        for bad in [
            "cpus = 0.0\n",
            "cpus = -1.0\n",
            "[daemon]\ncpu_weight = 0\n",
        ] {
            assert!(from_toml(bad).resolve().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_client_reads_the_keys_it_shares_as_hulld_does() {
        use hull_client::config::ClientConfig;
        let example = include_str!("../../hull.example.toml");
        let custom =
            "state_dir = \"/s\"\nsocket = \"/x.sock\"\nimage_dir = \"/i\"\nimage = \"busybox\"\n";
        for text in [example, "", custom] {
            let hulld = from_toml(text);
            let client: ClientConfig = toml::from_str(text).unwrap();
            let shared = ClientConfig {
                state_dir: hulld.state_dir.clone(),
                socket: hulld.socket.clone(),
                image_dir: hulld.image_dir.clone(),
                image: hulld.image.clone(),
            };
            assert_eq!(client, shared, "{text}");
            assert_eq!(client.image_dir(), hulld.image_dir());
            assert_eq!(client.log_file(), hulld.log_file());
        }
    }

    #[test]
    fn unknown_fields_are_refused_and_a_missing_file_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("hull.toml");
        std::fs::write(&path, "stat_dir = \"/x\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&path)),
            Err(ConfigError::File(
                hull_client::config::ConfigError::Parse { .. }
            ))
        ));
        std::fs::write(&path, "image = \"busybox\"\nmemory_max = \"256M\"\n").unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.resolve().unwrap().inner.memory_max, 256 << 20);
        assert!(Config::load(Some(&tmp.path().join("missing.toml"))).is_err());
    }
}
