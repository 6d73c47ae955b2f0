//! TCP forwarding: for every port the inner listens on (and the config
//! allows), hulld listens on the same port number on the outer address and
//! relays each connection into the inner through a socket made inside the
//! inner's namespace. Listeners outlive a bounce for the wait window, so a
//! client that connects while the inner comes back waits instead of being
//! refused.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::budget::{out_of_fds, ConnLimits, FdBudget, FdLease, Throttle, ACCEPT_BACKOFF};
use crate::port_policy::{PortPolicy, FIRST_UNPRIVILEGED_PORT};
use crate::ports::{listener_went_away, wait_listening};
use crate::sockmap::{Redirector, Relayed};
use crate::{Dialer, PortTable};

/// Per-direction relay buffer of a forwarded connection.
const RELAY_BUF: usize = 64 * 1024;

/// Which inner ports may be exposed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortFilter {
    /// Inclusive ranges; empty means every port.
    pub ranges: Vec<(u16, u16)>,
}

impl PortFilter {
    pub fn allows(&self, port: u16) -> bool {
        self.ranges.is_empty()
            || self
                .ranges
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&port))
    }

    /// Parses "8000-8999,3000,5432" (empty: everything).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || format!("{part:?} is not a port or a range like 8000-8999");
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (
                    lo.trim().parse().map_err(|_| bad())?,
                    hi.trim().parse().map_err(|_| bad())?,
                ),
                None => {
                    let p: u16 = part.parse().map_err(|_| bad())?;
                    (p, p)
                }
            };
            if lo == 0 || lo > hi {
                return Err(bad());
            }
            ranges.push((lo, hi));
        }
        Ok(PortFilter { ranges })
    }
}

#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub outer_addr: IpAddr,
    pub policy: PortPolicy,
    /// hulld's own listeners (the HTTP API, the HTTP ingress), bound
    /// before any inner starts: their ports are never forwarded where they
    /// would clash, so the inner cannot take them, even by winning a race.
    pub own: Vec<OwnListener>,
    /// Peer networks refused at accept (the inner's own subnet).
    pub refuse_from: Vec<(IpAddr, u8)>,
    /// How long a connection waits for the inner's port, and how long an
    /// outer listener outlives its inner port.
    pub wait: Duration,
    /// Outer listeners at most: the inner may listen on any number of
    /// ports, and each would cost hulld an fd.
    pub max_ports: usize,
    /// hulld's fds that listeners and relayed connections may take.
    pub budget: Arc<FdBudget>,
    /// Relayed connections at once, in all and per source (shared with
    /// the HTTP ingress).
    pub conns: Arc<ConnLimits>,
    /// Relay in the kernel with a sockmap redirect where the kernel allows
    /// it, instead of copying.
    pub in_kernel: bool,
}

/// A listener of hulld's own, by what it is (`"HTTP API"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnListener {
    pub what: &'static str,
    pub addr: SocketAddr,
}

impl OwnListener {
    /// Whether a listener on `outer` would take this one's port: the same
    /// port on the same address, or where either is every address.
    pub fn clashes(&self, outer: SocketAddr) -> bool {
        self.addr.port() == outer.port()
            && (self.addr.ip() == outer.ip()
                || self.addr.ip().is_unspecified()
                || outer.ip().is_unspecified())
    }
}

/// The forwarder's repeated warnings, each logged once per interval.
#[derive(Debug, Default)]
struct Warnings {
    accept: Throttle,
    no_fds: Throttle,
    capped: Throttle,
    too_many: Throttle,
}

/// What became of one inner port on the outer side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ForwardState {
    /// hulld listens on `outer` and relays into the inner.
    Forwarded { outer: SocketAddr },
    /// The port is taken on the outer address; reach it through HTTP ingress.
    Taken { outer: SocketAddr, error: String },
    /// The config's allow list leaves it out.
    NotAllowed,
    /// It needs the bearer token, which only HTTP ingress checks.
    Private,
    /// hulld's cap on forwarded ports is reached, or its fd budget spent
    /// (tried again as ports go away); or the port is one of hulld's own,
    /// or below 1024 and not named in `expose`. Reach it through HTTP
    /// ingress.
    NotForwarded { reason: String },
}

