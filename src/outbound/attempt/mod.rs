//! One conversation with one server, start to end: connect (through the one dialer),
//! greeting, EHLO, the one secure step the decision asks for (PKIX, DANE or the legacy
//! stack), the decision again on what it found, what is remembered and reported of it,
//! AUTH (smart hosts), MAIL FROM. [`crate::outbound::delivery`] only chooses the servers.
//!
//! A connection is a [`PlainConnection`] until the secure step; only that type can say
//! STARTTLS, so no connection is secured twice.

mod auth;
mod judge;
mod reuse;

use std::net::SocketAddr;
use std::sync::Mutex;

use crate::net::connection::{Connection, ExchangeError, PlainConnection, StartTls};
use crate::net::dane::TlsaRecord;
use crate::net::dns::ServerId;
use crate::net::tls::Handshake;
use crate::net::transport::Stream;
use crate::outbound::Outbound;
use crate::outbound::failure::{AttemptFailure, Broken};
use crate::outbound::upstream::FirstReply;
use crate::outcome::{NoTls, OutcomeClass, TlsOutcome};
use crate::policy::mta_sts::StsPolicy;
use crate::router::decision::{
    Authentication, Demand, HostDecision, Known, Published, Refusal, TlsTerms, decide,
};
use crate::rules::model::HostPort;
use crate::rules::{Fallback, Route, Rule};
use crate::smtp::{Capabilities, MailParams, Mailbox, MissingExtension, RcptParams, Reply};

/// What a remote transaction is opened with: the MTA's sender and MAIL parameters, and its
/// first recipient, which goes with MAIL FROM in one write to a remote that offers
/// PIPELINING (its reply waits in the upstream for `Upstream::recipient`).
pub struct Envelope<'a> {
    pub sender: Option<&'a Mailbox>,
    pub params: &'a MailParams,
    pub first: (&'a Mailbox, &'a RcptParams),
    /// The message says `TLS-Required: No` (RFC 8689 5) and the setting honours it: what
    /// the recipient domain publishes (MTA-STS, DANE) refuses no server, and the rules
    /// alone decide.
    pub policy_waived: bool,
}

impl Envelope<'_> {
    /// MAIL FROM for a remote with these capabilities, or the extension the message needs
    /// and the remote lacks.
    fn mail_from(&self, caps: &Capabilities) -> Result<String, MissingExtension> {
        let sender = self.sender.map(ToString::to_string).unwrap_or_default();
        Ok(format!(
            "MAIL FROM:<{sender}>{}",
            self.params.to_wire(caps)?
        ))
    }
}

/// One delivery attempt: the rule for this server, the route, the server, and what the
/// decision said before connecting.
pub(crate) struct Attempt<'a> {
    pub rule: &'a Rule,
    pub route: &'a Route,
    pub server: &'a ServerId,
    pub port: u16,
    pub domain: &'a str,
    pub decision: HostDecision,
    /// What the domain publishes, as it bears on this server.
    pub published: Published,
    /// What the message demands of the server (the sender's REQUIRETLS).
    pub demand: Demand,
    /// The domain's MTA-STS policy, for TLS-RPT.
    pub policy: Option<&'a StsPolicy>,
    /// A connection greeted before the transaction (transparent mode), not yet used.
    pub greeted: &'a Mutex<Option<(PlainConnection, Capabilities)>>,
    /// What MAIL FROM and the first RCPT TO are written from.
    pub envelope: &'a Envelope<'a>,
    /// The server's usable TLSA records, when DANE applies.
    pub tlsa: &'a [TlsaRecord],
    /// All its TLSA records in presentation form, for TLS-RPT.
    pub tlsa_records: &'a [String],
}

