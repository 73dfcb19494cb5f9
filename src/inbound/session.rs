//! One MTA session: the ESMTP server state machine, with cut-through relaying of each
//! transaction to the remote chosen for its first recipient. It speaks SMTP to the MTA
//! only: the remote is driven through the verbs of [`Upstream`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::inbound::reader::SessionReader;
use crate::net::connection::ExchangeError;
use crate::outbound::attempt::{Envelope, Greeting};
use crate::outbound::route::{OpenRoute, Redirect};
use crate::outbound::upstream::{Answer, RemoteFacts, Upstream};
use crate::outcome::{TlsOutcome, Verification};
use crate::proxy::Proxy;
use crate::router::Plan;
use crate::rules::RuleSet;
use crate::server_tls::MtaStream;
use crate::sessions::{Drain, Entry, SessionState};
use crate::smtp::data::{BodyError, BodyFilter};
use crate::smtp::line::{LineRead, read_line};
use crate::smtp::{Command, CommandError, MailParams, Mailbox, RcptParams, Reply, parse_command};

/// Body bytes gathered before they are written to the remote.
const BODY_BLOCK: usize = 64 * 1024;

/// The read buffer between messages: a pipelined command group fits, and an idle session
/// holds no more. It grows to BODY_BLOCK while a large message is read.
const COMMAND_BLOCK: usize = 1024;

pub struct Session {
    proxy: Arc<Proxy>,
    /// This session in `ctl sessions`; removed when the session ends.
    registered: Entry,
    io: SessionReader<MtaStream>,
    client: SocketAddr,
    line: Vec<u8>,
    stage: Stage,
    /// Where the MTA was connecting when it was redirected to us (transparent mode).
    redirect: Option<Redirect>,
    /// That remote's EHLO reply, from which ours is built.
    remote_ehlo: Option<Reply>,
}

enum Stage {
    /// Connected, no EHLO/HELO yet.
    Greeted,
    /// Between transactions.
    Ready,
    Mail(Box<Transaction>),
}

/// One MAIL FROM and what followed it.
struct Transaction {
    sender: Option<Mailbox>,
    params: MailParams,
    remote: Remote,
    accepted: Vec<Mailbox>,
    /// The first recipients that got a 4xx or 5xx, with it: the log line says why they were
    /// not taken. At most REFUSED_SHOWN; `refused_more` counts the rest.
    refused: Vec<(Mailbox, Reply)>,
    refused_more: usize,
    /// Some recipient got a 4xx: the transaction counts as a deferral.
    deferred_any: bool,
    rcpt_count: usize,
    /// Recipient domains that could not be routed in this transaction, and why.
    failed_domains: HashMap<String, Reply>,
    started: std::time::Instant,
    /// The rules in force at MAIL FROM; a reload does not change this transaction.
    rules: Arc<RuleSet>,
}

/// Where the transaction stands with its remote.
enum Remote {
    /// No recipient has reached a remote yet.
    None,
    /// Set by the first recipient that reached a remote.
    Open(Box<OpenRoute>),
    /// The remote was lost, or ended the transaction: every later recipient and the DATA
    /// get `reply`. `facts` says where it had gone, for the log line.
    Lost {
        facts: Box<RemoteFacts>,
        reply: Reply,
    },
}

impl Remote {
    fn facts(&self) -> Option<&RemoteFacts> {
        match self {
            Remote::None => None,
            Remote::Open(route) => Some(route.upstream.facts()),
            Remote::Lost { facts, .. } => Some(facts),
        }
    }
}

/// How the body transfer ended.
enum BodyEnd {
    /// The whole text was read; its last bytes, not yet sent, go with the final dot.
    Complete(Vec<u8>),
    Refused(BodyError),
    /// The remote failed while we were still reading the body.
    UpstreamFailed(ExchangeError),
    ClientGone(ClientGone),
}

/// Why the MTA's message text did not come to its end.
#[derive(Debug, thiserror::Error)]
enum ClientGone {
    #[error("timed out waiting for the message text")]
    TimedOut,
    #[error("{0}")]
    Failed(std::io::Error),
    #[error("connection closed")]
    Closed,
}

/// What to do after a command.
enum Next {
    Continue,
    Close,
}

