//! The inner's name server: a forwarder in the root namespace that asks
//! the egress policy about every name before it asks the upstream.
//!
//! A denied name gets REFUSED at once, and the lookup is counted and
//! logged with the name the inner asked for. An allowed query goes to the
//! upstream resolvers as the bytes the inner sent (so EDNS, every record
//! type and the inner's own id pass through), over the transport it came
//! on: a truncated UDP answer makes the inner retry over TCP, as it would
//! with any server. Before an allowed answer is released, its A and AAAA
//! addresses are handed to an [`Admit`] (the enforcer puts them in its
//! nftables sets for their TTL), so a program that connects the moment it
//! has an address never races the firewall.
//!
//! The inner is not trusted: UDP queries in flight are bounded (past the
//! bound a query is dropped, which a resolver retries), TCP connections
//! are bounded and time out when idle, and every upstream exchange has a
//! deadline.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::task::AbortHandle;

use crate::egress::{EgressAction, EgressPolicy};

/// The largest DNS message: TCP's two-byte length, and the most a UDP
/// datagram answer may carry with EDNS.
const MAX_MESSAGE: usize = 65_535;

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where the inner sends its queries: the gateway address, port 53.
    pub listen: SocketAddr,
    /// The resolvers allowed queries go to, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// UDP queries being answered at once; past it, queries are dropped.
    pub max_in_flight: usize,
    /// TCP connections at once; past it, new ones are closed.
    pub max_tcp: usize,
    /// How long one upstream has to answer before the next is tried.
    pub upstream_timeout: Duration,
    /// How long a TCP connection may sit without a query.
    pub tcp_idle: Duration,
}

