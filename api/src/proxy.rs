//! `GET /v1/sprites/{name}/proxy`: a TCP connection into the sandbox over
//! a WebSocket, as the Sprites SDKs' port proxies open it. The client's
//! first message is the text `{"host": "localhost", "port": 8080}`; hulld
//! dials it from inside the inner's network namespace (so it reaches what
//! the inner's own processes reach, its loopback included, and nothing
//! more), answers `{"status": "connected", "target": "127.0.0.1:8080"}`,
//! and from then on binary messages carry the connection's bytes both
//! ways. A refused dial is answered `{"status": "error", "error": "..."}`
//! and a close.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::error::ApiError;
use crate::response::Body;
use crate::{ws, Shared};

/// How long the client has to say where to connect.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read from the target per binary message.
const READ_CHUNK: usize = 64 * 1024;

/// The client's first message.
#[derive(Debug, Deserialize)]
struct ProxyInit {
    #[serde(default)]
    host: String,
    port: u16,
}

/// `GET /v1/sprites/{name}/proxy`.
pub async fn serve(state: &Shared, mut req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let state = state.clone();
    ws::serve_upgraded(
        &mut req,
        move |socket| async move { run(&state, socket).await },
    )
}

async fn run(state: &Shared, socket: ws::Ws) {
    let (mut sink, mut stream) = socket.split();
    let init = match tokio::time::timeout(INIT_TIMEOUT, first_text(&mut stream)).await {
        Ok(Some(text)) => text,
        Ok(None) => return,
        Err(_) => {
            let why = "no {\"host\", \"port\"} message within 10 s";
            refuse(&mut sink, why, Dialect::Plain).await;
            return;
        }
    };
    let target = match parse_target(&init) {
        Ok(target) => target,
        Err(why) => {
            refuse(&mut sink, &why, Dialect::Plain).await;
            return;
        }
    };
    if let Some(target) = connect(state, target, &mut sink, Dialect::Plain).await {
        relay(&mut sink, &mut stream, target, Dialect::Plain).await;
    }
}

/// The first text message; `None` when the client closed or sent
/// something else first.
async fn first_text<St>(stream: &mut St) -> Option<String>
where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    match stream.next().await? {
        Ok(Message::Text(text)) => Some(text.to_string()),
        _ => None,
    }
}

/// Where `{"host", "port"}` points inside the inner: `localhost` and the
/// unspecified address are its loopback; other hosts must be addresses,
/// since a name would be resolved in hulld's namespace, not the inner's.
fn parse_target(text: &str) -> Result<SocketAddr, String> {
    let init: ProxyInit = serde_json::from_str(text).map_err(|e| {
        format!("the first message must be {{\"host\": \"localhost\", \"port\": 8080}}: {e}")
    })?;
    target_of(init)
}

fn target_of(init: ProxyInit) -> Result<SocketAddr, String> {
    if init.port == 0 {
        return Err("port 0 is not a port to connect to".into());
    }
    let ip = match init.host.as_str() {
        "" | "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        host => host.parse::<IpAddr>().map_err(|_| {
            format!("host {host:?} is neither localhost nor an IP address (names are not resolved)")
        })?,
    };
    let ip = if ip.is_unspecified() {
        match ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        ip
    };
    Ok(SocketAddr::new(ip, init.port))
}

/// Dials `target` in the inner and answers the client; `None` when the
/// dial failed (the client was told) or the client is gone.
async fn connect<Si>(
    state: &Shared,
    target: SocketAddr,
    sink: &mut Si,
    dialect: Dialect,
) -> Option<TcpStream>
where
    Si: Sink<Message, Error = WsError> + Unpin,
{
    let stream = match state.connector.dial(target).await {
        Ok(stream) => stream,
        Err(e) => {
            let why = format!("cannot connect to {target} in the sandbox: {e}");
            refuse(sink, &why, dialect).await;
            return None;
        }
    };
    let connected = json!({"status": "connected", "target": target.to_string()});
    sink.send(Message::text(connected.to_string())).await.ok()?;
    Some(stream)
}