impl Attempt<'_> {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.server.addr, self.port)
    }

    /// The connection greeted in advance, if it goes to this attempt's server; it takes the
    /// server's name, which its TLS handshake verifies.
    fn take_greeted(&self) -> Option<(PlainConnection, Capabilities)> {
        let mut slot = self.greeted.lock().ok()?;
        if slot
            .as_ref()
            .is_none_or(|(conn, _)| conn.peer != self.addr())
        {
            return None;
        }
        let (mut conn, caps) = slot.take()?;
        conn.host = self.server.name.clone();
        Some((conn, caps))
    }

    /// How the TLS the decision asks for is had: with the host's TLSA records where the
    /// terms say DANE judges the certificate, else with PKIX.
    fn handshake(&self, terms: TlsTerms) -> Handshake {
        match terms.authentication {
            Authentication::Tlsa => Handshake::Dane {
                min_tls: terms.min_tls,
                records: self.tlsa.to_vec(),
            },
            Authentication::Pkix | Authentication::UnusableTlsa => Handshake::Pkix(terms.min_tls),
        }
    }
}

/// A connection on the path the decisions chose, greeted, secured as they asked (or plain
/// for a reason), its EHLO read afresh after TLS.
pub(crate) struct Reached {
    pub conn: Connection,
    pub caps: Capabilities,
    pub tls: TlsOutcome,
    /// The fallback relay the connection goes to instead of the server, if any.
    pub relay: Option<HostPort>,
    /// What judged the certificate of a rustls session.
    pub authentication: Authentication,
    /// The server did TLS recently and this attempt did not get it.
    pub downgrade: bool,
}

/// A remote connected at accept for a transparent session: its greeting and EHLO reply
/// are what the MTA is shown, and the connection serves the session's first transaction.
pub struct Greeted {
    pub(crate) conn: PlainConnection,
    pub(crate) caps: Capabilities,
    pub greeting: Reply,
    pub ehlo: Reply,
}

impl Greeted {
    /// Closes the connection politely, unused.
    pub fn quit(self) {
        tokio::spawn(self.conn.quit());
    }
}

/// What connecting at accept gave.
pub enum Greeting {
    Greeted(Box<Greeted>),
    /// The remote greeted with something else than 220: the MTA gets it as it is.
    Refused(Reply),
    /// No greeting and EHLO could be had: why.
    Failed(AttemptFailure),
}

/// Whether the connection made at accept is to `addr`.
pub(crate) fn is_connected(
    greeted: &Mutex<Option<(PlainConnection, Capabilities)>>,
    addr: SocketAddr,
) -> bool {
    (greeted.lock()).is_ok_and(|slot| slot.as_ref().is_some_and(|(conn, _)| conn.peer == addr))
}

/// What STARTTLS left of a connection, before the decision has seen it.
enum Secured {
    Tls(Connection, Capabilities, TlsOutcome),
    /// No TLS, and the connection is still usable in plain (no STARTTLS, or refused).
    Plain(PlainConnection, Capabilities, NoTls),
    /// The connection is gone; a plain fallback needs a new one.
    Lost(NoTls),
}

impl Secured {
    fn outcome(&self) -> TlsOutcome {
        match self {
            Secured::Tls(_, _, outcome) => outcome.clone(),
            Secured::Plain(_, _, reason) | Secured::Lost(reason) => {
                TlsOutcome::Plain(reason.clone())
            }
        }
    }

    /// Closes what is still open.
    fn close(self) {
        match self {
            Secured::Tls(conn, ..) => {
                tokio::spawn(conn.quit());
            }
            Secured::Plain(conn, ..) => {
                tokio::spawn(conn.quit());
            }
            Secured::Lost(_) => {}
        }
    }
}

