//! hulld's HTTP API: the Sprites v1 API for the one sandbox a hulld serves,
//! so the Sprites SDKs drive hull by pointing their base URL at it.
//!
//! The API owns no sandbox state. Each request becomes messages of hulld's
//! own control protocol over an in-process connection that a [`Connector`]
//! opens, so the API and the unix socket answer from the same code, with
//! the same errors.

mod body;
mod checkpoints;
mod control;
mod error;
mod exec;
mod files;
mod ndjson;
mod openapi;
mod policy;
mod proxy;
mod response;
mod router;
mod server;
mod services;
mod sessions;
mod slots;
mod sprites;
pub mod tls;
pub mod tokens;
mod tunnel;
mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

pub use error::ApiError;
pub use hull_proto::TokenScope;
pub use server::{Api, BoundApi, StartError};
pub use tokens::{Grant, HostToken, TokenError, TokenStore};

/// Opens connections to hulld's control protocol.
pub trait Connector: Send + Sync + 'static {
    /// A byte stream to hulld's control protocol, served with what a token
    /// of `scope` may ask; the sessions it starts say `started_by` started
    /// them (the token's [`Grant::label`]).
    fn open_as(
        &self,
        scope: TokenScope,
        started_by: &str,
    ) -> std::io::Result<tokio::io::DuplexStream>;

    /// [`Connector::open_as`] for the token of the request being served:
    /// every request that presented one is served with a connector that
    /// knows it ([`State::for_token`]).
    fn open(&self, scope: TokenScope) -> std::io::Result<tokio::io::DuplexStream> {
        self.open_as(scope, "api")
    }

    /// A client on a new connection, the hello done, for a route that has
    /// checked its own scope.
    fn connect(
        &self,
    ) -> Pin<Box<dyn Future<Output = hull_client::Result<hull_client::Client>> + Send>> {
        self.connect_as(TokenScope::Admin)
    }

    /// A client on a new connection served with what a token of `scope`
    /// may ask and see (a read token gets services without their secrets).
    fn connect_as(
        &self,
        scope: TokenScope,
    ) -> Pin<Box<dyn Future<Output = hull_client::Result<hull_client::Client>> + Send>> {
        let stream = self.open(scope);
        Box::pin(async move { hull_client::Client::over(stream?).await })
    }

    /// A TCP connection to `target` made inside the inner's network
    /// namespace, for the port proxy.
    fn dial(
        &self,
        target: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>>;

    /// A process that copies its stdin into `file`, in the inner's
    /// cgroup, so an upload's page cache is charged to the inner. `None`:
    /// hulld writes the upload itself.
    fn charged_writer(&self, file: &std::fs::File) -> Option<std::process::Child> {
        let _ = file;
        None
    }

    /// The running inner's root directory, for the files API.
    fn inner_root(&self)
        -> Pin<Box<dyn Future<Output = Result<InnerRoot, InnerRootError>> + Send>>;
}

/// The running inner's `/`, as an `O_PATH` directory fd that every path
/// of the files API is resolved under, and who owns what it creates.
pub struct InnerRoot {
    pub dir: std::os::fd::OwnedFd,
    /// The host ids of the inner's root user, given to new files and
    /// directories, so they belong to root as the inner sees it.
    pub owner: Owner,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum InnerRootError {
    #[error("the sandbox is not running")]
    NotRunning,
    #[error("cannot open the inner's root directory {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The header every response carries: the version of the Sprites API
/// these routes follow.
pub const SPRITE_VERSION: &str = "v1";

/// What the API serves and where, resolved from hulld's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// The TCP address to listen on; `None`: no network API.
    pub listen: Option<SocketAddr>,
    /// The sandbox's name in `/v1/sprites/{name}`.
    pub sandbox_name: String,
    /// HTTP connections served at once, WebSockets included; past it the
    /// oldest connection that presented no token is shed, or the new one
    /// refused.
    pub max_connections: usize,
    /// ... of them from one address (one vsock context).
    pub max_connections_per_source: usize,
    /// How long a new connection has to present a valid token (its TLS
    /// handshake included) before it is closed.
    pub anonymous_header_timeout: std::time::Duration,
    /// Also serve on this vsock port (in a VM with vsock): clients
    /// outside the VM reach the API without a network.
    pub vsock_port: Option<u32>,
    /// Serve HTTPS with this certificate; plain HTTP when `None`.
    pub tls: Option<tls::TlsFiles>,
    /// The host's admin token, installed at start (a hull VM's).
    pub host_token: Option<tokens::HostToken>,
}

pub(crate) type Shared = Arc<State>;

/// What every request handler reads.
pub(crate) struct State {
    pub settings: ApiSettings,
    pub connector: Arc<dyn Connector>,
    pub tokens: tokens::TokenStore,
}

impl State {
    /// This state for a request whose token is `grant`: each connection
    /// its handler opens to hulld carries the token's label, so the
    /// sessions it starts say who started them, whichever handler (exec,
    /// control, the tunnel) started them.
    pub(crate) fn for_token(&self, grant: &Grant) -> Shared {
        Arc::new(State {
            settings: self.settings.clone(),
            connector: Arc::new(TokenConnector {
                inner: self.connector.clone(),
                started_by: grant.label().into(),
            }),
            tokens: self.tokens.clone(),
        })
    }
}

/// A [`Connector`] whose connections are opened as one token's. Every
/// method forwards to the connector it wraps.
struct TokenConnector {
    inner: Arc<dyn Connector>,
    started_by: Box<str>,
}

impl Connector for TokenConnector {
    fn open_as(
        &self,
        scope: TokenScope,
        started_by: &str,
    ) -> std::io::Result<tokio::io::DuplexStream> {
        self.inner.open_as(scope, started_by)
    }

    fn open(&self, scope: TokenScope) -> std::io::Result<tokio::io::DuplexStream> {
        self.inner.open_as(scope, &self.started_by)
    }

    fn dial(
        &self,
        target: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>> {
        self.inner.dial(target)
    }

    fn charged_writer(&self, file: &std::fs::File) -> Option<std::process::Child> {
        self.inner.charged_writer(file)
    }

    fn inner_root(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<InnerRoot, InnerRootError>> + Send>> {
        self.inner.inner_root()
    }
}
