//! Interface set-up with the classic ioctls: rtnetlink's crates need tokio,
//! and an address, a mask, a flag and one route are all PID 1 sets.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use libc::{c_char, c_short, c_ulong, c_ushort, sockaddr};

/// A datagram socket: the handle the interface ioctls go through.
pub fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new
    // fd that nothing else owns.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let mut ifr_name = [0 as c_char; libc::IFNAMSIZ];
    for (slot, byte) in ifr_name.iter_mut().zip(bytes) {
        *slot = c_char::from_ne_bytes([*byte]);
    }
    Ok(libc::ifreq {
        ifr_name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: 0 },
    })
}

/// `address` as the kernel's `struct sockaddr` for AF_INET: port 0, then
/// the address in network order.
fn sockaddr_v4(address: Ipv4Addr) -> sockaddr {
    let mut sa_data = [0 as c_char; 14];
    for (slot, byte) in sa_data[2..6].iter_mut().zip(address.octets()) {
        *slot = c_char::from_ne_bytes([byte]);
    }
    sockaddr {
        sa_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
        sa_data,
    }
}

fn ioctl_ifreq(sock: &OwnedFd, request: c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request passed here (SIOC[GS]IFFLAGS, SIOCSIFADDR,
    // SIOCSIFNETMASK) reads or writes one `struct ifreq`, and `req` is a
    // valid, exclusively borrowed one for the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets IFF_UP on `name`.
pub fn link_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl_ifreq(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the union's flags member just above.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    // IFF_UP is 1: it fits the short the kernel keeps the low flags in.
    let up = c_short::try_from(libc::IFF_UP).unwrap_or(1);
    req.ifr_ifru.ifru_flags = flags | up;
    ioctl_ifreq(sock, libc::SIOCSIFFLAGS, &mut req)
}

/// Gives `name` the address and netmask.
pub fn set_address(
    sock: &OwnedFd,
    name: &str,
    address: Ipv4Addr,
    netmask: Ipv4Addr,
) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(address);
    ioctl_ifreq(sock, libc::SIOCSIFADDR, &mut req)?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_v4(netmask);
    ioctl_ifreq(sock, libc::SIOCSIFNETMASK, &mut req)
}

/// The kernel's `struct rtentry` (include/uapi/linux/route.h), which the
/// libc crate defines for musl only.
#[repr(C)]
struct RtEntry {
    rt_pad1: c_ulong,
    rt_dst: sockaddr,
    rt_gateway: sockaddr,
    rt_genmask: sockaddr,
    rt_flags: c_ushort,
    rt_pad2: c_short,
    rt_pad3: c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: c_short,
    rt_dev: *mut c_char,
    rt_mtu: c_ulong,
    rt_window: c_ulong,
    rt_irtt: c_ushort,
}

/// Adds the default route through `gateway`.
pub fn add_default_route(sock: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_v4(gateway),
        rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_flags: c_ushort::try_from(libc::RTF_UP | libc::RTF_GATEWAY).unwrap_or(3),
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads one `struct rtentry`, which RtEntry lays out
    // as the kernel does; rt_dev is null, so the kernel picks the device
    // from the gateway's subnet and dereferences no pointer of ours.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT,
            &mut route as *mut RtEntry,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` (include/uapi/linux/vm_sockets.h):
/// `_IO(7, 0xb9)`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: c_ulong = 0x7b9;

/// This machine's vsock context id: `None` without /dev/vsock or without
/// a transport behind it (the vsock module makes /dev/vsock whether or not
/// the VM has a vsock device; only a device gives a context id).
pub fn vsock_local_cid() -> Option<u32> {
    let dev = std::fs::File::open("/dev/vsock").ok()?;
    let mut cid: libc::c_uint = 0;
    // SAFETY: the request writes one unsigned int to the pointer, which
    // points at `cid` for the whole call.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID,
            &mut cid as *mut libc::c_uint,
        )
    };
    // VMADDR_CID_ANY: no transport; 0 to 2 are the hypervisor, the local
    // loopback and the host, never a guest's.
    (rc == 0 && cid != u32::MAX && cid > 2).then_some(cid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_holds_the_address_in_network_order() {
        let sa = sockaddr_v4(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(i32::from(sa.sa_family), libc::AF_INET);
        let bytes: Vec<u8> = sa.sa_data[..6].iter().map(|c| c.to_ne_bytes()[0]).collect();
        assert_eq!(bytes, [0, 0, 10, 0, 2, 15]);
    }

    #[test]
    fn rtentry_has_the_kernels_size() {
        // sizeof(struct rtentry) on x86_64 Linux.
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-far-too-long").is_err());
    }
}
