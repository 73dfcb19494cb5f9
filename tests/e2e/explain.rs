//! What `explain` says is what the daemon then does: for a representative set of cached
//! outcomes, the daemon's own `ctl rules explain` is asked first, then a message is sent
//! through real servers, and what the server received must match the decision explained.
//! Also: an address-literal recipient finds what the cache learned of it, and the
//! transaction line has no empty fields.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tlsrouter::outcome::OutcomeClass;

use crate::support::events::{assert_fields, assert_no_fields};
use crate::support::lab::{self, Lab};
use crate::support::logs::Logs;
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_client::{Reply, SmtpClient, send_one};
use crate::support::smtp_server::{ServerBehaviour, SmtpServer, StartTls};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const MX: &str = "mx.example.test";

/// A proxy with its admin socket, whose example.test MX is one server.
struct Setup {
    smtp: SocketAddr,
    socket: PathBuf,
    rules: PathBuf,
    server: SmtpServer,
    _lab: Lab,
}

async fn lab(behaviour: ServerBehaviour, rules: &str) -> Setup {
    lab_with(behaviour, rules, |builder| builder).await
}

/// [`lab`], with settings of the test's own.
async fn lab_with(
    behaviour: ServerBehaviour,
    rules: &str,
    adjust: impl FnOnce(lab::LabBuilder) -> lab::LabBuilder,
) -> Setup {
    let server = SmtpServer::start(LOCALHOST, 0, behaviour)
        .await
        .expect("smtp server");
    let builder = adjust(CA.with(|ca| Lab::new().ca(ca)));
    let lab = builder.one_mx(&server).rules(rules).admin().start().await;
    Setup {
        smtp: lab.smtp,
        socket: lab.admin_socket().to_path_buf(),
        rules: lab.rules_file().to_path_buf(),
        server,
        _lab: lab,
    }
}

thread_local! {
    static CA: TestCa = TestCa::new();
}

fn leaf(validity: Validity) -> crate::support::pki::CertKey {
    CA.with(|ca| ca.leaf(&[MX], validity))
}

async fn tlsrouter(args: Vec<String>) -> (i32, String, String) {
    lab::tlsrouter(args).await
}

async fn ctl_json(socket: &Path, args: &[&str]) -> Value {
    lab::ctl_json(socket, args).await
}

/// What the daemon's `ctl rules explain` says it does with the MX host now: the action
/// (`tls`, `plain`, `refuse`, `skip`) and its words.
async fn daemon_explains(lab: &Setup) -> (String, String) {
    let answer = ctl_json(
        &lab.socket,
        &["rules", "explain", "--rcpt", "b@example.test", "--mx", MX],
    )
    .await;
    let action = answer["decision"]["action"].as_str().expect("action");
    let text = answer["explanation"].as_str().expect("explanation");
    (action.to_string(), text.to_string())
}

/// One message to b@example.test; the reply to RCPT, then to the message.
async fn send(smtp: SocketAddr) -> (Reply, Option<Reply>) {
    let body = b"Subject: t\r\n\r\nhello\r\n";
    send_one(smtp, "MAIL FROM:<a@sender.test>", "b@example.test", body).await
}

/// The first message to the host: the daemon learns what it is like.
async fn learn(lab: &Setup, expect: u16) {
    let (rcpt, data) = send(lab.smtp).await;
    let code = data.map_or(rcpt.code, |d| d.code);
    assert_eq!(code, expect, "{rcpt:?}");
}

/// Sends a message and checks that what happened is what `action` said.
async fn assert_daemon_does(lab: &Setup, action: &str) {
    let before = lab.server.messages().len();
    let handshakes = lab.server.tls_handshakes_attempted();
    let (rcpt, data) = send(lab.smtp).await;
    let received = lab.server.messages();
    match action {
        "tls" => {
            assert_eq!(data.map(|d| d.code), Some(250), "{rcpt:?}");
            let message = received.get(before).expect("message received");
            assert!(message.tls.is_some(), "explained TLS, sent in plain");
        }
        "legacy-tls" => {
            assert_eq!(data.map(|d| d.code), Some(250), "{rcpt:?}");
            let message = received.get(before).expect("message received");
            let tls = message
                .tls
                .as_ref()
                .expect("explained legacy TLS, sent in plain");
            assert_eq!(tls.version, "TLSv1.0");
            assert_eq!(
                lab.server.tls_handshakes_attempted(),
                handshakes + 1,
                "straight to the legacy stack: one handshake"
            );
        }
        "plain" => {
            assert_eq!(data.map(|d| d.code), Some(250), "{rcpt:?}");
            let message = received.get(before).expect("message received");
            assert!(message.tls.is_none(), "explained plain, sent encrypted");
            assert_eq!(
                lab.server.tls_handshakes_attempted(),
                handshakes,
                "explained plain without a new handshake, and one was tried"
            );
        }
        "refuse" => {
            assert_eq!(
                (rcpt.code, rcpt.enhanced().as_deref()),
                (451, Some("4.7.5"))
            );
            assert_eq!(
                received.len(),
                before,
                "explained a deferral, and it was sent"
            );
        }
        other => panic!("unexpected action {other}"),
    }
}

