//! Which TCP ports the inner listens on, read from its own namespace with
//! sock_diag (NETLINK_SOCK_DIAG, a dump filtered to TCP_LISTEN), and which
//! process owns each listening socket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One listening TCP socket in the inner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListeningPort {
    pub port: u16,
    /// The address it is bound to: 0.0.0.0, ::, 127.0.0.1, ...
    pub addr: IpAddr,
    /// The socket's inode, to find its owner in /proc/<pid>/fd.
    pub inode: u64,
    pub uid: u32,
}

/// The inner's listening ports as of the last scan.
#[derive(Debug, Clone, Default)]
pub struct PortTable {
    pub ports: Vec<ListeningPort>,
    /// When the scan behind this table began: a reader that needs a view
    /// newer than some event (a service's start) compares with it.
    pub scanned_at: Option<Instant>,
    /// Whether an inner is running (false while it bounces or restores).
    pub inner_running: bool,
    /// Ports that stopped listening, and when: a request for one of them
    /// waits, since the service is most likely being restarted.
    pub recently_gone: HashMap<u16, Instant>,
}

impl PortTable {
    /// The best listener for `port`: a wildcard bind before a specific one.
    pub fn find(&self, port: u16) -> Option<&ListeningPort> {
        let mut found: Vec<&ListeningPort> = self.ports.iter().filter(|p| p.port == port).collect();
        found.sort_by_key(|p| !p.addr.is_unspecified());
        found.first().copied()
    }

    /// Whether a connection to `port`, which nothing listens on now, should
    /// wait for it rather than fail at once.
    pub fn worth_waiting(&self, port: u16, window: Duration) -> bool {
        !self.inner_running
            || self
                .recently_gone
                .get(&port)
                .is_some_and(|at| at.elapsed() < window)
    }
}

/// Whether a failed connect means the listener has just gone (the table
/// lags the inner by a scan): refused once it is closed, reset or aborted
/// when it closed with this connection still in its accept queue. Worth
/// waiting for the next scan, since a bounce brings it back.
pub fn listener_went_away(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
    )
}

/// Waits until `port` listens in the inner, for at most `limit`, but only as
/// long as waiting makes sense (see [`PortTable::worth_waiting`]); `extra`
/// says to wait even so (the port belongs to a declared service).
pub async fn wait_listening(
    table: &mut watch::Receiver<PortTable>,
    port: u16,
    limit: Duration,
    extra: bool,
) -> Option<ListeningPort> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        {
            let now = table.borrow_and_update();
            if let Some(p) = now.find(port) {
                return Some(p.clone());
            }
            if !extra && !now.worth_waiting(port, limit) {
                return None;
            }
        }
        match tokio::time::timeout_at(deadline, table.changed()).await {
            Ok(Ok(())) => continue,
            _ => return None,
        }
    }
}

use std::io;

/// How long one recv may block. The kernel answers a dump synchronously, so
/// only a wedged kernel would hit this; it keeps a scan from hanging the
/// thread that polls the inner forever.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

/// The receive buffer. The kernel fills a dump datagram up to the size of the
/// largest read it has seen, capped at 32 KiB, so 64 KiB never truncates.
const RECV_BUF_LEN: usize = 64 * 1024;

/// Lists the TCP sockets in LISTEN state in the network namespace the scanner
/// was created in, with sock_diag.
///
/// The netlink socket belongs to the namespace of the thread that created it
/// and keeps it for life, so hulld creates the scanner inside
/// `InnerNetns::run` and may then scan from any thread.
pub struct ListenScanner {
    socket: netlink_sys::Socket,
    /// Reused across scans: a scan runs four times a second.
    buf: Vec<u8>,
    /// Tells this dump's messages apart from leftovers of an abandoned one.
    seq: u32,
    /// A dump was abandoned half-read. The kernel refuses a new dump on the
    /// socket (EBUSY) until the old one is read to its end.
    unfinished: bool,
    /// The last scan's size, so the next one allocates its result once.
    last_len: usize,
}

impl ListenScanner {
    /// Opens a sock_diag socket in the calling thread's network namespace.
    pub fn new() -> io::Result<Self> {
        use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};
        use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
        use nix::sys::time::TimeVal;

