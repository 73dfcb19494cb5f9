//! The soak benchmark's outside world (`bench/run soak`): a DNS server and the MX hosts of
//! six kinds of recipient domain, on loopback addresses, all at one port:
//!
//! | domain          | MX host(s)                                                        |
//! |-----------------|-------------------------------------------------------------------|
//! | `good.soak`     | 127.0.1.1: STARTTLS, a certificate the relay trusts (`ca.pem`)    |
//! | `plain.soak`    | 127.0.1.2: no STARTTLS                                            |
//! | `expired.soak`  | 127.0.1.3: STARTTLS, its certificate expired                      |
//! | `aborting.soak` | 127.0.1.4: STARTTLS; of every four connections one is closed at   |
//! |                 | once and one in the middle of the message text                    |
//! | `slow.soak`     | 127.0.1.5: STARTTLS, every reply half a second late               |
//! | `sender.soak`   | as `good.soak` (where bounces would go)                           |
//! | `hostile.soak`  | 50 MX hosts, none usable: a third unresolvable (SERVFAIL), a      |
//! |                 | third refusing connections, a third (127.0.3.n) accepting and     |
//! |                 | never greeting                                                    |
//!
//! Every message taken is one line of `DIR/delivered.log`: `ID DOMAIN SECONDS TLS`, with ID
//! from the message's `X-Soak-Id` header, SECONDS since the epoch and TLS `yes` or `no`.
//!
//! `bench-remotes DIR PORT`: prints `dns ADDRESS` once everything listens.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

#[allow(dead_code)]
#[path = "../tests/support/dns.rs"]
mod dns;
#[allow(dead_code)]
#[path = "../tests/support/pki.rs"]
mod pki;

/// How many MX hosts the hostile domain publishes.
const HOSTILE_HOSTS: u8 = 50;

/// How one remote behaves.
#[derive(Clone)]
struct Remote {
    domain: &'static str,
    tls: Option<TlsAcceptor>,
    /// Before every reply.
    delay: Duration,
    /// Closes one connection in four at once and one in four in the middle of the text.
    aborts: bool,
    connections: Arc<AtomicU64>,
    delivered: mpsc::UnboundedSender<String>,
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench-remotes DIR PORT";
    let dir = PathBuf::from(args.get(1).expect(usage));
    let port: u16 = args.get(2).and_then(|p| p.parse().ok()).expect(usage);

    let ca = pki::TestCa::new();
    ca.write_ca_file(&dir);
    let delivered = delivery_log(&dir.join("delivered.log"));
    let remote = |domain, validity: Option<pki::Validity>, delay_ms, aborts| Remote {
        domain,
        tls: validity.map(|v| acceptor(ca.leaf(&[&format!("mx.{domain}")], v))),
        delay: Duration::from_millis(delay_ms),
        aborts,
        connections: Arc::default(),
        delivered: delivered.clone(),
    };
    let current = Some(pki::Validity::Current);
    let remotes = [
        (1, remote("good.soak", current, 0, false)),
        (2, remote("plain.soak", None, 0, false)),
        (
            3,
            remote("expired.soak", Some(pki::Validity::Expired), 0, false),
        ),
        (4, remote("aborting.soak", current, 0, true)),
        (5, remote("slow.soak", current, 500, false)),
    ];

    let mut zone = dns::TestZone::new().mx("sender.soak", 10, "mx.good.soak");
    for (n, remote) in &remotes {
        let host = format!("mx.{}", remote.domain);
        zone = zone
            .mx(remote.domain, 10, &host)
            .a(&host, Ipv4Addr::new(127, 0, 1, *n));
        let listener = TcpListener::bind((Ipv4Addr::new(127, 0, 1, *n), port))
            .await
            .unwrap_or_else(|e| panic!("bind {} at port {port}: {e}", remote.domain));
        tokio::spawn(serve(listener, remote.clone()));
    }
    for n in 0..HOSTILE_HOSTS {
        let host = format!("mx{n}.hostile.soak");
        zone = zone.mx("hostile.soak", 10 + u16::from(n), &host);
        zone = match n % 3 {
            0 => zone.servfail(&host),
            1 => zone.a(&host, Ipv4Addr::new(127, 0, 2, n)),
            _ => {
                let ip = Ipv4Addr::new(127, 0, 3, n);
                let listener = TcpListener::bind((ip, port)).await.expect("bind a tarpit");
                tokio::spawn(tarpit(listener));
                zone.a(&host, ip)
            }
        };
    }
    let dns = dns::DnsServer::start(zone).await;
    println!("dns {}", dns.addr);
    std::io::stdout().flush().expect("stdout");
    std::future::pending::<()>().await;
}

