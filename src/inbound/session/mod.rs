//! One MTA session: the ESMTP server state machine, with cut-through relaying of each
//! transaction to the remote chosen for its first recipient. It speaks SMTP to the MTA
//! only: it asks the outbound side for a route ([`Outbound::open_route`]) and drives the
//! remote through the verbs of [`Upstream`].
//!
//! [`Outbound::open_route`]: crate::outbound::Outbound::open_route
//! [`Upstream`]: crate::outbound::upstream::Upstream

mod data;
mod ehlo;
mod held;
mod ledger;
mod log;
mod transaction;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::inbound::reader::SessionReader;
use crate::inbound::session::log::log_transaction;
use crate::inbound::session::transaction::{End, Held, REFUSED_SHOWN, Remote, Transaction};
use crate::outbound::TlsRequiredNo;
use crate::outbound::attempt::{Envelope, Greeting};
use crate::outbound::route::{NoRoute, Redirect};
use crate::outbound::upstream::Answer;
use crate::outcome::TlsOutcome;
use crate::proxy::Proxy;
use crate::router::Plan;
use crate::server_tls::MtaStream;
use crate::sessions::{Drain, Entry, SessionState};
use crate::smtp::line::{LineRead, read_line};
use crate::smtp::peek::{Look, bytes_waiting};
use crate::smtp::{Command, CommandError, MailParams, Mailbox, RcptParams, Reply, parse_command};

/// The read buffer between messages: a pipelined command group fits, and an idle session
/// holds no more. It grows while a message is read (see `data::TEXT_BLOCK`).
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

/// What to do after a command.
enum Next {
    Continue,
    Close,
}

impl Session {
    pub fn new(proxy: Arc<Proxy>, stream: TcpStream, client: SocketAddr) -> Session {
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
    /// waiting on the socket, looking `look` hard.
    fn client_sent_early(&mut self, look: Look) -> bool {
        !self.io.buffer().is_empty()
            || (self.io.get_ref().tcp()).is_some_and(|tcp| bytes_waiting(tcp, look))
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

    fn mail(&mut self, sender: Option<Mailbox>, params: MailParams) -> Reply {
        match self.stage {
            Stage::Greeted => return Reply::new(503, "5.5.1", "say EHLO first"),
            Stage::Mail(_) => return Reply::new(503, "5.5.1", "nested MAIL command"),
            Stage::Ready => {}
        }
        if let Some(param) = params.first_dsn_parameter().filter(|_| !self.offers_dsn()) {
            return CommandError::UnknownParameter(param).reply();
        }
        if params.requiretls && !self.offers_requiretls() {
            return Reply::new(
                530,
                "5.7.10",
                "REQUIRETLS needs a session in TLS: say STARTTLS first",
            );
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
            text: None,
            verdicts: Vec::new(),
        }));
        self.registered.update(SessionState::Mail, None);
        Reply::new(250, "2.1.0", "sender OK")
    }

    async fn rcpt(&mut self, recipient: Mailbox, params: RcptParams) -> Reply {
        if let Some(param) = params.first_dsn_parameter().filter(|_| !self.offers_dsn()) {
            return CommandError::UnknownParameter(param).reply();
        }
        let reply = self.rcpt_reply(recipient.clone(), &params).await;
        let now = self.proxy.outbound.cache.now();
        if reply.is_positive()
            && let Stage::Mail(tx) = &mut self.stage
        {
            tx.note_recipient(&recipient, &reply, (false, now));
        }
        if !reply.is_positive()
            && let Stage::Mail(tx) = &mut self.stage
        {
            // 452 4.5.3: "send it in another transaction" (RFC 5321 4.5.3.1.10), which the
            // MTA does; the message is not deferred.
            let split = reply.code == 452 && reply.enhanced() == Some("4.5.3");
            if split {
                self.proxy.stats.recipients_split.inc();
            } else {
                tx.deferred_any |= reply.is_transient();
            }
            tx.note_recipient(&recipient, &reply, (split, now));
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
        if let Remote::Held(held) = &tx.remote {
            return Reply::new(
                452,
                "4.5.3",
                format!(
                    "{} waits for this message's TLS-Required header: send this recipient in another transaction",
                    held.recipient
                ),
            );
        }
        let sender_domain = (tx.sender.as_ref()).map(|s| s.routing_domain().to_string());
        let plan = Plan::new(tx.rules.clone(), &domain, sender_domain.as_deref());
        if let Err(no_route) = self.ensure_route(plan.clone(), (&recipient, params)).await {
            if let Some(reply) = self.hold(&no_route, &recipient, params, &plan) {
                return reply;
            }
            no_route.log(self.client, &domain, &plan);
            let reply = no_route.reply();
            let failure = no_route.failure(proxy.outbound.cache.now());
            if let Stage::Mail(tx) = &mut self.stage {
                tx.note_failure(&domain, failure);
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
    ) -> Result<(), NoRoute> {
        let proxy = self.proxy.clone();
        let Stage::Mail(tx) = &mut self.stage else {
            return Ok(());
        };
        let domain = recipient.routing_domain();
        match &tx.remote {
            Remote::Open(route) => {
                let destination = self.redirect.as_ref().map(|r| r.destination);
                Box::pin(proxy.outbound.join_route(route, &plan, domain, destination)).await
            }
            Remote::Held(_) | Remote::Lost { .. } | Remote::None => {
                let envelope = Envelope {
                    sender: tx.sender.as_ref(),
                    params: &tx.params,
                    first: (recipient, params),
                    policy_waived: false,
                };
                let redirect = self.redirect.as_mut();
                let route = Box::pin(proxy.outbound.open_route(plan, &envelope, redirect)).await?;
                let remote = route.upstream.facts().to_string();
                self.registered.update(SessionState::Mail, Some(remote));
                tx.remote = Remote::Open(Box::new(route));
                Ok(())
            }
        }
    }

    /// Holds the transaction's first recipient for the message's `TLS-Required: No` when
    /// only its domain's published policy stands in the way (see `held`): its 250.
    fn hold(
        &mut self,
        no_route: &NoRoute,
        recipient: &Mailbox,
        params: &RcptParams,
        plan: &Plan,
    ) -> Option<Reply> {
        let honoured = self.proxy.config.delivery.tls_required_no == TlsRequiredNo::Honour;
        let Stage::Mail(tx) = &mut self.stage else {
            return None;
        };
        let first = matches!(tx.remote, Remote::None) && tx.accepted.is_empty();
        // The sender's REQUIRETLS sets the header aside (RFC 8689 5).
        if !honoured || !first || tx.params.requiretls || !no_route.refused_by_domain_policy() {
            return None;
        }
        let refusal = no_route.reply();
        tracing::info!(event = "held", client = %self.client, domain = recipient.routing_domain(), refusal = %refusal, "recipient held for the message's TLS-Required header: {refusal}");
        tx.accepted.push(recipient.clone());
        tx.remote = Remote::Held(Box::new(Held {
            recipient: recipient.clone(),
            params: params.clone(),
            plan: plan.clone(),
            refusal,
        }));
        Some(Reply::new(
            250,
            "2.1.5",
            "recipient held: its domain's policy refuses every server unless the message says TLS-Required: No",
        ))
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
        let now = self.proxy.outbound.cache.now();
        ledger::record((&self.proxy.ledger, &self.proxy.stats), now, tx, reply, end);
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
        if tx.params.requiretls {
            stats.requiretls_delivered.inc();
        }
        if facts.policy_waived {
            stats.policy_waived_by_sender.inc();
        }
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
