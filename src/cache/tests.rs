use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::cache::persistence::FileError;
use crate::outcome::{CertProblem, NoTls, OutcomeClass, TlsOutcome, TlsSession, Verification};

const T0: u64 = 1_772_323_200;
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
}

fn cache_with(config: CacheConfig) -> (OutcomeCache, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    (OutcomeCache::new(&config, clock.clone()), clock)
}

fn new_cache() -> (OutcomeCache, Arc<ManualClock>) {
    cache_with(CacheConfig::default())
}

fn verified() -> Observation {
    Observation::from_outcome(&TlsOutcome::Encrypted(TlsSession {
        chain: Vec::new(),
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
        verification: Verification::Verified,
    }))
    .expect("encrypted sessions are observations")
}

fn plain(reason: NoTls) -> Observation {
    Observation::from_outcome(&TlsOutcome::Plain(reason)).expect("a TLS failure")
}

#[test]
fn a_host_the_legacy_stack_reached_still_gets_the_rule_for_legacy_servers() {
    let (cache, _) = new_cache();
    let legacy = Observation::from_outcome(&TlsOutcome::Legacy(crate::outcome::LegacySession {
        version: "TLSv1.0".into(),
        cipher: "TLS_RSA_WITH_AES_128_CBC_SHA".into(),
        verification: Verification::Verified,
        chain: Vec::new(),
    }))
    .expect("a legacy session is an observation");
    cache.record("mx.old.example", ip(1), "old.example", legacy);
    let entry = cache.find("mx.old.example").remove(0);
    assert_eq!(entry.class, OutcomeClass::TlsLegacy);

    let rules = crate::rules::RuleSet::parse(
        "rules:\n  - name: old-servers\n    match: { domains: [\"*\"], outcome: [legacy-tls] }\n    legacy_tls: plain\n  - name: everyone\n    match: { domains: [\"*\"] }\n",
        std::path::Path::new("rules.yaml"),
    )
    .expect("rules");
    let plan = crate::router::Plan::new(Arc::new(rules), "old.example", None);
    assert_eq!(
        plan.rule_for_host("mx.old.example", &entry.classes()).name,
        "old-servers"
    );
    assert_eq!(plan.rule_for_host("mx.old.example", &[]).name, "everyone");
}

#[test]
fn a_failure_expires_after_its_ttl_while_a_success_lives_longer() {
    let (cache, clock) = new_cache();
    cache.record("mx1.example.net", ip(1), "example.net", verified());
    cache.record(
        "mx2.example.net",
        ip(2),
        "example.net",
        plain(NoTls::HandshakeFailed("received fatal alert".into())),
    );
    cache.record(
        "mx3.example.net",
        ip(3),
        "example.net",
        Observation::unreachable(OutcomeClass::Timeout, "no answer in 30s"),
    );

    clock.advance(Duration::from_secs(5 * 60));
    assert!(
        cache.get("mx3.example.net", ip(3)).is_none(),
        "unreachable: 5m"
    );
    let failure = cache.get("mx2.example.net", ip(2)).expect("still fresh");
    assert_eq!(failure.class, OutcomeClass::HandshakeFailed);
    assert!(failure.detail.contains("received fatal alert"));

    clock.advance(HOUR);
    assert!(cache.get("mx2.example.net", ip(2)).is_none(), "failure: 1h");
    let success = cache.get("mx1.example.net", ip(1)).expect("success: 7d");
    assert_eq!(success.tls_version.as_deref(), Some("TLSv1.3"));

    clock.advance(7 * DAY);
    assert!(cache.get("mx1.example.net", ip(1)).is_none());
    assert!(cache.entries().is_empty());
}

