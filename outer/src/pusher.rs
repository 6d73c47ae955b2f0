//! The pusher: takes every checkpoint to the remote (`[remote]` in
//! hull.toml) in the background, one at a time, oldest first, so that a
//! checkpoint's parent is up before it and its stream can be incremental
//! (`btrfs send -p PARENT`). One task owns the queue; [`Pusher`] is its
//! handle: messages in, a watch channel out with each push's progress.
//!
//! The catalog records `pushing` before the stream starts and `pushed`
//! once the manifest is written; a checkpoint `pushing` and the parent it
//! is sent against are pinned (the storage refuses to delete them). A push
//! that fails goes back to `local` with its error and is tried again with
//! a backoff; one left `pushing` by a killed hulld is pushed again at the
//! next start, the remote's chunk index skipping what went up.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hull_checkpoint::{btrfs, failpoint, RemoteState, Storage, StorageError};
use hull_proto::PushReport;
use hull_remote::{CheckpointMeta, ManifestId, Remote, RemoteError, RemoteSettings};
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, oneshot, watch};

use crate::supervisor::on_storage;

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("checkpoint {id} has a remote id that is not a UUID: {remote_id:?}")]
    RemoteId { id: String, remote_id: String },
    #[error("cannot send checkpoint {id}")]
    Send {
        id: String,
        #[source]
        source: btrfs::StreamError,
    },
    #[error("no remote: add a [remote] table to hull.toml")]
    NoRemote,
    #[error("no checkpoint to push")]
    NoCheckpoint,
    #[error("the pusher stopped")]
    Gone,
    #[error("the push failed: {0}")]
    Failed(String),
}

/// Every push this hulld has worked on since it started.
#[derive(Debug, Clone, Default)]
pub struct PushBoard {
    /// The last report of each checkpoint's push.
    pub reports: BTreeMap<String, PushReport>,
    /// The checkpoint pushed last.
    pub last_pushed: Option<String>,
}

/// How a push asked for by someone waiting ended.
type Done = oneshot::Sender<Result<PushReport, String>>;

enum Msg {
    /// Push `id` (again, if it was pushed: a manifest is replaced); with
    /// `done`, next, and tell how it ended.
    Queue { id: String, done: Option<Done> },
}

