//! The inner's link to the world: loopback, and for egress a veth pair
//! whose host end sits in the root namespace and whose other end is the
//! inner's `eth0`, with a default route through the host end. All of it over
//! rtnetlink, once per hulld: the namespace outlives bounces and restores.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::InnerNetns;

/// The name of the inner's end of the veth pair.
pub const INNER_IF: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("subnet {0:?} is not an IPv4 network with a prefix of /8 to /30, like 100.96.0.0/30")]
    Subnet(String),
    #[error("interface name {0:?} is not 1 to 15 letters, digits, '-' or '_'")]
    Name(String),
    #[error("cannot open an rtnetlink socket {side}")]
    Connect {
        side: &'static str,
        source: std::io::Error,
    },
    #[error("{step} failed on {interface}")]
    Netlink {
        step: &'static str,
        interface: String,
        source: rtnetlink::Error,
    },
    #[error("interface {0} is missing right after it was created")]
    Missing(String),
    #[error("cannot set {path} on the host end of the veth")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the inner's network namespace is gone")]
    Netns,
}

/// The addresses of one inner's veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPlan {
    /// Name of the host end, in the root namespace.
    pub host_if: String,
    pub network: Ipv4Addr,
    pub prefix: u8,
    /// The host end: the inner's gateway.
    pub host_ip: Ipv4Addr,
    /// The inner's `eth0`.
    pub inner_ip: Ipv4Addr,
}

impl VethPlan {
    /// Takes the first two host addresses of `subnet` ("100.96.0.0/30").
    pub fn new(subnet: &str, host_if: &str) -> Result<Self, LinkError> {
        let bad = || LinkError::Subnet(subnet.to_string());
        let (addr, prefix) = subnet.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let valid_name = !host_if.is_empty()
            && host_if.len() <= 15
            && host_if
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            return Err(LinkError::Name(host_if.to_string()));
        }
        let mask = u32::MAX << (32 - prefix);
        let network = u32::from(addr) & mask;
        Ok(VethPlan {
            host_if: host_if.to_string(),
            network: Ipv4Addr::from(network),
            prefix,
            host_ip: Ipv4Addr::from(network + 1),
            inner_ip: Ipv4Addr::from(network + 2),
        })
    }

    pub fn subnet(&self) -> String {
        format!("{}/{}", self.network, self.prefix)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let IpAddr::V4(ip) = ip else { return false };
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.network)
    }
}

fn netlink(step: &'static str, interface: &str) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let interface = interface.to_string();
    move |source| LinkError::Netlink {
        step,
        interface,
        source,
    }
}

/// An rtnetlink handle in hulld's own (root) namespace.
fn root_handle() -> Result<Handle, LinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| LinkError::Connect {
        side: "in the root namespace",
        source,
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// An rtnetlink handle whose socket lives in the inner's namespace.
async fn inner_handle(netns: &InnerNetns) -> Result<Handle, LinkError> {
    let (conn, handle, _) = netns
        .run(rtnetlink::new_connection)
        .await
        .map_err(|_| LinkError::Netns)?
        .map_err(|source| LinkError::Connect {
            side: "in the inner's namespace",
            source,
        })?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, LinkError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such interface.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(netlink("looking up the interface", name)(e)),
    }
}

/// Brings the inner's loopback up (a new namespace has it down).
pub async fn loopback_up(netns: &InnerNetns) -> Result<(), LinkError> {
    let inner = inner_handle(netns).await?;
    let lo = index_of(&inner, "lo")
        .await?
        .ok_or_else(|| LinkError::Missing("lo".into()))?;
    inner
        .link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(netlink("setting the link up", "lo"))
}

