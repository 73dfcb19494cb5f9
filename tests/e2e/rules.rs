//! The rule list, end to end: a real SMTP client talks to the real proxy, which reads a rule
//! file written by the test, resolves MX records from a real DNS server on loopback and
//! delivers to real SMTP servers (STARTTLS, TLS 1.0 only, implicit TLS, AUTH), relays and
//! smart hosts. Each test is one thing an administrator writes in a rule file, and checks what
//! the MTA was told, what arrived where, and what was logged.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use crate::support::daemon::replace_file;
use crate::support::dns::TestZone;
use crate::support::events::{assert_fields, field};
use crate::support::lab::{DaemonLab, Lab, dedent};
use crate::support::logs::Logs;
use crate::support::mta::{
    BODY, assert_deferred_for_tls, assert_delivered, assert_reply, send, send_from, transaction,
};
use crate::support::mx::{loopback, one_mx_ruled, server, starttls, tls10_only};
use crate::support::pki::{CertKey, TestCa, Validity};
use crate::support::smtp_client::SmtpClient;
use crate::support::smtp_server::{ServerBehaviour, SmtpServer, StartTls};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

// ---------------------------------------------------------------------------------------
// The lab: DNS, CA, rule file, proxy

/// A DNS server, a CA the proxy trusts, a rule file with `rules`, and the real proxy
/// serving the MTA side on a loopback port; MX hosts listen on `mx_port`.
async fn start_lab(zone: TestZone, ca: &TestCa, mx_port: u16, rules: &str) -> Lab {
    Lab::new()
        .ca(ca)
        .zone(zone)
        .mx_port(mx_port)
        .rules(rules)
        .start()
        .await
}

/// The same lab around the daemon binary, with `env` in its environment.
async fn start_daemon_lab(
    zone: TestZone,
    ca: &TestCa,
    mx_port: u16,
    rules: &str,
    env: &[(&str, &str)],
) -> DaemonLab {
    let mut lab = Lab::new().ca(ca).zone(zone).mx_port(mx_port).rules(rules);
    for (key, value) in env {
        lab = lab.env(key, value);
    }
    lab.start_daemon().await
}

/// Servers on different loopback addresses and one port (MX hosts share the proxy's
/// `delivery.port`); a port free on the first address but taken on another is tried again.
async fn servers_on_one_port<const N: usize>(
    servers: [(Ipv4Addr, &dyn Fn() -> ServerBehaviour); N],
) -> [SmtpServer; N] {
    for _ in 0..20 {
        let (first_ip, first) = servers[0];
        let first = server(first_ip, 0, first()).await;
        let port = first.addr().port();
        let mut started = vec![first];
        for (ip, behaviour) in &servers[1..] {
            match SmtpServer::start(IpAddr::V4(*ip), port, behaviour()).await {
                Ok(server) => started.push(server),
                Err(_) => break,
            }
        }
        if let Ok(all) = started.try_into() {
            return all;
        }
    }
    panic!("no port free on every address");
}

// ---------------------------------------------------------------------------------------
// The MTA side

/// Like [`Logs::capture`], at debug level: the SMTP dialogue both ways.
fn capture_debug() -> (Logs, tracing::subscriber::DefaultGuard) {
    Logs::capture_at("tlsrouter=debug")
}

// ---------------------------------------------------------------------------------------
// tls: never / require, verify, min_tls

#[tokio::test]
async fn a_partner_listed_with_tls_never_gets_its_mail_in_plain_although_its_server_offers_starttls()
 {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let rules = r#"
        rules:
          - name: partner-without-tls
            match: { domains: [example.test] }
            tls: never
    "#;
    let (lab, mx) = one_mx_ruled(
        &ca,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
        rules,
    )
    .await;

    let sent = send(lab.smtp, &["b@example.test"]).await;

    assert_delivered(&sent);
    let got = mx.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, BODY);
    assert_eq!(got[0].rcpt_to, vec!["b@example.test"]);
    assert!(got[0].tls.is_none(), "delivered in plain");
    assert_eq!(mx.tls_handshakes_attempted(), 0, "STARTTLS never sent");
    assert_eq!(mx.connections(), 1);
    assert_fields(
        &logs.transaction_events()[0],
        &[
            ("mx", "mx.example.test"),
            ("route", "plain"),
            ("class", "tls-never"),
            ("fallback", "tls-never: TLS not wanted by rule"),
            ("rule", "partner-without-tls"),
            ("end", "delivered"),
        ],
    );
}

#[tokio::test]
async fn tls_require_toward_a_server_without_starttls_defers_with_451_4_7_5_and_sends_nothing() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let rules = r#"
        rules:
          - name: banks
            match: { domains: [example.test] }
            tls: require
    "#;
    let (lab, mx) = one_mx_ruled(&ca, ServerBehaviour::default(), rules).await;

    let sent = send(lab.smtp, &["b@example.test"]).await;

    assert_eq!(sent.mail.code, 250);
    assert_deferred_for_tls(
        &sent,
        &[
            "rule \"banks\"",
            "mx.example.test[127.0.0.1]",
            "no STARTTLS",
        ],
    );
    assert!(mx.messages().is_empty(), "nothing delivered");
    let warned = logs.events_with(&[("event", "not_delivered")]);
    assert_eq!(warned.len(), 1, "{}", logs.text());
    assert_fields(&warned[0], &[("level", "WARN"), ("rule", "banks")]);
    let reply = field(&warned[0], "reply").unwrap_or_default();
    assert!(
        reply.starts_with("451 4.7.5") && reply.contains("no STARTTLS"),
        "{reply}"
    );
    assert_fields(&logs.transaction_events()[0], &[("route", "none")]);
}

const VERIFY_REQUIRE: &str = r#"
    rules:
      - name: verified-only
        match: { domains: [example.test] }
        verify: require
"#;

