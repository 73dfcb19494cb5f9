//! Recipient domains of every kind, each with its MX on a loopback address of its own (all
//! on one port): tls.test (a certificate the relay trusts) and alias.test (the same MX),
//! plain.test (no STARTTLS), expired.test (an expired certificate), strict.test (no
//! STARTTLS, where `RULES` require TLS: deferred) and refusing.test (every recipient
//! refused with 550). For the ledger and the console.

use std::net::{IpAddr, Ipv4Addr};

use super::dns::TestZone;
use super::lab::{Lab, LabBuilder, dedent};
use super::mta::{Sent, send};
use super::pki::{TestCa, Validity};
use super::smtp_server::{ServerBehaviour, SmtpServer};

/// strict.test requires TLS; everything else goes by the default rule.
pub const RULES: &str = r#"
    rules:
      - name: strict
        match: { domains: ["strict.test"] }
        tls: require
      - name: default
        match: { domains: ["*"] }
"#;

/// The servers; kept for the lab's life.
pub struct Partners {
    _servers: Vec<SmtpServer>,
}

/// A lab builder with the partners' zone and rules, and the servers behind it.
pub async fn partners(ca: &TestCa) -> (LabBuilder, Partners) {
    let tls = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        0,
        ServerBehaviour::tls(ca.leaf(&["mx.tls.test"], Validity::Current)),
    )
    .await
    .expect("tls.test's MX");
    let port = tls.addr().port();
    let at = |last: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
    let plain = SmtpServer::start(at(2), port, ServerBehaviour::default())
        .await
        .expect("plain.test's MX");
    let expired = SmtpServer::start(
        at(3),
        port,
        ServerBehaviour::tls(ca.leaf(&["mx.expired.test"], Validity::Expired)),
    )
    .await
    .expect("expired.test's MX");
    let refusing = SmtpServer::start(
        at(4),
        port,
        ServerBehaviour {
            rcpt_reply: Some("550 5.1.1 no such user here".into()),
            ..ServerBehaviour::default()
        },
    )
    .await
    .expect("refusing.test's MX");
    let mut zone = TestZone::new();
    for (domain, last) in [
        ("tls.test", 1),
        ("plain.test", 2),
        ("expired.test", 3),
        ("strict.test", 2),
        ("refusing.test", 4),
    ] {
        let mx = format!("mx.{domain}");
        zone = zone
            .mx(domain, 10, &mx)
            .a(&mx, Ipv4Addr::new(127, 0, 0, last));
    }
    // A second domain of tls.test's MX: its recipients ride in the same transactions.
    let zone = zone.mx("alias.test", 10, "mx.tls.test");
    let builder = Lab::new()
        .ca(ca)
        .zone(zone)
        .mx_port(port)
        .rules(&dedent(RULES));
    let partners = Partners {
        _servers: vec![tls, plain, expired, refusing],
    };
    (builder, partners)
}

/// The week's traffic both tests send: 3 messages to tls.test (one with alias.test too),
/// 2 to plain.test, 1 each to expired.test, strict.test and refusing.test.
pub async fn traffic(smtp: std::net::SocketAddr) -> Vec<Sent> {
    let sent = vec![
        send(smtp, &["a@tls.test"]).await,
        send(smtp, &["b@tls.test", "c@tls.test"]).await,
        send(smtp, &["d@tls.test", "x@alias.test"]).await,
        send(smtp, &["e@plain.test"]).await,
        send(smtp, &["f@plain.test"]).await,
        send(smtp, &["g@expired.test"]).await,
        send(smtp, &["h@strict.test"]).await,
        send(smtp, &["i@refusing.test"]).await,
    ];
    assert_eq!(sent[6].rcpts[0].code, 451, "strict.test is deferred");
    assert_eq!(sent[7].rcpts[0].code, 550, "refusing.test is refused");
    sent
}
