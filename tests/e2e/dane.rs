//! DANE (RFC 7672) certificate checks in real rustls handshakes on loopback: a DANE-EE
//! record authenticates a server by its key alone, whatever its certificate's names and
//! dates; a DANE-TA record authenticates a chain that leads to the named anchor and names
//! the MX host; anything else fails the handshake and says why. Then (`daemon`) the proxy
//! against a DNSSEC-signed tree: DANE decides, whatever the rules, and never goes plain.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::support::pki::{CertKey, TestCa, Validity, self_signed};
use openssl::x509::X509;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tlsrouter::net::dane::{
    DaneMismatch, DaneVerdict, DaneVerifier, NoMatch, TaFailure, TlsaRecord,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MX: &str = "mx.dane.test";

/// A TLS server on loopback that sends `chain` and, once the handshake is done, a greeting.
async fn tls_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("server protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("server address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"220 secured\r\n").await;
                    let _ = tls.flush().await;
                }
            });
        }
    });
    addr
}

/// A client handshake with DANE as the only verification; the greeting on success.
async fn dane_handshake(
    addr: SocketAddr,
    records: Vec<TlsaRecord>,
) -> (Result<String, std::io::Error>, Option<DaneVerdict>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(DaneVerifier::new(records, provider));
    let config = DaneVerifier::client_config(verifier.clone(), rustls::ALL_VERSIONS)
        .expect("client configuration");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(MX).expect("server name");
    let result = async {
        let mut tls = connector.connect(name, tcp).await?;
        let mut greeting = vec![0; 13];
        tls.read_exact(&mut greeting).await?;
        Ok(String::from_utf8_lossy(&greeting).into_owned())
    }
    .await;
    (result, verifier.verdict())
}

fn der(cert: &CertKey) -> Vec<u8> {
    cert.chain[0].to_vec()
}

fn ca_der(ca: &TestCa) -> Vec<u8> {
    CertificateDer::from_pem_slice(ca.ca_pem().as_bytes())
        .expect("the CA certificate as DER")
        .to_vec()
}

/// The selected part and digest computed by OpenSSL, independently of the code under test.
fn association(cert_der: &[u8], selector: u8, matching: u8) -> Vec<u8> {
    let selected = match selector {
        0 => cert_der.to_vec(),
        _ => X509::from_der(cert_der)
            .and_then(|c| c.public_key())
            .and_then(|k| k.public_key_to_der())
            .expect("SubjectPublicKeyInfo by OpenSSL"),
    };
    match matching {
        0 => selected,
        1 => openssl::sha::sha256(&selected).to_vec(),
        _ => openssl::sha::sha512(&selected).to_vec(),
    }
}

fn record(usage: u8, selector: u8, matching: u8, cert_der: &[u8]) -> TlsaRecord {
    let data = association(cert_der, selector, matching);
    TlsaRecord::from_fields(usage, selector, matching, &data).expect("a usable record")
}

/// The DANE reason inside a failed handshake's error.
fn mismatch(error: &std::io::Error) -> Option<NoMatch> {
    let rustls_error = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = rustls_error
    else {
        return None;
    };
    other.0.downcast_ref::<DaneMismatch>().map(|m| m.0.clone())
}

#[tokio::test]
async fn dane_ee_accepts_a_matching_key_even_on_an_expired_certificate_for_another_name() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["someone-else.example"], Validity::Expired);
    let addr = tls_server(cert.chain.clone(), cert.key.clone_key()).await;
    for (selector, matching) in [(1, 1), (0, 1), (0, 2), (1, 0)] {
        let tlsa = record(3, selector, matching, &der(&cert));
        let (result, verdict) = dane_handshake(addr, vec![tlsa.clone()]).await;
        let greeting = result.unwrap_or_else(|e| panic!("3 {selector} {matching}: {e}"));
        assert_eq!(greeting, "220 secured\r\n");
        assert_eq!(
            verdict,
            Some(DaneVerdict::Matched {
                record: tlsa,
                depth: 0
            })
        );
    }
}

#[tokio::test]
async fn dane_ee_rejects_a_server_whose_key_matches_no_record() {
    let cert = self_signed(&[MX]);
    let other = self_signed(&[MX]);
    let addr = tls_server(cert.chain.clone(), cert.key.clone_key()).await;
    let (result, verdict) = dane_handshake(addr, vec![record(3, 1, 1, &der(&other))]).await;
    let error = result.expect_err("a key no record names must fail the handshake");
    let why = mismatch(&error).unwrap_or_else(|| panic!("not a DANE failure: {error:?}"));
    assert_eq!(
        why,
        NoMatch::Records {
            ee: Some(1),
            ta: None
        }
    );
    assert!(
        why.to_string().contains("matches none of 1 DANE-EE"),
        "{why}"
    );
    assert_eq!(verdict, Some(DaneVerdict::NoMatch(why)));
}

#[tokio::test]
async fn dane_ta_accepts_a_chain_to_the_named_anchor_that_names_the_mx() {
    let ca = TestCa::new();
    let cert = ca.leaf(&[MX], Validity::Current);
    let mut chain = cert.chain.clone();
    chain.push(CertificateDer::from(ca_der(&ca)));
    let addr = tls_server(chain, cert.key.clone_key()).await;
    for (selector, matching) in [(0, 1), (1, 1), (1, 2)] {
        let tlsa = record(2, selector, matching, &ca_der(&ca));
        let (result, verdict) = dane_handshake(addr, vec![tlsa.clone()]).await;
        result.unwrap_or_else(|e| panic!("2 {selector} {matching}: {e}"));
        assert_eq!(
            verdict,
            Some(DaneVerdict::Matched {
                record: tlsa,
                depth: 1
            })
        );
    }
}

