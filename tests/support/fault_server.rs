//! A scripted SMTP server on loopback for fault injection. For each step of a session
//! (greeting, EHLO, STARTTLS, the TLS handshake, MAIL, RCPT, DATA, the body, the end of
//! data) the test chooses what the server does: the normal reply, another reply, a dropped
//! connection, a stall, an out-of-sequence extra reply line, or a pause until the test
//! releases it. It records everything it receives on every connection, including what comes
//! after it said 421 or 221, so a test can check that the proxy sent nothing more.
//!
//! The server can also read the way a careless receiver does (`Script::lenient`): a bare CR
//! or LF ends a line, NUL bytes are ignored, and any line that is only "." ends the message.
//! That is the receiver SMTP smuggling aims at: if the proxy lets such a sequence through,
//! this server sees two messages.
//!
//! Otherwise it is a plain ESMTP server: EHLO/HELO, STARTTLS when given a certificate,
//! AUTH (any, answered 235), MAIL, RCPT, DATA, RSET, NOOP, QUIT.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;

use super::pki::CertKey;

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
    /// The normal reply, once the test calls [`FaultServer::release`].
    Hold,
    /// Stops reading and answering until [`FaultServer::release`]; then reads on silently.
    /// The server's receive buffer is kept small so that a sender blocks soon.
    Freeze,
}

/// What a fault server does; `Script::new()` behaves like a well-mannered server.
#[derive(Clone, Default)]
pub struct Script {
    actions: HashMap<Step, Action>,
    /// Overrides for the connections from the given index on: (first connection, step).
    later: HashMap<(usize, Step), Action>,
    starttls: Option<CertKey>,
    lenient: bool,
    ehlo_extra: Vec<String>,
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    pub fn on(mut self, step: Step, action: Action) -> Script {
        self.actions.insert(step, action);
        self
    }

    /// Like `on`, for the connections from the `first`th on (0-based): a server that changes
    /// its behaviour between one message and the next.
    pub fn on_connections_from(mut self, first: usize, step: Step, action: Action) -> Script {
        self.later.insert((first, step), action);
        self
    }

    /// Offers STARTTLS and speaks TLS (1.2 and 1.3, rustls) with this certificate.
    pub fn starttls(mut self, cert: CertKey) -> Script {
        self.starttls = Some(cert);
        self
    }

    /// Reads like a careless receiver: a bare CR or LF ends a line, NULs are ignored, and a
    /// line that is only "." ends the message.
    pub fn lenient(mut self) -> Script {
        self.lenient = true;
        self
    }

    /// An extra EHLO keyword, e.g. "AUTH PLAIN LOGIN".
    pub fn ehlo_keyword(mut self, keyword: &str) -> Script {
        self.ehlo_extra.push(keyword.to_string());
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
            .later
            .iter()
            .filter(|((first, s), _)| *s == step && *first <= connection)
            .max_by_key(|((first, _), _)| *first)
            .map(|(_, action)| action);
        later.or_else(|| self.actions.get(&step)).cloned()
    }

    fn freezes(&self) -> bool {
        self.actions
            .values()
            .chain(self.later.values())
            .any(|a| *a == Action::Freeze)
    }
}

/// What one connection brought.
#[derive(Clone, Debug, Default)]
pub struct ConnectionLog {
    /// Every command line, in order, lossy UTF-8, without its line ending.
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
}

/// A message the server accepted: it saw the final dot and said 250.
#[derive(Clone, Debug)]
pub struct Message {
    /// Index into [`FaultServer::connections`].
    pub connection: usize,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The message text as received (still dot-stuffed), without the terminating dot line.
    pub body: Vec<u8>,
    pub tls: bool,
}

#[derive(Default)]
struct State {
    connections: Mutex<Vec<ConnectionLog>>,
    messages: Mutex<Vec<Message>>,
    changed: Notify,
    released: AtomicBool,
    release: Notify,
}

