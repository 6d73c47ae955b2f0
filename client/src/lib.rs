//! The client side of the control protocol, used by the `hull` CLI, the
//! HTTP API (over an in-process connection), the tests and the benchmarks.

use std::io;
use std::path::{Path, PathBuf};

use futures::{SinkExt, StreamExt};
use hull_proto::{
    frame_reader_max, frame_writer, BounceReport, CheckpointListing, CheckpointReport, ClientMsg,
    DaemonMsg, ErrorReport, ExecEnd, ExecRequest, FrameReader, FrameWriter, Hello, RestoreReport,
    ServiceRequest, ServiceStatus, SessionInfo, SessionRequest, StatusReport, Stream,
};
pub mod config;
pub mod remote;

pub use remote::Remote;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("hulld is not running (start it with `hull up`): cannot connect to {path}")]
    NotRunning {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The control socket is root's (mode 0600): only root may use it.
    #[error("hull needs root (the control socket is 0600): cannot use {path}")]
    NeedsRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("connection to hulld failed")]
    Io(#[from] io::Error),
    #[error("bad API URL {0}")]
    Url(String),
    #[error("cannot reach the HTTP API at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    /// The API refused: its status, stable error code and message.
    #[error("the HTTP API answered {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("hulld closed the connection")]
    Closed,
    #[error("unexpected reply from hulld: {0}")]
    Unexpected(String),
    #[error("hulld: {}", .0.message)]
    Daemon(ErrorReport),
    /// The inner stopped after hulld had asked it to start the command and
    /// before it said it had: the command may have started.
    #[error("the inner stopped as the command was starting ({0}); it may or may not have run")]
    InnerStopped(String),
}

impl ClientError {
    /// A connect error: root's socket refuses others, anything else means
    /// no hulld listens there.
    fn connect(path: &Path, source: io::Error) -> Self {
        let path = path.to_path_buf();
        match source.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => ClientError::NeedsRoot { path, source },
            _ => ClientError::NotRunning { path, source },
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// The halves of a connection, boxed so that one `Client` type serves a
/// unix socket, vsock and an in-process pipe alike.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;
pub type Reader = FrameReader<ReadHalf, DaemonMsg>;
pub type Writer = FrameWriter<WriteHalf, ClientMsg>;

/// A connection to hulld that has completed the hello.
pub struct Client {
    pub reader: Reader,
    pub writer: Writer,
    pub server: Hello,
}

/// An exec that hulld started.
#[derive(Debug, Clone, Copy)]
pub struct ExecStarted {
    /// The pid inside the inner.
    pub pid: i32,
    /// Its session id.
    pub session: u64,
    /// Its id in the `exec` log, when it is logged.
    pub exec_id: Option<u64>,
}

/// What a non-interactive exec produced.
#[derive(Debug)]
pub struct ExecOutput {
    pub pid: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub end: ExecEnd,
    /// Processes the command left behind still held its output when the
    /// linger ran out: what they wrote later is missing.
    pub output_cut: bool,
}

impl Client {
    /// Connects to hulld's control socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::connect(path, source))?;
        let (r, w) = stream.into_split();
        Self::hello(Box::new(r), Box::new(w)).await
    }

    /// Says hello over any byte stream that reaches hulld's protocol.
    pub async fn over<S>(stream: S) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Self::hello(Box::new(r), Box::new(w)).await
    }

