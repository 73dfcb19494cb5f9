//! Each recipient domain is judged on its own, even when several share an MX host, a route
//! or a pooled connection: a recipient whose domain publishes more than the transaction's
//! open route gives (MTA-STS `enforce`, DANE) never rides on it; the MTA is told `452
//! 4.5.3` and sends it in a transaction of its own, where its domain decides. A recipient
//! whose domain the open route already satisfies joins it, also when its domain's best MX
//! host is the route's server under another name.
//!
//! Real parts: the proxy in process, a real DNS server (a DNSSEC-signed tree for DANE), a
//! real HTTPS server serving the MTA-STS policy, a real SMTP server as the shared MX, each
//! order of recipients, the pool on and off.

use std::net::{IpAddr, Ipv4Addr};

use crate::support::dnssec::{SignedDns, SignedTree, Zone};
use crate::support::lab::{Lab, LabBuilder};
use crate::support::logs::Logs;
use crate::support::mta::verdict;
use crate::support::pki::{CertKey, TestCa, Validity, self_signed};
use crate::support::smtp_client::{Reply, SmtpClient};
use crate::support::smtp_server::{ServerBehaviour, SmtpServer, StartTls};
use crate::support::sts::{EnforcingDomain, enforcing_domain};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The MX host every domain here shares.
const MX: &str = "mx.shared.test";
const OPEN: &str = "u@open-shared.test";
const STRICT: &str = "v@strict.test";
const BODY: &[u8] = b"Subject: shared\r\n\r\nhello\r\n";

/// What the MTA heard in one transaction: each RCPT's reply, then the reply to the message
/// (none when no recipient was taken).
struct Sent {
    rcpts: Vec<Reply>,
    message: Option<Reply>,
}

