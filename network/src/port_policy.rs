//! Which inner ports the outside may reach, and on what terms: one policy
//! that the raw forwarder, the HTTP ingress and `hull ports` all read, so
//! no path is more open than another.

use crate::forward::PortFilter;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPolicy {
    /// The `expose` list: ports outside it are reached by no path at all.
    pub expose: PortFilter,
    /// Ports that need the bearer token; reached through HTTP ingress only,
    /// since a raw TCP forward has no place to check a token.
    pub private_ports: Vec<u16>,
    /// Every port needs the token.
    pub private_all: bool,
}

/// Ports below this are the well-known services' (ssh, a web server) on
/// the outer address, which in a VM image is the VM's own.
pub const FIRST_UNPRIVILEGED_PORT: u16 = 1024;

impl PortPolicy {
    pub fn exposes(&self, port: u16) -> bool {
        self.expose.allows(port)
    }

    /// Whether the raw forwarder may listen on `port` of the outer address
    /// for the inner: a port below 1024 only when `expose` names it (a list
    /// or range given, not the empty "every port"); HTTP ingress reaches
    /// exposed ports whatever their number, as it listens on none of them.
    pub fn forwards(&self, port: u16) -> bool {
        self.exposes(port) && (port >= FIRST_UNPRIVILEGED_PORT || !self.expose.ranges.is_empty())
    }

    pub fn is_private(&self, port: u16) -> bool {
        self.private_all || self.private_ports.contains(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_exposed_are_independent() {
        let policy = PortPolicy {
            expose: PortFilter::parse("8000-8999").unwrap(),
            private_ports: vec![8400, 9000],
            private_all: false,
        };
        assert!(policy.exposes(8400) && policy.is_private(8400));
        assert!(policy.exposes(8401) && !policy.is_private(8401));
        assert!(!policy.exposes(9000));
        let all = PortPolicy {
            private_all: true,
            ..PortPolicy::default()
        };
        assert!(all.exposes(1) && all.is_private(1));
    }

    #[test]
    fn low_ports_are_forwarded_only_when_expose_names_them() {
        let every = PortPolicy::default();
        assert!(every.exposes(81) && !every.forwards(81) && !every.forwards(1023));
        assert!(every.forwards(1024) && every.forwards(8080));
        let named = PortPolicy {
            expose: PortFilter::parse("81,443-444,8000-8999").unwrap(),
            ..PortPolicy::default()
        };
        assert!(named.forwards(81) && named.forwards(443) && named.forwards(8000));
        assert!(!named.forwards(80) && !named.forwards(22) && !named.forwards(9000));
    }
}
