//! A WebSocket client for the API's exec routes, for the tests and the
//! bench: the handshake with a bearer token, and the frames of a non-TTY
//! exec read to its exit.

use std::net::SocketAddr;

use futures::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// Opens `ws://addr{path_and_query}` with `token`; a refused handshake is
/// `Error::Http` with the API's response.
pub async fn connect(addr: SocketAddr, path_and_query: &str, token: &str) -> Result<Ws, Error> {
    let mut req = format!("ws://{addr}{path_and_query}").into_client_request()?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|e| Error::HttpFormat(http_error(e)))?;
    req.headers_mut().insert("authorization", bearer);
    let stream = TcpStream::connect(addr).await?;
    // As the SDKs' clients do (Python's asyncio sets it on every socket).
    stream.set_nodelay(true)?;
    tokio_tungstenite::client_async(req, stream)
        .await
        .map(|(ws, _)| ws)
}

fn http_error(
    e: tokio_tungstenite::tungstenite::http::header::InvalidHeaderValue,
) -> tokio_tungstenite::tungstenite::http::Error {
    e.into()
}

/// The frames of a non-TTY exec until its exit frame: stdout and the exit
/// code; `None` when the socket closed first.
pub async fn collect(ws: &mut Ws) -> Option<(Vec<u8>, u8)> {
    let mut stdout = Vec::new();
    while let Some(Ok(frame)) = ws.next().await {
        if let Message::Binary(data) = frame {
            match data.first() {
                Some(1) => stdout.extend_from_slice(&data[1..]),
                Some(3) => return Some((stdout, data.get(1).copied().unwrap_or(0))),
                _ => {}
            }
        }
    }
    None
}
