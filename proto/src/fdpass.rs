//! File descriptors beside the init link: a SOCK_SEQPACKET socketpair where
//! each message is an 8-byte exec id with the fds of that exec attached
//! (SCM_RIGHTS). Seqpacket keeps each id glued to its own fds.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use tokio::io::unix::AsyncFd;

/// At most this many fds travel with one id (stdin, stdout, stderr).
pub const MAX_FDS: usize = 3;

/// A connected pair of fd channels, both close-on-exec.
pub fn fd_channel_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Sends `fds` tagged with `id`. Blocking; the receiver drains continuously.
pub fn send_fds(sock: impl AsFd, id: u64, fds: &[RawFd]) -> io::Result<()> {
    let tag = id.to_le_bytes();
    let iov = [IoSlice::new(&tag)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives one tagged set of fds, without blocking: `WouldBlock` when none is queued.
pub fn try_recv_fds(sock: impl AsFd) -> io::Result<Option<(u64, Vec<OwnedFd>)>> {
    let mut tag = [0u8; 8];
    let mut iov = [IoSliceMut::new(&mut tag)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel just installed this fd in our table for
                // us (SCM_RIGHTS); nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let bytes = msg.bytes;
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    if bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    if bytes != tag.len() || truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed fd message on the fd channel",
        ));
    }
    Ok(Some((u64::from_le_bytes(tag), fds)))
}

/// The async receiving end, for hulld.
pub struct FdReceiver {
    inner: AsyncFd<OwnedFd>,
}

impl FdReceiver {
    pub fn new(sock: OwnedFd) -> io::Result<Self> {
        nix::fcntl::fcntl(
            &sock,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        Ok(FdReceiver {
            inner: register_async(sock)?,
        })
    }

    /// The next tagged set of fds; `None` once the peer has closed.
    pub async fn recv(&self) -> io::Result<Option<(u64, Vec<OwnedFd>)>> {
        loop {
            let mut guard = self.inner.readable().await?;
            match guard.try_io(|fd| try_recv_fds(fd.get_ref())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Registers an owned fd with the tokio reactor.
pub fn register_async(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` keeps the descriptor open and referring to the same
    // file for as long as the `AsyncFd` that owns it lives.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into())
}
