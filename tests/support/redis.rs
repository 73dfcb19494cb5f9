//! A real `redis-server` for the tests of the shared cache: its own temporary directory, no
//! persistence, on a free loopback port (Redis cannot bind port 0, so a port is found by
//! binding a listener and letting it go; a clash is tried again with another). Ready once
//! it says so on its output, never after a sleep. A machine without `redis-server` fails
//! the test with the reason.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::support::metrics::free_port;

/// How long Redis may take to say it is ready: a guard against a hung test.
const READY_WAIT: Duration = Duration::from_secs(30);

/// How a test wants its Redis.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// `requirepass`.
    pub password: Option<String>,
    /// TLS only (`--tls-port`), with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    options: RedisOptions,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Plain TCP, no password.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(RedisOptions::default()).await
    }

    pub async fn start_with(options: RedisOptions) -> RedisServer {
        let dir = tempfile::tempdir().expect("redis directory");
        for _ in 0..20 {
            let port = free_port();
            match spawn(dir.path(), port, &options).await {
                Ok(child) => {
                    return RedisServer {
                        child: Some(child),
                        port,
                        options,
                        dir,
                    };
                }
                Err(Clash::PortTaken) => continue,
                Err(Clash::Failed(why)) => panic!("redis-server did not start: {why}"),
            }
        }
        panic!("redis-server: no free port after 20 tries");
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://127.0.0.1:PORT` with TLS (the certificate
    /// must name the address).
    pub fn url(&self) -> String {
        match self.options.tls {
            Some(_) => format!("rediss://127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Kills the server and waits until it is gone: its port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server's process (SIGSTOP): its port still accepts connections, which the
    /// kernel queues, but nothing answers, as with a Redis that hangs.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} redis-server: {status}");
    }

    /// Starts it again on the same port, empty (nothing is saved).
    pub async fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            match spawn(self.dir.path(), self.port, &self.options).await {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                // The old socket may linger a moment; Redis itself says when it is free.
                Err(Clash::PortTaken) => continue,
                Err(Clash::Failed(why)) => panic!("redis-server did not restart: {why}"),
            }
        }
        panic!("redis-server: port {} stayed taken", self.port);
    }

    /// Runs `redis-cli` against this server with `args`, as someone with access to the
    /// fleet's Redis would (what they write is what a relay then reads); its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli (Debian's redis-tools, installed with redis-server)");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The keys matching `pattern` (Redis's KEYS: a test's small database).
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut conn = self.connection().await;
        redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut conn)
            .await
            .expect("KEYS")
    }

    /// Runs `commands` in pipelines of a few thousand: how a test grows a large cache.
    pub async fn run_all(&self, commands: Vec<redis::Cmd>) {
        let mut conn = self.connection().await;
        for chunk in commands.chunks(5_000) {
            let mut pipe = redis::pipe();
            for command in chunk {
                pipe.add_command(command.clone()).ignore();
            }
            let _: () = pipe.query_async(&mut conn).await.expect("pipeline");
        }
    }

    /// How many keys the database holds.
    pub async fn size(&self) -> u64 {
        let mut conn = self.connection().await;
        redis::cmd("DBSIZE")
            .query_async(&mut conn)
            .await
            .expect("DBSIZE")
    }

    /// Deletes `key`, as its expiry would.
    pub async fn delete(&self, key: &str) {
        let mut conn = self.connection().await;
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("DEL");
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        assert!(self.options.tls.is_none(), "plain Redis only");
        redis::Client::open(self.url())
            .expect("redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis-server")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Clash {
    PortTaken,
    Failed(String),
}

async fn spawn(dir: &Path, port: u16, options: &RedisOptions) -> Result<Child, Clash> {
    let mut command = Command::new("redis-server");
    command
        .current_dir(dir)
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no", "--loglevel", "notice", "--logfile", ""])
        .arg("--dir")
        .arg(dir);
    match &options.tls {
        Some((cert, key)) => {
            command
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .args(["--tls-auth-clients", "no"]);
        }
        None => {
            command.args(["--port", &port.to_string()]);
        }
    }
    if let Some(password) = &options.password {
        command.args(["--requirepass", password]);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Clash::Failed(format!(
                "cannot run redis-server ({e}); install it: apt-get install redis-server"
            ))
        })?;
    let (lines, mut log) = mpsc::unbounded_channel();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(lines);
    let mut seen = Vec::new();
    let ready = async {
        while let Some(line) = log.recv().await {
            if line.contains("Ready to accept connections") {
                return Ok(());
            }
            if line.contains("Address already in use") {
                return Err(Clash::PortTaken);
            }
            seen.push(line);
        }
        Err(Clash::Failed(format!("it exited:\n{}", seen.join("\n"))))
    };
    match tokio::time::timeout(READY_WAIT, ready).await {
        Ok(Ok(())) => {
            // Keep reading, so that the server never blocks on a full pipe.
            tokio::spawn(async move { while log.recv().await.is_some() {} });
            Ok(child)
        }
        Ok(Err(clash)) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(clash)
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(Clash::Failed(format!("not ready in {READY_WAIT:?}")))
        }
    }
}
