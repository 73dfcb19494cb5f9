//! MTA-STS policies and TLS-RPT reports, against real parts: the test DNS server serving
//! `_mta-sts` and `_smtp._tls` TXT records, a real HTTPS server (hyper over tokio-rustls,
//! certificates from a test CA) serving policies and taking reports, and a real SMTP server
//! taking mailed reports.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::support::dns::{DnsServer, TestZone};
use crate::support::events::assert_fields;
use crate::support::https::{Answer, HttpsServer, POLICY_HOST, Seen, txt};
use crate::support::mta::verdict;
use crate::support::pki::{CertKey, TestCa, Validity, self_signed};
use crate::support::reports::{attachment_of, gunzip};
use crate::support::smtp_server::{ServerBehaviour, SmtpServer};
use tlsrouter::cache::{Clock, ManualClock};
use tlsrouter::net::dialer::Dialer;
use tlsrouter::net::dns::MxResolver;
use tlsrouter::net::https::HttpsClient;
use tlsrouter::outcome::OutcomeClass;
use tlsrouter::policy::mta_sts::{Mode, MtaStsConfig, PolicyErrorKind, PolicyLookup, PolicyStore};
use tlsrouter::policy::tlsrpt::sending::{ReportDelivery, SendError};
use tlsrouter::policy::tlsrpt::{
    PolicyFacts, Rua, SessionResult, SessionSite, TlsReports, TlsRptConfig, UtcDay,
};
use tlsrouter::stats::Stats;

const DOMAIN: &str = "example.test";
const POLICY_PATH: &str = "/.well-known/mta-sts.txt";
/// 2026-11-30T12:00:00Z.
const NOON: u64 = 1_796_040_000;
/// How long a test waits for anything before it fails.
const GUARD: Duration = Duration::from_secs(30);

const ENFORCE: &str = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.backup.example.test\r\nmax_age: 604800\r\n";

// ---------------------------------------------------------------------------------------
// The lab: DNS, a policy server, the store

fn zone_with_id(id: &str) -> TestZone {
    TestZone::new()
        .mx(DOMAIN, 10, "mx1.example.test")
        .a("mx1.example.test", Ipv4Addr::LOCALHOST)
        .record(
            &format!("_mta-sts.{DOMAIN}"),
            txt(&format!("v=STSv1; id={id};")),
        )
        .record(&format!("_mta-sts.{DOMAIN}"), txt("v=spf1 -all"))
}

struct Lab {
    dns: DnsServer,
    ca: TestCa,
    server: HttpsServer,
    clock: Arc<ManualClock>,
    stats: Arc<Stats>,
    store: Arc<PolicyStore>,
}

impl Lab {
    async fn start(answer: Answer) -> Lab {
        Lab::start_with(answer, MtaStsConfig::default(), None).await
    }

    async fn start_with(answer: Answer, config: MtaStsConfig, cert: Option<CertKey>) -> Lab {
        crate::support::init_tracing();
        let dns = DnsServer::start(zone_with_id("20261130a")).await;
        let ca = TestCa::new();
        let cert = cert.unwrap_or_else(|| ca.leaf(&[POLICY_HOST], Validity::Current));
        let server = HttpsServer::start(cert, answer).await;
        let clock = Arc::new(ManualClock::new(NOON));
        let stats = Arc::new(Stats::default());
        let store = new_store(&dns, &ca, &server, config, clock.clone(), stats.clone());
        Lab {
            dns,
            ca,
            server,
            clock,
            stats,
            store,
        }
    }

    async fn lookup(&self) -> PolicyLookup {
        tokio::time::timeout(GUARD, self.store.policy_for(DOMAIN))
            .await
            .expect("policy_for took longer than any bound")
    }
}

fn resolver(dns: &DnsServer) -> Arc<MxResolver> {
    Arc::new(MxResolver::new(&[dns.addr], Duration::from_secs(2)).expect("resolver"))
}

fn https_client(dns: &DnsServer, ca: &TestCa, routes: &[(&str, SocketAddr)]) -> Arc<HttpsClient> {
    let connect_to: HashMap<String, SocketAddr> =
        routes.iter().map(|(h, a)| (h.to_string(), *a)).collect();
    Arc::new(
        HttpsClient::new(
            ca.roots(),
            resolver(dns),
            connect_to,
            Dialer {
                timeout: Duration::from_secs(5),
                mark: None,
                source: None,
            },
            Duration::from_secs(10),
        )
        .expect("HTTPS client"),
    )
}

fn new_store(
    dns: &DnsServer,
    ca: &TestCa,
    server: &HttpsServer,
    config: MtaStsConfig,
    clock: Arc<ManualClock>,
    stats: Arc<Stats>,
) -> Arc<PolicyStore> {
    Arc::new(PolicyStore::new(
        config,
        resolver(dns),
        https_client(dns, ca, &[(POLICY_HOST, server.addr)]),
        clock,
        stats,
    ))
}

fn unavailable(lookup: &PolicyLookup) -> (PolicyErrorKind, String) {
    match lookup {
        PolicyLookup::Unavailable(e) => (e.kind, e.detail.clone()),
        other => panic!("expected no policy and an error to report, got {other:?}"),
    }
}

