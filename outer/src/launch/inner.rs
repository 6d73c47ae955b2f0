//! The handle to one running inner container, as the supervisor, the
//! sessions and the service manager hold it.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lock;
use hull_proto::{ExecSpec, ExitStatus};
use hull_services::SpawnFailure;
use tokio::sync::watch;

use super::init_link::InitLink;
use super::pidfd::pidfd_send_signal;

/// One running inner container.
pub struct Inner {
    pub pid: i32,
    pub generation: u64,
    pub started: Instant,
    /// Time from the helper's spawn to the init's Ready.
    pub start_time: Duration,
    pub link: Arc<InitLink>,
    /// Signals go through the pidfd: the init's pid could be reused once
    /// it has been reaped, the pidfd never points elsewhere.
    pub(super) pidfd: OwnedFd,
    pub(super) exit: watch::Receiver<Option<ExitStatus>>,
    pub(super) stop_reason: Mutex<Option<String>>,
    /// Why it was started, for the services' logs.
    pub(super) cause: hull_services::InnerCause,
    /// The inner's mount namespace, held so that the init's exit does not
    /// unmount its root: unmounting an overlay whose files were touched
    /// frees every cached dentry (a third of a second after 100k files),
    /// and a stop need not wait for that. See [`Inner::take_mount_ns`].
    pub(super) mount_ns: Mutex<Option<std::fs::File>>,
    /// The ids its user namespace maps (none: its root is the VM's).
    pub(super) user_namespace: Option<hull_proto::IdMapping>,
}

impl Inner {
    /// The held mount namespace; dropping it unmounts the inner's root
    /// filesystem (in the dropping thread) once the init is gone.
    pub fn take_mount_ns(&self) -> Option<std::fs::File> {
        lock(&self.mount_ns).take()
    }

    /// The inner's `/` as an `O_PATH` directory fd, opened through the
    /// init's /proc entry, so it is the root the inner sees (its mount
    /// namespace, its mounts).
    pub fn open_root(&self) -> io::Result<OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        let root = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(format!("/proc/{}/root", self.pid))?;
        // Alive after the open: the pid was still the init's when opened
        // (a pid is reused only after hulld reaps it).
        pidfd_send_signal(&self.pidfd, 0)?;
        Ok(root.into())
    }

    /// The host uid and gid of the inner's root user: what a file hulld
    /// makes in the inner on the user's behalf is owned by.
    pub fn root_owner(&self) -> hull_inner::files::Owner {
        let base = self.user_namespace.map_or(0, |ids| ids.base);
        hull_inner::files::Owner {
            uid: base,
            gid: base,
        }
    }

    /// Sends `signal` to the init (ESRCH once it is gone, which is fine).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        pidfd_send_signal(&self.pidfd, signal)
    }

    /// Why the inner stopped, for sessions that it ended.
    pub fn stop_reason(&self) -> String {
        lock(&self.stop_reason)
            .clone()
            .unwrap_or_else(|| "the inner's init died".to_string())
    }

    pub fn set_stop_reason(&self, reason: &str) {
        *lock(&self.stop_reason) = Some(reason.to_string());
    }

    /// Waits until the init has exited and been reaped.
    pub async fn wait_exit(&self) -> Option<ExitStatus> {
        let mut exit = self.exit.clone();
        let result = exit.wait_for(|s| s.is_some()).await;
        result.ok().and_then(|s| *s)
    }
}

/// Opens the init's mount namespace. Without it (no /proc, or a kernel
/// that refuses) the inner works the same, its stop just waits for the
/// unmount.
pub(super) fn hold_mount_ns(pid: i32, pidfd: &OwnedFd) -> Option<std::fs::File> {
    let path = format!("/proc/{pid}/ns/mnt");
    match std::fs::File::open(&path) {
        // Alive after the open: the pid was still the init's when opened
        // (a pid is reused only after hulld reaps it).
        Ok(ns) if pidfd_send_signal(pidfd, 0).is_ok() => Some(ns),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(path, error = %e, "cannot hold the inner's mount namespace");
            None
        }
    }
}

/// The service manager starts services through the init link, like execs.
impl hull_services::InnerHost for Inner {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn cause(&self) -> hull_services::InnerCause {
        self.cause.clone()
    }

    async fn spawn(&self, spec: ExecSpec) -> Result<hull_services::HostProcess, SpawnFailure> {
        let mut process = self.link.spawn(spec).await?;
        let fds = std::mem::take(&mut process.fds);
        let (id, pid) = (process.id, process.pid);
        // The process guard moves into the future: its session stays
        // registered on the link until the exit is seen.
        let exit = Box::pin(async move { process.wait_exit().await });
        Ok(hull_services::HostProcess { id, pid, fds, exit })
    }

    async fn kill(&self, id: u64, signal: i32) {
        self.link.kill(id, signal).await;
    }
}
