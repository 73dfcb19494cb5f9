//! The sender's `TLS-Required: No` (RFC 8689 5): a message that says it goes where only its
//! domain's published policy (MTA-STS `enforce`, DANE) refused every server, as the rules
//! alone would send it, still over TLS when the server has it. The recipient is held at
//! RCPT (250, no remote), the header block read after DATA, and the route opened then; the
//! MTA's 250 for the message is still the remote's. Without the header, or with the setting
//! off, or under the sender's REQUIRETLS, nothing changes. A rule's own `tls: require` is
//! never weakened.
//!
//! Real parts: the proxy in process, a real DNS server (a DNSSEC-signed tree for DANE), a
//! real HTTPS server serving the MTA-STS policy, a real SMTP server with STARTTLS.

use std::net::{IpAddr, Ipv4Addr};

use crate::support::dnssec::{SignedDns, SignedTree, Zone};
use crate::support::events::{assert_fields, field};
use crate::support::lab::{Lab, LabBuilder};
use crate::support::logs::Logs;
use crate::support::mta::{mta_in_tls, with_inbound_tls};
use crate::support::pki::{CertKey, TestCa, Validity, self_signed};
use crate::support::smtp_client::{Reply, SmtpClient};
use crate::support::smtp_server::{ServerBehaviour, SmtpServer, StartTls};
use crate::support::sts::{EnforcingDomain, enforcing_domain};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const MX: &str = "mx.strict.test";
const RCPT: &str = "b@strict.test";
const WAIVED: &[u8] =
    b"From: a@sender.test\r\nTo: b@strict.test\r\nTLS-Required: No\r\nSubject: reset\r\n\r\nyour new password\r\n";
const PLAIN_BODY: &[u8] =
    b"From: a@sender.test\r\nTo: b@strict.test\r\nSubject: reset\r\n\r\nyour new password\r\n";

fn starttls(cert: CertKey) -> ServerBehaviour {
    ServerBehaviour {
        starttls: StartTls::Rustls(cert),
        ..ServerBehaviour::default()
    }
}

/// What the MTA heard: RCPT's reply, then the message's (none when RCPT was refused).
struct Sent {
    rcpt: Reply,
    message: Option<Reply>,
}

async fn send(lab: &Lab, mail_from: &str, body: &[u8]) -> Sent {
    let (mut client, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(greeting.code, 220);
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    assert_eq!(client.cmd(mail_from).await.code, 250);
    let rcpt = client.cmd(&format!("RCPT TO:<{RCPT}>")).await;
    let message = match rcpt.code {
        250 => Some(client.data(body).await),
        _ => None,
    };
    client.cmd("QUIT").await;
    Sent { rcpt, message }
}

fn code(reply: Option<&Reply>) -> Option<(u16, Option<String>)> {
    reply.map(|r| (r.code, r.enhanced()))
}

struct StsLab {
    lab: Lab,
    server: SmtpServer,
    _domain: EnforcingDomain,
}

/// strict.test publishes an enforce policy naming its MX, whose certificate has expired.
async fn sts_lab(ca: &TestCa, lab: impl FnOnce(LabBuilder) -> LabBuilder) -> StsLab {
    let server = SmtpServer::start(LOCALHOST, 0, starttls(ca.leaf(&[MX], Validity::Expired)))
        .await
        .expect("the MX");
    let domain = enforcing_domain(ca, "strict.test", MX).await;
    let builder = domain.in_lab(Lab::new().ca(ca).mx_port(server.addr().port()));
    StsLab {
        lab: lab(builder).start().await,
        server,
        _domain: domain,
    }
}

#[tokio::test]
async fn tls_required_no_delivers_to_an_enforcing_domain_whose_certificate_expired() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let d = sts_lab(&ca, |lab| lab).await;

    let sent = send(&d.lab, "MAIL FROM:<a@sender.test>", WAIVED).await;

    assert_eq!(sent.rcpt.code, 250, "held: {:?}", sent.rcpt);
    assert_eq!(
        code(sent.message.as_ref()),
        Some((250, Some("2.0.0".into())))
    );
    let got = d.server.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, WAIVED, "the text arrives whole, header first");
    assert!(
        got[0].tls.is_some(),
        "still over TLS: the rules try it first"
    );
    assert_fields(
        &logs.transaction_events()[0],
        &[
            ("policy_overridden_by", "sender"),
            ("class", "tls-unverified"),
            ("end", "delivered"),
        ],
    );
    assert_eq!(logs.events_with(&[("event", "held")]).len(), 1);
    assert_eq!(d.lab.proxy.stats.snapshot().policy_waived_by_sender, 1);
}

#[tokio::test]
async fn without_the_header_the_held_recipient_gets_the_policys_refusal_after_the_text() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    let d = sts_lab(&ca, |lab| lab).await;

    let sent = send(&d.lab, "MAIL FROM:<a@sender.test>", PLAIN_BODY).await;

    assert_eq!(sent.rcpt.code, 250, "held: {:?}", sent.rcpt);
    assert_eq!(
        code(sent.message.as_ref()),
        Some((451, Some("4.7.5".into())))
    );
    assert!(d.server.messages().is_empty(), "nothing delivered");
    let line = &logs.transaction_events()[0];
    assert_eq!(
        field(line, "end").as_deref(),
        Some("held recipient not delivered")
    );
    assert_eq!(field(line, "policy_overridden_by"), None);
}

