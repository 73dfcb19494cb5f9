//! Remote connections kept between MTA sessions, and TLS sessions resumed: what the remote
//! sees (connections, handshakes, commands) and what the MTA hears.

use std::net::Ipv4Addr;

use crate::support::dns::TestZone;
use crate::support::events::{assert_fields, assert_no_fields};
use crate::support::lab::{Lab, LabBuilder};
use crate::support::logs::Logs;
use crate::support::mta::{BODY, send_body};
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_client::SmtpClient;
use crate::support::smtp_server::{Action, ServerBehaviour, SmtpServer, Step};

async fn server(behaviour: ServerBehaviour) -> SmtpServer {
    SmtpServer::start(Ipv4Addr::LOCALHOST.into(), 0, behaviour)
        .await
        .expect("smtp server")
}

fn tls_server(ca: &TestCa, validity: Validity) -> ServerBehaviour {
    ServerBehaviour::plain().starttls(ca.leaf(&["mx.example.test"], validity))
}

/// example.test and other.test, both hosted on mx.example.test where `server` listens.
fn two_domains(ca: &TestCa, server: &SmtpServer) -> LabBuilder {
    let zone = TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .mx("other.test", 10, "mx.example.test")
        .a("mx.example.test", Ipv4Addr::LOCALHOST);
    Lab::new().ca(ca).zone(zone).mx_port(server.addr().port())
}

fn commands_starting(server: &SmtpServer, connection: usize, verb: &str) -> usize {
    server.connection_logs()[connection]
        .commands
        .iter()
        .filter(|c| c.to_ascii_uppercase().starts_with(verb))
        .count()
}

#[tokio::test]
async fn two_messages_in_two_mta_sessions_use_one_remote_connection_and_one_handshake() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let mx = server(tls_server(&ca, Validity::Current)).await;
    let lab = Lab::new().ca(&ca).one_mx(&mx).admin().start().await;

    let first = send_body(lab.smtp, &["b@example.test"], BODY).await;
    assert_eq!(first.2.code, 250, "{first:?}");
    let pooled = lab.ctl_json(&["pool"]).await;
    let pooled = pooled["pool"].as_array().expect("pool rows").clone();
    assert_eq!(pooled.len(), 1, "{pooled:?}");
    assert_eq!(pooled[0]["server"], "mx.example.test");
    assert!(
        pooled[0]["tls"]
            .as_str()
            .unwrap_or("")
            .starts_with("tls-verified"),
        "{pooled:?}"
    );
    let second = send_body(lab.smtp, &["c@example.test"], BODY).await;
    assert_eq!(second.2.code, 250, "{second:?}");

    let got = mx.wait_for_messages(2).await;
    assert!(got.iter().all(|m| m.tls.is_some() && m.data == BODY));
    assert_eq!(mx.connections(), 1, "one remote connection");
    assert_eq!(mx.tls_sessions(), 1, "one handshake");
    assert_eq!(commands_starting(&mx, 0, "MAIL FROM"), 2);
    assert_eq!(
        commands_starting(&mx, 0, "RSET"),
        0,
        "the first transaction ended cleanly: no RSET needed"
    );
    let lines = logs.transaction_events();
    assert_no_fields(&lines[0], &["reused"]);
    assert_fields(&lines[1], &[("reused", "yes"), ("verify", "verified")]);
    let stats = lab.ctl_json(&["stats"]).await;
    assert_eq!(stats["pool_reuses"], 1, "{stats}");
    assert_eq!(stats["tls_full_handshakes"], 1, "{stats}");
    let (code, text, _) = lab.ctl(&["stats"]).await;
    assert_eq!(code, 0);
    assert!(text.contains("pool reuses"), "{text}");
}

