//! A real SMTP server on loopback whose behaviour each test sets: STARTTLS with rustls, a
//! real TLS 1.0-only server and a TLS 1.2 server with only CBC suites (OpenSSL), a handshake that breaks off, an injection after the
//! STARTTLS 220, rejections, and a connection dropped in the middle of DATA. It records what
//! arrived so a test can compare it byte for byte.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openssl::ssl::SslAcceptor;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::pki::CertKey;

/// How long `next_message` and `wait_for_messages` wait before failing the test.
const MESSAGE_WAIT: Duration = Duration::from_secs(10);

/// Bounds the OpenSSL handshake, so a silent client cannot hold the connection.
const OPENSSL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server does with STARTTLS.
pub enum StartTls {
    /// Not in the EHLO reply; the command gets 502.
    NotOffered,
    /// TLS 1.2 and 1.3 (rustls) with this certificate.
    Rustls(CertKey),
    /// TLS 1.2 only (rustls).
    Tls12Only(CertKey),
    /// Says 220 to STARTTLS, then closes the connection: the client's handshake fails.
    AbortAfter220,
    /// Speaks only TLS 1.0 (OpenSSL at security level 0), as old servers do; after a
    /// handshake the session goes on over TLS 1.0, after a failed one the connection closes.
    Tls10Only(CertKey),
    /// TLS 1.2 with only CBC suites (OpenSSL), none of which rustls has; otherwise like
    /// `Tls10Only`. The certificate's key must be ECDSA (rcgen's default).
    Tls12CbcOnly(CertKey),
    /// Says 220 and, in the same write, more reply lines (a STARTTLS injection), then closes.
    InjectAfter220,
}

/// How the server behaves; `Default` is a plain, accepting ESMTP server.
pub struct ServerBehaviour {
    pub starttls: StartTls,
    /// The whole greeting line, e.g. "220 mx.test ESMTP".
    pub greeting: String,
    /// Reply to every RCPT (e.g. "450 4.2.1 mailbox busy"); `None` is 250.
    pub rcpt_reply: Option<String>,
    /// Reply to MAIL; `None` is 250.
    pub mail_reply: Option<String>,
    /// Reply after the final dot; `None` is "250 2.0.0 queued as X".
    pub data_end_reply: Option<String>,
    /// TLS from the first byte (as on port 465) with this certificate, TLS 1.2 and 1.3; the
    /// greeting comes inside TLS.
    pub implicit_tls: Option<CertKey>,
    /// AUTH succeeds (235) only with this user and password, else 535, and MAIL needs a
    /// successful AUTH first (530). `None`: any AUTH succeeds, and none is needed.
    pub auth_credentials: Option<(String, String)>,
    /// Close the connection once the first body line has come, before the final dot.
    pub drop_mid_data: bool,
    /// Extra EHLO keywords, e.g. "AUTH PLAIN LOGIN".
    pub ehlo_extra: Vec<String>,
}

impl Default for ServerBehaviour {
    fn default() -> Self {
        ServerBehaviour {
            starttls: StartTls::NotOffered,
            greeting: "220 mx.test ESMTP".into(),
            rcpt_reply: None,
            mail_reply: None,
            data_end_reply: None,
            implicit_tls: None,
            auth_credentials: None,
            drop_mid_data: false,
            ehlo_extra: Vec::new(),
        }
    }
}

impl ServerBehaviour {
    /// No STARTTLS; accepts everything.
    pub fn plain() -> Self {
        Self::default()
    }

    /// STARTTLS with rustls and this certificate; accepts everything.
    pub fn tls(cert: CertKey) -> Self {
        Self::with_starttls(StartTls::Rustls(cert))
    }

    pub fn with_starttls(starttls: StartTls) -> Self {
        ServerBehaviour {
            starttls,
            ..Self::default()
        }
    }

    pub fn rcpt_reply(mut self, reply: &str) -> Self {
        self.rcpt_reply = Some(reply.into());
        self
    }

