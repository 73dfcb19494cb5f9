//! The rule list: an ordered YAML list where the first matching rule decides what happens to
//! a message. Rules are validated when loaded (errors name file, line and column) and
//! compiled into an index over recipient domains.

pub mod index;
pub mod model;
pub mod pattern;
pub mod policy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::settings::{ConfigError, yaml_error};
use index::DomainIndex;
use model::RuleFile;
pub use model::{Fallback, OnDowngrade, Route, Rule, RuleError};
use pattern::DomainPattern;
pub use policy::{LegacyTls, MinTls, TlsMode, TlsPolicy, VerifyMode};

/// `1 rule in force`, `3 rules in force`: what a reload reports.
pub fn in_force(count: usize) -> String {
    let rules = if count == 1 { "rule" } else { "rules" };
    format!("{count} {rules} in force")
}

/// The rules shipped as the default, used when the configuration names no rule file.
pub const DEFAULT_RULES: &str = include_str!("../../rules/default.yaml");

#[derive(Debug)]
pub struct RuleSet {
    /// Where the rules came from, for messages.
    pub source: PathBuf,
    rules: Vec<Rule>,
    /// Rules by recipient domain; a rule without recipient or sender domains is under `*`.
    by_recipient: DomainIndex,
    /// Rules without recipient domains, by sender domain.
    by_sender: DomainIndex,
    fallback_rule: Rule,
}

/// The rules that may decide a message, before its MX host is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Matching rules that also depend on the MX host, in order, before `base`.
    pub conditional: Vec<usize>,
    /// The first matching rule that does not depend on the host; `None`: the built-in default.
    pub base: Option<usize>,
}

/// A rule that can never match because an earlier one takes everything it would.
#[derive(Debug, PartialEq, Eq)]
pub struct Shadowed {
    pub rule: usize,
    pub by: usize,
}

