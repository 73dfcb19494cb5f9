//! A real Postfix, configured with the snippets in examples/postfix/, relays to tlsrouter as
//! its smart host, exactly as the README tells an admin to set it up. tlsrouter finds the
//! receiving servers through a real DNS server; all of it on loopback. What the admin would
//! look at is what the tests read: Postfix's own queue (`postqueue -j`), the bounce its
//! sender gets, and what the receiving servers were sent.
//!
//! Each test runs its own Postfix instance ([`crate::support::postfix`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use crate::support::dns::{DnsServer, TestZone};
use crate::support::pki::{TestCa, Validity};
use crate::support::postfix::{Deferral, INSTANCE_MASTER_CF, Postfix, instance_main_cf};
use crate::support::proxy::{start_proxy, test_config};
use crate::support::smtp_server::{Action, Received, ServerBehaviour, SmtpServer, Step};

/// The snippets an admin copies; the tests use them as they are, with tlsrouter's port.
const MAIN_CF: &str = include_str!("../../examples/postfix/main.cf");
const MASTER_CF: &str = include_str!("../../examples/postfix/master.cf");
const DOCUMENTED_RELAYHOST: &str = "[127.0.0.1]:11025";
/// The documented transport's TLS setting, for a hop in clear.
const PLAIN_HOP: &str = "-o smtp_tls_security_level=none";

const MX1: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const MX2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

const SENDER: &str = "alice@sender.test";

/// How Postfix hands mail to tlsrouter.
#[derive(Clone, Copy, Default)]
struct Hop {
    /// tlsrouter offers STARTTLS (`inbound.tls`) and Postfix requires it.
    encrypt: bool,
    /// Without the snippet's recipient limit: all of a message's recipients in one
    /// transaction, as Postfix does by default.
    batch: bool,
}

/// The snippet's line that sends each recipient in a transaction of its own.
const RECIPIENT_LIMIT: &str = "tlsrouter_destination_recipient_limit = 1\n";

/// Everything one test needs: the DNS server, the CA file, tlsrouter, and Postfix relaying
/// to it. Postfix is dropped first, so it stops while tlsrouter still answers.
impl Postfix {
    /// Configures and starts an instance relaying to tlsrouter at `relay`. With `encrypt`,
    /// the hop to tlsrouter must be TLS, as the snippet says to set when tlsrouter has
    /// `inbound.tls`.
    fn start_relaying(relay: SocketAddr, hop: Hop) -> Postfix {
        let documented = format!("[127.0.0.1]:{}", relay.port());
        assert_eq!(
            MAIN_CF.matches(DOCUMENTED_RELAYHOST).count(),
            1,
            "examples/postfix/main.cf should name {DOCUMENTED_RELAYHOST} once"
        );
        let main_cf = |root: &Path| {
            let snippet = MAIN_CF.replace(DOCUMENTED_RELAYHOST, &documented);
            // As the snippet allows: one transaction for all of a message's recipients.
            let snippet = match hop.batch {
                false => snippet,
                true => {
                    assert_eq!(
                        snippet.matches(RECIPIENT_LIMIT).count(),
                        1,
                        "{RECIPIENT_LIMIT:?} once"
                    );
                    snippet.replace(RECIPIENT_LIMIT, "")
                }
            };
            format!("{}{snippet}", instance_main_cf(root))
        };
        let master_cf = match hop.encrypt {
            false => MASTER_CF.to_string(),
            true => {
                assert_eq!(
                    MASTER_CF.matches(PLAIN_HOP).count(),
                    1,
                    "{PLAIN_HOP:?} once"
                );
                let tlsmgr = "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n";
                let encrypted = "-o smtp_tls_security_level=encrypt\n  -o smtp_tls_loglevel=1";
                format!("{tlsmgr}{}", MASTER_CF.replace(PLAIN_HOP, encrypted))
            }
        };
        Postfix::start_with(&main_cf, &format!("{INSTANCE_MASTER_CF}{master_cf}"), None)
    }
}

struct Lab {
    postfix: Postfix,
    _dns: DnsServer,
    _dir: tempfile::TempDir,
}