/// How a transaction ended, for its log line and the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The remote answered the message (see the reply for its verdict).
    Answered,
    /// The message text broke one of our limits, or the remote was lost during it.
    MessageFailed,
    /// The remote refused DATA or was lost before it.
    DataRefused,
    /// DATA with no recipient taken, or after the remote was lost.
    NoData,
    PipeliningViolation,
    ClientGone,
    /// The MTA ended it without a message: RSET, a new EHLO or HELO, or the session's end.
    Rset,
    Ehlo,
    Helo,
    SessionClosed,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Answered => "delivered",
            End::MessageFailed => "message failed",
            End::DataRefused => "remote refused DATA",
            End::NoData => "no data",
            End::PipeliningViolation => "pipelining violation",
            End::ClientGone => "client gone",
            End::Rset => "RSET",
            End::Ehlo => "EHLO",
            End::Helo => "HELO",
            End::SessionClosed => "session closed",
        }
    }
}

impl Session {
    pub fn new(proxy: Arc<Proxy>, stream: TcpStream, client: SocketAddr) -> Session {
        let _ = stream.set_nodelay(true);
        Session {
            registered: proxy.sessions.open(client),
            proxy,
            io: SessionReader::with_capacity(COMMAND_BLOCK, MtaStream::Plain(stream)),
            client,
            line: Vec::with_capacity(512),
            stage: Stage::Greeted,
            redirect: None,
            remote_ehlo: None,
        }
    }

    /// Our greeting; in transparent mode the remote's own, once it is connected. `None`
    /// when the session is over: the remote refused it or could not be had.
    async fn greeting(&mut self) -> Option<Reply> {
        let Some(destination) = self.redirect.as_ref().map(|r| r.destination) else {
            let greeting = format!("{} ESMTP tlsrouter", self.proxy.config.hostname.0);
            return Some(Reply::multiline(220, vec![greeting]));
        };
        match Box::pin(self.proxy.outbound.greet_at_accept(destination)).await {
            Greeting::Greeted(greeted) => {
                let greeting = greeted.greeting.clone();
                self.remote_ehlo = Some(greeted.ehlo.clone());
                if let Some(redirect) = &mut self.redirect {
                    redirect.greeted = Some(greeted);
                }
                Some(greeting)
            }
            Greeting::Refused(reply) => {
                tracing::info!(client = %self.client, destination = %destination, "the remote refused the session: {reply}");
                self.pass_refusal(&reply).await;
                None
            }
            Greeting::Failed(why) => {
                tracing::info!(client = %self.client, destination = %destination, "remote not reached: {why}");
                let reply = Reply::new(421, "4.4.1", format!("{destination}: {why}"));
                let _ = self.reply(&reply).await;
                None
            }
        }
    }

    /// A remote's refusing greeting (554) goes to the MTA as it is; then, as RFC 5321
    /// 3.1 asks, every command but QUIT gets 503 until the MTA leaves.
    async fn pass_refusal(&mut self, greeting: &Reply) {
        if self.reply(greeting).await.is_err() {
            return;
        }
        let limit = self.proxy.config.limits.command_line;
        let idle = self.proxy.config.timeouts.client_idle;
        for _ in 0..10 {
            let read = tokio::time::timeout(idle, read_line(&mut self.io, limit, &mut self.line));
            let Ok(Ok(LineRead::Line)) = read.await else {
                return;
            };
            if let Ok(Command::Quit) = parse_command(&self.line) {
                let _ = self.reply(&Reply::new(221, "2.0.0", "bye")).await;
                return;
            }
            let no = Reply::new(503, "5.5.1", "the server refused the session; QUIT");
            if self.reply(&no).await.is_err() {
                return;
            }
        }
    }

    /// A session of a transparent listener: every transaction goes to `destination`.
    pub fn redirected_to(mut self, destination: SocketAddr) -> Session {
        self.redirect = Some(Redirect {
            destination,
            greeted: None,
        });
        self.registered.set_original_destination(destination);
        self
    }