#[tokio::test]
async fn with_the_setting_off_the_header_changes_nothing() {
    let ca = TestCa::new();
    let d = sts_lab(&ca, |lab| lab.set("delivery.tls_required_no", "ignore")).await;

    let sent = send(&d.lab, "MAIL FROM:<a@sender.test>", WAIVED).await;

    assert_eq!(
        (sent.rcpt.code, sent.rcpt.enhanced().as_deref()),
        (451, Some("4.7.5")),
        "refused at RCPT as before: {:?}",
        sent.rcpt
    );
    assert!(d.server.messages().is_empty());
}

#[tokio::test]
async fn a_rule_that_requires_verified_tls_is_not_weakened_by_the_header() {
    let ca = TestCa::new();
    let strict = "rules:\n  - name: strict\n    match: { domains: [strict.test] }\n    tls: require\n    verify: require\n";
    let d = sts_lab(&ca, |lab| lab.rules(strict)).await;

    let sent = send(&d.lab, "MAIL FROM:<a@sender.test>", WAIVED).await;

    // Held for the header (the domain's policy refused first), then the rule refuses.
    assert_eq!(sent.rcpt.code, 250, "{:?}", sent.rcpt);
    assert_eq!(
        code(sent.message.as_ref()),
        Some((451, Some("4.7.5".into())))
    );
    assert!(
        d.server.messages().is_empty(),
        "nothing to an expired certificate"
    );
}

#[tokio::test]
async fn a_second_recipient_waits_for_its_own_transaction_while_one_is_held() {
    let ca = TestCa::new();
    let d = sts_lab(&ca, |lab| lab).await;
    let (mut client, _) = SmtpClient::connect(d.lab.smtp).await;
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    assert_eq!(client.cmd(&format!("RCPT TO:<{RCPT}>")).await.code, 250);
    let second = client.cmd("RCPT TO:<c@strict.test>").await;
    assert_eq!(
        (second.code, second.enhanced().as_deref()),
        (452, Some("4.5.3")),
        "{second:?}"
    );
    assert_eq!(client.data(WAIVED).await.code, 250);
    client.cmd("QUIT").await;
    let got = d.server.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, [RCPT]);
}

#[tokio::test]
async fn tls_required_no_delivers_to_a_dane_domain_whose_tlsa_does_not_match() {
    let (logs, _guard) = Logs::capture();
    let server = SmtpServer::start(LOCALHOST, 0, starttls(self_signed(&[MX])))
        .await
        .expect("the MX");
    let port = server.addr().port();
    let other_key = openssl::sha::sha256(&self_signed(&[MX]).chain[0]).to_vec();
    let zone = Zone::new()
        .mx("strict.test", 10, MX)
        .a(MX, Ipv4Addr::LOCALHOST)
        .tlsa(MX, port, (3, 0, 1), &other_key);
    let dns = SignedDns::start(SignedTree::new(zone)).await;
    let lab = Lab::new()
        .ca(&TestCa::new())
        .mx_port(port)
        .set("resolver.nameservers", vec![dns.addr.to_string()])
        .set_path("resolver.trust_anchor_file", &dns.trust_anchor_file)
        .start()
        .await;

    let refused = send(&lab, "MAIL FROM:<a@sender.test>", PLAIN_BODY).await;
    assert_eq!(
        code(refused.message.as_ref()),
        Some((451, Some("4.7.5".into())))
    );
    let sent = send(&lab, "MAIL FROM:<a@sender.test>", WAIVED).await;

    assert_eq!(
        code(sent.message.as_ref()),
        Some((250, Some("2.0.0".into())))
    );
    let got = server.messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].tls.is_some());
    let lines = logs.transaction_events();
    assert_eq!(
        field(&lines[1], "policy_overridden_by").as_deref(),
        Some("sender")
    );
}

#[tokio::test]
async fn requiretls_sets_the_header_aside() {
    let ca = TestCa::new();
    let d = sts_lab(&ca, |lab| with_inbound_tls(lab, &ca)).await;
    let (mut client, _) = mta_in_tls(&d.lab, &ca).await;
    let mail = client.cmd("MAIL FROM:<a@sender.test> REQUIRETLS").await;
    assert_eq!(mail.code, 250, "{mail:?}");
    // Not held: the sender asked for verified TLS, and the certificate has expired.
    let rcpt = client.cmd(&format!("RCPT TO:<{RCPT}>")).await;
    assert_eq!(
        (rcpt.code, rcpt.enhanced().as_deref()),
        (550, Some("5.7.30")),
        "{rcpt:?}"
    );
    client.cmd("QUIT").await;
    assert!(d.server.messages().is_empty());
}
