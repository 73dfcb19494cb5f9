//! What a host whose TLS failure is cached costs each later message: exactly one connection
//! and no STARTTLS (so no handshake) with the pool off, and no new connection at all with
//! the pool on, where the plain connection of the first message carries the rest. A server
//! only the legacy stack can talk to costs one connection and one (OpenSSL) handshake per
//! message, never the doomed rustls one again.

use std::net::{IpAddr, Ipv4Addr};

use crate::support::lab::Lab;
use crate::support::mta::{BODY, send_body};
use crate::support::pki::{TestCa, Validity, self_signed};
use crate::support::smtp_server::{Action, ServerBehaviour, SmtpServer, StartTls, Step};
use tlsrouter::outcome::OutcomeClass;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Messages sent after the first, which classified the host.
const LATER_MESSAGES: usize = 3;

/// Certificate failures fall back to plain only under a rule that requires verification
/// and lists them; by default a bad certificate is encrypted anyway.
const PLAIN_AFTER_BAD_CERTIFICATE: &str = r#"
    rules:
      - name: verified-or-plain
        match: { domains: ["*"] }
        verify: require
        fallback_on: [cert-expired, cert-not-yet-valid, cert-untrusted, cert-name-mismatch]
"#;

const LEGACY_PLAIN: &str = r#"
    rules:
      - name: no-legacy-stack
        match: { domains: ["*"] }
        legacy_tls: plain
"#;

/// A remote whose TLS fails in one way, and what the first message costs there.
struct Case {
    class: OutcomeClass,
    behaviour: ServerBehaviour,
    rules: Option<&'static str>,
    /// Connections the first message takes: a failed handshake or a refused certificate
    /// costs a second, plain one.
    first_connections: usize,
    /// STARTTLS commands the first message sends.
    first_starttls: usize,
}

fn with_starttls(starttls: StartTls) -> ServerBehaviour {
    ServerBehaviour::with_starttls(starttls)
}

/// Every case, with certificates from `ca` (the one the lab trusts).
fn cases(ca: &TestCa) -> Vec<Case> {
    let leaf = |names: &[&str], validity| ca.leaf(names, validity);
    let refused = ServerBehaviour::good_tls(ca, "mx.example.test").on(
        Step::StartTls,
        Action::Reply("454 4.7.0 TLS not available".into()),
    );
    let bad_certificates = [
        (
            OutcomeClass::CertExpired,
            leaf(&["mx.example.test"], Validity::Expired),
        ),
        (
            OutcomeClass::CertNotYetValid,
            leaf(&["mx.example.test"], Validity::NotYetValid),
        ),
        (
            OutcomeClass::CertUntrusted,
            self_signed(&["mx.example.test"]),
        ),
        (
            OutcomeClass::CertNameMismatch,
            leaf(&["other.example.test"], Validity::Current),
        ),
    ];
    let mut cases = vec![
        Case {
            class: OutcomeClass::NoStarttls,
            behaviour: ServerBehaviour::plain(),
            rules: None,
            first_connections: 1,
            first_starttls: 0,
        },
        Case {
            class: OutcomeClass::StarttlsRefused,
            behaviour: refused,
            rules: None,
            first_connections: 1,
            first_starttls: 1,
        },
        // A close without an alert: rustls, the legacy stack, then plain.
        Case {
            class: OutcomeClass::HandshakeFailed,
            behaviour: with_starttls(StartTls::AbortAfter220),
            rules: None,
            first_connections: 3,
            first_starttls: 2,
        },
        Case {
            class: OutcomeClass::ProtocolViolation,
            behaviour: with_starttls(StartTls::InjectAfter220),
            rules: None,
            first_connections: 2,
            first_starttls: 1,
        },
        Case {
            class: OutcomeClass::LegacyTls,
            behaviour: with_starttls(StartTls::Tls10Only(leaf(
                &["mx.example.test"],
                Validity::Current,
            ))),
            rules: Some(LEGACY_PLAIN),
            first_connections: 2,
            first_starttls: 1,
        },
    ];
    cases.extend(bad_certificates.into_iter().map(|(class, cert)| Case {
        class,
        behaviour: ServerBehaviour::tls(cert),
        rules: Some(PLAIN_AFTER_BAD_CERTIFICATE),
        first_connections: 2,
        first_starttls: 1,
    }));
    cases
}

