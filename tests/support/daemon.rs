//! Runs the real `tlsrouter` binary as the daemon it is in production: configuration from a
//! file, environment from its parent, JSON log lines on stderr, signals, and the admin socket
//! asked through `tlsrouter ctl`. Killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use super::events::has_fields;
use super::settings::{Settings, path};

/// How long a log line may take to come: a guard against a hung test, not a sleep.
const LOG_WAIT: Duration = Duration::from_secs(60);

pub struct Daemon {
    child: Child,
    log: mpsc::UnboundedReceiver<String>,
    /// Every log line read so far, in order.
    seen: Vec<String>,
    /// Where the MTA side listens.
    pub smtp: SocketAddr,
    pub admin_socket: PathBuf,
}

/// The settings a test lab needs, as YAML: our DNS server, our CA only, remote port
/// `mx_port`. (The lab builder, `Lab::new()...start_daemon()`, writes them itself.)
pub fn lab_config(dns: SocketAddr, ca_file: &Path, mx_port: u16, rules_file: &Path) -> String {
    Settings::lab(dns, ca_file, mx_port)
        .set("rules_file", path(rules_file))
        .to_yaml()
}

/// Replaces a file's text in one step (write aside, then rename), as careful editors and
/// deployment tools do, so a reader never sees half of it.
pub fn replace_file(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).expect("write file aside");
    std::fs::rename(&aside, path).expect("rename into place");
}

/// Writes `config` with the listening address, admin socket and log format every test
/// daemon has; gives the file and the admin socket.
fn write_config(dir: &Path, config: &str) -> (PathBuf, PathBuf) {
    let admin_socket = dir.join("admin.sock");
    let path = dir.join("tlsrouter.yaml");
    // The file says text and the command line json: the command line wins, and every
    // daemon test reads JSON.
    let log = if config.lines().any(|l| l.starts_with("log:")) {
        ""
    } else {
        "log: { format: text }\n"
    };
    let full = format!(
        "{config}listen: 127.0.0.1:0\nadmin: {{ socket: \"{}\" }}\n{log}",
        admin_socket.display()
    );
    std::fs::write(&path, full).expect("write config");
    (path, admin_socket)
}

impl Daemon {
    /// Starts `tlsrouter run` in `dir` with `config` (YAML; listening address, admin socket
    /// and log format are added here; a `log:` line of its own, for a level, replaces the
    /// added one) and `env` added to its environment. Returns once the daemon says it
    /// listens.
    pub async fn start(dir: &Path, config: &str, env: &[(&str, &str)]) -> Daemon {
        let (path, admin_socket) = write_config(dir, config);
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Daemon::spawn(&path, &admin_socket, &env).await
    }

    /// As [`Daemon::start`], the daemon running in the network namespace `netns`
    /// (`ip netns exec`, which runs the binary in place of itself).
    pub async fn start_in_netns(netns: &str, dir: &Path, config: &str) -> Daemon {
        let (path, admin_socket) = write_config(dir, config);
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(env!("CARGO_BIN_EXE_tlsrouter"));
        Daemon::spawn_command(command, &path, &admin_socket, &[]).await
    }

