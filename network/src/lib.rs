//! The inner's network, owned by hulld in the root namespace.
//!
//! hulld creates the inner's network namespace once and keeps it across
//! bounces and restores (as a pod sandbox does), so the veth, the NAT rules,
//! the port table and every outer listener outlive any one inner. Sockets
//! into the inner are created by a thread that lives in that namespace.
//!
//! * [`netns`]: the persistent namespace and the thread that makes sockets in it.
//! * [`link`]: the veth pair, addresses and routes (rtnetlink).
//! * [`nat`]: masquerade and forwarding rules (nftables).
//! * [`ports`]: which TCP ports the inner listens on (sock_diag), and by whom.
//! * [`budget`]: the fds the inner's requests may take, and warnings throttled.
//! * [`forward`]: one outer listener per inner port, relaying connections.
//! * [`sockmap`]: the relay in the kernel, a BPF sockmap redirect.
//! * [`peer`]: whether a connection comes from the inner's own network.
//! * [`port_policy`]: which inner ports the outside reaches, and on what terms.
//! * [`http`]: the HTTP ingress (hyper) with upgrades, waiting and private URLs.
//! * [`egress`]: the egress policy, which names and addresses the inner
//!   may reach, decided in one place.
//! * [`dns`]: the inner's name server, which refuses what the policy denies.
//! * [`nft_set`]: nftables set elements over netlink, for the addresses it allowed.
//! * [`enforcer`]: the one owner of the firewall table under a policy, and
//!   of the addresses allowed answers let through.
//! * [`conntrack`]: ends the connections a policy change newly denies.

pub mod budget;
pub mod conntrack;
pub mod dns;
pub mod egress;
pub mod enforcer;
pub mod forward;
pub mod http;
pub mod link;
pub mod nat;
pub mod netns;
mod nfnetlink;
pub mod nft_set;
pub mod peer;
pub mod port_policy;
pub mod ports;
pub mod portwatch;
pub mod sockmap;

pub use budget::{FdBudget, FdLease, Throttle};
pub use egress::EgressPolicy;
pub use netns::{Dialer, InnerNetns};
pub use ports::{ListeningPort, PortTable};
