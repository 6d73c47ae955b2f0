//! hulld's own tracing output as a log source (`hull logs --daemon`).

use std::io::{self, Write};
use std::sync::Arc;

use hull_proto::Stream;

use crate::store::SourceLog;

/// The log source of hulld's own tracing output (`hull logs --daemon`).
pub const DAEMON_SOURCE: &str = "hulld";

static DAEMON_LOG: std::sync::OnceLock<Arc<SourceLog>> = std::sync::OnceLock::new();

/// From now on, hulld's tracing output also goes to `log`.
pub fn set_daemon_log(log: Arc<SourceLog>) {
    let _ = DAEMON_LOG.set(log);
}

/// A tracing writer for one event: collects the formatted text and appends
/// it to the `hulld` source when dropped (nothing before the store opens).
#[derive(Default)]
pub struct DaemonLogWriter {
    buf: Vec<u8>,
}

impl DaemonLogWriter {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Write for DaemonLogWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for DaemonLogWriter {
    fn drop(&mut self) {
        if let Some(log) = DAEMON_LOG.get() {
            let text = String::from_utf8_lossy(&self.buf);
            let lines: Vec<&str> = text.lines().collect();
            log.append_many(Stream::Stderr, &lines);
        }
    }
}
