use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use super::*;
use crate::cache::{ManualClock, Observation, OutcomeCache};
use crate::outcome::{CLOSED_IN_HANDSHAKE, CertProblem, RESET_IN_HANDSHAKE, TlsSession};
use crate::rules::RuleSet;

/// The decision for a message that demands nothing of its own.
fn decide(rule: &Rule, known: Known<'_>, published: Published) -> HostDecision {
    super::decide(rule, known, published, Demand::Nothing)
}

fn rule(yaml: &str) -> Rule {
    let rules = RuleSet::parse(yaml, Path::new("r.yaml")).expect("rules");
    rules.rules()[0].clone()
}

/// The refusal's words, as a log line or a reply says them; panics on another decision.
fn refused(decision: &HostDecision) -> String {
    match decision {
        HostDecision::Refuse(refusal) => refusal.to_string(),
        other => panic!("not a refusal: {other}"),
    }
}

const ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

fn entry(class: OutcomeClass, pinned: bool) -> CacheEntry {
    let cache = OutcomeCache::new(
        &Default::default(),
        std::sync::Arc::new(ManualClock::new(1)),
    );
    if pinned {
        cache.record(
            "mx.example",
            ADDR,
            "example",
            Observation::unreachable(OutcomeClass::Timeout, "x"),
        );
        cache
            .pin(
                "mx.example",
                None,
                class,
                std::time::Duration::from_secs(60),
            )
            .expect("pin");
    } else {
        let obs = Observation {
            class,
            detail: format!("{class} seen"),
            tls_version: None,
            cipher: None,
            cert_subject: None,
            cert_not_after: None,
            cert_problem: class.is_encrypted().then_some(OutcomeClass::CertExpired),
        };
        cache.record("mx.example", ADDR, "example", obs);
    }
    cache.get("mx.example", ADDR).expect("entry")
}

fn expired_session() -> TlsOutcome {
    TlsOutcome::Encrypted(TlsSession {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
        verification: Verification::Failed(CertProblem::Expired {
            not_after: "2026-03-01".into(),
        }),
        chain: Vec::new(),
    })
}

#[test]
fn a_cached_expired_certificate_under_verify_try_is_tried_again_and_encrypts() {
    let rule = rule("rules:\n  - name: r\n    verify: try\n");
    let cached = entry(OutcomeClass::CertExpired, false);
    assert!(matches!(
        decide(
            &rule,
            Known::cached(&cached, TlsMemory::Nothing),
            Published::Nothing
        ),
        HostDecision::Tls(_)
    ));
    let found = expired_session();
    let after = Known::Found {
        outcome: &found,
        downgrade: false,
    };
    assert!(matches!(
        decide(&rule, after, Published::Nothing),
        HostDecision::Tls(_)
    ));
}

#[test]
fn a_cached_expired_certificate_under_verify_require_is_refused_without_a_handshake() {
    let rule = rule("rules:\n  - name: r\n    verify: require\n");
    let cached = entry(OutcomeClass::CertExpired, false);
    let decision = decide(
        &rule,
        Known::cached(&cached, TlsMemory::Nothing),
        Published::Nothing,
    );
    assert_eq!(
        decision,
        HostDecision::Refuse(Refusal::by_rule(NoTls::Cached {
            class: OutcomeClass::CertExpired,
            detail: "cert-expired seen".into()
        }))
    );
    assert_eq!(
        refused(&decision),
        "cert-expired seen (cached: not tried again until the entry expires or is flushed)"
    );
}

#[test]
fn no_starttls_is_checked_again_unless_pinned() {
    let rule = rule("rules:\n  - name: r\n");
    let seen = entry(OutcomeClass::NoStarttls, false);
    assert!(matches!(
        decide(
            &rule,
            Known::cached(&seen, TlsMemory::Nothing),
            Published::Nothing
        ),
        HostDecision::Tls(_)
    ));
    let pinned = entry(OutcomeClass::NoStarttls, true);
    assert!(matches!(
        decide(
            &rule,
            Known::cached(&pinned, TlsMemory::Nothing),
            Published::Nothing
        ),
        HostDecision::Plain {
            reason: NoTls::Cached {
                class: OutcomeClass::NoStarttls,
                ..
            },
            path: Fallback::Direct
        }
    ));
}

