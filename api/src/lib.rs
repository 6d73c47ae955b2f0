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
    /// them (the token's [`Grant::label`]). Handlers never call it with a
    /// scope of their choosing: they reach hulld through `State::open`,
    /// with the scope of the token that made the request.
    fn open_as(
        &self,
        scope: TokenScope,
        started_by: &str,
    ) -> std::io::Result<tokio::io::DuplexStream>;

    /// A TCP connection to `target` made inside the inner's network
    /// namespace, for the port proxy.
    fn dial(
        &self,
        target: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>>;
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
    /// The token of the request being served; `None` for the routes served
    /// without one, which never reach hulld.
    pub grant: Option<Grant>,
}

impl State {
    /// This state for a request whose token is `grant`.
    pub(crate) fn for_token(&self, grant: &Grant) -> Shared {
        Arc::new(State {
            settings: self.settings.clone(),
            connector: self.connector.clone(),
            tokens: self.tokens.clone(),
            grant: Some(grant.clone()),
        })
    }

    /// The scope of the request's token.
    pub(crate) fn granted(&self) -> Option<TokenScope> {
        self.grant.as_ref().map(|g| g.scope)
    }

    /// A byte stream to hulld served with exactly what the request's
    /// token may ask, whichever handler opens it: hulld checks every
    /// request on it against the one scope table, so a handler that
    /// asked for more than its route allows is refused there. Its
    /// sessions say which token started them.
    pub(crate) fn open(&self) -> Result<tokio::io::DuplexStream, ApiError> {
        let grant = self.grant.as_ref().ok_or_else(|| {
            ApiError::internal("a route served without a token cannot reach hulld")
        })?;
        self.connector
            .open_as(grant.scope, grant.label())
            .map_err(|e| ApiError::daemon(hull_client::ClientError::Io(e)))
    }

    /// A client over [`State::open`], the hello done.
    pub(crate) async fn connect(&self) -> Result<hull_client::Client, ApiError> {
        hull_client::Client::over(self.open()?)
            .await
            .map_err(ApiError::daemon)
    }
}
