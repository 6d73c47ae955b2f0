//! Requests that cost hulld more decoded than they weigh on the wire: an
//! exec whose argv is millions of empty strings, sent through the API's
//! `/hull` tunnel; service definitions of tens of thousands of empty
//! variables, sent through the inner's own socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use futures::{SinkExt, StreamExt};
use hull_outer::client::Client;
use hull_proto::{
    ClientMsg, DaemonMsg, ErrorKind, ExecRequest, ExecSpec, Hello, ServiceRequest, ServiceSpec,
};
use tokio_tungstenite::tungstenite::Message;

use crate::TestHull;

/// `msg` as one frame of the control protocol: its length, then its body.
pub fn frame(msg: &ClientMsg) -> Vec<u8> {
    let body = rmp_serde::to_vec(msg).expect("encode a request");
    let mut out = u32::try_from(body.len())
        .expect("a frame under 4 GiB")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&body);
    out
}

/// An exec whose argv is `n` empty strings: one byte each on the wire, a
/// `String` each once decoded.
pub fn empty_argv_exec(n: usize) -> Vec<u8> {
    frame(&ClientMsg::Exec(ExecRequest::from(ExecSpec {
        argv: vec![String::new(); n],
        env: vec![],
        cwd: None,
        user: None,
        tty: None,
    })))
}

pub use crate::http::sprite_name;

/// The frames in `buf` so far, taken off its front.
fn take_frames(buf: &mut Vec<u8>) -> Vec<DaemonMsg> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if buf.len() < 4 + len {
            break;
        }
        let msg = rmp_serde::from_slice(&buf[4..4 + len]).expect("hulld's frame decodes");
        out.push(msg);
        buf.drain(..4 + len);
    }
    out
}

/// Opens `conns` tunnels (`GET /v1/sprites/NAME/hull`) with `token` at
/// once, and on each sends a Hello and then `payload` (one frame, in
/// WebSocket messages of 256 KiB). Returns, per tunnel, hulld's answer to
/// the payload: the first frame after its Hello, or `None` when the
/// tunnel closed without one.
pub async fn tunnel_flood(
    addr: SocketAddr,
    token: &str,
    conns: usize,
    payload: &[u8],
) -> Vec<Option<DaemonMsg>> {
    let path = format!("/v1/sprites/{}/hull", sprite_name(addr, token));
    let hello = frame(&ClientMsg::Hello(Hello::new("attack")));
    let one = |_| {
        let (path, hello) = (path.clone(), hello.clone());
        async move {
            let mut ws = crate::ws::connect(addr, &path, token).await.ok()?;
            ws.send(Message::binary(hello)).await.ok()?;
            for chunk in payload.chunks(256 * 1024) {
                if ws.send(Message::binary(chunk.to_vec())).await.is_err() {
                    break;
                }
            }
            let mut buf = Vec::new();
            let mut answers = Vec::new();
            while answers.len() < 2 {
                match ws.next().await? {
                    Ok(Message::Binary(b)) => {
                        buf.extend_from_slice(&b);
                        answers.extend(take_frames(&mut buf));
                    }
                    Ok(Message::Close(_)) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
            answers.into_iter().nth(1)
        }
    };
    futures::future::join_all((0..conns).map(one)).await
}

/// The inner's service socket, as the inner sees it.
pub fn inner_socket(hull: &TestHull) -> PathBuf {
    let status = hull.wait_running(std::time::Duration::from_secs(10));
    let pid = status.inner_pid.expect("the inner's pid");
    PathBuf::from(format!("/proc/{pid}/root/run/hull/hull.sock"))
}

/// A definition named `name` with `vars` variables of `len`-byte names
/// and values.
pub fn service_with_env(name: &str, vars: usize, len: usize) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        cmd: "sleep 1000".into(),
        env: (0..vars)
            .map(|i| {
                let key = format!("V{i:0>width$}", width = len.saturating_sub(1));
                (key, "x".repeat(len))
            })
            .collect(),
        cwd: None,
        user: None,
        http_port: None,
        restart: Default::default(),
        after: vec![],
    }
}

/// Registers each definition through `socket`, each on a connection of
/// its own (a refused frame ends its connection); the answers, in order.
pub async fn register_all(
    socket: &Path,
    specs: Vec<ServiceSpec>,
) -> Vec<Result<(), (ErrorKind, String)>> {
    let mut answers = Vec::new();
    for spec in specs {
        let answer = match Client::connect(socket).await {
            Ok(mut client) => match client.services(ServiceRequest::Add(spec)).await {
                Ok(_) => Ok(()),
                Err(hull_outer::client::ClientError::Daemon(report)) => {
                    Err((report.kind, report.message))
                }
                Err(e) => Err((ErrorKind::Internal, e.to_string())),
            },
            Err(e) => Err((ErrorKind::Internal, format!("connect: {e}"))),
        };
        answers.push(answer);
    }
    answers
}
