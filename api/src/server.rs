//! The listener: one task per HTTP connection, up to a cap, each with a
//! deadline for its request headers, so a client that sends half a request
//! and waits holds one slot for a bounded time and nothing more.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::{ApiSettings, Connector, State, TokenStore};

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head read (request line and headers).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

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
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
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
        });
        // TCP and vsock share one cap: it bounds hulld, not a listener.
        let slots = Arc::new(Semaphore::new(state.settings.max_connections));
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

/// A connection's place under the cap. A WebSocket keeps it after its
/// HTTP connection is handed over, so upgraded connections count too.
#[derive(Clone)]
pub(crate) struct ConnectionSlot {
    _permit: Arc<OwnedSemaphorePermit>,
}

impl ConnectionSlot {
    /// The slot of the connection `req` came on.
    pub fn of<B>(req: &hyper::Request<B>) -> Option<ConnectionSlot> {
        req.extensions().get::<ConnectionSlot>().cloned()
    }
}

/// A listener the API accepts on: TCP, or vsock in a VM.
trait Listener: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static;
    /// A connection and its peer's address, for the log.
    fn accept_one(
        &mut self,
    ) -> impl std::future::Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

/// Unsent bytes an API connection's socket takes before a write waits.
const NOTSENT_LOWAT: u32 = 128 * 1024;

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&mut self) -> io::Result<(Self::Stream, String)> {
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
        Ok((stream, peer.to_string()))
    }
}

impl Listener for tokio_vsock::VsockListener {
    type Stream = tokio_vsock::VsockStream;
    async fn accept_one(&mut self) -> io::Result<(Self::Stream, String)> {
        self.accept()
            .await
            .map(|(stream, peer)| (stream, format!("vsock:{}:{}", peer.cid(), peer.port())))
    }
}

async fn accept_loop<L: Listener>(
    mut listener: L,
    tls: Option<TlsAcceptor>,
    slots: Arc<Semaphore>,
    state: Arc<State>,
) {
    loop {
        let (stream, peer) = match listener.accept_one().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP API accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "HTTP API connection refused: at its connection cap");
            drop(stream);
            continue;
        };
        let slot = ConnectionSlot {
            _permit: Arc::new(slot),
        };
        let (state, tls) = (state.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve(stream, peer, state, slot).await,
                // The handshake has the headers' deadline: a client that
                // opens a connection and says nothing holds a slot no longer.
                Some(tls) => {
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => serve(stream, peer, state, slot).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "HTTP API TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "HTTP API TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Serves HTTP/1.1 on one connection until it closes. Each request carries
/// the connection's slot, which a WebSocket it upgrades to keeps.
async fn serve<S>(stream: S, peer: String, state: Arc<State>, slot: ConnectionSlot)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let state = state.clone();
        req.extensions_mut().insert(slot.clone());
        async move { Ok::<_, std::convert::Infallible>(crate::router::handle(state, req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "HTTP API connection ended with an error");
    }
}
