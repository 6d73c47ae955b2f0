//! WebSocket over hyper's HTTP/1.1 upgrade: the handshake is checked and
//! answered here, and the upgraded connection speaks WebSocket through
//! tungstenite, with bounded frames, a small read buffer and a bounded
//! write buffer. The socket owns its connection's place under the API's
//! caps ([`ConnectionSlot`]): every route that upgrades keeps it for as
//! long as the WebSocket lives, with no code of its own to remember.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::error::ApiError;
use crate::response::Body;
use crate::slots::ConnectionSlot;

pub type Ws = WebSocketStream<SlotIo>;

/// An upgraded connection and its place under the caps, given back when
/// the connection is dropped.
pub struct SlotIo {
    io: TokioIo<Upgraded>,
    _slot: ConnectionSlot,
}

impl AsyncRead for SlotIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for SlotIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The largest message a client may send: stdin chunks and control
/// messages are small; anything larger is refused by closing.
const MAX_IN_MESSAGE: usize = 1024 * 1024;

/// Output queued for a client that reads slowly before a write waits for
/// it to read: past this, the exec's output stalls instead of growing.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;

/// The read buffer each socket starts with (tungstenite's default is
/// 128 KiB, allocated up front: 256 idle sockets would cost 32 MiB). A
/// larger message still grows it, up to [`MAX_IN_MESSAGE`].
const READ_BUFFER: usize = 8 * 1024;

/// The longest close reason a close frame carries (125 bytes of payload
/// less the two of the code).
const MAX_CLOSE_REASON: usize = 123;

/// A WebSocket handshake request, checked: the response that switches
/// protocols, and the connection once the client has it.
pub struct Handshake {
    pub response: Response<Body>,
    pub upgrade: Upgrade,
}

/// The connection a `101` hands over, with its place under the caps.
pub struct Upgrade {
    on: OnUpgrade,
    slot: ConnectionSlot,
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
    // Every connection the server accepts has its slot; a request without
    // one would be a WebSocket outside the caps.
    let slot = ConnectionSlot::of(req).ok_or_else(|| {
        ApiError::internal(
            "a WebSocket request came without its connection's place under api.max_connections",
        )
    })?;
    let upgrade = Upgrade {
        on: hyper::upgrade::on(req),
        slot,
    };
    let mut response = crate::response::empty_response(StatusCode::SWITCHING_PROTOCOLS);
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
/// `101` is written); `None` when the client left first. It holds the
/// connection's slot until it is dropped.
pub async fn accept(upgrade: Upgrade) -> Option<Ws> {
    let Upgrade { on, slot } = upgrade;
    match on.await {
        Ok(upgraded) => {
            let config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .write_buffer_size(0)
                .max_message_size(Some(MAX_IN_MESSAGE))
                .max_frame_size(Some(MAX_IN_MESSAGE))
                .max_write_buffer_size(MAX_WRITE_BUFFER);
            let io = SlotIo {
                io: TokioIo::new(upgraded),
                _slot: slot,
            };
            Some(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
        }
        Err(e) => {
            tracing::debug!(error = %e, "a WebSocket client left before the upgrade");
            None
        }
    }
}

/// Answers the handshake of `req` and runs `session` on the WebSocket once
/// the client has the answer.
pub fn serve_upgraded<F, Fut>(
    req: &mut Request<Incoming>,
    session: F,
) -> Result<Response<Body>, ApiError>
where
    F: FnOnce(Ws) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let handshake = handshake(req)?;
    tokio::spawn(async move {
        if let Some(socket) = accept(handshake.upgrade).await {
            session(socket).await;
        }
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
