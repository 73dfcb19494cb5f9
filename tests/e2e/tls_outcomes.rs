//! What each TLS outcome means for a message, end to end: a valid certificate, none offered,
//! every kind of bad certificate (encrypted anyway, and logged), and handshakes that fail
//! (a new plain connection, and the class in the log), or that the legacy stack gets past
//! (a new connection encrypted by OpenSSL, `tls-legacy`). The rule-driven variants (verify:
//! require, min_tls) are in `rules`; what the cache makes of an outcome, in `cache`.

use crate::support::events::{assert_fields, assert_no_fields, field};
use crate::support::lab::{Lab, one_mx_zone};
use crate::support::logs::Logs;
use crate::support::pki::{CertKey, TestCa, Validity, self_signed, self_signed_ca};
use crate::support::smtp_server::{Action, ServerBehaviour, SmtpServer, StartTls, Step};

use crate::support::mta::{BODY, send_body};
use crate::support::mx::{one_mx, one_mx_ruled, starttls};

#[tokio::test]
async fn a_message_to_a_server_with_a_valid_certificate_arrives_over_tls_13_byte_for_byte() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (lab, server) = one_mx(
        &ca,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
    )
    .await;

    let (mail, rcpts, data) = send_body(lab.smtp, &["b@example.test"], BODY).await;

    assert_eq!(mail.code, 250);
    assert_eq!(rcpts[0].code, 250);
    assert_eq!(data.code, 250, "{data:?}");
    assert!(
        data.text().contains("queued as"),
        "the remote's own reply: {data:?}"
    );
    let got = server.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, BODY);
    assert_eq!(got[0].mail_from, "a@sender.test");
    assert_eq!(got[0].rcpt_to, vec!["b@example.test"]);
    assert_eq!(got[0].tls.as_ref().expect("over TLS").version, "TLSv1.3");
    assert_fields(
        &logs.transaction_events()[0],
        &[
            ("route", "tls"),
            ("class", "tls-verified"),
            ("tls_version", "TLSv1.3"),
            ("verify", "verified"),
            ("mx", "mx.example.test"),
            ("rule", "default"),
        ],
    );
}

#[tokio::test]
async fn a_message_to_a_server_without_starttls_arrives_in_plain_and_says_why() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (lab, server) = one_mx(&ca, ServerBehaviour::default()).await;

    let (_, _, data) = send_body(lab.smtp, &["b@example.test"], BODY).await;

    assert_eq!(data.code, 250, "{data:?}");
    let got = server.messages();
    assert_eq!(got[0].data, BODY);
    assert!(got[0].tls.is_none());
    let line = &logs.transaction_events()[0];
    assert_fields(line, &[("route", "plain"), ("class", "no-starttls")]);
    let fallback = field(line, "fallback").unwrap_or_default();
    assert!(fallback.starts_with("no-starttls: "), "{line}");
}

/// A certificate problem is recorded and logged, and the message still goes encrypted.
/// Returns what the log line says of the certificate (`verify`).
async fn bad_certificate_is_encrypted_anyway(ca: &TestCa, cert: CertKey, class: &str) -> String {
    let (logs, _guard) = Logs::capture();
    let (lab, server) = one_mx(ca, starttls(cert)).await;

    let (_, _, data) = send_body(lab.smtp, &["b@example.test"], BODY).await;

    assert_eq!(data.code, 250, "{data:?}");
    let got = server.messages();
    assert_eq!(got[0].data, BODY);
    assert!(
        got[0].tls.is_some(),
        "delivered encrypted despite the certificate"
    );
    let line = &logs.transaction_events()[0];
    assert_fields(line, &[("route", "tls"), ("class", "tls-unverified")]);
    let verify = field(line, "verify").unwrap_or_default();
    assert!(
        verify.starts_with(&format!("{class}: ")),
        "{class} missing in {line}"
    );
    verify
}

#[tokio::test]
async fn an_expired_certificate_is_logged_with_its_date_and_the_message_goes_encrypted() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Expired);
    let verify = bad_certificate_is_encrypted_anyway(&ca, cert, "cert-expired").await;
    assert!(verify.contains("certificate expired on 20"), "{verify}");
}

#[tokio::test]
async fn a_certificate_not_yet_valid_is_logged_and_the_message_goes_encrypted() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::NotYetValid);
    bad_certificate_is_encrypted_anyway(&ca, cert, "cert-not-yet-valid").await;
}

