//! The sender's REQUIRETLS (RFC 8689), end to end: offered to an MTA whose session is in
//! TLS and refused in plain; passed on only over verified TLS (DANE, or PKIX for an MX name
//! a DNSSEC-secure answer or an enforced MTA-STS policy vouches for) to a server that
//! offers REQUIRETLS, with REQUIRETLS on its MAIL FROM; refused for good with `550 5.7.30`
//! otherwise, whatever the rules allow.
//!
//! Real parts: the proxy in process, a real rustls client as the MTA (STARTTLS to the
//! proxy; Debian's Postfix is 3.7, and REQUIRETLS came with Postfix 3.11, so no Postfix
//! here can send it), a DNSSEC-signed tree (or an unsigned zone and a real HTTPS server serving the
//! MTA-STS policy), a real SMTP server with STARTTLS and certificates made here.

use std::net::{IpAddr, Ipv4Addr};

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::support::dns::TestZone;
use crate::support::dnssec::{SignedDns, SignedTree, Zone};
use crate::support::events::{assert_fields, field};
use crate::support::lab::Lab;
use crate::support::logs::Logs;
use crate::support::mta::{self, with_inbound_tls};
use crate::support::pki::{CertKey, TestCa, Validity, self_signed};
use crate::support::smtp_client::{Reply, SmtpClient};
use crate::support::smtp_server::{ServerBehaviour, SmtpServer, StartTls};
use crate::support::sts::enforcing_domain;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const MX: &str = "mx.secure.test";
const RCPT: &str = "b@secure.test";
const BODY: &[u8] = b"From: a@sender.test\r\nTo: b@secure.test\r\nSubject: sealed\r\n\r\nhello\r\n";
/// The most lenient rule there is: plain, no TLS tried.
const LENIENT: &str =
    "rules:\n  - name: anything-goes\n    match: { domains: [\"*\"] }\n    tls: never\n";

/// The remote MX: STARTTLS with `cert`, and REQUIRETLS offered or not.
fn remote(cert: CertKey, offers_requiretls: bool) -> ServerBehaviour {
    let behaviour = ServerBehaviour {
        starttls: StartTls::Rustls(cert),
        ..ServerBehaviour::default()
    };
    match offers_requiretls {
        true => behaviour.ehlo_keyword("REQUIRETLS"),
        false => behaviour,
    }
}

fn offers_requiretls(ehlo: &Reply) -> bool {
    ehlo.lines
        .iter()
        .any(|l| l.eq_ignore_ascii_case("REQUIRETLS"))
}

/// The MX with STARTTLS, a certificate for its name from `ca`, and REQUIRETLS.
async fn good_mx(ca: &TestCa) -> SmtpServer {
    let behaviour = remote(ca.leaf(&[MX], Validity::Current), true);
    SmtpServer::start(LOCALHOST, 0, behaviour)
        .await
        .expect("the MX")
}

/// secure.test's one MX, in a zone without DNSSEC.
fn unsigned_zone() -> TestZone {
    TestZone::new()
        .mx("secure.test", 10, MX)
        .a(MX, Ipv4Addr::LOCALHOST)
}

/// An MTA session with the proxy in TLS, REQUIRETLS offered.
async fn mta_in_tls(lab: &Lab, ca: &TestCa) -> SmtpClient<TlsStream<TcpStream>> {
    let (client, ehlo) = mta::mta_in_tls(lab, ca).await;
    assert!(
        offers_requiretls(&ehlo),
        "REQUIRETLS offered in TLS: {ehlo:?}"
    );
    client
}

/// What the MTA heard for one REQUIRETLS message to RCPT.
struct Sent {
    rcpt: Reply,
    message: Option<Reply>,
}

async fn send_requiretls(lab: &Lab, ca: &TestCa) -> Sent {
    let mut client = mta_in_tls(lab, ca).await;
    let mail = client.cmd("MAIL FROM:<a@sender.test> REQUIRETLS").await;
    assert_eq!(mail.code, 250, "{mail:?}");
    let rcpt = client.cmd(&format!("RCPT TO:<{RCPT}>")).await;
    let message = match rcpt.code {
        250 => Some(client.data(BODY).await),
        _ => None,
    };
    client.cmd("QUIT").await;
    Sent { rcpt, message }
}