async fn start(ca: &TestCa, case: &Case, pool: bool) -> (Lab, SmtpServer) {
    let mx = SmtpServer::start(LOCALHOST, 0, case.behaviour.clone())
        .await
        .expect("smtp server");
    let mut lab = Lab::new()
        .ca(ca)
        .one_mx(&mx)
        .set("delivery.pool.enabled", pool);
    if let Some(rules) = case.rules {
        lab = lab.rules(rules);
    }
    (lab.start().await, mx)
}

/// Sends the first message, checks what it cost and what was cached, then sends
/// `LATER_MESSAGES` more; returns the connections those later messages took.
async fn later_connections(ca: &TestCa, case: &Case, pool: bool) -> usize {
    let class = case.class;
    let (lab, mx) = start(ca, case, pool).await;

    let first = send_body(lab.smtp, &["b@example.test"], BODY).await;
    assert_eq!(first.2.code, 250, "{class}: {first:?}");
    assert_eq!(mx.connections(), case.first_connections, "{class}");
    assert_eq!(
        mx.tls_handshakes_attempted(),
        case.first_starttls,
        "{class}"
    );
    let entry = (lab.proxy.outbound.cache)
        .get("mx.example.test", LOCALHOST)
        .expect("the host's outcome is cached");
    assert_eq!(entry.class, class);

    for n in 0..LATER_MESSAGES {
        let sent = send_body(lab.smtp, &["b@example.test"], BODY).await;
        assert_eq!(sent.2.code, 250, "{class}, message {}: {sent:?}", n + 2);
    }

    let got = mx.wait_for_messages(1 + LATER_MESSAGES).await;
    assert!(
        got.iter().all(|m| m.tls.is_none() && m.data == BODY),
        "{class}: every message in plain, intact"
    );
    assert_eq!(
        mx.tls_handshakes_attempted(),
        case.first_starttls,
        "{class}: no STARTTLS, so no handshake, after the first message"
    );
    mx.connections() - case.first_connections
}

#[tokio::test]
async fn without_the_pool_a_host_with_a_cached_tls_failure_costs_one_connection_and_no_handshake_per_message()
 {
    let ca = TestCa::new();
    for case in cases(&ca) {
        let later = later_connections(&ca, &case, false).await;
        assert_eq!(
            later, LATER_MESSAGES,
            "{}: exactly one connection per later message",
            case.class
        );
    }
}

#[tokio::test]
async fn with_the_pool_a_host_with_a_cached_tls_failure_costs_later_messages_no_connection_and_no_handshake()
 {
    let ca = TestCa::new();
    for case in cases(&ca) {
        let later = later_connections(&ca, &case, true).await;
        assert_eq!(
            later, 0,
            "{}: the first message's plain connection carries the others",
            case.class
        );
    }
}

/// A server rustls cannot talk to, under the default rules: the legacy stack encrypts.
#[cfg(feature = "legacy-tls")]
#[tokio::test]
async fn a_host_cached_as_tls_legacy_costs_one_connection_and_one_legacy_handshake_per_message() {
    for pool in [false, true] {
        let ca = TestCa::new();
        let case = Case {
            class: OutcomeClass::TlsLegacy,
            behaviour: with_starttls(StartTls::Tls10Only(
                ca.leaf(&["mx.example.test"], Validity::Current),
            )),
            rules: None,
            first_connections: 2,
            first_starttls: 2,
        };
        let (lab, mx) = start(&ca, &case, pool).await;

        for _ in 0..=LATER_MESSAGES {
            let sent = send_body(lab.smtp, &["b@example.test"], BODY).await;
            assert_eq!(sent.2.code, 250, "pool {pool}: {sent:?}");
        }

        let got = mx.wait_for_messages(1 + LATER_MESSAGES).await;
        assert!(
            got.iter()
                .all(|m| m.tls.as_ref().is_some_and(|t| t.version == "TLSv1.0")),
            "pool {pool}: every message over TLS 1.0: {:?}",
            got.iter().map(|m| &m.tls).collect::<Vec<_>>()
        );
        let entry = (lab.proxy.outbound.cache)
            .get("mx.example.test", LOCALHOST)
            .expect("cached");
        assert_eq!(entry.class, OutcomeClass::TlsLegacy);
        // The first message: rustls fails, then OpenSSL on a new connection; each later
        // one goes straight to OpenSSL (its sessions are never pooled).
        assert_eq!(
            mx.connections(),
            case.first_connections + LATER_MESSAGES,
            "pool {pool}"
        );
        assert_eq!(
            mx.tls_handshakes_attempted(),
            case.first_starttls + LATER_MESSAGES,
            "pool {pool}: one handshake per later message, never rustls's again"
        );
        assert_eq!(mx.tls_sessions(), 1 + LATER_MESSAGES, "pool {pool}");
    }
}
