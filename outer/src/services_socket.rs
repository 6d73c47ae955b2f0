//! The inner's way to the service API: a second socket that serves
//! `hull services` and nothing else, and a `hull` client that runs in any
//! image, in a directory hulld owns that the inner sees read-only at
//! [`INNER_API_DIR`]. The control socket, the state dir and hulld's
//! listeners stay out of the inner's reach.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use hull_inner::INNER_API_DIR;
use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum ServicesSocketError {
    #[error("cannot create {path} for the inner's service socket")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot listen on the inner's service socket {path}")]
    Listen { path: PathBuf, source: io::Error },
}

/// Why the `hull` client could not be made runnable in the inner. Not
/// fatal: the socket still serves any client the user brings.
#[derive(Debug, thiserror::Error)]
pub enum ClientInstallError {
    #[error("the hull client is not next to hulld at {path}")]
    Missing { path: PathBuf },
    #[error("cannot list the libraries of {path} with ldd")]
    Ldd { path: PathBuf, source: io::Error },
    #[error("ldd cannot read {path}: {message}")]
    LddFailed { path: PathBuf, message: String },
    #[error("cannot copy {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
}

/// The directory mounted into the inner and the socket listening in it.
pub struct ServicesSocket {
    pub dir: PathBuf,
    pub listener: UnixListener,
}

impl ServicesSocket {
    /// Makes `dir` (`StateDir::services_socket_dir`) with the service socket and, if
    /// it can, the client; an old socket there is hulld's own from a
    /// previous run (the state dir lock keeps a second hulld out).
    /// `owner`: the VM's id of the inner's root, when the inner has a user
    /// namespace, which must own the socket to connect to it.
    pub fn open(dir: &Path, owner: Option<u32>) -> Result<ServicesSocket, ServicesSocketError> {
        let dir = dir.to_path_buf();
        make_dir(&dir)?;
        let socket = dir.join("hull.sock");
        let listen = |source| ServicesSocketError::Listen {
            path: socket.clone(),
            source,
        };
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(listen(e)),
        }
        let listener = UnixListener::bind(&socket).map_err(listen)?;
        // Root in the inner only: a service may run as any user, so letting
        // an unprivileged user of the inner register one would hand it root.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(listen)?;
        if let Some(id) = owner {
            std::os::unix::fs::chown(&socket, Some(id), Some(id)).map_err(listen)?;
        }
        match install_client(&dir) {
            Ok(()) => tracing::debug!(dir = %dir.display(), "hull client ready for the inner"),
            Err(e) => tracing::warn!(
                error = %crate::error_chain(&e),
                "`hull` will not be runnable inside the inner; its service socket still works"
            ),
        }
        Ok(ServicesSocket { dir, listener })
    }
}

