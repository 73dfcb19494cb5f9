//! The per-domain ledger, end to end: the daemon delivers to domains over verified TLS, in
//! plain, with an expired certificate, and defers and refuses others; `ctl domains`, `ctl
//! domain`, `ctl certs` and the metrics agree with the transaction lines of the same
//! messages, and a restart keeps the week.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::support::events::field;
use crate::support::lab::DaemonLab;
use crate::support::metrics::{free_port, scrape, value};
use crate::support::partners::{Partners, partners, traffic};
use crate::support::pki::TestCa;

/// The partners' lab as the daemon, with a cache file and metrics.
struct Domains {
    lab: DaemonLab,
    metrics: u16,
    _partners: Partners,
}

async fn domains(ca: &TestCa) -> Domains {
    let (builder, partners) = partners(ca).await;
    let metrics = free_port();
    let cache_file = builder.dir().join("cache.json");
    let lab = builder
        .set_path("cache.file", &cache_file)
        .set("metrics.listen", format!("127.0.0.1:{metrics}"))
        .admin()
        .start_daemon()
        .await;
    Domains {
        lab,
        metrics,
        _partners: partners,
    }
}

/// What the transaction lines say of each domain: messages by route, deferred, refused;
/// counted as an admin would count them from the log.
fn counted_from_log(lines: &[Value]) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
    let mut counts: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
    let domain_of = |rcpt: &str| rcpt.rsplit('@').next().unwrap_or("").to_string();
    for line in lines {
        let delivered = field(line, "end").as_deref() == Some("delivered")
            && field(line, "reply_code").is_some_and(|c| c.starts_with('2'));
        if delivered {
            let route = match field(line, "class").as_deref() {
                Some("tls-verified") => "tls_verified",
                Some("tls-unverified") => "tls_unverified",
                Some("tls-legacy") => "tls_legacy",
                _ => "plain",
            };
            let to = field(line, "to").unwrap_or_default();
            let domains: std::collections::BTreeSet<String> =
                to.split(',').map(domain_of).collect();
            for domain in domains {
                *counts.entry(domain).or_default().entry(route).or_default() += 1;
            }
        }
        // `rcpt (reply)`: one message per domain, deferred at a 4xx, refused at a 5xx.
        for refused in field(line, "refused").unwrap_or_default().split("; ") {
            let Some((rcpt, reply)) = refused.split_once(" (") else {
                continue;
            };
            let verdict = match reply.chars().next() {
                Some('4') => "deferred",
                Some('5') => "refused",
                _ => continue,
            };
            *counts
                .entry(domain_of(rcpt))
                .or_default()
                .entry(verdict)
                .or_default() += 1;
        }
    }
    counts
}

fn counts_of(row: &Value) -> BTreeMap<&'static str, u64> {
    let mut counts = BTreeMap::new();
    for route in [
        "tls_verified",
        "tls_unverified",
        "tls_legacy",
        "plain",
        "deferred",
        "refused",
    ] {
        let n = row["counts"][route].as_u64().expect("a count");
        if n > 0 {
            counts.insert(route, n);
        }
    }
    counts
}

fn by_domain(answer: &Value) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
    (answer["domains"].as_array().expect("domains").iter())
        .map(|row| {
            (
                row["domain"].as_str().expect("name").to_string(),
                counts_of(row),
            )
        })
        .collect()
}

fn rows(answer: &Value) -> Vec<String> {
    (answer["domains"].as_array().expect("domains").iter())
        .map(|row| row["domain"].as_str().expect("name").to_string())
        .collect()
}

