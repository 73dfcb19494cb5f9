//! The admin socket, `tlsrouter ctl` and `tlsrouter probe`, end to end: a running proxy, the
//! real binary as the client, and real servers to probe.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use crate::support::dns::{DnsServer, TestZone};
use crate::support::lab::{Lab, LabBuilder, ctl, ctl_json, dedent, tlsrouter};
use crate::support::metrics::{free_port, scrape, value};
use crate::support::pki::{CertKey, TestCa, Validity, self_signed};
use crate::support::smtp_client::SmtpClient;
use crate::support::smtp_server::{ServerBehaviour, SmtpServer, StartTls};
use serde_json::Value;
use tlsrouter::Proxy;
use tlsrouter::config::Config;
use tlsrouter::outcome::OutcomeClass;
use tlsrouter::probe::{ProbeTarget, probe};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const BODY: &[u8] = b"Subject: admin test\r\n\r\nhello\r\n";

/// A proxy with its admin socket in the lab's directory, example.test's MX served by
/// `behaviour`; `lab` may add to the lab.
struct Daemon {
    proxy: Arc<Proxy>,
    smtp: SocketAddr,
    socket: PathBuf,
    server: SmtpServer,
    lab: Lab,
}

async fn daemon(
    ca: &TestCa,
    behaviour: ServerBehaviour,
    lab: impl FnOnce(LabBuilder) -> LabBuilder,
) -> Daemon {
    let server = SmtpServer::start(LOCALHOST, 0, behaviour)
        .await
        .expect("smtp");
    let builder = Lab::new().ca(ca).one_mx(&server).admin();
    let lab = lab(builder).start().await;
    Daemon {
        proxy: lab.proxy.clone(),
        smtp: lab.smtp,
        socket: lab.admin_socket().to_path_buf(),
        server,
        lab,
    }
}

/// Delivers one message to b@example.test and leaves the session open.
async fn deliver_in_open_session(smtp: SocketAddr) -> SmtpClient {
    let (mut client, _) = SmtpClient::connect(smtp).await;
    client.cmd("EHLO mta").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    assert_eq!(client.data(BODY).await.code, 250);
    client
}

async fn send(smtp: SocketAddr) {
    deliver_in_open_session(smtp).await.cmd("QUIT").await;
}

/// The shipped default rule without the legacy TLS stack: a TLS 1.0-only server is then a
/// TLS failure, cached and counted as one.
const LEGACY_PLAIN: &str =
    "rules:\n  - name: default\n    match: { domains: [\"*\"] }\n    legacy_tls: plain\n";

fn tls10(ca: &TestCa) -> ServerBehaviour {
    ServerBehaviour {
        starttls: StartTls::Tls10Only(ca.leaf(&["mx.example.test"], Validity::Current)),
        ..ServerBehaviour::default()
    }
}

