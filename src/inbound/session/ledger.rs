//! What a transaction tells the per-domain ledger: for each recipient domain, one message
//! delivered by its route, deferred or refused, counted as the transaction's log line and
//! the counters count it.

use crate::inbound::session::transaction::{DomainVerdict, End, Transaction};
use crate::ledger::{Failure, Ledger, Message, Route};
use crate::outcome::{TlsOutcome, TlsSession, Verification};
use crate::smtp::{Mailbox, Reply};
use crate::stats::Stats;

impl Transaction {
    /// A recipient's reply; `split`: a 452 4.5.3, which only sends it to another
    /// transaction and says nothing of its domain.
    /// A recipient refused without a failure of its own (the remote's RCPT reply) has the
    /// reply as its domain's failure, at the server the transaction had reached.
    pub(super) fn note_recipient(
        &mut self,
        recipient: &Mailbox,
        reply: &Reply,
        (split, now): (bool, u64),
    ) {
        if split {
            return;
        }
        // Only a refusal names the server: a taken recipient costs no copy of its name.
        let server = (!reply.is_positive())
            .then(|| self.remote.facts().map(|f| f.server.name.clone()))
            .flatten();
        let verdict = self.verdict(recipient.routing_domain());
        verdict.taken |= reply.is_positive();
        verdict.deferred |= reply.is_transient();
        verdict.refused |= reply.is_permanent();
        if !reply.is_positive() && verdict.failure.is_none() {
            verdict.failure = Some(Failure {
                at: now,
                host: server,
                class: None,
                reason: format!("the recipient was answered {reply}"),
            });
        }
    }

    /// Why a recipient's domain got no route.
    pub(super) fn note_failure(&mut self, domain: &str, failure: Option<Failure>) {
        if failure.is_some() {
            self.verdict(domain).failure = failure;
        }
    }

    fn verdict(&mut self, domain: &str) -> &mut DomainVerdict {
        let at = match self.verdicts.iter().position(|v| v.domain == domain) {
            Some(at) => at,
            None => {
                self.verdicts.push(DomainVerdict {
                    domain: domain.to_string(),
                    taken: false,
                    deferred: false,
                    refused: false,
                    failure: None,
                });
                self.verdicts.len() - 1
            }
        };
        &mut self.verdicts[at]
    }
}

/// Counts the transaction's message once for each of its recipient domains: by its route
/// when the remote took it, deferred or refused when it or every recipient of the domain
/// got a 4xx or 5xx. A transaction the MTA left without a verdict counts for nothing.
pub(super) fn record(
    (ledger, stats): (&Ledger, &Stats),
    now: u64,
    tx: &Transaction,
    reply: Option<&Reply>,
    end: End,
) {
    let facts = tx.remote.facts();
    // The verdict the message text got, for the domains whose recipients were taken.
    let message = match (end, reply) {
        (End::Answered, Some(r)) if r.is_positive() => facts.map(|f| route_of(&f.tls)),
        (End::Answered | End::DataRefused | End::MessageFailed | End::NotWaived, Some(r))
            if r.is_transient() =>
        {
            Some(Route::Deferred)
        }
        (End::Answered | End::DataRefused | End::MessageFailed | End::NotWaived, Some(r))
            if r.is_permanent() =>
        {
            Some(Route::Refused)
        }
        _ => None,
    };
    for verdict in &tx.verdicts {
        let route = match message.filter(|_| verdict.taken) {
            Some(route) => route,
            None if verdict.deferred => Route::Deferred,
            None if verdict.refused => Route::Refused,
            None => continue,
        };
        // What the server the message reached said of it, for the domains that rode there.
        let reached = facts.filter(|_| verdict.taken);
        let failure = verdict.failure.clone().or_else(|| match (route, reached) {
            // Why it went in plain, or why the certificate did not verify.
            (Route::Plain | Route::TlsUnverified, Some(f)) => match &f.tls {
                TlsOutcome::Plain(reason) => Some(Failure {
                    at: now,
                    host: Some(f.server.name.clone()),
                    class: reason.class(),
                    reason: reason.to_string(),
                }),
                TlsOutcome::Encrypted(TlsSession {
                    verification: Verification::Failed(problem),
                    ..
                }) => Some(Failure {
                    at: now,
                    host: Some(f.server.name.clone()),
                    class: Some(problem.class()),
                    reason: problem.to_string(),
                }),
                _ => None,
            },
            (Route::Deferred | Route::Refused, Some(f)) => Some(Failure {
                at: now,
                host: Some(f.server.name.clone()),
                class: None,
                reason: reply.map_or_else(String::new, |r| format!("the server answered {r}")),
            }),
            _ => reached
                .and_then(|f| f.earlier_failures.last())
                .map(|failed| failed.to_ledger(now)),
        });
        let host = (reached.map(|f| f.server.name.as_str()))
            .or_else(|| failure.as_ref().and_then(|f| f.host.as_deref()));
        match route {
            Route::Deferred => {
                stats.not_delivered("deferred", failure.as_ref().and_then(|f| f.class))
            }
            Route::Refused => {
                stats.not_delivered("refused", failure.as_ref().and_then(|f| f.class))
            }
            _ => {}
        }
        let tls_version = reached.and_then(|f| f.tls.parameters()).map(|(v, _, _)| v);
        ledger.record(
            now,
            &verdict.domain,
            &Message {
                route,
                tls_version: tls_version.filter(|_| route.is_delivery()),
                host,
                policy: reached.map(|f| f.published.name()),
                rule: reached.map(|f| f.rule.as_str()),
                failure: failure.as_ref(),
            },
        );
    }
}

fn route_of(tls: &TlsOutcome) -> Route {
    match tls {
        TlsOutcome::Encrypted(session) if session.verification == Verification::Verified => {
            Route::TlsVerified
        }
        TlsOutcome::Encrypted(_) => Route::TlsUnverified,
        TlsOutcome::Legacy(_) => Route::TlsLegacy,
        TlsOutcome::Plain(_) => Route::Plain,
    }
}
