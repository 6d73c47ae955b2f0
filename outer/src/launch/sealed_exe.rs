//! hulld's binary as the inner's init runs it, sealed against writes: the
//! file itself through a private read-only overlayfs of its directory, or,
//! where that cannot be had, a sealed memfd copy.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// hulld's binary as the inner's helper and init execute it. The inner's
/// processes can see their init's /proc/1/exe; pointing it at a file no
/// one can write, instead of hulld's binary on disk, closes the
/// CVE-2019-5736 path back out.
pub struct SealedExe {
    fd: OwnedFd,
    sealing: Sealing,
}

/// How the binary is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealing {
    /// hulld's own file, opened through a read-only overlayfs of its
    /// directory that is mounted nowhere: it shares the file's pages, so
    /// it costs no memory (in the VM, whose root is a tmpfs, a copy would
    /// be as large as hulld again), and no write reaches the file through
    /// it. An overlayfs cannot be unwrapped to its lower file, as a
    /// read-only bind mount could be remounted.
    Overlay,
    /// A copy in a sealed memfd: where overlayfs or the new mount API is
    /// missing, or without the privilege to mount.
    MemfdCopy,
}

impl SealedExe {
    pub fn create() -> io::Result<Self> {
        match through_overlay() {
            Ok(fd) => Ok(SealedExe {
                fd,
                sealing: Sealing::Overlay,
            }),
            Err(e) => {
                tracing::info!(
                    error = %e,
                    "no read-only overlayfs of hulld's binary: the inner runs a sealed memfd copy of it"
                );
                Ok(SealedExe {
                    fd: memfd_copy()?,
                    sealing: Sealing::MemfdCopy,
                })
            }
        }
    }

    pub fn sealing(&self) -> Sealing {
        self.sealing
    }

    /// A path that execs the sealed binary. The fd is close-on-exec, so the
    /// helper does not keep it open after its own exec.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.fd.as_raw_fd()
        ))
    }
}

/// hulld's binary opened (O_PATH) through a detached, read-only overlayfs
/// whose top layer is the binary's directory, as runc does since 1.2.
fn through_overlay() -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags};
    let exe = std::fs::read_link("/proc/self/exe")?;
    let unusable = |why: &str| io::Error::other(format!("{}: {why}", exe.display()));
    let (Some(dir), Some(name)) = (exe.parent(), exe.file_name()) else {
        return Err(unusable("not a path to a file"));
    };
    // Replaced since hulld started ("... (deleted)"): the directory holds
    // another binary than the one running.
    if !exe.exists() {
        return Err(unusable("no longer at that path"));
    }
    // Without an upper layer overlayfs is read-only throughout, and then
    // wants two lower layers: the second is an empty directory of our
    // own, under the binary's, which only names the binary's directory
    // lacks could come from.
    let empty = tempfile::Builder::new().prefix(".hulld-exe-").tempdir()?;
    let lowerdir = format!("{}:{}", escape_lowerdir(dir), escape_lowerdir(empty.path()));
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    rustix::mount::fsconfig_set_string(&fs, "source", "hulld-exe")?;
    rustix::mount::fsconfig_set_string(&fs, "lowerdir", lowerdir.as_str())?;
    // Only quiets the kernel's log where the layers are on different
    // filesystems; older kernels lack the option.
    let _ = rustix::mount::fsconfig_set_string(&fs, "xino", "off");
    rustix::mount::fsconfig_create(&fs)?;
    let mount = rustix::mount::fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY
            | MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV,
    )?;
    let fd = rustix::fs::openat(
        &mount,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // The name could have been replaced between the readlink and the
    // mount: the file must be the running one's size and age.
    let running = std::fs::metadata("/proc/self/exe")?;
    let opened = rustix::fs::fstat(&fd)?;
    if u64::try_from(opened.st_size).ok() != Some(running.len())
        || opened.st_mtime != running.mtime()
        || i64::try_from(opened.st_mtime_nsec).ok() != Some(running.mtime_nsec())
    {
        return Err(unusable("the file there is not the one running"));
    }
    Ok(fd)
}

/// overlayfs's lowerdir separates layers with ':' and escapes with '\\'.
fn escape_lowerdir(path: &Path) -> String {
    path.to_string_lossy()
        .replace('\\', "\\\\")
        .replace(':', "\\:")
}

