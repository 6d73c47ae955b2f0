//! The log pipeline's store: every service's output, line-framed with a
//! timestamp and stream, in segment files per source under
//! `<state>/logs/<source>/`, rotated by size with a cap per source (oldest
//! segments go first, and the drop is itself recorded). Lives in the root
//! namespace, so logs survive every bounce, restore and crash of the inner.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hull_proto::{LogMarker, LogRecord, Stream};
use tokio::sync::watch;

/// Locks a mutex, taking over a poisoned one: every critical section here
/// leaves the state whole (a write either landed or did not), so the
/// panic of another thread is no reason to lose the log.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Lines longer than this are split: a process printing without newlines
/// must not make hulld buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;
/// Milliseconds since the Unix epoch: the timestamp of every record.
pub use hull_proto::now_ms;

/// How much of a source's log is kept: the `[logs]` config table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// A segment is closed and a new one started at this size.
    pub segment_max: u64,
    /// All of a source's segments; the oldest go first beyond it.
    pub source_max: u64,
    /// The cap of the `exec` source instead of `source_max`: every exec
    /// shares it, so its own cap keeps a flood of exec output apart from
    /// the services' history.
    pub exec_max: u64,
    /// Sources kept on disk at most: each costs up to `source_max` and an
    /// fd while written, and a source is made by every service added.
    pub max_sources: usize,
}

/// Sources by default: the services hulld keeps at most, `exec`, `hulld`,
/// and room for the logs of services a restore brings back.
pub const MAX_SOURCES: usize = 512;

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            segment_max: 8 << 20,
            source_max: 64 << 20,
            max_sources: MAX_SOURCES,
            exec_max: 32 << 20,
        }
    }
}

impl LogLimits {
    /// The cap of `source`, and the config key that sets it.
    fn cap_of(&self, source: &str) -> (u64, &'static str) {
        if source == crate::exec::EXEC_SOURCE {
            (self.exec_max, "logs.max_exec")
        } else {
            (self.source_max, "logs.max_per_source")
        }
    }
}
/// Buffered records reach the file (the page cache) at least this often,
/// so a kill -9 of hulld loses at most this much.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Each source's write buffer. Lines reach it a batch at a time and the
/// flusher empties it every [`FLUSH_EVERY`]; 512 sources of a larger one
/// would be a large part of hulld's memory.
const WRITE_BUFFER: usize = 64 * 1024;

pub(crate) fn segment_name(n: u64) -> String {
    format!("{n:08}.log")
}

/// The segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> Vec<u64> {
    let mut nums: Vec<u64> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    nums.sort_unstable();
    nums
}

/// [`LogRecord`] without the copy of the line.
#[derive(serde::Serialize)]
struct LogRecordRef<'a> {
    ts_ms: i64,
    stream: Stream,
    line: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exec: Option<ExecId>,
}

/// The [`hull_proto::ExecTag`] of an exec's output line: its id only.
#[derive(serde::Serialize)]
struct ExecId {
    id: u64,
}

struct Writer {
    file: BufWriter<File>,
    segment: u64,
    size: u64,
    /// Reused for encoding each record.
    scratch: Vec<u8>,
    /// Lines lost to write errors since the last successful write.
    dropped: u64,
}

impl Writer {
    fn write(&mut self, record: &[u8]) -> bool {
        // A failed write may leave part of the record in the buffer; the
        // reader skips a line that does not decode.
        let ok = self.file.write_all(record).is_ok();
        if ok {
            self.size += record.len() as u64;
        }
        ok
    }
}

/// Encodes one record (an output line of exec `exec`, if given) as a JSON
/// line into `buf`.
fn encode(buf: &mut Vec<u8>, ts_ms: i64, stream: Stream, line: &str, exec: Option<u64>) -> bool {
    buf.clear();
    if !needs_escape(line.as_bytes()) {
        // The common line, written as serde_json would write it: escaping
        // byte by byte was a fifth of hulld's time under a firehose.
        let stream = match stream {
            Stream::Stdout => "Stdout",
            Stream::Stderr => "Stderr",
        };
        // Into the buffer directly: no String per line.
        let _ = write!(buf, "{{\"ts_ms\":{ts_ms},\"stream\":\"");
        buf.extend_from_slice(stream.as_bytes());
        buf.extend_from_slice(b"\",\"line\":\"");
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'"');
        if let Some(id) = exec {
            let _ = write!(buf, ",\"exec\":{{\"id\":{id}}}");
        }
        buf.extend_from_slice(b"}\n");
        return true;
    }
    let record = LogRecordRef {
        ts_ms,
        stream,
        line,
        exec: exec.map(|id| ExecId { id }),
    };
    if serde_json::to_writer(&mut *buf, &record).is_err() {
        return false;
    }
    buf.push(b'\n');
    true
}

