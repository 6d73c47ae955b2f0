//! The control API: one task per connection, the same protocol on the unix
//! socket and on vsock. A bad frame costs only its own connection.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hull_checkpoint::StorageError;
use hull_proto::{
    frame_reader, frame_writer, ClientMsg, DaemonMsg, ErrorKind, ErrorReport, Hello,
    PROTOCOL_VERSION,
};
use hull_services::ServiceError;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error_chain;
use crate::hulld::Hulld;
use crate::supervisor::SupervisorError;

fn error(kind: ErrorKind, message: impl Into<String>) -> DaemonMsg {
    DaemonMsg::Error(ErrorReport {
        kind,
        message: message.into(),
    })
}

/// What a connection may ask for, by the endpoint it came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The control socket and vsock: everything.
    Control,
    /// The socket mounted into the inner: the service API and the
    /// read-only ports and ingress reports (without the ingress token), so
    /// the user's code can register services and learn its URLs but cannot
    /// exec, bounce, restore, read logs or stop hulld.
    InnerServices,
}

impl Scope {
    fn permits(self, msg: &ClientMsg) -> bool {
        match self {
            Scope::Control => true,
            Scope::InnerServices => matches!(
                msg,
                ClientMsg::Services(_) | ClientMsg::Ports | ClientMsg::Ingress
            ),
        }
    }
}

/// Serves one client until it hangs up or sends something unusable.
pub async fn serve_connection<S>(hulld: Arc<Hulld>, stream: S, scope: Scope)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = frame_reader::<_, ClientMsg>(read_half);
    let mut writer = frame_writer::<_, DaemonMsg>(write_half);
    if let Err(e) = serve(&hulld, scope, &mut reader, &mut writer).await {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

async fn serve<R, W>(
    hulld: &Arc<Hulld>,
    scope: Scope,
    reader: &mut R,
    writer: &mut W,
) -> io::Result<()>
where
    R: futures::Stream<Item = io::Result<ClientMsg>> + Unpin,
    W: futures::Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    match reader.next().await {
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
                .send(error(
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
                .send(error(
                    ErrorKind::BadRequest,
                    format!("the first frame must be Hello, got {}", variant(&other)),
                ))
                .await;
        }
        Some(Err(e)) => return bad_frame(writer, e).await,
        None => return Ok(()),
    }
    let mut had_session = false;
    loop {
        let msg = match reader.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return bad_frame(writer, e).await,
            None => return Ok(()),
        };
        if !scope.permits(&msg) {
            tracing::info!(
                request = variant(&msg),
                "refused a request on the inner's service socket"
            );
            writer
                .send(error(
                    ErrorKind::NotPermitted,
                    format!(
                        "{} is not available from inside the inner: the socket there serves `hull services`, `hull ports` and `hull ingress` only; run it from the VM",
                        command_name(&msg)
                    ),
                ))
                .await?;
            continue;
        }
        match msg {
            ClientMsg::Status => {
                writer
                    .send(DaemonMsg::Status(hulld.do_status().await))
                    .await?
            }
            ClientMsg::Exec(request) if request.detach => {
                writer.send(hulld.do_exec_detached(request).await).await?
            }
            ClientMsg::Exec(request) => {
                crate::exec::run(
                    hulld.supervisor(),
                    hulld.exec_log(),
                    request,
                    reader,
                    writer,
                )
                .await?;
                had_session = true;
            }
            ClientMsg::Bounce { grace_ms } => {
                let reply = hulld.do_bounce(Duration::from_millis(grace_ms)).await;
                writer
                    .send(reply.map_or_else(|e| supervisor_error(&e), DaemonMsg::Bounced))
                    .await?;
            }
            ClientMsg::CheckpointCreate { comment } => {
                let reply = hulld.do_checkpoint_create(comment).await;
                writer
                    .send(reply.map_or_else(|e| supervisor_error(&e), DaemonMsg::CheckpointCreated))
                    .await?;
            }
            ClientMsg::CheckpointRestore { id } => {
                let reply = hulld.do_checkpoint_restore(id).await;
                writer
                    .send(reply.map_or_else(|e| supervisor_error(&e), DaemonMsg::Restored))
                    .await?;
            }
            ClientMsg::CheckpointList => {
                let reply = hulld.do_checkpoint_list().await;
                writer
                    .send(reply.map_or_else(|e| storage_error(&e), DaemonMsg::Checkpoints))
                    .await?;
            }
            ClientMsg::CheckpointDelete { id } => {
                let reply = hulld.do_checkpoint_delete(id.clone()).await;
                writer
                    .send(reply.map_or_else(
                        |e| storage_error(&e),
                        |()| DaemonMsg::CheckpointDeleted { id },
                    ))
                    .await?;
            }
            ClientMsg::Services(request) => {
                let reply = hulld.do_services(request).await;
                writer
                    .send(reply.map_or_else(|e| service_error(&e), DaemonMsg::Services))
                    .await?;
            }
            ClientMsg::Ports => {
                writer
                    .send(DaemonMsg::Ports(hulld.do_ports().await))
                    .await?
            }
            ClientMsg::Ingress => {
                let token = scope == Scope::Control;
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
                if had_session => {}
            other @ (ClientMsg::Hello(_)
            | ClientMsg::Stdin(_)
            | ClientMsg::StdinEof
            | ClientMsg::Resize(_)
            | ClientMsg::Signal(_)) => {
                writer
                    .send(error(
                        ErrorKind::BadRequest,
                        format!("{} is only valid inside an exec session", variant(&other)),
                    ))
                    .await?
            }
        }
    }
}

fn variant(msg: &ClientMsg) -> &'static str {
    match msg {
        ClientMsg::Hello(_) => "Hello",
        ClientMsg::Status => "Status",
        ClientMsg::Exec(_) => "Exec",
        ClientMsg::Stdin(_) => "Stdin",
        ClientMsg::StdinEof => "StdinEof",
        ClientMsg::Resize(_) => "Resize",
        ClientMsg::Signal(_) => "Signal",
        ClientMsg::Bounce { .. } => "Bounce",
        ClientMsg::Shutdown { .. } => "Shutdown",
        ClientMsg::CheckpointCreate { .. } => "CheckpointCreate",
        ClientMsg::CheckpointRestore { .. } => "CheckpointRestore",
        ClientMsg::CheckpointList => "CheckpointList",
        ClientMsg::CheckpointDelete { .. } => "CheckpointDelete",
        ClientMsg::Services(_) => "Services",
        ClientMsg::Logs { .. } => "Logs",
        ClientMsg::Ports => "Ports",
        ClientMsg::Ingress => "Ingress",
    }
}

