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

use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::error::ApiError;
use crate::router::Body;
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

async fn run(state: &Shared, mut socket: ws::Ws) {
    let init = match tokio::time::timeout(INIT_TIMEOUT, first_text(&mut socket)).await {
        Ok(Some(text)) => text,
        Ok(None) => return,
        Err(_) => {
            refuse(&mut socket, "no {\"host\", \"port\"} message within 10 s").await;
            return;
        }
    };
    let target = match parse_target(&init) {
        Ok(target) => target,
        Err(why) => {
            refuse(&mut socket, &why).await;
            return;
        }
    };
    let stream = match state.connector.dial(target).await {
        Ok(stream) => stream,
        Err(e) => {
            refuse(
                &mut socket,
                &format!("cannot connect to {target} in the sandbox: {e}"),
            )
            .await;
            return;
        }
    };
    let connected = json!({"status": "connected", "target": target.to_string()});
    if socket
        .send(Message::text(connected.to_string()))
        .await
        .is_err()
    {
        return;
    }
    relay(socket, stream).await;
}

/// The first text message; `None` when the client closed or sent
/// something else first.
async fn first_text(socket: &mut ws::Ws) -> Option<String> {
    match socket.next().await? {
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

async fn refuse(socket: &mut ws::Ws, error: &str) {
    let answer = json!({"status": "error", "error": error});
    let _ = socket.send(Message::text(answer.to_string())).await;
    let _ = socket.send(ws::close(CloseCode::Error, error)).await;
}

/// Bytes both ways until either side ends: a WebSocket has no half-close,
/// so the end of one direction ends the connection.
async fn relay(socket: ws::Ws, stream: TcpStream) {
    let (mut sink, mut incoming) = socket.split();
    let (mut from_target, mut to_target) = stream.into_split();
    let inbound = async {
        while let Some(Ok(message)) = incoming.next().await {
            match message {
                Message::Binary(data) if to_target.write_all(&data).await.is_err() => break,
                Message::Close(_) => break,
                // Pings are answered by tungstenite; text has no meaning here.
                _ => {}
            }
        }
        let _ = to_target.shutdown().await;
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
        _ = inbound => {}
        _ = outbound => {}
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