#[tokio::test]
async fn verify_require_defers_a_server_with_an_expired_certificate_and_names_the_expiry() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Expired);
    let not_after = cert.not_after.to_string();
    let (lab, mx) = one_mx_ruled(&ca, starttls(cert), VERIFY_REQUIRE).await;

    let sent = send(lab.smtp, &["b@example.test"]).await;

    assert_deferred_for_tls(
        &sent,
        &[
            "rule \"verified-only\"",
            &format!("certificate expired on {not_after}"),
        ],
    );
    assert!(mx.messages().is_empty());
    assert_eq!(mx.tls_handshakes_attempted(), 1);
    assert_eq!(
        mx.connections(),
        1,
        "no plain fallback: cert-expired is not in the default fallback_on"
    );
    let warned = logs.events_with(&[("event", "not_delivered")]);
    assert_fields(&warned[0], &[("level", "WARN")]);
    let reply = field(&warned[0], "reply").unwrap_or_default();
    assert!(reply.contains("certificate expired"), "{reply}");
}

#[tokio::test]
async fn verify_require_with_fallback_on_cert_expired_delivers_in_plain_to_the_same_server() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let rules = format!(
        "{}    fallback_on: [cert-expired]\n",
        dedent(VERIFY_REQUIRE)
    );
    let (lab, mx) = one_mx_ruled(
        &ca,
        starttls(ca.leaf(&["mx.example.test"], Validity::Expired)),
        &rules,
    )
    .await;

    let sent = send(lab.smtp, &["b@example.test"]).await;

    assert_delivered(&sent);
    let got = mx.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, BODY);
    assert!(got[0].tls.is_none(), "in plain, not over the rejected TLS");
    assert_eq!(mx.tls_handshakes_attempted(), 1);
    assert_eq!(mx.connections(), 2, "the TLS connection, then a plain one");
    let line = &logs.transaction_events()[0];
    assert_fields(
        line,
        &[
            ("route", "plain"),
            ("class", "cert-expired"),
            ("rule", "verified-only"),
        ],
    );
    let fallback = field(line, "fallback").unwrap_or_default();
    assert!(
        fallback.starts_with("cert-expired: certificate expired"),
        "{line}"
    );
}

const MIN_TLS_13: &str = r#"
    rules:
      - name: modern
        match: { domains: [example.test] }
        min_tls: "1.3"
"#;

#[tokio::test]
async fn min_tls_1_3_gets_tls_1_3_from_a_modern_server() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (lab, mx) = one_mx_ruled(
        &ca,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
        MIN_TLS_13,
    )
    .await;

    let sent = send(lab.smtp, &["b@example.test"]).await;

    assert_delivered(&sent);
    let got = mx.messages();
    assert_eq!(got[0].data, BODY);
    assert_eq!(got[0].tls.as_ref().expect("over TLS").version, "TLSv1.3");
    assert_fields(
        &logs.transaction_events()[0],
        &[
            ("route", "tls"),
            ("tls_version", "TLSv1.3"),
            ("verify", "verified"),
            ("class", "tls-verified"),
            ("rule", "modern"),
        ],
    );
}

fn tls12_only(ca: &TestCa) -> ServerBehaviour {
    ServerBehaviour {
        starttls: StartTls::Tls12Only(ca.leaf(&["mx.example.test"], Validity::Current)),
        ..ServerBehaviour::default()
    }
}

#[tokio::test]
async fn min_tls_1_3_toward_a_tls_1_2_only_server_falls_back_to_plain_when_the_rule_allows_it() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (lab, mx) = one_mx_ruled(&ca, tls12_only(&ca), MIN_TLS_13).await;

    let sent = send(lab.smtp, &["b@example.test"]).await;

    assert_delivered(&sent);
    let got = mx.messages();
    assert_eq!(got[0].data, BODY);
    assert!(got[0].tls.is_none());
    assert_eq!(mx.tls_handshakes_attempted(), 1);
    assert_eq!(mx.connections(), 2, "the failed handshake, then plain");
    let line = &logs.transaction_events()[0];
    assert_fields(line, &[("route", "plain"), ("rule", "modern")]);
    assert!(field(line, "fallback").is_some(), "{line}");
}

#[tokio::test]
async fn min_tls_1_3_with_tls_require_defers_a_tls_1_2_only_server() {
    let ca = TestCa::new();
    let rules = format!("{}    tls: require\n", dedent(MIN_TLS_13));
    let (lab, mx) = one_mx_ruled(&ca, tls12_only(&ca), &rules).await;

    let sent = send(lab.smtp, &["b@example.test"]).await;

    assert_deferred_for_tls(&sent, &["rule \"modern\"", "mx.example.test[127.0.0.1]"]);
    assert!(mx.messages().is_empty());
    assert_eq!(mx.connections(), 1, "no plain connection");
}

#[tokio::test]
async fn a_tls_1_2_only_server_deferred_under_min_tls_1_3_is_told_as_below_the_minimum_not_as_tls_1_0()
 {
    let ca = TestCa::new();
    let rules = format!("{}    tls: require\n", dedent(MIN_TLS_13));
    let (lab, _mx) = one_mx_ruled(&ca, tls12_only(&ca), &rules).await;

    let sent = send(lab.smtp, &["b@example.test"]).await;

    assert_deferred_for_tls(&sent, &["rule \"modern\"", "TLS 1.3"]);
    let text = sent.rcpts[0].text();
    assert!(
        !text.contains("1.0/1.1"),
        "the server speaks TLS 1.2: {text}"
    );
}

#[tokio::test]
async fn a_tls_1_2_server_refused_under_min_tls_1_3_still_gets_tls_1_2_for_a_domain_whose_rule_allows_it()
 {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let mx = server(loopback(1), 0, tls12_only(&ca)).await;
    // Two domains share one MX host; only modern.test asks for TLS 1.3.
    let zone = TestZone::new()
        .mx("modern.test", 10, "mx.example.test")
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", loopback(1));
    let rules = r#"
        rules:
          - name: modern
            match: { domains: [modern.test] }
            min_tls: "1.3"
          - name: default
            match: { domains: ["*"] }
    "#;
    let lab = start_lab(zone, &ca, mx.addr().port(), rules).await;

    assert_delivered(&send(lab.smtp, &["u@modern.test"]).await);
    assert_delivered(&send(lab.smtp, &["u@example.test"]).await);

    let got = mx.messages();
    assert!(got[0].tls.is_none(), "TLS 1.2 is below modern's minimum");
    assert_eq!(
        got[1].tls.as_ref().map(|t| t.version.as_str()),
        Some("TLSv1.2"),
        "the default rule accepts TLS 1.2; the host does it: {}",
        logs.transaction_events()[1]
    );
}

