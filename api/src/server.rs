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
}

/// The running API: its address, and its accept loop, stopped on drop.
pub struct Api {
    local_addr: Option<SocketAddr>,
    accept: Option<JoinHandle<()>>,
}

impl Api {
    /// Binds the configured address (no address: an API that serves
    /// nothing) and serves it until dropped.
    pub async fn start(
        settings: ApiSettings,
        connector: Arc<dyn Connector>,
        tokens: TokenStore,
    ) -> Result<Api, StartError> {
        let Some(addr) = settings.listen else {
            return Ok(Api {
                local_addr: None,
                accept: None,
            });
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(StartError::LocalAddr)?;
        let state = Arc::new(State {
            settings,
            connector,
            tokens,
        });
        let accept = tokio::spawn(accept_loop(listener, state));
        Ok(Api {
            local_addr: Some(local_addr),
            accept: Some(accept),
        })
    }

    /// Where the API listens (the port the kernel chose for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(accept) = &self.accept {
            accept.abort();
        }
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

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let slots = Arc::new(Semaphore::new(state.settings.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP API accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Exec frames are small and answer one another (an exit frame,
        // then the control connection's op.complete): Nagle's algorithm
        // would hold the second for the peer's delayed ACK, some 40 ms.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY on an API connection");
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "HTTP API connection refused: at its connection cap");
            drop(stream);
            continue;
        };
        let state = state.clone();
        let slot = ConnectionSlot {
            _permit: Arc::new(slot),
        };
        tokio::spawn(async move {
            let held = slot.clone();
            let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let state = state.clone();
                req.extensions_mut().insert(held.clone());
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
            drop(slot);
        });
    }
}
