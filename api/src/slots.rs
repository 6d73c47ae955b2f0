//! The API's connections under its caps: `api.max_connections` in all and
//! `api.max_connections_per_source` from one address (the ingress's
//! [`ConnLimits`], the same counter), held for a connection's whole life,
//! an upgraded WebSocket's included.
//!
//! A connection is *anonymous* until one of its requests presents a valid
//! token. Anonymous connections are the only ones shed: when a new
//! connection finds its cap full, the oldest anonymous connection that is
//! not in the middle of a request gives up its place: one from the new
//! connection's own address if there is one, else anyone's (only its own
//! when its address's share is what is full). So a flood of clients that send
//! nothing, or send their headers slowly, churns through itself while a
//! client with a token still gets in; and a connection that presented a
//! token is never shed, only refused when every place is taken by such.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use hull_network::budget::{Admission, ConnLimits, Refusal};
use tokio::sync::Notify;

/// Every connection the API serves.
pub(crate) struct Slots {
    limits: Arc<ConnLimits>,
    per_source: usize,
    /// Anonymous connections by age (ids grow), each with whether a
    /// request is being answered on it.
    anonymous: Mutex<BTreeMap<u64, Waiting>>,
    next_id: AtomicU64,
}

struct Waiting {
    peer: IpAddr,
    busy: bool,
    conn: Weak<Conn>,
}

/// Why a connection was turned away: what was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// `api.max_connections` connections are open, none of them anonymous
    /// and idle.
    Total(usize),
    /// `api.max_connections_per_source` are open from this address, none
    /// of them anonymous and idle.
    Source(usize),
}

impl Full {
    /// The error code and message a refused client reads.
    pub fn explain(self) -> (&'static str, String) {
        match self {
            Full::Total(n) => (
                "too_many_connections",
                format!(
                    "the API serves at most {n} connections at once (api.max_connections), \
                     and each is held by a client that presented a token or is answering \
                     a request: try again when one closes, or raise api.max_connections"
                ),
            ),
            Full::Source(n) => (
                "too_many_connections_from_address",
                format!(
                    "the API serves at most {n} connections at once from one address \
                     (api.max_connections_per_source), and each from this address is held \
                     by a client that presented a token or is answering a request: try \
                     again when one closes, or raise api.max_connections_per_source"
                ),
            ),
        }
    }
}

impl Slots {
    pub fn new(max: usize, per_source: usize) -> Arc<Slots> {
        Arc::new(Slots {
            limits: ConnLimits::new(max, per_source),
            per_source,
            anonymous: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    fn waiting(&self) -> MutexGuard<'_, BTreeMap<u64, Waiting>> {
        self.anonymous.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection from `peer`, shedding the oldest idle
    /// anonymous connection when the cap it meets is full. The place is
    /// the connection's until every [`ConnectionSlot`] of it is dropped.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionSlot, Full> {
        // Both caps may be full: the total first, then this address's
        // share (ConnLimits checks them in that order).
        let mut tries = 0;
        let admission = loop {
            match self.limits.admit(peer) {
                Ok(admission) => break admission,
                Err(why) => {
                    // This address's own anonymous connections go first (a
                    // flood churns through itself), then anyone's. The
                    // shed connection's place is free at once (another
                    // listener's accept may take it first).
                    let shed = match why {
                        Refusal::Total => self.shed_one(Some(peer)) || self.shed_one(None),
                        Refusal::Source => self.shed_one(Some(peer)),
                    };
                    tries += 1;
                    if tries > 2 || !shed {
                        return Err(self.full(why));
                    }
                }
            }
        };
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            slots: Arc::downgrade(self),
            admission: Mutex::new(Some(admission)),
            authenticated: AtomicBool::new(false),
            shed: AtomicBool::new(false),
            shed_signal: Notify::new(),
        });
        self.waiting().insert(
            conn.id,
            Waiting {
                peer,
                busy: false,
                conn: Arc::downgrade(&conn),
            },
        );
        Ok(ConnectionSlot { conn })
    }

    fn full(&self, why: Refusal) -> Full {
        match why {
            Refusal::Total => Full::Total(self.limits.max()),
            Refusal::Source => Full::Source(self.per_source),
        }
    }

    /// Closes the oldest anonymous connection not answering a request
    /// (from `source` only, when given) and frees its place at once.
    fn shed_one(&self, source: Option<IpAddr>) -> bool {
        let mut waiting = self.waiting();
        let victim = waiting
            .iter()
            .find(|(_, w)| !w.busy && source.is_none_or(|s| w.peer == s))
            .map(|(id, _)| *id);
        let Some(victim) = victim.and_then(|id| waiting.remove(&id)) else {
            return false;
        };
        drop(waiting);
        // Gone already: its place is given back as it drops.
        let Some(conn) = victim.conn.upgrade() else {
            return true;
        };
        conn.shed.store(true, Ordering::Release);
        drop(conn.take_admission());
        conn.shed_signal.notify_one();
        true
    }

    /// Anonymous connections open now (tests).
    #[cfg(test)]
    fn anonymous_count(&self) -> usize {
        self.waiting().len()
    }
}

/// One connection's state, shared by its task, its requests and the
/// WebSocket it may become.
struct Conn {
    id: u64,
    slots: Weak<Slots>,
    /// Its place under the caps; taken away when the connection is shed.
    admission: Mutex<Option<Admission>>,
    authenticated: AtomicBool,
    shed: AtomicBool,
    shed_signal: Notify,
}

