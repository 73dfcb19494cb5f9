//! The one lab builder: a real DNS server with the test's zone, a CA the proxy trusts (and
//! no other), a rule file, settings, and the real proxy, either in this process or as the
//! `tlsrouter` binary:
//!
//! ```ignore
//! let lab = Lab::new()
//!     .ca(&ca)
//!     .zone(one_mx_zone())
//!     .mx_port(server.addr().port())
//!     .rules(r#"
//!         rules:
//!           - name: default
//!             match: { domains: ["*"] }
//!     "#)
//!     .admin()
//!     .start()
//!     .await;
//! ```
//!
//! `start` runs the proxy in this process (the test can reach `lab.proxy`, stop it with
//! `lab.shut_down()`); `start_daemon` runs `tlsrouter run` with the same settings written
//! to its configuration file.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tlsrouter::Proxy;
use tlsrouter::config::Config;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::daemon::Daemon;
use super::dns::{DnsServer, TestZone};
use super::pki::TestCa;
use super::settings::{Settings, path};
use super::smtp_server::SmtpServer;
use super::wine::Wine;

/// example.test has one MX, mx.example.test, on 127.0.0.1.
pub fn one_mx_zone() -> TestZone {
    TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", Ipv4Addr::LOCALHOST)
}

/// Text for a file, with its indentation removed: rule files written in a test as raw
/// strings indented like the code around them.
pub fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text.lines().skip_while(|l| l.trim().is_empty()).collect();
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for line in lines {
        out.push_str(line.get(indent..).unwrap_or("").trim_end());
        out.push('\n');
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

/// What a lab will be; see the module documentation.
pub struct LabBuilder {
    dir: tempfile::TempDir,
    zone: TestZone,
    ca: Option<TestCa>,
    ca_pem: Option<String>,
    mx_port: u16,
    rules: Option<String>,
    admin: bool,
    settings: Settings,
    listener: Option<TcpListener>,
    env: Vec<(String, String)>,
}

pub struct Lab {
    /// Where the MTA side listens.
    pub smtp: SocketAddr,
    pub proxy: Arc<Proxy>,
    pub dns: DnsServer,
    config: Config,
    rules_file: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

/// The lab around the daemon binary.
pub struct DaemonLab {
    pub daemon: Daemon,
    pub dns: DnsServer,
    config_file: PathBuf,
    rules_file: Option<PathBuf>,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl Lab {
    /// An empty zone, a fresh CA, remote port 25, the embedded rules, no admin socket.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> LabBuilder {
        LabBuilder {
            dir: tempfile::tempdir().expect("lab directory"),
            zone: TestZone::new(),
            ca: None,
            ca_pem: None,
            mx_port: 25,
            rules: None,
            admin: false,
            settings: Settings::new(),
            listener: None,
            env: Vec::new(),
        }
    }
}

impl LabBuilder {
    /// The lab's own directory (for files a test writes: credentials, cache files); it
    /// lives as long as the lab.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the DNS server answers.
    pub fn zone(mut self, zone: TestZone) -> Self {
        self.zone = zone;
        self
    }

    /// The CA the proxy trusts (else a fresh one, which signed nothing).
    pub fn ca(mut self, ca: &TestCa) -> Self {
        self.ca_pem = Some(ca.ca_pem());
        self
    }

    /// The port the proxy delivers to (`delivery.port`): where the test's MX servers listen.
    pub fn mx_port(mut self, port: u16) -> Self {
        self.mx_port = port;
        self
    }

    /// example.test's one MX, mx.example.test on 127.0.0.1, is `server` (on its port).
    pub fn one_mx(self, server: &SmtpServer) -> Self {
        self.zone(one_mx_zone()).mx_port(server.addr().port())
    }

    /// The rule file's text; indentation common to its lines is removed.
    pub fn rules(mut self, text: &str) -> Self {
        self.rules = Some(dedent(text));
        self
    }

    /// An admin socket in the lab's directory (the daemon always has one).
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    /// One setting, e.g. `.set("limits.max_recipients", 3)`.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.settings = self.settings.set(key, value);
        self
    }

    /// A setting that names a file.
    pub fn set_path(self, key: &str, file: &Path) -> Self {
        self.set(key, path(file))
    }

    /// Settings as YAML; indentation common to the lines is removed.
    pub fn yaml(mut self, text: &str) -> Self {
        self.settings = self.settings.yaml(&dedent(text));
        self
    }

    /// Timeouts of one second: a stalled remote costs a test about a second.
    pub fn short_timeouts(self) -> Self {
        self.yaml(
            "timeouts: { connect: 1s, greeting: 1s, command: 1s, tls_handshake: 1s, \
             data_start: 1s, data_block: 1s, data_end: 1s }",
        )
    }

    /// The MTA side listens here instead of on a fresh 127.0.0.1 port (in process only).
    pub fn listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Added to the daemon's environment.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Files written, the settings complete; the DNS server running.
    async fn prepare(&mut self) -> (DnsServer, Settings, Option<PathBuf>) {
        let dns = DnsServer::start(std::mem::take(&mut self.zone)).await;
        let dir = self.dir.path().to_path_buf();
        let ca_pem = match self.ca_pem.take() {
            Some(pem) => pem,
            None => self.ca.get_or_insert_with(TestCa::new).ca_pem(),
        };
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_pem).expect("write the CA file");
        let mut settings = Settings::lab(dns.addr, &ca_file, self.mx_port);
        let rules_file = self.rules.as_ref().map(|text| {
            let file = dir.join("rules.yaml");
            std::fs::write(&file, text).expect("write the rule file");
            settings = settings.clone().set("rules_file", path(&file));
            file
        });
        if self.admin {
            settings = settings.set("admin.socket", path(&dir.join("admin.sock")));
        }
        (dns, settings.merge(&self.settings), rules_file)
    }

    /// The proxy in this process, as `tlsrouter run` builds it.
    pub async fn start(mut self) -> Lab {
        let (dns, settings, rules_file) = self.prepare().await;
        let config = settings.to_config();
        let proxy = Proxy::new(config.clone()).expect("the proxy takes the lab's settings");
        proxy
            .start_shared_cache()
            .await
            .expect("the shared cache starts, as in tlsrouter run");
        let admin_socket = if self.admin {
            tlsrouter::admin::start(&proxy).await.expect("admin socket");
            config.admin.socket.clone()
        } else {
            None
        };
        let listener = match self.listener.take() {
            Some(listener) => listener,
            None => TcpListener::bind("127.0.0.1:0").await.expect("bind proxy"),
        };
        let smtp = listener.local_addr().expect("proxy address");
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(tlsrouter::inbound::listener::run(
            listener,
            proxy.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        Lab {
            smtp,
            proxy,
            dns,
            admin_socket,
            config,
            rules_file,
            stop: Some(stop),
            done: Some(done),
            dir: self.dir,
        }
    }

    /// `tlsrouter run` with these settings, listening on a fresh port, its admin socket in
    /// the lab's directory, logging JSON; returns once it says it listens.
    pub async fn start_daemon(self) -> DaemonLab {
        let socket = self.dir.path().join("admin.sock");
        let command = std::process::Command::new(env!("CARGO_BIN_EXE_tlsrouter"));
        self.start_daemon_as(command, socket).await
    }

    /// The Windows build under Wine as the daemon, its admin endpoint a pipe of its own.
    pub async fn start_daemon_under_wine(self, wine: &Wine) -> DaemonLab {
        let pipe = wine.pipe();
        let lab = self.set("admin.socket", pipe.as_str());
        lab.start_daemon_as(wine.tlsrouter(), PathBuf::from(pipe))
            .await
    }

    /// `command run` with the lab's configuration, whose admin endpoint is `admin`.
    async fn start_daemon_as(
        mut self,
        command: std::process::Command,
        admin: PathBuf,
    ) -> DaemonLab {
        self.admin = true;
        let (dns, settings, rules_file) = self.prepare().await;
        let mut settings = settings.set("listen", "127.0.0.1:0");
        // The command line asks for JSON; a format in the file is overridden by it.
        if settings.get("log.format").is_none() {
            settings = settings.set("log.format", "text");
        }
        let config_file = self.dir.path().join("tlsrouter.yaml");
        std::fs::write(&config_file, settings.to_yaml()).expect("write the configuration");
        let daemon = Daemon::spawn_command(command, &config_file, &admin, &self.env).await;
        DaemonLab {
            daemon,
            dns,
            config_file,
            rules_file,
            env: self.env,
            dir: self.dir,
        }
    }
}

impl Lab {
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The configuration the proxy runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The rule file; panics when the lab has none.
    pub fn rules_file(&self) -> &Path {
        self.rules_file.as_deref().expect("the lab was given rules")
    }

    /// Replaces the rule file's text (the proxy notices only when told to reload).
    pub fn write_rules(&self, text: &str) {
        std::fs::write(self.rules_file(), dedent(text)).expect("rewrite rules");
    }

    /// The admin socket; panics when the lab has none.
    pub fn admin_socket(&self) -> &Path {
        self.admin_socket
            .as_deref()
            .expect("the lab was built with .admin()")
    }

    /// A second proxy from the same configuration (a restart, in effect, while the first
    /// still runs); where its MTA side listens.
    pub async fn start_again(&self) -> (Arc<Proxy>, SocketAddr) {
        let proxy = Proxy::new(self.config.clone()).expect("proxy config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        tokio::spawn(tlsrouter::inbound::listener::run(
            listener,
            proxy.clone(),
            std::future::pending(),
        ));
        (proxy, addr)
    }

    /// Tells the listener to stop, as SIGTERM does.
    pub fn shut_down(&mut self) {
        let _ = self.stop.take().expect("shut down once").send(());
    }

    /// Waits until the listener has returned: every session has ended.
    pub async fn stopped(&mut self) {
        let done = self.done.take().expect("waited once");
        done.await
            .expect("the listener returns once every session ended");
    }

    /// `tlsrouter ctl ARGS` against the admin socket: exit code, stdout, stderr.
    pub async fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        ctl(self.admin_socket(), args).await
    }

    /// `tlsrouter ctl --json ARGS`: the answer's `result`; panics unless it succeeded.
    pub async fn ctl_json(&self, args: &[&str]) -> Value {
        ctl_json(self.admin_socket(), args).await
    }
}

