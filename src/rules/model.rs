//! The rule file as written (YAML) and the rules as the router uses them.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::outcome::OutcomeClass;
use crate::rules::pattern::DomainPattern;
use crate::rules::policy::{LegacyTls, MinTls, TlsMode, TlsPolicy, VerifyMode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub rules: Vec<Spanned<RuleSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matches: Conditions,
    #[serde(default)]
    pub tls: Option<TlsMode>,
    #[serde(default)]
    pub verify: Option<VerifyMode>,
    #[serde(default)]
    pub min_tls: Option<MinTls>,
    #[serde(default)]
    pub legacy_tls: Option<LegacyTls>,
    #[serde(default)]
    pub fallback_on: Option<Vec<TlsFailure>>,
    #[serde(default)]
    pub fallback: Option<Fallback>,
    #[serde(default)]
    pub on_downgrade: Option<OnDowngrade>,
    #[serde(default)]
    pub route: Option<Spanned<RouteSpec>>,
    /// Apply this rule even where it is weaker than what the domain publishes (an MTA-STS
    /// `enforce` policy): only for domains the rule names one by one.
    #[serde(default)]
    pub override_published_policy: bool,
}

/// A class `fallback_on` takes: a TLS attempt that failed. Checked as the file is read, so
/// a wrong class is reported at its own line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "OutcomeClass")]
pub struct TlsFailure(pub OutcomeClass);

impl TryFrom<OutcomeClass> for TlsFailure {
    type Error = String;
    fn try_from(class: OutcomeClass) -> Result<Self, String> {
        if class.is_tls_failure() {
            return Ok(TlsFailure(class));
        }
        let allowed: Vec<&str> = OutcomeClass::ALL
            .into_iter()
            .filter(|c| c.is_tls_failure())
            .map(OutcomeClass::name)
            .collect();
        Err(format!(
            "fallback_on: {class} is not a TLS failure (allowed: {})",
            allowed.join(", ")
        ))
    }
}

/// What a rule applies to. Every condition given must hold; within one list, any entry.
/// A condition left out holds for everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    /// Recipient domains.
    #[serde(default)]
    pub domains: Vec<DomainPattern>,
    /// Sender domains.
    #[serde(default)]
    pub senders: Vec<DomainPattern>,
    /// MX host names.
    #[serde(default)]
    pub mx: Vec<DomainPattern>,
    /// The MX host's cached outcome class.
    #[serde(default)]
    pub outcome: Vec<OutcomeClass>,
}

impl Conditions {
    /// Conditions that can only be decided once an MX host is chosen.
    pub fn depends_on_host(&self) -> bool {
        !self.mx.is_empty() || !self.outcome.is_empty()
    }

    pub fn sender_matches(&self, sender_domain: Option<&str>) -> bool {
        any_or_empty(&self.senders, |p| {
            sender_domain.is_some_and(|d| p.matches(d))
        })
    }

    /// `cached`: the host's cached classes (its outcome, and its certificate's problem).
    pub fn host_matches(&self, host: &str, cached: &[OutcomeClass]) -> bool {
        any_or_empty(&self.mx, |p| p.matches(host))
            && (self.outcome.is_empty() || cached.iter().any(|c| self.outcome.contains(c)))
    }

    /// Whether every message these conditions match is matched by `earlier` too.
    pub fn covered_by(&self, earlier: &Conditions) -> bool {
        // An empty list takes more than `*` for senders (bounces have no sender domain) and
        // for mx (a rule without host conditions fixes the next hop, which no host rule does).
        names_covered(&self.domains, &earlier.domains)
            && listed_names_covered(&self.senders, &earlier.senders)
            && listed_names_covered(&self.mx, &earlier.mx)
            && (earlier.outcome.is_empty()
                || (!self.outcome.is_empty()
                    && self.outcome.iter().all(|o| earlier.outcome.contains(o))))
    }
}

