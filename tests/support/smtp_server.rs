//! The one test SMTP server: real, on loopback, and scriptable. A [`ServerBehaviour`] starts
//! from a preset (plain, STARTTLS with rustls, TLS 1.2 only, a real TLS 1.0-only server and
//! a TLS 1.2 server with only CBC suites with OpenSSL, a handshake that breaks off, an injection after the STARTTLS 220, implicit TLS,
//! AUTH that wants given credentials) and a script can change any step of a session
//! (greeting, EHLO, STARTTLS, the handshake, MAIL, RCPT, DATA, the body, the end of data):
//! another reply, a dropped connection, a stall, a reply where none is due, or a pause until
//! the test releases it.
//!
//! The server records everything: per connection every command line (also those that came
//! after it said 421 or 221), the body and whether TLS was up; per message the envelope, the
//! exact bytes, the TLS version and cipher, the AUTH exchange; and it counts connections and
//! STARTTLS commands. It can also read the way a careless receiver does
//! ([`ServerBehaviour::lenient`]): a bare CR or LF ends a line, NULs are ignored, and any line
//! that is only "." ends the message; that is the receiver SMTP smuggling aims at.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use openssl::ssl::SslAcceptor;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::pki::{CertKey, TestCa, Validity};

/// How long a test waits for something the server should see before it fails.
const WAIT: Duration = Duration::from_secs(30);

/// Bounds the OpenSSL handshake, so a silent client cannot hold the connection.
const OPENSSL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server does with STARTTLS.
#[derive(Clone)]
pub enum StartTls {
    /// Not in the EHLO reply; the command gets 502.
    NotOffered,
    /// TLS 1.2 and 1.3 (rustls) with this certificate.
    Rustls(CertKey),
    /// TLS 1.2 only (rustls).
    Tls12Only(CertKey),
    /// Says 220 to STARTTLS, then closes the connection: the client's handshake fails.
    AbortAfter220,
    /// TLS 1.2 with only CBC suites (OpenSSL), none of which rustls has; otherwise like
    /// `Tls10Only`. The certificate's key must be ECDSA (rcgen's default).
    Tls12CbcOnly(CertKey),
    /// Speaks only TLS 1.0 (OpenSSL at security level 0), as old servers do; after a
    /// handshake the session goes on over TLS 1.0, after a failed one the connection closes.
    Tls10Only(CertKey),
    /// Says 220 and, in the same write, more reply lines (a STARTTLS injection), then closes.
    InjectAfter220,
}

/// A step of an SMTP session, as the server sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// The 220 banner, on connect.
    Greeting,
    /// The reply to EHLO (and to HELO, and to the EHLO after TLS, unless they are set).
    Ehlo,
    /// The reply to HELO.
    Helo,
    /// The reply to the EHLO once TLS is up.
    EhloAfterTls,
    /// The reply to STARTTLS.
    StartTls,
    /// The TLS handshake after a 220 to STARTTLS (only `Normal`, `Drop`, `Stall` apply).
    Handshake,
    Mail,
    Rcpt,
    /// The reply to DATA (354).
    Data,
    /// Once the first bytes of the message text have come.
    Body,
    /// The reply after the final dot.
    EndOfData,
}

impl Step {
    /// The steps every plain session goes through.
    pub const PLAIN: [Step; 7] = [
        Step::Greeting,
        Step::Ehlo,
        Step::Mail,
        Step::Rcpt,
        Step::Data,
        Step::Body,
        Step::EndOfData,
    ];
}

/// What the server does at a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The normal reply.
    Normal,
    /// This reply instead (one line, without CRLF; "250-a\r\n250 b" for several). After a
    /// 421 or 221 the server never answers again but keeps reading and recording. At `Body`
    /// it is sent mid-body and stands for the reply to the final dot.
    Reply(String),
    /// This reply, then the server closes the connection.
    ReplyAndClose(String),
    /// Closes the connection without a word.
    Drop,
    /// Never answers again; keeps reading and recording until the peer closes.
    Stall,
    /// The normal reply and then this line, in the same write: a reply where none is due.
    /// At `Body` the line is sent mid-body and the final dot still gets its normal reply.
    Extra(String),
    /// The normal reply, once the test calls [`SmtpServer::release`].
    Hold,
    /// Stops reading and answering until [`SmtpServer::release`]; then reads on silently.
    /// The server's receive buffer is kept small so that a sender blocks soon.
    Freeze,
}

/// How the server behaves; `Default` (and [`ServerBehaviour::plain`]) is a plain, accepting
/// ESMTP server. The fields give the normal replies; [`ServerBehaviour::on`] scripts a step.
#[derive(Clone)]
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
    /// Close the connection once the first body bytes have come, before the final dot.
    pub drop_mid_data: bool,
    /// Extra EHLO keywords, e.g. "AUTH PLAIN LOGIN".
    pub ehlo_extra: Vec<String>,
    /// Reads like a careless receiver (see the module documentation).
    pub lenient: bool,
    /// What the server does differently at given steps (see [`ServerBehaviour::on`]).
    pub script: Script,
}