/// The pusher's handle. Cheap to clone.
#[derive(Clone)]
pub struct Pusher {
    tx: mpsc::UnboundedSender<Msg>,
    board: watch::Receiver<PushBoard>,
    /// Set by [`Pusher::stop`]; the task ends when it sees it.
    stop: Arc<watch::Sender<bool>>,
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Pusher {
    /// Starts the pusher over `storage` and queues the checkpoints a
    /// previous hulld left `pushing` and those whose last push failed.
    pub fn start(storage: Arc<Storage>, settings: RemoteSettings, index: PathBuf) -> Pusher {
        let (tx, rx) = mpsc::unbounded_channel();
        let (board_tx, board) = watch::channel(PushBoard::default());
        let task = Task {
            storage,
            settings,
            index,
            remote: None,
            queue: VecDeque::new(),
            waiting: BTreeMap::new(),
            board: Arc::new(board_tx),
            backoff: RETRY_FIRST,
            sending: Arc::default(),
        };
        let (stop, mut stopped) = watch::channel(false);
        let sending = task.sending.clone();
        let task = tokio::spawn(async move {
            // Dropping the push under way kills its `btrfs send` (and the
            // row stays `pushing`: the next start resumes it).
            tokio::select! {
                () = task.run(rx) => {}
                _ = stopped.wait_for(|stop| *stop) => {}
            }
            let pid = crate::lock(&sending).take();
            if let Some(pid) = pid {
                // Killed on drop, but not waited for: it holds the volume
                // until it is gone.
                while process_alive(pid) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        Pusher {
            tx,
            board,
            stop: Arc::new(stop),
            task: Arc::new(std::sync::Mutex::new(Some(task))),
        }
    }

    /// Stops pushing, before the volume is unmounted (`hull down`): the
    /// push under way ends, its `btrfs send` killed and reaped.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let task = crate::lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Queues checkpoint `id` behind those already waiting.
    pub fn queue(&self, id: String) {
        let _ = self.tx.send(Msg::Queue { id, done: None });
    }

    /// What `hull status` shows of the pushes.
    pub fn status(&self) -> hull_proto::RemoteStatus {
        let board = self.board.borrow();
        let mut status = hull_proto::RemoteStatus {
            last_pushed: board
                .last_pushed
                .as_ref()
                .and_then(|id| board.reports.get(id))
                .cloned(),
            ..hull_proto::RemoteStatus::default()
        };
        for report in board.reports.values() {
            match report.state.as_str() {
                "pushing" => status.pushing = Some(report.clone()),
                "pushed" => status.pushed += 1,
                _ if report.error.is_some() => status.failed.push(report.clone()),
                _ => {}
            }
        }
        status
    }

    /// Pushes `id` next and waits for its push to end, calling `progress`
    /// as it goes: its final report, or the error it failed with.
    pub async fn push_now(
        &self,
        id: String,
        progress: impl Fn(&PushReport),
    ) -> Result<PushReport, String> {
        let mut board = self.board.clone();
        board.mark_unchanged();
        let (done_tx, mut done) = oneshot::channel();
        self.tx
            .send(Msg::Queue {
                id: id.clone(),
                done: Some(done_tx),
            })
            .map_err(|_| PushError::Gone.to_string())?;
        loop {
            tokio::select! {
                ended = &mut done => {
                    return ended.unwrap_or_else(|_| Err(PushError::Gone.to_string()));
                }
                changed = board.changed() => {
                    if changed.is_err() {
                        return Err(PushError::Gone.to_string());
                    }
                    let report = board.borrow_and_update().reports.get(&id).cloned();
                    if let Some(report) = report.filter(|r| r.state == "pushing") {
                        progress(&report);
                    }
                }
            }
        }
    }
}

struct Task {
    storage: Arc<Storage>,
    settings: RemoteSettings,
    index: PathBuf,
    /// Opened at the first push (it makes the key file if there is none)
    /// and again after a failure to open.
    remote: Option<Remote>,
    queue: VecDeque<String>,
    /// Who waits for the end of a push, by checkpoint.
    waiting: BTreeMap<String, Vec<Done>>,
    board: Arc<watch::Sender<PushBoard>>,
    backoff: Duration,
    /// The pid of the `btrfs send` under way, for [`Pusher::stop`].
    sending: Arc<std::sync::Mutex<Option<u32>>>,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        match on_storage(&self.storage, |s| s.list()).await {
            Ok(rows) => self.queue.extend(
                rows.into_iter()
                    .filter(|r| {
                        r.remote_state == RemoteState::Pushing
                            || (r.remote_state == RemoteState::Local && r.remote_error.is_some())
                    })
                    .map(|r| r.id),
            ),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot list the checkpoints to push")
            }
        }
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if retry_at.is_none() {
                if let Some(id) = self.queue.pop_front() {
                    let ended = self.push(&id).await;
                    match &ended {
                        Ok(()) => self.backoff = RETRY_FIRST,
                        Err(e) => {
                            let message = crate::error_chain(e);
                            let gone = matches!(
                                e,
                                PushError::Storage(
                                    StorageError::UnknownCheckpoint { .. }
                                        | StorageError::NotReady { .. }
                                )
                            );
                            if gone {
                                tracing::info!(checkpoint = %id, "not pushed: {message}");
                            } else {
                                tracing::warn!(checkpoint = %id, error = %message, retry_in_s = self.backoff.as_secs(), "push failed; the checkpoint stays local");
                                self.queue.push_front(id.clone());
                                retry_at = Some(tokio::time::Instant::now() + self.backoff);
                                self.backoff = (self.backoff * 2).min(RETRY_MAX);
                            }
                        }
                    }
                    // Messages that came meanwhile are taken before the
                    // next push; one waiting for the push that just ended
                    // gets its end rather than a second push.
                    while let Ok(msg) = rx.try_recv() {
                        match msg {
                            Msg::Queue {
                                id: asked,
                                done: Some(done),
                            } if asked == id => self.waiting.entry(asked).or_default().push(done),
                            msg => self.take(msg, &mut retry_at),
                        }
                    }
                    self.answer(&id, &ended);
                    if ended.is_err() && !self.queue.contains(&id) {
                        // Gone: nothing left to report.
                        self.board.send_modify(|b| {
                            b.reports.remove(&id);
                        });
                    }
                    continue;
                }
            }
            let wait = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.take(msg, &mut retry_at),
                    None => return,
                },
                () = wait => retry_at = None,
            }
        }
    }

    fn take(&mut self, msg: Msg, retry_at: &mut Option<tokio::time::Instant>) {
        match msg {
            Msg::Queue { id, done } => {
                self.queue.retain(|q| *q != id);
                match done {
                    Some(done) => {
                        // Asked for by someone waiting: now, no backoff.
                        self.waiting.entry(id.clone()).or_default().push(done);
                        *retry_at = None;
                        self.backoff = RETRY_FIRST;
                        self.queue.push_front(id);
                    }
                    None => self.queue.push_back(id),
                }
            }
        }
    }

    /// Tells those waiting for `id` how its push ended.
    fn answer(&mut self, id: &str, ended: &Result<(), PushError>) {
        let report = self
            .board
            .borrow()
            .reports
            .get(id)
            .cloned()
            .unwrap_or_default();
        for done in self.waiting.remove(id).unwrap_or_default() {
            let _ = done.send(match ended {
                Ok(()) => Ok(report.clone()),
                Err(e) => Err(crate::error_chain(e)),
            });
        }
    }

    fn report(&self, id: &str, update: impl FnOnce(&mut PushReport)) {
        self.board.send_modify(|b| {
            let report = b
                .reports
                .entry(id.to_string())
                .or_insert_with(|| PushReport {
                    checkpoint: id.to_string(),
                    ..PushReport::default()
                });
            update(report);
        });
    }

    async fn remote(&mut self) -> Result<Remote, PushError> {
        if let Some(remote) = &self.remote {
            return Ok(remote.clone());
        }
        let remote = Remote::open(&self.settings, Some(&self.index)).await?;
        self.remote = Some(remote.clone());
        Ok(remote)
    }

    /// One push; the catalog and the board say how it ended.
    async fn push(&mut self, id: &str) -> Result<(), PushError> {
        let result = self.push_inner(id).await;
        if let Err(e) = &result {
            let message = crate::error_chain(e);
            let recorded = {
                let id = id.to_string();
                let message = message.clone();
                on_storage(&self.storage, move |s| {
                    s.set_remote_state(&id, RemoteState::Local, Some(&message))
                })
                .await
            };
            if let Err(e) = recorded {
                tracing::error!(checkpoint = id, error = %crate::error_chain(&e), "cannot record a failed push");
            }
            self.report(id, |r| {
                r.state = RemoteState::Local.to_string();
                r.error = Some(message);
            });
        }
        result
    }

    async fn push_inner(&mut self, id: &str) -> Result<(), PushError> {
        let plan = {
            let id = id.to_string();
            on_storage(&self.storage, move |s| {
                let row = s.checkpoint(&id)?;
                let snapshot = s.snapshot_path(&id)?;
                // Incremental only from a parent that is in the remote
                // and still here to send against.
                let base = match &row.parent {
                    Some(parent) => match s.checkpoint(parent) {
                        Ok(p) if p.remote_state == RemoteState::Pushed => {
                            Some((s.snapshot_path(parent)?, p.remote_id))
                        }
                        Ok(_) | Err(StorageError::UnknownCheckpoint { .. }) => None,
                        Err(StorageError::NotReady { .. }) => None,
                        Err(e) => return Err(e),
                    },
                    None => None,
                };
                // Pins it (and its parent) from here on.
                s.set_remote_state(&id, RemoteState::Pushing, row.remote_error.as_deref())?;
                Ok((row, snapshot, base))
            })
            .await?
        };
        let (row, snapshot, base) = plan;
        let manifest_id: ManifestId = row.remote_id.parse().map_err(|_| PushError::RemoteId {
            id: id.to_string(),
            remote_id: row.remote_id.clone(),
        })?;
        let base_id = match &base {
            Some((_, remote_id)) => {
                Some(
                    remote_id
                        .parse::<ManifestId>()
                        .map_err(|_| PushError::RemoteId {
                            id: row.parent.clone().unwrap_or_default(),
                            remote_id: remote_id.clone(),
                        })?,
                )
            }
            None => None,
        };
        self.report(id, |r| {
            *r = PushReport {
                checkpoint: id.to_string(),
                remote_id: row.remote_id.clone(),
                base: base.as_ref().map(|(_, b)| b.clone()),
                state: RemoteState::Pushing.to_string(),
                error: row.remote_error.clone(),
                ..PushReport::default()
            }
        });
        let remote = self.remote().await?;
        let send =
            btrfs::send(&snapshot, base.as_ref().map(|(p, _)| p.as_path())).map_err(|source| {
                PushError::Send {
                    id: id.to_string(),
                    source,
                }
            })?;
        *crate::lock(&self.sending) = send.pid();
        let stream = throttled(send.into_stream(), self.settings.bandwidth_limit);
        let meta = CheckpointMeta {
            checkpoint: Some(row.id.clone()),
            parent: base_id,
            comment: row.comment.clone(),
            created_ms: row.created_ms,
            services: serde_json::from_str(&row.services).unwrap_or(serde_json::Value::Null),
        };
        let board = self.board.clone();
        let key = id.to_string();
        let pushed = remote
            .push(stream, manifest_id, meta, &move |p| {
                if p.chunks_uploaded >= 2 {
                    // Crash tests: a kill -9 with part of the stream up.
                    failpoint("push:after-chunks");
                }
                board.send_modify(|b| {
                    if let Some(r) = b.reports.get_mut(&key) {
                        r.bytes_read = p.bytes_read;
                        r.chunks = p.chunks;
                        r.chunks_uploaded = p.chunks_uploaded;
                        r.bytes_uploaded = p.bytes_uploaded;
                        r.chunks_present = p.chunks_known + p.chunks_present;
                    }
                });
            })
            .await;
        *crate::lock(&self.sending) = None;
        let pushed = pushed?;
        {
            let id = id.to_string();
            on_storage(&self.storage, move |s| {
                s.set_remote_state(&id, RemoteState::Pushed, None)
            })
            .await?;
        }
        tracing::info!(
            checkpoint = id,
            remote_id = %row.remote_id,
            incremental = base.is_some(),
            chunks = pushed.progress.chunks,
            uploaded = pushed.progress.chunks_uploaded,
            "checkpoint pushed"
        );
        self.board.send_modify(|b| {
            if let Some(r) = b.reports.get_mut(id) {
                r.state = RemoteState::Pushed.to_string();
                r.error = None;
            }
            b.last_pushed = Some(id.to_string());
        });
        Ok(())
    }
}

/// `stream`, read at most `limit` bytes per second (through a task that
/// paces itself; an error of the stream reaches the reader), or as it is.
fn throttled(
    stream: btrfs::SendStream,
    limit: Option<u64>,
) -> Box<dyn AsyncRead + Send + Unpin + 'static> {
    let Some(limit) = limit else {
        return Box::new(stream);
    };
    let (tx, rx) = mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    tokio::spawn(async move {
        let mut stream = stream;
        let begin = tokio::time::Instant::now();
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            let item = match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    sent += n as u64;
                    Ok(bytes::Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
            let due = begin + Duration::from_secs_f64(sent as f64 / limit as f64);
            tokio::time::sleep_until(due).await;
        }
    });
    let chunks = futures::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|item| (item, rx))
    });
    Box::new(tokio_util::io::StreamReader::new(Box::pin(chunks)))
}

/// Whether process `pid` is still running: not gone, and not a zombie
/// (whose files, and its hold on the volume, are already released).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}
