//! Transparent mode with a real, unmodified Postfix: it delivers straight to the recipient
//! domains' MX hosts (no relayhost), and the nftables rules of examples/transparent/,
//! loaded as they are, redirect its connections to tlsrouter's transparent listener beside
//! it. Postfix and tlsrouter run in a network namespace of their own; the receiving SMTP
//! servers and the DNS server both of them use listen on port 25 and 53 on the other side
//! of a veth pair. What the admin would look at is what the tests read: Postfix's queue
//! (`postqueue -j`) and log, tlsrouter's log, and what the receiving servers got.
//!
//! Needs root, iproute2, nftables and Debian's postfix (`.ci/run` installs them), and the
//! `tlsrouter` and `postfix` users the rules name; without them the tests fail and say why.

use std::net::{IpAddr, SocketAddr};

use serde_json::json;

use crate::support::daemon::Daemon;
use crate::support::dns::{DnsServer, TestZone};
use crate::support::dnssec::{SignedDns, SignedTree, Zone};
use crate::support::netns::NetNs;
use crate::support::pki::{TestCa, Validity};
use crate::support::postfix::{Deferral, INSTANCE_MASTER_CF, Postfix, instance_directories_cf};
use crate::support::settings::{Settings, path};
use crate::support::smtp_server::{Action, Received, ServerBehaviour, SmtpServer, Step};

/// The rules an admin loads; the test loads this very file.
const NFT_RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/transparent/tlsrouter.nft"
);
/// The same redirect for iptables; the test loads this very script.
const IPTABLES_RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/transparent/tlsrouter.iptables"
);
/// The port and mark the rules name, which tlsrouter's configuration must match.
const TRANSPARENT_LISTEN: &str = "127.0.0.1:10026";
const SOCKET_MARK: u32 = 0x2a;

const SENDER: &str = "alice@sender.test";

/// Addresses on the far side of the pair: 1 is the DNS server, the rest MX hosts.
const DNS: u8 = 1;
const MX_TLS: u8 = 2;
const MX_PLAIN: u8 = 3;
const MX_STRICT: u8 = 4;
const MX_REJECT: u8 = 5;
const MX_SENDER: u8 = 6;
const MX_GREETING: u8 = 7;
const MX_SMALL: u8 = 8;
/// An address of the far side where nothing listens.
const MX_DOWN: u8 = 9;
const MX_DSN: u8 = 10;
const MX_DROP: u8 = 11;
/// Addresses made on the far side: every one above.
const HOSTS: u8 = MX_DROP;

/// Postfix, tlsrouter beside it in the namespace, and the DNS server; dropped in this
/// order, so Postfix stops first and the namespace goes last.
struct TransparentLab {
    postfix: Postfix,
    tlsrouter: Daemon,
    _dns: Dns,
    netns: NetNs,
    _dir: tempfile::TempDir,
}

impl TransparentLab {
    /// `rules` is a rule file's text, or none for the shipped defaults.
    async fn start(netns: NetNs, ca: &TestCa, rules: Option<&str>) -> TransparentLab {
        TransparentLab::start_with(netns, ca, rules, Extras::default()).await
    }

