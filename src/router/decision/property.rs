//! The whole decision against what it promises: for every rule (generated, and every rule
//! of the three shipped lists), every state of knowledge and everything a domain can
//! publish, what binds is never weakened.
//!
//! What binds, and what it forbids:
//! - MTA-STS `enforce`, usable DANE, a failed TLSA answer: never plain, never the legacy
//!   stack, never a certificate that did not verify (a failed TLSA answer: nothing at all);
//! - DANE with no usable TLSA record: never plain, never the legacy stack (RFC 7672 2.2:
//!   TLS required, unauthenticated);
//! - `tls: require`: never plain;
//! - `verify: require`: never the legacy stack, never a certificate that did not verify.
//!   (Its `fallback_on` may name certificate classes: plain instead, the admin's choice.)
//!
//! - the sender's REQUIRETLS: never plain, never the legacy stack, never a certificate
//!   that did not verify, whatever the rule; refused where neither a DNSSEC-secure MX
//!   answer nor the domain's policy vouches for the server's name.
//!
//! A rule that overrides a published policy (named domains, logged) is the rule's word,
//! but still never the legacy stack. And a failure an attacker on the path can cause,
//! cached for a host that did TLS recently (a certificate failure: verified TLS), is never
//! believed over that.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::cache::{ManualClock, Observation, OutcomeCache, TlsMemory};
use crate::outcome::{CertProblem, Distrust, LegacySession, TlsSession};
use crate::rules::RuleSet;

const ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

/// Every entry the cache can hold for a host: every class, observed or pinned.
fn entries() -> Vec<CacheEntry> {
    let mut entries = Vec::new();
    for class in OutcomeClass::ALL {
        for pinned in [false, true] {
            let cache = OutcomeCache::new(&Default::default(), Arc::new(ManualClock::new(1)));
            let observation = Observation {
                class,
                detail: match class {
                    OutcomeClass::HandshakeFailed => "received fatal alert: ProtocolVersion".into(),
                    _ => format!("{class} seen"),
                },
                tls_version: None,
                cipher: None,
                cert_subject: None,
                cert_not_after: None,
                cert_problem: class.is_encrypted().then_some(OutcomeClass::CertExpired),
            };
            cache.record("mx.example", ADDR, "example", observation);
            if pinned {
                let hour = std::time::Duration::from_secs(3600);
                cache
                    .pin("mx.example", Some(ADDR), class, hour)
                    .expect("pin");
            }
            entries.push(cache.get("mx.example", ADDR).expect("entry"));
        }
    }
    entries
}

use std::sync::Arc;

fn session(version: &str, verification: Verification) -> TlsSession {
    TlsSession {
        version: version.into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
        verification,
        chain: Vec::new(),
    }
}

/// Every kind of thing an attempt can find.
fn outcomes() -> Vec<TlsOutcome> {
    let problems = [
        CertProblem::Expired {
            not_after: "2026-03-01".into(),
        },
        CertProblem::NotYetValid {
            not_before: "2027-03-01".into(),
        },
        CertProblem::Untrusted {
            why: Distrust::SelfSigned,
            name_ok: false,
        },
        CertProblem::NameMismatch {
            presented: vec!["other.example".into()],
        },
    ];
    let mut outcomes = vec![
        TlsOutcome::Encrypted(session("TLSv1.3", Verification::Verified)),
        TlsOutcome::Encrypted(session("TLSv1.2", Verification::Verified)),
    ];
    for problem in &problems {
        outcomes.push(TlsOutcome::Encrypted(session(
            "TLSv1.3",
            Verification::Failed(problem.clone()),
        )));
    }
    for verification in [
        Verification::Verified,
        Verification::Failed(problems[0].clone()),
    ] {
        outcomes.push(TlsOutcome::Legacy(LegacySession {
            version: "TLSv1.0".into(),
            cipher: "TLS_RSA_WITH_AES_128_CBC_SHA".into(),
            verification,
            chain: Vec::new(),
        }));
    }
    let mut reasons = vec![
        NoTls::NoStarttls,
        NoTls::StarttlsRefused("454 4.7.0 TLS not available".into()),
        NoTls::HandshakeFailed("received fatal alert: ProtocolVersion".into()),
        NoTls::HandshakeFailed("connection reset".into()),
        NoTls::LegacyTls("protocol_version alert".into()),
        NoTls::LegacyFailed("no shared cipher".into()),
        NoTls::CertRejected(problems[0].clone()),
        NoTls::ProtocolViolation("bytes after the 220".into()),
        NoTls::NotWanted,
        NoTls::DaneMismatch("no match".into()),
    ];
    for class in OutcomeClass::ALL {
        reasons.push(NoTls::Cached {
            class,
            detail: format!("{class} seen"),
        });
    }
    outcomes.extend(reasons.into_iter().map(TlsOutcome::Plain));
    outcomes
}