struct Exposed {
    state: ForwardState,
    task: Option<JoinHandle<()>>,
    /// The listener's fd, from hulld's budget.
    _lease: Option<FdLease>,
    /// Since when the inner no longer listens on it.
    gone_since: Option<Instant>,
}

/// The set of outer listeners, kept in step with the port table.
pub struct Forwarder {
    exposed: Mutex<HashMap<u16, Exposed>>,
}

impl Forwarder {
    pub fn start(
        dialer: Dialer,
        ports: watch::Receiver<PortTable>,
        config: ForwardConfig,
    ) -> Arc<Forwarder> {
        let forwarder = Arc::new(Forwarder {
            exposed: Mutex::new(HashMap::new()),
        });
        let redirector = config.in_kernel.then(|| load_redirector(&config)).flatten();
        tokio::spawn(follow(
            forwarder.clone(),
            dialer,
            ports,
            Arc::new(config),
            redirector,
        ));
        forwarder
    }

    pub fn state(&self, port: u16) -> Option<ForwardState> {
        let exposed = self.exposed.lock().unwrap_or_else(|e| e.into_inner());
        exposed.get(&port).map(|e| e.state.clone())
    }

    /// Closes every outer listener (hulld going down).
    pub fn close_all(&self) {
        let mut exposed = self.exposed.lock().unwrap_or_else(|e| e.into_inner());
        for (_, e) in exposed.drain() {
            if let Some(task) = e.task {
                task.abort();
            }
        }
    }
}

/// The sockmap redirect, or None (logged once) where the kernel has no
/// BPF or refuses it: forwarding then copies.
fn load_redirector(config: &ForwardConfig) -> Option<Arc<Redirector>> {
    // Beyond what a map should hold, connections are copied.
    const MAX_PAIRS: usize = 65_536;
    let pairs = u32::try_from(config.conns.max().min(MAX_PAIRS)).unwrap_or(u32::MAX);
    match Redirector::load(pairs) {
        Ok(r) => {
            tracing::info!(
                pairs,
                "TCP forwarding relays in the kernel (sockmap redirect)"
            );
            Some(r)
        }
        Err(e) => {
            tracing::warn!(error = %e, "TCP forwarding copies through hulld: the sockmap redirect is not available");
            None
        }
    }
}

async fn follow(
    forwarder: Arc<Forwarder>,
    dialer: Dialer,
    mut ports: watch::Receiver<PortTable>,
    config: Arc<ForwardConfig>,
    redirector: Option<Arc<Redirector>>,
) {
    let warnings = Arc::new(Warnings::default());
    loop {
        let listening: Vec<u16> = {
            let table = ports.borrow_and_update();
            let mut v: Vec<u16> = table.ports.iter().map(|p| p.port).collect();
            v.dedup();
            v
        };
        let shared = Shared {
            dialer: &dialer,
            ports: &ports,
            config: &config,
            warnings: &warnings,
            redirector: &redirector,
        };
        sync(&forwarder, &shared, &listening).await;
        // Wake up for changes, and now and then to close lingering listeners.
        match tokio::time::timeout(Duration::from_secs(1), ports.changed()).await {
            Ok(Err(_)) => break,
            _ => continue,
        }
    }
    forwarder.close_all();
}

/// What every outer listener of a forwarder uses.
struct Shared<'a> {
    dialer: &'a Dialer,
    ports: &'a watch::Receiver<PortTable>,
    config: &'a Arc<ForwardConfig>,
    warnings: &'a Arc<Warnings>,
    redirector: &'a Option<Arc<Redirector>>,
}

