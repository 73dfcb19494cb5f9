//! tlsrouter side by side with direct delivery and with a Postfix relay, in one run.
//!
//! `cargo bench --bench side_by_side` (as root, with Debian's postfix installed, for the
//! Postfix rows) measures, interleaved and repeated, for each message size and number of
//! concurrent sessions:
//! - **direct**: the load generator straight to the sink (the limit);
//! - **tlsrouter plain / STARTTLS**: through the real `tlsrouter` binary to the sink, which
//!   offers no STARTTLS or does;
//! - **Postfix plain / STARTTLS**: through a Postfix instance of its own (`relayhost`) to
//!   the same sink, `smtp_tls_security_level` none or may.
//!
//! Every MTA-side session is one connection and one message, as an MTA's delivery agent
//! without connection caching sends them. Figures: messages per second until the sink has
//! them all, p50/p99 of a transaction (connect to the reply after the dot, as the sending
//! MTA sees it; for Postfix that is the queueing, not the delivery), CPU seconds of the
//! relay per 1,000 messages (its processes' user + system time from /proc) and its peak
//! memory (tlsrouter: peak RSS; Postfix: the largest sum of PSS over its processes).
//!
//! Flags after `--`: `--quick` (1 KB and 100 KB, 1 and 20 sessions, two rounds),
//! `--rounds N`, `--idle N` (only the memory of N idle MTA sessions).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const SIZES: [(usize, &str); 3] = [(1024, "1 KB"), (100 * 1024, "100 KB"), (10 << 20, "10 MB")];
const SESSIONS: [usize; 3] = [1, 20, 200];
/// Enough messages per measurement for a stable rate, few enough for a run in minutes.
fn messages_for(size: usize, sessions: usize) -> usize {
    let by_size = match size {
        s if s <= 4096 => 2000,
        s if s <= 200 * 1024 => 400,
        _ => 20,
    };
    by_size.max(sessions * 2)
}

// ---------------------------------------------------------------------------------------
// The sink: accepts everything, throws bodies away, counts messages.

struct Sink {
    plain: SocketAddr,
    tls: SocketAddr,
    delivered: Arc<AtomicU64>,
    arrived: Arc<Notify>,
}

impl Sink {
    async fn start() -> Sink {
        let cert = rcgen::generate_simple_self_signed(vec!["sink.bench".to_string()])
            .expect("sink certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("sink TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let delivered = Arc::new(AtomicU64::new(0));
        let arrived = Arc::new(Notify::new());
        let mut addrs = Vec::new();
        for offers_tls in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
            addrs.push(listener.local_addr().expect("sink address"));
            let acceptor = offers_tls.then(|| acceptor.clone());
            let (delivered, arrived) = (delivered.clone(), arrived.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let (delivered, arrived) = (delivered.clone(), arrived.clone());
                    tokio::spawn(async move {
                        sink_session(stream, acceptor, delivered, arrived).await;
                    });
                }
            });
        }
        Sink {
            plain: addrs[0],
            tls: addrs[1],
            delivered,
            arrived,
        }
    }

    async fn wait_for(&self, count: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.arrived.notified();
            if self.delivered.load(Ordering::SeqCst) >= count {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, notified).await.is_err() {
                return false;
            }
        }
    }
}

async fn sink_session(
    stream: TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    delivered: Arc<AtomicU64>,
    arrived: Arc<Notify>,
) {
    let mut io = BufReader::new(stream);
    let _ = io.get_mut().write_all(b"220 sink.bench ESMTP\r\n").await;
    let wants_tls = sink_dialogue(&mut io, acceptor.is_some(), &delivered, &arrived).await;
    // STARTTLS was accepted: the same dialogue inside TLS.
    let (true, Some(acceptor)) = (wants_tls, acceptor) else {
        return;
    };
    let Ok(tls) = acceptor.accept(io.into_inner()).await else {
        return;
    };
    let mut io = BufReader::new(tls);
    sink_dialogue(&mut io, false, &delivered, &arrived).await;
}