fn acceptor(cert: pki::CertKey) -> TlsAcceptor {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(cert.chain, cert.key)
    .expect("server config");
    TlsAcceptor::from(Arc::new(config))
}

/// Lines written to `path` as they come, each batch flushed.
fn delivery_log(path: &Path) -> mpsc::UnboundedSender<String> {
    let mut file = std::fs::File::create(path).expect("create the delivery log");
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, 256).await > 0 {
            let text: String = batch.drain(..).collect();
            file.write_all(text.as_bytes())
                .expect("write the delivery log");
        }
    });
    tx
}

/// Accepts and holds every connection, silent, until the client gives up.
async fn tarpit(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
}

async fn serve(listener: TcpListener, remote: Remote) {
    while let Ok((stream, _)) = listener.accept().await {
        let remote = remote.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let n = remote.connections.fetch_add(1, Ordering::Relaxed);
            // One in four closed at once, one in four in the middle of the text.
            let abort = match (remote.aborts, n % 4) {
                (true, 0) => return,
                (true, 1) => true,
                _ => false,
            };
            let mut io = BufReader::new(stream);
            let upgrade = session(&mut io, &remote, abort, false).await;
            if let (Some(StartTls), Some(acceptor)) = (upgrade, &remote.tls)
                && let Ok(tls) = acceptor.accept(io.into_inner()).await
            {
                let _ = session(&mut BufReader::new(tls), &remote, abort, true).await;
            }
        });
    }
}

/// The client said STARTTLS and got 220.
struct StartTls;

/// One SMTP session; greets unless it goes on after STARTTLS.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    remote: &Remote,
    abort_in_text: bool,
    tls: bool,
) -> Option<StartTls> {
    if !tls {
        reply(io, remote, "220 mx ESMTP\r\n").await?;
    }
    let mut line = String::new();
    let mut domain = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                let starttls = if remote.tls.is_some() && !tls {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                };
                let text = format!("250-mx\r\n250-8BITMIME\r\n{starttls}250 SIZE 100000000\r\n");
                reply(io, remote, &text).await?;
            }
            "STAR" if remote.tls.is_some() && !tls => {
                reply(io, remote, "220 go ahead\r\n").await?;
                return Some(StartTls);
            }
            "RCPT" => {
                domain = line
                    .rsplit_once('@')
                    .map(|(_, d)| d.trim().trim_end_matches('>').to_ascii_lowercase())
                    .unwrap_or_default();
                reply(io, remote, "250 2.1.5 ok\r\n").await?;
            }
            "DATA" => {
                reply(io, remote, "354 go\r\n").await?;
                let text = read_text(io, abort_in_text).await?;
                let id = soak_id(&text).unwrap_or("-").to_string();
                reply(io, remote, "250 2.0.0 ok\r\n").await?;
                let tls = if tls { "yes" } else { "no" };
                let _ = remote
                    .delivered
                    .send(format!("{id} {domain} {:.3} {tls}\n", now()));
            }
            "QUIT" => {
                let _ = reply(io, remote, "221 bye\r\n").await;
                return None;
            }
            _ => reply(io, remote, "250 2.0.0 ok\r\n").await?,
        }
    }
}

async fn reply<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    remote: &Remote,
    text: &str,
) -> Option<()> {
    if !remote.delay.is_zero() {
        tokio::time::sleep(remote.delay).await;
    }
    io.get_mut().write_all(text.as_bytes()).await.ok()?;
    io.get_mut().flush().await.ok()
}

/// The message text up to the final dot; `None` when the client is gone, or (with
/// `abort`) once the first block of it has come.
async fn read_text<S: AsyncRead + Unpin>(io: &mut BufReader<S>, abort: bool) -> Option<Vec<u8>> {
    let mut text = Vec::new();
    loop {
        let buf = io.fill_buf().await.ok()?;
        if buf.is_empty() || abort {
            return None;
        }
        let start = text.len().saturating_sub(4);
        text.extend_from_slice(buf);
        let n = buf.len();
        if let Some(at) = memchr::memmem::find(&text[start..], b"\r\n.\r\n") {
            // Only what belongs to the text: the next command may follow the dot.
            let end = start + at + 5;
            io.consume(n - (text.len() - end));
            text.truncate(end);
            return Some(text);
        }
        io.consume(n);
    }
}

fn soak_id(text: &[u8]) -> Option<&str> {
    let at = memchr::memmem::find(text, b"X-Soak-Id: ")? + 11;
    let end = at + text[at..].iter().position(|&b| b == b'\r')?;
    std::str::from_utf8(&text[at..end]).ok()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}
