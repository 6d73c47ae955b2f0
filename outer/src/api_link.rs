//! The HTTP API's way into hulld: an in-process connection served by the
//! same code as the control socket, so a request over HTTP gets exactly
//! the answer the CLI would.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use hull_client::{Client, ClientError};

use crate::hulld::Hulld;
use crate::server::{serve_connection, Endpoint};

/// Bytes in flight each way on one in-process connection.
const PIPE_BYTES: usize = 256 * 1024;

pub struct ApiLink {
    /// Weak: the API lives inside hulld and must not keep it alive.
    hulld: Weak<Hulld>,
    endpoint: Arc<Endpoint>,
}

impl ApiLink {
    pub fn new(hulld: &Arc<Hulld>) -> Arc<Self> {
        Arc::new(ApiLink {
            hulld: Arc::downgrade(hulld),
            endpoint: Arc::new(Endpoint::api()),
        })
    }
}

impl hull_api::Connector for ApiLink {
    fn connect(&self) -> Pin<Box<dyn Future<Output = hull_client::Result<Client>> + Send>> {
        let hulld = self.hulld.upgrade();
        let endpoint = self.endpoint.clone();
        Box::pin(async move {
            let hulld = hulld.ok_or(ClientError::Closed)?;
            let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
            tokio::spawn(async move { serve_connection(hulld, theirs, &endpoint).await });
            Client::over(ours).await
        })
    }
}
