//! The control API: one task per connection, the same protocol on the unix
//! socket and on vsock. A bad frame costs only its own connection; each
//! endpoint has a cap on its connections, on the size of a frame and on
//! the time a begun frame may take, so no client holds more of hulld than
//! that.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hull_network::budget::{out_of_fds, ACCEPT_BACKOFF};
use hull_network::{FdBudget, Throttle};
pub use hull_proto::Scope;
use hull_proto::{
    frame_writer, ClientMsg, DaemonMsg, ErrorKind, FrameBusy, FrameDecoder, Hello, RequestError,
    RequestReader, SessionRequest, TokenScope, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf};
use tokio::sync::Semaphore;

use crate::hulld::Hulld;
use crate::sessions::Outcome;

/// The largest frame the inner's service socket reads. Its biggest
/// legitimate message is a service definition: a name, a command line, an
/// environment, a few names to wait for.
pub const INNER_MAX_FRAME: usize = 64 * 1024;

/// What a request read from the inner's socket may take once decoded: a
/// service definition with a thousand variables of a hundred bytes fits.
pub const INNER_MAX_DECODED: usize = 512 * 1024;

/// How long a frame may take to arrive once its first byte has.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection to the inner's socket may sit without a request.
pub const INNER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One listening endpoint and what it gives each client.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// For the log: "control socket", "vsock", "inner's service socket".
    pub name: &'static str,
    pub scope: Scope,
    /// Connections served at once; more are told so and closed.
    pub connections: usize,
    /// The largest frame read from a client.
    pub max_frame: usize,
    /// What a request may take once decoded, estimated before decoding
    /// (`hull_proto::check_shape`).
    pub max_decoded: usize,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// Whether its connections take from hulld's fd budget (the inner's
    /// endpoint does; the control socket lives on hulld's reserve).
    pub budgeted: bool,
    /// Who the sessions its connections start say started them
    /// (`SessionInfo::started_by`): set by hulld for the connection, so a
    /// client cannot claim another name.
    pub started_by: Arc<str>,
}

impl Endpoint {
    pub fn control(name: &'static str, connections: usize) -> Endpoint {
        Endpoint {
            name,
            scope: Scope::Control,
            connections,
            max_frame: hull_proto::MAX_FRAME_LEN,
            max_decoded: hull_proto::MAX_DECODED,
            idle_timeout: None,
            budgeted: false,
            started_by: hull_proto::STARTED_LOCALLY.into(),
        }
    }

    /// The HTTP API's in-process connections for a token of `scope`, the
    /// one named `started_by` (its id when it has no name): the API caps
    /// its own connections before any reaches here.
    pub fn api(scope: TokenScope, started_by: &str) -> Endpoint {
        Endpoint {
            name: "HTTP API",
            scope: Scope::Api(scope),
            connections: usize::MAX,
            max_frame: hull_proto::MAX_FRAME_LEN,
            max_decoded: hull_proto::MAX_DECODED,
            idle_timeout: None,
            budgeted: false,
            started_by: started_by.into(),
        }
    }

    pub fn inner(connections: usize) -> Endpoint {
        Endpoint {
            name: "inner's service socket",
            scope: Scope::InnerServices,
            connections,
            max_frame: INNER_MAX_FRAME,
            max_decoded: INNER_MAX_DECODED,
            idle_timeout: Some(INNER_IDLE_TIMEOUT),
            budgeted: true,
            // Its scope starts no session.
            started_by: "inner".into(),
        }
    }
}

