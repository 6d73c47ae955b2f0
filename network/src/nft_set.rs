//! Elements of an nftables set, added and flushed over netlink.
//!
//! The egress enforcer lets through the addresses the inner's name server
//! allowed, each for its record's TTL: one set element per address, with
//! a timeout, added before the answer reaches the inner. That happens on
//! every allowed lookup, so it must cost a netlink round trip, not an
//! `nft` process. The table and its sets are made once with `nft -f`
//! (see [`crate::nat`]); this writes only elements.
//!
//! Each change is one nfnetlink batch (begin, the message, end) sent in
//! one datagram, and waits for the kernel's acknowledgement, so when
//! [`SetWriter::add`] returns the addresses are in the set. The crates
//! that wrap nftables' netlink either link libnftnl (C) or are GPL, and
//! these two messages are a few dozen lines.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::nfnetlink::{
    c_string, put_attr, put_message, wait_ack, Wait, NLA_F_NESTED, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_REQUEST,
};

/// nfnetlink's batch markers and the nftables subsystem.
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

/// Attributes of a set element list, of an element, and of its key.
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;

/// The nftables family of the table a set is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFamily {
    Inet,
    Ip,
    Ip6,
}

impl TableFamily {
    fn nfproto(self) -> u8 {
        match self {
            TableFamily::Inet => 1,
            TableFamily::Ip => 2,
            TableFamily::Ip6 => 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NftSetError {
    #[error("cannot open a NETLINK_NETFILTER socket")]
    Open(#[source] io::Error),
    #[error("cannot send to nftables for set {table}/{set}")]
    Send {
        table: String,
        set: String,
        #[source]
        source: io::Error,
    },
    #[error("nftables refused the change to set {table}/{set}")]
    Refused {
        table: String,
        set: String,
        #[source]
        source: io::Error,
    },
    #[error("no answer from nftables for set {table}/{set}")]
    Receive {
        table: String,
        set: String,
        #[source]
        source: io::Error,
    },
}

/// A netlink socket to the nftables of the calling thread's network
/// namespace, owned by whoever writes the sets (one writer at a time).
pub struct SetWriter {
    socket: Socket,
    seq: u32,
}

impl SetWriter {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<SetWriter, NftSetError> {
        let socket = Socket::new(NETLINK_NETFILTER).map_err(NftSetError::Open)?;
        // Connected to the kernel: nothing else can write to it.
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NftSetError::Open)?;
        Ok(SetWriter { socket, seq: 0 })
    }

    /// Adds the addresses to the set, each to expire after its duration
    /// (rounded up to a whole millisecond; at least one). An address the
    /// set already holds keeps the expiry it had. The set must have the
    /// `timeout` flag and the addresses' type.
    pub fn add(
        &mut self,
        family: TableFamily,
        table: &str,
        set: &str,
        elements: &[(IpAddr, Duration)],
    ) -> Result<(), NftSetError> {
        if elements.is_empty() {
            return Ok(());
        }
        let mut list = Vec::new();
        for (addr, timeout) in elements {
            let mut key = Vec::new();
            let bytes = match addr {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            put_attr(&mut key, NFTA_DATA_VALUE, &bytes);
            let millis = u64::try_from(timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            let mut element = Vec::new();
            put_attr(&mut element, NFTA_SET_ELEM_KEY | NLA_F_NESTED, &key);
            put_attr(&mut element, NFTA_SET_ELEM_TIMEOUT, &millis.to_be_bytes());
            put_attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &element);
        }
        // NLM_F_CREATE without NLM_F_EXCL: an element already there is no
        // error.
        self.change(
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            family,
            table,
            set,
            Some(&list),
        )
    }

    /// Empties the set (a policy change starts it over).
    pub fn flush(
        &mut self,
        family: TableFamily,
        table: &str,
        set: &str,
    ) -> Result<(), NftSetError> {
        self.change(NFT_MSG_DELSETELEM, 0, family, table, set, None)
    }

    fn change(
        &mut self,
        message: u16,
        flags: u16,
        family: TableFamily,
        table: &str,
        set: &str,
        elements: Option<&[u8]>,
    ) -> Result<(), NftSetError> {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, &c_string(table));
        put_attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, &c_string(set));
        if let Some(elements) = elements {
            put_attr(
                &mut attrs,
                NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED,
                elements,
            );
        }
        let base = self.seq;
        self.seq = self.seq.wrapping_add(3);
        let (request, ack) = (NLM_F_REQUEST, NLM_F_ACK);
        let subsys = NFNL_SUBSYS_NFTABLES.to_be_bytes();
        let mut batch = Vec::new();
        put_message(
            &mut batch,
            NFNL_MSG_BATCH_BEGIN,
            request,
            base,
            0,
            subsys,
            &[],
        );
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | message;
        put_message(
            &mut batch,
            kind,
            request | ack | flags,
            base.wrapping_add(1),
            family.nfproto(),
            [0, 0],
            &attrs,
        );
        put_message(
            &mut batch,
            NFNL_MSG_BATCH_END,
            request,
            base.wrapping_add(2),
            0,
            subsys,
            &[],
        );
        let names = || (table.to_string(), set.to_string());
        self.socket.send(&batch, 0).map_err(|source| {
            let (table, set) = names();
            NftSetError::Send { table, set, source }
        })?;
        wait_ack(&self.socket, base.wrapping_add(1)).map_err(|e| {
            let (table, set) = names();
            match e {
                Wait::Refused(source) => NftSetError::Refused { table, set, source },
                Wait::Receive(source) => NftSetError::Receive { table, set, source },
            }
        })
    }
}