fn assert_refused_for_good(sent: &Sent) {
    assert_eq!(
        (sent.rcpt.code, sent.rcpt.enhanced().as_deref()),
        (550, Some("5.7.30")),
        "{:?}",
        sent.rcpt
    );
    assert!(sent.message.is_none());
}

/// What the attempt found at the MX, as the cache keeps it.
fn cached_class(lab: &Lab) -> Option<&'static str> {
    let entry = lab.proxy.outbound.cache.get(MX, LOCALHOST)?;
    Some(entry.class.name())
}

/// The MAIL FROM lines the remote received.
fn remote_mail_froms(server: &SmtpServer) -> Vec<String> {
    (server.connection_logs().into_iter())
        .flat_map(|c| c.commands)
        .filter(|c| c.to_ascii_uppercase().starts_with("MAIL FROM"))
        .collect()
}

struct SignedLab {
    lab: Lab,
    server: SmtpServer,
    _dns: SignedDns,
}

/// secure.test's one MX, mx.secure.test, in the signed root zone; `tlsa(port)`: its TLSA
/// records (none: a secure denial, so PKIX judges its certificate).
async fn signed_lab(
    ca: &TestCa,
    behaviour: ServerBehaviour,
    tlsa: impl FnOnce(u16) -> Vec<((u8, u8, u8), Vec<u8>)>,
) -> SignedLab {
    let server = SmtpServer::start(LOCALHOST, 0, behaviour)
        .await
        .expect("the MX");
    let port = server.addr().port();
    let mut zone = Zone::new()
        .mx("secure.test", 10, MX)
        .a(MX, Ipv4Addr::LOCALHOST);
    for (fields, data) in tlsa(port) {
        zone = zone.tlsa(MX, port, fields, &data);
    }
    let dns = SignedDns::start(SignedTree::new(zone)).await;
    let lab = Lab::new()
        .ca(ca)
        .rules(LENIENT)
        .mx_port(port)
        .set("resolver.nameservers", vec![dns.addr.to_string()])
        .set_path("resolver.trust_anchor_file", &dns.trust_anchor_file);
    SignedLab {
        lab: with_inbound_tls(lab, ca).start().await,
        server,
        _dns: dns,
    }
}

#[tokio::test]
async fn requiretls_is_offered_and_taken_in_tls_only() {
    let ca = TestCa::new();
    let d = signed_lab(&ca, remote(ca.leaf(&[MX], Validity::Current), true), |_| {
        Vec::new()
    })
    .await;

    let (mut plain, _) = SmtpClient::connect(d.lab.smtp).await;
    let ehlo = plain.cmd("EHLO mta.sender.test").await;
    assert!(!offers_requiretls(&ehlo), "not offered in clear: {ehlo:?}");
    let mail = plain.cmd("MAIL FROM:<a@sender.test> REQUIRETLS").await;
    assert_eq!(
        (mail.code, mail.enhanced().as_deref()),
        (530, Some("5.7.10")),
        "{mail:?}"
    );
    plain.cmd("QUIT").await;

    let mut tls = mta_in_tls(&d.lab, &ca).await;
    let mail = tls.cmd("MAIL FROM:<a@sender.test> REQUIRETLS").await;
    assert_eq!(mail.code, 250, "{mail:?}");
    tls.cmd("QUIT").await;
    assert!(d.server.messages().is_empty());
}

#[tokio::test]
async fn requiretls_goes_to_a_dane_host_that_offers_it_with_requiretls_on_its_mail_from() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    // DANE-EE: the key alone authenticates, whatever the certificate's names.
    let cert = self_signed(&["someone-else.example"]);
    let digest = openssl::sha::sha256(&cert.chain[0]).to_vec();
    let d = signed_lab(&ca, remote(cert, true), |_| vec![((3, 0, 1), digest)]).await;

    let sent = send_requiretls(&d.lab, &ca).await;

    assert_eq!(sent.rcpt.code, 250, "{:?}", sent.rcpt);
    assert_eq!(sent.message.as_ref().map(|r| r.code), Some(250));
    let got = d.server.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, BODY);
    assert!(got[0].tls.is_some());
    assert_eq!(
        remote_mail_froms(&d.server),
        ["MAIL FROM:<a@sender.test> REQUIRETLS"]
    );
    assert_fields(
        &logs.transaction_events()[0],
        &[
            ("requiretls", "yes"),
            ("policy", "dane"),
            ("route", "tls"),
            ("verify", "verified"),
        ],
    );
    assert_eq!(d.lab.proxy.stats.snapshot().requiretls_delivered, 1);
}

