//! The memory of TLS against what an attacker on the path can do: a host that did TLS
//! within the success memory and now fails it in a way anyone on the path can cause (an
//! injected `454`, a stray byte after the `220`, a stripped STARTTLS) is tried with TLS
//! again for every message; each failure is a downgrade, logged and counted, and deferred
//! for every message under `on_downgrade: defer`, not only the first. A pooled plain
//! connection never spares a message that TLS attempt.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};

use crate::support::lab::{Lab, one_mx_zone};
use crate::support::logs::Logs;
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_client::{Reply, send_one};
use crate::support::smtp_server::{Action, ServerBehaviour, SmtpServer, Step};

const MX: &str = "mx.example.test";
const BODY: &[u8] = b"Subject: again\r\n\r\nhello\r\n";

/// One message to `rcpt`: the RCPT reply, and the reply to the message when it was taken.
async fn send(lab: &Lab, rcpt: &str) -> (Reply, Option<Reply>) {
    send_one(lab.smtp, "MAIL FROM:<a@sender.test>", rcpt, BODY).await
}

/// How many connections said STARTTLS.
fn starttls_attempts(server: &SmtpServer) -> usize {
    let logs = server.connection_logs();
    logs.iter()
        .filter(|c| {
            c.commands
                .iter()
                .any(|l| l.eq_ignore_ascii_case("STARTTLS"))
        })
        .count()
}

fn warnings_of_downgrade(logs: &Logs) -> Vec<Value> {
    let events = logs.events();
    events
        .into_iter()
        .filter(|e| e["level"] == "WARN" && e.get("downgrade").is_some())
        .collect()
}

#[tokio::test]
async fn every_message_to_a_host_that_did_tls_tries_it_again_after_an_attack_on_the_path() {
    // What the attacker does from the second connection on, and the class it leaves.
    let attacks = [
        (
            Action::Reply("454 4.7.0 TLS not available due to temporary reason".into()),
            "starttls-refused",
        ),
        (
            Action::Extra("250 injected after the 220".into()),
            "protocol-violation",
        ),
    ];
    for (attack, class) in attacks {
        for defer in [false, true] {
            let (logs, _guard) = Logs::capture();
            let ca = TestCa::new();
            let behaviour = ServerBehaviour::tls(ca.leaf(&[MX], Validity::Current))
                .on_connections_from(1, Step::StartTls, attack.clone());
            let server = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, behaviour)
                .await
                .expect("server");
            let on_downgrade = if defer { "defer" } else { "fallback" };
            let lab = Lab::new()
                .ca(&ca)
                .one_mx(&server)
                .set("delivery.pool.enabled", false)
                .rules(&format!(
                    "rules:\n  - name: partners\n    match: {{ domains: [\"*\"] }}\n    on_downgrade: {on_downgrade}\n"
                ))
                .start()
                .await;
            let case = format!("{class}, on_downgrade: {on_downgrade}");

            let (_, first) = send(&lab, "b@example.test").await;
            assert_eq!(first.map(|r| r.code), Some(250), "{case}");
            assert!(server.messages()[0].tls.is_some(), "{case}: TLS first");

            for n in 1..=3 {
                let (rcpt, message) = send(&lab, "b@example.test").await;
                if defer {
                    assert_eq!(
                        (rcpt.code, rcpt.enhanced().as_deref()),
                        (451, Some("4.7.5")),
                        "{case}, message {n}: {rcpt:?}"
                    );
                    assert!(rcpt.text().contains("downgrade"), "{case}: {rcpt:?}");
                } else {
                    assert_eq!(message.map(|r| r.code), Some(250), "{case}, message {n}");
                }
                assert_eq!(
                    starttls_attempts(&server),
                    1 + n,
                    "{case}: message {n} tried STARTTLS again"
                );
            }

            let delivered = server.messages();
            match defer {
                true => assert_eq!(delivered.len(), 1, "{case}: nothing more went"),
                false => {
                    assert_eq!(delivered.len(), 4, "{case}");
                    assert!(delivered[1..].iter().all(|m| m.tls.is_none()), "{case}");
                    let lines = logs.transaction_events();
                    for line in &lines[1..] {
                        assert_eq!(line["route"], "plain", "{case}: {line}");
                        assert_eq!(line["downgrade"], class, "{case}: {line}");
                    }
                }
            }
            let warned = warnings_of_downgrade(&logs);
            assert_eq!(
                warned.len(),
                3,
                "{case}: one warning per message: {warned:?}"
            );
            assert!(warned.iter().all(|w| w["downgrade"] == class), "{case}");
            assert_eq!(lab.proxy.stats.snapshot().downgrades, 3, "{case}");
        }
    }
}