#[tokio::test]
async fn a_transaction_the_mta_reset_leaves_the_connection_for_the_next_after_rset() {
    let mx = server(ServerBehaviour::plain()).await;
    let ca = TestCa::new();
    let lab = Lab::new().ca(&ca).one_mx(&mx).start().await;

    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    assert_eq!(client.cmd("RSET").await.code, 250);
    assert_eq!(client.cmd("QUIT").await.code, 221);
    let sent = send_body(lab.smtp, &["b@example.test"], BODY).await;
    assert_eq!(sent.2.code, 250, "{sent:?}");

    assert_eq!(mx.connections(), 1);
    let commands = &mx.connection_logs()[0].commands;
    let rset = commands.iter().position(|c| c == "RSET");
    let second_mail = commands.iter().rposition(|c| c.starts_with("MAIL FROM"));
    assert!(
        matches!((rset, second_mail), (Some(r), Some(m)) if r < m),
        "RSET before the second MAIL FROM: {commands:?}"
    );
    assert_eq!(mx.messages().len(), 1);
}

#[tokio::test]
async fn a_message_whose_rule_requires_a_verified_certificate_never_takes_an_unverified_connection()
{
    let ca = TestCa::new();
    let mx = server(tls_server(&ca, Validity::Expired)).await;
    let rules = r#"
        rules:
          - name: strict
            match: { domains: ["other.test"] }
            tls: require
            verify: require
          - name: relaxed
            match: { domains: ["*"] }
    "#;
    let lab = two_domains(&ca, &mx).rules(rules).start().await;

    let first = send_body(lab.smtp, &["b@example.test"], BODY).await;
    assert_eq!(first.2.code, 250, "{first:?}");
    // Without the cache's word the decision asks for verified TLS instead of refusing at
    // once: the pooled session must be judged on what it is.
    lab.proxy.outbound.cache.flush_all();
    let strict = send_body(lab.smtp, &["b@other.test"], BODY).await;
    assert_eq!(strict.1[0].code, 451, "{strict:?}");
    assert!(strict.1[0].text().contains("strict"), "{strict:?}");

    assert_eq!(
        mx.messages().len(),
        1,
        "nothing went on the unverified session"
    );
    assert_eq!(mx.connections(), 2, "the strict rule made its own attempt");
    assert_eq!(mx.tls_sessions(), 2);
    assert_eq!(commands_starting(&mx, 0, "MAIL FROM"), 1);
}

#[tokio::test]
async fn a_message_whose_rule_wants_tls_never_takes_a_plain_connection() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let mx = server(tls_server(&ca, Validity::Current)).await;
    let rules = r#"
        rules:
          - name: clear
            match: { domains: ["example.test"] }
            tls: never
          - name: normal
            match: { domains: ["*"] }
    "#;
    let lab = two_domains(&ca, &mx).rules(rules).start().await;

    assert_eq!(
        send_body(lab.smtp, &["b@example.test"], BODY).await.2.code,
        250
    );
    assert_eq!(
        send_body(lab.smtp, &["b@other.test"], BODY).await.2.code,
        250
    );
    // And the plain connection is still there for the next plain message.
    assert_eq!(
        send_body(lab.smtp, &["c@example.test"], BODY).await.2.code,
        250
    );

    let got = mx.wait_for_messages(3).await;
    assert!(got[0].tls.is_none());
    assert!(got[1].tls.is_some(), "the second message went encrypted");
    assert!(got[2].tls.is_none());
    assert_eq!(mx.connections(), 2);
    assert_eq!(got[0].connection, got[2].connection);
    let lines = logs.transaction_events();
    assert_fields(&lines[2], &[("reused", "yes"), ("rule", "clear")]);
}

