//! hulld's control protocol over the HTTP API (`hull --url`): one HTTP/1.1
//! connection (TLS for https URLs) asks `GET /v1/sprites` for the
//! sandbox's name, then upgrades to a WebSocket on
//! `/v1/sprites/{name}/hull` whose binary messages carry the protocol's
//! bytes, relayed to an in-process pipe that a [`Client`] speaks over.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::header::{AUTHORIZATION, CONNECTION, HOST, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::{Client, ClientError, Result};

/// Bytes in flight each way between the WebSocket and the [`Client`].
const PIPE_BYTES: usize = 256 * 1024;

/// The most bytes carried in one WebSocket message.
const CHUNK: usize = 64 * 1024;

/// Where and how to reach a remote hulld.
#[derive(Debug, Clone)]
pub struct Remote {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: String,
    pub token: String,
    /// A PEM file of certificates to trust besides the system's (a
    /// self-signed certificate of the API).
    pub ca_file: Option<PathBuf>,
}

struct Target {
    tls: bool,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Target> {
    let bad = |why: &str| ClientError::Url(format!("{url}: {why}"));
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(bad("use http://HOST:PORT or https://HOST:PORT"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') {
        return Err(bad("give the API's base URL, without a path"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            let port = port.parse().map_err(|_| bad("the port is not a number"))?;
            (host, port)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(Target {
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    })
}

fn tls_connector(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    // Certificates the system cannot parse are skipped: one bad file in
    // /etc/ssl/certs must not make every other one unusable.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| ClientError::Tls(format!("cannot read {}: {e}", path.display())))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

async fn open(remote: &Remote, target: &Target) -> Result<Box<dyn Io>> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| ClientError::Unreachable {
            url: remote.url.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| ClientError::Url(format!("{}: {e}", remote.url)))?;
    let tls = tls_connector(remote.ca_file.as_deref())?
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Tls(format!("{}: {e}", remote.url)))?;
    Ok(Box::new(tls))
}

/// An answer of the API that is not what was asked: its JSON error.
async fn api_error(response: hyper::Response<hyper::body::Incoming>) -> ClientError {
    let status = response.status();
    let body = match response.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    ClientError::Api {
        status: status.as_u16(),
        code: json["error"].as_str().unwrap_or("").to_string(),
        message: json["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()),
    }
}

fn request(target: &Target, token: &str, path: &str) -> Result<hyper::http::request::Builder> {
    Ok(Request::get(path)
        .header(HOST, format!("{}:{}", target.host, target.port))
        .header(AUTHORIZATION, format!("Bearer {token}")))
}

impl Client {
    /// Connects to the hulld behind the HTTP API at `remote.url`.
    pub async fn connect_remote(remote: &Remote) -> Result<Self> {
        let target = parse_url(&remote.url)?;
        let io = open(remote, &target).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let http = |e: hyper::Error| ClientError::Http(e.to_string());
        let list = request(&target, &remote.token, "/v1/sprites")?
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let response = sender.send_request(list).await.map_err(http)?;
        if response.status() != StatusCode::OK {
            return Err(api_error(response).await);
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        let listing: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Http(format!("GET /v1/sprites: {e}")))?;
        let name = listing["sprites"][0]["name"]
            .as_str()
            .ok_or_else(|| ClientError::Http("GET /v1/sprites lists no sandbox".into()))?
            .to_string();
        let key = generate_key();
        let upgrade = request(&target, &remote.token, &format!("/v1/sprites/{name}/hull"))?
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, "websocket")
            .header("sec-websocket-version", "13")
            .header(SEC_WEBSOCKET_KEY, &key)
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let response = sender.send_request(upgrade).await.map_err(http)?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(api_error(response).await);
        }
        let accepted = response
            .headers()
            .get("sec-websocket-accept")
            .is_some_and(|v| v.as_bytes() == derive_accept_key(key.as_bytes()).as_bytes());
        if !accepted {
            return Err(ClientError::Http(
                "the server's WebSocket accept key is wrong".into(),
            ));
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(http)?;
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        tokio::spawn(relay(ws, theirs));
        Client::over(ours).await
    }
}

/// Carries bytes between a WebSocket's binary messages and a pipe until
/// either side ends; the end of one is the end of the other. Used by both
/// ends of the tunnel.
pub async fn relay<S>(ws: WebSocketStream<S>, pipe: DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ws_out, mut ws_in) = ws.split();
    let (mut from_pipe, mut to_pipe) = tokio::io::split(pipe);
    let inbound = async move {
        while let Some(message) = ws_in.next().await {
            match message {
                Ok(Message::Binary(bytes)) => {
                    if to_pipe.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                // The tunnel carries binary messages only.
                Ok(Message::Text(_) | Message::Frame(_) | Message::Close(_)) | Err(_) => break,
            }
        }
        let _ = to_pipe.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from_pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    if ws_out.send(Message::Binary(chunk)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = ws_out.close().await;
    };
    futures::join!(inbound, outbound);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_or_refused_with_a_reason() {
        let t = parse_url("https://box.example:7700/").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port), ("box.example", 7700));
        let t = parse_url("http://[::1]:7700").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("::1", 7700, false));
        assert_eq!(parse_url("http://10.0.0.2").unwrap().port, 80);
        for bad in ["ftp://x", "http://x:port", "http://x:7700/v1", "https://"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