fn found(lookup: &PolicyLookup) -> Arc<tlsrouter::policy::mta_sts::StsPolicy> {
    match lookup {
        PolicyLookup::Found(policy) => policy.clone(),
        other => panic!("expected a policy, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Fetching and parsing

#[tokio::test]
async fn a_good_policy_is_fetched_over_verified_https_and_parsed() {
    let lab = Lab::start(Answer::policy(ENFORCE)).await;

    let policy = found(&lab.lookup().await);

    assert_eq!(policy.domain, DOMAIN);
    assert_eq!(policy.id, "20261130a");
    assert_eq!(policy.mode, Mode::Enforce);
    assert_eq!(policy.max_age, 604_800);
    assert_eq!(policy.fetched_at, NOON);
    assert_eq!(policy.expires_at, NOON + 604_800);
    assert_eq!(policy.raw, ENFORCE);
    assert!(policy.mx_matches("mx1.example.test"));
    assert!(policy.mx_matches("mx2.backup.example.test"));
    assert!(!policy.mx_matches("backup.example.test"));
    assert!(!policy.mx_matches("evil.example.org"));
    let seen = lab.server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", POLICY_PATH)
    );
    assert_eq!(seen[0].host, POLICY_HOST);
    assert_eq!(lab.stats.sts_fetches.get(), 1);
    assert_eq!(lab.stats.sts_fetch_failures.get(), 0);
    assert!(
        lab.stats
            .prometheus_text()
            .contains("tlsrouter_mta_sts_fetches_total 1")
    );
}

#[tokio::test]
async fn a_domain_without_an_mta_sts_record_has_no_policy_and_nothing_is_fetched() {
    let lab = Lab::start(Answer::policy(ENFORCE)).await;
    lab.dns
        .replace_zone(TestZone::new().mx(DOMAIN, 10, "mx1.example.test"));

    assert_eq!(lab.lookup().await, PolicyLookup::NotPublished);
    assert!(lab.server.seen().is_empty());
}

#[tokio::test]
async fn a_malformed_policy_counts_as_none_and_is_reported_as_sts_policy_invalid() {
    let broken = "version: STSv1\nmode: enforce-ish\nmx: mx1.example.test\nmax_age: 86400\n";
    let lab = Lab::start(Answer::policy(broken)).await;

    let lookup = lab.lookup().await;

    let (kind, detail) = unavailable(&lookup);
    assert_eq!(kind, PolicyErrorKind::Invalid);
    assert!(detail.contains("unknown mode"), "{detail}");
    assert!(lookup.policy().is_none());
    assert_eq!(lookup.label(), "mta-sts:sts-policy-invalid");
    assert_eq!(lab.stats.sts_fetch_failures.get(), 1);
    let PolicyLookup::Unavailable(error) = &lookup else {
        unreachable!()
    };
    assert_eq!(
        SessionResult::from_policy_error(error),
        SessionResult::Failure {
            result_type: tlsrouter::policy::tlsrpt::ResultType::StsPolicyInvalid,
            reason_code: None
        }
    );
}

#[tokio::test]
async fn an_oversized_policy_body_counts_as_none_and_is_reported() {
    let padded = format!("{ENFORCE}{}", "x-pad: yes\n".repeat(7000));
    assert!(padded.len() > 64 * 1024);
    let lab = Lab::start(Answer::policy(&padded)).await;

    let (kind, detail) = unavailable(&lab.lookup().await);

    assert_eq!(kind, PolicyErrorKind::FetchError);
    assert!(detail.contains("larger than 65536"), "{detail}");
}

#[tokio::test]
async fn a_redirect_is_refused_and_not_followed() {
    let lab = Lab::start(Answer {
        status: 301,
        content_type: "text/plain",
        body: String::new(),
        location: Some("https://mta-sts.example.test/elsewhere.txt"),
    })
    .await;

    let (kind, detail) = unavailable(&lab.lookup().await);

    assert_eq!(kind, PolicyErrorKind::FetchError);
    assert!(detail.contains("redirects are not followed"), "{detail}");
    let paths: Vec<String> = lab.server.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, [POLICY_PATH]);
}

#[tokio::test]
async fn a_reply_that_is_not_text_plain_is_refused() {
    let lab = Lab::start(Answer {
        content_type: "text/html",
        ..Answer::policy(ENFORCE)
    })
    .await;

    let (kind, detail) = unavailable(&lab.lookup().await);

    assert_eq!(kind, PolicyErrorKind::FetchError);
    assert!(detail.contains("text/html"), "{detail}");
}

#[tokio::test]
async fn a_bad_certificate_on_the_policy_host_is_reported_as_sts_webpki_invalid() {
    let lab = Lab::start_with(
        Answer::policy(ENFORCE),
        MtaStsConfig::default(),
        Some(self_signed(&[POLICY_HOST])),
    )
    .await;

    let (kind, _) = unavailable(&lab.lookup().await);

    assert_eq!(kind, PolicyErrorKind::WebpkiInvalid);
    assert!(
        lab.server.seen().is_empty(),
        "no request over an unverified connection"
    );
}

// ---------------------------------------------------------------------------------------
// The store

#[tokio::test]
async fn an_unchanged_id_uses_the_cached_policy_and_a_new_id_fetches_again() {
    let lab = Lab::start(Answer::policy(ENFORCE)).await;
    found(&lab.lookup().await);
    lab.clock.advance(Duration::from_secs(3600));

    let again = found(&lab.lookup().await);
    assert_eq!(again.fetched_at, NOON, "the cached policy, not a new fetch");
    assert_eq!(lab.server.seen().len(), 1);

    let testing = ENFORCE.replace("mode: enforce", "mode: testing");
    lab.server.answer(Answer::policy(&testing));
    lab.dns.replace_zone(zone_with_id("20261130b"));
    let changed = found(&lab.lookup().await);

    assert_eq!(lab.server.seen().len(), 2);
    assert_eq!(changed.id, "20261130b");
    assert_eq!(changed.mode, Mode::Testing);
    assert_eq!(changed.fetched_at, NOON + 3600);
}

#[tokio::test]
async fn a_failed_fetch_keeps_the_cached_policy_and_is_retried_only_after_a_while() {
    let lab = Lab::start(Answer::policy(ENFORCE)).await;
    found(&lab.lookup().await);

    lab.server.answer(Answer {
        status: 500,
        ..Answer::policy("")
    });
    lab.dns.replace_zone(zone_with_id("20261130b"));
    let kept = found(&lab.lookup().await);
    assert_eq!((kept.id.as_str(), kept.mode), ("20261130a", Mode::Enforce));
    assert_eq!(lab.server.seen().len(), 2);
    assert_eq!(lab.stats.sts_fetch_failures.get(), 1);

    // Within the retry interval, no new fetch.
    lab.clock.advance(Duration::from_secs(60));
    found(&lab.lookup().await);
    assert_eq!(lab.server.seen().len(), 2);

    // A vanished record does not drop the policy either.
    lab.dns
        .replace_zone(TestZone::new().mx(DOMAIN, 10, "mx1.example.test"));
    assert_eq!(found(&lab.lookup().await).id, "20261130a");

    // After the retry interval, with the record back and the server mended, it is fetched.
    lab.clock.advance(Duration::from_secs(5 * 60));
    lab.dns.replace_zone(zone_with_id("20261130b"));
    lab.server.answer(Answer::policy(ENFORCE));
    assert_eq!(found(&lab.lookup().await).id, "20261130b");
    assert_eq!(lab.server.seen().len(), 3);
}

#[tokio::test]
async fn a_policy_is_refetched_before_it_expires() {
    let lab = Lab::start(Answer::policy(ENFORCE)).await;
    found(&lab.lookup().await);

    // Past half its max_age, the same id is fetched again; the new copy lives longer.
    lab.clock.advance(Duration::from_secs(604_800 / 2 + 1));
    let renewed = found(&lab.lookup().await);

    assert_eq!(lab.server.seen().len(), 2);
    assert!(renewed.expires_at > NOON + 604_800);
}

#[tokio::test]
async fn a_policy_nobody_mails_to_is_still_refreshed_before_it_expires() {
    let config = MtaStsConfig {
        refresh_interval: Duration::from_millis(20),
        ..MtaStsConfig::default()
    };
    let lab = Lab::start_with(Answer::policy(ENFORCE), config, None).await;
    found(&lab.lookup().await);
    tokio::spawn(lab.store.clone().refresh_periodically());

    // No message asks for it; once half its max_age is gone, the store fetches it itself.
    lab.clock.advance(Duration::from_secs(604_800 / 2 + 1));
    tokio::time::timeout(GUARD, lab.server.wait_for_requests(2))
        .await
        .expect("the due policy was not refreshed in the background");

    // A message now joins that refresh or finds its result: no third fetch.
    let renewed = found(&lab.lookup().await);
    assert!(renewed.expires_at > NOON + 604_800);
    assert_eq!(renewed.fetched_at, NOON + 604_800 / 2 + 1);
    assert_eq!(lab.server.seen().len(), 2);
}

#[tokio::test]
async fn a_slow_fetch_does_not_hold_the_message_and_the_next_one_has_the_policy() {
    let config = MtaStsConfig {
        wait: Duration::from_millis(300),
        ..MtaStsConfig::default()
    };
    let lab = Lab::start_with(Answer::policy(ENFORCE), config, None).await;
    lab.server.hold_answers();

    // The server has the request and holds its answer: the lookup gives up waiting.
    let first = lab.lookup().await;
    assert_eq!(first, PolicyLookup::NotYet);
    lab.server.wait_for_requests(1).await;

    lab.server.release_answers();
    let second = lab.lookup().await;

    assert_eq!(found(&second).mode, Mode::Enforce);
    assert_eq!(
        lab.server.seen().len(),
        1,
        "the fetch went on; no second one was started"
    );
}

#[tokio::test]
async fn policies_and_todays_counts_survive_a_restart_through_the_cache_file() {
    crate::support::init_tracing();
    let dir = tempfile::tempdir().expect("temporary directory");
    let dns = DnsServer::start(zone_with_id("20261130a")).await;
    let ca = TestCa::new();
    let server = HttpsServer::start(
        ca.leaf(&[POLICY_HOST], Validity::Current),
        Answer::policy(ENFORCE),
    )
    .await;
    let ca_file = ca.write_ca_file(dir.path());
    let mut config = crate::support::proxy::test_config(dns.addr, &ca_file, 25);
    config.cache.file = Some(dir.path().join("cache.json"));
    config.admin.socket = None;
    config
        .mta_sts
        .connect_to
        .insert(POLICY_HOST.into(), server.addr);

    let proxy = tlsrouter::Proxy::new(config.clone()).expect("proxy");
    let before = found(&proxy.policies.policy_for(DOMAIN).await);
    let success = SessionResult::from_class(OutcomeClass::TlsVerified).expect("a TLS session");
    let facts = PolicyFacts::sts(&before);
    proxy
        .tls_reports
        .record(DOMAIN, &facts, &success, &SessionSite::default());
    proxy.save_cache();
    assert!(dir.path().join("cache.mta-sts.json").exists());
    drop(proxy);

    // After the restart the policy server is gone: the policy must come from the file.
    drop(server);
    let restarted = tlsrouter::Proxy::new(config).expect("proxy after restart");
    assert_eq!(restarted.policies.cached(DOMAIN).as_deref(), Some(&*before));
    let after = found(&restarted.policies.policy_for(DOMAIN).await);
    assert_eq!(after.fetched_at, before.fetched_at);
    assert_eq!(restarted.stats.sts_fetches.get(), 0);
    // The day's TLS-RPT counts came back too.
    let counts = restarted.tls_reports.counts(restarted.tls_reports.today());
    assert_eq!(counts.len(), 1);
    assert_eq!(
        (counts[0].domain.as_str(), counts[0].successes),
        (DOMAIN, 1)
    );
}

// ---------------------------------------------------------------------------------------
// TLS-RPT

const RUA_HOST: &str = "reports.example.test";

struct ReportLab {
    dir: tempfile::TempDir,
    reports: TlsReports,
    clock: Arc<ManualClock>,
    /// The HTTPS server at `reports.example.test`, when the lab has one.
    report_server: Option<HttpsServer>,
    _dns: DnsServer,
    _policy_server: HttpsServer,
}

/// Counts a day of sessions to example.test under its policy, and one to other.test with
/// none. With `https_rua`, an HTTPS server for `reports.example.test` takes reports.
async fn report_lab(rua: &str, https_rua: bool, relay: Option<SocketAddr>) -> ReportLab {
    let lab = Lab::start(Answer::policy(ENFORCE)).await;
    let sts_policy = found(&lab.lookup().await);
    let report_server = if https_rua {
        let answer = Answer {
            status: 201,
            content_type: "text/plain",
            body: "thanks".into(),
            location: None,
        };
        Some(HttpsServer::start(lab.ca.leaf(&[RUA_HOST], Validity::Current), answer).await)
    } else {
        None
    };
    let zone = zone_with_id("20261130a")
        .record(
            &format!("_smtp._tls.{DOMAIN}"),
            txt(&format!("v=TLSRPTv1; rua={rua}")),
        )
        .record(
            "_smtp._tls.other.test",
            txt("v=TLSRPTv1; rua=mailto:nobody@other.test"),
        );
    lab.dns.replace_zone(zone);
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = TlsRptConfig {
        directory: Some(dir.path().to_path_buf()),
        mail_relay: relay,
        organization_name: Some("Relay Org".into()),
        ..TlsRptConfig::default()
    };
    let routes: Vec<(&str, SocketAddr)> =
        report_server.iter().map(|s| (RUA_HOST, s.addr)).collect();
    let reports = TlsReports::new(
        config,
        "relay.test",
        resolver(&lab.dns),
        https_client(&lab.dns, &lab.ca, &routes),
        lab.clock.clone(),
        tlsrouter::net::dialer::Dialer {
            timeout: Duration::from_secs(5),
            mark: None,
            source: None,
        },
        crate::support::proxy::test_config(lab.dns.addr, std::path::Path::new("unused"), 25)
            .timeouts,
    )
    .expect("TLS-RPT reports");

    let facts = PolicyFacts::sts(&sts_policy);
    let at = |mx: &str, last: u8| SessionSite {
        receiving_mx: Some(mx.into()),
        receiving_ip: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))),
        sending_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))),
    };
    let class = |c| SessionResult::from_class(c).expect("a TLS session");
    for _ in 0..3 {
        reports.record(
            DOMAIN,
            &facts,
            &class(OutcomeClass::TlsVerified),
            &at("mx1.example.test", 1),
        );
    }
    for _ in 0..2 {
        reports.record(
            DOMAIN,
            &facts,
            &class(OutcomeClass::NoStarttls),
            &at("mx1.example.test", 1),
        );
    }
    reports.record(
        DOMAIN,
        &facts,
        &class(OutcomeClass::CertExpired),
        &at("mx2.backup.example.test", 2),
    );
    reports.record(
        DOMAIN,
        &facts,
        &class(OutcomeClass::LegacyTls),
        &at("mx1.example.test", 1),
    );
    reports.record(
        DOMAIN,
        &facts,
        &SessionResult::mx_not_in_policy(),
        &at("evil.example.org", 9),
    );
    reports.record(
        "Other.Test.",
        &PolicyFacts::NoPolicyFound,
        &class(OutcomeClass::TlsVerified),
        &SessionSite::default(),
    );
    ReportLab {
        dir,
        reports,
        clock: lab.clock.clone(),
        report_server,
        _dns: lab.dns,
        _policy_server: lab.server,
    }
}

