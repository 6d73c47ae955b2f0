//! The wire protocol of hull.
//!
//! Two links speak it, both as length-delimited frames (a 4-byte big-endian
//! length, then a MessagePack body) through `tokio-serde`:
//!
//! * the control link between a client (the `hull` CLI, an agent) and `hulld`,
//!   over a unix socket or vsock: [`ClientMsg`] in, [`DaemonMsg`] out;
//! * the init link between `hulld` and the inner init, over a socketpair:
//!   [`ToInit`] in, [`FromInit`] out. File descriptors (pipe ends, a PTY
//!   master) travel beside it on a SOCK_SEQPACKET pair, see [`fdpass`].
//!
//! Every connection opens with a [`Hello`] each way; a peer speaking another
//! [`PROTOCOL_VERSION`] gets an error frame and a closed connection.

pub mod fdpass;
pub mod files;
mod frames;
mod messages;
mod requests;

pub use frames::{
    frame_reader, frame_reader_max, frame_writer, FrameBudget, FrameBusy, FrameDecoder,
    FrameReader, FrameWriter, MAX_FRAME_LEN, MAX_REPLY_LEN, SMALL_FRAME,
};
pub use messages::*;
pub use requests::{
    check_shape, needed_scope, peek_kind, refusal, RequestError, RequestKind, RequestReader, Scope,
    MAX_DECODED, MAX_DEPTH, MAX_ITEMS,
};

/// Where the inner sees hulld's directory for it (the service socket and
/// the `hull` client): the `hull` client's default socket is
/// `/run/hull/hull.sock`, so it works there unconfigured.
pub const INNER_API_DIR: &str = "/run/hull";
/// The `hull` client inside the inner, on its PATH.
pub const INNER_API_BIN: &str = "/run/hull/bin";

/// The log source of hulld's own tracing output (`hull logs --daemon`).
pub const DAEMON_SOURCE: &str = "hulld";
/// The log source of non-interactive execs (`hull logs exec`).
pub const EXEC_SOURCE: &str = "exec";

/// Bumped on every incompatible change of the messages below.
pub const PROTOCOL_VERSION: u32 = 1;

/// Whether `name` can name a service, and so a log source: it is also a
/// directory of the log store, so it never holds a '/' or a NUL and is
/// never "." or "..".
pub fn valid_name(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// [`valid_name`] as an error message says it.
pub const NAME_RULE: &str =
    "1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit";

/// `SIGTERM`, `TERM` or `15` as a signal number.
pub fn signal_number(name: &str) -> Option<i32> {
    if let Ok(n) = name.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).is_ok().then_some(n);
    }
    let full = match name.to_ascii_uppercase() {
        n if n.starts_with("SIG") => n,
        n => format!("SIG{n}"),
    };
    full.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

/// An error and its sources, joined with ": ", for a one-line message.
/// Errors name what failed and keep the cause as their `source()`, so
/// each cause appears once.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// Now, in milliseconds since the Unix epoch: the time of every record,
/// row and message hull stamps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A test hook: whether `HULL_SLOW_POINT` names this point, where the
/// caller then stalls, so a test can widen a window (a slow disk, a busy
/// task) that is otherwise too narrow to hit.
pub fn slow_point(name: &str) -> bool {
    std::env::var("HULL_SLOW_POINT").is_ok_and(|v| v == name)
}

/// A test hook: whether `HULL_FAILPOINT` names this point, where the
/// caller then fails as the point says (a kill, a panic). The one reader
/// of the variable.
pub fn failpoint_named(name: &str) -> bool {
    std::env::var("HULL_FAILPOINT").is_ok_and(|v| v == name)
}

/// A test hook: panics when `HULL_FAILPOINT` names this point, so tests
/// can check what hulld does when one of its tasks panics.
pub fn panic_point(name: &str) {
    if failpoint_named(name) {
        panic!("failpoint {name} reached");
    }
}