    pub async fn run(mut self) {
        tracing::debug!(client = %self.client, "session opened");
        // Boxed: a transparent session's connect at accept is done once, and inline its
        // space would stay in the session's state for as long as the session lasts.
        let Some(greeting) = Box::pin(self.greeting()).await else {
            return;
        };
        if self.reply(&greeting).await.is_err() {
            return;
        }
        let mut drain = self.proxy.drain.subscribe();
        loop {
            if self.should_leave(*drain.borrow()) {
                let bye = Reply::new(421, "4.3.2", "shutting down, try again later");
                let _ = self.reply(&bye).await;
                break;
            }
            let limit = self.proxy.config.limits.command_line;
            let idle = self.proxy.config.timeouts.client_idle;
            let read = tokio::select! {
                read = tokio::time::timeout(idle, read_line(&mut self.io, limit, &mut self.line)) => read,
                // Re-checked at the top of the loop.
                _ = drain.changed() => continue,
            };
            let next = match read {
                Err(_) => {
                    let bye = Reply::new(421, "4.4.2", "idle too long, closing the connection");
                    let _ = self.reply(&bye).await;
                    Next::Close
                }
                Ok(Err(_)) | Ok(Ok(LineRead::Eof)) => Next::Close,
                Ok(Ok(LineRead::TooLong)) => {
                    let reply =
                        Reply::new(500, "5.5.2", format!("line longer than {limit} octets"));
                    self.reply_or_close(&reply).await
                }
                Ok(Ok(LineRead::Line)) => {
                    tracing::debug!(client = %self.client, "<- {}", String::from_utf8_lossy(&self.line));
                    match parse_command(&self.line) {
                        Ok(command) => self.handle(command).await,
                        Err(CommandError::BadDsnParameter { param, .. }) if !self.offers_dsn() => {
                            let unknown = CommandError::UnknownParameter(param);
                            self.reply_or_close(&unknown.reply()).await
                        }
                        Err(error) => self.reply_or_close(&error.reply()).await,
                    }
                }
            };
            if let Next::Close = next {
                break;
            }
        }
        self.end_transaction(End::SessionClosed).await;
        if let Some(greeted) = self.redirect.as_mut().and_then(|r| r.greeted.take()) {
            greeted.quit();
        }
        tracing::debug!(client = %self.client, "session closed");
    }

    /// Whether the MTA has sent anything it should have waited for: in our buffer, or
    /// waiting on the socket.
    fn client_sent_early(&mut self) -> bool {
        !self.io.buffer().is_empty()
            || (self.io.get_ref().tcp()).is_some_and(crate::smtp::peek::bytes_waiting)
    }

    /// While draining, a session leaves between transactions; when forced, at once.
    fn should_leave(&self, drain: Drain) -> bool {
        match drain {
            Drain::Running => false,
            Drain::Draining => !matches!(self.stage, Stage::Mail(_)),
            Drain::Forced => true,
        }
    }

    async fn handle(&mut self, command: Command) -> Next {
        let reply = match command {
            Command::Ehlo(_) => {
                self.end_transaction(End::Ehlo).await;
                self.stage = Stage::Ready;
                self.registered.update(SessionState::Ready, None);
                self.ehlo_reply()
            }
            Command::Helo(_) => {
                self.end_transaction(End::Helo).await;
                self.stage = Stage::Ready;
                let name = match &self.remote_ehlo {
                    Some(remote) => remote.lines.first().cloned().unwrap_or_default(),
                    None => self.proxy.config.hostname.0.clone(),
                };
                Reply::multiline(250, vec![name])
            }
            Command::Mail(sender, params) => self.mail(sender, params),
            // Boxed: the remote's dialogue is large and alive only in a transaction, and
            // inline every idle session would carry its space.
            Command::Rcpt(recipient, params) => Box::pin(self.rcpt(recipient, params)).await,
            Command::Data => return Box::pin(self.data()).await,
            Command::Rset => {
                self.end_transaction(End::Rset).await;
                if let Stage::Mail(_) = self.stage {
                    self.stage = Stage::Ready;
                }
                Reply::new(250, "2.0.0", "reset")
            }
            Command::Noop => Reply::new(250, "2.0.0", "OK"),
            Command::Vrfy => Reply::new(252, "2.5.0", "cannot verify, but will try to deliver"),
            Command::Help => Reply::new(214, "2.0.0", "tlsrouter relays mail; see RFC 5321"),
            Command::StartTls => return Box::pin(self.starttls()).await,
            Command::Quit => {
                let _ = self.reply(&Reply::new(221, "2.0.0", "bye")).await;
                return Next::Close;
            }
        };
        self.reply_or_close(&reply).await
    }

    fn ehlo_reply(&self) -> Reply {
        let mut reply = self.ehlo_extensions();
        if self.offers_starttls() {
            reply.lines.push("STARTTLS".into());
        }
        reply
    }

    /// DSN is offered only where its parameters reach a remote known to take them: a
    /// transparent session whose remote offers DSN. A smart-host session does not know its
    /// remote at EHLO time.
    fn offers_dsn(&self) -> bool {
        (self.remote_ehlo.as_ref())
            .is_some_and(|ehlo| crate::smtp::Capabilities::from_ehlo(ehlo).dsn)
    }

