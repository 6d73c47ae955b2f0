//! The sandbox's egress policy: which domains the inner may reach, as the
//! Sprites API writes it (`{"rules": [{"domain", "action"}, {"include"}]}`),
//! with hull's additions: `{"cidr", "action"}` rules and a top-level
//! `"default"`.
//!
//! [`EgressPolicy::parse`] is the one place a policy is read and checked:
//! hulld parses what the API or the CLI sends before it stores it, and
//! parses what it stored when it loads it, so the API, the store and the
//! enforcer all hold the same typed rules. The policy is stored and
//! answered as the text that was sent (the SDKs compare what they read
//! back with what they wrote).
//!
//! [`EgressPolicy::decide_name`] and [`EgressPolicy::decide_addr`] are
//! the one place a name or an address is judged, as Sprites does: the
//! most specific rule wins (`a.x` over `*.x`, which also speaks of `x`
//! itself, over `*`); at equal specificity deny wins; an empty rule list
//! means unrestricted, and otherwise what no rule allows is denied.
//! Presets (`{"include": "defaults"}`) are lists shipped in
//! network/presets/, for users to read.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::Deserialize;

/// The most rules a policy holds: far more than any allow list, and few
/// enough that checking one against a name stays cheap.
pub const MAX_RULES: usize = 10_000;

/// The longest domain name DNS carries (RFC 1035), in its text form.
const MAX_DOMAIN: usize = 253;

/// The longest label of a domain name.
const MAX_LABEL: usize = 63;

/// The longest preset name an `include` may give.
const MAX_INCLUDE: usize = 64;

/// A checked policy: its rules in the order they were given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub rules: Vec<EgressRule>,
    /// What no rule decides; unset, Sprites' reading: allow when there
    /// are no rules, deny otherwise.
    pub default: Option<EgressAction>,
}

/// One rule: a decision for the domains a pattern matches, or a preset's
/// rules taken in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressRule {
    Domain {
        pattern: DomainPattern,
        action: EgressAction,
    },
    /// A decision for the addresses of a network, whatever name led there.
    Cidr { net: IpNet, action: EgressAction },
    /// The rules of the preset of this name (`defaults`, say): a name
    /// [`PRESETS`] holds.
    Include(String),
}

/// The presets an `include` may name, with their rules as shipped.
pub const PRESETS: &[(&str, &str)] = &[("defaults", include_str!("../presets/defaults.json"))];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressAction {
    Allow,
    Deny,
}

/// A decision and what made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: EgressAction,
    pub because: Because,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Because {
    /// The policy has no rules and no default: nothing is restricted.
    NoRules,
    /// This rule (its pattern or network), from this preset if any.
    Rule {
        rule: String,
        preset: Option<&'static str>,
    },
    /// No rule spoke of it.
    Default,
    /// A private, CGNAT, link-local or loopback address no CIDR rule names.
    Private,
}

impl fmt::Display for Because {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Because::NoRules => f.write_str("no rules"),
            Because::Rule { rule, preset: None } => write!(f, "rule {rule}"),
            Because::Rule {
                rule,
                preset: Some(p),
            } => write!(f, "rule {rule} ({p})"),
            Because::Default => f.write_str("the default"),
            Because::Private => f.write_str("a private address"),
        }
    }
}

/// The domains a rule speaks of, lower-cased: `*` (every name),
/// `*.example.com` (the names under example.com and, as Sprites reads
/// it, example.com itself) or `example.com` (that name alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    Any,
    Under(String),
    Exact(String),
}