    async fn start_with(
        netns: NetNs,
        ca: &TestCa,
        rules: Option<&str>,
        mut extras: Extras,
    ) -> TransparentLab {
        crate::support::init_tracing();
        let nft = std::fs::read_to_string(NFT_RULES).expect("read examples/transparent");
        assert!(
            nft.contains("redirect to :10026") && nft.contains("meta mark 0x2a return"),
            "examples/transparent/tlsrouter.nft should redirect to port 10026 and let mark \
             0x2a pass, as this test configures tlsrouter"
        );
        for user in ["postfix", "tlsrouter"] {
            let known = std::process::Command::new("id").arg(user).output();
            assert!(
                known.is_ok_and(|o| o.status.success()),
                "the nftables rules name the user {user:?}, which does not exist here (the \
                 postfix and tlsrouter packages create them; .ci/run does before the tests)"
            );
        }
        let at = SocketAddr::new(netns.host(DNS).into(), 53);
        let dns: Dns = match extras.signed.take() {
            None => (Some(DnsServer::start_at(zone(&netns), at).await), None),
            Some(tree) => (None, Some(SignedDns::start_at(tree, at).await)),
        };
        netns.use_nameserver(netns.host(DNS));
        match extras.iptables {
            false => netns.run(
                "nft",
                &["-f", NFT_RULES],
                "load examples/transparent/tlsrouter.nft (is nftables installed?)",
            ),
            true => netns.run(
                "sh",
                &[IPTABLES_RULES, "add"],
                "load examples/transparent/tlsrouter.iptables (is iptables installed?)",
            ),
        }

        let dir = tempfile::tempdir().expect("temporary directory");
        let ca_file = ca.write_ca_file(dir.path());
        let mut settings = Settings::lab(at, &ca_file, 25)
            .set("delivery.socket_mark", SOCKET_MARK)
            // A redirected connection comes from the address Postfix connected from.
            .set(
                "allow_clients",
                json!([
                    format!("{}/32", netns.inside()),
                    format!("{}/128", netns.inside6()),
                    "127.0.0.0/8"
                ]),
            )
            .set(
                "listeners",
                json!([
                    { "listen": TRANSPARENT_LISTEN, "mode": "transparent" },
                    // Where the rules redirect IPv6 connections.
                    { "listen": "[::1]:10026", "mode": "transparent" },
                    // A smart-host listener on port 25 of the namespace's own address: an
                    // MX pointing at it is the loop case.
                    { "listen": format!("{}:25", netns.inside()), "mode": "smart-host" },
                ]),
            );
        if let Some(cert) = &extras.inbound_tls {
            let (cert_file, key_file) =
                (dir.path().join("relay.crt"), dir.path().join("relay.key"));
            std::fs::write(&cert_file, &cert.cert_pem).expect("write certificate");
            std::fs::write(&key_file, &cert.key_pem).expect("write key");
            settings = settings
                .set("inbound.tls.certificate", path(&cert_file))
                .set("inbound.tls.key", path(&key_file));
        }
        if let Some(cache) = &extras.cache {
            let file = dir.path().join("cache.json");
            std::fs::write(&file, cache.to_string()).expect("write cache file");
            settings = settings.set("cache.file", path(&file));
        }
        if let (_, Some(signed)) = &dns {
            settings = settings.set(
                "resolver.trust_anchor_file",
                path(&signed.trust_anchor_file),
            );
        }
        if let Some(rules) = rules {
            let file = dir.path().join("rules.yaml");
            std::fs::write(&file, rules).expect("write rules");
            settings = settings.set("rules_file", path(&file));
        }
        let tlsrouter = Daemon::start_in_netns(&netns.name, dir.path(), &settings.to_yaml()).await;

        let name = netns.name.clone();
        let postfix = tokio::task::spawn_blocking(move || {
            // Postfix as installed: no relayhost, no transport, its own MX lookups.
            let main_cf = |root: &std::path::Path| {
                format!("{}{}", instance_directories_cf(root), extras.main_cf)
            };
            let master_cf = format!("{INSTANCE_MASTER_CF}{}", extras.master_cf);
            Postfix::start_with(&main_cf, &master_cf, Some(&name))
        })
        .await
        .expect("start Postfix");
        TransparentLab {
            postfix,
            tlsrouter,
            _dns: dns,
            netns,
            _dir: dir,
        }
    }
}

/// What some tests add to the lab.
#[derive(Default)]
struct Extras {
    /// Lines for Postfix's main.cf and master.cf.
    main_cf: String,
    master_cf: String,
    /// tlsrouter offers STARTTLS to Postfix with this certificate.
    inbound_tls: Option<crate::support::pki::CertKey>,
    /// tlsrouter starts with this cache file.
    cache: Option<serde_json::Value>,
    /// The redirect from examples/transparent/tlsrouter.iptables instead of the nftables one.
    iptables: bool,
    /// A DNSSEC-signed tree, whose root key tlsrouter trusts, instead of the plain zone.
    signed: Option<SignedTree>,
}

/// The DNS server both Postfix and tlsrouter ask (the plain zone, or a signed tree), kept
/// as long as the lab.
type Dns = (Option<DnsServer>, Option<SignedDns>);

/// A receiving server on port 25 of address `host` of the far side.
async fn server(netns: &NetNs, host: u8, behaviour: ServerBehaviour) -> SmtpServer {
    let ip = IpAddr::V4(netns.host(host));
    SmtpServer::start(ip, 25, behaviour)
        .await
        .unwrap_or_else(|e| panic!("SMTP server on {ip}:25: {e}"))
}