    /// STARTTLS is offered when a certificate is configured, until the session is in TLS.
    fn offers_starttls(&self) -> bool {
        !self.io.get_ref().is_tls() && self.proxy.server_tls.acceptor().is_some()
    }

    /// The MTA's STARTTLS (RFC 3207). Commands sent after it in the same packet would
    /// count as said under TLS though they came in clear: such a session is refused and
    /// closed. After the handshake the session starts over, EHLO first.
    async fn starttls(&mut self) -> Next {
        let acceptor = match self.proxy.server_tls.acceptor() {
            Some(acceptor) if !self.io.get_ref().is_tls() => acceptor,
            Some(_) => {
                return self
                    .reply_or_close(&Reply::new(503, "5.5.1", "already in TLS"))
                    .await;
            }
            None => {
                return self
                    .reply_or_close(&Reply::new(502, "5.5.1", "STARTTLS not offered here"))
                    .await;
            }
        };
        if matches!(self.stage, Stage::Mail(_)) {
            let reply = Reply::new(503, "5.5.1", "STARTTLS inside a transaction");
            return self.reply_or_close(&reply).await;
        }
        if self.client_sent_early() {
            tracing::warn!(client = %self.client, "commands pipelined after STARTTLS: session refused");
            let reply = Reply::new(554, "5.5.0", "commands sent after STARTTLS before TLS");
            let _ = self.reply(&reply).await;
            return Next::Close;
        }
        if self
            .reply(&Reply::new(220, "2.0.0", "ready to start TLS"))
            .await
            .is_err()
        {
            return Next::Close;
        }
        let io = std::mem::replace(
            &mut self.io,
            SessionReader::with_capacity(0, MtaStream::Gone),
        );
        let MtaStream::Plain(tcp) = io.into_inner() else {
            return Next::Close;
        };
        let timeout = self.proxy.config.timeouts.tls_handshake;
        match Box::pin(tokio::time::timeout(timeout, acceptor.accept(tcp))).await {
            Ok(Ok(tls)) => {
                let (_, session) = tls.get_ref();
                tracing::debug!(client = %self.client, version = ?session.protocol_version(), "MTA session in TLS");
                self.io =
                    SessionReader::with_capacity(COMMAND_BLOCK, MtaStream::Tls(Box::new(tls)));
                self.stage = Stage::Greeted;
                Next::Continue
            }
            Ok(Err(e)) => {
                tracing::info!(client = %self.client, "TLS handshake with the MTA failed: {e}");
                Next::Close
            }
            Err(_) => {
                tracing::info!(client = %self.client, "TLS handshake with the MTA timed out");
                Next::Close
            }
        }
    }

    /// Our EHLO reply without STARTTLS.
    fn ehlo_extensions(&self) -> Reply {
        let config = &self.proxy.config;
        if let Some(remote) = &self.remote_ehlo {
            return transparent_ehlo_reply(remote, config.limits.max_message_size);
        }
        Reply::multiline(
            250,
            vec![
                config.hostname.0.clone(),
                "PIPELINING".into(),
                format!("SIZE {}", config.limits.max_message_size),
                "8BITMIME".into(),
                "ENHANCEDSTATUSCODES".into(),
                "SMTPUTF8".into(),
            ],
        )
    }

    fn mail(&mut self, sender: Option<Mailbox>, params: MailParams) -> Reply {
        match self.stage {
            Stage::Greeted => return Reply::new(503, "5.5.1", "say EHLO first"),
            Stage::Mail(_) => return Reply::new(503, "5.5.1", "nested MAIL command"),
            Stage::Ready => {}
        }
        if let Some(param) = params.first_dsn_parameter().filter(|_| !self.offers_dsn()) {
            return CommandError::UnknownParameter(param).reply();
        }
        let max = self.proxy.config.limits.max_message_size;
        if params.size.is_some_and(|size| size > max) {
            return Reply::new(
                552,
                "5.3.4",
                format!("message larger than the limit of {max} octets"),
            );
        }
        self.stage = Stage::Mail(Box::new(Transaction {
            sender,
            params,
            remote: Remote::None,
            accepted: Vec::new(),
            refused: Vec::new(),
            refused_more: 0,
            deferred_any: false,
            rcpt_count: 0,
            failed_domains: HashMap::new(),
            started: std::time::Instant::now(),
            rules: self.proxy.router.rules(),
        }));
        self.registered.update(SessionState::Mail, None);
        Reply::new(250, "2.1.0", "sender OK")
    }

