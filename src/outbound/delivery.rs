//! Carrying out a plan: try each next-hop server and address in turn until one accepts
//! MAIL FROM. For each, [`decide`] says what to do (TLS, plain and on which path, refuse,
//! skip) from what the cache knows and what the domain publishes there; the conversation
//! with the server is [`crate::outbound::attempt`]'s. This module only chooses servers, and
//! says why none took the transaction.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::cache::Observation;
use crate::net::connection::PlainConnection;
use crate::net::dns::{AddressError, Dnssec, RouteError, ServerId, literal_address};
use crate::outbound::Outbound;
use crate::outbound::attempt::{Attempt, Envelope, Greeted, is_connected};
use crate::outbound::failure::{AttemptFailure, AuthFailure, Failed, Spent, unsupported_reply};
use crate::outbound::hop::{Dane, NextHop, no_mx_name, published};
use crate::outbound::pool::Lineage;
use crate::outbound::upstream::{RemoteFacts, Upstream, relayable};
use crate::policy::mta_sts::{Mode, PolicyLookup};
use crate::policy::tlsrpt::{PolicyFacts, SessionResult, SessionSite};
use crate::router::Plan;
use crate::router::decision::{DaneState, HostDecision, Known, Published, decide, overridden};
use crate::smtp::{Capabilities, Reply};

/// Why no remote transaction could be opened.
#[derive(Debug)]
pub enum OpenError {
    Route(RouteError),
    /// The remote answered MAIL FROM with this; it goes to the MTA as it is.
    Rejected {
        reply: Reply,
        server: ServerId,
    },
    /// The smart host's AUTH did not go through: delivery waits until an admin sees to it.
    Auth(AuthFailure),
    Unreachable {
        domain: String,
        failures: Vec<Failed>,
    },
    TlsNotAchieved {
        rule: String,
        failures: Vec<Failed>,
    },
    /// Every server failed for a reason of this host's own: nothing was tried there.
    Local {
        failures: Vec<Failed>,
    },
    /// The sender's REQUIRETLS could not be kept with any server, and no failure was
    /// one that may pass: the message is refused for good (RFC 8689 5).
    RequireTlsRefused {
        failures: Vec<Failed>,
    },
}

impl OpenError {
    pub fn reply(&self) -> Reply {
        match self {
            OpenError::Route(e) => e.reply(),
            OpenError::Rejected { reply, .. } => relayable(reply),
            OpenError::Auth(failure) => failure.reply(),
            OpenError::Unreachable { domain, failures } => Reply::new(
                451,
                "4.4.1",
                format!("no MX of {domain} reachable: {}", list(failures)),
            ),
            OpenError::TlsNotAchieved { rule, failures } => {
                Reply::new(451, "4.7.5", format!("rule {rule:?}: {}", list(failures)))
            }
            OpenError::Local { failures } => Reply::new(
                451,
                "4.3.0",
                format!("local error, nothing was sent: {}", list(failures)),
            ),
            OpenError::RequireTlsRefused { failures } => Reply::new(
                550,
                "5.7.30",
                format!("REQUIRETLS cannot be kept: {}", list(failures)),
            ),
        }
    }
}

/// The failures, one after another (the reply keeps itself within one line).
fn list(failures: &[Failed]) -> String {
    let lines: Vec<String> = failures.iter().map(ToString::to_string).collect();
    lines.join("; ")
}

impl Outbound {
    /// Opens a remote transaction: the first server and address that accepts MAIL FROM
    /// wins. `policy` is what the domain publishes (MTA-STS); it does not bind a smarthost
    /// route (RFC 8461 3.4). `greeted` is the connection a transparent session made at
    /// accept: the first attempt to that server goes on it, its STARTTLS or plain path
    /// still to come.
    pub(crate) async fn open(
        &self,
        plan: &Plan,
        domain: &str,
        hop: &NextHop,
        policy: &PolicyLookup,
        greeted: Option<Box<Greeted>>,
        envelope: &Envelope<'_>,
    ) -> Result<Upstream, OpenError> {
        let greeted = Mutex::new(greeted.map(|g| (g.conn, g.caps)));
        let opened = (self.open_with(plan, domain, hop, policy, &greeted, envelope)).await;
        if let Some((conn, _)) = greeted.lock().ok().and_then(|mut slot| slot.take()) {
            tokio::spawn(conn.quit());
        }
        opened
    }