fn today(lab: &ReportLab) -> UtcDay {
    UtcDay::of(lab.clock.now())
}

#[tokio::test]
async fn the_day_report_is_rfc_8460_json_with_the_right_result_types() {
    let lab = report_lab("mailto:tlsrpt@example.test", false, None).await;

    let report = lab.reports.report(today(&lab), DOMAIN).expect("a report");

    assert_eq!(report["organization-name"], "Relay Org");
    assert_eq!(report["contact-info"], "postmaster@relay.test");
    assert_eq!(
        report["date-range"]["start-datetime"],
        "2026-11-30T00:00:00Z"
    );
    assert_eq!(report["date-range"]["end-datetime"], "2026-11-30T23:59:59Z");
    assert!(
        report["report-id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    let policies = report["policies"].as_array().expect("policies");
    assert_eq!(policies.len(), 1);
    let policy = &policies[0];
    assert_eq!(policy["policy"]["policy-type"], "sts");
    assert_eq!(policy["policy"]["policy-domain"], DOMAIN);
    assert_eq!(
        policy["policy"]["mx-host"],
        serde_json::json!(["mx1.example.test", "*.backup.example.test"])
    );
    assert_eq!(
        policy["policy"]["policy-string"],
        serde_json::json!([
            "version: STSv1",
            "mode: enforce",
            "mx: mx1.example.test",
            "mx: *.backup.example.test",
            "max_age: 604800"
        ])
    );
    assert_eq!(policy["summary"]["total-successful-session-count"], 3);
    assert_eq!(policy["summary"]["total-failure-session-count"], 5);
    let details = policy["failure-details"]
        .as_array()
        .expect("failure details");
    let find = |result_type: &str| {
        details
            .iter()
            .find(|d| d["result-type"] == result_type)
            .unwrap_or_else(|| panic!("no {result_type} in {details:?}"))
    };
    let no_tls = find("starttls-not-supported");
    assert_eq!(no_tls["failed-session-count"], 2);
    assert_eq!(no_tls["receiving-mx-hostname"], "mx1.example.test");
    assert_eq!(no_tls["receiving-ip"], "192.0.2.1");
    assert_eq!(no_tls["sending-mta-ip"], "198.51.100.1");
    assert_eq!(
        find("certificate-expired")["receiving-mx-hostname"],
        "mx2.backup.example.test"
    );
    let validation: Vec<_> = details
        .iter()
        .filter(|d| d["result-type"] == "validation-failure")
        .map(|d| {
            d["failure-reason-code"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(validation.len(), 2);
    assert!(
        validation.contains(&"legacy-tls".to_string()),
        "{validation:?}"
    );
    assert!(
        validation.contains(&"mx-not-in-policy".to_string()),
        "{validation:?}"
    );

    let other = lab
        .reports
        .report(today(&lab), "other.test")
        .expect("a report for other.test");
    assert_eq!(
        other["policies"][0]["policy"]["policy-type"],
        "no-policy-found"
    );
    assert_eq!(
        other["policies"][0]["summary"]["total-successful-session-count"],
        1
    );

    let counts = lab.reports.counts(today(&lab));
    let example = counts.iter().find(|c| c.domain == DOMAIN).expect("counts");
    assert_eq!((example.successes, example.failures), (3, 5));
    assert_eq!(example.failure_types.get("validation-failure"), Some(&2));
}

fn delivered_to<'a>(deliveries: &'a [ReportDelivery], rua: &Rua) -> &'a ReportDelivery {
    deliveries
        .iter()
        .find(|d| &d.rua == rua)
        .unwrap_or_else(|| panic!("no delivery to {rua} in {deliveries:?}"))
}

#[tokio::test]
async fn the_report_is_posted_gzipped_to_an_https_rua_and_written_to_the_directory() {
    let url = format!("https://{RUA_HOST}/v1/tlsrpt");
    let lab = report_lab(&url, true, None).await;
    let day = today(&lab);
    let expected = lab.reports.report(day, DOMAIN).expect("a report");

    let deliveries = lab.reports.send_reports(day).await;

    let delivery = delivered_to(&deliveries, &Rua::Https(url));
    assert!(delivery.result.is_ok(), "{delivery:?}");
    let server = lab.report_server.as_ref().expect("the report server");
    let posts: Vec<Seen> = server
        .seen()
        .into_iter()
        .filter(|s| s.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].path, "/v1/tlsrpt");
    assert_eq!(posts[0].host, RUA_HOST);
    assert_eq!(posts[0].content_type, "application/tlsrpt+gzip");
    assert_eq!(gunzip(&posts[0].body), expected);
    let file = std::fs::read(delivery.file.as_ref().expect("written")).expect("the report file");
    assert_eq!(gunzip(&file), expected);
    let name = format!(
        "relay.test!{DOMAIN}!{}!{}.json.gz",
        day.start(),
        day.start() + 86_400
    );
    assert_eq!(delivery.file, Some(lab.dir.path().join(name)));
    // other.test's mailto report could not go: no relay is configured, and it says so.
    let other = delivered_to(&deliveries, &Rua::Mailto("nobody@other.test".into()));
    assert!(
        other.result.as_ref().is_err_and(
            |e| matches!(e, SendError::NoMailRelay) && e.to_string().contains("mail_relay")
        ),
        "{other:?}"
    );
    // The day is done: its counts are gone.
    assert!(lab.reports.report(day, DOMAIN).is_none());
}

#[tokio::test]
async fn a_report_sent_on_demand_covers_the_day_so_far_and_the_nights_report_the_rest() {
    let url = format!("https://{RUA_HOST}/v1/tlsrpt");
    let relay = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, ServerBehaviour::plain())
        .await
        .expect("a test SMTP server on 127.0.0.1");
    let lab = report_lab(&url, true, Some(relay.addr())).await;
    let day = today(&lab);
    assert_eq!(lab.clock.now(), NOON, "2026-11-30T12:00:00Z");

    let deliveries = lab.reports.send_now(Some(DOMAIN)).await;

    let delivery = delivered_to(&deliveries, &Rua::Https(url.clone()));
    assert!(delivery.result.is_ok(), "{delivery:?}");
    assert_eq!(
        deliveries.len(),
        1,
        "only the domain asked for: {deliveries:?}"
    );
    let server = lab.report_server.as_ref().expect("the report server");
    let posted = |n: usize| {
        let posts: Vec<Seen> = (server.seen().into_iter())
            .filter(|s| s.method == "POST")
            .collect();
        gunzip(&posts[n].body)
    };
    let report = posted(0);
    // Its true date-range: from midnight to the moment it was sent.
    assert_eq!(
        report["date-range"]["start-datetime"],
        "2026-11-30T00:00:00Z"
    );
    assert_eq!(report["date-range"]["end-datetime"], "2026-11-30T12:00:00Z");
    let policy = &report["policies"][0];
    assert_eq!(policy["summary"]["total-successful-session-count"], 3);
    // What was sent is not counted again; the other domain is untouched.
    assert!(lab.reports.report(day, DOMAIN).is_none());
    assert!(lab.reports.report(day, "other.test").is_some());

    // Later that day one more session, then the night's report: from where this one ended.
    lab.clock.advance(Duration::from_secs(60));
    let verified = SessionResult::from_class(OutcomeClass::TlsVerified).expect("a session");
    let facts = PolicyFacts::NoPolicyFound;
    lab.reports
        .record(DOMAIN, &facts, &verified, &SessionSite::default());
    let nightly = lab.reports.send_reports(day).await;
    assert!(delivered_to(&nightly, &Rua::Https(url)).result.is_ok());
    let rest = posted(1);
    assert_eq!(rest["date-range"]["start-datetime"], "2026-11-30T12:00:01Z");
    assert_eq!(rest["date-range"]["end-datetime"], "2026-11-30T23:59:59Z");
    assert_ne!(rest["report-id"], report["report-id"]);
    assert_eq!(
        rest["policies"][0]["summary"]["total-successful-session-count"],
        1
    );
}

#[tokio::test]
async fn ctl_tlsrpt_send_mails_the_day_so_far_through_the_relay() {
    let ca = TestCa::new();
    let mx = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        0,
        ServerBehaviour::good_tls(&ca, "mx1.example.test"),
    )
    .await
    .expect("the MX");
    let relay = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, ServerBehaviour::plain())
        .await
        .expect("the mail relay reports go to");
    let policy = HttpsServer::start(
        ca.leaf(&[POLICY_HOST], Validity::Current),
        Answer::policy(ENFORCE),
    )
    .await;
    let zone = zone_with_id("20261207t").record(
        &format!("_smtp._tls.{DOMAIN}"),
        txt("v=TLSRPTv1; rua=mailto:tlsrpt@example.test"),
    );
    let lab = crate::support::lab::Lab::new()
        .ca(&ca)
        .admin()
        .zone(zone)
        .mx_port(mx.addr().port())
        .set(
            "mta_sts.connect_to",
            serde_json::json!({ POLICY_HOST: policy.addr.to_string() }),
        )
        .set("tls_rpt.mail_relay", relay.addr().to_string())
        .start()
        .await;
    let sent = crate::support::mta::send(lab.smtp, &["b@example.test"]).await;
    assert_eq!(sent.data.code, 250, "{:?}", sent.data);

    let result = lab.ctl_json(&["tlsrpt", "send"]).await;

    let reports = result["reports"].as_array().expect("reports");
    assert_eq!(reports.len(), 1, "{result}");
    assert_eq!(reports[0]["domain"], DOMAIN);
    assert_eq!(reports[0]["rua"], "mailto:tlsrpt@example.test");
    assert_eq!(reports[0]["sent"], true, "{result}");
    let mailed = relay.wait_for_messages(1).await;
    assert_eq!(mailed[0].rcpt_to, ["tlsrpt@example.test"]);
    let text = String::from_utf8_lossy(&mailed[0].data).to_string();
    let report = gunzip(&attachment_of(&text));
    let policy = &report["policies"][0];
    assert_eq!(policy["policy"]["policy-type"], "sts");
    assert_eq!(policy["summary"]["total-successful-session-count"], 1);
    // Sent, so no longer counted for today.
    let counts = lab.ctl_json(&["tlsrpt"]).await;
    assert_eq!(counts["domains"], serde_json::json!([]), "{counts}");
}