    async fn rcpt(&mut self, recipient: Mailbox, params: RcptParams) -> Reply {
        if let Some(param) = params.first_dsn_parameter().filter(|_| !self.offers_dsn()) {
            return CommandError::UnknownParameter(param).reply();
        }
        let reply = self.rcpt_reply(recipient.clone(), &params).await;
        if !reply.is_positive()
            && let Stage::Mail(tx) = &mut self.stage
        {
            tx.deferred_any |= reply.is_transient();
            if tx.refused.len() < REFUSED_SHOWN {
                tx.refused.push((recipient, reply.clone()));
            } else {
                tx.refused_more += 1;
            }
        }
        reply
    }

    async fn rcpt_reply(&mut self, recipient: Mailbox, params: &RcptParams) -> Reply {
        let proxy = self.proxy.clone();
        let Stage::Mail(tx) = &mut self.stage else {
            return Reply::new(503, "5.5.1", "MAIL first");
        };
        if tx.rcpt_count >= proxy.config.limits.max_recipients {
            return Reply::new(452, "4.5.3", "too many recipients");
        }
        tx.rcpt_count += 1;
        if let Remote::Lost { reply, .. } = &tx.remote {
            return reply.clone();
        }
        let domain = recipient.routing_domain().to_string();
        if let Some(reply) = tx.failed_domains.get(&domain) {
            return reply.clone();
        }
        let sender_domain = (tx.sender.as_ref()).map(|s| s.routing_domain().to_string());
        let plan = Plan::new(tx.rules.clone(), &domain, sender_domain.as_deref());
        if let Err(reply) = self.ensure_route(plan, (&recipient, params)).await {
            if let Stage::Mail(tx) = &mut self.stage {
                tx.failed_domains.insert(domain, reply.clone());
            }
            return reply;
        }
        let Stage::Mail(tx) = &mut self.stage else {
            return Reply::new(503, "5.5.1", "MAIL first");
        };
        let Remote::Open(route) = &mut tx.remote else {
            return Reply::new(451, "4.3.0", "internal error: no route");
        };
        match route.upstream.recipient(&recipient, params).await {
            Answer::Reply(reply) => {
                if reply.is_positive() {
                    tx.accepted.push(recipient);
                }
                reply
            }
            Answer::Lost(reply) => tx.lose(reply),
        }
    }

    /// Makes sure the transaction has a remote for this recipient's domain: the first
    /// recipient opens one, and later ones must be able to ride on it.
    async fn ensure_route(
        &mut self,
        plan: Plan,
        (recipient, params): (&Mailbox, &RcptParams),
    ) -> Result<(), Reply> {
        let proxy = self.proxy.clone();
        let Stage::Mail(tx) = &mut self.stage else {
            return Err(Reply::new(503, "5.5.1", "MAIL first"));
        };
        let domain = recipient.routing_domain();
        let routed = match &tx.remote {
            Remote::Open(route) => {
                let destination = self.redirect.as_ref().map(|r| r.destination);
                Box::pin(proxy.outbound.join_route(route, &plan, domain, destination)).await
            }
            _ => {
                let envelope = Envelope {
                    sender: tx.sender.as_ref(),
                    params: &tx.params,
                    first: (recipient, params),
                };
                let redirect = self.redirect.as_mut();
                match Box::pin(proxy.outbound.open_route(plan.clone(), &envelope, redirect)).await {
                    Ok(route) => {
                        let remote = route.upstream.facts().to_string();
                        self.registered.update(SessionState::Mail, Some(remote));
                        tx.remote = Remote::Open(Box::new(route));
                        Ok(())
                    }
                    Err(no_route) => Err(no_route),
                }
            }
        };
        routed.map_err(|no_route| {
            no_route.log(self.client, domain, &plan);
            no_route.reply()
        })
    }

