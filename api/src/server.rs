//! The listener: one task per HTTP connection, each holding a place under
//! the caps ([`crate::slots`]) for as long as it lives, a WebSocket it
//! becomes included. A connection has `api.anonymous_header_timeout_ms`
//! (2 s) from its accept to present a valid token, its TLS handshake
//! included; one that has not is closed (after the answer to a request in
//! progress), and anonymous connections are the ones shed when a cap is
//! full. One that has presented a token gets [`HEADER_READ_TIMEOUT`] for
//! each later request's headers, waiting between requests included.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hull_network::budget::Throttle;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::slots::{ConnectionSlot, Full, Slots};
use crate::{ApiSettings, Connector, State, TokenStore};

/// How long a client that has presented a token may take to send a
/// request's headers (and may keep a connection idle between requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head read (request line and headers).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Connections the kernel completes and queues before hulld accepts them.
/// The standard library's 128 is too few under a flood of reconnecting
/// clients: a SYN past a full queue is dropped, and a client with a token
/// waits a second for its retry.
const LISTEN_BACKLOG: u32 = 1024;

/// After an accept error (out of fds), wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen for the HTTP API on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the address the HTTP API listens on")]
    LocalAddr(#[source] io::Error),
    #[error("cannot listen for the HTTP API on vsock port {port}")]
    Vsock {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// The running API: its address, and its accept loop, stopped on drop.
pub struct Api {
    local_addr: Option<SocketAddr>,
    accept: Vec<JoinHandle<()>>,
}

impl Api {
    /// Binds the configured address (no address: an API that serves
    /// nothing) and serves it until dropped.
    pub async fn start(
        settings: ApiSettings,
        connector: Arc<dyn Connector>,
        tokens: TokenStore,
    ) -> Result<Api, StartError> {
        Api::bind(settings).await?.serve(connector, tokens)
    }

    /// Binds the configured address without serving it yet: hulld binds
    /// its own ports before the inner starts, so the inner's listeners
    /// never get them forwarded first.
    pub async fn bind(settings: ApiSettings) -> Result<BoundApi, StartError> {
        let Some(addr) = settings.listen else {
            return Ok(BoundApi {
                settings,
                listener: None,
                tls: None,
            });
        };
        let tls = settings
            .tls
            .as_ref()
            .map(crate::tls::acceptor)
            .transpose()?;
        let listener = bind(addr).map_err(|source| StartError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(StartError::LocalAddr)?;
        Ok(BoundApi {
            settings,
            listener: Some((listener, local_addr)),
            tls,
        })
    }

    /// Where the API listens (the port the kernel chose for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        for accept in &self.accept {
            accept.abort();
        }
    }
}

/// The API's listener, bound and not yet served.
pub struct BoundApi {
    settings: ApiSettings,
    listener: Option<(TcpListener, SocketAddr)>,
    tls: Option<TlsAcceptor>,
}

impl BoundApi {
    /// Where the API listens (the port the kernel chose for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().map(|(_, addr)| *addr)
    }

    /// Serves the bound listener (and the vsock port, when set) until the
    /// [`Api`] is dropped.
    pub fn serve(
        self,
        connector: Arc<dyn Connector>,
        tokens: TokenStore,
    ) -> Result<Api, StartError> {
        let BoundApi {
            settings,
            listener,
            tls,
        } = self;
        let Some((listener, local_addr)) = listener else {
            return Ok(Api {
                local_addr: None,
                accept: Vec::new(),
            });
        };
        let state = Arc::new(State {
            settings,
            connector,
            tokens,
            grant: None,
        });
        // TCP and vsock share the caps: they bound hulld, not a listener.
        let slots = Slots::new(
            state.settings.max_connections,
            state.settings.max_connections_per_source,
        );
        let mut accept = vec![tokio::spawn(accept_loop(
            listener,
            tls.clone(),
            slots.clone(),
            state.clone(),
        ))];
        if let Some(port) = state.settings.vsock_port {
            let vsock = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                tokio_vsock::VMADDR_CID_ANY,
                port,
            ))
            .map_err(|source| StartError::Vsock { port, source })?;
            accept.push(tokio::spawn(accept_loop(vsock, tls, slots, state)));
        }
        Ok(Api {
            local_addr: Some(local_addr),
            accept,
        })
    }
}

/// A TCP listener on `addr` with a backlog of [`LISTEN_BACKLOG`].
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Who a connection comes from: the address its per-source share is
/// counted by, and how the log shows it.
struct Peer {
    source: IpAddr,
    shown: String,
}

/// A listener the API accepts on: TCP, or vsock in a VM.
trait Listener: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static;
    /// A connection and its peer.
    fn accept_one(
        &mut self,
    ) -> impl std::future::Future<Output = io::Result<(Self::Stream, Peer)>> + Send;

    /// Tells a connection turned away why, if that can be done without
    /// waiting (`answer` is a whole HTTP response), then closes it.
    fn refuse(stream: Self::Stream, answer: &[u8]) {
        let _ = (stream, answer);
    }
}

