//! Forwarding whose bytes never enter hulld: a sockmap redirect.
//!
//! Both sockets of a forwarded connection go into a SOCKHASH keyed by their
//! socket cookie; a HASH maps each cookie to its peer's. An `sk_skb` verdict
//! program attached to the SOCKHASH runs for every segment a member
//! receives and redirects it to the egress of the peer, so the kernel moves
//! each request and answer and hulld does not wake for it.
//!
//! The kernel sends what a verdict redirects from a kworker, which wakes
//! for every request much as hulld would: on 6.18 the machine spends as
//! much CPU per request as when hulld copies, so the forwarder uses this
//! only when `network.forward_in_kernel` asks for it.
//!
//! The program is a few hand-assembled instructions loaded with bpf(2): a
//! BPF object built by a BPF toolchain (aya, libbpf) would need that
//! toolchain wherever hull is built, for 21 instructions.
//!
//! hulld still owns the end of the stream. A redirected segment is queued
//! on the peer's psock and sent by a kworker, so a FIN passed on as soon as
//! hulld sees one could overtake data still queued, and taking a socket out
//! of the map drops its queue. So [`Redirector::relay`] passes a half-close
//! on only once the peer's send queue holds every byte the closing side
//! received (`tcp_info` counts both), and leaves the map only after both
//! directions are done.

use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// bpf(2) commands.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
/// The verdict without a stream parser (5.13+): each skb as it comes.
const BPF_SK_SKB_VERDICT: u32 = 38;
/// Fail an update whose key exists: a cookie is never reused.
const BPF_NOEXIST: u64 = 1;

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_GET_SOCKET_COOKIE: i32 = 46;
const HELPER_SK_REDIRECT_HASH: i32 = 72;
/// The verdict that keeps a segment on its own socket.
const SK_PASS: i32 = 1;
const SK_DROP: i32 = 0;

/// The verifier's log, printed in a rejection.
const LOG_SIZE: usize = 16 * 1024;

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// One BPF instruction as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}

/// ld_imm64 of a map: two slots, the fd in the first, marked as a map fd.
fn load_map(dst: u8, map: RawFd) -> [Insn; 2] {
    const BPF_PSEUDO_MAP_FD: u8 = 1;
    [
        insn(0x18, dst, BPF_PSEUDO_MAP_FD, 0, map),
        insn(0, 0, 0, 0, 0),
    ]
}