    async fn data(&mut self) -> Next {
        let stage = std::mem::replace(&mut self.stage, Stage::Ready);
        let mut tx = match stage {
            Stage::Mail(tx) => tx,
            other => {
                self.stage = other;
                return self
                    .reply_or_close(&Reply::new(503, "5.5.1", "MAIL and RCPT first"))
                    .await;
            }
        };
        if self.client_sent_early() {
            return self.pipelining_violation(&mut tx).await;
        }
        let route = match &mut tx.remote {
            Remote::Open(route) if !tx.accepted.is_empty() => route,
            Remote::Lost { reply, .. } => {
                let reply = reply.clone();
                self.finish(&mut tx, Some(&reply), End::NoData).await;
                return self.reply_or_close(&reply).await;
            }
            _ => {
                let reply = Reply::new(554, "5.5.1", "no valid recipients");
                self.finish(&mut tx, Some(&reply), End::NoData).await;
                return self.reply_or_close(&reply).await;
            }
        };
        let start = match route.upstream.start_data().await {
            Answer::Reply(start) => start,
            Answer::Lost(reply) => {
                tx.lose(reply.clone());
                self.finish(&mut tx, Some(&reply), End::DataRefused).await;
                return self.reply_or_close(&reply).await;
            }
        };
        let remote = route.upstream.facts().to_string();
        self.registered.update(SessionState::Data, Some(remote));
        if self.client_sent_early() {
            // Text that came while the remote was asked: the same violation, found later.
            return self.pipelining_violation(&mut tx).await;
        }
        if self.reply(&start).await.is_err() {
            let reply = Reply::new(451, "4.4.2", "client gone");
            self.finish(&mut tx, Some(&reply), End::ClientGone).await;
            return Next::Close;
        }
        let ended = self.relay_body(&mut route.upstream).await;
        self.io.resize(COMMAND_BLOCK);
        if !matches!(ended, BodyEnd::Complete(_)) {
            route.upstream.abandon();
        }
        let (reply, end) = match ended {
            BodyEnd::Complete(tail) => (route.upstream.finish(tail).await, End::Answered),
            BodyEnd::Refused(error) => (error.reply(), End::MessageFailed),
            BodyEnd::UpstreamFailed(why) => (
                Reply::new(451, "4.4.2", format!("lost the remote during DATA: {why}")),
                End::MessageFailed,
            ),
            BodyEnd::ClientGone(why) => {
                // The final dot is never sent, so the remote discards the message.
                let reply = Reply::new(451, "4.4.2", format!("client gone during DATA: {why}"));
                self.finish(&mut tx, Some(&reply), End::ClientGone).await;
                return Next::Close;
            }
        };
        self.finish(&mut tx, Some(&reply), end).await;
        self.reply_or_close(&reply).await
    }

    /// RFC 2920: DATA ends a pipelined group; the client must wait for our 354.
    async fn pipelining_violation(&mut self, tx: &mut Transaction) -> Next {
        let reply = Reply::new(
            554,
            "5.5.0",
            "synchronization error: data sent before the 354",
        );
        self.finish(tx, Some(&reply), End::PipeliningViolation)
            .await;
        let _ = self.reply(&reply).await;
        Next::Close
    }

    /// Streams the body from the MTA to the remote in bounded blocks.
    async fn relay_body(&mut self, upstream: &mut Upstream) -> BodyEnd {
        let config = &self.proxy.config;
        let client_idle = config.timeouts.client_idle;
        let mut filter = BodyFilter::new(
            config.delivery.bare_line_endings,
            config.limits.text_line,
            config.limits.max_message_size,
        );
        let mut out = Vec::with_capacity(BODY_BLOCK + 1024);
        let mut upstream_error = None;
        let mut full_reads = 0;
        loop {
            let capacity = self.io.capacity();
            let input = match tokio::time::timeout(client_idle, self.io.fill_buf()).await {
                Err(_) => return BodyEnd::ClientGone(ClientGone::TimedOut),
                Ok(Err(e)) => return BodyEnd::ClientGone(ClientGone::Failed(e)),
                Ok(Ok([])) => return BodyEnd::ClientGone(ClientGone::Closed),
                Ok(Ok(input)) => input,
            };
            // A text that fills the small buffer twice is large: read it in whole blocks.
            // (A text of a KiB or two ends before it needs the larger buffer.)
            full_reads += usize::from(input.len() == capacity);
            let grow = full_reads == 2 && capacity < BODY_BLOCK;
            // One input byte makes at most three output bytes (a stray CR, then a stuffed
            // dot): take no more than keeps a block within BODY_BLOCK.
            let room = (BODY_BLOCK.saturating_sub(out.len()) / 3).max(1);
            let fed = filter.feed(&input[..input.len().min(room)], &mut out);
            self.io.consume(fed.consumed);
            if grow {
                self.io.resize(BODY_BLOCK);
            }
            // The end of a complete text is held back: it goes with the final dot, in one
            // write (one packet for the remote, one wake-up less on both sides).
            let complete = matches!(fed.end, Some(Ok(())));
            let flush = !complete && (out.len() >= BODY_BLOCK || fed.end.is_some());
            if flush && !out.is_empty() && upstream_error.is_none() {
                upstream_error = upstream.body_block(&out).await.err();
            }
            if flush {
                out.clear();
            }
            match fed.end {
                None => continue,
                Some(Err(error)) => return BodyEnd::Refused(error),
                Some(Ok(())) => {
                    return match upstream_error {
                        Some(why) => BodyEnd::UpstreamFailed(why),
                        None => BodyEnd::Complete(out),
                    };
                }
            }
        }
    }