#[tokio::test]
async fn requiretls_goes_to_a_host_an_enforced_mta_sts_policy_names_under_insecure_dns() {
    let ca = TestCa::new();
    let server = good_mx(&ca).await;
    let domain = enforcing_domain(&ca, "secure.test", MX).await;
    let lab = Lab::new()
        .ca(&ca)
        .rules(LENIENT)
        .mx_port(server.addr().port());
    let lab = with_inbound_tls(domain.in_lab(lab), &ca).start().await;

    let sent = send_requiretls(&lab, &ca).await;

    assert_eq!(sent.rcpt.code, 250, "{:?}", sent.rcpt);
    assert_eq!(sent.message.as_ref().map(|r| r.code), Some(250));
    assert_eq!(server.messages().len(), 1);
    assert_eq!(
        remote_mail_froms(&server),
        ["MAIL FROM:<a@sender.test> REQUIRETLS"]
    );
}

#[tokio::test]
async fn requiretls_is_refused_for_good_by_a_server_without_the_extension() {
    let ca = TestCa::new();
    let d = signed_lab(
        &ca,
        remote(ca.leaf(&[MX], Validity::Current), false),
        |_| Vec::new(),
    )
    .await;

    let sent = send_requiretls(&d.lab, &ca).await;

    assert_refused_for_good(&sent);
    assert!(remote_mail_froms(&d.server).is_empty(), "no MAIL FROM sent");
    assert!(d.server.messages().is_empty());
    assert_eq!(d.lab.proxy.stats.snapshot().requiretls_refused, 1);
}

#[tokio::test]
async fn requiretls_is_refused_for_good_by_a_server_without_starttls_whatever_the_rule() {
    let ca = TestCa::new();
    let plain = ServerBehaviour::plain().ehlo_keyword("REQUIRETLS");
    let d = signed_lab(&ca, plain, |_| Vec::new()).await;

    let sent = send_requiretls(&d.lab, &ca).await;

    assert_refused_for_good(&sent);
    assert_eq!(cached_class(&d.lab), Some("no-starttls"));
    assert!(d.server.messages().is_empty(), "nothing in plain");
}

#[tokio::test]
async fn requiretls_is_refused_for_good_by_a_server_whose_certificate_does_not_verify() {
    let ca = TestCa::new();
    let d = signed_lab(&ca, remote(self_signed(&[MX]), true), |_| Vec::new()).await;

    let sent = send_requiretls(&d.lab, &ca).await;

    assert_refused_for_good(&sent);
    assert_eq!(cached_class(&d.lab), Some("cert-untrusted"));
    assert!(remote_mail_froms(&d.server).is_empty(), "no MAIL FROM sent");
    assert!(d.server.messages().is_empty());
}

#[tokio::test]
async fn requiretls_is_refused_for_good_to_an_insecure_mx_without_mta_sts_and_nothing_connects() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let server = good_mx(&ca).await;
    let zone = unsigned_zone();
    let lab = Lab::new()
        .ca(&ca)
        .rules(LENIENT)
        .zone(zone)
        .mx_port(server.addr().port());
    let lab = with_inbound_tls(lab, &ca).start().await;

    let sent = send_requiretls(&lab, &ca).await;

    assert_refused_for_good(&sent);
    assert_eq!(server.connections(), 0, "no connection to the MX");
    let refused = logs.events_with(&[("event", "not_delivered"), ("domain", "secure.test")]);
    let reply = refused.first().and_then(|e| field(e, "reply"));
    assert!(
        reply
            .as_deref()
            .is_some_and(|r| r.starts_with("550 5.7.30")),
        "{refused:?}"
    );
    let line = &logs.transaction_events()[0];
    assert_eq!(field(line, "requiretls").as_deref(), Some("yes"));
}