    pub fn mail_reply(mut self, reply: &str) -> Self {
        self.mail_reply = Some(reply.into());
        self
    }

    pub fn data_end_reply(mut self, reply: &str) -> Self {
        self.data_end_reply = Some(reply.into());
        self
    }

    pub fn drop_mid_data(mut self) -> Self {
        self.drop_mid_data = true;
        self
    }

    pub fn ehlo_keyword(mut self, keyword: &str) -> Self {
        self.ehlo_extra.push(keyword.into());
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// e.g. "TLSv1.3"
    pub version: String,
    /// e.g. "TLS13_AES_256_GCM_SHA384"
    pub cipher: String,
}

/// One message, delivered or attempted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// The EHLO or HELO argument of the session the message came in.
    pub helo: String,
    /// Inside the angle brackets; empty for the null sender.
    pub mail_from: String,
    /// The recipients that got a 2xx, inside the angle brackets.
    pub rcpt_to: Vec<String>,
    /// The bytes between the 354 and the terminating `.<CRLF>`, as on the wire: still
    /// dot-stuffed, with the CRLF that ends the last line. When not `completed`, what came
    /// before the connection ended.
    pub data: Vec<u8>,
    /// `None` for a message sent in plain.
    pub tls: Option<TlsInfo>,
    /// The AUTH exchange of the session, the client's lines as received (still base64).
    pub auth: Vec<String>,
    /// The final dot arrived (and was answered, with `data_end_reply` or 250).
    pub completed: bool,
}

/// What connections share: the record of what happened.
struct Shared {
    received: Mutex<Vec<Received>>,
    /// The number of completed messages, so waiters wake without polling.
    completed: watch::Sender<usize>,
    connections: AtomicUsize,
    starttls: AtomicUsize,
    /// The client's lines in AUTH exchanges, every session.
    auth_lines: Mutex<Vec<String>>,
    /// Cleared by `stop_offering_starttls`.
    offer_starttls: AtomicBool,
}

impl Shared {
    fn record(&self, message: Received) {
        let completed = message.completed;
        self.received.lock().expect("received lock").push(message);
        if completed {
            self.completed.send_modify(|n| *n += 1);
        }
    }
}