// ---------------------------------------------------------------------------------------
// The fallback relay (the IIS "plain-TCP server")

/// Three partners with one MX each on the same port: a TLS 1.0-only one, one without
/// STARTTLS, and a modern one listed to "always redirect"; a relay for the plain path.
struct RelayLab {
    lab: Lab,
    legacy: SmtpServer,
    no_tls: SmtpServer,
    modern: SmtpServer,
    relay: SmtpServer,
    _logs_guard: tracing::subscriber::DefaultGuard,
    logs: Logs,
}

async fn relay_lab() -> RelayLab {
    let (logs, guard) = Logs::capture();
    let ca = TestCa::new();
    let [legacy, no_tls, modern] = servers_on_one_port([
        (loopback(2), &|| {
            tls10_only(ca.leaf(&["mx.legacy.test"], Validity::Current))
        }),
        (loopback(3), &ServerBehaviour::default),
        (loopback(4), &|| {
            starttls(ca.leaf(&["mx.modern.test"], Validity::Current))
        }),
    ])
    .await;
    let port = legacy.addr().port();
    let relay = server(
        loopback(1),
        0,
        ServerBehaviour {
            greeting: "220 relay.test plain-TCP relay".into(),
            ..ServerBehaviour::default()
        },
    )
    .await;
    let zone = TestZone::new()
        .mx("legacy.test", 10, "mx.legacy.test")
        .a("mx.legacy.test", loopback(2))
        .mx("notls.test", 10, "mx.notls.test")
        .a("mx.notls.test", loopback(3))
        .mx("modern.test", 10, "mx.modern.test")
        .a("mx.modern.test", loopback(4));
    let relay_at = relay.addr();
    let rules = format!(
        r#"
            rules:
              - name: always-redirect
                match: {{ domains: [modern.test] }}
                tls: never
                fallback: {{ relay: "{relay_at}" }}
              - name: redirect-without-tls
                match: {{ domains: ["*"] }}
                fallback: {{ relay: "{relay_at}" }}
                legacy_tls: plain
        "#
    );
    let lab = start_lab(zone, &ca, port, &rules).await;
    RelayLab {
        lab,
        legacy,
        no_tls,
        modern,
        relay,
        _logs_guard: guard,
        logs,
    }
}

/// The message arrived at the relay, byte for byte, in plain; the MX got none.
fn assert_relayed(relay: &SmtpServer, mx: &SmtpServer, rcpt: &str) {
    let got = relay.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, BODY);
    assert_eq!(got[0].mail_from, "a@sender.test");
    assert_eq!(got[0].rcpt_to, vec![rcpt]);
    assert!(got[0].tls.is_none());
    assert!(mx.messages().is_empty(), "nothing at the MX");
}

#[tokio::test]
async fn a_tls_1_0_only_mx_has_its_mail_redirected_to_the_fallback_relay() {
    let l = relay_lab().await;

    let sent = send(l.lab.smtp, &["u@legacy.test"]).await;

    assert_delivered(&sent);
    assert_relayed(&l.relay, &l.legacy, "u@legacy.test");
    assert_eq!(
        l.legacy.tls_handshakes_attempted(),
        1,
        "TLS was tried first"
    );
    let line = &l.logs.transaction_events()[0];
    let relay = l.relay.addr().to_string();
    assert_fields(
        line,
        &[
            ("route", "plain"),
            ("class", "legacy-tls"),
            ("rule", "redirect-without-tls"),
            // The MX it was meant for, and the relay it went through instead.
            ("mx", "mx.legacy.test"),
            ("relay", &relay),
        ],
    );
    let next_hop = field(line, "next_hop").unwrap_or_default();
    assert!(next_hop.starts_with("mx.legacy.test["), "{line}");
}

#[tokio::test]
async fn an_mx_without_starttls_has_its_mail_redirected_to_the_fallback_relay() {
    let l = relay_lab().await;

    let sent = send(l.lab.smtp, &["u@notls.test"]).await;

    assert_delivered(&sent);
    assert_relayed(&l.relay, &l.no_tls, "u@notls.test");
    assert_fields(
        &l.logs.transaction_events()[0],
        &[
            ("route", "plain"),
            ("class", "no-starttls"),
            ("rule", "redirect-without-tls"),
        ],
    );
}

#[tokio::test]
async fn tls_never_with_a_relay_always_redirects_without_touching_the_mx() {
    let l = relay_lab().await;

    let sent = send(l.lab.smtp, &["u@modern.test"]).await;

    assert_delivered(&sent);
    assert_relayed(&l.relay, &l.modern, "u@modern.test");
    assert_eq!(l.modern.connections(), 0, "the MX is never contacted");
    assert_fields(
        &l.logs.transaction_events()[0],
        &[
            ("route", "plain"),
            ("class", "tls-never"),
            ("rule", "always-redirect"),
        ],
    );
}

/// partner.test's only MX, mx1.oldhost.test, speaks TLS 1.0 only; a plain relay of ours
/// beside it; the zone that says so.
async fn old_server_and_relay(ca: &TestCa) -> (SmtpServer, SmtpServer, TestZone) {
    let mx = server(
        loopback(2),
        0,
        tls10_only(ca.leaf(&["mx1.oldhost.test"], Validity::Current)),
    )
    .await;
    let relay = server(loopback(1), 0, ServerBehaviour::default()).await;
    let zone = TestZone::new()
        .mx("partner.test", 10, "mx1.oldhost.test")
        .a("mx1.oldhost.test", loopback(2));
    (mx, relay, zone)
}

