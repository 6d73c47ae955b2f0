//! The `exec` source: the non-interactive execs. Each has an id; its log
//! is a start record (the id and argv), its output lines tagged with the
//! id, for a stream that turned out not to be text a record of its size and
//! SHA-256 instead of its bytes, and an end record (exit and duration).
//!
//! The records are cut and written by one thread of the [`ExecLog`]: a
//! session runs on a tokio worker, and a process flooding its output would
//! otherwise have the workers formatting and writing millions of lines
//! (and rotating segments) while hulld's other requests wait. A session
//! never waits on that thread: output it has no room for is not logged,
//! and the end record says how much.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use hull_proto::{ExecTag, ExitStatus, LogMarker, LogRecord, Stream};
use sha2::{Digest, Sha256};

use crate::capture::LineSplitter;
use crate::store::{now_ms, LogStore, SourceLog};

pub use hull_proto::EXEC_SOURCE;

/// How many of the newest records are read at start for the last exec id.
const ID_SCAN: u64 = 1000;

/// The output waiting for the writer thread, in all execs: what hulld
/// holds for a log that fell behind, at most. An exec's output of less
/// than this is always logged whole, however far behind the writer is;
/// past it, output goes unlogged (and counted) rather than into hulld's
/// memory.
const QUEUE_BYTES: usize = 4 << 20;

/// Work for the writer thread, in the order each exec's recorder sent it.
enum Job {
    Start(LogRecord),
    Output {
        id: u64,
        stream: Stream,
        data: Vec<u8>,
        /// Output before this was not logged: the unfinished line it
        /// would have ended is written as it is, not joined to this.
        after_gap: bool,
    },
    End(End),
    /// Answered once everything sent before it is written.
    Sync(mpsc::Sender<()>),
    /// Runs on the writer thread (tests hold the writer up with it).
    #[cfg(test)]
    Run(Box<dyn FnOnce() + Send>),
}

struct End {
    id: u64,
    argv: Vec<String>,
    exit: Option<ExitStatus>,
    note: Option<String>,
    duration_ms: u64,
    /// Per stream: the bytes of output in all, and those not logged.
    bytes: [u64; 2],
    unlogged: [u64; 2],
    written: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The `exec` source, its ids, and the thread that writes it.
pub struct ExecLog {
    next: AtomicU64,
    queue: Queue,
}

/// The way to the writer thread: unbounded for the starts and ends (one
/// each per exec, never dropped), bounded in bytes for output.
#[derive(Clone)]
struct Queue {
    jobs: mpsc::Sender<Job>,
    /// Output bytes sent and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    limit: usize,
}

impl Queue {
    fn send(&self, job: Job) {
        // The writer only ends once every sender is gone.
        let _ = self.jobs.send(job);
    }

    /// Queues output unless the queue is full; false when it was not.
    fn try_output(&self, id: u64, stream: Stream, data: &[u8], after_gap: bool) -> bool {
        let len = data.len();
        let admitted = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + len <= self.limit).then_some(q + len)
            })
            .is_ok();
        if admitted {
            self.send(Job::Output {
                id,
                stream,
                data: data.to_vec(),
                after_gap,
            });
        }
        admitted
    }
}

impl ExecLog {
    /// Opens the `exec` source of `store` and starts its writer thread;
    /// ids go on after the highest one among its newest records. Reads
    /// files: call it off the runtime.
    pub fn open(store: &LogStore) -> io::Result<Self> {
        Self::with_queue(store, QUEUE_BYTES)
    }