#[tokio::test]
async fn counts_are_bounded_whether_or_not_reports_are_sent() {
    let lab = report_lab("mailto:tlsrpt@example.test", false, None).await;
    let day = today(&lab);
    let verified = SessionResult::from_class(OutcomeClass::TlsVerified).expect("a session");
    // A domain whose policy changes at every lookup: only so many policies are kept.
    for n in 0..(3 * tlsrouter::policy::tlsrpt::counting::MAX_POLICIES_PER_DOMAIN) {
        let records = [format!("3 1 1 {n:064x}")];
        let facts = PolicyFacts::tlsa(&records, "mx.changing.test");
        lab.reports
            .record("changing.test", &facts, &verified, &SessionSite::default());
    }
    let report = lab.reports.report(day, "changing.test").expect("a report");
    assert_eq!(
        report["policies"].as_array().map(Vec::len),
        Some(tlsrouter::policy::tlsrpt::counting::MAX_POLICIES_PER_DOMAIN)
    );
    // Two days later, with no report sent (no directory would do the same), the first
    // session of the day drops what is older than yesterday.
    lab.clock.advance(Duration::from_secs(2 * 86_400));
    lab.reports.record(
        DOMAIN,
        &PolicyFacts::NoPolicyFound,
        &verified,
        &SessionSite::default(),
    );
    assert!(lab.reports.report(day, DOMAIN).is_none());
    assert!(lab.reports.report(day, "changing.test").is_none());
    assert!(lab.reports.report(today(&lab), DOMAIN).is_some());
}