/// Whether `earlier` takes every name `later` takes; an empty list takes every name.
fn names_covered(later: &[DomainPattern], earlier: &[DomainPattern]) -> bool {
    if earlier.is_empty() {
        return true;
    }
    if later.is_empty() {
        return earlier.contains(&DomainPattern::Any);
    }
    later.iter().all(|l| earlier.iter().any(|e| e.covers(l)))
}

/// Like [`names_covered`], where only an empty list covers an empty list.
fn listed_names_covered(later: &[DomainPattern], earlier: &[DomainPattern]) -> bool {
    earlier.is_empty() || (!later.is_empty() && names_covered(later, earlier))
}

fn any_or_empty(patterns: &[DomainPattern], test: impl Fn(&DomainPattern) -> bool) -> bool {
    patterns.is_empty() || patterns.iter().any(test)
}

/// Where a message goes when it may not, or cannot, go encrypted to the MX.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// In plain to the same MX.
    Direct,
    /// In plain to this server (a plain-TCP relay, as with the IIS TLS router plug-in).
    Relay(HostPort),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDowngrade {
    /// Deliver as the fallback rules allow, with a warning.
    #[default]
    Fallback,
    /// Defer the message (451 4.7.5) until the host offers TLS again or the cache entry ends.
    Defer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub smarthost: HostPort,
    #[serde(default)]
    pub tls: Option<SmarthostTls>,
    #[serde(default)]
    pub auth: Option<AuthSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmarthostTls {
    /// STARTTLS, and no delivery without it.
    Require,
    /// STARTTLS when offered.
    Opportunistic,
    /// Implicit TLS from the first byte (port 465).
    Wrapper,
}

/// Credentials for AUTH, never written in the rule file itself.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSpec {
    #[serde(default)]
    pub username_file: Option<PathBuf>,
    #[serde(default)]
    pub username_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
}

/// `host:port`, with `[v6]:port` for IPv6.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl TryFrom<String> for HostPort {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let bad = || format!("{text:?} is not host:port");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where a rule sends mail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The recipient domain's MX hosts.
    Mx,
    Smarthost {
        server: HostPort,
        tls: SmarthostTls,
        auth: Option<AuthSpec>,
    },
}

/// One rule, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    /// Where the rule stands in its file, 1-based (0 for the built-in default).
    pub line: u64,
    pub column: u64,
    pub conditions: Conditions,
    pub policy: TlsPolicy,
    pub fallback: Fallback,
    pub on_downgrade: OnDowngrade,
    pub route: Route,
    /// The rule applies even where the domain publishes a stricter policy; every use is
    /// logged at warn.
    pub override_published_policy: bool,
}

impl Rule {
    /// What applies when no rule matches: opportunistic TLS, plain fallback.
    pub fn builtin_default() -> Rule {
        Rule {
            name: "built-in default".into(),
            line: 0,
            column: 0,
            conditions: Conditions::default(),
            policy: TlsPolicy::opportunistic(),
            fallback: Fallback::Direct,
            on_downgrade: OnDowngrade::Fallback,
            route: Route::Mx,
            override_published_policy: false,
        }
    }

