//! A process's stdio as hulld holds it: the pipes or the PTY master the
//! init passed, fed from a bounded input queue and read in chunks that
//! become `Output` messages.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use hull_proto::{fdpass, WinSize};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

/// The most output one read of a process's pipe takes, and so the largest
/// `Output` message. Every hop between the pipe and a client's socket
/// (the client's queue, the frame writer, the HTTP API's in-process pipe,
/// its frame reader, the WebSocket's write buffer) holds up to one such
/// message while the client does not read: at 64 KiB an exec whose client
/// never read cost hulld about 730 KiB, at 16 KiB about 200 KiB.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Client stdin chunks buffered towards the process. When full, hulld stops
/// reading the client (backpressure) but keeps pumping output, so a process
/// that writes before it reads can never deadlock the session.
const STDIN_QUEUE: usize = 16;

/// Input for the process, as its clients send it.
pub(crate) enum Input {
    Data(Vec<u8>),
    /// A new terminal size, in the same queue as the input so that a
    /// process reads its input with the size the client had set before
    /// sending it (`stty size` after a resize and a newline).
    Resize(WinSize),
    /// End of input. On a PTY the terminal stays open (the shell's EOF is
    /// a ^D the user types); on pipes the process sees end of file.
    Eof,
}

/// The process's output end of things, as hulld holds it; its input is
/// the sender [`ProcessIo::from_fds`] returns beside it.
pub(crate) struct ProcessIo {
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    pub master: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl ProcessIo {
    pub(crate) fn from_fds(
        fds: Vec<OwnedFd>,
        tty: bool,
    ) -> io::Result<(Self, mpsc::Sender<Input>)> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected fds from init");
        let (tx, rx) = mpsc::channel::<Input>(STDIN_QUEUE);
        if tty {
            let [master]: [OwnedFd; 1] = fds.try_into().map_err(|_| bad())?;
            nix::fcntl::fcntl(
                &master,
                nix::fcntl::FcntlArg::F_SETFL(
                    nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_RDWR,
                ),
            )?;
            let master = Arc::new(fdpass::register_async(master)?);
            tokio::spawn(feed_pty(master.clone(), rx));
            let io = ProcessIo {
                stdout: None,
                stderr: None,
                master: Some(master),
            };
            return Ok((io, tx));
        }
        let [stdin, stdout, stderr]: [OwnedFd; 3] = fds.try_into().map_err(|_| bad())?;
        tokio::spawn(feed_pipe(pipe::Sender::from_owned_fd(stdin)?, rx));
        let io = ProcessIo {
            stdout: Some(pipe::Receiver::from_owned_fd(stdout)?),
            stderr: Some(pipe::Receiver::from_owned_fd(stderr)?),
            master: None,
        };
        Ok((io, tx))
    }

    pub fn output_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some() || self.master.is_some()
    }

    pub fn close_output(&mut self, source: Source) {
        match source {
            Source::Stdout => self.stdout = None,
            Source::Stderr => self.stderr = None,
            Source::Pty => self.master = None,
        }
    }
}

/// Sets the terminal size on a PTY's master; the kernel signals SIGWINCH
/// to the terminal's foreground group.
fn set_winsize(master: &AsyncFd<OwnedFd>, size: WinSize) {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

async fn feed_pipe(mut pipe: pipe::Sender, mut rx: mpsc::Receiver<Input>) {
    while let Some(input) = rx.recv().await {
        match input {
            Input::Data(chunk) => {
                if pipe.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            // Dropping the pipe is the process's end of file.
            Input::Eof => return,
            Input::Resize(_) => {}
        }
    }
}

async fn feed_pty(master: Arc<AsyncFd<OwnedFd>>, mut rx: mpsc::Receiver<Input>) {
    while let Some(input) = rx.recv().await {
        match input {
            Input::Data(chunk) => {
                if write_all_fd(&master, &chunk).await.is_err() {
                    return;
                }
            }
            Input::Resize(size) => set_winsize(&master, size),
            Input::Eof => {}
        }
    }
}

async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| nix::unistd::read(inner.get_ref(), buf).map_err(io::Error::from))
        {
            // EIO: every slave fd is closed; that is a PTY's end of file.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all_fd(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// The next output of `pipe`, up to `max` bytes, read straight into the
/// buffer that becomes its message (empty at the end of file). Memory is
/// taken only once there is something to read, and no buffer is kept
/// between reads. Cancel-safe: nothing is read before the last await.
pub(crate) async fn read_opt_pipe(
    pipe: Option<&pipe::Receiver>,
    max: usize,
) -> io::Result<Vec<u8>> {
    let Some(pipe) = pipe else {
        return std::future::pending().await;
    };
    loop {
        pipe.readable().await?;
        let mut data = Vec::with_capacity(max);
        match pipe.try_read_buf(&mut data) {
            Ok(_) => {
                // A short read keeps only its bytes: a queued message is
                // counted by its length.
                if data.capacity() - data.len() > data.len() {
                    data.shrink_to_fit();
                }
                return Ok(data);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

pub(crate) async fn read_opt_fd(
    fd: Option<&AsyncFd<OwnedFd>>,
    buf: &mut [u8],
) -> io::Result<usize> {
    match fd {
        Some(fd) => read_fd(fd, buf).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Source {
    Stdout,
    Stderr,
    Pty,
}
