//! The HTTP API's way into hulld: an in-process connection served by the
//! same code as the control socket, so a request over HTTP gets exactly
//! the answer the CLI would.

use std::io;
use std::sync::{Arc, Weak};

use hull_proto::TokenScope;
use tokio::io::DuplexStream;

use crate::hulld::Hulld;
use crate::server::{serve_connection, Endpoint};

/// Bytes in flight each way on one in-process connection.
const PIPE_BYTES: usize = 256 * 1024;

pub struct ApiLink {
    /// Weak: the API lives inside hulld and must not keep it alive.
    hulld: Weak<Hulld>,
}

impl ApiLink {
    pub fn new(hulld: &Arc<Hulld>) -> Arc<Self> {
        Arc::new(ApiLink {
            hulld: Arc::downgrade(hulld),
        })
    }
}

impl hull_api::Connector for ApiLink {
    fn open(&self, scope: TokenScope) -> io::Result<DuplexStream> {
        let hulld = self
            .hulld
            .upgrade()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "hulld is stopping"))?;
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        tokio::spawn(async move { serve_connection(hulld, theirs, &Endpoint::api(scope)).await });
        Ok(ours)
    }
}
