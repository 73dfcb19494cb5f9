//! What the rules would do with a message, in words, without sending anything. The
//! statement about a cached host is the host decision's own answer ([`decide`]), so it is
//! what delivery does.

use std::fmt::Write;
use std::sync::Arc;

use crate::cache::{CacheEntry, TlsMemory};
use crate::outcome::{OutcomeClass, WhenCached};
use crate::router::Plan;
use crate::router::decision::{
    DaneState, Demand, HostDecision, Known, Published, StsMode, attacker_could, decide, overridden,
};
use crate::rules::model::SmarthostTls;
use crate::rules::{Fallback, OnDowngrade, Route, Rule, RuleSet, TlsMode, VerifyMode};

/// The question: a recipient, and optionally the sender, the MX host and what is known of
/// it.
pub struct Question<'a> {
    pub recipient_domain: &'a str,
    pub sender_domain: Option<&'a str>,
    pub mx: Option<&'a str>,
    /// What the cache holds, or would hold, for the MX host (see [`assumed_entry`]).
    pub cached: Option<CacheEntry>,
    /// What the MX host did within the success memory (see [`Known::Cached`]).
    pub memory: TlsMemory,
    /// What the domain publishes, as it bears on the MX host.
    pub published: Published,
    /// What the message demands (the sender's REQUIRETLS).
    pub demand: Demand,
}

/// The answer: the rule that decides, what the decision is with what is known, and the
/// whole plan in words.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub rule: String,
    /// What delivery does with the host, given `Question::cached` (nothing known: none).
    pub decision: HostDecision,
    pub text: String,
}

/// A cache entry as it would be after an attempt found `classes` (the class, then the
/// certificate's class when it did not verify), or after an operator pinned the first.
pub fn assumed_entry(host: &str, classes: &[OutcomeClass], pinned: bool) -> Option<CacheEntry> {
    let &class = classes.first()?;
    let addr = std::net::IpAddr::from([0, 0, 0, 0]);
    let mut entry = CacheEntry::assumed(host, addr, class, classes.get(1).copied());
    entry.pinned = pinned;
    Some(entry)
}

