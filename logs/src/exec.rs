//! The `exec` source: the non-interactive execs. Each has an id; its log
//! is a start record (the id and argv), its output lines tagged with the
//! id, for a stream that turned out not to be text a record of its size and
//! SHA-256 instead of its bytes, and an end record (exit and duration).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hull_proto::{ExecTag, ExitStatus, LogMarker, LogRecord, Stream};
use sha2::{Digest, Sha256};

use crate::capture::LineSplitter;
use crate::store::{now_ms, LogStore, SourceLog};

/// The log source of non-interactive execs (`hull logs exec`).
pub const EXEC_SOURCE: &str = "exec";

/// How many of the newest records are read at start for the last exec id.
const ID_SCAN: u64 = 1000;

/// The `exec` source and its ids.
pub struct ExecLog {
    log: Arc<SourceLog>,
    next: AtomicU64,
}

impl ExecLog {
    /// Opens the `exec` source of `store`; ids go on after the highest one
    /// among its newest records. Reads files: call it off the runtime.
    pub fn open(store: &LogStore) -> io::Result<Self> {
        let log = store.source(EXEC_SOURCE)?;
        let cursor = store.tail_cursor(EXEC_SOURCE, ID_SCAN)?;
        let (records, _) = store.read_from(EXEC_SOURCE, cursor, usize::MAX)?;
        let last = records
            .iter()
            .filter_map(|r| r.exec.as_ref().map(|e| e.id))
            .max()
            .unwrap_or(0);
        Ok(ExecLog {
            log,
            next: AtomicU64::new(last + 1),
        })
    }

    /// Records the start of an exec of `argv`, asked for at `requested`,
    /// and returns its recorder. The duration runs from `requested`: the
    /// process is already running by the time the start is known, so
    /// timing from then would report less than the process took.
    pub fn start(&self, argv: &[String], requested: Instant) -> ExecRecorder {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let command = shlex::try_join(argv.iter().map(String::as_str))
            .unwrap_or_else(|_| format!("{argv:?}"));
        self.log.append_record(LogRecord {
            ts_ms: now_ms(),
            stream: Stream::Stdout,
            line: format!("exec {id}: {command}"),
            marker: Some(LogMarker::ExecStart),
            exec: Some(ExecTag {
                id,
                argv: Some(argv.to_vec()),
                ..ExecTag::default()
            }),
        });
        ExecRecorder {
            log: self.log.clone(),
            id,
            argv: argv.to_vec(),
            started: requested,
            streams: [StreamLog::new(id), StreamLog::new(id)],
            ended: false,
        }
    }
}

/// One stream of an exec: lines while it is text; its size and hash
/// always, for the record written if it is not.
struct StreamLog {
    /// None once a batch was not UTF-8: from then on only counted.
    lines: Option<LineSplitter>,
    hash: Sha256,
    bytes: u64,
}

impl StreamLog {
    fn new(id: u64) -> Self {
        StreamLog {
            lines: Some(LineSplitter::for_exec(id)),
            hash: Sha256::new(),
            bytes: 0,
        }
    }
}

