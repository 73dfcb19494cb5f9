//! Proves the test support works for real before end-to-end tests rely on it: certificates
//! that rustls judges as intended, a DNS server that hickory's resolver understands, SMTP
//! servers that real TLS clients (rustls, OpenSSL) talk to, and the client that drives them.

use crate::support;

use std::io::{BufRead, BufReader as StdBufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::dns::{DnsServer, TestZone};
use crate::support::lab::dedent;
use crate::support::pki::{CertKey, TestCa, Validity, self_signed};
use crate::support::settings::Settings;
use crate::support::smtp_client::{Reply, SmtpClient};
use crate::support::smtp_server::{Action, Received, ServerBehaviour, SmtpServer, StartTls, Step};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError, ClientConfig};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Dot-stuffed and CRLF-terminated, as an MTA sends it.
const BODY: &[u8] = b"Subject: hi\r\n\r\n..a line that starts with a dot\r\nbye\r\n";

// ---- certificates ----

fn verify(ca: &TestCa, cert: &CertKey, name: &str) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(ca.roots()), provider)
        .build()
        .expect("verifier");
    let name = ServerName::try_from(name.to_string()).expect("server name");
    verifier
        .verify_server_cert(
            &cert.chain[0],
            &cert.chain[1..],
            &name,
            &[],
            UnixTime::now(),
        )
        .map(drop)
}

/// Days from now to the certificate's not_after, as X.509 says it.
fn days_left(cert: &CertKey) -> i64 {
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert.chain[0]).expect("parse leaf");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    (parsed.validity().not_after.timestamp() - now.as_secs() as i64).div_euclid(86_400)
}

#[test]
fn a_leaf_signed_by_the_test_ca_is_trusted_only_while_valid_and_for_its_names() {
    let ca = TestCa::new();
    let current = ca.leaf(&["mx.example.test"], Validity::Current);
    assert_eq!(verify(&ca, &current, "mx.example.test"), Ok(()));
    assert!((363..=365).contains(&days_left(&current)));

    let wrong_name = verify(&ca, &current, "other.test").expect_err("wrong name");
    assert!(
        matches!(
            wrong_name,
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{wrong_name:?}"
    );

    let expired = ca.leaf(&["mx.example.test"], Validity::Expired);
    let error = verify(&ca, &expired, "mx.example.test").expect_err("expired");
    assert!(
        matches!(
            error,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{error:?}"
    );
    assert!(
        (-31..=-30).contains(&days_left(&expired)),
        "{}",
        days_left(&expired)
    );

    let future = ca.leaf(&["mx.example.test"], Validity::NotYetValid);
    let error = verify(&ca, &future, "mx.example.test").expect_err("not yet valid");
    assert!(
        matches!(
            error,
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
            )
        ),
        "{error:?}"
    );
}

#[test]
fn a_self_signed_certificate_or_another_cas_leaf_has_an_unknown_issuer() {
    let ca = TestCa::new();
    let unknown = |cert: &CertKey| {
        let error = verify(&ca, cert, "mx.example.test").expect_err("untrusted");
        assert_eq!(
            error,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    };
    unknown(&self_signed(&["mx.example.test"]));
    unknown(&TestCa::new().leaf(&["mx.example.test"], Validity::Current));
}

#[test]
fn the_ca_file_holds_the_pem_and_the_not_after_date_matches_the_certificate() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = ca.write_ca_file(dir.path());
    let written = std::fs::read_to_string(&path).expect("read CA file");
    assert_eq!(written, ca.ca_pem());
    assert!(written.starts_with("-----BEGIN CERTIFICATE-----"));

    let cert = ca.leaf(&["mx.example.test"], Validity::Expired);
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert.chain[0]).expect("parse");
    let not_after = parsed.validity().not_after.to_datetime();
    let date = cert.not_after;
    assert_eq!(
        (
            not_after.year(),
            u8::from(not_after.month()),
            not_after.day()
        ),
        (date.year, date.month, date.day)
    );
    let shown = format!("{:04}-{:02}-{:02}", date.year, date.month, date.day);
    assert_eq!(cert.not_after.to_string(), shown);
    // The clone keeps the key usable.
    assert_eq!(cert.clone().key.secret_der(), cert.key.secret_der());
}

