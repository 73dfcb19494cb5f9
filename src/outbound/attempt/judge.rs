//! What the decision makes of what an attempt found, and what is kept of it: the cache's
//! memory of the server, the warning and count of a downgrade, the domain's TLS-RPT count.

use super::Attempt;
use crate::cache::Observation;
use crate::outbound::Outbound;
use crate::outcome::{NoTls, TlsOutcome, TlsSession, Verification};
use crate::policy::tlsrpt::{PolicyFacts, SessionResult, SessionSite};
use crate::router::decision::{
    DaneState, HostDecision, Known, Published, decide, is_fact_about_server,
};

impl Outbound {
    /// What the decision makes of what an attempt found, with the memory of TLS asked; a
    /// fact about the server is remembered, and every outcome of `rustls` counted for the
    /// domain's report. Also whether it was a downgrade.
    pub(super) fn judge(
        &self,
        attempt: &Attempt<'_>,
        outcome: &TlsOutcome,
        report: bool,
    ) -> (HostDecision, bool) {
        let fact = is_fact_about_server(attempt.rule, outcome);
        let downgrade = fact && self.is_downgrade(attempt, outcome);
        let found = Known::Found { outcome, downgrade };
        let decision = decide(attempt.rule, found, attempt.published, attempt.demand);
        if fact {
            self.remember(attempt, outcome, &decision);
        }
        if report {
            self.report(attempt, outcome);
        }
        (decision, downgrade)
    }

    /// A server that did TLS before and now does not may have it stripped on the way:
    /// always a warning (the decision says whether it defers).
    fn is_downgrade(&self, attempt: &Attempt<'_>, outcome: &TlsOutcome) -> bool {
        let (TlsOutcome::Plain(reason), Some(class)) = (outcome, outcome.class()) else {
            return false;
        };
        let server = attempt.server;
        if !self.cache.is_downgrade(&server.name, server.addr, class) {
            return false;
        }
        self.stats.downgrades.inc();
        tracing::warn!(
            event = "downgrade",
            server = %server,
            rule = %attempt.rule.name,
            downgrade = %class,
            "downgrade: this host did TLS before and now fails it ({class}: {reason})"
        );
        true
    }

    /// Writes what the TLS attempt found to the cache. A session whose certificate failed
    /// a rule that requires it is remembered as that failure, as the rule saw it.
    fn remember(&self, attempt: &Attempt<'_>, outcome: &TlsOutcome, decision: &HostDecision) {
        let refused_certificate = match (outcome, decision) {
            (TlsOutcome::Encrypted(session), decision)
                if !matches!(decision, HostDecision::Tls(_)) =>
            {
                match &session.verification {
                    Verification::Failed(problem) => {
                        Some(TlsOutcome::Plain(NoTls::CertRejected(problem.clone())))
                    }
                    Verification::Verified => None,
                }
            }
            _ => None,
        };
        let outcome = refused_certificate.as_ref().unwrap_or(outcome);
        if let Some(observation) = Observation::from_outcome(outcome) {
            let server = attempt.server;
            self.cache
                .record(&server.name, server.addr, attempt.domain, observation);
        }
    }

    /// Counts the attempt for the domain's TLS-RPT report under the policy that was
    /// applied: DANE's TLSA records where DANE applies (before MTA-STS), else the MTA-STS
    /// policy; nothing for a domain with neither.
    fn report(&self, attempt: &Attempt<'_>, outcome: &TlsOutcome) {
        let facts = match (attempt.published, attempt.policy) {
            (Published::Dane(_), _) => {
                PolicyFacts::tlsa(attempt.tlsa_records, &attempt.server.name)
            }
            (_, Some(policy)) => PolicyFacts::sts(policy),
            (_, None) => return,
        };
        // An unverified session is judged by why its certificate failed.
        let class = match outcome {
            TlsOutcome::Encrypted(TlsSession {
                verification: Verification::Failed(problem),
                ..
            }) => Some(problem.class()),
            other => other.class(),
        };
        let result = match attempt.published {
            // TLS was had, but none of the host's TLSA records could be used (RFC 8460
            // 4.3.2.1): the policy itself is in error.
            Published::Dane(DaneState::Unusable) if outcome.is_encrypted() => {
                Some(SessionResult::tlsa_invalid())
            }
            _ => class.and_then(SessionResult::from_class),
        };
        if let Some(result) = result {
            let site = SessionSite::at(attempt.server);
            (self.tls_reports).record(attempt.domain, &facts, &result, &site);
        }
    }
}
