//! The benchmark's remote: an SMTP sink that takes every message and throws it away, with
//! STARTTLS (a certificate made at start) when asked. Replies in one write per command
//! group, so that it costs little beside what it measures.
//!
//! `bench-sink PORT [--starttls]`

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args
        .get(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: bench-sink PORT [--starttls]");
    let acceptor = args.iter().any(|a| a == "--starttls").then(acceptor);
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    println!("listening on {}", listener.local_addr().expect("addr"));
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut io = BufReader::new(stream);
            let starttls = session(&mut io, acceptor.is_some(), true).await;
            if let (Some(StartTls), Some(acceptor)) = (starttls, acceptor)
                && let Ok(tls) = acceptor.accept(io.into_inner()).await
            {
                let mut io = BufReader::new(tls);
                let _ = session(&mut io, false, false).await;
            }
        });
    }
}

fn acceptor() -> TlsAcceptor {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["sink.bench".to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("certificate");
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], der)
    .expect("server config");
    TlsAcceptor::from(Arc::new(config))
}

/// The client said STARTTLS and got 220.
struct StartTls;

/// One SMTP session; `greet` on a new connection (after TLS the client speaks first).
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    offer_tls: bool,
    greet: bool,
) -> Option<StartTls> {
    let mut out = Vec::with_capacity(256);
    if greet {
        out.extend_from_slice(b"220 sink.bench ESMTP\r\n");
    }
    let mut line = String::new();
    loop {
        // Replies to pipelined commands go in one write, once the input is used up.
        if !out.is_empty() && io.buffer().is_empty() {
            io.get_mut().write_all(&out).await.ok()?;
            io.get_mut().flush().await.ok()?;
            out.clear();
        }
        line.clear();
        if io.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
            "EHLO" => {
                out.extend_from_slice(b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n");
                if offer_tls {
                    out.extend_from_slice(b"250-STARTTLS\r\n");
                }
                out.extend_from_slice(b"250 SIZE 1000000000\r\n");
            }
            "STAR" if offer_tls => {
                io.get_mut().write_all(b"220 go ahead\r\n").await.ok()?;
                return Some(StartTls);
            }
            "DATA" => {
                out.extend_from_slice(b"354 go\r\n");
                io.get_mut().write_all(&out).await.ok()?;
                io.get_mut().flush().await.ok()?;
                out.clear();
                discard_body(io).await?;
                out.extend_from_slice(b"250 2.0.0 ok\r\n");
            }
            "QUIT" => {
                out.extend_from_slice(b"221 bye\r\n");
                let _ = io.get_mut().write_all(&out).await;
                let _ = io.get_mut().flush().await;
                return None;
            }
            _ => out.extend_from_slice(b"250 2.0.0 ok\r\n"),
        }
    }
}

/// Reads up to CRLF.CRLF, keeping only the last bytes of what came before. Only what
/// belongs to the body is consumed: a client may pipeline its next command (QUIT, RSET)
/// right behind the dot.
async fn discard_body<S: AsyncRead + Unpin>(io: &mut BufReader<S>) -> Option<()> {
    // The CRLF that ended the DATA command: a body may be the dot alone.
    let mut tail: Vec<u8> = b"\r\n".to_vec();
    loop {
        let buf = io.fill_buf().await.ok()?;
        if buf.is_empty() {
            return None;
        }
        let n = buf.len();
        let mut joined = std::mem::take(&mut tail);
        let kept = joined.len();
        joined.extend_from_slice(buf);
        if let Some(at) = memchr::memmem::find(&joined, b"\r\n.\r\n") {
            io.consume(at + 5 - kept);
            return Some(());
        }
        io.consume(n);
        tail = joined[joined.len().saturating_sub(4)..].to_vec();
    }
}