impl DaemonLab {
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn smtp(&self) -> SocketAddr {
        self.daemon.smtp
    }

    pub fn rules_file(&self) -> &Path {
        self.rules_file.as_deref().expect("the lab was given rules")
    }

    /// The configuration file the daemon runs with.
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// `tlsrouter ctl ARGS` against the daemon's admin socket: exit code, stdout, stderr.
    pub async fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        ctl(&self.daemon.admin_socket, args).await
    }

    /// `tlsrouter ctl --json ARGS`: the answer's `result`; panics unless it succeeded.
    pub async fn ctl_json(&self, args: &[&str]) -> Value {
        ctl_json(&self.daemon.admin_socket, args).await
    }

    /// Kills the daemon if it still runs and starts it again on the same files.
    pub async fn restart(&mut self) {
        self.daemon.kill();
        let socket = self.daemon.admin_socket.clone();
        self.daemon = Daemon::spawn(&self.config_file, &socket, &self.env).await;
    }
}

/// Runs `tlsrouter ARGS` on a blocking thread (a proxy may run on this test's thread);
/// returns the exit code, stdout and stderr.
pub async fn tlsrouter(args: Vec<String>) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
    })
    .await
    .expect("join")
    .expect("run tlsrouter");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tlsrouter ctl --socket SOCKET ARGS`.
pub async fn ctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec![
        "ctl".to_string(),
        "--socket".into(),
        socket.display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    tlsrouter(all).await
}

/// `tlsrouter ctl --json ARGS`: the answer's `result`; panics unless it succeeded.
pub async fn ctl_json(socket: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = ctl(socket, &all).await;
    assert_eq!(code, 0, "ctl {args:?}: {err}");
    serde_json::from_str::<Value>(&out).expect("json")["result"].clone()
}
