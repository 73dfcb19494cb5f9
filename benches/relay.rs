//! Relaying a message body: throughput through the real proxy over loopback, and the memory
//! it takes for a small and for a large message (it should not grow with the size).
//!
//! `cargo bench --bench relay` prints one line per message size.

use std::net::SocketAddr;
use std::time::Instant;

use tlsrouter::Proxy;
use tlsrouter::config::{Config, Hostname};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A remote that accepts everything and throws the body away as it comes.
async fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(sink_session(stream));
        }
    });
    addr
}

async fn sink_session(stream: TcpStream) {
    let mut io = BufReader::new(stream);
    let _ = io.get_mut().write_all(b"220 sink\r\n").await;
    let mut line = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let reply: &[u8] = match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
            "EHLO" => b"250-sink\r\n250 8BITMIME\r\n",
            "DATA" => {
                let _ = io.get_mut().write_all(b"354 go\r\n").await;
                discard_body(&mut io).await;
                b"250 ok\r\n"
            }
            "QUIT" => return,
            _ => b"250 ok\r\n",
        };
        let _ = io.get_mut().write_all(reply).await;
    }
}

/// Reads up to CRLF.CRLF without keeping anything. The sender waits for our reply after
/// the dot, so the end is always the last thing read: only the tail is looked at, so the
/// sink costs next to nothing and the figures are the proxy's.
async fn discard_body(io: &mut BufReader<TcpStream>) {
    let mut tail = Vec::with_capacity(64 * 1024 + 5);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(n) = io.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.ends_with(b"\r\n.\r\n") {
            return;
        }
        tail.drain(..tail.len().saturating_sub(4));
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Reads one (possibly multi-line) reply; returns its last line.
async fn expect(io: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        io.read_line(&mut line).await.expect("reply");
        if line.as_bytes().get(3) != Some(&b'-') {
            return line;
        }
    }
}

async fn send(proxy: SocketAddr, megabytes: usize) -> std::time::Duration {
    let stream = TcpStream::connect(proxy).await.expect("connect");
    let mut io = BufReader::new(stream);
    expect(&mut io).await;
    for command in [
        "EHLO bench\r\n",
        "MAIL FROM:<a@bench.example>\r\n",
        "RCPT TO:<b@[127.0.0.1]>\r\n",
        "DATA\r\n",
    ] {
        io.get_mut()
            .write_all(command.as_bytes())
            .await
            .expect("send");
        expect(&mut io).await;
    }
    let line = [b'x'; 78];
    let mut block = Vec::with_capacity(1024 * 1024);
    while block.len() + 80 <= 1024 * 1024 {
        block.extend_from_slice(&line);
        block.extend_from_slice(b"\r\n");
    }
    let started = Instant::now();
    for _ in 0..megabytes {
        io.get_mut().write_all(&block).await.expect("body");
    }
    io.get_mut().write_all(b".\r\n").await.expect("dot");
    let reply = expect(&mut io).await;
    assert!(reply.starts_with("250"), "{reply}");
    started.elapsed()
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let remote = sink().await;
        let mut config = Config {
            hostname: Hostname("bench.example".into()),
            ..Config::default()
        };
        config.delivery.port = remote.port();
        config.tls.system_roots = false;
        config.admin.socket = None;
        config.limits.max_message_size = 1 << 40;
        let proxy = Proxy::new(config).expect("proxy");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(tlsrouter::inbound::listener::run(
            listener,
            proxy,
            std::future::pending(),
        ));
        for megabytes in [1, 16, 256] {
            let elapsed = send(addr, megabytes).await;
            println!(
                "relay {megabytes:>4} MiB: {:>8.1} MiB/s; peak RSS of this process so far {} MiB",
                megabytes as f64 / elapsed.as_secs_f64(),
                rss_kib() / 1024
            );
        }
    });
}