#[tokio::test]
async fn the_report_is_mailed_as_multipart_report_to_a_mailto_rua() {
    let relay = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, ServerBehaviour::plain())
        .await
        .expect("a test SMTP server on 127.0.0.1");
    let lab = report_lab("mailto:tlsrpt@example.test", false, Some(relay.addr())).await;
    let day = today(&lab);
    let expected = lab.reports.report(day, DOMAIN).expect("a report");

    let deliveries = lab.reports.send_reports(day).await;

    let delivery = delivered_to(&deliveries, &Rua::Mailto("tlsrpt@example.test".into()));
    assert!(delivery.result.is_ok(), "{delivery:?}");
    let messages = relay.wait_for_messages(2).await;
    let message = messages
        .iter()
        .find(|m| m.rcpt_to == ["tlsrpt@example.test"])
        .expect("the report for example.test");
    assert_eq!(message.mail_from, "postmaster@relay.test");
    let text = String::from_utf8_lossy(&message.data).to_string();
    for header in [
        "TLS-Report-Domain: example.test\r\n",
        "TLS-Report-Submitter: relay.test\r\n",
        // A report about a broken TLS set-up must still get there (RFC 8689).
        "TLS-Required: No\r\n",
        "Subject: Report Domain: example.test Submitter: relay.test Report-ID: <",
        "Content-Type: multipart/report; report-type=\"tlsrpt\";",
        "Content-Type: application/tlsrpt+gzip\r\n",
        "Content-Transfer-Encoding: base64\r\n",
    ] {
        assert!(text.contains(header), "{header:?} missing from:\n{text}");
    }
    let attachment = attachment_of(&text);
    assert_eq!(gunzip(&attachment), expected);
    // other.test asked for mail too.
    assert!(messages.iter().any(|m| m.rcpt_to == ["nobody@other.test"]));
}

