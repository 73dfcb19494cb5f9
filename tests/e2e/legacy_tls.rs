//! The legacy TLS stack (OpenSSL) encrypts to servers that rustls cannot talk to: a real
//! TLS 1.0-only server and a real TLS 1.2 server with only CBC suites take a message over
//! it, with the protocol, cipher and certificate facts reported, while the rustls path still
//! fails against both with the class that sends a host to the legacy stack.
#![cfg(feature = "legacy-tls")]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::support::pki::{CertKey, TestCa, Validity};
use crate::support::smtp_server::{ServerBehaviour, SmtpServer, StartTls, TlsInfo};
use tlsrouter::net::connection::{Connection, PlainConnection, StartTls as Started};
use tlsrouter::net::dialer::Dialer;
use tlsrouter::net::tls::{Handshake, Session, TlsClient, TlsConfig};
use tlsrouter::outcome::{CertProblem, LegacySession, NoTls, OutcomeClass, Verification};
use tlsrouter::rules::MinTls;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const MX: &str = "mx.legacy.test";
const STEP: Duration = Duration::from_secs(10);

/// A TLS client that trusts `ca` only (and not the system's roots).
fn tls_client(ca: &TestCa) -> (TlsClient, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = TlsConfig {
        ca_file: Some(ca.write_ca_file(dir.path())),
        system_roots: false,
        ..TlsConfig::default()
    };
    let client = TlsClient::new(&config).expect("TLS client with the legacy stack");
    (client, dir)
}

async fn start(starttls: StartTls) -> SmtpServer {
    SmtpServer::start(LOCALHOST, 0, ServerBehaviour::with_starttls(starttls))
        .await
        .expect("start the test SMTP server")
}

/// Connects, reads the greeting, says EHLO; the server must offer STARTTLS.
async fn greeted(server: &SmtpServer) -> PlainConnection {
    let dialer = Dialer {
        timeout: STEP,
        mark: None,
        source: None,
    };
    let mut conn = (dialer.connect(MX, server.addr()).await).expect("connect to the test server");
    let greeting = conn
        .read_reply(STEP, "the greeting")
        .await
        .expect("greeting");
    assert_eq!(greeting.code, 220, "{greeting:?}");
    let ehlo = conn
        .exchange("EHLO client.test", &[250], STEP, "the reply to EHLO")
        .await
        .expect("EHLO");
    assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    conn
}

/// Greeting, EHLO, STARTTLS answered 220, then the legacy handshake: a connection that
/// is secured (its type has no STARTTLS any more).
async fn legacy_session(server: &SmtpServer, tls: &TlsClient) -> (Connection, LegacySession) {
    let conn = greeted(server).await;
    match conn.starttls(tls, &Handshake::Legacy, STEP, STEP).await {
        Started::Secured(conn, Session::Legacy(session)) => (conn, session),
        Started::Secured(_, Session::Rustls(session)) => {
            panic!("the legacy handshake made a rustls session: {session:?}")
        }
        Started::Lost(why) => panic!("the legacy stack could not reach the server: {why}"),
        Started::Refused(_, why) => panic!("STARTTLS refused: {why}"),
        Started::Closed(reply) => panic!("server closed: {reply}"),
    }
}

/// A whole transaction over the connection; the server's record of it.
async fn send_message(conn: &mut Connection, server: &SmtpServer) -> Option<TlsInfo> {
    let ehlo = conn
        .exchange("EHLO client.test", &[250], STEP, "the reply to EHLO")
        .await
        .expect("EHLO inside TLS");
    assert!(
        !ehlo.lines.iter().any(|l| l == "STARTTLS"),
        "a server inside TLS offers no STARTTLS: {ehlo:?}"
    );
    for (line, due) in [
        ("MAIL FROM:<a@sender.test>", 250),
        ("RCPT TO:<b@legacy.test>", 250),
        ("DATA", 354),
    ] {
        let reply = conn.exchange(line, &[due], STEP, "a reply").await;
        assert_eq!(reply.expect(line).code, due, "{line}");
    }
    conn.write(
        b"Subject: over old TLS\r\n\r\nhello\r\n.\r\n",
        STEP,
        "the body",
    )
    .await
    .expect("send the body");
    let end = conn.read_reply(STEP, "the reply to the dot").await;
    assert_eq!(end.expect("reply to the final dot").code, 250);
    let message = server.next_message().await;
    assert_eq!(message.data, b"Subject: over old TLS\r\n\r\nhello\r\n");
    message.tls
}

fn leaf(ca: &TestCa, validity: Validity) -> CertKey {
    ca.leaf(&[MX], validity)
}

#[tokio::test]
async fn a_tls_10_only_server_gets_tls_10_from_the_legacy_stack_and_takes_a_message() {
    crate::support::init_tracing();
    let ca = TestCa::new();
    let cert = leaf(&ca, Validity::Current);
    let server = start(StartTls::Tls10Only(cert.clone())).await;
    let (tls, _dir) = tls_client(&ca);

    let (mut conn, session) = legacy_session(&server, &tls).await;
    assert_eq!(session.version, "TLSv1.0");
    assert_eq!(session.chain.first(), cert.chain.first());
    // A valid certificate for the MX name is recorded as such, for the log.
    assert_eq!(session.verification, Verification::Verified);

    let seen = send_message(&mut conn, &server).await;
    let seen = seen.expect("the server received the message over TLS");
    assert_eq!(seen.version, "TLSv1.0");
    assert_eq!(seen.cipher, session.cipher, "both ends name the same suite");
}