/// A listener an endpoint accepts on (unix socket, vsock).
pub trait Listener: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    fn accept_stream(&mut self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&mut self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for tokio_vsock::VsockListener {
    type Stream = tokio_vsock::VsockStream;
    async fn accept_stream(&mut self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts on `listener` for as long as hulld runs: a task per connection
/// up to the endpoint's cap. Past the cap, or with hulld's fd budget spent,
/// a client gets an error frame and a closed connection; accept errors
/// (out of fds) back off, and each kind of trouble is logged once per
/// interval, not once per connection.
pub async fn accept_loop<L: Listener>(
    hulld: Arc<Hulld>,
    mut listener: L,
    endpoint: Endpoint,
    budget: Arc<FdBudget>,
) {
    let endpoint = Arc::new(endpoint);
    let slots = Arc::new(Semaphore::new(endpoint.connections));
    let (failed, full, no_fds) = (
        Throttle::default(),
        Throttle::default(),
        Throttle::default(),
    );
    loop {
        let stream = match listener.accept_stream().await {
            Ok(stream) => stream,
            Err(e) => {
                if let Some(suppressed) = failed.hit() {
                    tracing::warn!(endpoint = endpoint.name, error = %e, out_of_fds = out_of_fds(&e), suppressed, "accept failed; backing off");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let lease = match endpoint.budgeted {
            true => {
                match budget.take(1) {
                    Some(lease) => Some(lease),
                    None => {
                        if let Some(suppressed) = no_fds.hit() {
                            tracing::warn!(endpoint = endpoint.name, suppressed, "connection refused: the fds hulld gives to requests are all in use");
                        }
                        refuse(stream, &endpoint, "hulld has no file descriptors to spare").await;
                        continue;
                    }
                }
            }
            false => None,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(suppressed) = full.hit() {
                tracing::warn!(
                    endpoint = endpoint.name,
                    cap = endpoint.connections,
                    suppressed,
                    "connection refused: the endpoint's connection cap is reached"
                );
            }
            let why = format!(
                "the {} serves at most {} connections at once",
                endpoint.name, endpoint.connections
            );
            refuse(stream, &endpoint, &why).await;
            continue;
        };
        let (hulld, endpoint) = (hulld.clone(), endpoint.clone());
        tokio::spawn(async move {
            serve_connection(hulld, stream, &endpoint).await;
            drop((slot, lease));
        });
    }
}

/// Tells a client it was turned away, without letting it hold the accept
/// loop: a fresh socket takes a small frame at once.
async fn refuse<S: AsyncWrite + Send + Unpin>(stream: S, endpoint: &Endpoint, why: &str) {
    let mut writer = frame_writer::<_, DaemonMsg>(stream);
    let msg = DaemonMsg::error(ErrorKind::Busy, format!("{why}; try again shortly"));
    let _ = tokio::time::timeout(Duration::from_millis(50), writer.send(msg)).await;
    tracing::trace!(endpoint = endpoint.name, "refused a connection");
}

pub(crate) type Reader<S> = RequestReader<ReadHalf<S>>;

/// Serves one client until it hangs up or sends something unusable.
pub async fn serve_connection<S>(hulld: Arc<Hulld>, stream: S, endpoint: &Endpoint)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let decoder = FrameDecoder::with_budget(endpoint.max_frame, hulld.frame_budget());
    let mut reader = RequestReader::new(read_half, decoder, endpoint.scope, endpoint.max_decoded);
    let mut writer = frame_writer::<_, DaemonMsg>(write_half);
    if let Err(e) = serve(&hulld, endpoint, &mut reader, &mut writer).await {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// The next request, or None at the end. A frame that has begun and does
/// not finish within [`FRAME_TIMEOUT`] is an error; a connection idle for
/// longer than its endpoint allows ends.
pub(crate) async fn next_request<S: AsyncRead>(
    reader: &mut Reader<S>,
    endpoint: &Endpoint,
) -> Option<io::Result<ClientMsg>> {
    let mut idle = Duration::ZERO;
    loop {
        match tokio::time::timeout(FRAME_TIMEOUT, reader.next()).await {
            Ok(next) => return next,
            Err(_) if reader.mid_frame() => {
                return Some(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "a frame began and was not complete within {} s",
                        FRAME_TIMEOUT.as_secs()
                    ),
                )))
            }
            Err(_) => {
                idle += FRAME_TIMEOUT;
                if endpoint.idle_timeout.is_some_and(|limit| idle >= limit) {
                    tracing::debug!(endpoint = endpoint.name, "closing an idle connection");
                    return None;
                }
            }
        }
    }
}

async fn serve<S, W>(
    hulld: &Arc<Hulld>,
    endpoint: &Endpoint,
    reader: &mut Reader<S>,
    writer: &mut W,
) -> io::Result<()>
where
    S: AsyncRead + Send + 'static,
    W: futures::Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    let scope = endpoint.scope;
    match next_request(reader, endpoint).await {
        Some(Ok(ClientMsg::Hello(hello))) if hello.version == PROTOCOL_VERSION => {
            writer
                .send(DaemonMsg::Hello(Hello::new(concat!(
                    "hulld ",
                    env!("CARGO_PKG_VERSION")
                ))))
                .await?;
        }
        Some(Ok(ClientMsg::Hello(hello))) => {
            return writer
                .send(DaemonMsg::error(
                    ErrorKind::Version,
                    format!(
                        "{} speaks protocol version {}, hulld speaks {PROTOCOL_VERSION}",
                        hello.peer, hello.version
                    ),
                ))
                .await;
        }
        Some(Ok(other)) => {
            return writer
                .send(DaemonMsg::error(
                    ErrorKind::BadRequest,
                    format!("the first frame must be Hello, got {}", other.kind().name()),
                ))
                .await;
        }
        Some(Err(e)) => return bad_frame(writer, e).await,
        None => return Ok(()),
    }
    let mut had_session = false;
    loop {
        let msg = match next_request(reader, endpoint).await {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => match refused(endpoint, &e) {
                Some(refusal) => {
                    writer.send(refusal).await?;
                    continue;
                }
                None => return bad_frame(writer, e).await,
            },
            None => return Ok(()),
        };
        match msg {
            ClientMsg::Status => {
                writer
                    .send(DaemonMsg::Status(Box::new(hulld.do_status().await)))
                    .await?
            }
            ClientMsg::Exec(request) if request.detach => {
                let started_by = &endpoint.started_by;
                writer
                    .send(hulld.do_exec_detached(request, started_by).await)
                    .await?
            }
            ClientMsg::Exec(request) => {
                let started_by = &endpoint.started_by;
                if hulld.do_exec(request, started_by, reader, writer).await? == Outcome::Gone {
                    return Ok(());
                }
                had_session = true;
            }
            ClientMsg::Sessions(SessionRequest::Attach {
                id,
                writer: take,
                watch,
            }) => {
                if hulld
                    .do_session_attach(id, take, watch, reader, writer)
                    .await?
                    == Outcome::Gone
                {
                    return Ok(());
                }
                had_session = true;
            }
            ClientMsg::Sessions(request) => {
                let reply = hulld.do_sessions(request).await;
                writer.send(reply.unwrap_or_else(|e| e.answer())).await?
            }
            ClientMsg::Bounce { grace_ms } => {
                let reply = hulld.do_bounce(Duration::from_millis(grace_ms)).await;
                writer
                    .send(reply.map_or_else(|e| e.answer(), DaemonMsg::Bounced))
                    .await?;
            }
            ClientMsg::CheckpointCreate { comment } => {
                let reply = hulld.do_checkpoint_create(comment).await;
                writer
                    .send(reply.map_or_else(|e| e.answer(), DaemonMsg::CheckpointCreated))
                    .await?;
            }
            ClientMsg::CheckpointRestore { id } => {
                let reply = hulld.do_checkpoint_restore(id).await;
                writer
                    .send(reply.map_or_else(|e| e.answer(), DaemonMsg::Restored))
                    .await?;
            }
            ClientMsg::CheckpointList => {
                let reply = hulld.do_checkpoint_list().await;
                writer
                    .send(reply.map_or_else(|e| e.answer(), DaemonMsg::Checkpoints))
                    .await?;
            }
            ClientMsg::CheckpointDelete { id } => {
                let reply = hulld.do_checkpoint_delete(id.clone()).await;
                writer
                    .send(
                        reply.map_or_else(|e| e.answer(), |()| DaemonMsg::CheckpointDeleted { id }),
                    )
                    .await?;
            }
            ClientMsg::CheckpointPush { id } => {
                // Progress goes out as it comes, through a channel: the
                // push's callback cannot await the connection.
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let push = hulld.do_checkpoint_push(id, move |p| {
                    let _ = tx.send(p.clone());
                });
                tokio::pin!(push);
                let reply = loop {
                    tokio::select! {
                        reply = &mut push => break reply,
                        Some(progress) = rx.recv() => {
                            writer.send(DaemonMsg::PushProgress(progress)).await?;
                        }
                    }
                };
                writer
                    .send(reply.map_or_else(|e| e.answer(), DaemonMsg::CheckpointPushed))
                    .await?;
            }
            ClientMsg::Services(request) => {
                let reply = hulld.do_services(request, scope.sees_secrets()).await;
                writer
                    .send(reply.map_or_else(|e| e.answer(), DaemonMsg::Services))
                    .await?;
            }
            ClientMsg::Tokens(request) => {
                let reply = hulld.do_tokens(request).await;
                writer.send(reply.unwrap_or_else(|e| e.answer())).await?
            }
            ClientMsg::Files(request) => {
                let after = crate::files::serve(hulld, endpoint, request, reader, writer).await?;
                if after == crate::files::After::Gone {
                    return Ok(());
                }
            }
            ClientMsg::NetworkPolicy(set) => {
                let reply = hulld.do_network_policy(set).await;
                writer.send(reply.unwrap_or_else(|e| e.answer())).await?
            }
            ClientMsg::Ports => {
                writer
                    .send(DaemonMsg::Ports(hulld.do_ports().await))
                    .await?
            }
            ClientMsg::Ingress => {
                let token = matches!(scope, Scope::Control | Scope::Api(TokenScope::Admin));
                writer
                    .send(DaemonMsg::Ingress(hulld.do_ingress(token)))
                    .await?
            }
            ClientMsg::Logs {
                source,
                follow,
                tail,
                stream,
                since_ms,
                exec_id,
            } => {
                let filter = hull_logs::Filter {
                    stream,
                    since_ms,
                    exec_id,
                };
                hull_logs::serve(hulld.logs(), &source, follow, tail, filter, reader, writer)
                    .await?
            }
            ClientMsg::Shutdown { grace_ms } => {
                hulld.shutdown(Duration::from_millis(grace_ms)).await;
                let sent = writer.send(DaemonMsg::ShuttingDown).await;
                hulld.exit();
                return sent;
            }
            // Input sent while the process was exiting arrives after its
            // session ended; that race is the client's right, not an error.
            ClientMsg::Stdin(_)
            | ClientMsg::StdinEof
            | ClientMsg::Resize(_)
            | ClientMsg::Signal(_)
            | ClientMsg::Detach
                if had_session => {}
            other @ (ClientMsg::FileData(_) | ClientMsg::FileEnd) => {
                writer
                    .send(DaemonMsg::error(
                        ErrorKind::BadRequest,
                        format!("{} is only valid inside a file write", other.kind().name()),
                    ))
                    .await?
            }
            other @ (ClientMsg::Hello(_)
            | ClientMsg::Stdin(_)
            | ClientMsg::StdinEof
            | ClientMsg::Resize(_)
            | ClientMsg::Signal(_)
            | ClientMsg::Detach) => {
                writer
                    .send(DaemonMsg::error(
                        ErrorKind::BadRequest,
                        format!(
                            "{} is only valid inside an exec session",
                            other.kind().name()
                        ),
                    ))
                    .await?
            }
        }
    }
}

/// The answer to a request its caller may not make, or `None` when the
/// error is not a refusal. The connection goes on after a refusal.
pub fn refused(endpoint: &Endpoint, e: &io::Error) -> Option<DaemonMsg> {
    let Some(RequestError::NotPermitted { kind, .. }) = RequestError::of(e) else {
        return None;
    };
    tracing::info!(
        request = kind.name(),
        endpoint = endpoint.name,
        "refused a request"
    );
    Some(DaemonMsg::error(ErrorKind::NotPermitted, e.to_string()))
}

/// Tells the client why its frame was refused, then ends the connection.
async fn bad_frame<W>(writer: &mut W, e: io::Error) -> io::Result<()>
where
    W: futures::Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    if FrameBusy::of(&e).is_some() {
        tracing::warn!(error = %e, "refusing a large frame: the budget for large frames is spent");
        return writer
            .send(DaemonMsg::error(
                ErrorKind::Busy,
                format!("{e}; try again shortly"),
            ))
            .await;
    }
    tracing::warn!(error = %e, "refusing a bad frame from a client");
    writer
        .send(DaemonMsg::error(
            ErrorKind::BadFrame,
            format!("bad frame: {e}"),
        ))
        .await
}
