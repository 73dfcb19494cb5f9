//! End to end: a real SMTP client talks to the real proxy, which resolves MX records from a
//! real DNS server on loopback and delivers to real SMTP servers with real TLS.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::support::dns::{DnsServer, TestZone};
use crate::support::events::{assert_fields, assert_no_fields, field};
use crate::support::lab::Lab;
use crate::support::logs::Logs;
use crate::support::mta::{BODY, send_body};
use crate::support::mx::{one_mx, starttls};
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_client::{Reply, SmtpClient};
use crate::support::smtp_server::{ServerBehaviour, SmtpServer};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A DNS server, a CA, and a proxy that trusts the CA and asks the DNS server; MX hosts
/// listen on `port`.
async fn start_lab(zone: TestZone, ca: &TestCa, port: u16) -> Lab {
    Lab::new().ca(ca).zone(zone).mx_port(port).start().await
}

fn assert_reply(reply: &Reply, code: u16, enhanced: &str, contains: &str) {
    assert_eq!(reply.code, code, "{reply:?}");
    assert_eq!(reply.enhanced().as_deref(), Some(enhanced), "{reply:?}");
    assert!(
        reply.text().contains(contains),
        "{reply:?} lacks {contains:?}"
    );
}

#[tokio::test]
async fn recipient_rejections_reach_the_mta_verbatim_and_nothing_is_delivered() {
    let ca = TestCa::new();
    for reply in ["450 4.2.1 mailbox busy", "550 5.1.1 no such user here"] {
        let behaviour = ServerBehaviour {
            rcpt_reply: Some(reply.to_string()),
            ..ServerBehaviour::default()
        };
        let (lab, server) = one_mx(&ca, behaviour).await;
        let (_, rcpts, data) = send_body(lab.smtp, &["b@example.test"], BODY).await;
        assert_eq!(format!("{} {}", rcpts[0].code, rcpts[0].lines[0]), reply);
        assert_reply(&data, 554, "5.5.1", "no valid recipients");
        assert!(server.messages().is_empty());
    }
}

#[tokio::test]
async fn the_log_line_says_why_each_recipient_was_refused_when_no_message_follows() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let behaviour = ServerBehaviour {
        rcpt_reply: Some("550 5.1.1 no such user here".to_string()),
        ..ServerBehaviour::default()
    };
    let (lab, server) = one_mx(&ca, behaviour).await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    client.cmd("EHLO mta.sender.test").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 550);
    assert_eq!(client.cmd("RCPT TO:<c@nowhere.test>").await.code, 550);
    // What an MTA does when every recipient was refused: no DATA.
    assert_eq!(client.cmd("RSET").await.code, 250);

    let line = &logs.transaction_events()[0];
    assert_fields(line, &[("end", "RSET"), ("reply", "none")]);
    assert_no_fields(line, &["reply_code"]);
    let refused = field(line, "refused").unwrap_or_default();
    assert!(
        refused
            .starts_with("b@example.test (550 5.1.1 no such user here); c@nowhere.test (550 5.1.2"),
        "{line}"
    );
    assert!(server.messages().is_empty());

    // However many recipients are refused, the line (and what is kept for it) is bounded.
    client.cmd("MAIL FROM:<a@sender.test>").await;
    for i in 0..25 {
        client.cmd(&format!("RCPT TO:<u{i}@nowhere.test>")).await;
    }
    client.cmd("RSET").await;
    let refused = field(&logs.transaction_events()[1], "refused").unwrap_or_default();
    let named: Vec<&str> = refused.split("; ").collect();
    assert_eq!(named.len(), 21, "twenty named, and a count: {refused}");
    assert!(named[19].starts_with("u19@nowhere.test ("), "{refused}");
    assert_eq!(named[20], "and 5 more", "{refused}");
}