#[test]
fn a_second_observation_counts_and_keeps_first_seen() {
    let (cache, clock) = new_cache();
    cache.record("mx.example.net", ip(1), "example.net", verified());
    clock.advance(HOUR);
    cache.record("MX.Example.NET.", ip(1), "example.net", verified());

    let entry = cache.get("mx.example.net.", ip(1)).expect("cached");
    assert_eq!(entry.host, "mx.example.net");
    assert_eq!(entry.count, 2);
    assert_eq!(entry.first_seen, T0);
    assert_eq!(entry.last_seen, T0 + 3600);
    assert_eq!(entry.expires_at, T0 + 3600 + 7 * 86_400);
    assert_eq!(cache.entries().len(), 1, "one host, one entry");
    assert!(
        cache.get("mx.example.net", ip(2)).is_none(),
        "keyed by address too"
    );
}

#[test]
fn domains_are_kept_latest_last_and_bounded() {
    let (cache, _) = new_cache();
    for domain in ["b.example", "A.example.", "b.example", ""] {
        cache.record("mx.example.net", ip(1), domain, verified());
    }
    let entry = cache.get("mx.example.net", ip(1)).expect("cached");
    assert_eq!(entry.domains, ["a.example", "b.example"]);

    for n in 0..40 {
        cache.record(
            "mx.example.net",
            ip(1),
            &format!("d{n:02}.example"),
            verified(),
        );
    }
    cache.record("mx.example.net", ip(1), "d30.example", verified());
    let entry = cache.get("mx.example.net", ip(1)).expect("cached");
    assert_eq!(entry.domains.len(), MAX_DOMAINS);
    assert_eq!(entry.domains[0], "d24.example", "the oldest went first");
    assert_eq!(
        entry.domains[MAX_DOMAINS - 1],
        "d30.example",
        "seen again: latest"
    );
    assert!(entry.matches("d39.example") && !entry.matches("a.example"));
}

#[test]
fn a_host_that_did_tls_and_now_offers_no_starttls_is_a_downgrade() {
    let (cache, clock) = new_cache();
    cache.record("mx.example.net", ip(1), "example.net", verified());
    clock.advance(DAY);
    cache.record(
        "mx.example.net",
        ip(1),
        "example.net",
        plain(NoTls::NoStarttls),
    );

    let entry = cache.get("mx.example.net", ip(1)).expect("cached");
    assert_eq!(entry.class, OutcomeClass::NoStarttls);
    assert_eq!(entry.last_tls_at, Some(T0), "kept across the failure");
    let (now, success) = (cache.now(), cache.ttl().success);
    assert!(is_downgrade(&entry, OutcomeClass::NoStarttls, now, success));
    // Any TLS failure after a success is a downgrade (STARTTLS refused, handshake broken).
    assert!(is_downgrade(
        &entry,
        OutcomeClass::HandshakeFailed,
        now,
        success
    ));
    assert!(cache.is_downgrade("mx.example.net", ip(1), OutcomeClass::NoStarttls));

    // The failure's 1h expires, but the memory of TLS does not, so the next message
    // still sees the downgrade, and a new failure keeps last_tls_at.
    clock.advance(2 * HOUR);
    assert!(cache.get("mx.example.net", ip(1)).is_none());
    assert!(cache.is_downgrade("mx.example.net", ip(1), OutcomeClass::NoStarttls));
    cache.record(
        "mx.example.net",
        ip(1),
        "example.net",
        plain(NoTls::NoStarttls),
    );
    let entry = cache.get("mx.example.net", ip(1)).expect("cached");
    assert_eq!((entry.last_tls_at, entry.first_seen), (Some(T0), T0));

    clock.set(T0 + 7 * 86_400);
    assert!(!cache.is_downgrade("mx.example.net", ip(1), OutcomeClass::NoStarttls));
    assert!(!is_downgrade(
        &entry,
        OutcomeClass::NoStarttls,
        cache.now(),
        success
    ));
}

