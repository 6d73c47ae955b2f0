//! Starting one inner container from hulld: the helper exec from the
//! sealed copy of our binary, with the init's fds placed, and the
//! handshake with the inner init.
//!
//! - `sealed_exe`: hulld's binary as the init runs it, sealed against
//!   writes (a read-only overlayfs of it, or a sealed memfd copy).
//! - `init_link`: hulld's side of the init link (spawn, kill, the
//!   reports and fds of each process).
//! - `inner`: the handle to one running inner, as its users hold it.
//! - `pidfd`: the init through its pidfd (signal, reap, watch its exit).

mod init_link;
mod inner;
mod pidfd;
mod sealed_exe;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hull_inner::{InnerSpec, FD_CHANNEL_FD, INIT_LINK_FD, NETNS_FD};
use hull_proto::fdpass::{self, FdReceiver};
use hull_proto::{
    frame_reader, frame_writer, ExitStatus, FromInit, Hello, ToInit, PROTOCOL_VERSION,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

pub use hull_services::SpawnFailure;
pub use init_link::{InitEvent, InitLink, InitProcess, StartFailure};
pub use inner::Inner;
pub use sealed_exe::SealedExe;

use init_link::{read_fds, read_link};
use inner::hold_mount_ns;
use pidfd::{pidfd_open, watch_exit};

/// The argv[1] that turns hulld's binary into the single-threaded helper.
pub const HELPER_ARG: &str = "__inner-helper";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot create a sealed copy of hulld's binary")]
    SealedExe(#[source] io::Error),
    #[error("cannot create the init link socketpair")]
    Socketpair(#[source] io::Error),
    #[error("cannot start the inner helper {path}")]
    SpawnHelper { path: PathBuf, source: io::Error },
    #[error("the inner helper failed ({status}): {stderr}")]
    Helper { status: String, stderr: String },
    #[error("the inner helper printed no init pid: {0:?}")]
    HelperOutput(String),
    #[error("cannot open a pidfd for the inner init (pid {pid})")]
    Pidfd { pid: i32, source: io::Error },
    #[error("handshake with the inner init failed: {0}")]
    Handshake(String),
    #[error("the inner init failed to set up the container at step {step}: {message}")]
    Setup { step: String, message: String },
}

/// Starts an inner and completes the handshake. `on_exit` receives the
/// generation when its init has been reaped.
pub async fn launch(
    exe: &SealedExe,
    spec: &InnerSpec,
    generation: u64,
    cause: hull_services::InnerCause,
    netns: Option<RawFd>,
    on_exit: mpsc::UnboundedSender<(u64, ExitStatus)>,
) -> Result<Arc<Inner>, LaunchError> {
    let begin = Instant::now();
    let (link_parent, link_child) =
        std::os::unix::net::UnixStream::pair().map_err(LaunchError::Socketpair)?;
    let (fds_parent, fds_child) = fdpass::fd_channel_pair().map_err(LaunchError::Socketpair)?;

    let pid = run_helper(exe, spec, OwnedFd::from(link_child), fds_child, netns).await?;
    let pidfd = pidfd_open(pid).map_err(|source| LaunchError::Pidfd { pid, source })?;
    let pidfd_err = |source| LaunchError::Pidfd { pid, source };
    let watched = pidfd.try_clone().map_err(pidfd_err)?;
    let link_guard = pidfd.try_clone().map_err(pidfd_err)?;
    let (exit_tx, exit_rx) = watch::channel(None);
    tokio::spawn(watch_exit(watched, generation, exit_tx, on_exit));

    link_parent
        .set_nonblocking(true)
        .map_err(LaunchError::Socketpair)?;
    let stream = UnixStream::from_std(link_parent).map_err(LaunchError::Socketpair)?;
    let (read_half, write_half) = stream.into_split();
    let mut reader = frame_reader::<_, FromInit>(read_half);
    let mut writer = frame_writer::<_, ToInit>(write_half);

    // The init sends Hello (or Hello then SetupFailed), waits for ours,
    // then reports Ready.
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        match reader.next().await {
            Some(Ok(FromInit::Hello(h))) if h.version == PROTOCOL_VERSION => Ok(()),
            Some(Ok(FromInit::Hello(h))) => Err(LaunchError::Handshake(format!(
                "init speaks protocol {} (hulld: {PROTOCOL_VERSION})",
                h.version
            ))),
            other => Err(LaunchError::Handshake(format!(
                "expected Hello, got {other:?}"
            ))),
        }
    })
    .await
    .map_err(|_| LaunchError::Handshake("no Hello from the init within 10 s".into()))?;
    first?;
    // A failed send is not final: an init whose setup failed has already
    // queued its SetupFailed report and exited, and that report says more.
    let sent = writer
        .send(ToInit::Hello(Hello::new(concat!(
            "hulld ",
            env!("CARGO_PKG_VERSION")
        ))))
        .await;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(FromInit::Ready { steps }))) => {
            tracing::debug!(?steps, "inner setup steps (microseconds)");
        }
        Ok(Some(Ok(FromInit::SetupFailed { step, message }))) => {
            return Err(LaunchError::Setup { step, message })
        }
        Ok(other) => {
            return Err(LaunchError::Handshake(match sent {
                Err(e) => format!("sending Hello: {e}"),
                Ok(()) => format!("expected Ready, got {other:?}"),
            }))
        }
        Err(_) => return Err(LaunchError::Handshake("no Ready within 10 s".into())),
    }

    let link = Arc::new(InitLink::new(writer));
    tokio::spawn(read_link(reader, link.clone(), link_guard));
    let receiver = FdReceiver::new(fds_parent).map_err(LaunchError::Socketpair)?;
    tokio::spawn(read_fds(receiver, link.clone()));
    let mount_ns = hold_mount_ns(pid, &pidfd);
    Ok(Arc::new(Inner {
        pid,
        generation,
        started: Instant::now(),
        start_time: begin.elapsed(),
        link,
        pidfd,
        exit: exit_rx,
        stop_reason: Mutex::new(None),
        cause,
        mount_ns: Mutex::new(mount_ns),
        user_namespace: spec.user_namespace,
    }))
}