#[tokio::test]
async fn a_message_without_requiretls_still_goes_as_the_rules_say() {
    let ca = TestCa::new();
    let d = signed_lab(&ca, remote(self_signed(&[MX]), false), |_| Vec::new()).await;
    let mut client = mta_in_tls(&d.lab, &ca).await;
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd(&format!("RCPT TO:<{RCPT}>")).await.code, 250);
    assert_eq!(client.data(BODY).await.code, 250);
    client.cmd("QUIT").await;
    // The lenient rule's `tls: never`: plain, and no REQUIRETLS on the remote's MAIL FROM.
    assert_eq!(remote_mail_froms(&d.server), ["MAIL FROM:<a@sender.test>"]);
    assert!(d.server.messages()[0].tls.is_none());
}

#[tokio::test]
async fn explain_says_what_requiretls_asks_of_the_mx() {
    let explain = |extra: &[&str]| {
        let mut args: Vec<String> = ["explain", "--rcpt", RCPT, "--mx", MX, "--requiretls"]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        crate::support::lab::tlsrouter(args)
    };
    let first_try = |out: &str| {
        (out.lines())
            .find_map(|l| l.strip_prefix("first try:"))
            .map(|l| l.trim().to_string())
            .unwrap_or_else(|| panic!("no first try in {out}"))
    };
    // An MX answer nothing vouches for: the one decision refuses the host.
    let (code, out, err) = explain(&[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(first_try(&out).starts_with("not to this server"), "{out}");
    // A DNSSEC-secure MX answer: TLS, the certificate verified.
    let (code, out, err) = explain(&["--dnssec-mx"]).await;
    assert_eq!(code, 0, "{err}");
    let first = first_try(&out);
    assert!(
        first.starts_with("TLS (") && first.contains("the certificate must verify"),
        "{out}"
    );
    // The same under an enforced MTA-STS policy that names the host.
    let (_, out, _) = explain(&["--mta-sts", "enforce"]).await;
    assert!(first_try(&out).starts_with("TLS ("), "{out}");
}

#[tokio::test]
async fn probe_shows_the_requiretls_a_server_offers_after_starttls() {
    let ca = TestCa::new();
    let with = good_mx(&ca).await;
    let zone = unsigned_zone();
    let lab = Lab::new()
        .ca(&ca)
        .admin()
        .zone(zone)
        .mx_port(with.addr().port())
        .start()
        .await;

    let report = lab.ctl_json(&["probe", "secure.test"]).await;

    let server = &report["mx"][0]["servers"][0];
    let after = server["tls"]["ehlo_after_tls"]
        .as_array()
        .expect("EHLO after TLS");
    assert!(after.iter().any(|k| k == "REQUIRETLS"), "{server}");
}

#[tokio::test]
async fn ctl_rules_explain_with_requiretls_asks_the_mx_answer_as_delivery_does() {
    let ca = TestCa::new();
    let explain = [
        "rules",
        "explain",
        "--rcpt",
        RCPT,
        "--mx",
        MX,
        "--requiretls",
    ];
    // A DNSSEC-secure MX answer vouches for the host: verified TLS is asked of it.
    let zone = Zone::new()
        .mx("secure.test", 10, MX)
        .a(MX, Ipv4Addr::LOCALHOST);
    let dns = SignedDns::start(SignedTree::new(zone)).await;
    let lab = Lab::new()
        .ca(&ca)
        .admin()
        .set("resolver.nameservers", vec![dns.addr.to_string()])
        .set_path("resolver.trust_anchor_file", &dns.trust_anchor_file)
        .start()
        .await;
    let answer = lab.ctl_json(&explain).await;
    assert_eq!(answer["decision"]["action"], "tls", "{answer}");
    // An unsigned one does not: the host is refused.
    let lab = Lab::new()
        .ca(&ca)
        .admin()
        .zone(
            TestZone::new()
                .mx("secure.test", 10, MX)
                .a(MX, Ipv4Addr::LOCALHOST),
        )
        .start()
        .await;
    let answer = lab.ctl_json(&explain).await;
    assert_eq!(answer["decision"]["action"], "refuse", "{answer}");
}
