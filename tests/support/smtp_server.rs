//! A real SMTP server on loopback whose behaviour each test sets: STARTTLS with rustls, a
//! real TLS 1.0-only server (OpenSSL), a handshake that breaks off, rejections and drops.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::pki::CertKey;

pub enum StartTls {
    NotOffered,
    /// TLS 1.2 and 1.3 with this certificate.
    Rustls(CertKey),
    /// Says 220 to STARTTLS, then closes the connection.
    AbortAfter220,
    /// A server that speaks only TLS 1.0 (OpenSSL).
    Tls10Only(CertKey),
    /// Says 220 and, in the same write, more reply lines (a STARTTLS injection).
    InjectAfter220,
}

pub struct ServerBehaviour {
    pub starttls: StartTls,
    pub greeting: String,
    /// Reply to every RCPT; `None` is 250.
    pub rcpt_reply: Option<String>,
    /// Reply to MAIL; `None` is 250.
    pub mail_reply: Option<String>,
    /// Reply after the final dot; `None` is "250 2.0.0 queued as TEST1".
    pub data_end_reply: Option<String>,
    /// Close the connection once some body bytes have come, before the final dot.
    pub drop_mid_data: bool,
    /// Extra EHLO keywords, e.g. "AUTH PLAIN LOGIN".
    pub ehlo_extra: Vec<String>,
}