/// The verdict: look this socket's cookie up in `peers`; redirect the skb
/// to the egress of the socket stored under the peer's cookie in `socks`,
/// or pass it (it stays readable on its own socket) when it has no peer.
fn verdict_program(peers: RawFd, socks: RawFd) -> Vec<Insn> {
    const MOV64_REG: u8 = 0xbf;
    const MOV64_IMM: u8 = 0xb7;
    const ADD64_IMM: u8 = 0x07;
    const STX_DW: u8 = 0x7b;
    const JEQ_IMM: u8 = 0x15;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const LDX_W: u8 = 0x61;
    const JNE_IMM: u8 = 0x55;
    let mut p = vec![
        // A FIN without data reaches the verdict as an empty skb. Sent on,
        // the kworker takes its 0 bytes sent for a broken pipe: it sets
        // EPIPE on the peer and stops sending to it. The FIN itself is
        // TCP state already; hulld passes it on (see `follow`).
        insn(LDX_W, 2, 1, 0, 0), // r2 = skb->len
        insn(JNE_IMM, 2, 0, 2, 0),
        insn(MOV64_IMM, 0, 0, 0, SK_DROP),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_REG, 6, 1, 0, 0), // r6 = skb
        insn(CALL, 0, 0, 0, HELPER_GET_SOCKET_COOKIE),
        insn(STX_DW, 10, 0, -8, 0), // *(u64 *)(fp - 8) = cookie
    ];
    p.extend(load_map(1, peers));
    p.extend([
        insn(MOV64_REG, 2, 10, 0, 0),
        insn(ADD64_IMM, 2, 0, 0, -8),
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        insn(JEQ_IMM, 0, 0, 7, 0),   // no peer: to the pass below
        insn(MOV64_REG, 3, 0, 0, 0), // key = &peer's cookie
        insn(MOV64_REG, 1, 6, 0, 0),
    ]);
    p.extend(load_map(2, socks));
    p.extend([
        insn(MOV64_IMM, 4, 0, 0, 0), // flags 0: the peer's egress
        insn(CALL, 0, 0, 0, HELPER_SK_REDIRECT_HASH),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_IMM, 0, 0, 0, SK_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] prefix of union
    // bpf_attr for `cmd`, and its size is what the kernel is told; the
    // kernel reads (and for PROG_LOAD, writes the log through) only that.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            small(size_of::<T>()),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_from(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(r).map_err(|_| io::Error::other("bpf(2) returned no fd"))?;
    // SAFETY: a successful MAP_CREATE or PROG_LOAD returns a new fd that
    // nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The length of one of the few small structs and arrays handed to the
/// kernel here (bpf_attr prefixes, tcp_info, 64 events, 21 instructions).
#[allow(clippy::cast_possible_truncation)]
const fn small(len: usize) -> u32 {
    assert!(len <= u16::MAX as usize);
    len as u32
}

fn create_map(map_type: u32, key: u32, value: u32, entries: u32) -> io::Result<OwnedFd> {
    // A HASH would otherwise allocate all its entries up front.
    const BPF_F_NO_PREALLOC: u32 = 1;
    let mut attr = MapCreateAttr {
        map_type,
        key_size: key,
        value_size: value,
        max_entries: entries,
        map_flags: if map_type == BPF_MAP_TYPE_HASH {
            BPF_F_NO_PREALLOC
        } else {
            0
        },
    };
    bpf(BPF_MAP_CREATE, &mut attr).and_then(fd_from)
}

/// A socket goes into a SOCKHASH with its fd as the value.
fn update(map: RawFd, key: u64, value: u64) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map as u32,
        key: &key as *const u64 as u64,
        value: &value as *const u64 as u64,
        flags: BPF_NOEXIST,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn delete(map: RawFd, key: u64) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map as u32,
        key: &key as *const u64 as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

fn load_program(insns: &[Insn]) -> Result<OwnedFd, LoadError> {
    let license = c"GPL";
    let mut log = vec![0u8; LOG_SIZE];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SK_SKB,
        insn_cnt: small(insns.len()),
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: small(LOG_SIZE),
        log_buf: log.as_mut_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_PROG_LOAD, &mut attr)
        .and_then(fd_from)
        .map_err(|source| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            LoadError::Program {
                log: String::from_utf8_lossy(&log[..end]).trim().to_string(),
                source,
            }
        })
}