    async fn hello(r: ReadHalf, w: WriteHalf) -> Result<Self> {
        let mut reader = frame_reader_max(r, hull_proto::MAX_REPLY_LEN);
        let mut writer = frame_writer(w);
        writer
            .send(ClientMsg::Hello(Hello::new(concat!(
                "hull ",
                env!("CARGO_PKG_VERSION")
            ))))
            .await?;
        let server = match next(&mut reader).await? {
            DaemonMsg::Hello(h) => h,
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        Ok(Client {
            reader,
            writer,
            server,
        })
    }

    /// Sends `msg` and returns the next reply (an error frame is an `Err`).
    pub async fn request(&mut self, msg: ClientMsg) -> Result<DaemonMsg> {
        self.writer.send(msg).await?;
        next(&mut self.reader).await
    }

    pub async fn status(&mut self) -> Result<StatusReport> {
        match self.request(ClientMsg::Status).await? {
            DaemonMsg::Status(s) => Ok(*s),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn bounce(&mut self, grace_ms: u64) -> Result<BounceReport> {
        match self.request(ClientMsg::Bounce { grace_ms }).await? {
            DaemonMsg::Bounced(r) => Ok(r),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn checkpoint_create(&mut self, comment: Option<String>) -> Result<CheckpointReport> {
        match self
            .request(ClientMsg::CheckpointCreate { comment })
            .await?
        {
            DaemonMsg::CheckpointCreated(r) => Ok(r),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn checkpoint_restore(&mut self, id: &str) -> Result<RestoreReport> {
        match self
            .request(ClientMsg::CheckpointRestore { id: id.to_string() })
            .await?
        {
            DaemonMsg::Restored(r) => Ok(r),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Pushes checkpoint `id` (the newest when `None`) to the remote and
    /// waits for the push, calling `progress` with each report on the way.
    pub async fn checkpoint_push(
        &mut self,
        id: Option<String>,
        mut progress: impl FnMut(&hull_proto::PushReport),
    ) -> Result<hull_proto::PushReport> {
        let mut reply = self.request(ClientMsg::CheckpointPush { id }).await?;
        loop {
            match reply {
                DaemonMsg::PushProgress(r) => progress(&r),
                DaemonMsg::CheckpointPushed(r) => return Ok(r),
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
            reply = next(&mut self.reader).await?;
        }
    }

    pub async fn checkpoint_list(&mut self) -> Result<CheckpointListing> {
        match self.request(ClientMsg::CheckpointList).await? {
            DaemonMsg::Checkpoints(l) => Ok(l),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn checkpoint_delete(&mut self, id: &str) -> Result<()> {
        match self
            .request(ClientMsg::CheckpointDelete { id: id.to_string() })
            .await?
        {
            DaemonMsg::CheckpointDeleted { .. } => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn services(&mut self, request: ServiceRequest) -> Result<Vec<ServiceStatus>> {
        match self.request(ClientMsg::Services(request)).await? {
            DaemonMsg::Services(list) => Ok(list),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The network policy; `set` replaces it first.
    pub async fn network_policy(&mut self, set: Option<String>) -> Result<(Option<String>, bool)> {
        match self.request(ClientMsg::NetworkPolicy(set)).await? {
            DaemonMsg::NetworkPolicy { policy, enforced } => Ok((policy, enforced)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The entry of the inner's `path`.
    pub async fn file_stat(&mut self, path: &str) -> Result<hull_proto::FileEntry> {
        let request = hull_proto::FileRequest::Stat { path: path.into() };
        match self.request(ClientMsg::Files(request)).await? {
            DaemonMsg::FileEntry(entry) => Ok(entry),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// A directory's entries sorted by name (a file's own entry).
    pub async fn file_list(&mut self, path: &str) -> Result<Vec<hull_proto::FileEntry>> {
        let request = hull_proto::FileRequest::List { path: path.into() };
        match self.request(ClientMsg::Files(request)).await? {
            DaemonMsg::FileList(entries) => Ok(entries),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Makes the inner's directory `path` and its missing parents.
    pub async fn file_make_dir(&mut self, path: &str, mode: u32) -> Result<hull_proto::FileEntry> {
        let request = hull_proto::FileRequest::MakeDir {
            path: path.into(),
            mode,
        };
        match self.request(ClientMsg::Files(request)).await? {
            DaemonMsg::FileEntry(entry) => Ok(entry),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Makes the inner's `path` a symlink to `target`, its text as given.
    pub async fn file_symlink(
        &mut self,
        path: &str,
        target: &str,
    ) -> Result<hull_proto::FileEntry> {
        let request = hull_proto::FileRequest::Symlink {
            path: path.into(),
            target: target.into(),
        };
        match self.request(ClientMsg::Files(request)).await? {
            DaemonMsg::FileEntry(entry) => Ok(entry),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Opens the inner's regular file `path` for reading: its size and
    /// mode; its bytes then come from [`Client::file_read_next`].
    pub async fn file_read(&mut self, path: &str) -> Result<(u64, u32)> {
        let request = hull_proto::FileRequest::Read { path: path.into() };
        match self.request(ClientMsg::Files(request)).await? {
            DaemonMsg::FileOpened { size, mode } => Ok((size, mode)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The next bytes of the file being read; `None` after the last.
    pub async fn file_read_next(&mut self) -> Result<Option<Vec<u8>>> {
        match next(&mut self.reader).await? {
            DaemonMsg::FileData(data) => Ok(Some(data)),
            DaemonMsg::FileEnd => Ok(None),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Starts replacing the inner's `path`: returns once hulld can write
    /// there; the bytes then go through [`Client::file_write_data`] and
    /// [`Client::file_write_end`].
    pub async fn file_write(&mut self, path: &str, mode: u32, make_parents: bool) -> Result<()> {
        let request = hull_proto::FileRequest::Write {
            path: path.into(),
            mode,
            make_parents,
        };
        match self.request(ClientMsg::Files(request)).await? {
            DaemonMsg::FileReady => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends the next bytes of a write, in frames of at most
    /// [`hull_proto::FILE_CHUNK`].
    pub async fn file_write_data(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(hull_proto::FILE_CHUNK) {
            self.writer
                .send(ClientMsg::FileData(chunk.to_vec()))
                .await?;
        }
        Ok(())
    }

    /// Ends a write: the bytes hulld put in place.
    pub async fn file_write_end(&mut self) -> Result<u64> {
        match self.request(ClientMsg::FileEnd).await? {
            DaemonMsg::FileWritten { size } => Ok(size),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn ports(&mut self) -> Result<hull_proto::PortsReport> {
        match self.request(ClientMsg::Ports).await? {
            DaemonMsg::Ports(r) => Ok(r),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn ingress(&mut self) -> Result<hull_proto::IngressReport> {
        match self.request(ClientMsg::Ingress).await? {
            DaemonMsg::Ingress(r) => Ok(r),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn shutdown(&mut self, grace_ms: u64) -> Result<()> {
        match self.request(ClientMsg::Shutdown { grace_ms }).await? {
            DaemonMsg::ShuttingDown => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Starts an exec session (an [`ExecSpec`] runs with hulld's defaults);
    /// returns the pid inside the inner.
    pub async fn exec_start(&mut self, request: impl Into<ExecRequest>) -> Result<i32> {
        self.exec_started(request).await.map(|(pid, _)| pid)
    }

    /// [`Self::exec_start`], with the exec's id in the `exec` log when it
    /// is logged.
    pub async fn exec_started(
        &mut self,
        request: impl Into<ExecRequest>,
    ) -> Result<(i32, Option<u64>)> {
        self.exec_begin(request).await.map(|s| (s.pid, s.exec_id))
    }

    /// Starts an exec session: its pid, session id and `exec` log id.
    pub async fn exec_begin(&mut self, request: impl Into<ExecRequest>) -> Result<ExecStarted> {
        match self.request(ClientMsg::Exec(request.into())).await? {
            DaemonMsg::ExecStarted {
                pid,
                session,
                exec_id,
            } => Ok(ExecStarted {
                pid,
                session,
                exec_id,
            }),
            DaemonMsg::ExecEnded(ExecEnd::InnerStopped { reason }) => {
                Err(ClientError::InnerStopped(reason))
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The running exec sessions.
    pub async fn sessions_list(&mut self) -> Result<Vec<SessionInfo>> {
        match self
            .request(ClientMsg::Sessions(SessionRequest::List))
            .await?
        {
            DaemonMsg::Sessions(list) => Ok(list),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Attaches this connection to session `id` (`writer`: take the
    /// writer's role); then read it as an exec's frames. Returns the
    /// session and whether this client is its writer.
    pub async fn session_attach(&mut self, id: u64, writer: bool) -> Result<(SessionInfo, bool)> {
        self.attach_as(id, writer, false).await
    }

    /// Attaches this connection to session `id` as a watcher only: never
    /// its writer (a read-only token may do this).
    pub async fn session_watch(&mut self, id: u64) -> Result<SessionInfo> {
        self.attach_as(id, false, true).await.map(|(info, _)| info)
    }

    async fn attach_as(
        &mut self,
        id: u64,
        writer: bool,
        watch: bool,
    ) -> Result<(SessionInfo, bool)> {
        let request = SessionRequest::Attach { id, writer, watch };
        match self.request(ClientMsg::Sessions(request)).await? {
            DaemonMsg::SessionAttached { info, writer } => Ok((info, writer)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Signals session `id` and waits for its end (SIGKILL after
    /// `timeout_ms`); true when it took the SIGKILL.
    pub async fn session_kill(&mut self, id: u64, signal: i32, timeout_ms: u64) -> Result<bool> {
        match self
            .request(ClientMsg::Sessions(SessionRequest::Kill {
                id,
                signal,
                timeout_ms,
            }))
            .await?
        {
            DaemonMsg::SessionKilled { forced, .. } => Ok(forced),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Starts a detached exec (`request.detach`): its exec id and pid.
    pub async fn exec_detach(&mut self, request: ExecRequest) -> Result<(u64, i32)> {
        match self.request(ClientMsg::Exec(request)).await? {
            DaemonMsg::ExecStarted {
                pid,
                exec_id: Some(id),
                ..
            } => Ok((id, pid)),
            DaemonMsg::ExecEnded(ExecEnd::InnerStopped { reason }) => {
                Err(ClientError::InnerStopped(reason))
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Runs `spec` with `stdin` as its whole input and collects its output.
    /// Input is sent while output is read: a process that answers before it
    /// has read everything must not stall the session.
    pub async fn exec_collect(
        &mut self,
        request: impl Into<ExecRequest>,
        stdin: &[u8],
    ) -> Result<ExecOutput> {
        let spec = request.into();
        let pid = self.exec_start(spec).await?;
        let writer = &mut self.writer;
        let send = async move {
            for chunk in stdin.chunks(64 * 1024) {
                writer.send(ClientMsg::Stdin(chunk.to_vec())).await?;
            }
            writer.send(ClientMsg::StdinEof).await?;
            Ok::<(), ClientError>(())
        };
        let reader = &mut self.reader;
        let receive = async move {
            let mut out = ExecOutput {
                pid,
                stdout: Vec::new(),
                stderr: Vec::new(),
                end: ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
                output_cut: false,
            };
            loop {
                match next(reader).await? {
                    DaemonMsg::Output { stream, data } => match stream {
                        Stream::Stdout => out.stdout.extend_from_slice(&data),
                        Stream::Stderr => out.stderr.extend_from_slice(&data),
                    },
                    DaemonMsg::OutputCut { .. } => out.output_cut = true,
                    DaemonMsg::Port(_) => {}
                    DaemonMsg::ExecEnded(end) => {
                        out.end = end;
                        return Ok(out);
                    }
                    other => return Err(ClientError::Unexpected(format!("{other:?}"))),
                }
            }
        };
        let (sent, received) = futures::join!(send, receive);
        let out = received?;
        // A process that exits without reading all its input is not an error.
        if let Err(e) = sent {
            if !matches!(out.end, ExecEnd::Exited(_)) {
                return Err(e);
            }
        }
        Ok(out)
    }
}

/// The next frame; an error frame from hulld becomes `ClientError::Daemon`.
pub async fn next(reader: &mut Reader) -> Result<DaemonMsg> {
    match reader.next().await {
        Some(Ok(DaemonMsg::Error(report))) => Err(ClientError::Daemon(report)),
        Some(Ok(msg)) => Ok(msg),
        Some(Err(e)) => Err(ClientError::Io(e)),
        None => Err(ClientError::Closed),
    }
}