#[tokio::test]
async fn a_self_signed_certificate_is_logged_as_untrusted_and_the_message_goes_encrypted() {
    // As rcgen makes it, and as `openssl req -x509` does (marked as a CA): both are what
    // an admin calls self-signed.
    for cert in [
        self_signed(&["mx.example.test"]),
        self_signed_ca(&["mx.example.test"]),
    ] {
        let ca = TestCa::new();
        let verify = bad_certificate_is_encrypted_anyway(&ca, cert, "cert-untrusted").await;
        assert_eq!(
            verify,
            "cert-untrusted: certificate untrusted (self-signed)"
        );
    }
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_logged_with_the_ca_it_names() {
    let unknown = TestCa::new();
    let cert = unknown.leaf(&["mx.example.test"], Validity::Current);
    let verify = bad_certificate_is_encrypted_anyway(&TestCa::new(), cert, "cert-untrusted").await;
    assert!(
        verify.contains("(issued by tlsrouter test CA ")
            && verify.ends_with(", a CA this relay does not trust)"),
        "{verify}"
    );
}

/// Where a rule requires a verified certificate, the MTA's reply says in words why the
/// certificate was not.
#[tokio::test]
async fn the_mta_hears_that_a_required_certificate_is_self_signed() {
    let rules =
        "rules:\n  - name: verified\n    match: { domains: [\"*\"] }\n    verify: require\n";
    let ca = TestCa::new();
    let (lab, server) =
        one_mx_ruled(&ca, starttls(self_signed_ca(&["mx.example.test"])), rules).await;
    let (_, rcpts, _) = send_body(lab.smtp, &["b@example.test"], BODY).await;
    assert_eq!(
        (rcpts[0].code, rcpts[0].enhanced().as_deref()),
        (451, Some("4.7.5")),
        "{rcpts:?}"
    );
    assert!(
        rcpts[0]
            .text()
            .contains("certificate untrusted (self-signed)"),
        "{rcpts:?}"
    );
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn a_certificate_for_another_name_is_logged_as_a_mismatch_and_the_message_goes_encrypted() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["other.example.test"], Validity::Current);
    let verify = bad_certificate_is_encrypted_anyway(&ca, cert, "cert-name-mismatch").await;
    assert_eq!(
        verify,
        "cert-name-mismatch: certificate not valid for the MX name (it names other.example.test)",
        "names what the certificate is for, in words"
    );
}

/// The lab of `one_mx`, with an admin socket and `rules` (if any).
async fn lab_for(ca: &TestCa, starttls: StartTls, rules: Option<&str>) -> (Lab, SmtpServer) {
    let behaviour = ServerBehaviour {
        starttls,
        ..ServerBehaviour::default()
    };
    let server = SmtpServer::start(std::net::Ipv4Addr::LOCALHOST.into(), 0, behaviour)
        .await
        .expect("smtp server");
    let mut lab = Lab::new()
        .ca(ca)
        .zone(one_mx_zone())
        .mx_port(server.addr().port())
        .admin();
    if let Some(rules) = rules {
        lab = lab.rules(rules);
    }
    (lab.start().await, server)
}

/// A TLS failure makes the proxy reconnect in plain and deliver; the log says why.
async fn tls_failure_falls_back_to_plain_under(
    starttls: StartTls,
    class: &str,
    rules: Option<&str>,
) {
    tls_failures_fall_back_to_plain(starttls, class, rules, 1).await;
}

/// The same after `handshakes` tries, each on its own connection.
async fn tls_failures_fall_back_to_plain(
    starttls: StartTls,
    class: &str,
    rules: Option<&str>,
    handshakes: usize,
) {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (lab, server) = lab_for(&ca, starttls, rules).await;

    let (_, _, data) = send_body(lab.smtp, &["b@example.test"], BODY).await;

    assert_eq!(data.code, 250, "{data:?}");
    let got = server.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, BODY);
    assert!(got[0].tls.is_none());
    assert_eq!(server.tls_handshakes_attempted(), handshakes, "TLS tries");
    assert_eq!(
        server.connections(),
        handshakes + 1,
        "then a new plain connection"
    );
    let line = &logs.transaction_events()[0];
    assert_fields(line, &[("route", "plain"), ("class", class)]);
    let fallback = field(line, "fallback").unwrap_or_default();
    assert!(fallback.starts_with(&format!("{class}: ")), "{line}");
    assert_no_fields(line, &["verify", "tls_version"]);
}

/// A server that closes the connection in the handshake without an alert, as old
/// servers do with a ClientHello they cannot parse, gets the legacy stack before plain; a
/// rule that allows no legacy stack goes to plain at once.
#[tokio::test]
async fn a_handshake_aborted_after_the_starttls_220_gets_the_legacy_stack_then_plain() {
    // rustls, then OpenSSL: both cut off; the legacy stack's failure is the last word
    // (the fallback field says "legacy TLS handshake failed").
    tls_failures_fall_back_to_plain(StartTls::AbortAfter220, "handshake-failed", None, 2).await;
    let rules = "rules:\n  - name: modern\n    legacy_tls: plain\n";
    tls_failure_falls_back_to_plain_under(StartTls::AbortAfter220, "handshake-failed", Some(rules))
        .await;
}