fn attach(prog: &OwnedFd, map: &OwnedFd) -> io::Result<()> {
    let mut attr = ProgAttachAttr {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_SK_SKB_VERDICT,
        attach_flags: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("create the map of relayed sockets")]
    Sockets(#[source] io::Error),
    #[error("create the map of peers")]
    Peers(#[source] io::Error),
    #[error("load the verdict program; the verifier said: {log}")]
    Program {
        log: String,
        #[source]
        source: io::Error,
    },
    #[error("attach the verdict program to the map of relayed sockets")]
    Attach(#[source] io::Error),
    #[error("make the epoll set that watches relayed sockets for their end")]
    Watch(#[source] io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("read a socket's cookie")]
    Cookie(#[source] io::Error),
    #[error("read a socket's TCP counters")]
    Counters(#[source] io::Error),
    #[error("record a socket's peer")]
    Peer(#[source] io::Error),
    #[error("watch a socket for its end")]
    Watch(#[source] io::Error),
    #[error("put a socket in the map of redirect targets")]
    Target(#[source] io::Error),
    #[error("put a socket in the map of relayed sockets")]
    Member(#[source] io::Error),
    /// Only a socket that got a FIN or a reset in the few microseconds
    /// since the first went in: the connection is lost, as the first
    /// socket's bytes may already be queued on the second.
    #[error("put the second socket in the map of relayed sockets")]
    SecondMember(#[source] io::Error),
    #[error("pass on the bytes a socket received before it joined the map")]
    Flush(#[source] io::Error),
}

impl JoinError {
    /// Whether the kernel may have moved bytes already, so that the
    /// connection cannot be relayed another way.
    pub fn moved_bytes(&self) -> bool {
        matches!(self, JoinError::SecondMember(_) | JoinError::Flush(_))
    }
}

fn cookie(sock: BorrowedFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = small(size_of::<u64>());
    // SAFETY: SO_COOKIE writes a u64 to `v`, at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            &mut v as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// What a TCP socket's counters say about the bytes through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Bytes handed to the socket to send: acknowledged plus still queued.
    /// A lower bound while the socket is sending: acknowledged is read
    /// first, and an ack between the reads only moves bytes from queued
    /// to acknowledged.
    pub written: u64,
    /// Bytes (in order) received, and the FIN as one when it came.
    pub received: u64,
}

pub fn counters(sock: BorrowedFd) -> io::Result<Counters> {
    // struct tcp_info up to tcpi_bytes_received (4.1+): libc's tcp_info
    // stops before the byte counters.
    const BYTES_ACKED: usize = 120;
    const BYTES_RECEIVED: usize = 128;
    let mut info = [0u8; 136];
    let mut len = small(info.len());
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < info.len() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "tcp_info has no byte counters",
        ));
    }
    let field = |at: usize| u64::from_ne_bytes(info[at..at + 8].try_into().expect("8 bytes"));
    let acked = field(BYTES_ACKED);
    let received = field(BYTES_RECEIVED);
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Counters {
        written: acked + queued.max(0) as u64,
        received,
    })
}

/// The maps and the verdict program, loaded once per forwarder.
pub struct Redirector {
    /// Sockets whose segments go through the verdict.
    members: OwnedFd,
    /// Sockets the verdict redirects to. A socket is here before its peer
    /// is a member, so no verdict ever finds its target missing (it would
    /// drop the segment). This map has no program: being in it changes
    /// nothing on the socket's own receive path.
    targets: OwnedFd,
    peers: OwnedFd,
    _program: OwnedFd,
    watch: Arc<Watch>,
    dispatcher: JoinHandle<()>,
}

impl Drop for Redirector {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

impl Redirector {
    /// Room for `pairs` relayed connections at once; a connection past it
    /// is relayed by copying.
    pub fn load(pairs: u32) -> Result<Arc<Redirector>, LoadError> {
        let entries = pairs.saturating_mul(2).max(2);
        let sockhash = || create_map(BPF_MAP_TYPE_SOCKHASH, 8, 8, entries);
        let members = sockhash().map_err(LoadError::Sockets)?;
        let targets = sockhash().map_err(LoadError::Sockets)?;
        let peers = create_map(BPF_MAP_TYPE_HASH, 8, 8, entries).map_err(LoadError::Peers)?;
        let program = load_program(&verdict_program(peers.as_raw_fd(), targets.as_raw_fd()))?;
        attach(&program, &members).map_err(LoadError::Attach)?;
        let watch = Arc::new(Watch::new().map_err(LoadError::Watch)?);
        let dispatcher = tokio::spawn({
            let watch = watch.clone();
            async move {
                loop {
                    if let Err(e) = watch.dispatch().await {
                        // Only when the runtime goes down; relays still
                        // look at their sockets every `IDLE_CHECK`.
                        tracing::error!(error = %e, "watching relayed sockets for their end failed");
                        return;
                    }
                }
            }
        });
        Ok(Arc::new(Redirector {
            members,
            targets,
            peers,
            _program: program,
            watch,
            dispatcher,
        }))
    }
}

/// Both sockets of a connection in the maps; taken out when dropped.
pub struct Joined<'r> {
    redirector: &'r Redirector,
    /// What each socket had written when it joined: bytes it sends from
    /// then on came through the redirect.
    written_before: [u64; 2],
    /// Woken when either socket hangs up or fails.
    ended: Arc<Notify>,
    tokens: Vec<u64>,
    /// (map, cookie) entries made so far, to undo.
    entries: Vec<(RawFd, u64)>,
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.redirector.watch.forget(*token);
        }
        // Members first, so no verdict runs while the others go.
        for (map, key) in self.entries.iter().rev() {
            let _ = delete(*map, *key);
        }
    }
}

impl Redirector {
    /// Puts both sockets in the maps so that what each receives is sent by
    /// the other, and passes on what they received before.
    pub fn join<'r>(&'r self, a: BorrowedFd, b: BorrowedFd) -> Result<Joined<'r>, JoinError> {
        let cookies = [
            cookie(a).map_err(JoinError::Cookie)?,
            cookie(b).map_err(JoinError::Cookie)?,
        ];
        let written_before = [
            counters(a).map_err(JoinError::Counters)?.written,
            counters(b).map_err(JoinError::Counters)?.written,
        ];
        let mut joined = Joined {
            redirector: self,
            written_before,
            ended: Arc::new(Notify::new()),
            tokens: Vec::new(),
            entries: Vec::new(),
        };
        let (peers, targets, members) = (
            self.peers.as_raw_fd(),
            self.targets.as_raw_fd(),
            self.members.as_raw_fd(),
        );
        // Everything a verdict looks up exists before the first verdict
        // runs: the peers, then both targets, then the members.
        for (me, peer) in [(cookies[0], cookies[1]), (cookies[1], cookies[0])] {
            update(peers, me, peer).map_err(JoinError::Peer)?;
            joined.entries.push((peers, me));
        }
        // Before any socket is a member: a failure up to there leaves the
        // connection as it was, to be relayed another way.
        for sock in [a, b] {
            let token = self
                .watch
                .add(sock, joined.ended.clone())
                .map_err(JoinError::Watch)?;
            joined.tokens.push(token);
        }
        for i in [0, 1] {
            update(targets, cookies[i], [a, b][i].as_raw_fd() as u64).map_err(JoinError::Target)?;
            joined.entries.push((targets, cookies[i]));
        }
        update(members, cookies[0], a.as_raw_fd() as u64).map_err(JoinError::Member)?;
        joined.entries.push((members, cookies[0]));
        // From here `a`'s bytes may be on their way through the kernel,
        // and taking the sockets out would drop them.
        update(members, cookies[1], b.as_raw_fd() as u64).map_err(JoinError::SecondMember)?;
        joined.entries.push((members, cookies[1]));
        for sock in [a, b] {
            flush(sock).map_err(JoinError::Flush)?;
        }
        Ok(joined)
    }
}

/// Runs the socket's data-ready hook, now the verdict's, over its receive
/// queue: SO_RCVLOWAT calls tcp_data_ready() under the socket's lock, and
/// the verdict reads the queue from its head, so what came before the
/// socket joined goes out first.
fn flush(sock: BorrowedFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: SO_RCVLOWAT reads one int.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &one as *const libc::c_int as *const libc::c_void,
            small(size_of::<libc::c_int>()),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An epoll set of relayed sockets, asked only for hang-ups and errors:
/// the verdict wakes a socket's readers for every segment, and epoll
/// drops those wakeups before they reach hulld when nobody asked for
/// EPOLLIN. The set itself sits in tokio's reactor.
struct Watch {
    epoll: AsyncFd<OwnedFd>,
    waiters: Mutex<HashMap<u64, Arc<Notify>>>,
    next: AtomicU64,
}

impl Watch {
    fn new() -> io::Result<Watch> {
        // SAFETY: epoll_create1 takes flags only.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd is owned by the AsyncFd from here on, so the
        // fd stays open and the same until the AsyncFd drops.
        let epoll = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Watch {
            epoll,
            waiters: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        })
    }

    fn add(&self, sock: BorrowedFd, waiter: Arc<Notify>) -> io::Result<u64> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token, waiter);
        let mut event = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: `event` is a valid epoll_event; the kernel copies it.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                sock.as_raw_fd(),
                &mut event,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            self.forget(token);
            return Err(e);
        }
        Ok(token)
    }

    /// The socket leaves the set when its fd closes; its waiter goes now.
    fn forget(&self, token: u64) {
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token);
    }

    /// Wakes the waiters of every socket that hung up or failed; the
    /// redirector's one dispatcher task calls it in a loop.
    async fn dispatch(&self) -> io::Result<()> {
        let mut guard = self.epoll.readable().await?;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: `events` has room for its length; timeout 0 never
            // blocks.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.get_ref().as_raw_fd(),
                    events.as_mut_ptr(),
                    small(events.len()) as libc::c_int,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            for event in &events[..n as usize] {
                let token = event.u64;
                if let Some(w) = waiters.get(&token) {
                    w.notify_one();
                }
            }
            if (n as usize) < events.len() {
                guard.clear_ready();
                return Ok(());
            }
        }
    }
}