/// Each domain's MX on its own address; loop.test's MX is the namespace's own address,
/// where tlsrouter's smart-host listener is.
fn zone(netns: &NetNs) -> TestZone {
    let mut zone = TestZone::new();
    for (domain, host) in [
        ("tls.test", MX_TLS),
        ("plain.test", MX_PLAIN),
        ("strict.test", MX_STRICT),
        ("reject.test", MX_REJECT),
        ("sender.test", MX_SENDER),
        ("refusing.test", MX_GREETING),
        ("small.test", MX_SMALL),
        // Their MX is elsewhere than where Postfix's static route sends them.
        ("static.test", MX_STRICT),
        ("loose.test", MX_STRICT),
        ("down.test", MX_DOWN),
        ("dsn.test", MX_DSN),
        ("drop.test", MX_DROP),
    ] {
        let mx = format!("mx.{domain}");
        zone = zone.mx(domain, 10, &mx).a(&mx, netns.host(host));
    }
    zone.mx("loop.test", 10, "mx.loop.test")
        .a("mx.loop.test", netns.inside())
        .mx("six.test", 10, "mx.six.test")
        .aaaa("mx.six.test", netns.host6(MX_TLS))
}

fn message(to: &str, subject: &str) -> String {
    format!("From: {SENDER}\nTo: {to}\nSubject: {subject}\n\nHello from Postfix.\n")
}