/// The rule that decides, and a description of the plan.
pub fn explain(rules: Arc<RuleSet>, q: &Question<'_>) -> Explanation {
    let plan = Plan::new(rules.clone(), q.recipient_domain, q.sender_domain);
    let base = plan.base_rule();
    let classes = q
        .cached
        .as_ref()
        .map(CacheEntry::classes)
        .unwrap_or_default();
    let rule = plan.rule_for_host(q.mx.unwrap_or(""), &classes);
    let known = (q.cached.as_ref()).map_or(Known::Nothing, |entry| Known::cached(entry, q.memory));
    let decision = decide(rule, known, q.published, q.demand);
    let mut out = String::new();
    let at = if rule.line > 0 {
        format!("{}:{}", rules.source.display(), rule.line)
    } else {
        "no rule matched".to_string()
    };
    let _ = writeln!(out, "rule:        {:?} ({at})", rule.name);
    let _ = writeln!(out, "next hop:    {}", next_hop(base, q.recipient_domain));
    describe_policy(&mut out, rule);
    if let Some(policy) = q.published.name() {
        let effect = if overridden(rule, q.published) {
            "overridden by this rule (override_published_policy)"
        } else if matches!(
            q.published,
            Published::MtaSts {
                mode: StsMode::Enforce,
                ..
            }
        ) {
            "verified TLS to the policy's MX hosts only; no plain, no relay"
        } else if let Published::Dane(state) = q.published {
            match state {
                DaneState::Usable => {
                    "TLS required, the certificate must match a TLSA record; no plain, no relay"
                }
                DaneState::Unusable => {
                    "TLSA records, none usable: TLS required, unauthenticated; no plain"
                }
                DaneState::Bogus => "the TLSA answer is bogus or failed: deferred, never plain",
            }
        } else {
            "reported only; the rules decide"
        };
        let _ = writeln!(out, "policy:      {policy}: {effect}");
    }
    if let Demand::RequireTls { name_authentic } = q.demand {
        let name = match name_authentic {
            true => "the MX answer is DNSSEC-secure",
            false => {
                "the MX answer is not DNSSEC-secure: only a host an MTA-STS enforce policy names"
            }
        };
        let _ = writeln!(
            out,
            "sender:      REQUIRETLS: verified TLS to a server that offers REQUIRETLS, never plain, never a relay; {name}"
        );
    }
    let first = decide(rule, Known::Nothing, q.published, q.demand);
    let _ = writeln!(out, "first try:   {first}");
    if let Some(entry) = &q.cached {
        let mut names: Vec<&str> = classes.iter().map(|c| c.name()).collect();
        names.dedup();
        let pinned = if entry.pinned { " (pinned)" } else { "" };
        // A failure an attacker on the path can cause is not believed over recent TLS.
        let after_tls = match entry.pinned || !attacker_could(entry.class, q.memory) {
            true => "",
            false if entry.class.meaning().downgrade => " after TLS within the success memory",
            false => " after verified TLS within the success memory",
        };
        let again = match entry.class.meaning().when_cached {
            _ if !after_tls.is_empty() => " (tried again)",
            WhenCached::TryTlsUnlessPinned if !entry.pinned => {
                " (EHLO is read again; STARTTLS is tried when offered)"
            }
            _ => "",
        };
        let _ = writeln!(
            out,
            "with cached: {}{pinned}{after_tls}: {decision}{again}",
            names.join(" + ")
        );
        // What the memory would change, when the question assumed none.
        let remembered = decide(
            rule,
            Known::cached(entry, TlsMemory::VerifiedTls),
            q.published,
            q.demand,
        );
        if after_tls.is_empty() && q.memory == TlsMemory::Nothing && remembered != decision {
            let (what, then) = match entry.class.meaning().downgrade {
                true => ("TLS", "a failure now is a downgrade"),
                false => ("verified TLS", "the certificate decides anew"),
            };
            let _ = writeln!(
                out,
                "after TLS:   the same from a host that did {what} within the success memory: \
                 {remembered} (tried again: {then})"
            );
        }
    }
    let hosted: Vec<&str> = plan
        .rule_names()
        .into_iter()
        .filter(|name| *name != rule.name && *name != base.name)
        .collect();
    if !hosted.is_empty() {
        let _ = writeln!(
            out,
            "note:        for some MX hosts or cached outcomes these rules come first: {}",
            hosted.join(", ")
        );
    }
    Explanation {
        rule: rule.name.clone(),
        decision,
        text: out,
    }
}

fn next_hop(rule: &Rule, domain: &str) -> String {
    match &rule.route {
        Route::Mx => format!("the MX hosts of {domain}"),
        Route::Smarthost { server, tls, auth } => {
            let tls = match tls {
                SmarthostTls::Require => "STARTTLS required",
                SmarthostTls::Opportunistic => "STARTTLS when offered",
                SmarthostTls::Wrapper => "implicit TLS",
            };
            let auth = if auth.is_some() { ", AUTH" } else { "" };
            format!("smarthost {server} ({tls}{auth})")
        }
    }
}