/// An admin asks who got mail in plain this week, and why; the numbers are those of the
/// transaction lines, the certificates about to expire are named with their domains, and
/// a restart keeps it all.
#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_answers_who_got_mail_in_plain_and_why_as_the_log_lines_count_it() {
    let ca = TestCa::new();
    let mut d = domains(&ca).await;
    let smtp = d.lab.smtp();
    let sent = traffic(smtp).await;
    let mut lines = Vec::new();
    for _ in &sent {
        lines.push(d.lab.daemon.wait_for_transaction().await);
    }

    let answer = d.lab.ctl_json(&["domains"]).await;
    let expected: BTreeMap<String, BTreeMap<&str, u64>> = [
        ("tls.test", vec![("tls_verified", 3)]),
        ("alias.test", vec![("tls_verified", 1)]),
        ("plain.test", vec![("plain", 2)]),
        ("expired.test", vec![("tls_unverified", 1)]),
        ("strict.test", vec![("deferred", 1)]),
        ("refusing.test", vec![("refused", 1)]),
    ]
    .into_iter()
    .map(|(d, c)| (d.to_string(), c.into_iter().collect()))
    .collect();
    assert_eq!(by_domain(&answer), expected, "{answer:#}");
    assert_eq!(
        counted_from_log(&lines),
        expected,
        "the log lines count the same"
    );
    assert_eq!(rows(&answer)[0], "plain.test", "the most in plain first");
    let plain = &answer["domains"][0];
    assert_eq!(plain["plain_share"], 1.0);
    assert_eq!(plain["last_failure"]["class"], "no-starttls");
    assert_eq!(plain["last_failure"]["host"], "mx.plain.test");
    assert_eq!(plain["rule"], "default");

    let (code, table, _) = d.lab.ctl(&["domains"]).await;
    assert_eq!(code, 0);
    let first = table.lines().nth(2).expect("a first domain");
    assert!(
        first.starts_with("plain.test") && first.contains("100%"),
        "{table}"
    );

    let only_plain = d.lab.ctl_json(&["domains", "--route", "plain"]).await;
    assert_eq!(rows(&only_plain), ["plain.test"]);
    let deferred = d
        .lab
        .ctl_json(&["domains", "--route", "deferred", "--since", "1h"])
        .await;
    assert_eq!(rows(&deferred), ["strict.test"]);
    let (code, _, err) = d.lab.ctl(&["domains", "--since", "30d"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("7d or less"), "{err}");
    let (code, _, err) = d.lab.ctl(&["domains", "--route", "sideways"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("tls-verified"), "the routes are listed: {err}");

    // One domain: why strict.test got nothing, and the windows.
    let strict = d.lab.ctl_json(&["domain", "strict.test"]).await;
    assert_eq!(strict["domain"]["last_failure"]["class"], "no-starttls");
    assert_eq!(strict["domain"]["last_failure"]["host"], "mx.strict.test");
    let windows: Vec<&str> = (strict["windows"].as_array().expect("windows").iter())
        .map(|w| w["name"].as_str().expect("name"))
        .collect();
    assert_eq!(windows, ["1h", "24h", "7d"]);
    assert_eq!(strict["windows"][0]["counts"]["deferred"], 1);
    let refusing = d.lab.ctl_json(&["domain", "refusing.test"]).await;
    let why = &refusing["domain"]["last_failure"];
    assert_eq!(
        why["host"], "mx.refusing.test",
        "the remote's refusal: {why}"
    );
    assert!(
        why["reason"].as_str().is_some_and(|r| r.contains("5.1.1")),
        "{why}"
    );
    let tls = d.lab.ctl_json(&["domain", "TLS.test"]).await;
    assert!(
        tls["windows"][2]["tls_versions"]["TLSv1.3"].as_u64() == Some(3),
        "{tls:#}"
    );
    assert_eq!(tls["certificates"][0]["host"], "mx.tls.test");
    let (code, _, err) = d.lab.ctl(&["domain", "nowhere.test"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("nowhere.test"), "{err}");

    // The certificates: the expired one within any window, the good one only within a year.
    let soon = d.lab.ctl_json(&["certs", "--expiring", "14d"]).await;
    let hosts = |answer: &Value| -> Vec<String> {
        (answer["certificates"]
            .as_array()
            .expect("certificates")
            .iter())
        .map(|c| c["host"].as_str().expect("host").to_string())
        .collect()
    };
    assert_eq!(hosts(&soon), ["mx.expired.test"], "{soon:#}");
    assert!(soon["certificates"][0]["days_left"].as_i64() < Some(0));
    assert_eq!(soon["certificates"][0]["domains"][0], "expired.test");
    assert_eq!(soon["certificates"][0]["problem"], "cert-expired");
    let expired = d.lab.ctl_json(&["domain", "expired.test"]).await;
    assert_eq!(
        expired["domain"]["last_failure"]["class"], "cert-expired",
        "why it was not verified"
    );
    let year = d.lab.ctl_json(&["certs", "--expiring", "400d"]).await;
    assert_eq!(hosts(&year), ["mx.expired.test", "mx.tls.test"]);
    assert_eq!(
        year["certificates"][1]["domains"],
        serde_json::json!(["alias.test", "tls.test"]),
        "every domain it serves"
    );

    // The metrics: gauges and bounded counters, no domain among the labels.
    let scraped = scrape(d.metrics).await;
    assert_eq!(value(&scraped, "tlsrouter_plain_domains"), 1.0);
    assert_eq!(value(&scraped, "tlsrouter_expiring_certificates"), 1.0);
    assert_eq!(
        value(
            &scraped,
            "tlsrouter_not_delivered_total{verdict=\"deferred\",class=\"no-starttls\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &scraped,
            "tlsrouter_not_delivered_total{verdict=\"refused\",class=\"other\"}"
        ),
        1.0
    );
    assert!(!scraped.contains("plain.test"), "no domain label");

    // A clean stop writes the ledger beside the cache; the next start reads it.
    d.lab.daemon.signal("TERM");
    assert!(d.lab.daemon.exit_status().success());
    d.lab.restart().await;
    let again = d.lab.ctl_json(&["domains"]).await;
    assert_eq!(by_domain(&again), expected, "the week outlives a restart");
}
