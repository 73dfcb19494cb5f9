//! The outcome cache, end to end: a cached handshake failure skips the doomed handshake
//! (or defers under a rule that requires TLS), a host that stops offering STARTTLS after TLS
//! is a downgrade, and the cache file carries what was learned across a restart. The
//! admin's view of the cache is in `admin`; saving at intervals and at SIGTERM, in
//! `lifecycle`.

use serde_json::Value;

use crate::support::dns::TestZone;
use crate::support::events::{assert_fields, assert_no_fields};
use crate::support::lab::Lab;
use crate::support::logs::Logs;
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_server::SmtpServer;
use tlsrouter::outcome::OutcomeClass;

use crate::support::mta::{BODY, Sent, assert_deferred_for_tls, assert_delivered, send};
use crate::support::mx::{LOCALHOST, loopback, one_mx_ruled, server, starttls, tls10_only};

#[tokio::test]
async fn a_second_message_to_a_tls_1_0_only_mx_skips_the_doomed_handshake_and_says_cached() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let rules = r#"
        rules:
          - name: default
            match: { domains: ["*"] }
            legacy_tls: plain
    "#;
    let (lab, mx) = one_mx_ruled(
        &ca,
        tls10_only(ca.leaf(&["mx.example.test"], Validity::Current)),
        rules,
    )
    .await;

    assert_delivered(&send(lab.smtp, &["b@example.test"]).await);
    // What a new connection does is the point: not the pooled one.
    lab.proxy.outbound.pool.close_all();
    assert_delivered(&send(lab.smtp, &["b@example.test"]).await);

    let got = mx.messages();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|m| m.data == BODY && m.tls.is_none()));
    assert_eq!(mx.tls_handshakes_attempted(), 1, "TLS tried once only");
    assert_eq!(
        mx.connections(),
        3,
        "handshake + plain for the first message, plain at once for the second"
    );
    let lines = logs.transaction_events();
    assert_no_fields(&lines[0], &["cached"]);
    assert_fields(
        &lines[1],
        &[
            ("route", "plain"),
            ("class", "legacy-tls"),
            ("cached", "yes"),
        ],
    );
    let entry = lab
        .proxy
        .outbound
        .cache
        .get("mx.example.test", LOCALHOST)
        .expect("cached");
    assert_eq!(entry.class, OutcomeClass::LegacyTls);
}

#[tokio::test]
async fn under_tls_require_a_cached_legacy_tls_defers_the_next_message_without_a_new_handshake() {
    let ca = TestCa::new();
    let rules = r#"
        rules:
          - name: strict
            match: { domains: ["*"] }
            tls: require
            legacy_tls: plain
    "#;
    let (lab, mx) = one_mx_ruled(
        &ca,
        tls10_only(ca.leaf(&["mx.example.test"], Validity::Current)),
        rules,
    )
    .await;

    let first = send(lab.smtp, &["b@example.test"]).await;
    assert_deferred_for_tls(&first, &["rule \"strict\"", "TLS 1.0/1.1"]);
    assert_eq!(mx.tls_handshakes_attempted(), 1);

    let second = send(lab.smtp, &["b@example.test"]).await;
    assert_deferred_for_tls(&second, &["rule \"strict\"", "TLS 1.0/1.1", "cached"]);
    assert_eq!(mx.tls_handshakes_attempted(), 1, "no new handshake");
    assert_eq!(mx.connections(), 1, "not even a connection");
    assert!(mx.messages().is_empty());
}

/// The first message goes over TLS; then the same host (name, address, port) stops
/// offering STARTTLS and a second message is sent.
async fn downgrade(on_downgrade: &str) -> (SmtpServer, Sent) {
    let ca = TestCa::new();
    let rules = format!(
        r#"
            rules:
              - name: watchful
                match: {{ domains: ["*"] }}
                on_downgrade: {on_downgrade}
        "#
    );
    let (lab, mx) = one_mx_ruled(
        &ca,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
        &rules,
    )
    .await;

    let first = send(lab.smtp, &["b@example.test"]).await;
    assert_delivered(&first);
    assert!(mx.messages()[0].tls.is_some(), "TLS the first time");

    mx.stop_offering_starttls();
    // What a new connection finds is the point: not the pooled one.
    lab.proxy.outbound.pool.close_all();
    let second = send(lab.smtp, &["b@example.test"]).await;
    (mx, second)
}