#[tokio::test]
async fn a_tls_12_server_with_only_cbc_suites_is_reached_and_its_cipher_reported() {
    let ca = TestCa::new();
    // Expired: the legacy stack records the certificate's faults, it does not require it.
    let cert = leaf(&ca, Validity::Expired);
    let server = start(StartTls::Tls12CbcOnly(cert.clone())).await;
    let (tls, _dir) = tls_client(&ca);

    let (mut conn, session) = legacy_session(&server, &tls).await;
    assert_eq!(session.version, "TLSv1.2");
    assert!(session.cipher.contains("_CBC_"), "{}", session.cipher);
    match &session.verification {
        Verification::Failed(CertProblem::Expired { not_after }) => {
            assert_eq!(*not_after, cert.not_after.to_string());
        }
        other => panic!("expected an expired certificate, got {other:?}"),
    }

    let seen = send_message(&mut conn, &server).await;
    let seen = seen.expect("the server received the message over TLS");
    assert_eq!(seen.version, "TLSv1.2");
    assert_eq!(seen.cipher, session.cipher);
}

#[tokio::test]
async fn a_modern_server_gets_tls_13_from_the_legacy_stack() {
    let ca = TestCa::new();
    let server = start(StartTls::Rustls(leaf(&ca, Validity::Current))).await;
    let (tls, _dir) = tls_client(&ca);

    let (mut conn, session) = legacy_session(&server, &tls).await;
    assert_eq!(
        session.version, "TLSv1.3",
        "the stack offers the best it has"
    );
    let seen = send_message(&mut conn, &server).await;
    assert_eq!(seen.map(|t| t.version).as_deref(), Some("TLSv1.3"));
}

#[tokio::test]
async fn a_handshake_the_server_breaks_off_fails_the_legacy_stack_too() {
    let ca = TestCa::new();
    let server = start(StartTls::AbortAfter220).await;
    let (tls, _dir) = tls_client(&ca);
    let conn = greeted(&server).await;
    match conn.starttls(&tls, &Handshake::Legacy, STEP, STEP).await {
        Started::Lost(why @ NoTls::LegacyFailed(_)) => {
            assert_eq!(why.class(), Some(OutcomeClass::HandshakeFailed));
            assert!(why.to_string().starts_with("legacy TLS"), "{why}");
        }
        Started::Lost(other) => panic!("expected a legacy handshake failure, got {other:?}"),
        Started::Secured(_, session) => panic!("no TLS server there, yet a session: {session:?}"),
        Started::Refused(_, why) => panic!("STARTTLS refused: {why}"),
        Started::Closed(reply) => panic!("server closed: {reply}"),
    }
}

/// What the rustls path makes of a server.
async fn rustls_attempt(server: &SmtpServer, tls: &TlsClient) -> NoTls {
    let conn = greeted(server).await;
    match conn
        .starttls(tls, &Handshake::Pkix(MinTls::Tls12), STEP, STEP)
        .await
    {
        Started::Lost(why) => why,
        Started::Secured(_, session) => panic!("rustls got through: {session:?}"),
        Started::Refused(_, why) => panic!("STARTTLS refused: {why}"),
        Started::Closed(reply) => panic!("server closed: {reply}"),
    }
}

#[tokio::test]
async fn rustls_still_fails_against_both_with_the_class_that_names_the_cause() {
    let ca = TestCa::new();
    let (tls, _dir) = tls_client(&ca);

    let tls10 = start(StartTls::Tls10Only(leaf(&ca, Validity::Current))).await;
    let why = rustls_attempt(&tls10, &tls).await;
    assert!(matches!(why, NoTls::LegacyTls(_)), "TLS 1.0 only: {why:?}");

    let cbc = start(StartTls::Tls12CbcOnly(leaf(&ca, Validity::Current))).await;
    let why = rustls_attempt(&cbc, &tls).await;
    // No suite in common: the server's handshake_failure alert.
    match why {
        NoTls::HandshakeFailed(detail) => {
            assert!(detail.contains("HandshakeFailure"), "CBC only: {detail}")
        }
        other => panic!("CBC only: expected handshake-failed, got {other:?}"),
    }
    assert!(cbc.messages().is_empty() && tls10.messages().is_empty());
}

#[tokio::test]
async fn probe_shows_the_protocol_and_cipher_the_legacy_stack_negotiates_with_a_tls_10_server() {
    let ca = TestCa::new();
    let server = start(StartTls::Tls10Only(
        ca.leaf(&["mx.example.test"], Validity::Current),
    ))
    .await;
    let lab = crate::support::lab::Lab::new()
        .ca(&ca)
        .zone(crate::support::lab::one_mx_zone())
        .mx_port(server.addr().port())
        .admin()
        .start()
        .await;

    let (code, out, err) = lab.ctl(&["probe", "example.test"]).await;

    assert_eq!(code, 0, "{err}");
    for line in [
        "rustls:   legacy-tls (",
        "legacy:   TLSv1.0 TLS_",
        "outcome:  tls-legacy (",
        "(the legacy stack, OpenSSL: encrypted, never authenticated)",
        "delivery: legacy TLS",
    ] {
        assert!(out.contains(line), "{line:?} missing in\n{out}");
    }
    assert!(server.messages().is_empty(), "probe sends no mail");
}