impl RuleSet {
    pub fn load(path: &Path) -> Result<RuleSet, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        RuleSet::parse(&text, path)
    }

    /// The shipped default rules.
    pub fn embedded_default() -> RuleSet {
        RuleSet::parse(DEFAULT_RULES, Path::new("(embedded rules/default.yaml)"))
            .unwrap_or_else(|_| RuleSet::from_rules(PathBuf::from("(built-in)"), Vec::new()))
    }

    pub fn parse(text: &str, path: &Path) -> Result<RuleSet, ConfigError> {
        let file: RuleFile =
            serde_saphyr::from_str(text).map_err(|e| yaml_error(path, text, &e))?;
        let mut rules = Vec::with_capacity(file.rules.len());
        let mut names: HashMap<String, u64> = HashMap::new();
        for spanned in file.rules {
            let (line, column) = (spanned.referenced.line(), spanned.referenced.column());
            let invalid = |message: String| ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message,
            };
            let name = spanned.value.name.clone();
            if let Some(first) = names.insert(name.clone(), line) {
                return Err(invalid(format!(
                    "rule {name:?} is already defined at line {first}"
                )));
            }
            let rule = Rule::from_spec(spanned.value, line, column);
            rules.push(rule.map_err(|e| invalid(e.to_string()))?);
        }
        Ok(RuleSet::from_rules(path.to_path_buf(), rules))
    }

    fn from_rules(source: PathBuf, rules: Vec<Rule>) -> RuleSet {
        let (mut by_recipient, mut by_sender) = (DomainIndex::default(), DomainIndex::default());
        for (i, rule) in rules.iter().enumerate() {
            let conditions = &rule.conditions;
            match (conditions.domains.is_empty(), conditions.senders.is_empty()) {
                (false, _) => conditions
                    .domains
                    .iter()
                    .for_each(|p| by_recipient.insert(p, i)),
                (true, false) => conditions
                    .senders
                    .iter()
                    .for_each(|p| by_sender.insert(p, i)),
                (true, true) => by_recipient.insert(&DomainPattern::Any, i),
            }
        }
        RuleSet {
            source,
            rules,
            by_recipient,
            by_sender,
            fallback_rule: Rule::builtin_default(),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule at `index`, or the built-in default for `None`.
    pub fn rule(&self, index: Option<usize>) -> &Rule {
        index
            .and_then(|i| self.rules.get(i))
            .unwrap_or(&self.fallback_rule)
    }

    /// The rules that can decide a message from `sender_domain` to `recipient_domain`.
    pub fn select(&self, recipient_domain: &str, sender_domain: Option<&str>) -> Selection {
        let mut candidates = self.by_recipient.candidates(recipient_domain);
        // A bounce has no sender domain, so no rule found by sender domain takes it.
        if let Some(sender) = sender_domain {
            candidates.extend(self.by_sender.candidates(sender));
            candidates.sort_unstable();
            candidates.dedup();
        }
        let mut conditional = Vec::new();
        for i in candidates {
            let conditions = &self.rules[i].conditions;
            if !conditions.sender_matches(sender_domain) {
                continue;
            }
            if !conditions.depends_on_host() {
                return Selection {
                    conditional,
                    base: Some(i),
                };
            }
            conditional.push(i);
        }
        Selection {
            conditional,
            base: None,
        }
    }

    /// `file:line:column: ...`: which rule cannot be reached, at its own place, and why.
    pub fn describe_shadowed(&self, shadowed: &Shadowed) -> String {
        let (rule, by) = (&self.rules[shadowed.rule], &self.rules[shadowed.by]);
        format!(
            "{}:{}:{}: rule {:?} can never match: rule {:?} (line {}) takes all its messages",
            self.source.display(),
            rule.line,
            rule.column,
            rule.name,
            by.name,
            by.line
        )
    }

    /// Credential files a smart-host rule names that are not there: its mail would wait
    /// (451 4.3.5) until they are. `file:line:column: ...`, with what to do.
    pub fn missing_credential_files(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for rule in &self.rules {
            let Route::Smarthost {
                auth: Some(auth), ..
            } = &rule.route
            else {
                continue;
            };
            let files = [
                ("username", &auth.username_file),
                ("password", &auth.password_file),
            ];
            for (what, file) in files {
                let Some(file) = file.as_ref().filter(|f| !f.exists()) else {
                    continue;
                };
                missing.push(format!(
                    "{}:{}:{}: rule {:?}: {what}_file {} does not exist; create it (readable by tlsrouter only), or name an environment variable with {what}_env",
                    self.source.display(),
                    rule.line,
                    rule.column,
                    rule.name,
                    file.display()
                ));
            }
        }
        missing
    }

    /// A warning for each strict rule (TLS or a verified certificate required) that names
    /// `*.X` but not `X`, where `X`'s own mail goes by a rule that asks less: `*.bank.example`
    /// does not match `bank.example`, which is easy to forget.
    pub fn parents_left_out(&self) -> Vec<String> {
        let strict = |rule: &Rule| {
            (
                rule.policy.tls == TlsMode::Require,
                rule.policy.verify == VerifyMode::Require,
            )
        };
        let mut warnings = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let (tls, verify) = strict(rule);
            if !tls && !verify {
                continue;
            }
            for pattern in &rule.conditions.domains {
                let DomainPattern::Below(parent) = pattern else {
                    continue;
                };
                let base = self.select(parent, None).base;
                let other = self.rule(base);
                let (other_tls, other_verify) = strict(other);
                if base == Some(i) || (other_tls || !tls) && (other_verify || !verify) {
                    continue;
                }
                warnings.push(format!(
                    "{}:{}:{}: warning: rule {:?} names *.{parent} but not {parent} itself, whose mail goes by rule {:?}, which asks less; if the domain's own mail must be as strict, write \"**.{parent}\" (it and every domain below it) instead, or add \"{parent}\"",
                    self.source.display(),
                    rule.line,
                    rule.column,
                    rule.name,
                    other.name
                ));
            }
        }
        warnings
    }

    /// Rules that no message can reach.
    /// A warning for each rule that overrides what its domains publish (MTA-STS enforce).
    pub fn policy_overrides(&self) -> Vec<String> {
        self.rules
            .iter()
            .filter(|rule| rule.override_published_policy)
            .map(|rule| {
                let domains: Vec<String> =
                    rule.conditions.domains.iter().map(ToString::to_string).collect();
                format!(
                    "{}:{}:{}: warning: rule {:?} overrides the published MTA-STS policy of {}: mail to them may go without verified TLS",
                    self.source.display(),
                    rule.line,
                    rule.column,
                    rule.name,
                    domains.join(", ")
                )
            })
            .collect()
    }

    pub fn shadowed(&self) -> Vec<Shadowed> {
        let mut found = Vec::new();
        for (later, rule) in self.rules.iter().enumerate() {
            let by = (0..later)
                .find(|&earlier| rule.conditions.covered_by(&self.rules[earlier].conditions));
            if let Some(by) = by {
                found.push(Shadowed { rule: later, by });
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::OutcomeClass;
    use crate::rules::TlsMode;

    fn parse(text: &str) -> Result<RuleSet, ConfigError> {
        RuleSet::parse(text, Path::new("r.yaml"))
    }

    const EXAMPLE: &str = r#"
rules:
  - name: partner-without-tls
    match: { domains: [fabrikam.example] }
    tls: never
  - name: banks
    match: { domains: ["*.bank.example"] }
    tls: require
    verify: require
    min_tls: "1.3"
  - name: legacy-mx
    match: { mx: ["*.oldhost.example"], outcome: [legacy-tls] }
    fallback: { relay: "127.0.0.1:2526" }
  - name: o365
    match: { senders: [crm.example] }
    route: { smarthost: "smtp.office365.com:587", tls: require, auth: { username_env: U, password_file: /etc/p } }
  - name: default
    match: { domains: ["*"] }
    fallback_on: [no-starttls, handshake-failed]
    on_downgrade: defer
"#;

    #[test]
    fn a_strict_rule_for_the_domains_below_a_name_is_told_it_leaves_the_name_out() {
        let rules = parse(EXAMPLE).unwrap();
        let warnings = rules.parents_left_out();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("r.yaml:6:5: warning: rule \"banks\""),
            "{warnings:?}"
        );
        assert!(warnings[0].contains("add \"bank.example\""), "{warnings:?}");
        // With the name itself in the rule, or a rule as strict for it, nothing to say.
        let named = EXAMPLE.replace(
            r#"domains: ["*.bank.example"]"#,
            r#"domains: [bank.example, "*.bank.example"]"#,
        );
        assert!(parse(&named).unwrap().parents_left_out().is_empty());
        assert!(
            warnings[0].contains("write \"**.bank.example\""),
            "{warnings:?}"
        );
        let and_below = EXAMPLE.replace(r#""*.bank.example""#, r#""**.bank.example""#);
        let rules = parse(&and_below).unwrap();
        assert!(rules.parents_left_out().is_empty());
        for (domain, rule) in [("bank.example", "banks"), ("a.bank.example", "banks")] {
            let chosen = rules.select(domain, None).base;
            assert_eq!(rules.rule(chosen).name, rule, "{domain}");
        }
        let opportunistic = EXAMPLE.replace("    tls: require\n    verify: require\n", "");
        assert!(parse(&opportunistic).unwrap().parents_left_out().is_empty());
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let rules = parse(EXAMPLE).unwrap();
        let name = |s: &Selection| rules.rule(s.base).name.clone();
        assert_eq!(
            name(&rules.select("fabrikam.example", None)),
            "partner-without-tls"
        );
        assert_eq!(
            rules
                .rule(rules.select("fabrikam.example", None).base)
                .policy
                .tls,
            TlsMode::Never
        );
        assert_eq!(name(&rules.select("mx.bank.example", None)), "banks");
        assert_eq!(
            name(&rules.select("other.example", Some("crm.example"))),
            "o365"
        );
        let selection = rules.select("other.example", Some("x.example"));
        assert_eq!(name(&selection), "default");
        assert_eq!(
            selection.conditional,
            vec![2],
            "the host-dependent rule is kept for later"
        );
        let legacy = rules.rule(Some(2));
        assert!(
            legacy
                .conditions
                .host_matches("mx1.oldhost.example", &[OutcomeClass::LegacyTls])
        );
        assert!(!legacy.conditions.host_matches("mx1.oldhost.example", &[]));
        assert_eq!(rules.rule(selection.base).on_downgrade, OnDowngrade::Defer);
    }

    #[test]
    fn legacy_tls_defaults_to_encrypt_and_takes_plain() {
        let rules = parse("rules:\n  - name: a\n  - name: b\n    legacy_tls: plain\n").unwrap();
        assert_eq!(rules.rules()[0].policy.legacy_tls, LegacyTls::Encrypt);
        assert_eq!(rules.rules()[1].policy.legacy_tls, LegacyTls::Plain);
        assert_eq!(
            Rule::builtin_default().policy.legacy_tls,
            LegacyTls::Encrypt
        );
    }

    #[test]
    fn no_matching_rule_means_the_built_in_default() {
        let rules = parse("rules:\n  - name: only\n    match: { domains: [a.example] }\n").unwrap();
        let selection = rules.select("b.example", None);
        assert_eq!(selection.base, None);
        assert_eq!(rules.rule(None).name, "built-in default");
    }

    #[test]
    fn errors_name_line_and_column() {
        let cases = [
            ("rules:\n  - name: a\n    tls: maybe\n", 3, "maybe"),
            (
                "rules:\n  - name: a\n    match: { domains: [\"a..b\"] }\n",
                3,
                "not a domain pattern",
            ),
            (
                "rules:\n  - name: a\n    fallback_on: [no-such-class]\n",
                3,
                "no-such-class",
            ),
            ("rules:\n  - name: a\n    colour: blue\n", 3, "colour"),
            // What to type instead.
            (
                "rules:\n  - name: a\n    match: { domains: [*.bank.example] }\n",
                3,
                "must be quoted in YAML: write \"*.bank.example\" instead",
            ),
            (
                "rules:\n  - name: a\n    fallback_onn: [no-starttls]\n",
                3,
                "did you mean `fallback_on`?",
            ),
            (
                "rules:\n  - name: a\n    tls: requir\n",
                3,
                "did you mean `require`?",
            ),
            ("rules:\n  - name: a\n    legacy_tls: maybe\n", 3, "maybe"),
            ("rules:\n  - name: a\n  - name: a\n", 3, "already defined"),
            (
                "rules:\n  - name: a\n    tls: require\n    fallback_on: [no-starttls]\n",
                2,
                "never falls back",
            ),
            (
                "rules:\n  - name: a\n    tls: never\n    verify: require\n",
                2,
                "remove verify, or write tls: require",
            ),
            (
                "rules:\n  - name: a\n    route: { smarthost: \"h:587\", tls: opportunistic, auth: { username_env: U, password_env: P } }\n",
                2,
                "TLS only",
            ),
        ];
        for (text, line, says) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("r.yaml:{line}:")), "{err}");
            assert!(err.contains(says), "{err} should say {says}");
        }
    }

    #[test]
    fn each_rule_that_cannot_be_used_says_which_mistake_it_is() {
        let refused = |rule: &str| {
            let file: RuleFile = serde_saphyr::from_str(&format!("rules:\n  - {rule}\n")).unwrap();
            let spec = file.rules.into_iter().next().unwrap().value;
            Rule::from_spec(spec, 2, 5).unwrap_err()
        };
        let a = || "a".to_string();
        let auth = "auth: { username_env: U, password_env: P }";
        let cases = [
            ("{ name: \" \" }".to_string(), RuleError::NoName),
            (
                "{ name: a, tls: require, fallback_on: [no-starttls] }".into(),
                RuleError::RequireWithFallback(a()),
            ),
            (
                "{ name: a, match: { domains: [\"*.x.example\"] }, override_published_policy: true }"
                    .into(),
                RuleError::OverrideNeedsNamedDomains(a()),
            ),
            (
                "{ name: a, match: { mx: [mx.example] }, route: { smarthost: \"h:587\" } }".into(),
                RuleError::SmarthostMatchesHost(a()),
            ),
            (
                format!("{{ name: a, route: {{ smarthost: \"h:587\", tls: opportunistic, {auth} }} }}"),
                RuleError::AuthWithoutTls(a()),
            ),
            (
                format!("{{ name: a, verify: try, route: {{ smarthost: \"h:587\", {auth} }} }}"),
                RuleError::AuthWithoutVerify(a()),
            ),
            (
                "{ name: a, route: { smarthost: \"h:587\", auth: { username_env: U, username_file: /u, password_env: P } } }".into(),
                RuleError::CredentialSource { rule: a(), what: "username" },
            ),
            (
                "{ name: a, route: { smarthost: \"h:587\", auth: { username_env: U } } }".into(),
                RuleError::CredentialSource { rule: a(), what: "password" },
            ),
        ];
        for (rule, expected) in cases {
            assert_eq!(refused(&rule), expected, "{rule}");
        }
    }

    #[test]
    fn fallback_on_takes_only_tls_failures_and_says_which_at_the_class_itself() {
        for class in [
            "tls-verified",
            "tls-unverified",
            "connect-failed",
            "timeout",
        ] {
            let text = format!(
                "rules:\n  - name: a\n    fallback_on:\n      - no-starttls\n      - {class}\n"
            );
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with("r.yaml:5:9: "), "{err}");
            assert!(
                err.contains(&format!("{class} is not a TLS failure")),
                "{err}"
            );
            assert!(
                err.contains(
                    "no-starttls, starttls-refused, handshake-failed, legacy-tls, cert-expired"
                ),
                "{err} should list the allowed classes"
            );
        }
        let allowed = "rules:\n  - name: a\n    fallback_on: [cert-expired, protocol-violation]\n";
        assert_eq!(
            parse(allowed).unwrap().rules()[0].policy.fallback_on,
            vec![OutcomeClass::CertExpired, OutcomeClass::ProtocolViolation]
        );
    }

    #[test]
    fn the_shipped_rule_lists_load_without_unreachable_rules() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
        for name in ["default.yaml", "iis-tls-router.yaml", "strict.yaml"] {
            let rules = RuleSet::load(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
            assert!(!rules.rules().is_empty(), "{name}");
            assert_eq!(rules.shadowed(), vec![], "{name}");
        }
        assert_eq!(RuleSet::embedded_default().rules()[0].name, "default");
    }

    #[test]
    fn a_rule_behind_a_broader_one_is_found_shadowed() {
        let rules = parse(
            "rules:\n  - name: all-banks\n    match: { domains: [\"*.bank.example\"] }\n  - name: one-bank\n    match: { domains: [a.bank.example] }\n  - name: other\n    match: { domains: [bank.example] }\n",
        )
        .unwrap();
        assert_eq!(rules.shadowed(), vec![Shadowed { rule: 1, by: 0 }]);
    }

    #[test]
    fn a_rule_without_recipient_domains_behind_a_catch_all_is_found_shadowed() {
        let rules = parse(
            "rules:\n  - name: default\n    match: { domains: [\"*\"] }\n  - name: crm\n    match: { senders: [crm.example] }\n",
        )
        .unwrap();
        assert_eq!(rules.shadowed(), vec![Shadowed { rule: 1, by: 0 }]);
    }

    #[test]
    fn a_rule_without_senders_behind_one_for_every_sender_domain_still_gets_bounces() {
        let rules = parse(
            "rules:\n  - name: any-sender\n    match: { senders: [\"*\"] }\n  - name: rest\n    match: { domains: [\"*\"] }\n",
        )
        .unwrap();
        assert_eq!(rules.shadowed(), vec![]);
        assert_eq!(
            rules.rule(rules.select("a.example", None).base).name,
            "rest"
        );
    }

    #[test]
    fn a_rule_without_host_conditions_behind_one_for_every_mx_host_still_fixes_the_next_hop() {
        let rules = parse(
            "rules:\n  - name: every-mx\n    match: { mx: [\"*\"] }\n  - name: rest\n    match: { domains: [\"*\"] }\n",
        )
        .unwrap();
        assert_eq!(rules.shadowed(), vec![]);
        assert_eq!(
            rules.rule(rules.select("a.example", None).base).name,
            "rest"
        );
    }

    mod against_a_scan {
        use super::*;
        use proptest::prelude::*;

        const PATTERNS: [&str; 6] = [
            "a.example",
            "b.example",
            "*.example",
            "*.a.example",
            "x.a.example",
            "*",
        ];
        const NAMES: [&str; 5] = [
            "a.example",
            "b.example",
            "x.a.example",
            "y.b.example",
            "other.test",
        ];

        /// Rules of recipient and sender patterns (indexes into PATTERNS; empty: no condition).
        fn rule_file(rules: &[(Vec<usize>, Vec<usize>)]) -> String {
            let list = |ps: &[usize]| {
                let quoted: Vec<String> =
                    ps.iter().map(|&p| format!("\"{}\"", PATTERNS[p])).collect();
                quoted.join(", ")
            };
            let mut text = "rules:\n".to_string();
            for (i, (domains, senders)) in rules.iter().enumerate() {
                text += &format!(
                    "  - name: r{i}\n    match: {{ domains: [{}], senders: [{}] }}\n",
                    list(domains),
                    list(senders)
                );
            }
            text
        }

        proptest! {
            #[test]
            fn the_indexes_choose_the_rule_a_scan_in_order_would(
                rules in prop::collection::vec(
                    (
                        prop::collection::vec(0..PATTERNS.len(), 0..3),
                        prop::collection::vec(0..PATTERNS.len(), 0..3),
                    ),
                    1..8,
                ),
                recipient in 0..NAMES.len(),
                sender in prop::option::of(0..NAMES.len()),
            ) {
                let set = parse(&rule_file(&rules)).unwrap();
                let (recipient, sender) = (NAMES[recipient], sender.map(|s| NAMES[s]));
                let scan = set.rules().iter().position(|rule| {
                    let c = &rule.conditions;
                    (c.domains.is_empty() || c.domains.iter().any(|p| p.matches(recipient)))
                        && c.sender_matches(sender)
                });
                prop_assert_eq!(set.select(recipient, sender).base, scan);
            }
        }
    }
}
