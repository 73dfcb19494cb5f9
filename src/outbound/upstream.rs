//! The remote side of one cut-through transaction, after the remote accepted MAIL FROM.
//!
//! [`Upstream`] owns the connection and offers the verbs the inbound session needs:
//! recipient, start data, body block, finish, reset, quit. The remote-reply discipline
//! lives here only: a `421` ends the connection and reaches the MTA as `451 4.4.2`; a reply
//! that the command cannot get, or one that nobody asked for, means the remote is out of
//! step, and the connection is dropped rather than trusted.

use std::fmt;

use crate::net::connection::{Connection, ExchangeError};
use crate::net::dns::ServerId;
use crate::outbound::pool::{Idle, Lineage, PoolKey};
use crate::outcome::TlsOutcome;
use crate::router::decision::{Authentication, Published};
use crate::rules::model::HostPort;
use crate::settings::Timeouts;
use crate::smtp::peek::Look;
use crate::smtp::{Capabilities, Mailbox, RcptParams, Reply};

/// The first recipient sent with MAIL FROM, and what came back for it.
pub type FirstReply = (Mailbox, Result<Reply, ExchangeError>);

/// What the log line, `ctl sessions` and the counters say about where a transaction went.
#[derive(Clone, Debug)]
pub struct RemoteFacts {
    /// The server the attempt was for: an MX host, or the smarthost.
    pub server: ServerId,
    /// The plain-path relay the message went through instead, when a rule's
    /// `fallback: { relay: ... }` was taken.
    pub relay: Option<HostPort>,
    pub tls: TlsOutcome,
    /// What judged the certificate of a rustls session (the PKIX chain, or DANE's TLSA
    /// records).
    pub authentication: Authentication,
    /// The server did TLS recently and this connection did not get it.
    pub downgrade: bool,
    /// The rule that applied to this server.
    pub rule: String,
    /// What the cache said of the server when its rule was chosen (a rule may match on
    /// it): a later recipient's rule is chosen from the same.
    pub cached_classes: Vec<crate::outcome::OutcomeClass>,
    /// What the domain of the recipient that opened the route publishes, as it bore on
    /// this server.
    pub published: Published,
    /// The sender's `TLS-Required: No` set aside what the domain publishes.
    pub policy_waived: bool,
    /// Attempts that failed before this one.
    pub earlier_failures: std::sync::Arc<Vec<crate::outbound::failure::Failed>>,
    /// The transaction went on a connection an earlier one had used.
    pub reused: bool,
}

impl fmt::Display for RemoteFacts {
    /// `mx[addr]`, or `mx[addr] via relay host:port`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.relay {
            None => write!(f, "{}", self.server),
            Some(relay) => write!(f, "{} via relay {relay}", self.server),
        }
    }
}

/// The remote's answer to a verb, as the MTA should hear it.
#[derive(Debug)]
pub enum Answer {
    /// The remote replied; the connection goes on.
    Reply(Reply),
    /// The connection is gone (a `421`, a drop, a timeout, a reply out of step): the MTA
    /// gets this, and nothing more can happen in this transaction.
    Lost(Reply),
}

impl Answer {
    pub fn reply(&self) -> &Reply {
        match self {
            Answer::Reply(reply) | Answer::Lost(reply) => reply,
        }
    }
}

pub struct Upstream {
    conn: Connection,
    caps: Capabilities,
    facts: RemoteFacts,
    timeouts: Timeouts,
    /// Where the connection may go back to the pool, `None` when it never may (a relay, an
    /// authenticated session, the legacy stack).
    pool_key: Option<PoolKey>,
    lineage: Lineage,
    stage: Stage,
    /// The reply to the first recipient, sent with MAIL FROM (PIPELINING).
    first_reply: Option<FirstReply>,
}

/// Where the remote stands in the transaction, for whether the connection can be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// MAIL FROM (and maybe recipients) accepted: reusable after RSET.
    Mail,
    /// Inside the message text: the remote takes every byte as part of it.
    Data,
    /// The remote accepted the message: reusable as it is.
    Done,
    /// An error, a 4xx, a 421, a reply out of step: never reused.
    Spoiled,
}

impl Upstream {
    pub(crate) fn new(
        conn: Connection,
        caps: Capabilities,
        facts: RemoteFacts,
        timeouts: Timeouts,
    ) -> Upstream {
        Upstream {
            conn,
            caps,
            facts,
            timeouts,
            pool_key: None,
            lineage: Lineage::fresh(),
            stage: Stage::Mail,
            first_reply: None,
        }
    }

    /// The first recipient already went with MAIL FROM; this came back for it.
    pub(crate) fn with_first_reply(mut self, first: FirstReply) -> Upstream {
        self.first_reply = Some(first);
        self
    }

    /// The connection may go back to the pool under `key` when the transaction ends well.
    pub(crate) fn poolable(mut self, key: Option<PoolKey>, lineage: Lineage) -> Upstream {
        self.facts.reused = lineage.reused;
        self.pool_key = key;
        self.lineage = lineage;
        self
    }

    /// The connection, ready for another transaction, when this one left it in a known
    /// state and nothing unasked-for has arrived; otherwise the upstream back, to be closed.
    pub(crate) fn into_idle(self) -> Result<(PoolKey, Idle), Box<Upstream>> {
        let needs_rset = match self.stage {
            Stage::Done => false,
            Stage::Mail => true,
            Stage::Data | Stage::Spoiled => return Err(Box::new(self)),
        };
        if self.conn.is_closing() || self.conn.has_unsolicited() {
            return Err(Box::new(self));
        }
        let Some(key) = self.pool_key else {
            return Err(Box::new(self));
        };
        let idle = Idle::new(
            self.conn,
            self.caps,
            self.facts.tls,
            needs_rset,
            self.lineage,
        );
        Ok((key, idle))
    }