// ---- DNS ----

#[derive(Clone, Copy, Debug)]
enum Transport {
    Udp,
    Tcp,
}

/// A resolver that asks only `dns`, over one transport, without caching across tests.
fn resolver(dns: SocketAddr, transport: Transport) -> TokioResolver {
    let mut connection = match transport {
        Transport::Udp => ConnectionConfig::udp(),
        Transport::Tcp => ConnectionConfig::tcp(),
    };
    connection.port = dns.port();
    let server = NameServerConfig::new(dns.ip(), true, vec![connection]);
    let config = ResolverConfig::from_name_servers(vec![server]);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    let options = builder.options_mut();
    options.ndots = 0;
    options.attempts = 1;
    options.timeout = Duration::from_secs(5);
    builder.build().expect("resolver")
}

async fn mx(resolver: &TokioResolver, domain: &str) -> Result<Vec<(u16, String)>, NetError> {
    let lookup = resolver.lookup(domain, RecordType::MX).await?;
    let exchanges = lookup.answers().iter().filter_map(|r| match &r.data {
        RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
        _ => None,
    });
    Ok(exchanges.collect())
}

fn lab_zone() -> TestZone {
    TestZone::new()
        .mx("example.test", 20, "mx2.example.test")
        .mx("example.test", 10, "mx1.example.test")
        .a("mx1.example.test", Ipv4Addr::new(127, 0, 0, 2))
        .aaaa("mx1.example.test", Ipv6Addr::LOCALHOST)
        .null_mx("nullmx.test")
        .a("a-only.test", Ipv4Addr::new(127, 0, 0, 3))
        .servfail("broken.test")
        .nxdomain_by_default()
}

#[tokio::test]
async fn dns_server_answers_mx_null_mx_and_nxdomain_over_udp_and_tcp() {
    let dns = DnsServer::start(lab_zone()).await;
    for transport in [Transport::Udp, Transport::Tcp] {
        let resolver = resolver(dns.addr, transport);
        let mut exchanges = mx(&resolver, "example.test.").await.expect("MX");
        exchanges.sort();
        assert_eq!(
            exchanges,
            vec![
                (10, "mx1.example.test.".to_string()),
                (20, "mx2.example.test.".to_string())
            ],
            "{transport:?}"
        );
        let null = mx(&resolver, "nullmx.test.").await.expect("null MX");
        assert_eq!(null, vec![(0, ".".to_string())], "{transport:?}");
        let error = mx(&resolver, "nowhere.test.").await.expect_err("NXDOMAIN");
        assert!(error.is_nx_domain(), "{transport:?}: {error:?}");
    }
}

#[tokio::test]
async fn dns_server_answers_nodata_for_a_name_that_lacks_the_type() {
    let dns = DnsServer::start(lab_zone()).await;
    let resolver = resolver(dns.addr, Transport::Udp);
    for name in ["a-only.test.", "mx1.example.test.", "test."] {
        let error = mx(&resolver, name).await.expect_err("NODATA");
        assert!(error.is_no_records_found(), "{name}: {error:?}");
        assert!(!error.is_nx_domain(), "{name} exists: {error:?}");
    }
}