#[tokio::test]
async fn the_admin_socket_lists_refreshes_and_flushes_policies_and_shows_todays_counts() {
    use tlsrouter::admin::protocol::Request;
    use tlsrouter::admin::server::handle;
    crate::support::init_tracing();
    let dir = tempfile::tempdir().expect("temporary directory");
    let dns = DnsServer::start(zone_with_id("20261130a")).await;
    let ca = TestCa::new();
    let server = HttpsServer::start(
        ca.leaf(&[POLICY_HOST], Validity::Current),
        Answer::policy(ENFORCE),
    )
    .await;
    let mut config =
        crate::support::proxy::test_config(dns.addr, &ca.write_ca_file(dir.path()), 25);
    config.admin.socket = None;
    config
        .mta_sts
        .connect_to
        .insert(POLICY_HOST.into(), server.addr);
    let proxy = tlsrouter::Proxy::new(config).expect("proxy");
    let ask = |request| handle(&proxy, request);

    let refreshed = ask(Request::PolicyRefresh {
        domain: DOMAIN.into(),
    })
    .await;
    assert!(refreshed.ok, "{refreshed:?}");
    let listed = ask(Request::PolicyList {}).await.result.expect("a result");
    assert_eq!(listed["policies"][0]["domain"], DOMAIN);
    assert_eq!(listed["policies"][0]["mode"], "enforce");
    assert_eq!(listed["policies"][0]["raw"], ENFORCE);
    // refresh fetches even when the id is unchanged.
    ask(Request::PolicyRefresh {
        domain: DOMAIN.into(),
    })
    .await;
    assert_eq!(server.seen().len(), 2);

    let flushed = ask(Request::PolicyFlush {
        domain: DOMAIN.into(),
    })
    .await;
    assert_eq!(flushed.result.expect("a result")["flushed"], 1);
    let shown = ask(Request::PolicyShow {
        domain: DOMAIN.into(),
    })
    .await;
    assert!(!shown.ok, "nothing is held after the flush");

    let facts = PolicyFacts::NoPolicyFound;
    let failure = SessionResult::from_class(OutcomeClass::NoStarttls).expect("a TLS session");
    proxy
        .tls_reports
        .record(DOMAIN, &facts, &failure, &SessionSite::default());
    let counts = ask(Request::Tlsrpt {}).await.result.expect("a result");
    assert_eq!(counts["domains"][0]["domain"], DOMAIN);
    assert_eq!(counts["domains"][0]["failures"], 1);
    assert_eq!(
        counts["domains"][0]["failure_types"]["starttls-not-supported"],
        1
    );
}

