//! WebSocket over hyper's HTTP/1.1 upgrade: the handshake is checked and
//! answered here, and the upgraded connection speaks WebSocket through
//! tungstenite, with bounded frames and a bounded write buffer.

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::error::ApiError;
use crate::router::Body;

pub type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// The largest message a client may send: stdin chunks and control
/// messages are small; anything larger is refused by closing.
const MAX_IN_MESSAGE: usize = 1024 * 1024;

/// Output queued for a client that reads slowly before a write waits for
/// it to read: past this, the exec's output stalls instead of growing.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;

/// What one read from the client takes at most: its input is small, and
/// tungstenite's default (128 KiB) is held by every connection.
const READ_BUFFER: usize = 16 * 1024;

/// The longest close reason a close frame carries (125 bytes of payload
/// less the two of the code).
const MAX_CLOSE_REASON: usize = 123;

/// A WebSocket handshake request, checked: the response that switches
/// protocols, and the connection once the client has it.
pub struct Handshake {
    pub response: Response<Body>,
    pub upgrade: OnUpgrade,
}

/// Checks `req` asks for a WebSocket (RFC 6455 §4.2.1) and prepares the
/// `101 Switching Protocols` answer.
pub fn handshake(req: &mut Request<Incoming>) -> Result<Handshake, ApiError> {
    let headers = req.headers();
    if !is_upgrade(req) {
        return Err(upgrade_required(
            "this route speaks WebSocket: send Connection: Upgrade and Upgrade: websocket",
        ));
    }
    if headers
        .get("sec-websocket-version")
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(upgrade_required(
            "this server speaks WebSocket version 13: send Sec-WebSocket-Version: 13",
        ));
    }
    let accept = headers
        .get(SEC_WEBSOCKET_KEY)
        .map(|key| derive_accept_key(key.as_bytes()))
        .ok_or_else(|| ApiError::bad_request("the WebSocket handshake has no Sec-WebSocket-Key"))?;
    let accept = HeaderValue::from_str(&accept)
        .map_err(|e| ApiError::internal(format!("the WebSocket accept key: {e}")))?;
    let upgrade = hyper::upgrade::on(req);
    let mut response = crate::router::empty_response(StatusCode::SWITCHING_PROTOCOLS);
    let h = response.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(SEC_WEBSOCKET_ACCEPT, accept);
    Ok(Handshake { response, upgrade })
}

/// Whether `req` asks to switch to WebSocket (`Connection: Upgrade` and
/// `Upgrade: websocket`, each possibly among other tokens).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    let has_token = |name, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    has_token(UPGRADE, "websocket") && has_token(CONNECTION, "upgrade")
}

fn upgrade_required(message: &str) -> ApiError {
    ApiError::new(StatusCode::UPGRADE_REQUIRED, "websocket_required", message)
}

/// The WebSocket, once hyper has handed over the connection (after the
/// `101` is written); `None` when the client left first.
pub async fn accept(upgrade: OnUpgrade) -> Option<Ws> {
    match upgrade.await {
        Ok(upgraded) => {
            let config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .write_buffer_size(0)
                .max_message_size(Some(MAX_IN_MESSAGE))
                .max_frame_size(Some(MAX_IN_MESSAGE))
                .max_write_buffer_size(MAX_WRITE_BUFFER);
            Some(
                WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await,
            )
        }
        Err(e) => {
            tracing::debug!(error = %e, "a WebSocket client left before the upgrade");
            None
        }
    }
}

/// Answers the handshake of `req` and runs `session` on the WebSocket once
/// the client has the answer. The connection keeps its slot under the
/// API's cap for as long as `session` runs.
pub fn serve_upgraded<F, Fut>(
    req: &mut Request<Incoming>,
    session: F,
) -> Result<Response<Body>, ApiError>
where
    F: FnOnce(Ws) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let handshake = handshake(req)?;
    let slot = crate::server::ConnectionSlot::of(req);
    tokio::spawn(async move {
        if let Some(socket) = accept(handshake.upgrade).await {
            session(socket).await;
        }
        drop(slot);
    });
    Ok(handshake.response)
}

/// A close frame with `reason` cut to what a close frame holds.
pub fn close(code: CloseCode, reason: &str) -> Message {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason[..end].to_string().into(),
    }))
}