#[tokio::test]
async fn dane_ta_rejects_a_chain_to_another_anchor() {
    let ca = TestCa::new();
    let other_ca = TestCa::new();
    let cert = ca.leaf(&[MX], Validity::Current);
    let mut chain = cert.chain.clone();
    chain.push(CertificateDer::from(ca_der(&ca)));
    let addr = tls_server(chain, cert.key.clone_key()).await;
    let (result, _) = dane_handshake(addr, vec![record(2, 0, 1, &ca_der(&other_ca))]).await;
    let error = result.expect_err("another anchor must fail the handshake");
    let why = mismatch(&error).unwrap_or_else(|| panic!("not a DANE failure: {error:?}"));
    assert_eq!(
        why,
        NoMatch::Records {
            ee: None,
            ta: Some(TaFailure::NoAnchorSent(1))
        }
    );
    assert!(
        why.to_string()
            .contains("no certificate the server sent matches"),
        "{why}"
    );
}

#[tokio::test]
async fn dane_ta_rejects_a_certificate_under_the_anchor_that_does_not_name_the_mx() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["someone-else.example"], Validity::Current);
    let mut chain = cert.chain.clone();
    chain.push(CertificateDer::from(ca_der(&ca)));
    let addr = tls_server(chain, cert.key.clone_key()).await;
    let (result, _) = dane_handshake(addr, vec![record(2, 0, 1, &ca_der(&ca))]).await;
    let error = result.expect_err("a name mismatch under DANE-TA must fail the handshake");
    let why = mismatch(&error).unwrap_or_else(|| panic!("not a DANE failure: {error:?}"));
    assert!(
        matches!(
            &why,
            NoMatch::Records {
                ee: None,
                ta: Some(TaFailure::ChainInvalid { .. })
            }
        ),
        "{why:?}"
    );
    assert!(why.to_string().contains("does not verify"), "{why}");
}

#[tokio::test]
async fn dane_ta_rejects_an_expired_certificate_under_the_anchor() {
    let ca = TestCa::new();
    let cert = ca.leaf(&[MX], Validity::Expired);
    let mut chain = cert.chain.clone();
    chain.push(CertificateDer::from(ca_der(&ca)));
    let addr = tls_server(chain, cert.key.clone_key()).await;
    let (result, _) = dane_handshake(addr, vec![record(2, 1, 1, &ca_der(&ca))]).await;
    let error = result.expect_err("an expired leaf under DANE-TA must fail the handshake");
    let why = mismatch(&error).unwrap_or_else(|| panic!("not a DANE failure: {error:?}"));
    assert!(
        matches!(
            &why,
            NoMatch::Records {
                ee: None,
                ta: Some(TaFailure::ChainInvalid { .. })
            }
        ),
        "{why:?}"
    );
    assert!(why.to_string().contains("does not verify"), "{why}");
}

#[tokio::test]
async fn with_both_kinds_a_dane_ee_match_is_enough_and_a_failure_names_each_kind() {
    let ca = TestCa::new();
    let cert = ca.leaf(&[MX], Validity::Current);
    let stranger = self_signed(&[MX]);
    // The chain leaves the CA out: a DANE-TA record cannot match.
    let addr = tls_server(cert.chain.clone(), cert.key.clone_key()).await;
    let ta = record(2, 0, 1, &ca_der(&ca));

    let ee = record(3, 1, 1, &der(&cert));
    let (result, _) = dane_handshake(addr, vec![ta.clone(), ee]).await;
    result.expect("the DANE-EE record matches");

    let wrong_ee = record(3, 1, 1, &der(&stranger));
    let (result, _) = dane_handshake(addr, vec![ta, wrong_ee]).await;
    let error = result.expect_err("neither record matches");
    let why = mismatch(&error).unwrap_or_else(|| panic!("not a DANE failure: {error:?}"));
    assert_eq!(
        why,
        NoMatch::Records {
            ee: Some(1),
            ta: Some(TaFailure::NoAnchorSent(1))
        }
    );
    let words = why.to_string();
    assert!(
        words.contains("DANE-EE") && words.contains("DANE-TA"),
        "{why}"
    );
}

// The daemon under DANE: a DNSSEC-signed tree on loopback whose root key is the only trust
// anchor, real SMTP servers with certificates made now, and what the MTA-side client is
// told.

mod daemon {
    use std::net::{IpAddr, Ipv4Addr};

    use super::{MX, association, ca_der, der};
    use crate::support::dnssec::{SignedDns, SignedTree, Zone};
    use crate::support::events::{assert_fields, assert_no_fields, field};
    use crate::support::lab::Lab;
    use crate::support::logs::Logs;
    use crate::support::mta::{BODY, send_body, verdict};
    use crate::support::pki::{CertKey, TestCa, Validity, self_signed};
    use crate::support::smtp_client::Reply;
    use crate::support::smtp_server::{ServerBehaviour, SmtpServer, StartTls};
    use hickory_server::proto::rr::RecordType;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const RCPT: &str = "b@dane.test";

    /// A TLSA record's usage, selector and matching type, and its data.
    type Tlsa = ((u8, u8, u8), Vec<u8>);

    /// dane.test's one MX, mx.dane.test, on 127.0.0.1 in the signed root zone, with
    /// `tlsa` as its records for the server's port.
    fn secure_zone(port: u16, tlsa: &[Tlsa]) -> Zone {
        let mut zone = Zone::new()
            .mx("dane.test", 10, MX)
            .a(MX, Ipv4Addr::LOCALHOST);
        for (fields, data) in tlsa {
            zone = zone.tlsa(MX, port, *fields, data);
        }
        zone
    }