/// One session's commands until QUIT or EOF; `true` when the client asked for STARTTLS.
async fn sink_dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    offers_tls: bool,
    delivered: &AtomicU64,
    arrived: &Notify,
) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line).await.unwrap_or(0) == 0 {
            return false;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" if offers_tls => {
                b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n250 STARTTLS\r\n"
            }
            "EHLO" => b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n",
            "STAR" if offers_tls => {
                let _ = io.get_mut().write_all(b"220 go ahead\r\n").await;
                return true;
            }
            "DATA" => {
                let _ = io.get_mut().write_all(b"354 go\r\n").await;
                if !discard_body(io).await {
                    return false;
                }
                delivered.fetch_add(1, Ordering::SeqCst);
                arrived.notify_waiters();
                b"250 2.0.0 ok\r\n"
            }
            "QUIT" => {
                let _ = io.get_mut().write_all(b"221 bye\r\n").await;
                return false;
            }
            _ => b"250 2.0.0 ok\r\n",
        };
        if io.get_mut().write_all(reply).await.is_err() {
            return false;
        }
    }
}

/// Reads up to CRLF.CRLF, keeping only the tail: the sink costs next to nothing.
async fn discard_body<S: AsyncRead + Unpin>(io: &mut BufReader<S>) -> bool {
    let mut tail: Vec<u8> = b"\r\n".to_vec();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match io.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        tail.extend_from_slice(&buf[..n]);
        if tail.ends_with(b"\r\n.\r\n") {
            return true;
        }
        tail.drain(..tail.len().saturating_sub(4));
    }
}

// ---------------------------------------------------------------------------------------
// The load: the sending MTA, one connection per message.

struct Load {
    elapsed: Duration,
    latencies: Vec<Duration>,
    failed: usize,
}

async fn send_messages(
    target: SocketAddr,
    sessions: usize,
    messages: usize,
    body: Arc<Vec<u8>>,
) -> Load {
    let left = Arc::new(AtomicUsize::new(messages));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (left, body) = (left.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0;
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let t = Instant::now();
                match one_message(target, &body).await {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(e) => {
                        failed += 1;
                        if failed == 1 {
                            eprintln!("  a message failed: {e}");
                        }
                    }
                }
            }
            (latencies, failed)
        }));
    }
    let mut load = Load {
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        failed: 0,
    };
    for task in tasks {
        if let Ok((latencies, failed)) = task.await {
            load.latencies.extend(latencies);
            load.failed += failed;
        }
    }
    load.elapsed = started.elapsed();
    load.latencies.sort();
    load
}

async fn one_message(target: SocketAddr, body: &[u8]) -> Result<(), String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut io = BufReader::new(stream);
    expect(&mut io, "220").await?;
    for (command, due) in [
        ("EHLO load.bench\r\n", "250"),
        ("MAIL FROM:<load@bench.example>\r\n", "250"),
        ("RCPT TO:<sink@[127.0.0.1]>\r\n", "250"),
        ("DATA\r\n", "354"),
    ] {
        io.get_mut()
            .write_all(command.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        expect(&mut io, due).await?;
    }
    io.get_mut()
        .write_all(body)
        .await
        .map_err(|e| e.to_string())?;
    expect(&mut io, "250").await?;
    let _ = io.get_mut().write_all(b"QUIT\r\n").await;
    Ok(())
}

/// Reads one reply, which must start with `due`.
async fn expect<S: AsyncRead + Unpin>(io: &mut BufReader<S>, due: &str) -> Result<(), String> {
    let mut line = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed".into());
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return if line.starts_with(due) {
                Ok(())
            } else {
                Err(format!("expected {due}, got {}", line.trim_end()))
            };
        }
    }
}

