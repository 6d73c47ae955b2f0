//! The sandbox's egress policy: which domains the inner may reach, as the
//! Sprites API writes it (`{"rules": [{"domain", "action"}, {"include"}]}`).
//!
//! [`EgressPolicy::parse`] is the one place a policy is read and checked:
//! hulld parses what the API or the CLI sends before it stores it, and
//! parses what it stored when it loads it, so the API, the store and the
//! enforcer to come all hold the same typed rules. The policy is stored
//! and answered as the text that was sent (the SDKs compare what they
//! read back with what they wrote); nothing enforces it yet.

use std::fmt;

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
}

/// One rule: a decision for the domains a pattern matches, or a preset's
/// rules taken in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressRule {
    Domain {
        pattern: DomainPattern,
        action: EgressAction,
    },
    /// The rules of the preset of this name (`defaults`, say).
    Include(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressAction {
    Allow,
    Deny,
}

/// The domains a rule speaks of, lower-cased: `*` (every name),
/// `*.example.com` (the names under example.com, not example.com
/// itself) or `example.com` (that name alone).
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
            DomainPattern::Under(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
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
    #[error("not JSON of the form {{\"rules\": [...]}}")]
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
    #[error("it names neither a domain nor an include")]
    NoTarget,
    #[error("it names both a domain and an include; give each its own rule")]
    BothTargets,
    #[error("its domain {domain:?} has no action: say \"allow\" or \"deny\"")]
    NoAction { domain: String },
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRule {
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    action: Option<EgressAction>,
    #[serde(default)]
    include: Option<String>,
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
            .collect::<Result<_, _>>()?;
        Ok(EgressPolicy { rules })
    }
}

impl WireRule {
    fn check(self) -> Result<EgressRule, RuleError> {
        match (self.domain, self.include, self.action) {
            (None, None, _) => Err(RuleError::NoTarget),
            (Some(_), Some(_), _) => Err(RuleError::BothTargets),
            (Some(domain), None, None) => Err(RuleError::NoAction { domain }),
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
        assert!(!under.matches("npmjs.org") && !under.matches("evilnpmjs.org"));
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
            (r#"{"rules":[{"domain":"a","include":"b"}]}"#, "both"),
            (r#"{"rules":[{"domain":"a.test"}]}"#, "no action"),
            (
                r#"{"rules":[{"include":"x","action":"deny"}]}"#,
                "takes no action",
            ),
            (r#"{"rules":[{"include":"a b"}]}"#, "not a preset name"),
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
}