    struct DaneLab {
        lab: crate::support::lab::Lab,
        server: SmtpServer,
        dns: SignedDns,
    }

    /// The proxy asks only the signed tree's server and trusts only its root key.
    async fn start(
        behaviour: ServerBehaviour,
        tree: impl FnOnce(u16) -> SignedTree,
        rules: Option<&str>,
    ) -> DaneLab {
        let server = SmtpServer::start(LOCALHOST, 0, behaviour)
            .await
            .expect("smtp server");
        let port = server.addr().port();
        let dns = SignedDns::start(tree(port)).await;
        let mut lab = Lab::new()
            .ca(&TestCa::new())
            .admin()
            .mx_port(port)
            .set("resolver.nameservers", vec![dns.addr.to_string()])
            .set_path("resolver.trust_anchor_file", &dns.trust_anchor_file);
        if let Some(rules) = rules {
            lab = lab.rules(rules);
        }
        DaneLab {
            lab: lab.start().await,
            server,
            dns,
        }
    }

    fn tls(cert: CertKey) -> ServerBehaviour {
        ServerBehaviour {
            starttls: StartTls::Rustls(cert),
            ..ServerBehaviour::default()
        }
    }

    fn assert_deferred(rcpt: &Reply, enhanced: &str, says: &str) {
        assert_eq!(rcpt.code, 451, "{rcpt:?}");
        assert_eq!(rcpt.enhanced().as_deref(), Some(enhanced), "{rcpt:?}");
        assert!(rcpt.text().contains(says), "{says:?} not in {rcpt:?}");
    }

    #[tokio::test]
    async fn dane_ee_match_delivers_encrypted_even_with_an_expired_wrongly_named_certificate() {
        let (logs, _guard) = Logs::capture();
        let cert = TestCa::new().leaf(&["someone-else.example"], Validity::Expired);
        let data = association(&der(&cert), 1, 1);
        let d = start(
            tls(cert),
            |port| SignedTree::new(secure_zone(port, &[((3, 1, 1), data)])),
            None,
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;

        assert_eq!(rcpts[0].code, 250, "{rcpts:?}");
        assert_eq!(reply.code, 250, "{reply:?}");
        let got = d.server.messages();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, BODY);
        assert!(got[0].tls.is_some(), "DANE delivers over TLS");
        assert_fields(
            &logs.transaction_events()[0],
            &[("policy", "dane"), ("verify", "verified"), ("route", "tls")],
        );
        // Routing and DANE share the one MX answer: the MX records are asked for once.
        let mx_questions = d.dns.questions("dane.test", RecordType::MX);
        assert_eq!(mx_questions, 1, "MX questions for one message");
    }

