//! The control API: one task per connection, the same protocol on the unix
//! socket and on vsock. A bad frame costs only its own connection.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hull_checkpoint::StorageError;
use hull_proto::{
    frame_reader, frame_writer, CheckpointInfo, CheckpointListing, CheckpointReport, ClientMsg,
    DaemonMsg, ErrorKind, ErrorReport, Hello, Limits, StatusReport, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::daemon::Daemon;

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
    /// The socket mounted into the inner: the service API only, so the
    /// user's code can register services but cannot exec, bounce, restore,
    /// read logs or stop hulld.
    InnerServices,
}

impl Scope {
    fn permits(self, msg: &ClientMsg) -> bool {
        match self {
            Scope::Control => true,
            Scope::InnerServices => matches!(msg, ClientMsg::Services(_)),
        }
    }
}

/// Serves one client until it hangs up or sends something unusable.
pub async fn serve_connection<S>(daemon: Arc<Daemon>, stream: S, scope: Scope)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = frame_reader::<_, ClientMsg>(read_half);
    let mut writer = frame_writer::<_, DaemonMsg>(write_half);
    if let Err(e) = serve(&daemon, scope, &mut reader, &mut writer).await {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

async fn serve<R, W>(
    daemon: &Arc<Daemon>,
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
                        "{} is not available from inside the inner: the socket there serves `hull services` only; run it from the VM",
                        command_name(&msg)
                    ),
                ))
                .await?;
            continue;
        }
        match msg {
            ClientMsg::Status => writer.send(DaemonMsg::Status(status(daemon))).await?,
            ClientMsg::Exec(spec) => {
                crate::exec::run(&daemon.supervisor, &daemon.logs, spec, reader, writer).await?;
                had_session = true;
            }
            ClientMsg::Bounce { grace_ms } => {
                let reply = match daemon
                    .supervisor
                    .bounce(Duration::from_millis(grace_ms))
                    .await
                {
                    Ok(report) => DaemonMsg::Bounced(report),
                    Err(e) => error(ErrorKind::InnerUnavailable, format!("bounce failed: {e}")),
                };
                writer.send(reply).await?;
            }
            ClientMsg::CheckpointCreate { comment } => {
                let reply = match daemon.supervisor.checkpoint(comment).await {
                    Ok(made) => DaemonMsg::CheckpointCreated(CheckpointReport {
                        checkpoint: info(made.row),
                        frozen_ms: made.frozen.as_secs_f64() * 1e3,
                        total_ms: made.total.as_secs_f64() * 1e3,
                    }),
                    Err(e) => storage_error(e),
                };
                writer.send(reply).await?;
            }
            ClientMsg::CheckpointRestore { id } => {
                let reply = match daemon.supervisor.restore(id).await {
                    Ok(report) => DaemonMsg::Restored(report),
                    Err(e) => storage_error(e),
                };
                daemon.refresh_routes();
                writer.send(reply).await?;
            }
            ClientMsg::CheckpointList => {
                let storage = &daemon.storage;
                let reply = match storage.list().and_then(|rows| Ok((rows, storage.head()?))) {
                    Ok((rows, head)) => DaemonMsg::Checkpoints(CheckpointListing {
                        checkpoints: rows
                            .into_iter()
                            .filter(|r| r.state == "ready")
                            .map(info)
                            .collect(),
                        head,
                        now_ms: hull_checkpoint::catalog::now_ms(),
                    }),
                    Err(e) => storage_error(e),
                };
                writer.send(reply).await?;
            }
            ClientMsg::CheckpointDelete { id } => {
                let storage = daemon.storage.clone();
                let deleted = id.clone();
                let result =
                    tokio::task::spawn_blocking(move || storage.delete_checkpoint(&deleted))
                        .await
                        .map_err(|e| io::Error::other(e.to_string()))?;
                let reply = match result {
                    Ok(()) => DaemonMsg::CheckpointDeleted { id },
                    Err(e) => storage_error(e),
                };
                writer.send(reply).await?;
            }
            ClientMsg::Services(request) => {
                let reply = match daemon.services.request(request).await {
                    Ok(list) => DaemonMsg::Services(list),
                    Err(e) => {
                        let kind = match e {
                            hull_services::ServiceError::NotFound(_) => ErrorKind::NotFound,
                            _ => ErrorKind::Service,
                        };
                        error(kind, e.to_string())
                    }
                };
                daemon.refresh_routes();
                writer.send(reply).await?;
            }
            ClientMsg::Ports => {
                let pids = daemon.cgroups.inner.pids().unwrap_or_default();
                let report = daemon.network.report(&pids);
                writer.send(DaemonMsg::Ports(report)).await?
            }
            ClientMsg::Ingress => {
                writer
                    .send(DaemonMsg::Ingress(daemon.network.ingress_report()))
                    .await?
            }
            ClientMsg::Logs {
                source,
                follow,
                tail,
                stream,
                since_ms,
            } => {
                let filter = crate::logs::Filter { stream, since_ms };
                crate::logs::serve(&daemon.logs, &source, follow, tail, filter, reader, writer)
                    .await?
            }
            ClientMsg::Shutdown { grace_ms } => {
                daemon.shutdown(Duration::from_millis(grace_ms)).await;
                let sent = writer.send(DaemonMsg::ShuttingDown).await;
                daemon.exit();
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

fn info(row: hull_checkpoint::CheckpointRow) -> CheckpointInfo {
    CheckpointInfo {
        id: row.id,
        parent: row.parent,
        created_ms: row.created_ms,
        comment: row.comment,
        auto: row.auto,
        services: row.services,
    }
}

fn storage_error(e: StorageError) -> DaemonMsg {
    let kind = match e {
        StorageError::UnknownCheckpoint { .. } => ErrorKind::NotFound,
        _ => ErrorKind::Storage,
    };
    error(kind, e.to_string())
}

fn status(daemon: &Daemon) -> StatusReport {
    let p = daemon.supervisor.published();
    let inner = daemon.supervisor.current();
    StatusReport {
        daemon_pid: std::process::id() as i32,
        daemon_version: env!("CARGO_PKG_VERSION").to_string(),
        state: p.state,
        inner_pid: inner.as_ref().map(|i| i.pid),
        inner_uptime_ms: inner
            .as_ref()
            .map(|i| i.started.elapsed().as_millis() as u64),
        bounces: p.bounces,
        unplanned_restarts: p.unplanned_restarts,
        limits: Limits {
            memory_max_bytes: daemon.limits.memory_max_bytes,
            pids_max: daemon.limits.pids_max,
        },
        image: daemon.image.display().to_string(),
        state_dir: daemon.config.state_dir.display().to_string(),
        cgroup: daemon.cgroups.inner.display_path(),
        volume: {
            let v = daemon.storage.volume();
            match &v.image {
                Some(image) => format!(
                    "btrfs loop image {} at {}",
                    image.display(),
                    v.root.display()
                ),
                None => format!("btrfs at {}", v.root.display()),
            }
        },
        head: daemon.storage.head().ok().flatten(),
        last_error: p.last_error,
    }
}