#[test]
fn a_cached_failure_an_attacker_can_cause_is_not_believed_over_recent_tls() {
    let lenient = rule("rules:\n  - name: r\n");
    let strict = rule("rules:\n  - name: r\n    on_downgrade: defer\n");
    for class in [
        OutcomeClass::NoStarttls,
        OutcomeClass::StarttlsRefused,
        OutcomeClass::HandshakeFailed,
        OutcomeClass::LegacyTls,
        OutcomeClass::ProtocolViolation,
    ] {
        let seen = entry(class, false);
        for rule in [&lenient, &strict] {
            assert!(
                matches!(
                    decide(
                        rule,
                        Known::cached(&seen, TlsMemory::Tls),
                        Published::Nothing
                    ),
                    HostDecision::Tls(_)
                ),
                "{class}: TLS is tried again"
            );
        }
        // Without recent TLS the cache is believed as before.
        if class != OutcomeClass::NoStarttls {
            assert!(!matches!(
                decide(
                    &lenient,
                    Known::cached(&seen, TlsMemory::Nothing),
                    Published::Nothing
                ),
                HostDecision::Tls(_)
            ));
        }
        // An operator's pin stands.
        let pinned = entry(class, true);
        assert!(!matches!(
            decide(
                &lenient,
                Known::cached(&pinned, TlsMemory::Tls),
                Published::Nothing
            ),
            HostDecision::Tls(_)
        ));
    }
    // A certificate failure is no downgrade: after TLS of any certificate the cache still
    // says what it says; after a certificate that verified, an attacker may show one
    // that does not, and TLS is tried again.
    let verify = rule("rules:\n  - name: r\n    verify: require\n");
    for class in [OutcomeClass::CertExpired, OutcomeClass::CertUntrusted] {
        let seen = entry(class, false);
        assert!(matches!(
            decide(
                &verify,
                Known::cached(&seen, TlsMemory::Tls),
                Published::Nothing
            ),
            HostDecision::Refuse(_)
        ));
        assert!(matches!(
            decide(
                &verify,
                Known::cached(&seen, TlsMemory::VerifiedTls),
                Published::Nothing
            ),
            HostDecision::Tls(_)
        ));
    }
}

#[test]
fn an_open_connection_is_admitted_only_by_a_decision_that_would_have_made_it() {
    let verified = TlsOutcome::Encrypted(TlsSession {
        version: "TLSv1.2".into(),
        cipher: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into(),
        verification: Verification::Verified,
        chain: Vec::new(),
    });
    let expired = expired_session();
    let plain = TlsOutcome::Plain(NoTls::NoStarttls);
    let relay: HostPort = "127.0.0.1:2526".to_string().try_into().expect("relay");
    let conn = |tls, authentication, relay| Connected {
        tls,
        authentication,
        relay,
    };
    let pkix = Authentication::Pkix;
    let lenient = decide(
        &rule("rules:\n  - name: r\n"),
        Known::Nothing,
        Published::Nothing,
    );
    assert!(lenient.admits(&conn(&verified, pkix, None)));
    assert!(lenient.admits(&conn(&expired, pkix, None)));
    assert!(!lenient.admits(&conn(&plain, pkix, None)));
    let enforce = decide(&rule("rules:\n  - name: r\n"), Known::Nothing, ENFORCE);
    assert!(enforce.admits(&conn(&verified, pkix, None)));
    assert!(!enforce.admits(&conn(&expired, pkix, None)));
    assert!(!enforce.admits(&conn(&verified, Authentication::Tlsa, None)));
    let tls13 = rule("rules:\n  - name: r\n    min_tls: \"1.3\"\n");
    assert!(
        !decide(&tls13, Known::Nothing, Published::Nothing).admits(&conn(&verified, pkix, None))
    );
    let dane = decide(
        &rule("rules:\n  - name: r\n"),
        Known::Nothing,
        Published::Dane(DaneState::Usable),
    );
    assert!(!dane.admits(&conn(&verified, pkix, None)));
    assert!(dane.admits(&conn(&verified, Authentication::Tlsa, None)));
    let never = decide(
        &rule("rules:\n  - name: r\n    tls: never\n"),
        Known::Nothing,
        Published::Nothing,
    );
    assert!(never.admits(&conn(&plain, pkix, None)));
    assert!(!never.admits(&conn(&plain, pkix, Some(&relay))));
    assert!(!never.admits(&conn(&verified, pkix, None)));
    let refused = HostDecision::Refuse(Refusal {
        under: None,
        reason: RefusalReason::NotInPolicy,
    });
    assert!(!refused.admits(&conn(&verified, pkix, None)));
}