impl DomainPattern {
    /// Whether `name` (a name looked up, with or without its final dot,
    /// in any case) is one this pattern speaks of.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        match self {
            DomainPattern::Any => true,
            DomainPattern::Exact(domain) => name == *domain,
            DomainPattern::Under(suffix) => {
                name == *suffix
                    || name
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
            }
        }
    }

    /// How closely the pattern names what it matches: an exact name over
    /// any suffix, a longer suffix over a shorter, anything over `*`.
    fn specificity(&self) -> (u8, usize) {
        match self {
            DomainPattern::Any => (0, 0),
            DomainPattern::Under(suffix) => (1, suffix.len()),
            DomainPattern::Exact(name) => (2, name.len()),
        }
    }

    fn parse(text: &str) -> Result<DomainPattern, DomainError> {
        if text == "*" {
            return Ok(DomainPattern::Any);
        }
        let (under, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return Err(DomainError::Empty);
        }
        if name.len() > MAX_DOMAIN {
            return Err(DomainError::TooLong { max: MAX_DOMAIN });
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(DomainError::EmptyLabel);
            }
            if label.len() > MAX_LABEL {
                return Err(DomainError::LabelTooLong { max: MAX_LABEL });
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
            {
                return Err(if c.is_ascii() {
                    DomainError::Character(c)
                } else {
                    DomainError::NotAscii(c)
                });
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(DomainError::Hyphen);
            }
        }
        let name = name.to_ascii_lowercase();
        Ok(if under {
            DomainPattern::Under(name)
        } else {
            DomainPattern::Exact(name)
        })
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Any => f.write_str("*"),
            DomainPattern::Under(suffix) => write!(f, "*.{suffix}"),
            DomainPattern::Exact(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EgressPolicyError {
    #[error(
        "not JSON of the form {{\"rules\": [...], \"default\": \"allow\" or \"deny\" (optional)}}"
    )]
    Json(#[source] serde_json::Error),
    #[error("{count} rules, more than {max}")]
    TooManyRules { count: usize, max: usize },
    #[error("rule {index}")]
    Rule {
        index: usize,
        #[source]
        source: RuleError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("it names neither a domain, a cidr nor an include")]
    NoTarget,
    #[error("it names more than one of a domain, a cidr and an include; give each its own rule")]
    SeveralTargets,
    #[error("its {target:?} has no action: say \"allow\" or \"deny\"")]
    NoAction { target: String },
    #[error("its cidr {cidr:?} is not a CIDR network (203.0.113.0/24, 2001:db8::/32)")]
    Cidr {
        cidr: String,
        #[source]
        source: ipnet::AddrParseError,
    },
    #[error(
        "it includes {include:?}, but there is no preset named {include:?} (there is: {known})"
    )]
    UnknownPreset { include: String, known: String },
    #[error("its include {include:?} takes no action: a preset says its own")]
    ActionOnInclude { include: String },
    #[error(
        "its domain {domain:?} is not a domain pattern (`*`, `*.example.com` or `example.com`)"
    )]
    Domain {
        domain: String,
        #[source]
        source: DomainError,
    },
    #[error("its include {include:?} is not a preset name (1 to {max} letters, digits, '-', '_' or '.')")]
    Include { include: String, max: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("it is empty")]
    Empty,
    #[error("it is longer than {max} characters")]
    TooLong { max: usize },
    #[error("it has an empty label")]
    EmptyLabel,
    #[error("a label is longer than {max} characters")]
    LabelTooLong { max: usize },
    #[error("it holds {0:?}, which no domain name holds (a `*` only as its first label)")]
    Character(char),
    #[error("it holds {0:?}: a name beyond ASCII is written in its punycode (xn--) form")]
    NotAscii(char),
    #[error("a label starts or ends with '-'")]
    Hyphen,
}

/// The policy as the JSON says it, before its rules are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    rules: Vec<WireRule>,
    #[serde(default)]
    default: Option<EgressAction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRule {
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    cidr: Option<String>,
    #[serde(default)]
    action: Option<EgressAction>,
    #[serde(default)]
    include: Option<String>,
}

/// A preset file: its rules, and a line for the people who read it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetFile {
    #[serde(rename = "about")]
    _about: String,
    rules: Vec<WireRule>,
}