const VERIFY_TRY: &str = r#"
rules:
  - name: lenient
    match: { domains: [example.test] }
    verify: try
"#;

const VERIFY_REQUIRE: &str = r#"
rules:
  - name: banks
    match: { domains: [example.test] }
    verify: require
"#;

#[tokio::test]
async fn a_cached_expired_certificate_under_verify_try_is_explained_and_sent_encrypted() {
    let lab = lab(ServerBehaviour::tls(leaf(Validity::Expired)), VERIFY_TRY).await;
    // The daemon learns the host, then an operator says its certificate is expired.
    learn(&lab, 250).await;
    let pin = ["cache", "pin", MX, "cert-expired", "--ttl", "1h"];
    ctl_json(&lab.socket, &pin).await;
    let (action, text) = daemon_explains(&lab).await;
    assert_eq!(action, "tls", "{text}");
    assert!(
        text.contains("with cached: cert-expired (pinned): TLS"),
        "{text}"
    );
    assert_daemon_does(&lab, &action).await;

    // The offline explain says the same for the same rule file.
    let (code, out, err) = tlsrouter(vec![
        "explain".into(),
        "--rules".into(),
        lab.rules.display().to_string(),
        "--rcpt".into(),
        "b@example.test".into(),
        "--outcome".into(),
        "cert-expired".into(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("with cached: cert-expired: TLS"), "{out}");
    assert!(!out.contains("451"), "{out}");
}

#[tokio::test]
async fn a_cached_expired_certificate_under_verify_require_is_explained_and_deferred() {
    let lab = lab(
        ServerBehaviour::tls(leaf(Validity::Expired)),
        VERIFY_REQUIRE,
    )
    .await;
    learn(&lab, 451).await;
    let (action, text) = daemon_explains(&lab).await;
    assert_eq!(action, "refuse", "{text}");
    assert!(text.contains("with cached: cert-expired:"), "{text}");
    let connections = lab.server.connections();
    assert_daemon_does(&lab, &action).await;
    assert_eq!(
        lab.server.connections(),
        connections,
        "the doomed attempt was made again"
    );
}

#[tokio::test]
async fn a_host_pinned_without_starttls_is_explained_and_sent_plain() {
    let lab = lab(ServerBehaviour::tls(leaf(Validity::Current)), VERIFY_TRY).await;
    learn(&lab, 250).await;
    let pin = ["cache", "pin", MX, "no-starttls", "--ttl", "1h"];
    ctl_json(&lab.socket, &pin).await;
    let (action, text) = daemon_explains(&lab).await;
    assert_eq!(action, "plain", "{text}");
    assert!(!text.contains("EHLO is read again"), "{text}");
    assert_daemon_does(&lab, &action).await;
}

#[tokio::test]
async fn a_host_whose_handshake_failed_is_explained_and_sent_plain_without_a_handshake() {
    let behaviour = ServerBehaviour::with_starttls(StartTls::AbortAfter220);
    let lab = lab(behaviour, VERIFY_TRY).await;
    learn(&lab, 250).await;
    let (action, text) = daemon_explains(&lab).await;
    assert!(
        text.contains("with cached: handshake-failed: plain"),
        "{text}"
    );
    assert_eq!(action, "plain");
    assert_daemon_does(&lab, &action).await;
}

#[tokio::test]
async fn a_tls_1_0_only_host_is_explained_and_sent_over_the_legacy_stack() {
    let behaviour = ServerBehaviour::with_starttls(StartTls::Tls10Only(leaf(Validity::Current)));
    let lab = lab(behaviour, VERIFY_TRY).await;
    learn(&lab, 250).await;
    let (action, text) = daemon_explains(&lab).await;
    assert!(
        text.contains("with cached: tls-legacy + legacy-tls: legacy TLS"),
        "{text}"
    );
    assert_eq!(action, "legacy-tls");
    assert_daemon_does(&lab, &action).await;
}

#[tokio::test]
async fn a_host_with_nothing_cached_is_explained_as_a_tls_attempt() {
    let lab = lab(
        ServerBehaviour::tls(leaf(Validity::Current)),
        VERIFY_REQUIRE,
    )
    .await;
    let (action, text) = daemon_explains(&lab).await;
    assert_eq!(action, "tls", "{text}");
    assert!(text.contains("first try:   TLS"), "{text}");
    assert_daemon_does(&lab, &action).await;
}

#[tokio::test]
async fn an_address_literal_recipient_finds_what_the_cache_learned_of_it() {
    let behaviour = ServerBehaviour::with_starttls(StartTls::AbortAfter220);
    let lab = lab(behaviour, VERIFY_TRY).await;
    for _ in 0..2 {
        let (mut client, _) = SmtpClient::connect(lab.smtp).await;
        client.cmd("EHLO mta.test").await;
        client.cmd("MAIL FROM:<a@sender.test>").await;
        assert_eq!(client.cmd("RCPT TO:<b@[127.0.0.1]>").await.code, 250);
        assert_eq!(client.data(b"Subject: t\r\n\r\nhi\r\n").await.code, 250);
        client.cmd("QUIT").await;
    }
    assert_eq!(lab.server.messages().len(), 2);
    assert_eq!(
        lab.server.tls_handshakes_attempted(),
        2,
        "the first message tried rustls and the legacy stack; the second, no handshake the cache knew would fail"
    );
    let shown = ctl_json(&lab.socket, &["cache", "show", "127.0.0.1"]).await;
    let entries = shown["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{shown:#}");
    assert_eq!(entries[0]["host"], "127.0.0.1");
    assert_eq!(
        entries[0]["class"],
        OutcomeClass::HandshakeFailed.name(),
        "{shown:#}"
    );
}

#[tokio::test]
async fn the_transaction_line_has_no_empty_fields() {
    let (logs, _guard) = Logs::capture();
    let lab = lab(ServerBehaviour::plain(), VERIFY_TRY).await;
    assert_daemon_does(&lab, "plain").await;
    let events = logs.transaction_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_fields(&events[0], &[("route", "plain"), ("class", "no-starttls")]);
    assert_no_fields(
        &events[0],
        &[
            "verify",
            "cipher",
            "tls_version",
            "refused",
            "relay",
            "earlier_failures",
        ],
    );
    // The line as written: no `key=` with nothing after it.
    let lines = logs.transaction_lines();
    let line = &lines[0];
    for field in [
        "verify=",
        "cipher=",
        "tls_version=",
        "refused=",
        "relay=",
        "earlier_failures=",
    ] {
        assert!(
            !line.contains(field),
            "{field} in a plain delivery's line: {line}"
        );
    }
    let empty = line
        .split(' ')
        .find(|word| word.ends_with('=') && !word.contains('"'));
    assert_eq!(empty, None, "an empty field in {line}");
}

#[tokio::test]
async fn a_message_through_the_fallback_relay_names_the_mx_and_the_relay() {
    let (logs, _guard) = Logs::capture();
    let relay = SmtpServer::start(LOCALHOST, 0, ServerBehaviour::plain())
        .await
        .expect("relay");
    let rules = format!(
        r#"
rules:
  - name: redirect-without-tls
    match: {{ domains: [example.test] }}
    fallback_on: [no-starttls]
    fallback: {{ relay: "{}" }}
"#,
        relay.addr()
    );
    let lab = lab(ServerBehaviour::plain(), &rules).await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    client.cmd("EHLO mta.test").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    // While the transaction is open, ctl sessions says where it goes.
    let sessions = ctl_json(&lab.socket, &["sessions"]).await;
    let next_hop = sessions["sessions"][0]["next_hop"]
        .as_str()
        .expect("next_hop");
    assert_eq!(
        next_hop,
        format!("{MX}[127.0.0.1] via relay {}", relay.addr())
    );
    assert_eq!(client.data(b"Subject: t\r\n\r\nhi\r\n").await.code, 250);
    client.cmd("QUIT").await;
    assert_eq!(relay.messages().len(), 1);
    assert!(lab.server.messages().is_empty());
    let relay = relay.addr().to_string();
    assert_fields(
        &logs.transaction_events()[0],
        &[
            ("next_hop", &format!("{MX}[127.0.0.1]")),
            ("mx", MX),
            ("addr", "127.0.0.1"),
            ("relay", &relay),
        ],
    );
}

#[tokio::test]
async fn check_points_out_a_rule_that_overrides_a_published_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules.yaml");
    let rules = r#"
rules:
  - name: partner-exception
    match: { domains: [partner.example] }
    tls: never
    override_published_policy: true
"#;
    std::fs::write(&file, rules).expect("rules");
    let (code, out, err) = tlsrouter(vec!["check".into(), file.display().to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.trim_end().ends_with("OK, 1 rule"), "{out}");
    assert!(
        err.contains(":3:5: warning: rule \"partner-exception\" overrides the published MTA-STS policy of partner.example"),
        "{err}"
    );
}

#[tokio::test]
async fn explain_shows_what_an_assumed_mta_sts_policy_does_to_the_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules.yaml");
    std::fs::write(
        &file,
        "rules:\n  - name: plain-partner\n    match: { domains: [partner.example] }\n    tls: never\n",
    )
    .expect("rules");
    let explain = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "explain",
            "--rules",
            &file.display().to_string(),
            "--rcpt",
            "a@partner.example",
            "--mx",
            "mx1.partner.example",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        tlsrouter(args)
    };

    // The rule alone sends in plain; an enforced policy does not let it.
    let (code, out, err) = explain(&[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("first try:   plain"), "{out}");
    let (code, out, err) = explain(&["--mta-sts", "enforce"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("policy:      mta-sts:enforce"), "{out}");
    assert!(
        out.contains(
            "first try:   TLS (STARTTLS when offered, TLS 1.2+, the certificate must verify)"
        ),
        "{out}"
    );

    // A server the policy does not name is skipped; one it names by pattern is not.
    let (_, out, _) = explain(&["--mta-sts", "enforce", "--mta-sts-mx", "*.other.example"]).await;
    assert!(out.contains("not an MX host of the policy"), "{out}");
    let (_, out, _) = explain(&["--mta-sts", "enforce", "--mta-sts-mx", "*.partner.example"]).await;
    assert!(out.contains("the certificate must verify"), "{out}");

    // A pinned no-starttls host under enforce is deferred, never plain.
    let (_, out, _) = explain(&[
        "--mta-sts",
        "enforce",
        "--outcome",
        "no-starttls",
        "--pinned",
    ])
    .await;
    assert!(out.contains("deferred with 451 4.7.5"), "{out}");

    // Testing changes nothing: the rule's plain stands.
    let (_, out, _) = explain(&["--mta-sts", "testing"]).await;
    assert!(out.contains("policy:      mta-sts:testing"), "{out}");
    assert!(out.contains("first try:   plain"), "{out}");

    let (code, _, err) = explain(&["--mta-sts", "enforce", "--mta-sts-mx", "mx.*.example"]).await;
    assert_eq!(code, 64, "a bad pattern is a usage error");
    assert!(err.contains("--mta-sts-mx \"mx.*.example\""), "{err}");
}

#[tokio::test]
async fn a_host_that_did_tls_and_now_refuses_starttls_is_explained_probed_and_sent_as_a_new_attempt()
 {
    use crate::support::smtp_server::{Action, Step};
    let rules = "rules:\n  - name: careful\n    match: { domains: [example.test] }\n    on_downgrade: defer\n";
    // TLS on the first connection; from the second on, 454 to STARTTLS (injected, say).
    let behaviour = ServerBehaviour::tls(leaf(Validity::Current)).on_connections_from(
        1,
        Step::StartTls,
        Action::Reply("454 4.7.0 TLS not available".into()),
    );
    // Each message on a connection of its own, so each meets the server anew.
    let lab = lab_with(behaviour, rules, |b| b.set("delivery.pool.enabled", false)).await;
    learn(&lab, 250).await;
    learn(&lab, 451).await;

    let (action, text) = daemon_explains(&lab).await;
    assert_eq!(action, "tls", "TLS is tried again: {text}");
    assert!(
        text.contains("with cached: starttls-refused after TLS within the success memory: TLS"),
        "{text}"
    );
    let probe = ctl_json(&lab.socket, &["probe", "example.test"]).await;
    let decision = probe["mx"][0]["servers"][0]["decision"]
        .as_str()
        .unwrap_or_default();
    assert!(
        decision.contains("downgrade: did TLS before, now starttls-refused"),
        "probe says what delivery does with what it found: {probe}"
    );

    // And so it is: STARTTLS again, the downgrade found again, deferred again.
    let starttls = |server: &SmtpServer| {
        let logs = server.connection_logs();
        (logs.iter())
            .filter(|c| c.commands.iter().any(|l| l == "STARTTLS"))
            .count()
    };
    let before = starttls(&lab.server);
    let (rcpt, _) = send(lab.smtp).await;
    assert_eq!(
        (rcpt.code, rcpt.enhanced().as_deref()),
        (451, Some("4.7.5"))
    );
    assert_eq!(starttls(&lab.server), before + 1);

    // The offline explain, told the host did TLS, says the same; not told, it says both.
    let explain = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "explain",
            "--rules",
            &lab.rules.display().to_string(),
            "--rcpt",
            "b@example.test",
            "--mx",
            MX,
            "--outcome",
            "starttls-refused",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        tlsrouter(args)
    };
    let (code, out, err) = explain(&["--did-tls"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("with cached: starttls-refused after TLS within the success memory: TLS"),
        "{out}"
    );
    let (code, out, err) = explain(&[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("with cached: starttls-refused: plain"),
        "{out}"
    );
    assert!(out.contains("after TLS:   "), "{out}");
}
