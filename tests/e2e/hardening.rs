//! Hardening, end to end: attacks and faults produced for real over TCP on loopback, through
//! the real proxy, against the kit's scripted SMTP server, which records
//! everything it receives. Each test is a user story; docs/SECURITY.md maps threats to them.
//!
//! A test marked `#[ignore = "missing: ..."]` describes a defence the proxy does not have yet:
//! it fails today and should pass once the defence is in.

use crate::support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::support::dns::TestZone;
use crate::support::events::{assert_fields, field};
use crate::support::lab::{Lab, LabBuilder, dedent, one_mx_zone};
use crate::support::logs::Logs;
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_client::{Reply, SmtpClient};
use crate::support::smtp_server::{
    Action, ConnectionLog, ServerBehaviour, SmtpServer, StartTls, Step,
};
use tlsrouter::smtp::data::BareLineEndings;

/// Dot-stuffed and CRLF-terminated, as an MTA sends it.
const BODY: &[u8] = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: hardening\r\n\r\n\
..a line that starts with a dot\r\nbye\r\n";

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const MX1: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const MX2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

// ---------------------------------------------------------------------------------------
// The lab: a DNS server, a CA, the proxy; remotes are scripted servers.
// ---------------------------------------------------------------------------------------

/// Captures this test's log lines. Tests run in parallel threads, and `tracing` caches per
/// call site whether anyone listens: a call site first reached in a test that captures
/// nothing could be cached as "never" just as another test starts capturing, and that test
/// would lose lines. A global subscriber that listens to everything the tests read (and
/// throws it away) keeps every call site enabled.
fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    Logs::capture()
}

/// example.test has mx1 (preference 10, 127.0.0.2) and mx2 (preference 20, 127.0.0.3).
fn two_mx_zone() -> TestZone {
    TestZone::new()
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 20, "mx2.example.test")
        .a("mx1.example.test", MX1)
        .a("mx2.example.test", MX2)
}

/// The proxy with one MX, mx.example.test on 127.0.0.1, following `script`; `lab` may add
/// to the lab (settings, rules).
async fn one_mx(
    ca: &TestCa,
    script: ServerBehaviour,
    lab: impl FnOnce(LabBuilder) -> LabBuilder,
) -> (Lab, SmtpServer) {
    let server = SmtpServer::start(LOCALHOST, 0, script)
        .await
        .expect("scripted server");
    let builder = Lab::new().ca(ca).one_mx(&server);
    (lab(builder).start().await, server)
}

/// Two scripted servers on one port (the proxy delivers to one remote port) and two
/// addresses.
async fn two_mx(
    ca: &TestCa,
    first: ServerBehaviour,
    second: ServerBehaviour,
) -> (Lab, SmtpServer, SmtpServer) {
    for _ in 0..20 {
        let mx2 = SmtpServer::start(IpAddr::V4(MX2), 0, second.clone())
            .await
            .expect("mx2");
        let port = mx2.addr().port();
        if let Ok(mx1) = SmtpServer::start(IpAddr::V4(MX1), port, first.clone()).await {
            let lab = Lab::new()
                .ca(ca)
                .zone(two_mx_zone())
                .mx_port(port)
                .short_timeouts()
                .start()
                .await;
            return (lab, mx1, mx2);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// What the MTA heard for one message.
#[derive(Debug)]
struct Heard {
    rcpt: Reply,
    /// DATA's reply when it was not 354, else the reply after the final dot.
    data: Reply,
}

impl Heard {
    /// The reply that decides the message's fate at the MTA: the recipient's when it was
    /// refused, otherwise DATA's.
    fn outcome(&self) -> &Reply {
        if (200..300).contains(&self.rcpt.code) {
            &self.data
        } else {
            &self.rcpt
        }
    }
}

/// One message from a@sender.test to b@example.test, then QUIT.
async fn send(proxy: SocketAddr, body: &[u8]) -> Heard {
    send_from(proxy, "a@sender.test", body).await
}

async fn send_from(proxy: SocketAddr, sender: &str, body: &[u8]) -> Heard {
    let (mut client, greeting) = SmtpClient::connect(proxy).await;
    assert_eq!(greeting.code, 220, "{greeting:?}");
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    let mail = client.cmd(&format!("MAIL FROM:<{sender}>")).await;
    assert_eq!(mail.code, 250, "{mail:?}");
    let rcpt = client.cmd("RCPT TO:<b@example.test>").await;
    let data = client.data(body).await;
    let _ = client.cmd("QUIT").await;
    Heard { rcpt, data }
}

fn assert_reply(reply: &Reply, code: u16, enhanced: &str) {
    assert_eq!(reply.code, code, "{reply:?}");
    assert_eq!(reply.enhanced().as_deref(), Some(enhanced), "{reply:?}");
}

/// No bare CR, no bare LF.
fn is_crlf_only(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        _ => true,
    })
}

fn commands_starting(log: &ConnectionLog, prefix: &str) -> usize {
    log.commands
        .iter()
        .filter(|c| c.to_ascii_uppercase().starts_with(prefix))
        .count()
}

/// A body of about `size` bytes in short CRLF lines.
fn big_body(size: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size + 64);
    let mut i = 0;
    while body.len() < size {
        body.extend_from_slice(format!("line {i} of a long message\r\n").as_bytes());
        i += 1;
    }
    body
}

// ---------------------------------------------------------------------------------------
// a. SMTP smuggling
// ---------------------------------------------------------------------------------------

/// The sequences of issue 4, each of which some receiver has taken for an end of data.
/// (`<CR><LF>.<CR><CR><LF>` is written there twice, once as `\r\n.\r\r\n`.)
const SMUGGLING: [(&str, &[u8]); 12] = [
    ("\\n.\\n", b"\n.\n"),
    ("\\n.\\r", b"\n.\r"),
    ("\\r.\\n", b"\r.\n"),
    ("\\r.\\r", b"\r.\r"),
    ("\\n.\\r\\n", b"\n.\r\n"),
    ("\\r.\\r\\n", b"\r.\r\n"),
    ("\\r\\n\\x00.\\r\\n", b"\r\n\x00.\r\n"),
    ("\\r\\n.\\n", b"\r\n.\n"),
    ("\\r\\n.\\r", b"\r\n.\r"),
    ("\\r\\n.\\r\\r\\n", b"\r\n.\r\r\n"),
    ("\\r\\r\\n.\\r\\r\\n", b"\r\r\n.\r\r\n"),
    ("<CR><LF>.<CR><CR><LF>", b"\r\n.\r\r\n"),
];

/// A first message whose text holds `sequence` followed by a whole second transaction.
fn smuggling_body(sequence: &[u8]) -> Vec<u8> {
    let mut body = b"From: a@sender.test\r\nSubject: first\r\n\r\nfirst message".to_vec();
    body.extend_from_slice(sequence);
    body.extend_from_slice(
        b"MAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n\
From: ceo@sender.test\r\nSubject: smuggled\r\n\r\nsecond message\r\n",
    );
    body
}

/// Sends one smuggling attempt per sequence, each in its own session, through one proxy to
/// one lenient remote; returns the remote once every connection to it has ended.
async fn smuggle(
    ca: &TestCa,
    sequences: &[(&str, &[u8])],
    bare: BareLineEndings,
) -> (SmtpServer, Vec<Heard>) {
    let (lab, server) = one_mx(ca, ServerBehaviour::plain().lenient(), |lab| {
        let bare = serde_json::to_value(bare).expect("a setting");
        // One connection per message, so each is judged on its own.
        lab.set("delivery.bare_line_endings", bare)
            .set("delivery.pool.enabled", false)
    })
    .await;
    let mut heard = Vec::new();
    for (i, (_, sequence)) in sequences.iter().enumerate() {
        let sender = format!("s{i}@sender.test");
        heard.push(send_from(lab.smtp, &sender, &smuggling_body(sequence)).await);
    }
    server.wait_all_closed().await;
    (server, heard)
}

