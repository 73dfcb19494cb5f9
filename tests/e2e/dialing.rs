//! Every outbound SMTP connection leaves as mail does, through the one dialer: from
//! `delivery.source_address` and with `delivery.socket_mark`. A probe (from the daemon)
//! and a mailed TLS-RPT report leave from the configured source address, as the delivery
//! does; behind the transparent redirect, a probe's connection carries the mark (see
//! `transparent.rs`).

use std::net::{IpAddr, Ipv4Addr};

use crate::support::events::field;
use crate::support::https::txt;
use crate::support::lab::{Lab, ctl_json, one_mx_zone};
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_client::{SmtpClient, send_one};
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

/// The descriptors the process `pid` has open now.
#[cfg(target_os = "linux")]
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors")
        .count()
}

/// Sets the soft open-files limit of the running process `pid` (the hard one stays, so it
/// can be raised again).
#[cfg(target_os = "linux")]
fn limit_open_files(pid: u32, limit: usize) {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --pid {pid} --nofile={limit}:");
}

/// The daemon out of descriptors (EMFILE, forced with its open-files limit): the MTA hears
/// `451 4.3.0` naming the local cause, and the server's entry is left as it was, so no
/// healthy MX is skipped afterwards for a failure of this host's own.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn out_of_descriptors_the_mta_is_told_and_the_cache_keeps_what_it_knew() {
    let server = SmtpServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, ServerBehaviour::plain())
        .await
        .expect("smtp server");
    let mut lab = Lab::new()
        .one_mx(&server)
        // Nothing but the connection to the MX needs a descriptor of its own.
        .set("delivery.pool.enabled", false)
        .set("mta_sts.enabled", false)
        .set("resolver.dane", "off")
        .start_daemon()
        .await;
    // One session for both messages: no connection of the MTA comes or goes meanwhile.
    let (mut mta, _) = SmtpClient::connect(lab.daemon.smtp).await;
    mta.cmd("EHLO mta.sender.test").await;
    let message = b"Subject: descriptors\r\n\r\nhello\r\n";
    mta.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!(mta.cmd("RCPT TO:<b@example.test>").await.code, 250);
    assert_eq!(mta.data(message).await.code, 250);
    server.wait_all_closed().await;

    // Not one descriptor more: neither a DNS question nor a connection to the MX. Below
    // what is open now, so that a descriptor the daemon is closing (its end of the MX
    // connection, say) gives no room.
    let pid = lab.daemon.pid();
    limit_open_files(pid, open_files(pid) - 2);
    mta.cmd("MAIL FROM:<a@sender.test>").await;
    let rcpt = mta.cmd("RCPT TO:<b@example.test>").await;
    limit_open_files(pid, 1024);

    assert_eq!(
        (rcpt.code, rcpt.enhanced().as_deref()),
        (451, Some("4.3.0")),
        "{rcpt:?}"
    );
    let said = lab.daemon.wait_for_event(&[("event", "local_error")]).await;
    assert_eq!(field(&said, "level").as_deref(), Some("WARN"), "{said}");
    assert_eq!(
        server.connections(),
        1,
        "only the first message reached the MX"
    );
    let after = ctl_json(&lab.daemon.admin_socket, &["cache", "list"]).await;
    let entries = after["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{after}");
    assert_eq!(
        entries[0]["class"], "no-starttls",
        "what the first message found"
    );
    assert_eq!(entries[0]["count"], 1, "nothing recorded since");
    let stats = ctl_json(&lab.daemon.admin_socket, &["stats"]).await;
    assert_eq!(stats["local_errors"], 1, "{stats}");
}