#[tokio::test]
async fn a_remote_that_drops_mid_data_gets_the_mta_a_451_and_never_a_250() {
    let ca = TestCa::new();
    let behaviour = ServerBehaviour {
        drop_mid_data: true,
        ..ServerBehaviour::default()
    };
    let (lab, server) = one_mx(&ca, behaviour).await;
    // Big enough that the remote closes while the proxy is still sending.
    let mut body = Vec::new();
    for i in 0..20_000 {
        body.extend_from_slice(format!("line {i} of a long message\r\n").as_bytes());
    }

    let (_, _, data) = send_body(lab.smtp, &["b@example.test"], &body).await;

    assert_reply(&data, 451, "4.4.2", "");
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn dns_answers_map_to_the_replies_of_the_design_table() {
    let ca = TestCa::new();
    let zone = TestZone::new()
        .null_mx("nullmx.test")
        .servfail("broken.lab")
        .mx("dead.test", 10, "mx.dead.test")
        .a("mx.dead.test", Ipv4Addr::new(127, 0, 0, 9));
    // Nothing listens on 127.0.0.9 at this port: the MX is unreachable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let lab = start_lab(zone, &ca, closed).await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    client.cmd("EHLO mta").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;

    assert_reply(
        &client.cmd("RCPT TO:<u@nowhere.test>").await,
        550,
        "5.1.2",
        "nowhere.test does not exist",
    );
    assert_reply(
        &client.cmd("RCPT TO:<u@nullmx.test>").await,
        556,
        "5.1.10",
        "null MX",
    );
    // SERVFAIL: a temporary failure.
    assert_reply(
        &client.cmd("RCPT TO:<u@broken.lab>").await,
        451,
        "4.4.3",
        "broken.lab",
    );
    assert_reply(
        &client.cmd("RCPT TO:<u@dead.test>").await,
        451,
        "4.4.1",
        "mx.dead.test[127.0.0.9]",
    );
}

#[tokio::test]
async fn mx_hosts_come_in_preference_order_and_equal_preferences_in_random_order() {
    let zone = TestZone::new()
        .mx("example.test", 20, "backup.example.test")
        .mx("example.test", 10, "a.example.test")
        .mx("example.test", 10, "b.example.test");
    let dns = DnsServer::start(zone).await;
    let resolver = tlsrouter::net::dns::MxResolver::new(&[dns.addr], Duration::from_secs(5))
        .expect("resolver");
    let mut firsts = std::collections::BTreeSet::new();
    // Both orders of the two equal hosts turn up; 40 lookups all alike would happen by
    // chance once in 2^39.
    for _ in 0..40 {
        let hosts = resolver.mail_exchangers("example.test").await.expect("mx");
        let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names.len(), 3);
        assert_eq!(names[2], "backup.example.test", "{names:?}");
        firsts.insert(names[0].to_string());
    }
    assert_eq!(
        firsts.into_iter().collect::<Vec<_>>(),
        ["a.example.test", "b.example.test"]
    );
}

#[tokio::test]
async fn an_unreachable_primary_mx_is_skipped_for_the_next_one() {
    let ca = TestCa::new();
    let server = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
        0,
        ServerBehaviour::default(),
    )
    .await
    .expect("server");
    let zone = TestZone::new()
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 20, "mx2.example.test")
        .a("mx1.example.test", Ipv4Addr::new(127, 0, 0, 2))
        .a("mx2.example.test", Ipv4Addr::new(127, 0, 0, 3));
    let lab = start_lab(zone, &ca, server.addr().port()).await;

    let (_, rcpts, data) = send_body(lab.smtp, &["b@example.test"], BODY).await;

    assert_eq!(rcpts[0].code, 250);
    assert_eq!(data.code, 250);
    assert_eq!(server.messages()[0].data, BODY);
}

#[tokio::test]
async fn a_domain_without_mx_records_is_delivered_to_its_address() {
    let ca = TestCa::new();
    let server = SmtpServer::start(LOCALHOST, 0, ServerBehaviour::default())
        .await
        .expect("server");
    let zone = TestZone::new().a("implicit.test", Ipv4Addr::LOCALHOST);
    let lab = start_lab(zone, &ca, server.addr().port()).await;

    let (_, _, data) = send_body(lab.smtp, &["b@implicit.test"], BODY).await;

    assert_eq!(data.code, 250);
    assert_eq!(server.messages()[0].rcpt_to, vec!["b@implicit.test"]);
}