impl Outbound {
    /// Connects to `addr`, reads its greeting and says EHLO: a transparent session does
    /// this at accept, so that the MTA sees the remote's own greeting and capabilities.
    pub async fn greet_at_accept(&self, addr: SocketAddr) -> Greeting {
        let server = ServerId::new(&addr.ip().to_string(), addr.ip());
        let _waiting = match self.greetings.wait(addr) {
            Ok(waiting) => waiting,
            Err(busy) => return Greeting::Failed(AttemptFailure::Busy(busy)),
        };
        let mut conn = match self.connect(&server, addr).await {
            Ok(conn) => conn,
            Err(failure) => return Greeting::Failed(failure),
        };
        let greeting = match conn
            .read_reply(self.timeouts.greeting, "the greeting")
            .await
        {
            Ok(greeting) => greeting,
            Err(e) => return Greeting::Failed(Broken::Exchange(e).into()),
        };
        if greeting.code != 220 {
            tokio::spawn(conn.quit());
            return Greeting::Refused(greeting);
        }
        let command = format!("EHLO {}", self.hostname);
        let ehlo = match (conn.command(&command, self.timeouts.command, "the reply to EHLO")).await
        {
            Ok(reply) if reply.is_positive() && !reply.closes_connection() => reply,
            Ok(reply) => {
                tokio::spawn(conn.quit());
                return Greeting::Failed(Broken::Ehlo(reply).into());
            }
            Err(e) => return Greeting::Failed(Broken::Exchange(e).into()),
        };
        let caps = Capabilities::from_ehlo(&ehlo);
        Greeting::Greeted(Box::new(Greeted {
            conn,
            caps,
            greeting,
            ehlo,
        }))
    }

    /// Runs one attempt up to the remote's acceptance of MAIL FROM.
    pub(crate) async fn attempt(
        &self,
        attempt: &Attempt<'_>,
    ) -> Result<(Reached, Option<FirstReply>), AttemptFailure> {
        let mut reached = self.reach(attempt).await?;
        if let Route::Smarthost {
            auth: Some(auth), ..
        } = attempt.route
            && let Err(failure) = self.authenticate(&mut reached, attempt.server, auth).await
        {
            tokio::spawn(reached.conn.quit());
            return Err(failure);
        }
        let command = match attempt.envelope.mail_from(&reached.caps) {
            Ok(command) => command,
            Err(missing) => {
                tokio::spawn(reached.conn.quit());
                return Err(AttemptFailure::Unsupported(missing));
            }
        };
        let (conn, caps) = (&mut reached.conn, &reached.caps);
        let (reply, first) = (self.mail_from(conn, caps, &command, attempt.envelope.first))
            .await
            .map_err(Broken::Exchange)?;
        if reply.closes_connection() {
            return Err(Broken::MailFrom(reply).into());
        }
        if !reply.is_positive() {
            tokio::spawn(reached.conn.quit());
            return Err(AttemptFailure::Rejected(reply));
        }
        Ok((reached, first))
    }

    /// MAIL FROM; to a remote that offers PIPELINING, with the first recipient in the same
    /// write (RFC 2920), its reply read after MAIL FROM's and kept for the upstream.
    pub(super) async fn mail_from<T: Stream>(
        &self,
        conn: &mut Connection<T>,
        caps: &Capabilities,
        command: &str,
        (recipient, params): (&Mailbox, &RcptParams),
    ) -> Result<(Reply, Option<FirstReply>), ExchangeError> {
        let timeout = self.timeouts.command;
        let what = "the reply to MAIL FROM";
        if !caps.pipelining {
            let reply = conn.exchange(command, &[250], timeout, what).await?;
            return Ok((reply, None));
        }
        let rcpt = format!("RCPT TO:<{recipient}>{}", params.to_wire(caps));
        let commands = [
            (command, &[250][..], what),
            (rcpt.as_str(), &[250, 251][..], "the reply to RCPT TO"),
        ];
        let mut replies = conn.pipeline(&commands, timeout).await.into_iter();
        let mail = replies.next().unwrap_or(Err(ExchangeError::Closed(what)))?;
        if !mail.is_positive() || mail.closes_connection() {
            return Ok((mail, None));
        }
        let rcpt_reply = replies
            .next()
            .unwrap_or(Err(ExchangeError::Closed("the reply to RCPT TO")));
        Ok((mail, Some((recipient.clone(), rcpt_reply))))
    }