// ---------------------------------------------------------------------------------------
// Delivery under a policy: the real proxy, the real policy server, real SMTP servers

const TESTING: &str =
    "version: STSv1\r\nmode: testing\r\nmx: mx1.example.test\r\nmax_age: 604800\r\n";

/// A proxy whose example.test MX hosts are `mx` (name, address, behaviour), best first,
/// all on one port, and whose policy server answers `policy`.
struct Delivery {
    lab: crate::support::lab::Lab,
    servers: Vec<SmtpServer>,
    _policy_server: HttpsServer,
    _logs: (
        crate::support::logs::Logs,
        tracing::subscriber::DefaultGuard,
    ),
}

async fn delivery(
    ca: &TestCa,
    policy: &str,
    mx: Vec<(&str, Ipv4Addr, ServerBehaviour)>,
) -> Delivery {
    delivery_with(ca, policy, mx, |lab| lab).await
}

async fn delivery_with(
    ca: &TestCa,
    policy: &str,
    mx: Vec<(&str, Ipv4Addr, ServerBehaviour)>,
    adjust: impl FnOnce(crate::support::lab::LabBuilder) -> crate::support::lab::LabBuilder,
) -> Delivery {
    let logs = crate::support::logs::Logs::capture();
    let policy_server = HttpsServer::start(
        ca.leaf(&[POLICY_HOST], Validity::Current),
        Answer::policy(policy),
    )
    .await;
    let mut zone =
        TestZone::new().record(&format!("_mta-sts.{DOMAIN}"), txt("v=STSv1; id=20261201a;"));
    let mut servers: Vec<SmtpServer> = Vec::new();
    for (i, (name, ip, behaviour)) in mx.into_iter().enumerate() {
        let port = servers.first().map_or(0, |s| s.addr().port());
        let server = SmtpServer::start(IpAddr::V4(ip), port, behaviour)
            .await
            .expect("an MX on the shared port");
        zone = zone.mx(DOMAIN, 10 * (i as u16 + 1), name).a(name, ip);
        servers.push(server);
    }
    let lab = adjust(crate::support::lab::Lab::new())
        .ca(ca)
        .zone(zone)
        .mx_port(servers[0].addr().port())
        .set(
            "mta_sts.connect_to",
            serde_json::json!({ POLICY_HOST: policy_server.addr.to_string() }),
        )
        .start()
        .await;
    Delivery {
        lab,
        servers,
        _policy_server: policy_server,
        _logs: logs,
    }
}

/// mx1.example.test, the policy's MX, as the domain's only MX.
fn only_mx1(behaviour: ServerBehaviour) -> Vec<(&'static str, Ipv4Addr, ServerBehaviour)> {
    vec![("mx1.example.test", Ipv4Addr::LOCALHOST, behaviour)]
}

/// One message to b@example.test: what the MTA was told in the end for the recipient (at
/// RCPT, or after the text when RCPT took it or held it), and the reply to the message.
async fn send_one(smtp: SocketAddr) -> (u16, String, Option<u16>) {
    let (mut client, _) = crate::support::smtp_client::SmtpClient::connect(smtp).await;
    client.cmd("EHLO mta.test").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;
    let rcpt = client.cmd("RCPT TO:<b@example.test>").await;
    let data = if rcpt.code == 250 {
        Some(client.data(b"Subject: sts\r\n\r\nhello\r\n").await)
    } else {
        None
    };
    client.cmd("QUIT").await;
    let told = data.as_ref().map_or(&rcpt, |data| verdict(&rcpt, data));
    (told.code, told.text().to_string(), data.map(|d| d.code))
}

fn assert_deferred_by_the_policy(sent: &(u16, String, Option<u16>), says: &str) {
    assert_eq!(sent.0, 451, "{sent:?}");
    assert!(
        sent.1.contains("4.7.5") || sent.1.contains("MTA-STS"),
        "{sent:?}"
    );
    assert!(sent.1.contains("MTA-STS enforce"), "{sent:?}");
    assert!(sent.1.contains(says), "{sent:?} lacks {says:?}");
}

#[tokio::test]
async fn under_an_enforced_policy_a_stripped_starttls_defers_and_nothing_goes_in_plain() {
    let ca = TestCa::new();
    let d = delivery(&ca, ENFORCE, only_mx1(ServerBehaviour::plain())).await;
    let sent = send_one(d.lab.smtp).await;
    assert_deferred_by_the_policy(&sent, "no STARTTLS");
    assert!(
        d.servers[0].messages().is_empty(),
        "a message went in plain"
    );
    assert!(
        d.servers[0].attempts().is_empty(),
        "MAIL FROM went in plain"
    );
}

#[tokio::test]
async fn under_an_enforced_policy_an_expired_certificate_defers() {
    let ca = TestCa::new();
    let behaviour = ServerBehaviour::expired_tls(&ca, "mx1.example.test");
    let d = delivery(&ca, ENFORCE, only_mx1(behaviour)).await;
    let sent = send_one(d.lab.smtp).await;
    assert_deferred_by_the_policy(&sent, "expired");
    assert!(
        d.servers[0].attempts().is_empty(),
        "sent with an unverified certificate"
    );
}

#[tokio::test]
async fn under_an_enforced_policy_an_mx_outside_it_is_skipped_for_the_next() {
    let ca = TestCa::new();
    let outside = ServerBehaviour::good_tls(&ca, "mx.elsewhere.test");
    let listed = ServerBehaviour::good_tls(&ca, "mx1.example.test");
    let d = delivery(
        &ca,
        ENFORCE,
        vec![
            ("mx.elsewhere.test", Ipv4Addr::new(127, 0, 0, 1), outside),
            ("mx1.example.test", Ipv4Addr::new(127, 0, 0, 2), listed),
        ],
    )
    .await;
    let sent = send_one(d.lab.smtp).await;
    assert_eq!(sent.2, Some(250), "{sent:?}");
    assert_eq!(
        d.servers[0].connections(),
        0,
        "the MX outside the policy was tried"
    );
    let got = d.servers[1].messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].tls.is_some());
}