#[test]
fn a_downgrade_defers_only_when_the_rule_says_so() {
    let found = TlsOutcome::Plain(NoTls::NoStarttls);
    let known = Known::Found {
        outcome: &found,
        downgrade: true,
    };
    let lenient = rule("rules:\n  - name: r\n");
    assert!(matches!(
        decide(&lenient, known, Published::Nothing),
        HostDecision::Plain { .. }
    ));
    let strict = rule("rules:\n  - name: r\n    on_downgrade: defer\n");
    let decision = decide(&strict, known, Published::Nothing);
    assert_eq!(
        decision,
        HostDecision::Refuse(Refusal {
            under: None,
            reason: RefusalReason::Downgrade(Some(OutcomeClass::NoStarttls))
        })
    );
    assert_eq!(
        refused(&decision),
        "downgrade: did TLS before, now no-starttls"
    );
}

#[test]
fn unreachable_addresses_are_skipped_whatever_the_rule() {
    for yaml in [
        "rules:\n  - name: r\n",
        "rules:\n  - name: r\n    tls: never\n",
    ] {
        let cached = entry(OutcomeClass::Timeout, false);
        assert!(matches!(
            decide(
                &rule(yaml),
                Known::cached(&cached, TlsMemory::Nothing),
                Published::Nothing
            ),
            HostDecision::Skip(_)
        ));
    }
}

#[test]
fn tls_never_goes_plain_whatever_is_cached() {
    let rule = rule("rules:\n  - name: r\n    tls: never\n");
    for class in OutcomeClass::ALL
        .into_iter()
        .filter(|c| !c.is_unreachable())
    {
        assert_eq!(
            decide(
                &rule,
                Known::cached(&entry(class, false), TlsMemory::Nothing),
                Published::Nothing
            ),
            HostDecision::Plain {
                reason: NoTls::NotWanted,
                path: Fallback::Direct
            },
            "{class}"
        );
    }
}

const ENFORCE: Published = Published::MtaSts {
    mode: StsMode::Enforce,
    mx_listed: true,
};

#[test]
fn an_enforced_policy_never_allows_plain_or_an_unverified_certificate() {
    let weak = [
        "rules:\n  - name: r\n    tls: never\n",
        "rules:\n  - name: r\n    verify: try\n",
        "rules:\n  - name: r\n    fallback_on: [no-starttls, cert-expired]\n    fallback: { relay: \"127.0.0.1:2526\" }\n",
    ];
    for yaml in weak {
        let rule = rule(yaml);
        let first = decide(&rule, Known::Nothing, ENFORCE);
        assert!(
            matches!(
                first,
                HostDecision::Tls(TlsTerms {
                    verify: VerifyMode::Require,
                    ..
                })
            ),
            "{yaml}: {first}"
        );
        for class in OutcomeClass::ALL
            .into_iter()
            .filter(|c| !c.is_unreachable())
        {
            for pinned in [false, true] {
                let cached = entry(class, pinned);
                let decision = decide(&rule, Known::cached(&cached, TlsMemory::Nothing), ENFORCE);
                assert!(
                    !matches!(decision, HostDecision::Plain { .. }),
                    "{yaml} {class}: {decision}"
                );
            }
        }
        let stripped = TlsOutcome::Plain(NoTls::NoStarttls);
        let found = Known::Found {
            outcome: &stripped,
            downgrade: false,
        };
        let decision = decide(&rule, found, ENFORCE);
        assert!(
            matches!(&decision, HostDecision::Refuse(r) if r.under == Some(Binding::MtaStsEnforce))
                && refused(&decision).starts_with("MTA-STS enforce: "),
            "{decision}"
        );
        let expired = expired_session();
        let found = Known::Found {
            outcome: &expired,
            downgrade: false,
        };
        assert!(
            matches!(decide(&rule, found, ENFORCE), HostDecision::Refuse(_)),
            "{yaml}"
        );
    }
}

#[test]
fn an_enforced_policy_refuses_mx_hosts_it_does_not_list() {
    let rule = rule("rules:\n  - name: r\n");
    let unlisted = Published::MtaSts {
        mode: StsMode::Enforce,
        mx_listed: false,
    };
    let decision = decide(&rule, Known::Nothing, unlisted);
    assert_eq!(
        decision,
        HostDecision::Refuse(Refusal {
            under: Some(Binding::MtaStsEnforce),
            reason: RefusalReason::NotInPolicy
        })
    );
    assert_eq!(
        refused(&decision),
        "MTA-STS enforce: not an MX host of the policy"
    );
}