impl Conn {
    fn take_admission(&self) -> Option<Admission> {
        self.admission
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.upgrade() {
            slots.waiting().remove(&self.id);
        }
    }
}

/// A connection's place under the caps. Each request carries one, and a
/// WebSocket keeps one for as long as it is open, so upgraded connections
/// count as long as they live.
#[derive(Clone)]
pub(crate) struct ConnectionSlot {
    conn: Arc<Conn>,
}

impl ConnectionSlot {
    /// The slot of the connection `req` came on.
    pub fn of<B>(req: &hyper::Request<B>) -> Option<ConnectionSlot> {
        req.extensions().get::<ConnectionSlot>().cloned()
    }

    /// A request has begun on this connection: while it is answered the
    /// connection is not shed. `None`: the connection was shed already.
    pub fn begin_request(&self) -> Option<RequestGuard> {
        let slots = self.conn.slots.upgrade()?;
        {
            let mut waiting = slots.waiting();
            if self.conn.shed.load(Ordering::Acquire) {
                return None;
            }
            if let Some(w) = waiting.get_mut(&self.conn.id) {
                w.busy = true;
            }
        }
        Some(RequestGuard {
            conn: self.conn.clone(),
        })
    }

    /// A request on this connection presented a valid token: the
    /// connection is no longer anonymous, and is never shed.
    pub fn authenticated(&self) {
        if self.conn.authenticated.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(slots) = self.conn.slots.upgrade() {
            slots.waiting().remove(&self.conn.id);
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.conn.authenticated.load(Ordering::Acquire)
    }

    /// Whether a request is being answered on this anonymous connection.
    pub fn is_busy(&self) -> bool {
        self.conn
            .slots
            .upgrade()
            .is_some_and(|slots| slots.waiting().get(&self.conn.id).is_some_and(|w| w.busy))
    }

    /// Resolves once the connection is shed for a newer one.
    pub async fn shed(&self) {
        loop {
            if self.conn.shed.load(Ordering::Acquire) {
                return;
            }
            self.conn.shed_signal.notified().await;
        }
    }
}

/// A request being answered; the connection is idle again when dropped.
pub(crate) struct RequestGuard {
    conn: Arc<Conn>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(slots) = self.conn.slots.upgrade() {
            if let Some(w) = slots.waiting().get_mut(&self.conn.id) {
                w.busy = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_full_cap_sheds_the_oldest_idle_anonymous_connection() {
        let slots = Slots::new(3, 3);
        let a = slots.admit(ip("10.0.0.1")).unwrap();
        let b = slots.admit(ip("10.0.0.2")).unwrap();
        let c = slots.admit(ip("10.0.0.3")).unwrap();
        let _busy = a.begin_request().unwrap();
        // a is answering a request: b, the oldest idle one, goes.
        let d = slots.admit(ip("10.0.0.4")).unwrap();
        assert!(b.conn.shed.load(Ordering::Acquire));
        assert!(
            b.begin_request().is_none(),
            "a shed connection serves nothing more"
        );
        assert!(!a.conn.shed.load(Ordering::Acquire));
        c.authenticated();
        d.authenticated();
        // a is busy, c and d presented tokens: nothing can go.
        assert_eq!(slots.admit(ip("10.0.0.5")).err(), Some(Full::Total(3)));
        drop(b);
        assert_eq!(slots.anonymous_count(), 1);
    }

    #[test]
    fn a_full_source_sheds_its_own_and_leaves_others_alone() {
        let slots = Slots::new(10, 2);
        let other = slots.admit(ip("10.0.0.9")).unwrap();
        let a1 = slots.admit(ip("10.0.0.1")).unwrap();
        let a2 = slots.admit(ip("10.0.0.1")).unwrap();
        let a3 = slots.admit(ip("10.0.0.1")).unwrap();
        assert!(a1.conn.shed.load(Ordering::Acquire));
        assert!(!other.conn.shed.load(Ordering::Acquire));
        a2.authenticated();
        a3.authenticated();
        let (code, message) = slots.admit(ip("10.0.0.1")).err().unwrap().explain();
        assert_eq!(code, "too_many_connections_from_address");
        assert!(
            message.contains("api.max_connections_per_source"),
            "{message}"
        );
        assert!(slots.admit(ip("10.0.0.2")).is_ok());
    }

    #[test]
    fn with_both_caps_full_the_new_connection_sheds_from_its_own_address() {
        let slots = Slots::new(2, 1);
        let a = slots.admit(ip("10.0.0.1")).unwrap();
        let b = slots.admit(ip("10.0.0.2")).unwrap();
        // The total is full, and so is 10.0.0.2's share: b goes, not a.
        let c = slots.admit(ip("10.0.0.2")).unwrap();
        assert!(b.conn.shed.load(Ordering::Acquire));
        assert!(!a.conn.shed.load(Ordering::Acquire));
        c.authenticated();
        // Full again, and 10.0.0.3 has nothing of its own to shed: a goes.
        let _d = slots.admit(ip("10.0.0.3")).unwrap();
        assert!(a.conn.shed.load(Ordering::Acquire));
    }

    #[test]
    fn a_place_comes_back_when_the_last_holder_drops() {
        let slots = Slots::new(1, 1);
        let a = slots.admit(ip("10.0.0.1")).unwrap();
        a.authenticated();
        let kept = a.clone();
        drop(a);
        assert!(slots.admit(ip("10.0.0.2")).is_err());
        drop(kept);
        assert!(slots.admit(ip("10.0.0.2")).is_ok());
    }
}
