//! Answers a client's `Logs` request: a tail, a filter, and following.

use std::io;
use std::sync::Arc;

use hull_proto::{LogRecord, Stream};

use crate::store::{Cursor, LogStore};

const RECORDS_PER_FRAME: usize = 1000;

/// Which records a `Logs` request wants.
#[derive(Debug, Clone, Copy)]
pub struct Filter {
    pub stream: Option<Stream>,
    pub since_ms: Option<i64>,
    /// The records of this exec only.
    pub exec_id: Option<u64>,
}

impl Filter {
    fn keeps(&self, r: &LogRecord) -> bool {
        // A marker (a start, a bounce) belongs to both streams.
        let stream = r.marker.is_some() || self.stream.is_none_or(|s| s == r.stream);
        let exec = self
            .exec_id
            .is_none_or(|id| r.exec.as_ref().is_some_and(|e| e.id == id));
        stream && exec && self.since_ms.is_none_or(|t| r.ts_ms >= t)
    }

    /// Whether `records` (kept by this filter) end what it follows: the
    /// end record of the one exec it keeps.
    fn ends(&self, records: &[LogRecord]) -> bool {
        self.exec_id.is_some()
            && records
                .iter()
                .any(|r| r.marker == Some(hull_proto::LogMarker::ExecEnd))
    }
}

/// The lines a follow without `tail` or `since` starts with, as tail -f.
pub const FOLLOW_TAIL: u64 = 10;

/// Answers one `Logs` request on a client connection. A follow without a
/// tail or a `since` starts at the last [`FOLLOW_TAIL`] records.
pub async fn serve<R, W>(
    store: &Arc<LogStore>,
    source: &str,
    follow: bool,
    tail: Option<u64>,
    filter: Filter,
    reader: &mut R,
    writer: &mut W,
) -> io::Result<()>
where
    R: futures::Stream<Item = io::Result<hull_proto::ClientMsg>> + Unpin,
    W: futures::Sink<hull_proto::DaemonMsg, Error = io::Error> + Unpin,
{
    use futures::{SinkExt, StreamExt};
    use hull_proto::{DaemonMsg, ErrorKind};
    if !hull_proto::valid_name(source) {
        return writer
            .send(DaemonMsg::error(
                ErrorKind::BadRequest,
                crate::store::invalid_source(source).to_string(),
            ))
            .await;
    }
    if !store.exists(source) {
        return writer
            .send(DaemonMsg::error(
                ErrorKind::NotFound,
                format!("no logs for {source:?}: no service of that name has run"),
            ))
            .await;
    }
    let tail = tail.or((follow && filter.since_ms.is_none()).then_some(FOLLOW_TAIL));
    let keep = |r: &LogRecord| filter.keeps(r);
    let read = |cursor: Cursor| {
        let store = store.clone();
        let source = source.to_string();
        async move {
            tokio::task::spawn_blocking(move || store.read_from(&source, cursor, RECORDS_PER_FRAME))
                .await
                .map_err(|e| io::Error::other(e.to_string()))?
        }
    };
    // Subscribe before the first read, so nothing appended in between is missed.
    let mut appended = store.source(source)?.subscribe();
    // Memory stays bounded: records stream a frame at a time, and --tail
    // keeps only its last N while reading. A tail starts near the end, as
    // --since keeps a suffix of the log; only --stream, which keeps a
    // subsequence, reads from the start.
    let mut cursor = match tail {
        Some(n) if filter.stream.is_none() && filter.exec_id.is_none() => {
            let store = store.clone();
            let source = source.to_string();
            tokio::task::spawn_blocking(move || store.tail_cursor(&source, n))
                .await
                .map_err(|e| io::Error::other(e.to_string()))??
        }
        _ => Cursor::default(),
    };
    let mut last: std::collections::VecDeque<LogRecord> = std::collections::VecDeque::new();
    let mut ended = false;
    loop {
        let (records, next) = read(cursor).await?;
        cursor = next;
        let done = records.len() < RECORDS_PER_FRAME;
        let records: Vec<LogRecord> = records.into_iter().filter(keep).collect();
        ended |= filter.ends(&records);
        match tail {
            Some(n) => {
                last.extend(records);
                while last.len() as u64 > n {
                    last.pop_front();
                }
            }
            None if !records.is_empty() => writer.send(DaemonMsg::LogRecords(records)).await?,
            None => {}
        }
        if done {
            break;
        }
    }
    if !last.is_empty() {
        let last: Vec<LogRecord> = last.into();
        for chunk in last.chunks(RECORDS_PER_FRAME) {
            writer.send(DaemonMsg::LogRecords(chunk.to_vec())).await?;
        }
    }
    if !follow || ended {
        return writer.send(DaemonMsg::LogsEnd).await;
    }
    loop {
        tokio::select! {
            changed = appended.changed() => {
                if changed.is_err() {
                    return writer.send(DaemonMsg::LogsEnd).await;
                }
                loop {
                    let (records, next) = read(cursor).await?;
                    cursor = next;
                    let done = records.len() < RECORDS_PER_FRAME;
                    let records: Vec<LogRecord> = records.into_iter().filter(keep).collect();
                    let ended = filter.ends(&records);
                    if !records.is_empty() {
                        writer.send(DaemonMsg::LogRecords(records)).await?;
                    }
                    if ended {
                        return writer.send(DaemonMsg::LogsEnd).await;
                    }
                    if done {
                        break;
                    }
                }
            }
            // Following ends when the client hangs up (or sends anything).
            _ = reader.next() => return Ok(()),
        }
    }
}