#[test]
fn a_testing_policy_leaves_delivery_to_the_rules() {
    let rule = rule("rules:\n  - name: r\n    tls: never\n");
    let testing = Published::MtaSts {
        mode: StsMode::Testing,
        mx_listed: false,
    };
    assert_eq!(
        decide(&rule, Known::Nothing, testing),
        decide(&rule, Known::Nothing, Published::Nothing)
    );
}

#[test]
fn a_rule_overrides_an_enforced_policy_only_when_it_says_so_for_named_domains() {
    let yaml = "rules:\n  - name: r\n    match: { domains: [partner.example] }\n    tls: never\n    override_published_policy: true\n";
    let rule = rule(yaml);
    assert!(overridden(&rule, ENFORCE));
    assert!(matches!(
        decide(&rule, Known::Nothing, ENFORCE),
        HostDecision::Plain { .. }
    ));
    let wildcard = "rules:\n  - name: r\n    match: { domains: [\"*.example\"] }\n    override_published_policy: true\n";
    let error = RuleSet::parse(wildcard, Path::new("r.yaml")).expect_err("refused");
    assert!(error.to_string().contains("one by one"), "{error}");
}

#[test]
fn required_tls_never_goes_plain() {
    let rule = rule("rules:\n  - name: r\n    tls: require\n");
    for class in OutcomeClass::ALL {
        let decision = decide(
            &rule,
            Known::cached(&entry(class, true), TlsMemory::Nothing),
            Published::Nothing,
        );
        assert!(
            !matches!(decision, HostDecision::Plain { .. }),
            "{class}: {decision}"
        );
    }
}

#[test]
fn dane_requires_tls_whatever_the_rule_and_never_goes_plain() {
    let usable = Published::Dane(DaneState::Usable);
    let unusable = Published::Dane(DaneState::Unusable);
    for yaml in [
        "rules:\n  - name: r\n    tls: never\n",
        "rules:\n  - name: r\n    verify: try\n",
        "rules:\n  - name: r\n    fallback_on: [no-starttls, dane-mismatch]\n",
    ] {
        let rule = rule(yaml);
        assert!(
            matches!(
                decide(&rule, Known::Nothing, usable),
                HostDecision::Tls(TlsTerms {
                    verify: VerifyMode::Require,
                    ..
                })
            ),
            "{yaml}"
        );
        assert!(
            matches!(
                decide(&rule, Known::Nothing, unusable),
                HostDecision::Tls(TlsTerms {
                    verify: VerifyMode::Try,
                    ..
                })
            ),
            "{yaml}"
        );
        for reason in [
            NoTls::NoStarttls,
            NoTls::DaneMismatch("no match".into()),
            NoTls::LegacyTls("protocol_version alert".into()),
        ] {
            let outcome = TlsOutcome::Plain(reason);
            let found = Known::Found {
                outcome: &outcome,
                downgrade: false,
            };
            for published in [usable, unusable] {
                let decision = decide(&rule, found, published);
                assert!(
                    matches!(&decision, HostDecision::Refuse(r)
                        if matches!(r.under, Some(Binding::Dane | Binding::DaneUnusable)))
                        && refused(&decision).starts_with("DANE"),
                    "{yaml} {published:?}: {decision}"
                );
            }
        }
        // An unverified session is still TLS where the TLSA records are unusable.
        let expired = expired_session();
        let found = Known::Found {
            outcome: &expired,
            downgrade: false,
        };
        assert!(matches!(
            decide(&rule, found, unusable),
            HostDecision::Tls(_)
        ));
    }
}

#[test]
fn under_dane_the_decision_says_what_dane_requires_not_pkix() {
    let rule = rule("rules:\n  - name: r\n    tls: never\n");
    let usable = decide(&rule, Known::Nothing, Published::Dane(DaneState::Usable));
    assert_eq!(
        usable.to_string(),
        "TLS (STARTTLS required, TLS 1.2+, the certificate must match a usable TLSA record (DANE))"
    );
    let unusable = decide(&rule, Known::Nothing, Published::Dane(DaneState::Unusable));
    assert_eq!(
        unusable.to_string(),
        "TLS (STARTTLS required, TLS 1.2+, unauthenticated: no TLSA record is usable (DANE))"
    );
    let pkix = decide(&rule, Known::Nothing, ENFORCE);
    assert_eq!(
        pkix.to_string(),
        "TLS (STARTTLS when offered, TLS 1.2+, the certificate must verify)"
    );
}

