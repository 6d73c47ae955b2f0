//! Waiting for the OOM killer in a group, without polling its counter in
//! a loop: v2 notifies a poll(2) for POLLPRI on `memory.events` whenever
//! the file changes; v1 signals an eventfd registered through
//! `cgroup.event_control` for `memory.oom_control` whenever the group runs
//! out of memory. Either way the caller then reads
//! [`crate::Cgroup::oom_kills`]. Blocking: a thread of its own.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::error::{CgroupError, Result};
use crate::fs;

/// A registration for a group's OOM notifications.
pub struct OomWatch(Kind);

enum Kind {
    V2(File),
    /// The eventfd, and `memory.oom_control`, kept open for as long as the
    /// registration that names both.
    V1 {
        efd: EventFd,
        _oom_control: File,
    },
}

fn watch_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::WatchOom {
        path: path.to_path_buf(),
        source,
    }
}

impl OomWatch {
    /// v2: `memory.events` of the group `dir`.
    pub(crate) fn v2(dir: &Path) -> Result<Self> {
        let path = dir.join("memory.events");
        let file = File::open(&path).map_err(watch_err(&path))?;
        Ok(OomWatch(Kind::V2(file)))
    }

    /// v1: the memory controller's directory `dir` of the group.
    pub(crate) fn v1(dir: &Path) -> Result<Self> {
        let control: PathBuf = dir.join("memory.oom_control");
        let oom_control = File::open(&control).map_err(watch_err(&control))?;
        let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| watch_err(&control)(e.into()))?;
        let register = dir.join("cgroup.event_control");
        let line = format!("{} {}", efd.as_raw_fd(), oom_control.as_raw_fd());
        fs::write(&register, &line).map_err(watch_err(&register))?;
        Ok(OomWatch(Kind::V1 {
            efd,
            _oom_control: oom_control,
        }))
    }

    /// Blocks until the kernel reports out-of-memory activity in the group
    /// or `timeout` passes: true when it reported. Either may come without
    /// a kill (v2 reports every change of `memory.events`, v1 every time
    /// the group hits its limit), so the caller compares the kill count.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<bool> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match &self.0 {
            Kind::V2(file) => {
                // Reading through the fd arms (and re-arms) the notification.
                let mut buf = [0u8; 512];
                file.read_at(&mut buf, 0)?;
                let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(n) => Ok(n > 0),
                    Err(nix::errno::Errno::EINTR) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
            Kind::V1 { efd, .. } => {
                let mut fds = [PollFd::new(efd.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(false),
                    Ok(_) => {
                        // Resets the counter; EAGAIN if another read won.
                        let _ = efd.read();
                        Ok(true)
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}