impl Default for ServerBehaviour {
    fn default() -> Self {
        ServerBehaviour {
            starttls: StartTls::NotOffered,
            greeting: "220 mx.test ESMTP test server".into(),
            rcpt_reply: None,
            mail_reply: None,
            data_end_reply: None,
            drop_mid_data: false,
            ehlo_extra: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

#[derive(Clone, Debug, Default)]
pub struct Received {
    pub helo: String,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// Exactly the bytes between the 354 and the terminating `.<CRLF>`.
    pub data: Vec<u8>,
    pub tls: Option<TlsInfo>,
    /// AUTH lines as received (decoded by the test that wants them).
    pub auth: Vec<String>,
}

#[derive(Default)]
struct State {
    messages: Mutex<Vec<Received>>,
    connections: AtomicUsize,
    starttls: AtomicUsize,
    arrived: Notify,
}

pub struct SmtpServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpServer {
    pub async fn start(
        ip: IpAddr,
        port: u16,
        behaviour: ServerBehaviour,
    ) -> std::io::Result<SmtpServer> {
        let listener = TcpListener::bind((ip, port)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let behaviour = Arc::new(behaviour);
        let task = tokio::spawn(accept_loop(listener, behaviour, state.clone()));
        Ok(SmtpServer { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Messages received completely (final dot seen and answered).
    pub fn messages(&self) -> Vec<Received> {
        self.state.messages.lock().expect("messages").clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// STARTTLS commands received.
    pub fn tls_handshakes_attempted(&self) -> usize {
        self.state.starttls.load(Ordering::SeqCst)
    }

    /// Waits for the `n`th message (1-based) to have arrived.
    pub async fn wait_for_messages(&self, n: usize) -> Vec<Received> {
        let wait = async {
            loop {
                let notified = self.state.arrived.notified();
                if self.messages().len() >= n {
                    return self.messages();
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the message did not arrive within 10 s")
    }
}

async fn accept_loop(listener: TcpListener, behaviour: Arc<ServerBehaviour>, state: Arc<State>) {
    while let Ok((stream, _)) = listener.accept().await {
        state.connections.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(connection(stream, behaviour.clone(), state.clone()));
    }
}

/// How a plain session ended.
enum Ended {
    Closed,
    StartTls(TcpStream),
}

async fn connection(stream: TcpStream, behaviour: Arc<ServerBehaviour>, state: Arc<State>) {
    let mut io = BufReader::new(stream);
    if write(&mut io, &format!("{}\r\n", behaviour.greeting))
        .await
        .is_err()
    {
        return;
    }
    let Ended::StartTls(tcp) = session(io, &behaviour, &state, None).await else {
        return;
    };
    match &behaviour.starttls {
        StartTls::Rustls(cert) => {
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(cert.chain.clone(), cert.key.clone_key())
            .expect("server cert");
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let (_, conn) = tls.get_ref();
            let info = TlsInfo {
                version: conn
                    .protocol_version()
                    .and_then(|v| v.as_str())
                    .unwrap_or("?")
                    .replace('_', "."),
                cipher: conn
                    .negotiated_cipher_suite()
                    .and_then(|s| s.suite().as_str())
                    .unwrap_or("?")
                    .to_string(),
            };
            session(BufReader::new(tls), &behaviour, &state, Some(info)).await;
        }
        StartTls::Tls10Only(cert) => tls10_handshake(tcp, cert.clone()).await,
        // The client gets nothing but a closed connection.
        StartTls::AbortAfter220 | StartTls::InjectAfter220 | StartTls::NotOffered => drop(tcp),
    }
}

/// Serves commands until QUIT, EOF, or STARTTLS (which hands the TCP stream back).
async fn session<S>(
    mut io: BufReader<S>,
    behaviour: &ServerBehaviour,
    state: &State,
    tls: Option<TlsInfo>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin + IntoTcp,
{
    let mut current = Received {
        tls: tls.clone(),
        ..Received::default()
    };
    let mut line = String::new();
    loop {
        line.clear();
        match io.read_line(&mut line).await {
            Ok(0) | Err(_) => return Ended::Closed,
            Ok(_) => {}
        }
        let command = line.trim_end().to_string();
        let upper = command.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            current.helo = command[4..].trim().to_string();
            ehlo_reply(behaviour, tls.is_some())
        } else if upper.starts_with("HELO") {
            current.helo = command[4..].trim().to_string();
            "250 mx.test\r\n".to_string()
        } else if upper == "STARTTLS"
            && tls.is_none()
            && !matches!(behaviour.starttls, StartTls::NotOffered)
        {
            state.starttls.fetch_add(1, Ordering::SeqCst);
            let greeting = match behaviour.starttls {
                StartTls::InjectAfter220 => {
                    "220 2.0.0 go ahead\r\n250-evil.example\r\n250 AUTH LOGIN\r\n"
                }
                _ => "220 2.0.0 go ahead\r\n",
            };
            if write(&mut io, greeting).await.is_err() {
                return Ended::Closed;
            }
            return S::into_tcp(io.into_inner()).map_or(Ended::Closed, Ended::StartTls);
        } else if upper.starts_with("AUTH") {
            current.auth.push(command.clone());
            "235 2.7.0 authenticated\r\n".to_string()
        } else if upper.starts_with("MAIL FROM:") {
            current.mail_from = path(&command);
            current.rcpt_to.clear();
            reply_or(&behaviour.mail_reply, "250 2.1.0 ok")
        } else if upper.starts_with("RCPT TO:") {
            let reply = reply_or(&behaviour.rcpt_reply, "250 2.1.5 ok");
            if reply.starts_with('2') {
                current.rcpt_to.push(path(&command));
            }
            reply
        } else if upper == "DATA" {
            if write(&mut io, "354 go ahead\r\n").await.is_err() {
                return Ended::Closed;
            }
            match read_body(&mut io, behaviour.drop_mid_data).await {
                Some(body) => {
                    current.data = body;
                    state
                        .messages
                        .lock()
                        .expect("messages")
                        .push(current.clone());
                    state.arrived.notify_waiters();
                    reply_or(&behaviour.data_end_reply, "250 2.0.0 queued as TEST1")
                }
                None => return Ended::Closed,
            }
        } else if upper == "RSET" {
            current.mail_from.clear();
            current.rcpt_to.clear();
            "250 2.0.0 ok\r\n".to_string()
        } else if upper == "NOOP" {
            "250 2.0.0 ok\r\n".to_string()
        } else if upper == "QUIT" {
            let _ = write(&mut io, "221 2.0.0 bye\r\n").await;
            return Ended::Closed;
        } else {
            "500 5.5.1 unknown command\r\n".to_string()
        };
        if write(&mut io, &reply).await.is_err() {
            return Ended::Closed;
        }
    }
}

fn ehlo_reply(behaviour: &ServerBehaviour, in_tls: bool) -> String {
    let mut lines = vec![
        "mx.test".to_string(),
        "PIPELINING".into(),
        "8BITMIME".into(),
        "SIZE 100000000".into(),
    ];
    if !in_tls && !matches!(behaviour.starttls, StartTls::NotOffered) {
        lines.push("STARTTLS".into());
    }
    lines.extend(behaviour.ehlo_extra.iter().cloned());
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}\r\n", if i == last { ' ' } else { '-' }))
        .collect()
}

fn reply_or(reply: &Option<String>, default: &str) -> String {
    format!("{}\r\n", reply.as_deref().unwrap_or(default))
}

/// The address inside `<...>`.
fn path(command: &str) -> String {
    let start = command.find('<').map_or(0, |i| i + 1);
    let end = command.rfind('>').unwrap_or(command.len());
    command[start..end].to_string()
}

/// Reads the body up to `<CRLF>.<CRLF>`; `None` when the client went away (or the test
/// wants the server to drop mid-body).
async fn read_body<S: AsyncRead + Unpin>(
    io: &mut BufReader<S>,
    drop_mid_data: bool,
) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let start = body.len();
        if io.read_until(b'\n', &mut body).await.ok()? == 0 {
            return None;
        }
        if drop_mid_data && body.len() > 1000 {
            return None;
        }
        if &body[start..] == b".\r\n" && (start == 0 || body[..start].ends_with(b"\r\n")) {
            body.truncate(start);
            return Some(body);
        }
    }
}

async fn write<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    text: &str,
) -> std::io::Result<()> {
    io.get_mut().write_all(text.as_bytes()).await?;
    io.get_mut().flush().await
}

/// Gives the TCP stream back for STARTTLS; a TLS stream has none to give.
trait IntoTcp: Sized {
    fn into_tcp(self) -> Option<TcpStream>;
}

impl IntoTcp for TcpStream {
    fn into_tcp(self) -> Option<TcpStream> {
        Some(self)
    }
}

impl IntoTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn into_tcp(self) -> Option<TcpStream> {
        None
    }
}

/// OpenSSL limited to TLS 1.0 (security level 0, so OpenSSL 3 still allows it). The
/// handshake runs on a blocking thread; whatever it ends in, the connection then closes.
async fn tls10_handshake(tcp: TcpStream, cert: CertKey) {
    let Ok(std_stream) = tcp.into_std() else {
        return;
    };
    let _ = std_stream.set_nonblocking(false);
    let _ = tokio::task::spawn_blocking(move || {
        use openssl::pkey::PKey;
        use openssl::ssl::{SslAcceptor, SslMethod, SslVersion};
        use openssl::x509::X509;
        let mut acceptor = SslAcceptor::mozilla_intermediate(SslMethod::tls()).expect("openssl");
        acceptor.set_security_level(0);
        acceptor
            .set_cipher_list("DEFAULT:@SECLEVEL=0")
            .expect("ciphers");
        acceptor
            .set_min_proto_version(Some(SslVersion::TLS1))
            .expect("min");
        acceptor
            .set_max_proto_version(Some(SslVersion::TLS1))
            .expect("max");
        acceptor
            .set_certificate(&X509::from_pem(cert.cert_pem.as_bytes()).expect("cert"))
            .expect("set cert");
        acceptor
            .set_private_key(&PKey::private_key_from_pem(cert.key_pem.as_bytes()).expect("key"))
            .expect("set key");
        let _ = acceptor.build().accept(std_stream);
    })
    .await;
}
