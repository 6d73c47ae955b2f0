//! The egress enforcer: the one owner of hulld's nftables table and of
//! the addresses allowed answers let through.
//!
//! It is an actor on a thread of its own (every step is a blocking
//! netlink or `nft` exchange): messages in, a watch channel of counts out.
//! The name server hands it each allowed answer ([`Admit`]) and waits for
//! the addresses to be in the set. A policy change reinstalls the table
//! for the new policy in one `nft` transaction (which empties the set),
//! puts back the addresses whose names the new policy still allows, for
//! what is left of their TTL, and ends the connections to the addresses it
//! newly denies ([`crate::conntrack`]), so their next packet is judged
//! again and refused.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::dns::{Admit, Admitted};
use crate::egress::{EgressAction, EgressPolicy};
use crate::link::VethPlan;
use crate::nat::{NatError, NatTable, ALLOWED_SET};
use crate::nft_set::{NftSetError, SetWriter, TableFamily};

/// What the enforcer has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnforcerState {
    /// Addresses in the allowed set now (as far as their TTLs go).
    pub admitted: usize,
    /// Policy changes applied.
    pub policies: u64,
    /// Connections ended because a change denied their destination.
    pub connections_cut: u64,
    /// The last failure, if the last step failed.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error("cannot install the firewall table for the egress policy")]
    Table(#[source] NatError),
    #[error("cannot write the allowed addresses")]
    Set(#[source] NftSetError),
    #[error("cannot start the egress enforcer's thread")]
    Thread(#[source] io::Error),
    #[error("the egress enforcer has stopped")]
    Stopped,
}

enum Msg {
    Admit(Admitted, oneshot::Sender<io::Result<()>>),
    Policy(
        Arc<EgressPolicy>,
        oneshot::Sender<Result<(), EnforcerError>>,
    ),
}

/// The handle: an [`Admit`] for the name server, and a way to apply a new
/// policy. Cloning it is cheap.
#[derive(Clone)]
pub struct Enforcer {
    tx: mpsc::UnboundedSender<Msg>,
    state: watch::Receiver<EnforcerState>,
    policy: watch::Receiver<Arc<EgressPolicy>>,
}

/// What ends the connections from the inner to addresses a policy change
/// denies.
pub trait CutConnections: Send + 'static {
    /// Ends every connection from `from` whose destination `denied` says
    /// is denied; returns how many.
    fn cut(&mut self, from: Ipv4Addr, denied: &dyn Fn(Ipv4Addr) -> bool) -> io::Result<u64>;
}

impl Enforcer {
    /// Installs `table` for `policy` and starts the actor. The table is
    /// the enforcer's from here on: nobody else installs it.
    pub fn start(
        table: NatTable,
        plan: VethPlan,
        policy: Arc<EgressPolicy>,
        cutter: impl CutConnections,
    ) -> Result<Enforcer, EnforcerError> {
        table
            .install(&plan, Some(&policy))
            .map_err(EnforcerError::Table)?;
        let writer = SetWriter::open().map_err(EnforcerError::Set)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(EnforcerState::default());
        let (policy_tx, policy_rx) = watch::channel(policy);
        let actor = Actor {
            table,
            plan,
            policy: policy_tx,
            writer,
            known: HashMap::new(),
            cutter: Box::new(cutter),
            state: state_tx,
        };
        std::thread::Builder::new()
            .name("hull-egress".into())
            .spawn(move || actor.run(rx))
            .map_err(EnforcerError::Thread)?;
        Ok(Enforcer {
            tx,
            state,
            policy: policy_rx,
        })
    }

    /// The policy the firewall enforces, published once it does: what the
    /// name server judges names by, so it never hands out an address the
    /// firewall is not yet judging by the same policy.
    pub fn policy(&self) -> watch::Receiver<Arc<EgressPolicy>> {
        self.policy.clone()
    }

    /// Applies a new policy; returns once the firewall enforces it.
    pub async fn set_policy(&self, policy: Arc<EgressPolicy>) -> Result<(), EnforcerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Policy(policy, reply))
            .map_err(|_| EnforcerError::Stopped)?;
        rx.await.map_err(|_| EnforcerError::Stopped)?
    }

    pub fn state(&self) -> watch::Receiver<EnforcerState> {
        self.state.clone()
    }
}