#[tokio::test]
async fn an_mx_host_cached_as_legacy_tls_is_sent_through_the_relay_by_an_outcome_rule() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (mx, relay, zone) = old_server_and_relay(&ca).await;
    let rules = format!(
        r#"
            rules:
              - name: old-exchange
                match: {{ mx: ["*.oldhost.test"], outcome: [legacy-tls] }}
                fallback: {{ relay: "{}" }}
                legacy_tls: plain
              - name: default
                match: {{ domains: ["*"] }}
                legacy_tls: plain
        "#,
        relay.addr()
    );
    let lab = start_lab(zone, &ca, mx.addr().port(), &rules).await;

    // Nothing is known of the host yet: the default rule, plain to the MX itself.
    assert_delivered(&send(lab.smtp, &["u@partner.test"]).await);
    assert_eq!(mx.messages().len(), 1);
    assert!(relay.messages().is_empty());
    // Now the cache says legacy-tls: the outcome rule decides, through the relay.
    assert_delivered(&send(lab.smtp, &["u@partner.test"]).await);

    assert_eq!(
        mx.messages().len(),
        1,
        "the second message is not at the MX"
    );
    let got = relay.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, BODY);
    assert_eq!(got[0].rcpt_to, vec!["u@partner.test"]);
    assert_eq!(mx.tls_handshakes_attempted(), 1);
    let lines = logs.transaction_events();
    assert_fields(
        &lines[0],
        &[
            ("rule", "default"),
            ("route", "plain"),
            ("class", "legacy-tls"),
        ],
    );
    assert_fields(
        &lines[1],
        &[
            ("rule", "old-exchange"),
            ("route", "plain"),
            ("class", "legacy-tls"),
            ("cached", "yes"),
        ],
    );
}

/// The README's old-exchange rule, under the default rule as shipped (the legacy stack
/// on): the first message reaches the old server over TLS 1.0, the next ones, matched by
/// their cached outcome, go plain through the relay, as the rule's comment says.
#[cfg(feature = "legacy-tls")]
#[tokio::test]
async fn the_readmes_old_exchange_rule_sends_an_old_server_s_mail_through_its_relay() {
    let ca = TestCa::new();
    let (mx, relay, zone) = old_server_and_relay(&ca).await;
    let rules = format!(
        r#"
            rules:
              - name: old-exchange
                match: {{ mx: ["*.oldhost.test"], outcome: [legacy-tls] }}
                legacy_tls: plain
                fallback: {{ relay: "{}" }}
              - name: default
                match: {{ domains: ["*"] }}
        "#,
        relay.addr()
    );
    let lab = start_lab(zone, &ca, mx.addr().port(), &rules).await;

    assert_delivered(&send(lab.smtp, &["u@partner.test"]).await);
    let first = mx.messages();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].tls.as_ref().expect("TLS 1.0").version, "TLSv1.0");
    for _ in 0..2 {
        assert_delivered(&send(lab.smtp, &["u@partner.test"]).await);
    }
    assert_eq!(mx.messages().len(), 1, "no later message at the old server");
    assert_eq!(
        relay.messages().len(),
        2,
        "the later ones through the relay"
    );
}

// ---------------------------------------------------------------------------------------
// Smart hosts

const USER: &str = "crm-mailer";
const PASSWORD: &str = "Tr0ub4dor&3-never-in-a-log";

/// A smart host that wants AUTH with [`USER`] and [`PASSWORD`].
fn smarthost(tls: StartTls, implicit: Option<CertKey>) -> ServerBehaviour {
    ServerBehaviour {
        starttls: tls,
        implicit_tls: implicit,
        greeting: "220 smarthost.test ESMTP".into(),
        ehlo_extra: vec!["AUTH PLAIN LOGIN".into()],
        auth_credentials: Some((USER.into(), PASSWORD.into())),
        ..ServerBehaviour::default()
    }
}

/// example.test's MX (never to be contacted), a smart host on its own port, and a rule that
/// sends crm.test's mail through the smart host with credentials from files.
async fn smarthost_lab(
    ca: &TestCa,
    behaviour: ServerBehaviour,
    route_tls: &str,
    password: &str,
) -> (Lab, SmtpServer, SmtpServer) {
    smarthost_lab_with_mode(ca, behaviour, route_tls, password, 0o600).await
}

/// The same, with the password file's permissions `mode`.
async fn smarthost_lab_with_mode(
    ca: &TestCa,
    behaviour: ServerBehaviour,
    route_tls: &str,
    password: &str,
    mode: u32,
) -> (Lab, SmtpServer, SmtpServer) {
    let mx = server(
        loopback(2),
        0,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
    )
    .await;
    let host = server(loopback(1), 0, behaviour).await;
    let zone = TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", loopback(2))
        .a("smarthost.test", loopback(1));
    let port = host.addr().port();
    // The rule file names credentials files in the lab's own directory.
    let builder = Lab::new().ca(ca).zone(zone).mx_port(mx.addr().port());
    let user_file = credential(builder.dir(), "crm.user", USER, 0o600);
    let password_file = credential(builder.dir(), "crm.pass", password, mode);
    let rules = format!(
        r#"
        rules:
          - name: crm-via-smarthost
            match: {{ senders: [crm.test] }}
            route: {{ smarthost: "smarthost.test:{port}", tls: {route_tls},
                      auth: {{ username_file: "{}", password_file: "{}" }} }}
          - name: default
            match: {{ domains: ["*"] }}
        "#,
        user_file.display(),
        password_file.display()
    );
    let lab = builder.rules(&rules).start().await;
    (lab, mx, host)
}

/// A credentials file with permissions `mode` (0o600: its owner only).
fn credential(dir: &Path, name: &str, value: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).expect("write credential");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    #[cfg(not(unix))]
    let _ = mode;
    path
}

/// Nothing in the log gives the password away, in clear or in base64.
fn assert_no_secret(log: &str) {
    let plain_token = BASE64.encode(format!("\0{USER}\0{PASSWORD}"));
    for secret in [PASSWORD.to_string(), plain_token, BASE64.encode(PASSWORD)] {
        assert!(!log.contains(&secret), "{secret:?} in the log:\n{log}");
    }
}