fn make_dir(path: &Path) -> Result<(), ServicesSocketError> {
    let create = |source| ServicesSocketError::Create {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(create)?;
    // hulld's umask is 077; the inner's processes need to traverse it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(create)
}

/// What the client needs to run: its ELF interpreter and the libraries it
/// links, as `ldd` resolves them on this machine.
#[derive(Debug, Default, PartialEq, Eq)]
struct Linkage {
    interpreter: Option<PathBuf>,
    /// (the name the binary asks for, where it is here)
    libraries: Vec<(String, PathBuf)>,
}

/// Parses `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x...)` for a
/// library, `/lib64/ld-linux-x86-64.so.2 (0x...)` for the interpreter,
/// `linux-vdso.so.1 (0x...)` (kernel-provided, skipped), and `statically
/// linked` for a binary that needs nothing.
fn parse_ldd(text: &str) -> Linkage {
    let mut linkage = Linkage::default();
    for line in text.lines().map(str::trim) {
        if let Some((name, rest)) = line.split_once(" => ") {
            let path = rest.split(" (").next().unwrap_or("").trim();
            if path.starts_with('/') {
                linkage
                    .libraries
                    .push((name.trim().to_owned(), PathBuf::from(path)));
            }
        } else if line.starts_with('/') {
            let path = line.split(" (").next().unwrap_or("").trim();
            linkage.interpreter = Some(PathBuf::from(path));
        }
    }
    linkage
}

/// Copies the client with the C library it was built against into
/// `dir/lib` and writes `dir/bin/hull`, which starts it through that
/// library's own loader: the inner's image may have another glibc, or none
/// (busybox).
fn install_client(dir: &Path) -> Result<(), ClientInstallError> {
    let client = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("hull")))
        .unwrap_or_else(|| PathBuf::from("hull"));
    if !client.is_file() {
        return Err(ClientInstallError::Missing { path: client });
    }
    let out = Command::new("ldd")
        .arg(&client)
        .output()
        .map_err(|source| ClientInstallError::Ldd {
            path: client.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let linkage = parse_ldd(&text);
    // ldd exits 1 for a static binary ("not a dynamic executable").
    if !out.status.success() && linkage.interpreter.is_some() {
        return Err(ClientInstallError::LddFailed {
            path: client,
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let lib = dir.join("lib");
    let bin = dir.join("bin");
    for d in [&lib, &bin] {
        std::fs::create_dir_all(d)
            .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)))
            .map_err(|source| ClientInstallError::Write {
                path: d.to_path_buf(),
                source,
            })?;
    }
    copy_fresh(&client, &lib.join("hull"))?;
    for (name, path) in &linkage.libraries {
        copy_fresh(path, &lib.join(name))?;
    }
    let inner_lib = Path::new(INNER_API_DIR).join("lib");
    let inner_client = inner_lib.join("hull");
    let exec = match &linkage.interpreter {
        Some(interp) => {
            let name = interp.file_name().unwrap_or_default();
            copy_fresh(interp, &lib.join(name))?;
            format!(
                "exec {} --library-path {} {} \"$@\"",
                inner_lib.join(name).display(),
                inner_lib.display(),
                inner_client.display()
            )
        }
        None => format!("exec {} \"$@\"", inner_client.display()),
    };
    let script = format!(
        "#!/bin/sh\n# hull's client, run with the C library it was built against (the image may have another, or none).\n{exec}\n"
    );
    write_atomically(&bin.join("hull"), script.as_bytes(), 0o755)
}

/// Copies `from` unless `to` already has its size and is not older; through
/// a temporary name and a rename, so an inner running the old copy keeps it.
fn copy_fresh(from: &Path, to: &Path) -> Result<(), ClientInstallError> {
    let copy_err = |source| ClientInstallError::Copy {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    let src = std::fs::metadata(from).map_err(copy_err)?;
    if let Ok(dst) = std::fs::metadata(to) {
        let fresh = matches!((src.modified(), dst.modified()), (Ok(s), Ok(d)) if d >= s);
        if dst.len() == src.len() && fresh {
            return Ok(());
        }
    }
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).map_err(copy_err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(copy_err)?;
    std::fs::rename(&tmp, to).map_err(copy_err)
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ClientInstallError> {
    let write_err = |source| ClientInstallError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(write_err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ldd_finds_interpreter_and_libraries() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd1a7f2000)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let linkage = parse_ldd(text);
        assert_eq!(
            linkage.interpreter,
            Some(PathBuf::from("/lib64/ld-linux-x86-64.so.2"))
        );
        assert_eq!(
            linkage.libraries,
            vec![
                (
                    "libgcc_s.so.1".to_owned(),
                    PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1")
                ),
                (
                    "libc.so.6".to_owned(),
                    PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")
                ),
            ]
        );
    }

    #[test]
    fn parse_ldd_of_a_static_binary_is_empty() {
        assert_eq!(parse_ldd("\tstatically linked\n"), Linkage::default());
        assert_eq!(
            parse_ldd("\tnot a dynamic executable\n"),
            Linkage::default()
        );
    }

    #[test]
    fn parse_ldd_skips_unresolved_libraries() {
        let linkage = parse_ldd("\tlibfoo.so.1 => not found\n");
        assert!(linkage.libraries.is_empty());
    }

    #[test]
    fn copy_fresh_replaces_a_changed_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a");
        let to = dir.path().join("b");
        std::fs::write(&from, b"one").unwrap();
        copy_fresh(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"one");
        std::fs::write(&from, b"three").unwrap();
        copy_fresh(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"three");
        assert_eq!(
            std::fs::metadata(&to).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }
}