/// One transaction to the proxy, with these recipients in this order.
async fn transaction(lab: &Lab, rcpts: &[&str]) -> Sent {
    let (mut client, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(greeting.code, 220);
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@sender.test>").await.code, 250);
    let mut replies = Vec::new();
    for rcpt in rcpts {
        replies.push(client.cmd(&format!("RCPT TO:<{rcpt}>")).await);
    }
    let message = match replies.iter().any(|r| r.code == 250) {
        true => Some(client.data(BODY).await),
        false => None,
    };
    client.cmd("QUIT").await;
    Sent {
        rcpts: replies,
        message,
    }
}

/// What the MTA was told in the end for the first recipient.
fn told_for(sent: &Sent) -> &Reply {
    match &sent.message {
        Some(message) => verdict(&sent.rcpts[0], message),
        None => &sent.rcpts[0],
    }
}

fn assert_reply(reply: &Reply, code: u16, enhanced: &str) {
    assert_eq!(
        (reply.code, reply.enhanced().as_deref()),
        (code, Some(enhanced)),
        "{reply:?}"
    );
}

/// The shared MX, and the proxy with the pool on or off.
fn with_pool(lab: LabBuilder, pool: bool) -> LabBuilder {
    lab.set("delivery.pool.enabled", pool)
}

// ---------------------------------------------------------------------------------------
// MTA-STS

struct StsLab {
    lab: Lab,
    server: SmtpServer,
    _domain: EnforcingDomain,
}

/// open-shared.test publishes nothing; strict.test an enforce policy naming the MX host
/// they share.
async fn sts_lab(ca: &TestCa, behaviour: ServerBehaviour, pool: bool) -> StsLab {
    let server = SmtpServer::start(LOCALHOST, 0, behaviour)
        .await
        .expect("the shared MX");
    // open-shared.test names the same MX and publishes nothing.
    let strict = enforcing_domain(ca, "strict.test", MX).await;
    let zone = strict.zone.clone().mx("open-shared.test", 10, MX);
    let lab = Lab::new().ca(ca).zone(zone).mx_port(server.addr().port());
    StsLab {
        lab: with_pool(strict.policy_only(lab), pool).start().await,
        server,
        _domain: strict,
    }
}

#[tokio::test]
async fn an_enforcing_domain_never_rides_on_another_domains_plain_route_to_the_same_mx() {
    for pool in [false, true] {
        let (logs, _guard) = Logs::capture();
        let ca = TestCa::new();
        let d = sts_lab(&ca, ServerBehaviour::plain(), pool).await;

        // A message to the open domain alone: plain, as nothing forbids it (and, with the
        // pool on, its connection is kept for the next message).
        let alone = transaction(&d.lab, &[OPEN]).await;
        assert_reply(alone.message.as_ref().expect("taken"), 250, "2.0.0");

        // The open domain first: the strict one is sent to another transaction.
        let sent = transaction(&d.lab, &[OPEN, STRICT]).await;
        assert_eq!(sent.rcpts[0].code, 250, "pool {pool}: {:?}", sent.rcpts);
        assert_reply(&sent.rcpts[1], 452, "4.5.3");
        assert!(
            sent.rcpts[1].text().contains("strict.test")
                && sent.rcpts[1].text().contains("MTA-STS enforce"),
            "the reply says whose policy: {:?}",
            sent.rcpts[1]
        );
        assert_eq!(sent.message.as_ref().map(|r| r.code), Some(250));
        let stats = d.lab.proxy.stats.snapshot();
        assert_eq!(
            (stats.recipients_split, stats.deferrals),
            (1, 0),
            "a recipient sent to another transaction is no deferral"
        );

        // The strict domain first: its own decision refuses every server, so it is held
        // for the message's TLS-Required header, which this message lacks: deferred after
        // the text. The open one goes to a transaction of its own.
        let sent = transaction(&d.lab, &[STRICT, OPEN]).await;
        assert_eq!(sent.rcpts[0].code, 250, "held: {:?}", sent.rcpts);
        assert_reply(&sent.rcpts[1], 452, "4.5.3");
        let told = sent.message.as_ref().expect("the text was asked for");
        assert_reply(told, 451, "4.7.5");
        assert!(told.text().contains("MTA-STS enforce"), "{told:?}");
        let resent = transaction(&d.lab, &[OPEN]).await;
        assert_eq!(resent.message.as_ref().map(|r| r.code), Some(250));

        // In a transaction of its own, as the MTA retries it: deferred, never plain.
        let retried = transaction(&d.lab, &[STRICT]).await;
        assert_reply(told_for(&retried), 451, "4.7.5");

        let got = d.server.messages();
        assert_eq!(
            got.len(),
            3,
            "pool {pool}: the open domain's three messages"
        );
        for message in &got {
            assert_eq!(message.rcpt_to, vec![OPEN], "pool {pool}");
            assert_eq!(message.tls, None);
        }
        assert!(
            !d.server.heard_of(STRICT),
            "pool {pool}: the remote never heard of the strict domain's recipient"
        );
        for line in logs.transaction_events() {
            let to = line["to"].as_str().unwrap_or_default();
            assert!(!to.contains("strict.test"), "{line}");
        }
    }
}

#[tokio::test]
async fn an_enforcing_domain_joins_a_route_that_already_meets_its_policy() {
    let ca = TestCa::new();
    let cert = ca.leaf(&[MX], Validity::Current);
    let d = sts_lab(&ca, ServerBehaviour::tls(cert), false).await;

    let sent = transaction(&d.lab, &[OPEN, STRICT]).await;
    assert_eq!(
        sent.rcpts.iter().map(|r| r.code).collect::<Vec<_>>(),
        [250, 250],
        "{:?}",
        sent.rcpts
    );
    assert_eq!(sent.message.as_ref().map(|r| r.code), Some(250));
    let got = d.server.messages();
    assert_eq!(got.len(), 1, "one message for both");
    assert_eq!(got[0].rcpt_to, vec![OPEN, STRICT]);
    assert!(
        got[0].tls.is_some(),
        "verified TLS to a host the policy names"
    );
}

// ---------------------------------------------------------------------------------------
// DANE

const DANE: &str = "w@dane.test";
const UNSIGNED: &str = "x@unsigned.test";

struct DaneLab {
    lab: Lab,
    server: SmtpServer,
    _dns: SignedDns,
}

/// dane.test's MX answer is DNSSEC-secure and the shared MX host has a TLSA record for
/// `cert`; unsigned.test is in a zone delegated without DS, so its MX answer is insecure
/// and DANE does not bind it, though it names the same host.
async fn dane_lab(cert: &CertKey, behaviour: ServerBehaviour, pool: bool) -> DaneLab {
    let server = SmtpServer::start(LOCALHOST, 0, behaviour)
        .await
        .expect("the shared MX");
    let port = server.addr().port();
    let key = crate::support::pki::spki_sha256(cert);
    let secure = Zone::new()
        .mx("dane.test", 10, MX)
        .a(MX, Ipv4Addr::LOCALHOST)
        .tlsa(MX, port, (3, 1, 1), &key);
    let unsigned = Zone::new().mx("unsigned.test", 10, MX);
    let dns =
        SignedDns::start(SignedTree::new(secure).insecure_zone("unsigned.test", unsigned)).await;
    let lab = Lab::new()
        .ca(&TestCa::new())
        .mx_port(port)
        .set("resolver.nameservers", vec![dns.addr.to_string()])
        .set_path("resolver.trust_anchor_file", &dns.trust_anchor_file);
    DaneLab {
        lab: with_pool(lab, pool).start().await,
        server,
        _dns: dns,
    }
}

#[tokio::test]
async fn a_dane_domain_never_rides_on_an_unsigned_domains_plain_route_to_the_same_mx() {
    for pool in [false, true] {
        let cert = self_signed(&[MX]);
        let d = dane_lab(&cert, ServerBehaviour::plain(), pool).await;

        let alone = transaction(&d.lab, &[UNSIGNED]).await;
        assert_eq!(alone.message.as_ref().map(|r| r.code), Some(250));

        let sent = transaction(&d.lab, &[UNSIGNED, DANE]).await;
        assert_eq!(sent.rcpts[0].code, 250, "pool {pool}: {:?}", sent.rcpts);
        assert_reply(&sent.rcpts[1], 452, "4.5.3");
        assert!(sent.rcpts[1].text().contains("DANE"), "{:?}", sent.rcpts[1]);

        // The DANE domain first: held for a TLS-Required header it lacks, so deferred
        // after the text; the unsigned one goes to a transaction of its own.
        let sent = transaction(&d.lab, &[DANE, UNSIGNED]).await;
        assert_reply(told_for(&sent), 451, "4.7.5");
        assert_reply(&sent.rcpts[1], 452, "4.5.3");
        let resent = transaction(&d.lab, &[UNSIGNED]).await;
        assert_eq!(resent.message.as_ref().map(|r| r.code), Some(250));

        let got = d.server.messages();
        assert_eq!(got.len(), 3, "pool {pool}");
        assert!(
            got.iter()
                .all(|m| m.rcpt_to == vec![UNSIGNED] && m.tls.is_none())
        );
        assert!(!d.server.heard_of(DANE), "pool {pool}");
    }
}

#[tokio::test]
async fn a_dane_domain_joins_only_a_route_its_tlsa_record_authenticated() {
    let cert = self_signed(&[MX]);
    let behaviour = ServerBehaviour {
        starttls: StartTls::Rustls(cert.clone()),
        ..ServerBehaviour::default()
    };
    let d = dane_lab(&cert, behaviour, false).await;

    // Opened under DANE: the unsigned domain, which asks less, joins it.
    let sent = transaction(&d.lab, &[DANE, UNSIGNED]).await;
    assert_eq!(
        sent.rcpts.iter().map(|r| r.code).collect::<Vec<_>>(),
        [250, 250],
        "{:?}",
        sent.rcpts
    );
    // Opened for the unsigned domain, the certificate judged by PKIX only (a self-signed
    // one: encrypted, unverified): the DANE domain goes to a transaction of its own.
    let sent = transaction(&d.lab, &[UNSIGNED, DANE]).await;
    assert_eq!(sent.rcpts[0].code, 250);
    assert_reply(&sent.rcpts[1], 452, "4.5.3");
    let retried = transaction(&d.lab, &[DANE]).await;
    assert_eq!(retried.message.as_ref().map(|r| r.code), Some(250));

    let got = d.server.messages();
    let recipients: Vec<Vec<&str>> = (got.iter())
        .map(|m| m.rcpt_to.iter().map(String::as_str).collect())
        .collect();
    assert_eq!(
        recipients,
        [vec![DANE, UNSIGNED], vec![UNSIGNED], vec![DANE]]
    );
    assert!(got.iter().all(|m| m.tls.is_some()));
}

// ---------------------------------------------------------------------------------------
// Other MX names, the same server

const HOSTED: &str = "w@hosted.test";
const BACKUP: &str = "x@backup.test";
/// hosted.test's MX name: another name for the shared MX's address, as a mail host
/// serving many domains gives each its own.
const HOSTED_MX: &str = "hosted-test.mail.shared.test";

/// open-shared.test and strict.test as in [`sts_lab`]; hosted.test's best MX is another
/// name for the shared MX's address; backup.test has the shared MX only as its backup,
/// behind a best MX that is another server.
async fn same_server_lab(ca: &TestCa, behaviour: ServerBehaviour) -> (StsLab, SmtpServer) {
    let server = SmtpServer::start(LOCALHOST, 0, behaviour)
        .await
        .expect("the shared MX");
    let other = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        server.addr().port(),
        ServerBehaviour::default(),
    )
    .await
    .expect("backup.test's best MX");
    let strict = enforcing_domain(ca, "strict.test", MX).await;
    let zone = (strict.zone.clone())
        .mx("open-shared.test", 10, MX)
        .mx("hosted.test", 10, HOSTED_MX)
        .a(HOSTED_MX, Ipv4Addr::LOCALHOST)
        .mx("backup.test", 10, "best.backup.test")
        .a("best.backup.test", Ipv4Addr::new(127, 0, 0, 2))
        .mx("backup.test", 20, MX);
    let lab = Lab::new().ca(ca).zone(zone).mx_port(server.addr().port());
    let lab = StsLab {
        lab: strict.policy_only(lab).start().await,
        server,
        _domain: strict,
    };
    (lab, other)
}

