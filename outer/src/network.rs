//! hulld's side of the inner's network: creates the persistent namespace
//! (with its veth and NAT when the mode is "nat"), the port table, the TCP
//! forwarder and the HTTP ingress, and answers `hull ports`.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hull_network::budget::ConnLimits;
use hull_network::conntrack::Conntrack;
use hull_network::dns::{DnsConfig, DnsError, DnsProxy};
use hull_network::enforcer::{Enforcer, EnforcerError};
use hull_network::forward::{ForwardConfig, ForwardState, Forwarder, OwnListener};
use hull_network::http::{HttpIngress, HttpIngressConfig, HttpRoute};
use hull_network::link::{self, LinkError, VethPlan};
use hull_network::nat::{self, NatError, NatTable};
use hull_network::netns::NetnsError;
use hull_network::port_policy::PortPolicy;
use hull_network::ports::{socket_owners, ListenScanner};
use hull_network::{Dialer, EgressPolicy, FdBudget, InnerNetns, PortTable};
use hull_proto::{IngressReport, PortInfo, PortsReport};
use tokio::sync::{watch, Notify};

use crate::config::{NetworkMode, NetworkSettings};

/// How often the inner's listening sockets are scanned.
const SCAN_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot set up the inner's network")]
    Link(#[from] LinkError),
    #[error("cannot set up the inner's egress")]
    Nat(#[from] NatError),
    #[error("cannot open a sock_diag socket in the inner's namespace")]
    Scanner(#[source] std::io::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the ingress thread")]
    IngressThread(#[source] std::io::Error),
    #[error("cannot enforce the egress policy")]
    Enforcer(#[source] EnforcerError),
    #[error("cannot open a conntrack socket for the egress policy")]
    Conntrack(#[source] std::io::Error),
    #[error("cannot start the inner's name server")]
    Dns(#[source] DnsError),
}

/// What enforces the egress policy in the "nat" mode: the firewall's one
/// owner, and the name server that feeds it.
struct Egress {
    table: NatTable,
    enforcer: Enforcer,
    dns: DnsProxy,
}

pub struct Network {
    pub mode: NetworkMode,
    pub netns: Arc<InnerNetns>,
    pub plan: Option<VethPlan>,
    egress: Option<Egress>,
    pub ports: watch::Receiver<PortTable>,
    forwarder: Arc<Forwarder>,
    /// Where the HTTP ingress listens, if it does.
    pub http: Option<SocketAddr>,
    token: Arc<str>,
    policy: PortPolicy,
    pub resolv_conf: Option<PathBuf>,
    routes: Arc<watch::Sender<Vec<HttpRoute>>>,
    /// Asks the port scanner for a scan now.
    rescan: Arc<Notify>,
    /// Connects from inside the inner's network namespace.
    dialer: Dialer,
}

/// Service readiness reads the same port table as the ingress.
struct PortTableProbe {
    ports: watch::Receiver<PortTable>,
    rescan: Arc<Notify>,
}

impl hull_services::PortProbe for PortTableProbe {
    fn listening_since(&self, since: std::time::Instant) -> Option<Vec<u16>> {
        // A caller asks while it waits for a port: scan again soon either
        // way, so the port is seen within a scan of its bind.
        self.rescan.notify_one();
        let table = self.ports.borrow();
        match table.scanned_at {
            Some(at) if at >= since => Some(table.ports.iter().map(|p| p.port).collect()),
            _ => None,
        }
    }
}

impl Network {
    /// Sets everything up; `running` says whether an inner is up, `api`
    /// is where hulld's HTTP API listens (bound already: its port, like the
    /// HTTP ingress's, is never forwarded).
    pub async fn start(
        net: NetworkSettings,
        running: watch::Receiver<bool>,
        budget: Arc<FdBudget>,
        api: Option<SocketAddr>,
        policy: Arc<EgressPolicy>,
    ) -> Result<Network, NetworkError> {
        let netns = InnerNetns::create(tokio::runtime::Handle::current())?;
        link::loopback_up(&netns).await?;
        let (plan, egress, resolv_conf) = match net.mode {
            NetworkMode::None => (None, None, None),
            NetworkMode::Nat => {
                let (egress, resolv) = egress(&net, &netns, policy).await?;
                (Some(net.veth.clone()), Some(egress), Some(resolv))
            }
        };
        let scanner = netns
            .run(ListenScanner::new)
            .await?
            .map_err(NetworkError::Scanner)?;
        let rescan = Arc::new(Notify::new());
        let ports =
            hull_network::portwatch::watch_ports(scanner, running, SCAN_INTERVAL, rescan.clone());
        let token = load_or_create_token(&net.token_file)?;
        let outer = net.outer_ip;
        let refuse_from: Vec<(IpAddr, u8)> = plan
            .iter()
            .map(|p| (IpAddr::V4(p.network), p.prefix))
            .collect();
        let wait = net.wait;
        let dialer = Dialer::new(netns.clone());
        let http = match net.http_port {
            0 => None,
            port => Some(SocketAddr::new(outer, port)),
        };
        let policy = PortPolicy {
            expose: net.expose.clone(),
            private_ports: net.private_ports.clone(),
            private_all: net.private_all,
        };
        let conns = ConnLimits::new(net.max_connections, net.max_connections_per_source);
        // hulld's own listeners: the HTTP ingress's port counts even when
        // another program holds it.
        let own = api
            .map(|addr| OwnListener {
                what: "HTTP API",
                addr,
            })
            .into_iter()
            .chain(http.map(|addr| OwnListener {
                what: "HTTP ingress",
                addr,
            }))
            .collect();
        // Bound before the forwarder starts (and so before any inner).
        let io = start_ingress_runtime()?;
        let (routes, routes_rx) = watch::channel(Vec::new());
        let http = match http {
            None => None,
            Some(addr) => match bind_on(&io, addr) {
                Ok(listener) => {
                    let ingress = Arc::new(HttpIngress {
                        dialer: dialer.clone(),
                        ports: ports.clone(),
                        routes: routes_rx,
                        config: HttpIngressConfig {
                            wait,
                            token: Some(token.clone()),
                            policy: policy.clone(),
                            refuse_from: refuse_from.clone(),
                            budget: budget.clone(),
                            conns: conns.clone(),
                        },
                    });
                    io.spawn(ingress.serve(listener));
                    Some(addr)
                }
                Err(e) => {
                    // Forwarded ports still work; hulld is more use up
                    // than down because another program holds the port.
                    tracing::error!(%addr, error = %e, "HTTP ingress is off: cannot listen");
                    None
                }
            },
        };
        let forwarder = {
            // Its tasks and listeners live on the ingress runtime.
            let _on = io.enter();
            Forwarder::start(
                dialer.clone(),
                ports.clone(),
                ForwardConfig {
                    outer_addr: outer,
                    policy: policy.clone(),
                    own,
                    refuse_from: refuse_from.clone(),
                    wait,
                    max_ports: net.max_forwarded_ports,
                    in_kernel: net.forward_in_kernel,
                    budget: budget.clone(),
                    conns: conns.clone(),
                },
            )
        };
        tracing::info!(
            mode = net.mode.name(),
            inner_address = ?plan.as_ref().map(|p| p.inner_ip),
            http = ?http,
            "inner network ready"
        );
        Ok(Network {
            mode: net.mode,
            netns,
            plan,
            egress,
            ports,
            forwarder,
            http,
            token,
            policy,
            resolv_conf,
            routes: Arc::new(routes),
            rescan,
            dialer,
        })
    }

    /// A connection to `target` as the inner's own processes would make
    /// it (its loopback is the inner's), for the API's port proxy.
    pub async fn dial(&self, target: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        self.dialer.connect(target.port(), Some(target.ip())).await
    }

    /// Service readiness from the port table.
    pub fn port_probe(&self) -> Arc<dyn hull_services::PortProbe> {
        Arc::new(PortTableProbe {
            ports: self.ports.clone(),
            rescan: self.rescan.clone(),
        })
    }

    /// Keeps HTTP ingress routing on the services that declare a port, as
    /// the service manager publishes them, and on which of them failed.
    pub fn follow_services(
        &self,
        mut definitions: watch::Receiver<hull_services::Definitions>,
        mut failed: watch::Receiver<hull_services::Failed>,
    ) {
        let routes = self.routes.clone();
        tokio::spawn(async move {
            loop {
                let specs = definitions.borrow_and_update().clone();
                let down = failed.borrow_and_update().clone();
                set_routes(&routes, &specs, &down);
                let changed = tokio::select! {
                    c = definitions.changed() => c,
                    c = failed.changed() => c,
                };
                if changed.is_err() {
                    return;
                }
            }
        });
    }

    /// `hull ports`: what listens in the inner, who owns it, how it is exposed.
    pub fn report(&self, inner_pids: &[i32]) -> PortsReport {
        let table = self.ports.borrow().clone();
        let owners = socket_owners(inner_pids);
        let ports = table
            .ports
            .iter()
            .map(|p| {
                let owner = owners.get(&p.inode);
                let (exposure, outer, detail) = match self.forwarder.state(p.port) {
                    Some(ForwardState::Forwarded { outer }) => {
                        ("forwarded", Some(outer.to_string()), None)
                    }
                    Some(ForwardState::Taken { outer, error }) => {
                        ("taken", Some(outer.to_string()), Some(error))
                    }
                    Some(ForwardState::NotAllowed) => ("not-allowed", None, None),
                    Some(ForwardState::Private) => ("private", None, None),
                    Some(ForwardState::NotForwarded { reason }) => {
                        ("not-forwarded", None, Some(reason))
                    }
                    None => ("pending", None, None),
                };
                // A URL that reaches the port as pasted: its forwarded
                // address when it has one, else HTTP ingress's route.
                let route = match (&outer, exposure) {
                    (Some(outer), "forwarded") => Some((format!("http://{outer}/"), None)),
                    _ => self.http.map(|a| http_url(a, p.port)),
                };
                PortInfo {
                    port: p.port,
                    address: p.addr.to_string(),
                    pid: owner.and_then(|o| crate::port_events::inner_pid(o.pid)),
                    command: owner.map(|o| o.command.clone()),
                    exposure: exposure.to_string(),
                    outer,
                    detail,
                    http_url: route.as_ref().map(|(url, _)| url.clone()),
                    http_host: route.and_then(|(_, host)| host),
                    private: self.policy.is_private(p.port),
                }
            })
            .collect();
        PortsReport {
            network: self.mode.name().to_string(),
            ports,
        }
    }

    pub fn ingress_report(&self) -> IngressReport {
        IngressReport {
            http: self.http.map(|a| a.to_string()),
            token: self.token.to_string(),
            private_ports: self.policy.private_ports.clone(),
            private_all: self.policy.private_all,
            inner_address: self.plan.as_ref().map(|p| p.inner_ip.to_string()),
            gateway: self.plan.as_ref().map(|p| p.host_ip.to_string()),
        }
    }

    /// Makes the firewall enforce `policy`; `false` when there is nothing
    /// to enforce it on (the "none" mode has no way out at all).
    pub async fn set_egress_policy(
        &self,
        policy: Arc<EgressPolicy>,
    ) -> Result<bool, EnforcerError> {
        match &self.egress {
            Some(egress) => egress.enforcer.set_policy(policy).await.map(|()| true),
            None => Ok(false),
        }
    }

    /// Whether a policy set is enforced here ("nat" mode).
    pub fn enforces_egress(&self) -> bool {
        self.egress.is_some()
    }

    /// Undoes what lives outside the namespace: the NAT table and the veth.
    pub async fn shutdown(&self) {
        self.forwarder.close_all();
        if let Some(egress) = &self.egress {
            egress.dns.stop();
            if let Err(e) = tokio::task::block_in_place(|| egress.table.remove()) {
                tracing::warn!(error = %crate::error_chain(&e), "removing hulld's nftables table failed");
            }
        }
        if let Some(plan) = &self.plan {
            if let Err(e) = link::remove_veth(&plan.host_if).await {
                tracing::warn!(error = %crate::error_chain(&e), "removing the inner's veth failed");
            }
        }
    }
}

/// The URL of an inner port through HTTP ingress, and the Host header to
/// send with it when its own host cannot name the port. The Host's first
/// label picks the port; `PORT.localhost` is 127.0.0.1 (or ::1) to curl
/// and browsers without DNS, so that URL works when the ingress listens
/// there or on every address. Anywhere else (another loopback address, a
/// LAN address) no name both reaches the ingress and says the port without
/// DNS hull does not have: the URL is the listen address, and the Host
/// header `PORT.localhost` goes with it.
fn http_url(http: SocketAddr, port: u16) -> (String, Option<String>) {
    let ip = http.ip();
    let localhost = ip.is_unspecified()
        || ip == IpAddr::from(std::net::Ipv4Addr::LOCALHOST)
        || ip == IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
    if localhost {
        (format!("http://{port}.localhost:{}/", http.port()), None)
    } else {
        (format!("http://{http}/"), Some(format!("{port}.localhost")))
    }
}

/// The veth, forwarding, the firewall under the egress policy, the
/// inner's name server and its resolv.conf: the "nat" mode.
async fn egress(
    net: &NetworkSettings,
    netns: &InnerNetns,
    policy: Arc<EgressPolicy>,
) -> Result<(Egress, PathBuf), NetworkError> {
    let plan = &net.veth;
    link::create_veth(netns, plan).await?;
    if tokio::task::block_in_place(nat::enable_forwarding)? {
        tracing::info!("IPv4 forwarding was off; turned it on for the inner's egress");
    }
    let table = NatTable::new(&format!("hull_{}", plan.host_if));
    let enforcer = tokio::task::block_in_place(|| {
        let conntrack = Conntrack::open().map_err(NetworkError::Conntrack)?;
        Enforcer::start(table.clone(), plan.clone(), policy, conntrack)
            .map_err(NetworkError::Enforcer)
    })?;
    let host_resolv = Path::new("/etc/resolv.conf");
    let host_text = std::fs::read_to_string(host_resolv).unwrap_or_default();
    let (text, upstreams) = nat::resolv_conf(&host_text, &net.dns, plan.host_ip);
    if upstreams.is_empty() {
        tracing::warn!("no name server to ask for the inner (the host has none); set network.dns");
    }
    let listen = SocketAddr::new(IpAddr::V4(plan.host_ip), 53);
    let judged_by = enforcer.policy();
    let dns = DnsProxy::start(
        DnsConfig::new(listen, upstreams),
        judged_by,
        Arc::new(enforcer.clone()),
    )
    .await
    .map_err(NetworkError::Dns)?;
    write_world_readable(&net.resolv_conf, text.as_bytes())?;
    Ok((
        Egress {
            table,
            enforcer,
            dns,
        },
        net.resolv_conf.clone(),
    ))
}

fn write_world_readable(path: &Path, data: &[u8]) -> Result<(), NetworkError> {
    let err = |source| NetworkError::Write {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(path, data).map_err(err)?;
    // hulld's umask is 077; users of the inner other than root read it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(err)
}

/// The bearer token of private URLs: made at first start, kept 0600.
fn load_or_create_token(path: &Path) -> Result<Arc<str>, NetworkError> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().len() >= 32 => return Ok(Arc::from(text.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(NetworkError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let err = |source| NetworkError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(err)?;
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(token.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(Arc::from(token.as_str()))
}

/// The forwarder and the HTTP ingress run on a single-threaded runtime of
/// their own: a proxied request hops between the client's connection task
/// and the upstream's several times, and on one thread those hops are queue
/// pushes instead of cross-thread wake-ups. `hull-bench --ingress` measured
/// hulld's CPU per HTTP request going from about 40 to about 30 µs.
fn start_ingress_runtime() -> Result<tokio::runtime::Handle, NetworkError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NetworkError::IngressThread)?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("ingress".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .map_err(NetworkError::IngressThread)?;
    Ok(handle)
}

/// Binds the HTTP listener on the ingress runtime's reactor.
fn bind_on(
    io: &tokio::runtime::Handle,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let _on = io.enter();
    tokio::net::TcpListener::from_std(listener)
}

/// The services that declared an HTTP port, for HTTP ingress routing.
fn set_routes(
    routes: &watch::Sender<Vec<HttpRoute>>,
    specs: &[std::sync::Arc<hull_proto::ServiceSpec>],
    failed: &hull_services::Failed,
) {
    let mut new: Vec<HttpRoute> = specs
        .iter()
        .filter_map(|s| {
            s.http_port.map(|port| HttpRoute {
                service: s.name.clone(),
                port,
                failed: failed.get(&s.name).cloned(),
            })
        })
        .collect();
    new.sort_by(|a, b| a.service.cmp(&b.service));
    routes.send_if_modified(|now| {
        let changed = *now != new;
        *now = new;
        changed
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_port_in_the_host() {
        let url = |addr: &str, port| http_url(addr.parse().unwrap(), port);
        let at_localhost = |u: &str| (u.to_string(), None);
        let with_host = |u: &str, h: &str| (u.to_string(), Some(h.to_string()));
        assert_eq!(
            url("127.0.0.1:8080", 8000),
            at_localhost("http://8000.localhost:8080/")
        );
        assert_eq!(
            url("0.0.0.0:80", 8000),
            at_localhost("http://8000.localhost:80/")
        );
        assert_eq!(
            url("[::1]:8080", 3000),
            at_localhost("http://3000.localhost:8080/")
        );
        assert_eq!(
            url("127.100.1.2:8080", 8000),
            with_host("http://127.100.1.2:8080/", "8000.localhost")
        );
        assert_eq!(
            url("10.0.0.5:80", 3000),
            with_host("http://10.0.0.5:80/", "3000.localhost")
        );
        assert_eq!(
            url("[fd00::5]:80", 3000),
            with_host("http://[fd00::5]:80/", "3000.localhost")
        );
    }

    #[test]
    fn the_token_is_made_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ingress.token");
        let first = load_or_create_token(&path).unwrap();
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_token(&path).unwrap(), first);
    }
}