#[test]
fn under_dane_what_pkix_cached_of_a_certificate_does_not_count() {
    let rule = rule("rules:\n  - name: r\n");
    let usable = Published::Dane(DaneState::Usable);
    for class in [
        OutcomeClass::CertExpired,
        OutcomeClass::CertNameMismatch,
        OutcomeClass::NoStarttls,
    ] {
        let cached = entry(class, true);
        assert!(
            matches!(
                decide(&rule, Known::cached(&cached, TlsMemory::Nothing), usable),
                HostDecision::Tls(_)
            ),
            "{class}"
        );
    }
    let unreachable = entry(OutcomeClass::Timeout, false);
    assert!(matches!(
        decide(
            &rule,
            Known::cached(&unreachable, TlsMemory::Nothing),
            usable
        ),
        HostDecision::Skip(_)
    ));
}

#[test]
fn a_bogus_tlsa_answer_defers_whatever_the_rule() {
    for yaml in [
        "rules:\n  - name: r\n",
        "rules:\n  - name: r\n    tls: never\n",
    ] {
        let decision = decide(
            &rule(yaml),
            Known::Nothing,
            Published::Dane(DaneState::Bogus),
        );
        assert!(
            matches!(&decision, HostDecision::Refuse(r)
                if r.reason == RefusalReason::TlsaUnknown && r.class() == Some(OutcomeClass::DnssecBogus))
                && refused(&decision).contains("dnssec-bogus"),
            "{decision}"
        );
    }
}

#[cfg(feature = "legacy-tls")]
#[test]
fn the_legacy_stack_is_chosen_only_for_legacy_servers_and_where_nothing_forbids_it() {
    let legacy = |reason: NoTls| TlsOutcome::Plain(reason);
    let found = |rule: &Rule, outcome: &TlsOutcome, published| {
        let known = Known::Found {
            outcome,
            downgrade: false,
        };
        decide(rule, known, published)
    };
    let default = rule("rules:\n  - name: r\n");
    let tls10 = legacy(NoTls::LegacyTls("protocol_version alert".into()));
    let cbc = legacy(NoTls::HandshakeFailed(
        "received fatal alert: HandshakeFailure".into(),
    ));
    let closed = legacy(NoTls::HandshakeFailed(CLOSED_IN_HANDSHAKE.into()));
    let reset = legacy(NoTls::HandshakeFailed(RESET_IN_HANDSHAKE.into()));
    for outcome in [&tls10, &cbc, &closed, &reset] {
        assert_eq!(
            found(&default, outcome, Published::Nothing),
            HostDecision::LegacyTls
        );
    }
    for other in [
        NoTls::HandshakeFailed("received fatal alert: BadCertificate".into()),
        NoTls::LegacyFailed("no shared cipher".into()),
        NoTls::NoStarttls,
    ] {
        let decision = found(&default, &legacy(other), Published::Nothing);
        assert!(matches!(decision, HostDecision::Plain { .. }), "{decision}");
    }
    for yaml in [
        "rules:\n  - name: r\n    legacy_tls: plain\n",
        "rules:\n  - name: r\n    verify: require\n",
        "rules:\n  - name: r\n    min_tls: \"1.3\"\n",
    ] {
        let decision = found(&rule(yaml), &tls10, Published::Nothing);
        assert!(
            matches!(decision, HostDecision::Plain { .. }),
            "{yaml}: {decision}"
        );
    }
    assert!(matches!(
        found(&default, &tls10, ENFORCE),
        HostDecision::Refuse(_)
    ));

    let cached = entry(OutcomeClass::TlsLegacy, false);
    assert_eq!(
        decide(
            &default,
            Known::cached(&cached, TlsMemory::Nothing),
            Published::Nothing
        ),
        HostDecision::LegacyTls
    );
    let strict = rule("rules:\n  - name: r\n    verify: require\n");
    assert!(matches!(
        decide(
            &strict,
            Known::cached(&cached, TlsMemory::Nothing),
            Published::Nothing
        ),
        HostDecision::Plain {
            reason: NoTls::Cached {
                class: OutcomeClass::LegacyTls,
                ..
            },
            ..
        }
    ));
    assert!(matches!(
        decide(
            &default,
            Known::cached(&cached, TlsMemory::Nothing),
            ENFORCE
        ),
        HostDecision::Refuse(_)
    ));
}