/// A message of about `size` octets: a header, then 78-character lines, then the dot.
fn message(size: usize) -> Vec<u8> {
    let mut body =
        b"From: load@bench.example\r\nTo: sink@[127.0.0.1]\r\nSubject: bench\r\n\r\n".to_vec();
    let line = [b'x'; 78];
    while body.len() + 80 <= size {
        body.extend_from_slice(&line);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    body
}

// ---------------------------------------------------------------------------------------
// The relays

/// A process tree to measure: its CPU time and memory, from /proc.
trait Relay {
    fn listen(&self) -> SocketAddr;
    /// User + system seconds of every process of the relay so far.
    fn cpu_seconds(&self) -> f64;
    /// Memory now, MiB (PSS summed over processes, or RSS of one).
    fn memory_mib(&self) -> f64;
    /// Peak memory over its life, MiB, when the kernel keeps it.
    fn peak_mib(&self) -> Option<f64>;
}

struct Tlsrouter {
    child: Child,
    listen: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Tlsrouter {
    fn start(binary: &Path, remote_port: u16, max_sessions: usize) -> Tlsrouter {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("tlsrouter.yaml");
        std::fs::write(
            &config,
            format!(
                "hostname: relay.bench\nlisten: 127.0.0.1:0\nallow_clients: [127.0.0.0/8]\n\
                 tls: {{ system_roots: false }}\ndelivery: {{ port: {remote_port} }}\n\
                 admin: {{ socket: null }}\n\
                 limits: {{ max_message_size: 104857600, max_sessions: {max_sessions}, \
                 max_sessions_per_client: {max_sessions} }}\n"
            ),
        )
        .expect("write the configuration");
        let mut child = Command::new(binary)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tlsrouter");
        let stdout = child.stdout.take().expect("tlsrouter's output");
        let (found, listening) = std::sync::mpsc::channel();
        // Reads the log to its end, so that the pipe never fills.
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut found = Some(found);
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(at) = line.find("tlsrouter listening")
                    && let Some(addr) = line[at..].split("listen=").nth(1)
                    && let Some(found) = found.take()
                {
                    let _ = found.send(addr.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let addr = listening
            .recv_timeout(Duration::from_secs(30))
            .expect("tlsrouter did not say it listens");
        Tlsrouter {
            child,
            listen: addr.parse().expect("tlsrouter's listening address"),
            _dir: dir,
        }
    }
}

impl Drop for Tlsrouter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay for Tlsrouter {
    fn listen(&self) -> SocketAddr {
        self.listen
    }
    fn cpu_seconds(&self) -> f64 {
        process_cpu(self.child.id(), false)
    }
    fn memory_mib(&self) -> f64 {
        status_kib(self.child.id(), "VmRSS:") as f64 / 1024.0
    }
    fn peak_mib(&self) -> Option<f64> {
        Some(status_kib(self.child.id(), "VmHWM:") as f64 / 1024.0)
    }
}

struct Postfix {
    dir: tempfile::TempDir,
    listen: SocketAddr,
}

/// Postfix's own services, none chrooted (the queue is in a temporary directory).
const POSTFIX_MASTER_CF: &str = include_str!("../tests/support/postfix-instance-master.cf");

impl Postfix {
    fn start(remote: SocketAddr, starttls: bool) -> Result<Postfix, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let root = dir.path();
        for sub in ["etc", "spool", "data"] {
            std::fs::create_dir(root.join(sub)).map_err(|e| e.to_string())?;
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755));
        let chown = Command::new("chown")
            .arg("postfix")
            .arg(root.join("data"))
            .output()
            .map_err(|e| e.to_string())?;
        if !chown.status.success() {
            return Err(format!(
                "chown postfix: {}",
                String::from_utf8_lossy(&chown.stderr).trim()
            ));
        }
        let port = free_port();
        let d = root.display();
        let level = if starttls { "may" } else { "none" };
        let main_cf = format!(
            "compatibility_level = 3.6\nqueue_directory = {d}/spool\ndata_directory = {d}/data\n\
             maillog_file = {d}/maillog\nmyhostname = postfix.bench\nmydestination =\n\
             alias_maps =\nalias_database =\ninet_interfaces = loopback-only\n\
             inet_protocols = ipv4\nsmtp_dns_support_level = disabled\n\
             relayhost = [127.0.0.1]:{}\nsmtp_tls_security_level = {level}\n\
             smtp_tls_session_cache_database = btree:{d}/data/smtp_scache\n\
             default_process_limit = 500\nsmtpd_client_connection_count_limit = 0\n\
             message_size_limit = 104857600\n",
            remote.port()
        );
        std::fs::write(root.join("etc/main.cf"), main_cf).map_err(|e| e.to_string())?;
        std::fs::write(
            root.join("etc/master.cf"),
            format!("{POSTFIX_MASTER_CF}127.0.0.1:{port} inet n - n - - smtpd\n"),
        )
        .map_err(|e| e.to_string())?;
        let started = Command::new(postfix_command())
            .arg("-c")
            .arg(root.join("etc"))
            .arg("start")
            .output()
            .map_err(|e| format!("postfix: {e}"))?;
        let postfix = Postfix {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        if !started.status.success() {
            return Err(format!(
                "postfix start: {}{}",
                String::from_utf8_lossy(&started.stdout).trim(),
                String::from_utf8_lossy(&started.stderr).trim()
            ));
        }
        // Ready once smtpd's port takes connections.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(postfix.listen).is_err() {
            if Instant::now() > deadline {
                return Err("Postfix did not listen within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(postfix)
    }

    fn master(&self) -> Option<u32> {
        let pid = std::fs::read_to_string(self.dir.path().join("spool/pid/master.pid")).ok()?;
        pid.trim().parse().ok()
    }

    fn processes(&self) -> Vec<u32> {
        self.master().map(descendants).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new(postfix_command())
            .arg("-c")
            .arg(self.dir.path().join("etc"))
            .arg("stop")
            .output();
    }
}

impl Relay for Postfix {
    fn listen(&self) -> SocketAddr {
        self.listen
    }
    fn cpu_seconds(&self) -> f64 {
        // The master's children's time once they are reaped, and each live one's own.
        let Some(master) = self.master() else {
            return 0.0;
        };
        self.processes()
            .into_iter()
            .map(|pid| process_cpu(pid, pid == master))
            .sum()
    }
    fn memory_mib(&self) -> f64 {
        self.processes()
            .into_iter()
            .map(|pid| rollup_kib(pid, "Pss:"))
            .sum::<u64>() as f64
            / 1024.0
    }
    fn peak_mib(&self) -> Option<f64> {
        None
    }
}

fn postfix_command() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/postfix");
    if sbin.exists() {
        sbin
    } else {
        "postfix".into()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `pid` and every process below it.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut all = vec![root];
    let mut i = 0;
    while i < all.len() {
        all.extend(children.get(&all[i]).cloned().unwrap_or_default());
        i += 1;
    }
    all
}

/// The fields of /proc/PID/stat after the command name: state is [0], ppid [1].
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(String::from).collect())
}

/// User + system seconds of `pid`, with its reaped children's when `with_children`.
fn process_cpu(pid: u32, with_children: bool) -> f64 {
    let Some(fields) = stat_fields(pid) else {
        return 0.0;
    };
    // utime, stime, cutime, cstime are fields 14..17 of the stat line: [11..15] here.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let own = tick(11) + tick(12);
    let reaped = if with_children {
        tick(13) + tick(14)
    } else {
        0.0
    };
    // In clock ticks: Linux's USER_HZ, 100 on every architecture it runs on.
    (own + reaped) / 100.0
}

fn status_kib(pid: u32, key: &str) -> u64 {
    kib_field(&format!("/proc/{pid}/status"), key)
}

fn rollup_kib(pid: u32, key: &str) -> u64 {
    kib_field(&format!("/proc/{pid}/smaps_rollup"), key)
}

fn kib_field(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Measuring

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Via {
    Direct,
    TlsrouterPlain,
    TlsrouterStarttls,
    PostfixPlain,
    PostfixStarttls,
}

impl Via {
    const ALL: [Via; 5] = [
        Via::Direct,
        Via::TlsrouterPlain,
        Via::TlsrouterStarttls,
        Via::PostfixPlain,
        Via::PostfixStarttls,
    ];

    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct (A)",
            Via::TlsrouterPlain => "tlsrouter, plain upstream (B)",
            Via::TlsrouterStarttls => "tlsrouter, STARTTLS upstream (C)",
            Via::PostfixPlain => "Postfix relay, plain (D)",
            Via::PostfixStarttls => "Postfix relay, STARTTLS (D)",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Figures {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_per_1000: Option<f64>,
    memory_mib: Option<f64>,
}

/// One measurement: a fresh relay, the load, the sink's count, the relay's figures.
async fn measure(
    path: Via,
    sink: &Sink,
    binary: &Path,
    size: usize,
    sessions: usize,
) -> Result<Figures, String> {
    let remote = match path {
        Via::TlsrouterStarttls | Via::PostfixStarttls => sink.tls,
        _ => sink.plain,
    };
    let relay: Option<Box<dyn Relay>> = match path {
        Via::Direct => None,
        Via::TlsrouterPlain | Via::TlsrouterStarttls => Some(Box::new(Tlsrouter::start(
            binary,
            remote.port(),
            sessions + 50,
        ))),
        Via::PostfixPlain | Via::PostfixStarttls => Some(Box::new(Postfix::start(
            remote,
            path == Via::PostfixStarttls,
        )?)),
    };
    let target = relay.as_ref().map_or(sink.plain, |r| r.listen());
    let messages = messages_for(size, sessions);
    let body = Arc::new(message(size));
    let cpu_before = relay.as_ref().map(|r| r.cpu_seconds());
    let before = sink.delivered.load(Ordering::SeqCst);
    let started = Instant::now();
    // Memory sampled while the load runs (PSS has no peak of its own).
    let mut peak_sampled = 0.0f64;
    let load = {
        let load = send_messages(target, sessions, messages, body);
        tokio::pin!(load);
        let mut ticker = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                load = &mut load => break load,
                _ = ticker.tick() => {
                    if let Some(relay) = &relay {
                        peak_sampled = peak_sampled.max(relay.memory_mib());
                    }
                }
            }
        }
    };
    if load.failed > 0 {
        return Err(format!("{} of {messages} messages failed", load.failed));
    }
    // Postfix queues; the message counts when the sink has it.
    let want = before + messages as u64;
    let limit = Duration::from_secs(600);
    loop {
        if sink.wait_for(want, Duration::from_millis(50)).await {
            break;
        }
        if let Some(relay) = &relay {
            peak_sampled = peak_sampled.max(relay.memory_mib());
        }
        if started.elapsed() > limit {
            return Err("the sink did not get every message".into());
        }
    }
    let elapsed = started.elapsed().max(load.elapsed);
    let cpu = relay
        .as_ref()
        .zip(cpu_before)
        .map(|(r, before)| (r.cpu_seconds() - before) * 1000.0 / messages as f64);
    let memory = relay
        .as_ref()
        .map(|r| r.peak_mib().unwrap_or(peak_sampled).max(peak_sampled));
    let percentile = |p: f64| {
        let i = ((load.latencies.len() as f64 - 1.0) * p).round() as usize;
        load.latencies
            .get(i)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Ok(Figures {
        rate: messages as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        cpu_per_1000: cpu,
        memory_mib: memory,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The median of each figure over the rounds.
fn combine(rounds: &[Figures]) -> Figures {
    let pick = |f: &dyn Fn(&Figures) -> Option<f64>| {
        let mut v: Vec<f64> = rounds.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    Figures {
        rate: pick(&|f| Some(f.rate)).unwrap_or(0.0),
        p50_ms: pick(&|f| Some(f.p50_ms)).unwrap_or(0.0),
        p99_ms: pick(&|f| Some(f.p99_ms)).unwrap_or(0.0),
        cpu_per_1000: pick(&|f| f.cpu_per_1000),
        memory_mib: pick(&|f| f.memory_mib),
    }
}

// ---------------------------------------------------------------------------------------
// Idle sessions

/// N MTA sessions that said EHLO and then nothing: tlsrouter's memory per session.
async fn idle_sessions(binary: &Path, sink: &Sink, count: usize) {
    raise_open_files(count as u64 * 2 + 1000);
    let relay = Tlsrouter::start(binary, sink.plain.port(), count + 100);
    // One session first, so that what every session shares is already counted.
    let mut open = Vec::with_capacity(count);
    open.push(idle_session(relay.listen).await);
    let before = status_kib(relay.child.id(), "VmRSS:");
    for _ in 1..count {
        open.push(idle_session(relay.listen).await);
    }
    let after = status_kib(relay.child.id(), "VmRSS:");
    let per_session = (after.saturating_sub(before)) as f64 / (count - 1).max(1) as f64;
    println!(
        "{count} idle MTA sessions: tlsrouter RSS {:.1} MiB -> {:.1} MiB, {per_session:.1} KiB per session",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    drop(open);
}

async fn idle_session(target: SocketAddr) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(target).await.expect("connect");
    let mut io = BufReader::new(stream);
    expect(&mut io, "220").await.expect("greeting");
    io.get_mut()
        .write_all(b"EHLO idle.bench\r\n")
        .await
        .expect("EHLO");
    expect(&mut io, "250").await.expect("EHLO reply");
    io
}

fn raise_open_files(want: u64) {
    // Through `prlimit`, so that this file needs no unsafe code.
    let me = std::process::id().to_string();
    let _ = Command::new("prlimit")
        .args(["--pid", &me, &format!("--nofile={want}:{want}")])
        .status();
}

// ---------------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_tlsrouter"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let sink = Sink::start().await;
        if let Some(count) = value("--idle") {
            idle_sessions(&binary, &sink, count).await;
            return;
        }
        let quick = flag("--quick");
        let rounds = value("--rounds").unwrap_or(if quick { 2 } else { 3 });
        let sizes: Vec<(usize, &str)> = if quick { SIZES[..2].to_vec() } else { SIZES.to_vec() };
        let sessions: Vec<usize> = if quick { SESSIONS[..2].to_vec() } else { SESSIONS.to_vec() };
        raise_open_files(10_000);
        let mut postfix_missing: Option<String> = None;
        if let Err(why) = Postfix::start(sink.plain, false) {
            eprintln!("no Postfix rows: {why} (run as root with Debian's postfix installed)");
            postfix_missing = Some(why);
        }
        println!("{}", machine());
        println!();
        println!("| size | sessions | path | msgs/s | ratio to direct | p50 ms | p99 ms | relay CPU s per 1,000 msgs | relay memory MiB |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for &(size, size_name) in &sizes {
            for &n in &sessions {
                let mut results: HashMap<Via, Vec<Figures>> = HashMap::new();
                for _ in 0..rounds {
                    for path in Via::ALL {
                        let postfix = matches!(path, Via::PostfixPlain | Via::PostfixStarttls);
                        if postfix && postfix_missing.is_some() {
                            continue;
                        }
                        match measure(path, &sink, &binary, size, n).await {
                            Ok(f) => results.entry(path).or_default().push(f),
                            Err(e) => eprintln!("{size_name}, {n} sessions, {}: {e}", path.name()),
                        }
                    }
                }
                let direct = results.get(&Via::Direct).map(|r| combine(r).rate);
                for path in Via::ALL {
                    let Some(rounds) = results.get(&path) else {
                        continue;
                    };
                    let f = combine(rounds);
                    let ratio = direct.map_or("-".into(), |d| format!("{:.2}", f.rate / d));
                    let cpu = f.cpu_per_1000.map_or("-".into(), |c| format!("{c:.2}"));
                    let mem = f.memory_mib.map_or("-".into(), |m| format!("{m:.0}"));
                    println!(
                        "| {size_name} | {n} | {} | {:.0} | {ratio} | {:.2} | {:.2} | {cpu} | {mem} |",
                        path.name(),
                        f.rate,
                        f.p50_ms,
                        f.p99_ms
                    );
                }
            }
        }
    });
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("machine: {cpus} cores, {model}, Linux {}", kernel.trim())
}