/// Serves until dropped; dropping it also closes every connection it has open.
pub struct SmtpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// How many messages `next_message` has handed out.
    taken: AtomicUsize,
    task: JoinHandle<()>,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpServer {
    /// Listens on `ip`:`port` (0: any free port). Fails if the port is taken or the
    /// certificate is unusable.
    pub async fn start(ip: IpAddr, port: u16, behaviour: ServerBehaviour) -> io::Result<Self> {
        let listener = TcpListener::bind((ip, port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            received: Mutex::default(),
            completed: watch::Sender::new(0),
            connections: AtomicUsize::new(0),
            starttls: AtomicUsize::new(0),
            auth_lines: Mutex::default(),
            offer_starttls: AtomicBool::new(true),
        });
        let implicit = behaviour.implicit_tls.as_ref();
        let server = Arc::new(Server {
            upgrade: Upgrade::new(&behaviour.starttls)?,
            implicit: implicit
                .map(|c| rustls_acceptor(c, rustls::ALL_VERSIONS))
                .transpose()?,
            behaviour,
            shared: shared.clone(),
        });
        let task = tokio::spawn(accept_loop(listener, server));
        Ok(SmtpServer {
            addr,
            shared,
            taken: AtomicUsize::new(0),
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Messages whose final dot arrived, in order.
    pub fn messages(&self) -> Vec<Received> {
        let all = self.attempts();
        all.into_iter().filter(|m| m.completed).collect()
    }

    /// Every message that reached DATA, completed or not.
    pub fn attempts(&self) -> Vec<Received> {
        self.shared.received.lock().expect("received lock").clone()
    }

    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// STARTTLS commands received, whether offered or not.
    pub fn tls_handshakes_attempted(&self) -> usize {
        self.shared.starttls.load(Ordering::SeqCst)
    }

    /// The client's lines in AUTH exchanges (the AUTH command, then any answers to 334),
    /// from every session, whether the AUTH succeeded or not.
    pub fn auth_lines(&self) -> Vec<String> {
        self.shared
            .auth_lines
            .lock()
            .expect("auth lines lock")
            .clone()
    }

    /// From now on EHLO does not offer STARTTLS and the command gets 502, as when a
    /// server's TLS is switched off (or stripped on the way).
    pub fn stop_offering_starttls(&self) {
        self.shared.offer_starttls.store(false, Ordering::SeqCst);
    }

    /// The next completed message not yet returned by this method (the first, then the
    /// second...), waiting up to 10 s for it to arrive.
    pub async fn next_message(&self) -> Received {
        let index = self.taken.fetch_add(1, Ordering::SeqCst);
        self.wait_for_messages(index + 1).await.swap_remove(index)
    }

    /// All completed messages once there are at least `n`, waiting up to 10 s.
    pub async fn wait_for_messages(&self, n: usize) -> Vec<Received> {
        let mut count = self.shared.completed.subscribe();
        let arrived = tokio::time::timeout(MESSAGE_WAIT, count.wait_for(|c| *c >= n)).await;
        match arrived {
            Ok(Ok(_)) => self.messages(),
            Ok(Err(_)) => unreachable!("the server owns the sender"),
            Err(_) => panic!(
                "{}: waited {MESSAGE_WAIT:?} for message {n}, have {}: {:?}",
                self.addr,
                self.messages().len(),
                self.attempts()
            ),
        }
    }
}

/// What every connection of one server needs.
struct Server {
    behaviour: ServerBehaviour,
    upgrade: Upgrade,
    implicit: Option<TlsAcceptor>,
    shared: Arc<Shared>,
}

impl Server {
    fn offers_starttls(&self) -> bool {
        let configured = !matches!(self.upgrade, Upgrade::NotOffered);
        configured && self.shared.offer_starttls.load(Ordering::SeqCst)
    }
}

/// The STARTTLS behaviour with its TLS configuration built once, at start.
enum Upgrade {
    NotOffered,
    Rustls(TlsAcceptor),
    Openssl(SslAcceptor),
    /// 220 (plus these extra bytes), then close.
    Close(&'static str),
}

impl Upgrade {
    fn new(starttls: &StartTls) -> io::Result<Upgrade> {
        let tls12 = &[&rustls::version::TLS12];
        Ok(match starttls {
            StartTls::NotOffered => Upgrade::NotOffered,
            // TLS 1.3 and 1.2.
            StartTls::Rustls(cert) => Upgrade::Rustls(rustls_acceptor(cert, rustls::ALL_VERSIONS)?),
            StartTls::Tls12Only(cert) => Upgrade::Rustls(rustls_acceptor(cert, tls12)?),
            StartTls::Tls10Only(cert) => {
                Upgrade::Openssl(tls10_acceptor(cert).map_err(io::Error::other)?)
            }
            StartTls::Tls12CbcOnly(cert) => {
                Upgrade::Openssl(tls12_cbc_acceptor(cert).map_err(io::Error::other)?)
            }
            StartTls::AbortAfter220 => Upgrade::Close(""),
            StartTls::InjectAfter220 => Upgrade::Close("250-evil.example\r\n250 AUTH LOGIN\r\n"),
        })
    }
}

fn rustls_acceptor(
    cert: &CertKey,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> io::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(io::Error::other)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// TLS 1.0 and nothing else. OpenSSL 3 allows TLS 1.0 only at security level 0.
fn tls10_acceptor(cert: &CertKey) -> Result<SslAcceptor, openssl::error::ErrorStack> {
    use openssl::ssl::SslVersion;
    openssl_acceptor(cert, SslVersion::TLS1, "DEFAULT:@SECLEVEL=0")
}

/// TLS 1.2 with CBC suites only (HMAC-SHA1 and -SHA2), as servers set up before AEAD had.
fn tls12_cbc_acceptor(cert: &CertKey) -> Result<SslAcceptor, openssl::error::ErrorStack> {
    use openssl::ssl::SslVersion;
    let cbc = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:\
               ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA";
    openssl_acceptor(cert, SslVersion::TLS1_2, cbc)
}

/// An OpenSSL server for exactly one protocol version and these TLS 1.2-and-older suites.
fn openssl_acceptor(
    cert: &CertKey,
    version: openssl::ssl::SslVersion,
    ciphers: &str,
) -> Result<SslAcceptor, openssl::error::ErrorStack> {
    use openssl::pkey::PKey;
    use openssl::ssl::SslMethod;
    use openssl::x509::X509;
    let mut builder = SslAcceptor::mozilla_intermediate(SslMethod::tls())?;
    builder.set_cipher_list(ciphers)?;
    builder.set_min_proto_version(Some(version))?;
    builder.set_max_proto_version(Some(version))?;
    let certificate = X509::from_pem(cert.cert_pem.as_bytes())?;
    let key = PKey::private_key_from_pem(cert.key_pem.as_bytes())?;
    builder.set_certificate(&certificate)?;
    builder.set_private_key(&key)?;
    builder.check_private_key()?;
    Ok(builder.build())
}

/// Accepts until aborted; aborting drops `connections`, which aborts them too.
async fn accept_loop(listener: TcpListener, server: Arc<Server>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // A failed accept (the client already gone) concerns that client only.
                let Ok((stream, _)) = accepted else { continue };
                server.shared.connections.fetch_add(1, Ordering::SeqCst);
                connections.spawn(serve(stream, server.clone()));
            }
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next() => {}
        }
    }
}

/// How a session ended.
enum Ended {
    Closed,
    /// STARTTLS was accepted: the caller switches the stream to TLS.
    StartTls,
}

async fn serve(stream: TcpStream, server: Arc<Server>) {
    match &server.implicit {
        Some(acceptor) => serve_rustls(acceptor, stream, &server, true).await,
        None => serve_plain(stream, &server).await,
    }
}

async fn serve_plain(stream: TcpStream, server: &Server) {
    let mut plain = BufReader::new(stream);
    if reply(&mut plain, &server.behaviour.greeting).await.is_err() {
        return;
    }
    if let Ended::Closed = session(&mut plain, server, None).await {
        return;
    }
    // Whatever the client sent after STARTTLS is dropped with the buffer, never acted on
    // (the CVE-2011-0411 rule).
    let tcp = plain.into_inner();
    match &server.upgrade {
        Upgrade::Rustls(acceptor) => serve_rustls(acceptor, tcp, server, false).await,
        Upgrade::Openssl(acceptor) => serve_openssl(acceptor, tcp, server).await,
        // Dropping the stream closes the connection.
        Upgrade::NotOffered | Upgrade::Close(_) => {}
    }
}

/// A session inside TLS; after STARTTLS it is a new one: the client must say EHLO again,
/// and nothing from before TLS counts.
async fn serve_rustls(acceptor: &TlsAcceptor, tcp: TcpStream, server: &Server, greet: bool) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let info = tls_info(tls.get_ref().1);
    let mut io = BufReader::new(tls);
    if greet && reply(&mut io, &server.behaviour.greeting).await.is_err() {
        return;
    }
    session(&mut io, server, Some(info)).await;
}

fn tls_info(conn: &rustls::ServerConnection) -> TlsInfo {
    let version = conn.protocol_version().and_then(|v| v.as_str());
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str());
    TlsInfo {
        // rustls says "TLSv1_3"; OpenSSL and the proxy's logs say "TLSv1.3".
        version: version.unwrap_or("unknown").replace('_', "."),
        cipher: cipher.unwrap_or("unknown").to_string(),
    }
}

