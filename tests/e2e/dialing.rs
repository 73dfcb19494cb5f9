//! Every outbound SMTP connection leaves as mail does, through the one dialer: from
//! `delivery.source_address` and with `delivery.socket_mark`. A probe (from the daemon)
//! and a mailed TLS-RPT report leave from the configured source address, as the delivery
//! does; behind the transparent redirect, a probe's connection carries the mark (see
//! `transparent.rs`).

use std::net::{IpAddr, Ipv4Addr};

use crate::support::https::txt;
use crate::support::lab::{Lab, one_mx_zone};
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_client::send_one;
use crate::support::smtp_server::{ServerBehaviour, SmtpServer};
use tlsrouter::policy::tlsrpt::{PolicyFacts, SessionResult, SessionSite, UtcDay};

const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

#[tokio::test]
async fn a_probe_and_a_mailed_report_leave_from_the_source_address_mail_leaves_from() {
    let ca = TestCa::new();
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let server = SmtpServer::start(
        localhost,
        0,
        ServerBehaviour::tls(ca.leaf(&["mx.example.test"], Validity::Current)),
    )
    .await
    .expect("MX");
    // Where mailed reports go (the local MTA, usually).
    let report_sink = SmtpServer::start(localhost, 0, ServerBehaviour::plain())
        .await
        .expect("report sink");
    let zone = one_mx_zone().record(
        "_smtp._tls.example.test",
        txt("v=TLSRPTv1; rua=mailto:tlsrpt@example.test"),
    );
    let builder = Lab::new()
        .ca(&ca)
        .zone(zone)
        .mx_port(server.addr().port())
        .admin();
    let reports = builder.dir().join("reports");
    std::fs::create_dir(&reports).expect("reports directory");
    let lab = builder
        .set("delivery.source_address", SOURCE.to_string())
        .set("tls_rpt.mail_relay", report_sink.addr().to_string())
        .set_path("tls_rpt.directory", &reports)
        .start()
        .await;

    let (_, message) = send_one(
        lab.smtp,
        "MAIL FROM:<a@sender.test>",
        "b@example.test",
        b"hi\r\n",
    )
    .await;
    assert_eq!(message.map(|r| r.code), Some(250));
    let probe = lab.ctl_json(&["probe", "example.test"]).await;
    let banner = &probe["mx"][0]["servers"][0]["banner"];
    assert!(
        banner.as_str().is_some_and(|b| b.starts_with("220")),
        "{probe}"
    );
    let peers: Vec<_> = server.connection_logs().iter().map(|c| c.peer).collect();
    assert_eq!(peers.len(), 2, "the message and the probe");
    assert!(
        peers.iter().all(|p| *p == Some(SOURCE)),
        "the probe left from where mail leaves: {peers:?}"
    );

    let domain = "example.test";
    let session = SessionResult::from_class(tlsrouter::outcome::OutcomeClass::TlsVerified)
        .expect("a session result");
    lab.proxy.tls_reports.record(
        domain,
        &PolicyFacts::NoPolicyFound,
        &session,
        &SessionSite::default(),
    );
    let day = UtcDay::of(lab.proxy.tls_reports.today().start());
    let deliveries = lab.proxy.tls_reports.send_reports(day).await;
    assert!(
        deliveries
            .iter()
            .any(|d| d.domain == domain && d.result.is_ok()),
        "{deliveries:?}"
    );
    let mailed: Vec<_> = (report_sink.connection_logs().iter())
        .map(|c| c.peer)
        .collect();
    assert_eq!(
        mailed,
        [Some(SOURCE)],
        "the report left from where mail leaves"
    );
}

/// A source address this host does not have: the failure is the relay's own, so the MTA is
/// told so, and nothing is cached against the server (nor shared with a fleet).
#[tokio::test]
async fn a_source_address_this_host_lacks_is_a_local_error_and_leaves_the_cache_alone() {
    let (logs, _guard) = crate::support::logs::Logs::capture();
    let server = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, ServerBehaviour::plain())
        .await
        .expect("smtp server");
    let lab = Lab::new()
        .one_mx(&server)
        // TEST-NET-1: on no interface of this machine.
        .set("delivery.source_address", "192.0.2.1")
        .start()
        .await;

    let (rcpt, _) = send_one(
        lab.smtp,
        "MAIL FROM:<a@sender.test>",
        "b@example.test",
        b"Subject: local\r\n\r\nhello\r\n",
    )
    .await;

    assert_eq!(
        (rcpt.code, rcpt.enhanced().as_deref()),
        (451, Some("4.3.0")),
        "{rcpt:?}"
    );
    assert_eq!(server.connections(), 0);
    let cache = &lab.proxy.outbound.cache;
    assert!(
        cache
            .get("mx.example.test", IpAddr::V4(Ipv4Addr::LOCALHOST))
            .is_none(),
        "nothing learnt of the server"
    );
    assert_eq!(lab.proxy.stats.snapshot().local_errors, 1);
    assert_eq!(logs.events_with(&[("event", "local_error")]).len(), 1);
}