#[tokio::test]
async fn under_an_enforced_policy_a_good_server_gets_the_message_over_verified_tls() {
    let ca = TestCa::new();
    let behaviour = ServerBehaviour::good_tls(&ca, "mx1.example.test");
    let d = delivery(&ca, ENFORCE, only_mx1(behaviour)).await;
    let sent = send_one(d.lab.smtp).await;
    assert_eq!(sent.2, Some(250), "{sent:?}");
    assert!(d.servers[0].messages()[0].tls.is_some());
    assert_fields(
        &d._logs.0.transaction_events()[0],
        &[
            ("policy", "mta-sts:enforce"),
            ("verify", "verified"),
            ("route", "tls"),
        ],
    );
    let counts = d
        .lab
        .proxy
        .tls_reports
        .counts(d.lab.proxy.tls_reports.today());
    assert_eq!(
        (counts[0].domain.as_str(), counts[0].successes),
        (DOMAIN, 1)
    );
}

#[tokio::test]
async fn under_a_testing_policy_a_server_without_starttls_gets_the_message_and_it_is_counted() {
    let ca = TestCa::new();
    let d = delivery(&ca, TESTING, only_mx1(ServerBehaviour::plain())).await;
    let sent = send_one(d.lab.smtp).await;
    assert_eq!(sent.2, Some(250), "{sent:?}");
    assert!(d.servers[0].messages()[0].tls.is_none());
    assert_fields(
        &d._logs.0.transaction_events()[0],
        &[("policy", "mta-sts:testing"), ("class", "no-starttls")],
    );
    let report = d
        .lab
        .proxy
        .tls_reports
        .report(d.lab.proxy.tls_reports.today(), DOMAIN)
        .expect("a report for the day");
    let text = report.to_string();
    assert!(text.contains("starttls-not-supported"), "{text}");
}

#[tokio::test]
async fn an_enforced_policy_still_holds_after_a_restart_with_the_policy_server_gone() {
    let ca = TestCa::new();
    let plain = only_mx1(ServerBehaviour::plain());
    let d = delivery_with(&ca, ENFORCE, plain, |lab| {
        let cache = lab.dir().join("cache.json");
        lab.set_path("cache.file", &cache)
    })
    .await;
    assert_deferred_by_the_policy(&send_one(d.lab.smtp).await, "no STARTTLS");
    d.lab.proxy.save_cache();
    let Delivery {
        lab,
        servers,
        _policy_server,
        _logs,
    } = d;
    drop(_policy_server);
    // A new daemon on the same files: the policy comes from the file, not a fetch.
    let (restarted, smtp) = lab.start_again().await;
    assert_deferred_by_the_policy(&send_one(smtp).await, "no STARTTLS");
    assert_eq!(restarted.stats.sts_fetches.get(), 0);
    assert!(servers[0].attempts().is_empty(), "a message went in plain");
}

#[tokio::test]
async fn probe_shows_the_policy_which_mx_hosts_it_names_and_what_it_does_to_each() {
    let ca = TestCa::new();
    let d = delivery(
        &ca,
        ENFORCE,
        vec![
            (
                "mx.elsewhere.test",
                Ipv4Addr::new(127, 0, 0, 1),
                ServerBehaviour::good_tls(&ca, "mx.elsewhere.test"),
            ),
            (
                "mx1.example.test",
                Ipv4Addr::new(127, 0, 0, 2),
                ServerBehaviour::plain(),
            ),
        ],
    )
    .await;
    let target = tlsrouter::probe::ProbeTarget {
        domain: Some(DOMAIN.into()),
        ..Default::default()
    };
    let proxy = &d.lab.proxy;
    let report = tlsrouter::probe::probe(
        &proxy.outbound,
        &proxy.router.rules(),
        &proxy.policies,
        &target,
        false,
    )
    .await;
    let text = tlsrouter::probe::render(&report);
    for expected in [
        "MTA-STS: mta-sts:enforce",
        "policy id 20261201a, mode enforce, mx mx1.example.test *.backup.example.test",
        "MX mx.elsewhere.test (preference 10): 127.0.0.1\n  MTA-STS:  NOT named by the policy",
        "MX mx1.example.test (preference 20): 127.0.0.2\n  MTA-STS:  named by the policy",
        "delivery: not to this server: MTA-STS enforce: not an MX host of the policy",
        "delivery: not to this server: MTA-STS enforce: no STARTTLS offered",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in\n{text}");
    }
}

#[tokio::test]
async fn a_malformed_policy_is_delivered_as_no_policy_and_reported_as_invalid() {
    let ca = TestCa::new();
    let broken = "version: STSv1\r\nmode: sometimes\r\nmx: mx1.example.test\r\nmax_age: 604800\r\n";
    let d = delivery(&ca, broken, only_mx1(ServerBehaviour::plain())).await;
    let sent = send_one(d.lab.smtp).await;
    assert_eq!(sent.2, Some(250), "no policy: the rules decide ({sent:?})");
    let reports = &d.lab.proxy.tls_reports;
    let report = reports.report(reports.today(), DOMAIN).expect("a report");
    let text = report.to_string();
    assert!(text.contains("sts-policy-invalid"), "{text}");
    assert!(text.contains("no-policy-found"), "{text}");
}

#[tokio::test]
async fn a_tlsrpt_record_with_a_multibyte_character_costs_only_that_domain_its_report() {
    let relay = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, ServerBehaviour::plain())
        .await
        .expect("a test SMTP server on 127.0.0.1");
    // `v=TLSRPTv1; rua=abcdefgé`: the é straddles the eighth byte.
    let lab = report_lab("abcdefg\u{e9}", false, Some(relay.addr())).await;
    let day = today(&lab);

    let deliveries = lab.reports.send_reports(day).await;

    let to_other = delivered_to(&deliveries, &Rua::Mailto("nobody@other.test".into()));
    assert!(
        to_other.result.is_ok(),
        "the other domain's report still goes: {to_other:?}"
    );
    assert!(
        deliveries.iter().all(|d| d.domain != DOMAIN),
        "no address to send example.test's report to: {deliveries:?}"
    );
    let messages = relay.wait_for_messages(1).await;
    assert_eq!(messages[0].rcpt_to, ["nobody@other.test"]);
}
