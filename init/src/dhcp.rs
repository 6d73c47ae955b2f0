//! A DHCPv4 client for one boot: DISCOVER, OFFER, REQUEST, ACK on one
//! interface, a few times over with a growing timeout, then give up. The
//! messages are `dhcproto`'s; the socket is a plain UDP socket on port 68
//! bound to the interface, which can send and receive broadcasts before
//! the interface has an address.
//!
//! No renewal: hull-init keeps the address past the lease's end (QEMU's
//! user-mode networking leases for 24 h and never gives the address to
//! anyone else). A server that hands the address to another machine
//! after the lease ends would see two users of it; such a network wants
//! a static `ip=` or a reboot before the lease ends.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use dhcproto::v4::{self, DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

const CLIENT_PORT: u16 = 68;
const SERVER_PORT: u16 = 67;
/// How long each exchange waits for an answer: the whole client gives up
/// after their sum, so a VM without a DHCP server boots on in seconds.
pub const TIMEOUTS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(3),
];

/// How long to wait for the link before the first DISCOVER; the tries
/// start then anyway.
const CARRIER_WAIT: Duration = Duration::from_secs(1);

/// What the server gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// The server's identifier (option 54), which a REQUEST names.
    pub server: Ipv4Addr,
    /// Seconds; `None` for an infinite lease or none given.
    pub lease_secs: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("cannot read the hardware address of {interface} from {path}")]
    HardwareAddress {
        interface: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a UDP socket on port {CLIENT_PORT} bound to {interface}")]
    Socket {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode a DHCP message")]
    Encode(#[source] dhcproto::error::EncodeError),
    #[error("cannot send a DHCP {what} on {interface}")]
    Send {
        what: &'static str,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot receive on {interface}")]
    Receive {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("no DHCP lease on {interface} after {tries} tries ({last})")]
    NoLease {
        interface: String,
        tries: usize,
        last: &'static str,
    },
}

/// What a server said to our transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Offer(Lease),
    Ack(Lease),
    Nak,
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn base(xid: u32, mac: &[u8; 6], kind: MessageType) -> Message {
    let mut msg = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        mac,
    );
    // Asks for broadcast replies: the interface has no address to take a
    // unicast one at.
    msg.set_flags(v4::Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::AddressLeaseTime,
    ]));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::MaxMessageSize(1500));
    msg
}

fn encode(msg: &Message) -> Result<Vec<u8>, DhcpError> {
    let mut buf = Vec::with_capacity(300);
    msg.encode(&mut Encoder::new(&mut buf))
        .map_err(DhcpError::Encode)?;
    Ok(buf)
}

pub fn discover(xid: u32, mac: &[u8; 6]) -> Result<Vec<u8>, DhcpError> {
    encode(&base(xid, mac, MessageType::Discover))
}

/// The REQUEST for what `offer` offered, in the SELECTING state (RFC 2131
/// 4.3.2: the server identifier and the requested address, no ciaddr).
pub fn request(xid: u32, mac: &[u8; 6], offer: &Lease) -> Result<Vec<u8>, DhcpError> {
    let mut msg = base(xid, mac, MessageType::Request);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::RequestedIpAddress(offer.address));
    opts.insert(DhcpOption::ServerIdentifier(offer.server));
    encode(&msg)
}

/// A server's reply to transaction `xid` from `mac`; `None` for anything
/// else on the wire (another client's, a malformed one, a request).
pub fn parse_reply(bytes: &[u8], xid: u32, mac: &[u8; 6]) -> Option<Reply> {
    let msg = Message::decode(&mut Decoder::new(bytes)).ok()?;
    if msg.opcode() != v4::Opcode::BootReply || msg.xid() != xid || msg.chaddr().get(..6)? != mac {
        return None;
    }
    let opts = msg.opts();
    let kind = opts.msg_type()?;
    if kind == MessageType::Nak {
        return Some(Reply::Nak);
    }
    let netmask = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => *mask,
        _ => classful_mask(msg.yiaddr()),
    };
    let gateway = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(routers)) => routers.first().copied(),
        _ => None,
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(servers)) => servers.clone(),
        _ => Vec::new(),
    };
    let server = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(id)) => *id,
        _ => msg.siaddr(),
    };
    let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(u32::MAX)) | None => None,
        Some(DhcpOption::AddressLeaseTime(secs)) => Some(*secs),
        Some(_) => None,
    };
    if msg.yiaddr().is_unspecified() {
        return None;
    }
    let lease = Lease {
        address: msg.yiaddr(),
        netmask,
        gateway,
        dns,
        server,
        lease_secs,
    };
    match kind {
        MessageType::Offer => Some(Reply::Offer(lease)),
        MessageType::Ack => Some(Reply::Ack(lease)),
        _ => None,
    }
}