#[tokio::test]
async fn a_sender_domain_routed_to_a_smarthost_authenticates_over_starttls_and_skips_the_mx() {
    let (logs, _guard) = capture_debug();
    let ca = TestCa::new();
    let behaviour = smarthost(
        StartTls::Rustls(ca.leaf(&["smarthost.test"], Validity::Current)),
        None,
    );
    let (lab, mx, host) = smarthost_lab(&ca, behaviour, "require", PASSWORD).await;

    let sent = send_from(lab.smtp, "report@crm.test", &["b@example.test"]).await;

    assert_delivered(&sent);
    let got = host.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, BODY);
    assert_eq!(got[0].mail_from, "report@crm.test");
    assert_eq!(got[0].rcpt_to, vec!["b@example.test"]);
    assert!(got[0].tls.is_some(), "AUTH and message inside STARTTLS");
    let token = BASE64.encode(format!("\0{USER}\0{PASSWORD}"));
    assert_eq!(got[0].auth, vec![format!("AUTH PLAIN {token}")]);
    assert_eq!(mx.connections(), 0, "the recipient's MX is not contacted");
    let log = logs.text();
    assert!(
        log.contains("AUTH PLAIN ****"),
        "the dialogue is logged at debug level, the secret masked:\n{log}"
    );
    assert_no_secret(&log);
    assert_fields(
        &logs.transaction_events()[0],
        &[
            ("mx", "smarthost.test"),
            ("route", "tls"),
            ("verify", "verified"),
            ("rule", "crm-via-smarthost"),
        ],
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_password_file_others_can_read_is_warned_about_by_name_and_still_used() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let behaviour = smarthost(
        StartTls::Rustls(ca.leaf(&["smarthost.test"], Validity::Current)),
        None,
    );
    let (lab, _mx, host) =
        smarthost_lab_with_mode(&ca, behaviour, "require", PASSWORD, 0o644).await;

    assert_delivered(&send_from(lab.smtp, "report@crm.test", &["b@example.test"]).await);

    assert_eq!(host.messages().len(), 1);
    let warned = logs.events_with(&[("event", "credentials.readable")]);
    assert!(!warned.is_empty(), "{}", logs.text());
    assert_fields(&warned[0], &[("level", "WARN"), ("mode", "644")]);
    let files: Vec<String> = warned.iter().filter_map(|w| field(w, "file")).collect();
    assert!(
        files.iter().all(|f| f.ends_with("crm.pass")),
        "the username file is 0600: {files:?}"
    );
    assert_no_secret(&logs.text());
}

#[tokio::test]
async fn mail_from_other_senders_still_goes_to_the_recipients_mx() {
    let ca = TestCa::new();
    let behaviour = smarthost(
        StartTls::Rustls(ca.leaf(&["smarthost.test"], Validity::Current)),
        None,
    );
    let (lab, mx, host) = smarthost_lab(&ca, behaviour, "require", PASSWORD).await;

    assert_delivered(&send_from(lab.smtp, "a@sender.test", &["b@example.test"]).await);

    assert_eq!(mx.messages().len(), 1);
    assert_eq!(host.connections(), 0);
}

#[tokio::test]
async fn a_smarthost_with_implicit_tls_gets_auth_and_the_message_inside_tls() {
    let (logs, _guard) = capture_debug();
    let ca = TestCa::new();
    let behaviour = smarthost(
        StartTls::NotOffered,
        Some(ca.leaf(&["smarthost.test"], Validity::Current)),
    );
    let (lab, mx, host) = smarthost_lab(&ca, behaviour, "wrapper", PASSWORD).await;

    let sent = send_from(lab.smtp, "report@crm.test", &["b@example.test"]).await;

    assert_delivered(&sent);
    let got = host.messages();
    assert_eq!(got[0].data, BODY);
    assert!(got[0].tls.is_some(), "implicit TLS from the first byte");
    let token = BASE64.encode(format!("\0{USER}\0{PASSWORD}"));
    assert_eq!(got[0].auth, vec![format!("AUTH PLAIN {token}")]);
    assert_eq!(
        host.tls_handshakes_attempted(),
        0,
        "no STARTTLS: TLS already"
    );
    assert_eq!(mx.connections(), 0);
    assert_no_secret(&logs.text());
    assert_fields(
        &logs.transaction_events()[0],
        &[
            ("mx", "smarthost.test"),
            ("route", "tls"),
            ("rule", "crm-via-smarthost"),
        ],
    );
}

#[tokio::test]
async fn a_smarthost_without_starttls_under_tls_require_defers_and_never_sees_the_password() {
    let (logs, _guard) = capture_debug();
    let ca = TestCa::new();
    let (lab, mx, host) = smarthost_lab(
        &ca,
        smarthost(StartTls::NotOffered, None),
        "require",
        PASSWORD,
    )
    .await;

    let sent = send_from(lab.smtp, "report@crm.test", &["b@example.test"]).await;

    assert_deferred_for_tls(
        &sent,
        &[
            "rule \"crm-via-smarthost\"",
            "smarthost.test",
            "no STARTTLS",
        ],
    );
    assert!(host.messages().is_empty());
    assert!(host.auth_lines().is_empty(), "no AUTH in plain");
    assert_eq!(mx.connections(), 0);
    assert_no_secret(&logs.text());
}