        let socket = Socket::new(NETLINK_SOCK_DIAG)
            .map_err(|e| with_context(e, "cannot open a NETLINK_SOCK_DIAG socket"))?;
        // Connected to the kernel, so send and recv need no address and
        // nothing but the kernel can write to it.
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| with_context(e, "cannot connect the sock_diag socket to the kernel"))?;
        let timeout = TimeVal::new(
            RECV_TIMEOUT.as_secs() as _,
            RECV_TIMEOUT.subsec_micros() as _,
        );
        setsockopt(&socket, ReceiveTimeout, &timeout).map_err(|e| {
            with_context(
                io::Error::from(e),
                "cannot set SO_RCVTIMEO on the sock_diag socket",
            )
        })?;
        Ok(ListenScanner {
            socket,
            buf: vec![0; RECV_BUF_LEN],
            seq: 0,
            unfinished: false,
            last_len: 0,
        })
    }

    /// Every listening TCP socket, IPv4 and IPv6, sorted by (port, address);
    /// sockets sharing a port and address (SO_REUSEPORT) appear once, as the
    /// one with the lowest inode.
    pub fn scan(&mut self) -> io::Result<Vec<ListeningPort>> {
        if self.unfinished {
            self.drain()?;
        }
        let mut found = Vec::with_capacity(self.last_len + 4);
        self.dump(Family::V4, &mut found)?;
        self.dump(Family::V6, &mut found)?;
        found.sort_unstable_by_key(|p| (p.port, p.addr, p.inode));
        found.dedup_by(|later, kept| later.port == kept.port && later.addr == kept.addr);
        self.last_len = found.len();
        Ok(found)
    }

    /// Asks the kernel for a dump of `family`'s listening TCP sockets and
    /// returns the request's sequence number. From here until NLMSG_DONE the
    /// kernel holds the dump open on the socket.
    fn request(&mut self, family: Family) -> io::Result<u32> {
        use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NLM_F_DUMP, NLM_F_REQUEST};
        use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, StateFlags};
        use netlink_packet_sock_diag::{SockDiagMessage, IPPROTO_TCP};

        let name = family.name();
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: family.af(),
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                // The kernel then walks only the listening hash, not every
                // connection in the namespace.
                states: StateFlags::LISTEN,
                socket_id: family.any_socket_id(),
            })
            .into(),
        );
        request.finalize();
        // A netlink header (16 bytes) and an inet_diag_req_v2 (56 bytes):
        // on the stack, as the scan runs four times a second.
        let mut bytes = [0u8; 128];
        let len = request.buffer_len();
        let bytes = bytes.get_mut(..len).ok_or_else(|| {
            io::Error::other(format!(
                "sock_diag {name} request is {len} bytes, more than expected"
            ))
        })?;
        request.serialize(bytes);
        self.socket.send(bytes, 0).map_err(|e| {
            with_context(e, &format!("cannot send the sock_diag {name} dump request"))
        })?;
        Ok(self.seq)
    }

    /// One dump of one family's listening TCP sockets, appended to `found`.
    fn dump(&mut self, family: Family, found: &mut Vec<ListeningPort>) -> io::Result<()> {
        use netlink_packet_core::{
            DoneBuffer, ErrorBuffer, NetlinkBuffer, Parseable, NLMSG_DONE, NLMSG_ERROR,
        };
        use netlink_packet_sock_diag::inet::InetResponseHeader;
        use netlink_packet_sock_diag::{SOCK_DIAG_BY_FAMILY, TCP_LISTEN};

        let name = family.name();
        let seq = self.request(family)?;
        // Leaving before NLMSG_DONE must be remembered: see `unfinished`.
        self.unfinished = true;
        // A message that does not parse is reported, but only after the dump
        // is read to its end, so that the socket stays usable.
        let mut bad: Option<io::Error> = None;
        loop {
            let n = recv(&self.socket, &mut self.buf, 0).map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("sock_diag {name} dump: no answer from the kernel within {RECV_TIMEOUT:?}"),
                    )
                } else {
                    with_context(e, &format!("sock_diag {name} dump: recv failed"))
                }
            })?;
            let mut rest = &self.buf[..n];
            while !rest.is_empty() {
                let msg = NetlinkBuffer::new_checked(rest).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("sock_diag {name} dump: malformed netlink message: {e}"),
                    )
                })?;
                let msg_len = msg.length() as usize;
                let payload = msg.payload();
                rest = rest.get(nlmsg_align(msg_len)..).unwrap_or_default();
                if msg.sequence_number() != seq {
                    continue;
                }
                match msg.message_type() {
                    NLMSG_DONE => {
                        self.unfinished = false;
                        // The kernel ends a dump whose walk failed with
                        // NLMSG_DONE carrying the negative errno.
                        let code = DoneBuffer::new_checked(payload).map_or(0, |d| d.code());
                        if code < 0 {
                            return Err(with_context(
                                io::Error::from_raw_os_error(-code),
                                &format!("sock_diag {name} dump failed in the kernel"),
                            ));
                        }
                        return bad.map_or(Ok(()), Err);
                    }
                    NLMSG_ERROR => {
                        // The dump never started (or this is an ACK, which
                        // also ends the exchange).
                        self.unfinished = false;
                        let code = ErrorBuffer::new_checked(payload)
                            .ok()
                            .and_then(|e| e.code())
                            .map_or(0, |c| c.get());
                        if code == 0 {
                            return bad.map_or(Ok(()), Err);
                        }
                        return Err(with_context(
                            io::Error::from_raw_os_error(code.abs()),
                            &format!("the kernel refused the sock_diag {name} dump"),
                        ));
                    }
                    SOCK_DIAG_BY_FAMILY => {
                        // Only the fixed inet_diag_msg: its attributes (and
                        // the allocations parsing them would cost) are not
                        // needed.
                        match InetResponseHeader::parse(payload) {
                            Ok(h) if h.state == TCP_LISTEN => found.push(ListeningPort {
                                port: h.socket_id.source_port,
                                // A v6 socket bound to ::ffff:a.b.c.d takes
                                // only IPv4 connections to a.b.c.d.
                                addr: h.socket_id.source_address.to_canonical(),
                                inode: u64::from(h.inode),
                                uid: h.uid,
                            }),
                            Ok(_) => {}
                            Err(e) => {
                                bad.get_or_insert_with(|| {
                                    io::Error::new(
                                        io::ErrorKind::InvalidData,
                                        format!("sock_diag {name} dump: bad inet_diag_msg: {e}"),
                                    )
                                });
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Reads what is left of an abandoned dump, so the kernel accepts the
    /// next request. Reading without blocking still advances the dump: the
    /// kernel produces its next part inside each recv.
    fn drain(&mut self) -> io::Result<()> {
        loop {
            match recv(&self.socket, &mut self.buf, libc::MSG_DONTWAIT) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // A truncated leftover is still consumed.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
                Err(e) => return Err(with_context(e, "cannot drain an abandoned sock_diag dump")),
            }
        }
        self.unfinished = false;
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => netlink_packet_sock_diag::AF_INET,
            Family::V6 => netlink_packet_sock_diag::AF_INET6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "AF_INET",
            Family::V6 => "AF_INET6",
        }
    }

    fn any_socket_id(self) -> netlink_packet_sock_diag::inet::SocketId {
        use netlink_packet_sock_diag::inet::SocketId;
        match self {
            Family::V4 => SocketId::new_v4(),
            Family::V6 => SocketId::new_v6(),
        }
    }
}

/// One datagram from `socket` into `buf`. A datagram larger than `buf` would
/// lose its tail silently, so MSG_TRUNC makes the kernel report its real
/// size and that is an error.
fn recv(socket: &netlink_sys::Socket, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        let mut window = &mut buf[..];
        match socket.recv(&mut window, flags | libc::MSG_TRUNC) {
            Ok(n) if n > buf.len() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a {n}-byte netlink datagram did not fit the {}-byte buffer",
                        buf.len()
                    ),
                ))
            }
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn nlmsg_align(len: usize) -> usize {
    (len + 3) & !3
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The process that holds a socket open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: i32,
    /// /proc/<pid>/comm: the name the kernel knows it by, at most 15 bytes.
    pub command: String,
}

