//! Capture of a process's output into its source's log: a pipe is read a
//! batch at a time and cut into lines.

use std::sync::Arc;

use hull_proto::Stream;

use crate::store::{SourceLog, MAX_LINE};

/// The room an unfinished line keeps between batches; more is given back.
const CARRY_KEPT: usize = 4 * 1024;

/// Cuts a byte stream into log lines: at newlines, and at [`MAX_LINE`]
/// (never inside a UTF-8 sequence) so that a process printing without
/// newlines cannot make hulld buffer without bound.
#[derive(Default)]
pub struct LineSplitter {
    /// Bytes of an unfinished line carried to the next push.
    carry: Vec<u8>,
    /// The exec whose output this is, tagged on every line.
    exec: Option<u64>,
}

impl LineSplitter {
    /// A splitter for the output of exec `id`.
    pub fn for_exec(id: u64) -> Self {
        LineSplitter {
            carry: Vec::new(),
            exec: Some(id),
        }
    }

    /// Appends the complete lines in `carry + bytes` to `log`, one batch;
    /// bytes that are not UTF-8 become U+FFFD.
    pub fn push(&mut self, bytes: &[u8], stream: Stream, log: &SourceLog) {
        self.split(bytes, stream, log, true);
    }

    /// [`Self::push`] for text only: when the batch's complete lines are
    /// not UTF-8 nothing of it is written, and the answer is false.
    pub fn push_text(&mut self, bytes: &[u8], stream: Stream, log: &SourceLog) -> bool {
        self.split(bytes, stream, log, false)
    }

    fn split(&mut self, bytes: &[u8], stream: Stream, log: &SourceLog, lossy: bool) -> bool {
        // Lines are cut from the batch itself when nothing is carried
        // (the common case), so only an unfinished line is copied.
        let cut = if self.carry.is_empty() {
            let cut = cut_lines(bytes, stream, log, lossy, self.exec);
            self.carry.extend_from_slice(&bytes[cut.unwrap_or(0)..]);
            cut
        } else {
            self.carry.extend_from_slice(bytes);
            let cut = cut_lines(&self.carry, stream, log, lossy, self.exec);
            self.carry.drain(..cut.unwrap_or(0));
            cut
        };
        // What is carried is one line at most: room a large batch took is
        // given back, so a quiet stream does not keep its largest batch.
        if self.carry.capacity() > CARRY_KEPT && self.carry.len() <= CARRY_KEPT {
            self.carry.shrink_to(CARRY_KEPT);
        }
        cut.is_some()
    }

    /// Logs a last line that had no newline.
    pub fn finish(&mut self, stream: Stream, log: &SourceLog) {
        if !self.carry.is_empty() {
            let line = String::from_utf8_lossy(&self.carry);
            log.append_lines(stream, &[&line], self.exec);
            self.carry.clear();
        }
    }

    /// [`Self::finish`] for text only: false, writing nothing, when the
    /// last line is not UTF-8.
    pub fn finish_text(&mut self, stream: Stream, log: &SourceLog) -> bool {
        if std::str::from_utf8(&self.carry).is_err() {
            return false;
        }
        self.finish(stream, log);
        true
    }
}

/// Appends the complete lines at the start of `carry` to `log`, one batch,
/// and returns where the unfinished rest begins; `None` (nothing written)
/// when `lossy` is false and the lines are not UTF-8.
fn cut_lines(
    carry: &[u8],
    stream: Stream,
    log: &SourceLog,
    lossy: bool,
    exec: Option<u64>,
) -> Option<usize> {
    let mut bounds: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    loop {
        // The next newline within the longest line allowed (memchr:
        // the byte-at-a-time loop was another fifth of hulld's time).
        let window = (start + MAX_LINE + 1).min(carry.len());
        match memchr::memchr(b'\n', &carry[start..window]) {
            Some(at) => {
                bounds.push((start, start + at));
                start += at + 1;
            }
            None if window - start > MAX_LINE => {
                // Too long: cut at MAX_LINE, back to a character start.
                let mut cut = start + MAX_LINE;
                while cut > start + 1 && (carry[cut] & 0xC0) == 0x80 {
                    cut -= 1;
                }
                bounds.push((start, cut));
                start = cut;
            }
            None => break,
        }
    }
    if !bounds.is_empty() {
        // One UTF-8 check for the whole batch; lossy copies only when
        // the output is not valid UTF-8.
        match std::str::from_utf8(&carry[..start]) {
            Ok(text) => {
                let lines: Vec<&str> = bounds.iter().map(|&(a, b)| &text[a..b]).collect();
                log.append_lines(stream, &lines, exec);
            }
            Err(_) if !lossy => return None,
            Err(_) => {
                let owned: Vec<String> = bounds
                    .iter()
                    .map(|&(a, b)| String::from_utf8_lossy(&carry[a..b]).into_owned())
                    .collect();
                let lines: Vec<&str> = owned.iter().map(String::as_str).collect();
                log.append_lines(stream, &lines, exec);
            }
        }
    }
    Some(start)
}

