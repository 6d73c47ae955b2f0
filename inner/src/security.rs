//! What keeps the inner's root from reaching the root namespace: a seccomp
//! filter, a reduced capability set, a non-dumpable init, no stray file
//! descriptors.

use std::collections::HashSet;
use std::io;

use caps::{CapSet, Capability};

use crate::seccomp::SeccompFilter;

/// Docker's default set without CAP_MKNOD: there is no device cgroup in
/// front of the inner, so a new device node would reach the VM's disks.
/// Everything else (SYS_ADMIN, SYS_MODULE, DAC_READ_SEARCH for
/// open_by_handle_at, SYS_PTRACE, ...) is gone from the bounding set.
const KEPT: [Capability; 13] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// The step of [`drop_privileges`] that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot drop privileges: {step} failed")]
pub struct PrivilegeError {
    pub step: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn step_failed<E: std::error::Error + Send + Sync + 'static>(
    step: impl FnOnce() -> String,
) -> impl FnOnce(E) -> PrivilegeError {
    move |e| PrivilegeError {
        step: step(),
        source: Box::new(e),
    }
}

/// Installs the seccomp filter, if any, then reduces the capabilities.
/// The filter goes first: without PR_SET_NO_NEW_PRIVS the kernel takes it
/// only from a holder of CAP_SYS_ADMIN, which the init is about to drop.
pub fn drop_privileges(seccomp: Option<&SeccompFilter>) -> Result<(), PrivilegeError> {
    if let Some(filter) = seccomp {
        filter
            .install()
            .map_err(step_failed(|| "installing the seccomp filter".to_string()))?;
    }
    let kept: HashSet<Capability> = KEPT.into_iter().collect();
    for cap in caps::all() {
        if !kept.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(step_failed(|| {
                format!("dropping {cap} from the bounding set")
            }))?;
        }
    }
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::set(None, set, &kept).map_err(step_failed(|| format!("setting {set:?}")))?;
    }
    // A non-dumpable init cannot be ptraced or have its /proc/1/mem and fds
    // opened by the inner's root, which lacks CAP_SYS_PTRACE.
    // SAFETY: prctl(PR_SET_DUMPABLE) takes plain integers and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(step_failed(|| "prctl(PR_SET_DUMPABLE)".to_string())(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Closes every fd above `keep_upto` but `also_keep`: nothing of hulld's
/// may leak in.
pub fn close_fds_above(keep_upto: i32, also_keep: Option<i32>) {
    let first = keep_upto + 1;
    match also_keep {
        Some(kept) if kept >= first => {
            close_range(first, kept - 1);
            close_range(kept + 1, libc::c_int::MAX);
        }
        _ => close_range(first, libc::c_int::MAX),
    }
}

fn close_range(first: i32, last: i32) {
    if last < first {
        return;
    }
    // SAFETY: close_range only closes descriptors; ours in the range are
    // not referenced by any Rust object at this point of the init's start.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0 as libc::c_uint,
        );
    }
}

/// Sets IFF_UP on `lo` in the inner's fresh network namespace.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket(2) call; the fd is closed below on every path.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, a live ifreq.
    let result = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            // The flags are 0x41; the kernel keeps them in a short.
            #[allow(clippy::cast_possible_truncation)]
            let up = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            req.ifr_ifru.ifru_flags |= up;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: `sock` is our own descriptor, closed exactly once.
    unsafe { libc::close(sock) };
    result
}
