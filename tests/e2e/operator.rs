//! What an admin meets when first running tlsrouter: the real binary, its messages and
//! exit statuses, `ctl` against a real daemon, and its log on a pipe.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::daemon::{Daemon, lab_config};
use crate::support::dns::{DnsServer, TestZone};
use crate::support::events::has_fields;
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_client::SmtpClient;
use crate::support::smtp_server::{ServerBehaviour, SmtpServer};
use serde_json::Value;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const BODY: &[u8] = b"Subject: operator test\r\n\r\nhello\r\n";

/// Settings for a daemon that never needs to reach a remote.
const NO_REMOTES: &str =
    "tls: { system_roots: false }\nresolver: { nameservers: [\"127.0.0.1:9\"] }\n";

/// Runs `tlsrouter ARGS` to its end: exit code, stdout, stderr.
fn tlsrouter(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
        .args(args)
        .output()
        .expect("run tlsrouter");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The same from an async test, on a blocking thread.
async fn tlsrouter_async(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tlsrouter(&args)
    })
    .await
    .expect("join")
}

fn shipped_rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/default.yaml")
}

// --- error messages ----------------------------------------------------------------------

/// How often `needle` occurs in `text`.
fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn a_missing_file_is_reported_once_with_its_cause_once() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("missing.yaml");
    let missing = missing.to_str().expect("path");
    let rules_missing = dir.path().join("with-missing-rules.yaml");
    std::fs::write(
        &rules_missing,
        format!("{NO_REMOTES}rules_file: \"{missing}\"\n"),
    )
    .expect("write");
    let rules_missing = rules_missing.to_str().expect("path");
    for args in [
        vec!["check-config", missing],
        vec!["run", "--config", missing],
        vec!["check", missing],
        vec!["explain", "--rules", missing, "--rcpt", "a@b.test"],
        vec!["probe", "b.test", "--config", missing],
        vec!["check-config", rules_missing],
    ] {
        let (code, _, err) = tlsrouter(&args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert_eq!(count(&err, "missing.yaml"), 1, "{args:?}: {err}");
        assert_eq!(count(&err, "No such file"), 1, "{args:?}: {err}");
    }
}

/// The first mistakes of a new configuration get, with file:line:column, what to type.
#[test]
fn the_first_mistakes_of_a_configuration_say_what_to_type_instead() {
    let dir = tempfile::tempdir().expect("dir");
    let cases = [
        (
            "check",
            "rules.yaml",
            "rules:\n  - name: banks\n    match: { domains: [*.bank.example] }\n    tls: require\n",
            ":3:24: ",
            "write \"*.bank.example\" instead",
        ),
        (
            "check-config",
            "tlsrouter.yaml",
            "listen: 127.0.0.1\n",
            ":1:9: ",
            "e.g. \"127.0.0.1:11025\" for a listener",
        ),
        (
            "check-config",
            "tlsrouter.yaml",
            "delivery:\n  max_mx_hostz: 3\n",
            ":2:3: ",
            "did you mean `max_mx_hosts`?",
        ),
        // A setting whose value cannot be used: at its own line, with what to do.
        (
            "check-config",
            "tlsrouter.yaml",
            &format!("{NO_REMOTES}admin:\n  group: no-such-group-here\n"),
            ":4:3: ",
            "create it (groupadd no-such-group-here)",
        ),
        (
            "check-config",
            "tlsrouter.yaml",
            &format!("{NO_REMOTES}rules_file: /nonexistent/rulez.yaml\n"),
            ":3:1: ",
            "rules_file /nonexistent/rulez.yaml: No such file",
        ),
    ];
    for (command, name, text, position, fix) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let path = path.to_str().expect("path");
        let (code, _, err) = tlsrouter(&[command, path]);
        assert_eq!(code, 64, "{err}");
        assert!(err.contains(&format!("{path}{position}")), "{err}");
        assert!(err.contains(fix), "{err}");
    }
}