/// Reads a pipe into `log` until end of file, a batch of lines per read.
pub async fn capture(pipe: tokio::net::unix::pipe::Receiver, stream: Stream, log: Arc<SourceLog>) {
    use tokio::io::AsyncReadExt;
    let mut pipe = pipe;
    let mut buf = vec![0u8; 1 << 20];
    let mut lines = LineSplitter::default();
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => lines.push(&buf[..n], stream, &log),
        }
    }
    lines.finish(stream, &log);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{segment_name, LogLimits};
    use hull_proto::LogRecord;

    /// Runs `chunks` through a splitter into a fresh log and reads it back.
    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let log = SourceLog::open(dir.path().join("s"), LogLimits::default()).unwrap();
        let mut splitter = LineSplitter::default();
        for c in chunks {
            splitter.push(c, Stream::Stdout, &log);
        }
        splitter.finish(Stream::Stdout, &log);
        log.flush();
        let text = std::fs::read_to_string(dir.path().join("s").join(segment_name(1))).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<LogRecord>(l).unwrap().line)
            .collect()
    }

    #[test]
    fn logs_splitter_cuts_at_newlines_across_chunks() {
        assert_eq!(
            split(&[b"one\ntw", b"o\n\nthr", b"ee"]),
            vec!["one", "two", "", "three"]
        );
    }

    #[test]
    fn logs_splitter_cuts_long_lines_at_a_character_start() {
        // MAX_LINE - 1 ASCII bytes, then a 2-byte character straddling the
        // limit: the cut moves back before it.
        let mut long = vec![b'a'; MAX_LINE - 1];
        long.extend_from_slice("é".as_bytes());
        long.extend_from_slice(b"tail\n");
        let lines = split(&[&long]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE - 1);
        assert_eq!(lines[1], "étail");
        // Exactly MAX_LINE bytes then a newline is one line.
        let mut exact = vec![b'b'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(split(&[&exact]), vec!["b".repeat(MAX_LINE)]);
    }

    #[test]
    fn logs_splitter_keeps_only_the_unfinished_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = SourceLog::open(dir.path().join("s"), LogLimits::default()).unwrap();
        let mut splitter = LineSplitter::default();
        // A pipe's read of many short lines, the last one unfinished: an
        // exec whose output is then held up keeps only that line.
        let mut batch = b"y\n".repeat(32 * 1024);
        batch.extend_from_slice(b"unfinished");
        for _ in 0..2 {
            splitter.push(&batch, Stream::Stdout, &log);
            assert_eq!(splitter.carry, b"unfinished");
            assert!(
                splitter.carry.capacity() <= CARRY_KEPT,
                "{} bytes kept for a line of 10",
                splitter.carry.capacity()
            );
        }
        splitter.finish(Stream::Stdout, &log);
        log.flush();
        let text = std::fs::read_to_string(dir.path().join("s").join(segment_name(1))).unwrap();
        let lines: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<LogRecord>(l).unwrap().line)
            .collect();
        assert_eq!(lines.len(), 2 * 32 * 1024 + 1);
        assert_eq!(lines[32 * 1024], "unfinishedy");
        assert_eq!(lines.last().unwrap(), "unfinished");
    }
}
