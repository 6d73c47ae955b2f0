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

impl PortPolicy {
    pub fn exposes(&self, port: u16) -> bool {
        self.expose.allows(port)
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
}
