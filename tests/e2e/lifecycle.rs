//! Starting and stopping: a bad configuration stops the start, SIGTERM and SIGINT drain the
//! sessions and save the cache (which is saved periodically too), limits on sessions hold.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::support::daemon::Daemon;
use crate::support::lab::{DaemonLab, Lab, LabBuilder};
use crate::support::logs::Logs;
use crate::support::pki::{TestCa, Validity};
use crate::support::smtp_client::SmtpClient;
use crate::support::smtp_server::{ServerBehaviour, SmtpServer};

const BODY: &[u8] = b"Subject: drain\r\n\r\nhello\r\n";

/// The proxy in process, with a shutdown handle, and example.test's MX: a plain server.
async fn running(lab: impl FnOnce(LabBuilder) -> LabBuilder) -> (Lab, SmtpServer) {
    let server = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        0,
        ServerBehaviour::default(),
    )
    .await
    .expect("smtp");
    let builder = Lab::new().one_mx(&server);
    (lab(builder).start().await, server)
}

async fn in_transaction(smtp: SocketAddr) -> SmtpClient {
    let (mut client, _) = SmtpClient::connect(smtp).await;
    client.cmd("EHLO mta").await;
    client.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!(client.cmd("RCPT TO:<b@example.test>").await.code, 250);
    client
}