    fn with_queue(store: &LogStore, limit: usize) -> io::Result<Self> {
        let log = store.source(EXEC_SOURCE)?;
        let cursor = store.tail_cursor(EXEC_SOURCE, ID_SCAN)?;
        let (records, _) = store.read_from(EXEC_SOURCE, cursor, usize::MAX)?;
        let last = records
            .iter()
            .filter_map(|r| r.exec.as_ref().map(|e| e.id))
            .max()
            .unwrap_or(0);
        let (jobs, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            log,
            queued: queued.clone(),
            execs: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("hull-exec-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(ExecLog {
            next: AtomicU64::new(last + 1),
            queue: Queue {
                jobs,
                queued,
                limit,
            },
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
        self.queue.send(Job::Start(LogRecord {
            ts_ms: now_ms(),
            stream: Stream::Stdout,
            line: format!("exec {id}: {command}"),
            marker: Some(LogMarker::ExecStart),
            exec: Some(ExecTag {
                id,
                argv: Some(argv.to_vec()),
                ..ExecTag::default()
            }),
        }));
        ExecRecorder {
            queue: self.queue.clone(),
            id,
            argv: argv.to_vec(),
            started: requested,
            bytes: [0; 2],
            unlogged: [0; 2],
            gap: [false; 2],
            ended: false,
        }
    }

    /// Waits until everything recorded so far is written (a shutdown, a
    /// test). Blocks: call it off the runtime.
    pub fn sync(&self) {
        let (tx, rx) = mpsc::channel();
        self.queue.send(Job::Sync(tx));
        let _ = rx.recv();
    }
}

/// One stream of an exec, on the writer thread: lines while it is text;
/// its hash always, for the record written if it is not.
struct StreamLog {
    /// None once a batch was not UTF-8: from then on only hashed.
    lines: Option<LineSplitter>,
    hash: Sha256,
}

impl StreamLog {
    fn new(id: u64) -> Self {
        StreamLog {
            lines: Some(LineSplitter::for_exec(id)),
            hash: Sha256::new(),
        }
    }
}

/// The writer thread's side: the running execs' streams.
struct Writer {
    log: Arc<SourceLog>,
    queued: Arc<AtomicUsize>,
    execs: HashMap<u64, [StreamLog; 2]>,
}

impl Writer {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        for job in jobs {
            match job {
                Job::Start(record) => {
                    let id = record.exec.as_ref().map_or(0, |e| e.id);
                    self.execs
                        .insert(id, [StreamLog::new(id), StreamLog::new(id)]);
                    self.log.append_record(record);
                }
                Job::Output {
                    id,
                    stream,
                    data,
                    after_gap,
                } => {
                    self.queued.fetch_sub(data.len(), Ordering::AcqRel);
                    if let Some(streams) = self.execs.get_mut(&id) {
                        let s = &mut streams[index(stream)];
                        s.hash.update(&data);
                        if let Some(lines) = &mut s.lines {
                            if after_gap {
                                lines.finish(stream, &self.log);
                            }
                            if !lines.push_text(&data, stream, &self.log) {
                                s.lines = None;
                            }
                        }
                    }
                }
                Job::End(end) => self.end(end),
                Job::Sync(done) => {
                    let _ = done.send(());
                }
                #[cfg(test)]
                Job::Run(f) => f(),
            }
        }
    }

    fn end(&mut self, end: End) {
        let id = end.id;
        let mut streams = self
            .execs
            .remove(&id)
            .unwrap_or_else(|| [StreamLog::new(id), StreamLog::new(id)]);
        for stream in [Stream::Stdout, Stream::Stderr] {
            let i = index(stream);
            let s = &mut streams[i];
            if let Some(lines) = &mut s.lines {
                if lines.finish_text(stream, &self.log) {
                    continue;
                }
            }
            let (bytes, unlogged) = (end.bytes[i], end.unlogged[i]);
            let name = match stream {
                Stream::Stdout => "stdout",
                Stream::Stderr => "stderr",
            };
            // A hash of only the bytes that reached the log would pass for
            // the output's: there is none when some did not.
            let sha256 =
                (unlogged == 0).then(|| format!("{:x}", std::mem::take(&mut s.hash).finalize()));
            let hash = match &sha256 {
                Some(h) => format!("sha256 {h}"),
                None => format!("no sha256: {unlogged} bytes went by while the log was behind"),
            };
            self.log.append_record(LogRecord {
                ts_ms: now_ms(),
                stream,
                line: format!(
                    "exec {id}: {name} is not text, not logged: {bytes} bytes in all, {hash}"
                ),
                marker: Some(LogMarker::ExecOutput),
                exec: Some(ExecTag {
                    id,
                    bytes: Some(bytes),
                    sha256,
                    ..ExecTag::default()
                }),
            });
        }
        let how = match end.exit {
            Some(status) => status.to_string(),
            None => "no exit status".to_string(),
        };
        let duration_ms = end.duration_ms;
        let note = end.note.map(|n| format!(" ({n})")).unwrap_or_default();
        let unlogged: u64 = end.unlogged.iter().sum();
        let behind = if unlogged > 0 {
            format!("; {unlogged} bytes of its output not logged: the log fell behind")
        } else {
            String::new()
        };
        self.log.append_record(LogRecord {
            ts_ms: now_ms(),
            stream: Stream::Stdout,
            line: format!("exec {id} ended: {how} after {duration_ms} ms{note}{behind}"),
            marker: Some(LogMarker::ExecEnd),
            exec: Some(ExecTag {
                id,
                argv: Some(end.argv),
                exit: end.exit,
                duration_ms: Some(duration_ms),
                unlogged_bytes: (unlogged > 0).then_some(unlogged),
                ..ExecTag::default()
            }),
        });
        if let Some(written) = end.written {
            let _ = written.send(());
        }
    }
}

/// The log of one running exec; [`ExecRecorder::finish`] writes its end,
/// and dropping it unfinished writes an end without an exit.
pub struct ExecRecorder {
    queue: Queue,
    id: u64,
    argv: Vec<String>,
    started: Instant,
    bytes: [u64; 2],
    unlogged: [u64; 2],
    /// Per stream: output was dropped since the last that was queued.
    gap: [bool; 2],
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