#[test]
fn a_pin_overrides_observations_until_its_ttl() {
    let (cache, clock) = new_cache();
    cache.record(
        "mx.example.net",
        ip(1),
        "example.net",
        plain(NoTls::NoStarttls),
    );
    let pinned = cache
        .pin("mx.example.net", None, OutcomeClass::TlsVerified, 2 * HOUR)
        .expect("host is cached");
    assert_eq!(pinned, 1);

    clock.advance(HOUR);
    cache.record(
        "mx.example.net",
        ip(1),
        "other.example",
        plain(NoTls::NoStarttls),
    );
    let entry = cache.get("mx.example.net", ip(1)).expect("pinned");
    assert_eq!(entry.class, OutcomeClass::TlsVerified);
    assert_eq!(entry.detail, "pinned by operator");
    assert!(entry.pinned);
    assert_eq!(entry.count, 2);
    assert_eq!(entry.last_seen, T0 + 3600);
    assert_eq!(entry.domains, ["example.net", "other.example"]);

    clock.advance(HOUR);
    cache.record(
        "mx.example.net",
        ip(1),
        "example.net",
        plain(NoTls::NoStarttls),
    );
    let entry = cache.get("mx.example.net", ip(1)).expect("observed");
    assert_eq!(entry.class, OutcomeClass::NoStarttls);
    assert!(!entry.pinned);
}

fn untrusted() -> Observation {
    Observation::from_outcome(&TlsOutcome::Encrypted(TlsSession {
        chain: Vec::new(),
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
        verification: Verification::Failed(CertProblem::Untrusted {
            why: crate::outcome::Distrust::SelfSigned,
            name_ok: true,
        }),
    }))
    .expect("an observation")
}

#[test]
fn a_pin_of_another_class_drops_the_certificate_problem_found_before() {
    let (cache, _) = new_cache();
    cache.record("mx.example.net", ip(1), "example.net", untrusted());
    let before = cache.get("mx.example.net", ip(1)).expect("cached");
    assert_eq!(
        before.classes(),
        [OutcomeClass::TlsUnverified, OutcomeClass::CertUntrusted]
    );

    cache
        .pin("mx.example.net", None, OutcomeClass::NoStarttls, HOUR)
        .expect("cached");
    let entry = cache.get("mx.example.net", ip(1)).expect("pinned");
    assert_eq!(entry.cert_problem, None);
    assert_eq!(entry.classes(), [OutcomeClass::NoStarttls]);
    assert_eq!(entry.detail, "pinned by operator");

    cache
        .pin("mx.example.net", None, OutcomeClass::TlsUnverified, HOUR)
        .expect("cached");
    cache.record("mx.example.net", ip(2), "example.net", untrusted());
    cache
        .pin(
            "mx.example.net",
            Some(ip(2)),
            OutcomeClass::TlsUnverified,
            HOUR,
        )
        .expect("cached");
    let same = cache.get("mx.example.net", ip(2)).expect("pinned");
    assert_eq!(same.cert_problem, Some(OutcomeClass::CertUntrusted));
}

#[test]
fn pinning_an_uncached_host_needs_an_address() {
    let (cache, _) = new_cache();
    let err = cache
        .pin("mx.example.net", None, OutcomeClass::NoStarttls, HOUR)
        .expect_err("nothing cached");
    assert!(err.to_string().contains("mx.example.net"), "{err}");

    let pinned = cache.pin(
        "MX.example.net",
        Some(ip(9)),
        OutcomeClass::NoStarttls,
        HOUR,
    );
    assert_eq!(pinned.ok(), Some(1));
    let entry = cache.get("mx.example.net", ip(9)).expect("pinned");
    assert_eq!((entry.count, entry.class), (0, OutcomeClass::NoStarttls));
}

#[test]
fn flush_by_host_and_by_domain() {
    let (cache, _) = new_cache();
    cache.record("mx1.example.net", ip(1), "example.net", verified());
    cache.record("mx1.example.net", ip(2), "example.net", verified());
    cache.record("mx2.example.net", ip(3), "example.net", verified());
    cache.record("mx.other.example", ip(4), "other.example", verified());

    assert_eq!(cache.find("example.net").len(), 3);
    assert_eq!(cache.find("MX1.example.net").len(), 2);
    assert_eq!(cache.flush("mx1.example.net.").here, 2);
    assert!(cache.get("mx1.example.net", ip(1)).is_none());
    assert_eq!(cache.flush("example.net").here, 1);
    assert_eq!(cache.flush("example.net").here, 0);
    let left = cache.entries();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].host, "mx.other.example");
    assert_eq!(cache.flush_all().here, 1);
    assert!(cache.entries().is_empty());
}