/// What a lenient remote made of each attempt: one message, CRLF-only, one transaction.
fn assert_one_clean_message_each(
    server: &SmtpServer,
    sequences: &[(&str, &[u8])],
    heard: &[Heard],
) {
    let connections = server.connection_logs();
    let messages = server.messages();
    let mut failures = Vec::new();
    for (i, (name, _)) in sequences.iter().enumerate() {
        let sender = format!("s{i}@sender.test");
        if heard[i].data.code != 250 {
            failures.push(format!("{name}: the MTA got {:?}", heard[i].data));
            continue;
        }
        let Some(conn) = connections.iter().position(|c| {
            c.commands
                .iter()
                .any(|l| l.eq_ignore_ascii_case(&format!("MAIL FROM:<{sender}>")))
        }) else {
            failures.push(format!("{name}: the remote never saw MAIL FROM:<{sender}>"));
            continue;
        };
        let here: Vec<_> = messages.iter().filter(|m| m.connection == conn).collect();
        let log = &connections[conn];
        if here.len() != 1 || commands_starting(log, "MAIL FROM") != 1 {
            failures.push(format!(
                "{name}: the remote saw {} messages and these commands: {:?}",
                here.len(),
                log.commands
            ));
            continue;
        }
        if !is_crlf_only(&here[0].data) {
            failures.push(format!(
                "{name}: bare CR or LF reached the remote: {:?}",
                String::from_utf8_lossy(&here[0].data)
            ));
        }
        if log.commands.iter().any(|c| c.contains("victim")) {
            failures.push(format!("{name}: the smuggled RCPT was read as a command"));
        }
    }
    assert!(
        failures.is_empty(),
        "smuggling got through:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn smuggled_end_of_data_sequences_reach_a_lenient_remote_as_one_crlf_only_message() {
    let ca = TestCa::new();
    let sequences: Vec<(&str, &[u8])> = SMUGGLING
        .iter()
        .copied()
        .filter(|(_, s)| !s.contains(&0))
        .collect();
    let (server, heard) = smuggle(&ca, &sequences, BareLineEndings::Normalize).await;
    assert_one_clean_message_each(&server, &sequences, &heard);
}

#[tokio::test]
async fn a_nul_before_the_dot_cannot_end_the_message_at_a_remote_that_ignores_nuls() {
    let ca = TestCa::new();
    let sequences: Vec<(&str, &[u8])> = SMUGGLING
        .iter()
        .copied()
        .filter(|(_, s)| s.contains(&0))
        .collect();
    for bare in [BareLineEndings::Normalize, BareLineEndings::Reject] {
        let (server, heard) = smuggle(&ca, &sequences, bare).await;
        // Refusing the message is as good as cleaning it.
        if heard[0].data.code >= 500 {
            assert!(server.messages().is_empty());
            continue;
        }
        assert_one_clean_message_each(&server, &sequences, &heard);
    }
}

#[tokio::test]
async fn with_bare_line_endings_rejected_a_smuggling_attempt_gets_550_5_5_2_and_nothing_is_delivered()
 {
    let ca = TestCa::new();
    let sequences: Vec<(&str, &[u8])> = SMUGGLING
        .iter()
        .copied()
        .filter(|(_, s)| !s.contains(&0))
        .collect();
    let (server, heard) = smuggle(&ca, &sequences, BareLineEndings::Reject).await;
    for ((name, _), heard) in sequences.iter().zip(&heard) {
        assert_eq!(heard.rcpt.code, 250, "{name}");
        assert_eq!(heard.data.code, 550, "{name}: {:?}", heard.data);
        assert_eq!(heard.data.enhanced().as_deref(), Some("5.5.2"), "{name}");
    }
    assert!(server.messages().is_empty(), "{:?}", server.messages());
    let dots: Vec<_> = server
        .connection_logs()
        .into_iter()
        .filter(|c| c.final_dot)
        .collect();
    assert!(dots.is_empty(), "a final dot reached the remote: {dots:?}");
}

#[tokio::test]
async fn a_line_break_inside_an_address_cannot_inject_a_command_at_a_lenient_remote() {
    let ca = TestCa::new();
    let (lab, server) = one_mx(&ca, ServerBehaviour::plain().lenient(), |lab| lab).await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    client.cmd("EHLO mta.sender.test").await;
    // A bare CR, NEL, and the Unicode line and paragraph separators: each ends a line
    // somewhere. The lenient test remote splits at the CR.
    for separator in ["\r", "\u{85}", "\u{2028}", "\u{2029}"] {
        let mail = client
            .cmd(&format!(
                "MAIL FROM:<x{separator}RCPT TO:<victim@example.test>"
            ))
            .await;
        if mail.code == 250 {
            let rcpt = client.cmd("RCPT TO:<b@example.test>").await;
            if rcpt.code == 250 {
                client.data(BODY).await;
            }
        }
        assert_eq!(
            (mail.code, mail.enhanced().as_deref()),
            (501, Some("5.5.4")),
            "{separator:?} in an address is a syntax error: {mail:?}"
        );
    }
    let _ = client.cmd("QUIT").await;
    drop(client);
    if !server.connection_logs().is_empty() {
        server.wait_all_closed().await;
    }
    for log in server.connection_logs() {
        assert!(
            !log.commands.iter().any(|c| c.contains("victim")),
            "a command was injected through the address: {:?}",
            log.commands
        );
    }
    assert!(server.messages().is_empty(), "{:?}", server.messages());
}

// ---------------------------------------------------------------------------------------
// b. Pipelining discipline
// ---------------------------------------------------------------------------------------

/// EHLO, MAIL and RCPT accepted; the remote has the transaction open.
async fn open_transaction(proxy: SocketAddr) -> SmtpClient {
    let (mut client, _) = SmtpClient::connect(proxy).await;
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    client
}

#[tokio::test]
async fn commands_or_text_sent_with_data_before_the_354_get_554_5_5_0_and_a_disconnect() {
    let ca = TestCa::new();
    let (lab, server) = one_mx(&ca, ServerBehaviour::plain(), |lab| lab).await;
    let early: [&[u8]; 3] = [
        b"DATA\r\nSubject: early\r\n\r\nsent before the 354\r\n.\r\n",
        b"DATA\r\nRSET\r\n",
        b"DATA\r\nMAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n",
    ];
    for bytes in early {
        let mut client = open_transaction(lab.smtp).await;
        client.send_raw(bytes).await;
        let reply = client.read_reply().await;
        assert_reply(&reply, 554, "5.5.0");
        assert!(
            client.try_read_reply().await.is_none(),
            "the proxy closes the session after a synchronisation error"
        );
    }
    server.wait_all_closed().await;
    assert!(server.messages().is_empty());
    for log in server.connection_logs() {
        assert!(
            !log.final_dot && !log.commands.iter().any(|c| c.contains("evil")),
            "{log:?}"
        );
    }
}

/// An MTA connection with Nagle's algorithm off. With it on, text written while DATA is
/// unanswered would wait in our kernel for the ACK of "DATA", which the proxy's kernel
/// sends with the 354: the text could never arrive "before the 354".
struct NoDelayMta {
    io: BufReader<TcpStream>,
}

impl NoDelayMta {
    async fn connect(proxy: SocketAddr) -> NoDelayMta {
        let stream = TcpStream::connect(proxy)
            .await
            .expect("connect to the proxy");
        stream.set_nodelay(true).expect("nodelay");
        let mut mta = NoDelayMta {
            io: BufReader::new(stream),
        };
        assert_eq!(mta.reply().await.map(|r| r.code), Some(220));
        mta
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.expect("send");
    }

    async fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await.expect("a reply")
    }

    /// `None` once the proxy has closed the connection.
    async fn reply(&mut self) -> Option<Reply> {
        let read = async {
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                if self.io.read_line(&mut line).await.ok()? == 0 {
                    return None;
                }
                let line = line.trim_end_matches(['\r', '\n']);
                lines.push(line.get(4..).unwrap_or("").to_string());
                if line.as_bytes().get(3) != Some(&b'-') {
                    let code = line.get(..3)?.parse().ok()?;
                    return Some(Reply { code, lines });
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("a reply or a close within 30 s")
    }
}

#[tokio::test]
async fn text_sent_after_data_but_before_the_354_in_a_later_write_gets_554_5_5_0() {
    let ca = TestCa::new();
    let (lab, server) = one_mx(
        &ca,
        ServerBehaviour::plain().on(Step::Data, Action::Hold),
        |lab| lab,
    )
    .await;
    let mut mta = NoDelayMta::connect(lab.smtp).await;
    assert_eq!(mta.cmd("EHLO mta.sender.test").await.code, 250);
    assert_eq!(mta.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(mta.cmd("RCPT TO:<b@example.test>").await.code, 250);
    mta.send(b"DATA\r\n").await;
    // The proxy has passed DATA on and waits for the remote's 354...
    server.wait_for_command("DATA").await;
    // ...when the MTA sends the message text without waiting for it.
    mta.send(b"Subject: early\r\n\r\nsent before the 354\r\n.\r\n")
        .await;
    server.release();
    let reply = mta.reply().await.expect("a reply");
    assert_reply(&reply, 554, "5.5.0");
    assert!(
        mta.reply().await.is_none(),
        "then the proxy closes the session"
    );
    server.wait_all_closed().await;
    assert!(server.messages().is_empty());
    let remote = &server.connection_logs()[0];
    assert!(!remote.final_dot);
    // The remote was inside the message text: nothing more was written to it, no QUIT.
    assert_eq!(String::from_utf8_lossy(&remote.body), "", "{remote:?}");
}

// ---------------------------------------------------------------------------------------
// c. STARTTLS injection and the STARTTLS dialogue
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_starttls_220_with_injected_reply_lines_is_a_protocol_violation_and_the_message_goes_in_plain()
 {
    let (logs, _guard) = capture_logs();
    let ca = TestCa::new();
    let server = SmtpServer::start(
        LOCALHOST,
        0,
        ServerBehaviour {
            starttls: StartTls::InjectAfter220,
            ..ServerBehaviour::default()
        },
    )
    .await
    .expect("server");
    let lab = Lab::new().ca(&ca).one_mx(&server).start().await;

    let heard = send(lab.smtp, BODY).await;

    assert_eq!(heard.data.code, 250, "{heard:?}");
    let got = server.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, BODY);
    assert!(got[0].tls.is_none());
    assert!(got[0].auth.is_empty(), "AUTH sent: {:?}", got[0].auth);
    assert_eq!(server.tls_handshakes_attempted(), 1);
    assert_eq!(server.connections(), 2, "a new plain connection");
    assert_fields(
        &logs.transaction_events()[0],
        &[("route", "plain"), ("class", "protocol-violation")],
    );
}

#[tokio::test]
async fn lines_injected_after_the_starttls_220_are_never_acted_on_and_no_auth_is_ever_sent() {
    let (logs, _guard) = capture_logs();
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let inject = Action::Extra("250-evil.example\r\n250 AUTH PLAIN LOGIN".into());
    let script = ServerBehaviour::plain()
        .starttls(cert)
        .on(Step::StartTls, inject);
    let (lab, server) = one_mx(&ca, script, |lab| lab).await;

    let heard = send(lab.smtp, BODY).await;

    assert_eq!(heard.data.code, 250, "{heard:?}");
    server.wait_all_closed().await;
    let connections = server.connection_logs();
    assert_eq!(connections.len(), 2, "{connections:?}");
    assert_eq!(
        connections[0].commands.last().map(String::as_str),
        Some("STARTTLS"),
        "nothing is sent on the connection that injected: {:?}",
        connections[0].commands
    );
    assert!(!connections[1].tls);
    assert_eq!(server.messages().len(), 1);
    for log in &connections {
        assert_eq!(commands_starting(log, "AUTH"), 0, "{log:?}");
    }
    assert_fields(
        &logs.transaction_events()[0],
        &[("route", "plain"), ("class", "protocol-violation")],
    );
}

/// Writes a rule file that sends everything to the smarthost mx.example.test:`port` with
/// AUTH (`extra` adds keys to the rule, e.g. "verify: require").
fn smarthost_rules(dir: &Path, port: u16, extra: &str) -> std::path::PathBuf {
    let user = dir.join("user");
    let pass = dir.join("pass");
    std::fs::write(&user, "relay-user\n").expect("user file");
    std::fs::write(&pass, "s3cret-password\n").expect("password file");
    set_private(&user);
    set_private(&pass);
    let rules = dir.join("rules.yaml");
    std::fs::write(
        &rules,
        dedent(&format!(
            r#"
            rules:
              - name: smarthost
                match: {{ domains: ["*"] }}
                {extra}
                route: {{ smarthost: "mx.example.test:{port}", tls: require,
                  auth: {{ username_file: {}, password_file: {} }} }}
            "#,
            user.display(),
            pass.display()
        )),
    )
    .expect("rules file");
    rules
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read the rule file")
}

fn set_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Every AUTH line the server received, with whether it came over TLS.
fn auth_lines(server: &SmtpServer) -> Vec<(bool, String)> {
    server
        .connection_logs()
        .iter()
        .flat_map(|c| {
            c.commands
                .iter()
                .filter(|l| l.to_ascii_uppercase().starts_with("AUTH"))
                .map(|l| (c.tls, l.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A smarthost route with AUTH: the credentials go over TLS only, so an injection that
/// advertises AUTH in plain text costs a deferral, never the password.
#[tokio::test]
async fn an_injected_auth_advertisement_never_gets_the_smarthost_password() {
    let ca = TestCa::new();
    for injected in [true, false] {
        let cert = ca.leaf(&["mx.example.test"], Validity::Current);
        let mut script = ServerBehaviour::plain()
            .starttls(cert)
            .ehlo_keyword("AUTH PLAIN LOGIN");
        if injected {
            script = script.on(
                Step::StartTls,
                Action::Extra("250-evil.example\r\n250 AUTH PLAIN LOGIN".into()),
            );
        }
        let server = SmtpServer::start(LOCALHOST, 0, script)
            .await
            .expect("server");
        let port = server.addr().port();
        let builder = Lab::new().ca(&ca).zone(one_mx_zone()).mx_port(port);
        let rules = smarthost_rules(builder.dir(), port, "");
        let lab = builder.rules(&read(&rules)).start().await;

        let heard = send(lab.smtp, BODY).await;
        server.wait_all_closed().await;

        let auth = auth_lines(&server);
        if injected {
            assert_reply(&heard.rcpt, 451, "4.7.5");
            assert!(auth.is_empty(), "AUTH sent after an injection: {auth:?}");
        } else {
            // The control: without the injection the route does authenticate, over TLS.
            assert_eq!(heard.data.code, 250, "{heard:?}");
            assert!(
                !auth.is_empty() && auth.iter().all(|(tls, _)| *tls),
                "{auth:?}"
            );
        }
    }
}

/// TLS with a certificate that does not verify is TLS with whoever sits in the middle: the
/// smarthost password must not go there. Refusing such a rule file at load is as good.
#[tokio::test]
async fn smarthost_credentials_never_go_to_a_server_whose_certificate_does_not_verify() {
    let ca = TestCa::new();
    let impostor = support::pki::self_signed(&["mx.example.test"]);
    let script = ServerBehaviour::plain()
        .starttls(impostor)
        .ehlo_keyword("AUTH PLAIN LOGIN");
    let server = SmtpServer::start(LOCALHOST, 0, script)
        .await
        .expect("server");
    let port = server.addr().port();
    let builder = Lab::new().ca(&ca).zone(one_mx_zone()).mx_port(port);
    let rules = smarthost_rules(builder.dir(), port, "");
    if tlsrouter::rules::RuleSet::load(&rules).is_err() {
        return; // auth without verify: require is refused outright
    }
    let lab = builder.rules(&read(&rules)).start().await;

    let heard = send(lab.smtp, BODY).await;
    server.wait_all_closed().await;

    assert_eq!(
        auth_lines(&server),
        [],
        "the password went to an unverified server"
    );
    assert_eq!(heard.outcome().code / 100, 4, "{heard:?}");
}

#[tokio::test]
async fn starttls_answered_with_454_502_or_354_is_starttls_refused_and_the_message_goes_in_plain() {
    let ca = TestCa::new();
    for refusal in [
        "454 4.7.0 TLS not available",
        "502 5.5.1 not implemented",
        "354 what",
    ] {
        let (logs, _guard) = capture_logs();
        let cert = ca.leaf(&["mx.example.test"], Validity::Current);
        let script = ServerBehaviour::plain()
            .starttls(cert)
            .on(Step::StartTls, Action::Reply(refusal.into()));
        let (lab, server) = one_mx(&ca, script, |lab| lab).await;

        let heard = send(lab.smtp, BODY).await;

        assert_eq!(heard.data.code, 250, "{refusal}: {heard:?}");
        let got = server.messages();
        assert_eq!(got.len(), 1, "{refusal}");
        assert!(got[0].tls.is_none());
        let line = &logs.transaction_events()[0];
        assert_eq!(
            field(line, "class").as_deref(),
            Some("starttls-refused"),
            "{refusal}: {line}"
        );
        assert_fields(line, &[("route", "plain")]);
    }
}

#[tokio::test]
async fn a_server_that_says_220_to_starttls_and_never_speaks_tls_costs_one_handshake_timeout() {
    let (logs, _guard) = capture_logs();
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let script = ServerBehaviour::plain()
        .starttls(cert)
        .on(Step::Handshake, Action::Stall);
    let (lab, server) = one_mx(&ca, script, |lab| lab.short_timeouts()).await;

    let started = std::time::Instant::now();
    let heard = send(lab.smtp, BODY).await;

    assert_eq!(heard.data.code, 250, "{heard:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the handshake timeout"
    );
    assert_eq!(server.messages().len(), 1);
    assert!(server.messages()[0].tls.is_none());
    assert_fields(
        &logs.transaction_events()[0],
        &[("route", "plain"), ("class", "handshake-failed")],
    );
}

#[tokio::test]
async fn after_starttls_the_proxy_says_ehlo_again_and_delivers_over_tls() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let (lab, server) = one_mx(&ca, ServerBehaviour::plain().starttls(cert), |lab| lab).await;

    let heard = send(lab.smtp, BODY).await;

    assert_eq!(heard.data.code, 250, "{heard:?}");
    let connections = server.connection_logs();
    assert_eq!(connections.len(), 1);
    let commands: Vec<String> = connections[0]
        .commands
        .iter()
        .map(|c| c.split(' ').next().unwrap_or_default().to_ascii_uppercase())
        .take(4)
        .collect();
    assert_eq!(commands, ["EHLO", "STARTTLS", "EHLO", "MAIL"]);
    assert!(server.messages()[0].tls.is_some());
    assert_eq!(server.messages()[0].data, BODY);
}

/// One message over TLS, then the same host changes `step` to `action` for the next:
/// what does the second message get under `on_downgrade: defer`?
async fn second_message_after(step: Step, action: Action) -> (Heard, SmtpServer, Logs) {
    let (logs, guard) = capture_logs();
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let script = ServerBehaviour::plain()
        .starttls(cert)
        .on_connections_from(1, step, action);
    // What a new connection finds is the point: not the pooled one.
    let (lab, server) = one_mx(&ca, script, |lab| {
        lab.set("delivery.pool.enabled", false).rules(
            r#"
            rules:
              - name: careful
                match: { domains: ["*"] }
                on_downgrade: defer
            "#,
        )
    })
    .await;
    let first = send(lab.smtp, BODY).await;
    assert_eq!(first.data.code, 250, "{first:?}");
    assert!(server.messages()[0].tls.is_some());
    let second = send(lab.smtp, BODY).await;
    drop(guard);
    (second, server, logs)
}

#[tokio::test]
async fn a_host_that_did_tls_and_now_hides_starttls_is_a_downgrade_and_the_message_waits() {
    let stripped = Action::Reply("250-mx.fault.test\r\n250 PIPELINING".into());
    let (heard, server, logs) = second_message_after(Step::Ehlo, stripped).await;
    assert_reply(heard.outcome(), 451, "4.7.5");
    assert_eq!(server.messages().len(), 1, "nothing went in plain");
    let warned = logs.events_with(&[("event", "downgrade"), ("level", "WARN")]);
    assert!(!warned.is_empty(), "{}", logs.text());
}

#[tokio::test]
async fn a_host_that_did_tls_and_now_refuses_starttls_is_a_downgrade_and_the_message_waits() {
    let refused = Action::Reply("454 4.7.0 TLS not available".into());
    let (heard, server, logs) = second_message_after(Step::StartTls, refused).await;
    assert_eq!(
        server.messages().len(),
        1,
        "the second message went in plain"
    );
    assert_reply(heard.outcome(), 451, "4.7.5");
    let warned = logs.events_with(&[("event", "downgrade"), ("level", "WARN")]);
    assert!(!warned.is_empty(), "{}", logs.text());
}

#[tokio::test]
async fn a_handshake_that_fails_only_because_a_rule_asks_for_tls_13_is_no_downgrade() {
    let (logs, _guard) = capture_logs();
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let behaviour = ServerBehaviour {
        starttls: StartTls::Tls12Only(cert),
        ..ServerBehaviour::default()
    };
    let server = SmtpServer::start(LOCALHOST, 0, behaviour)
        .await
        .expect("smtp server");
    let lab = Lab::new()
        .ca(&ca)
        .one_mx(&server)
        .rules(
            r#"
            rules:
              - name: modern
                match: { senders: [modern.test] }
                min_tls: "1.3"
                on_downgrade: defer
              - name: default
                match: { domains: ["*"] }
                on_downgrade: defer
            "#,
        )
        .start()
        .await;
    let first = send(lab.smtp, BODY).await;
    assert_eq!(
        first.data.code, 250,
        "TLS 1.2 under the default rule: {first:?}"
    );

    let second = send_from(lab.smtp, "a@modern.test", BODY).await;

    assert_eq!(second.data.code, 250, "{second:?}");
    assert!(
        server.messages()[1].tls.is_none(),
        "TLS 1.3 was not to be had"
    );
    let warned = logs.events_with(&[("event", "downgrade")]);
    assert!(warned.is_empty(), "{}", logs.text());
    assert_eq!(lab.proxy.stats.snapshot().downgrades, 0);
}

// ---------------------------------------------------------------------------------------
// d. 421 and 221 from the remote
// ---------------------------------------------------------------------------------------

const CLOSING: [&str; 2] = ["421 4.3.2 shutting down", "221 2.0.0 closing"];

fn assert_nothing_after_the_closing_reply(case: &str, server: &SmtpServer) {
    for log in server.connection_logs() {
        assert!(
            log.after_closing_reply.is_empty(),
            "{case}: commands after the remote said 421/221: {:?} (all: {:?})",
            log.after_closing_reply,
            log.commands
        );
    }
}

#[tokio::test]
async fn a_421_or_221_before_the_transaction_ends_that_connection_and_the_next_mx_gets_the_message()
{
    let ca = TestCa::new();
    for step in [Step::Greeting, Step::Ehlo, Step::Mail] {
        for closing in CLOSING {
            if step == Step::Ehlo && closing.starts_with("221") {
                continue; // a_221_to_ehlo_ends_that_connection_and_the_next_mx_gets_the_message
            }
            closing_reply_moves_the_message_to_the_next_mx(&ca, step, closing).await;
        }
    }
}

async fn closing_reply_moves_the_message_to_the_next_mx(ca: &TestCa, step: Step, closing: &str) {
    let case = format!("{closing} at {step:?}");
    let first = ServerBehaviour::plain().on(step, Action::Reply(closing.into()));
    let (lab, mx1, mx2) = two_mx(ca, first, ServerBehaviour::plain()).await;

    let heard = send(lab.smtp, BODY).await;

    assert_eq!(heard.data.code, 250, "{case}: {heard:?}");
    assert_eq!(mx2.messages().len(), 1, "{case}");
    assert!(mx1.messages().is_empty(), "{case}");
    mx1.wait_all_closed().await;
    assert_nothing_after_the_closing_reply(&case, &mx1);
}

#[tokio::test]
async fn a_221_to_ehlo_ends_that_connection_and_the_next_mx_gets_the_message() {
    let ca = TestCa::new();
    closing_reply_moves_the_message_to_the_next_mx(&ca, Step::Ehlo, "221 2.0.0 closing").await;
}

#[tokio::test]
async fn a_421_or_221_at_rcpt_gets_the_mta_a_4xx_and_that_connection_no_further_command() {
    let ca = TestCa::new();
    for closing in CLOSING {
        let case = format!("{closing} at RCPT");
        let first = ServerBehaviour::plain().on(Step::Rcpt, Action::Reply(closing.into()));
        let (lab, mx1, mx2) = two_mx(&ca, first, ServerBehaviour::plain()).await;

        let heard = send(lab.smtp, BODY).await;

        assert_reply(&heard.rcpt, 451, "4.4.2");
        assert_ne!(heard.data.code, 250, "{case}: {heard:?}");
        assert!(
            mx1.messages().is_empty() && mx2.messages().is_empty(),
            "{case}"
        );
        mx1.wait_all_closed().await;
        assert_nothing_after_the_closing_reply(&case, &mx1);
    }
}

#[tokio::test]
async fn a_421_or_221_at_data_or_after_the_dot_gets_the_mta_a_4xx_and_that_connection_no_further_command()
 {
    let ca = TestCa::new();
    for step in [Step::Data, Step::Body, Step::EndOfData] {
        for closing in CLOSING {
            let case = format!("{closing} at {step:?}");
            let first = ServerBehaviour::plain().on(step, Action::Reply(closing.into()));
            let (lab, mx1, _mx2) = two_mx(&ca, first, ServerBehaviour::plain()).await;

            let heard = send(lab.smtp, BODY).await;

            assert_reply(&heard.data, 451, "4.4.2");
            assert!(mx1.messages().is_empty(), "{case}");
            mx1.wait_all_closed().await;
            assert_nothing_after_the_closing_reply(&case, &mx1);
        }
    }
}

#[tokio::test]
async fn a_421_to_starttls_is_a_temporary_failure_of_that_mx_and_the_next_mx_gets_the_message() {
    let ca = TestCa::new();
    for closing in CLOSING {
        let cert = ca.leaf(&["mx1.example.test"], Validity::Current);
        let first = ServerBehaviour::plain()
            .starttls(cert)
            .on(Step::StartTls, Action::Reply(closing.into()));
        let (lab, mx1, mx2) = two_mx(&ca, first, ServerBehaviour::plain()).await;

        let heard = send(lab.smtp, BODY).await;

        assert_eq!(heard.data.code, 250, "{closing}: {heard:?}");
        assert!(
            mx1.messages().is_empty(),
            "{closing}: delivered to the MX that said 421"
        );
        assert_eq!(mx2.messages().len(), 1, "{closing}");
        mx1.wait_all_closed().await;
        assert_eq!(
            mx1.connection_logs().len(),
            1,
            "{closing}: {:?}",
            mx1.connection_logs()
        );
        assert_nothing_after_the_closing_reply(closing, &mx1);
    }
}

// ---------------------------------------------------------------------------------------
// e. Faults at each step
// ---------------------------------------------------------------------------------------

/// Sends one message through a proxy whose only MX follows `script`. A fault at `Body`
/// gets a message large enough that the proxy is still sending when the fault comes.
async fn through(ca: &TestCa, step: Step, script: ServerBehaviour) -> (Heard, SmtpServer, Lab) {
    let (lab, server) = one_mx(ca, script, |lab| lab.short_timeouts()).await;
    let body = match step {
        Step::Body => big_body(2 << 20),
        _ => BODY.to_vec(),
    };
    let heard = send(lab.smtp, &body).await;
    (heard, server, lab)
}

/// The one rule that matters most: the MTA hears 250 only for a message the remote took.
fn assert_no_250_without_acceptance(case: &str, heard: &Heard, server: &SmtpServer) {
    if heard.data.code == 250 {
        assert!(
            !server.messages().is_empty(),
            "{case}: the MTA got 250 for a message the remote did not accept: {heard:?}"
        );
    }
}

/// A fault in the TLS steps may end in plain delivery (the default rule allows it); every
/// other step must end in a 4xx.
async fn each_step_gives_a_4xx(action: Action) {
    let ca = TestCa::new();
    let mut failures = Vec::new();
    for step in Step::PLAIN {
        let case = format!("{action:?} at {step:?}");
        let (heard, server, _lab) =
            through(&ca, step, ServerBehaviour::plain().on(step, action.clone())).await;
        assert_no_250_without_acceptance(&case, &heard, &server);
        let outcome = heard.outcome();
        if !(400..500).contains(&outcome.code) {
            failures.push(format!("{case}: the MTA got {outcome:?} (all: {heard:?})"));
        }
        assert!(server.messages().is_empty(), "{case}");
    }
    for step in [Step::StartTls, Step::Handshake] {
        let case = format!("{action:?} at {step:?}");
        let cert = ca.leaf(&["mx.example.test"], Validity::Current);
        let script = ServerBehaviour::plain()
            .starttls(cert)
            .on(step, action.clone());
        let (heard, server, _lab) = through(&ca, step, script).await;
        assert_no_250_without_acceptance(&case, &heard, &server);
        let code = heard.outcome().code;
        if code != 250 && !(400..500).contains(&code) {
            failures.push(format!("{case}: the MTA got {heard:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn a_remote_that_drops_the_connection_at_any_step_gets_the_mta_a_4xx_and_never_a_250() {
    each_step_gives_a_4xx(Action::Drop).await;
}

#[tokio::test]
async fn a_remote_that_stalls_at_any_step_gets_the_mta_a_4xx_after_the_timeout() {
    each_step_gives_a_4xx(Action::Stall).await;
}

#[tokio::test]
async fn a_remote_that_answers_4xx_at_any_step_gets_the_mta_a_4xx_and_never_a_250() {
    each_step_gives_a_4xx(Action::Reply("451 4.3.0 temporary trouble".into())).await;
}

#[tokio::test]
async fn a_remote_that_answers_5xx_at_any_step_never_gets_the_mta_a_250() {
    let ca = TestCa::new();
    for step in Step::PLAIN {
        let case = format!("5xx at {step:?}");
        let script =
            ServerBehaviour::plain().on(step, Action::Reply("554 5.3.0 permanent trouble".into()));
        let (heard, server, _lab) = through(&ca, step, script).await;
        assert_no_250_without_acceptance(&case, &heard, &server);
        assert!(server.messages().is_empty(), "{case}");
        let outcome = heard.outcome();
        // Before the transaction a refusing server is skipped like an unreachable one (4xx);
        // from MAIL on its own 5xx reaches the MTA. A 5xx in the middle of the body comes
        // before the proxy asked anything: passing it on or deferring are both safe.
        let expected: &[u16] = match step {
            Step::Greeting | Step::Ehlo => &[451],
            Step::Body => &[451, 554],
            _ => &[554],
        };
        assert!(expected.contains(&outcome.code), "{case}: {heard:?}");
    }
}

/// Sends a message whose final dot goes only once `server` has said what it says mid-body:
/// by then that is on its way to the proxy, whatever the machine's load.
async fn send_dot_after_mid_body_reply(proxy: SocketAddr, server: &SmtpServer) -> Heard {
    let (mut client, _) = SmtpClient::connect(proxy).await;
    client.cmd("EHLO mta.sender.test").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;
    let rcpt = client.cmd("RCPT TO:<b@example.test>").await;
    let start = client.cmd("DATA").await;
    if start.code != 354 {
        return Heard { rcpt, data: start };
    }
    // Big enough that the proxy passes blocks of it on before the dot.
    client.send_raw(&big_body(2 << 20)).await;
    server
        .wait_until("the reply mid-body", |c| c.iter().any(|c| c.spoke_mid_body))
        .await;
    client.send_raw(b".\r\n").await;
    let data = client.read_reply().await;
    Heard { rcpt, data }
}

/// A remote (`base`) that says 250 where no reply is due, then refuses the message after
/// the dot.
async fn out_of_sequence_250_then_refusal(
    ca: &TestCa,
    step: Step,
    base: ServerBehaviour,
) -> Option<String> {
    let case = format!("an extra 250 at {step:?}, 554 after the dot");
    let script = base
        .on(step, Action::Extra("250 2.0.0 out of sequence".into()))
        .on(
            Step::EndOfData,
            Action::Reply("554 5.6.0 message refused".into()),
        );
    let (heard, server, _lab) = if step == Step::Body {
        let (lab, server) = one_mx(ca, script, |lab| lab.short_timeouts()).await;
        (
            send_dot_after_mid_body_reply(lab.smtp, &server).await,
            server,
            lab,
        )
    } else {
        through(ca, step, script).await
    };
    assert!(server.messages().is_empty());
    let positive = |r: &Reply| (200..300).contains(&r.code);
    (positive(heard.outcome()) || positive(&heard.data))
        .then(|| format!("{case}: the MTA got {heard:?}"))
}

#[tokio::test]
async fn a_reply_out_of_sequence_at_any_command_never_gets_the_mta_a_250_for_a_refused_message() {
    let ca = TestCa::new();
    let mut failures = Vec::new();
    for step in [
        Step::Greeting,
        Step::Ehlo,
        Step::Mail,
        Step::Rcpt,
        Step::Data,
    ] {
        failures
            .extend(out_of_sequence_250_then_refusal(&ca, step, ServerBehaviour::plain()).await);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn a_reply_out_of_sequence_during_the_body_never_gets_the_mta_a_250_for_a_refused_message() {
    let ca = TestCa::new();
    let failure = out_of_sequence_250_then_refusal(&ca, Step::Body, ServerBehaviour::plain()).await;
    assert!(failure.is_none(), "{failure:?}");
}

#[tokio::test]
async fn over_tls_a_reply_out_of_sequence_during_the_body_never_gets_the_mta_a_250() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let tls = ServerBehaviour::plain().starttls(cert);
    let failure = out_of_sequence_250_then_refusal(&ca, Step::Body, tls).await;
    assert!(failure.is_none(), "{failure:?}");
}

#[tokio::test]
async fn a_positive_reply_that_answers_another_command_is_a_protocol_violation_never_a_250() {
    let ca = TestCa::new();
    for (step, reply) in [
        (Step::Mail, "354 go ahead"),
        (Step::Rcpt, "354 go ahead"),
        (Step::Data, "250 2.0.0 ok"),
        (Step::EndOfData, "354 go ahead"),
    ] {
        let case = format!("{reply:?} at {step:?}");
        let script = ServerBehaviour::plain().on(step, Action::Reply(reply.into()));
        let (heard, server, _lab) = through(&ca, step, script).await;
        assert!(server.messages().is_empty(), "{case}");
        let outcome = heard.outcome();
        assert_eq!(outcome.code, 451, "{case}: {heard:?}");
        assert!(
            outcome.text().contains("protocol violation"),
            "{case}: {heard:?}"
        );
        server.wait_all_closed().await;
        for log in server.connection_logs() {
            let last = log.commands.last().map(String::as_str).unwrap_or_default();
            assert_ne!(last, "QUIT", "{case}: an out-of-step remote gets no QUIT");
        }
    }
}

#[tokio::test]
async fn a_421_or_a_drop_at_the_ehlo_after_tls_sends_the_message_to_the_next_mx_never_in_plain() {
    let ca = TestCa::new();
    let tls = |name: &str| ServerBehaviour::plain().starttls(ca.leaf(&[name], Validity::Current));
    for action in [Action::Reply("421 4.3.2 too busy".into()), Action::Drop] {
        let case = format!("{action:?} at the EHLO after TLS");
        let first = tls("mx1.example.test").on(Step::EhloAfterTls, action);
        let (lab, mx1, mx2) = two_mx(&ca, first, tls("mx2.example.test")).await;

        let heard = send(lab.smtp, BODY).await;

        assert_eq!(heard.data.code, 250, "{case}: {heard:?}");
        assert!(mx1.messages().is_empty(), "{case}: mx1 got it in plain");
        assert!(mx2.messages()[0].tls.is_some(), "{case}");
        mx1.wait_all_closed().await;
        assert_eq!(mx1.connection_logs().len(), 1, "{case}: no plain retry");
        assert_nothing_after_the_closing_reply(&case, &mx1);

        // A server's trouble after TLS is not a TLS fact about it: the next message tries
        // STARTTLS there again.
        send(lab.smtp, BODY).await;
        let starttls = mx1
            .connection_logs()
            .iter()
            .filter(|c| c.commands.iter().any(|line| line == "STARTTLS"))
            .count();
        assert_eq!(starttls, 2, "{case}: {:?}", mx1.connection_logs());
    }
}

/// The MTA's MAIL FROM with parameters, then one recipient: what RCPT got.
async fn rcpt_after_mail(proxy: SocketAddr, mail: &str) -> (SmtpClient, Reply) {
    let (mut client, _) = SmtpClient::connect(proxy).await;
    client.cmd("EHLO mta.sender.test").await;
    assert_eq!(client.cmd(mail).await.code, 250);
    let rcpt = client.cmd("RCPT TO:<b@example.test>").await;
    (client, rcpt)
}

#[tokio::test]
async fn mail_parameters_reach_a_remote_that_supports_them() {
    let ca = TestCa::new();
    let script = ServerBehaviour::plain().ehlo_keyword("SMTPUTF8");
    let (lab, server) = one_mx(&ca, script, |lab| lab).await;
    let mail = "MAIL FROM:<jürgen@sender.test> SIZE=1234 BODY=8BITMIME SMTPUTF8";

    let (mut client, rcpt) = rcpt_after_mail(lab.smtp, mail).await;
    assert_eq!(rcpt.code, 250, "{rcpt:?}");
    assert_eq!(client.data(BODY).await.code, 250);

    assert_eq!(server.connection_logs()[0].commands[1], mail);
}

#[tokio::test]
async fn a_message_that_needs_smtputf8_is_refused_when_the_remote_offers_it_only_before_tls() {
    let ca = TestCa::new();
    let before_tls = "250-mx.fault.test\r\n250-STARTTLS\r\n250 SMTPUTF8";
    let script = ServerBehaviour::plain()
        .starttls(ca.leaf(&["mx.example.test"], Validity::Current))
        .on(Step::Ehlo, Action::Reply(before_tls.into()))
        .on(Step::EhloAfterTls, Action::Normal);
    let (lab, server) = one_mx(&ca, script, |lab| lab).await;

    let mail = "MAIL FROM:<jürgen@sender.test> SMTPUTF8";
    let (_client, rcpt) = rcpt_after_mail(lab.smtp, mail).await;

    assert_reply(&rcpt, 554, "5.6.9");
    assert!(rcpt.text().contains("SMTPUTF8"), "{rcpt:?}");
    let log = &server.connection_logs()[0];
    assert!(
        log.tls,
        "the refusal came after TLS, from the capabilities said under it"
    );
    assert!(
        !log.commands.iter().any(|c| c.starts_with("MAIL")),
        "{:?}",
        log.commands
    );
}

#[tokio::test]
async fn a_message_that_needs_smtputf8_skips_an_mx_without_it_for_one_with_it() {
    let ca = TestCa::new();
    let second = ServerBehaviour::plain().ehlo_keyword("SMTPUTF8");
    let (lab, mx1, mx2) = two_mx(&ca, ServerBehaviour::plain(), second).await;

    let (mut client, rcpt) =
        rcpt_after_mail(lab.smtp, "MAIL FROM:<jürgen@sender.test> SMTPUTF8").await;
    assert_eq!(rcpt.code, 250, "{rcpt:?}");
    assert_eq!(client.data(BODY).await.code, 250);

    assert!(mx1.messages().is_empty());
    assert_eq!(mx2.messages().len(), 1);
}

#[tokio::test]
async fn a_remote_that_refuses_ehlo_gets_helo_and_the_message() {
    let ca = TestCa::new();
    let script = ServerBehaviour::plain()
        .on(
            Step::Ehlo,
            Action::Reply("502 5.5.1 EHLO not implemented".into()),
        )
        .on(Step::Helo, Action::Normal);
    let (lab, server) = one_mx(&ca, script, |lab| lab).await;

    let heard = send(lab.smtp, BODY).await;

    assert_eq!(heard.data.code, 250, "{heard:?}");
    assert_eq!(server.messages()[0].data, BODY);
    let verbs: Vec<String> = server.connection_logs()[0]
        .commands
        .iter()
        .map(|c| c.split([' ', ':']).next().unwrap_or_default().to_string())
        .take(3)
        .collect();
    assert_eq!(verbs, ["EHLO", "HELO", "MAIL"]);
}

#[tokio::test]
async fn a_remote_whose_reply_never_ends_is_given_up_and_the_mta_gets_a_4xx() {
    let ca = TestCa::new();
    let many_lines: Vec<String> = (0..500).map(|i| format!("250-line {i}")).collect();
    let many_lines = format!("{}\r\n250 end", many_lines.join("\r\n"));
    let long_line = format!("250 {}", "x".repeat(1 << 20));
    for (what, reply) in [
        ("500 reply lines", many_lines),
        ("a 1 MiB reply line", long_line),
    ] {
        let script = ServerBehaviour::plain().on(Step::Ehlo, Action::Reply(reply));
        let (heard, server, _lab) = through(&ca, Step::Ehlo, script).await;
        assert_eq!(heard.outcome().code, 451, "{what}: {heard:?}");
        assert!(server.messages().is_empty(), "{what}");
    }
}

/// A listener on `ip:port` that never accepts, its accept queue full: the kernel drops
/// further SYNs, so a connect to it hangs as to a dead host. Returns it with the fillers.
async fn black_hole(ip: Ipv4Addr, port: u16) -> Option<(TcpListener, Vec<TcpStream>)> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from((ip, port))).ok()?;
    let listener = socket.listen(1).ok()?;
    let mut fillers = Vec::new();
    // Connects complete at once while the queue has room; the first that hangs shows it full.
    while let Ok(Ok(stream)) =
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect((ip, port))).await
    {
        fillers.push(stream);
        assert!(fillers.len() < 64, "the accept queue never fills");
    }
    Some((listener, fillers))
}

#[tokio::test]
async fn a_primary_mx_that_never_answers_the_connect_costs_one_connect_timeout_and_the_next_mx_gets_the_message()
 {
    let ca = TestCa::new();
    let (mx2, _hole) = 'bind: {
        for _ in 0..20 {
            let mx2 = SmtpServer::start(IpAddr::V4(MX2), 0, ServerBehaviour::plain())
                .await
                .expect("mx2");
            if let Some(hole) = black_hole(MX1, mx2.addr().port()).await {
                break 'bind (mx2, hole);
            }
        }
        panic!("no port free on both 127.0.0.2 and 127.0.0.3");
    };
    let lab = Lab::new()
        .ca(&ca)
        .zone(two_mx_zone())
        .mx_port(mx2.addr().port())
        .short_timeouts()
        .start()
        .await;

    let started = std::time::Instant::now();
    let heard = send(lab.smtp, BODY).await;

    assert_eq!(heard.data.code, 250, "{heard:?}");
    assert_eq!(mx2.messages().len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "one connect timeout (1 s here), not the kernel's minutes: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_remote_that_stops_reading_mid_body_gets_the_mta_a_4xx_after_the_block_timeout() {
    let ca = TestCa::new();
    let script = ServerBehaviour::plain().on(Step::Body, Action::Freeze);
    let (lab, server) = one_mx(&ca, script, |lab| lab.short_timeouts()).await;
    // More than the kernel's buffers hold, so that the proxy's writes block.
    let body = big_body(16 << 20);

    let heard = send(lab.smtp, &body).await;

    assert_reply(&heard.data, 451, "4.4.2");
    server.release();
    server.wait_all_closed().await;
    assert!(server.messages().is_empty());
    assert!(!server.connection_logs()[0].final_dot);
}

#[tokio::test]
async fn the_mta_leaving_mid_data_makes_the_proxy_close_the_remote_without_the_final_dot() {
    let ca = TestCa::new();
    // Gone: the MTA closes the connection. Silent: the MTA stops sending (idle timeout).
    for gone in [true, false] {
        let (lab, server) = one_mx(&ca, ServerBehaviour::plain(), |lab| {
            lab.short_timeouts().set("timeouts.client_idle", "1s")
        })
        .await;
        let mut client = open_transaction(lab.smtp).await;
        assert_eq!(client.cmd("DATA").await.code, 354);
        // Several 64 KiB blocks, so that the remote has received part of the text.
        client.send_raw(&big_body(300_000)).await;
        server
            .wait_until("part of the body", |c| {
                c.iter().any(|c| c.body.len() > 64 * 1024)
            })
            .await;
        if gone {
            drop(client);
        } else {
            assert!(
                client.try_read_reply().await.is_none(),
                "closed after the idle timeout"
            );
        }
        server.wait_all_closed().await;
        let log = &server.connection_logs()[0];
        assert!(!log.final_dot, "the final dot was sent");
        assert!(server.messages().is_empty());
    }
}

#[tokio::test]
async fn an_mta_that_goes_silent_gets_421_4_4_2_after_the_idle_timeout() {
    let ca = TestCa::new();
    let (lab, _server) = one_mx(&ca, ServerBehaviour::plain(), |lab| {
        lab.set("timeouts.client_idle", "1s")
    })
    .await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(client.cmd("EHLO mta").await.code, 250);
    let bye = client.read_reply().await;
    assert_reply(&bye, 421, "4.4.2");
    assert!(client.try_read_reply().await.is_none());
}

// --- File descriptors ---------------------------------------------------------------------

/// Set in the child process that counts file descriptors.
const FD_CHILD: &str = "TLSROUTER_HARDENING_FD_CHILD";

/// Runs `fd_count_in_a_child_process` alone in a child process, where /proc/self/fd counts
/// only that test's files (in this process other tests run at the same time).
#[test]
fn no_file_descriptor_is_left_open_after_a_batch_of_faulty_sessions() {
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "hardening::fd_count_in_a_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FD_CHILD, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test:\n{stdout}"
    );
    eprintln!("{stderr}");
}

fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(Result::ok)
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!("{} -> {target}", e.file_name().to_string_lossy())
        })
        .collect();
    fds.sort();
    fds
}

/// One domain per fault, each with its own MX address on one port.
const FD_FAULTS: usize = 12;

fn fd_fault(i: usize) -> ServerBehaviour {
    let four = || Action::Reply("451 4.3.0 try later".into());
    match i {
        0 => ServerBehaviour::plain(),
        1 => ServerBehaviour::plain().on(Step::Greeting, Action::Drop),
        2 => ServerBehaviour::plain().on(Step::Ehlo, Action::Stall),
        3 => ServerBehaviour::plain().on(Step::Mail, four()),
        4 => ServerBehaviour::plain().on(Step::Rcpt, Action::Reply("421 4.3.2 bye".into())),
        5 => ServerBehaviour::plain().on(Step::Data, Action::Stall),
        6 => ServerBehaviour::plain().on(Step::Body, Action::Drop),
        7 => ServerBehaviour::plain().on(Step::EndOfData, Action::Stall),
        8 => ServerBehaviour::plain().on(Step::EndOfData, Action::Reply("421 4.3.2 bye".into())),
        9 => ServerBehaviour::plain().on(Step::Rcpt, Action::Extra("250 2.0.0 extra".into())),
        10 => ServerBehaviour::plain().on(Step::Data, four()),
        _ => ServerBehaviour::plain().on(Step::EndOfData, Action::Drop),
    }
}

#[tokio::test]
async fn fd_count_in_a_child_process() {
    if std::env::var_os(FD_CHILD).is_none() {
        return;
    }
    let ca = TestCa::new();
    let ip = |i: usize| Ipv4Addr::new(127, 0, 1, 10 + i as u8);
    // All servers, the DNS server and the proxy exist before the first count.
    let mut servers = Vec::new();
    let mut port = 0;
    for i in 0..FD_FAULTS {
        let server = SmtpServer::start(IpAddr::V4(ip(i)), port, fd_fault(i))
            .await
            .expect("scripted server (the port is free on another loopback address)");
        port = server.addr().port();
        servers.push(server);
    }
    let mut zone = TestZone::new();
    for i in 0..FD_FAULTS {
        zone = zone
            .mx(&format!("d{i}.test"), 10, &format!("mx.d{i}.test"))
            .a(&format!("mx.d{i}.test"), ip(i));
    }
    let lab = Lab::new()
        .ca(&ca)
        .zone(zone)
        .mx_port(port)
        .short_timeouts()
        .set("timeouts.client_idle", "1s")
        .start()
        .await;

    // A first message warms up what is made once (resolver, TLS configuration).
    session_to(lab.smtp, 0).await;
    servers[0].wait_all_closed().await;
    let before = open_fds();

    for round in 0..3 {
        for i in 1..FD_FAULTS {
            session_to(lab.smtp, i).await;
        }
        // The MTA leaves mid-DATA, and breaks pipelining.
        let mut client = rcpt_accepted(lab.smtp, 0).await;
        client.cmd("DATA").await;
        client.send_raw(&big_body(200_000)).await;
        drop(client);
        let mut client = rcpt_accepted(lab.smtp, 0).await;
        client.send_raw(b"DATA\r\nRSET\r\n").await;
        let _ = client.read_reply().await;
        assert!(client.try_read_reply().await.is_none());
        eprintln!("round {round} sent");
    }
    for server in &servers {
        server.wait_all_closed().await;
    }
    let after = open_fds();
    eprintln!(
        "open file descriptors: {} before, {} after",
        before.len(),
        after.len()
    );
    let new: Vec<&String> = after.iter().filter(|f| !before.contains(f)).collect();
    // Slack of 2: a DNS lookup the resolver started may still hold its UDP socket for a
    // moment. It is smaller than the 3 rounds, so a socket leaked by any one kind of fault
    // (3 of them at least) still fails the test. Seen here: the same count before and after.
    assert!(
        after.len() <= before.len() + 2,
        "file descriptors leaked: before {before:#?}\nnew {new:#?}"
    );
}

async fn rcpt_accepted(proxy: SocketAddr, domain: usize) -> SmtpClient {
    let (mut client, _) = SmtpClient::connect(proxy).await;
    client.cmd("EHLO mta").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;
    client.cmd(&format!("RCPT TO:<b@d{domain}.test>")).await;
    client
}

/// One message to domain `d{i}.test`; waits until the proxy has closed the session.
async fn session_to(proxy: SocketAddr, domain: usize) {
    let mut client = rcpt_accepted(proxy, domain).await;
    client.data(BODY).await;
    client.cmd("QUIT").await;
    assert!(client.try_read_reply().await.is_none());
}

// ---------------------------------------------------------------------------------------
// f. Limits
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_command_line_over_512_octets_gets_500_5_5_2_and_the_session_stays_in_step() {
    let ca = TestCa::new();
    let (lab, _server) = one_mx(&ca, ServerBehaviour::plain(), |lab| lab).await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    // "NOOP " + padding + CRLF: exactly 512 octets, then 513.
    let at_limit = format!("NOOP {}", "x".repeat(512 - 5 - 2));
    assert_eq!(client.cmd(&at_limit).await.code, 250);
    let over = format!("NOOP {}", "x".repeat(512 - 5 - 1));
    assert_reply(&client.cmd(&over).await, 500, "5.5.2");
    // A megabyte without a line ending is read and thrown away, not kept.
    client.send_raw(&vec![b'x'; 1 << 20]).await;
    assert_reply(&client.cmd("").await, 500, "5.5.2");
    assert_eq!(client.cmd("EHLO mta").await.code, 250);
    assert_eq!(client.cmd("NOOP").await.code, 250);
}

#[tokio::test]
async fn a_body_line_over_1000_octets_gets_500_5_5_2_and_nothing_is_delivered() {
    let ca = TestCa::new();
    // One connection per message, so the second one's log is its own.
    let (lab, server) = one_mx(&ca, ServerBehaviour::plain(), |lab| {
        lab.set("delivery.pool.enabled", false)
    })
    .await;
    // 998 characters and CRLF: the longest line allowed.
    let mut body = b"Subject: long lines\r\n\r\n".to_vec();
    body.extend_from_slice(&[b'a'; 998]);
    body.extend_from_slice(b"\r\n");
    assert_eq!(send(lab.smtp, &body).await.data.code, 250);
    assert_eq!(server.messages().len(), 1);

    // One more, after enough text that blocks have already gone to the remote.
    let mut body = big_body(300_000);
    body.extend_from_slice(&[b'a'; 999]);
    body.extend_from_slice(b"\r\nmore text\r\n");
    let heard = send(lab.smtp, &body).await;

    assert_reply(&heard.data, 500, "5.5.2");
    server.wait_all_closed().await;
    assert_eq!(
        server.messages().len(),
        1,
        "the second message was not delivered"
    );
    let log = &server.connection_logs()[1];
    assert!(!log.final_dot, "the remote never got the final dot");
    assert!(
        log.body.len() > 64 * 1024,
        "blocks had gone out before the long line"
    );
}

#[tokio::test]
async fn more_recipients_than_max_recipients_get_452_4_5_3() {
    let ca = TestCa::new();
    let (lab, server) = one_mx(&ca, ServerBehaviour::plain(), |lab| {
        lab.set("limits.max_recipients", 3)
    })
    .await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    client.cmd("EHLO mta").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;
    for i in 0..5 {
        let reply = client.cmd(&format!("RCPT TO:<r{i}@example.test>")).await;
        if i < 3 {
            assert_eq!(reply.code, 250, "{reply:?}");
        } else {
            assert_reply(&reply, 452, "4.5.3");
        }
    }
    assert_eq!(client.data(BODY).await.code, 250);
    let got = server.messages();
    assert_eq!(
        got[0].rcpt_to,
        ["r0@example.test", "r1@example.test", "r2@example.test"]
    );
}

#[tokio::test]
async fn a_message_over_max_message_size_gets_552_5_3_4_at_mail_from_and_at_the_end_of_data() {
    let ca = TestCa::new();
    let limit = 100_000;
    let (lab, server) = one_mx(&ca, ServerBehaviour::plain(), |lab| {
        lab.set("limits.max_message_size", limit)
    })
    .await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    let ehlo = client.cmd("EHLO mta").await;
    assert!(ehlo.lines.contains(&format!("SIZE {limit}")), "{ehlo:?}");
    let too_big = client
        .cmd(&format!("MAIL FROM:<a@sender.test> SIZE={}", limit + 1))
        .await;
    assert_reply(&too_big, 552, "5.3.4");
    assert_eq!(
        client
            .cmd(&format!("MAIL FROM:<a@sender.test> SIZE={limit}"))
            .await
            .code,
        250
    );
    client.cmd("RSET").await;
    drop(client);

    // No SIZE given, and the text is larger than announced limits: refused at the end.
    let heard = send(lab.smtp, &big_body(3 * limit as usize)).await;
    assert_reply(&heard.data, 552, "5.3.4");
    server.wait_all_closed().await;
    assert!(server.messages().is_empty());
    assert!(server.connection_logs().iter().all(|c| !c.final_dot));
}

#[tokio::test]
async fn with_max_sessions_1_a_second_mta_connection_gets_421_4_3_2_before_any_command() {
    let ca = TestCa::new();
    let (lab, _server) = one_mx(&ca, ServerBehaviour::plain(), |lab| {
        lab.set("limits.max_sessions", 1)
    })
    .await;
    let (mut first, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(greeting.code, 220);

    let (mut second, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_reply(&greeting, 421, "4.3.2");
    assert!(second.try_read_reply().await.is_none(), "closed at once");

    // When the first session ends its place is free again.
    assert_eq!(first.cmd("QUIT").await.code, 221);
    assert!(first.try_read_reply().await.is_none());
    let (_third, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(greeting.code, 220);
}

#[tokio::test]
async fn max_sessions_bounds_the_sessions_of_all_listeners_together() {
    let ca = TestCa::new();
    let (lab, _server) = one_mx(&ca, ServerBehaviour::plain(), |lab| {
        lab.set("limits.max_sessions", 1)
    })
    .await;
    // A second listener of the same proxy, as `listeners:` adds one.
    let second_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let second_addr = second_listener.local_addr().expect("address");
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tlsrouter::inbound::listener::serve(
        second_listener,
        lab.proxy.clone(),
        tlsrouter::inbound::listener::Accepting::SmartHost,
        async {
            let _ = stopped.await;
        },
    ));

    let (mut first, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(greeting.code, 220);
    let (mut second, greeting) = SmtpClient::connect(second_addr).await;
    assert_reply(&greeting, 421, "4.3.2");
    assert!(second.try_read_reply().await.is_none(), "closed at once");

    // The one place, freed on the first listener, is taken on the second.
    assert_eq!(first.cmd("QUIT").await.code, 221);
    assert!(first.try_read_reply().await.is_none());
    let (_third, greeting) = SmtpClient::connect(second_addr).await;
    assert_eq!(greeting.code, 220);
    let (_fourth, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_reply(&greeting, 421, "4.3.2");
}

#[tokio::test]
async fn max_sessions_per_client_counts_an_address_over_all_listeners() {
    let ca = TestCa::new();
    let (lab, _server) = one_mx(&ca, ServerBehaviour::plain(), |lab| {
        lab.set("limits.max_sessions_per_client", 1)
    })
    .await;
    let second_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let second_addr = second_listener.local_addr().expect("address");
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tlsrouter::inbound::listener::serve(
        second_listener,
        lab.proxy.clone(),
        tlsrouter::inbound::listener::Accepting::SmartHost,
        async {
            let _ = stopped.await;
        },
    ));

    let (_first, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(greeting.code, 220);
    let (_second, greeting) = SmtpClient::connect(second_addr).await;
    assert_reply(&greeting, 421, "4.3.2");
}