/// Maps the inode of every socket the processes `pids` hold open to its
/// owner. A socket several of them share (inherited across fork, say) goes to
/// the lowest pid, normally the parent. Processes that exit while being read
/// are left out: that race is normal, and the next call sees the truth.
pub fn socket_owners(pids: &[i32]) -> HashMap<u64, Owner> {
    let mut pids = pids.to_vec();
    pids.sort_unstable();
    pids.dedup();
    let mut owners = HashMap::new();
    for pid in pids.into_iter().filter(|&pid| pid > 0) {
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let command = comm.trim().to_owned();
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(inode) = socket_inode(target.as_os_str().as_encoded_bytes()) {
                // Ascending pids: the first owner found is the lowest.
                owners.entry(inode).or_insert_with(|| Owner {
                    pid,
                    command: command.clone(),
                });
            }
        }
    }
    owners
}

/// The inode in an fd link's target of the form `socket:[INODE]`.
fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The ports that appeared between two scans, and those that went away
/// entirely. A port counts as present while any address listens on it, so a
/// service that rebinds from 0.0.0.0 to 127.0.0.1 neither appears nor goes.
pub fn diff(old: &[ListeningPort], new: &[ListeningPort]) -> (Vec<u16>, Vec<u16>) {
    let old: std::collections::BTreeSet<u16> = old.iter().map(|p| p.port).collect();
    let new: std::collections::BTreeSet<u16> = new.iter().map(|p| p.port).collect();
    let appeared = new.difference(&old).copied().collect();
    let gone = old.difference(&new).copied().collect();
    (appeared, gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use nix::sched::{unshare, CloneFlags};
    use tokio::net::TcpSocket;

    /// False (after saying why) when the test cannot run; under CI=true a
    /// skip would pass silently, so it panics instead.
    fn require_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the port scanner tests need root (a private network namespace per test) and CI=true forbids skipping");
        }
        eprintln!("skipping: the port scanner tests need root for a private network namespace");
        false
    }

    /// Runs `f` on a thread of its own in a fresh network namespace with
    /// loopback up, so the test never sees or touches the host's sockets.
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let thread = std::thread::spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            loopback_up().expect("bring lo up in the test namespace");
            f()
        });
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn loopback_up() -> io::Result<()> {
        // Any socket will do as a handle for the interface ioctls.
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS fills `req`, a live ifreq naming "lo".
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // IFF_UP is 1; the kernel keeps the flags in a short.
        #[allow(clippy::cast_possible_truncation)]
        let up = libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCGIFFLAGS just set the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= up };
        // SAFETY: SIOCSIFFLAGS only reads `req`, a live, initialised ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A listener on `addr`, or None where the kernel has no IPv6 for us.
    fn listen_v6(addr: &str) -> Option<TcpListener> {
        match TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) =>
            {
                eprintln!("no IPv6 here ({e}); skipping the {addr} part");
                None
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }

    /// A TCP socket bound to 127.0.0.1 but never listening.
    fn bound_only() -> (TcpSocket, u16) {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind((Ipv4Addr::LOCALHOST, 0).into())
            .expect("bind 127.0.0.1:0");
        let port = socket.local_addr().expect("local address").port();
        (socket, port)
    }

    fn pairs(ports: &[ListeningPort]) -> Vec<(u16, IpAddr)> {
        ports.iter().map(|p| (p.port, p.addr)).collect()
    }

    fn port(port: u16) -> ListeningPort {
        ListeningPort {
            port,
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            inode: 1,
            uid: 0,
        }
    }

    #[test]
    fn ports_scan_sees_exactly_the_listeners() {
        if !require_root() {
            return;
        }
        in_new_netns(|| {
            let mut scanner = ListenScanner::new().expect("scanner");
            assert!(
                scanner.scan().expect("scan").is_empty(),
                "a fresh namespace has no listeners"
            );

            let lo4 = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
            let any4 = TcpListener::bind("0.0.0.0:0").expect("bind 0.0.0.0");
            let any6 = listen_v6("[::]:0");
            let lo6 = any6.as_ref().and_then(|_| listen_v6("[::1]:0"));
            let (_bound, bound_port) = bound_only();
            let client = TcpStream::connect(lo4.local_addr().unwrap()).expect("connect");
            let (_server_side, _) = lo4.accept().expect("accept");

            let mut expected = vec![
                (
                    lo4.local_addr().unwrap().port(),
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                ),
                (
                    any4.local_addr().unwrap().port(),
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                ),
            ];
            if let Some(l) = &any6 {
                expected.push((
                    l.local_addr().unwrap().port(),
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                ));
            }
            if let Some(l) = &lo6 {
                expected.push((
                    l.local_addr().unwrap().port(),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ));
            }
            expected.sort();

            let found = scanner.scan().expect("scan");
            assert_eq!(pairs(&found), expected, "scan: {found:#?}");
            let uid = nix::unistd::geteuid().as_raw();
            for p in &found {
                assert_ne!(p.inode, 0, "{p:?} has no inode");
                assert_eq!(p.uid, uid, "{p:?}");
            }
            assert!(
                !found.iter().any(|p| p.port == bound_port),
                "a bound socket is not listening"
            );
            let client_port = client.local_addr().unwrap().port();
            assert!(
                !found.iter().any(|p| p.port == client_port),
                "a client is not listening"
            );

            let gone = any4.local_addr().unwrap().port();
            drop(any4);
            let found = scanner.scan().expect("second scan");
            assert!(
                !found.iter().any(|p| p.port == gone),
                "closed listener still seen: {found:#?}"
            );
            assert_eq!(found.len(), expected.len() - 1);

            let runs = 200;
            let start = Instant::now();
            for _ in 0..runs {
                scanner.scan().expect("timed scan");
            }
            eprintln!(
                "one scan of {} listeners takes {:?}",
                found.len(),
                start.elapsed() / runs
            );
        });
    }

    #[test]
    fn ports_scan_reads_multi_part_dumps_and_dedups_reuseport() {
        if !require_root() {
            return;
        }
        in_new_netns(|| {
            let mut scanner = ListenScanner::new().expect("scanner");
            // About 150 bytes per socket: 600 need several 32 KiB datagrams.
            let many: Vec<TcpListener> = (0..600)
                .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
                .collect();

            // tokio, since std cannot set SO_REUSEPORT; listen() needs a
            // reactor to register with.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .expect("runtime");
            let shared = |port: u16| {
                let socket = TcpSocket::new_v4().expect("socket");
                socket.set_reuseport(true).expect("SO_REUSEPORT");
                socket
                    .bind((Ipv4Addr::UNSPECIFIED, port).into())
                    .expect("bind");
                let listener = rt
                    .block_on(async { socket.listen(8)?.into_std() })
                    .expect("listen");
                let port = listener.local_addr().expect("local address").port();
                (listener, port)
            };
            let (first, reuse_port) = shared(0);
            let (second, _) = shared(reuse_port);

            for round in 0..3 {
                let found = scanner.scan().expect("scan");
                assert_eq!(found.len(), many.len() + 1, "round {round}");
                for l in &many {
                    let port = l.local_addr().unwrap().port();
                    assert!(
                        found
                            .binary_search_by_key(&(port, IpAddr::V4(Ipv4Addr::LOCALHOST)), |p| (
                                p.port, p.addr
                            ))
                            .is_ok(),
                        "round {round}: port {port} missing"
                    );
                }
                let shared_entries: Vec<_> =
                    found.iter().filter(|p| p.port == reuse_port).collect();
                assert_eq!(shared_entries.len(), 1, "SO_REUSEPORT pair appears once");
            }
            drop((first, second));
        });
    }

    #[test]
    fn ports_scan_recovers_from_an_abandoned_dump() {
        if !require_root() {
            return;
        }
        in_new_netns(|| {
            let mut scanner = ListenScanner::new().expect("scanner");
            let many: Vec<TcpListener> = (0..600)
                .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
                .collect();
            // Read one part of a dump and walk away, as a scan that failed
            // half-way would.
            scanner.request(Family::V4).expect("request");
            recv(&scanner.socket, &mut scanner.buf, 0).expect("first part");
            // The premise: while it is open the kernel refuses another dump.
            scanner.unfinished = false;
            let refused = scanner.scan().expect_err("a second dump during the first");
            assert!(
                refused
                    .to_string()
                    .contains(&format!("os error {}", libc::EBUSY)),
                "{refused}"
            );
            scanner.unfinished = true;
            let found = scanner.scan().expect("scan after an abandoned dump");
            assert_eq!(found.len(), many.len());
            assert!(!scanner.unfinished);
            assert_eq!(scanner.scan().expect("next scan").len(), many.len());
        });
    }

    #[test]
    fn ports_scanner_is_send_and_keeps_its_namespace() {
        fn assert_send<T: Send>() {}
        assert_send::<ListenScanner>();
        if !require_root() {
            return;
        }
        let (scanner, listener) = in_new_netns(|| {
            let scanner = ListenScanner::new().expect("scanner");
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            (scanner, listener)
        });
        // Scanned from this thread, in the host's namespace, it still reports
        // the namespace it was made in: exactly the one listener.
        let mut scanner = scanner;
        let found = scanner.scan().expect("scan from another thread");
        assert_eq!(
            pairs(&found),
            vec![(
                listener.local_addr().unwrap().port(),
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            )]
        );
    }

    #[test]
    fn ports_socket_owners_finds_our_listener() {
        if !require_root() {
            return;
        }
        let (listener, inode) = in_new_netns(|| {
            let mut scanner = ListenScanner::new().expect("scanner");
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = listener.local_addr().unwrap().port();
            let found = scanner.scan().expect("scan");
            let inode = found
                .iter()
                .find(|p| p.port == port)
                .expect("listener")
                .inode;
            (listener, inode)
        });
        let me = std::process::id() as i32;
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let owners = socket_owners(&[me, i32::MAX, 0, -1]);
        assert_eq!(
            owners.get(&inode),
            Some(&Owner {
                pid: me,
                command: comm.trim().to_owned()
            })
        );

        // A child that inherits the socket shares it; the lower pid wins.
        let fd = listener.as_raw_fd();
        let flags = nix::fcntl::FdFlag::from_bits_truncate(
            nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_GETFD).unwrap(),
        );
        nix::fcntl::fcntl(
            &listener,
            nix::fcntl::FcntlArg::F_SETFD(flags - nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_SETFD(flags)).unwrap();
        let child_pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        let owners = loop {
            // Until the child has exec'd, its comm is still ours.
            let owners = socket_owners(&[child_pid, me]);
            let comm_now =
                std::fs::read_to_string(format!("/proc/{child_pid}/comm")).unwrap_or_default();
            if comm_now.trim() == "sleep" || Instant::now() > deadline {
                break owners;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let child_owners = socket_owners(&[child_pid]);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            child_owners
                .get(&inode)
                .map(|o| (o.pid, o.command.as_str())),
            Some((child_pid, "sleep")),
            "the child holds fd {fd} too"
        );
        assert_eq!(owners.get(&inode).map(|o| o.pid), Some(me.min(child_pid)));
    }

    #[test]
    fn ports_diff_counts_a_port_while_any_address_listens() {
        let v6 = |p: u16| ListeningPort {
            addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ..port(p)
        };
        let old = vec![port(80), v6(80), port(443), port(8080)];
        let new = vec![v6(80), port(3000), port(8080), port(3000), port(22)];
        assert_eq!(diff(&old, &new), (vec![22, 3000], vec![443]));
        assert_eq!(diff(&[], &[]), (vec![], vec![]));
        assert_eq!(diff(&old, &old), (vec![], vec![]));
        assert_eq!(diff(&[], &old), (vec![80, 443, 8080], vec![]));
    }

    #[test]
    fn ports_socket_inode_parses_only_socket_links() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"socket:[]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
        assert_eq!(socket_inode(b"socket:[12x]"), None);
    }

    #[test]
    fn ports_addr_order_is_v4_before_v6() {
        let a: SocketAddr = "0.0.0.0:1".parse().unwrap();
        let b: SocketAddr = "[::]:1".parse().unwrap();
        assert!(a.ip() < b.ip());
    }
}