const PUBLISHED: [Published; 7] = [
    Published::Nothing,
    Published::MtaSts {
        mode: StsMode::Enforce,
        mx_listed: true,
    },
    Published::MtaSts {
        mode: StsMode::Enforce,
        mx_listed: false,
    },
    Published::MtaSts {
        mode: StsMode::Testing,
        mx_listed: true,
    },
    Published::Dane(DaneState::Usable),
    Published::Dane(DaneState::Unusable),
    Published::Dane(DaneState::Bogus),
];

/// Every demand a message can make.
const DEMANDS: [Demand; 3] = [
    Demand::Nothing,
    Demand::RequireTls {
        name_authentic: true,
    },
    Demand::RequireTls {
        name_authentic: false,
    },
];

/// Checks the promises for one rule against every state of knowledge, every policy and
/// every demand of the message.
fn holds_for(rule: &Rule, entries: &[CacheEntry], outcomes: &[TlsOutcome]) -> Result<(), String> {
    let mut knowns = vec![(Known::Nothing, false)];
    for entry in entries {
        for memory in [TlsMemory::Nothing, TlsMemory::Tls, TlsMemory::VerifiedTls] {
            knowns.push((Known::cached(entry, memory), false));
        }
    }
    for outcome in outcomes {
        let unverified = matches!(
            outcome,
            TlsOutcome::Encrypted(TlsSession {
                verification: Verification::Failed(_),
                ..
            })
        );
        for downgrade in [false, true] {
            knowns.push((Known::Found { outcome, downgrade }, unverified));
        }
    }
    for (published, demand) in PUBLISHED.into_iter().flat_map(|p| DEMANDS.map(|d| (p, d))) {
        let requiretls = demand != Demand::Nothing;
        // The sender's REQUIRETLS is not the domain's to give up, nor a rule's.
        let over = !requiretls && overridden(rule, published);
        let strict = requiretls
            || !over
                && matches!(
                    published,
                    Published::MtaSts {
                        mode: StsMode::Enforce,
                        ..
                    } | Published::Dane(DaneState::Usable | DaneState::Bogus)
                );
        // REQUIRETLS to a name nothing vouches for: refused.
        let unvouched = demand
            == (Demand::RequireTls {
                name_authentic: false,
            })
            && !matches!(
                published,
                Published::MtaSts {
                    mode: StsMode::Enforce,
                    ..
                } | Published::Dane(_)
            );
        let unusable = !over && published == Published::Dane(DaneState::Unusable);
        let require_tls = rule.policy.tls == TlsMode::Require;
        let require_verify = rule.policy.verify == VerifyMode::Require;
        for (known, unverified) in &knowns {
            let decision = decide(rule, *known, published, demand);
            let says =
                || format!("rule {rule:?}, {known:?}, {published:?}, {demand:?}: {decision}");
            let plain = matches!(decision, HostDecision::Plain { .. });
            let legacy = decision == HostDecision::LegacyTls;
            if (strict || unusable || require_tls) && plain {
                return Err(format!("plain where it is forbidden: {}", says()));
            }
            if (strict || unusable || require_verify || over) && legacy {
                return Err(format!(
                    "the legacy stack where it is forbidden: {}",
                    says()
                ));
            }
            if strict || require_verify {
                if let HostDecision::Tls(terms) = decision
                    && terms.verify != VerifyMode::Require
                    && terms.authentication != Authentication::Tlsa
                {
                    return Err(format!("an unverified certificate allowed: {}", says()));
                }
                if *unverified && matches!(decision, HostDecision::Tls(_)) {
                    return Err(format!("an unverified certificate accepted: {}", says()));
                }
            }
            if !over
                && published == Published::Dane(DaneState::Bogus)
                && !matches!(decision, HostDecision::Refuse(_))
            {
                return Err(format!("a failed TLSA answer not deferred: {}", says()));
            }
            if unvouched && !matches!(decision, HostDecision::Refuse(_)) {
                return Err(format!(
                    "REQUIRETLS to a server whose name nothing vouches for: {}",
                    says()
                ));
            }
            if let Known::Cached { entry, memory } = known
                && attacker_could(entry.class, *memory)
                && !entry.pinned
                && decision != decide(rule, Known::Nothing, published, demand)
            {
                return Err(format!(
                    "a cached failure believed over recent TLS: {}",
                    says()
                ));
            }
        }
    }
    Ok(())
}