/// An old server that drops rustls's ClientHello without an alert and speaks TLS 1.0 to
/// OpenSSL: the message goes over TLS 1.0, and the log says why the legacy stack was tried.
#[cfg(feature = "legacy-tls")]
#[tokio::test]
async fn a_server_that_drops_a_modern_hello_gets_the_message_from_the_legacy_stack() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let behaviour = ServerBehaviour {
        starttls: StartTls::Tls10Only(ca.leaf(&["mx.example.test"], Validity::Current)),
        ..ServerBehaviour::default()
    }
    .on(Step::Handshake, Action::Drop)
    .on_connections_from(1, Step::Handshake, Action::Normal);
    let (lab, server) = one_mx(&ca, behaviour).await;

    let (_, _, data) = send_body(lab.smtp, &["b@example.test"], BODY).await;

    assert_eq!(data.code, 250, "{data:?}");
    let got = server.messages();
    assert_eq!(got[0].tls.as_ref().expect("over TLS").version, "TLSv1.0");
    let tried = logs.events_with(&[("event", "legacy_tried")]);
    assert_eq!(tried.len(), 1, "{tried:?}");
    assert_fields(
        &tried[0],
        &[
            ("class", "handshake-failed"),
            (
                "reason",
                "TLS handshake failed: connection closed during the handshake, without an alert",
            ),
        ],
    );
    assert_fields(
        &logs.transaction_events()[0],
        &[("route", "tls"), ("class", "tls-legacy")],
    );
}

/// A server rustls cannot talk to gets the message from the legacy stack on a new
/// connection, `tls-legacy` in the log and the cache; the next message goes straight to the
/// legacy stack. Returns the cipher the first message's log line names.
#[cfg(feature = "legacy-tls")]
async fn legacy_server_gets_the_legacy_stack(starttls: StartTls, version: &str) -> String {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (lab, server) = lab_for(&ca, starttls, None).await;

    let (_, _, data) = send_body(lab.smtp, &["b@example.test"], BODY).await;

    assert_eq!(data.code, 250, "{data:?}");
    let got = server.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, BODY);
    let tls = got[0].tls.as_ref().expect("the message came over TLS");
    assert_eq!(tls.version, version);
    assert_eq!(server.tls_handshakes_attempted(), 2, "rustls, then OpenSSL");
    assert_eq!(
        server.connections(),
        2,
        "a new connection for the legacy stack"
    );
    let line = logs.transaction_events()[0].clone();
    assert_fields(
        &line,
        &[
            ("route", "tls"),
            ("class", "tls-legacy"),
            ("tls_version", version),
            ("cipher", &tls.cipher),
        ],
    );
    let verify = field(&line, "verify").unwrap_or_default();
    assert!(
        verify.starts_with("tls-legacy: not authenticated"),
        "{line}"
    );
    assert_no_fields(&line, &["fallback"]);

    let shown = lab.ctl_json(&["cache", "show", "mx.example.test"]).await;
    let entry = &shown["entries"][0];
    assert_eq!(entry["class"], "tls-legacy", "{shown}");
    assert_eq!(entry["tls_version"], version, "{shown}");

    let (_, _, data) = send_body(lab.smtp, &["b@example.test"], BODY).await;
    assert_eq!(data.code, 250, "{data:?}");
    let got = server.messages();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[1].tls.as_ref().map(|t| t.version.as_str()),
        Some(version)
    );
    assert_eq!(
        server.tls_handshakes_attempted(),
        3,
        "the second message skips rustls"
    );
    assert_eq!(
        server.connections(),
        3,
        "one connection for the second message"
    );
    let second = &logs.transaction_events()[1];
    assert_fields(second, &[("class", "tls-legacy")]);
    let verify = field(second, "verify").unwrap_or_default();
    assert!(verify.starts_with("tls-legacy"), "{second}");
    field(&line, "cipher").unwrap_or_default()
}

#[cfg(feature = "legacy-tls")]
#[tokio::test]
async fn a_tls_10_only_server_gets_the_message_over_tls_10_from_the_legacy_stack() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    legacy_server_gets_the_legacy_stack(StartTls::Tls10Only(cert), "TLSv1.0").await;
}

#[cfg(feature = "legacy-tls")]
#[tokio::test]
async fn a_tls_12_server_with_only_cbc_suites_is_reached_by_the_legacy_stack() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let cipher = legacy_server_gets_the_legacy_stack(StartTls::Tls12CbcOnly(cert), "TLSv1.2").await;
    assert!(cipher.contains("_CBC_"), "{cipher}");
}

#[tokio::test]
async fn under_legacy_tls_plain_a_tls_10_only_server_gets_the_message_in_plain() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let rules = "rules:\n  - name: old\n    legacy_tls: plain\n";
    tls_failure_falls_back_to_plain_under(StartTls::Tls10Only(cert), "legacy-tls", Some(rules))
        .await;
}

#[tokio::test]
async fn under_verify_require_a_tls_10_only_server_never_gets_the_legacy_stack() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let rules = "rules:\n  - name: strict\n    verify: require\n";
    tls_failure_falls_back_to_plain_under(StartTls::Tls10Only(cert), "legacy-tls", Some(rules))
        .await;
}
