//! The inner's files over hulld's own protocol (`ClientMsg::Files`): an
//! entry, a file's contents, a new content. Every path is resolved under
//! the running inner's root by fd (`hull_inner::files`, openat2 with
//! RESOLVE_IN_ROOT), never by joining strings; the work runs on blocking
//! threads, and contents stream through a few chunks in flight each way.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use hull_inner::files::{Failure, InnerPath, Root, UploadSink};
use hull_proto::{ClientMsg, DaemonMsg, ErrorKind, ErrorReport, FileRequest, FILE_CHUNK};

use tokio::io::AsyncRead;

use crate::hulld::Hulld;
use crate::server::{next_request, Endpoint, Reader};

/// How long a files request waits for an inner that is starting or
/// bouncing before it answers that the sandbox is not running.
const ROOT_WAIT: Duration = Duration::from_secs(5);

/// Chunks in flight between the connection and the file, each way.
const CHUNKS_IN_FLIGHT: usize = 8;

/// Whether the connection goes on after a file request.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    Continue,
    /// The client left (mid-write), or a watch held the connection to
    /// its end: nothing more to serve.
    Gone,
}

/// Why a file request failed, as its answer says.
fn failure(kind: ErrorKind, message: impl Into<String>) -> ErrorReport {
    ErrorReport {
        kind,
        message: message.into(),
    }
}

/// The running inner's root, waiting [`ROOT_WAIT`] for one.
async fn root(hulld: &Arc<Hulld>) -> Result<Root, ErrorReport> {
    let not_running = || failure(ErrorKind::InnerUnavailable, "the sandbox is not running");
    let inner = hulld
        .supervisor()
        .wait_running(ROOT_WAIT)
        .await
        .ok_or_else(not_running)?;
    let owner = inner.root_owner();
    let pid = inner.pid;
    let dir = crate::blocking(move || inner.open_root())
        .await
        .map_err(|e| {
            failure(
                ErrorKind::InnerUnavailable,
                format!("cannot open the inner's root directory /proc/{pid}/root: {e}"),
            )
        })?;
    Ok(Root::new(dir, owner))
}

/// The answer to a file operation that failed on `path`: its errno, or
/// for a failure without one, a bad path.
fn fs_error(what: &str, path: &str, e: &io::Error) -> ErrorReport {
    let kind = match e.raw_os_error() {
        Some(errno) => ErrorKind::File(errno),
        None if e.kind() == io::ErrorKind::UnexpectedEof => ErrorKind::Internal,
        None => ErrorKind::File(libc::EINVAL),
    };
    failure(kind, Failure::message(what, path, e))
}

fn inner_path(path: &str) -> Result<InnerPath, ErrorReport> {
    if !path.starts_with('/') {
        return Err(failure(
            ErrorKind::BadRequest,
            format!("{path:?} is not an absolute path in the inner"),
        ));
    }
    InnerPath::new(path, None).map_err(|e| failure(ErrorKind::BadRequest, e))
}

/// Serves one file request; a write takes its bytes from `reader`.
pub async fn serve<S, W>(
    hulld: &Arc<Hulld>,
    endpoint: &Endpoint,
    request: FileRequest,
    reader: &mut Reader<S>,
    writer: &mut W,
) -> io::Result<After>
where
    S: AsyncRead,
    W: futures::Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    let result = match request {
        FileRequest::Stat { path } => stat(hulld, &path).await,
        FileRequest::List { path } => list(hulld, &path).await,
        FileRequest::MakeDir { path, mode } => make_dir(hulld, &path, mode & 0o7777).await,
        FileRequest::Symlink { path, target } => symlink(hulld, &path, target).await,
        FileRequest::Delete { path, recursive } => {
            change(hulld, "delete", &path, None, move |root, at, _| {
                root.delete(at, recursive)
            })
            .await
        }
        FileRequest::Rename { from, to } => {
            change(hulld, "rename", &from, Some(&to), |root, at, to| {
                root.rename(at, to.ok_or_else(no_destination)?).map(|()| 1)
            })
            .await
        }
        FileRequest::Copy {
            from,
            to,
            recursive,
        } => {
            change(hulld, "copy", &from, Some(&to), move |root, at, to| {
                root.copy(at, to.ok_or_else(no_destination)?, recursive)
            })
            .await
        }
        FileRequest::Chmod {
            path,
            mode,
            recursive,
        } => {
            change(hulld, "chmod", &path, None, move |root, at, _| {
                root.chmod(at, mode & 0o7777, recursive)
            })
            .await
        }
        FileRequest::Read { path } => return read(hulld, &path, writer).await,
        FileRequest::Watch { path, recursive } => {
            return watch(hulld, &path, recursive, reader, writer).await
        }
        FileRequest::Write {
            path,
            mode,
            make_parents,
        } => {
            let target = Target {
                path: &path,
                mode: mode & 0o7777,
                make_parents,
            };
            return write(hulld, endpoint, target, reader, writer).await;
        }
    };
    writer.send(result.unwrap_or_else(DaemonMsg::Error)).await?;
    Ok(After::Continue)
}

