//! Starting and stopping: a bad configuration stops the start, SIGTERM drains the sessions
//! and saves the cache, limits on sessions hold.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::dns::{DnsServer, TestZone};
use support::pki::TestCa;
use support::proxy::test_config;
use support::smtp_client::SmtpClient;
use support::smtp_server::{ServerBehaviour, SmtpServer};
use tlsrouter::Proxy;
use tlsrouter::config::Config;
use tokio::sync::oneshot;

const BODY: &[u8] = b"Subject: drain\r\n\r\nhello\r\n";

struct Running {
    smtp: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
    server: SmtpServer,
    _dns: DnsServer,
    _dir: tempfile::TempDir,
}

async fn running(adjust: impl FnOnce(&mut Config)) -> Running {
    let ca = TestCa::new();
    let server = SmtpServer::start(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        0,
        ServerBehaviour::default(),
    )
    .await
    .expect("smtp");
    let zone = TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", Ipv4Addr::LOCALHOST);
    let dns = DnsServer::start(zone).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut config = test_config(
        dns.addr,
        &ca.write_ca_file(dir.path()),
        server.addr().port(),
    );
    adjust(&mut config);
    let proxy = Proxy::new(config).expect("proxy");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let smtp = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(tlsrouter::inbound::listener::run(listener, proxy, async {
        let _ = stopped.await;
    }));
    Running {
        smtp,
        stop: Some(stop),
        done,
        server,
        _dns: dns,
        _dir: dir,
    }
}

impl Running {
    fn shut_down(&mut self) {
        let _ = self.stop.take().expect("once").send(());
    }
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
    let mut r = running(|_| {}).await;
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
    r.done
        .await
        .expect("the listener returns once every session ended");
    assert_eq!(r.server.messages().len(), 1);
    assert!(
        tokio::net::TcpStream::connect(r.smtp).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn after_the_drain_time_remaining_sessions_get_421_and_nothing_is_delivered() {
    let mut r = running(|c| c.timeouts.shutdown_drain = Duration::from_millis(200)).await;
    let mut busy = in_transaction(r.smtp).await;

    r.shut_down();

    let bye = busy.read_reply().await;
    assert_eq!(
        (bye.code, bye.enhanced().as_deref()),
        (421, Some("4.3.2")),
        "{bye:?}"
    );
    r.done.await.expect("listener ends");
    assert!(
        r.server.messages().is_empty(),
        "no 250 was given, so the MTA keeps the message"
    );
}

#[tokio::test]
async fn sessions_beyond_the_per_client_limit_get_421_before_any_command() {
    let r = running(|c| c.limits.max_sessions_per_client = 1).await;
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

#[cfg(unix)]
#[test]
fn sigterm_stops_the_daemon_cleanly_and_saves_the_cache() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("dir");
    let cache = dir.path().join("cache.json");
    let config = dir.path().join("tlsrouter.yaml");
    let yaml = format!(
        "listen: 127.0.0.1:0\nhostname: relay.test\ntls: {{ system_roots: false }}\nresolver: {{ nameservers: [\"127.0.0.1:9\"] }}\n\
         admin: {{ socket: \"{}\" }}\ncache: {{ file: \"{}\" }}\nlog: {{ format: json }}\n",
        dir.path().join("admin.sock").display(),
        cache.display()
    );
    std::fs::write(&config, yaml).expect("write");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
        .args(["run", "--config", config.to_str().expect("path")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    // The daemon says where it listens once it is ready.
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).expect("read") > 0,
            "daemon ended early"
        );
        if line.contains("tlsrouter listening") {
            break;
        }
    }
    let event: serde_json::Value = serde_json::from_str(&line).expect("json log");
    let listen: SocketAddr = event["listen"]
        .as_str()
        .expect("listen")
        .parse()
        .expect("addr");
    let mut smtp = std::net::TcpStream::connect(listen).expect("connect");
    let mut greeting = [0u8; 3];
    std::io::Read::read_exact(&mut smtp, &mut greeting).expect("greeting");
    assert_eq!(&greeting, b"220");
    drop(smtp);

    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cache).expect("cache saved")).expect("json");
    assert_eq!(saved["version"], 1);
}

#[cfg(unix)]
#[test]
fn a_second_sigterm_exits_at_once_while_a_transaction_holds_the_drain() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("tlsrouter.yaml");
    // A long drain: only the second signal can end the daemon within the test. The log
    // format on the command line wins over the file's.
    let yaml = "listen: 127.0.0.1:0\nhostname: relay.test\ntls: { system_roots: false }\n\
                resolver: { nameservers: [\"127.0.0.1:9\"] }\nadmin: { socket: null }\n\
                timeouts: { shutdown_drain: 10m }\nlog: { format: text }\n";
    std::fs::write(&config, yaml).expect("write");
    let path = config.to_str().expect("path");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
        .args(["run", "--config", path, "--log-format", "json"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    let listen: SocketAddr = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).expect("read") > 0,
            "daemon ended early"
        );
        if line.contains("tlsrouter listening") {
            let event: serde_json::Value = serde_json::from_str(&line).expect("json");
            break event["listen"]
                .as_str()
                .expect("listen")
                .parse()
                .expect("addr");
        }
    };
    // A session inside a transaction keeps the drain waiting.
    let mut smtp = std::net::TcpStream::connect(listen).expect("connect");
    let mut reader = BufReader::new(smtp.try_clone().expect("clone"));
    let mut reply = String::new();
    let mut ask = |smtp: &mut std::net::TcpStream, command: &str| {
        smtp.write_all(command.as_bytes()).expect("send");
        loop {
            reply.clear();
            reader.read_line(&mut reply).expect("reply");
            if reply.as_bytes().get(3) != Some(&b'-') {
                return reply.clone();
            }
        }
    };
    ask(&mut smtp, "");
    assert!(ask(&mut smtp, "EHLO mta\r\n").starts_with("250"));
    assert!(ask(&mut smtp, "MAIL FROM:<a@b.test>\r\n").starts_with("250"));

    let pid = child.id().to_string();
    let term = || {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        assert!(status.expect("kill").success());
    };
    term();
    // Wait until the daemon says it is draining, then signal again.
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).expect("read") > 0,
            "daemon ended on the first signal"
        );
        if line.contains("draining") {
            break;
        }
    }
    term();
    let status = child.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(1),
        "exited at once, not after the 10 minute drain"
    );
    let mut rest = Vec::new();
    let _ = smtp.read_to_end(&mut rest);
}
