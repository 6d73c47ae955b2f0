//! Egress for the inner: IPv4 forwarding and an nftables table of hulld's
//! own (masquerade of the inner's subnet, forwarding out but not in). The
//! table is replaced as a whole in one `nft -f` transaction, so a crashed
//! hulld's leftovers are overwritten, never duplicated.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::egress::{EgressAction, EgressPolicy};
use crate::link::VethPlan;

/// The set of the addresses allowed DNS answers gave, each for its TTL
/// (filled by [`crate::nft_set::SetWriter`]).
pub const ALLOWED_SET: &str = "egress_allowed";

/// The named counter of denied connections and packets.
pub const DENIED_COUNTER: &str = "egress_denied";

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("nft is not installed, so the inner gets no egress: install nftables (apt-get install nftables) or set network = \"none\"")]
    NftMissing,
    #[error("cannot run nft")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the rules for table {table}: {stderr}")]
    Rules { table: String, stderr: String },
    #[error("cannot enable IPv4 forwarding through {path}")]
    Forwarding {
        path: &'static str,
        source: std::io::Error,
    },
}

/// hulld's nftables table for one inner.
#[derive(Debug, Clone)]
pub struct NatTable {
    pub name: String,
}

impl NatTable {
    pub fn new(name: &str) -> Self {
        NatTable {
            name: name.to_string(),
        }
    }

    /// The ruleset: the inner's subnet is masqueraded on the way out of any
    /// interface but its own; connections into the inner's veth are only
    /// replies (the way in is the ingress); and nothing from the inner
    /// reaches the root namespace itself (its services on 0.0.0.0, through
    /// the gateway or any of the VM's addresses) but replies to
    /// connections hulld opened into the inner, and DNS to hulld's name
    /// server on the gateway ([`crate::dns`]).
    ///
    /// With an `egress` policy that restricts anything, what the inner
    /// sends out is judged too ([`Self::egress_rules`]).
    pub fn ruleset(&self, plan: &VethPlan, egress: Option<&EgressPolicy>) -> String {
        let (table, subnet, veth) = (&self.name, plan.subnet(), &plan.host_if);
        let enforced = egress.filter(|p| !p.is_unrestricted());
        // The inner's one name server is hulld's, on the gateway.
        let resolver = format!(
            "\t\tiifname \"{veth}\" ip daddr {gw} udp dport 53 accept\n\
             \t\tiifname \"{veth}\" ip daddr {gw} tcp dport 53 accept\n",
            gw = plan.host_ip
        );
        let (sets, outbound) = match enforced {
            Some(policy) => (
                format!(
                    "\tset {ALLOWED_SET} {{ type ipv4_addr; flags timeout; }}\n\
                     \tcounter {DENIED_COUNTER} {{}}\n\
                     \tchain denied {{\n\
                     \t\tcounter name {DENIED_COUNTER}\n\
                     \t\tmeta l4proto tcp reject with tcp reset\n\
                     \t\treject with icmp type admin-prohibited\n\
                     \t}}\n"
                ),
                Self::egress_rules(veth, policy),
            ),
            None => (String::new(), format!("\t\tiifname \"{veth}\" accept\n")),
        };
        format!(
            "table ip {table} {{}}\n\
             delete table ip {table}\n\
             table ip {table} {{\n\
             {sets}\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {subnet} oifname != \"{veth}\" masquerade\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             {outbound}\
             \t\toifname \"{veth}\" ct state established,related accept\n\
             \t\toifname \"{veth}\" drop\n\
             \t}}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"{veth}\" ct state established,related accept\n\
             {resolver}\
             \t\tiifname \"{veth}\" drop\n\
             \t}}\n\
             }}\n"
        )
    }

