//! The one check for "this connection comes from the inner's own
//! network", shared by the forwarder and the HTTP ingress.

use std::net::IpAddr;

/// An IPv4 peer on a dual-stack listener shows up as ::ffff:a.b.c.d.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn in_network(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (canonical_ip(ip), canonical_ip(net)) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let prefix = u32::from(prefix.min(32));
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let prefix = u32::from(prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// Whether a connection from `peer` is refused: it comes from one of the
/// `refuse_from` networks (the inner's subnet), in any address family form.
pub fn refused(peer: IpAddr, refuse_from: &[(IpAddr, u8)]) -> bool {
    refuse_from
        .iter()
        .any(|&(net, prefix)| in_network(peer, net, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_match_by_prefix_in_either_family() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_network(ip("10.88.0.5"), ip("10.88.0.0"), 24));
        assert!(!in_network(ip("10.88.1.5"), ip("10.88.0.0"), 24));
        assert!(in_network(ip("::ffff:10.88.0.5"), ip("10.88.0.0"), 24));
        assert!(in_network(ip("1.2.3.4"), ip("0.0.0.0"), 0));
        assert!(in_network(ip("1.2.3.4"), ip("1.2.3.4"), 32));
        assert!(!in_network(ip("1.2.3.5"), ip("1.2.3.4"), 32));
        assert!(in_network(ip("fd00::7"), ip("fd00::"), 64));
        assert!(!in_network(ip("fd01::7"), ip("fd00::"), 64));
        assert!(!in_network(ip("fd00::7"), ip("10.0.0.0"), 8));
    }

    #[test]
    fn a_mapped_peer_is_refused_like_a_plain_one() {
        let subnet = [("100.96.0.0".parse().unwrap(), 30)];
        assert!(refused("100.96.0.2".parse().unwrap(), &subnet));
        assert!(refused("::ffff:100.96.0.2".parse().unwrap(), &subnet));
        assert!(!refused("100.96.0.4".parse().unwrap(), &subnet));
        let mapped_net = [("::ffff:100.96.0.0".parse().unwrap(), 30)];
        assert!(refused("100.96.0.1".parse().unwrap(), &mapped_net));
    }
}