impl Admit for Enforcer {
    async fn admit(&self, admitted: Admitted) -> io::Result<()> {
        let gone = || io::Error::other("the egress enforcer has stopped");
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Admit(admitted, reply))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// An address in the allowed set: the names that led to it and when its
/// longest TTL ends.
struct Known {
    names: BTreeSet<String>,
    until: Instant,
}

struct Actor {
    table: NatTable,
    plan: VethPlan,
    policy: watch::Sender<Arc<EgressPolicy>>,
    writer: SetWriter,
    known: HashMap<Ipv4Addr, Known>,
    cutter: Box<dyn CutConnections>,
    state: watch::Sender<EnforcerState>,
}

impl Actor {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                Msg::Admit(admitted, reply) => {
                    let result = self.admit(admitted);
                    self.publish(result.as_ref().err().map(ToString::to_string));
                    let _ = reply.send(result);
                }
                Msg::Policy(policy, reply) => {
                    let result = self.apply(policy);
                    self.publish(result.as_ref().err().map(ToString::to_string));
                    let _ = reply.send(result);
                }
            }
        }
    }

    fn publish(&mut self, error: Option<String>) {
        let now = Instant::now();
        self.known.retain(|_, k| k.until > now);
        let admitted = self.known.len();
        self.state.send_modify(|s| {
            s.admitted = admitted;
            s.error = error;
        });
    }

    fn admit(&mut self, admitted: Admitted) -> io::Result<()> {
        // The inner's network is IPv4; its AAAA answers lead nowhere.
        let v4: Vec<(IpAddr, Duration)> = admitted
            .addrs
            .iter()
            .filter(|(ip, _)| ip.is_ipv4())
            .cloned()
            .collect();
        self.writer
            .add(TableFamily::Ip, &self.table.name, ALLOWED_SET, &v4)
            .map_err(io::Error::other)?;
        let now = Instant::now();
        for (ip, ttl) in v4 {
            let IpAddr::V4(ip) = ip else { continue };
            let known = self.known.entry(ip).or_insert_with(|| Known {
                names: BTreeSet::new(),
                until: now,
            });
            known.names.insert(admitted.name.clone());
            known.until = known.until.max(now + ttl);
        }
        Ok(())
    }

    /// Whether `policy` lets the inner reach `ip`, as the firewall judges
    /// it: an address decision (CIDR, private) first, then the names that
    /// led to it, then the policy's word on addresses no name led to.
    fn allows(policy: &EgressPolicy, ip: Ipv4Addr, names: Option<&BTreeSet<String>>) -> bool {
        if policy.is_unrestricted() {
            return true;
        }
        if let Some(v) = policy.decide_addr(IpAddr::V4(ip)) {
            return v.action == EgressAction::Allow;
        }
        let by_name = names.is_some_and(|names| {
            names
                .iter()
                .any(|n| policy.decide_name(n).action == EgressAction::Allow)
        });
        by_name || policy.decide_unnamed().action == EgressAction::Allow
    }

    fn apply(&mut self, policy: Arc<EgressPolicy>) -> Result<(), EnforcerError> {
        self.table
            .install(&self.plan, Some(&policy))
            .map_err(EnforcerError::Table)?;
        let now = Instant::now();
        self.known.retain(|_, k| k.until > now);
        self.known
            .retain(|ip, k| Self::allows(&policy, *ip, Some(&k.names)));
        let keep: Vec<(IpAddr, Duration)> = self
            .known
            .iter()
            .map(|(ip, k)| (IpAddr::V4(*ip), k.until - now))
            .collect();
        self.policy.send_replace(policy);
        self.writer
            .add(TableFamily::Ip, &self.table.name, ALLOWED_SET, &keep)
            .map_err(EnforcerError::Set)?;
        // Every open connection of the inner is judged again: one the new
        // policy denies is ended, one it still allows is kept.
        let policy = self.policy.borrow().clone();
        let known = &self.known;
        let denied = |ip: Ipv4Addr| !Self::allows(&policy, ip, known.get(&ip).map(|k| &k.names));
        let cut = match self.cutter.cut(self.plan.inner_ip, &denied) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot end the connections to newly denied addresses");
                0
            }
        };
        if cut > 0 {
            tracing::info!(
                connections = cut,
                "the new egress policy ended connections to addresses it denies"
            );
        }
        self.state.send_modify(|s| {
            s.policies += 1;
            s.connections_cut += cut;
        });
        Ok(())
    }
}
