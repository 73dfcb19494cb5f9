//! Internationalised recipient domains: a domain written in Unicode (U-labels) is routed by
//! its A-labels, once, at RCPT: its MTA-STS policy is found and enforced, rules match
//! whichever form they are written in, and what goes to the remote is the address as the
//! MTA wrote it. A domain that is no valid IDNA name gets `501 5.1.3`.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::json;

use crate::support::dns::TestZone;
use crate::support::https::{Answer, HttpsServer, txt};
use crate::support::lab::Lab;
use crate::support::logs::Logs;
use crate::support::mta::verdict;
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_client::{Reply, SmtpClient, send_one};
use crate::support::smtp_server::{ServerBehaviour, SmtpServer};

/// bücher.test, münchen.test and zürich.test in their A-label form.
const BUECHER: &str = "xn--bcher-kva.test";
const MUENCHEN: &str = "xn--mnchen-3ya.test";
const ZUERICH: &str = "xn--zrich-kva.test";
const MX: &str = "mx.books.test";
const BODY: &[u8] = b"Subject: idna\r\n\r\nhello\r\n";

/// One message with SMTPUTF8: the RCPT reply, and the reply to the message.
async fn send(lab: &Lab, rcpt: &str) -> (Reply, Option<Reply>) {
    send_one(lab.smtp, "MAIL FROM:<a@sender.test> SMTPUTF8", rcpt, BODY).await
}

#[tokio::test]
async fn a_unicode_domain_gets_its_mta_sts_policy_and_the_rules_written_for_it() {
    let (logs, _guard) = Logs::capture();
    let ca = TestCa::new();
    // A server without STARTTLS: only what the domains and rules say keeps mail off it.
    let server = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        0,
        ServerBehaviour::plain().ehlo_keyword("SMTPUTF8"),
    )
    .await
    .expect("server");
    let policy_host = format!("mta-sts.{BUECHER}");
    let policy = HttpsServer::start(
        ca.leaf(&[&policy_host], Validity::Current),
        Answer::policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mx.books.test\r\nmax_age: 86400\r\n",
        ),
    )
    .await;
    let zone = TestZone::new()
        .mx(BUECHER, 10, MX)
        .mx(MUENCHEN, 10, MX)
        .mx(ZUERICH, 10, MX)
        .mx("plain.test", 10, MX)
        .a(MX, Ipv4Addr::LOCALHOST)
        .record(
            &format!("_mta-sts.{BUECHER}"),
            txt("v=STSv1; id=20261207a;"),
        );
    let lab = Lab::new()
        .ca(&ca)
        .zone(zone)
        .mx_port(server.addr().port())
        .set(
            "mta_sts.connect_to",
            json!({ policy_host: policy.addr.to_string() }),
        )
        .rules(
            "
            rules:
              - name: a-label
                match: { domains: [xn--mnchen-3ya.test] }
                tls: require
              - name: u-label
                match: { domains: [zürich.test] }
                tls: require
              - name: default
                match: { domains: [\"*\"] }
            ",
        )
        .start()
        .await;

    // bücher.test publishes enforce: deferred, never plain.
    let (rcpt, message) = send(&lab, "jürgen@bücher.test").await;
    let rcpt = message
        .as_ref()
        .map_or(&rcpt, |message| verdict(&rcpt, message));
    assert_eq!(
        (rcpt.code, rcpt.enhanced().as_deref()),
        (451, Some("4.7.5")),
        "{rcpt:?}"
    );
    assert!(rcpt.text().contains("MTA-STS enforce"), "{rcpt:?}");
    assert_eq!(
        policy.requests(),
        1,
        "the policy was fetched from mta-sts.{BUECHER}"
    );

    // Rules match the domain whether they name it in A-labels or in Unicode.
    for (rcpt, rule) in [("m@münchen.test", "a-label"), ("z@ZÜRICH.test", "u-label")] {
        let (reply, _) = send(&lab, rcpt).await;
        assert_eq!(
            (reply.code, reply.enhanced().as_deref()),
            (451, Some("4.7.5")),
            "{reply:?}"
        );
        assert!(reply.text().contains(rule), "{rule}: {reply:?}");
    }
    assert!(server.messages().is_empty(), "nothing went in plain");

    // What goes to the remote is the address as the MTA wrote it.
    let (_, message) = send(&lab, "ünïcode@plain.test").await;
    assert_eq!(message.map(|r| r.code), Some(250));
    assert_eq!(server.messages()[0].rcpt_to, ["ünïcode@plain.test"]);
    let line = &logs.transaction_events()[0];
    assert_eq!(line["route"], "none", "{line}");
    let refused = line["refused"].as_str().unwrap_or_default();
    assert!(
        refused.starts_with("jürgen@bücher.test (451 4.7.5"),
        "{line}"
    );
}

#[tokio::test]
async fn a_domain_that_is_no_valid_idna_name_gets_501_5_1_3() {
    let lab = Lab::new().start().await;
    let (mut client, _) = SmtpClient::connect(lab.smtp).await;
    client.cmd("EHLO mta.sender.test").await;
    client.cmd("MAIL FROM:<a@sender.test> SMTPUTF8").await;
    // A label may not begin with a combining mark (IDNA).
    let reply = client.cmd("RCPT TO:<a@\u{300}b.test>").await;
    assert_eq!(
        (reply.code, reply.enhanced().as_deref()),
        (501, Some("5.1.3")),
        "{reply:?}"
    );
    let sender = client.cmd("RSET").await;
    assert_eq!(sender.code, 250);
    let reply = client.cmd("MAIL FROM:<a@\u{300}b.test>").await;
    assert_eq!(
        (reply.code, reply.enhanced().as_deref()),
        (501, Some("5.1.7")),
        "{reply:?}"
    );
}