impl State {
    fn update(&self, id: usize, f: impl FnOnce(&mut ConnectionLog)) {
        if let Some(log) = self.connections.lock().expect("connections").get_mut(id) {
            f(log);
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

pub struct FaultServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a test waits for something the server should see.
const WAIT: Duration = Duration::from_secs(30);

impl FaultServer {
    /// Listens on `ip:port` (port 0: any).
    pub async fn start(ip: IpAddr, port: u16, script: Script) -> std::io::Result<FaultServer> {
        let socket = match ip {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if script.freezes() {
            socket.set_recv_buffer_size(4096)?;
        }
        socket.bind(SocketAddr::new(ip, port))?;
        let listener = socket.listen(128)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept_loop(listener, Arc::new(script), state.clone()));
        Ok(FaultServer { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn connections(&self) -> Vec<ConnectionLog> {
        self.state.connections.lock().expect("connections").clone()
    }

    /// Messages accepted (final dot seen and answered with 2xx).
    pub fn messages(&self) -> Vec<Message> {
        self.state.messages.lock().expect("messages").clone()
    }

    /// Lets every `Hold` and `Freeze` go on, now and later.
    pub fn release(&self) {
        self.state.released.store(true, Ordering::SeqCst);
        self.state.release.notify_waiters();
    }

    /// Waits until `done` holds for the connections seen so far; panics after 30 s.
    pub async fn wait_until(&self, what: &str, done: impl Fn(&[ConnectionLog]) -> bool) {
        let wait = async {
            loop {
                let changed = self.state.changed.notified();
                if done(&self.connections()) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(WAIT, wait).await.is_err() {
            panic!(
                "fault server: {what} did not happen within {WAIT:?}; connections: {:#?}",
                self.connections()
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

async fn accept_loop(listener: TcpListener, script: Arc<Script>, state: Arc<State>) {
    while let Ok((stream, _)) = listener.accept().await {
        let id = {
            let mut connections = state.connections.lock().expect("connections");
            connections.push(ConnectionLog::default());
            connections.len() - 1
        };
        state.changed.notify_waiters();
        let (script, state) = (script.clone(), state.clone());
        tokio::spawn(async move {
            let mut session = Session {
                io: BufReader::new(Transport::Plain(stream)),
                id,
                script,
                state: state.clone(),
                silent: false,
                tls: false,
                pending_lf: false,
                mail_from: String::new(),
                rcpt_to: Vec::new(),
            };
            session.run().await;
            drop(session);
            state.update(id, |log| log.closed = true);
        });
    }
}

/// The session is over: close the connection.
struct End;

struct Session {
    io: BufReader<Transport>,
    id: usize,
    script: Arc<Script>,
    state: Arc<State>,
    /// Said 421/221, or stalling: never answers again, but reads and records until EOF.
    silent: bool,
    tls: bool,
    /// A lenient line ended at a CR: an LF right after it is part of that line ending.
    pending_lf: bool,
    mail_from: String,
    rcpt_to: Vec<String>,
}

impl Session {
    async fn run(&mut self) {
        let banner = "220 mx.fault.test ESMTP fault server";
        if self.act(Step::Greeting, banner).await.is_err() {
            return;
        }
        while let Some(line) = self.read_command().await {
            let silent = self.silent;
            self.state.update(self.id, |log| {
                if silent {
                    log.after_closing_reply.push(line.clone());
                }
                log.commands.push(line.clone());
            });
            if silent {
                continue;
            }
            if self.command(&line).await.is_err() {
                return;
            }
        }
    }

    async fn command(&mut self, line: &str) -> Result<(), End> {
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            let reply = self.ehlo_reply();
            let step = if self.tls {
                Step::EhloAfterTls
            } else {
                Step::Ehlo
            };
            self.act(step, &reply).await?;
        } else if upper.starts_with("HELO") {
            self.act(Step::Helo, "250 mx.fault.test").await?;
        } else if upper == "STARTTLS" && self.script.starttls.is_some() && !self.tls {
            self.starttls().await?;
        } else if upper.starts_with("MAIL FROM:") {
            if is_positive(self.act(Step::Mail, "250 2.1.0 ok").await?) {
                self.mail_from = path(line);
                self.rcpt_to.clear();
            }
        } else if upper.starts_with("RCPT TO:") {
            if is_positive(self.act(Step::Rcpt, "250 2.1.5 ok").await?) {
                self.rcpt_to.push(path(line));
            }
        } else if upper == "DATA" {
            if self.act(Step::Data, "354 go ahead").await? == Some(354) {
                self.data().await?;
            }
        } else if upper.starts_with("AUTH") {
            self.write("235 2.7.0 authenticated").await?;
        } else if upper == "RSET" {
            self.mail_from.clear();
            self.rcpt_to.clear();
            self.write("250 2.0.0 ok").await?;
        } else if upper == "NOOP" {
            self.write("250 2.0.0 ok").await?;
        } else if upper == "QUIT" {
            let _ = self.write("221 2.0.0 bye").await;
            return Err(End);
        } else {
            self.write("500 5.5.1 unknown command").await?;
        }
        Ok(())
    }

    fn ehlo_reply(&self) -> String {
        let mut lines = vec![
            "mx.fault.test".to_string(),
            "PIPELINING".into(),
            "8BITMIME".into(),
            "SIZE 100000000".into(),
        ];
        if self.script.starttls.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        lines.extend(self.script.ehlo_extra.iter().cloned());
        let last = lines.len() - 1;
        let lines: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect();
        lines.join("\r\n")
    }

    /// Does what the script says at `step`; `normal` is the normal reply. Returns the code
    /// of the reply sent, `None` when nothing was sent.
    async fn act(&mut self, step: Step, normal: &str) -> Result<Option<u16>, End> {
        match self.script.action(step, self.id) {
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
                self.state.wait_released().await;
                self.reply(normal).await
            }
            Action::Freeze => {
                self.state.wait_released().await;
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
        }
        Ok(code)
    }

    async fn write(&mut self, text: &str) -> Result<(), End> {
        let bytes = format!("{text}\r\n");
        let io = self.io.get_mut();
        io.write_all(bytes.as_bytes()).await.map_err(|_| End)?;
        io.flush().await.map_err(|_| End)
    }

    async fn starttls(&mut self) -> Result<(), End> {
        let sent = self
            .act(Step::StartTls, "220 2.0.0 ready to start TLS")
            .await?;
        if sent != Some(220) {
            return Ok(());
        }
        match self.script.action(Step::Handshake, self.id) {
            Action::Drop => return Err(End),
            Action::Stall => {
                // Never speaks TLS: reads whatever comes until the peer gives up.
                let mut sink = [0u8; 4096];
                while matches!(self.io.read(&mut sink).await, Ok(n) if n > 0) {}
                return Err(End);
            }
            _ => {}
        }
        let Some(cert) = self.script.starttls.clone() else {
            return Err(End);
        };
        let io = std::mem::replace(&mut self.io, BufReader::new(Transport::Closed));
        let Transport::Plain(tcp) = io.into_inner() else {
            return Err(End);
        };
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .expect("server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let tls = acceptor.accept(tcp).await.map_err(|_| End)?;
        self.io = BufReader::new(Transport::Tls(Box::new(tls)));
        self.tls = true;
        self.state.update(self.id, |log| log.tls = true);
        // A new session: nothing said before TLS counts.
        self.mail_from.clear();
        self.rcpt_to.clear();
        Ok(())
    }

    /// After the 354: reads the message text to its end, then answers it.
    async fn data(&mut self) -> Result<(), End> {
        let mut body = Vec::new();
        let mut reader = BodyReader::new(self.script.lenient);
        let mut body_action_done = false;
        let mut answered_mid_body = false;
        self.skip_pending_lf().await;
        loop {
            let chunk = match self.io.fill_buf().await {
                Ok([]) | Err(_) => {
                    self.state
                        .update(self.id, |log| log.body.extend_from_slice(&body));
                    return Err(End);
                }
                Ok(chunk) => chunk,
            };
            let (used, end) = reader.scan(chunk);
            body.extend_from_slice(&chunk[..used]);
            self.io.consume(used);
            if !body_action_done && !body.is_empty() {
                body_action_done = true;
                match self.script.action(Step::Body, self.id) {
                    Action::Normal => {}
                    Action::Reply(reply) => {
                        self.reply(&reply).await?;
                        self.state.update(self.id, |log| log.spoke_mid_body = true);
                        answered_mid_body = true;
                    }
                    Action::ReplyAndClose(reply) => {
                        let _ = self.write(&reply).await;
                        return Err(End);
                    }
                    Action::Drop => return Err(End),
                    Action::Stall => self.silent = true,
                    Action::Extra(extra) => {
                        self.write(&extra).await?;
                        self.state.update(self.id, |log| log.spoke_mid_body = true);
                    }
                    Action::Hold => self.state.wait_released().await,
                    Action::Freeze => {
                        self.state.wait_released().await;
                        self.silent = true;
                    }
                }
            }
            if let Some(dot) = end {
                let text = body[..body.len() - dot].to_vec();
                self.state.update(self.id, |log| {
                    log.body.extend_from_slice(&text);
                    log.final_dot = true;
                });
                if self.silent || answered_mid_body {
                    return Ok(());
                }
                let queued = format!("250 2.0.0 queued as FAULT{}", self.id);
                if is_positive(self.act(Step::EndOfData, &queued).await?) {
                    let message = Message {
                        connection: self.id,
                        mail_from: std::mem::take(&mut self.mail_from),
                        rcpt_to: std::mem::take(&mut self.rcpt_to),
                        body: text,
                        tls: self.tls,
                    };
                    self.state.messages.lock().expect("messages").push(message);
                    self.state.changed.notify_waiters();
                }
                return Ok(());
            }
        }
    }

    /// One command line without its ending; `None` at EOF. A lenient server also ends a
    /// line at a bare CR, and skips empty lines.
    async fn read_command(&mut self) -> Option<String> {
        let mut line = Vec::new();
        self.skip_pending_lf().await;
        loop {
            let chunk = self.io.fill_buf().await.ok()?;
            if chunk.is_empty() {
                return None;
            }
            let ends: &[u8] = if self.script.lenient { b"\r\n" } else { b"\n" };
            match chunk.iter().position(|b| ends.contains(b)) {
                Some(i) => {
                    line.extend_from_slice(&chunk[..i]);
                    self.pending_lf = self.script.lenient && chunk[i] == b'\r';
                    self.io.consume(i + 1);
                    if self.script.lenient {
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
}

impl Session {
    /// After a lenient line that ended at a CR, drops the LF that may follow.
    async fn skip_pending_lf(&mut self) {
        if std::mem::take(&mut self.pending_lf)
            && let Ok([b'\n', ..]) = self.io.fill_buf().await
        {
            self.io.consume(1);
        }
    }
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

/// A 2xx other than 221 (which says the server is closing, not that it took anything).
fn is_positive(code: Option<u16>) -> bool {
    matches!(code, Some(200..=299)) && code != Some(221)
}

fn code(reply: &str) -> Option<u16> {
    reply.get(..3)?.parse().ok()
}

/// The address inside `<...>`.
fn path(command: &str) -> String {
    let start = command.find('<').map_or(0, |i| i + 1);
    let end = command.rfind('>').unwrap_or(command.len());
    command.get(start..end).unwrap_or_default().to_string()
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Only while the plain stream is handed to the TLS acceptor.
    Closed,
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Transport::Closed => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Closed => Poll::Ready(Ok(())),
        }
    }
}