/// A session inside an OpenSSL TLS session; a failed handshake closes the connection.
async fn serve_openssl(acceptor: &SslAcceptor, tcp: TcpStream, server: &Server) {
    let Ok(ssl) = openssl::ssl::Ssl::new(acceptor.context()) else {
        return;
    };
    let Ok(mut tls) = tokio_openssl::SslStream::new(ssl, tcp) else {
        return;
    };
    let handshake = std::pin::Pin::new(&mut tls).accept();
    match tokio::time::timeout(OPENSSL_HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(%error, "OpenSSL test server: handshake failed");
            return;
        }
        Err(_) => return,
    }
    let info = openssl_tls_info(tls.ssl());
    session(&mut BufReader::new(tls), server, Some(info)).await;
}

fn openssl_tls_info(ssl: &openssl::ssl::SslRef) -> TlsInfo {
    // OpenSSL says "TLSv1" for 1.0; the proxy's logs say "TLSv1.0".
    let version = match ssl.version_str() {
        "TLSv1" => "TLSv1.0",
        other => other,
    };
    let cipher = ssl.current_cipher().and_then(|c| c.standard_name());
    TlsInfo {
        version: version.to_string(),
        cipher: cipher.unwrap_or("unknown").to_string(),
    }
}

/// What one command asks of the session loop.
enum Step {
    Reply(String),
    StartTls,
    Auth(String),
    Data,
    Quit,
}