async fn sync(forwarder: &Arc<Forwarder>, shared: &Shared<'_>, listening: &[u16]) {
    let config = shared.config;
    let (fresh, mut forwarded) = {
        let mut exposed = forwarder.exposed.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        exposed.retain(|port, e| {
            // Refused for want of room: asked again, a slot may be free.
            if matches!(e.state, ForwardState::NotForwarded { .. }) {
                return false;
            }
            if listening.contains(port) {
                e.gone_since = None;
                return true;
            }
            let since = *e.gone_since.get_or_insert(now);
            let keep = since.elapsed() < config.wait;
            if !keep {
                if let Some(task) = e.task.take() {
                    task.abort();
                }
                tracing::debug!(port, "inner port gone; outer listener closed");
            }
            keep
        });
        let forwarded = exposed.values().filter(|e| e.task.is_some()).count();
        let fresh: Vec<u16> = listening
            .iter()
            .copied()
            .filter(|p| !exposed.contains_key(p))
            .collect();
        (fresh, forwarded)
    };
    let mut capped = 0usize;
    for port in fresh {
        let exposed = if forwarded >= config.max_ports {
            capped += 1;
            Exposed {
                state: ForwardState::NotForwarded {
                    reason: format!(
                        "cap reached: hulld forwards at most {} ports (network.max_forwarded_ports)",
                        config.max_ports
                    ),
                },
                task: None,
                _lease: None,
                gone_since: None,
            }
        } else {
            expose(port, shared).await
        };
        if exposed.task.is_some() {
            forwarded += 1;
        }
        forwarder
            .exposed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port, exposed);
    }
    if capped > 0 && shared.warnings.capped.hit().is_some() {
        tracing::warn!(
            capped,
            cap = config.max_ports,
            "inner ports not forwarded: the cap on forwarded ports is reached"
        );
    }
}

async fn expose(port: u16, shared: &Shared<'_>) -> Exposed {
    let config = shared.config;
    let outer = SocketAddr::new(config.outer_addr, port);
    let state_only = |state| Exposed {
        state,
        task: None,
        _lease: None,
        gone_since: None,
    };
    if !config.policy.exposes(port) {
        return state_only(ForwardState::NotAllowed);
    }
    if config.policy.is_private(port) {
        return state_only(ForwardState::Private);
    }
    if let Some(own) = config.own.iter().find(|own| own.clashes(outer)) {
        return state_only(ForwardState::NotForwarded {
            reason: format!(
                "hulld's {} listens on {}; reach the inner's port through HTTP ingress",
                own.what, own.addr
            ),
        });
    }
    if !config.policy.forwards(port) {
        return state_only(ForwardState::NotForwarded {
            reason: format!(
                "ports below {FIRST_UNPRIVILEGED_PORT} are forwarded only when network.expose names them; reach it through HTTP ingress"
            ),
        });
    }
    let Some(lease) = config.budget.take(1) else {
        return state_only(ForwardState::NotForwarded {
            reason: "hulld has no file descriptors to spare".into(),
        });
    };
    match TcpListener::bind(outer).await {
        Ok(listener) => {
            tracing::info!(port, %outer, "forwarding an inner port");
            let task = tokio::spawn(accept_loop(
                listener,
                port,
                Relay {
                    dialer: shared.dialer.clone(),
                    ports: shared.ports.clone(),
                    config: config.clone(),
                    redirector: shared.redirector.clone(),
                },
                shared.warnings.clone(),
            ));
            Exposed {
                state: ForwardState::Forwarded { outer },
                task: Some(task),
                _lease: Some(lease),
                gone_since: None,
            }
        }
        Err(e) => {
            tracing::info!(port, %outer, error = %e, "inner port not forwarded: the outer port is taken");
            state_only(ForwardState::Taken {
                outer,
                error: e.to_string(),
            })
        }
    }
}

/// What a relayed connection needs, cloned per connection.
#[derive(Clone)]
struct Relay {
    dialer: Dialer,
    ports: watch::Receiver<PortTable>,
    config: Arc<ForwardConfig>,
    redirector: Option<Arc<Redirector>>,
}