#[tokio::test]
async fn an_admin_lists_shows_pins_and_flushes_the_cache_with_ctl() {
    let ca = TestCa::new();
    let d = daemon(&ca, tls10(&ca), |lab| lab.rules(LEGACY_PLAIN)).await;
    send(d.smtp).await;

    let (code, table, _) = ctl(&d.socket, &["cache", "list"]).await;
    assert_eq!(code, 0);
    let header = table.lines().next().expect("header");
    for column in [
        "HOST",
        "ADDRESS",
        "DOMAINS",
        "CLASS",
        "TLS",
        "CERT EXPIRES",
        "LAST SEEN",
        "EXPIRES",
    ] {
        assert!(header.contains(column), "{column} in {header}");
    }
    let row = table.lines().nth(1).expect("one host");
    for cell in [
        "mx.example.test",
        "127.0.0.1",
        "example.test",
        "legacy-tls",
        "now",
    ] {
        assert!(row.contains(cell), "{cell} in {row}");
    }
    assert!(
        row.ends_with("in 1h") || row.ends_with("in 59m"),
        "expires in an hour: {row}"
    );

    let listed = ctl_json(&d.socket, &["cache", "list", "--class", "legacy-tls"]).await;
    assert_eq!(listed["entries"].as_array().map(Vec::len), Some(1));
    let none = ctl_json(&d.socket, &["cache", "list", "--class", "tls-verified"]).await;
    assert_eq!(none["entries"].as_array().map(Vec::len), Some(0));
    let shown = ctl_json(&d.socket, &["cache", "show", "example.test"]).await;
    assert_eq!(shown["entries"][0]["host"], "mx.example.test");

    let pinned = ctl_json(
        &d.socket,
        &[
            "cache",
            "pin",
            "mx.example.test",
            "no-starttls",
            "--ttl",
            "7d",
        ],
    )
    .await;
    assert_eq!(pinned["pinned"], 1);
    let shown = ctl_json(&d.socket, &["cache", "show", "mx.example.test"]).await;
    assert_eq!(shown["entries"][0]["class"], "no-starttls");
    assert_eq!(shown["entries"][0]["pinned"], true);
    let (_, table, _) = ctl(&d.socket, &["cache", "list"]).await;
    assert!(table.contains("[pinned]"), "{table}");

    let flushed = ctl_json(&d.socket, &["cache", "flush", "example.test"]).await;
    assert_eq!(flushed["flushed"], 1);
    let (code, _, err) = ctl(&d.socket, &["cache", "show", "mx.example.test"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("nothing cached"), "{err}");
    send(d.smtp).await;
    assert_eq!(
        ctl_json(&d.socket, &["cache", "flush", "--all"]).await["flushed"],
        1
    );
}

/// `cache pin` takes a recipient domain, as show and flush do: every address of each of
/// its MX hosts is pinned; a host DNS gives no address is named and left out.
#[tokio::test]
async fn pinning_a_domain_pins_each_of_its_mx_hosts() {
    let ca = TestCa::new();
    let zone = TestZone::new()
        .mx("partner.test", 10, "mx1.partner.test")
        .mx("partner.test", 20, "mx2.partner.test")
        .mx("partner.test", 30, "mx3.partner.test")
        .a("mx1.partner.test", Ipv4Addr::new(127, 0, 0, 1))
        .a("mx2.partner.test", Ipv4Addr::new(127, 0, 0, 2))
        .a("mx2.partner.test", Ipv4Addr::new(127, 0, 0, 3));
    let d = daemon(&ca, ServerBehaviour::default(), |lab| lab.zone(zone)).await;

    let pinned = ctl_json(
        &d.socket,
        &["cache", "pin", "partner.test", "no-starttls", "--ttl", "1h"],
    )
    .await;
    assert_eq!(pinned["pinned"], 3, "{pinned}");
    assert_eq!(pinned["domain"], "partner.test");
    let hosts: Vec<&str> = (pinned["hosts"].as_array().expect("hosts").iter())
        .filter_map(|h| h["host"].as_str())
        .collect();
    assert_eq!(hosts, ["mx1.partner.test", "mx2.partner.test"], "{pinned}");
    assert_eq!(pinned["without_address"][0]["host"], "mx3.partner.test");
    for host in ["mx1.partner.test", "mx2.partner.test"] {
        let shown = ctl_json(&d.socket, &["cache", "show", host]).await;
        for entry in shown["entries"].as_array().expect("entries") {
            assert_eq!(entry["class"], "no-starttls", "{shown}");
            assert_eq!(entry["pinned"], true, "{shown}");
        }
    }
    let (code, text, _) = ctl(&d.socket, &["cache", "pin", "partner.test", "no-starttls"]).await;
    assert_eq!(code, 0);
    assert!(
        text.starts_with("pinned 3 entries as no-starttls: the MX hosts of partner.test"),
        "{text}"
    );
    assert!(text.contains("not pinned: mx3.partner.test"), "{text}");
}

#[tokio::test]
async fn cache_list_for_a_domain_shows_only_the_hosts_that_served_it() {
    let ca = TestCa::new();
    // Two recipient domains, each with its own MX host on the same test server.
    let zone = TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", Ipv4Addr::LOCALHOST)
        .mx("other.test", 10, "mx.other.test")
        .a("mx.other.test", Ipv4Addr::LOCALHOST);
    let d = daemon(&ca, tls10(&ca), |lab| lab.zone(zone).rules(LEGACY_PLAIN)).await;
    for rcpt in ["b@example.test", "b@other.test"] {
        let (mut client, _) = SmtpClient::connect(d.smtp).await;
        client.cmd("EHLO mta").await;
        client.cmd("MAIL FROM:<a@sender.test>").await;
        assert_eq!(client.cmd(&format!("RCPT TO:<{rcpt}>")).await.code, 250);
        assert_eq!(client.data(BODY).await.code, 250);
        client.cmd("QUIT").await;
    }
    let hosts = |listed: &Value| -> Vec<String> {
        listed["entries"]
            .as_array()
            .unwrap_or_else(|| panic!("no entries in {listed}"))
            .iter()
            .map(|e| e["host"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let all = ctl_json(&d.socket, &["cache", "list"]).await;
    assert_eq!(hosts(&all), ["mx.example.test", "mx.other.test"]);

    let other = ctl_json(&d.socket, &["cache", "list", "--domain", "other.test"]).await;
    assert_eq!(hosts(&other), ["mx.other.test"]);
    let example = ctl_json(&d.socket, &["cache", "list", "--domain", "Example.Test"]).await;
    assert_eq!(hosts(&example), ["mx.example.test"]);
    let (code, table, err) = ctl(&d.socket, &["cache", "list", "--domain", "other.test"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("mx.other.test") && !table.contains("mx.example.test"),
        "{table}"
    );
}

#[tokio::test]
async fn a_delivery_over_tls_caches_the_certificate_subject_and_expiry() {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let expires = cert.not_after.to_string();
    let d = daemon(&ca, tls(cert), |lab| lab).await;
    send(d.smtp).await;

    let (code, table, err) = ctl(&d.socket, &["cache", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let header = table.lines().next().expect("header");
    assert!(header.contains("CERT SUBJECT"), "{header}");
    let row = table.lines().nth(1).expect("one host");
    for cell in ["tls-verified", "CN=mx.example.test", expires.as_str()] {
        assert!(row.contains(cell), "{cell} in {row}");
    }

    let shown = ctl_json(&d.socket, &["cache", "show", "mx.example.test"]).await;
    let entry = &shown["entries"][0];
    assert_eq!(entry["cert_subject"], "CN=mx.example.test");
    assert_eq!(entry["cert_not_after"], expires.as_str());
}

#[tokio::test]
async fn json_may_follow_the_command() {
    let ca = TestCa::new();
    let d = daemon(&ca, tls10(&ca), |lab| lab.rules(LEGACY_PLAIN)).await;
    send(d.smtp).await;
    for args in [
        &["cache", "list", "--json"][..],
        &["cache", "--json", "show", "example.test"],
        &["--json", "cache", "list"],
    ] {
        let (code, out, err) = ctl(&d.socket, args).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        let answer: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            answer["result"]["entries"][0]["class"], "legacy-tls",
            "{args:?}"
        );
    }
}

#[tokio::test]
async fn an_admin_reads_reloads_and_explains_the_rules_with_ctl() {
    let ca = TestCa::new();
    let d = daemon(&ca, ServerBehaviour::default(), |lab| {
        lab.rules(
            r#"
            rules:
              - name: everyone
                match: { domains: ["*"] }
                min_tls: "1.3"
                fallback_on: [no-starttls]
            "#,
        )
    })
    .await;
    let rules_file = d.lab.rules_file();

    let (code, table, _) = ctl(&d.socket, &["rules", "show"]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("everyone") && table.contains("domains=*"),
        "{table}"
    );
    // Every setting as the rule file spells it.
    for setting in [
        "tls=opportunistic",
        "verify=try",
        "min_tls=1.3",
        "legacy_tls=encrypt",
        "fallback_on=no-starttls",
    ] {
        assert!(table.contains(setting), "{setting} in {table}");
    }

    std::fs::write(
        rules_file,
        dedent(
            r#"
                rules:
                  - name: broken
                    tls: sometimes
            "#,
        ),
    )
    .expect("write");
    let (code, _, err) = ctl(&d.socket, &["rules", "reload"]).await;
    assert_eq!(code, 1, "a bad file is refused");
    assert!(
        err.contains("rules.yaml:3:10"),
        "names file, line, column: {err}"
    );
    assert_eq!(
        d.proxy.router.rules().rules()[0].name,
        "everyone",
        "old rules stay"
    );

    std::fs::write(
        rules_file,
        dedent(
            r#"
                rules:
                  - name: nobank
                    match: { domains: ["*.bank.test"] }
                    tls: require
            "#,
        ),
    )
    .expect("write");
    let (code, out, _) = ctl(&d.socket, &["rules", "reload"]).await;
    assert_eq!((code, out.trim()), (0, "rules reloaded: 1 rule in force"));
    let (code, out, _) = ctl(&d.socket, &["rules", "explain", "--rcpt", "u@mx.bank.test"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("\"nobank\"") && out.contains("required"),
        "{out}"
    );
}

#[tokio::test]
async fn stats_and_sessions_count_what_happened() {
    let ca = TestCa::new();
    let d = daemon(&ca, tls10(&ca), |lab| lab.rules(LEGACY_PLAIN)).await;
    send(d.smtp).await;
    // A session left open shows in `sessions`.
    let (mut open, _) = SmtpClient::connect(d.smtp).await;
    open.cmd("EHLO mta").await;

    let stats = ctl_json(&d.socket, &["stats"]).await;
    assert_eq!(stats["transactions"], 1);
    assert_eq!(stats["delivered_plain"], 1);
    assert_eq!(stats["fallbacks"], serde_json::json!([["legacy-tls", 1]]));
    assert_eq!(stats["cache_entries"], 1);
    let (_, text, _) = ctl(&d.socket, &["stats"]).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("fallback legacy-tls"))
        .expect("fallback line");
    assert!(line.ends_with(" 1"), "{text}");

    let sessions = ctl_json(&d.socket, &["sessions"]).await;
    let list = sessions["sessions"].as_array().expect("list");
    assert_eq!(list.len(), 1, "{sessions}");
    assert_eq!(list[0]["state"], "ready");
    let (_, table, _) = ctl(&d.socket, &["sessions"]).await;
    assert!(
        table.starts_with("ID") && table.contains("ready"),
        "{table}"
    );
}

#[tokio::test]
async fn a_host_pinned_as_lacking_starttls_gets_no_starttls_and_a_tls_rule_defers_its_mail() {
    let ca = TestCa::new();
    let rules = r#"
        rules:
          - name: secure
            match: { senders: [secure.test] }
            tls: require
          - name: default
            match: { domains: ["*"] }
    "#;
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let d = daemon(&ca, tls(cert), |lab| lab.rules(rules)).await;
    send(d.smtp).await;
    assert!(d.server.messages()[0].tls.is_some(), "over TLS at first");

    ctl_json(
        &d.socket,
        &[
            "cache",
            "pin",
            "mx.example.test",
            "no-starttls",
            "--ttl",
            "1h",
        ],
    )
    .await;
    send(d.smtp).await;
    assert!(
        d.server.messages()[1].tls.is_none(),
        "the operator's pin decides: no STARTTLS"
    );

    let (mut client, _) = SmtpClient::connect(d.smtp).await;
    client.cmd("EHLO mta").await;
    client.cmd("MAIL FROM:<a@secure.test>").await;
    let rcpt = client.cmd("RCPT TO:<b@example.test>").await;
    assert_eq!(rcpt.code, 451, "{rcpt:?}");
    assert_eq!(rcpt.enhanced().as_deref(), Some("4.7.5"), "{rcpt:?}");
    client.cmd("RSET").await;

    assert_eq!(d.server.messages().len(), 2, "nothing went in plain");
    let stats = ctl_json(&d.socket, &["stats"]).await;
    assert_eq!(stats["deferrals"], 1, "{stats}");
    assert_eq!(stats["cache_hits"], 2, "{stats}");
}

#[tokio::test]
async fn bad_requests_get_structured_errors_and_the_socket_stays_up() {
    let ca = TestCa::new();
    let d = daemon(&ca, ServerBehaviour::default(), |lab| lab).await;
    let stream = tokio::net::UnixStream::connect(&d.socket)
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    for (request, kind) in [
        ("this is not json", "bad-json"),
        (r#"{"command":"reboot"}"#, "unknown-command"),
        (r#"{"command":"cache-pin","host":"x"}"#, "bad-arguments"),
        (
            r#"{"command":"cache-pin","host":"x","class":"no-starttls","ttl":"soon"}"#,
            "bad-arguments",
        ),
        (r#"{"command":"cache-flush"}"#, "bad-arguments"),
        (r#"{"command":"probe"}"#, "bad-arguments"),
        (r#"{"command":"probe","no_tls":true}"#, "bad-arguments"),
    ] {
        write
            .write_all(format!("{request}\n").as_bytes())
            .await
            .expect("write");
        let answer: Value =
            serde_json::from_str(&lines.next_line().await.expect("read").expect("line"))
                .expect("json");
        assert_eq!(answer["ok"], false);
        assert_eq!(answer["error"]["kind"], kind, "{request}: {answer}");
    }
    write
        .write_all(b"{\"command\":\"stats\"}\n")
        .await
        .expect("write");
    let answer: Value =
        serde_json::from_str(&lines.next_line().await.expect("read").expect("line")).expect("json");
    assert_eq!(answer["ok"], true, "same connection still served");
}

#[cfg(unix)]
#[tokio::test]
async fn the_socket_is_0660_a_stale_one_is_replaced_and_a_plain_file_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let ca = TestCa::new();
    let d = daemon(&ca, ServerBehaviour::default(), |lab| lab).await;
    let mode = std::fs::metadata(&d.socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    // A socket nobody listens on any more (as after a crash) is replaced.
    let stale = d.lab.dir().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists(), "a closed listener leaves its file behind");
    let _again = daemon(&ca, ServerBehaviour::default(), |lab| {
        lab.set_path("admin.socket", &stale)
    })
    .await;
    assert_eq!(ctl_json(&stale, &["stats"]).await["transactions"], 0);

    let file = d.lab.dir().join("not-a-socket");
    std::fs::write(&file, "data").expect("write");
    let mut config = Config::default();
    config.admin.socket = Some(file.clone());
    config.tls.system_roots = false;
    let proxy = Proxy::new(config).expect("proxy");
    let err = tlsrouter::admin::start(&proxy).await.expect_err("refused");
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).expect("kept"), "data");
}

#[cfg(unix)]
#[tokio::test]
async fn the_socket_gets_the_configured_group_for_admins_who_are_not_root() {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self").expect("/proc/self");
    if me.uid() != 0 {
        eprintln!("skipped: only root may give the socket to another group");
        return;
    }
    // A group the test process is not in, so the socket can only have it from the setting.
    let group = if me.gid() == 4242 { 4243 } else { 4242 };
    let ca = TestCa::new();
    let d = daemon(&ca, ServerBehaviour::default(), |lab| {
        lab.set("admin.group", group.to_string())
    })
    .await;
    assert_eq!(std::fs::metadata(&d.socket).expect("socket").gid(), group);
    assert_eq!(ctl_json(&d.socket, &["stats"]).await["transactions"], 0);
}

#[cfg(unix)]
#[tokio::test]
async fn a_second_daemon_does_not_take_the_socket_of_a_running_one() {
    let ca = TestCa::new();
    let first = daemon(&ca, ServerBehaviour::default(), |lab| lab).await;
    send(first.smtp).await;

    let mut config = Config::default();
    config.admin.socket = Some(first.socket.clone());
    config.tls.system_roots = false;
    let second = Proxy::new(config).expect("proxy");
    let err = tlsrouter::admin::start(&second).await.expect_err("refused");
    let message = err.to_string();
    assert!(
        message.contains(&first.socket.display().to_string())
            && message.contains("another running tlsrouter"),
        "{message}"
    );
    assert_eq!(
        ctl_json(&first.socket, &["stats"]).await["transactions"],
        1,
        "the socket still reaches the first daemon"
    );
}

#[tokio::test]
async fn ctl_says_clearly_when_the_daemon_is_not_running() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("nothing.sock");
    let (code, _, err) = ctl(&socket, &["stats"]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("not running") && err.contains("nothing.sock"),
        "{err}"
    );
}

/// An admin outside the socket's group is told that, not that tlsrouter is not running.
/// Run as `nobody` (through `setpriv`, so the test runs as root, as CI does).
#[tokio::test]
async fn ctl_run_by_a_user_outside_the_sockets_group_is_told_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    let ca = TestCa::new();
    let d = daemon(&ca, ServerBehaviour::default(), |lab| lab).await;
    // The lab's folder open to everyone; the socket itself stays 0660, root's.
    let open = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(d.lab.dir(), open).expect("chmod the lab's folder");
    let socket = d.socket.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .args([
                env!("CARGO_BIN_EXE_tlsrouter"),
                "ctl",
                "--socket",
                &socket,
                "stats",
            ])
            .output()
    })
    .await
    .expect("join")
    .expect("setpriv (util-linux) runs; this test needs root to become nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied on the admin socket") && !err.contains("not running"),
        "{err}"
    );
    assert_ne!(out.status.code(), Some(0));
}

#[tokio::test]
async fn the_metrics_endpoint_serves_the_same_counters_in_prometheus_format() {
    let ca = TestCa::new();
    let port = free_port();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let d = daemon(&ca, tls(cert), |lab| {
        lab.set("metrics.listen", format!("127.0.0.1:{port}"))
            .rules(LEGACY_PLAIN)
    })
    .await;
    // One message over verified TLS; then the operator pins the host as legacy-tls, so the
    // next message is decided from the cache and goes in plain. Both sessions stay open.
    let _verified = deliver_in_open_session(d.smtp).await;
    let pinned = d.proxy.outbound.cache.pin(
        "mx.example.test",
        None,
        OutcomeClass::LegacyTls,
        std::time::Duration::from_secs(3600),
    );
    assert_eq!(pinned.ok(), Some(1));
    let _plain = deliver_in_open_session(d.smtp).await;

    let text = scrape(port).await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    let value = |name: &str| value(&text, name);
    for (name, expected) in [
        ("tlsrouter_sessions_total", 2.0),
        ("tlsrouter_active_sessions", 2.0),
        ("tlsrouter_transactions_total", 2.0),
        ("tlsrouter_delivered_total{route=\"tls-verified\"}", 1.0),
        ("tlsrouter_delivered_total{route=\"plain\"}", 1.0),
        ("tlsrouter_fallbacks_total{class=\"legacy-tls\"}", 1.0),
        ("tlsrouter_cache_hits_total", 1.0),
        ("tlsrouter_cache_entries", 1.0),
        ("tlsrouter_transaction_seconds_count", 2.0),
        ("tlsrouter_handshake_seconds_count", 1.0),
    ] {
        assert_eq!(value(name), expected, "{name}");
    }
    assert!(
        !text.contains("route=\"tls-unverified\""),
        "no unverified delivery: {text}"
    );
}

// --- probe -------------------------------------------------------------------------------

/// Probes example.test with `behaviour` serving its MX, as `tlsrouter probe` does.
async fn probe_one(
    ca: &TestCa,
    behaviour: ServerBehaviour,
) -> tlsrouter::probe::report::ServerReport {
    let d = daemon(ca, behaviour, |lab| lab).await;
    let target = ProbeTarget {
        domain: Some("example.test".into()),
        ..ProbeTarget::default()
    };
    let report = probe(
        &d.proxy.outbound,
        &d.proxy.router.rules(),
        &d.proxy.policies,
        &target,
        false,
    )
    .await;
    assert_eq!(report.mx[0].host, "mx.example.test");
    assert_eq!(report.mx[0].preference, 10);
    assert_eq!(report.rule.as_deref(), Some("default"));
    let mut server = report.mx.into_iter().next().expect("mx").servers;
    let server = server.remove(0);
    assert!(
        server
            .banner
            .as_deref()
            .unwrap_or("")
            .contains("220 mx.test"),
        "{server:?}"
    );
    assert!(server.timings_ms.iter().any(|(step, _)| step == "ehlo"));
    server
}

fn tls(cert: CertKey) -> ServerBehaviour {
    ServerBehaviour {
        starttls: StartTls::Rustls(cert),
        ..ServerBehaviour::default()
    }
}

#[tokio::test]
async fn probe_shows_a_valid_certificate_its_chain_and_days_left() {
    let ca = TestCa::new();
    let cert = ca.leaf(
        &["mx.example.test", "192.0.2.7", "2001:db8::25"],
        Validity::Current,
    );
    let s = probe_one(&ca, tls(cert)).await;
    assert_eq!(s.class, Some(OutcomeClass::TlsVerified));
    assert!(s.starttls_offered && s.ehlo.contains(&"STARTTLS".to_string()));
    let t = s.tls.expect("tls");
    assert_eq!(t.version, "TLSv1.3");
    assert!(t.verified && t.problem.is_none());
    assert_eq!(
        t.certificates[0].sans,
        ["mx.example.test", "192.0.2.7", "2001:db8::25"]
    );
    assert!(t.certificates[0].issuer.contains("tlsrouter test CA"));
    assert!(
        (363..=365).contains(&t.certificates[0].days_left),
        "{}",
        t.certificates[0].days_left
    );
    assert!(
        !t.ehlo_after_tls.contains(&"STARTTLS".to_string()),
        "EHLO after TLS"
    );
}

#[tokio::test]
async fn probe_names_each_certificate_problem() {
    let ca = TestCa::new();
    let cases = [
        (
            ca.leaf(&["mx.example.test"], Validity::Expired),
            OutcomeClass::CertExpired,
            "certificate expired",
        ),
        (
            ca.leaf(&["mx.example.test"], Validity::NotYetValid),
            OutcomeClass::CertNotYetValid,
            "not valid before",
        ),
        (
            self_signed(&["mx.example.test"]),
            OutcomeClass::CertUntrusted,
            "untrusted",
        ),
        (
            ca.leaf(&["other.example.test"], Validity::Current),
            OutcomeClass::CertNameMismatch,
            "other.example.test",
        ),
    ];
    for (cert, class, says) in cases {
        let s = probe_one(&ca, tls(cert)).await;
        assert_eq!(s.class, Some(OutcomeClass::TlsUnverified));
        let t = s.tls.expect("tls");
        let problem = t.problem.expect("a problem");
        assert!(
            problem.starts_with(class.name()) && problem.contains(says),
            "{problem}"
        );
        if class == OutcomeClass::CertExpired {
            assert!(t.certificates[0].days_left < 0);
            assert!(
                problem.contains(&t.certificates[0].not_after),
                "the same date: {problem}"
            );
        }
    }
}

#[cfg(feature = "legacy-tls")]
#[tokio::test]
async fn probe_turns_to_the_legacy_stack_where_delivery_would_and_shows_what_it_negotiated() {
    let ca = TestCa::new();
    let behaviour = ServerBehaviour {
        starttls: StartTls::Tls10Only(ca.leaf(&["mx.example.test"], Validity::Current)),
        ..ServerBehaviour::default()
    };
    let s = probe_one(&ca, behaviour).await;
    // What rustls found first stays in the report.
    let legacy = s.legacy.as_ref().expect("the legacy stack was tried");
    assert!(legacy.rustls.starts_with("legacy-tls ("), "{legacy:?}");
    assert!(legacy.rustls.contains("ProtocolVersion"), "{legacy:?}");
    assert_eq!(legacy.version.as_deref(), Some("TLSv1.0"), "{legacy:?}");
    assert!(
        legacy.cipher.as_deref().is_some_and(|c| !c.is_empty()),
        "{legacy:?}"
    );
    assert_eq!(s.class, Some(OutcomeClass::TlsLegacy));
    let decision = s.decision.as_deref().expect("decision");
    assert!(decision.contains("legacy"), "{decision}");
    let text = tlsrouter::probe::render(&tlsrouter::probe::ProbeReport {
        domain: None,
        dns_error: None,
        mx: vec![tlsrouter::probe::report::MxReport {
            host: "mx.example.test".into(),
            preference: 10,
            addresses: Vec::new(),
            error: None,
            in_policy: None,
            servers: vec![s],
            dnssec: None,
            tlsa: None,
        }],
        rule: None,
        plan: None,
        mta_sts: None,
        dane: None,
        mx_dnssec: None,
    });
    assert!(text.contains("    legacy:   TLSv1.0 "), "{text}");
    assert!(text.contains("    rustls:   legacy-tls ("), "{text}");
}

#[tokio::test]
async fn probe_classifies_servers_that_give_no_tls() {
    let ca = TestCa::new();
    let cases = [
        (
            StartTls::NotOffered,
            OutcomeClass::NoStarttls,
            "no STARTTLS",
        ),
        (
            StartTls::AbortAfter220,
            OutcomeClass::HandshakeFailed,
            "handshake",
        ),
        (
            StartTls::InjectAfter220,
            OutcomeClass::ProtocolViolation,
            "after the STARTTLS 220",
        ),
    ];
    for (starttls, class, says) in cases {
        let behaviour = ServerBehaviour {
            starttls,
            ..ServerBehaviour::default()
        };
        let s = probe_one(&ca, behaviour).await;
        assert_eq!(s.class, Some(class));
        let detail = s.detail.expect("detail");
        assert!(detail.contains(says), "{class}: {detail}");
        assert!(s.tls.is_none());
    }
}

#[tokio::test]
async fn probe_names_the_rule_each_server_gets_for_what_was_found_there() {
    let ca = TestCa::new();
    let rules = r#"
        rules:
          - name: old-servers
            match: { domains: ["*"], outcome: [legacy-tls] }
          - name: expired-certificates
            match: { domains: ["*"], outcome: [cert-expired] }
          - name: this-mx
            match: { domains: ["*"], mx: [mx.example.test] }
            verify: require
          - name: everyone
            match: { domains: ["*"] }
    "#;
    let cases = [
        (tls10(&ca), "old-servers"),
        (
            tls(ca.leaf(&["mx.example.test"], Validity::Expired)),
            "expired-certificates",
        ),
        (
            tls(ca.leaf(&["mx.example.test"], Validity::Current)),
            "this-mx",
        ),
    ];
    for (behaviour, expected) in cases {
        let d = daemon(&ca, behaviour, |lab| lab.rules(rules)).await;
        let target = ProbeTarget {
            domain: Some("example.test".into()),
            ..ProbeTarget::default()
        };
        let report = probe(
            &d.proxy.outbound,
            &d.proxy.router.rules(),
            &d.proxy.policies,
            &target,
            false,
        )
        .await;
        assert_eq!(
            report.rule.as_deref(),
            Some("everyone"),
            "before any server is known"
        );
        let server = &report.mx[0].servers[0];
        assert_eq!(server.rule.as_deref(), Some(expected), "{server:?}");
        let plan = server.plan.as_deref().unwrap_or("");
        assert!(plan.contains(&format!("{expected:?}")), "{plan}");

        let (code, out, err) = ctl(&d.socket, &["probe", "example.test"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(&format!(
                "rule:     {expected:?} for a message through this server"
            )),
            "{out}"
        );
    }
}

#[tokio::test]
async fn probe_from_the_command_line_prints_every_step_and_json_for_scripts() {
    let ca = TestCa::new();
    let d = daemon(
        &ca,
        tls(ca.leaf(&["mx.example.test"], Validity::Expired)),
        |lab| lab,
    )
    .await;
    let config = d.lab.dir().join("probe.yaml");
    let dns = d.proxy.config.resolver.nameservers[0];
    let yaml = format!(
        "resolver: {{ nameservers: [\"{dns}\"] }}\ntls: {{ ca_file: \"{}\", system_roots: false }}\ndelivery: {{ port: {} }}\nadmin: {{ socket: null }}\n",
        d.lab.dir().join("ca.pem").display(),
        d.server.addr().port()
    );
    std::fs::write(&config, yaml).expect("config");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "probe".to_string(),
            "example.test".into(),
            "--config".into(),
            config.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let (code, _, err) = tlsrouter(vec!["probe".into()]).await;
    assert_eq!(code, 2, "nothing to probe is a usage error: {err}");
    assert!(err.contains("nothing to probe"), "{err}");
    let (code, out, err) = tlsrouter(args(&[])).await;
    assert_eq!(code, 0, "{err}");
    for line in [
        "MX mx.example.test (preference 10): 127.0.0.1",
        "banner:   220 mx.test",
        "STARTTLS offered",
        "tls:      TLSv1.3",
        "verify:   cert-expired: certificate expired",
        "days left",
        "outcome:  tls-unverified",
        "rule \"default\"",
    ] {
        assert!(out.contains(line), "{line:?} missing in\n{out}");
    }
    let (code, out, _) = tlsrouter(args(&["--json"])).await;
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(json["mx"][0]["servers"][0]["class"], "tls-unverified");

    let (code, out, _) = tlsrouter(args(&["--no-tls"])).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("STARTTLS offered") && !out.contains("tls:      TLS"),
        "{out}"
    );
}

#[tokio::test]
async fn probe_mx_checks_one_server_on_the_given_port_without_a_domain_and_no_tls_stops_after_ehlo()
{
    let ca = TestCa::new();
    let server = SmtpServer::start(
        LOCALHOST,
        0,
        tls(ca.leaf(&["mail.partner.test"], Validity::Current)),
    )
    .await
    .expect("smtp");
    // The server's name resolves, but no domain has it as MX.
    let dns = DnsServer::start(TestZone::new().a("mail.partner.test", Ipv4Addr::LOCALHOST)).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("probe.yaml");
    // No delivery port: only --port leads to the server.
    let yaml = format!(
        "resolver: {{ nameservers: [\"{}\"] }}\ntls: {{ ca_file: \"{}\", system_roots: false }}\nadmin: {{ socket: null }}\n",
        dns.addr,
        ca.write_ca_file(dir.path()).display()
    );
    std::fs::write(&config, yaml).expect("config");
    let port = server.addr().port().to_string();
    let probe_json = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "probe",
            "--mx",
            "mail.partner.test",
            "--port",
            &port,
            "--json",
            "--config",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.push(config.display().to_string());
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };

    let (code, out, err) = tlsrouter(probe_json(&[])).await;
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(report["domain"], Value::Null, "{report}");
    assert_eq!(report["mx"].as_array().map(Vec::len), Some(1), "{report}");
    assert_eq!(report["mx"][0]["host"], "mail.partner.test");
    let s = &report["mx"][0]["servers"][0];
    assert_eq!(s["addr"], format!("127.0.0.1:{port}"), "{s}");
    assert_eq!(s["class"], "tls-verified", "{s}");
    assert_eq!(s["tls"]["version"], "TLSv1.3", "{s}");
    assert_eq!(server.tls_handshakes_attempted(), 1);

    let (code, out, err) = tlsrouter(probe_json(&["--no-tls"])).await;
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).expect("json");
    let s = &report["mx"][0]["servers"][0];
    assert!(
        s["banner"].as_str().is_some_and(|b| b.contains("220")),
        "{s}"
    );
    assert_eq!(s["starttls_offered"], true, "EHLO was read: {s}");
    assert_eq!(s["tls"], Value::Null, "{s}");
    assert_eq!(s["class"], Value::Null, "{s}");
    let steps: Vec<&str> = s["timings_ms"]
        .as_array()
        .expect("timings")
        .iter()
        .filter_map(|t| t[0].as_str())
        .collect();
    assert_eq!(steps.last(), Some(&"ehlo"), "{s}");
    assert_eq!(server.tls_handshakes_attempted(), 1, "no second handshake");
}

#[tokio::test]
async fn ctl_probe_runs_from_the_daemon_and_fills_its_cache() {
    let ca = TestCa::new();
    let d = daemon(&ca, tls10(&ca), |lab| lab).await;
    let (code, out, err) = ctl(&d.socket, &["probe", "example.test"]).await;
    assert_eq!(code, 0, "{err}");
    // rustls found a TLS 1.0-only server; the legacy stack then reached it, as delivery
    // would, and the cache holds what delivery would have learned.
    assert!(out.contains("rustls:   legacy-tls ("), "{out}");
    assert!(out.contains("outcome:  tls-legacy"), "{out}");
    let shown = ctl_json(&d.socket, &["cache", "show", "mx.example.test"]).await;
    assert_eq!(shown["entries"][0]["class"], "tls-legacy");
    assert_eq!(d.server.messages().len(), 0, "a probe sends no message");

    let (code, out, _) = ctl(&d.socket, &["--json", "probe"]).await;
    assert_eq!(code, 1, "nothing to probe is refused: {out}");
    let answer: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(answer["ok"], false);
    assert_eq!(answer["error"]["kind"], "bad-arguments");
    let (code, _, err) = ctl(&d.socket, &["probe"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("nothing to probe"), "{err}");
}

#[tokio::test]
async fn clients_holding_metrics_connections_open_are_cut_off_and_a_scrape_still_works() {
    let ca = TestCa::new();
    let port = free_port();
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let _d = daemon(&ca, tls(cert), |lab| {
        lab.set("metrics.listen", format!("127.0.0.1:{port}"))
    })
    .await;
    // Many more than are served at once, each saying nothing.
    let mut held = Vec::new();
    for _ in 0..(4 * tlsrouter::admin::metrics::MAX_CONNECTIONS) {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        held.push(stream);
    }
    // Each is closed by the endpoint: at once beyond the limit, after the deadline within.
    let bound = tlsrouter::admin::metrics::DEADLINE * 4;
    for mut stream in held {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(bound, stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a held connection was not closed: {read:?}"
        );
    }
    let text = scrape(port).await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
}