#[test]
fn save_then_load_into_a_fresh_cache_restores_entries_and_drops_expired_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache.json");
    let (cache, _) = new_cache();
    let expired = CertProblem::Expired {
        not_after: "2026-03-01".into(),
    };
    cache.record("mx1.example.net", ip(1), "example.net", verified());
    cache.record(
        "mx2.example.net",
        ip(2),
        "example.net",
        plain(NoTls::CertRejected(expired)),
    );
    assert_eq!(cache.save(&path).expect("saved"), 2);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).expect("written").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let saved = cache.entries();

    let (fresh, _) = new_cache();
    assert_eq!(fresh.load(&path).expect("loaded"), Some(2));
    assert_eq!(fresh.entries(), saved);
    let cert = fresh.get("mx2.example.net", ip(2)).expect("restored");
    assert_eq!(cert.class, OutcomeClass::CertExpired);
    assert_eq!(cert.cert_not_after.as_deref(), Some("2026-03-01"));

    let (later, later_clock) = new_cache();
    later_clock.set(T0 + 2 * 3600);
    assert_eq!(
        later.load(&path).expect("loaded"),
        Some(1),
        "the 1h failure is gone"
    );
    assert_eq!(later.entries().len(), 1);

    let files = dir.path().read_dir().expect("dir").count();
    assert_eq!(files, 1, "no temporary file left behind");
    assert_eq!(
        fresh.load(&dir.path().join("missing.json")).ok(),
        Some(None),
        "no file yet is told apart from an empty one"
    );
}