    /// A greeted connection on the path the decisions choose: encrypted, or plain for a
    /// reason, to the server or through the rule's relay.
    async fn reach(&self, attempt: &Attempt<'_>) -> Result<Reached, AttemptFailure> {
        let terms = match &attempt.decision {
            HostDecision::Tls(terms) => *terms,
            HostDecision::Plain { reason, path } => {
                let open = attempt.take_greeted();
                return self.plain_path(path, open, attempt, reason.clone()).await;
            }
            HostDecision::LegacyTls => return self.legacy(attempt).await,
            HostDecision::Refuse(refusal) => return Err(AttemptFailure::Refused(refusal.clone())),
            HostDecision::Skip(skip) => return Err(AttemptFailure::Skipped(skip.clone())),
        };
        let handshake = attempt.handshake(terms);
        if terms.implicit {
            return self.implicit_tls(attempt, &handshake).await;
        }
        let (conn, caps) = match attempt.take_greeted() {
            Some(greeted) => greeted,
            None => self.greet(attempt.server, attempt.addr()).await?,
        };
        let authentication = match handshake {
            Handshake::Dane { .. } => Authentication::Tlsa,
            _ => Authentication::Pkix,
        };
        let secured = self.secure(&handshake, conn, caps).await?;
        let (decision, downgrade) = self.judge(attempt, &secured.outcome(), true);
        match (decision, secured) {
            (HostDecision::Tls(_), Secured::Tls(conn, caps, tls)) => Ok(Reached {
                conn,
                caps,
                tls,
                relay: None,
                authentication,
                downgrade,
            }),
            (HostDecision::LegacyTls, secured) => {
                // rustls could not talk to this server: a new connection for the legacy stack.
                let outcome = secured.outcome();
                secured.close();
                let class = outcome.class().map_or("", OutcomeClass::name);
                let reason = match &outcome {
                    TlsOutcome::Plain(reason) => reason.to_string(),
                    _ => class.to_string(),
                };
                tracing::info!(event = "legacy_tried", server = %attempt.server, class, reason, "rustls failed ({class}: {reason}); trying the legacy TLS stack");
                self.legacy(attempt).await
            }
            (HostDecision::Plain { reason, path }, secured) => {
                let plain = Plain {
                    reason,
                    path,
                    downgrade,
                };
                self.after_tls_failed(attempt, secured, "TLS", plain).await
            }
            (decision, secured) => {
                secured.close();
                Err(not_achieved(decision))
            }
        }
    }

    /// The legacy stack on a new connection: STARTTLS, the OpenSSL handshake, EHLO again;
    /// then what the attempt found goes through the decision like any other.
    async fn legacy(&self, attempt: &Attempt<'_>) -> Result<Reached, AttemptFailure> {
        let (conn, caps) = self.greet(attempt.server, attempt.addr()).await?;
        let secured = self.secure(&Handshake::Legacy, conn, caps).await?;
        let outcome = secured.outcome();
        let (decision, downgrade) = self.judge(attempt, &outcome, false);
        match (decision, secured) {
            (HostDecision::LegacyTls, Secured::Tls(conn, caps, tls)) => Ok(Reached {
                conn,
                caps,
                tls,
                relay: None,
                authentication: Authentication::Pkix,
                downgrade: false,
            }),
            (HostDecision::Plain { reason, path }, secured) => {
                let plain = Plain {
                    reason,
                    path,
                    downgrade,
                };
                self.after_tls_failed(attempt, secured, "legacy TLS", plain)
                    .await
            }
            (decision, secured) => {
                secured.close();
                Err(not_achieved(decision))
            }
        }
    }

    /// The plain path the decision chose after `stack` did not give TLS: on the connection
    /// still open in plain (STARTTLS refused or not offered), else on a new one; a session
    /// whose certificate failed a rule that allows plain after that is closed.
    async fn after_tls_failed(
        &self,
        attempt: &Attempt<'_>,
        secured: Secured,
        stack: &str,
        plain: Plain,
    ) -> Result<Reached, AttemptFailure> {
        let Plain {
            reason,
            path,
            downgrade,
        } = plain;
        let open = match secured {
            Secured::Plain(conn, caps, _) => Some((conn, caps)),
            other => {
                other.close();
                None
            }
        };
        if open.is_none() {
            tracing::info!(server = %attempt.server, "{stack} failed ({reason}); taking the plain path");
        }
        let reached = self.plain_path(&path, open, attempt, reason).await?;
        Ok(Reached {
            downgrade,
            ..reached
        })
    }