/// Whether JSON needs any byte of `bytes` escaped: a quote, a backslash or
/// a control character. Without an early exit the loop vectorises.
fn needs_escape(bytes: &[u8]) -> bool {
    bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

/// One source's log (a service, for now).
pub struct SourceLog {
    dir: PathBuf,
    limits: LogLimits,
    /// This source's cap (`limits.source_max` or `limits.exec_max`) and
    /// the config key that sets it, for the note about a drop.
    cap: (u64, &'static str),
    writer: Mutex<Writer>,
    /// Bumped on every append, for followers.
    appended: watch::Sender<u64>,
}

impl SourceLog {
    pub(crate) fn open(dir: PathBuf, limits: LogLimits) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        let segment = segments(&dir).last().copied().unwrap_or(1);
        let path = dir.join(segment_name(segment));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        let cap = limits.cap_of(dir.file_name().and_then(|n| n.to_str()).unwrap_or(""));
        Ok(SourceLog {
            dir,
            limits,
            cap,
            writer: Mutex::new(Writer {
                file: BufWriter::with_capacity(WRITE_BUFFER, file),
                segment,
                size,
                scratch: Vec::new(),
                dropped: 0,
            }),
            appended: watch::channel(0).0,
        })
    }

    /// Appends one record. A write error (a full disk) drops the line; the
    /// service is never blocked on its log.
    pub fn append(&self, stream: Stream, line: &str) {
        self.append_many(stream, &[line]);
    }

    /// Appends records under one lock and one wake-up of followers. Lines
    /// that cannot be written (a full disk) are counted, and the count is
    /// written into the log as soon as writing works again.
    pub fn append_many(&self, stream: Stream, lines: &[&str]) {
        self.append_lines(stream, lines, None);
    }

    /// [`Self::append_many`] for the output of exec `exec`, if given.
    pub fn append_lines(&self, stream: Stream, lines: &[&str], exec: Option<u64>) {
        let ts_ms = now_ms();
        let mut w = lock(&self.writer);
        let mut scratch = std::mem::take(&mut w.scratch);
        for line in lines {
            if w.dropped > 0 {
                let note = format!(
                    "hull: {} log lines were lost: the log could not be written",
                    w.dropped
                );
                if encode(&mut scratch, ts_ms, Stream::Stderr, &note, None) && w.write(&scratch) {
                    w.dropped = 0;
                }
            }
            if !encode(&mut scratch, ts_ms, stream, line, exec) {
                continue;
            }
            if !w.write(&scratch) {
                w.dropped += 1;
            }
            if w.size >= self.limits.segment_max {
                self.rotate(&mut w);
            }
        }
        w.scratch = scratch;
        drop(w);
        self.appended.send_modify(|n| *n += 1);
    }

    /// Appends a marker: a record of something that happened to the
    /// source (it started, the inner was bounced), `text` saying what.
    pub fn append_marker(&self, marker: LogMarker, text: &str) {
        self.append_record(LogRecord {
            ts_ms: now_ms(),
            stream: Stream::Stdout,
            line: text.to_string(),
            marker: Some(marker),
            exec: None,
        });
    }

    /// Appends a record as it is (markers with more to say than text).
    pub fn append_record(&self, record: LogRecord) {
        let Ok(mut bytes) = serde_json::to_vec(&record) else {
            return;
        };
        bytes.push(b'\n');
        let mut w = lock(&self.writer);
        if !w.write(&bytes) {
            w.dropped += 1;
        }
        if w.size >= self.limits.segment_max {
            self.rotate(&mut w);
        }
        drop(w);
        self.appended.send_modify(|n| *n += 1);
    }

    fn rotate(&self, w: &mut Writer) {
        // Lines still in the buffer (the disk is full) would go with the
        // old writer, uncounted: rotate once they are on disk. Until then
        // every append tries again, and lines that do not fit are counted.
        if w.file.flush().is_err() {
            return;
        }
        let next = w.segment + 1;
        let Ok(file) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(segment_name(next)))
        else {
            return;
        };
        w.file = BufWriter::with_capacity(WRITE_BUFFER, file);
        w.segment = next;
        w.size = 0;
        // Enforce the cap, oldest first, and say so in the log itself.
        let nums = segments(&self.dir);
        let mut total: u64 = nums
            .iter()
            .filter_map(|n| fs::metadata(self.dir.join(segment_name(*n))).ok())
            .map(|m| m.len())
            .sum();
        let mut dropped = 0u64;
        for n in nums {
            if total <= self.cap.0 || n == next {
                break;
            }
            let path = self.dir.join(segment_name(n));
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if fs::remove_file(&path).is_ok() {
                total -= len;
                dropped += len;
            }
        }
        if dropped > 0 {
            let note = format!(
                "hull: dropped {dropped} bytes of the oldest log lines (this log is capped at {}; {} in the config)",
                human_size(self.cap.0),
                self.cap.1
            );
            let mut record = Vec::new();
            if encode(&mut record, now_ms(), Stream::Stderr, &note, None) {
                w.write(&record);
            }
        }
    }

    pub(crate) fn flush(&self) {
        let _ = lock(&self.writer).file.flush();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
}

/// 64 MiB, 512 KiB, 1000 bytes: sizes as a user wrote them in the config.
fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// The error for a source name [`hull_proto::valid_name`] refuses.
pub fn invalid_source(source: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{source:?} is not a log source name: a service's name, \"exec\" or \"hulld\" ({})",
            hull_proto::NAME_RULE
        ),
    )
}

