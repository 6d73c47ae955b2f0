//! The service manager's view of the world outside it: a running inner that
//! can start and signal processes, and the inner's listening ports.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::time::Instant;

use hull_proto::{ExecSpec, ExitStatus, SpawnErrorKind};

/// A process started in the inner for a service.
pub struct HostProcess {
    /// The exec id: what [`InnerHost::kill`] signals.
    pub id: u64,
    /// The pid inside the inner.
    pub pid: i32,
    /// [stdin writer, stdout reader, stderr reader].
    pub fds: Vec<OwnedFd>,
    /// Resolves with the exit status, or `None` when the inner went away
    /// first (every process died with it).
    pub exit: Pin<Box<dyn Future<Output = Option<ExitStatus>> + Send>>,
}

/// Why a service's process did not start.
#[derive(Debug)]
pub enum SpawnFailure {
    /// The inner refused (missing program, bad cwd, unknown user).
    Refused(SpawnErrorKind, String),
    /// The inner stopped before it could.
    InnerGone,
}

/// Why an inner was started: what the services' logs mark before their
/// first output on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InnerCause {
    /// hulld started it (its start, or a retry after a failed start).
    Boot,
    Bounce,
    /// Restored to this checkpoint.
    Restore(String),
    /// The previous inner's init died.
    Recovery,
}

/// One running inner, as the service manager uses it.
pub trait InnerHost: Send + Sync + 'static {
    /// A different value means a different inner: every process of the
    /// previous one is gone.
    fn generation(&self) -> u64;

    /// Why this inner was started.
    fn cause(&self) -> InnerCause {
        InnerCause::Boot
    }

    /// Starts `spec` with pipes for its stdio.
    fn spawn(
        &self,
        spec: ExecSpec,
    ) -> impl Future<Output = Result<HostProcess, SpawnFailure>> + Send;

    /// Signals the process group of exec `id`; a gone process is no error.
    fn kill(&self, id: u64, signal: i32) -> impl Future<Output = ()> + Send;
}

/// Where readiness comes from: the TCP ports the inner listens on.
pub trait PortProbe: Send + Sync + 'static {
    /// The listening ports as of a scan that began at or after `since`, or
    /// `None` when no such scan has happened yet (and one is asked for):
    /// an older scan could still list a port of the previous inner.
    fn listening_since(&self, since: Instant) -> Option<Vec<u16>>;
}
