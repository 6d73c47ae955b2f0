//! How the CLI fails: errors with stable codes, exit codes, and writing
//! to a stdout whose reader may be gone.

use std::io::Write;

use anyhow::Result;
use hull_proto::ErrorKind;

use super::error_chain;
use crate::client::ClientError;
use crate::config::ConfigError;

/// Failures of the CLI itself; each has a stable code (see [`error_code`]).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// hulld runs as root and its control socket is root's (mode 0600).
    #[error("hull needs root (the control socket is 0600); run it as root, e.g. with sudo")]
    NeedsRoot,
    /// A command that only makes sense in the VM, asked inside the inner.
    #[error("`hull {0}` runs in the VM, not inside the inner; from here, `hull services`, `hull ports` and `hull ingress` work")]
    NotInInner(&'static str),
    /// A command that runs only where hulld is, asked with --url.
    #[error("`hull {0}` runs on the VM itself, not through --url")]
    LocalOnly(&'static str),
    /// --url without a token.
    #[error("--url needs a token: give --token or set HULL_TOKEN (make one on the VM with `hull token create --scope exec`)")]
    NoToken,
    /// The reader of stdout went away (`hull status | head -1`): the end of
    /// the output, not a failure to report.
    #[error("stdout is closed")]
    StdoutClosed,
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
    /// The inner stopped while the command ran; hull exits 255.
    #[error("session ended: {0}")]
    SessionEnded(String),
    /// The same, on a terminal: hull reset it, and says how to go on.
    #[error("session ended: {0}; the terminal was reset. `hull console` opens a new shell (and opens one by itself after a bounce or restore)")]
    TerminalEnded(String),
    /// `hull console --attach` with no console session running.
    #[error("no console session is running to attach to (`hull sessions list` shows the sessions; `hull console` starts one)")]
    NoConsole,
}

/// The stable, snake_case code of an error, for `--json` (docs/guide/json.md).
pub fn error_code(e: &anyhow::Error) -> &'static str {
    for cause in e.chain() {
        if let Some(e) = cause.downcast_ref::<CliError>() {
            return match e {
                CliError::NeedsRoot => "needs_root",
                CliError::NotInInner(_) | CliError::LocalOnly(_) => "not_permitted",
                CliError::NoToken => "unauthorized",
                CliError::StdoutClosed | CliError::Stdout(_) => "stdout",
                CliError::SessionEnded(_) | CliError::TerminalEnded(_) => "inner_stopped",
                CliError::NoConsole => "not_found",
            };
        }
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            return match e {
                ClientError::NotRunning { .. } => "not_running",
                ClientError::NeedsRoot { .. } => "needs_root",
                ClientError::Io(_) | ClientError::Closed => "connection_lost",
                ClientError::Unexpected(_) => "protocol",
                ClientError::InnerStopped(_) => "inner_stopped",
                ClientError::Daemon(report) => daemon_code(report.kind),
                ClientError::Url(_) => "bad_url",
                ClientError::Unreachable { .. } => "not_running",
                ClientError::Tls(_) => "tls",
                ClientError::Http(_) => "protocol",
                ClientError::Api { status: 401, .. } => "unauthorized",
                ClientError::Api { status: 403, .. } => "not_permitted",
                ClientError::Api { .. } => "api",
            };
        }
        if cause.is::<ConfigError>() {
            return "config";
        }
        if cause.is::<hull_image::ImageError>() {
            return "image";
        }
    }
    "failed"
}

pub(super) fn daemon_code(kind: ErrorKind) -> &'static str {
    use hull_proto::SpawnErrorKind as S;
    match kind {
        ErrorKind::Version => "version_mismatch",
        ErrorKind::BadFrame => "bad_frame",
        ErrorKind::BadRequest => "bad_request",
        ErrorKind::InnerUnavailable => "inner_unavailable",
        ErrorKind::Spawn(S::NotFound) => "command_not_found",
        ErrorKind::Spawn(S::PermissionDenied) => "command_not_executable",
        ErrorKind::Spawn(S::BadCwd) => "bad_cwd",
        ErrorKind::Spawn(S::Other) => "spawn_failed",
        ErrorKind::NotFound => "not_found",
        ErrorKind::Service => "service_refused",
        ErrorKind::Storage => "storage",
        ErrorKind::NotPermitted => "not_permitted",
        ErrorKind::Internal => "internal",
        ErrorKind::Busy => "busy",
        ErrorKind::NotRunning => "not_running",
        ErrorKind::File(errno) => hull_proto::files::Failure::of(Some(errno)).code,
    }
}

/// Reports an error on stderr: `hull: message`, or one JSON object
/// `{"code": ..., "message": ...}` under `--json`.
pub fn report_error(json: bool, code: &str, message: &str) {
    if json {
        let obj = serde_json::json!({ "code": code, "message": message });
        errln!("{obj}");
    } else {
        errln!("hull: {message}");
    }
}

/// Exit code of a command that failed in hull itself (not in the inner).
pub const EXIT_FAILED: i32 = 1;
/// Exit code when hull needs root (every command but exec and console,
/// which use [`HULL_FAILED`]).
pub const EXIT_NEEDS_ROOT: i32 = 4;
/// Exit code when stdout's reader went away, as a shell reports a
/// process that SIGPIPE ended.
pub const EXIT_STDOUT_CLOSED: i32 = 128 + libc::SIGPIPE;

/// One line to stdout. A closed stdout becomes [`CliError::StdoutClosed`]
/// rather than the panic of `println!`.
pub fn write_out(args: std::fmt::Arguments) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(stdout_error)
}

pub(super) fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::StdoutClosed.into()
    } else {
        CliError::Stdout(e).into()
    }
}

/// Exit code hull uses when hull itself (not the command) failed.
pub const HULL_FAILED: i32 = 125;
/// Exit code when the inner stopped underneath the session.
pub const INNER_STOPPED: i32 = 255;
/// Exit code of an exec its `--timeout` ended, as timeout(1) has it.
pub const TIMED_OUT: i32 = 124;

/// Reports a failed command (nothing for a closed stdout) and returns the
/// exit code. A command run in the inner (`exec`, `console`) keeps every
/// code but 125 (hull failed) and 255 (the inner stopped under it) for the
/// command's own; the rest exit 1, or 4 when hull needs root.
pub fn fail(e: &anyhow::Error, json: bool, runs_command: bool) -> i32 {
    if e.chain()
        .any(|c| matches!(c.downcast_ref(), Some(CliError::StdoutClosed)))
    {
        return EXIT_STDOUT_CLOSED;
    }
    let code = error_code(e);
    report_error(json, code, &error_chain(e));
    match (runs_command, code) {
        (true, "inner_stopped") => INNER_STOPPED,
        (true, _) => HULL_FAILED,
        (false, "needs_root") => EXIT_NEEDS_ROOT,
        (false, _) => EXIT_FAILED,
    }
}