/// The shipped presets, parsed once: every name judged under a policy
/// that includes one walks its rules, and the name server judges a name
/// per query. A preset that does not parse is left out (and a unit test
/// fails on it).
static PARSED_PRESETS: std::sync::LazyLock<Vec<(&'static str, Vec<EgressRule>)>> =
    std::sync::LazyLock::new(|| {
        PRESETS
            .iter()
            .filter_map(|(name, text)| {
                let file: PresetFile = serde_json::from_str(text).ok()?;
                let rules = file
                    .rules
                    .into_iter()
                    .map(WireRule::check)
                    .collect::<Result<Vec<_>, _>>()
                    .ok()?;
                Some((*name, rules))
            })
            .collect()
    });

/// The rules of a preset; `None` for a name [`PRESETS`] lacks.
fn preset_rules(name: &str) -> Option<(&'static str, &'static [EgressRule])> {
    PARSED_PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, rules)| (*n, rules.as_slice()))
}

/// Keeps in `best` the more specific of it and a matching rule of rank
/// `rank`: a higher rank wins, and at equal rank deny wins over allow.
fn keep_best<R: PartialOrd>(
    best: &mut Option<(R, Verdict)>,
    rank: R,
    action: EgressAction,
    because: impl FnOnce() -> Because,
) {
    let wins = match best {
        None => true,
        Some((r, v)) => {
            rank > *r
                || (rank == *r && v.action == EgressAction::Allow && action == EgressAction::Deny)
        }
    };
    if wins {
        *best = Some((
            rank,
            Verdict {
                action,
                because: because(),
            },
        ));
    }
}

/// Private, CGNAT, link-local, loopback and unique-local networks: an
/// enforced policy denies them unless a CIDR rule names them, so an
/// allowed name that resolves to one reaches nothing inside the VM's
/// networks.
const PRIVATE: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "::/128",
    "fc00::/7",
    "fe80::/10",
];

fn is_private(addr: IpAddr) -> bool {
    // An IPv4 address written as IPv6 is judged as the IPv4 one.
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    PRIVATE.iter().any(|net| {
        net.parse::<IpNet>()
            .is_ok_and(|net: IpNet| net.contains(&addr))
    })
}