/// The state of one SMTP session (a new one after STARTTLS).
struct Session {
    tls: Option<TlsInfo>,
    helo: Option<String>,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
    auth: Vec<String>,
    authenticated: bool,
}

/// Serves commands until QUIT, EOF, or an accepted STARTTLS.
async fn session<S>(io: &mut BufReader<S>, server: &Server, tls: Option<TlsInfo>) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session {
        tls,
        helo: None,
        mail_from: None,
        rcpt_to: Vec::new(),
        auth: Vec::new(),
        authenticated: false,
    };
    while let Some(line) = read_line(io).await {
        let done = match session.command(&line, server) {
            Step::Reply(text) => reply(io, &text).await.is_err(),
            Step::Auth(line) => session.auth(io, &line, server).await.is_err(),
            Step::Data => session.data(io, server).await.is_err(),
            Step::StartTls => {
                let extra = match server.upgrade {
                    Upgrade::Close(extra) => extra,
                    _ => "",
                };
                // One write, so injected lines arrive with the 220.
                let go = format!("220 2.0.0 ready to start TLS\r\n{extra}");
                return match reply(io, &go).await {
                    Ok(()) => Ended::StartTls,
                    Err(_) => Ended::Closed,
                };
            }
            Step::Quit => {
                let _ = reply(io, "221 2.0.0 bye").await;
                true
            }
        };
        if done {
            break;
        }
    }
    Ended::Closed
}