/// REQUIRETLS to a server whose name is vouched for, and to one whose name is not.
const REQUIRETLS: Demand = Demand::RequireTls {
    name_authentic: true,
};
const REQUIRETLS_UNVOUCHED: Demand = Demand::RequireTls {
    name_authentic: false,
};

fn refusal(decision: HostDecision) -> Refusal {
    match decision {
        HostDecision::Refuse(refusal) => refusal,
        other => panic!("not a refusal: {other}"),
    }
}

#[test]
fn requiretls_asks_verified_tls_of_the_most_lenient_rule_and_never_falls_back() {
    let lenient = rule(
        "rules:\n  - name: r\n    tls: never\n    fallback: { relay: \"relay.example:25\" }\n",
    );
    let first = super::decide(&lenient, Known::Nothing, Published::Nothing, REQUIRETLS);
    assert!(
        matches!(first, HostDecision::Tls(terms) if terms.verify == VerifyMode::Require),
        "{first}"
    );
    for found in [
        TlsOutcome::Plain(NoTls::NoStarttls),
        TlsOutcome::Plain(NoTls::HandshakeFailed("HandshakeFailure".into())),
        expired_session(),
    ] {
        let found = Known::Found {
            outcome: &found,
            downgrade: false,
        };
        let refused = refusal(super::decide(
            &lenient,
            found,
            Published::Nothing,
            REQUIRETLS,
        ));
        assert_eq!(refused.under, Some(Binding::RequireTls), "{refused}");
    }
    // A server known for the legacy stack gets no legacy TLS, nor a cached plain path.
    for class in [OutcomeClass::TlsLegacy, OutcomeClass::NoStarttls] {
        let pinned = entry(class, true);
        let cached = Known::cached(&pinned, TlsMemory::Nothing);
        let decision = super::decide(&lenient, cached, Published::Nothing, REQUIRETLS);
        assert!(
            matches!(decision, HostDecision::Refuse(_)),
            "{class}: {decision}"
        );
    }
}

#[test]
fn requiretls_refuses_a_server_whose_name_nothing_vouches_for() {
    let rule = rule("rules:\n  - name: r\n");
    let testing = Published::MtaSts {
        mode: StsMode::Testing,
        mx_listed: true,
    };
    for published in [Published::Nothing, testing] {
        let refused = refusal(super::decide(
            &rule,
            Known::Nothing,
            published,
            REQUIRETLS_UNVOUCHED,
        ));
        assert_eq!(
            (refused.under, refused.reason),
            (Some(Binding::RequireTls), RefusalReason::NameNotAuthentic)
        );
    }
    // An enforced MTA-STS policy vouches for the hosts it names, and only for those.
    let named = super::decide(&rule, Known::Nothing, ENFORCE, REQUIRETLS_UNVOUCHED);
    assert!(
        matches!(named, HostDecision::Tls(terms) if terms.verify == VerifyMode::Require),
        "{named}"
    );
    let unnamed = Published::MtaSts {
        mode: StsMode::Enforce,
        mx_listed: false,
    };
    let refused = refusal(super::decide(
        &rule,
        Known::Nothing,
        unnamed,
        REQUIRETLS_UNVOUCHED,
    ));
    assert_eq!(refused.reason, RefusalReason::NotInPolicy);
}

#[test]
fn requiretls_is_not_given_up_by_a_rule_that_overrides_the_domain() {
    let yaml = "rules:\n  - name: r\n    match: { domains: [partner.example] }\n    tls: never\n    override_published_policy: true\n";
    let rule = rule(yaml);
    let usable = Published::Dane(DaneState::Usable);
    let decision = super::decide(&rule, Known::Nothing, usable, REQUIRETLS);
    assert!(
        matches!(decision, HostDecision::Tls(terms) if terms.authentication == Authentication::Tlsa),
        "{decision}"
    );
    // With no usable TLSA record the certificate must verify (RFC 8689 4.2.1).
    let unusable = Published::Dane(DaneState::Unusable);
    let decision = super::decide(&rule, Known::Nothing, unusable, REQUIRETLS);
    assert!(
        matches!(decision, HostDecision::Tls(terms) if terms.verify == VerifyMode::Require),
        "{decision}"
    );
    let decision = super::decide(&rule, Known::Nothing, ENFORCE, REQUIRETLS);
    assert!(
        matches!(decision, HostDecision::Tls(terms) if terms.verify == VerifyMode::Require),
        "{decision}"
    );
}