#[tokio::test]
async fn dns_server_answers_a_and_aaaa_whatever_the_case_and_can_change_its_zone() {
    let dns = DnsServer::start(lab_zone()).await;
    let resolver = resolver(dns.addr, Transport::Tcp);
    for name in ["mx1.example.test.", "MX1.Example.TEST."] {
        let mut ips: Vec<IpAddr> = resolver.lookup_ip(name).await.expect("ip").iter().collect();
        ips.sort();
        assert_eq!(
            ips,
            vec![
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            ]
        );
    }
    let before = resolver
        .lookup_ip("dotted.test.")
        .await
        .expect_err("not yet");
    assert!(before.is_nx_domain(), "{before:?}");
    let dotted = TestZone::new().a("Dotted.Test.", Ipv4Addr::LOCALHOST);
    // Takes effect at once: TTL 0, so the resolver cached neither the NXDOMAIN nor anything.
    dns.replace_zone(dotted);
    let ips: Vec<IpAddr> = resolver
        .lookup_ip("dotted.test.")
        .await
        .expect("replaced zone")
        .iter()
        .collect();
    assert_eq!(ips, vec![LOCALHOST]);
}

#[tokio::test]
async fn dns_servfail_is_an_error_that_is_neither_nxdomain_nor_nodata() {
    let dns = DnsServer::start(lab_zone()).await;
    for transport in [Transport::Udp, Transport::Tcp] {
        let resolver = resolver(dns.addr, transport);
        let error = mx(&resolver, "BROKEN.test").await.expect_err("SERVFAIL");
        println!("{transport:?}: SERVFAIL gives {error:?}");
        assert!(!error.is_nx_domain(), "{error:?}");
        assert!(!error.is_no_records_found(), "{error:?}");
    }
}

// ---- SMTP server ----

fn tls_client(ca: &TestCa) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    Arc::new(config)
}

async fn start(behaviour: ServerBehaviour) -> SmtpServer {
    SmtpServer::start(LOCALHOST, 0, behaviour)
        .await
        .expect("start SMTP server")
}

/// Connects and says EHLO; returns the client and the EHLO reply.
async fn ehlo(server: &SmtpServer) -> (SmtpClient, Reply) {
    let (mut client, greeting) = SmtpClient::connect(server.addr()).await;
    assert_eq!(greeting.wire(), "220 mx.test ESMTP");
    let ehlo = client.cmd("EHLO client.test").await;
    assert_eq!(ehlo.code, 250, "{ehlo:?}");
    (client, ehlo)
}

/// MAIL, RCPT, DATA; each must be accepted.
async fn send<S>(client: &mut SmtpClient<S>, from: &str, to: &str, body: &[u8]) -> Reply
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mail = client.cmd(&format!("MAIL FROM:<{from}> SIZE=100")).await;
    assert_eq!(mail.code, 250, "{mail:?}");
    let rcpt = client.cmd(&format!("RCPT TO:<{to}>")).await;
    assert_eq!(rcpt.code, 250, "{rcpt:?}");
    client.data(body).await
}