#[tokio::test]
async fn a_tls_1_0_only_smarthost_with_auth_never_gets_the_legacy_stack_nor_the_password() {
    let (logs, _guard) = capture_debug();
    let ca = TestCa::new();
    let behaviour = smarthost(
        StartTls::Tls10Only(ca.leaf(&["smarthost.test"], Validity::Current)),
        None,
    );
    // A rule with AUTH always verifies (verify: try is refused), so the legacy stack, which
    // authenticates nothing, is never chosen for it.
    let (lab, mx, host) = smarthost_lab(&ca, behaviour, "require", PASSWORD).await;

    let sent = send_from(lab.smtp, "report@crm.test", &["b@example.test"]).await;

    assert_deferred_for_tls(&sent, &["rule \"crm-via-smarthost\"", "smarthost.test"]);
    assert_eq!(
        host.tls_handshakes_attempted(),
        1,
        "rustls only, no legacy stack"
    );
    assert!(host.messages().is_empty());
    assert!(host.auth_lines().is_empty(), "no AUTH without verified TLS");
    assert_eq!(mx.connections(), 0);
    assert_no_secret(&logs.text());
}

#[tokio::test]
async fn a_smarthost_refusing_the_credentials_defers_the_message_without_leaking_them() {
    let (logs, _guard) = capture_debug();
    let ca = TestCa::new();
    let behaviour = smarthost(
        StartTls::Rustls(ca.leaf(&["smarthost.test"], Validity::Current)),
        None,
    );
    let wrong = "an-old-password";
    let (lab, _mx, host) = smarthost_lab(&ca, behaviour, "require", wrong).await;

    let sent = send_from(lab.smtp, "report@crm.test", &["b@example.test"]).await;

    assert_reply(&sent.rcpts[0], 451, "4.7.0", &["refused AUTH", "535"]);
    assert!(host.messages().is_empty());
    assert_eq!(host.auth_lines().len(), 1, "one AUTH attempt");
    let log = logs.text();
    assert!(!log.contains(wrong), "the password in the log:\n{log}");
}

#[tokio::test]
async fn a_smarthost_offering_only_auth_login_gets_username_and_password_in_base64_inside_tls() {
    let (logs, _guard) = capture_debug();
    let ca = TestCa::new();
    let behaviour = ServerBehaviour {
        ehlo_extra: vec!["AUTH LOGIN".into()],
        ..smarthost(
            StartTls::Rustls(ca.leaf(&["smarthost.test"], Validity::Current)),
            None,
        )
    };
    let (lab, mx, host) = smarthost_lab(&ca, behaviour, "require", PASSWORD).await;

    let sent = send_from(lab.smtp, "report@crm.test", &["b@example.test"]).await;

    assert_delivered(&sent);
    let got = host.messages();
    assert!(got[0].tls.is_some(), "AUTH and message inside STARTTLS");
    assert_eq!(
        got[0].auth,
        vec![
            "AUTH LOGIN".to_string(),
            BASE64.encode(USER),
            BASE64.encode(PASSWORD)
        ],
        "the answers to the server's Username: and Password: prompts"
    );
    assert_eq!(got[0].data, BODY);
    assert_eq!(mx.connections(), 0);
    let log = logs.text();
    assert!(
        log.contains("(username)") && log.contains("(password)"),
        "the dialogue is logged, the answers masked:\n{log}"
    );
    assert_no_secret(&log);
}

#[tokio::test(flavor = "multi_thread")]
async fn smarthost_credentials_from_the_daemons_environment_are_sent_inside_tls() {
    let ca = TestCa::new();
    let host = server(
        loopback(1),
        0,
        smarthost(
            StartTls::Rustls(ca.leaf(&["smarthost.test"], Validity::Current)),
            None,
        ),
    )
    .await;
    let zone = TestZone::new().a("smarthost.test", loopback(1));
    let rules = format!(
        r#"
            rules:
              - name: crm-via-smarthost
                match: {{ senders: [crm.test] }}
                route: {{ smarthost: "smarthost.test:{}", tls: require,
                          auth: {{ username_env: CRM_SMARTHOST_USER, password_env: CRM_SMARTHOST_PASSWORD }} }}
        "#,
        host.addr().port()
    );
    let env = [
        ("CRM_SMARTHOST_USER", USER),
        ("CRM_SMARTHOST_PASSWORD", PASSWORD),
    ];
    let mut lab = start_daemon_lab(zone, &ca, 9, &rules, &env).await;

    let sent = send_from(lab.daemon.smtp, "report@crm.test", &["b@example.test"]).await;

    assert_delivered(&sent);
    let got = host.messages();
    assert!(got[0].tls.is_some(), "AUTH and message inside STARTTLS");
    let token = BASE64.encode(format!("\0{USER}\0{PASSWORD}"));
    assert_eq!(got[0].auth, vec![format!("AUTH PLAIN {token}")]);
    let logged = lab.daemon.wait_for_transaction().await;
    assert_eq!(logged["rule"], "crm-via-smarthost", "{logged}");
    assert_eq!(logged["verify"], "verified", "{logged}");
    assert_no_secret(&lab.daemon.log_text());
}

// ---------------------------------------------------------------------------------------
// The outcome cache

// ---------------------------------------------------------------------------------------
// Downgrades

// ---------------------------------------------------------------------------------------
// The cache file

// ---------------------------------------------------------------------------------------
// Reloading the rules

/// A rule file of one rule, as a file holds it.
fn one_rule(name: &str, domain: &str, tls: &str) -> String {
    dedent(&format!(
        r#"
        rules:
          - name: {name}
            match: {{ domains: [{domain}] }}
            tls: {tls}
        "#
    ))
}

#[tokio::test]
async fn a_reload_changes_new_transactions_but_not_the_one_in_flight() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (lab, mx) = one_mx_ruled(
        &ca,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
        &one_rule("before", "example.test", "never"),
    )
    .await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    client.cmd("EHLO mta.sender.test").await;
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    assert_eq!(mx.connections(), 1, "the remote transaction is open");

    lab.write_rules(&one_rule("after", "example.test", "require"));
    assert_eq!(lab.proxy.reload_rules("test").expect("reload"), 1);

    assert_reply(&client.data(BODY).await, 250, "2.0.0", &[]);
    let in_flight = transaction(&mut client, "a@sender.test", &["b@example.test"]).await;
    assert_delivered(&in_flight);

    let got = mx.messages();
    assert_eq!(got.len(), 2);
    assert!(got[0].tls.is_none(), "in flight: the old rule, tls: never");
    assert!(got[1].tls.is_some(), "next: the new rule, tls: require");
    let lines = logs.transaction_events();
    assert_fields(&lines[0], &[("rule", "before"), ("route", "plain")]);
    assert_fields(&lines[1], &[("rule", "after"), ("route", "tls")]);
    let reloads = logs.events_with(&[("event", "rules.reloaded"), ("why", "test")]);
    assert_eq!(reloads.len(), 1);
}