#[tokio::test]
async fn a_shutdown_lets_the_transaction_in_flight_finish_and_closes_idle_sessions_with_421() {
    let (mut r, server) = running(|lab| lab).await;
    let mut busy = in_transaction(r.smtp).await;
    let (mut idle, _) = SmtpClient::connect(r.smtp).await;
    idle.cmd("EHLO mta").await;

    r.shut_down();

    let bye = idle.read_reply().await;
    assert_eq!(
        (bye.code, bye.enhanced().as_deref()),
        (421, Some("4.3.2")),
        "{bye:?}"
    );
    assert!(idle.try_read_reply().await.is_none(), "then closed");
    assert_eq!(
        busy.data(BODY).await.code,
        250,
        "the message in flight is delivered"
    );
    let after = busy.read_reply().await;
    assert_eq!(after.code, 421, "and then the session is closed: {after:?}");
    r.stopped().await;
    assert_eq!(server.messages().len(), 1);
    assert!(
        tokio::net::TcpStream::connect(r.smtp).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn after_the_drain_time_remaining_sessions_get_421_and_nothing_is_delivered() {
    let (mut r, server) = running(|lab| lab.set("timeouts.shutdown_drain", "200ms")).await;
    let mut busy = in_transaction(r.smtp).await;

    r.shut_down();

    let bye = busy.read_reply().await;
    assert_eq!(
        (bye.code, bye.enhanced().as_deref()),
        (421, Some("4.3.2")),
        "{bye:?}"
    );
    r.stopped().await;
    assert!(
        server.messages().is_empty(),
        "no 250 was given, so the MTA keeps the message"
    );
}

#[tokio::test]
async fn sessions_beyond_the_per_client_limit_get_421_before_any_command() {
    let (r, _server) = running(|lab| lab.set("limits.max_sessions_per_client", 1)).await;
    let (mut first, greeting) = SmtpClient::connect(r.smtp).await;
    assert_eq!(greeting.code, 220);
    let (mut second, refused) = SmtpClient::connect(r.smtp).await;
    assert_eq!(
        (refused.code, refused.enhanced().as_deref()),
        (421, Some("4.3.2")),
        "{refused:?}"
    );
    assert!(refused.text().contains("your address"));
    assert!(second.try_read_reply().await.is_none());
    first.cmd("QUIT").await;
    drop(first);
    // The slot is free again once the first session has ended.
    let mut greeting = None;
    for _ in 0..50 {
        let (_, g) = SmtpClient::connect(r.smtp).await;
        if g.code == 220 {
            greeting = Some(g);
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        greeting.is_some(),
        "a new session is accepted after the first closed"
    );
}

/// Runs the real binary; returns its exit code and stderr.
fn tlsrouter(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
        .args(args)
        .output()
        .expect("run tlsrouter");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_configuration_stops_the_start_with_file_line_column_and_status_64() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("bad.yaml");
    std::fs::write(&config, "listen: 127.0.0.1:0\nlimits:\n  max_sesions: 5\n").expect("write");
    let (code, err) = tlsrouter(&["run", "--config", config.to_str().expect("path")]);
    assert_eq!(code, 64);
    assert!(
        err.contains("bad.yaml:3:3") && err.contains("max_sesions"),
        "{err}"
    );
    let (code, err) = tlsrouter(&["check-config", config.to_str().expect("path")]);
    assert_eq!(code, 64, "{err}");
}

#[cfg(unix)]
#[test]
fn check_config_refuses_what_run_refuses_and_run_refuses_it_before_binding_anything() {
    let dir = tempfile::tempdir().expect("dir");
    // The listen port is taken: a start that bound before checking would fail on it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let listen = taken.local_addr().expect("addr");
    let missing = dir.path().join("missing-ca.pem");
    let socket = dir.path().join("admin.sock");
    let cases = [
        (
            format!("tls: {{ ca_file: \"{}\" }}", missing.display()),
            "missing-ca.pem",
        ),
        (
            format!(
                "admin: {{ socket: \"{}\", group: no-such-group-here }}",
                socket.display()
            ),
            "no-such-group-here",
        ),
    ];
    for (yaml, named) in cases {
        let config = dir.path().join("tlsrouter.yaml");
        std::fs::write(&config, format!("listen: {listen}\n{yaml}\n")).expect("write");
        let path = config.to_str().expect("path");
        for args in [vec!["check-config", path], vec!["run", "--config", path]] {
            let (code, err) = tlsrouter(&args);
            assert_eq!(code, 64, "{args:?}: {err}");
            assert!(err.contains(named), "{args:?}: {err}");
        }
        assert!(!socket.exists(), "no admin socket was made");
    }
}

/// A first start, with no cache file yet, is told apart from a file that cannot be read:
/// information, not a warning.
#[tokio::test]
async fn a_first_start_without_a_cache_file_says_so_and_a_damaged_file_is_a_warning() {
    let (logs, _guard) = Logs::capture();
    let builder = Lab::new();
    let cache = builder.dir().join("cache.json");
    let _first = builder.set_path("cache.file", &cache).start().await;
    let events = |event: &str| logs.events_with(&[("event", event)]);
    assert_eq!(events("cache.no_file").len(), 1);
    assert_eq!(events("cache.not_loaded").len(), 0);

    let builder = Lab::new();
    let damaged = builder.dir().join("cache.json");
    std::fs::write(&damaged, "not json").expect("write");
    let _second = builder.set_path("cache.file", &damaged).start().await;
    let warned = events("cache.not_loaded");
    assert_eq!(warned.len(), 1);
    assert_eq!(warned[0]["level"], "WARN");
    assert_eq!(events("cache.no_file").len(), 1, "only the first");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_daemon_cleanly_and_saves_the_cache() {
    let builder = Lab::new();
    let cache = builder.dir().join("cache.json");
    let mut lab = builder.set_path("cache.file", &cache).start_daemon().await;
    let daemon = &mut lab.daemon;
    let (client, greeting) = SmtpClient::connect(daemon.smtp).await;
    assert_eq!(greeting.code, 220);
    drop(client);

    daemon.signal("TERM");

    let status = daemon.exit_status();
    assert!(status.success(), "{status:?}");
    assert!(
        !daemon.admin_socket.exists(),
        "a clean stop removes the admin socket"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cache).expect("cache saved")).expect("json");
    assert_eq!(saved["version"], 1);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_exits_at_once_while_a_transaction_holds_the_drain() {
    // A long drain: only the second signal can end the daemon within the test.
    let mut lab = Lab::new()
        .set("timeouts.shutdown_drain", "10m")
        .start_daemon()
        .await;
    let daemon = &mut lab.daemon;
    // A session inside a transaction keeps the drain waiting.
    let (mut client, _) = SmtpClient::connect(daemon.smtp).await;
    assert_eq!(client.cmd("EHLO mta").await.code, 250);
    assert_eq!(client.cmd("MAIL FROM:<a@b.test>").await.code, 250);

    daemon.signal("TERM");
    daemon.wait_for_event(&[("event", "shutting_down")]).await;
    daemon.signal("TERM");

    assert_eq!(
        daemon.exit_status().code(),
        Some(1),
        "exited at once, not after the 10 minute drain"
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_shutdown_waits_for_the_remotes_verdict_on_a_message_past_its_final_dot() {
    use crate::support::smtp_server::{Action, Step};
    let server = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        0,
        ServerBehaviour::plain().on(Step::EndOfData, Action::Hold),
    )
    .await
    .expect("smtp");
    let mut lab = Lab::new()
        .one_mx(&server)
        .set("timeouts.shutdown_drain", "200ms")
        .start_daemon()
        .await;
    let daemon = &mut lab.daemon;
    let mut client = in_transaction(daemon.smtp).await;
    assert_eq!(client.cmd("DATA").await.code, 354);
    client
        .send_raw(b"Subject: drain\r\n\r\nhello\r\n.\r\n")
        .await;
    // The remote has the whole message and keeps its verdict...
    server
        .wait_until("the final dot", |c| c.iter().any(|c| c.final_dot))
        .await;

    daemon.signal("TERM");

    // ...past the drain time: the daemon waits for it instead of ending the session.
    let waiting = daemon
        .wait_for_event(&[("event", "draining_verdicts")])
        .await;
    assert_eq!(
        crate::support::events::field(&waiting, "waiting").as_deref(),
        Some("1")
    );
    server.release();
    let verdict = client.read_reply().await;
    assert_eq!(
        verdict.code, 250,
        "the MTA hears the remote's 250: {verdict:?}"
    );
    daemon.wait_for_event(&[("event", "stopped")]).await;
    assert!(daemon.exit_status().success());
    assert_eq!(server.messages().len(), 1);
    assert_eq!(daemon.count_events(&[("event", "stopped_waiting")]), 0);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn sigint_stops_the_daemon_cleanly_like_sigterm() {
    let builder = Lab::new();
    let cache = builder.dir().join("cache.json");
    let mut lab = builder.set_path("cache.file", &cache).start_daemon().await;
    let daemon = &mut lab.daemon;

    daemon.signal("INT");

    // Without a handler SIGINT would kill the daemon (or, ignored, leave it running).
    daemon.wait_for_event(&[("event", "stopped")]).await;
    let status = daemon.exit_status();
    assert!(status.success(), "{status:?}");
    assert!(
        !daemon.admin_socket.exists(),
        "a clean stop removes the admin socket"
    );
    assert!(cache.exists(), "the cache is saved");
}

/// The daemon toward example.test's MX, which offers STARTTLS with a certificate from
/// `ca`; its cache in `cache.json` in the lab's directory, saved every `save_interval`, and
/// debug logging (which tells of each save).
async fn cache_lab(ca: &TestCa, save_interval: &str) -> (DaemonLab, SmtpServer, PathBuf) {
    let cert = ca.leaf(&["mx.example.test"], Validity::Current);
    let server = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        0,
        ServerBehaviour::tls(cert),
    )
    .await
    .expect("smtp");
    let builder = Lab::new().ca(ca).one_mx(&server).rules(
        r#"
            rules:
              - name: default
            "#,
    );
    let cache = builder.dir().join("cache.json");
    let lab = builder
        .set_path("cache.file", &cache)
        .set("cache.save_interval", save_interval)
        .set("log.level", "debug")
        .start_daemon()
        .await;
    (lab, server, cache)
}

async fn deliver(smtp: SocketAddr) {
    let mut client = in_transaction(smtp).await;
    assert_eq!(client.data(BODY).await.code, 250);
    client.cmd("QUIT").await;
}

/// The cache entry for mx.example.test as `ctl cache show` gives it.
async fn cached_mx(daemon: &Daemon) -> serde_json::Value {
    let shown = daemon.ctl(&["cache", "show", "mx.example.test"]).await;
    shown["result"]["entries"][0].clone()
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_running_daemon_saves_its_cache_every_save_interval_and_the_next_start_loads_it() {
    let ca = TestCa::new();
    let (mut lab, server, cache) = cache_lab(&ca, "1s").await;
    let daemon = &mut lab.daemon;
    deliver(daemon.smtp).await;
    assert_eq!(server.messages().len(), 1);

    // Saves before the delivery had nothing to save; wait for one that has the host.
    loop {
        let saved = daemon.wait_for_event(&[("event", "cache.saved")]).await;
        if saved["entries"].as_u64() > Some(0) {
            break;
        }
    }
    let text = std::fs::read_to_string(&cache).expect("cache file");
    assert!(text.contains("mx.example.test"), "{text}");
    // Still running: the file was written by the periodic save, not by a shutdown.
    assert_eq!(cached_mx(daemon).await["class"], "tls-verified");
    // Killed, not stopped: nothing is saved on the way out.
    lab.restart().await;

    let entry = cached_mx(&lab.daemon).await;
    assert_eq!(entry["class"], "tls-verified", "{entry}");
    assert_eq!(entry["domains"][0], "example.test", "{entry}");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn what_the_daemon_learned_since_the_last_save_is_saved_at_sigterm_and_known_after_a_restart()
{
    let ca = TestCa::new();
    // 0s: no periodic saves, so only the shutdown can write the file.
    let (mut lab, server, cache) = cache_lab(&ca, "0s").await;
    let daemon = &mut lab.daemon;
    deliver(daemon.smtp).await;
    assert_eq!(server.messages().len(), 1);
    assert_eq!(cached_mx(daemon).await["class"], "tls-verified");
    assert!(!cache.exists(), "nothing saved while running");

    daemon.signal("TERM");
    assert!(daemon.exit_status().success());

    lab.restart().await;
    let entry = cached_mx(&lab.daemon).await;
    assert_eq!(entry["class"], "tls-verified", "{entry}");
    assert_eq!(entry["domains"][0], "example.test", "{entry}");
}