impl Lab {
    /// tlsrouter delivers to remote port `mx_port`, the port of the test's servers.
    async fn start(zone: TestZone, ca: &TestCa, mx_port: u16) -> Lab {
        Lab::start_relaying(zone, ca, mx_port, Hop::default(), |_| {}).await
    }

    /// Postfix relays to tlsrouter over `hop`; `adjust` changes tlsrouter's configuration.
    async fn start_relaying(
        zone: TestZone,
        ca: &TestCa,
        mx_port: u16,
        hop: Hop,
        adjust: impl FnOnce(&mut tlsrouter::config::Config),
    ) -> Lab {
        crate::support::init_tracing();
        let dns = DnsServer::start(zone).await;
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca_file = ca.write_ca_file(dir.path());
        let mut config = test_config(dns.addr, &ca_file, mx_port);
        adjust(&mut config);
        if hop.encrypt {
            let cert = ca.leaf(&["relay.test"], Validity::Current);
            let files = tlsrouter::server_tls::InboundTlsConfig {
                certificate: dir.path().join("relay.crt"),
                key: dir.path().join("relay.key"),
            };
            std::fs::write(&files.certificate, &cert.cert_pem).expect("write certificate");
            std::fs::write(&files.key, &cert.key_pem).expect("write key");
            config.inbound.tls = Some(files);
        }
        let relay = start_proxy(config).await;
        let postfix = tokio::task::spawn_blocking(move || Postfix::start_relaying(relay, hop))
            .await
            .expect("start Postfix");
        Lab {
            postfix,
            _dns: dns,
            _dir: dir,
        }
    }
}

/// example.test's MX is on 127.0.0.1; sender.test's (where bounces go) on 127.0.0.2.
fn zone() -> TestZone {
    TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", MX1)
        .mx("sender.test", 10, "mx.sender.test")
        .a("mx.sender.test", MX2)
}

fn message(to: &str, subject: &str) -> String {
    format!(
        "From: {SENDER}\nTo: {to}\nSubject: {subject}\n\n\
         Hello from Postfix through tlsrouter.\n.a line that starts with a dot\n"
    )
}

/// Two servers on one port (tlsrouter has one remote port), at 127.0.0.1 and 127.0.0.2.
async fn two_servers(
    first: impl Fn() -> ServerBehaviour,
    second: impl Fn() -> ServerBehaviour,
) -> (SmtpServer, SmtpServer) {
    for _ in 0..20 {
        let one = SmtpServer::start(IpAddr::V4(MX1), 0, first())
            .await
            .expect("SMTP server on 127.0.0.1");
        let port = one.addr().port();
        if let Ok(two) = SmtpServer::start(IpAddr::V4(MX2), port, second()).await {
            return (one, two);
        }
    }
    panic!("no port was free on both 127.0.0.1 and 127.0.0.2 after 20 tries");
}

fn text(received: &Received) -> String {
    String::from_utf8_lossy(&received.data).into_owned()
}

