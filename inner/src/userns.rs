//! The inner's user namespace. Its root is the VM's `base`, an id that
//! owns nothing outside, so a process that escapes every other fence is
//! still nobody there; inside it is root over the inner's own files.
//!
//! The order matters. Idmapped mounts (which show the layer's on-disk
//! uid 0 as the namespace's root) and every mount of the root filesystem
//! need CAP_SYS_ADMIN in the VM's user namespace. So the helper creates
//! the namespace first, through a throwaway child whose maps it writes,
//! and keeps only an fd of it; the init builds the root filesystem with
//! full privilege, with the layers idmapped through that fd, and enters
//! the namespace last, just before it drops its capabilities. The other
//! namespaces stay owned by the VM's user namespace: the inner's root
//! cannot mount, change its hostname or reconfigure its network, whatever
//! capabilities it holds in its own.

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use hull_proto::IdMapping;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("cannot make a pipe to the process that creates the user namespace")]
    Pipe(#[source] nix::Error),
    #[error("cannot fork the process that creates the user namespace")]
    Fork(#[source] nix::Error),
    #[error("the process that creates the user namespace did not report back")]
    Report(#[source] io::Error),
    #[error("cannot unshare a user namespace")]
    Unshare(#[source] nix::Error),
    #[error("cannot write the id map {path}")]
    Map { path: PathBuf, source: io::Error },
    #[error("cannot open the user namespace {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter the inner's user namespace")]
    Enter(#[source] nix::Error),
    #[error("cannot become root of the inner's user namespace")]
    Ids(#[source] nix::Error),
    #[error("cannot give the inner a session keyring of its own")]
    Keyring(#[source] io::Error),
}

/// A new user namespace with `map` for both users and groups, held by the
/// returned fd alone. Only from a single-threaded process (the helper).
pub fn create(map: &IdMapping) -> Result<OwnedFd, UsernsError> {
    let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(UsernsError::Pipe)?;
    // SAFETY: the helper is single-threaded, so the child may run any code;
    // it only unshares, writes to the pipe and waits to be killed.
    match unsafe { fork() }.map_err(UsernsError::Fork)? {
        ForkResult::Child => {
            drop(ready_r);
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers; the
            // child must not outlive a helper that fails before its kill.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            let errno = match unshare(CloneFlags::CLONE_NEWUSER) {
                Ok(()) => 0,
                Err(e) => e as i32,
            };
            let _ = nix::unistd::write(&ready_w, &errno.to_ne_bytes());
            loop {
                // SAFETY: pause(2) only waits for a signal: the parent's kill.
                unsafe { libc::pause() };
            }
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            let made = map_child(child, ready_r, map);
            let _ = kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
            made
        }
    }
}

fn map_child(child: Pid, ready: OwnedFd, map: &IdMapping) -> Result<OwnedFd, UsernsError> {
    let mut errno = [0u8; 4];
    std::fs::File::from(ready)
        .read_exact(&mut errno)
        .map_err(UsernsError::Report)?;
    match i32::from_ne_bytes(errno) {
        0 => {}
        e => return Err(UsernsError::Unshare(Errno::from_raw(e))),
    }
    let proc = PathBuf::from(format!("/proc/{child}"));
    // Written by a holder of CAP_SETGID in the parent namespace, the
    // group map needs no "deny" in setgroups: the inner keeps setgroups(2).
    for file in ["uid_map", "gid_map"] {
        let path = proc.join(file);
        std::fs::write(&path, map.map_line())
            .map_err(|source| UsernsError::Map { path, source })?;
    }
    let path = proc.join("ns/user");
    std::fs::File::open(&path)
        .map(OwnedFd::from)
        .map_err(|source| UsernsError::Open { path, source })
}

/// Enters the user namespace `userns` as its root, with no supplementary
/// groups and a session keyring of its own: the one inherited from hulld
/// would give the inner possession of root's keys.
pub fn enter(userns: &impl AsFd) -> Result<(), UsernsError> {
    setns(userns, CloneFlags::CLONE_NEWUSER).map_err(UsernsError::Enter)?;
    nix::unistd::setgroups(&[]).map_err(UsernsError::Ids)?;
    let root_gid = Gid::from_raw(0);
    nix::unistd::setresgid(root_gid, root_gid, root_gid).map_err(UsernsError::Ids)?;
    let root_uid = Uid::from_raw(0);
    nix::unistd::setresuid(root_uid, root_uid, root_uid).map_err(UsernsError::Ids)?;
    // SAFETY: KEYCTL_JOIN_SESSION_KEYRING with a null name makes a new
    // anonymous keyring; it reads no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if rc < 0 {
        return Err(UsernsError::Keyring(io::Error::last_os_error()));
    }
    Ok(())
}