    /// The forward rules for what the inner sends out under an enforced
    /// policy, in order:
    /// 1. replies and connections already judged pass (a policy change
    ///    removes the conntrack entries of what it newly denies, so their
    ///    next packet is judged again);
    /// 2. DNS to anyone but the gateway's resolver is denied;
    /// 3. addresses decided by CIDR rules or as private, in one interval
    ///    map ([`EgressPolicy::ipv4_ranges`]);
    /// 4. addresses an allowed DNS answer gave, while their TTL lasts;
    /// 5. anything else as the policy's `*` rule or default says.
    ///
    /// A denial is a TCP reset or an ICMP error, so programs fail at once.
    pub fn egress_rules(veth: &str, policy: &EgressPolicy) -> String {
        let verdict = |a: EgressAction| match a {
            EgressAction::Allow => "accept",
            EgressAction::Deny => "jump denied",
        };
        let map = policy
            .ipv4_ranges()
            .iter()
            .map(|(first, last, action)| {
                let key = if first == last {
                    first.to_string()
                } else {
                    format!("{first}-{last}")
                };
                format!("{key} : {}", verdict(*action))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut rules = format!(
            "\t\tiifname \"{veth}\" ct state established,related accept\n\
             \t\tiifname \"{veth}\" udp dport 53 jump denied\n\
             \t\tiifname \"{veth}\" tcp dport 53 jump denied\n"
        );
        if !map.is_empty() {
            rules.push_str(&format!(
                "\t\tiifname \"{veth}\" ip daddr vmap {{ {map} }}\n"
            ));
        }
        rules.push_str(&format!(
            "\t\tiifname \"{veth}\" ip daddr @{ALLOWED_SET} accept\n\
             \t\tiifname \"{veth}\" {}\n",
            verdict(policy.decide_unnamed().action)
        ));
        rules
    }

    pub fn install(&self, plan: &VethPlan, egress: Option<&EgressPolicy>) -> Result<(), NatError> {
        run_nft(&self.name, &self.ruleset(plan, egress))
    }

    /// Removes the table; a table that is not there is not an error.
    pub fn remove(&self) -> Result<(), NatError> {
        let table = &self.name;
        run_nft(
            table,
            &format!("table ip {table} {{}}\ndelete table ip {table}\n"),
        )
    }
}

fn run_nft(table: &str, script: &str) -> Result<(), NatError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => NatError::NftMissing,
            _ => NatError::Spawn(e),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NatError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NatError::Spawn)?;
    if !out.status.success() {
        return Err(NatError::Rules {
            table: table.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Turns IPv4 forwarding on if it is off; returns whether it changed.
pub fn enable_forwarding() -> Result<bool, NatError> {
    let err = |source| NatError::Forwarding {
        path: IP_FORWARD,
        source,
    };
    let now = std::fs::read_to_string(Path::new(IP_FORWARD)).map_err(err)?;
    if now.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(IP_FORWARD, "1").map_err(err)?;
    Ok(true)
}

/// The resolv.conf for the inner, whose one name server is hulld's on
/// the gateway ([`crate::dns`]), and the upstreams that server asks: the
/// configured servers, else the host's (the host's loopback ones too: the
/// name server runs in the root namespace, where they answer).
pub fn resolv_conf(
    host: &str,
    configured: &[IpAddr],
    gateway: Ipv4Addr,
) -> (String, Vec<SocketAddr>) {
    let mut servers: Vec<IpAddr> = configured.to_vec();
    let mut search = Vec::new();
    for line in host.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") if configured.is_empty() => {
                servers.extend(words.next().and_then(|w| w.parse::<IpAddr>().ok()));
            }
            Some("search") => search.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    let mut text = String::from("# Written by hulld at every start of the inner.\n");
    if !search.is_empty() {
        text.push_str(&format!("search {}\n", search.join(" ")));
    }
    text.push_str(&format!("nameserver {gateway}\n"));
    let upstreams = servers
        .into_iter()
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    (text, upstreams)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inner_asks_the_gateway_which_asks_the_host_s_servers() {
        let host =
            "nameserver 127.0.0.53\nnameserver 10.1.2.3\nsearch corp.example\noptions edns0\n";
        let gw = Ipv4Addr::new(100, 96, 0, 1);
        let (text, upstreams) = resolv_conf(host, &[], gw);
        assert_eq!(
            text,
            "# Written by hulld at every start of the inner.\nsearch corp.example\nnameserver 100.96.0.1\n"
        );
        let want: Vec<SocketAddr> = vec![
            "127.0.0.53:53".parse().unwrap(),
            "10.1.2.3:53".parse().unwrap(),
        ];
        assert_eq!(upstreams, want);
        let (text, upstreams) = resolv_conf(host, &["9.9.9.9".parse().unwrap()], gw);
        assert_eq!(upstreams, vec!["9.9.9.9:53".parse::<SocketAddr>().unwrap()]);
        assert!(!text.contains("10.1.2.3") && text.contains("nameserver 100.96.0.1\n"));
    }

    #[test]
    fn ruleset_masquerades_the_subnet_and_replaces_the_table() {
        let plan = VethPlan::new("100.96.0.0/30", "hv1").unwrap();
        let rules = NatTable::new("hull_t").ruleset(&plan, None);
        assert!(rules.starts_with("table ip hull_t {}\ndelete table ip hull_t\n"));
        assert!(rules.contains("ip saddr 100.96.0.0/30 oifname != \"hv1\" masquerade"));
        assert!(rules.contains("oifname \"hv1\" drop"));
        assert!(rules.contains("hook input"));
        assert!(rules.contains("iifname \"hv1\" drop"));
    }

    #[test]
    fn an_enforced_policy_judges_what_the_inner_sends_and_lets_dns_reach_only_the_gateway() {
        let plan = VethPlan::new("100.96.0.0/30", "hv1").unwrap();
        let policy = EgressPolicy::parse(
            r#"{"rules":[{"domain":"github.com","action":"allow"},{"cidr":"10.1.0.0/16","action":"allow"}]}"#,
        )
        .unwrap();
        let rules = NatTable::new("hull_t").ruleset(&plan, Some(&policy));
        assert!(!rules.contains("iifname \"hv1\" accept\n"), "{rules}");
        assert!(rules.contains("set egress_allowed { type ipv4_addr; flags timeout; }"));
        assert!(rules.contains("iifname \"hv1\" udp dport 53 jump denied"));
        assert!(rules.contains("10.1.0.0-10.1.255.255 : accept"), "{rules}");
        assert!(
            rules.contains("10.0.0.0-10.0.255.255 : jump denied"),
            "{rules}"
        );
        assert!(rules.contains("iifname \"hv1\" ip daddr @egress_allowed accept"));
        // Deny-default: the last word on anything else.
        assert!(rules.contains("iifname \"hv1\" jump denied\n"), "{rules}");
        assert!(rules.contains("iifname \"hv1\" ip daddr 100.96.0.1 udp dport 53 accept"));
        // An unrestricted policy is no policy.
        let open = EgressPolicy::parse(r#"{"rules":[]}"#).unwrap();
        assert_eq!(
            NatTable::new("hull_t").ruleset(&plan, Some(&open)),
            NatTable::new("hull_t").ruleset(&plan, None)
        );
    }
}