/// A cache file that says `mx.example.test[127.0.0.1]` did verified TLS a minute ago: what
/// a relay restarted after delivering over TLS remembers.
fn did_tls_a_minute_ago() -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    json!({
        "version": 1,
        "entries": [{
            "host": MX, "addr": "127.0.0.1", "domains": ["lenient.test"],
            "class": "tls-verified", "detail": "certificate verified",
            "tls_version": "TLSv1.3", "cipher": "TLS13_AES_128_GCM_SHA256",
            "cert_not_after": null, "first_seen": now - 60, "last_seen": now - 60,
            "count": 1, "expires_at": now + 86_400, "pinned": false,
            "last_tls_at": now - 60
        }]
    })
}

#[tokio::test]
async fn a_pooled_plain_connection_never_spares_a_message_the_tls_attempt_after_a_downgrade() {
    let (logs, _guard) = Logs::capture();
    // The host did TLS a minute ago; now it offers none (stripped on the way).
    let server = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, ServerBehaviour::plain())
        .await
        .expect("server");
    let zone = one_mx_zone()
        .mx("lenient.test", 10, MX)
        .mx("careful.test", 10, MX);
    let builder = Lab::new().zone(zone).mx_port(server.addr().port());
    let cache_file = builder.dir().join("cache.json");
    std::fs::write(&cache_file, did_tls_a_minute_ago().to_string()).expect("cache file");
    let lab = builder
        .set_path("cache.file", &cache_file)
        .set("delivery.pool.enabled", true)
        .rules(
            r#"
            rules:
              - name: careful
                match: { domains: [careful.test] }
                on_downgrade: defer
              - name: lenient
                match: { domains: ["*"] }
            "#,
        )
        .start()
        .await;

    // The lenient rule falls back to plain after the downgrade, and the connection is kept.
    let (_, message) = send(&lab, "u@lenient.test").await;
    assert_eq!(message.map(|r| r.code), Some(250));
    assert_eq!(
        lab.proxy.stats.snapshot().pool_idle,
        1,
        "kept for the next message"
    );

    // The careful rule's message does not ride on it: a new connection, a fresh EHLO, the
    // downgrade found again, and deferred.
    let (rcpt, _) = send(&lab, "v@careful.test").await;
    assert_eq!(
        (rcpt.code, rcpt.enhanced().as_deref()),
        (451, Some("4.7.5")),
        "{rcpt:?}"
    );
    assert!(rcpt.text().contains("downgrade"), "{rcpt:?}");
    assert_eq!(server.connections(), 2);

    // Nor does the lenient rule's next message: EHLO is read afresh on a new connection.
    let (_, message) = send(&lab, "u@lenient.test").await;
    assert_eq!(message.map(|r| r.code), Some(250));
    assert_eq!(server.connections(), 3);
    assert_eq!(lab.proxy.stats.snapshot().pool_reuses, 0);

    let got = server.messages();
    let recipients: Vec<&str> = got.iter().map(|m| m.rcpt_to[0].as_str()).collect();
    assert_eq!(recipients, ["u@lenient.test", "u@lenient.test"]);
    let warned = warnings_of_downgrade(&logs);
    assert_eq!(warned.len(), 3, "{warned:?}");
}

#[tokio::test]
async fn a_certificate_that_fails_after_one_that_verified_is_checked_again_for_every_message() {
    let (logs, _guard) = Logs::capture();
    // The host showed a certificate that verified a minute ago; now something on the path
    // shows a self-signed one. The rule sends such partners to a plain relay, as the
    // shipped iis-tls-router rules do.
    let mitm = ServerBehaviour::tls(crate::support::pki::self_signed(&[MX]));
    let server = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, mitm)
        .await
        .expect("server");
    let relay = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, ServerBehaviour::plain())
        .await
        .expect("relay");
    let builder = Lab::new().one_mx(&server);
    let cache_file = builder.dir().join("cache.json");
    let mut verified = did_tls_a_minute_ago();
    verified["entries"][0]["domains"] = json!(["example.test"]);
    verified["entries"][0]["last_verified_at"] = verified["entries"][0]["last_tls_at"].clone();
    std::fs::write(&cache_file, verified.to_string()).expect("cache file");
    let lab = builder
        .set_path("cache.file", &cache_file)
        .set("delivery.pool.enabled", false)
        .rules(&format!(
            "rules:\n  - name: redirect-without-valid-tls\n    match: {{ domains: [\"*\"] }}\n    verify: require\n    fallback_on: [cert-untrusted]\n    fallback: {{ relay: \"127.0.0.1:{}\" }}\n",
            relay.addr().port()
        ))
        .start()
        .await;

    for n in 1..=3 {
        let (_, message) = send(&lab, "b@example.test").await;
        assert_eq!(message.map(|r| r.code), Some(250), "message {n}");
        assert_eq!(
            server.tls_handshakes_attempted(),
            n,
            "message {n} checked the certificate again"
        );
    }
    assert_eq!(
        relay.messages().len(),
        3,
        "as the rule says, through the relay"
    );
    assert!(server.messages().is_empty());
    for line in logs.transaction_events() {
        let fallback = line["fallback"].as_str().unwrap_or_default();
        assert!(fallback.starts_with("cert-untrusted"), "{line}");
    }
}