/// Actions per step: for every connection, and from a given connection on.
#[derive(Clone, Debug, Default)]
pub struct Script {
    actions: HashMap<Step, Action>,
    /// Overrides for the connections from the given index on: (first connection, step).
    later: HashMap<(usize, Step), Action>,
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
            lenient: false,
            script: Script::default(),
        }
    }
}

/// Presets.
impl ServerBehaviour {
    /// No STARTTLS; accepts everything.
    pub fn plain() -> Self {
        Self::default()
    }

    /// STARTTLS with rustls (TLS 1.2 and 1.3) and this certificate; accepts everything.
    pub fn tls(cert: CertKey) -> Self {
        Self::with_starttls(StartTls::Rustls(cert))
    }

    /// STARTTLS with a currently valid certificate for `name` from `ca`.
    pub fn good_tls(ca: &TestCa, name: &str) -> Self {
        Self::tls(ca.leaf(&[name], Validity::Current))
    }

    /// STARTTLS with a certificate for `name` from `ca` that expired 30 days ago.
    pub fn expired_tls(ca: &TestCa, name: &str) -> Self {
        Self::tls(ca.leaf(&[name], Validity::Expired))
    }

    /// STARTTLS, TLS 1.2 only.
    pub fn tls12_only(cert: CertKey) -> Self {
        Self::with_starttls(StartTls::Tls12Only(cert))
    }

    /// STARTTLS offered, but the server speaks only TLS 1.0 (OpenSSL).
    pub fn tls10_only(cert: CertKey) -> Self {
        Self::with_starttls(StartTls::Tls10Only(cert))
    }

    /// TLS from the first byte, as on port 465.
    pub fn implicit_tls(cert: CertKey) -> Self {
        ServerBehaviour {
            implicit_tls: Some(cert),
            ..Self::default()
        }
    }

    pub fn with_starttls(starttls: StartTls) -> Self {
        ServerBehaviour {
            starttls,
            ..Self::default()
        }
    }
}

/// Adjustments, each returning the behaviour.
impl ServerBehaviour {
    /// Offers STARTTLS and speaks TLS 1.2 and 1.3 (rustls) with this certificate.
    pub fn starttls(mut self, cert: CertKey) -> Self {
        self.starttls = StartTls::Rustls(cert);
        self
    }