#[tokio::test]
async fn a_recipient_added_after_a_reload_joins_the_transaction_in_flight_under_its_rules() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (lab, mx) = one_mx_ruled(
        &ca,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
        &one_rule("before", "example.test", "never"),
    )
    .await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    client.cmd("EHLO mta.sender.test").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);

    lab.write_rules(&one_rule("after", "example.test", "require"));
    lab.proxy.reload_rules("test").expect("reload");
    let second = client.cmd("RCPT TO:<c@example.test>").await;

    assert_eq!(second.code, 250, "{second:?}");
    assert_reply(&client.data(BODY).await, 250, "2.0.0", &[]);
    let got = mx.messages();
    assert_eq!(got[0].rcpt_to, vec!["b@example.test", "c@example.test"]);
    assert!(got[0].tls.is_none());
    assert_fields(&logs.transaction_events()[0], &[("rule", "before")]);
}

#[tokio::test]
async fn an_invalid_rule_file_is_refused_on_reload_with_its_position_and_the_old_rules_stay() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let (lab, mx) = one_mx_ruled(
        &ca,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
        &one_rule("partner-without-tls", "example.test", "never"),
    )
    .await;

    lab.write_rules(
        r#"
        rules:
          - name: partner-without-tls
            tls: sometimes
    "#,
    );
    let error = lab
        .proxy
        .reload_rules("test")
        .expect_err("an invalid file")
        .to_string();

    let prefix = format!("{}:3:", lab.rules_file().display());
    assert!(
        error.starts_with(&prefix),
        "{error} should start with {prefix}"
    );
    let column = error[prefix.len()..].split(':').next().unwrap_or("");
    assert!(
        column.parse::<u32>().is_ok_and(|c| c > 0),
        "a column in {error}"
    );
    assert!(error.contains("sometimes"), "{error}");
    let refused = logs.events_with(&[("event", "rules.not_reloaded"), ("why", "test")]);
    assert_eq!(refused.len(), 1, "{}", logs.text());
    let file = lab.rules_file().display().to_string();
    assert_fields(
        &refused[0],
        &[("level", "ERROR"), ("file", &file), ("line", "3")],
    );

    assert_delivered(&send(lab.smtp, &["b@example.test"]).await);
    assert!(
        mx.messages()[0].tls.is_none(),
        "tls: never is still in force"
    );
    assert_eq!(mx.tls_handshakes_attempted(), 0);
    assert_fields(
        &logs.transaction_events()[0],
        &[("rule", "partner-without-tls")],
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn sighup_makes_the_running_daemon_take_the_rewritten_rule_file() {
    let ca = TestCa::new();
    let before = one_rule("before", "example.test", "never");
    let mut lab = start_daemon_lab(TestZone::new(), &ca, 9, &before, &[]).await;
    assert_eq!(lab.daemon.rule_names().await, ["before"]);

    replace_file(
        lab.rules_file(),
        &one_rule("after", "example.test", "require"),
    );
    lab.daemon.signal("HUP");

    (lab.daemon)
        .wait_for_event(&[("event", "rules.reloaded"), ("why", "SIGHUP")])
        .await;
    assert_eq!(lab.daemon.rule_names().await, ["after"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_running_daemon_takes_a_rule_file_changed_on_disk_without_being_told() {
    let ca = TestCa::new();
    let before = one_rule("before", "example.test", "never");
    let mut lab = start_daemon_lab(TestZone::new(), &ca, 9, &before, &[]).await;

    replace_file(
        lab.rules_file(),
        &one_rule("after", "example.test", "require"),
    );

    lab.daemon
        .wait_for_event(&[("event", "rules.reloaded"), ("why", "file changed")])
        .await;
    assert_eq!(lab.daemon.rule_names().await, ["after"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_rule_file_written_mid_transaction_is_logged_with_its_position_and_the_old_rules_stay()
 {
    let ca = TestCa::new();
    let mx = server(
        loopback(1),
        0,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
    )
    .await;
    let zone = TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", loopback(1));
    let before = one_rule("partner-without-tls", "example.test", "never");
    let mut lab = start_daemon_lab(zone, &ca, mx.addr().port(), &before, &[]).await;
    let (mut client, _) = SmtpClient::connect(lab.daemon.smtp).await;
    client.cmd("EHLO mta.sender.test").await;
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    assert_eq!(mx.connections(), 1, "the remote transaction is open");

    replace_file(
        lab.rules_file(),
        &dedent(
            r#"
                rules:
                  - name: after
                    match: { domains: [example.test] }
                    tls: sometimes
            "#,
        ),
    );

    let refused = lab
        .daemon
        .wait_for_event(&[("event", "rules.not_reloaded"), ("why", "file changed")])
        .await;
    assert_eq!(refused["level"], "ERROR", "{refused}");
    let file = lab.rules_file().display().to_string();
    assert_fields(&refused, &[("file", &file), ("line", "4")]);
    assert!(
        refused["column"].as_u64() > Some(0),
        "a column in {refused}"
    );
    let message = refused["message"].as_str().unwrap_or_default();
    let prefix = format!("{file}:4:");
    assert!(message.contains(&prefix), "{message} should name {prefix}");
    assert!(message.contains("sometimes"), "{message}");

    assert_reply(&client.data(BODY).await, 250, "2.0.0", &[]);
    let next = transaction(&mut client, "a@sender.test", &["b@example.test"]).await;
    assert_delivered(&next);
    let got = mx.messages();
    assert_eq!(got.len(), 2);
    assert!(
        got.iter().all(|m| m.tls.is_none()),
        "tls: never still in force, in flight and after"
    );
    assert_eq!(mx.tls_handshakes_attempted(), 0);
    assert_eq!(lab.daemon.rule_names().await, ["partner-without-tls"]);
}

// ---------------------------------------------------------------------------------------
// The tlsrouter command: check and explain

/// Runs `tlsrouter ARGS`; returns the exit status, stdout and stderr.
fn tlsrouter(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run tlsrouter");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tlsrouter_check_accepts_every_shipped_rule_file() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("rules/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        let (code, out, err) = tlsrouter(&["check", &file.display().to_string()]);
        assert_eq!(code, 0, "{}: {err}", file.display());
        assert!(out.contains("OK"), "{out}");
    }
}

#[test]
fn tlsrouter_check_reports_a_broken_file_with_file_line_column_and_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        dedent(
            r#"
                rules:
                  - name: ok
                    tls: never
                  - name: bad
                    match: { domains: ["a..b"] }
            "#,
        ),
    )
    .expect("write");

    let (code, _, err) = tlsrouter(&["check", &file.display().to_string()]);

    assert_eq!(code, 64, "{err}");
    let prefix = format!("{}:5:", file.display());
    assert!(err.starts_with(&prefix), "{err} should start with {prefix}");
    let column = err[prefix.len()..].split(':').next().unwrap_or("");
    assert!(column.parse::<u32>().is_ok(), "a column in {err}");
}

#[test]
fn tlsrouter_check_names_a_shadowed_rule_and_the_rule_that_shadows_it_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("shadowed.yaml");
    std::fs::write(
        &file,
        dedent(
            r#"
                rules:
                  - name: all-banks
                    match: { domains: ["*.bank.example"] }
                    tls: require
                  - name: one-bank
                    match: { domains: [a.bank.example] }
                    tls: never
            "#,
        ),
    )
    .expect("write");

    let (code, _, err) = tlsrouter(&["check", &file.display().to_string()]);

    assert_eq!(code, 1, "{err}");
    assert!(err.contains("\"one-bank\""), "{err}");
    assert!(err.contains("\"all-banks\""), "{err}");
    assert!(err.contains(&format!("{}:5:", file.display())), "{err}");
}

#[test]
fn tlsrouter_check_reports_a_rule_behind_a_catch_all_at_its_own_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("indented.yaml");
    // Indented by four spaces: the rule's name starts at column 7.
    std::fs::write(
        &file,
        dedent(
            r#"
                rules:
                    - name: default
                      match: { domains: ["*"] }
                    - name: crm
                      match: { senders: [crm.example] }
                      tls: require
            "#,
        ),
    )
    .expect("write");

    let (code, _, err) = tlsrouter(&["check", &file.display().to_string()]);

    assert_eq!(code, 1, "{err}");
    let expected = format!(
        "{}:4:7: rule \"crm\" can never match: rule \"default\" (line 2)",
        file.display()
    );
    assert!(
        err.starts_with(&expected),
        "{err} should start with {expected}"
    );
}

#[test]
fn tlsrouter_explain_names_the_exceptions_rule_for_a_listed_partner_of_the_strict_rules() {
    let (code, out, err) = tlsrouter(&[
        "explain",
        "--rules",
        "rules/strict.yaml",
        "--rcpt",
        "u@legacy-partner.example",
    ]);

    assert_eq!(code, 0, "{err}");
    let rule_line = out
        .lines()
        .find(|l| l.starts_with("rule:"))
        .unwrap_or_else(|| panic!("no rule line in {out}"));
    assert!(rule_line.contains("\"exceptions\""), "{out}");
    assert!(rule_line.contains("rules/strict.yaml:"), "{out}");

    let (_, other, _) = tlsrouter(&[
        "explain",
        "--rules",
        "rules/strict.yaml",
        "--rcpt",
        "u@anyone.example",
    ]);
    assert!(other.contains("\"strict\""), "{other}");
    assert!(other.contains("451 4.7.5"), "{other}");
}

#[test]
fn tlsrouter_explain_picks_the_rule_for_the_given_sender_mx_host_and_cached_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules.yaml");
    std::fs::write(
        &file,
        dedent(
            r#"
                rules:
                  - name: crm-mail
                    match: { senders: [crm.example] }
                    tls: require
                  - name: this-mx
                    match: { domains: ["*"], mx: [mx.partner.example] }
                    verify: require
                  - name: old-servers
                    match: { domains: ["*"], outcome: [legacy-tls] }
                    tls: never
                  - name: default
                    match: { domains: ["*"] }
            "#,
        ),
    )
    .expect("write");
    let rules = file.display().to_string();
    let rule_for = |extra: &[&str]| -> String {
        let mut args = vec!["explain", "--rules", &rules, "--rcpt", "u@partner.example"];
        args.extend_from_slice(extra);
        let (code, out, err) = tlsrouter(&args);
        assert_eq!(code, 0, "{extra:?}: {err}");
        let line = out
            .lines()
            .find(|l| l.starts_with("rule:"))
            .unwrap_or_else(|| panic!("no rule line in {out}"));
        line.split('"').nth(1).unwrap_or_default().to_string()
    };

    assert_eq!(rule_for(&[]), "default");
    assert_eq!(rule_for(&["--sender", "news@crm.example"]), "crm-mail");
    assert_eq!(rule_for(&["--sender", "news@other.example"]), "default");
    assert_eq!(rule_for(&["--mx", "mx.partner.example"]), "this-mx");
    assert_eq!(
        rule_for(&["--mx", "MX.Partner.Example."]),
        "this-mx",
        "an absolute name in any case is the same host"
    );
    assert_eq!(rule_for(&["--mx", "mx2.partner.example"]), "default");
    assert_eq!(rule_for(&["--outcome", "legacy-tls"]), "old-servers");
    assert_eq!(rule_for(&["--outcome", "no-starttls"]), "default");
    assert_eq!(
        rule_for(&["--mx", "mx.partner.example", "--outcome", "legacy-tls"]),
        "this-mx",
        "the first rule that holds wins"
    );
}