/// The warnings that call the second attempt a downgrade; at least one.
fn warnings_of_downgrade(logs: &Logs) -> Vec<Value> {
    let warned = logs.events_with(&[("event", "downgrade"), ("level", "WARN")]);
    assert!(
        !warned.is_empty(),
        "no downgrade warning in:\n{}",
        logs.text()
    );
    warned
}

#[tokio::test]
async fn a_host_that_stops_offering_starttls_is_a_downgrade_deferred_under_on_downgrade_defer() {
    let (logs, _guard) = Logs::capture();
    let (mx, second) = downgrade("defer").await;

    assert_deferred_for_tls(
        &second,
        &[
            "rule \"watchful\"",
            "mx.example.test[127.0.0.1]",
            "downgrade",
        ],
    );
    assert_eq!(mx.messages().len(), 1, "the second message is not sent");
    let warned = warnings_of_downgrade(&logs);
    assert_fields(
        &warned[0],
        &[
            ("server", "mx.example.test[127.0.0.1]"),
            ("rule", "watchful"),
        ],
    );
}

#[tokio::test]
async fn a_host_that_stops_offering_starttls_gets_mail_in_plain_with_a_warning_under_on_downgrade_fallback()
 {
    let (logs, _guard) = Logs::capture();
    let (mx, second) = downgrade("fallback").await;

    assert_delivered(&second);
    let got = mx.messages();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].data, BODY);
    assert!(got[1].tls.is_none(), "in plain the second time");
    let warned = warnings_of_downgrade(&logs);
    assert_fields(
        &warned[0],
        &[
            ("server", "mx.example.test[127.0.0.1]"),
            ("rule", "watchful"),
        ],
    );
    assert_fields(
        &logs.transaction_events()[1],
        &[
            ("route", "plain"),
            ("class", "no-starttls"),
            ("rule", "watchful"),
        ],
    );
}

#[tokio::test]
async fn a_legacy_tls_host_learned_before_a_restart_is_not_tried_again_after_it() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let mx = server(
        loopback(1),
        0,
        tls10_only(ca.leaf(&["mx.example.test"], Validity::Current)),
    )
    .await;
    let zone = TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", loopback(1));
    let rules = r#"
        rules:
          - name: default
            match: { domains: ["*"] }
            legacy_tls: plain
    "#;
    let builder = Lab::new().ca(&ca).zone(zone).mx_port(mx.addr().port());
    let cache_file = builder.dir().join("cache.json");
    let a = builder
        .rules(rules)
        .set_path("cache.file", &cache_file)
        .start()
        .await;
    assert_delivered(&send(a.smtp, &["b@example.test"]).await);
    assert_eq!(mx.tls_handshakes_attempted(), 1);
    a.proxy.save_cache();
    assert_eq!(a.config().cache.file.as_ref(), Some(&cache_file));
    assert!(cache_file.exists(), "saved");

    // Proxy B: a new process, in effect, with the same configuration and cache file.
    let (b, b_smtp) = a.start_again().await;
    assert_eq!(
        b.outbound
            .cache
            .get("mx.example.test", LOCALHOST)
            .map(|e| e.class),
        Some(OutcomeClass::LegacyTls)
    );
    assert_delivered(&send(b_smtp, &["b@example.test"]).await);

    assert_eq!(mx.tls_handshakes_attempted(), 1, "B skipped the handshake");
    assert_eq!(mx.messages().len(), 2);
    assert_fields(
        &logs.transaction_events()[1],
        &[
            ("route", "plain"),
            ("class", "legacy-tls"),
            ("cached", "yes"),
        ],
    );
}

#[tokio::test]
async fn a_corrupt_cache_file_is_reported_and_the_proxy_starts_with_an_empty_cache() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let mx = server(
        loopback(1),
        0,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
    )
    .await;
    let builder = Lab::new().ca(&ca).one_mx(&mx).rules(
        r#"
            rules:
              - name: default
        "#,
    );
    let cache_file = builder.dir().join("cache.json");
    std::fs::write(
        &cache_file,
        b"{\"version\": 1, \"entries\": [ {\"host\": tru",
    )
    .expect("write");

    let lab = builder.set_path("cache.file", &cache_file).start().await;
    let (proxy, smtp) = (&lab.proxy, lab.smtp);

    assert!(proxy.outbound.cache.is_empty());
    assert_eq!(
        logs.events_with(&[("event", "cache.not_loaded"), ("level", "WARN")])
            .len(),
        1,
        "{}",
        logs.text()
    );
    assert_delivered(&send(smtp, &["b@example.test"]).await);
    assert!(mx.messages()[0].tls.is_some());
}