const FALLBACK_CLASSES: [&str; 9] = [
    "no-starttls",
    "starttls-refused",
    "handshake-failed",
    "legacy-tls",
    "cert-expired",
    "cert-not-yet-valid",
    "cert-untrusted",
    "cert-name-mismatch",
    "protocol-violation",
];

/// One rule as a file, from its choices.
#[allow(clippy::too_many_arguments)]
fn rule_file(
    tls: usize,
    verify: bool,
    tls13: bool,
    fallback_on: &[usize],
    relay: bool,
    defer: bool,
    legacy_plain: bool,
    route: usize,
    override_policy: bool,
) -> String {
    let classes: Vec<&str> = fallback_on.iter().map(|&i| FALLBACK_CLASSES[i]).collect();
    let mut text = String::from("rules:\n  - name: generated\n");
    text += if override_policy {
        "    match: { domains: [partner.example] }\n    override_published_policy: true\n"
    } else {
        "    match: { domains: [\"*\"] }\n"
    };
    text += &format!(
        "    tls: {}\n    verify: {}\n    min_tls: \"{}\"\n    fallback_on: [{}]\n",
        ["require", "opportunistic", "never"][tls],
        if verify { "require" } else { "try" },
        if tls13 { "1.3" } else { "1.2" },
        classes.join(", ")
    );
    if relay {
        text += "    fallback: { relay: \"127.0.0.1:2526\" }\n";
    }
    text += &format!(
        "    on_downgrade: {}\n    legacy_tls: {}\n",
        if defer { "defer" } else { "fallback" },
        if legacy_plain { "plain" } else { "encrypt" }
    );
    text += match route {
        1 => "    route: { smarthost: \"127.0.0.1:587\", tls: opportunistic }\n",
        2 => "    route: { smarthost: \"127.0.0.1:465\", tls: wrapper }\n",
        _ => "",
    };
    text
}

#[test]
fn every_rule_of_the_shipped_lists_keeps_what_binds() {
    let (entries, outcomes) = (entries(), outcomes());
    for (name, text) in [
        ("default", include_str!("../../../rules/default.yaml")),
        (
            "iis-tls-router",
            include_str!("../../../rules/iis-tls-router.yaml"),
        ),
        ("strict", include_str!("../../../rules/strict.yaml")),
    ] {
        let rules = RuleSet::parse(text, Path::new(name)).expect("a shipped list parses");
        for rule in rules.rules() {
            if let Err(why) = holds_for(rule, &entries, &outcomes) {
                panic!("rules/{name}.yaml: {why}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn no_generated_rule_weakens_what_binds(
        tls in 0..3usize,
        verify: bool,
        tls13: bool,
        fallback_on in prop::collection::vec(0..FALLBACK_CLASSES.len(), 0..5),
        relay: bool,
        defer: bool,
        legacy_plain: bool,
        route in 0..3usize,
        override_policy: bool,
    ) {
        let text = rule_file(
            tls, verify, tls13, &fallback_on, relay, defer, legacy_plain, route, override_policy,
        );
        let parsed = RuleSet::parse(&text, Path::new("generated.yaml"));
        prop_assume!(parsed.is_ok());
        let rules = parsed.expect("checked above");
        let result = holds_for(&rules.rules()[0], &entries(), &outcomes());
        prop_assert!(result.is_ok(), "{}\n{}", text, result.err().unwrap_or_default());
    }
}