    /// Validates one rule as written, found at `line` and `column`; errors say what to change.
    pub fn from_spec(spec: RuleSpec, line: u64, column: u64) -> Result<Rule, RuleError> {
        if spec.name.trim().is_empty() {
            return Err(RuleError::NoName);
        }
        let defaults = TlsPolicy::opportunistic();
        let tls = spec.tls.unwrap_or(TlsMode::Opportunistic);
        if tls == TlsMode::Require && spec.fallback_on.as_ref().is_some_and(|f| !f.is_empty()) {
            return Err(RuleError::RequireWithFallback(spec.name));
        }
        if tls == TlsMode::Never && spec.verify == Some(VerifyMode::Require) {
            return Err(RuleError::NeverWithVerify(spec.name));
        }
        if spec.override_published_policy
            && (spec.matches.domains.is_empty()
                || spec.matches.domains.iter().any(|d| !d.is_exact()))
        {
            return Err(RuleError::OverrideNeedsNamedDomains(spec.name));
        }
        let has_auth = spec.route.as_ref().is_some_and(|r| r.value.auth.is_some());
        let route = match spec.route {
            None => Route::Mx,
            Some(route) => {
                if spec.matches.depends_on_host() {
                    return Err(RuleError::SmarthostMatchesHost(spec.name));
                }
                let route = route.value;
                let tls = route.tls.unwrap_or(SmarthostTls::Require);
                if let Some(auth) = &route.auth {
                    validate_auth(&spec.name, auth, tls)?;
                    // Credentials go only to a server whose certificate verifies.
                    if spec.verify == Some(VerifyMode::Try) {
                        return Err(RuleError::AuthWithoutVerify(spec.name));
                    }
                }
                Route::Smarthost {
                    server: route.smarthost,
                    tls,
                    auth: route.auth,
                }
            }
        };
        // A smarthost that must have TLS (STARTTLS required, or implicit TLS) is a required-TLS
        // policy whatever the rule's own `tls` says.
        let tls = match route {
            Route::Smarthost {
                tls: SmarthostTls::Require | SmarthostTls::Wrapper,
                ..
            } => TlsMode::Require,
            _ => tls,
        };
        Ok(Rule {
            name: spec.name,
            line,
            column,
            conditions: spec.matches,
            policy: TlsPolicy {
                tls,
                verify: spec.verify.unwrap_or(if has_auth {
                    VerifyMode::Require
                } else {
                    VerifyMode::Try
                }),
                min_tls: spec.min_tls.unwrap_or_default(),
                fallback_on: spec.fallback_on.map_or(defaults.fallback_on, |classes| {
                    classes.into_iter().map(|TlsFailure(class)| class).collect()
                }),
                legacy_tls: spec.legacy_tls.unwrap_or_default(),
            },
            fallback: spec.fallback.unwrap_or(Fallback::Direct),
            on_downgrade: spec.on_downgrade.unwrap_or_default(),
            route,
            override_published_policy: spec.override_published_policy,
        })
    }
}

fn validate_auth(rule: &str, auth: &AuthSpec, tls: SmarthostTls) -> Result<(), RuleError> {
    if tls == SmarthostTls::Opportunistic {
        return Err(RuleError::AuthWithoutTls(rule.to_string()));
    }
    let one_of = |file: bool, env: bool, what: &'static str| {
        if file == env {
            Err(RuleError::CredentialSource {
                rule: rule.to_string(),
                what,
            })
        } else {
            Ok(())
        }
    };
    one_of(
        auth.username_file.is_some(),
        auth.username_env.is_some(),
        "username",
    )?;
    one_of(
        auth.password_file.is_some(),
        auth.password_env.is_some(),
        "password",
    )
}

/// Why a rule as written cannot be used; each says what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("a rule needs a name")]
    NoName,
    #[error("rule {0:?}: tls: require never falls back to plain; remove fallback_on")]
    RequireWithFallback(String),
    #[error(
        "rule {0:?}: tls: never checks no certificate, so verify: require would never hold; remove verify, or write tls: require to insist on a verified certificate"
    )]
    NeverWithVerify(String),
    #[error(
        "rule {0:?}: override_published_policy needs the domains named one by one in match.domains (no \"*\" or \"*.suffix\")"
    )]
    OverrideNeedsNamedDomains(String),
    #[error("rule {0:?}: a smarthost route cannot also match on mx or outcome")]
    SmarthostMatchesHost(String),
    #[error("rule {0:?}: AUTH is sent over TLS only: set route.tls to require or wrapper")]
    AuthWithoutTls(String),
    #[error("rule {0:?}: AUTH credentials go only to a verified server: remove verify: try")]
    AuthWithoutVerify(String),
    #[error("rule {rule:?}: give exactly one of {what}_file and {what}_env")]
    CredentialSource { rule: String, what: &'static str },
}