#[tokio::test]
async fn no_connection_is_reused_after_a_4xx_a_421_or_a_reply_out_of_step() {
    let cases = [
        (
            "a 4xx to the message",
            Step::EndOfData,
            Action::Reply("451 4.3.0 try later".into()),
        ),
        (
            "a 4xx to a recipient",
            Step::Rcpt,
            Action::Reply("450 4.2.1 busy".into()),
        ),
        (
            "a 421",
            Step::Rcpt,
            Action::Reply("421 4.3.2 going down".into()),
        ),
        (
            "a reply out of step",
            Step::EndOfData,
            Action::Extra("250 2.0.0 surprise".into()),
        ),
    ];
    let ca = TestCa::new();
    for (case, step, action) in cases {
        let behaviour = ServerBehaviour::plain()
            .on(step, action)
            .on_connections_from(1, step, Action::Normal);
        let mx = server(behaviour).await;
        let lab = Lab::new().ca(&ca).one_mx(&mx).start().await;

        let _ = send_body(lab.smtp, &["b@example.test"], BODY).await;
        let second = send_body(lab.smtp, &["c@example.test"], BODY).await;

        assert_eq!(second.2.code, 250, "{case}: {second:?}");
        assert_eq!(
            mx.connections(),
            2,
            "{case}: a new connection for the second"
        );
        assert_eq!(
            commands_starting(&mx, 0, "MAIL FROM"),
            1,
            "{case}: {:?}",
            mx.connection_logs()[0].commands
        );
        assert_eq!(lab.proxy.stats.snapshot().pool_reuses, 0, "{case}");
    }
}

#[tokio::test]
async fn a_pooled_connection_the_remote_closed_while_idle_costs_the_mta_nothing() {
    let ca = TestCa::new();
    // Takes the first message, then hangs up, as a server does when its idle timer runs.
    let behaviour = ServerBehaviour::plain()
        .on(
            Step::EndOfData,
            Action::ReplyAndClose("250 2.0.0 ok".into()),
        )
        .on_connections_from(1, Step::EndOfData, Action::Normal);
    let mx = server(behaviour).await;
    let lab = Lab::new().ca(&ca).one_mx(&mx).start().await;

    assert_eq!(
        send_body(lab.smtp, &["b@example.test"], BODY).await.2.code,
        250
    );
    mx.wait_until("the first connection closed", |c| c[0].closed)
        .await;
    let second = send_body(lab.smtp, &["c@example.test"], BODY).await;

    assert_eq!(second.0.code, 250, "{second:?}");
    assert_eq!(second.1[0].code, 250, "{second:?}");
    assert_eq!(second.2.code, 250, "{second:?}");
    // (The test server records a message it answered just before hanging up as not taken.)
    let got = mx.attempts();
    assert_eq!(got.len(), 2);
    assert!(got[1].accepted && got[1].connection == 1, "{got:?}");
    assert_eq!(mx.connections(), 2);
    let stats = lab.proxy.stats.snapshot();
    assert_eq!(stats.pool_dead, 1, "{stats:?}");
    assert_eq!(stats.pool_reuses, 0, "{stats:?}");
}

#[tokio::test]
async fn a_connection_carries_at_most_max_messages() {
    let ca = TestCa::new();
    let mx = server(ServerBehaviour::plain()).await;
    let lab = Lab::new()
        .ca(&ca)
        .one_mx(&mx)
        .set("delivery.pool.max_messages", 2)
        .start()
        .await;

    for rcpt in ["a@example.test", "b@example.test", "c@example.test"] {
        assert_eq!(send_body(lab.smtp, &[rcpt], BODY).await.2.code, 250);
    }

    let got = mx.wait_for_messages(3).await;
    assert_eq!(mx.connections(), 2);
    assert_eq!(got[0].connection, got[1].connection);
    assert_ne!(got[1].connection, got[2].connection);
    assert_eq!(commands_starting(&mx, 0, "QUIT"), 1, "closed politely");
}

#[tokio::test]
async fn a_second_connection_to_a_server_resumes_its_tls_session_and_still_verifies() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let mx = server(tls_server(&ca, Validity::Current)).await;
    let lab = Lab::new()
        .ca(&ca)
        .one_mx(&mx)
        .set("delivery.pool.enabled", false)
        .start()
        .await;

    for rcpt in ["a@example.test", "b@example.test"] {
        assert_eq!(send_body(lab.smtp, &[rcpt], BODY).await.2.code, 250);
    }

    assert_eq!(mx.connections(), 2);
    assert_eq!(mx.tls_sessions(), 2);
    let resumed: Vec<bool> = mx.connection_logs().iter().map(|c| c.tls_resumed).collect();
    assert_eq!(
        resumed,
        [false, true],
        "the server resumed the second session"
    );
    let stats = lab.proxy.stats.snapshot();
    assert_eq!(
        (stats.tls_full_handshakes, stats.tls_resumed_handshakes),
        (1, 1),
        "{stats:?}"
    );
    let lines = logs.transaction_events();
    assert_fields(&lines[1], &[("verify", "verified")]);
}