#[tokio::test]
async fn a_rustls_client_trusting_the_test_ca_delivers_over_starttls_13_byte_for_byte() {
    let ca = TestCa::new();
    let server = start(ServerBehaviour::tls(
        ca.leaf(&["mx.test"], Validity::Current),
    ))
    .await;
    let (client, ehlo) = ehlo(&server).await;
    for keyword in [
        "PIPELINING",
        "8BITMIME",
        "SIZE 52428800",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
    ] {
        assert!(
            ehlo.lines.iter().any(|l| l == keyword),
            "{keyword}: {ehlo:?}"
        );
    }

    let mut tls = client
        .starttls(tls_client(&ca), "mx.test")
        .await
        .expect("TLS handshake");
    // Nothing from before TLS counts: EHLO again first.
    assert_eq!(tls.cmd("MAIL FROM:<a@sender.test>").await.code, 503);
    let ehlo = tls.cmd("EHLO client.test").await;
    assert!(!ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    let end = send(&mut tls, "a@sender.test", "b@example.test", BODY).await;
    assert_eq!(end.wire(), "250 2.0.0 queued as X");
    assert_eq!(tls.cmd("QUIT").await.code, 221);

    let got = server.next_message().await;
    assert_eq!(got.data, BODY, "{:?}", String::from_utf8_lossy(&got.data));
    assert_eq!(got.helo, "client.test");
    assert_eq!(got.mail_from, "a@sender.test");
    assert_eq!(got.rcpt_to, vec!["b@example.test"]);
    assert!(got.completed);
    let tls = got.tls.expect("over TLS");
    assert_eq!(tls.version, "TLSv1.3");
    assert!(tls.cipher.starts_with("TLS13_"), "{}", tls.cipher);
    assert_eq!(server.tls_handshakes_attempted(), 1);
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn a_tls_12_only_server_gives_a_modern_client_tls_12() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.test"], Validity::Current);
    let server = start(ServerBehaviour::with_starttls(StartTls::Tls12Only(cert))).await;
    let (client, _) = ehlo(&server).await;
    let mut tls = client
        .starttls(tls_client(&ca), "mx.test")
        .await
        .expect("handshake");
    tls.cmd("EHLO client.test").await;
    send(&mut tls, "a@sender.test", "b@example.test", BODY).await;
    let got = server.next_message().await.tls.expect("TLS");
    assert_eq!(got.version, "TLSv1.2");
    assert!(got.cipher.starts_with("TLS_ECDHE_"), "{}", got.cipher);
}

#[tokio::test]
async fn an_implicit_tls_server_greets_inside_tls_and_offers_no_starttls() {
    let ca = TestCa::new();
    let behaviour = ServerBehaviour {
        implicit_tls: Some(ca.leaf(&["smarthost.test"], Validity::Current)),
        ..ServerBehaviour::default()
    };
    let server = start(behaviour).await;
    let (mut tls, greeting) =
        SmtpClient::connect_tls(server.addr(), tls_client(&ca), "smarthost.test").await;
    assert_eq!(greeting.wire(), "220 mx.test ESMTP");
    let ehlo = tls.cmd("EHLO client.test").await;
    assert!(!ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    assert_eq!(tls.cmd("STARTTLS").await.code, 503);
    send(&mut tls, "a@sender.test", "b@example.test", BODY).await;
    let got = server.next_message().await;
    assert_eq!(got.tls.expect("TLS").version, "TLSv1.3");
    assert_eq!(got.data, BODY);
}

#[tokio::test]
async fn a_server_told_to_stop_offering_starttls_leaves_it_out_of_the_next_ehlo() {
    let ca = TestCa::new();
    let server = start(ServerBehaviour::tls(
        ca.leaf(&["mx.test"], Validity::Current),
    ))
    .await;
    let (mut client, ehlo) = ehlo(&server).await;
    assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    server.stop_offering_starttls();
    let ehlo = client.cmd("EHLO client.test").await;
    assert!(!ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    assert_eq!(client.cmd("STARTTLS").await.code, 502);
}

/// Starts `starttls` behaviour and returns the handshake error a rustls client gets.
async fn failed_handshake(ca: &TestCa, starttls: StartTls) -> (std::io::Error, SmtpServer) {
    let server = start(ServerBehaviour::with_starttls(starttls)).await;
    let (client, _) = ehlo(&server).await;
    let error = client
        .starttls(tls_client(ca), "mx.test")
        .await
        .err()
        .expect("the handshake fails");
    assert_eq!(server.tls_handshakes_attempted(), 1);
    (error, server)
}

fn rustls_error(error: &std::io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

#[tokio::test]
async fn a_modern_rustls_client_meets_a_protocol_version_failure_at_the_tls_10_only_server() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.test"], Validity::Current);
    let (error, _server) = failed_handshake(&ca, StartTls::Tls10Only(cert)).await;
    let inner = rustls_error(&error);
    println!("TLS 1.0-only server, rustls client sees: {error:?} (inner {inner:?})");
    assert!(
        matches!(
            inner,
            Some(rustls::Error::AlertReceived(
                AlertDescription::ProtocolVersion
            )) | Some(rustls::Error::PeerIncompatible(_))
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn the_tls_10_only_server_really_speaks_tls_10_to_an_openssl_client() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.test"], Validity::Current);
    let server = start(ServerBehaviour::with_starttls(StartTls::Tls10Only(cert))).await;
    let addr = server.addr();
    let version = tokio::task::spawn_blocking(move || openssl_tls10_handshake(addr))
        .await
        .expect("join");
    assert_eq!(version, "TLSv1");
}

/// A blocking OpenSSL client limited to TLS 1.0: greeting, EHLO, STARTTLS, handshake.
fn openssl_tls10_handshake(addr: SocketAddr) -> String {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = StdBufReader::new(tcp.try_clone().expect("clone"));
    let mut read_reply = || {
        let mut line = String::new();
        while reader.read_line(&mut line).expect("read") > 0
            && line.as_bytes().get(3) == Some(&b'-')
        {
            line.clear();
        }
        line
    };
    assert!(read_reply().starts_with("220"));
    tcp.write_all(b"EHLO client.test\r\n").expect("EHLO");
    assert!(read_reply().starts_with("250"));
    tcp.write_all(b"STARTTLS\r\n").expect("STARTTLS");
    assert!(read_reply().starts_with("220"));
    let mut connector = SslConnector::builder(SslMethod::tls()).expect("connector");
    connector
        .set_cipher_list("DEFAULT:@SECLEVEL=0")
        .expect("ciphers");
    connector
        .set_min_proto_version(Some(SslVersion::TLS1))
        .expect("min");
    connector
        .set_max_proto_version(Some(SslVersion::TLS1))
        .expect("max");
    connector.set_verify(SslVerifyMode::NONE);
    let tls = connector
        .build()
        .connect("mx.test", tcp)
        .expect("TLS 1.0 handshake");
    tls.ssl().version_str().to_string()
}

#[tokio::test]
async fn a_server_that_aborts_after_the_starttls_220_fails_the_rustls_handshake() {
    let ca = TestCa::new();
    let (error, server) = failed_handshake(&ca, StartTls::AbortAfter220).await;
    println!("abort after 220: {error:?}");
    assert!(rustls_error(&error).is_none(), "not a TLS alert: {error:?}");
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn bytes_injected_after_the_starttls_220_are_caught_before_the_handshake() {
    let ca = TestCa::new();
    let (error, _server) = failed_handshake(&ca, StartTls::InjectAfter220).await;
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error:?}");
    assert!(error.to_string().contains("250 AUTH LOGIN"), "{error}");
}

#[tokio::test]
async fn recipient_and_sender_rejections_are_sent_verbatim_and_nothing_is_recorded() {
    for reply in ["550 5.1.1 no such user", "450 4.2.1 mailbox busy"] {
        let server = start(ServerBehaviour::plain().rcpt_reply(reply)).await;
        let (mut client, _) = ehlo(&server).await;
        assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
        let rcpt = client.cmd("RCPT TO:<b@example.test>").await;
        assert_eq!(rcpt.wire(), reply);
        assert_eq!(rcpt.enhanced().as_deref(), Some(&reply[4..9]));
        let data = client.data(BODY).await;
        assert_eq!(data.wire(), "554 5.5.1 no valid recipients");
        assert!(server.attempts().is_empty());
    }
    let server = start(ServerBehaviour::plain().mail_reply("421 4.3.2 shutting down")).await;
    let (mut client, _) = ehlo(&server).await;
    let mail = client.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!(mail.wire(), "421 4.3.2 shutting down");
}

#[tokio::test]
async fn one_plain_connection_carries_several_transactions_with_rset_and_noop() {
    let server = start(ServerBehaviour::plain().data_end_reply("250 2.0.0 ok: id 7")).await;
    let (mut client, greeting) = SmtpClient::connect(server.addr()).await;
    assert_eq!(greeting.code, 220);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 503);
    assert_eq!(client.cmd("HELO old.test").await.wire(), "250 mx.test");
    let ehlo = client.cmd("EHLO client.test").await;
    assert!(!ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    assert_eq!(client.cmd("STARTTLS").await.code, 502);

    let end = send(&mut client, "", "first@example.test", b"1\r\n").await;
    assert_eq!(end.wire(), "250 2.0.0 ok: id 7");
    assert_eq!(client.cmd("MAIL FROM:<x@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RSET").await.code, 250);
    assert_eq!(client.cmd("NOOP").await.code, 250);
    assert_eq!(client.cmd("VRFY b").await.code, 500);
    send(&mut client, "a@sender.test", "second@example.test", b"").await;
    assert_eq!(client.cmd("QUIT").await.code, 221);
    assert!(client.try_read_reply().await.is_none(), "closed after QUIT");

    let first = server.next_message().await;
    assert_eq!(
        (first.mail_from.as_str(), first.data.as_slice()),
        ("", &b"1\r\n"[..])
    );
    let second = server.next_message().await;
    assert_eq!(second.rcpt_to, vec!["second@example.test"]);
    assert_eq!(second.data, b"");
    assert!(second.tls.is_none());
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn next_message_waits_for_a_message_that_arrives_later() {
    let server = start(ServerBehaviour::plain()).await;
    let addr = server.addr();
    let sender = tokio::spawn(async move {
        let (mut client, _) = SmtpClient::connect(addr).await;
        client.cmd("EHLO client.test").await;
        send(&mut client, "a@sender.test", "b@example.test", BODY).await
    });
    // The sender has not run yet on this single-threaded runtime.
    assert!(server.messages().is_empty());
    let got = server.next_message().await;
    assert_eq!(got.data, BODY);
    assert_eq!(sender.await.expect("sender").code, 250);
}

#[tokio::test]
async fn a_server_that_drops_mid_data_records_an_incomplete_attempt() {
    let server = start(ServerBehaviour::plain().drop_mid_data()).await;
    let (mut client, _) = ehlo(&server).await;
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    assert_eq!(client.cmd("DATA").await.code, 354);
    client.send_raw(b"Subject: first line\r\n").await;
    assert!(client.try_read_reply().await.is_none(), "no reply, closed");
    assert!(server.messages().is_empty());
    let attempts = server.attempts();
    let expected = Received {
        helo: "client.test".into(),
        mail_from: "a@sender.test".into(),
        rcpt_to: vec!["b@example.test".into()],
        data: b"Subject: first line\r\n".to_vec(),
        completed: false,
        ..Received::default()
    };
    assert_eq!(attempts, vec![expected]);
}

#[tokio::test]
async fn auth_plain_and_login_succeed_with_any_credentials_and_are_recorded() {
    let server = start(ServerBehaviour::plain().ehlo_keyword("AUTH PLAIN LOGIN")).await;
    let (mut client, ehlo) = ehlo(&server).await;
    assert_eq!(
        ehlo.lines.last().map(String::as_str),
        Some("AUTH PLAIN LOGIN")
    );
    assert_eq!(client.cmd("AUTH PLAIN AHVzZXIAcGFzcw==").await.code, 235);
    assert_eq!(client.cmd("AUTH LOGIN").await.wire(), "334 VXNlcm5hbWU6");
    assert_eq!(client.cmd("dXNlcg==").await.wire(), "334 UGFzc3dvcmQ6");
    assert_eq!(client.cmd("cGFzcw==").await.code, 235);
    assert_eq!(client.cmd("AUTH CRAM-MD5").await.code, 504);
    send(&mut client, "a@sender.test", "b@example.test", BODY).await;
    let got = server.next_message().await;
    let lines = vec![
        "AUTH PLAIN AHVzZXIAcGFzcw==",
        "AUTH LOGIN",
        "dXNlcg==",
        "cGFzcw==",
    ];
    assert_eq!(got.auth, lines);
    assert_eq!(server.auth_lines(), lines);
}

#[tokio::test]
async fn a_server_with_credentials_wants_exactly_them_before_mail() {
    let behaviour = ServerBehaviour {
        auth_credentials: Some(("user".into(), "pass".into())),
        ..ServerBehaviour::plain().ehlo_keyword("AUTH PLAIN LOGIN")
    };
    let server = start(behaviour).await;
    let (mut client, _) = ehlo(&server).await;
    let mail = client.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!(mail.wire(), "530 5.7.0 authentication required");
    // "\0user\0wrong", then "\0user\0pass".
    let wrong = client.cmd("AUTH PLAIN AHVzZXIAd3Jvbmc=").await;
    assert_eq!(wrong.wire(), "535 5.7.8 authentication credentials invalid");
    assert_eq!(client.cmd("AUTH PLAIN").await.wire(), "334 ");
    assert_eq!(client.cmd("AHVzZXIAcGFzcw==").await.code, 235);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(server.auth_lines().len(), 3);

    let (mut again, _) = ehlo(&server).await;
    assert_eq!(
        again.cmd("AUTH LOGIN dXNlcg==").await.wire(),
        "334 UGFzc3dvcmQ6"
    );
    assert_eq!(again.cmd("cGFzcw==").await.code, 235);
}

#[tokio::test]
async fn servers_on_several_loopback_addresses_can_share_one_port() {
    let first = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        0,
        ServerBehaviour::plain(),
    )
    .await
    .expect("127.0.0.2");
    let port = first.addr().port();
    let second = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
        port,
        ServerBehaviour::plain(),
    )
    .await
    .expect("127.0.0.3 on the same port");
    assert_eq!(second.addr(), SocketAddr::from(([127, 0, 0, 3], port)));
    let (_, greeting) = SmtpClient::connect(second.addr()).await;
    assert_eq!(greeting.code, 220);
    assert_eq!((first.connections(), second.connections()), (0, 1));
}

#[tokio::test]
async fn dropping_a_server_closes_its_open_connections() {
    let server = start(ServerBehaviour::plain()).await;
    let (mut client, _) = ehlo(&server).await;
    drop(server);
    assert!(client.try_read_reply().await.is_none());
}

// ---- client ----

#[test]
fn replies_give_their_text_and_enhanced_code() {
    let reply = Reply {
        code: 451,
        lines: vec!["4.7.5 first".into(), "second".into()],
    };
    assert_eq!(reply.text(), "4.7.5 first\nsecond");
    assert_eq!(reply.enhanced().as_deref(), Some("4.7.5"));
    assert_eq!(reply.wire(), "451 4.7.5 first\n451 second");
    let plain = Reply {
        code: 250,
        lines: vec!["mx.test".into()],
    };
    assert_eq!(plain.enhanced(), None);
}

#[tokio::test]
#[should_panic(expected = "must end with CRLF")]
async fn data_refuses_a_body_that_does_not_end_with_crlf() {
    let server = start(ServerBehaviour::plain()).await;
    let (mut client, _) = ehlo(&server).await;
    client.data(b"no line ending").await;
}

#[test]
fn init_tracing_can_be_called_by_every_test() {
    support::init_tracing();
    support::init_tracing();
    tracing::info!("tracing reaches the test writer");
}

// ---- scripts, counts, settings ----

#[tokio::test]
async fn a_scripted_421_is_sent_and_then_the_server_only_listens_and_records() {
    let server =
        start(ServerBehaviour::plain().on(Step::Rcpt, Action::Reply("421 4.3.2 bye".into()))).await;
    let (mut client, _) = ehlo(&server).await;
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(
        client.cmd("RCPT TO:<b@example.test>").await.wire(),
        "421 4.3.2 bye"
    );
    client.send_raw(b"NOOP\r\n").await;
    server.wait_for_command("NOOP").await;
    let logs = server.connection_logs();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].after_closing_reply, vec!["NOOP"]);
    assert_eq!(
        logs[0].commands,
        vec![
            "EHLO client.test",
            "MAIL FROM:<a@sender.test>",
            "RCPT TO:<b@example.test>",
            "NOOP"
        ]
    );
    assert!(server.attempts().is_empty());
}

#[tokio::test]
async fn an_extra_line_comes_with_the_normal_reply_and_a_later_connection_gets_its_own_script() {
    let server = start(
        ServerBehaviour::plain()
            .on(Step::Mail, Action::Extra("250 2.0.0 not due".into()))
            .on_connections_from(1, Step::Greeting, Action::Reply("554 5.3.2 go away".into())),
    )
    .await;
    let (mut client, _) = ehlo(&server).await;
    assert_eq!(
        client.cmd("MAIL FROM:<a@sender.test>").await.wire(),
        "250 2.1.0 sender ok"
    );
    assert_eq!(client.read_reply().await.wire(), "250 2.0.0 not due");
    let (_second, greeting) = SmtpClient::connect(server.addr()).await;
    assert_eq!(greeting.wire(), "554 5.3.2 go away");
    assert_eq!(server.connections(), 2);
}

#[tokio::test]
async fn the_server_counts_starttls_commands_and_completed_handshakes_apart() {
    let ca = TestCa::new();
    let server = start(ServerBehaviour::good_tls(&ca, "mx.test")).await;
    let (client, _) = ehlo(&server).await;
    let mut tls = client
        .starttls(tls_client(&ca), "mx.test")
        .await
        .expect("handshake");
    assert_eq!(tls.cmd("EHLO client.test").await.code, 250);
    let (aborted, _) = ehlo(&server).await;
    let aborted = start_then_drop(aborted).await;
    assert_eq!(server.tls_handshakes_attempted(), 2);
    assert_eq!(server.tls_sessions(), 1, "{:?}", server.connection_logs());
    assert_eq!(server.connections(), 2);
    drop(aborted);
}

/// Sends STARTTLS and leaves without a handshake.
async fn start_then_drop(mut client: SmtpClient) -> Reply {
    client.cmd("STARTTLS").await
}

#[tokio::test]
async fn a_refusal_after_the_dot_is_an_attempt_not_a_message() {
    let server = start(ServerBehaviour::plain().data_end_reply("554 5.7.1 refused")).await;
    let (mut client, _) = ehlo(&server).await;
    let end = send(&mut client, "a@sender.test", "b@example.test", BODY).await;
    assert_eq!(end.wire(), "554 5.7.1 refused");
    assert!(server.messages().is_empty());
    let attempts = server.attempts();
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].completed && !attempts[0].accepted);
    assert_eq!(attempts[0].data, BODY);
}