    /// Implicit TLS (port 465): the handshake comes before the greeting.
    async fn implicit_tls(
        &self,
        attempt: &Attempt<'_>,
        handshake: &Handshake,
    ) -> Result<Reached, AttemptFailure> {
        let waiting = self
            .greetings
            .wait(attempt.addr())
            .map_err(AttemptFailure::Busy)?;
        let conn = self.connect(attempt.server, attempt.addr()).await?;
        let secured = conn.secure(&self.tls, handshake, self.timeouts.tls_handshake);
        let (outcome, conn) = match secured.await {
            Ok((conn, session)) => (TlsOutcome::from(session), Some(conn)),
            Err(reason) => (TlsOutcome::Plain(reason), None),
        };
        let found = Known::Found {
            outcome: &outcome,
            downgrade: false,
        };
        match (
            decide(attempt.rule, found, attempt.published, attempt.demand),
            conn,
        ) {
            (HostDecision::Tls(_), Some(mut conn)) => {
                self.read_greeting(&mut conn).await?;
                drop(waiting);
                let caps = self.ehlo(&mut conn).await?;
                Ok(Reached {
                    conn,
                    caps,
                    tls: outcome,
                    relay: None,
                    authentication: Authentication::Pkix,
                    downgrade: false,
                })
            }
            (decision, conn) => {
                if let Some(conn) = conn {
                    tokio::spawn(conn.quit());
                }
                Err(not_achieved(decision))
            }
        }
    }

    /// STARTTLS with the handshake `how` asks for, when the remote offers it, and a fresh
    /// EHLO after. A server that ends the session at STARTTLS, or fails the EHLO after TLS,
    /// is in trouble: not a TLS fact about it.
    async fn secure(
        &self,
        how: &Handshake,
        conn: PlainConnection,
        caps: Capabilities,
    ) -> Result<Secured, Broken> {
        if !caps.starttls {
            return Ok(Secured::Plain(conn, caps, NoTls::NoStarttls));
        }
        let t = &self.timeouts;
        let clock = std::time::Instant::now();
        let started = (conn.starttls(&self.tls, how, t.command, t.tls_handshake)).await;
        self.stats.handshake_time(clock.elapsed().as_secs_f64());
        let (mut conn, session) = match started {
            StartTls::Secured(conn, session) => (conn, session),
            StartTls::Refused(conn, reason) => return Ok(Secured::Plain(conn, caps, reason)),
            StartTls::Lost(reason) => return Ok(Secured::Lost(reason)),
            StartTls::Closed(reply) => return Err(Broken::Starttls(reply)),
        };
        // Nothing said before TLS counts after it: a fresh EHLO, fresh capabilities.
        match self.ehlo(&mut conn).await {
            Ok(caps) => Ok(Secured::Tls(conn, caps, session.into())),
            Err(broken) => Err(Broken::AfterTls(Box::new(broken))),
        }
    }

    /// The plain path: the same server (reusing `open` when there is one), or the relay.
    async fn plain_path(
        &self,
        path: &Fallback,
        open: Option<(PlainConnection, Capabilities)>,
        attempt: &Attempt<'_>,
        reason: NoTls,
    ) -> Result<Reached, AttemptFailure> {
        let plain = |(conn, caps): (PlainConnection, Capabilities), relay| Reached {
            conn: conn.into_any(),
            caps,
            tls: TlsOutcome::Plain(reason.clone()),
            relay,
            authentication: Authentication::Pkix,
            downgrade: false,
        };
        match path {
            Fallback::Direct => match open {
                Some(pair) => Ok(plain(pair, None)),
                None => Ok(plain(
                    self.greet(attempt.server, attempt.addr()).await?,
                    None,
                )),
            },
            Fallback::Relay(relay) => {
                if let Some((conn, _)) = open {
                    tokio::spawn(conn.quit());
                }
                let unknown = || Broken::RelayUnknown {
                    relay: relay.clone(),
                };
                let ip = (self.addresses(&relay.host).await.ok())
                    .and_then(|addrs| addrs.into_iter().next())
                    .ok_or_else(unknown)?;
                let relay_server = ServerId::new(&relay.host, ip);
                // A failure of the relay is not a fact about the MX: never cached under it.
                let pair = self
                    .greet(&relay_server, SocketAddr::new(ip, relay.port))
                    .await
                    .map_err(|why| Broken::Relay {
                        relay: relay.clone(),
                        why: Box::new(why),
                    })?;
                Ok(plain(pair, Some(relay.clone())))
            }
        }
    }