async fn run_helper(
    exe: &SealedExe,
    spec: &InnerSpec,
    link_child: OwnedFd,
    fds_child: OwnedFd,
    netns: Option<RawFd>,
) -> Result<i32, LaunchError> {
    let spec_json = serde_json::to_string(spec).expect("InnerSpec serialises");
    let path = exe.path();
    let mut cmd = tokio::process::Command::new(&path);
    cmd.arg0("hull-inner-helper")
        .arg(HELPER_ARG)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let pairs = [
        (link_child.as_raw_fd(), INIT_LINK_FD),
        (fds_child.as_raw_fd(), FD_CHANNEL_FD),
        (netns.unwrap_or(-1), NETNS_FD),
    ];
    let placed = if netns.is_some() { 3 } else { 2 };
    // SAFETY: between fork and exec the closure only runs `place_fds`, which
    // makes raw fcntl/dup2/close calls (async-signal-safe) on a copied array
    // and allocates nothing; the source fds stay open in the parent until
    // spawn returns because we hold them (the namespace fd is held by the
    // InnerNetns for hulld's lifetime).
    unsafe {
        cmd.pre_exec(move || place_fds(&pairs[..placed]));
    }
    let mut child = cmd
        .spawn()
        .map_err(|source| LaunchError::SpawnHelper { path, source })?;
    drop(link_child);
    drop(fds_child);
    // The spec travels on stdin, not argv: the init's /proc/1/cmdline is
    // readable inside the inner and should not spell out hulld's paths.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(spec_json.as_bytes()).await;
    }
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line).await;
    }
    let status = child.wait().await.map_err(|e| LaunchError::Helper {
        status: "unknown".into(),
        stderr: e.to_string(),
    })?;
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr).await;
        }
        return Err(LaunchError::Helper {
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    line.trim()
        .parse::<i32>()
        .map_err(|_| LaunchError::HelperOutput(line.clone()))
}

/// The most fds [`place_fds`] moves at once (the helper gets three); a
/// fixed bound, as the child between fork and exec must not allocate.
const MAX_PLACED_FDS: usize = 8;

/// In a child between fork and exec: makes each pair's target fd refer to
/// what its source fd referred to on entry, and stay open across exec.
///
/// Plain dup2(source, target) in turn gets two cases wrong: dup2(fd, fd)
/// does nothing, so an fd already in place keeps its close-on-exec flag and
/// is gone after exec; and a source that is also an earlier pair's target
/// (3 -> 4 after 4 -> 3) has been overwritten by the time it is read. So
/// every source is first copied above the highest target, and the targets
/// are then filled from the copies only.
///
/// Only raw fcntl, dup2 and close, and no allocation: safe between fork and
/// exec in a multi-threaded parent.
fn place_fds(pairs: &[(RawFd, RawFd)]) -> io::Result<()> {
    let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
    if pairs.len() > MAX_PLACED_FDS {
        return Err(invalid());
    }
    for (i, &(_, target)) in pairs.iter().enumerate() {
        // Two sources for one target would leave it to the last one silently.
        if target < 0 || pairs[..i].iter().any(|&(_, t)| t == target) {
            return Err(invalid());
        }
    }
    let above = pairs.iter().map(|&(_, t)| t).max().unwrap_or(0) + 1;
    let mut copies: [RawFd; MAX_PLACED_FDS] = [-1; MAX_PLACED_FDS];
    let close_copies = |copies: &[RawFd]| {
        for &fd in copies.iter().filter(|&&fd| fd >= 0) {
            // SAFETY: each copy is an fd this function made and nothing else uses.
            unsafe { libc::close(fd) };
        }
    };
    for (i, &(source, _)) in pairs.iter().enumerate() {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) only reads `source` and returns a
        // new fd numbered at least `above`, so no target is touched yet.
        let fd = unsafe { libc::fcntl(source, libc::F_DUPFD_CLOEXEC, above) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            close_copies(&copies[..i]);
            return Err(e);
        }
        copies[i] = fd;
    }
    for (&copy, &(_, target)) in copies.iter().zip(pairs) {
        // SAFETY: `copy` is above every target, so this dup2 is never the
        // no-op of dup2(fd, fd): the target is replaced and its
        // close-on-exec flag cleared.
        if unsafe { libc::dup2(copy, target) } < 0 {
            let e = io::Error::last_os_error();
            close_copies(&copies);
            return Err(e);
        }
    }
    close_copies(&copies);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    type Pairs = [(RawFd, RawFd); MAX_PLACED_FDS];

    fn fixed(pairs: &[(RawFd, RawFd)]) -> (Pairs, usize) {
        let mut out = [(-1, -1); MAX_PLACED_FDS];
        out[..pairs.len()].copy_from_slice(pairs);
        (out, pairs.len())
    }

    /// Files x, y, z held at fds from 100 up (close-on-exec, like all of
    /// hulld's), so they never sit where a case wants its fds.
    struct Objects {
        dir: tempfile::TempDir,
        fds: Vec<OwnedFd>,
    }

    impl Objects {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let fds = ["x", "y", "z"]
                .iter()
                .map(|name| {
                    let file = std::fs::File::create(dir.path().join(name)).unwrap();
                    // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd or -1.
                    let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
                    assert!(fd >= 100, "{}", io::Error::last_os_error());
                    // SAFETY: the kernel just returned this fd; nothing else owns it.
                    unsafe { OwnedFd::from_raw_fd(fd) }
                })
                .collect();
            Objects { dir, fds }
        }

        fn fd(&self, name: char) -> RawFd {
            self.fds[(name as u8 - b'x') as usize].as_raw_fd()
        }

        /// In a child: `start` puts the named files at the fd numbers a case
        /// starts from, then `place_fds(pairs)`, then exec of a shell that
        /// reports which of its fds refer to one of the files. Fds that did
        /// not survive the exec (close-on-exec) are missing from the answer.
        fn run(
            &self,
            start: &[(char, RawFd)],
            pairs: &[(RawFd, RawFd)],
        ) -> io::Result<BTreeMap<RawFd, String>> {
            let start: Vec<(RawFd, RawFd)> = start
                .iter()
                .map(|&(name, at)| (self.fd(name), at))
                .collect();
            let (start, start_len) = fixed(&start);
            let (pairs, pairs_len) = fixed(pairs);
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(
                r#"for f in /proc/$$/fd/*; do l=$(readlink "$f") && echo "${f##*/} $l"; done"#,
            );
            // SAFETY: between fork and exec the closure makes raw dup3 calls
            // and runs `place_fds`, all async-signal-safe and allocation-free
            // on arrays copied into the closure.
            unsafe {
                cmd.pre_exec(move || {
                    for &(fd, at) in &start[..start_len] {
                        if libc::dup3(fd, at, libc::O_CLOEXEC) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    place_fds(&pairs[..pairs_len])
                });
            }
            let out = cmd.stdin(Stdio::null()).output()?;
            assert!(out.status.success(), "{out:?}");
            let prefix = format!("{}/", self.dir.path().display());
            Ok(String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .filter_map(|line| {
                    let (fd, path) = line.split_once(' ')?;
                    Some((fd.parse().ok()?, path.strip_prefix(&prefix)?.to_owned()))
                })
                .collect())
        }
    }

    #[test]
    fn every_target_refers_to_its_source_and_survives_exec() {
        let o = Objects::new();
        type Case<'a> = (
            &'a str,
            &'a [(char, RawFd)],
            &'a [(RawFd, RawFd)],
            &'a [(RawFd, &'a str)],
        );
        let cases: [Case; 6] = [
            (
                "sources far from the targets (hulld's case)",
                &[('x', 20), ('y', 21), ('z', 22)],
                &[(20, 3), (21, 4), (22, 5)],
                &[(3, "x"), (4, "y"), (5, "z")],
            ),
            // dup2(3, 3) alone leaves fd 3 close-on-exec.
            ("already in place", &[('x', 3)], &[(3, 3)], &[(3, "x")]),
            (
                "a source an earlier target overwrites",
                &[('x', 3), ('y', 7)],
                &[(7, 3), (3, 4)],
                &[(3, "y"), (4, "x")],
            ),
            (
                "a swap",
                &[('x', 3), ('y', 4)],
                &[(3, 4), (4, 3)],
                &[(3, "y"), (4, "x")],
            ),
            (
                "a three-cycle",
                &[('x', 3), ('y', 4), ('z', 5)],
                &[(3, 4), (4, 5), (5, 3)],
                &[(3, "z"), (4, "x"), (5, "y")],
            ),
            (
                "one in place next to one moving",
                &[('x', 3), ('y', 5)],
                &[(5, 5), (3, 4)],
                &[(4, "x"), (5, "y")],
            ),
        ];
        // Every case runs, so a failure names all the orders that break.
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|&(what, start, pairs, want)| {
                let want: BTreeMap<RawFd, String> =
                    want.iter().map(|&(fd, n)| (fd, n.to_owned())).collect();
                let got = o.run(start, pairs).unwrap();
                (got != want).then(|| format!("{what}: got {got:?}, want {want:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn a_bad_source_or_a_doubled_target_fails_the_spawn() {
        let o = Objects::new();
        let err = o.run(&[], &[(1 << 20, 3)]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        let err = o.run(&[('x', 3), ('y', 4)], &[(3, 5), (4, 5)]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }
}
