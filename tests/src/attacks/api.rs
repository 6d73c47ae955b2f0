//! Attacks on the HTTP API from a client outside the VM: WebSockets held
//! open idle (each an upgraded connection: the `/hull` tunnel, `fs/watch`),
//! and floods of connections that never present a token. Every loop is
//! bounded in count and time, and every address is on loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error;

use crate::ws::Ws;

/// A TCP connection to `addr` from `source` (any loopback address: the
/// whole of 127.0.0.0/8 is this machine's), or from the default.
pub async fn connect_from(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(source) = source {
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The same, blocking.
pub fn connect_std_from(
    addr: SocketAddr,
    source: Ipv4Addr,
) -> std::io::Result<std::net::TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(IpAddr::V4(source), 0).into())?;
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

/// What one WebSocket handshake came to.
#[derive(Debug)]
pub enum Upgrade {
    Open(Box<Ws>),
    /// An HTTP answer instead of `101`: its status and body.
    Refused {
        status: u16,
        body: String,
    },
    /// No answer: the connection was closed or reset.
    Closed(String),
}

/// One WebSocket handshake to `path_and_query` with `token`, from
/// `source`.
pub async fn upgrade(
    addr: SocketAddr,
    path_and_query: &str,
    token: &str,
    source: Option<Ipv4Addr>,
) -> Upgrade {
    let mut req = format!("ws://{addr}{path_and_query}")
        .into_client_request()
        .expect("a WebSocket request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("a header value"),
    );
    let stream = match connect_from(addr, source).await {
        Ok(stream) => stream,
        Err(e) => return Upgrade::Closed(format!("connect: {e}")),
    };
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(req, stream),
    )
    .await
    {
        Ok(Ok((ws, _))) => Upgrade::Open(Box::new(ws)),
        Ok(Err(Error::Http(response))) => Upgrade::Refused {
            status: response.status().as_u16(),
            body: response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default(),
        },
        Ok(Err(e)) => Upgrade::Closed(e.to_string()),
        Err(_) => Upgrade::Closed("no answer to the handshake within 10 s".into()),
    }
}

/// WebSockets opened and held, and how the others were turned away.
#[derive(Debug, Default)]
pub struct Held {
    pub open: Vec<Box<Ws>>,
    pub refused: Vec<(u16, String)>,
    pub closed: Vec<String>,
}

/// Opens `n` WebSockets to `path_and_query` one after another and keeps
/// those that open, idle.
pub async fn hold_websockets(
    addr: SocketAddr,
    path_and_query: &str,
    token: &str,
    n: usize,
) -> Held {
    let mut held = Held::default();
    for _ in 0..n {
        match upgrade(addr, path_and_query, token, None).await {
            Upgrade::Open(ws) => held.open.push(ws),
            Upgrade::Refused { status, body } => held.refused.push((status, body)),
            Upgrade::Closed(why) => held.closed.push(why),
        }
    }
    held
}

/// How clients that never present a token behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Connect and send nothing.
    Silent,
    /// Send a request's headers a byte every 200 ms, never finishing them.
    Slow,
}

/// What a flood saw.
#[derive(Debug, Default, Clone)]
pub struct FloodReport {
    /// Connections made.
    pub connections: usize,
    /// Connections the server closed (the others were open at the end).
    pub closed_by_server: usize,
    /// The longest any connection was held before the server closed it.
    pub longest: Duration,
}

/// Keeps `conns` anonymous connections to `addr` open until `until`, from
/// `sources` in turn, each reconnecting at once when the server closes it
/// (at most `max_total` connections in all).
pub async fn anonymous_flood(
    addr: SocketAddr,
    conns: usize,
    sources: &[Ipv4Addr],
    kind: Anonymous,
    until: Instant,
    max_total: usize,
) -> FloodReport {
    let made = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..conns {
        let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        let made = made.clone();
        tasks.push(tokio::spawn(async move {
            let mut report = FloodReport::default();
            while Instant::now() < until
                && made.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < max_total
            {
                let Ok(mut stream) = connect_from(addr, source).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                report.connections += 1;
                let opened = Instant::now();
                let closed = tokio::time::timeout_at(until.into(), async {
                    let mut buf = [0u8; 1024];
                    if kind == Anonymous::Slow {
                        let head = b"GET /v1/sprites HTTP/1.1\r\nHost: x\r\nX-Slow: ";
                        for byte in head.iter().chain(std::iter::repeat(&b'a')) {
                            if stream.write_all(&[*byte]).await.is_err() {
                                return;
                            }
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                                read = stream.read(&mut buf) => match read {
                                    Ok(0) | Err(_) => return,
                                    Ok(_) => {}
                                },
                            }
                        }
                    }
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
                if closed.is_ok() {
                    report.closed_by_server += 1;
                    report.longest = report.longest.max(opened.elapsed());
                }
            }
            report
        }));
    }
    let mut total = FloodReport::default();
    for task in tasks {
        let r = task.await.expect("a flood task");
        total.connections += r.connections;
        total.closed_by_server += r.closed_by_server;
        total.longest = total.longest.max(r.longest);
    }
    total
}

/// inotify instances `pid` holds: its fds that are `anon_inode:inotify`.
pub fn inotify_instances(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.as_os_str() == "anon_inode:inotify")
                .count()
        })
        .unwrap_or(0)
}
