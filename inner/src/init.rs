//! The inner init, PID 1 of the inner's pid namespace. It reaps zombies,
//! forwards SIGTERM/SIGINT/SIGHUP to everything in the inner, spawns
//! processes on hulld's request and reports each exit.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use futures::{SinkExt, StreamExt};
use hull_proto::{
    fdpass, frame_reader, frame_writer, ExecSpec, ExitStatus, FromInit, Hello, SpawnErrorKind,
    ToInit, PROTOCOL_VERSION,
};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};

use crate::rootfs::{self, SetupError};
use crate::security;
use crate::spec::{InnerSpec, FD_CHANNEL_FD, INIT_LINK_FD, USERNS_FD};

/// The environment every process in the inner starts from.
/// The image's usual directories, then the `hull` client hulld mounts.
const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/run/hull/bin";

/// Entry point of the forked child. Returns the init's exit code.
pub fn run(spec: &InnerSpec) -> i32 {
    // The exec path was /proc/<hulld>/fd/<N>; name the process for `ps`.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"hull-init".as_ptr(), 0, 0, 0) };
    redirect_stdio_to_null();
    // hulld runs with umask 077; the inner's files follow the usual 022.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    // SAFETY: the helper placed the user namespace's fd at USERNS_FD when
    // the spec asks for one; nothing else in this process owns it.
    let userns = spec
        .user_namespace
        .map(|_| unsafe { OwnedFd::from_raw_fd(USERNS_FD) });
    security::close_fds_above(FD_CHANNEL_FD, userns.as_ref().map(|_| USERNS_FD));
    let setup = rootfs::prepare(spec, userns.as_ref()).and_then(|mut steps| {
        let started = std::time::Instant::now();
        if let Some(userns) = userns {
            crate::userns::enter(&userns).map_err(SetupError::UserNamespace)?;
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            steps.push(("user-namespace".to_string(), micros));
        }
        // Timed apart: the kernel checks and JIT-compiles the filter here,
        // once per inner.
        let started = std::time::Instant::now();
        security::drop_privileges(spec.seccomp.as_ref())?;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        steps.push(("privileges".to_string(), micros));
        Ok(steps)
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return 111,
    };
    runtime.block_on(serve(setup))
}

/// The helper's stdout is hulld's pipe for the init's pid; the init must not
/// hold it (or anything else of hulld's) open.
fn redirect_stdio_to_null() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which Rust's std
            // treats as always open; `null` stays owned and is closed on drop.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// A process spawned for hulld, keyed by its pid in the inner.
struct Spawned {
    pids: HashMap<i32, u64>,
    ids: HashMap<u64, i32>,
}

async fn serve(setup: Result<Vec<(String, u64)>, SetupError>) -> i32 {
    // SAFETY: hulld's helper placed the init link at INIT_LINK_FD and the fd
    // channel at FD_CHANNEL_FD; nothing else in this process owns them.
    let (link, fd_channel) = unsafe {
        (
            std::os::unix::net::UnixStream::from_raw_fd(INIT_LINK_FD),
            OwnedFd::from_raw_fd(FD_CHANNEL_FD),
        )
    };
    for fd in [INIT_LINK_FD, FD_CHANNEL_FD] {
        let _ = fcntl(
            // SAFETY: both fds were just wrapped above and are open.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC),
        );
    }
    if link.set_nonblocking(true).is_err() {
        return 112;
    }
    let Ok(link) = UnixStream::from_std(link) else {
        return 113;
    };
    let (read_half, write_half) = link.into_split();
    let mut reader = frame_reader::<_, ToInit>(read_half);
    let mut writer = frame_writer::<_, FromInit>(write_half);

    if writer
        .send(FromInit::Hello(Hello::new("hull-init")))
        .await
        .is_err()
    {
        return 114;
    }
    let steps = match setup {
        Ok(steps) => steps,
        Err(e) => {
            let _ = writer
                .send(FromInit::SetupFailed {
                    step: e.step().to_string(),
                    message: hull_proto::error_chain(&e),
                })
                .await;
            return 1;
        }
    };
    match reader.next().await {
        Some(Ok(ToInit::Hello(h))) if h.version == PROTOCOL_VERSION => {}
        _ => return 115,
    }

    let (Ok(mut sigchld), Ok(mut sigterm), Ok(mut sigint), Ok(mut sighup)) = (
        signal(SignalKind::child()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        return 116;
    };
    if writer.send(FromInit::Ready { steps }).await.is_err() {
        return 117;
    }

    let mut spawned = Spawned {
        pids: HashMap::new(),
        ids: HashMap::new(),
    };
    let mut link_open = true;
    loop {
        let mut replies = Vec::new();
        tokio::select! {
            frame = reader.next(), if link_open => match frame {
                Some(Ok(ToInit::Spawn { id, spec })) => {
                    // hulld runs a request it has no receipt for on the next
                    // inner: nothing may start before the receipt is out.
                    if writer.send(FromInit::Received { id }).await.is_ok() {
                        replies.push(spawn(&mut spawned, &fd_channel, id, &spec));
                    } else {
                        link_open = false;
                    }
                }
                Some(Ok(ToInit::Kill { id, signal })) => signal_process(&spawned, id, signal),
                Some(Ok(ToInit::Hello(_))) => {}
                // hulld is gone. The inner lives on until a new hulld
                // cleans it up; keep reaping meanwhile.
                Some(Err(_)) | None => link_open = false,
            },
            _ = sigchld.recv() => reap(&mut spawned, &mut replies),
            _ = sigterm.recv() => forward(Signal::SIGTERM),
            _ = sigint.recv() => forward(Signal::SIGINT),
            _ = sighup.recv() => forward(Signal::SIGHUP),
        }
        if link_open {
            for reply in replies {
                if writer.send(reply).await.is_err() {
                    link_open = false;
                    break;
                }
            }
        }
    }
}

/// kill(-1) from PID 1 reaches every other process of the pid namespace.
fn forward(sig: Signal) {
    let _ = kill(Pid::from_raw(-1), sig);
}

fn signal_process(spawned: &Spawned, id: u64, signal: i32) {
    let (Some(pid), Ok(sig)) = (spawned.ids.get(&id), Signal::try_from(signal)) else {
        return;
    };
    // Every spawned process leads its own session and process group.
    if kill(Pid::from_raw(-pid), sig).is_err() {
        let _ = kill(Pid::from_raw(*pid), sig);
    }
}

fn reap(spawned: &mut Spawned, replies: &mut Vec<FromInit>) {
    loop {
        let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitStatus::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        let (pid, status) = status;
        if let Some(id) = spawned.pids.remove(&pid.as_raw()) {
            spawned.ids.remove(&id);
            replies.push(FromInit::Exited { id, status });
        }
    }
}

fn spawn_error(id: u64, kind: SpawnErrorKind, message: String) -> FromInit {
    FromInit::SpawnFailed { id, kind, message }
}

fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

fn set_cloexec(fd: &OwnedFd) {
    let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
}

/// The child's stdio and the ends hulld gets, in the order the fd channel
/// carries them: [stdin writer, stdout reader, stderr reader] or [pty master].
struct Stdio3 {
    child: [OwnedFd; 3],
    parent: Vec<OwnedFd>,
    tty: bool,
}

fn make_stdio(spec: &ExecSpec) -> std::io::Result<Stdio3> {
    if let Some(size) = spec.tty {
        let winsize = nix::pty::Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&winsize), None)?;
        set_cloexec(&pty.master);
        set_cloexec(&pty.slave);
        let child = [pty.slave.try_clone()?, pty.slave.try_clone()?, pty.slave];
        return Ok(Stdio3 {
            child,
            parent: vec![pty.master],
            tty: true,
        });
    }
    let (stdin_r, stdin_w) = cloexec_pipe()?;
    let (stdout_r, stdout_w) = cloexec_pipe()?;
    let (stderr_r, stderr_w) = cloexec_pipe()?;
    Ok(Stdio3 {
        child: [stdin_r, stdout_w, stderr_w],
        parent: vec![stdin_w, stdout_r, stderr_r],
        tty: false,
    })
}