    /// Output of the exec, handed to the writer thread; never waits. When
    /// the writer is too far behind it is not logged, only counted.
    pub fn push(&mut self, stream: Stream, data: &[u8]) {
        let i = index(stream);
        let len = data.len() as u64;
        self.bytes[i] += len;
        if self.queue.try_output(self.id, stream, data, self.gap[i]) {
            self.gap[i] = false;
        } else {
            self.unlogged[i] += len;
            self.gap[i] = true;
        }
    }

    /// Ends the record: the last lines, a record per stream that was not
    /// text, and how and when the exec ended (`exit`, and `note` for what
    /// the exit does not say, such as a timeout). The future is ready once
    /// all of it is written, so that a client told of the exit finds it
    /// in the log; it need not be awaited.
    pub fn finish(
        mut self,
        exit: Option<ExitStatus>,
        note: Option<&str>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.end(exit, note, Some(tx));
        async move {
            let _ = rx.await;
        }
    }

    fn end(
        &mut self,
        exit: Option<ExitStatus>,
        note: Option<&str>,
        written: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        self.ended = true;
        let duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.queue.send(Job::End(End {
            id: self.id,
            argv: std::mem::take(&mut self.argv),
            exit,
            note: note.map(str::to_string),
            duration_ms,
            bytes: self.bytes,
            unlogged: self.unlogged,
            written,
        }));
    }
}

impl Drop for ExecRecorder {
    fn drop(&mut self) {
        if !self.ended {
            self.end(None, Some("the session ended before the process did"), None);
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
        drop(rec.finish(Some(ExitStatus::Code(3)), None));
        execs.sync();
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
        execs.sync();
        let (records, _) = store
            .read_from(EXEC_SOURCE, Cursor::default(), 100)
            .unwrap();
        let last = records.last().unwrap();
        assert_eq!(last.exec.as_ref().unwrap().id, 2);
        assert_eq!(last.marker, Some(LogMarker::ExecEnd));
    }

    /// The lines of exec records in `store`, and its end record.
    fn exec_lines(store: &LogStore) -> (Vec<String>, LogRecord) {
        let (records, _) = store
            .read_from(EXEC_SOURCE, Cursor::default(), usize::MAX)
            .unwrap();
        let end = records.last().unwrap().clone();
        assert_eq!(end.marker, Some(LogMarker::ExecEnd), "{end:?}");
        let lines = records
            .into_iter()
            .filter(|r| r.marker.is_none())
            .map(|r| r.line)
            .collect();
        (lines, end)
    }

    #[test]
    fn logs_exec_output_the_writer_has_no_room_for_is_counted_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path().to_path_buf(), LogLimits::default()).unwrap();
        // Room for two chunks, and a writer held up until the flood is over.
        let execs = ExecLog::with_queue(&store, 64).unwrap();
        let mut rec = execs.start(&["yes".to_string()], Instant::now());
        let (release, held) = mpsc::channel::<()>();
        execs.queue.send(Job::Run(Box::new(move || {
            let _ = held.recv();
        })));
        let chunk = b"y\n".repeat(16);
        let flood = Instant::now();
        for _ in 0..10_000 {
            rec.push(Stream::Stdout, &chunk);
        }
        assert!(
            flood.elapsed() < Duration::from_secs(1),
            "the flood waited {:?} on a writer that was held up",
            flood.elapsed()
        );
        release.send(()).unwrap();
        drop(rec.finish(Some(ExitStatus::Code(0)), None));
        execs.sync();
        let (lines, end) = exec_lines(&store);
        assert!(
            lines == vec!["y"; 32],
            "{} lines logged, not 32",
            lines.len()
        );
        let unlogged = (10_000 - 2) * 32;
        assert_eq!(end.exec.unwrap().unlogged_bytes, Some(unlogged));
        assert!(
            end.line.ends_with(&format!(
                "; {unlogged} bytes of its output not logged: the log fell behind"
            )),
            "{}",
            end.line
        );
    }

    #[test]
    fn logs_exec_lines_arrive_in_order_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path().to_path_buf(), LogLimits::default()).unwrap();
        let execs = ExecLog::open(&store).unwrap();
        let mut rec = execs.start(&["seq".to_string()], Instant::now());
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        // Chunks that cut lines anywhere.
        for chunk in text.as_bytes().chunks(1000 - 7) {
            rec.push(Stream::Stdout, chunk);
        }
        drop(rec.finish(Some(ExitStatus::Code(0)), None));
        execs.sync();
        let (lines, end) = exec_lines(&store);
        let want: Vec<String> = (0..20_000).map(|i| format!("line {i}")).collect();
        assert!(lines == want, "{} lines, out of order or lost", lines.len());
        assert_eq!(end.exec.unwrap().unlogged_bytes, None);
    }
}
