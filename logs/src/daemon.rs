//! hulld's own tracing output as a log source (`hull logs --daemon`).

use std::io::{self, Write};
use std::sync::Arc;

use hull_proto::Stream;

use crate::store::SourceLog;

pub use hull_proto::DAEMON_SOURCE;

static DAEMON_LOG: std::sync::OnceLock<Arc<SourceLog>> = std::sync::OnceLock::new();

/// From now on, hulld's tracing output also goes to `log`.
pub fn set_daemon_log(log: Arc<SourceLog>) {
    let _ = DAEMON_LOG.set(log);
}

/// A tracing writer for one event: collects the formatted text and, when
/// dropped, writes it whole to where it goes.
pub struct EventWriter {
    buf: Vec<u8>,
    to: Destination,
}

enum Destination {
    /// The `hulld` source (nothing before the store opens).
    DaemonLog,
    /// stderr, rotated when [`cap_stderr`] says so.
    Stderr,
}

impl EventWriter {
    pub fn daemon_log() -> Self {
        EventWriter {
            buf: Vec::new(),
            to: Destination::DaemonLog,
        }
    }

    pub fn stderr() -> Self {
        EventWriter {
            buf: Vec::new(),
            to: Destination::Stderr,
        }
    }
}

impl Write for EventWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        match self.to {
            Destination::DaemonLog => {
                if let Some(log) = DAEMON_LOG.get() {
                    let text = String::from_utf8_lossy(&self.buf);
                    let lines: Vec<&str> = text.lines().collect();
                    log.append_many(Stream::Stderr, &lines);
                }
            }
            Destination::Stderr => write_stderr(&self.buf),
        }
    }
}

/// hulld's stderr, when it is a file (`hull up` points it at
/// `state_dir/hulld.log`), rotated like a source: at `segment_max` the file
/// becomes `<name>.1` (older ones shift up, the oldest beyond `source_max`
/// go) and a new one takes fd 2. Until [`cap_stderr`] it is written as is.
static STDERR_CAP: std::sync::OnceLock<std::sync::Mutex<StderrCap>> = std::sync::OnceLock::new();

struct StderrCap {
    limits: crate::LogLimits,
    /// Bytes written since the file's size was last looked at.
    written: u64,
}

/// From now on, hulld's stderr is rotated and capped by `limits` if it is
/// a regular file.
pub fn cap_stderr(limits: crate::LogLimits) {
    let _ = STDERR_CAP.set(std::sync::Mutex::new(StderrCap { limits, written: 0 }));
}

/// Writes one event to stderr and rotates the file behind it when due.
fn write_stderr(buf: &[u8]) {
    let Some(cap) = STDERR_CAP.get() else {
        let _ = io::stderr().write_all(buf);
        return;
    };
    // One event at a time, so a rotation never splits one.
    let mut cap = cap
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let _ = io::stderr().write_all(buf);
    cap.written += buf.len() as u64;
    // Looked at every 64 KiB written, not on every event.
    if cap.written >= (64 << 10).min(cap.limits.segment_max) {
        cap.written = 0;
        if let Err(e) = rotate_stderr(&cap.limits) {
            let _ = writeln!(io::stderr(), "hulld: cannot rotate its log: {e}");
        }
    }
}

/// Rotates the file on fd 2 once it reaches the segment size. A few
/// syscalls every few MiB of log, under the writer's lock.
fn rotate_stderr(limits: &crate::LogLimits) -> io::Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let meta = std::fs::File::from(io::stderr().as_fd().try_clone_to_owned()?).metadata()?;
    if !meta.file_type().is_file() || meta.len() < limits.segment_max {
        return Ok(());
    }
    let path = std::fs::read_link("/proc/self/fd/2")?;
    let name = |n: u64| {
        let mut p = path.clone().into_os_string();
        p.push(format!(".{n}"));
        std::path::PathBuf::from(p)
    };
    // The current file counts as one segment of the cap.
    let keep = (limits.source_max / limits.segment_max.max(1))
        .saturating_sub(1)
        .max(1);
    let _ = std::fs::remove_file(name(keep));
    for n in (1..keep).rev() {
        let _ = std::fs::rename(name(n), name(n + 1));
    }
    std::fs::rename(&path, name(1))?;
    let fresh = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(meta.mode() & 0o777)
        .open(&path)?;
    // SAFETY: dup2 onto fd 2, which stays open throughout; `fresh` is a
    // valid fd closed when dropped, leaving its duplicate on fd 2.
    if unsafe { libc::dup2(fresh.as_raw_fd(), 2) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
