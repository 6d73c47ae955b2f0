//! hulld's [`hull_api::Connector`]: how the HTTP API, which runs inside
//! hulld, reaches it. A connection to hulld's control protocol is an
//! in-process pipe served by the same code as the control socket, so a
//! request over HTTP gets exactly the answer the CLI would; a port the
//! API proxies is dialled in the inner's network namespace.

use std::io;
use std::sync::{Arc, Weak};

use std::future::Future;
use std::pin::Pin;

use hull_proto::TokenScope;
use tokio::io::DuplexStream;

use crate::hulld::Hulld;
use crate::server::{serve_connection, Endpoint};

/// Bytes in flight each way on one in-process connection: one output
/// message (hulld reads a process's output 16 KiB at a time), as an exec
/// whose client does not read holds them all.
const PIPE_BYTES: usize = 16 * 1024;

pub struct InProcessConnector {
    /// Weak: the API lives inside hulld and must not keep it alive.
    hulld: Weak<Hulld>,
}

impl InProcessConnector {
    pub fn new(hulld: &Arc<Hulld>) -> Arc<Self> {
        Arc::new(InProcessConnector {
            hulld: Arc::downgrade(hulld),
        })
    }
}

impl hull_api::Connector for InProcessConnector {
    fn open_as(&self, scope: TokenScope, started_by: &str) -> io::Result<DuplexStream> {
        let hulld = self
            .hulld
            .upgrade()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "hulld is stopping"))?;
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let endpoint = Endpoint::api(scope, started_by);
        tokio::spawn(async move { serve_connection(hulld, theirs, &endpoint).await });
        Ok(ours)
    }

    fn dial(
        &self,
        target: std::net::SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<tokio::net::TcpStream>> + Send>> {
        let hulld = self.hulld.upgrade();
        Box::pin(async move {
            let hulld = hulld
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "hulld is stopping"))?;
            hulld.dial_inner(target).await
        })
    }
}
