//! One MAIL FROM and what followed it: its recipients, where it stands with its remote,
//! and how it ended.

use std::collections::HashMap;
use std::sync::Arc;

use crate::outbound::route::OpenRoute;
use crate::outbound::upstream::RemoteFacts;
use crate::router::Plan;
use crate::rules::RuleSet;
use crate::smtp::data::BodyFilter;
use crate::smtp::{MailParams, Mailbox, RcptParams, Reply};

/// One MAIL FROM and what followed it.
pub(super) struct Transaction {
    pub(super) sender: Option<Mailbox>,
    pub(super) params: MailParams,
    pub(super) remote: Remote,
    pub(super) accepted: Vec<Mailbox>,
    /// The first recipients that got a 4xx or 5xx, with it: the log line says why they were
    /// not taken. At most REFUSED_SHOWN; `refused_more` counts the rest.
    pub(super) refused: Vec<(Mailbox, Reply)>,
    pub(super) refused_more: usize,
    /// Some recipient got a 4xx: the transaction counts as a deferral.
    pub(super) deferred_any: bool,
    pub(super) rcpt_count: usize,
    /// Recipient domains that could not be routed in this transaction, and why.
    pub(super) failed_domains: HashMap<String, Reply>,
    pub(super) started: std::time::Instant,
    /// The rules in force at MAIL FROM; a reload does not change this transaction.
    pub(super) rules: Arc<RuleSet>,
    /// What the message text was, as far as it was read.
    pub(super) text: Option<TextFacts>,
    /// Each recipient domain's replies so far, for the ledger.
    pub(super) verdicts: Vec<DomainVerdict>,
}

/// What the log line says of a message text: its size and Message-ID, to match the line
/// with the MTA's own log.
#[derive(Debug)]
pub(super) struct TextFacts {
    /// Octets read (and sent, where it was), as they go on the wire.
    pub(super) size: u64,
    pub(super) message_id: Option<String>,
}

/// What the transaction did for one recipient domain so far, for the ledger (see `ledger`).
#[derive(Debug)]
pub(super) struct DomainVerdict {
    pub(super) domain: String,
    /// Some recipient of the domain got a 2xx.
    pub(super) taken: bool,
    /// Some recipient got a 4xx that was not "send it in another transaction".
    pub(super) deferred: bool,
    /// Some recipient got a 5xx.
    pub(super) refused: bool,
    /// Why the domain got no route, when it got none.
    pub(super) failure: Option<crate::ledger::Failure>,
}

/// Where the transaction stands with its remote.
pub(super) enum Remote {
    /// No recipient has reached a remote yet.
    None,
    /// Set by the first recipient that reached a remote.
    Open(Box<OpenRoute>),
    /// The first recipient waits for the message's `TLS-Required: No`.
    Held(Box<Held>),
    /// The remote was lost, or ended the transaction: every later recipient and the DATA
    /// get `reply`. `facts` says where it had gone, for the log line.
    Lost {
        facts: Box<RemoteFacts>,
        reply: Reply,
    },
}

impl Remote {
    pub(super) fn facts(&self) -> Option<&RemoteFacts> {
        match self {
            Remote::None | Remote::Held(_) => None,
            Remote::Open(route) => Some(route.upstream.facts()),
            Remote::Lost { facts, .. } => Some(facts),
        }
    }
}

/// The transaction's first recipient, waiting for the message's `TLS-Required: No`
/// (see `held`).
pub(super) struct Held {
    pub(super) recipient: Mailbox,
    pub(super) params: RcptParams,
    pub(super) plan: Plan,
    /// What the MTA is told when the message does not waive the policy.
    pub(super) refusal: Reply,
}

/// How a transaction ended, for its log line and the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
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
    /// A held recipient's message did not waive its domain's policy (or no route could be
    /// had when it did): the MTA got the refusal after the text.
    NotWaived,
    /// The MTA ended it without a message: RSET, a new EHLO or HELO, or the session's end.
    Rset,
    Ehlo,
    Helo,
    SessionClosed,
}

impl End {
    pub(super) fn label(self) -> &'static str {
        match self {
            End::Answered => "delivered",
            End::MessageFailed => "message failed",
            End::DataRefused => "remote refused DATA",
            End::NoData => "no data",
            End::NotWaived => "held recipient not delivered",
            End::PipeliningViolation => "pipelining violation",
            End::ClientGone => "client gone",
            End::Rset => "RSET",
            End::Ehlo => "EHLO",
            End::Helo => "HELO",
            End::SessionClosed => "session closed",
        }
    }
}

impl Transaction {
    /// Takes what `filter` has read of the message text so far.
    pub(super) fn read_text(&mut self, filter: &BodyFilter) {
        self.text = Some(TextFacts {
            size: filter.size(),
            message_id: filter.message_id(),
        });
    }

    /// The remote is gone: every later recipient and the DATA get this reply.
    pub(super) fn lose(&mut self, reply: Reply) -> Reply {
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
pub(super) const REFUSED_SHOWN: usize = 20;