/// A smart-host rule whose credential file is not there fails `check`, at the rule's line.
#[test]
fn check_names_a_missing_credential_file_of_a_smarthost_rule() {
    let dir = tempfile::tempdir().expect("dir");
    let password = dir.path().join("password");
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "rules:\n  - name: relay\n    route: {{ smarthost: \"smtp.example.test:587\", tls: require, auth: {{ username_env: U, password_file: {} }} }}\n",
            password.display()
        ),
    )
    .expect("write");
    let rules = rules.to_str().expect("path");
    let (code, _, err) = tlsrouter(&["check", rules]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{rules}:2:5: ")), "{err}");
    assert!(
        err.contains(&format!(
            "password_file {} does not exist",
            password.display()
        )),
        "{err}"
    );
    std::fs::write(&password, "secret\n").expect("write");
    let (code, out, err) = tlsrouter(&["check", rules]);
    assert_eq!(code, 0, "{err}");
    assert!(out.trim_end().ends_with("OK, 1 rule"), "{out}");
}

/// `ctl cache flush` with nothing named says what to name, --all among it, before it asks
/// any daemon; every argument of `ctl cache` and `ctl rules explain` is described in -h.
#[test]
fn ctl_cache_flush_without_a_target_names_all_and_help_describes_every_argument() {
    let (code, _, err) = tlsrouter(&["ctl", "--socket", "/nonexistent", "cache", "flush"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("<TARGET|--all>"), "{err}");
    assert!(!err.contains("not running"), "no daemon was asked: {err}");
    for command in [
        &["ctl", "cache", "list", "-h"][..],
        &["ctl", "cache", "flush", "-h"],
        &["ctl", "cache", "pin", "-h"],
        &["ctl", "rules", "explain", "-h"],
    ] {
        let (code, out, _) = tlsrouter(command);
        assert_eq!(code, 0);
        // clap lists an argument alone on its line when it has no description.
        let bare: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with('-') || l.starts_with('<'))
            .filter(|l| !l.contains("  "))
            .collect();
        assert!(
            bare.is_empty(),
            "{command:?}: undescribed {bare:?} in\n{out}"
        );
    }
}