#[test]
fn a_corrupt_file_is_reported_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cache, _) = new_cache();
    cache.record("mx.example.net", ip(1), "example.net", verified());
    for (name, text) in [
        ("truncated.json", r#"{"version":1,"entries":[{"host":"#),
        ("garbage.json", "\u{0}\u{1}not json"),
        ("future.json", r#"{"version":2,"entries":[]}"#),
        ("wrong.json", r#"{"version":1,"entries":[{"host":"mx"}]}"#),
    ] {
        let path = dir.path().join(name);
        fs::write(&path, text).expect("written");
        match cache.load(&path) {
            Err(err @ CacheError::File(FileError::Corrupt { .. })) => {
                assert!(err.to_string().contains(name), "{err}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(cache.entries().len(), 1);
}

#[test]
fn max_entries_bounds_the_size() {
    let config = CacheConfig {
        max_entries: 10,
        ..CacheConfig::default()
    };
    let (cache, _) = cache_with(config);
    for n in 0..100 {
        cache.record(
            &format!("mx{n}.example.net"),
            ip(1),
            "example.net",
            verified(),
        );
    }
    assert!(cache.len() <= 10, "{} entries", cache.len());
    assert!(
        cache.get("mx99.example.net", ip(1)).is_some(),
        "the newest kept"
    );
}

#[test]
fn purge_drops_only_what_is_neither_believed_nor_remembered() {
    let (cache, clock) = new_cache();
    cache.record("mx1.example.net", ip(1), "a.example", verified());
    cache.record(
        "mx1.example.net",
        ip(1),
        "a.example",
        plain(NoTls::NoStarttls),
    );
    cache.record(
        "mx2.example.net",
        ip(2),
        "b.example",
        plain(NoTls::NoStarttls),
    );
    clock.advance(2 * HOUR);
    assert_eq!(cache.purge(), 1);
    assert!(cache.is_downgrade("mx1.example.net", ip(1), OutcomeClass::NoStarttls));
}

#[test]
fn observations_carry_the_why() {
    let unverified = Observation::from_outcome(&TlsOutcome::Encrypted(TlsSession {
        chain: Vec::new(),
        version: "TLSv1.2".into(),
        cipher: "ECDHE".into(),
        verification: Verification::Failed(CertProblem::Expired {
            not_after: "2026-03-01".into(),
        }),
    }))
    .expect("observed");
    assert_eq!(unverified.class, OutcomeClass::TlsUnverified);
    assert_eq!(unverified.detail, "certificate expired on 2026-03-01");
    assert_eq!(unverified.cert_not_after.as_deref(), Some("2026-03-01"));
    assert_eq!(unverified.tls_version.as_deref(), Some("TLSv1.2"));

    let legacy = plain(NoTls::LegacyTls("protocol_version alert".into()));
    assert_eq!(legacy.class, OutcomeClass::LegacyTls);
    assert!(legacy.detail.contains("protocol_version alert"));
    assert_eq!(
        Observation::from_outcome(&TlsOutcome::Plain(NoTls::NotWanted)),
        None
    );
}

/// A certificate for `mx.example.net` valid until 2031-06-30.
fn certificate() -> rustls::pki_types::CertificateDer<'static> {
    let mut params =
        rcgen::CertificateParams::new(vec!["mx.example.net".to_string()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mx.example.net");
    params.not_after = rcgen::date_time_ymd(2031, 6, 30);
    let key = rcgen::KeyPair::generate().expect("key");
    params.self_signed(&key).expect("certificate").der().clone()
}

#[test]
fn every_encrypted_observation_keeps_the_certificate_subject_and_expiry() {
    let (cache, _) = new_cache();
    for (host, verification) in [
        ("mx1.example.net", Verification::Verified),
        (
            "mx2.example.net",
            Verification::Failed(CertProblem::NameMismatch { presented: vec![] }),
        ),
    ] {
        let session = TlsSession {
            chain: vec![certificate()],
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            verification,
        };
        let obs = Observation::from_outcome(&TlsOutcome::Encrypted(session)).expect("obs");
        cache.record(host, ip(1), "example.net", obs);
        let entry = cache.get(host, ip(1)).expect("cached");
        assert_eq!(entry.cert_subject.as_deref(), Some("CN=mx.example.net"));
        assert_eq!(entry.cert_not_after.as_deref(), Some("2031-06-30"));
    }
}

#[test]
fn a_file_from_before_the_certificate_subject_was_kept_still_loads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache.json");
    let old = format!(
        r#"{{"version":1,"entries":[{{"host":"mx.example.net","addr":"192.0.2.1",
        "domains":["example.net"],"class":"tls-verified","detail":"certificate verified",
        "tls_version":"TLSv1.3","cipher":"TLS13_AES_128_GCM_SHA256",
        "cert_not_after":null,"first_seen":{T0},"last_seen":{T0},"count":1,
        "expires_at":{},"pinned":false,"last_tls_at":{T0}}}]}}"#,
        T0 + 86_400
    );
    fs::write(&path, old).expect("written");
    let (cache, _) = new_cache();
    assert_eq!(cache.load(&path).expect("loaded"), Some(1));
    let entry = cache.get("mx.example.net", ip(1)).expect("restored");
    assert_eq!(
        (entry.class, entry.cert_subject),
        (OutcomeClass::TlsVerified, None)
    );
}

#[test]
fn the_config_reads_durations_and_defaults_the_rest() {
    let config: CacheConfig = serde_json::from_str(
        r#"{"file":"/var/lib/tlsrouter/cache.json","ttl":{"tls_failure":"30m"}}"#,
    )
    .expect("valid");
    assert_eq!(config.ttl.tls_failure, Duration::from_secs(1800));
    assert_eq!(config.ttl.success, 7 * DAY);
    assert_eq!(config.save_interval, Duration::from_secs(300));
    assert_eq!(config.max_entries, 100_000);
    assert!(serde_json::from_str::<CacheConfig>(r#"{"tll":{}}"#).is_err());
    assert!(serde_json::from_str::<CacheConfig>(r#"{"save_interval":"5x"}"#).is_err());
}