impl EgressPolicy {
    /// Reads and checks a policy's JSON text.
    pub fn parse(text: &str) -> Result<EgressPolicy, EgressPolicyError> {
        let wire: Wire = serde_json::from_str(text).map_err(EgressPolicyError::Json)?;
        if wire.rules.len() > MAX_RULES {
            return Err(EgressPolicyError::TooManyRules {
                count: wire.rules.len(),
                max: MAX_RULES,
            });
        }
        let rules = wire
            .rules
            .into_iter()
            .enumerate()
            .map(|(index, rule)| {
                rule.check()
                    .map_err(|source| EgressPolicyError::Rule { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (index, rule) in rules.iter().enumerate() {
            if let EgressRule::Include(include) = rule {
                if preset_rules(include).is_none() {
                    let known = PRESETS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(EgressPolicyError::Rule {
                        index,
                        source: RuleError::UnknownPreset {
                            include: include.clone(),
                            known,
                        },
                    });
                }
            }
        }
        Ok(EgressPolicy {
            rules,
            default: wire.default,
        })
    }

    /// Whether the policy restricts nothing: no rules, and no default
    /// that denies.
    pub fn is_unrestricted(&self) -> bool {
        self.rules.is_empty() && self.default != Some(EgressAction::Deny)
    }

    /// Every rule, the presets' taken in where they are included, with
    /// the preset each came from.
    fn each_rule(&self, mut f: impl FnMut(&EgressRule, Option<&'static str>)) {
        for rule in &self.rules {
            match rule {
                EgressRule::Include(name) => {
                    if let Some((name, rules)) = preset_rules(name) {
                        for r in rules {
                            f(r, Some(name));
                        }
                    }
                }
                rule => f(rule, None),
            }
        }
    }

    /// What no rule decides.
    fn fallback(&self) -> Verdict {
        match (self.default, self.rules.is_empty()) {
            (Some(action), _) => Verdict {
                action,
                because: Because::Default,
            },
            (None, true) => Verdict {
                action: EgressAction::Allow,
                because: Because::NoRules,
            },
            (None, false) => Verdict {
                action: EgressAction::Deny,
                because: Because::Default,
            },
        }
    }

    /// The decision for a name the inner looks up.
    pub fn decide_name(&self, name: &str) -> Verdict {
        let mut best: Option<((u8, usize), Verdict)> = None;
        self.each_rule(|rule, preset| {
            let EgressRule::Domain { pattern, action } = rule else {
                return;
            };
            if !pattern.matches(name) {
                return;
            }
            keep_best(&mut best, pattern.specificity(), *action, || {
                Because::Rule {
                    rule: pattern.to_string(),
                    preset,
                }
            });
        });
        best.map_or_else(|| self.fallback(), |(_, v)| v)
    }

    /// The decision for an address no allowed name led to (a program that
    /// connects to an IP it was given): the `*` rule if there is one, else
    /// what no rule decides.
    pub fn decide_unnamed(&self) -> Verdict {
        let mut best: Option<Verdict> = None;
        self.each_rule(|rule, preset| {
            if let EgressRule::Domain {
                pattern: DomainPattern::Any,
                action,
            } = rule
            {
                if best
                    .as_ref()
                    .is_none_or(|b| b.action == EgressAction::Allow)
                {
                    best = Some(Verdict {
                        action: *action,
                        because: Because::Rule {
                            rule: "*".into(),
                            preset,
                        },
                    });
                }
            }
        });
        best.unwrap_or_else(|| self.fallback())
    }

    /// The IPv4 space split into disjoint, sorted ranges (first, last,
    /// action) where [`Self::decide_addr`] decides, adjacent ones merged
    /// when they agree: what a firewall's interval map can hold, since
    /// its intervals may not overlap as CIDR rules do. Empty for a policy
    /// that restricts nothing.
    pub fn ipv4_ranges(&self) -> Vec<(Ipv4Addr, Ipv4Addr, EgressAction)> {
        if self.is_unrestricted() {
            return Vec::new();
        }
        // Every point where a decision may change: each network's first
        // address and the one after its last.
        let mut cuts: Vec<u64> = vec![0];
        let mut add = |net: &IpNet| {
            if let IpNet::V4(v4) = net {
                cuts.push(u64::from(u32::from(v4.network())));
                cuts.push(u64::from(u32::from(v4.broadcast())) + 1);
            }
        };
        self.each_rule(|rule, _| {
            if let EgressRule::Cidr { net, .. } = rule {
                add(net);
            }
        });
        for net in PRIVATE {
            if let Ok(net) = net.parse::<IpNet>() {
                add(&net);
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut ranges: Vec<(Ipv4Addr, Ipv4Addr, EgressAction)> = Vec::new();
        for (i, &start) in cuts.iter().enumerate() {
            let end = cuts.get(i + 1).map_or(u64::from(u32::MAX), |next| next - 1);
            let (Ok(first), Ok(last)) = (u32::try_from(start), u32::try_from(end)) else {
                continue; // the cut after 255.255.255.255
            };
            let Some(verdict) = self.decide_addr(IpAddr::V4(Ipv4Addr::from(first))) else {
                continue;
            };
            match ranges.last_mut() {
                Some(prev) if u32::from(prev.1) + 1 == first && prev.2 == verdict.action => {
                    prev.1 = Ipv4Addr::from(last);
                }
                _ => ranges.push((Ipv4Addr::from(first), Ipv4Addr::from(last), verdict.action)),
            }
        }
        ranges
    }

    /// The decision the addresses alone make: the CIDR rule with the
    /// longest prefix that holds `addr`, else a denial for a private
    /// address; `None` when neither speaks of it (the names' rules do),
    /// and always `None` for a policy that restricts nothing.
    pub fn decide_addr(&self, addr: IpAddr) -> Option<Verdict> {
        if self.is_unrestricted() {
            return None;
        }
        let mut best: Option<(u8, Verdict)> = None;
        self.each_rule(|rule, preset| {
            let EgressRule::Cidr { net, action } = rule else {
                return;
            };
            if !net.contains(&addr) {
                return;
            }
            keep_best(&mut best, net.prefix_len(), *action, || Because::Rule {
                rule: net.to_string(),
                preset,
            });
        });
        best.map(|(_, v)| v).or_else(|| {
            is_private(addr).then_some(Verdict {
                action: EgressAction::Deny,
                because: Because::Private,
            })
        })
    }
}

impl WireRule {
    fn check(self) -> Result<EgressRule, RuleError> {
        let targets = [
            self.domain.is_some(),
            self.cidr.is_some(),
            self.include.is_some(),
        ];
        match targets.iter().filter(|t| **t).count() {
            0 => return Err(RuleError::NoTarget),
            1 => {}
            _ => return Err(RuleError::SeveralTargets),
        }
        if let Some(cidr) = self.cidr {
            let Some(action) = self.action else {
                return Err(RuleError::NoAction { target: cidr });
            };
            return match cidr.parse::<IpNet>() {
                // The network itself, not the address it was written with.
                Ok(net) => Ok(EgressRule::Cidr {
                    net: net.trunc(),
                    action,
                }),
                Err(source) => Err(RuleError::Cidr { cidr, source }),
            };
        }
        match (self.domain, self.include, self.action) {
            (None, None, _) | (Some(_), Some(_), _) => Err(RuleError::NoTarget),
            (Some(domain), None, None) => Err(RuleError::NoAction { target: domain }),
            (Some(domain), None, Some(action)) => match DomainPattern::parse(&domain) {
                Ok(pattern) => Ok(EgressRule::Domain { pattern, action }),
                Err(source) => Err(RuleError::Domain { domain, source }),
            },
            (None, Some(include), Some(_)) => Err(RuleError::ActionOnInclude { include }),
            (None, Some(include), None) => {
                let fits = !include.is_empty()
                    && include.len() <= MAX_INCLUDE
                    && include
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if fits {
                    Ok(EgressRule::Include(include))
                } else {
                    Err(RuleError::Include {
                        include,
                        max: MAX_INCLUDE,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }

    #[test]
    fn the_sprites_form_parses_into_typed_rules() {
        let policy = EgressPolicy::parse(
            r#"{"rules": [
                {"domain": "GitHub.com.", "action": "allow"},
                {"domain": "*.npmjs.org", "action": "allow", "include": null},
                {"include": "defaults"},
                {"domain": "*", "action": "deny"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(
            policy.rules,
            vec![
                EgressRule::Domain {
                    pattern: DomainPattern::Exact("github.com".into()),
                    action: EgressAction::Allow,
                },
                EgressRule::Domain {
                    pattern: DomainPattern::Under("npmjs.org".into()),
                    action: EgressAction::Allow,
                },
                EgressRule::Include("defaults".into()),
                EgressRule::Domain {
                    pattern: DomainPattern::Any,
                    action: EgressAction::Deny,
                },
            ]
        );
        assert_eq!(
            EgressPolicy::parse(r#"{"rules":[]}"#).unwrap().rules,
            vec![]
        );
    }

    #[test]
    fn patterns_match_the_names_they_speak_of() {
        let under = DomainPattern::Under("npmjs.org".into());
        assert!(under.matches("registry.npmjs.org") && under.matches("A.B.NPMJS.ORG."));
        // As Sprites reads it, `*.x` speaks of x itself too.
        assert!(under.matches("npmjs.org") && !under.matches("evilnpmjs.org"));
        let exact = DomainPattern::Exact("github.com".into());
        assert!(exact.matches("GitHub.com.") && !exact.matches("api.github.com"));
        assert!(DomainPattern::Any.matches("anything.example"));
        assert_eq!(under.to_string(), "*.npmjs.org");
    }

    #[test]
    fn bad_policies_are_refused_naming_the_rule_and_why() {
        for (text, says) in [
            ("{not json", "not JSON of the form"),
            (r#"{"rules":[],"extra":1}"#, "extra"),
            (r#"{"rules":[{"domain":"a","action":"maybe"}]}"#, "maybe"),
            (
                r#"{"rules":[{"action":"allow"}]}"#,
                "rule 0: it names neither",
            ),
            (
                r#"{"rules":[{"domain":"a","include":"b"}]}"#,
                "more than one",
            ),
            (r#"{"rules":[{"domain":"a.test"}]}"#, "no action"),
            (
                r#"{"rules":[{"include":"x","action":"deny"}]}"#,
                "takes no action",
            ),
            (r#"{"rules":[{"include":"a b"}]}"#, "not a preset name"),
            (r#"{"rules":[{"include":"nope"}]}"#, "no preset named"),
            (r#"{"rules":[{"include":""}]}"#, "not a preset name"),
            (
                r#"{"rules":[{"domain":"a","action":"allow"},{"domain":"a..b","action":"allow"}]}"#,
                "rule 1: its domain \"a..b\" is not a domain pattern",
            ),
            (r#"{"rules":[{"domain":"*.","action":"allow"}]}"#, "empty"),
            (
                r#"{"rules":[{"domain":"ex ample.com","action":"allow"}]}"#,
                "' '",
            ),
            (
                r#"{"rules":[{"domain":"bücher.de","action":"allow"}]}"#,
                "punycode",
            ),
            (r#"{"rules":[{"domain":"-a.com","action":"allow"}]}"#, "'-'"),
            (
                r#"{"rules":[{"domain":"a.*.com","action":"allow"}]}"#,
                "'*'",
            ),
            (
                r#"{"rules":[{"domain":"http://a.com/","action":"allow"}]}"#,
                "':'",
            ),
        ] {
            let e = EgressPolicy::parse(text).expect_err(text);
            let shown = chain(&e);
            assert!(shown.contains(says), "{text}: {shown}");
        }
        let label = "a".repeat(64);
        let e = EgressPolicy::parse(&format!(
            r#"{{"rules":[{{"domain":"{label}.com","action":"allow"}}]}}"#
        ))
        .unwrap_err();
        assert!(chain(&e).contains("label is longer than 63"), "{e:?}");
        let many = vec![r#"{"include":"x"}"#; MAX_RULES + 1].join(",");
        assert!(matches!(
            EgressPolicy::parse(&format!(r#"{{"rules":[{many}]}}"#)),
            Err(EgressPolicyError::TooManyRules { .. })
        ));
    }

    fn decide(policy: &str, name: &str) -> (EgressAction, String) {
        let v = EgressPolicy::parse(policy).unwrap().decide_name(name);
        (v.action, v.because.to_string())
    }

    #[test]
    fn the_most_specific_rule_decides_a_name() {
        let policy = r#"{"rules": [
            {"domain": "*", "action": "allow"},
            {"domain": "*.example.com", "action": "deny"},
            {"domain": "*.api.example.com", "action": "allow"},
            {"domain": "secret.api.example.com", "action": "deny"}
        ]}"#;
        let allow = EgressAction::Allow;
        let deny = EgressAction::Deny;
        for (name, want, because) in [
            ("other.test", allow, "rule *"),
            ("example.com", deny, "rule *.example.com"),
            ("www.example.com", deny, "rule *.example.com"),
            ("api.example.com", allow, "rule *.api.example.com"),
            ("v1.api.example.com", allow, "rule *.api.example.com"),
            (
                "Secret.API.example.com.",
                deny,
                "rule secret.api.example.com",
            ),
        ] {
            assert_eq!(decide(policy, name), (want, because.to_string()), "{name}");
        }
        // The same pattern twice, allowed and denied: deny wins, in either order.
        for policy in [
            r#"{"rules":[{"domain":"a.test","action":"allow"},{"domain":"a.test","action":"deny"}]}"#,
            r#"{"rules":[{"domain":"a.test","action":"deny"},{"domain":"a.test","action":"allow"}]}"#,
        ] {
            assert_eq!(decide(policy, "a.test").0, deny, "{policy}");
        }
    }

    #[test]
    fn what_no_rule_allows_is_denied_unless_there_are_no_rules() {
        assert!(EgressPolicy::parse(r#"{"rules":[]}"#)
            .unwrap()
            .is_unrestricted());
        assert_eq!(
            decide(r#"{"rules":[]}"#, "any.test"),
            (EgressAction::Allow, "no rules".into())
        );
        let only_github = r#"{"rules":[{"domain":"github.com","action":"allow"}]}"#;
        assert!(!EgressPolicy::parse(only_github).unwrap().is_unrestricted());
        assert_eq!(
            decide(only_github, "gitlab.com"),
            (EgressAction::Deny, "the default".into())
        );
        // hull's `default` says what no rule decides.
        let open = r#"{"default":"allow","rules":[{"domain":"evil.test","action":"deny"}]}"#;
        assert_eq!(
            decide(open, "fine.test"),
            (EgressAction::Allow, "the default".into())
        );
        assert_eq!(decide(open, "evil.test").0, EgressAction::Deny);
        let closed = r#"{"default":"deny","rules":[]}"#;
        assert!(!EgressPolicy::parse(closed).unwrap().is_unrestricted());
        assert_eq!(decide(closed, "any.test").0, EgressAction::Deny);
    }

    #[test]
    fn the_defaults_preset_allows_registries_and_model_apis() {
        let policy = r#"{"rules":[{"include":"defaults"},{"domain":"*","action":"deny"}]}"#;
        for name in [
            "api.anthropic.com",
            "api.openai.com",
            "github.com",
            "objects.githubusercontent.com",
            "gitlab.com",
            "bitbucket.org",
            "registry.npmjs.org",
            "pypi.org",
            "files.pythonhosted.org",
            "index.crates.io",
            "proxy.golang.org",
            "repo1.maven.org",
            "deb.debian.org",
            "archive.ubuntu.com",
        ] {
            let (action, because) = decide(policy, name);
            assert_eq!(action, EgressAction::Allow, "{name}: {because}");
            assert!(
                because.starts_with("rule ") && because.ends_with("(defaults)"),
                "{because}"
            );
        }
        assert_eq!(decide(policy, "example.com").0, EgressAction::Deny);
        // A rule of the policy's own beats the preset's at equal specificity.
        let no_pypi = r#"{"rules":[{"include":"defaults"},{"domain":"pypi.org","action":"deny"}]}"#;
        assert_eq!(decide(no_pypi, "pypi.org").0, EgressAction::Deny);
        let e = EgressPolicy::parse(r#"{"rules":[{"include":"nonesuch"}]}"#).unwrap_err();
        assert!(
            chain(&e).contains("no preset named \"nonesuch\" (there is: defaults)"),
            "{}",
            chain(&e)
        );
    }

    #[test]
    fn cidr_rules_decide_addresses_and_private_ones_stay_denied() {
        let policy = EgressPolicy::parse(
            r#"{"rules":[
                {"cidr":"203.0.113.0/24","action":"allow"},
                {"cidr":"203.0.113.7/32","action":"deny"},
                {"cidr":"10.1.0.0/16","action":"allow"},
                {"domain":"*","action":"allow"}
            ]}"#,
        )
        .unwrap();
        let at = |a: &str| {
            policy
                .decide_addr(a.parse().unwrap())
                .map(|v| (v.action, v.because.to_string()))
        };
        assert_eq!(
            at("203.0.113.9"),
            Some((EgressAction::Allow, "rule 203.0.113.0/24".into()))
        );
        assert_eq!(
            at("203.0.113.7"),
            Some((EgressAction::Deny, "rule 203.0.113.7/32".into()))
        );
        // A private address a CIDR rule names is allowed; the others are
        // denied even under `*` allow.
        assert_eq!(at("10.1.2.3").map(|v| v.0), Some(EgressAction::Allow));
        for private in [
            "10.9.9.9",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "169.254.169.254",
            "127.0.0.1",
            "fd00::1",
            "fe80::1",
            "::1",
        ] {
            assert_eq!(
                at(private),
                Some((EgressAction::Deny, "a private address".into())),
                "{private}"
            );
        }
        // A public address no CIDR rule names is for the names' rules.
        assert_eq!(at("198.51.100.1"), None);
        // Without a policy nothing is decided by address.
        assert_eq!(
            EgressPolicy::parse(r#"{"rules":[]}"#)
                .unwrap()
                .decide_addr("10.0.0.1".parse().unwrap()),
            None
        );
        for (text, says) in [
            (
                r#"{"rules":[{"cidr":"10.0.0.0/33","action":"allow"}]}"#,
                "not a CIDR",
            ),
            (r#"{"rules":[{"cidr":"10.0.0.0/8"}]}"#, "no action"),
            (
                r#"{"rules":[{"cidr":"10.0.0.0/8","domain":"a","action":"allow"}]}"#,
                "names more than one",
            ),
            (r#"{"default":"maybe","rules":[]}"#, "maybe"),
        ] {
            let e = EgressPolicy::parse(text).expect_err(text);
            assert!(chain(&e).contains(says), "{text}: {}", chain(&e));
        }
    }

    #[test]
    fn every_shipped_preset_parses_and_only_allows() {
        for (name, _) in PRESETS {
            let (_, rules) =
                preset_rules(name).unwrap_or_else(|| panic!("preset {name} does not parse"));
            assert!(!rules.is_empty(), "{name}");
            for rule in rules {
                assert!(
                    matches!(
                        rule,
                        EgressRule::Domain {
                            action: EgressAction::Allow,
                            ..
                        }
                    ),
                    "preset {name}: {rule:?}: a preset allows names and includes nothing"
                );
            }
        }
    }

    #[test]
    fn addresses_split_into_ranges_each_decided_as_decide_addr_decides() {
        let policy = EgressPolicy::parse(
            r#"{"rules":[
                {"cidr":"203.0.113.0/24","action":"allow"},
                {"cidr":"203.0.113.128/25","action":"deny"},
                {"cidr":"10.1.0.0/16","action":"allow"},
                {"domain":"github.com","action":"allow"}
            ]}"#,
        )
        .unwrap();
        let ranges = policy.ipv4_ranges();
        // Sorted, disjoint, and adjacent ranges differ in action.
        for w in ranges.windows(2) {
            assert!(w[0].1 < w[1].0, "{ranges:?}");
            if u32::from(w[0].1) + 1 == u32::from(w[1].0) {
                assert_ne!(w[0].2, w[1].2, "{ranges:?}");
            }
        }
        let look = |a: &str| {
            let a: std::net::Ipv4Addr = a.parse().unwrap();
            ranges
                .iter()
                .find(|(lo, hi, _)| *lo <= a && a <= *hi)
                .map(|r| r.2)
        };
        for a in [
            "203.0.113.0",
            "203.0.113.127",
            "203.0.113.128",
            "203.0.113.255",
            "10.1.0.0",
            "10.1.255.255",
            "10.0.255.255",
            "10.2.0.0",
            "10.255.255.255",
            "192.168.4.4",
            "100.64.0.0",
            "100.127.255.255",
            "100.128.0.0",
            "8.8.8.8",
            "0.0.0.0",
            "255.255.255.255",
        ] {
            let want = policy.decide_addr(a.parse().unwrap()).map(|v| v.action);
            assert_eq!(look(a), want, "{a}: {ranges:?}");
        }
        assert!(EgressPolicy::parse(r#"{"rules":[]}"#)
            .unwrap()
            .ipv4_ranges()
            .is_empty());
    }

    #[test]
    fn an_address_no_name_led_to_is_judged_by_star_or_the_default() {
        let unnamed = |text: &str| EgressPolicy::parse(text).unwrap().decide_unnamed().action;
        assert_eq!(
            unnamed(r#"{"rules":[{"domain":"a.test","action":"allow"}]}"#),
            EgressAction::Deny
        );
        assert_eq!(
            unnamed(
                r#"{"rules":[{"domain":"a.test","action":"deny"},{"domain":"*","action":"allow"}]}"#
            ),
            EgressAction::Allow
        );
        assert_eq!(
            unnamed(r#"{"default":"allow","rules":[{"domain":"a.test","action":"deny"}]}"#),
            EgressAction::Allow
        );
        assert_eq!(unnamed(r#"{"rules":[]}"#), EgressAction::Allow);
    }
}