    async fn open_with(
        &self,
        plan: &Plan,
        domain: &str,
        hop: &NextHop,
        policy: &PolicyLookup,
        greeted: &Mutex<Option<(PlainConnection, Capabilities)>>,
        envelope: &Envelope<'_>,
    ) -> Result<Upstream, OpenError> {
        if let (true, PolicyLookup::Unavailable(error)) = (hop.is_domain_delivery(), policy) {
            // Delivered as if there were none (RFC 8461 5.1), and reported.
            let result = SessionResult::from_policy_error(error);
            (self.tls_reports).record(
                domain,
                &PolicyFacts::NoPolicyFound,
                &result,
                &SessionSite::default(),
            );
        }
        let policy = match hop.is_domain_delivery() {
            true => policy.policy().map(AsRef::as_ref),
            false => None,
        };
        // Each server with whether the MX answer that named it was DNSSEC-secure: the one
        // MX lookup says so, and DANE asks for no other.
        let servers: Vec<(String, u16, bool)> = match hop {
            NextHop::Mx(hosts) => hosts
                .iter()
                .map(|h| (h.name.clone(), self.port, h.dnssec == Dnssec::Secure))
                .collect(),
            NextHop::Smarthost(server) => vec![(server.host.clone(), server.port, false)],
            NextHop::OriginalDestination {
                addr,
                mx,
                mx_dnssec,
            } => {
                let secure = mx.is_some() && *mx_dnssec == Dnssec::Secure;
                let name = mx.clone().unwrap_or_else(|| addr.ip().to_string());
                vec![(name, addr.port(), secure)]
            }
        };
        let mut failures = Vec::new();
        let mut tls_failures = Vec::new();
        // A domain with many dead MX hosts costs its own messages, not everyone's sessions.
        let budget = self.budget;
        let deadline = tokio::time::Instant::now() + self.timeouts.route;
        let mut servers = servers;
        let mut spent = None;
        if servers.len() > budget.mx_hosts {
            let left = servers.len() - budget.mx_hosts;
            servers.truncate(budget.mx_hosts);
            let limit = budget.mx_hosts;
            spent = Some(Spent::MxHosts { left, limit });
        }
        let mut addresses_tried = 0;
        // The last refusal for a missing extension, and how many servers gave one.
        let (mut unsupported, mut unsupported_count) = (None, 0);
        let mut tls_rule = plan.base_rule().name.clone();
        'servers: for (host, port, mx_secure) in servers {
            if tokio::time::Instant::now() >= deadline {
                let secs = self.timeouts.route.as_secs();
                spent = Some(Spent::Time { secs });
                break;
            }
            let mut dane_unknown = None;
            let addrs = match hop {
                // Only the address the MTA chose; DANE applies when it is a secure answer
                // for the MX name it was matched to.
                NextHop::OriginalDestination { addr, .. } => {
                    let found = match literal_address(&host) {
                        Some(ip) => Ok((vec![ip], Dnssec::Insecure)),
                        None => self.resolver.addresses_like(&host, addr.ip()).await,
                    };
                    let dnssec = match found {
                        Ok((found, dnssec)) if found.contains(&addr.ip()) => dnssec,
                        // Under a secure MX answer whether DANE applies cannot be known:
                        // the lookup that named the host moments ago had the address.
                        Err(AddressError::Temporary(e) | AddressError::Local(e)) if mx_secure => {
                            dane_unknown = Some(e);
                            Dnssec::Insecure
                        }
                        Ok(_) | Err(AddressError::NotFound) if mx_secure => {
                            dane_unknown = Some(format!("{host} no longer has {}", addr.ip()));
                            Dnssec::Insecure
                        }
                        _ => Dnssec::Insecure,
                    };
                    Ok((vec![addr.ip()], dnssec))
                }
                _ => self.addresses_checked(&host).await,
            };
            let (addrs, addr_dnssec) = match addrs {
                Ok(found) => found,
                Err(error) => {
                    if let AddressError::Local(cause) = &error {
                        self.stats.local_errors.inc();
                        tracing::warn!(event = "local_error", host, error = %cause, "address of {host} not looked up for a reason of this host's own (nothing cached): {cause}");
                    }
                    failures.push(Failed::Addresses { host, error });
                    continue;
                }
            };
            let Dane {
                published: dane,
                usable: tlsa,
                presentation: tlsa_records,
            } = if let Some(why) = dane_unknown.take() {
                tracing::warn!(
                    event = "dane.unknown",
                    lookup = "address",
                    name = host,
                    "DANE: the address lookup failed ({why}); nothing is sent to this host until it can be had"
                );
                Dane {
                    published: Some(Published::Dane(DaneState::Bogus)),
                    ..Dane::default()
                }
            } else if mx_secure && addr_dnssec == Dnssec::Secure && !envelope.policy_waived {
                self.dane(&host, port).await
            } else {
                Dane::default()
            };
            let demand = hop.demand(envelope.params.requiretls, &host);
            for ip in addrs {
                if addresses_tried >= budget.addresses {
                    let limit = budget.addresses;
                    spent = Some(Spent::Addresses { limit });
                    break 'servers;
                }
                if tokio::time::Instant::now() >= deadline {
                    let secs = self.timeouts.route.as_secs();
                    spent = Some(Spent::Time { secs });
                    break 'servers;
                }
                addresses_tried += 1;
                let server = ServerId::new(&host, ip);
                self.cache.refresh(&server.name, ip).await;
                let cached = self.cache.get(&server.name, ip);
                let classes = cached.as_ref().map(|e| e.classes()).unwrap_or_default();
                let rule = plan.rule_for_host(&server.name, &classes);
                let known = match &cached {
                    Some(entry) => Known::cached(entry, self.cache.tls_memory(entry)),
                    None => Known::Nothing,
                };
                // DANE comes before MTA-STS (RFC 8461 2).
                let published = dane.unwrap_or_else(|| published(policy, &server.name));
                if overridden(rule, published) {
                    tracing::warn!(server = %server, rule = %rule.name, "rule overrides the domain's published policy ({})", published.name().unwrap_or("none"));
                }
                let mut decision = decide(rule, known, published, demand);
                let stale = cached.as_ref().is_some_and(|e| !e.pinned);
                if stale
                    && matches!(decision, HostDecision::Skip(_))
                    && is_connected(greeted, SocketAddr::new(ip, port))
                {
                    // Connected at accept moments ago: "unreachable" from before is stale,
                    // and the attempt's outcome will replace it.
                    decision = decide(rule, Known::Nothing, published, demand);
                }
                if decision != decide(rule, Known::Nothing, published, demand) {
                    self.stats.cache_hits.inc();
                }
                if let HostDecision::Skip(skip) = &decision {
                    let failure = AttemptFailure::Skipped(skip.clone());
                    failures.push(Failed::Server { server, failure });
                    continue;
                }
                if published == Published::Dane(DaneState::Bogus) {
                    // Refused before any connection: counted here, as RFC 8460's
                    // dnssec-invalid, under the TLSA policy that could not be had.
                    (self.tls_reports).record(
                        domain,
                        &PolicyFacts::tlsa(&tlsa_records, &server.name),
                        &SessionResult::dnssec_invalid(),
                        &SessionSite::at(&server),
                    );
                }
                if let (
                    Some(policy),
                    Published::MtaSts {
                        mx_listed: false, ..
                    },
                ) = (policy, published)
                {
                    let site = SessionSite::at(&server);
                    (self.tls_reports).record(
                        domain,
                        &PolicyFacts::sts(policy),
                        &SessionResult::mx_not_in_policy(),
                        &site,
                    );
                }
                let attempt = Attempt {
                    rule,
                    route: plan.route(),
                    server: &server,
                    port,
                    domain,
                    decision,
                    published,
                    demand,
                    policy,
                    greeted,
                    envelope,
                    tlsa: &tlsa,
                    tlsa_records: &tlsa_records,
                };
                // The connection made at accept comes first; else a pooled one that fits.
                let has_greeted = greeted.lock().is_ok_and(|slot| slot.is_some());
                let reused = match has_greeted {
                    true => None,
                    false => self.reuse(&attempt).await,
                };
                let attempted = match reused {
                    Some(reused) => Ok(reused),
                    // No wait for one server outlasts the whole search's time.
                    None => match tokio::time::timeout_at(deadline, self.attempt(&attempt)).await {
                        Ok(attempted) => {
                            attempted.map(|(session, first)| (session, Lineage::fresh(), first))
                        }
                        Err(_) => {
                            let secs = self.timeouts.route.as_secs();
                            spent = Some(Spent::Time { secs });
                            let failure = AttemptFailure::OutOfTime { secs };
                            failures.push(Failed::Server { server, failure });
                            break 'servers;
                        }
                    },
                };
                let failure = match attempted {
                    Ok((reached, lineage, first_reply)) => {
                        failures.extend(tls_failures);
                        let key = self.pool_key(&attempt, &reached);
                        let facts = RemoteFacts {
                            server,
                            relay: reached.relay,
                            tls: reached.tls,
                            authentication: reached.authentication,
                            downgrade: reached.downgrade,
                            rule: rule.name.clone(),
                            cached_classes: classes,
                            published,
                            policy_waived: envelope.policy_waived,
                            earlier_failures: Arc::new(failures),
                            reused: false,
                        };
                        let timeouts = self.timeouts.clone();
                        let upstream = Upstream::new(reached.conn, reached.caps, facts, timeouts);
                        let upstream = upstream.poolable(key, lineage);
                        return Ok(match first_reply {
                            Some(reply) => upstream.with_first_reply(reply),
                            None => upstream,
                        });
                    }
                    Err(failure) => failure,
                };
                match failure {
                    AttemptFailure::Refused(refusal) => {
                        tracing::warn!(server = %server, rule = %rule.name, "TLS required but not achieved: {refusal}");
                        let first_try = decide(rule, Known::Nothing, published, demand);
                        let unnamed_in = no_mx_name(hop, &first_try).then(|| domain.to_string());
                        tls_failures.push(Failed::Refused {
                            server,
                            refusal,
                            unnamed_in,
                        });
                        tls_rule = rule.name.clone();
                    }
                    AttemptFailure::Rejected(reply) => {
                        return Err(OpenError::Rejected { reply, server });
                    }
                    AttemptFailure::Auth(failure) => return Err(OpenError::Auth(failure)),
                    AttemptFailure::Local(error) => {
                        self.stats.local_errors.inc();
                        tracing::warn!(event = "local_error", server = %server, error = %error, "not connected for a reason of this host's own (nothing cached): {error}");
                        let failure = AttemptFailure::Local(error);
                        failures.push(Failed::Server { server, failure });
                    }
                    failure => {
                        tracing::info!(server = %server, "delivery attempt failed: {failure}");
                        if let AttemptFailure::Unreachable { class, .. } = &failure {
                            let observation = Observation::unreachable(*class, failure.to_string());
                            self.cache.record(&server.name, ip, domain, observation);
                        }
                        if let AttemptFailure::Unsupported(missing) = &failure {
                            unsupported =
                                Some((unsupported_reply(&server, missing), server.clone()));
                            unsupported_count += 1;
                        }
                        failures.push(Failed::Server { server, failure });
                    }
                }
            }
        }
        // Refused for good only when every server said it lacks what the message needs.
        if let Some((reply, server)) = unsupported
            && unsupported_count == failures.len()
            && tls_failures.is_empty()
            && spent.is_none()
        {
            if reply.enhanced() == Some("5.7.30") {
                self.stats.requiretls_refused.inc();
            }
            return Err(OpenError::Rejected { reply, server });
        }
        // Why the rest was not tried, last: the MTA sees it after what was.
        failures.extend(spent.map(Failed::Budget));
        if envelope.params.requiretls
            && !tls_failures.is_empty()
            && tls_failures
                .iter()
                .chain(&failures)
                .all(Failed::is_permanent)
        {
            self.stats.requiretls_refused.inc();
            tls_failures.extend(failures);
            return Err(OpenError::RequireTlsRefused {
                failures: tls_failures,
            });
        }
        if !tls_failures.is_empty() {
            if policy.is_some_and(|p| p.mode == Mode::Enforce) {
                self.stats.sts_enforced_deferrals.inc();
            }
            tls_failures.extend(failures);
            return Err(OpenError::TlsNotAchieved {
                rule: tls_rule,
                failures: tls_failures,
            });
        }
        let budget_note = |f: &Failed| matches!(f, Failed::Budget(_));
        if failures.iter().any(Failed::is_local)
            && failures.iter().all(|f| f.is_local() || budget_note(f))
        {
            return Err(OpenError::Local { failures });
        }
        Err(OpenError::Unreachable {
            domain: domain.to_string(),
            failures,
        })
    }

    /// The end of a transaction: its connection goes back to the pool when it may, and is
    /// closed otherwise.
    pub fn release(&self, upstream: Upstream) {
        if !self.pool.may_keep(upstream.lineage()) {
            tokio::spawn(upstream.quit());
            return;
        }
        match upstream.into_idle() {
            Ok((key, idle)) => {
                self.pool.put(key, idle);
                self.stats.pool_idle.set(self.pool.len() as i64);
            }
            Err(upstream) => {
                tokio::spawn(upstream.quit());
            }
        }
    }
}