/// The log of one running exec; [`ExecRecorder::finish`] writes its end,
/// and dropping it unfinished writes an end without an exit.
pub struct ExecRecorder {
    log: Arc<SourceLog>,
    id: u64,
    argv: Vec<String>,
    started: Instant,
    streams: [StreamLog; 2],
    ended: bool,
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl ExecRecorder {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Output of the exec: logged as lines while the stream is text.
    pub fn push(&mut self, stream: Stream, data: &[u8]) {
        let s = &mut self.streams[index(stream)];
        s.hash.update(data);
        s.bytes += data.len() as u64;
        if let Some(lines) = &mut s.lines {
            if !lines.push_text(data, stream, &self.log) {
                s.lines = None;
            }
        }
    }

    /// Writes the end: the last lines, a record per stream that was not
    /// text, and how and when the exec ended (`exit`, and `note` for what
    /// the exit does not say, such as a timeout).
    pub fn finish(mut self, exit: Option<ExitStatus>, note: Option<&str>) {
        self.end(exit, note);
    }

    fn end(&mut self, exit: Option<ExitStatus>, note: Option<&str>) {
        self.ended = true;
        let id = self.id;
        for stream in [Stream::Stdout, Stream::Stderr] {
            let s = &mut self.streams[index(stream)];
            if let Some(lines) = &mut s.lines {
                if lines.finish_text(stream, &self.log) {
                    continue;
                }
            }
            let sha256 = format!("{:x}", std::mem::take(&mut s.hash).finalize());
            let name = match stream {
                Stream::Stdout => "stdout",
                Stream::Stderr => "stderr",
            };
            self.log.append_record(LogRecord {
                ts_ms: now_ms(),
                stream,
                line: format!(
                    "exec {id}: {name} is not text, not logged: {} bytes in all, sha256 {sha256}",
                    s.bytes
                ),
                marker: Some(LogMarker::ExecOutput),
                exec: Some(ExecTag {
                    id,
                    bytes: Some(s.bytes),
                    sha256: Some(sha256),
                    ..ExecTag::default()
                }),
            });
        }
        let duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let how = match exit {
            Some(status) => status.to_string(),
            None => "no exit status".to_string(),
        };
        let note = note.map(|n| format!(" ({n})")).unwrap_or_default();
        self.log.append_record(LogRecord {
            ts_ms: now_ms(),
            stream: Stream::Stdout,
            line: format!("exec {id} ended: {how} after {duration_ms} ms{note}"),
            marker: Some(LogMarker::ExecEnd),
            exec: Some(ExecTag {
                id,
                argv: Some(std::mem::take(&mut self.argv)),
                exit,
                duration_ms: Some(duration_ms),
                ..ExecTag::default()
            }),
        });
    }
}

impl Drop for ExecRecorder {
    fn drop(&mut self) {
        if !self.ended {
            self.end(None, Some("the session ended before the process did"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Cursor, LogLimits};
    use std::time::Duration;

    #[test]
    fn logs_exec_text_is_lines_and_binary_is_size_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path().to_path_buf(), LogLimits::default()).unwrap();
        let execs = ExecLog::open(&store).unwrap();
        let argv = vec!["sh".to_string(), "-c".to_string(), "x y".to_string()];
        // The request went out 300 ms before the start was known; the
        // duration covers it.
        let requested = Instant::now() - Duration::from_millis(300);
        let mut rec = execs.start(&argv, requested);
        rec.push(Stream::Stdout, b"text line\nsecond");
        rec.push(Stream::Stderr, b"\xff\xfe\x00binary\n");
        rec.finish(Some(ExitStatus::Code(3)), None);
        let (records, _) = store
            .read_from(EXEC_SOURCE, Cursor::default(), 100)
            .unwrap();
        let lines: Vec<&str> = records.iter().map(|r| r.line.as_str()).collect();
        let hash = format!("{:x}", Sha256::digest(b"\xff\xfe\x00binary\n"));
        assert_eq!(lines[0], "exec 1: sh -c 'x y'");
        assert_eq!(lines[1..3], ["text line", "second"]);
        assert_eq!(
            lines[3],
            format!("exec 1: stderr is not text, not logged: 10 bytes in all, sha256 {hash}")
        );
        assert!(lines[4].starts_with("exec 1 ended: exit code 3 after "));
        assert!(records.iter().all(|r| r.exec.as_ref().unwrap().id == 1));
        let end = records[4].exec.as_ref().unwrap();
        assert_eq!(end.exit, Some(ExitStatus::Code(3)));
        assert_eq!(end.argv.as_deref(), Some(&argv[..]));
        assert!(end.duration_ms.unwrap() >= 300, "{end:?}");
        // Ids go on after those already in the log, and an unfinished
        // recorder still ends its exec.
        let execs = ExecLog::open(&store).unwrap();
        drop(execs.start(&argv, Instant::now()));
        let (records, _) = store
            .read_from(EXEC_SOURCE, Cursor::default(), 100)
            .unwrap();
        let last = records.last().unwrap();
        assert_eq!(last.exec.as_ref().unwrap().id, 2);
        assert_eq!(last.marker, Some(LogMarker::ExecEnd));
    }
}