/// Says why there is no connection; a proxy's own WebSocket is closed,
/// a control connection stays for the next operation.
async fn refuse<Si>(sink: &mut Si, error: &str, dialect: Dialect)
where
    Si: Sink<Message, Error = WsError> + Unpin,
{
    let answer = json!({"status": "error", "error": error});
    let _ = sink.send(Message::text(answer.to_string())).await;
    if dialect == Dialect::Plain {
        let _ = sink.send(ws::close(CloseCode::Error, error)).await;
    }
}

/// How a proxied connection is framed on its WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The WebSocket is the connection's own: text has no meaning.
    Plain,
    /// A kept control connection: the client's `{"type": "release"}`
    /// ends the proxy and the connection serves operations again.
    Control,
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client released a control connection (or the proxy was
    /// refused on one): it goes on.
    Released,
    /// Either side ended; the WebSocket was closed or is gone.
    Closed,
}

/// Bytes both ways until either side ends: a WebSocket has no half-close,
/// so the end of one direction ends the connection (and a target that
/// closes ends even a control connection, as a proxy client reads the
/// end of its stream only from a close).
async fn relay<Si, St>(
    sink: &mut Si,
    stream: &mut St,
    target: TcpStream,
    dialect: Dialect,
) -> RelayEnd
where
    Si: Sink<Message, Error = WsError> + Unpin,
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let (mut from_target, mut to_target) = target.into_split();
    let inbound = async {
        let mut end = RelayEnd::Closed;
        while let Some(Ok(message)) = stream.next().await {
            match message {
                Message::Binary(data) if to_target.write_all(&data).await.is_err() => break,
                Message::Text(text) if dialect == Dialect::Control && is_release(&text) => {
                    end = RelayEnd::Released;
                    break;
                }
                Message::Close(_) => break,
                // Pings are answered by tungstenite; other text has no
                // meaning here.
                _ => {}
            }
        }
        let _ = to_target.shutdown().await;
        end
    };
    let outbound = async {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match from_target.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = bytes::Bytes::copy_from_slice(&buf[..n]);
                    if sink.send(Message::Binary(chunk)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sink.send(ws::close(CloseCode::Normal, "")).await;
    };
    tokio::select! {
        end = inbound => end,
        _ = outbound => RelayEnd::Closed,
    }
}

fn is_release(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v["type"] == "release")
}

/// The Go SDK's proxy on a control connection: the un-prefixed text
/// `{"type": "start", "operation": "proxy", "params": {"host", "port"}}`,
/// answered as on the proxy route; its `{"type": "release"}` hands the
/// connection back.
pub async fn on_control<Si, St>(
    state: &Shared,
    params: &serde_json::Value,
    sink: &mut Si,
    stream: &mut St,
) -> RelayEnd
where
    Si: Sink<Message, Error = WsError> + Unpin,
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let target = serde_json::from_value::<ProxyInit>(params.clone())
        .map_err(|e| format!("the proxy's params must be {{\"host\", \"port\"}}: {e}"))
        .and_then(target_of);
    let target = match target {
        Ok(target) => target,
        Err(why) => {
            refuse(sink, &why, Dialect::Control).await;
            return RelayEnd::Released;
        }
    };
    match connect(state, target, sink, Dialect::Control).await {
        Some(target) => relay(sink, stream, target, Dialect::Control).await,
        None => RelayEnd::Released,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_inners_loopback_or_addresses() {
        let t = |s: &str| parse_target(s);
        assert_eq!(
            t(r#"{"host":"localhost","port":8080}"#).unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            t(r#"{"host":"0.0.0.0","port":1}"#).unwrap(),
            "127.0.0.1:1".parse().unwrap()
        );
        assert_eq!(
            t(r#"{"host":"::","port":2}"#).unwrap(),
            "[::1]:2".parse().unwrap()
        );
        assert_eq!(
            t(r#"{"host":"10.0.0.2","port":3}"#).unwrap(),
            "10.0.0.2:3".parse().unwrap()
        );
        assert_eq!(t(r#"{"port":4}"#).unwrap(), "127.0.0.1:4".parse().unwrap());
        for bad in [
            r#"{"host":"example.com","port":80}"#,
            r#"{"host":"localhost","port":0}"#,
            r#"{"host":"localhost","port":70000}"#,
            "not json",
        ] {
            assert!(t(bad).is_err(), "{bad}");
        }
    }
}