async fn accept_loop(listener: TcpListener, port: u16, relay_with: Relay, warnings: Arc<Warnings>) {
    let config = &relay_with.config;
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                if let Some(suppressed) = warnings.accept.hit() {
                    tracing::warn!(port, error = %e, out_of_fds = out_of_fds(&e), suppressed, "accept on a forwarded port failed; backing off");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if crate::peer::refused(peer.ip(), &config.refuse_from) {
            tracing::debug!(port, %peer, "connection from the inner's own network refused");
            continue;
        }
        let admission = match config.conns.admit(crate::peer::canonical_ip(peer.ip())) {
            Ok(admission) => admission,
            Err(why) => {
                if let Some(suppressed) = warnings.too_many.hit() {
                    tracing::warn!(port, %peer, ?why, suppressed, "forwarded connection refused: too many open");
                }
                continue;
            }
        };
        // The client's fd and the one into the inner.
        let Some(lease) = config.budget.take(2) else {
            if let Some(suppressed) = warnings.no_fds.hit() {
                tracing::warn!(
                    port,
                    suppressed,
                    "forwarded connection refused: the fds hulld gives to requests are all in use"
                );
            }
            continue;
        };
        let with = relay_with.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(client, port, with).await {
                tracing::debug!(port, %peer, error = %e, "forwarded connection ended with an error");
            }
            drop((lease, admission));
        });
    }
}

async fn relay(mut client: TcpStream, port: u16, mut with: Relay) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = connect(port, &with.dialer, &mut with.ports, with.config.wait).await?;
    if let Some(redirector) = &with.redirector {
        // The kernel sends what it redirects as it comes: small segments
        // must not wait for an ACK.
        upstream.set_nodelay(true)?;
        // Out of tokio's reactor: it would wake hulld for every segment
        // the verdict takes.
        let (a, b) = (client.into_std()?, upstream.into_std()?);
        match redirector.relay(a, b).await {
            Relayed::Done(result) => return result,
            Relayed::Refused { a, b, why } => {
                // Mostly a side that closed before it could join.
                tracing::debug!(port, error = %why, "forwarded connection copied instead");
                client = TcpStream::from_std(a)?;
                upstream = TcpStream::from_std(b)?;
            }
        }
    }
    // copy_bidirectional passes a half-close on: EOF from one side becomes
    // shutdown(SHUT_WR) towards the other. Its default 8 KiB buffers cost a
    // third of the throughput of a direct connection on big transfers.
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, RELAY_BUF, RELAY_BUF)
        .await?;
    Ok(())
}

/// Connects to the inner's `port`, waiting (bounded) through a bounce.
pub async fn connect(
    port: u16,
    dialer: &Dialer,
    ports: &mut watch::Receiver<PortTable>,
    wait: Duration,
) -> io::Result<TcpStream> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(listening) = wait_listening(ports, port, left, false).await else {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("nothing listens on port {port} in the inner"),
            ));
        };
        match dialer.connect(port, Some(listening.addr)).await {
            Ok(stream) => return Ok(stream),
            // The table lags the inner by a scan: the listener may have just
            // gone (a bounce). Wait for the next scan and try again.
            Err(e) if listener_went_away(&e) && tokio::time::Instant::now() < deadline => {
                let _ = tokio::time::timeout(Duration::from_millis(300), ports.changed()).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_listeners_clash_on_the_same_port_of_an_overlapping_address() {
        let own = |addr: &str| OwnListener {
            what: "HTTP API",
            addr: addr.parse().unwrap(),
        };
        let at = |addr: &str| addr.parse::<SocketAddr>().unwrap();
        assert!(own("10.0.0.5:7700").clashes(at("10.0.0.5:7700")));
        assert!(own("0.0.0.0:7700").clashes(at("10.0.0.5:7700")));
        assert!(own("10.0.0.5:7700").clashes(at("0.0.0.0:7700")));
        assert!(own("[::]:7700").clashes(at("10.0.0.5:7700")));
        assert!(!own("10.0.0.5:7700").clashes(at("10.0.0.5:7701")));
        assert!(!own("127.0.0.1:7700").clashes(at("10.0.0.5:7700")));
    }

    #[test]
    fn filter_parses_ranges_and_lists() {
        let f = PortFilter::parse("8000-8999, 3000").unwrap();
        assert!(f.allows(8000) && f.allows(8999) && f.allows(3000));
        assert!(!f.allows(7999) && !f.allows(9000) && !f.allows(3001));
        assert!(PortFilter::parse("").unwrap().allows(1));
        for bad in ["x", "9000-8000", "0", "1-70000"] {
            assert!(PortFilter::parse(bad).is_err(), "{bad}");
        }
    }
}
