//! What the rules would do with a message, in words, without sending anything.

use std::fmt::Write;

use crate::outcome::OutcomeClass;
use crate::router::{TlsMode, VerifyMode};
use crate::rules::model::SmarthostTls;
use crate::rules::{Fallback, OnDowngrade, Route, Rule, RuleSet};

/// The question: a recipient, and optionally the sender, the MX host and its cached outcome.
pub struct Question<'a> {
    pub recipient_domain: &'a str,
    pub sender_domain: Option<&'a str>,
    pub mx: Option<&'a str>,
    /// The host's outcome class, then its certificate's class when it did not verify
    /// (as [`crate::cache::CacheEntry::classes`]); empty when nothing is known.
    pub outcome: &'a [OutcomeClass],
}

/// The rule that decides, and a description of the plan.
pub fn explain(rules: &RuleSet, q: &Question<'_>) -> (String, String) {
    let selection = rules.select(q.recipient_domain, q.sender_domain);
    let base = rules.rule(selection.base);
    let rule = selection
        .conditional
        .iter()
        .map(|&i| rules.rule(Some(i)))
        .find(|r| r.conditions.host_matches(q.mx.unwrap_or(""), q.outcome))
        .unwrap_or(base);
    let mut out = String::new();
    let at = if rule.line > 0 {
        format!("{}:{}", rules.source.display(), rule.line)
    } else {
        "no rule matched".to_string()
    };
    let _ = writeln!(out, "rule:        {:?} ({at})", rule.name);
    let _ = writeln!(out, "next hop:    {}", next_hop(base, q.recipient_domain));
    describe_policy(&mut out, rule);
    if let Some(&class) = q.outcome.first() {
        let names: Vec<&str> = q.outcome.iter().map(|c| c.name()).collect();
        let _ = writeln!(
            out,
            "with cached: {}: {}",
            names.join(" + "),
            with_cached(rule, class)
        );
    }
    let hosted: Vec<&str> = selection
        .conditional
        .iter()
        .map(|&i| rules.rule(Some(i)).name.as_str())
        .filter(|name| *name != rule.name)
        .collect();
    if !hosted.is_empty() {
        let _ = writeln!(
            out,
            "note:        for some MX hosts or cached outcomes these rules come first: {}",
            hosted.join(", ")
        );
    }
    (rule.name.clone(), out)
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
    let _ = writeln!(out, "certificate: {verify}");
    let _ = writeln!(out, "min tls:     {}", policy.min_tls.name());
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
    let downgrade = match rule.on_downgrade {
        OnDowngrade::Fallback => "logged as a warning, then as the plain rules say",
        OnDowngrade::Defer => "deferred with 451 4.7.5",
    };
    let _ = writeln!(out, "downgrade:   {downgrade}");
}

fn with_cached(rule: &Rule, class: OutcomeClass) -> String {
    use OutcomeClass::*;
    match class {
        TlsVerified | TlsUnverified => "TLS is tried as usual".into(),
        ConnectFailed | Timeout => "that address is skipped until the entry expires".into(),
        NoStarttls => "EHLO is checked again (it costs nothing)".into(),
        _ if rule.policy.allows_plain_after(Some(class)) => {
            "no new handshake: the message goes on the plain path".into()
        }
        _ => {
            "no new handshake: deferred with 451 4.7.5 until the entry expires or is flushed".into()
        }
    }
}