/// The mask of `address`'s class, for a server that sends none.
fn classful_mask(address: Ipv4Addr) -> Ipv4Addr {
    match address.octets()[0] {
        0..=127 => Ipv4Addr::new(255, 0, 0, 0),
        128..=191 => Ipv4Addr::new(255, 255, 0, 0),
        _ => Ipv4Addr::new(255, 255, 255, 0),
    }
}

/// /etc/resolv.conf for the lease's name servers; `None` when it has none.
pub fn resolv_conf(dns: &[Ipv4Addr]) -> Option<String> {
    if dns.is_empty() {
        return None;
    }
    let mut text = String::from("# Written by hull-init from the DHCP lease.\n");
    // The resolver reads three.
    for server in dns.iter().take(3) {
        text.push_str(&format!("nameserver {server}\n"));
    }
    Some(text)
}

/// A UDP socket on 0.0.0.0:68 that sends and receives only on `interface`,
/// broadcasts allowed.
fn client_socket(interface: &str) -> io::Result<UdpSocket> {
    let fd: OwnedFd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &interface.into())?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT)),
    )?;
    Ok(UdpSocket::from(fd))
}

/// A transaction id: no secret, only distinct from other clients', so the
/// kernel's non-blocking randomness does (it never waits for the pool).
fn transaction_id() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom(2) writes at most `bytes.len()` bytes into the
    // buffer, which lives for the whole call.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_INSECURE) };
    if n != 4 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        return nanos.wrapping_mul(2_654_435_761);
    }
    u32::from_ne_bytes(bytes)
}

/// Waits until `deadline` for the reply `want` picks out.
fn wait_for(
    sock: &UdpSocket,
    interface: &str,
    deadline: Instant,
    want: &mut dyn FnMut(&[u8]) -> Option<Reply>,
) -> Result<Option<Reply>, DhcpError> {
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))
            .map_err(|source| DhcpError::Receive {
                interface: interface.to_owned(),
                source,
            })?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                if let Some(reply) = want(&buf[..n]) {
                    return Ok(Some(reply));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(source) => {
                return Err(DhcpError::Receive {
                    interface: interface.to_owned(),
                    source,
                })
            }
        }
    }
}