#[tokio::test]
async fn a_recipient_with_another_next_hop_is_told_to_come_back_in_another_transaction() {
    let ca = TestCa::new();
    let server = SmtpServer::start(LOCALHOST, 0, ServerBehaviour::default())
        .await
        .expect("server");
    let zone = TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .mx("alias.test", 10, "mx.example.test")
        .mx("other.test", 10, "mx.other.test")
        .a("mx.example.test", Ipv4Addr::LOCALHOST)
        // Another server: at the same address it would be the same next hop.
        .a("mx.other.test", Ipv4Addr::new(127, 0, 0, 2));
    let lab = start_lab(zone, &ca, server.addr().port()).await;

    let (_, rcpts, data) = send_body(
        lab.smtp,
        &["a@example.test", "b@alias.test", "c@other.test"],
        BODY,
    )
    .await;

    assert_eq!(rcpts[0].code, 250);
    assert_eq!(rcpts[1].code, 250, "same MX set: same transaction");
    assert_reply(&rcpts[2], 452, "4.5.3", "another transaction");
    assert_eq!(data.code, 250);
    assert_eq!(
        server.messages()[0].rcpt_to,
        vec!["a@example.test", "b@alias.test"]
    );
}

#[tokio::test]
async fn several_messages_go_through_one_session() {
    let ca = TestCa::new();
    let (lab, server) = one_mx(&ca, ServerBehaviour::default()).await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    client.cmd("EHLO mta").await;
    for i in 0..3 {
        assert_eq!(
            client
                .cmd(&format!("MAIL FROM:<s{i}@sender.test>"))
                .await
                .code,
            250
        );
        assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
        assert_eq!(client.data(BODY).await.code, 250);
    }
    assert_eq!(client.cmd("RSET").await.code, 250);
    let senders: Vec<String> = server.messages().into_iter().map(|m| m.mail_from).collect();
    assert_eq!(
        senders,
        vec!["s0@sender.test", "s1@sender.test", "s2@sender.test"]
    );
}

#[tokio::test]
async fn bad_syntax_and_commands_out_of_order_get_the_right_5xx() {
    let ca = TestCa::new();
    let (lab, _server) = one_mx(&ca, ServerBehaviour::default()).await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;

    assert_reply(
        &client.cmd("MAIL FROM:<a@sender.test>").await,
        503,
        "5.5.1",
        "EHLO first",
    );
    let ehlo = client.cmd("EHLO mta").await;
    for keyword in [
        "PIPELINING",
        "SIZE",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
    ] {
        assert!(
            ehlo.lines.iter().any(|l| l.starts_with(keyword)),
            "{keyword} not advertised"
        );
    }
    assert_reply(
        &client.cmd("RCPT TO:<b@example.test>").await,
        503,
        "5.5.1",
        "MAIL first",
    );
    assert_reply(&client.cmd("DATA").await, 503, "5.5.1", "");
    assert_reply(&client.cmd("FROB").await, 500, "5.5.1", "not recognized");
    assert_reply(
        &client.cmd("MAIL FROM:a@sender.test").await,
        501,
        "5.5.4",
        "angle brackets",
    );
    assert_reply(
        &client.cmd("MAIL FROM:<a@sender.test> FOO=BAR").await,
        555,
        "5.5.4",
        "FOO=BAR",
    );
    assert_reply(
        &client
            .cmd("MAIL FROM:<a@sender.test> SIZE=999999999999")
            .await,
        552,
        "5.3.4",
        "limit",
    );
    assert_reply(
        &client.cmd(&format!("NOOP {}", "x".repeat(600))).await,
        500,
        "5.5.2",
        "longer than 512",
    );
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_reply(
        &client.cmd("MAIL FROM:<a@sender.test>").await,
        503,
        "5.5.1",
        "nested",
    );
    assert_reply(
        &client.cmd("RCPT TO:<nobody>").await,
        501,
        "5.5.4",
        "no domain",
    );
    assert_eq!(client.cmd("VRFY someone").await.code, 252);
    assert_eq!(client.cmd("NOOP").await.code, 250);
    assert_eq!(client.cmd("HELP").await.code, 214);
    assert_eq!(client.cmd("QUIT").await.code, 221);
}