async fn stat(hulld: &Arc<Hulld>, path: &str) -> Result<DaemonMsg, ErrorReport> {
    let at = inner_path(path)?;
    let root = root(hulld).await?;
    let shown = path.to_string();
    crate::blocking(move || root.stat(&at))
        .await
        .map(DaemonMsg::FileEntry)
        .map_err(|e| fs_error("stat", &shown, &e))
}

async fn list(hulld: &Arc<Hulld>, path: &str) -> Result<DaemonMsg, ErrorReport> {
    let at = inner_path(path)?;
    let root = root(hulld).await?;
    let shown = path.to_string();
    crate::blocking(move || root.list(&at))
        .await
        .map(DaemonMsg::FileList)
        .map_err(|e| fs_error("list", &shown, &e))
}

async fn make_dir(hulld: &Arc<Hulld>, path: &str, mode: u32) -> Result<DaemonMsg, ErrorReport> {
    let at = inner_path(path)?;
    let root = root(hulld).await?;
    let shown = path.to_string();
    crate::blocking(move || root.make_dir(&at, mode))
        .await
        .map(DaemonMsg::FileEntry)
        .map_err(|e| fs_error("make the directory", &shown, &e))
}

async fn symlink(hulld: &Arc<Hulld>, path: &str, target: String) -> Result<DaemonMsg, ErrorReport> {
    let at = inner_path(path)?;
    let root = root(hulld).await?;
    let shown = path.to_string();
    crate::blocking(move || root.symlink(&at, &target))
        .await
        .map(DaemonMsg::FileEntry)
        .map_err(|e| fs_error("make the symlink", &shown, &e))
}

/// What a rename or copy without the destination it always has gets.
fn no_destination() -> io::Error {
    io::Error::from(io::ErrorKind::InvalidInput)
}

/// A delete, rename, copy or chmod of `path` (to `to`): the entries it
/// changed.
async fn change(
    hulld: &Arc<Hulld>,
    what: &'static str,
    path: &str,
    to: Option<&str>,
    work: impl FnOnce(&Root, &InnerPath, Option<&InnerPath>) -> io::Result<u64> + Send + 'static,
) -> Result<DaemonMsg, ErrorReport> {
    let at = inner_path(path)?;
    let to = to.map(inner_path).transpose()?;
    let root = root(hulld).await?;
    let shown = path.to_string();
    crate::blocking(move || work(&root, &at, to.as_ref()))
        .await
        .map(|count| DaemonMsg::FilesChanged { count })
        .map_err(|e| fs_error(what, &shown, &e))
}

/// Sets up the watch of `path`, then sends its events until it ends or
/// the client leaves (`files_watch`).
async fn watch<S, W>(
    hulld: &Arc<Hulld>,
    path: &str,
    recursive: bool,
    reader: &mut Reader<S>,
    writer: &mut W,
) -> io::Result<After>
where
    S: AsyncRead,
    W: futures::Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    let begun = async {
        let at = inner_path(path)?;
        let root = root(hulld).await?;
        // One inotify instance serves every watch; setting this one up
        // walks the tree.
        crate::blocking(move || crate::files_watch::begin(root, &at, recursive))
            .await
            .map_err(|e| fs_error("watch", path, &e))
    };
    let watch = match begun.await {
        Ok(watch) => watch,
        Err(report) => {
            writer.send(DaemonMsg::Error(report)).await?;
            return Ok(After::Continue);
        }
    };
    writer.send(DaemonMsg::FileWatching).await?;
    crate::files_watch::relay(watch, reader, writer).await
}

async fn read<W>(hulld: &Arc<Hulld>, path: &str, writer: &mut W) -> io::Result<After>
where
    W: futures::Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    let opened = async {
        let at = inner_path(path)?;
        let root = root(hulld).await?;
        crate::blocking(move || {
            let (file, size) = root.open_read(&at)?;
            let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata()?.permissions());
            Ok::<_, io::Error>((file, size, mode & 0o7777))
        })
        .await
        .map_err(|e| fs_error("read", path, &e))
    };
    let (file, size, mode) = match opened.await {
        Ok(opened) => opened,
        Err(report) => {
            writer.send(DaemonMsg::Error(report)).await?;
            return Ok(After::Continue);
        }
    };
    writer.send(DaemonMsg::FileOpened { size, mode }).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || pump_out(file, size, &tx));
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Ok(data) => writer.send(DaemonMsg::FileData(data)).await?,
            Err(e) => {
                // The size was announced: an error ends the read short.
                writer
                    .send(DaemonMsg::Error(fs_error("read", path, &e)))
                    .await?;
                return Ok(After::Continue);
            }
        }
    }
    writer.send(DaemonMsg::FileEnd).await?;
    Ok(After::Continue)
}

