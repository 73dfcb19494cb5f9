//! What an admin meets when first running tlsrouter: the real binary, its messages and
//! exit statuses, `ctl` against a real daemon, and its log on a pipe.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};

use serde_json::Value;
use support::daemon::Daemon;
use support::dns::{DnsServer, TestZone};
use support::smtp_client::SmtpClient;
use support::smtp_server::{ServerBehaviour, SmtpServer};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

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

// --- ctl with a wrong --socket -----------------------------------------------------------

#[cfg(unix)]
#[test]
fn ctl_says_when_its_socket_path_is_not_a_socket() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("admin.sock");
    std::fs::write(&file, "").expect("write");
    for path in [&file, &dir.path().to_path_buf()] {
        let path = path.to_str().expect("path");
        let (code, _, err) = tlsrouter(&["ctl", "--socket", path, "stats"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(path), "{err}");
        assert!(err.contains("not a socket"), "{err}");
        assert!(!err.contains("not running"), "{err}");
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
        .filter(|event| event["level"] == "WARN")
        .filter_map(|event| event["message"].as_str().map(String::from))
        .find(|message| message.contains("fully-qualified"))
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