#[tokio::test]
async fn a_client_outside_allow_clients_is_refused_with_554_and_disconnected() {
    let ca = TestCa::new();
    let zone = TestZone::new();
    let lab = Lab::new()
        .ca(&ca)
        .zone(zone)
        .set("allow_clients", vec!["192.0.2.0/24"])
        .start()
        .await;
    let (mut client, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_reply(&greeting, 554, "5.7.1", "not allowed");
    assert!(client.try_read_reply().await.is_none(), "connection closed");
}

#[tokio::test]
async fn an_allowed_ipv4_client_of_a_dual_stack_listener_is_let_in() {
    // On a `[::]` listener IPv4 clients arrive as ::ffff:a.b.c.d.
    let Ok(listener) = tokio::net::TcpListener::bind("[::]:0").await else {
        eprintln!("no IPv6 on this machine: nothing to test");
        return;
    };
    let port = listener.local_addr().expect("addr").port();
    let _lab = Lab::new()
        .listener(listener)
        .set("allow_clients", vec!["127.0.0.0/8"])
        .start()
        .await;
    let (_client, greeting) = SmtpClient::connect(SocketAddr::from(([127, 0, 0, 1], port))).await;
    assert_eq!(greeting.code, 220, "{greeting:?}");
}

#[tokio::test]
async fn python_smtplib_sends_through_the_proxy_over_tls() {
    let ca = TestCa::new();
    let (lab, server) = one_mx(
        &ca,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
    )
    .await;
    let script = format!(
        "import smtplib\n\
         s = smtplib.SMTP('127.0.0.1', {port})\n\
         s.sendmail('a@sender.test', ['b@example.test'], b'Subject: smtplib\\r\\n\\r\\n.dot first\\r\\nend\\r\\n')\n\
         s.quit()\n",
        port = lab.smtp.port()
    );
    // On a blocking thread: the proxy runs on this test's thread meanwhile.
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", &script])
            .status()
    })
    .await
    .expect("join")
    .expect("python3 is installed (.ci/run installs it)");
    assert!(status.success());
    let got = server.messages();
    assert_eq!(
        got[0].data,
        b"Subject: smtplib\r\n\r\n..dot first\r\nend\r\n"
    );
    assert_eq!(got[0].tls.as_ref().expect("TLS").version, "TLSv1.3");
}

#[tokio::test]
async fn a_session_that_does_not_know_its_remote_at_ehlo_offers_no_dsn_and_refuses_its_parameters()
{
    let ca = TestCa::new();
    let (lab, server) = one_mx(&ca, ServerBehaviour::plain().ehlo_keyword("DSN")).await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;

    let ehlo = client.cmd("EHLO mta").await;
    assert!(!ehlo.lines.iter().any(|l| l == "DSN"), "{ehlo:?}");
    for (line, param) in [
        ("MAIL FROM:<a@sender.test> RET=FULL", "RET=FULL"),
        ("MAIL FROM:<a@sender.test> ENVID=x", "ENVID=x"),
        // Malformed, but not offered: unknown all the same.
        ("MAIL FROM:<a@sender.test> RET=ALL", "RET=ALL"),
    ] {
        assert_reply(&client.cmd(line).await, 555, "5.5.4", param);
    }
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_reply(
        &client.cmd("RCPT TO:<b@example.test> NOTIFY=SUCCESS").await,
        555,
        "5.5.4",
        "NOTIFY=SUCCESS",
    );
    assert_reply(
        &client.cmd("RCPT TO:<b@example.test> ORCPT=rfc822").await,
        555,
        "5.5.4",
        "ORCPT=rfc822",
    );
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    assert_eq!(client.data(BODY).await.code, 250);
    let commands = &server.connection_logs()[0].commands;
    assert!(
        commands.iter().any(|c| c == "RCPT TO:<b@example.test>"),
        "{commands:?}"
    );
}

/// A session to the proxy with one recipient taken, after DATA's 354.
async fn at_text(smtp: SocketAddr) -> SmtpClient {
    let (mut client, _) = SmtpClient::connect(smtp).await;
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    assert_eq!(client.cmd("DATA").await.code, 354);
    client
}

/// A text of many 64 KiB blocks, the commands an MTA pipelines right behind the final dot,
/// and a small text after it: the session reads commands with a small buffer and a large
/// text in whole blocks, and changing between them loses no byte.
#[tokio::test]
async fn a_large_message_and_the_commands_pipelined_behind_its_dot_arrive_intact() {
    let ca = TestCa::new();
    let (lab, server) = one_mx(&ca, ServerBehaviour::plain()).await;
    let mut large = Vec::new();
    let mut i = 0;
    while large.len() < 3 << 20 {
        large.extend_from_slice(format!("line {i} of a large message\r\n").as_bytes());
        i += 1;
    }

    let mut client = at_text(lab.smtp).await;
    client.send_raw(&large).await;
    client
        .send_raw(b".\r\nMAIL FROM:<c@sender.test>\r\nRCPT TO:<d@example.test>\r\n")
        .await;
    let replies = [
        client.read_reply().await,
        client.read_reply().await,
        client.read_reply().await,
    ];
    assert!(replies.iter().all(|r| r.code == 250), "{replies:?}");
    assert_eq!(client.data(BODY).await.code, 250);
    let _ = client.cmd("QUIT").await;

    let got = server.wait_for_messages(2).await;
    assert_eq!(got[0].data.len(), large.len());
    assert!(got[0].data == large, "the large text byte for byte");
    assert_eq!(got[1].mail_from, "c@sender.test");
    assert_eq!(got[1].rcpt_to, ["d@example.test"]);
    assert_eq!(got[1].data, BODY);
}