/// hulld's binary copied into a sealed memfd.
fn memfd_copy() -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        "hull-init",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(io::Error::from)?;
    let mut src = std::fs::File::open("/proc/self/exe")?;
    let mut dst = std::fs::File::from(fd);
    io::copy(&mut src, &mut dst)?;
    let fd = OwnedFd::from(dst);
    seal(&fd)?;
    Ok(fd)
}

/// Seals the copy against any change of size or content.
///
/// F_SEAL_FUTURE_WRITE, not F_SEAL_WRITE: the latter also waits for every
/// other reference to the file's pages to go (the kernel's own short-lived
/// ones included) and fails with EBUSY after about 70 ms, which once
/// stopped a hulld from starting. The copy is ours alone until it is
/// sealed, with no mapping, so refusing every later write or writable
/// mapping is the whole of what F_SEAL_WRITE would add.
fn seal(fd: &OwnedFd) -> io::Result<()> {
    let seals =
        libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE;
    // SAFETY: F_ADD_SEALS on our own memfd with an integer argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where it can mount (root, overlayfs), the inner runs hulld's own
    /// file through the read-only overlayfs: the same bytes, executable,
    /// no write reaching it, and no copy in memory.
    #[test]
    fn the_binary_is_sealed_without_a_copy() {
        if !nix::unistd::geteuid().is_root() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "mounting an overlayfs needs root, and CI=true forbids skipping"
            );
            return;
        }
        let exe = SealedExe::create().unwrap();
        let target = std::fs::read_link(exe.path()).unwrap();
        assert!(
            !target.to_string_lossy().starts_with("/memfd:"),
            "a memfd copy: {}",
            target.display()
        );
        assert_eq!(exe.sealing(), Sealing::Overlay);

        let running = std::fs::read("/proc/self/exe").unwrap();
        assert_eq!(std::fs::read(exe.path()).unwrap(), running);
        let refused = std::fs::OpenOptions::new().write(true).open(exe.path());
        assert_eq!(
            refused.map(drop).map_err(|e| e.raw_os_error()),
            Err(Some(libc::EROFS)),
            "opening the sealed binary for writing"
        );
        // It executes: this test binary lists its tests.
        let listed = std::process::Command::new(exe.path())
            .args(["--list", "sealed_exe"])
            .output()
            .unwrap();
        assert!(listed.status.success(), "{listed:?}");
        assert!(
            String::from_utf8_lossy(&listed.stdout).contains("the_binary_is_sealed_without_a_copy")
        );
    }

    #[test]
    fn a_lowerdir_path_keeps_its_colons_and_backslashes() {
        assert_eq!(escape_lowerdir(Path::new("/usr/bin")), "/usr/bin");
        assert_eq!(escape_lowerdir(Path::new("/a:b\\c")), "/a\\:b\\\\c");
    }

    /// A page of the copy that something else still references (here a
    /// pipe it was spliced into; in hulld's start-up, the kernel's own
    /// short-lived references) must not make sealing fail: F_SEAL_WRITE
    /// waits about 70 ms for such references and then fails with EBUSY,
    /// which once stopped a hulld from starting.
    #[test]
    fn sealing_does_not_depend_on_page_references() {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(
            "seal-test",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let mut file = std::fs::File::from(fd);
        io::Write::write_all(&mut file, &[7u8; 16384]).unwrap();
        let fd = OwnedFd::from(file);
        let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
        // SAFETY: a fresh read-only shared mapping of our memfd; nothing else uses it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "{}", io::Error::last_os_error());
        let iov = libc::iovec {
            iov_base: map,
            iov_len: 4096,
        };
        // SAFETY: the iovec points at the 4096 bytes mapped above.
        let spliced = unsafe { libc::vmsplice(pipe_w.as_raw_fd(), &iov, 1, 0) };
        assert_eq!(spliced, 4096, "{}", io::Error::last_os_error());
        // SAFETY: unmapping the mapping made above; the pipe keeps its page.
        assert_eq!(unsafe { libc::munmap(map, 4096) }, 0);

        seal(&fd).expect("sealing with a page still in a pipe");

        let written = nix::unistd::write(&fd, b"x");
        assert_eq!(
            written,
            Err(nix::errno::Errno::EPERM),
            "a write after sealing"
        );
        // SAFETY: F_GET_SEALS on our own memfd.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        for wanted in [libc::F_SEAL_SEAL, libc::F_SEAL_SHRINK, libc::F_SEAL_GROW] {
            assert_ne!(
                seals & wanted,
                0,
                "seal {wanted:#x} missing from {seals:#x}"
            );
        }
        drop(pipe_r);
    }
}
