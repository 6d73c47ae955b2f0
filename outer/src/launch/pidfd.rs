//! The inner init through its pidfd: signalled and reaped by a handle that
//! never points at another process, even once its pid is reused.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use hull_proto::{fdpass, ExitStatus};
use tokio::sync::{mpsc, watch};

pub(super) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn pidfd_send_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, a NULL siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps the init through its pidfd (it is our child: hulld is a child
/// subreaper and the helper that forked it has exited).
pub(super) fn reap_pidfd(pidfd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own pidfd with a valid siginfo pointer.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded, so si_pid/si_status are initialised.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        ExitStatus::Code(status)
    } else {
        ExitStatus::Signal(status)
    }))
}

pub(super) async fn watch_exit(
    pidfd: OwnedFd,
    generation: u64,
    exit_tx: watch::Sender<Option<ExitStatus>>,
    on_exit: mpsc::UnboundedSender<(u64, ExitStatus)>,
) {
    let status = match fdpass::register_async(pidfd) {
        Ok(afd) => loop {
            let Ok(mut guard) = afd.readable().await else {
                break ExitStatus::Signal(0);
            };
            match reap_pidfd(afd.get_ref()) {
                Ok(Some(status)) => break status,
                Ok(None) => guard.clear_ready(),
                Err(_) => break ExitStatus::Signal(0),
            }
        },
        Err(_) => ExitStatus::Signal(0),
    };
    let _ = exit_tx.send(Some(status));
    let _ = on_exit.send((generation, status));
}