    #[tokio::test]
    async fn dane_ee_mismatch_defers_and_nothing_is_delivered() {
        let (logs, _guard) = Logs::capture();
        let cert = self_signed(&[MX]);
        let other = association(&der(&self_signed(&[MX])), 1, 1);
        let d = start(
            tls(cert),
            |port| SignedTree::new(secure_zone(port, &[((3, 1, 1), other)])),
            None,
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;

        assert_deferred(verdict(&rcpts[0], &reply), "4.7.5", "DANE: dane-mismatch: ");
        assert!(d.server.messages().is_empty(), "nothing delivered");
        let cached = (d.lab.proxy.outbound.cache)
            .get(MX, LOCALHOST)
            .expect("a cache entry");
        assert_eq!(cached.class.name(), "dane-mismatch");
        drop(logs);
    }

    #[tokio::test]
    async fn a_failed_address_lookup_is_believed_for_a_minute_not_asked_again_per_message() {
        let d = start(
            ServerBehaviour::default(),
            |port| SignedTree::new(secure_zone(port, &[])).servfail(MX),
            None,
        )
        .await;
        let asked = |dns: &SignedDns| {
            dns.questions(MX, RecordType::A) + dns.questions(MX, RecordType::AAAA)
        };
        deferred_twice_asked_once(&d, asked, "4.4.1", "address lookup failed").await;
    }

    #[tokio::test]
    async fn a_failed_mx_lookup_is_believed_for_a_minute_not_asked_again_per_message() {
        let d = start(
            ServerBehaviour::default(),
            |port| {
                SignedTree::new(secure_zone(port, &[])).servfail_for("dane.test", RecordType::MX)
            },
            None,
        )
        .await;
        let asked = |dns: &SignedDns| dns.questions("dane.test", RecordType::MX);
        deferred_twice_asked_once(&d, asked, "4.4.3", "DNS lookup").await;
    }

    /// Two messages under a lookup that fails: both are deferred, only the first asks
    /// (`asked` counts the questions), and nothing reaches the MX.
    async fn deferred_twice_asked_once(
        d: &DaneLab,
        asked: impl Fn(&SignedDns) -> usize,
        enhanced: &str,
        says: &str,
    ) {
        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;
        assert_deferred(verdict(&rcpts[0], &reply), enhanced, says);
        let after_first = asked(&d.dns);
        assert!(after_first > 0, "the first message asks");
        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;
        assert_deferred(verdict(&rcpts[0], &reply), enhanced, says);

        assert_eq!(
            asked(&d.dns),
            after_first,
            "the second message does not ask again"
        );
        assert_eq!(d.server.connections(), 0);
    }

    /// A certificate signed by `ca` for the MX, sent with the CA as DANE-TA asks.
    fn leaf_with_anchor(ca: &TestCa, validity: Validity) -> CertKey {
        let mut cert = ca.leaf(&[MX], validity);
        cert.chain.push(ca_der(ca).into());
        cert
    }

    #[tokio::test]
    async fn dane_ta_match_delivers_encrypted() {
        let ca = TestCa::new();
        let anchor = association(&ca_der(&ca), 0, 1);
        let d = start(
            tls(leaf_with_anchor(&ca, Validity::Current)),
            |port| SignedTree::new(secure_zone(port, &[((2, 0, 1), anchor)])),
            None,
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;

        assert_eq!(rcpts[0].code, 250, "{rcpts:?}");
        assert_eq!(reply.code, 250, "{reply:?}");
        let got = d.server.messages();
        assert_eq!(got.len(), 1);
        assert!(got[0].tls.is_some());
    }

    #[tokio::test]
    async fn dane_ta_mismatch_defers_and_nothing_is_delivered() {
        let ca = TestCa::new();
        let another_anchor = association(&ca_der(&TestCa::new()), 0, 1);
        let d = start(
            tls(leaf_with_anchor(&ca, Validity::Current)),
            |port| SignedTree::new(secure_zone(port, &[((2, 0, 1), another_anchor)])),
            None,
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;

        assert_deferred(verdict(&rcpts[0], &reply), "4.7.5", "DANE-TA");
        assert!(d.server.messages().is_empty());
    }

    #[tokio::test]
    async fn unusable_tlsa_requires_tls_so_a_server_without_starttls_gets_nothing_in_plain() {
        // PKIX-EE(1) is not for SMTP (RFC 7672 3.1.3): present, not usable.
        let pkix_ee = vec![0x11; 32];
        let d = start(
            ServerBehaviour::default(),
            |port| SignedTree::new(secure_zone(port, &[((1, 1, 1), pkix_ee)])),
            None,
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;

        assert_deferred(verdict(&rcpts[0], &reply), "4.7.5", "no usable TLSA record");
        assert!(d.server.messages().is_empty(), "never sent in plain");

        let answer = d
            .lab
            .ctl_json(&["rules", "explain", "--rcpt", RCPT, "--mx", MX])
            .await;
        let text = answer["explanation"].as_str().expect("explanation");
        assert!(
            text.contains("first try:   TLS (STARTTLS required, TLS 1.2+, unauthenticated: no TLSA record is usable (DANE))"),
            "{text}"
        );
        let (code, out, err) = d.lab.ctl(&["probe", "dane.test"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("delivery: not to this server: DANE (no usable TLSA record): no STARTTLS"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn bogus_signatures_defer_and_nothing_is_delivered() {
        let cert = self_signed(&["mx.bogus.test"]);
        let d = start(
            tls(cert),
            |_| {
                SignedTree::new(Zone::new()).bogus_zone(
                    "bogus.test",
                    Zone::new()
                        .mx("bogus.test", 10, "mx.bogus.test")
                        .a("mx.bogus.test", Ipv4Addr::LOCALHOST),
                )
            },
            None,
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &["b@bogus.test"], BODY).await;

        assert_deferred(verdict(&rcpts[0], &reply), "4.4.3", "DNSSEC");
        assert!(d.server.messages().is_empty());
    }

    #[tokio::test]
    async fn an_insecure_zone_is_left_to_the_rules_whatever_its_tlsa_records_say() {
        let (logs, _guard) = Logs::capture();
        let d = start(
            ServerBehaviour::default(),
            |port| {
                SignedTree::new(Zone::new()).insecure_zone(
                    "plain.test",
                    Zone::new()
                        .mx("plain.test", 10, "mx.plain.test")
                        .a("mx.plain.test", Ipv4Addr::LOCALHOST)
                        .tlsa("mx.plain.test", port, (3, 1, 1), &[0x22; 32]),
                )
            },
            None,
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &["b@plain.test"], BODY).await;

        assert_eq!(rcpts[0].code, 250, "{rcpts:?}");
        assert_eq!(reply.code, 250, "{reply:?}");
        let got = d.server.messages();
        assert_eq!(got.len(), 1);
        assert!(got[0].tls.is_none(), "the default rule's plain fallback");
        let line = &logs.transaction_events()[0];
        assert_fields(line, &[("route", "plain"), ("class", "no-starttls")]);
        assert_no_fields(line, &["policy"]);
    }

    #[tokio::test]
    async fn dane_overrides_a_tls_never_rule() {
        let cert = self_signed(&[MX]);
        let data = association(&der(&cert), 1, 1);
        let d = start(
            tls(cert),
            |port| SignedTree::new(secure_zone(port, &[((3, 1, 1), data)])),
            Some("rules:\n  - name: never\n    tls: never\n"),
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;

        assert_eq!(rcpts[0].code, 250, "{rcpts:?}");
        assert_eq!(reply.code, 250, "{reply:?}");
        let got = d.server.messages();
        assert!(got[0].tls.is_some(), "encrypted despite tls: never");
    }

    #[tokio::test]
    async fn dane_overrides_a_verify_try_rule_a_mismatch_is_not_encrypted_anyway() {
        let cert = self_signed(&[MX]);
        let other = association(&der(&self_signed(&[MX])), 1, 1);
        let d = start(
            tls(cert),
            |port| SignedTree::new(secure_zone(port, &[((3, 1, 1), other)])),
            Some("rules:\n  - name: lenient\n    verify: try\n    fallback_on: [dane-mismatch, handshake-failed]\n"),
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;

        assert_deferred(verdict(&rcpts[0], &reply), "4.7.5", "DANE");
        assert!(d.server.messages().is_empty());
    }

    #[tokio::test]
    async fn when_the_name_servers_cannot_servednssec_dane_is_off_and_the_log_says_so() {
        let (logs, _guard) = Logs::capture();
        let server = SmtpServer::start(LOCALHOST, 0, ServerBehaviour::default())
            .await
            .expect("smtp server");
        // The unsigned test server: no DNSKEY of the root to validate.
        let lab = Lab::new()
            .ca(&TestCa::new())
            .zone(crate::support::lab::one_mx_zone())
            .mx_port(server.addr().port())
            .start()
            .await;

        let (_, rcpts, reply) = send_body(lab.smtp, &["b@example.test"], BODY).await;

        assert_eq!(rcpts[0].code, 250, "{rcpts:?}");
        assert_eq!(reply.code, 250, "delivered by the rules: {reply:?}");
        assert_eq!(server.messages().len(), 1);
        let warned = logs.events_with(&[("event", "dane"), ("dane", "off"), ("level", "WARN")]);
        assert_eq!(warned.len(), 1, "{}", logs.text());
    }

    #[tokio::test]
    async fn with_a_trust_anchor_the_tree_was_not_signed_with_dane_is_off() {
        let (logs, _guard) = Logs::capture();
        let cert = self_signed(&[MX]);
        let other = association(&der(&self_signed(&[MX])), 1, 1);
        let d = start(
            tls(cert),
            |port| SignedTree::new(secure_zone(port, &[((3, 1, 1), other)])),
            None,
        )
        .await;
        let stranger = SignedDns::start(SignedTree::new(Zone::new())).await;
        let lab = Lab::new()
            .ca(&TestCa::new())
            .mx_port(d.server.addr().port())
            .set("resolver.nameservers", vec![d.dns.addr.to_string()])
            .set_path("resolver.trust_anchor_file", &stranger.trust_anchor_file)
            .start()
            .await;

        let (_, rcpts, reply) = send_body(lab.smtp, &[RCPT], BODY).await;

        // Without DANE the mismatching TLSA record means nothing: encrypted anyway.
        assert_eq!(rcpts[0].code, 250, "{rcpts:?}");
        assert_eq!(reply.code, 250, "{reply:?}");
        assert!(d.server.messages()[0].tls.is_some());
        let off = logs.events_with(&[("event", "dane"), ("dane", "off")]);
        assert_eq!(off.len(), 1, "{}", logs.text());
    }

    #[tokio::test]
    async fn ctl_rules_explain_shows_dane_before_a_tls_never_rule() {
        let cert = self_signed(&[MX]);
        let data = association(&der(&cert), 1, 1);
        let d = start(
            tls(cert),
            |port| SignedTree::new(secure_zone(port, &[((3, 1, 1), data)])),
            Some("rules:\n  - name: never\n    tls: never\n"),
        )
        .await;

        let answer = d
            .lab
            .ctl_json(&["rules", "explain", "--rcpt", RCPT, "--mx", MX])
            .await;

        assert_eq!(answer["decision"]["action"], "tls", "{answer}");
        let text = answer["explanation"].as_str().expect("explanation");
        assert!(
            text.contains(
                "policy:      dane: TLS required, the certificate must match a TLSA record"
            ),
            "{text}"
        );
        assert!(
            text.contains("first try:   TLS (STARTTLS required, TLS 1.2+, the certificate must match a usable TLSA record (DANE))"),
            "{text}"
        );
        assert!(!text.contains("the certificate must verify"), "{text}");
        assert!(d.server.messages().is_empty(), "explain sends nothing");
    }

    #[tokio::test]
    async fn probe_shows_dnssec_the_tlsa_records_and_which_one_matched() {
        let cert = TestCa::new().leaf(&["someone-else.example"], Validity::Expired);
        let data = association(&der(&cert), 1, 1);
        let d = start(
            tls(cert),
            |port| {
                SignedTree::new(secure_zone(
                    port,
                    &[((3, 1, 1), data), ((1, 1, 1), vec![0x33; 32])],
                ))
            },
            None,
        )
        .await;

        let (code, out, err) = d.lab.ctl(&["probe", "dane.test"]).await;

        assert_eq!(code, 0, "{err}");
        for line in [
            "DANE: on; MX answer secure",
            "DNSSEC:   address answer secure",
            "TLSA:     usable",
            "1 1 1: unusable, certificate usage 1 is not DANE-TA(2) or DANE-EE(3)",
            "matched the server certificate",
            "delivery: TLS (STARTTLS required, TLS 1.2+, the certificate must match a usable TLSA record (DANE))",
        ] {
            assert!(out.contains(line), "{line:?} missing in\n{out}");
        }
        assert!(d.server.messages().is_empty(), "probe sends no mail");
    }

    #[tokio::test]
    async fn probe_says_why_no_tlsa_record_matched_and_that_delivery_would_defer() {
        let cert = self_signed(&[MX]);
        let other = association(&der(&self_signed(&[MX])), 1, 1);
        let d = start(
            tls(cert),
            |port| SignedTree::new(secure_zone(port, &[((3, 1, 1), other)])),
            None,
        )
        .await;

        let (code, out, err) = d.lab.ctl(&["probe", "dane.test"]).await;

        assert_eq!(code, 0, "{err}");
        for line in [
            "dane:     no TLSA record matched: the server certificate matches none of 1 DANE-EE record(s)",
            "delivery: not to this server: DANE: dane-mismatch",
        ] {
            assert!(out.contains(line), "{line:?} missing in\n{out}");
        }
    }

    #[tokio::test]
    async fn a_bogus_tlsa_answer_for_a_secure_mx_defers_even_under_tls_never() {
        let (logs, _guard) = Logs::capture();
        let cert = self_signed(&[MX]);
        let data = association(&der(&cert), 1, 1);
        let d = start(
            tls(cert),
            |port| {
                // MX and address secure in the root zone; the TLSA name a zone of its own,
                // signed with a key its DS does not name.
                let tlsa_zone = format!("_{port}._tcp.{MX}");
                SignedTree::new(secure_zone(port, &[]))
                    .bogus_zone(&tlsa_zone, Zone::new().tlsa(MX, port, (3, 1, 1), &data))
            },
            Some("rules:\n  - name: never\n    tls: never\n"),
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;

        assert_deferred(verdict(&rcpts[0], &reply), "4.7.5", "dnssec-bogus");
        assert!(d.server.messages().is_empty(), "never sent in plain");
        let warned = logs.events_with(&[("event", "dane.unknown"), ("level", "WARN")]);
        assert!(!warned.is_empty(), "{}", logs.text());
    }

    #[tokio::test]
    async fn a_servfail_on_the_tlsa_lookup_alone_defers_and_nothing_goes_in_plain() {
        let (logs, _guard) = Logs::capture();
        let cert = self_signed(&[MX]);
        let data = association(&der(&cert), 1, 1);
        // A server without STARTTLS, which the default rule would reach in plain.
        let d = start(
            ServerBehaviour::default(),
            |port| {
                SignedTree::new(secure_zone(port, &[((3, 1, 1), data)]))
                    .servfail(&format!("_{port}._tcp.{MX}"))
            },
            None,
        )
        .await;

        let (_, rcpts, reply) = send_body(d.lab.smtp, &[RCPT], BODY).await;

        assert_deferred(
            verdict(&rcpts[0], &reply),
            "4.7.5",
            "DANE: dnssec-bogus: the TLSA answer is bogus or could not be had",
        );
        assert_eq!(d.server.connections(), 0, "not even connected to");
        assert!(d.server.messages().is_empty(), "never sent in plain");
        let warned = logs.events_with(&[
            ("event", "dane.unknown"),
            ("lookup", "tlsa"),
            ("name", MX),
            ("level", "WARN"),
        ]);
        assert_eq!(warned.len(), 1, "{}", logs.text());
        // A fact about DNS, not the server: nothing cached that would outlive the failure.
        assert!(d.lab.proxy.outbound.cache.get(MX, LOCALHOST).is_none());
        // The transaction's one line says why the recipient was refused.
        let line = &logs.transaction_events()[0];
        assert_fields(line, &[("route", "none")]);
        let refused = field(line, "refused").unwrap_or_default();
        assert!(
            refused.starts_with("b@dane.test (451 4.7.5") && refused.contains("DANE: dnssec-bogus"),
            "{line}"
        );
    }

    #[tokio::test]
    async fn a_trust_anchor_for_a_zone_below_the_root_puts_that_zone_under_dane() {
        let (logs, _guard) = Logs::capture();
        let host = "mx.anchored.test";
        let cert = self_signed(&[host]);
        let data = association(&der(&cert), 1, 1);
        let server = SmtpServer::start(LOCALHOST, 0, tls(cert))
            .await
            .expect("smtp server");
        let port = server.addr().port();
        // Signed with a key of its own that the root's DS does not name: only an anchor at
        // anchored.test itself makes it secure.
        let dns = SignedDns::start(
            SignedTree::new(Zone::new()).bogus_zone(
                "anchored.test",
                Zone::new()
                    .mx("anchored.test", 10, host)
                    .a(host, Ipv4Addr::LOCALHOST)
                    .tlsa(host, port, (3, 1, 1), &data),
            ),
        )
        .await;
        let lab = Lab::new()
            .ca(&TestCa::new())
            .mx_port(port)
            .set("resolver.nameservers", vec![dns.addr.to_string()])
            .set_path(
                "resolver.trust_anchor_file",
                &dns.zone_anchor_file("anchored.test"),
            )
            .start()
            .await;

        let (_, rcpts, reply) = send_body(lab.smtp, &["b@anchored.test"], BODY).await;

        assert_eq!(rcpts[0].code, 250, "{rcpts:?}");
        assert_eq!(reply.code, 250, "{reply:?}");
        assert!(server.messages()[0].tls.is_some());
        let on = logs.events_with(&[("event", "dane"), ("dane", "on")]);
        assert_eq!(on.len(), 1, "{}", logs.text());
        assert_fields(&logs.transaction_events()[0], &[("policy", "dane")]);
    }

    /// The TLS-RPT record of dane.test: reports by mail to tlsrpt@dane.test.
    fn tlsrpt_record(zone: Zone, domain: &str) -> Zone {
        zone.record(
            &format!("_smtp._tls.{domain}"),
            crate::support::https::txt(&format!("v=TLSRPTv1; rua=mailto:tlsrpt@{domain}")),
        )
    }

    /// The report mailed to `sink` for `domain`, as JSON.
    async fn mailed_report(lab: &Lab, sink: &SmtpServer, domain: &str) -> serde_json::Value {
        let reports = &lab.proxy.tls_reports;
        let deliveries = reports.send_reports(reports.today()).await;
        assert!(
            deliveries
                .iter()
                .any(|d| d.domain == domain && d.result.is_ok()),
            "{deliveries:?}"
        );
        let messages = sink.wait_for_messages(1).await;
        let message = messages
            .iter()
            .find(|m| m.rcpt_to == [format!("tlsrpt@{domain}")])
            .expect("the report for the domain");
        let text = String::from_utf8_lossy(&message.data).to_string();
        crate::support::reports::gunzip(&crate::support::reports::attachment_of(&text))
    }

    /// The report's policy for `mx`, which must be of type tlsa.
    fn tlsa_policy<'r>(report: &'r serde_json::Value, mx: &str) -> &'r serde_json::Value {
        let policies = report["policies"].as_array().expect("policies");
        let found = policies
            .iter()
            .find(|p| p["policy"]["mx-host"][0] == mx)
            .unwrap_or_else(|| panic!("no policy for {mx} in {report}"));
        assert_eq!(found["policy"]["policy-type"], "tlsa", "{found}");
        found
    }

    fn result_types(policy: &serde_json::Value) -> Vec<String> {
        policy["failure-details"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| d["result-type"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    #[tokio::test]
    async fn a_dane_domain_with_mta_sts_too_is_reported_under_its_tlsa_records_success_and_each_failure()
     {
        let (_logs, _guard) = Logs::capture();
        let ca = TestCa::new();
        let ip = |last| Ipv4Addr::new(127, 0, 0, last);
        let names = [
            "mx1.dane.test",
            "mx2.dane.test",
            "mx3.dane.test",
            "mx4.dane.test",
        ];
        // mx1 shows a key its TLSA record does not name; mx2's TLSA lookup fails; mx3
        // offers no STARTTLS; mx4 matches and takes the message.
        let mismatched = self_signed(&[names[0]]);
        let good = self_signed(&[names[3]]);
        let good_data = association(&der(&good), 1, 1);
        let mx1 = SmtpServer::start(IpAddr::V4(ip(1)), 0, tls(mismatched))
            .await
            .expect("mx1");
        let port = mx1.addr().port();
        let mx2 = SmtpServer::start(IpAddr::V4(ip(2)), port, ServerBehaviour::default())
            .await
            .expect("mx2 on the shared port");
        let mx3 = SmtpServer::start(IpAddr::V4(ip(3)), port, ServerBehaviour::default())
            .await
            .expect("mx3 on the shared port");
        let mx4 = SmtpServer::start(IpAddr::V4(ip(4)), port, tls(good))
            .await
            .expect("mx4 on the shared port");
        let policy_host = "mta-sts.dane.test";
        let policy_server = crate::support::https::HttpsServer::start(
            ca.leaf(&[policy_host], Validity::Current),
            crate::support::https::Answer::policy(
                "version: STSv1\r\nmode: enforce\r\nmx: *.dane.test\r\nmax_age: 604800\r\n",
            ),
        )
        .await;
        let mut zone = Zone::new();
        for (i, name) in names.iter().enumerate() {
            zone = zone
                .mx("dane.test", 10 * (i as u16 + 1), name)
                .a(name, ip(i as u8 + 1));
        }
        zone = zone
            .tlsa(names[0], port, (3, 1, 1), &[0x44; 32])
            .tlsa(names[1], port, (3, 1, 1), &good_data)
            .tlsa(names[2], port, (3, 1, 1), &good_data)
            .tlsa(names[3], port, (3, 1, 1), &good_data)
            .record(
                "_mta-sts.dane.test",
                crate::support::https::txt("v=STSv1; id=20261201a;"),
            );
        let tree = SignedTree::new(tlsrpt_record(zone, "dane.test"))
            .servfail(&format!("_{port}._tcp.{}", names[1]));
        let dns = SignedDns::start(tree).await;
        let sink = SmtpServer::start(LOCALHOST, 0, ServerBehaviour::plain())
            .await
            .expect("the report sink");
        let reports = tempfile::tempdir().expect("a report directory");
        let lab = Lab::new()
            .ca(&ca)
            .mx_port(port)
            .set("resolver.nameservers", vec![dns.addr.to_string()])
            .set_path("resolver.trust_anchor_file", &dns.trust_anchor_file)
            .set(
                "mta_sts.connect_to",
                serde_json::json!({ policy_host: policy_server.addr().to_string() }),
            )
            .set_path("tls_rpt.directory", reports.path())
            .set("tls_rpt.mail_relay", sink.addr().to_string())
            .start()
            .await;
        let policy = lab.proxy.policies.policy_for("dane.test").await;
        assert!(
            policy.policy().is_some(),
            "the MTA-STS policy is known: {policy:?}"
        );

        let (_, rcpts, reply) = send_body(lab.smtp, &[RCPT], BODY).await;

        assert_eq!(rcpts[0].code, 250, "{rcpts:?}");
        assert_eq!(reply.code, 250, "{reply:?}");
        assert_eq!(mx4.messages().len(), 1);
        assert!(mx1.messages().is_empty() && mx3.messages().is_empty());
        assert_eq!(
            mx2.connections(),
            0,
            "a failed TLSA lookup: not connected to"
        );
        let report = mailed_report(&lab, &sink, "dane.test").await;
        let policies = report["policies"].as_array().expect("policies");
        assert_eq!(policies.len(), 4, "one per MX host, all tlsa: {report}");
        let mx1_policy = tlsa_policy(&report, names[0]);
        assert_eq!(mx1_policy["policy"]["policy-domain"], "dane.test");
        assert_eq!(
            mx1_policy["policy"]["policy-string"],
            serde_json::json!([format!("3 1 1 {}", "44".repeat(32))]),
            "{mx1_policy}"
        );
        assert_eq!(result_types(mx1_policy), ["validation-failure"]);
        assert_eq!(
            mx1_policy["failure-details"][0]["failure-reason-code"],
            "dane-mismatch"
        );
        let mx2_policy = tlsa_policy(&report, names[1]);
        assert_eq!(result_types(mx2_policy), ["dnssec-invalid"]);
        assert_eq!(mx2_policy["policy"]["policy-string"], serde_json::json!([]));
        let mx3_policy = tlsa_policy(&report, names[2]);
        assert_eq!(result_types(mx3_policy), ["starttls-not-supported"]);
        let mx4_policy = tlsa_policy(&report, names[3]);
        assert_eq!(mx4_policy["summary"]["total-successful-session-count"], 1);
        assert_eq!(mx4_policy["summary"]["total-failure-session-count"], 0);
        for failed in [mx1_policy, mx2_policy, mx3_policy] {
            assert_eq!(
                failed["summary"]["total-failure-session-count"], 1,
                "{failed}"
            );
            assert_eq!(failed["summary"]["total-successful-session-count"], 0);
        }
    }

    #[tokio::test]
    async fn unusable_tlsa_records_are_reported_as_tlsa_invalid_though_the_message_went_encrypted()
    {
        let cert = self_signed(&[MX]);
        let sink = SmtpServer::start(LOCALHOST, 0, ServerBehaviour::plain())
            .await
            .expect("the report sink");
        let server = SmtpServer::start(LOCALHOST, 0, tls(cert))
            .await
            .expect("smtp server");
        let port = server.addr().port();
        // PKIX-TA(0) is not for SMTP (RFC 7672 3.1.3).
        let zone = tlsrpt_record(
            secure_zone(port, &[((0, 1, 1), vec![0x55; 32])]),
            "dane.test",
        );
        let dns = SignedDns::start(SignedTree::new(zone)).await;
        let reports = tempfile::tempdir().expect("a report directory");
        let lab = Lab::new()
            .ca(&TestCa::new())
            .mx_port(port)
            .set("resolver.nameservers", vec![dns.addr.to_string()])
            .set_path("resolver.trust_anchor_file", &dns.trust_anchor_file)
            .set_path("tls_rpt.directory", reports.path())
            .set("tls_rpt.mail_relay", sink.addr().to_string())
            .start()
            .await;

        let (_, rcpts, reply) = send_body(lab.smtp, &[RCPT], BODY).await;

        assert_eq!(rcpts[0].code, 250, "{rcpts:?}");
        assert_eq!(reply.code, 250, "{reply:?}");
        assert!(server.messages()[0].tls.is_some(), "TLS, unauthenticated");
        let report = mailed_report(&lab, &sink, "dane.test").await;
        let policy = tlsa_policy(&report, MX);
        assert_eq!(
            policy["policy"]["policy-string"],
            serde_json::json!([format!("0 1 1 {}", "55".repeat(32))])
        );
        assert_eq!(result_types(policy), ["tlsa-invalid"]);
    }
}

/// The DNSSEC start-up check against a resolver that is not up yet: the real binary.
#[cfg(unix)]
mod start_up {
    use std::net::{IpAddr, Ipv4Addr};

    use super::{MX, association, der};
    use crate::support::dnssec::{SignedDns, SignedTree, Zone};
    use crate::support::events::field;
    use crate::support::lab::{Lab, ctl_json};
    use crate::support::metrics::{free_port, scrape, value};
    use crate::support::mta::{BODY, send_body};
    use crate::support::pki::self_signed;
    use crate::support::smtp_server::{ServerBehaviour, SmtpServer, StartTls};
    use hickory_server::proto::rr::RecordType;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_dnssec_check_that_got_no_answer_is_asked_again_and_dane_comes_on() {
        let cert = self_signed(&[MX]);
        let data = association(&der(&cert), 1, 1);
        let behaviour = ServerBehaviour {
            starttls: StartTls::Rustls(cert),
            ..ServerBehaviour::default()
        };
        let server = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, behaviour)
            .await
            .expect("smtp server");
        let port = server.addr().port();
        let zone = Zone::new()
            .mx("dane.test", 10, MX)
            .a(MX, Ipv4Addr::LOCALHOST)
            .tlsa(MX, port, (3, 1, 1), &data);
        // The root's DNSKEY set gets SERVFAIL at first, as from a resolver still starting.
        let tree = SignedTree::new(zone).servfail_first(".", RecordType::DNSKEY, 6);
        let dns = SignedDns::start(tree).await;
        let metrics_port = free_port();
        let mut lab = Lab::new()
            .admin()
            .mx_port(port)
            .set("resolver.nameservers", vec![dns.addr.to_string()])
            .set_path("resolver.trust_anchor_file", &dns.trust_anchor_file)
            .set("metrics.listen", format!("127.0.0.1:{metrics_port}"))
            .start_daemon()
            .await;
        let daemon = &mut lab.daemon;

        let unknown = daemon.wait_for_event_once(&[("event", "dane")]).await;
        assert_eq!(
            field(&unknown, "dane").as_deref(),
            Some("unknown"),
            "{unknown}"
        );
        daemon
            .wait_for_event(&[("event", "dane"), ("dane", "on")])
            .await;
        let stats = ctl_json(&daemon.admin_socket, &["stats"]).await;
        assert_eq!(stats["dane"], "on", "{stats}");
        let metrics = scrape(metrics_port).await;
        assert_eq!(value(&metrics, "tlsrouter_dane{state=\"on\"}"), 1.0);
        assert_eq!(value(&metrics, "tlsrouter_dane{state=\"unknown\"}"), 0.0);

        let (_, rcpts, reply) = send_body(daemon.smtp, &["b@dane.test"], BODY).await;
        assert_eq!(
            (rcpts[0].code, reply.code),
            (250, 250),
            "{rcpts:?} {reply:?}"
        );
        let line = daemon.wait_for_event(&[("message", "transaction")]).await;
        assert_eq!(field(&line, "policy").as_deref(), Some("dane"), "{line}");
    }
}
