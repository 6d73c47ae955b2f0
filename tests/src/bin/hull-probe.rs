//! Makes the system calls busybox cannot, for the escape tests: copied into
//! the inner and run there, it prints one `NAME: ok` or `NAME: errno N`
//! line per call named on its command line. Each call's arguments are
//! chosen so the kernel itself answers something other than EPERM where it
//! can (a bad fd, a null pointer), so EPERM means a filter refused it.
//!
//! `keyctl-read:ID` and `keyctl-update:ID` act on a key the test added in
//! the root namespace.

use std::io::Error;

fn result(rc: libc::c_long) -> String {
    if rc < 0 {
        format!(
            "errno {}",
            Error::last_os_error().raw_os_error().unwrap_or(0)
        )
    } else {
        "ok".to_string()
    }
}

fn key_id(arg: &str) -> libc::c_long {
    arg.parse().expect("a key id")
}

fn call(name: &str) -> String {
    let (op, arg) = name.split_once(':').unwrap_or((name, ""));
    let mut buf = [0u8; 64];
    // SAFETY: every call gets valid pointers to live buffers, null, or a
    // bad fd; none touches this process's memory beyond `buf`.
    let rc = unsafe {
        match op {
            "keyctl-read" => libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_READ,
                key_id(arg),
                buf.as_mut_ptr(),
                buf.len(),
            ),
            "keyctl-update" => libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_UPDATE,
                key_id(arg),
                c"overwritten by the inner".as_ptr(),
                24,
            ),
            "add_key" => libc::syscall(
                libc::SYS_add_key,
                c"user".as_ptr(),
                c"hull-probe".as_ptr(),
                c"x".as_ptr(),
                1,
                libc::KEY_SPEC_PROCESS_KEYRING,
            ),
            "request_key" => libc::syscall(
                libc::SYS_request_key,
                c"user".as_ptr(),
                c"hull-probe-missing".as_ptr(),
                std::ptr::null::<libc::c_char>(),
                0,
            ),
            // An unknown command: EINVAL from the kernel.
            "bpf" => libc::syscall(libc::SYS_bpf, 0xffff, std::ptr::null::<u8>(), 0),
            // A null attr: EFAULT from the kernel.
            "perf_event_open" => libc::syscall(
                libc::SYS_perf_event_open,
                std::ptr::null::<u8>(),
                0,
                -1,
                -1,
                0,
            ),
            "io_uring_setup" => libc::syscall(libc::SYS_io_uring_setup, 1, std::ptr::null::<u8>()),
            "io_uring_enter" => libc::syscall(libc::SYS_io_uring_enter, -1, 0, 0, 0, 0, 0),
            "io_uring_register" => libc::syscall(
                libc::SYS_io_uring_register,
                -1,
                0,
                std::ptr::null::<u8>(),
                0,
            ),
            // User-mode faults only: allowed to anyone by the kernel.
            "userfaultfd" => libc::syscall(libc::SYS_userfaultfd, 1 | libc::O_CLOEXEC),
            "kexec_load" => libc::syscall(libc::SYS_kexec_load, 0, 0, std::ptr::null::<u8>(), 0),
            "kexec_file_load" => libc::syscall(
                libc::SYS_kexec_file_load,
                -1,
                -1,
                0,
                std::ptr::null::<u8>(),
                0,
            ),
            "open_by_handle_at" => {
                libc::syscall(libc::SYS_open_by_handle_at, -1, std::ptr::null::<u8>(), 0)
            }
            "vsock" => libc::syscall(
                libc::SYS_socket,
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
            ),
            "ping" => ping_loopback(),
            "unshare-user" => libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER),
            // mseal (Linux 6.10) of nothing: newer than hull's allowlist.
            "mseal" => libc::syscall(462, 0, 0, 0),
            // glibc starts a thread with clone3 and falls back to clone only
            // on ENOSYS.
            "thread" => match std::thread::spawn(|| 7).join() {
                Ok(7) => 0,
                _ => -1,
            },
            _ => panic!("hull-probe: unknown call {name}"),
        }
    };
    result(rc)
}

/// An ICMP echo to 127.0.0.1 over a datagram ICMP socket (what ping does
/// without CAP_NET_RAW): 0 when the reply came, -1 with errno set when not.
fn ping_loopback() -> libc::c_long {
    use socket2::{Domain, Protocol, Socket, Type};
    let echo = || -> std::io::Result<()> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))?;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        // Echo request, code 0; the kernel fills in the id and the checksum.
        let to = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        socket.send_to(&[8, 0, 0, 0, 0, 0, 0, 1], &to.into())?;
        let mut reply = [std::mem::MaybeUninit::<u8>::uninit(); 64];
        match socket.recv(&mut reply)? {
            // SAFETY: recv initialised the first byte of a non-empty reply.
            n if n > 0 && unsafe { reply[0].assume_init() } == 0 => Ok(()),
            _ => Err(Error::from_raw_os_error(libc::EBADMSG)),
        }
    };
    match echo() {
        Ok(()) => 0,
        Err(e) => {
            nix::errno::Errno::set_raw(e.raw_os_error().unwrap_or(libc::EIO));
            -1
        }
    }
}

fn main() {
    for name in std::env::args().skip(1) {
        println!("{name}: {}", call(&name));
    }
}
