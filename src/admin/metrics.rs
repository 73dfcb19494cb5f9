//! The Prometheus endpoint: `GET /metrics` over plain HTTP, loopback by default. A
//! scraper asks once and goes: a few connections at a time, each with a deadline, so that
//! a client holding connections open cannot take the relay's descriptors.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::proxy::Proxy;

/// A request head larger than this is not a scraper's.
const MAX_HEAD: usize = 8 * 1024;
/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a connection may take to ask and be answered.
pub const DEADLINE: Duration = Duration::from_secs(5);

pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: wait for some to come back instead of spinning.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(DEADLINE, answer(&proxy, &mut stream)).await;
        });
    }
}

/// Reads one request head and answers it.
async fn answer(proxy: &Proxy, stream: &mut tokio::net::TcpStream) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let wanted = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?");
    let (status, body) = if wanted {
        crate::admin::refresh_gauges(proxy);
        ("200 OK", proxy.stats.prometheus_text())
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}
