//! Ending the inner's connections to destinations a policy change denies:
//! their conntrack entries are deleted over ctnetlink, so the next packet
//! of each is a new one to the firewall, which judges it again and
//! answers a reset. Connections the new policy still allows keep their
//! entries and never notice.

use std::io;
use std::net::Ipv4Addr;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::enforcer::CutConnections;
use crate::nfnetlink::{
    error_at, put_message, u32_at, wait_ack, Wait, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN,
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const AF_INET: u8 = 2;

/// One connection as conntrack knows it: its original direction's
/// addresses, and that tuple's attribute as the kernel wrote it (what a
/// delete names the entry by).
#[derive(Debug, Clone)]
pub struct Tracked {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    tuple: Vec<u8>,
}

/// A ctnetlink socket in the calling thread's network namespace.
pub struct Conntrack {
    socket: Socket,
    seq: u32,
}

impl Conntrack {
    pub fn open() -> io::Result<Conntrack> {
        let socket = Socket::new(NETLINK_NETFILTER)?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Conntrack { socket, seq: 1 })
    }

    /// Every IPv4 connection conntrack tracks whose original source is
    /// `from`.
    pub fn list_from(&mut self, from: Ipv4Addr) -> io::Result<Vec<Tracked>> {
        self.seq = self.seq.wrapping_add(1);
        let kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;
        let mut request = Vec::new();
        put_message(
            &mut request,
            kind,
            NLM_F_REQUEST | NLM_F_DUMP,
            self.seq,
            AF_INET,
            [0, 0],
            &[],
        );
        self.socket.send(&request, 0)?;
        let mut out = Vec::new();
        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            buf.clear();
            let n = self.socket.recv(&mut buf, 0)?;
            let mut at = 0;
            while at + NLMSG_HDRLEN <= n {
                let len = u32_at(&buf, at) as usize;
                if len < NLMSG_HDRLEN || at + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a malformed conntrack message",
                    ));
                }
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR if len >= NLMSG_HDRLEN + 4 => {
                        let errno = error_at(&buf, at);
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                    }
                    // A message too short for its nfgenmsg carries nothing.
                    _ if len < NLMSG_HDRLEN + 4 => {}
                    _ => {
                        // After the netlink header, the 4-byte nfgenmsg.
                        let attrs = &buf[at + NLMSG_HDRLEN + 4..at + len];
                        if let Some(t) = parse_entry(attrs) {
                            if t.src == from {
                                out.push(t);
                            }
                        }
                    }
                }
                at += (len + 3) & !3;
            }
        }
    }

    /// Deletes one entry; one already gone is not an error.
    pub fn delete(&mut self, entry: &Tracked) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE;
        let mut request = Vec::new();
        put_message(
            &mut request,
            kind,
            NLM_F_REQUEST | NLM_F_ACK,
            self.seq,
            AF_INET,
            [0, 0],
            &entry.tuple,
        );
        self.socket.send(&request, 0)?;
        match wait_ack(&self.socket, self.seq) {
            Ok(()) => Ok(()),
            Err(Wait::Refused(e)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(Wait::Refused(e) | Wait::Receive(e)) => Err(e),
        }
    }
}

impl CutConnections for Conntrack {
    fn cut(&mut self, from: Ipv4Addr, denied: &dyn Fn(Ipv4Addr) -> bool) -> io::Result<u64> {
        let mut cut = 0;
        for entry in self.list_from(from)? {
            if denied(entry.dst) {
                self.delete(&entry)?;
                cut += 1;
            }
        }
        Ok(cut)
    }
}

/// The attributes of a buffer: (type without flags, payload, the whole
/// attribute with its header).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let (whole, payload) = (&buf[..len], &buf[4..len]);
        buf = &buf[((len + 3) & !3).min(buf.len())..];
        Some((kind, payload, whole))
    })
}

fn parse_entry(attributes: &[u8]) -> Option<Tracked> {
    let (_, orig, whole) = attrs(attributes).find(|(k, _, _)| *k == CTA_TUPLE_ORIG)?;
    let (_, ip, _) = attrs(orig).find(|(k, _, _)| *k == CTA_TUPLE_IP)?;
    let addr = |want: u16| {
        attrs(ip)
            .find(|(k, _, _)| *k == want)
            .and_then(|(_, v, _)| <[u8; 4]>::try_from(v).ok())
            .map(Ipv4Addr::from)
    };
    Some(Tracked {
        src: addr(CTA_IP_V4_SRC)?,
        dst: addr(CTA_IP_V4_DST)?,
        tuple: whole.to_vec(),
    })
}