/// Creates the veth pair (replacing a stale host end a crashed hulld left),
/// addresses both ends and routes the inner's default through the host end.
pub async fn create_veth(netns: &InnerNetns, plan: &VethPlan) -> Result<(), LinkError> {
    let root = root_handle()?;
    if let Some(stale) = index_of(&root, &plan.host_if).await? {
        tracing::info!(interface = %plan.host_if, "removing a veth left by an earlier hulld");
        root.link()
            .del(stale)
            .execute()
            .await
            .map_err(netlink("deleting the stale interface", &plan.host_if))?;
    }
    // The peer is created directly inside the inner's namespace, so no
    // interface named eth0 ever appears in the root namespace.
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(INNER_IF.to_string())
        .setns_by_fd(netns.fd())
        .build();
    let veth = LinkVeth::new(&plan.host_if, INNER_IF)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    root.link()
        .add(veth)
        .execute()
        .await
        .map_err(netlink("creating the veth pair", &plan.host_if))?;
    let host = index_of(&root, &plan.host_if)
        .await?
        .ok_or_else(|| LinkError::Missing(plan.host_if.clone()))?;
    root.address()
        .add(host, IpAddr::V4(plan.host_ip), plan.prefix)
        .execute()
        .await
        .map_err(netlink("adding the gateway address", &plan.host_if))?;
    harden_host_end(&plan.host_if)?;
    root.link()
        .set(LinkUnspec::new_with_index(host).up().build())
        .execute()
        .await
        .map_err(netlink("setting the link up", &plan.host_if))?;

    let inner = inner_handle(netns).await?;
    let eth = index_of(&inner, INNER_IF)
        .await?
        .ok_or_else(|| LinkError::Missing(INNER_IF.into()))?;
    inner
        .address()
        .add(eth, IpAddr::V4(plan.inner_ip), plan.prefix)
        .execute()
        .await
        .map_err(netlink("adding the inner's address", INNER_IF))?;
    inner
        .link()
        .set(LinkUnspec::new_with_index(eth).up().build())
        .execute()
        .await
        .map_err(netlink("setting the link up", INNER_IF))?;
    inner
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(plan.host_ip)
                .output_interface(eth)
                .build(),
        )
        .execute()
        .await
        .map_err(netlink("adding the default route", INNER_IF))?;
    Ok(())
}

/// What the inner sends can never reconfigure the root namespace through
/// the host end: no IPv6 on it at all (so no router advertisement is
/// taken and no link-local address leads to root-namespace services) and
/// no ICMP redirects. Set before the link comes up, so not even a
/// link-local address ever exists.
fn harden_host_end(host_if: &str) -> Result<(), LinkError> {
    for (family, key, value) in [
        ("ipv6", "accept_ra", "0"),
        ("ipv6", "accept_redirects", "0"),
        ("ipv6", "disable_ipv6", "1"),
        ("ipv4", "accept_redirects", "0"),
        ("ipv4", "send_redirects", "0"),
    ] {
        let path = format!("/proc/sys/net/{family}/conf/{host_if}/{key}");
        match std::fs::write(&path, value) {
            Ok(()) => {}
            // A kernel booted without IPv6 has no such knobs, and nothing
            // to take an RA with.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && family == "ipv6" => {}
            Err(source) => return Err(LinkError::Sysctl { path, source }),
        }
    }
    Ok(())
}

/// Removes the host end (the kernel removes the pair); nothing to do if it
/// is already gone, as it is once the namespace dies.
pub async fn remove_veth(host_if: &str) -> Result<(), LinkError> {
    let root = root_handle()?;
    if let Some(index) = index_of(&root, host_if).await? {
        match root.link().del(index).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
            Err(e) => return Err(netlink("deleting the interface", host_if)(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_takes_the_first_two_addresses() {
        let plan = VethPlan::new("100.96.3.5/30", "hv0").unwrap();
        assert_eq!(plan.network, Ipv4Addr::new(100, 96, 3, 4));
        assert_eq!(plan.host_ip, Ipv4Addr::new(100, 96, 3, 5));
        assert_eq!(plan.inner_ip, Ipv4Addr::new(100, 96, 3, 6));
        assert_eq!(plan.subnet(), "100.96.3.4/30");
        assert!(plan.contains("100.96.3.7".parse().unwrap()));
        assert!(!plan.contains("100.96.3.8".parse().unwrap()));
        assert!(!plan.contains("::1".parse().unwrap()));
    }

    #[test]
    fn bad_plans_are_refused() {
        for subnet in [
            "100.96.0.0",
            "100.96.0.0/31",
            "fd00::/64",
            "x/24",
            "10.0.0.0/7",
        ] {
            assert!(
                matches!(VethPlan::new(subnet, "hv0"), Err(LinkError::Subnet(_))),
                "{subnet}"
            );
        }
        assert!(matches!(
            VethPlan::new("100.96.0.0/30", "a-name-longer-than-15"),
            Err(LinkError::Name(_))
        ));
    }
}
