//! hulld's binary as the inner's init runs it: a sealed memfd copy.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

/// hulld's binary copied into a sealed memfd. The inner's processes can see
/// their init's /proc/1/exe; pointing it at a sealed anonymous file instead
/// of hulld's binary on disk closes the CVE-2019-5736 path back out.
pub struct SealedExe {
    fd: OwnedFd,
}

impl SealedExe {
    pub fn create() -> io::Result<Self> {
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
        Ok(SealedExe { fd })
    }

    /// A path that execs the sealed copy. The memfd is close-on-exec, so the
    /// helper does not keep it open after its own exec.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.fd.as_raw_fd()
        ))
    }
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