/// Where a reader is in a source's segments.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cursor {
    segment: u64,
    offset: u64,
}

pub struct LogStore {
    root: PathBuf,
    limits: LogLimits,
    sources: Mutex<Sources>,
}

/// The sources open for writing, and every source with a directory.
#[derive(Default)]
struct Sources {
    open: HashMap<String, Arc<SourceLog>>,
    on_disk: HashSet<String>,
}

impl LogStore {
    pub fn open(root: PathBuf, limits: LogLimits) -> io::Result<Arc<Self>> {
        fs::create_dir_all(&root)?;
        let on_disk = fs::read_dir(&root)?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        let store = Arc::new(LogStore {
            root,
            limits,
            sources: Mutex::new(Sources {
                open: HashMap::new(),
                on_disk,
            }),
        });
        // Flushing writes files: a thread of its own, never a runtime worker.
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("hull-log-flush".into())
            .spawn(move || loop {
                std::thread::sleep(FLUSH_EVERY);
                let Some(store) = weak.upgrade() else { return };
                store.flush();
            })?;
        Ok(store)
    }

    /// The directory of `source`. A name with a '/', a NUL or a leading
    /// dot would reach outside the store: refused here whoever asks.
    fn dir(&self, source: &str) -> io::Result<PathBuf> {
        if !hull_proto::valid_name(source) {
            return Err(invalid_source(source));
        }
        Ok(self.root.join(source))
    }

    /// The log of `source`, created on first use; refused when it would
    /// be one source more than the cap.
    pub fn source(&self, source: &str) -> io::Result<Arc<SourceLog>> {
        let dir = self.dir(source)?;
        let mut sources = lock(&self.sources);
        if let Some(s) = sources.open.get(source) {
            return Ok(s.clone());
        }
        if !sources.on_disk.contains(source) && sources.on_disk.len() >= self.limits.max_sources {
            return Err(io::Error::other(format!(
                "the log store keeps at most {} sources (logs.max_sources); {source} gets no log",
                self.limits.max_sources
            )));
        }
        let log = Arc::new(SourceLog::open(dir, self.limits)?);
        sources.open.insert(source.to_string(), log.clone());
        sources.on_disk.insert(source.to_string());
        Ok(log)
    }

