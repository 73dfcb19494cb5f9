//! The benchmark's MTA: `SESSIONS` concurrent senders, each sending its share of `MESSAGES`
//! messages of `SIZE` bytes, one connection per message (connect, EHLO, MAIL, RCPT, DATA,
//! the text, QUIT), as an MTA handing mail to its smart host does. Prints one JSON line:
//! messages, seconds, messages/s, p50 and p99 transaction latency (connect to the 250 after
//! the dot) in ms, failures.
//!
//! `bench-load HOST:PORT SESSIONS MESSAGES SIZE RCPT`

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench-load HOST:PORT SESSIONS MESSAGES SIZE RCPT";
    let addr: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).expect(usage);
    let sessions: usize = args.get(2).and_then(|a| a.parse().ok()).expect(usage);
    let messages: usize = args.get(3).and_then(|a| a.parse().ok()).expect(usage);
    let size: usize = args.get(4).and_then(|a| a.parse().ok()).expect(usage);
    let rcpt = args.get(5).expect(usage).clone();
    let body = Arc::new(body(size));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (body, next, rcpt) = (body.clone(), next.clone(), rcpt.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            while next.fetch_add(1, Ordering::Relaxed) < messages {
                let clock = Instant::now();
                match transaction(addr, &rcpt, &body).await {
                    Ok(()) => latencies.push(clock.elapsed()),
                    Err(_) => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    let mut failures = 0;
    for task in tasks {
        let (l, f) = task.await.expect("sender");
        latencies.extend(l);
        failures += f;
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{{\"messages\": {}, \"seconds\": {seconds:.3}, \"msgs_per_s\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"failures\": {failures}}}",
        latencies.len(),
        latencies.len() as f64 / seconds,
        at(0.50),
        at(0.99),
    );
}

/// Lines of 76 characters and CRLF, dot-free, to `size` bytes.
fn body(size: usize) -> Vec<u8> {
    let mut body = b"From: load@bench.test\r\nSubject: load\r\n\r\n".to_vec();
    while body.len() < size {
        body.extend_from_slice(&[b'x'; 76]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    body
}

async fn transaction(addr: SocketAddr, rcpt: &str, body: &[u8]) -> Result<(), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut io = BufReader::new(stream);
    expect(&mut io, "220").await?;
    for (command, code) in [
        ("EHLO load.bench.test\r\n".to_string(), "250"),
        ("MAIL FROM:<load@bench.test>\r\n".to_string(), "250"),
        (format!("RCPT TO:<{rcpt}>\r\n"), "250"),
        ("DATA\r\n".to_string(), "354"),
    ] {
        io.get_mut()
            .write_all(command.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        expect(&mut io, code).await?;
    }
    io.get_mut()
        .write_all(body)
        .await
        .map_err(|e| e.to_string())?;
    expect(&mut io, "250").await?;
    let _ = io.get_mut().write_all(b"QUIT\r\n").await;
    let _ = expect(&mut io, "221").await;
    Ok(())
}

/// Reads one reply; `Err` unless its code is `code`.
async fn expect(io: &mut BufReader<TcpStream>, code: &str) -> Result<(), String> {
    let mut line = String::new();
    loop {
        line.clear();
        if io.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed".into());
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return if line.starts_with(code) {
                Ok(())
            } else {
                Err(line.trim_end().to_string())
            };
        }
    }
}