/// Sends `size` bytes of `file` in chunks, or an error; stops when the
/// reader is gone.
fn pump_out(file: std::fs::File, size: u64, tx: &tokio::sync::mpsc::Sender<io::Result<Vec<u8>>>) {
    let mut file = file.take(size);
    let mut sent = 0;
    loop {
        // read_to_end fills the spare capacity: no zeroing of each buffer.
        let mut buf = Vec::with_capacity(FILE_CHUNK);
        let chunk = match (&mut file).take(FILE_CHUNK as u64).read_to_end(&mut buf) {
            Ok(0) if sent < size => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file shrank to {sent} bytes while it was read"),
            )),
            Ok(0) => return,
            Ok(n) => {
                sent += n as u64;
                Ok(buf)
            }
            Err(e) => Err(e),
        };
        let failed = chunk.is_err();
        if tx.blocking_send(chunk).is_err() || failed {
            return;
        }
    }
}

enum Piece {
    Data(Vec<u8>),
    End,
}

/// What a write makes.
struct Target<'a> {
    path: &'a str,
    mode: u32,
    make_parents: bool,
}

async fn write<S, W>(
    hulld: &Arc<Hulld>,
    endpoint: &Endpoint,
    target: Target<'_>,
    reader: &mut Reader<S>,
    writer: &mut W,
) -> io::Result<After>
where
    S: AsyncRead,
    W: futures::Sink<DaemonMsg, Error = io::Error> + Unpin,
{
    let Target {
        path,
        mode,
        make_parents,
    } = target;
    let root = match async { Ok::<_, ErrorReport>((inner_path(path)?, root(hulld).await?)) }.await {
        Ok(found) => found,
        Err(report) => {
            writer.send(DaemonMsg::Error(report)).await?;
            return Ok(After::Continue);
        }
    };
    let (at, root) = root;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(CHUNKS_IN_FLIGHT);
    let charged = hulld.clone();
    // The upload, its writer and the ids it acts as live on this one
    // blocking thread from its start to its end.
    let task = tokio::task::spawn_blocking(move || -> io::Result<u64> {
        let mut upload = match root.upload(&at, make_parents) {
            Ok(upload) => upload,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return Ok(0);
            }
        };
        let mut sink = UploadSink::start(charged.charged_writer(upload.file()));
        let _ = ready_tx.send(Ok(()));
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Piece::Data(data) => sink.write(&mut upload, &data)?,
                Piece::End => {
                    sink.finish()?;
                    return upload.finish(mode);
                }
            }
        }
        // The bytes stopped short: dropping the upload removes it.
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the write was cut off",
        ))
    });
    match ready_rx.await {
        Ok(Ok(())) => writer.send(DaemonMsg::FileReady).await?,
        Ok(Err(e)) => {
            writer
                .send(DaemonMsg::Error(fs_error("write", path, &e)))
                .await?;
            return Ok(After::Continue);
        }
        Err(_) => {
            writer
                .send(DaemonMsg::error(
                    ErrorKind::Internal,
                    format!("the write of {path} failed to start"),
                ))
                .await?;
            return Ok(After::Continue);
        }
    }
    // Once the file has failed (a full disk), the rest of the bytes are
    // read and dropped, so the client's stream stays in step and hears why
    // at its end.
    let mut failed = false;
    loop {
        match next_request(reader, endpoint).await {
            Some(Ok(ClientMsg::FileData(data))) => {
                if !failed && tx.send(Piece::Data(data)).await.is_err() {
                    failed = true;
                }
            }
            Some(Ok(ClientMsg::FileEnd)) => {
                let _ = tx.send(Piece::End).await;
                break;
            }
            Some(Ok(other)) => {
                drop(tx);
                let _ = task.await;
                writer
                    .send(DaemonMsg::error(
                        ErrorKind::BadRequest,
                        format!(
                            "a file write takes FileData until FileEnd, not {}; nothing was written",
                            other.kind().name()
                        ),
                    ))
                    .await?;
                return Ok(After::Continue);
            }
            Some(Err(e)) => {
                drop(tx);
                let _ = task.await;
                return Err(e);
            }
            None => {
                drop(tx);
                let _ = task.await;
                return Ok(After::Gone);
            }
        }
    }
    drop(tx);
    let answer = match task.await {
        Ok(Ok(size)) => DaemonMsg::FileWritten { size },
        Ok(Err(e)) => DaemonMsg::Error(fs_error("write", path, &e)),
        Err(e) => DaemonMsg::error(
            ErrorKind::Internal,
            format!("the write of {path} failed: {e}"),
        ),
    };
    writer.send(answer).await?;
    Ok(After::Continue)
}
