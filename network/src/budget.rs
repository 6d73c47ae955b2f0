//! hulld's file descriptors as a budget: what connections and listeners the
//! inner (or anyone outside) causes may take, leaving a reserve hulld keeps
//! for itself (the control socket, the log store, checkpoints, a bounce).
//! A counter, not a listing of /proc/self/fd: it is asked on every accept.
//! Also [`Throttle`], which turns a storm of one error into a line a second.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an accept loop waits after an error: most are EMFILE/ENFILE,
/// and retrying at once would spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often a repeated warning reaches the log.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// The fds the inner's requests may hold at once.
#[derive(Debug)]
pub struct FdBudget {
    total: usize,
    taken: AtomicUsize,
}

impl FdBudget {
    /// `limit` is RLIMIT_NOFILE, `open` what hulld holds already and
    /// `reserve` what it keeps for itself beyond that.
    pub fn new(limit: usize, open: usize, reserve: usize) -> Arc<Self> {
        Arc::new(FdBudget {
            total: limit.saturating_sub(open).saturating_sub(reserve),
            taken: AtomicUsize::new(0),
        })
    }

    /// A budget that never refuses (tests, and code not run by hulld).
    pub fn unlimited() -> Arc<Self> {
        Arc::new(FdBudget {
            total: usize::MAX,
            taken: AtomicUsize::new(0),
        })
    }

    /// `n` fds, given back when the lease is dropped; None when they
    /// would eat into the reserve.
    pub fn take(self: &Arc<Self>, n: usize) -> Option<FdLease> {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                taken.checked_add(n).filter(|&t| t <= self.total)
            })
            .ok()?;
        Some(FdLease {
            budget: self.clone(),
            n,
        })
    }

    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Acquire)
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// Fds taken from an [`FdBudget`], for as long as the lease lives.
#[derive(Debug)]
pub struct FdLease {
    budget: Arc<FdBudget>,
    n: usize,
}

impl Drop for FdLease {
    fn drop(&mut self) {
        self.budget.taken.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// Connections from outside (forwarded ports and the HTTP ingress
/// together) at once, in all and from one source address, so that one
/// client cannot take every connection there is.
#[derive(Debug)]
pub struct ConnLimits {
    max: usize,
    per_source: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `network.max_connections` are open.
    Total,
    /// `network.max_connections_per_source` are open from this address.
    Source,
}

impl ConnLimits {
    pub fn new(max: usize, per_source: usize) -> Arc<Self> {
        Arc::new(ConnLimits {
            max,
            per_source,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A place for a connection from `peer`, held until dropped.
    /// Connections open at once, at most.
    pub fn max(&self) -> usize {
        self.max
    }

    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admission, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.max {
            return Err(Refusal::Total);
        }
        let from = open.1.entry(peer).or_insert(0);
        if *from >= self.per_source {
            return Err(Refusal::Source);
        }
        *from += 1;
        open.0 += 1;
        Ok(Admission {
            limits: self.clone(),
            peer,
        })
    }
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max: usize::MAX,
            per_source: usize::MAX,
            open: Mutex::new((0, HashMap::new())),
        }
    }
}

/// A connection's place in [`ConnLimits`].
#[derive(Debug)]
pub struct Admission {
    limits: Arc<ConnLimits>,
    peer: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.peer);
            }
        }
    }
}

/// Whether an accept error means hulld (or the system) is out of fds.
pub fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A warning that repeats is logged at most once per interval, with the
/// count of those it stood for: an accept loop under a flood must not
/// write its log by the gigabyte.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Throttle {
            every,
            state: Mutex::new(ThrottleState::default()),
        }
    }

    /// Some(n) when this occurrence should be logged, n being how many
    /// before it were not; None to stay quiet.
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.last {
            Some(last) if now.duration_since(last) < self.every => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(WARN_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_leases_come_back_and_never_reach_the_reserve() {
        let budget = FdBudget::new(100, 10, 80);
        assert_eq!(budget.total(), 10);
        let a = budget.take(6).unwrap();
        assert!(budget.take(5).is_none());
        let b = budget.take(4).unwrap();
        assert!(budget.take(1).is_none());
        drop(a);
        assert_eq!(budget.taken(), 4);
        assert!(budget.take(6).is_some());
        drop(b);
        assert_eq!(budget.taken(), 0);
        assert_eq!(FdBudget::new(10, 5, 80).total(), 0);
    }

    #[test]
    fn connections_are_limited_in_all_and_per_source() {
        let limits = ConnLimits::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "10.0.0.1".parse().unwrap());
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refusal::Source);
        let _b1 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Refusal::Total);
        drop(a1);
        assert!(limits.admit(a).is_ok());
    }

    #[test]
    fn throttle_logs_once_per_interval_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(t.hit_at(start), Some(0));
        for i in 1..1000 {
            assert_eq!(t.hit_at(start + Duration::from_millis(i)), None);
        }
        assert_eq!(t.hit_at(start + Duration::from_secs(11)), Some(999));
        assert_eq!(t.hit_at(start + Duration::from_secs(12)), None);
    }
}
