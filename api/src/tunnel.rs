//! `/v1/sprites/{name}/hull`, a hull extension: hulld's own control
//! protocol carried in binary WebSocket messages, for `hull --url`. Every
//! CLI command then behaves over the network exactly as on the unix socket
//! (the same requests, answers, exit codes, terminals), while hulld still
//! checks each request against the scope of the token the tunnel was
//! opened with.

use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::error::ApiError;
use crate::response::Body;
use crate::ws;
use crate::Shared;

pub async fn serve(state: &Shared, mut req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let handshake = ws::handshake(&mut req)?;
    let hulld = state.open()?;
    // The WebSocket keeps the connection's place under api.max_connections
    // for as long as the tunnel is open (ws::accept).
    tokio::spawn(async move {
        if let Some(ws) = ws::accept(handshake.upgrade).await {
            hull_client::remote::relay(ws, hulld).await;
        }
    });
    Ok(handshake.response)
}