/// A message Postfix delivered arrived whole: headers Postfix added, and the body with its
/// leading dot stuffed as on the wire.
fn assert_whole(received: &Received, subject: &str) {
    let text = text(received);
    assert_eq!(received.mail_from, SENDER);
    assert!(text.contains(&format!("Subject: {subject}\r\n")), "{text}");
    assert!(text.contains("Received: by postfix.test"), "{text}");
    assert!(
        text.contains("\r\n..a line that starts with a dot\r\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_postfix_to_a_server_with_a_valid_certificate_arrives_over_tls() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, ServerBehaviour::tls(cert))
        .await
        .expect("SMTP server");
    let lab = Lab::start(zone(), &ca, server.addr().port()).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "over TLS"))
        .await;

    let got = lab.postfix.wait_for_messages(&server, 1, String::new).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_whole(&got[0], "over TLS");
    assert_eq!(got[0].rcpt_to, vec![to]);
    let tls = got[0].tls.as_ref().expect("delivered over TLS");
    assert_eq!(tls.version, "TLSv1.3");
    let log = lab.postfix.maillog();
    assert!(log.contains("status=sent"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_postfix_to_a_server_without_starttls_arrives_in_plain() {
    let ca = TestCa::new();
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, ServerBehaviour::plain())
        .await
        .expect("SMTP server");
    let lab = Lab::start(zone(), &ca, server.addr().port()).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "in plain"))
        .await;

    let got = lab.postfix.wait_for_messages(&server, 1, String::new).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_whole(&got[0], "in plain");
    assert_eq!(got[0].tls, None, "no STARTTLS offered: plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_postfix_to_a_server_with_an_expired_certificate_arrives_encrypted() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Expired);
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, ServerBehaviour::tls(cert))
        .await
        .expect("SMTP server");
    let lab = Lab::start(zone(), &ca, server.addr().port()).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "expired"))
        .await;

    let got = lab.postfix.wait_for_messages(&server, 1, String::new).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_whole(&got[0], "expired");
    assert!(
        got[0].tls.is_some(),
        "the default rules encrypt even with an expired certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_at_rcpt_keeps_the_message_deferred_in_postfix_with_the_reason() {
    let ca = TestCa::new();
    let busy = ServerBehaviour::plain().rcpt_reply("450 4.2.1 mailbox busy, try later");
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, busy)
        .await
        .expect("SMTP server");
    let lab = Lab::start(zone(), &ca, server.addr().port()).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "later"))
        .await;

    let Deferral {
        message: deferred,
        reason,
    } = lab.postfix.deferral().await;
    assert_eq!(deferred["recipients"][0]["address"], to, "{deferred}");
    assert!(
        reason.contains("450 4.2.1 mailbox busy, try later"),
        "the remote's own reply, passed on by tlsrouter: {deferred}"
    );
    assert!(server.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_at_rcpt_bounces_the_message_to_its_sender_with_the_remote_reply() {
    let ca = TestCa::new();
    let (rejecting, senders_mx) = two_servers(
        || ServerBehaviour::plain().rcpt_reply("550 5.1.1 no such user here"),
        ServerBehaviour::plain,
    )
    .await;
    let lab = Lab::start(zone(), &ca, rejecting.addr().port()).await;

    let to = "nobody@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "bounce me"))
        .await;

    // The bounce goes back through tlsrouter to the sender's domain.
    let bounces = lab
        .postfix
        .wait_for_messages(&senders_mx, 1, String::new)
        .await;
    lab.postfix.wait_for_empty_queue().await;
    let bounce = &bounces[0];
    assert_eq!(bounce.mail_from, "", "a bounce has the null sender");
    assert_eq!(bounce.rcpt_to, vec![SENDER]);
    let report = text(bounce);
    assert!(
        report.contains("Undelivered Mail Returned to Sender"),
        "{report}"
    );
    assert!(report.contains("550 5.1.1 no such user here"), "{report}");
    assert!(rejecting.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_data_is_retried_by_postfix_and_delivered_exactly_once() {
    let ca = TestCa::new();
    // The first connection breaks off in the body; later ones behave.
    let script = ServerBehaviour::plain()
        .on(Step::Body, Action::Drop)
        .on_connections_from(1, Step::Body, Action::Normal);
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, script)
        .await
        .expect("smtp server");
    let lab = Lab::start(zone(), &ca, server.addr().port()).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "again"))
        .await;

    let Deferral {
        message: deferred,
        reason,
    } = lab.postfix.deferral().await;
    assert!(
        reason.contains("451 4.4.2"),
        "tlsrouter's answer for a remote lost mid-transaction: {deferred}"
    );
    assert!(server.messages().is_empty(), "nothing was accepted yet");

    let queue_id = deferred["queue_id"].as_str().expect("queue_id");
    lab.postfix.retry_now(queue_id).await;
    lab.postfix.wait_for_empty_queue().await;

    // Out of Postfix's queue, so no further attempt can come.
    let accepted = server.messages();
    assert_eq!(accepted.len(), 1, "delivered exactly once: {accepted:?}");
    let connections = server.connection_logs();
    assert!(!connections[0].final_dot, "the first attempt was cut off");
    assert!(
        String::from_utf8_lossy(&accepted[0].data).contains("Subject: again"),
        "{accepted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_two_domains_on_different_mx_hosts_reaches_both_without_waiting() {
    let ca = TestCa::new();
    let (first, second) = two_servers(ServerBehaviour::plain, ServerBehaviour::plain).await;
    // example.test on 127.0.0.1, other.test on 127.0.0.2: two next hops.
    let zone = zone()
        .mx("other.test", 10, "mx.other.test")
        .a("mx.other.test", MX2);
    let lab = Lab::start(zone, &ca, first.addr().port()).await;

    let (a, b) = ("bob@example.test", "carol@other.test");
    lab.postfix
        .sendmail(SENDER, &[a, b], &message(a, "to two"))
        .await;

    // With the documented recipient limit of 1, neither recipient waits for a queue run
    // after tlsrouter's 452 4.5.3.
    let at_first = lab.postfix.wait_for_messages(&first, 1, String::new).await;
    let at_second = lab.postfix.wait_for_messages(&second, 1, String::new).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_eq!(at_first[0].rcpt_to, vec![a]);
    assert_eq!(at_second[0].rcpt_to, vec![b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postfix_that_requires_tls_on_its_hop_to_tlsrouter_relays_encrypted() {
    let ca = TestCa::new();
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, ServerBehaviour::plain())
        .await
        .expect("SMTP server");
    let hop = Hop {
        encrypt: true,
        ..Hop::default()
    };
    let lab = Lab::start_relaying(zone(), &ca, server.addr().port(), hop, |_| {}).await;

    let to = "bob@example.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "encrypted hop"))
        .await;

    let got = lab.postfix.wait_for_messages(&server, 1, String::new).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_whole(&got[0], "encrypted hop");
    let log = lab.postfix.maillog();
    assert!(
        log.contains("TLS connection established to 127.0.0.1"),
        "Postfix encrypted its hop to tlsrouter: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_an_open_and_an_enforcing_domain_on_one_mx_goes_in_plain_to_the_open_one_only()
{
    let ca = TestCa::new();
    let server = SmtpServer::start(IpAddr::V4(MX1), 0, ServerBehaviour::plain())
        .await
        .expect("SMTP server");
    let policy_host = "mta-sts.strict.test";
    let policy = crate::support::https::HttpsServer::start(
        ca.leaf(&[policy_host], Validity::Current),
        crate::support::https::Answer::policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mx.shared.test\r\nmax_age: 86400\r\n",
        ),
    )
    .await;
    // Both domains on one MX host, which offers no STARTTLS; only strict.test publishes.
    let zone = zone()
        .mx("open-shared.test", 10, "mx.shared.test")
        .mx("strict.test", 10, "mx.shared.test")
        .a("mx.shared.test", MX1)
        .record(
            "_mta-sts.strict.test",
            crate::support::https::txt("v=STSv1; id=20261207a;"),
        );
    // Postfix as it is by default: both recipients in one transaction.
    let hop = Hop {
        batch: true,
        ..Hop::default()
    };
    let policy_addr = policy.addr;
    let lab = Lab::start_relaying(zone, &ca, server.addr().port(), hop, |config| {
        config
            .mta_sts
            .connect_to
            .insert(policy_host.to_string(), policy_addr);
    })
    .await;

    let (open, strict) = ("u@open-shared.test", "v@strict.test");
    lab.postfix
        .sendmail(SENDER, &[open, strict], &message(open, "two domains"))
        .await;

    let got = lab.postfix.wait_for_messages(&server, 1, String::new).await;
    assert_eq!(
        got[0].rcpt_to,
        vec![open],
        "only the open domain's recipient"
    );
    assert_eq!(got[0].tls, None);
    // tlsrouter sent the other to a transaction of its own; there its domain decides.
    let reason = lab.postfix.retried_alone(strict, "4.7.5").await;
    assert!(reason.contains("MTA-STS enforce"), "{reason}");
    assert!(
        !server.heard_of(strict),
        "the remote never heard of {strict}"
    );
    assert_eq!(server.messages().len(), 1);
}