impl DnsConfig {
    pub fn new(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> DnsConfig {
        DnsConfig {
            listen,
            upstreams,
            max_in_flight: 256,
            max_tcp: 32,
            upstream_timeout: Duration::from_secs(2),
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// The addresses an allowed answer gave for a name, each with its TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub name: String,
    pub addrs: Vec<(IpAddr, Duration)>,
}

/// What makes an allowed answer's addresses reachable before the inner
/// sees them.
pub trait Admit: Send + Sync + 'static {
    /// Returns once the addresses are let through; an error withholds the
    /// answer (the inner gets SERVFAIL rather than an address it cannot
    /// reach).
    fn admit(&self, admitted: Admitted)
        -> impl std::future::Future<Output = io::Result<()>> + Send;
}

/// Lookups so far, by outcome.
#[derive(Debug, Default)]
pub struct DnsCounts {
    pub answered: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    /// UDP queries dropped because too many were in flight.
    pub dropped: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot listen for DNS over UDP on {addr}")]
    BindUdp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen for DNS over TCP on {addr}")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The running server; dropping it stops it.
pub struct DnsProxy {
    local: SocketAddr,
    counts: Arc<DnsCounts>,
    tasks: Vec<AbortHandle>,
}

impl DnsProxy {
    /// Listens on `config.listen` (UDP and TCP, the same port) and answers
    /// under whatever policy `policy` holds at each query.
    pub async fn start<A: Admit>(
        config: DnsConfig,
        policy: watch::Receiver<Arc<EgressPolicy>>,
        admit: Arc<A>,
    ) -> Result<DnsProxy, DnsError> {
        let udp = UdpSocket::bind(config.listen)
            .await
            .map_err(|source| DnsError::BindUdp {
                addr: config.listen,
                source,
            })?;
        let local = udp.local_addr().map_err(|source| DnsError::BindUdp {
            addr: config.listen,
            source,
        })?;
        // The TCP port is the one UDP got, so port 0 works in tests.
        let tcp = TcpListener::bind(local)
            .await
            .map_err(|source| DnsError::BindTcp {
                addr: local,
                source,
            })?;
        let shared = Arc::new(Shared {
            config,
            policy,
            admit,
            counts: Arc::new(DnsCounts::default()),
        });
        let counts = shared.counts.clone();
        let tasks = vec![
            tokio::spawn(serve_udp(shared.clone(), Arc::new(udp))).abort_handle(),
            tokio::spawn(serve_tcp(shared, tcp)).abort_handle(),
        ];
        Ok(DnsProxy {
            local,
            counts,
            tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn counts(&self) -> &DnsCounts {
        &self.counts
    }

    /// Stops listening; answers in flight are dropped.
    pub fn stop(&self) {
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}

impl Drop for DnsProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Shared<A> {
    config: DnsConfig,
    policy: watch::Receiver<Arc<EgressPolicy>>,
    admit: Arc<A>,
    counts: Arc<DnsCounts>,
}

/// Which way an exchange with the upstream goes.
#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

async fn serve_udp<A: Admit>(shared: Arc<Shared<A>>, socket: Arc<UdpSocket>) {
    let in_flight = Arc::new(Semaphore::new(shared.config.max_in_flight));
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            // An ICMP error from an earlier reply, say: not the socket's end.
            Err(e) => {
                tracing::debug!(error = %e, "DNS: receiving a UDP query failed");
                continue;
            }
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            shared.counts.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let query = buf[..len].to_vec();
        let (shared, socket) = (shared.clone(), socket.clone());
        tokio::spawn(async move {
            if let Some(answer) = answer(&shared, &query, Transport::Udp).await {
                let _ = socket.send_to(&answer, from).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp<A: Admit>(shared: Arc<Shared<A>>, listener: TcpListener) {
    let connections = Arc::new(Semaphore::new(shared.config.max_tcp));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "DNS: accepting a TCP connection failed");
                // Out of fds, say: give the table a moment rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = serve_tcp_connection(&shared, stream).await;
            drop(permit);
        });
    }
}

async fn serve_tcp_connection<A: Admit>(
    shared: &Shared<A>,
    mut stream: TcpStream,
) -> io::Result<()> {
    loop {
        let idle = shared.config.tcp_idle;
        let Ok(query) = tokio::time::timeout(idle, read_framed(&mut stream)).await else {
            return Ok(());
        };
        let Some(query) = query? else {
            return Ok(());
        };
        if let Some(answer) = answer(shared, &query, Transport::Tcp).await {
            write_framed(&mut stream, &answer).await?;
        }
    }
}

/// One message of a TCP stream, `None` at a clean end.
async fn read_framed(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| io::Error::other("DNS message too long"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// The answer to one query's bytes, or `None` for bytes that are no query
/// at all (answering garbage would make this a reflector).
async fn answer<A: Admit>(
    shared: &Shared<A>,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let reply = |code: ResponseCode| {
        let mut m = Message::error_msg(request.metadata.id, request.metadata.op_code, code);
        m.metadata.recursion_desired = request.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.queries = request.queries.clone();
        m.to_vec().ok()
    };
    // One question is what every resolver sends; several would each need
    // the policy's word, and no server answers them.
    let [question] = request.queries.as_slice() else {
        return reply(ResponseCode::FormErr);
    };
    let name = question.name.to_ascii();
    let name = name.strip_suffix('.').unwrap_or(&name).to_ascii_lowercase();
    let policy = shared.policy.borrow().clone();
    let verdict = policy.decide_name(&name);
    if verdict.action == EgressAction::Deny {
        shared.counts.refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%name, because = %verdict.because, "egress policy refused a DNS lookup");
        return reply(ResponseCode::Refused);
    }
    let Some(raw) = ask_upstreams(&shared.config, query, request.metadata.id, transport).await
    else {
        shared.counts.failed.fetch_add(1, Ordering::Relaxed);
        return reply(ResponseCode::ServFail);
    };
    if !policy.is_unrestricted() {
        let Ok(response) = Message::from_vec(&raw) else {
            shared.counts.failed.fetch_add(1, Ordering::Relaxed);
            return reply(ResponseCode::ServFail);
        };
        let addrs = addresses(&response);
        if !addrs.is_empty() {
            let admitted = Admitted {
                name: name.clone(),
                addrs,
            };
            if let Err(e) = shared.admit.admit(admitted).await {
                tracing::warn!(%name, error = %e, "cannot let an allowed answer's addresses through; answering SERVFAIL");
                shared.counts.failed.fetch_add(1, Ordering::Relaxed);
                return reply(ResponseCode::ServFail);
            }
        }
    }
    shared.counts.answered.fetch_add(1, Ordering::Relaxed);
    Some(raw)
}

/// The A and AAAA records of an answer, with their TTLs. A CNAME chain's
/// addresses count for the name asked: the name was allowed, and where it
/// points is the answer to it.
fn addresses(response: &Message) -> Vec<(IpAddr, Duration)> {
    response
        .answers
        .iter()
        .filter_map(|record| {
            let ip = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                _ => return None,
            };
            Some((ip, Duration::from_secs(u64::from(record.ttl))))
        })
        .collect()
}

/// The first upstream's answer to `query` whose id matches, as bytes.
async fn ask_upstreams(
    config: &DnsConfig,
    query: &[u8],
    id: u16,
    transport: Transport,
) -> Option<Vec<u8>> {
    for upstream in &config.upstreams {
        let exchange = async {
            match transport {
                Transport::Udp => ask_udp(*upstream, query, id).await,
                Transport::Tcp => ask_tcp(*upstream, query).await,
            }
        };
        match tokio::time::timeout(config.upstream_timeout, exchange).await {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "DNS upstream failed"),
            Err(_) => tracing::debug!(%upstream, "DNS upstream did not answer in time"),
        }
    }
    None
}

async fn ask_udp(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // A socket per query: a fresh random port, and connect() makes the
    // kernel drop datagrams from anyone but the upstream.
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let len = socket.recv(&mut buf).await?;
        // Only the answer to this query: a stray or forged one is skipped.
        if len >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

async fn ask_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream)
        .await?
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
}