/// Unsent bytes an API connection's socket takes before a write waits.
const NOTSENT_LOWAT: u32 = 128 * 1024;

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&mut self) -> io::Result<(Self::Stream, Peer)> {
        let (stream, peer) = self.accept().await?;
        // Exec frames are small and answer one another (an exit frame,
        // then the control connection's op.complete): Nagle's algorithm
        // would hold the second for the peer's delayed ACK, some 40 ms.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY on an API connection");
        }
        // Bytes the kernel holds unsent for a client that does not read:
        // without a low mark the send buffer autotunes to megabytes per
        // connection (hulld's memory, though not its RSS), and an exec
        // keeps producing output into it.
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NOTSENT_LOWAT on an API connection");
        }
        let source = hull_network::peer::canonical_ip(peer.ip());
        Ok((
            stream,
            Peer {
                source,
                shown: peer.to_string(),
            },
        ))
    }

    fn refuse(stream: Self::Stream, answer: &[u8]) {
        // What the client sent already is read first: a socket closed
        // with unread bytes is reset, and the answer may be lost with it.
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            match stream.try_read(&mut sink) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        // A new connection's send buffer is empty: the answer fits whole.
        let _ = stream.try_write(answer);
    }
}

impl Listener for tokio_vsock::VsockListener {
    type Stream = tokio_vsock::VsockStream;
    async fn accept_one(&mut self) -> io::Result<(Self::Stream, Peer)> {
        let (stream, peer) = self.accept().await?;
        // A vsock peer's share is counted by its context id, in an IPv6
        // address of its own (::CID) that no TCP peer of the API has.
        Ok((
            stream,
            Peer {
                source: IpAddr::V6(Ipv6Addr::from(u128::from(peer.cid()))),
                shown: format!("vsock:{}:{}", peer.cid(), peer.port()),
            },
        ))
    }
}

/// The response a connection turned away at accept gets.
fn refusal(full: Full) -> Vec<u8> {
    let (code, message) = full.explain();
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         sprite-version: {}\r\nretry-after: 1\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        crate::SPRITE_VERSION,
        body.len()
    )
    .into_bytes()
}

async fn accept_loop<L: Listener>(
    mut listener: L,
    tls: Option<TlsAcceptor>,
    slots: Arc<Slots>,
    state: Arc<State>,
) {
    // Under a flood each kind of trouble is logged once per 10 s.
    let (failed, refused) = (Throttle::default(), Throttle::default());
    loop {
        let (stream, peer) = match listener.accept_one().await {
            Ok(accepted) => accepted,
            Err(e) => {
                if let Some(suppressed) = failed.hit() {
                    tracing::warn!(error = %e, suppressed, "HTTP API accept failed; backing off");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let slot = match slots.admit(peer.source) {
            Ok(slot) => slot,
            Err(full) => {
                if let Some(suppressed) = refused.hit() {
                    let (_, why) = full.explain();
                    tracing::warn!(peer = %peer.shown, suppressed, "HTTP API connection refused: {why}");
                }
                // A TLS client would read plain HTTP as garbage: it only
                // sees the connection close.
                if tls.is_none() {
                    L::refuse(stream, &refusal(full));
                }
                continue;
            }
        };
        let (state, tls) = (state.clone(), tls.clone());
        tokio::spawn(async move {
            // From the accept: the TLS handshake and the first headers
            // with a valid token must both come within it.
            let deadline = Instant::now() + state.settings.anonymous_header_timeout;
            match tls {
                None => serve(stream, peer.shown, state, slot, deadline).await,
                Some(tls) => {
                    let handshake = tokio::select! {
                        handshake = tokio::time::timeout_at(deadline, tls.accept(stream)) => handshake,
                        () = slot.shed() => return,
                    };
                    match handshake {
                        Ok(Ok(stream)) => serve(stream, peer.shown, state, slot, deadline).await,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer.shown, error = %e, "HTTP API TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer.shown, "HTTP API TLS handshake timed out")
                        }
                    }
                }
            }
        });
        // The new connection's first read comes before the next accept:
        // under a flood, a client that sent its token at once is answering
        // a request (and not shed) before the flood's next connections are.
        tokio::task::yield_now().await;
    }
}

/// Serves HTTP/1.1 on one connection until it closes, it is shed, or it
/// is still anonymous at `deadline`. Each request carries the
/// connection's slot, which a WebSocket it upgrades to keeps.
async fn serve<S>(
    stream: S,
    peer: String,
    state: Arc<State>,
    slot: ConnectionSlot,
    deadline: Instant,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let anonymous_timeout = state.settings.anonymous_header_timeout;
    let on_requests = slot.clone();
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let state = state.clone();
        let slot = on_requests.clone();
        let request = slot.begin_request();
        req.extensions_mut().insert(slot);
        async move {
            let Some(_request) = request else {
                let shed = crate::error::ApiError::new(
                    hyper::StatusCode::SERVICE_UNAVAILABLE,
                    "shed",
                    "this connection had presented no token and was closed to make room for a newer one",
                );
                return Ok::<_, std::convert::Infallible>(shed.into_response());
            };
            Ok(crate::router::handle(state, req).await)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let deadline = tokio::time::sleep_until(deadline);
    tokio::pin!(deadline);
    // At the deadline an anonymous connection answering a request gets
    // that answer, and as long again to finish it.
    let mut finishing = false;
    let mut armed = true;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "HTTP API connection ended with an error");
                }
                return;
            }
            () = slot.shed() => {
                tracing::debug!(%peer, "HTTP API connection shed: it had presented no token");
                return;
            }
            () = deadline.as_mut(), if armed => {
                if slot.is_authenticated() {
                    armed = false;
                } else if slot.is_busy() && !finishing {
                    finishing = true;
                    conn.as_mut().graceful_shutdown();
                    deadline.as_mut().reset(Instant::now() + anonymous_timeout);
                } else {
                    tracing::debug!(
                        %peer,
                        "HTTP API connection closed: no request with a valid token within {anonymous_timeout:?} (api.anonymous_header_timeout_ms)"
                    );
                    return;
                }
            }
        }
    }
}