    /// Ends whatever transaction is open, with a log line, and closes its remote connection.
    async fn end_transaction(&mut self, end: End) {
        if let Stage::Mail(_) = self.stage {
            let Stage::Mail(mut tx) = std::mem::replace(&mut self.stage, Stage::Ready) else {
                return;
            };
            self.finish(&mut tx, None, end).await;
        }
    }

    /// The one log line of a transaction, its counters; then the remote connection is closed.
    /// `reply` is the MTA's answer for the message, `None` when it never sent one (RSET, QUIT).
    async fn finish(&self, tx: &mut Transaction, reply: Option<&Reply>, end: End) {
        log_transaction(self.client, tx, reply, end);
        self.count(tx, reply, end);
        self.registered.update(SessionState::Ready, None);
        if let Remote::Open(route) = std::mem::replace(&mut tx.remote, Remote::None) {
            // Kept for the next message when it ended well, closed otherwise.
            self.proxy.outbound.release(route.upstream);
        }
    }

    fn count(&self, tx: &Transaction, reply: Option<&Reply>, end: End) {
        let stats = &self.proxy.stats;
        stats.transactions.inc();
        stats.transaction_time(tx.started.elapsed().as_secs_f64());
        if reply.is_some_and(Reply::is_transient) || tx.deferred_any {
            stats.deferrals.inc();
        }
        let delivered = end == End::Answered && reply.is_some_and(Reply::is_positive);
        let Some(facts) = tx.remote.facts().filter(|_| delivered) else {
            return;
        };
        match &facts.tls {
            TlsOutcome::Encrypted(_) | TlsOutcome::Legacy(_) => {
                let class = facts.tls.class().map_or("tls-verified", |c| c.name());
                stats.delivered(class);
            }
            TlsOutcome::Plain(reason) => {
                stats.delivered("plain");
                if let Some(class) = reason.class() {
                    stats.fallback(class);
                }
            }
        }
    }

    async fn reply(&mut self, reply: &Reply) -> std::io::Result<()> {
        tracing::debug!(client = %self.client, "-> {reply}");
        let stream = self.io.get_mut();
        stream.write_all(&reply.to_wire()).await?;
        // TLS keeps what it has not yet sent as records.
        stream.flush().await
    }

    async fn reply_or_close(&mut self, reply: &Reply) -> Next {
        match self.reply(reply).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Close,
        }
    }
}

impl Transaction {
    /// The remote is gone: every later recipient and the DATA get this reply.
    fn lose(&mut self, reply: Reply) -> Reply {
        let remote = std::mem::replace(&mut self.remote, Remote::None);
        if let Remote::Open(route) = remote {
            let facts = Box::new(route.upstream.facts().clone());
            tokio::spawn(route.upstream.quit());
            self.remote = Remote::Lost {
                facts,
                reply: reply.clone(),
            };
        }
        reply
    }
}

/// Refused recipients named in a log line; the rest are counted.
const REFUSED_SHOWN: usize = 20;

/// Our EHLO reply in transparent mode: the remote's name, and of its extensions those a
/// cut-through relay can pass on (DSN too: its parameters are passed on). SIZE is the
/// smaller of its limit and ours; STARTTLS,
/// AUTH and anything we do not understand are left out (TLS toward the remote is ours).
fn transparent_ehlo_reply(remote: &Reply, our_max_size: u64) -> Reply {
    let caps = crate::smtp::Capabilities::from_ehlo(remote);
    let mut lines = vec![remote.lines.first().cloned().unwrap_or_default()];
    if caps.pipelining {
        lines.push("PIPELINING".into());
    }
    let size = match caps.size {
        Some(limit) if limit > 0 => limit.min(our_max_size),
        _ => our_max_size,
    };
    lines.push(format!("SIZE {size}"));
    let offered = |keyword: &str| caps.keywords.iter().any(|k| k == keyword);
    for keyword in ["8BITMIME", "DSN", "ENHANCEDSTATUSCODES", "SMTPUTF8"] {
        if offered(keyword) {
            lines.push(keyword.into());
        }
    }
    Reply::multiline(250, lines)
}