    pub fn greeting(mut self, line: &str) -> Self {
        self.greeting = line.into();
        self
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

    /// AUTH must give exactly this user and password, before MAIL.
    pub fn auth_credentials(mut self, user: &str, password: &str) -> Self {
        self.auth_credentials = Some((user.into(), password.into()));
        self
    }

    pub fn ehlo_keyword(mut self, keyword: &str) -> Self {
        self.ehlo_extra.push(keyword.into());
        self
    }

    /// Reads like a careless receiver: a bare CR or LF ends a line, NULs are ignored, and a
    /// line that is only "." ends the message.
    pub fn lenient(mut self) -> Self {
        self.lenient = true;
        self
    }

    /// At `step`, on every connection, the server does `action`.
    pub fn on(mut self, step: Step, action: Action) -> Self {
        self.script.actions.insert(step, action);
        self
    }

    /// Like `on`, for the connections from the `first`th on (0-based): a server that changes
    /// its behaviour between one message and the next.
    pub fn on_connections_from(mut self, first: usize, step: Step, action: Action) -> Self {
        self.script.later.insert((first, step), action);
        self
    }

    fn action(&self, step: Step, connection: usize) -> Action {
        self.set_action(step, connection)
            .or_else(|| match step {
                Step::Helo | Step::EhloAfterTls => self.set_action(Step::Ehlo, connection),
                _ => None,
            })
            .unwrap_or(Action::Normal)
    }

    fn set_action(&self, step: Step, connection: usize) -> Option<Action> {
        let later = self
            .script
            .later
            .iter()
            .filter(|((first, s), _)| *s == step && *first <= connection)
            .max_by_key(|((first, _), _)| *first)
            .map(|(_, action)| action);
        later.or_else(|| self.script.actions.get(&step)).cloned()
    }

    fn freezes(&self) -> bool {
        self.script
            .actions
            .values()
            .chain(self.script.later.values())
            .any(|a| *a == Action::Freeze)
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
    /// Index into [`SmtpServer::connection_logs`] of the connection it came in.
    pub connection: usize,
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
    /// The final dot arrived.
    pub completed: bool,
    /// The final dot was answered with a 2xx: the server took the message.
    pub accepted: bool,
}

/// What one connection brought.
#[derive(Clone, Debug, Default)]
pub struct ConnectionLog {
    /// Every command line, in order, lossy UTF-8, without its line ending (AUTH answers
    /// included).
    pub commands: Vec<String>,
    /// The commands that came after the server said 421 or 221 (they should never come).
    pub after_closing_reply: Vec<String>,
    /// Every byte of message text, as received, without the terminating dot line.
    pub body: Vec<u8>,
    /// Whether a final dot arrived.
    pub final_dot: bool,
    /// Whether the server has written what its script says in the middle of the body.
    pub spoke_mid_body: bool,
    /// Whether the session was upgraded to TLS.
    pub tls: bool,
    /// The connection has ended (either side closed it).
    pub closed: bool,
    /// The TLS handshake resumed an earlier session instead of a full one (rustls only).
    pub tls_resumed: bool,
    /// Commands that came in one read with the next one, before the server replied.
    pub pipelined_after: Vec<String>,
    /// The client's address.
    pub peer: Option<IpAddr>,
}

/// What connections share: the record of what happened.
#[derive(Default)]
struct Shared {
    connections: Mutex<Vec<ConnectionLog>>,
    received: Mutex<Vec<Received>>,
    /// The number of accepted messages, so waiters wake without polling.
    accepted: watch::Sender<usize>,
    /// Wakes `wait_until` whenever a connection log changes.
    changed: Notify,
    starttls: AtomicUsize,
    /// The client's lines in AUTH exchanges, every session.
    auth_lines: Mutex<Vec<String>>,
    /// Set by `stop_offering_starttls`.
    starttls_withdrawn: AtomicBool,
    /// Set by `strip_starttls_for`: clients from these addresses never see STARTTLS.
    stripped_for: Mutex<Vec<IpAddr>>,
    released: AtomicBool,
    release: Notify,
}

impl Shared {
    fn update(&self, id: usize, f: impl FnOnce(&mut ConnectionLog)) {
        if let Some(log) = self.connections.lock().expect("connections").get_mut(id) {
            f(log);
        }
        self.changed.notify_waiters();
    }

    fn record(&self, message: Received) {
        let accepted = message.accepted;
        self.received.lock().expect("received lock").push(message);
        if accepted {
            self.accepted.send_modify(|n| *n += 1);
        }
        self.changed.notify_waiters();
    }

    async fn wait_released(&self) {
        loop {
            let released = self.release.notified();
            if self.released.load(Ordering::SeqCst) {
                return;
            }
            released.await;
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
        let socket = match ip {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if behaviour.freezes() {
            socket.set_recv_buffer_size(4096)?;
        }
        socket.bind(SocketAddr::new(ip, port))?;
        let listener = socket.listen(128)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
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

    /// Messages the server took (final dot, answered 2xx), in order.
    pub fn messages(&self) -> Vec<Received> {
        let all = self.attempts();
        all.into_iter().filter(|m| m.accepted).collect()
    }

    /// Every message that reached the text (after a 354), taken, refused or cut off.
    pub fn attempts(&self) -> Vec<Received> {
        self.shared.received.lock().expect("received lock").clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connection_logs().len()
    }

    /// What each connection brought, in the order they came.
    pub fn connection_logs(&self) -> Vec<ConnectionLog> {
        self.shared.connections.lock().expect("connections").clone()
    }

    /// Connections whose TLS handshake resumed an earlier session.
    pub fn tls_resumed_sessions(&self) -> usize {
        self.connection_logs()
            .iter()
            .filter(|c| c.tls_resumed)
            .count()
    }

    /// STARTTLS commands received, whether offered or not.
    pub fn tls_handshakes_attempted(&self) -> usize {
        self.shared.starttls.load(Ordering::SeqCst)
    }

    /// Connections whose TLS handshake succeeded (STARTTLS or implicit).
    pub fn tls_sessions(&self) -> usize {
        self.connection_logs().iter().filter(|c| c.tls).count()
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

    /// Whether any connection ever named `rcpt` in a RCPT TO: what a remote learns of a
    /// recipient even when it takes no message for it.
    pub fn heard_of(&self, rcpt: &str) -> bool {
        let command = format!("RCPT TO:<{rcpt}>");
        let logs = self.connection_logs();
        logs.iter()
            .any(|c| c.commands.iter().any(|l| l.starts_with(&command)))
    }

    /// From now on EHLO does not offer STARTTLS and the command gets 502, as when a
    /// server's TLS is switched off (or stripped on the way).
    pub fn stop_offering_starttls(&self) {
        self.shared.starttls_withdrawn.store(true, Ordering::SeqCst);
    }

    /// From now on clients from `source` get no STARTTLS (and 502 for the command), as
    /// behind a firewall that strips it for some sender addresses only.
    pub fn strip_starttls_for(&self, source: IpAddr) {
        self.shared
            .stripped_for
            .lock()
            .expect("stripped")
            .push(source);
    }

    /// Lets every `Hold` and `Freeze` go on, now and later.
    pub fn release(&self) {
        self.shared.released.store(true, Ordering::SeqCst);
        self.shared.release.notify_waiters();
    }

    /// The next accepted message not yet returned by this method (the first, then the
    /// second...), waiting up to 30 s for it to arrive.
    pub async fn next_message(&self) -> Received {
        let index = self.taken.fetch_add(1, Ordering::SeqCst);
        self.wait_for_messages(index + 1).await.swap_remove(index)
    }

    /// All accepted messages once there are at least `n`, waiting up to 30 s.
    /// The messages once there are `n`, however long that takes (the caller bounds it).
    pub async fn messages_reaching(&self, n: usize) -> Vec<Received> {
        let mut count = self.shared.accepted.subscribe();
        let _ = count.wait_for(|c| *c >= n).await;
        self.messages()
    }

    pub async fn wait_for_messages(&self, n: usize) -> Vec<Received> {
        let mut count = self.shared.accepted.subscribe();
        let arrived = tokio::time::timeout(WAIT, count.wait_for(|c| *c >= n)).await;
        match arrived {
            Ok(Ok(_)) => self.messages(),
            Ok(Err(_)) => unreachable!("the server owns the sender"),
            Err(_) => panic!(
                "{}: waited {WAIT:?} for message {n}, have {}: {:?}",
                self.addr,
                self.messages().len(),
                self.attempts()
            ),
        }
    }

    /// Waits until `done` holds for the connections seen so far; panics after 30 s.
    pub async fn wait_until(&self, what: &str, done: impl Fn(&[ConnectionLog]) -> bool) {
        let wait = async {
            loop {
                let changed = self.shared.changed.notified();
                if done(&self.connection_logs()) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(WAIT, wait).await.is_err() {
            panic!(
                "{}: {what} did not happen within {WAIT:?}; connections: {:#?}",
                self.addr,
                self.connection_logs()
            );
        }
    }

    /// Waits until at least one connection came and every connection has ended.
    pub async fn wait_all_closed(&self) {
        self.wait_until("every connection closed", |c| {
            !c.is_empty() && c.iter().all(|c| c.closed)
        })
        .await;
    }

    /// Waits until some connection has received `command` (compared case-insensitively).
    pub async fn wait_for_command(&self, command: &str) {
        self.wait_until(&format!("command {command}"), |c| {
            c.iter()
                .any(|c| c.commands.iter().any(|l| l.eq_ignore_ascii_case(command)))
        })
        .await;
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
        configured && !self.shared.starttls_withdrawn.load(Ordering::SeqCst)
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
    openssl_acceptor(cert, openssl::ssl::SslVersion::TLS1, "DEFAULT:@SECLEVEL=0")
}

/// TLS 1.2 with CBC suites only, none of which rustls offers.
fn tls12_cbc_acceptor(cert: &CertKey) -> Result<SslAcceptor, openssl::error::ErrorStack> {
    let cbc = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:\
               ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA";
    openssl_acceptor(cert, openssl::ssl::SslVersion::TLS1_2, cbc)
}

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
                let Ok((stream, peer)) = accepted else { continue };
                let id = {
                    let mut logs = server.shared.connections.lock().expect("connections");
                    logs.push(ConnectionLog { peer: Some(peer.ip()), ..ConnectionLog::default() });
                    logs.len() - 1
                };
                server.shared.changed.notify_waiters();
                let server = server.clone();
                connections.spawn(async move {
                    serve(stream, id, peer.ip(), &server).await;
                    server.shared.update(id, |log| log.closed = true);
                });
            }
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn serve(stream: TcpStream, id: usize, peer: IpAddr, server: &Arc<Server>) {
    let mut session = Session {
        io: BufReader::new(Transport::Plain(stream)),
        id,
        peer,
        server: server.clone(),
        silent: false,
        sent_before_closing: 0,
        tls: None,
        pending_lf: false,
        helo: None,
        mail_from: None,
        rcpt_to: Vec::new(),
        auth: Vec::new(),
        authenticated: false,
    };
    if let Some(acceptor) = &server.implicit
        && session.secure(acceptor).await.is_err()
    {
        return;
    }
    session.run().await;
}

/// The session is over: close the connection.
struct End;

/// The state of one connection (a new SMTP session after STARTTLS).
struct Session {
    io: BufReader<Transport>,
    id: usize,
    peer: IpAddr,
    server: Arc<Server>,
    /// Said 421/221, or stalling: never answers again, but reads and records until EOF.
    silent: bool,
    /// Bytes already read in when the server said 421/221: commands the client had sent
    /// with the one that got it (PIPELINING), not after it.
    sent_before_closing: usize,
    tls: Option<TlsInfo>,
    /// A lenient line ended at a CR: an LF right after it is part of that line ending.
    pending_lf: bool,
    helo: Option<String>,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
    auth: Vec<String>,
    authenticated: bool,
}

impl Session {
    fn behaviour(&self) -> &ServerBehaviour {
        &self.server.behaviour
    }

    fn offers_starttls(&self) -> bool {
        let stripped = self.server.shared.stripped_for.lock().expect("stripped");
        self.server.offers_starttls() && !stripped.contains(&self.peer)
    }

    async fn run(&mut self) {
        let greeting = self.behaviour().greeting.clone();
        if self.act(Step::Greeting, &greeting).await.is_err() {
            return;
        }
        while let Some(line) = self.read_command().await {
            if self.silent {
                continue;
            }
            if self.command(&line).await.is_err() {
                return;
            }
        }
    }

    async fn command(&mut self, line: &str) -> Result<(), End> {
        let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                self.greet(arg);
                let reply = self.ehlo_reply();
                let step = if self.tls.is_some() {
                    Step::EhloAfterTls
                } else {
                    Step::Ehlo
                };
                self.act(step, &reply).await?;
            }
            "HELO" => {
                self.greet(arg);
                self.act(Step::Helo, "250 mx.test").await?;
            }
            "STARTTLS" => self.starttls().await?,
            "AUTH" => self.auth(line).await?,
            "MAIL" => self.mail(arg).await?,
            "RCPT" => self.rcpt(arg).await?,
            "DATA" => self.data_command().await?,
            "RSET" => {
                self.reset();
                self.write("250 2.0.0 ok").await?;
            }
            "NOOP" => self.write("250 2.0.0 ok").await?,
            "QUIT" => {
                let _ = self.write("221 2.0.0 bye").await;
                return Err(End);
            }
            _ => self.write("500 5.5.2 command not recognized").await?,
        }
        Ok(())
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

    fn ehlo_reply(&self) -> String {
        let mut lines = vec![
            "mx.test",
            "PIPELINING",
            "8BITMIME",
            "SIZE 52428800",
            "ENHANCEDSTATUSCODES",
        ];
        if self.tls.is_none() && self.offers_starttls() {
            lines.push("STARTTLS");
        }
        lines.extend(self.behaviour().ehlo_extra.iter().map(String::as_str));
        let last = lines.len() - 1;
        let line =
            |(i, text): (usize, &str)| format!("250{}{text}", if i == last { ' ' } else { '-' });
        let lines: Vec<String> = lines.into_iter().enumerate().map(line).collect();
        lines.join("\r\n")
    }

    /// Does what the script says at `step`; `normal` is the normal reply. Returns the code
    /// of the reply sent, `None` when nothing was sent.
    async fn act(&mut self, step: Step, normal: &str) -> Result<Option<u16>, End> {
        let action = self.behaviour().action(step, self.id);
        self.act_with(action, normal).await
    }

    async fn act_with(&mut self, action: Action, normal: &str) -> Result<Option<u16>, End> {
        match action {
            Action::Normal => self.reply(normal).await,
            Action::Reply(reply) => self.reply(&reply).await,
            Action::ReplyAndClose(reply) => {
                let _ = self.write(&reply).await;
                Err(End)
            }
            Action::Drop => Err(End),
            Action::Stall => {
                self.silent = true;
                Ok(None)
            }
            Action::Extra(extra) => {
                self.write(&format!("{normal}\r\n{extra}")).await?;
                Ok(code(normal))
            }
            Action::Hold => {
                self.server.shared.wait_released().await;
                self.reply(normal).await
            }
            Action::Freeze => {
                self.server.shared.wait_released().await;
                self.silent = true;
                Ok(None)
            }
        }
    }

    /// Sends a reply; a 421 or 221 makes the server silent from now on.
    async fn reply(&mut self, reply: &str) -> Result<Option<u16>, End> {
        self.write(reply).await?;
        let code = code(reply);
        if matches!(code, Some(421 | 221)) {
            self.silent = true;
            self.sent_before_closing = self.io.buffer().len();
        }
        Ok(code)
    }

    /// Writes `text` (one or more lines) and a final CRLF in one write, and flushes: TLS
    /// streams buffer.
    async fn write(&mut self, text: &str) -> Result<(), End> {
        let wire = format!("{}\r\n", text.trim_end_matches(['\r', '\n']));
        let io = self.io.get_mut();
        io.write_all(wire.as_bytes()).await.map_err(|_| End)?;
        io.flush().await.map_err(|_| End)
    }

    async fn starttls(&mut self) -> Result<(), End> {
        self.server.shared.starttls.fetch_add(1, Ordering::SeqCst);
        if self.tls.is_some() {
            return self.write("503 5.5.1 TLS already active").await;
        }
        if !self.offers_starttls() {
            return self.write("502 5.5.1 STARTTLS not offered").await;
        }
        let extra = match self.server.upgrade {
            Upgrade::Close(extra) => extra,
            _ => "",
        };
        // One write, so injected lines arrive with the 220.
        let go = format!("220 2.0.0 ready to start TLS\r\n{extra}");
        let go = go.trim_end();
        let sent = self.act(Step::StartTls, go).await?;
        if sent != Some(220) {
            return Ok(());
        }
        match self.behaviour().action(Step::Handshake, self.id) {
            Action::Drop => return Err(End),
            Action::Stall => {
                // Never speaks TLS: reads whatever comes until the peer gives up.
                let mut sink = [0u8; 4096];
                while matches!(self.io.read(&mut sink).await, Ok(n) if n > 0) {}
                return Err(End);
            }
            _ => {}
        }
        let server = self.server.clone();
        match &server.upgrade {
            Upgrade::Rustls(acceptor) => self.secure(acceptor).await,
            Upgrade::Openssl(acceptor) => self.secure_openssl(acceptor).await,
            Upgrade::NotOffered | Upgrade::Close(_) => Err(End),
        }
    }

    /// The plain stream, out of the session. Whatever the client sent after STARTTLS is
    /// dropped with the buffer, never acted on (the CVE-2011-0411 rule).
    fn take_tcp(&mut self) -> Result<TcpStream, End> {
        let io = std::mem::replace(&mut self.io, BufReader::new(Transport::Closed));
        match io.into_inner() {
            Transport::Plain(tcp) => Ok(tcp),
            _ => Err(End),
        }
    }

    /// The TLS handshake; then a new session: the client must say EHLO again, and nothing
    /// from before TLS counts.
    async fn secure(&mut self, acceptor: &TlsAcceptor) -> Result<(), End> {
        let tcp = self.take_tcp()?;
        let tls = acceptor.accept(tcp).await.map_err(|_| End)?;
        self.tls = Some(tls_info(tls.get_ref().1));
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        self.io = BufReader::new(Transport::Tls(Box::new(tls)));
        self.server.shared.update(self.id, |log| {
            log.tls = true;
            log.tls_resumed = resumed;
        });
        self.helo = None;
        self.reset();
        Ok(())
    }

    /// The same with OpenSSL (old protocol versions and suites); a failed handshake closes
    /// the connection.
    async fn secure_openssl(&mut self, acceptor: &SslAcceptor) -> Result<(), End> {
        let tcp = self.take_tcp()?;
        let ssl = openssl::ssl::Ssl::new(acceptor.context()).map_err(|_| End)?;
        let mut tls = tokio_openssl::SslStream::new(ssl, tcp).map_err(|_| End)?;
        let handshake = Pin::new(&mut tls).accept();
        match tokio::time::timeout(OPENSSL_HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "OpenSSL test server: handshake failed");
                return Err(End);
            }
            Err(_) => return Err(End),
        }
        self.tls = Some(openssl_tls_info(tls.ssl()));
        self.io = BufReader::new(Transport::Openssl(Box::new(tls)));
        self.server.shared.update(self.id, |log| log.tls = true);
        self.helo = None;
        self.reset();
        Ok(())
    }

    async fn mail(&mut self, arg: &str) -> Result<(), End> {
        let refusal = if self.helo.is_none() {
            Some("503 5.5.1 EHLO or HELO first")
        } else if self.mail_from.is_some() {
            Some("503 5.5.1 nested MAIL command")
        } else if self.behaviour().auth_credentials.is_some() && !self.authenticated {
            Some("530 5.7.0 authentication required")
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return self.write(refusal).await;
        }
        let Some(sender) = path_arg(arg, "FROM:") else {
            return self.write("501 5.5.4 syntax: MAIL FROM:<address>").await;
        };
        let normal = reply_or(&self.behaviour().mail_reply, "250 2.1.0 sender ok");
        if is_positive(self.act(Step::Mail, &normal).await?) {
            self.mail_from = Some(sender);
            self.rcpt_to.clear();
        }
        Ok(())
    }

    async fn rcpt(&mut self, arg: &str) -> Result<(), End> {
        if self.mail_from.is_none() {
            return self.write("503 5.5.1 MAIL first").await;
        }
        let Some(recipient) = path_arg(arg, "TO:") else {
            return self.write("501 5.5.4 syntax: RCPT TO:<address>").await;
        };
        let normal = reply_or(&self.behaviour().rcpt_reply, "250 2.1.5 recipient ok");
        if is_positive(self.act(Step::Rcpt, &normal).await?) {
            self.rcpt_to.push(recipient);
        }
        Ok(())
    }

    async fn data_command(&mut self) -> Result<(), End> {
        if self.mail_from.is_none() {
            return self.write("503 5.5.1 MAIL first").await;
        }
        if self.rcpt_to.is_empty() {
            return self.write("554 5.5.1 no valid recipients").await;
        }
        if self
            .act(Step::Data, "354 end data with <CR><LF>.<CR><LF>")
            .await?
            == Some(354)
        {
            self.data().await?;
        }
        Ok(())
    }

    /// The message, as far as it came; the transaction ends either way.
    fn record(&mut self, data: Vec<u8>, completed: bool, accepted: bool) {
        let message = Received {
            connection: self.id,
            helo: self.helo.clone().unwrap_or_default(),
            mail_from: self.mail_from.take().unwrap_or_default(),
            rcpt_to: std::mem::take(&mut self.rcpt_to),
            data,
            tls: self.tls.clone(),
            auth: self.auth.clone(),
            completed,
            accepted,
        };
        self.server.shared.record(message);
    }

    /// After the 354: reads the message text to its end, then answers it.
    async fn data(&mut self) -> Result<(), End> {
        let mut body = Vec::new();
        let mut reader = BodyReader::new(self.behaviour().lenient);
        let mut body_action_done = false;
        let mut answered_mid_body = false;
        self.skip_pending_lf().await;
        loop {
            let chunk = match self.io.fill_buf().await {
                Ok([]) | Err(_) => return Err(self.cut_off(body)),
                Ok(chunk) => chunk,
            };
            let (used, end) = reader.scan(chunk);
            body.extend_from_slice(&chunk[..used]);
            self.io.consume(used);
            if !body_action_done && !body.is_empty() {
                body_action_done = true;
                if self.behaviour().drop_mid_data {
                    return Err(self.cut_off(body));
                }
                match self.behaviour().action(Step::Body, self.id) {
                    Action::Normal => {}
                    Action::Reply(reply) => {
                        self.reply(&reply).await?;
                        self.server
                            .shared
                            .update(self.id, |log| log.spoke_mid_body = true);
                        answered_mid_body = true;
                    }
                    Action::ReplyAndClose(reply) => {
                        let _ = self.write(&reply).await;
                        return Err(self.cut_off(body));
                    }
                    Action::Drop => return Err(self.cut_off(body)),
                    Action::Stall => self.silent = true,
                    Action::Extra(extra) => {
                        self.write(&extra).await?;
                        self.server
                            .shared
                            .update(self.id, |log| log.spoke_mid_body = true);
                    }
                    Action::Hold => self.server.shared.wait_released().await,
                    Action::Freeze => {
                        self.server.shared.wait_released().await;
                        self.silent = true;
                    }
                }
            }
            if let Some(dot) = end {
                let text = body[..body.len() - dot].to_vec();
                self.server.shared.update(self.id, |log| {
                    log.body.extend_from_slice(&text);
                    log.final_dot = true;
                });
                if self.silent || answered_mid_body {
                    self.record(text, true, false);
                    return Ok(());
                }
                let normal = reply_or(&self.behaviour().data_end_reply, "250 2.0.0 queued as X");
                let mut action = self.behaviour().action(Step::EndOfData, self.id);
                if action == Action::Hold {
                    self.server.shared.wait_released().await;
                    action = Action::Normal;
                }
                // Recorded before the reply goes, so whoever hears the 250 finds the message.
                let accepted = match &action {
                    Action::Normal | Action::Extra(_) => is_positive(code(&normal)),
                    Action::Reply(reply) => is_positive(code(reply)),
                    _ => false,
                };
                self.record(text, true, accepted);
                return self.act_with(action, &normal).await.map(drop);
            }
        }
    }

    /// The message text ended with the connection: recorded as an incomplete attempt.
    fn cut_off(&mut self, body: Vec<u8>) -> End {
        self.server
            .shared
            .update(self.id, |log| log.body.extend_from_slice(&body));
        self.record(body, false, false);
        End
    }

    /// AUTH PLAIN or LOGIN, with or without an initial response.
    async fn auth(&mut self, line: &str) -> Result<(), End> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mechanism = words.get(1).map(|m| m.to_ascii_uppercase());
        // The prompts the client still has to answer ("Username:", "Password:" for LOGIN).
        let prompts: &[&str] = match (mechanism.as_deref(), words.len()) {
            (Some("PLAIN"), 2) => &["334 "],
            (Some("PLAIN"), _) => &[],
            (Some("LOGIN"), 2) => &["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"],
            (Some("LOGIN"), _) => &["334 UGFzc3dvcmQ6"],
            _ => return self.write("504 5.5.4 mechanism not supported").await,
        };
        self.auth_line(line);
        // The initial response, if any, then the answers to the prompts.
        let mut answers: Vec<String> = words.get(2).map(|w| w.to_string()).into_iter().collect();
        for prompt in prompts {
            self.write(prompt).await?;
            let answer = self.read_command().await.ok_or(End)?;
            self.auth_line(&answer);
            answers.push(answer);
        }
        let given = credentials(mechanism.as_deref(), &answers);
        self.authenticated = match &self.behaviour().auth_credentials {
            Some(wanted) => given.as_ref() == Some(wanted),
            None => true,
        };
        let outcome = if self.authenticated {
            "235 2.7.0 authenticated"
        } else {
            "535 5.7.8 authentication credentials invalid"
        };
        self.write(outcome).await
    }

    fn auth_line(&mut self, line: &str) {
        self.auth.push(line.to_string());
        let mut all = self.server.shared.auth_lines.lock().expect("auth lines");
        all.push(line.to_string());
    }

    /// One command line without its ending, recorded in the connection's log; `None` at
    /// EOF. A lenient server also ends a line at a bare CR, and skips empty lines.
    async fn read_command(&mut self) -> Option<String> {
        let line = self.read_line().await?;
        let pipelined_before_closing = self.silent && self.sent_before_closing > 0;
        if pipelined_before_closing {
            self.sent_before_closing = (self.sent_before_closing).saturating_sub(line.len() + 2);
        }
        let silent = self.silent && !pipelined_before_closing;
        // Read before any reply to it was written: the next command came with it.
        let more_waiting = !self.io.buffer().is_empty();
        self.server.shared.update(self.id, |log| {
            if silent {
                log.after_closing_reply.push(line.clone());
            }
            if more_waiting {
                log.pipelined_after.push(line.clone());
            }
            log.commands.push(line.clone());
        });
        Some(line)
    }

    async fn read_line(&mut self) -> Option<String> {
        let lenient = self.behaviour().lenient;
        let mut line = Vec::new();
        self.skip_pending_lf().await;
        loop {
            let chunk = self.io.fill_buf().await.ok()?;
            if chunk.is_empty() {
                return None;
            }
            let ends: &[u8] = if lenient { b"\r\n" } else { b"\n" };
            match chunk.iter().position(|b| ends.contains(b)) {
                Some(i) => {
                    line.extend_from_slice(&chunk[..i]);
                    self.pending_lf = lenient && chunk[i] == b'\r';
                    self.io.consume(i + 1);
                    if lenient {
                        line.retain(|&b| b != 0);
                        if line.is_empty() {
                            continue;
                        }
                    } else if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    return Some(String::from_utf8_lossy(&line).into_owned());
                }
                None => {
                    let n = chunk.len();
                    line.extend_from_slice(chunk);
                    self.io.consume(n);
                    // Garbage (a TLS record, say) is not a command: keep memory bounded.
                    line.truncate(64 * 1024);
                }
            }
        }
    }

    /// After a lenient line that ended at a CR, drops the LF that may follow.
    async fn skip_pending_lf(&mut self) {
        if std::mem::take(&mut self.pending_lf)
            && let Ok([b'\n', ..]) = self.io.fill_buf().await
        {
            self.io.consume(1);
        }
    }
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

/// A 2xx other than 221 (which says the server is closing, not that it took anything).
fn is_positive(code: Option<u16>) -> bool {
    matches!(code, Some(200..=299)) && code != Some(221)
}

fn code(reply: &str) -> Option<u16> {
    reply.get(..3)?.parse().ok()
}

/// Finds the end of the message text, strictly (`<CRLF>.<CRLF>` only) or leniently (a line
/// that is only ".", lines ended by CR, LF or CRLF, NULs ignored).
struct BodyReader {
    lenient: bool,
    /// The last five bytes seen (NULs left out when lenient).
    recent: Vec<u8>,
    /// Bytes since the last dot, the dot included.
    since_dot: usize,
}

impl BodyReader {
    fn new(lenient: bool) -> BodyReader {
        // The 354's line ending counts as the line ending before the text.
        BodyReader {
            lenient,
            recent: b"\r\n".to_vec(),
            since_dot: 0,
        }
    }

    /// Returns how many bytes of `chunk` belong to the message (the end line included), and,
    /// when the end was found, how many of those make up the end line (the dot and what
    /// ends it; the line ending before the dot stays in the text).
    fn scan(&mut self, chunk: &[u8]) -> (usize, Option<usize>) {
        for (i, &b) in chunk.iter().enumerate() {
            self.since_dot += 1;
            if self.lenient && b == 0 {
                continue;
            }
            if b == b'.' {
                self.since_dot = 1;
            }
            self.recent.push(b);
            if self.recent.len() > 5 {
                self.recent.remove(0);
            }
            let r = self.recent.as_slice();
            let ended = if self.lenient {
                let eol = |c: u8| c == b'\r' || c == b'\n';
                let n = r.len();
                n >= 3 && eol(r[n - 1]) && r[n - 2] == b'.' && eol(r[n - 3])
            } else {
                r.ends_with(b"\r\n.\r\n")
            };
            if ended {
                return (i + 1, Some(self.since_dot));
            }
        }
        (chunk.len(), None)
    }
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Openssl(Box<tokio_openssl::SslStream<TcpStream>>),
    /// Only while the plain stream is handed to the TLS acceptor.
    Closed,
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Openssl(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Transport::Openssl(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Transport::Closed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Openssl(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Openssl(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Closed => Poll::Ready(Ok(())),
        }
    }
}