async fn wait_for_messages(server: &SmtpServer, n: usize, lab: &TransparentLab) -> Vec<Received> {
    lab.postfix
        .wait_for_messages(server, n, || lab.tlsrouter.log_text())
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_an_unmodified_postfix_goes_over_tls_where_offered_and_in_plain_elsewhere() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let tls_cert = ca.leaf(&["mx.tls.test"], Validity::Current);
    let tls_server = server(&netns, MX_TLS, ServerBehaviour::tls(tls_cert)).await;
    let plain_server = server(&netns, MX_PLAIN, ServerBehaviour::plain()).await;
    let mut lab = TransparentLab::start(netns, &ca, None).await;

    let (to_tls, to_plain) = ("bob@tls.test", "carol@plain.test");
    lab.postfix
        .sendmail(SENDER, &[to_tls], &message(to_tls, "over TLS"))
        .await;
    lab.postfix
        .sendmail(SENDER, &[to_plain], &message(to_plain, "in plain"))
        .await;

    let over_tls = wait_for_messages(&tls_server, 1, &lab).await;
    let in_plain = wait_for_messages(&plain_server, 1, &lab).await;
    lab.postfix.wait_for_empty_queue().await;
    // tlsrouter delivered them (its EHLO name), not Postfix past the redirect.
    assert_eq!(over_tls[0].helo, "relay.test");
    assert_eq!(in_plain[0].helo, "relay.test");
    assert_eq!(over_tls[0].rcpt_to, vec![to_tls]);
    let tls = over_tls[0].tls.as_ref().expect("delivered over TLS");
    assert_eq!(tls.version, "TLSv1.3");
    assert_eq!(in_plain[0].tls, None, "no STARTTLS offered: plain");
    // The connection made when Postfix connected carried the message, STARTTLS included.
    assert_eq!(tls_server.connections(), 1);
    assert_eq!(plain_server.connections(), 1);
    let log = lab.postfix.maillog();
    assert_eq!(log.matches("status=sent").count(), 2, "{log}");

    // The address Postfix chose is named by the domain's MX, and the certificate verified
    // for that name.
    let mut lines = [
        lab.tlsrouter.wait_for_transaction().await,
        lab.tlsrouter.wait_for_transaction().await,
    ];
    lines.sort_by_key(|l| l["mx"].as_str().unwrap_or_default().to_string());
    assert_eq!(lines[0]["mx"], "mx.plain.test", "{}", lines[0]);
    assert!(
        lines[0]["fallback"]
            .as_str()
            .is_some_and(|f| f.starts_with("no-starttls")),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1]["mx"], "mx.tls.test", "{}", lines[1]);
    assert_eq!(lines[1]["verify"], "verified", "{}", lines[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_iptables_redirect_of_the_examples_brings_postfixs_mail_through_tlsrouter_too() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let tls_cert = ca.leaf(&["mx.tls.test"], Validity::Current);
    let tls_server = server(&netns, MX_TLS, ServerBehaviour::tls(tls_cert)).await;
    let extras = Extras {
        iptables: true,
        ..Extras::default()
    };
    let lab = TransparentLab::start_with(netns, &ca, None, extras).await;

    let to = "bob@tls.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "through iptables"))
        .await;

    let over_tls = wait_for_messages(&tls_server, 1, &lab).await;
    lab.postfix.wait_for_empty_queue().await;
    // tlsrouter delivered it (its EHLO name), over TLS, not Postfix past the redirect.
    assert_eq!(over_tls[0].helo, "relay.test");
    let tls = over_tls[0].tls.as_ref().expect("delivered over TLS");
    assert_eq!(tls.version, "TLSv1.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_and_not_offered_keeps_the_message_deferred_in_postfix_with_tlsrouters_reason()
{
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let no_tls = server(&netns, MX_STRICT, ServerBehaviour::plain()).await;
    let rules = "rules:\n  - name: strict-partner\n    match: { domains: [strict.test] }\n    tls: require\n  - name: default\n";
    let lab = TransparentLab::start(netns, &ca, Some(rules)).await;

    let to = "dave@strict.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "later"))
        .await;

    let Deferral {
        message: deferred,
        reason,
    } = lab.postfix.deferral().await;
    assert!(
        reason.contains("451 4.7.5") && reason.contains("strict-partner"),
        "tlsrouter's reason, in Postfix's queue: {deferred}"
    );
    assert!(no_tls.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_through_the_transparent_listener_bounces_the_message_to_its_sender() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let rejecting = server(
        &netns,
        MX_REJECT,
        ServerBehaviour::plain().rcpt_reply("550 5.1.1 no such user here"),
    )
    .await;
    let senders_mx = server(&netns, MX_SENDER, ServerBehaviour::plain()).await;
    let lab = TransparentLab::start(netns, &ca, None).await;

    let to = "nobody@reject.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "bounce me"))
        .await;

    let bounces = wait_for_messages(&senders_mx, 1, &lab).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_eq!(bounces[0].mail_from, "", "a bounce has the null sender");
    assert_eq!(bounces[0].rcpt_to, vec![SENDER]);
    let report = String::from_utf8_lossy(&bounces[0].data);
    assert!(report.contains("550 5.1.1 no such user here"), "{report}");
    assert!(rejecting.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_data_is_retried_by_postfix_and_delivered_exactly_once() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    // The first connection breaks off in the body; later ones behave.
    let script = ServerBehaviour::plain()
        .on(Step::Body, Action::Drop)
        .on_connections_from(1, Step::Body, Action::Normal);
    let dropping = server(&netns, MX_DROP, script).await;
    let lab = TransparentLab::start(netns, &ca, None).await;

    let to = "erin@drop.test";
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
    assert!(dropping.messages().is_empty(), "nothing was accepted yet");

    let queue_id = deferred["queue_id"].as_str().expect("queue_id");
    lab.postfix.retry_now(queue_id).await;
    let accepted = wait_for_messages(&dropping, 1, &lab).await;
    lab.postfix.wait_for_empty_queue().await;

    // Out of Postfix's queue, so no further attempt can come.
    assert_eq!(dropping.messages().len(), 1, "delivered exactly once");
    assert!(
        !dropping.connection_logs()[0].final_dot,
        "the first attempt was cut off"
    );
    assert!(
        String::from_utf8_lossy(&accepted[0].data).contains("Subject: again"),
        "{accepted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_connection_to_tlsrouters_own_listener_is_refused_as_a_loop() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let mut lab = TransparentLab::start(netns, &ca, None).await;

    let to = "erin@loop.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "loop"))
        .await;

    let Deferral {
        message: deferred,
        reason,
    } = lab.postfix.deferral().await;
    assert!(
        reason.contains("451 4.4.6") && reason.contains("loop"),
        "{deferred}"
    );
    let refused = (lab.tlsrouter)
        .wait_for_event(&[("event", "redirect_loop")])
        .await;
    assert_eq!(
        refused["destination"],
        format!("{}:25", lab.netns.inside()),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remotes_554_greeting_reaches_postfix_as_the_remote_gave_it() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let refusing = server(
        &netns,
        MX_GREETING,
        ServerBehaviour::plain().greeting("554 5.7.1 no mail from this host"),
    )
    .await;
    let lab = TransparentLab::start(netns, &ca, None).await;

    let to = "frank@refusing.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "refused"))
        .await;

    let Deferral {
        message: deferred,
        reason,
    } = lab.postfix.deferral().await;
    assert!(
        reason.contains("refused to talk to me: 554 5.7.1 no mail from this host"),
        "the remote's own greeting, as Postfix saw it: {deferred}"
    );
    assert!(refusing.attempts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_sees_the_remotes_size_limit_and_bounces_a_larger_message_itself() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let small = server(
        &netns,
        MX_SMALL,
        ServerBehaviour::plain().ehlo_keyword("SIZE 1000"),
    )
    .await;
    let senders_mx = server(&netns, MX_SENDER, ServerBehaviour::plain()).await;
    let lab = TransparentLab::start(netns, &ca, None).await;

    let to = "grace@small.test";
    let big = format!("{}{}\n", message(to, "too big"), "x".repeat(2000));
    lab.postfix.sendmail(SENDER, &[to], &big).await;

    // Postfix read SIZE 1000 in the EHLO reply it got through tlsrouter and did not even
    // send MAIL FROM.
    let bounces = wait_for_messages(&senders_mx, 1, &lab).await;
    lab.postfix.wait_for_empty_queue().await;
    let report = String::from_utf8_lossy(&bounces[0].data);
    assert!(report.contains("exceeds size limit 1000"), "{report}");
    assert!(small.attempts().is_empty(), "{:?}", small.attempts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postfix_that_insists_on_tls_keeps_delivering_through_the_transparent_listener() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    // The remote itself has no TLS: the hop from Postfix to tlsrouter is encrypted as
    // Postfix demands, the hop beyond goes as tlsrouter's rules say.
    let plain_server = server(&netns, MX_PLAIN, ServerBehaviour::plain()).await;
    let extras = Extras {
        main_cf: "smtp_tls_security_level = encrypt\nsmtp_tls_loglevel = 1\n".into(),
        master_cf: "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n".into(),
        inbound_tls: Some(ca.leaf(&["mx.plain.test"], Validity::Current)),
        ..Extras::default()
    };
    let lab = TransparentLab::start_with(netns, &ca, None, extras).await;

    let to = "heidi@plain.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "encrypted hop"))
        .await;

    let got = wait_for_messages(&plain_server, 1, &lab).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_eq!(got[0].helo, "relay.test");
    assert_eq!(got[0].tls, None, "the remote offers no STARTTLS");
    let log = lab.postfix.maillog();
    assert!(
        log.contains("TLS connection established to mx.plain.test"),
        "Postfix encrypted its hop: {log}"
    );
    assert!(log.contains("status=sent"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_is_no_mx_of_the_domain_is_encrypted_but_never_verified() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let cert = ca.leaf(&["mx.tls.test"], Validity::Current);
    let tls_server = server(&netns, MX_TLS, ServerBehaviour::tls(cert)).await;
    // Postfix routes both domains to the TLS server's address, which neither publishes.
    let route = format!("smtp:[{}]", netns.host(MX_TLS));
    let extras = Extras {
        main_cf: format!("transport_maps = inline:{{ static.test={route}, loose.test={route} }}\n"),
        ..Extras::default()
    };
    let rules = "rules:\n  - name: verified-only\n    match: { domains: [static.test] }\n    tls: require\n    verify: require\n  - name: default\n";
    let mut lab = TransparentLab::start_with(netns, &ca, Some(rules), extras).await;

    let (strict, loose) = ("ivan@static.test", "judy@loose.test");
    lab.postfix
        .sendmail(SENDER, &[strict], &message(strict, "verified only"))
        .await;
    let Deferral {
        message: deferred,
        reason,
    } = lab.postfix.deferral().await;
    let addr = lab.netns.host(MX_TLS).to_string();
    assert!(
        reason.contains("451 4.7.5")
            && reason.contains("verified-only")
            && reason.contains(&format!(
                "{addr} is no MX host of static.test: the certificate cannot be verified for an MX name"
            )),
        "verification required and impossible without an MX name, and the queue says so: \
         {deferred}"
    );
    let warned = (lab.tlsrouter)
        .wait_for_event(&[
            ("event", "original_destination.unnamed"),
            ("domain", "static.test"),
        ])
        .await;
    assert_eq!(warned["level"], "WARN", "{warned}");

    lab.postfix
        .sendmail(SENDER, &[loose], &message(loose, "encrypted anyway"))
        .await;
    let got = wait_for_messages(&tls_server, 1, &lab).await;
    assert_eq!(got[0].rcpt_to, vec![loose]);
    assert!(
        got[0].tls.is_some(),
        "encrypted, as the default rule allows"
    );
    let line = loop {
        let line = lab.tlsrouter.wait_for_transaction().await;
        if line["to"] == loose {
            break line;
        }
    };
    assert_eq!(line["addr"], addr.as_str(), "{line}");
    assert_eq!(line["mx"], addr.as_str(), "no MX name: the address: {line}");
    assert!(
        line["verify"]
            .as_str()
            .is_some_and(|v| v.starts_with("cert-name-mismatch")),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_connection_of_postfix_is_delivered_to_its_original_destination_over_tls() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let cert = ca.leaf(&["mx.six.test"], Validity::Current);
    let six = SmtpServer::start(
        IpAddr::V6(netns.host6(MX_TLS)),
        25,
        ServerBehaviour::tls(cert),
    )
    .await
    .expect("SMTP server on IPv6");
    let extras = Extras {
        main_cf: "inet_protocols = all\nsmtp_address_preference = ipv6\n".into(),
        ..Extras::default()
    };
    let mut lab = TransparentLab::start_with(netns, &ca, None, extras).await;

    let to = "kim@six.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "over IPv6"))
        .await;

    let got = wait_for_messages(&six, 1, &lab).await;
    lab.postfix.wait_for_empty_queue().await;
    assert_eq!(got[0].helo, "relay.test");
    assert!(got[0].tls.is_some());
    let line = lab.tlsrouter.wait_for_transaction().await;
    assert_eq!(line["mx"], "mx.six.test", "{line}");
    assert_eq!(line["addr"], lab.netns.host6(MX_TLS).to_string(), "{line}");
    assert_eq!(line["verify"], "verified", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_original_destination_that_cannot_be_reached_is_a_temporary_failure_for_postfix() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let lab = TransparentLab::start(netns, &ca, None).await;

    let to = "leo@down.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "later"))
        .await;

    // Postfix connected (to tlsrouter) and was told at once why the remote is not there.
    let Deferral {
        message: deferred,
        reason,
    } = lab.postfix.deferral().await;
    let down = format!("{}:25", lab.netns.host(MX_DOWN));
    assert!(
        reason.contains("421 4.4.1") && reason.contains(&down),
        "{deferred}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_requests_reach_a_remote_that_offers_dsn_and_postfix_reports_relayed_to_one_that_does_not()
 {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let with_dsn = server(&netns, MX_DSN, ServerBehaviour::plain().ehlo_keyword("DSN")).await;
    let without = server(&netns, MX_PLAIN, ServerBehaviour::plain()).await;
    let senders_mx = server(&netns, MX_SENDER, ServerBehaviour::plain()).await;
    let lab = TransparentLab::start(netns, &ca, None).await;
    let dsn = ["-N", "success,delay", "-R", "hdrs", "-V", "env-42.x"];

    let to = "bob@dsn.test";
    (lab.postfix)
        .sendmail_with(&dsn, SENDER, &[to], &message(to, "tell me"))
        .await;
    let got = wait_for_messages(&with_dsn, 1, &lab).await;
    let commands = &with_dsn.connection_logs()[got[0].connection].commands;
    let sent = |verb: &str| {
        (commands.iter())
            .find(|c| c.starts_with(verb))
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        sent("MAIL FROM:").ends_with(" RET=HDRS ENVID=env-42.x"),
        "{commands:?}"
    );
    assert_eq!(
        sent("RCPT TO:"),
        format!("RCPT TO:<{to}> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;{to}"),
        "{commands:?}"
    );

    // Not offered DSN, Postfix itself tells the sender the message went to a server that
    // will not report on it, and the remote gets no DSN parameter.
    let to = "carol@plain.test";
    (lab.postfix)
        .sendmail_with(&dsn, SENDER, &[to], &message(to, "tell me too"))
        .await;
    let got = wait_for_messages(&without, 1, &lab).await;
    let commands = &without.connection_logs()[got[0].connection].commands;
    assert!(
        !(commands.iter()).any(|c| ["RET=", "ENVID=", "NOTIFY=", "ORCPT="]
            .iter()
            .any(|p| c.contains(p))),
        "{commands:?}"
    );
    let notices = wait_for_messages(&senders_mx, 1, &lab).await;
    let report = String::from_utf8_lossy(&notices[0].data);
    assert!(
        report.contains("Action: relayed") && report.contains(to),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_unreachable_entry_does_not_defer_a_message_whose_remote_was_just_reached() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let cert = ca.leaf(&["mx.tls.test"], Validity::Current);
    let tls_server = server(&netns, MX_TLS, ServerBehaviour::tls(cert)).await;
    // Learned while the server was down, and not yet expired.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let addr = netns.host(MX_TLS).to_string();
    let unreachable = json!({
        "host": "mx.tls.test", "addr": addr, "domains": ["tls.test"],
        "class": "connect-failed", "detail": "connection refused",
        "tls_version": null, "cipher": null, "cert_not_after": null,
        "first_seen": now - 60, "last_seen": now - 60, "count": 1,
        "expires_at": now + 3600, "pinned": false, "last_tls_at": null
    });
    let extras = Extras {
        cache: Some(json!({ "version": 1, "entries": [unreachable] })),
        ..Extras::default()
    };
    let lab = TransparentLab::start_with(netns, &ca, None, extras).await;
    let cached = lab.tlsrouter.ctl(&["cache", "show", "mx.tls.test"]).await;
    assert_eq!(
        cached["result"]["entries"][0]["class"], "connect-failed",
        "{cached}"
    );

    let to = "mallory@tls.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "reachable again"))
        .await;
    let got = wait_for_messages(&tls_server, 1, &lab).await;
    lab.postfix.wait_for_empty_queue().await;
    assert!(got[0].tls.is_some());
    let learned = lab.tlsrouter.ctl(&["cache", "show", "mx.tls.test"]).await;
    assert_eq!(
        learned["result"]["entries"][0]["class"], "tls-verified",
        "{learned}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_sessions_shows_where_a_redirected_connection_was_going_from_accept_on() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    // The remote keeps tlsrouter waiting for its greeting, so the session stays at accept.
    let slow = server(
        &netns,
        MX_PLAIN,
        ServerBehaviour::plain().on(Step::Greeting, Action::Hold),
    )
    .await;
    let lab = TransparentLab::start(netns, &ca, None).await;

    let to = "nina@plain.test";
    lab.postfix
        .sendmail(SENDER, &[to], &message(to, "slow greeting"))
        .await;
    let destination = format!("{}:25", lab.netns.host(MX_PLAIN));
    // tlsrouter connects to the original destination when it accepts the session, which
    // it registers first: once the remote sees the connection, the session is listed.
    slow.wait_until("tlsrouter's connection", |connections| {
        !connections.is_empty()
    })
    .await;
    let shown = lab.tlsrouter.ctl(&["sessions"]).await;
    let sessions = shown["result"]["sessions"].as_array().cloned();
    let session = (sessions.into_iter().flatten().next())
        .unwrap_or_else(|| panic!("no session shown: {shown}"));
    assert_eq!(session["state"], "greeted", "{session}");
    assert_eq!(
        session["original_destination"],
        destination.as_str(),
        "{session}"
    );

    slow.release();
    wait_for_messages(&slow, 1, &lab).await;
    lab.postfix.wait_for_empty_queue().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dane_in_force_a_failed_lookup_defers_and_nothing_goes_in_plain() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    // A server without STARTTLS, which the default rules would reach in plain.
    let plain = server(&netns, MX_PLAIN, ServerBehaviour::plain()).await;
    let addr = netns.host(MX_PLAIN);
    // Three domains in the signed tree, each with its MX host on the plain server's
    // address and a TLSA record for it; for each, one lookup that would tell whether DANE
    // applies answers SERVFAIL. Postfix reaches the two whose MX or address it cannot
    // look up either through a static route.
    let key = crate::support::pki::spki_sha256(&crate::support::pki::self_signed(&["x"]));
    let mut secure = Zone::new();
    for domain in [
        "tlsafail.test",
        "addrfail.test",
        "mxfail.test",
        "halffail.test",
    ] {
        let mx = format!("mx.{domain}");
        secure = secure
            .mx(domain, 10, &mx)
            .a(&mx, addr)
            .tlsa(&mx, 25, (3, 1, 1), &key);
    }
    // halffail.test's host has an IPv6 address too, and only its A question fails: half an
    // answer, which must not read as "not this host's address".
    let secure = secure.aaaa("mx.halffail.test", "2001:db8::25".parse().expect("IPv6"));
    let tree = SignedTree::new(secure)
        .servfail("_25._tcp.mx.tlsafail.test")
        .servfail("mx.addrfail.test")
        .servfail("mxfail.test")
        .servfail_for("mx.halffail.test", hickory_server::proto::rr::RecordType::A);
    let route = format!("smtp:[{addr}]");
    let extras = Extras {
        main_cf: format!(
            "transport_maps = inline:{{ addrfail.test={route}, mxfail.test={route}, \
             halffail.test={route} }}\n"
        ),
        signed: Some(tree),
        ..Extras::default()
    };
    let mut lab = TransparentLab::start_with(netns, &ca, None, extras).await;
    (lab.tlsrouter)
        .wait_for_event_once(&[("event", "dane"), ("dane", "on")])
        .await;

    for (to, lookup, name) in [
        ("t@tlsafail.test", "tlsa", "mx.tlsafail.test"),
        ("a@addrfail.test", "address", "mx.addrfail.test"),
        ("m@mxfail.test", "mx", "mxfail.test"),
        ("h@halffail.test", "address", "mx.halffail.test"),
    ] {
        lab.postfix
            .sendmail(SENDER, &[to], &message(to, "under DANE"))
            .await;
        let Deferral { reason, .. } = lab.postfix.deferral_of(to, "4.7.5").await;
        assert!(reason.contains("451 4.7.5"), "{to}: {reason}");
        let warned = (lab.tlsrouter)
            .wait_for_event(&[
                ("event", "dane.unknown"),
                ("lookup", lookup),
                ("name", name),
            ])
            .await;
        assert_eq!(warned["level"], "WARN", "{warned}");
    }
    assert!(plain.messages().is_empty(), "nothing in plain");
    assert!(plain.attempts().is_empty(), "not even MAIL FROM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dane_domain_never_rides_on_an_unsigned_domains_plain_route_to_the_same_address() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let plain = server(&netns, MX_PLAIN, ServerBehaviour::plain()).await;
    let addr = netns.host(MX_PLAIN);
    // signed.test's MX answer is secure and its host has a TLSA record; open.test, in a
    // zone delegated without DS, names the same host, so DANE does not bind it. Postfix
    // orders a transaction's recipients by domain: the open one comes first.
    let key = crate::support::pki::spki_sha256(&crate::support::pki::self_signed(&["x"]));
    let secure = Zone::new()
        .mx("signed.test", 10, "mx.shared.test")
        .a("mx.shared.test", addr)
        .tlsa("mx.shared.test", 25, (3, 1, 1), &key);
    let unsigned = Zone::new().mx("open.test", 10, "mx.shared.test");
    let tree = SignedTree::new(secure).insecure_zone("open.test", unsigned);
    // One next hop for Postfix, so both recipients go in one transaction.
    let route = format!("smtp:[{addr}]");
    let extras = Extras {
        main_cf: format!("transport_maps = inline:{{ signed.test={route}, open.test={route} }}\n"),
        signed: Some(tree),
        ..Extras::default()
    };
    let mut lab = TransparentLab::start_with(netns, &ca, None, extras).await;
    (lab.tlsrouter)
        .wait_for_event_once(&[("event", "dane"), ("dane", "on")])
        .await;

    let (open, dane) = ("u@open.test", "w@signed.test");
    lab.postfix
        .sendmail(SENDER, &[open, dane], &message(open, "two domains"))
        .await;

    let got = wait_for_messages(&plain, 1, &lab).await;
    assert_eq!(
        got[0].rcpt_to,
        vec![open],
        "only the unsigned domain's recipient"
    );
    assert_eq!(got[0].tls, None);
    let reason = lab.postfix.retried_alone(dane, "4.7.5").await;
    assert!(reason.contains("DANE"), "{reason}");
    assert_eq!(plain.messages().len(), 1, "nothing more arrived");
    assert!(!plain.heard_of(dane), "the remote never heard of {dane}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_from_tlsrouter_carries_the_socket_mark_as_its_mail_does() {
    let ca = TestCa::new();
    let netns = NetNs::create(HOSTS);
    let cert = ca.leaf(&["mx.tls.test"], Validity::Current);
    let tls_server = server(&netns, MX_TLS, ServerBehaviour::tls(cert)).await;
    let lab = TransparentLab::start(netns, &ca, None).await;
    // From now on only connections with tlsrouter's mark may leave for port 25.
    for rule in [
        "add table inet marked",
        "add chain inet marked out { type filter hook output priority 0 ; policy accept ; }",
        "add rule inet marked out tcp dport 25 meta mark != 0x2a reject",
    ] {
        let args: Vec<&str> = rule.split(' ').collect();
        lab.netns.run("nft", &args, "load the mark-only rule");
    }

    let probe = lab.tlsrouter.ctl(&["probe", "tls.test"]).await;
    let server_report = &probe["result"]["mx"][0]["servers"][0];
    assert_eq!(server_report["class"], "tls-verified", "{probe}");
    assert!(
        server_report["banner"]
            .as_str()
            .is_some_and(|b| b.starts_with("220")),
        "{probe}"
    );
    assert_eq!(tls_server.connections(), 1, "the probe reached the server");
}