fn describe_policy(out: &mut String, rule: &Rule) {
    let policy = &rule.policy;
    let tls = match policy.tls {
        TlsMode::Require => "required (no TLS: deferred with 451 4.7.5)",
        TlsMode::Opportunistic => "opportunistic (STARTTLS whenever offered)",
        TlsMode::Never => "never (always plain)",
    };
    let verify = match policy.verify {
        VerifyMode::Require => "required (a bad certificate ends the TLS attempt)",
        VerifyMode::Try => "checked and logged; encrypted anyway",
    };
    let _ = writeln!(out, "tls:         {tls}");
    // Without TLS there is no certificate, version or downgrade to speak of.
    if policy.tls != TlsMode::Never {
        let _ = writeln!(out, "certificate: {verify}");
        let _ = writeln!(out, "min tls:     {}", policy.min_tls.name());
    }
    if policy.tls == TlsMode::Opportunistic {
        let classes: Vec<&str> = policy.fallback_on.iter().map(|c| c.name()).collect();
        let _ = writeln!(
            out,
            "plain after: {}",
            if classes.is_empty() {
                "nothing (defer)".into()
            } else {
                classes.join(", ")
            }
        );
    }
    if policy.tls != TlsMode::Require {
        let path = match &rule.fallback {
            Fallback::Direct => "the same server".to_string(),
            Fallback::Relay(relay) => format!("relay {relay}"),
        };
        let _ = writeln!(out, "plain path:  {path}");
    }
    let downgrade = match (policy.tls, rule.on_downgrade) {
        (TlsMode::Never, _) => return,
        // TLS required never goes plain, downgrade or not.
        (TlsMode::Require, _) | (_, OnDowngrade::Defer) => "deferred with 451 4.7.5",
        (TlsMode::Opportunistic, OnDowngrade::Fallback) => {
            "logged as a warning, then as the plain rules say"
        }
    };
    let _ = writeln!(out, "downgrade:   {downgrade}");
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::rules::pattern::DomainPattern;

    const SHIPPED: [(&str, &str); 3] = [
        ("default", include_str!("../../rules/default.yaml")),
        (
            "iis-tls-router",
            include_str!("../../rules/iis-tls-router.yaml"),
        ),
        ("strict", include_str!("../../rules/strict.yaml")),
    ];

    /// A name that `pattern` matches.
    fn example(pattern: Option<&DomainPattern>, fallback: &str) -> String {
        match pattern.map(ToString::to_string) {
            None => fallback.to_string(),
            Some(text) if text == "*" => fallback.to_string(),
            Some(text) => match text.strip_prefix("*.") {
                Some(suffix) => format!("a.{suffix}"),
                None => text,
            },
        }
    }

    /// Every class, observed and pinned, against every rule of the shipped lists:
    /// explain names the rule delivery would take for the host, and states the host
    /// decision's own answer for it.
    #[test]
    fn explain_states_what_delivery_decides_for_every_class_and_shipped_rule() {
        let mut checked = 0;
        for (list, text) in SHIPPED {
            let rules = Arc::new(RuleSet::parse(text, Path::new(list)).expect(list));
            for rule in rules.rules() {
                let c = &rule.conditions;
                let domain = example(c.domains.first(), "anything.example");
                let sender = c
                    .senders
                    .first()
                    .map(|p| example(Some(p), "sender.example"));
                let mx = example(c.mx.first(), "mx.anything.example");
                for class in OutcomeClass::ALL {
                    for pinned in [false, true] {
                        let question = Question {
                            recipient_domain: &domain,
                            sender_domain: sender.as_deref(),
                            mx: Some(&mx),
                            cached: assumed_entry(&mx, &[class], pinned),
                            memory: TlsMemory::Nothing,
                            published: Published::Nothing,
                            demand: Demand::Nothing,
                        };
                        let answer = explain(rules.clone(), &question);
                        // What delivery does: the same plan, the same host decision.
                        let plan = Plan::new(rules.clone(), &domain, sender.as_deref());
                        let entry = question.cached.as_ref().expect("entry");
                        let delivery_rule = plan.rule_for_host(&mx, &entry.classes());
                        let delivery = decide(
                            delivery_rule,
                            Known::cached(entry, TlsMemory::Nothing),
                            Published::Nothing,
                            Demand::Nothing,
                        );
                        let case = format!("{list}: {} with {class} (pinned: {pinned})", rule.name);
                        assert_eq!(answer.rule, delivery_rule.name, "{case}");
                        assert_eq!(answer.decision, delivery, "{case}");
                        let stated = answer
                            .text
                            .lines()
                            .find(|l| l.starts_with("with cached:"))
                            .unwrap_or_else(|| panic!("{case}: no statement in {}", answer.text));
                        assert!(stated.contains(&delivery.to_string()), "{case}: {stated}");
                        // What the words promise holds for the user.
                        if delivery_rule.policy.tls == TlsMode::Require {
                            assert!(!stated.contains(": plain"), "{case}: {stated}");
                        }
                        if class.is_unreachable() {
                            assert!(stated.contains("address skipped"), "{case}: {stated}");
                        }
                        // No words about TLS where there is none, no plain where there
                        // can be none.
                        let policy = &delivery_rule.policy;
                        let says = |start: &str| answer.text.lines().find(|l| l.starts_with(start));
                        if policy.tls == TlsMode::Never {
                            for line in ["certificate:", "min tls:", "downgrade:"] {
                                assert_eq!(says(line), None, "{case}: {}", answer.text);
                            }
                        }
                        if policy.tls == TlsMode::Require {
                            let downgrade = says("downgrade:").unwrap_or_default();
                            assert!(!downgrade.contains("plain"), "{case}: {downgrade}");
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, (1 + 3 + 2) * OutcomeClass::ALL.len() * 2);
    }
}