/// A user of the inner's /etc/passwd.
struct Account {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn lookup_user(name: &str) -> Option<Account> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || (f[0] != name && f[2] != name) {
            return None;
        }
        Some(Account {
            name: f[0].to_string(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5].to_string(),
        })
    })
}

fn build_command(
    spec: &ExecSpec,
    account: Option<&Account>,
    stdio: [OwnedFd; 3],
    tty: bool,
) -> Command {
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..]);
    cmd.env_clear();
    cmd.env("PATH", DEFAULT_PATH);
    let (name, home) = account
        .map(|a| (a.name.as_str(), a.home.as_str()))
        .unwrap_or(("root", "/root"));
    cmd.env("HOME", home);
    cmd.env("USER", name);
    cmd.env("LOGNAME", name);
    if let Some(a) = account {
        cmd.uid(a.uid).gid(a.gid);
    }
    if tty {
        cmd.env("TERM", "xterm-256color");
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    cmd.current_dir(spec.cwd.as_deref().unwrap_or("/"));
    let [stdin, stdout, stderr] = stdio;
    cmd.stdin(Stdio::from(stdin));
    cmd.stdout(Stdio::from(stdout));
    cmd.stderr(Stdio::from(stderr));
    // SAFETY: the closure runs between fork and exec and calls only the
    // async-signal-safe setsid(2) and ioctl(2).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn spawn(spawned: &mut Spawned, fd_channel: &OwnedFd, id: u64, spec: &ExecSpec) -> FromInit {
    if spec.argv.is_empty() || spec.argv[0].is_empty() {
        return spawn_error(id, SpawnErrorKind::Other, "empty command".into());
    }
    let cwd = spec.cwd.as_deref().unwrap_or("/");
    if !Path::new(cwd).is_dir() {
        return spawn_error(
            id,
            SpawnErrorKind::BadCwd,
            format!("working directory {cwd} does not exist or is not a directory"),
        );
    }
    let account = match &spec.user {
        None => None,
        Some(user) => match lookup_user(user) {
            Some(a) => Some(a),
            None => {
                return spawn_error(
                    id,
                    SpawnErrorKind::Other,
                    format!("no user {user:?} in the inner's /etc/passwd"),
                )
            }
        },
    };
    let stdio = match make_stdio(spec) {
        Ok(s) => s,
        Err(e) => return spawn_error(id, SpawnErrorKind::Other, format!("creating stdio: {e}")),
    };
    let Stdio3 { child, parent, tty } = stdio;
    let mut cmd = build_command(spec, account.as_ref(), child, tty);
    let result = cmd.spawn();
    drop(cmd);
    let child = match result {
        Ok(c) => c,
        Err(e) => {
            let kind = match e.kind() {
                std::io::ErrorKind::NotFound => SpawnErrorKind::NotFound,
                std::io::ErrorKind::PermissionDenied => SpawnErrorKind::PermissionDenied,
                _ => SpawnErrorKind::Other,
            };
            return spawn_error(id, kind, format!("{}: {e}", spec.argv[0]));
        }
    };
    let pid = child.id() as i32;
    spawned.pids.insert(pid, id);
    spawned.ids.insert(id, pid);
    let raw: Vec<RawFd> = parent.iter().map(|fd| fd.as_raw_fd()).collect();
    if let Err(e) = fdpass::send_fds(fd_channel, id, &raw) {
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        return spawn_error(id, SpawnErrorKind::Other, format!("passing stdio: {e}"));
    }
    FromInit::Spawned { id, pid }
}