/// A lease for `interface`, which must be up: each try is a DISCOVER and,
/// on an OFFER, a REQUEST, within that try's timeout. `note` hears each
/// try that failed.
pub fn acquire(interface: &str, note: &mut dyn FnMut(&str)) -> Result<Lease, DhcpError> {
    let path = format!("/sys/class/net/{interface}/address");
    let mac = std::fs::read_to_string(&path)
        .and_then(|text| {
            parse_mac(&text).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{:?}", text.trim()))
            })
        })
        .map_err(|source| DhcpError::HardwareAddress {
            interface: interface.to_owned(),
            path: path.clone(),
            source,
        })?;
    // The link comes up a moment after IFF_UP (the carrier, then the
    // kernel's link watch): a DISCOVER sent before is lost, and costs a
    // whole try.
    let operstate = format!("/sys/class/net/{interface}/operstate");
    let deadline = Instant::now() + CARRIER_WAIT;
    // "unknown" is a driver that does not say: no use waiting for it.
    while std::fs::read_to_string(&operstate)
        .is_ok_and(|s| matches!(s.trim(), "down" | "lowerlayerdown" | "dormant"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    exchange(interface, &mac, &TIMEOUTS, note)
}

/// `acquire`'s tries, as the hardware address `mac`, one per timeout.
fn exchange(
    interface: &str,
    mac: &[u8; 6],
    timeouts: &[Duration],
    note: &mut dyn FnMut(&str),
) -> Result<Lease, DhcpError> {
    let mac = *mac;
    let sock = client_socket(interface).map_err(|source| DhcpError::Socket {
        interface: interface.to_owned(),
        source,
    })?;
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT);
    let send = |what: &'static str, bytes: &[u8]| {
        sock.send_to(bytes, to)
            .map(drop)
            .map_err(|source| DhcpError::Send {
                what,
                interface: interface.to_owned(),
                source,
            })
    };
    let mut last = "no OFFER";
    for (n, timeout) in timeouts.iter().enumerate() {
        let deadline = Instant::now() + *timeout;
        let xid = transaction_id();
        send("DISCOVER", &discover(xid, &mac)?)?;
        let offer = wait_for(&sock, interface, deadline, &mut |bytes| {
            parse_reply(bytes, xid, &mac).filter(|r| matches!(r, Reply::Offer(_)))
        })?;
        let Some(Reply::Offer(offer)) = offer else {
            last = "no OFFER";
            note(&format!(
                "DHCP try {} on {interface}: no OFFER within {:.1} s",
                n + 1,
                timeout.as_secs_f64()
            ));
            continue;
        };
        send("REQUEST", &request(xid, &mac, &offer)?)?;
        let answer = wait_for(&sock, interface, deadline, &mut |bytes| {
            parse_reply(bytes, xid, &mac).filter(|r| !matches!(r, Reply::Offer(_)))
        })?;
        match answer {
            Some(Reply::Ack(lease)) => return Ok(lease),
            Some(Reply::Nak) => last = "a NAK",
            _ => last = "no ACK",
        }
        note(&format!(
            "DHCP try {} on {interface}: {last} for {} from {}",
            n + 1,
            offer.address,
            offer.server
        ));
    }
    Err(DhcpError::NoLease {
        interface: interface.to_owned(),
        tries: timeouts.len(),
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    /// A server's reply as QEMU's user-mode networking sends it.
    fn reply(kind: MessageType, xid: u32, mac: &[u8; 6], lease: Option<u32>) -> Vec<u8> {
        let mut msg = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 0, 2, 15),
            Ipv4Addr::new(10, 0, 2, 2),
            Ipv4Addr::UNSPECIFIED,
            mac,
        );
        msg.set_opcode(v4::Opcode::BootReply);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 2, 2)));
        opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        opts.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 2, 2)]));
        opts.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 0, 2, 3,
        )]));
        if let Some(secs) = lease {
            opts.insert(DhcpOption::AddressLeaseTime(secs));
        }
        encode(&msg).unwrap()
    }

    fn qemu_lease() -> Lease {
        Lease {
            address: Ipv4Addr::new(10, 0, 2, 15),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            server: Ipv4Addr::new(10, 0, 2, 2),
            lease_secs: Some(86_400),
        }
    }

    #[test]
    fn an_offer_and_an_ack_become_the_lease() {
        let offer = reply(MessageType::Offer, 7, &MAC, Some(86_400));
        assert_eq!(
            parse_reply(&offer, 7, &MAC),
            Some(Reply::Offer(qemu_lease()))
        );
        let ack = reply(MessageType::Ack, 7, &MAC, Some(86_400));
        assert_eq!(parse_reply(&ack, 7, &MAC), Some(Reply::Ack(qemu_lease())));
        let forever = reply(MessageType::Ack, 7, &MAC, Some(u32::MAX));
        assert!(matches!(
            parse_reply(&forever, 7, &MAC),
            Some(Reply::Ack(Lease {
                lease_secs: None,
                ..
            }))
        ));
        assert_eq!(
            parse_reply(&reply(MessageType::Nak, 7, &MAC, None), 7, &MAC),
            Some(Reply::Nak)
        );
    }

    #[test]
    fn replies_to_other_transactions_clients_or_garbage_are_ignored() {
        let offer = reply(MessageType::Offer, 7, &MAC, None);
        assert_eq!(parse_reply(&offer, 8, &MAC), None, "another xid");
        let other_mac = [2, 0, 0, 0, 0, 1];
        assert_eq!(parse_reply(&offer, 7, &other_mac), None, "another client");
        assert_eq!(parse_reply(&offer[..100], 7, &MAC), None, "truncated");
        assert_eq!(parse_reply(b"", 7, &MAC), None);
        // Our own broadcast DISCOVER comes back to the socket too.
        let ours = discover(7, &MAC).unwrap();
        assert_eq!(parse_reply(&ours, 7, &MAC), None, "a request");
    }

    #[test]
    fn the_request_names_the_offer_and_its_server() {
        let bytes = request(9, &MAC, &qemu_lease()).unwrap();
        let msg = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(msg.opcode(), v4::Opcode::BootRequest);
        assert_eq!(msg.xid(), 9);
        assert_eq!(&msg.chaddr()[..6], &MAC);
        assert!(msg.flags().broadcast());
        assert_eq!(msg.ciaddr(), Ipv4Addr::UNSPECIFIED);
        let opts = msg.opts();
        assert_eq!(opts.msg_type(), Some(MessageType::Request));
        assert_eq!(
            opts.get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 2, 15)))
        );
        assert_eq!(
            opts.get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 2, 2)))
        );
        let discover = Message::decode(&mut Decoder::new(&discover(9, &MAC).unwrap())).unwrap();
        assert_eq!(discover.opts().msg_type(), Some(MessageType::Discover));
        assert!(discover.opts().get(OptionCode::ServerIdentifier).is_none());
        assert!(matches!(
            discover.opts().get(OptionCode::ParameterRequestList),
            Some(DhcpOption::ParameterRequestList(codes)) if codes.contains(&OptionCode::DomainNameServer)
        ));
    }

    /// What the fake server answers.
    #[derive(Clone, Copy)]
    enum Server {
        Leases,
        Naks,
        Silent,
    }

    /// Waits for the kernel to call `interface` up (carrier, and its
    /// queue running): a packet sent before is lost.
    fn wait_up(interface: &str) {
        for _ in 0..500 {
            let out = std::process::Command::new("ip")
                .args(["-o", "link", "show", interface])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("state UP") {
                // The queue starts just after the state changes.
                std::thread::sleep(Duration::from_millis(20));
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{interface} did not come up");
    }

    fn ip(args: &str) {
        let status = std::process::Command::new("ip")
            .args(args.split(' '))
            .status()
            .expect("ip (iproute2)");
        assert!(status.success(), "ip {args}");
    }

    /// Runs `body` on a thread in a network namespace of its own, with
    /// `hc0` (no address) for the client; its veth peer `hs0`
    /// (10.9.0.1/24) is in a second namespace, where a DHCP server thread
    /// answers as `server` says. Two namespaces, as a VM and its host are:
    /// the kernel drops a broadcast whose source is one of its own
    /// addresses. Both go with their threads.
    fn in_netns<T: Send + 'static>(server: Server, body: fn() -> T) -> T {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{mpsc, Arc};
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a network namespace (the tests run as root)");
            ip("link add hc0 type veth peer name hs0");
            let (tid_tx, tid_rx) = mpsc::channel();
            let (moved_tx, moved_rx) = mpsc::channel::<()>();
            let (ready_tx, ready_rx) = mpsc::channel::<()>();
            let stop = Arc::new(AtomicBool::new(false));
            let stopped = Arc::clone(&stop);
            let server_thread = std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
                moved_rx.recv().unwrap();
                ip("link set lo up");
                ip("addr add 10.9.0.1/24 dev hs0");
                ip("link set hs0 up");
                let sock = server_socket();
                wait_up("hs0");
                ready_tx.send(()).unwrap();
                serve(&sock, server, &stopped);
            });
            let tid = tid_rx.recv().unwrap();
            ip(&format!("link set hs0 netns {tid}"));
            ip("link set hc0 up");
            moved_tx.send(()).unwrap();
            ready_rx.recv().unwrap();
            // As `acquire` waits for the link (its /sys is the first
            // namespace's).
            wait_up("hc0");
            let result = body();
            stop.store(true, Ordering::Relaxed);
            server_thread.join().unwrap();
            result
        })
        .join()
        .unwrap()
    }

    fn server_socket() -> UdpSocket {
        let fd: OwnedFd = socket::socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::setsockopt(&fd, sockopt::BindToDevice, &"hs0".into()).unwrap();
        socket::setsockopt(&fd, sockopt::Broadcast, &true).unwrap();
        socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SERVER_PORT)),
        )
        .unwrap();
        let sock = UdpSocket::from(fd);
        // So that the loop sees `stop`.
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        sock
    }

    /// A DHCP server for one client: offers 10.9.0.15, acks (or naks) the
    /// request, broadcast as QEMU's does.
    fn serve(sock: &UdpSocket, server: Server, stop: &std::sync::atomic::AtomicBool) {
        let mut buf = [0u8; 1500];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let Ok(msg) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                continue;
            };
            let kind = match (msg.opts().msg_type(), server) {
                (_, Server::Silent) => continue,
                (Some(MessageType::Discover), _) => MessageType::Offer,
                (Some(MessageType::Request), Server::Leases) => MessageType::Ack,
                (Some(MessageType::Request), Server::Naks) => MessageType::Nak,
                _ => continue,
            };
            let mut reply = Message::new_with_id(
                msg.xid(),
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::new(10, 9, 0, 15),
                Ipv4Addr::new(10, 9, 0, 1),
                Ipv4Addr::UNSPECIFIED,
                &msg.chaddr()[..6],
            );
            reply.set_opcode(v4::Opcode::BootReply);
            let opts = reply.opts_mut();
            opts.insert(DhcpOption::MessageType(kind));
            opts.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 9, 0, 1)));
            opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
            opts.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 9, 0, 1)]));
            opts.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
                10, 9, 0, 53,
            )]));
            opts.insert(DhcpOption::AddressLeaseTime(3600));
            let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT);
            let _ = sock.send_to(&encode(&reply).unwrap(), to);
        }
    }

    const SHORT: [Duration; 2] = [Duration::from_millis(300), Duration::from_millis(300)];

    #[test]
    fn a_lease_over_a_real_interface_without_an_address() {
        let lease = in_netns(Server::Leases, || {
            exchange("hc0", &MAC, &TIMEOUTS, &mut |line| panic!("{line}"))
        })
        .unwrap();
        assert_eq!(
            lease,
            Lease {
                address: Ipv4Addr::new(10, 9, 0, 15),
                netmask: Ipv4Addr::new(255, 255, 255, 0),
                gateway: Some(Ipv4Addr::new(10, 9, 0, 1)),
                dns: vec![Ipv4Addr::new(10, 9, 0, 53)],
                server: Ipv4Addr::new(10, 9, 0, 1),
                lease_secs: Some(3600),
            }
        );
    }

    #[test]
    fn no_server_or_only_naks_ends_in_bounded_tries() {
        let silent = in_netns(Server::Silent, || {
            let mut notes = Vec::new();
            let result = exchange("hc0", &MAC, &SHORT, &mut |l| notes.push(l.to_owned()));
            (result, notes)
        });
        let (result, notes) = silent;
        assert!(
            matches!(
                result,
                Err(DhcpError::NoLease {
                    tries: 2,
                    last: "no OFFER",
                    ..
                })
            ),
            "{result:?}"
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("no OFFER within 0.3 s"), "{notes:?}");

        let naks = in_netns(Server::Naks, || exchange("hc0", &MAC, &SHORT, &mut |_| {}));
        assert!(
            matches!(naks, Err(DhcpError::NoLease { last: "a NAK", .. })),
            "{naks:?}"
        );
    }

    #[test]
    fn a_missing_mask_is_the_address_class() {
        assert_eq!(
            classful_mask(Ipv4Addr::new(10, 0, 2, 15)),
            Ipv4Addr::new(255, 0, 0, 0)
        );
        assert_eq!(
            classful_mask(Ipv4Addr::new(192, 168, 1, 5)),
            Ipv4Addr::new(255, 255, 255, 0)
        );
    }

    #[test]
    fn macs_and_resolv_conf() {
        assert_eq!(parse_mac("52:54:00:12:34:56\n"), Some(MAC));
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
        assert_eq!(resolv_conf(&[]), None);
        let four: Vec<Ipv4Addr> = (1..=4).map(|n| Ipv4Addr::new(10, 0, 0, n)).collect();
        let text = resolv_conf(&four).unwrap();
        assert_eq!(text.matches("nameserver ").count(), 3, "{text}");
        assert!(text.contains("nameserver 10.0.0.1\n"));
    }
}
