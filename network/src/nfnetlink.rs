//! nfnetlink messages, as nftables and conntrack take them: a netlink
//! header, an nfgenmsg (family, version, resource id), then attributes.
//! The few messages hulld sends are built here by hand (see
//! [`crate::nft_set`] for why).

use std::io;

use netlink_sys::Socket;

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;

/// Reads until the kernel answers message `seq`: an error of 0 is the
/// acknowledgement, another is the reason it was refused.
pub(crate) fn wait_ack(socket: &Socket, seq: u32) -> Result<(), Wait> {
    let mut buf = vec![0u8; 8192];
    loop {
        buf.clear();
        let n = socket.recv(&mut buf, 0).map_err(Wait::Receive)?;
        let mut at = 0;
        while at + NLMSG_HDRLEN <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            let got_seq = u32_at(&buf, at + 8);
            if len < NLMSG_HDRLEN || at + len > n {
                return Err(Wait::Receive(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a malformed netlink message",
                )));
            }
            if kind == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 {
                let errno = error_at(&buf, at);
                if errno != 0 {
                    // A refused batch answers with the failing message's seq.
                    return Err(Wait::Refused(io::Error::from_raw_os_error(-errno)));
                }
                if got_seq == seq {
                    return Ok(());
                }
            }
            at += (len + 3) & !3;
        }
    }
}

pub(crate) enum Wait {
    Refused(io::Error),
    Receive(io::Error),
}

pub(crate) fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// The error code of the NLMSG_ERROR message at `at`: 0 for an
/// acknowledgement, else a negated errno.
pub(crate) fn error_at(buf: &[u8], at: usize) -> i32 {
    i32::from_ne_bytes([buf[at + 16], buf[at + 17], buf[at + 18], buf[at + 19]])
}

pub(crate) fn c_string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A netlink attribute: length, type, payload, padded to four bytes.
pub(crate) fn put_attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// A netlink message with an nfgenmsg header (family, version 0, the
/// resource id in network order) before its attributes.
pub(crate) fn put_message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: [u8; 2],
    attrs: &[u8],
) {
    let len = u32::try_from(NLMSG_HDRLEN + 4 + attrs.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0, res_id[0], res_id[1]]);
    out.extend_from_slice(attrs);
    out.resize(out.len().next_multiple_of(4), 0);
}