/// How a relay through the redirect ended.
pub enum Relayed {
    /// Both directions ended, or one side failed (the other is closed).
    Done(io::Result<()>),
    /// The sockets could not join and nothing moved: relay them otherwise.
    Refused {
        a: TcpStream,
        b: TcpStream,
        why: JoinError,
    },
}

/// The first wait for a peer's send queue to take a closing side's
/// bytes, doubled up to `DRAIN_POLL_MAX`: the kworker that sends them
/// usually needs microseconds, a peer that stopped reading any time.
const DRAIN_POLL_MIN: Duration = Duration::from_micros(200);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(100);

/// How often a relay looks at its sockets without being woken.
const IDLE_CHECK: Duration = Duration::from_secs(10);

impl Redirector {
    /// Relays between `a` and `b` in the kernel until both directions
    /// ended (each end passed on after the bytes before it) or one side
    /// failed.
    pub async fn relay(&self, a: TcpStream, b: TcpStream) -> Relayed {
        let joined = match self.join(a.as_fd(), b.as_fd()) {
            Ok(joined) => joined,
            Err(why) if !why.moved_bytes() => return Relayed::Refused { a, b, why },
            Err(why) => return Relayed::Done(Err(io::Error::other(why))),
        };
        let result = follow(&joined, [&a, &b]).await;
        drop(joined);
        Relayed::Done(result)
    }
}