/// A large text whose clean lines go to the remote as they were read, with lines among
/// them that the filter must change (a bare LF, a bare CR, a NUL) or pass stuffed: what
/// arrives is the filtered text, byte for byte, wherever the blocks fall.
#[tokio::test]
async fn a_large_message_with_lines_to_mend_among_clean_ones_arrives_mended_byte_for_byte() {
    let ca = TestCa::new();
    let (lab, server) = one_mx(&ca, ServerBehaviour::plain()).await;
    let (mut sent, mut expected) = (Vec::new(), Vec::new());
    let mut i = 0;
    while sent.len() < 3 << 20 {
        let (line, mended): (&[u8], &[u8]) = match i % 4999 {
            100 => (b"..a stuffed dot\r\n", b"..a stuffed dot\r\n"),
            300 => (b"a bare\nline feed\r\n", b"a bare\r\nline feed\r\n"),
            500 => (
                b"a bare\rcarriage return\r\n",
                b"a bare carriage return\r\n",
            ),
            700 => (b"a \0NUL\r\n", b"a NUL\r\n"),
            _ => (b"", b""),
        };
        sent.extend_from_slice(line);
        expected.extend_from_slice(mended);
        let clean = format!("line {i} of a large message\r\n");
        sent.extend_from_slice(clean.as_bytes());
        expected.extend_from_slice(clean.as_bytes());
        i += 1;
    }

    let mut client = at_text(lab.smtp).await;
    client.send_raw(&sent).await;
    client.send_raw(b".\r\n").await;
    assert_eq!(client.read_reply().await.code, 250);
    let _ = client.cmd("QUIT").await;

    let got = server.wait_for_messages(1).await;
    assert_eq!(got[0].data.len(), expected.len());
    assert!(got[0].data == expected, "the mended text byte for byte");
}

/// The transaction line carries what matches it with the MTA's own log: the Message-ID
/// as sent (unfolded), the size of the text as it went and how long the transaction took.
#[tokio::test]
async fn the_log_line_names_the_message_id_size_and_duration() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (lab, server) = one_mx(&ca, ServerBehaviour::default()).await;
    let with_id: &[u8] =
        b"From: a@sender.test\r\nMessage-ID:\r\n <42.abc@sender.test>\r\nSubject: s\r\n\r\nbody\r\n";
    let without_id: &[u8] = b"From: a@sender.test\r\nSubject: s\r\n\r\nMessage-ID: <body>\r\n";
    for body in [with_id, without_id] {
        let (_, _, data) = send_body(lab.smtp, &["b@example.test"], body).await;
        assert_eq!(data.code, 250, "{data:?}");
    }
    let got = server.messages();
    let lines = logs.transaction_events();
    assert_eq!(
        field(&lines[0], "message_id").as_deref(),
        Some("<42.abc@sender.test>")
    );
    assert_no_fields(&lines[1], &["message_id"]);
    for (line, message) in lines.iter().zip(&got) {
        let size = field(line, "size").expect("size");
        assert_eq!(size, message.data.len().to_string(), "{line}");
        let duration = field(line, "duration_ms").expect("duration_ms");
        assert!(duration.parse::<u64>().is_ok(), "{line}");
    }

    // No text, no size.
    let (_, rcpts, _) = send_body(lab.smtp, &["b@nowhere.test"], BODY).await;
    assert_ne!(rcpts[0].code, 250);
    let lines = logs.transaction_events();
    assert_no_fields(&lines[2], &["message_id", "size"]);
    assert!(field(&lines[2], "duration_ms").is_some(), "{}", lines[2]);
}