impl Session {
    fn command(&mut self, line: &str, server: &Server) -> Step {
        let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
        let reply = |text: &str| Step::Reply(text.to_string());
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                self.greet(arg);
                Step::Reply(ehlo_reply(server, self.tls.is_some()))
            }
            "HELO" => {
                self.greet(arg);
                reply("250 mx.test")
            }
            "STARTTLS" => self.starttls(server),
            "AUTH" => Step::Auth(line.to_string()),
            "MAIL" => Step::Reply(self.mail(arg, server)),
            "RCPT" => Step::Reply(self.rcpt(arg, server)),
            "DATA" => self.data_start(),
            "RSET" => {
                self.reset();
                reply("250 2.0.0 ok")
            }
            "NOOP" => reply("250 2.0.0 ok"),
            "QUIT" => Step::Quit,
            _ => reply("500 5.5.2 command not recognized"),
        }
    }

    /// EHLO and HELO start over: a new HELO name, no transaction.
    fn greet(&mut self, arg: &str) {
        self.helo = Some(arg.trim().to_string());
        self.reset();
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpt_to.clear();
    }

    fn starttls(&mut self, server: &Server) -> Step {
        server.shared.starttls.fetch_add(1, Ordering::SeqCst);
        if self.tls.is_some() {
            Step::Reply("503 5.5.1 TLS already active".into())
        } else if !server.offers_starttls() {
            Step::Reply("502 5.5.1 STARTTLS not offered".into())
        } else {
            Step::StartTls
        }
    }

    fn mail(&mut self, arg: &str, server: &Server) -> String {
        if self.helo.is_none() {
            return "503 5.5.1 EHLO or HELO first".into();
        }
        if self.mail_from.is_some() {
            return "503 5.5.1 nested MAIL command".into();
        }
        if server.behaviour.auth_credentials.is_some() && !self.authenticated {
            return "530 5.7.0 authentication required".into();
        }
        let Some(sender) = path_arg(arg, "FROM:") else {
            return "501 5.5.4 syntax: MAIL FROM:<address>".into();
        };
        let reply = reply_or(&server.behaviour.mail_reply, "250 2.1.0 sender ok");
        if reply.starts_with('2') {
            self.mail_from = Some(sender);
        }
        reply
    }

    fn rcpt(&mut self, arg: &str, server: &Server) -> String {
        if self.mail_from.is_none() {
            return "503 5.5.1 MAIL first".into();
        }
        let Some(recipient) = path_arg(arg, "TO:") else {
            return "501 5.5.4 syntax: RCPT TO:<address>".into();
        };
        let reply = reply_or(&server.behaviour.rcpt_reply, "250 2.1.5 recipient ok");
        if reply.starts_with('2') {
            self.rcpt_to.push(recipient);
        }
        reply
    }

    fn data_start(&self) -> Step {
        if self.mail_from.is_none() {
            Step::Reply("503 5.5.1 MAIL first".into())
        } else if self.rcpt_to.is_empty() {
            Step::Reply("554 5.5.1 no valid recipients".into())
        } else {
            Step::Data
        }
    }

    /// 354, the body, then the reply; the transaction ends either way. Err: connection over.
    async fn data<S>(&mut self, io: &mut BufReader<S>, server: &Server) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        reply(io, "354 end data with <CR><LF>.<CR><LF>").await?;
        let (data, completed) = read_body(io, server.behaviour.drop_mid_data).await;
        let message = Received {
            helo: self.helo.clone().unwrap_or_default(),
            mail_from: self.mail_from.take().unwrap_or_default(),
            rcpt_to: std::mem::take(&mut self.rcpt_to),
            data,
            tls: self.tls.clone(),
            auth: self.auth.clone(),
            completed,
        };
        server.shared.record(message);
        if !completed {
            return Err(io::ErrorKind::ConnectionAborted.into());
        }
        let end = reply_or(&server.behaviour.data_end_reply, "250 2.0.0 queued as X");
        reply(io, &end).await
    }

    /// AUTH PLAIN or LOGIN, with or without an initial response.
    async fn auth<S>(
        &mut self,
        io: &mut BufReader<S>,
        line: &str,
        server: &Server,
    ) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mechanism = words.get(1).map(|m| m.to_ascii_uppercase());
        // The prompts the client still has to answer ("Username:", "Password:" for LOGIN).
        let prompts: &[&str] = match (mechanism.as_deref(), words.len()) {
            (Some("PLAIN"), 2) => &["334 "],
            (Some("PLAIN"), _) => &[],
            (Some("LOGIN"), 2) => &["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"],
            (Some("LOGIN"), _) => &["334 UGFzc3dvcmQ6"],
            _ => return reply(io, "504 5.5.4 mechanism not supported").await,
        };
        self.auth_line(line, server);
        // The initial response, if any, then the answers to the prompts.
        let mut answers: Vec<String> = words.get(2).map(|w| w.to_string()).into_iter().collect();
        for prompt in prompts {
            reply(io, prompt).await?;
            let answer = read_line(io).await.ok_or(io::ErrorKind::UnexpectedEof)?;
            self.auth_line(&answer, server);
            answers.push(answer);
        }
        let given = credentials(mechanism.as_deref(), &answers);
        self.authenticated = match &server.behaviour.auth_credentials {
            Some(wanted) => given.as_ref() == Some(wanted),
            None => true,
        };
        let outcome = if self.authenticated {
            "235 2.7.0 authenticated"
        } else {
            "535 5.7.8 authentication credentials invalid"
        };
        reply(io, outcome).await
    }

    fn auth_line(&mut self, line: &str, server: &Server) {
        self.auth.push(line.to_string());
        let mut all = server.shared.auth_lines.lock().expect("auth lines lock");
        all.push(line.to_string());
    }
}

