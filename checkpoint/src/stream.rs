//! `btrfs send` and `btrfs receive` as child processes whose stream the
//! caller reads or writes asynchronously: the stream of a checkpoint that
//! leaves the machine (hull-remote pushes it) and comes back. The btrfs
//! tool, not ioctls: the send stream's format is its, and it handles the
//! kernel's protocol versions.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use tokio::process::{Child, ChildStdin, ChildStdout, Command};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot start `btrfs send` of {path}")]
    SendStart {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`btrfs send` of {path} failed ({status}): {stderr}")]
    SendFailed {
        path: PathBuf,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot wait for `btrfs send` of {path}")]
    SendWait {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start `btrfs receive` into {path}")]
    ReceiveStart {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`btrfs receive` into {path} failed ({status}): {stderr}")]
    ReceiveFailed {
        path: PathBuf,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot wait for `btrfs receive` into {path}")]
    ReceiveWait {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running `btrfs send`: read [`Send::take_stdout`] to its end, then
/// [`Send::finish`]. Dropped early, the process is killed.
#[derive(Debug)]
pub struct Send {
    child: Child,
    path: PathBuf,
}

/// Starts `btrfs send` of the read-only `snapshot`, incremental from
/// `parent` (a read-only snapshot on the same filesystem, which the
/// receiver has) or full. Needs a tokio runtime.
pub fn send(snapshot: &Path, parent: Option<&Path>) -> Result<Send, StreamError> {
    let mut cmd = Command::new("btrfs");
    cmd.args(["send", "-q"]);
    if let Some(parent) = parent {
        cmd.arg("-p").arg(parent);
    }
    let child = cmd
        .arg(snapshot)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| StreamError::SendStart {
            path: snapshot.to_path_buf(),
            source,
        })?;
    Ok(Send {
        child,
        path: snapshot.to_path_buf(),
    })
}

impl Send {
    /// The process's pid (`None` once it was reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The stream; `None` once taken.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Waits for the process; an exit other than 0 is an error with what
    /// it printed. A stream read to its end is whole only if this is Ok.
    pub async fn finish(self) -> Result<(), StreamError> {
        let path = self.path;
        match exit(self.child).await {
            Ok(None) => Ok(()),
            Ok(Some((status, stderr))) => Err(StreamError::SendFailed {
                path,
                status,
                stderr,
            }),
            Err(source) => Err(StreamError::SendWait { path, source }),
        }
    }
}

/// The stream of a `btrfs send` that ends well only if the process did:
/// at the end of its output the reader waits for it, and a failed send
/// (a stream cut short) is a read error rather than an early end, so a
/// consumer never takes a truncated stream for a whole one.
pub struct SendStream {
    stdout: Option<ChildStdout>,
    exit: Option<Exit>,
}

/// The wait for a `btrfs send` to exit, polled once its output ends.
type Exit = Pin<Box<dyn Future<Output = Result<(), StreamError>> + std::marker::Send>>;

impl Send {
    /// The whole stream as one reader (see [`SendStream`]).
    pub fn into_stream(mut self) -> SendStream {
        let stdout = self.take_stdout();
        SendStream {
            stdout,
            exit: Some(Box::pin(self.finish())),
        }
    }
}

impl AsyncRead for SendStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(stdout) = self.stdout.as_mut() {
            let before = buf.filled().len();
            std::task::ready!(Pin::new(stdout).poll_read(cx, buf))?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            self.stdout = None;
        }
        let Some(exit) = self.exit.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let exited = std::task::ready!(exit.as_mut().poll(cx));
        self.exit = None;
        Poll::Ready(exited.map_err(std::io::Error::other))
    }
}

/// A running `btrfs receive`: write the stream to [`Receive::take_stdin`],
/// drop it, then [`Receive::finish`]. Dropped early, the process is killed
/// (what it received so far stays in `into`, for the caller to delete).
#[derive(Debug)]
pub struct Receive {
    child: Child,
    path: PathBuf,
}

/// Starts `btrfs receive` into the directory `into` (on btrfs), which
/// gets a read-only subvolume named as the sent one was. Needs a tokio
/// runtime.
pub fn receive(into: &Path) -> Result<Receive, StreamError> {
    let child = Command::new("btrfs")
        .args(["receive", "-q"])
        .arg(into)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| StreamError::ReceiveStart {
            path: into.to_path_buf(),
            source,
        })?;
    Ok(Receive {
        child,
        path: into.to_path_buf(),
    })
}

impl Receive {
    /// Where the stream goes; `None` once taken.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Closes the stream (if still held) and waits for the process.
    pub async fn finish(mut self) -> Result<(), StreamError> {
        drop(self.child.stdin.take());
        let path = self.path;
        match exit(self.child).await {
            Ok(None) => Ok(()),
            Ok(Some((status, stderr))) => Err(StreamError::ReceiveFailed {
                path,
                status,
                stderr,
            }),
            Err(source) => Err(StreamError::ReceiveWait { path, source }),
        }
    }
}

/// Waits for the btrfs tool: `None` when it succeeded, else its status
/// and what it printed.
async fn exit(child: Child) -> std::io::Result<Option<(ExitStatus, String)>> {
    let out = child.wait_with_output().await?;
    Ok((!out.status.success()).then(|| {
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_send_or_receive_names_its_path_and_says_why() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-snapshot");
        rt.block_on(async {
            let mut send = send(&missing, None).unwrap();
            let mut out = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut send.take_stdout().unwrap(), &mut out)
                .await
                .unwrap();
            let err = send.finish().await.unwrap_err();
            assert!(matches!(err, StreamError::SendFailed { .. }), "{err}");
            let text = err.to_string();
            assert!(text.contains(&*missing.to_string_lossy()), "{text}");
            // Read as one stream, the failure is a read error, not an end.
            let mut stream = super::send(&missing, None).unwrap().into_stream();
            let err = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut out)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("btrfs send"), "{err}");
            let mut receive = receive(&missing).unwrap();
            let mut stdin = receive.take_stdin().unwrap();
            // The receiver may be gone already: the write can fail.
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stdin, b"not a stream").await;
            drop(stdin);
            let err = receive.finish().await.unwrap_err();
            assert!(matches!(err, StreamError::ReceiveFailed { .. }), "{err}");
            assert!(err.to_string().contains(&*missing.to_string_lossy()));
        });
    }
}