#[test]
fn settings_merge_fragments_and_render_yaml_the_proxy_reads() {
    let dns = SocketAddr::from(([127, 0, 0, 1], 5353));
    let settings = Settings::lab(dns, std::path::Path::new("/ca.pem"), 2525)
        .yaml("timeouts: { connect: 1s }\nlimits:\n  max_recipients: 3\n")
        .set("allow_clients", vec!["192.0.2.0/24"]);
    let config = settings.to_config();
    assert_eq!(config.timeouts.connect, Duration::from_secs(1));
    assert_eq!(config.timeouts.greeting, Duration::from_secs(10), "kept");
    assert_eq!(config.limits.max_recipients, 3);
    assert_eq!(config.delivery.port, 2525);
    assert_eq!(config.resolver.nameservers, vec![dns]);
    assert_eq!(
        config.tls.ca_file.as_deref(),
        Some(std::path::Path::new("/ca.pem"))
    );
    assert!(!config.tls.system_roots);
    assert!(config.allow_clients[0].contains("192.0.2.7".parse().expect("ip")));
    assert!(!config.allow_clients[0].contains("127.0.0.1".parse().expect("ip")));
    assert!(
        settings
            .to_yaml()
            .contains("\ntimeouts:\n  command: \"10s\"\n"),
        "{}",
        settings.to_yaml()
    );
}

#[test]
fn dedent_removes_the_indentation_a_raw_string_has_in_code() {
    let text = dedent(
        r#"
        rules:
          - name: default

            tls: never
    "#,
    );
    assert_eq!(text, "rules:\n  - name: default\n\n    tls: never\n");
    assert_eq!(dedent("rules:\n  - name: x\n"), "rules:\n  - name: x\n");
}