fn log_transaction(client: SocketAddr, tx: &Transaction, reply: Option<&Reply>, end: End) {
    use tracing::field::display;
    let sender = tx
        .sender
        .as_ref()
        .map_or_else(|| "<>".to_string(), ToString::to_string);
    let recipients: Vec<String> = tx.accepted.iter().map(ToString::to_string).collect();
    let mut refused: Vec<String> = (tx.refused.iter())
        .map(|(rcpt, reply)| format!("{rcpt} ({reply})"))
        .collect();
    if tx.refused_more > 0 {
        refused.push(format!("and {} more", tx.refused_more));
    }
    // A field with nothing to say is left out of the line, not written as `key=`.
    let listed = |items: &[String], separator: &str| {
        (!items.is_empty()).then(|| display(items.join(separator)))
    };
    let reply = reply.map_or_else(|| "none".to_string(), ToString::to_string);
    let Some(facts) = tx.remote.facts() else {
        tracing::info!(
            target: "tlsrouter::transaction",
            client = %client,
            from = %sender,
            to = listed(&recipients, ","),
            refused = listed(&refused, "; "),
            route = "none",
            end = end.label(),
            reply = %reply,
            "transaction"
        );
        return;
    };
    let (route, version, cipher, verify, fallback) = match &facts.tls {
        TlsOutcome::Encrypted(session) => {
            let verify = match &session.verification {
                Verification::Verified => "verified".to_string(),
                Verification::Failed(problem) => format!("{}: {problem}", problem.class()),
            };
            (
                "tls",
                Some(session.version.as_str()),
                Some(session.cipher.as_str()),
                Some(verify),
                None,
            )
        }
        // Whatever the chain is worth, this session authenticated nothing.
        TlsOutcome::Legacy(session) => {
            let chain = match &session.verification {
                Verification::Verified => "the chain verifies".to_string(),
                Verification::Failed(problem) => format!("{}: {problem}", problem.class()),
            };
            (
                "tls",
                Some(session.version.as_str()),
                Some(session.cipher.as_str()),
                Some(format!("tls-legacy: not authenticated ({chain})")),
                None,
            )
        }
        TlsOutcome::Plain(reason) => {
            let class = reason.class().map(|c| c.name()).unwrap_or("tls-never");
            (
                "plain",
                None,
                None,
                None,
                Some(format!("{class}: {reason}")),
            )
        }
    };
    let earlier: Vec<String> = (facts.earlier_failures.iter())
        .map(ToString::to_string)
        .collect();
    tracing::info!(
        target: "tlsrouter::transaction",
        client = %client,
        from = %sender,
        to = listed(&recipients, ","),
        refused = listed(&refused, "; "),
        next_hop = %facts.server,
        mx = %facts.server.name,
        addr = %facts.server.addr,
        relay = facts.relay.as_ref().map(display),
        route,
        tls_version = version,
        cipher,
        verify = verify.map(display),
        fallback = fallback.map(display),
        rule = %facts.rule,
        policy = facts.published.name(),
        downgrade = facts.downgrade.then(|| facts.tls.class().map_or("", |c| c.name())),
        reused = facts.reused.then_some(display("yes")),
        end = end.label(),
        reply = %reply,
        earlier_failures = listed(&earlier, "; "),
        "transaction"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mta_is_offered_what_the_remote_offers_and_a_relay_can_pass_on() {
        let remote = Reply::multiline(
            250,
            [
                "mx.partner.example Hello",
                "PIPELINING",
                "SIZE 1000",
                "STARTTLS",
                "AUTH PLAIN",
                "CHUNKING",
                "DSN",
                "SMTPUTF8",
            ]
            .map(String::from)
            .to_vec(),
        );
        let ours = transparent_ehlo_reply(&remote, 50_000_000);
        assert_eq!(
            ours.lines,
            [
                "mx.partner.example Hello",
                "PIPELINING",
                "SIZE 1000",
                "DSN",
                "SMTPUTF8"
            ]
        );
        // No limit from the remote, or a larger one: ours.
        let remote = Reply::multiline(250, ["mx", "SIZE", "8BITMIME"].map(String::from).to_vec());
        assert_eq!(
            transparent_ehlo_reply(&remote, 5000).lines,
            ["mx", "SIZE 5000", "8BITMIME"]
        );
    }
}