/// (user, password) from the base64 answers of AUTH PLAIN or LOGIN.
fn credentials(mechanism: Option<&str>, answers: &[String]) -> Option<(String, String)> {
    use base64::Engine;
    let decode = |text: &String| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?;
        String::from_utf8(bytes).ok()
    };
    match mechanism? {
        // authzid NUL user NUL password
        "PLAIN" => {
            let token = decode(answers.first()?)?;
            let mut parts = token.split('\0').skip(1);
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        }
        "LOGIN" => Some((decode(answers.first()?)?, decode(answers.get(1)?)?)),
        _ => None,
    }
}

fn ehlo_reply(server: &Server, in_tls: bool) -> String {
    let mut lines = vec![
        "mx.test",
        "PIPELINING",
        "8BITMIME",
        "SIZE 52428800",
        "ENHANCEDSTATUSCODES",
    ];
    if !in_tls && server.offers_starttls() {
        lines.push("STARTTLS");
    }
    lines.extend(server.behaviour.ehlo_extra.iter().map(String::as_str));
    let last = lines.len() - 1;
    let line = |(i, text): (usize, &str)| format!("250{}{text}", if i == last { ' ' } else { '-' });
    lines
        .into_iter()
        .enumerate()
        .map(line)
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn reply_or(reply: &Option<String>, default: &str) -> String {
    reply.as_deref().unwrap_or(default).to_string()
}

/// The address inside `<...>` after `prefix` (case-insensitive); parameters after it are
/// ignored.
fn path_arg(arg: &str, prefix: &str) -> Option<String> {
    let head = arg.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg[prefix.len()..].trim_start().strip_prefix('<')?;
    let end = rest.find('>')?;
    Some(rest[..end].to_string())
}

/// Reads up to `<CRLF>.<CRLF>`: (body, true); or (what came, false) when the connection
/// ended first, or after the first line when the test wants the server to drop mid-body.
async fn read_body<S: AsyncRead + Unpin>(
    io: &mut BufReader<S>,
    drop_mid_data: bool,
) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let start = body.len();
        match io.read_until(b'\n', &mut body).await {
            Ok(0) | Err(_) => return (body, false),
            Ok(_) => {}
        }
        let at_line_start = start == 0 || body[..start].ends_with(b"\r\n");
        if at_line_start && &body[start..] == b".\r\n" {
            body.truncate(start);
            return (body, true);
        }
        if drop_mid_data {
            return (body, false);
        }
    }
}

/// One command line without its line ending; `None` at EOF or on a read error.
async fn read_line<S: AsyncRead + Unpin>(io: &mut BufReader<S>) -> Option<String> {
    let mut line = Vec::new();
    match io.read_until(b'\n', &mut line).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(
            String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        ),
    }
}

/// Writes `text` (one or more lines) and a final CRLF in one write, and flushes: TLS
/// streams buffer.
async fn reply<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    text: &str,
) -> io::Result<()> {
    let stream = io.get_mut();
    let wire = format!("{}\r\n", text.trim_end_matches(['\r', '\n']));
    stream.write_all(wire.as_bytes()).await?;
    stream.flush().await
}