/// `explain` and `ctl` read the daemon's configuration: its rules_file and admin.socket;
/// `--rules` and `--socket` still win, and explain says which rules answered.
#[test]
fn explain_and_ctl_take_the_rules_and_the_socket_from_the_configuration() {
    let dir = tempfile::tempdir().expect("dir");
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - name: only-in-this-file\n    match: { domains: [\"*\"] }\n    tls: require\n",
    )
    .expect("write");
    let not_a_socket = dir.path().join("admin.sock");
    std::fs::write(&not_a_socket, "").expect("write");
    let config = dir.path().join("tlsrouter.yaml");
    std::fs::write(
        &config,
        format!(
            "{NO_REMOTES}rules_file: {}\nadmin:\n  socket: {}\n",
            rules.display(),
            not_a_socket.display()
        ),
    )
    .expect("write");
    let config = config.to_str().expect("path");

    let (code, out, err) = tlsrouter(&["explain", "--config", config, "--rcpt", "a@b.test"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rule:        \"only-in-this-file\""), "{out}");
    assert!(
        out.contains(&format!("rules:       {}", rules.display())),
        "{out}"
    );
    let shipped = shipped_rules();
    let shipped = shipped.to_str().expect("path");
    let (_, out, _) = tlsrouter(&[
        "explain", "--config", config, "--rules", shipped, "--rcpt", "a@b.test",
    ]);
    assert!(!out.contains("only-in-this-file"), "--rules wins: {out}");

    let (code, _, err) = tlsrouter(&["ctl", "--config", config, "stats"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{} is not a socket", not_a_socket.display())),
        "{err}"
    );
    let (_, _, err) = tlsrouter(&[
        "ctl",
        "stats",
        "--config",
        config,
        "--socket",
        "/nonexistent.sock",
    ]);
    assert!(err.contains("/nonexistent.sock"), "--socket wins: {err}");
}

// --- ctl with a wrong --socket -----------------------------------------------------------

#[cfg(unix)]
#[test]
fn ctl_says_when_its_socket_path_is_not_a_socket() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("admin.sock");
    std::fs::write(&file, "").expect("write");
    for path in [&file, &dir.path().to_path_buf()] {
        let path = path.to_str().expect("path");
        // --socket before the command or after it.
        for args in [
            ["ctl", "--socket", path, "stats"],
            ["ctl", "stats", "--socket", path],
        ] {
            let (code, _, err) = tlsrouter(&args);
            assert_eq!(code, 2, "{args:?}: {err}");
            assert!(err.contains(path), "{err}");
            assert!(err.contains("not a socket"), "{err}");
            assert!(!err.contains("not running"), "{err}");
        }
    }
    // A path with nothing there is still "not running".
    let nothing = dir.path().join("nothing.sock");
    let (code, _, err) = tlsrouter(&["ctl", "--socket", nothing.to_str().expect("path"), "stats"]);
    assert_eq!(code, 2);
    assert!(err.contains("not running"), "{err}");
}

// --- probe's exit status -----------------------------------------------------------------

#[tokio::test]
async fn probe_exits_69_when_nothing_could_be_probed_and_0_when_a_server_answered() {
    let server = SmtpServer::start(LOCALHOST, 0, ServerBehaviour::plain())
        .await
        .expect("smtp server");
    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let zone = TestZone::new()
        .mx("partner.test", 10, "mx.partner.test")
        .a("mx.partner.test", Ipv4Addr::LOCALHOST)
        .mx("noaddress.test", 10, "mx.noaddress.test")
        .null_mx("nomail.test")
        .nxdomain_by_default();
    let dns = DnsServer::start(zone).await;
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("probe.yaml");
    std::fs::write(
        &config,
        format!(
            "resolver: {{ nameservers: [\"{}\"] }}\ntls: {{ system_roots: false }}\nadmin: {{ socket: null }}\ntimeouts: {{ connect: 5s }}\n",
            dns.addr
        ),
    )
    .expect("config");
    let probe = |domain: &str, port: u16| {
        [
            "probe",
            domain,
            "--no-tls",
            "--port",
            &port.to_string(),
            "--config",
            config.to_str().expect("path"),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
    };
    let port = server.addr().port();

    let (code, out, err) = tlsrouter_async(probe("partner.test", port)).await;
    assert_eq!(code, 0, "a server answered: {out}{err}");

    for (what, domain, port) in [
        ("no such domain", "nowhere.test", port),
        ("null MX", "nomail.test", port),
        ("MX without an address", "noaddress.test", port),
        ("nothing listening", "partner.test", closed),
    ] {
        let (code, out, err) = tlsrouter_async(probe(domain, port)).await;
        assert_eq!(code, 69, "{what}: {out}{err}");
        assert!(!out.is_empty(), "{what}: the report is still printed");
    }
    let (code, out, _) = tlsrouter_async(probe("nowhere.test", port)).await;
    assert_eq!(code, 69);
    assert!(out.contains("does not exist"), "{out}");

    let (_, help, _) = tlsrouter(&["probe", "--help"]);
    assert!(
        help.contains("69"),
        "probe --help documents the status: {help}"
    );
}

// --- colour in the log -------------------------------------------------------------------

#[cfg(unix)]
#[test]
fn the_text_log_on_a_pipe_has_no_colour_escapes() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("tlsrouter.yaml");
    std::fs::write(
        &config,
        format!(
            "{NO_REMOTES}hostname: relay.test\nlisten: 127.0.0.1:0\nadmin: {{ socket: null }}\nlog: {{ format: text }}\n"
        ),
    )
    .expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
        .args(["run", "--config", config.to_str().expect("path")])
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tlsrouter");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let listening = line.contains("tlsrouter listening");
        seen.push(line);
        if listening {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = seen.join("\n");
    assert!(log.contains("tlsrouter listening"), "{log}");
    assert!(!log.contains("\x1b["), "{log:?}");
}
/// At the default level the log has tlsrouter's own lines only. A library's warnings stay
/// out: hickory's about an answer without DNSSEC records came as Rust debug text
/// (`DnsResponse { message: ... }`), where tlsrouter's own line says it in words.
#[tokio::test]
async fn at_the_default_level_the_log_has_only_tlsrouters_own_lines() {
    let lab = crate::support::lab::Lab::new()
        .zone(crate::support::lab::one_mx_zone())
        .start_daemon()
        .await;
    let log = lab.daemon.log_text();
    let events: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let dane_off = [("event", "dane"), ("dane", "off")];
    assert!(events.iter().any(|e| has_fields(e, &dane_off)), "{log}");
    for event in &events {
        let target = event["target"].as_str().unwrap_or_default();
        assert!(target.starts_with("tlsrouter"), "not tlsrouter's: {event}");
    }
}

// --- the name in the greeting and EHLO ---------------------------------------------------

/// The name in a `220 NAME ESMTP tlsrouter` greeting.
async fn greeting_name(smtp: SocketAddr) -> String {
    let (_client, greeting) = SmtpClient::connect(smtp).await;
    assert_eq!(greeting.code, 220, "{greeting:?}");
    let text = greeting.text();
    text.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no name in {text:?}"))
        .to_string()
}

/// The message of the warning about a name that is not fully qualified, if one was logged.
fn fqdn_warning(log: &str) -> Option<String> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| has_fields(event, &[("event", "hostname.not_fqdn"), ("level", "WARN")]))
        .find_map(|event| event["message"].as_str().map(String::from))
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_host_name_that_is_not_fully_qualified_is_warned_about_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let daemon = Daemon::start(dir.path(), &format!("{NO_REMOTES}hostname: relay\n"), &[]).await;
    assert_eq!(greeting_name(daemon.smtp).await, "relay");
    let warning = fqdn_warning(&daemon.log_text());
    assert!(
        warning
            .as_ref()
            .is_some_and(|w| w.contains("\"relay\"") && w.contains("hostname:")),
        "the warning names the name used and the setting: {}",
        daemon.log_text()
    );

    let dir = tempfile::tempdir().expect("dir");
    let daemon = Daemon::start(
        dir.path(),
        &format!("{NO_REMOTES}hostname: relay.example.com\n"),
        &[],
    )
    .await;
    assert_eq!(fqdn_warning(&daemon.log_text()), None);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn the_default_name_is_the_machines_fqdn_or_a_warning_says_which_name_is_used() {
    let dir = tempfile::tempdir().expect("dir");
    let daemon = Daemon::start(dir.path(), NO_REMOTES, &[]).await;
    let name = greeting_name(daemon.smtp).await;
    let warning = fqdn_warning(&daemon.log_text());
    if name.contains('.') && !name.starts_with("localhost") {
        assert_eq!(warning, None, "{name}");
    } else {
        // This machine has no FQDN (as many containers and fresh VMs): say so at start.
        assert!(
            warning
                .as_ref()
                .is_some_and(|w| w.contains(&format!("\"{name}\""))
                    && w.contains("no fully-qualified domain name was found")
                    && w.contains("hostname:")),
            "{name}: {}",
            daemon.log_text()
        );
    }
}

// --- ctl cache pin -----------------------------------------------------------------------

/// partner.test's MX offers STARTTLS with a valid certificate; mx2.partner.test has two
/// addresses nothing listens on (it is only pinned, never connected to).
struct PinLab {
    daemon: Daemon,
    server: SmtpServer,
    _dns: DnsServer,
    _dir: tempfile::TempDir,
}

async fn pin_lab() -> PinLab {
    let ca = TestCa::new();
    let cert = ca.leaf(&["mx.partner.test"], Validity::Current);
    let server = SmtpServer::start(LOCALHOST, 0, ServerBehaviour::tls(cert))
        .await
        .expect("smtp server");
    let zone = TestZone::new()
        .mx("partner.test", 10, "mx.partner.test")
        .a("mx.partner.test", Ipv4Addr::LOCALHOST)
        .a("mx2.partner.test", Ipv4Addr::new(192, 0, 2, 1))
        .a("mx2.partner.test", Ipv4Addr::new(192, 0, 2, 2));
    let dns = DnsServer::start(zone).await;
    let dir = tempfile::tempdir().expect("dir");
    let ca_file = ca.write_ca_file(dir.path());
    let config = lab_config(dns.addr, &ca_file, server.addr().port(), &shipped_rules());
    let daemon = Daemon::start(dir.path(), &config, &[]).await;
    PinLab {
        daemon,
        server,
        _dns: dns,
        _dir: dir,
    }
}

impl PinLab {
    async fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec![
            "ctl".to_string(),
            "--socket".into(),
            self.daemon.admin_socket.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        tlsrouter_async(all).await
    }

    /// The cached (address, class, pinned) of `host`, as `ctl cache show --json` gives them.
    async fn cached(&self, host: &str) -> Vec<(String, String, bool)> {
        let shown = self.daemon.ctl(&["cache", "show", host]).await;
        let mut entries: Vec<_> = shown["result"]["entries"]
            .as_array()
            .unwrap_or_else(|| panic!("no entries in {shown}"))
            .iter()
            .map(|e| {
                (
                    e["addr"].as_str().unwrap_or_default().to_string(),
                    e["class"].as_str().unwrap_or_default().to_string(),
                    e["pinned"] == Value::Bool(true),
                )
            })
            .collect();
        entries.sort();
        entries
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn an_admin_pins_a_host_the_daemon_has_not_met_and_the_next_message_obeys_the_pin() {
    let lab = pin_lab().await;

    let (code, out, err) = lab
        .ctl(&[
            "cache",
            "pin",
            "mx.partner.test",
            "no-starttls",
            "--ttl",
            "1h",
        ])
        .await;
    assert_eq!(code, 0, "pinning a host not yet cached: {err}");
    assert!(out.contains("pinned 1"), "{out}");
    assert_eq!(
        lab.cached("mx.partner.test").await,
        [("127.0.0.1".into(), "no-starttls".into(), true)]
    );

    let (mut client, _) = SmtpClient::connect(lab.daemon.smtp).await;
    client.cmd("EHLO mta").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!(client.cmd("RCPT TO:<b@partner.test>").await.code, 250);
    assert_eq!(client.data(BODY).await.code, 250);
    let message = lab.server.next_message().await;
    assert_eq!(message.tls, None, "the pin sent it in plain");
    assert_eq!(
        lab.server.tls_handshakes_attempted(),
        0,
        "without trying STARTTLS"
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_pin_covers_every_address_of_the_host_or_the_one_the_admin_names() {
    let lab = pin_lab().await;

    let (code, out, err) = lab
        .ctl(&["cache", "pin", "mx2.partner.test", "legacy-tls"])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pinned 2"), "{out}");
    assert_eq!(
        lab.cached("mx2.partner.test").await,
        [
            ("192.0.2.1".into(), "legacy-tls".into(), true),
            ("192.0.2.2".into(), "legacy-tls".into(), true),
        ]
    );

    // A name DNS does not know, with the address given either way.
    let (code, _, err) = lab
        .ctl(&["cache", "pin", "old.partner.test[192.0.2.7]", "no-starttls"])
        .await;
    assert_eq!(code, 0, "host[address]: {err}");
    let (code, _, err) = lab
        .ctl(&[
            "cache",
            "pin",
            "older.partner.test",
            "handshake-failed",
            "--addr",
            "192.0.2.8",
        ])
        .await;
    assert_eq!(code, 0, "--addr: {err}");
    assert_eq!(
        lab.cached("old.partner.test").await,
        [("192.0.2.7".into(), "no-starttls".into(), true)]
    );
    assert_eq!(
        lab.cached("older.partner.test").await,
        [("192.0.2.8".into(), "handshake-failed".into(), true)]
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn pinning_a_host_without_addresses_says_what_to_type() {
    let lab = pin_lab().await;

    let (code, _, err) = lab
        .ctl(&["cache", "pin", "gone.partner.test", "no-starttls"])
        .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("gone.partner.test"), "{err}");
    assert!(
        err.contains("gone.partner.test[") && err.contains("--addr"),
        "the message shows how to name an address: {err}"
    );

    for bad in ["x.partner.test[not-an-ip]", "[192.0.2.7]"] {
        let (code, _, err) = lab.ctl(&["cache", "pin", bad, "no-starttls"]).await;
        assert_eq!(code, 1, "{bad}: {err}");
        assert!(err.contains(bad) && err.contains("HOST[ADDRESS]"), "{err}");
    }
}

#[test]
fn ctl_cache_pin_help_shows_both_ways_to_name_an_address() {
    let (code, out, _) = tlsrouter(&["ctl", "cache", "pin", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("HOST[ADDRESS]"), "{out}");
    assert!(out.contains("--addr"), "{out}");
    let admin =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ADMIN.md"))
            .expect("docs/ADMIN.md");
    assert!(
        admin.contains("cache pin HOST[ADDRESS] CLASS") && admin.contains("--addr"),
        "docs/ADMIN.md shows the same command"
    );
}

/// Runs the daemon with a terminal as its stderr (`script`, from util-linux, gives it one)
/// until it says it listens, stops it with SIGTERM, and returns what it wrote.
#[cfg(unix)]
fn log_on_a_terminal(no_color: Option<&str>) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("tlsrouter.yaml");
    std::fs::write(
        &config,
        format!(
            "{NO_REMOTES}hostname: relay.test\nlisten: 127.0.0.1:0\nadmin: {{ socket: null }}\nlog: {{ format: text }}\n"
        ),
    )
    .expect("write");
    let pid_file = dir.path().join("pid");
    let shell = format!(
        "echo $$ > '{}'; exec '{}' run --config '{}'",
        pid_file.display(),
        env!("CARGO_BIN_EXE_tlsrouter"),
        config.display()
    );
    let mut command = Command::new("script");
    command
        .args(["-q", "-e", "-c", &shell, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .env_remove("NO_COLOR");
    if let Some(value) = no_color {
        command.env("NO_COLOR", value);
    }
    let mut child = command.spawn().unwrap_or_else(|e| {
        panic!("cannot run script (util-linux), which gives the daemon a terminal: {e}")
    });
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref().map_while(Result::ok) {
        let listening = line.contains("tlsrouter listening");
        seen.push(line);
        if listening {
            break;
        }
    }
    if let Ok(pid) = std::fs::read_to_string(&pid_file) {
        let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
    }
    seen.extend(lines.map_while(Result::ok));
    let _ = child.wait();
    let log = seen.join("\n");
    assert!(log.contains("tlsrouter listening"), "{log}");
    log
}

#[cfg(unix)]
#[test]
fn on_a_terminal_the_log_is_coloured_unless_no_color_is_set() {
    assert!(
        log_on_a_terminal(None).contains("\x1b["),
        "a person at a terminal gets colour"
    );
    let log = log_on_a_terminal(Some("1"));
    assert!(!log.contains("\x1b["), "{log:?}");
}

/// The soft limit of open files `prlimit` gave the daemon, as the kernel has it now.
#[cfg(target_os = "linux")]
fn soft_open_files(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = (limits.lines())
        .find(|l| l.starts_with("Max open files"))
        .expect("the open files line");
    let soft = line.split_whitespace().nth(3).expect("the soft limit");
    soft.parse().expect("a number")
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
async fn the_soft_open_files_limit_is_raised_to_the_hard_one_and_a_low_one_is_warned_about() {
    // No DNSSEC check to wait for: this is about descriptors.
    let config = "tls: { system_roots: false }\nresolver: { nameservers: [\"127.0.0.1:9\"], dane: off }\nhostname: relay.example.com\n";
    let dir = tempfile::tempdir().expect("dir");
    let mut raised = Daemon::start_with_open_files(dir.path(), config, 256, 4096).await;
    assert_eq!(soft_open_files(raised.pid()), 4096);
    assert_eq!(raised.count_events(&[("event", "open_files_limit")]), 0);
    raised.signal("TERM");
    raised.wait_for_event(&[("event", "stopped")]).await;

    // 256 in all: two sockets for each of 200 sessions and a pool of 1000 do not fit.
    let dir = tempfile::tempdir().expect("dir");
    let low = Daemon::start_with_open_files(dir.path(), config, 256, 256).await;
    let warned = (low.log_text().lines())
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|e| has_fields(e, &[("event", "open_files_limit")]))
        .expect("a warning about the open files limit");
    assert_eq!(warned["limit"], 256);
    assert_eq!(warned["needed"], 2 * 200 + 1000 + 64);
}
