//! STARTTLS toward the MTA: with `inbound.tls` configured, an MTA can encrypt its hop to
//! tlsrouter (a smart host across a LAN, or an MTA that insists on TLS behind a
//! transparent listener). A real rustls client plays the MTA; the certificate is made at
//! test time and reloaded from its files.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use rustls::ClientConfig;

use crate::support::daemon::replace_file;
use crate::support::dns::TestZone;
use crate::support::lab::Lab;
use crate::support::pki::{CertKey, TestCa, Validity};
use crate::support::smtp_client::SmtpClient;
use crate::support::smtp_server::{ServerBehaviour, SmtpServer};

const BODY: &[u8] = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nhello\r\n";

fn tls_client(ca: &TestCa) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    Arc::new(config)
}

fn zone() -> TestZone {
    TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", Ipv4Addr::LOCALHOST)
}

/// Writes the pair where `inbound.tls` points.
fn write_pair(dir: &std::path::Path, cert: &CertKey) {
    replace_file(&dir.join("relay.crt"), &cert.cert_pem);
    replace_file(&dir.join("relay.key"), &cert.key_pem);
}

fn has_starttls(ehlo: &crate::support::smtp_client::Reply) -> bool {
    ehlo.lines
        .iter()
        .any(|l| l.eq_ignore_ascii_case("STARTTLS"))
}

#[tokio::test]
async fn an_mta_that_says_starttls_relays_its_message_to_tlsrouter_encrypted() {
    let ca = TestCa::new();
    let server = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, ServerBehaviour::plain())
        .await
        .expect("SMTP server");
    let builder = Lab::new()
        .ca(&ca)
        .zone(zone())
        .mx_port(server.addr().port());
    write_pair(builder.dir(), &ca.leaf(&["relay.test"], Validity::Current));
    let dir = builder.dir().to_path_buf();
    let lab = builder
        .set_path("inbound.tls.certificate", &dir.join("relay.crt"))
        .set_path("inbound.tls.key", &dir.join("relay.key"))
        .start()
        .await;

    let (mut client, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(greeting.code, 220);
    let ehlo = client.cmd("EHLO mta.sender.test").await;
    assert!(has_starttls(&ehlo), "{ehlo:?}");
    let mut client = client
        .starttls(tls_client(&ca), "relay.test")
        .await
        .expect("TLS with tlsrouter, its certificate verified");
    // What was said before TLS does not count: EHLO again, and no second STARTTLS.
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 503);
    let ehlo = client.cmd("EHLO mta.sender.test").await;
    assert_eq!(ehlo.code, 250);
    assert!(!has_starttls(&ehlo), "{ehlo:?}");
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    let done = client.data(BODY).await;
    assert_eq!(done.code, 250, "{done:?}");
    let got = server.wait_for_messages(1).await;
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: hi"));
}

#[tokio::test]
async fn commands_pipelined_after_starttls_are_refused_and_the_session_closed() {
    let ca = TestCa::new();
    let builder = Lab::new().ca(&ca).zone(zone());
    write_pair(builder.dir(), &ca.leaf(&["relay.test"], Validity::Current));
    let dir = builder.dir().to_path_buf();
    let lab = builder
        .set_path("inbound.tls.certificate", &dir.join("relay.crt"))
        .set_path("inbound.tls.key", &dir.join("relay.key"))
        .start()
        .await;

    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    // An attacker in the path appends a command in clear behind the client's STARTTLS.
    client
        .send_raw(b"STARTTLS\r\nMAIL FROM:<attacker@evil.test>\r\n")
        .await;
    let refused = client.read_reply().await;
    assert_eq!(refused.code, 554, "{refused:?}");
    assert!(
        client.try_read_reply().await.is_none(),
        "the session is closed"
    );
}

#[tokio::test]
async fn without_a_certificate_no_starttls_is_offered_to_the_mta() {
    let lab = Lab::new().zone(zone()).start().await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    let ehlo = client.cmd("EHLO mta.sender.test").await;
    assert!(!has_starttls(&ehlo), "{ehlo:?}");
    assert_eq!(client.cmd("STARTTLS").await.code, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_reloaded_when_its_files_change_and_on_sighup() {
    let ca = TestCa::new();
    let first = ca.leaf(&["relay.test"], Validity::Current);
    let builder = Lab::new().ca(&ca).zone(zone());
    write_pair(builder.dir(), &first);
    let dir = builder.dir().to_path_buf();
    let mut lab = builder
        .set_path("inbound.tls.certificate", &dir.join("relay.crt"))
        .set_path("inbound.tls.key", &dir.join("relay.key"))
        .start_daemon()
        .await;
    let served = |cert: &CertKey| cert.chain[0].as_ref().to_vec();
    let smtp = lab.daemon.smtp;
    assert_eq!(offered(smtp, &ca).await, served(&first));

    let second = ca.leaf(&["relay.test"], Validity::Current);
    write_pair(&dir, &second);
    lab.daemon
        .wait_for_event(&[("event", "inbound_tls.reloaded"), ("why", "file changed")])
        .await;
    assert_eq!(offered(smtp, &ca).await, served(&second));

    lab.daemon.signal("HUP");
    lab.daemon
        .wait_for_event(&[("event", "inbound_tls.reloaded"), ("why", "SIGHUP")])
        .await;
    assert_eq!(offered(smtp, &ca).await, served(&second));
}

/// The certificate tlsrouter offers to an MTA that says STARTTLS now.
async fn offered(smtp: std::net::SocketAddr, ca: &TestCa) -> Vec<u8> {
    let (mut client, _) = SmtpClient::connect(smtp).await;
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    let client = client
        .starttls(tls_client(ca), "relay.test")
        .await
        .expect("TLS with tlsrouter");
    client.peer_certificate().expect("a certificate")
}
