//! The writer of an upload through the HTTP API: a process of hulld's
//! binary that copies its stdin (a pipe from hulld) to its stdout (the
//! upload's file), made to join the inner's cgroup before any byte comes.
//! The page cache of what it writes is then the inner's, as the data is,
//! instead of filling hulld's own small memory limit.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Child, Command, Stdio};

/// The argv[1] that turns hulld's binary into an upload's writer.
pub const FILES_WRITER_ARG: &str = "__files-writer";

/// The writer's body: stdin to stdout until the end; the exit code is 0,
/// or the errno of the failure (EDQUOT, ENOSPC...) for hulld to report.
pub fn run() -> i32 {
    match copy() {
        Ok(()) => 0,
        Err(e) => e
            .raw_os_error()
            .filter(|&errno| (1..=255).contains(&errno))
            .unwrap_or(libc::EIO),
    }
}

fn copy() -> io::Result<()> {
    let mut input = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let mut output = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    // From a pipe into a file, std's copy splices: the bytes are not
    // copied through this process.
    io::copy(&mut input, &mut output)?;
    Ok(())
}

/// The pipe to a writer holds this much: hulld hands over a MiB at a
/// time, and a pipe's default 64 KiB would cost a switch between the two
/// processes per 64 KiB.
const PIPE_BYTES: libc::c_int = 1024 * 1024;

/// Starts a writer of `file` from hulld's binary; it waits on its stdin.
pub fn spawn(file: &File) -> io::Result<Child> {
    let child = Command::new("/proc/self/exe")
        .arg(FILES_WRITER_ARG)
        .stdin(Stdio::piped())
        .stdout(file.try_clone()?)
        .stderr(Stdio::null())
        .env_clear()
        .spawn()?;
    if let Some(stdin) = &child.stdin {
        // SAFETY: F_SETPIPE_SZ on the pipe we hold, with an integer
        // argument; a refusal (above pipe-max-size) leaves it as it was.
        unsafe { libc::fcntl(stdin.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
    }
    Ok(child)
}