#[tokio::test]
async fn a_session_is_resumed_only_under_the_minimum_version_it_was_made_under() {
    let ca = TestCa::new();
    let mx = server(tls_server(&ca, Validity::Current)).await;
    let rules = r#"
        rules:
          - name: modern
            match: { domains: ["other.test"] }
            min_tls: "1.3"
          - name: normal
            match: { domains: ["*"] }
    "#;
    let lab = two_domains(&ca, &mx)
        .rules(rules)
        .set("delivery.pool.enabled", false)
        .start()
        .await;

    for rcpt in [
        "a@example.test",
        "a@other.test",
        "b@example.test",
        "b@other.test",
    ] {
        assert_eq!(send_body(lab.smtp, &[rcpt], BODY).await.2.code, 250);
    }

    let resumed: Vec<bool> = mx.connection_logs().iter().map(|c| c.tls_resumed).collect();
    assert_eq!(resumed, [false, false, true, true]);
}

#[tokio::test]
async fn mail_from_and_the_first_recipient_go_in_one_write_to_a_remote_that_offers_pipelining() {
    let ca = TestCa::new();
    for (behaviour, how) in [
        (ServerBehaviour::plain(), "plain"),
        (tls_server(&ca, Validity::Current), "TLS"),
    ] {
        let mx = server(behaviour.rcpt_reply("550 5.1.1 no such user")).await;
        let lab = Lab::new().ca(&ca).one_mx(&mx).start().await;

        let sent = send_body(lab.smtp, &["nobody@example.test"], BODY).await;

        assert_eq!(sent.0.code, 250, "{how}: {sent:?}");
        assert_eq!(sent.1[0].code, 550, "{how}: the RCPT's own reply: {sent:?}");
        assert_eq!(sent.1[0].enhanced().as_deref(), Some("5.1.1"), "{how}");
        let log = &mx.connection_logs()[0];
        assert!(
            log.pipelined_after
                .iter()
                .any(|c| c.starts_with("MAIL FROM")),
            "{how}: MAIL FROM came with the RCPT: {log:?}"
        );
    }
}

#[tokio::test]
async fn without_pipelining_mail_from_waits_for_its_reply() {
    let ca = TestCa::new();
    // The server's own EHLO, without PIPELINING.
    let behaviour = ServerBehaviour::plain().on(
        Step::Ehlo,
        Action::Reply("250-mx.test\r\n250 8BITMIME".into()),
    );
    let mx = server(behaviour).await;
    let lab = Lab::new().ca(&ca).one_mx(&mx).start().await;

    assert_eq!(
        send_body(lab.smtp, &["b@example.test"], BODY).await.2.code,
        250
    );

    let log = &mx.connection_logs()[0];
    assert!(log.pipelined_after.is_empty(), "{log:?}");
}

#[tokio::test]
async fn a_reply_out_of_step_in_a_pipelined_group_stops_the_message() {
    let ca = TestCa::new();
    // One reply too many to MAIL FROM: every later reply would be for the wrong command.
    let behaviour =
        ServerBehaviour::plain().on(Step::Mail, Action::Extra("250 2.1.5 surprise".into()));
    let mx = server(behaviour).await;
    let lab = Lab::new().ca(&ca).one_mx(&mx).start().await;

    let sent = send_body(lab.smtp, &["b@example.test"], BODY).await;

    assert_eq!(sent.2.code, 451, "{sent:?}");
    assert_eq!(sent.2.enhanced().as_deref(), Some("4.4.2"), "{sent:?}");
    assert!(mx.messages().is_empty(), "nothing was delivered");
    assert_eq!(
        lab.proxy.outbound.pool.len(),
        0,
        "the connection was not kept"
    );
}
