//! Attacks through exec sessions over the HTTP API, with an exec token:
//! terminal sessions that fill their scrollback and are left detached,
//! and exec WebSockets whose client never reads what `yes` prints.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error, Message};

use crate::ws::{connect, Ws};

/// An exec the API refused: its HTTP status and the error's message.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

/// What [`detached_terminal_sessions`] did.
#[derive(Debug, Default)]
pub struct DetachedSessions {
    /// Sessions that started, printed their bytes and were left.
    pub started: usize,
    pub refused: Vec<Refusal>,
}

/// How many sessions are being started at once.
const AT_ONCE: usize = 4;

/// The longest one session may take to print its bytes.
const PRINT_WAIT: Duration = Duration::from_secs(30);

/// Starts `n` terminal sessions (`tty=true`) that each print `bytes` bytes
/// and then sleep, reads each one's output until all of it came, and
/// closes its WebSocket, which leaves the session detached with its
/// scrollback full.
pub async fn detached_terminal_sessions(
    addr: SocketAddr,
    token: &str,
    sprite: &str,
    n: usize,
    bytes: usize,
) -> DetachedSessions {
    let script =
        format!("yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {bytes}; exec sleep 3600");
    let query: String = form_urlencoded_pairs(&[
        ("cmd", "sh"),
        ("cmd", "-c"),
        ("cmd", &script),
        ("tty", "true"),
    ]);
    let path = format!("/v1/sprites/{sprite}/exec?{query}");
    let outcomes: Vec<Result<(), Refusal>> = futures::stream::iter(0..n)
        .map(|_| print_and_leave(addr, token, &path, bytes))
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    let mut report = DetachedSessions::default();
    for outcome in outcomes {
        match outcome {
            Ok(()) => report.started += 1,
            Err(refusal) => report.refused.push(refusal),
        }
    }
    report
}

async fn print_and_leave(
    addr: SocketAddr,
    token: &str,
    path: &str,
    bytes: usize,
) -> Result<(), Refusal> {
    let mut ws = match connect(addr, path, token).await {
        Ok(ws) => ws,
        Err(Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(Refusal {
                status: response.status().as_u16(),
                message,
            });
        }
        Err(e) => panic!("exec WebSocket {path}: {e}"),
    };
    let mut seen = 0;
    let read = tokio::time::timeout(PRINT_WAIT, async {
        while seen < bytes {
            match ws.try_next().await {
                Ok(Some(Message::Binary(data))) => seen += data.len(),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    })
    .await;
    assert!(
        read.is_ok() && seen >= bytes,
        "a terminal session printed {seen} of its {bytes} bytes"
    );
    // Leaving: hulld keeps a terminal's session, detached.
    drop(ws);
    Ok(())
}

/// `key=value&...`, each value percent-encoded.
fn form_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let v: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        char::from(b).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The receive buffer each never-reading client asks for.
pub const TINY_RCVBUF: u32 = 4096;

/// Opens `n` exec WebSockets running `yes` (without a terminal), each from
/// a socket whose receive buffer was set to [`TINY_RCVBUF`] before it
/// connected, and never reads a frame after the handshake. Dropping what
/// it returns closes them.
pub async fn never_reading_execs(
    addr: SocketAddr,
    token: &str,
    sprite: &str,
    n: usize,
) -> Result<Vec<Ws>, Error> {
    let path = format!("/v1/sprites/{sprite}/exec?cmd=yes");
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_recv_buffer_size(TINY_RCVBUF)?;
        let stream = socket.connect(addr).await?;
        let mut req = format!("ws://{addr}{path}").into_client_request()?;
        let bearer = format!("Bearer {token}").parse().map_err(
            |e: tokio_tungstenite::tungstenite::http::header::InvalidHeaderValue| {
                Error::HttpFormat(e.into())
            },
        )?;
        req.headers_mut().insert("authorization", bearer);
        let (ws, _) = tokio_tungstenite::client_async(req, stream).await?;
        held.push(ws);
    }
    Ok(held)
}