    /// As [`Daemon::start`], with this soft and hard limit of open files (`prlimit`,
    /// which runs the binary in place of itself).
    pub async fn start_with_open_files(dir: &Path, config: &str, soft: u64, hard: u64) -> Daemon {
        let (path, admin_socket) = write_config(dir, config);
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={soft}:{hard}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_tlsrouter"));
        Daemon::spawn_command(command, &path, &admin_socket, &[]).await
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `tlsrouter run --config CONFIG_FILE --log-format json` (the file names
    /// `admin_socket` and a listening address with port 0) with `env` added to its
    /// environment. Returns once the daemon says it listens.
    pub async fn spawn(
        config_file: &Path,
        admin_socket: &Path,
        env: &[(String, String)],
    ) -> Daemon {
        let command = Command::new(env!("CARGO_BIN_EXE_tlsrouter"));
        Daemon::spawn_command(command, config_file, admin_socket, env).await
    }

    /// Like [`Daemon::spawn`], with `command` as the program (`tlsrouter.exe` under Wine).
    pub async fn spawn_command(
        mut command: Command,
        config_file: &Path,
        admin_socket: &Path,
        env: &[(String, String)],
    ) -> Daemon {
        let mut child = command
            .arg("run")
            .arg("--config")
            .arg(config_file)
            .args(["--log-format", "json"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tlsrouter");
        let stderr = child.stderr.take().expect("stderr");
        let (lines, log) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            child,
            log,
            seen: Vec::new(),
            smtp: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_socket: admin_socket.to_path_buf(),
        };
        let ready = daemon.wait_for_event(&[("event", "listening")]).await;
        daemon.smtp = ready["listen"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {ready}"));
        daemon
    }

    /// The next log event with these fields (`("event", "fleet.wrote")`, `("class",
    /// "tls-verified")`); earlier ones are kept in [`Daemon::log_text`].
    pub async fn wait_for_event(&mut self, fields: &[(&str, &str)]) -> Value {
        loop {
            let line = match tokio::time::timeout(LOG_WAIT, self.log.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => panic!(
                    "tlsrouter ended before logging {fields:?}:\n{}",
                    self.log_text()
                ),
                Err(_) => panic!("no {fields:?} logged in {LOG_WAIT:?}:\n{}", self.log_text()),
            };
            self.seen.push(line.clone());
            let event: Value = serde_json::from_str(&line).unwrap_or(Value::String(line));
            if has_fields(&event, fields) {
                return event;
            }
        }
    }

    /// Like [`Daemon::wait_for_event`], but a line already read (while waiting for another)
    /// counts too: for lines that come once, maybe before the test asks.
    pub async fn wait_for_event_once(&mut self, fields: &[(&str, &str)]) -> Value {
        let earlier = self.seen.iter().find_map(|line| {
            let event: Value = serde_json::from_str(line).ok()?;
            has_fields(&event, fields).then_some(event)
        });
        match earlier {
            Some(event) => event,
            None => self.wait_for_event(fields).await,
        }
    }

    /// How many of the lines read so far have these fields.
    pub fn count_events(&self, fields: &[(&str, &str)]) -> usize {
        let events = self
            .seen
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok());
        events.filter(|e| has_fields(e, fields)).count()
    }

    /// The next transaction's log line.
    pub async fn wait_for_transaction(&mut self) -> Value {
        self.wait_for_event(&[("target", "tlsrouter::transaction")])
            .await
    }

    /// Everything logged so far that a test has read.
    pub fn log_text(&self) -> String {
        self.seen.join("\n")
    }

    /// Sends a signal by name, e.g. "HUP".
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}: {status:?}");
    }

    /// Waits for the daemon to exit (after a signal) and gives its status.
    pub fn exit_status(&mut self) -> std::process::ExitStatus {
        tokio::task::block_in_place(|| self.child.wait()).expect("wait for tlsrouter")
    }

    /// `tlsrouter ctl --json ARGS` against this daemon's admin socket: the JSON answer.
    pub async fn ctl(&self, args: &[&str]) -> Value {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tlsrouter"));
        command
            .args(["ctl", "--json", "--socket"])
            .arg(&self.admin_socket)
            .args(args);
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("ctl task")
            .expect("run tlsrouter ctl");
        assert!(
            out.status.success(),
            "tlsrouter ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ctl prints JSON")
    }

    /// The names of the rules in force, as `tlsrouter ctl rules show` gives them.
    pub async fn rule_names(&self) -> Vec<String> {
        let shown = self.ctl(&["rules", "show"]).await;
        shown["result"]["rules"]
            .as_array()
            .unwrap_or_else(|| panic!("no rules in {shown}"))
            .iter()
            .map(|r| r["name"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl Daemon {
    /// Kills the process (if it still runs) and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