/// Recipients whose domains' best MX hosts are the same server, by other names, share one
/// transaction when their terms allow it (IIS waits its retry interval for each 452); a
/// domain that has that server only as a backup, or whose policy needs the certificate
/// verified for its own MX name, goes in a transaction of its own.
#[tokio::test]
async fn recipients_whose_best_mx_is_the_same_server_share_a_transaction_when_their_terms_allow() {
    let ca = TestCa::new();
    let cert = ca.leaf(&[MX], Validity::Current);
    let (d, other) = same_server_lab(&ca, ServerBehaviour::tls(cert)).await;

    let sent = transaction(&d.lab, &[OPEN, HOSTED]).await;
    let codes: Vec<u16> = sent.rcpts.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 250], "{:?}", sent.rcpts);
    assert_eq!(sent.message.as_ref().map(|r| r.code), Some(250));

    // Only its backup: a transaction of its own, to its best MX.
    let sent = transaction(&d.lab, &[OPEN, BACKUP]).await;
    assert_eq!(sent.rcpts[0].code, 250);
    assert_reply(&sent.rcpts[1], 452, "4.5.3");
    assert_eq!(
        transaction(&d.lab, &[BACKUP]).await.message.map(|r| r.code),
        Some(250)
    );

    // strict.test's policy needs the certificate verified for its MX name: a route that
    // hosted.test opened under its own name did not verify that name.
    let sent = transaction(&d.lab, &[HOSTED, STRICT]).await;
    assert_eq!(sent.rcpts[0].code, 250);
    assert_reply(&sent.rcpts[1], 452, "4.5.3");
    assert_eq!(
        transaction(&d.lab, &[STRICT]).await.message.map(|r| r.code),
        Some(250)
    );

    let recipients: Vec<Vec<String>> = (d.server.messages().iter())
        .map(|m| m.rcpt_to.clone())
        .collect();
    assert_eq!(
        recipients,
        [vec![OPEN, HOSTED], vec![OPEN], vec![HOSTED], vec![STRICT]]
    );
    let at_best: Vec<Vec<String>> = other.messages().iter().map(|m| m.rcpt_to.clone()).collect();
    assert_eq!(at_best, [vec![BACKUP]]);
}