/// The command a user typed to send `msg`, for refusals.
fn command_name(msg: &ClientMsg) -> &'static str {
    match msg {
        ClientMsg::Status => "hull status",
        ClientMsg::Exec(_) => "hull exec",
        ClientMsg::Bounce { .. } => "hull bounce",
        ClientMsg::Shutdown { .. } => "hull down",
        ClientMsg::CheckpointCreate { .. }
        | ClientMsg::CheckpointRestore { .. }
        | ClientMsg::CheckpointList
        | ClientMsg::CheckpointDelete { .. } => "hull checkpoint",
        ClientMsg::Logs { .. } => "hull logs",
        ClientMsg::Ports => "hull ports",
        ClientMsg::Ingress => "hull ingress",
        other => variant(other),
    }
}

/// Tells the client why its frame was refused, then ends the connection.
async fn bad_frame<W>(writer: &mut W, e: io::Error) -> io::Result<()>
where
    W: futures::Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    tracing::warn!(error = %e, "refusing a bad frame from a client");
    writer
        .send(error(ErrorKind::BadFrame, format!("bad frame: {e}")))
        .await
}

fn storage_error(e: &StorageError) -> DaemonMsg {
    let kind = match e {
        StorageError::UnknownCheckpoint { .. } => ErrorKind::NotFound,
        _ => ErrorKind::Storage,
    };
    error(kind, error_chain(e))
}

fn supervisor_error(e: &SupervisorError) -> DaemonMsg {
    let kind = match e {
        SupervisorError::ShuttingDown
        | SupervisorError::BounceStart { .. }
        | SupervisorError::RestoredNotStarted { .. } => ErrorKind::InnerUnavailable,
        SupervisorError::CheckpointServices(_) => ErrorKind::Internal,
        _ => match e.storage() {
            Some(StorageError::UnknownCheckpoint { .. }) => ErrorKind::NotFound,
            _ => ErrorKind::Storage,
        },
    };
    error(kind, error_chain(e))
}

fn service_error(e: &ServiceError) -> DaemonMsg {
    let kind = match e {
        ServiceError::NotFound(_) => ErrorKind::NotFound,
        ServiceError::ManagerGone => ErrorKind::Internal,
        _ => ErrorKind::Service,
    };
    error(kind, error_chain(e))
}
