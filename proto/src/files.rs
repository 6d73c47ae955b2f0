//! What a failed file operation means to a client, shared by hulld (which
//! words its errors), the HTTP API and the `hull` CLI (which name them).

use std::io;

/// What a failed file operation's errno means to a client: a stable
/// `code` (for `--json` and the API's `"error"`), the errno's name (the
/// API's `"code"`, which the Sprites SDKs turn into their exceptions),
/// and, where the system's words would mislead, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub code: &'static str,
    pub errno: &'static str,
    pub why: Option<&'static str>,
}

impl Failure {
    /// The meaning of `errno`; `None`: an error with no errno (a bad
    /// path, a file that is not a regular one).
    pub fn of(errno: Option<i32>) -> Failure {
        let (code, errno, why) = match errno {
            Some(libc::ENOENT) => ("not_found", "ENOENT", None),
            Some(libc::EISDIR) => ("is_a_directory", "EISDIR", None),
            Some(libc::ENOTDIR) => ("not_a_directory", "ENOTDIR", None),
            Some(libc::EACCES | libc::EPERM) => ("permission_denied", "EACCES", None),
            Some(libc::ENOTEMPTY) => ("not_empty", "ENOTEMPTY", None),
            Some(libc::EEXIST) => ("exists", "EEXIST", None),
            Some(libc::ELOOP) => (
                "symlink_refused",
                "ELOOP",
                Some("too many symlinks, or a /proc link, on the way"),
            ),
            Some(libc::EXDEV) => (
                "outside_layer",
                "EXDEV",
                Some("the path is, or leads into, another mount (/proc, /sys, /dev, /etc/resolv.conf, /run or another bind mount), which hull never reads, changes or removes for a client; it serves the sandbox's own filesystem"),
            ),
            Some(libc::ENOSPC | libc::EDQUOT) => ("no_space", "ENOSPC", None),
            Some(libc::ENAMETOOLONG) => ("bad_path", "ENAMETOOLONG", None),
            Some(libc::EBUSY) => ("busy", "EBUSY", None),
            Some(libc::EINVAL) | None => ("bad_path", "EINVAL", None),
            Some(_) => ("internal", "EIO", None),
        };
        Failure { code, errno, why }
    }

    /// `cannot OP PATH: why`, the message of `e`.
    pub fn message(op: &str, path: &str, e: &io::Error) -> String {
        let why = Failure::of(e.raw_os_error())
            .why
            .map_or_else(|| e.to_string(), str::to_string);
        format!("cannot {op} {path}: {why}")
    }
}