    /// What the connection has been through, the transactions before this one included.
    pub(crate) fn lineage(&self) -> &Lineage {
        &self.lineage
    }

    pub fn facts(&self) -> &RemoteFacts {
        &self.facts
    }

    /// What the remote announced in its (last) EHLO.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// `RCPT TO`, with the DSN parameters where the remote offers DSN: the remote's reply
    /// (already read when it went pipelined with MAIL FROM).
    pub async fn recipient(&mut self, recipient: &Mailbox, params: &RcptParams) -> Answer {
        let sent = match self.first_reply.take() {
            Some((sent_for, reply)) if sent_for == *recipient => reply,
            // Another recipient came first: its reply is not for this one. Never happens
            // as the session asks, and must not be mistaken for it if it did.
            Some(_) => Err(ExchangeError::OutOfStep(
                "the reply to RCPT TO",
                "a reply for another recipient".into(),
            )),
            None => {
                let line = format!("RCPT TO:<{recipient}>{}", params.to_wire(&self.caps));
                (self.conn)
                    .exchange(
                        &line,
                        &[250, 251],
                        self.timeouts.command,
                        "the reply to RCPT TO",
                    )
                    .await
            }
        };
        let answer = self.answer(sent);
        if answer.reply().is_transient() {
            self.stage = Stage::Spoiled;
        }
        answer
    }

    /// `DATA`: `Reply` with the remote's 354 means the body may follow; any other reply
    /// ends the transaction.
    pub async fn start_data(&mut self) -> Answer {
        let sent = (self.conn)
            .exchange(
                "DATA",
                &[354],
                self.timeouts.data_start,
                "the reply to DATA",
            )
            .await;
        self.stage = Stage::Spoiled;
        match self.answer(sent) {
            Answer::Lost(reply) => Answer::Lost(reply),
            Answer::Reply(reply) if reply.code == 354 => {
                self.stage = Stage::Data;
                Answer::Reply(reply)
            }
            // Not going into the message text: the transaction is over at the remote.
            Answer::Reply(reply) => Answer::Lost(reply),
        }
    }

    /// One block of the (already stuffed, CRLF-only) message text.
    pub async fn body_block(&mut self, block: &[u8]) -> Result<(), ExchangeError> {
        (self.conn)
            .write(block, self.timeouts.data_block, "sending the message")
            .await
    }

    /// The last bytes of the message text (`tail`, maybe none) with the final dot, in one
    /// write, and the remote's verdict on the message. A reply that came during the body
    /// is out of sequence: it must not be taken for the answer to the dot, so the kernel
    /// is asked, not only what the runtime has seen (nothing after the verdict could tell).
    pub async fn finish(&mut self, mut tail: Vec<u8>) -> Reply {
        let t = &self.timeouts;
        let what = "the reply to the message";
        let conn = &mut self.conn;
        let verdict = async {
            conn.expect_nothing_more_in(Look::Kernel, "the message text")
                .await?;
            tail.extend_from_slice(b".\r\n");
            conn.write(&tail, t.data_block, "sending the end of the message")
                .await?;
            let reply = conn.read_reply(t.data_end, what).await?;
            conn.expect_due(&reply, &[250], what)?;
            Ok::<_, ExchangeError>(reply)
        };
        let verdict = verdict.await;
        self.stage = match &verdict {
            Ok(reply) if reply.code == 250 => Stage::Done,
            _ => Stage::Spoiled,
        };
        match verdict {
            Ok(reply) => relayable(&reply),
            Err(e) => {
                self.conn.give_up();
                Reply::new(
                    451,
                    "4.4.2",
                    format!("no 250 from {} for the message: {e}", self.facts.server),
                )
            }
        }
    }

    /// The MTA left the message text unfinished: the remote is inside it, so no command
    /// may follow (QUIT would become part of the message). The connection is only closed.
    pub fn abandon(&mut self) {
        self.stage = Stage::Spoiled;
        self.conn.give_up();
    }

    /// Says goodbye politely, without waiting long for the answer; inside the message text
    /// only closes the connection: a QUIT there would be part of the message.
    pub async fn quit(mut self) {
        if self.stage == Stage::Data {
            self.abandon();
        }
        self.conn.quit().await;
    }

    fn answer(&mut self, sent: Result<Reply, ExchangeError>) -> Answer {
        match sent {
            Ok(reply) if reply.closes_connection() => {
                self.stage = Stage::Spoiled;
                Answer::Lost(relayable(&reply))
            }
            Ok(reply) => Answer::Reply(reply),
            Err(e) => {
                self.stage = Stage::Spoiled;
                self.conn.give_up();
                let why = format!("lost the connection to {}: {e}", self.facts.server);
                Answer::Lost(Reply::new(451, "4.4.2", why))
            }
        }
    }
}

/// A remote's reply as the MTA should hear it. A 421 or 221 from the remote closes the remote
/// connection, not the MTA's session, so the MTA gets a 451 4.4.2 that quotes it instead.
pub fn relayable(reply: &Reply) -> Reply {
    if reply.closes_connection() {
        return Reply::new(
            451,
            "4.4.2",
            format!("remote closed the connection: {reply}"),
        );
    }
    reply.clone()
}
