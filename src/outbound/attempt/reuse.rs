//! Pooled connections: where a new one may be kept, and whether an idle one fits an
//! attempt (the decision must admit its TLS as the attempt's domain needs it).

use super::{Attempt, Reached};
use crate::outbound::Outbound;
use crate::outbound::pool::{Idle, Lineage, PoolKey};
use crate::outbound::upstream::FirstReply;
use crate::outcome::{NoTls, TlsOutcome};
use crate::router::decision::{Authentication, Connected, HostDecision, Known, Published, decide};
use crate::rules::Route;

impl Outbound {
    /// Where a connection this attempt made could be pooled: never one to a relay, one that
    /// authenticated (its credentials are not part of the key), or a legacy-stack session.
    pub(crate) fn pool_key(&self, attempt: &Attempt<'_>, reached: &Reached) -> Option<PoolKey> {
        let authenticated = matches!(attempt.route, Route::Smarthost { auth: Some(_), .. });
        // A DANE session is judged by its TLSA records, which the pool does not keep.
        if !self.pool.config.enabled
            || authenticated
            || reached.relay.is_some()
            || matches!(reached.tls, TlsOutcome::Legacy(_))
            || matches!(attempt.published, Published::Dane(_))
        {
            return None;
        }
        Some(PoolKey {
            addr: attempt.addr(),
            name: attempt.server.name.clone(),
            ehlo: self.hostname.clone(),
        })
    }

    /// What a pooled connection's TLS is worth to this attempt: `Some` with the outcome to
    /// deliver under (and whether it is a downgrade) when the decision, asked as if the
    /// connection had just been made (the memory of TLS included), would have chosen it;
    /// `None` when it has less (or other).
    fn fitting(&self, attempt: &Attempt<'_>, pooled: &TlsOutcome) -> Option<(TlsOutcome, bool)> {
        if matches!(attempt.decision, HostDecision::Tls(terms) if terms.implicit) {
            return None;
        }
        let server = attempt.server;
        let downgrade = (pooled.class())
            .is_some_and(|class| self.cache.is_downgrade(&server.name, server.addr, class));
        let found = Known::Found {
            outcome: pooled,
            downgrade,
        };
        let found = decide(attempt.rule, found, attempt.published, attempt.demand);
        let conn = Connected {
            tls: pooled,
            authentication: Authentication::Pkix,
            relay: None,
        };
        let fits = match (&attempt.decision, pooled) {
            // The server offered no STARTTLS moments ago: what a fresh EHLO would most
            // likely find, and the decision says whether plain is allowed after it. Not from
            // a host that did TLS recently: every message tries TLS with it again.
            (HostDecision::Tls(_), TlsOutcome::Plain(NoTls::NoStarttls)) => {
                !downgrade && found.admits(&conn)
            }
            (before, _) => before.admits(&conn) && found.admits(&conn),
        };
        if !fits {
            return None;
        }
        // A plain connection is delivered under the decision's reason for plain.
        let outcome = match (&attempt.decision, &found) {
            _ if pooled.is_encrypted() => pooled.clone(),
            (HostDecision::Plain { reason, .. }, _) | (_, HostDecision::Plain { reason, .. }) => {
                TlsOutcome::Plain(reason.clone())
            }
            _ => pooled.clone(),
        };
        Some((outcome, downgrade))
    }

    /// A pooled connection for this attempt, up to the remote's acceptance of MAIL FROM.
    /// One that turns out dead (or answers anything but 250) is closed and the next is
    /// tried; `None` when none is left, and the attempt connects anew: nothing was
    /// committed, so the MTA never hears of it.
    pub(crate) async fn reuse(
        &self,
        attempt: &Attempt<'_>,
    ) -> Option<(Reached, Lineage, Option<FirstReply>)> {
        if !self.pool.config.enabled
            || matches!(attempt.route, Route::Smarthost { auth: Some(_), .. })
            || matches!(attempt.published, Published::Dane(_))
        {
            return None;
        }
        let key = PoolKey {
            addr: attempt.addr(),
            name: attempt.server.name.clone(),
            ehlo: self.hostname.clone(),
        };
        loop {
            // What made the taken connection fit, kept rather than worked out again.
            let mut fitted = None;
            let fits = |idle: &Idle| {
                let Some(fit) = self.fitting(attempt, &idle.tls) else {
                    return false;
                };
                let Ok(command) = attempt.envelope.mail_from(&idle.caps) else {
                    return false;
                };
                fitted = Some((fit, command));
                true
            };
            let taken = self.pool.take(&key, fits);
            self.stats.pool_idle.set(self.pool.len() as i64);
            let mut idle = taken?;
            let ((tls, downgrade), command) = fitted?;
            let timeout = self.timeouts.command;
            let conn = &mut idle.conn;
            let mut ready = true;
            if idle.needs_rset {
                ready = matches!(
                    conn.exchange("RSET", &[250], timeout, "the reply to RSET").await,
                    Ok(reply) if reply.code == 250
                );
            }
            if ready {
                let accepted = self
                    .mail_from(conn, &idle.caps, &command, attempt.envelope.first)
                    .await;
                let why = match accepted {
                    Ok((reply, first)) if reply.code == 250 => {
                        self.stats.pool_reuses.inc();
                        let lineage = Lineage {
                            opened: idle.lineage.opened,
                            messages: idle.lineage.messages + 1,
                            reused: true,
                        };
                        let reached = Reached {
                            conn: idle.conn,
                            caps: idle.caps,
                            tls,
                            relay: None,
                            authentication: Authentication::Pkix,
                            downgrade,
                        };
                        return Some((reached, lineage, first));
                    }
                    Ok((reply, _)) => reply.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::debug!(server = %attempt.server, "pooled connection not usable ({why}); connecting anew");
            }
            self.stats.pool_dead.inc();
            tokio::spawn(idle.conn.quit());
        }
    }
}
