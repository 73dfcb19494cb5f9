//! A small SMTP client that talks to the proxy the way an MTA does, one command at a time,
//! with raw bytes when a test needs to misbehave, and STARTTLS (rustls) to test servers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Generous: a reply slower than this is a hung test, not a slow machine (the proxy may wait
/// out a remote's timeouts before answering).
const REPLY_WAIT: Duration = Duration::from_secs(30);

/// One SMTP reply, possibly multi-line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of each line, after the code and its separator.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The enhanced status code at the start of the first line, e.g. "4.7.5".
    pub fn enhanced(&self) -> Option<String> {
        let first = self.lines.first()?.split(' ').next()?;
        let parts: Vec<&str> = first.split('.').collect();
        let numeric = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        (parts.len() == 3 && parts.iter().all(numeric)).then(|| first.to_string())
    }

    /// "250 2.0.0 ok" for one line; each line so for several.
    pub fn wire(&self) -> String {
        let lines = self.lines.iter().map(|l| format!("{} {l}", self.code));
        lines.collect::<Vec<_>>().join("\n")
    }
}

/// Over plain TCP by default; `starttls` turns it into one over TLS.
pub struct SmtpClient<S = TcpStream> {
    io: BufReader<S>,
}

impl SmtpClient {
    /// Connects and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> (SmtpClient, Reply) {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let mut client = SmtpClient {
            io: BufReader::new(stream),
        };
        let greeting = client.read_reply().await;
        (client, greeting)
    }

    /// Connects with TLS from the first byte (implicit TLS, as on port 465) and reads the
    /// greeting; panics if the handshake fails.
    pub async fn connect_tls(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> (SmtpClient<TlsStream<TcpStream>>, Reply) {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let tls = handshake(config, server_name, stream)
            .await
            .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
        let mut client = SmtpClient {
            io: BufReader::new(tls),
        };
        let greeting = client.read_reply().await;
        (client, greeting)
    }

    /// STARTTLS, then the handshake as `server_name`. Err if the reply is not 220, if bytes
    /// came after the 220 (an injection: a client must not read them as replies after TLS),
    /// or if the handshake fails (the `rustls::Error`, if any, is the `io::Error`'s inner
    /// error). The caller says EHLO again.
    pub async fn starttls(
        mut self,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> io::Result<SmtpClient<TlsStream<TcpStream>>> {
        let go = self.cmd("STARTTLS").await;
        if go.code != 220 {
            return Err(io::Error::other(format!("STARTTLS refused: {}", go.wire())));
        }
        let early = self.io.buffer();
        if !early.is_empty() {
            let text = String::from_utf8_lossy(early);
            let message = format!("{} bytes after the STARTTLS 220: {text:?}", early.len());
            return Err(io::Error::new(io::ErrorKind::InvalidData, message));
        }
        let tls = handshake(config, server_name, self.io.into_inner()).await?;
        Ok(SmtpClient {
            io: BufReader::new(tls),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.io.get_ref().local_addr().expect("local address")
    }
}

impl SmtpClient<TlsStream<TcpStream>> {
    /// The server's leaf certificate of this session.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        let (_, session) = self.io.get_ref().get_ref();
        let certs = session.peer_certificates()?;
        certs.first().map(|c| c.as_ref().to_vec())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpClient<S> {
    /// Sends `line` and CRLF, and reads the reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        self.read_reply().await
    }

    /// Sends exactly `bytes`; panics if the connection is gone.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.try_send_raw(bytes)
            .await
            .unwrap_or_else(|e| panic!("send {} bytes: {e}", bytes.len()));
    }

    /// Sends exactly `bytes`, for tests where the peer may have closed.
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.io.get_mut();
        stream.write_all(bytes).await?;
        stream.flush().await
    }

    /// Sends DATA; on 354 sends `body` exactly as given and then `.<CRLF>`, and returns the
    /// reply to the final dot. Otherwise returns DATA's own reply and sends no body.
    ///
    /// `body` must already be on-the-wire form: dot-stuffed, lines ending in CRLF, and
    /// empty or ending in CRLF (so the dot starts a line). A body that breaks the last rule
    /// panics, since the message would end somewhere else than the test meant.
    pub async fn data(&mut self, body: &[u8]) -> Reply {
        assert!(
            body.is_empty() || body.ends_with(b"\r\n"),
            "SmtpClient::data: the body must end with CRLF"
        );
        let start = self.cmd("DATA").await;
        if start.code != 354 {
            return start;
        }
        self.send_raw(body).await;
        self.send_raw(b".\r\n").await;
        self.read_reply().await
    }

    /// The next reply; panics if the connection closes first or nothing comes in 30 s.
    pub async fn read_reply(&mut self) -> Reply {
        match self.try_read_reply().await {
            Some(reply) => reply,
            None => panic!("the connection closed where a reply was expected"),
        }
    }

    /// The next reply, or `None` if the connection closed (or was reset) first. Panics on a
    /// line that is not a reply, or if nothing comes in 30 s.
    pub async fn try_read_reply(&mut self) -> Option<Reply> {
        match tokio::time::timeout(REPLY_WAIT, self.read_lines()).await {
            Ok(reply) => reply,
            Err(_) => panic!("no reply within {REPLY_WAIT:?}"),
        }
    }

    async fn read_lines(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            if self.io.read_until(b'\n', &mut raw).await.ok()? == 0 {
                return None;
            }
            let line = String::from_utf8_lossy(&raw);
            let (code, last, text) = parse_line(line.trim_end_matches(['\r', '\n']));
            lines.push(text);
            if last {
                return Some(Reply { code, lines });
            }
        }
    }
}

async fn handshake(
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
    tcp: TcpStream,
) -> io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(server_name.to_string()).map_err(io::Error::other)?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// "250-text" → (250, false, "text"); "250 text" or "250" → (250, true, ...).
fn parse_line(line: &str) -> (u16, bool, String) {
    let code = line.get(..3).and_then(|c| c.parse().ok());
    let separator = line.as_bytes().get(3).copied();
    match (code, separator) {
        (Some(code), None) => (code, true, String::new()),
        (Some(code), Some(b' ' | b'-')) => (code, separator == Some(b' '), line[4..].to_string()),
        _ => panic!("not an SMTP reply line: {line:?}"),
    }
}

/// One message in a session of its own, as an MTA sends it: EHLO, the `mail` line (MAIL
/// FROM and its parameters), RCPT TO `rcpt`, and DATA with `body` when the recipient was
/// taken. The reply to RCPT, and to the message when there was one.
pub async fn send_one(
    addr: SocketAddr,
    mail: &str,
    rcpt: &str,
    body: &[u8],
) -> (Reply, Option<Reply>) {
    let (mut client, _) = SmtpClient::connect(addr).await;
    client.cmd("EHLO mta.sender.test").await;
    let sender = client.cmd(mail).await;
    assert_eq!(sender.code, 250, "{mail}: {sender:?}");
    let reply = client.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    let message = match reply.code {
        250 => Some(client.data(body).await),
        _ => None,
    };
    client.cmd("QUIT").await;
    (reply, message)
}