    /// Deletes `source`'s log (a removed service's). A writer still holding
    /// it writes into unlinked files; the next [`LogStore::source`] of the
    /// name starts afresh. Walks files: call it off the runtime.
    pub fn remove(&self, source: &str) -> io::Result<()> {
        let mut sources = lock(&self.sources);
        sources.open.remove(source);
        sources.on_disk.remove(source);
        match fs::remove_dir_all(self.dir(source)?) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A cursor at the start of the newest segment: where a short tail
    /// starts reading (at most one segment, not the whole log).
    pub fn newest_segment(&self, source: &str) -> Cursor {
        Cursor {
            segment: self
                .dir(source)
                .ok()
                .and_then(|dir| segments(&dir).last().copied())
                .unwrap_or(0),
            offset: 0,
        }
    }

    /// A cursor from which the last `n` complete records of `source` are
    /// read: found by counting newlines backwards from the end, so a tail
    /// of a large log reads the end, not the whole log.
    pub fn tail_cursor(&self, source: &str, n: u64) -> io::Result<Cursor> {
        use std::os::unix::fs::FileExt;
        let dir = self.dir(source)?;
        self.flush_source(source);
        let mut need = n;
        let mut cursor = Cursor::default();
        let mut buf = vec![0u8; 64 * 1024];
        for seg in segments(&dir).into_iter().rev() {
            cursor = Cursor {
                segment: seg,
                offset: 0,
            };
            let file = match File::open(dir.join(segment_name(seg))) {
                Ok(f) => f,
                // Dropped by the cap meanwhile: start after it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut pos = file.metadata()?.len();
            // Newlines seen from the end: the (need + 1)-th ends the line
            // before the first one wanted. A partial last line has none.
            let mut seen = 0u64;
            while pos > 0 {
                let start = pos.saturating_sub(buf.len() as u64);
                // At most buf.len(), by the line above.
                let len = usize::try_from(pos - start).unwrap_or(buf.len());
                let chunk = &mut buf[..len];
                file.read_exact_at(chunk, start)?;
                for i in (0..chunk.len()).rev() {
                    if chunk[i] == b'\n' {
                        seen += 1;
                        if seen > need {
                            cursor.offset = start + i as u64 + 1;
                            return Ok(cursor);
                        }
                    }
                }
                pos = start;
            }
            need -= seen;
        }
        Ok(cursor)
    }

    pub fn exists(&self, source: &str) -> bool {
        self.dir(source).is_ok_and(|dir| dir.is_dir())
    }

    /// Readers see what a source's writer still buffers.
    fn flush_source(&self, source: &str) {
        if let Some(s) = lock(&self.sources).open.get(source) {
            s.flush();
        }
    }

    pub fn flush(&self) {
        for s in lock(&self.sources).open.values() {
            s.flush();
        }
    }

    /// Up to `max` records from `cursor` on (flushed first), and where they
    /// ended; fewer than `max` means the end was reached.
    pub fn read_from(
        &self,
        source: &str,
        mut cursor: Cursor,
        max: usize,
    ) -> io::Result<(Vec<LogRecord>, Cursor)> {
        let dir = self.dir(source)?;
        self.flush_source(source);
        let mut out = Vec::new();
        for n in segments(&dir) {
            if n < cursor.segment {
                continue;
            }
            if n > cursor.segment {
                cursor = Cursor {
                    segment: n,
                    offset: 0,
                };
            }
            let mut file = File::open(dir.join(segment_name(n)))?;
            file.seek(SeekFrom::Start(cursor.offset))?;
            let mut reader = BufReader::new(file);
            let mut line = String::new();
            loop {
                line.clear();
                let read = reader.read_line(&mut line)?;
                // A partial last line is still being written: stop before it.
                if read == 0 || !line.ends_with('\n') {
                    break;
                }
                if out.len() == max {
                    return Ok((out, cursor));
                }
                cursor.offset += read as u64;
                if let Ok(record) = serde_json::from_str::<LogRecord>(&line) {
                    out.push(record);
                }
            }
        }
        Ok((out, cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_name_that_leaves_the_store_is_refused_and_makes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("logs");
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let store = LogStore::open(root, LogLimits::default()).unwrap();
        let absolute = outside.display().to_string();
        for bad in ["../outside", absolute.as_str(), "a/b", "..", ".", "", "x\0"] {
            let refused = |e: io::Error| {
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
                assert!(e.to_string().contains("not a log source name"), "{e}");
            };
            refused(store.source(bad).err().unwrap());
            refused(store.tail_cursor(bad, 10).unwrap_err());
            refused(store.read_from(bad, Cursor::default(), 10).unwrap_err());
            assert!(!store.exists(bad), "{bad:?}");
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(store.source("web.1").is_ok());
    }

    fn serde_encoded(ts_ms: i64, stream: Stream, line: &str, exec: Option<u64>) -> Vec<u8> {
        let mut out = serde_json::to_vec(&LogRecordRef {
            ts_ms,
            stream,
            line,
            exec: exec.map(|id| ExecId { id }),
        })
        .unwrap();
        out.push(b'\n');
        out
    }

    #[test]
    fn logs_encode_writes_what_serde_json_writes() {
        let lines = [
            "",
            "plain text 0123456789",
            "quote \" backslash \\ tab \t bell \u{7} nul \0",
            "unicode: héllo wörld ✓ 🚀",
            "del \u{7f} and a slash /",
            "\r\n",
        ];
        let mut buf = Vec::new();
        for line in lines {
            for (ts, stream, exec) in [
                (0, Stream::Stdout, None),
                (-5, Stream::Stderr, Some(7)),
                (i64::MAX, Stream::Stdout, Some(u64::MAX)),
            ] {
                assert!(encode(&mut buf, ts, stream, line, exec));
                assert_eq!(
                    String::from_utf8_lossy(&buf),
                    String::from_utf8_lossy(&serde_encoded(ts, stream, line, exec)),
                    "line {line:?}"
                );
                let back: LogRecord = serde_json::from_slice(&buf).unwrap();
                assert_eq!(back.line, line);
                assert_eq!(back.exec.map(|e| e.id), exec);
            }
        }
    }

    #[test]
    fn logs_tail_cursor_reads_exactly_the_last_lines_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of about ten records each.
        let limits = LogLimits {
            segment_max: 600,
            source_max: 1 << 20,
            exec_max: 1 << 20,
            ..LogLimits::default()
        };
        let store = LogStore::open(dir.path().to_path_buf(), limits).unwrap();
        let log = store.source("s").unwrap();
        let lines: Vec<String> = (0..100).map(|i| format!("line {i}")).collect();
        for l in &lines {
            log.append(Stream::Stdout, l);
        }
        assert!(segments(&dir.path().join("s")).len() > 5);
        for n in [0u64, 1, 5, 9, 10, 11, 20, 99, 100, 150] {
            let cursor = store.tail_cursor("s", n).unwrap();
            let (records, _) = store.read_from("s", cursor, 1000).unwrap();
            let got: Vec<&str> = records.iter().map(|r| r.line.as_str()).collect();
            let want: Vec<&str> = lines[100 - n.min(100) as usize..]
                .iter()
                .map(String::as_str)
                .collect();
            assert_eq!(got, want, "tail {n}");
        }
    }

    #[test]
    fn logs_markers_are_kept_apart_from_lines() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path().to_path_buf(), LogLimits::default()).unwrap();
        let log = store.source("s").unwrap();
        log.append(Stream::Stdout, "before");
        log.append_marker(LogMarker::Bounce, "inner bounced");
        log.append(Stream::Stdout, "after");
        let (records, _) = store.read_from("s", Cursor::default(), 10).unwrap();
        let got: Vec<(Option<LogMarker>, &str)> = records
            .iter()
            .map(|r| (r.marker, r.line.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (None, "before"),
                (Some(LogMarker::Bounce), "inner bounced"),
                (None, "after")
            ]
        );
    }

    #[test]
    fn logs_sources_are_capped_and_a_removed_one_frees_its_place() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("old")).unwrap();
        let limits = LogLimits {
            max_sources: 3,
            ..LogLimits::default()
        };
        let store = LogStore::open(dir.path().to_path_buf(), limits).unwrap();
        store.source("a").unwrap().append(Stream::Stdout, "x");
        store.source("b").unwrap();
        let err = store.source("c").err().expect("a fourth source");
        assert!(err.to_string().contains("logs.max_sources"), "{err}");
        // One that exists on disk is never refused.
        store.source("old").unwrap();
        store.remove("a").unwrap();
        assert!(!dir.path().join("a").exists());
        store.source("c").unwrap();
        assert!(store.source("a").is_err());
        store.remove("nothing-there").unwrap();
    }

    #[test]
    fn logs_needs_escape_finds_every_kind() {
        assert!(!needs_escape(b"abc xyz \x7f \xc3\xa9"));
        for b in [b'"', b'\\', b'\n', 0, 0x1f] {
            assert!(needs_escape(&[b'a', b, b'z']), "byte {b:#x}");
        }
    }
}