/// What poll says of a relayed socket.
fn hung_up(sock: &TcpStream) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd; timeout 0 never blocks.
    if unsafe { libc::poll(&mut pfd, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if pfd.revents & libc::POLLERR != 0 {
        return Err(sock
            .take_error()?
            .unwrap_or_else(|| io::Error::from(io::ErrorKind::ConnectionReset)));
    }
    Ok(pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0)
}

async fn follow(joined: &Joined<'_>, socks: [&TcpStream; 2]) -> io::Result<()> {
    // passed[i]: the end of what socks[i] sent went on to its peer.
    let mut passed = [false; 2];
    let mut poll = DRAIN_POLL_MIN;
    loop {
        let mut draining = false;
        for i in [0, 1] {
            let (from, to) = (socks[i], socks[1 - i]);
            if !hung_up(from)? || passed[i] {
                // An error on the other side shows on its own turn.
                continue;
            }
            let received = counters(from.as_fd())?.received;
            let written = counters(to.as_fd())?.written - joined.written_before[1 - i];
            // `received` counts the FIN as a byte.
            if written + 1 >= received {
                to.shutdown(Shutdown::Write)?;
                passed[i] = true;
                poll = DRAIN_POLL_MIN;
            } else {
                draining = true;
            }
        }
        if passed == [true, true] {
            return Ok(());
        }
        if draining {
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(DRAIN_POLL_MAX);
        } else {
            // The wake-up comes from the watch; the timeout is only a
            // safety net, cheap at one wake-up per idle connection.
            let _ = tokio::time::timeout(IDLE_CHECK, joined.ended.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A connection through a relay: the client's end, the relay's two
    /// sockets and the upstream's end, all on loopback.
    struct Ends {
        client: TcpStream,
        a: TcpStream,
        b: TcpStream,
        upstream: TcpStream,
    }

    fn ends() -> Ends {
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let back = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (a, _) = front.accept().unwrap();
        let b = TcpStream::connect(back.local_addr().unwrap()).unwrap();
        let (upstream, _) = back.accept().unwrap();
        for s in [&a, &b] {
            s.set_nonblocking(true).unwrap();
        }
        Ends {
            client,
            a,
            b,
            upstream,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Bytes that show where each one belongs: a shifted byte or a
    /// reordered run is a mismatch.
    fn pattern(seed: usize, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i.wrapping_mul(2654435761) >> (8 + seed % 13)) ^ seed).to_le_bytes()[0])
            .collect()
    }

    /// Writes `chunks` to `to` then shuts its write side (the half-close).
    fn send(mut to: &TcpStream, chunks: &[Vec<u8>]) {
        for c in chunks {
            to.write_all(c).unwrap();
        }
        to.shutdown(Shutdown::Write).unwrap();
    }

    fn read_to_end(mut from: &TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        from.read_to_end(&mut got).unwrap();
        got
    }

    /// One connection: what each end sends before the relay joins, then
    /// after; each end reads to EOF and gets exactly the other's bytes.
    fn relay_once(
        r: &Redirector,
        rt: &tokio::runtime::Runtime,
        before: [&[u8]; 2],
        after: [Vec<Vec<u8>>; 2],
    ) {
        let e = ends();
        (&e.client).write_all(before[0]).unwrap();
        (&e.upstream).write_all(before[1]).unwrap();
        // Let them land in the receive queues before the sockets join.
        std::thread::sleep(Duration::from_millis(2));
        let (client, upstream) = (e.client, e.upstream);
        let [up, down] = after;
        let want_up: Vec<u8> = before[0].iter().copied().chain(up.concat()).collect();
        let want_down: Vec<u8> = before[1].iter().copied().chain(down.concat()).collect();
        // The ends go on once both sockets joined: one that half-closed
        // before would be refused (and copied by the forwarder).
        let joined = r.join(e.a.as_fd(), e.b.as_fd()).unwrap();
        let t_client = std::thread::spawn(move || {
            send(&client, &up);
            read_to_end(&client)
        });
        let t_upstream = std::thread::spawn(move || {
            send(&upstream, &down);
            read_to_end(&upstream)
        });
        rt.block_on(follow(&joined, [&e.a, &e.b])).unwrap();
        drop(joined);
        let got_down = t_client.join().unwrap();
        let got_up = t_upstream.join().unwrap();
        assert!(
            got_up == want_up,
            "upstream got {} bytes of {}, or out of order",
            got_up.len(),
            want_up.len()
        );
        assert!(
            got_down == want_down,
            "client got {} bytes of {}, or out of order",
            got_down.len(),
            want_down.len()
        );
    }

    fn redirector(rt: &tokio::runtime::Runtime) -> Arc<Redirector> {
        redirector_for(rt, 8)
    }

    fn redirector_for(rt: &tokio::runtime::Runtime, pairs: u32) -> Arc<Redirector> {
        let _guard = rt.enter();
        Redirector::load(pairs).unwrap()
    }

    #[test]
    fn fin_counts_as_one_received_byte() {
        let e = ends();
        send(&e.client, &[vec![7u8; 1000]]);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(counters(e.a.as_fd()).unwrap().received, 1001);
    }

    #[test]
    fn bytes_queued_before_the_join_go_first_server_first_and_client_first() {
        let rt = runtime();
        let r = redirector(&rt);
        let small = |seed| {
            (0..200)
                .map(|i| pattern(seed + i, 1 + i % 37))
                .collect::<Vec<_>>()
        };
        // A banner from the upstream, nothing yet from the client.
        relay_once(&r, &rt, [b"", b"220 banner\r\n"], [small(1), small(2)]);
        // A request from the client before the upstream was reached.
        relay_once(
            &r,
            &rt,
            [b"GET / HTTP/1.1\r\n\r\n", b""],
            [small(3), small(4)],
        );
        // Large on both sides, before and after.
        // (Less before the join than the socket buffers hold: the writer
        // would wait for a relay that has not started.)
        let (early_a, early_b) = (pattern(5, 60_000), pattern(6, 30_000));
        relay_once(
            &r,
            &rt,
            [&early_a, &early_b],
            [vec![pattern(7, 3 << 20)], vec![pattern(8, 1 << 20)]],
        );
    }

    /// Keys in a map (BPF_MAP_GET_NEXT_KEY from none until ENOENT).
    fn entries(map: &OwnedFd) -> usize {
        const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
        let (mut key, mut next, mut n) = (0u64, 0u64, 0);
        let mut first = true;
        loop {
            let mut attr = MapElemAttr {
                map_fd: map.as_raw_fd() as u32,
                key: if first { 0 } else { &key as *const u64 as u64 },
                value: &mut next as *mut u64 as u64,
                ..Default::default()
            };
            if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr).is_err() {
                return n;
            }
            first = false;
            key = next;
            n += 1;
        }
    }

    fn no_entries_left(r: &Redirector) {
        for map in [&r.peers, &r.targets, &r.members] {
            assert_eq!(entries(map), 0);
        }
        assert!(r.watch.waiters.lock().unwrap().is_empty());
    }

    /// Half-closes both ways, each way first, over many connections at
    /// once: each end gets all the other sent, then EOF.
    #[test]
    fn half_close_passes_on_every_byte_both_ways() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let conns = 200;
        let r = redirector_for(&rt, u32::try_from(conns).unwrap());
        let r2 = r.clone();
        let handles: Vec<_> = (0..conns)
            .map(|n| {
                let r = r2.clone();
                let e = ends();
                let len = [(1 << 20) + n * 7, 64 * 1024 + n * 13];
                let up = pattern(n, len[0]);
                let down = pattern(n ^ 0x55, len[1]);
                // Even: the client ends first and the upstream answers
                // after EOF; odd: the other way round.
                let client_first = n % 2 == 0;
                let (client, upstream) = (e.client, e.upstream);
                let (up2, down2) = (up.clone(), down.clone());
                // The ends start once both sockets joined: one that half-closed
                // before would be refused (and copied by the forwarder).
                let (joined_tx, joined_rx) = std::sync::mpsc::channel();
                let (a, b) = (e.a, e.b);
                let relay = rt.spawn(async move {
                    let joined = r.join(a.as_fd(), b.as_fd()).map_err(io::Error::other)?;
                    joined_tx.send(()).unwrap();
                    follow(&joined, [&a, &b]).await
                });
                joined_rx.recv().unwrap();
                let tc = std::thread::spawn(move || {
                    if client_first {
                        send(&client, &[up2]);
                        read_to_end(&client)
                    } else {
                        let got = read_to_end(&client);
                        send(&client, &[up2]);
                        got
                    }
                });
                let tu = std::thread::spawn(move || {
                    if client_first {
                        let got = read_to_end(&upstream);
                        send(&upstream, &[down2]);
                        got
                    } else {
                        send(&upstream, &[down2]);
                        read_to_end(&upstream)
                    }
                });
                (tc, tu, relay, up, down)
            })
            .collect();
        for (n, (tc, tu, relay, up, down)) in handles.into_iter().enumerate() {
            let got_down = tc.join().unwrap();
            let got_up = tu.join().unwrap();
            rt.block_on(relay).unwrap().unwrap();
            assert!(
                got_up == up,
                "connection {n}: upstream got {} of {} bytes, or out of order",
                got_up.len(),
                up.len()
            );
            assert!(
                got_down == down,
                "connection {n}: client got {} of {} bytes, or out of order",
                got_down.len(),
                down.len()
            );
        }
        no_entries_left(&r);
    }

    /// A reset from one side ends the relay with an error and closes the
    /// other side; the maps are left empty.
    #[test]
    fn a_reset_closes_the_other_side() {
        let rt = runtime();
        let r = redirector(&rt);
        for client_resets in [true, false] {
            let e = ends();
            let (resetting, other) = if client_resets {
                (e.client, e.upstream)
            } else {
                (e.upstream, e.client)
            };
            (&resetting).write_all(b"some bytes").unwrap();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                // SO_LINGER 0: close sends a RST.
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: SO_LINGER reads one struct linger.
                let r = unsafe {
                    libc::setsockopt(
                        resetting.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        &linger as *const libc::linger as *const libc::c_void,
                        small(size_of::<libc::linger>()),
                    )
                };
                assert_eq!(r, 0);
                drop(resetting);
            });
            let result = match rt.block_on(r.relay(e.a, e.b)) {
                Relayed::Done(result) => result,
                Relayed::Refused { why, .. } => panic!("refused: {why}"),
            };
            t.join().unwrap();
            assert!(result.is_err(), "a reset ended the relay without an error");
            other
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut rest = Vec::new();
            // The relay closed its socket: EOF or a reset, never a hang.
            match (&other).read_to_end(&mut rest) {
                Ok(_) => {}
                Err(e) => assert_ne!(e.kind(), io::ErrorKind::WouldBlock, "other side left open"),
            }
            no_entries_left(&r);
        }
    }

    /// A socket that got its FIN before it could join is refused with
    /// nothing moved, and can be relayed by copying.
    #[test]
    fn a_socket_closed_before_the_join_is_refused_untouched() {
        let rt = runtime();
        let r = redirector(&rt);
        let e = ends();
        send(&e.client, &[b"GET / HTTP/1.0\r\n\r\n".to_vec()]);
        std::thread::sleep(Duration::from_millis(20));
        match rt.block_on(r.relay(e.a, e.b)) {
            Relayed::Refused { a, .. } => {
                let mut got = Vec::new();
                a.set_nonblocking(false).unwrap();
                (&a).read_to_end(&mut got).unwrap();
                assert_eq!(got, b"GET / HTTP/1.0\r\n\r\n");
            }
            Relayed::Done(result) => panic!("relayed: {result:?}"),
        }
        no_entries_left(&r);
    }

    /// A request that came before the join, with nothing after it until
    /// the answer: no later segment would run the verdict over it.
    #[test]
    fn a_request_queued_before_the_join_goes_on_by_itself() {
        let rt = runtime();
        let r = redirector(&rt);
        for server_first in [false, true] {
            let e = ends();
            let (mut asker, mut answerer) = if server_first {
                (&e.upstream, &e.client)
            } else {
                (&e.client, &e.upstream)
            };
            asker.write_all(b"question").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let joined = r.join(e.a.as_fd(), e.b.as_fd()).unwrap();
            answerer
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut got = [0u8; 8];
            answerer
                .read_exact(&mut got)
                .expect("the early request never arrived");
            assert_eq!(&got, b"question");
            answerer.write_all(b"answer").unwrap();
            let mut got = [0u8; 6];
            asker.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"answer");
            drop(joined);
        }
        no_entries_left(&r);
    }
}