    /// Connects, reads the greeting and says EHLO (HELO when EHLO is refused).
    async fn greet(
        &self,
        server: &ServerId,
        addr: SocketAddr,
    ) -> Result<(PlainConnection, Capabilities), AttemptFailure> {
        let waiting = self.greetings.wait(addr).map_err(AttemptFailure::Busy)?;
        let mut conn = self.connect(server, addr).await?;
        self.read_greeting(&mut conn).await?;
        drop(waiting);
        let caps = self.ehlo(&mut conn).await?;
        Ok((conn, caps))
    }

    /// A connection through the dialer; what failed is the server's being unreachable.
    async fn connect(
        &self,
        server: &ServerId,
        addr: SocketAddr,
    ) -> Result<PlainConnection, AttemptFailure> {
        (self.dialer.connect(&server.name, addr).await).map_err(|error| {
            if error.is_local() {
                return AttemptFailure::Local(error);
            }
            let class = match error.is_timeout() {
                true => OutcomeClass::Timeout,
                false => OutcomeClass::ConnectFailed,
            };
            AttemptFailure::Unreachable { class, error }
        })
    }

    /// The server's greeting, which must be a 220.
    pub(crate) async fn read_greeting<T: Stream>(
        &self,
        conn: &mut Connection<T>,
    ) -> Result<Reply, Broken> {
        let greeting = (conn.read_reply(self.timeouts.greeting, "the greeting")).await?;
        if greeting.code != 220 {
            return Err(Broken::Greeting(greeting));
        }
        Ok(greeting)
    }

    /// EHLO, or HELO when EHLO is refused: what the server says it can do.
    pub(crate) async fn ehlo<T: Stream>(
        &self,
        conn: &mut Connection<T>,
    ) -> Result<Capabilities, Broken> {
        let timeout = self.timeouts.command;
        let ehlo = format!("EHLO {}", self.hostname);
        let reply = conn.command(&ehlo, timeout, "the reply to EHLO").await?;
        if reply.closes_connection() {
            return Err(Broken::Ehlo(reply));
        }
        if reply.is_positive() {
            return Ok(Capabilities::from_ehlo(&reply));
        }
        let helo = format!("HELO {}", self.hostname);
        let reply = conn.command(&helo, timeout, "the reply to HELO").await?;
        if reply.is_positive() && !reply.closes_connection() {
            Ok(Capabilities::default())
        } else {
            Err(Broken::EhloAndHelo(reply))
        }
    }
}

/// What a decision other than TLS, legacy TLS or plain means for the attempt.
fn not_achieved(decision: HostDecision) -> AttemptFailure {
    match decision {
        HostDecision::Refuse(refusal) => AttemptFailure::Refused(refusal),
        HostDecision::Skip(skip) => AttemptFailure::Skipped(skip),
        // TLS, the legacy stack or plain where the connection had something else: the
        // decision and the connection disagree, which a correct caller never sees.
        other => AttemptFailure::Refused(Refusal {
            under: None,
            reason: crate::router::decision::RefusalReason::NoTls(NoTls::HandshakeFailed(format!(
                "the connection is not what the decision asked: {other}"
            ))),
        }),
    }
}

/// The decision's plain path after TLS failed, and whether this host did TLS before.
struct Plain {
    reason: NoTls,
    path: Fallback,
    downgrade: bool,
}
