//! What the inbound session asks of the outbound side: a route for a transaction's first
//! recipient ([`Outbound::open_route`]: its next hop, what its domain publishes, a server
//! that took MAIL FROM), and whether a later recipient may ride on it
//! ([`Outbound::join_route`]). Why a recipient has none is a [`NoRoute`], which renders the
//! reply the MTA gets.

use std::net::SocketAddr;

use crate::net::dns::{MxHost, RouteError, ServerId};
use crate::outbound::Outbound;
use crate::outbound::attempt::{Envelope, Greeted};
use crate::outbound::delivery::OpenError;
use crate::outbound::failure::Failed;
use crate::outbound::hop::NextHop;
use crate::outbound::upstream::{RemoteFacts, Upstream};
use crate::outcome::{TlsOutcome, Verification};
use crate::policy::mta_sts::PolicyLookup;
use crate::router::Plan;
use crate::router::decision::{
    Binding, Connected, HostDecision, Known, Refusal, Skip, decide, overridden,
};
use crate::smtp::Reply;

/// Where the MTA's session was going when it was redirected to us (transparent mode): every
/// transaction goes there, the first on the connection made at accept.
pub struct Redirect {
    pub destination: SocketAddr,
    /// That remote, connected at accept, until the first transaction to it takes it.
    pub greeted: Option<Box<Greeted>>,
}

/// A remote transaction, opened for its first recipient.
pub struct OpenRoute {
    /// The first recipient's domain.
    pub domain: String,
    plan: Plan,
    /// The next hop, as [`NextHop::key`] names it: a later recipient must share it.
    hop: Vec<String>,
    /// The sender's REQUIRETLS: every recipient's server must satisfy it.
    requiretls: bool,
    pub upstream: Upstream,
}

/// Why a recipient has no route in this transaction.
#[derive(Debug)]
pub enum NoRoute {
    /// Where it goes could not be found.
    Hop(RouteError),
    /// No server took the transaction.
    Open(OpenError),
    /// It goes to another next hop than the open route.
    OtherHop {
        domain: String,
        route_domain: String,
    },
    /// It goes to the open route's next hop, but its domain asks more than the route has.
    NotJoined {
        domain: String,
        route: Box<RemoteFacts>,
        why: NotJoined,
    },
}

impl NoRoute {
    /// What the MTA is told: a 4xx for what may pass (another transaction, DNS, the remote's
    /// TLS), the remote's own refusal as it is, a 5xx where DNS says no for good.
    pub fn reply(&self) -> Reply {
        match self {
            NoRoute::Hop(error) => error.reply(),
            NoRoute::Open(error) => error.reply(),
            NoRoute::OtherHop {
                domain,
                route_domain,
            } => Reply::new(
                452,
                "4.5.3",
                format!(
                    "{domain} has another next hop than {route_domain}: send it in another transaction"
                ),
            ),
            NoRoute::NotJoined { domain, route, why } => Reply::new(
                452,
                "4.5.3",
                format!(
                    "{domain} is not sent on the route to {route} ({}): {why}; send it in another transaction",
                    route_terms(&route.tls)
                ),
            ),
        }
    }

    /// Why the recipient's domain got nothing, as the ledger keeps it; `None` when the
    /// recipient only goes to another transaction.
    pub fn failure(&self, at: u64) -> Option<crate::ledger::Failure> {
        let said = |host: Option<&ServerId>, reason: String| crate::ledger::Failure {
            at,
            host: host.map(|s| s.name.clone()),
            class: None,
            reason,
        };
        match self {
            NoRoute::Hop(error) => Some(said(None, error.to_string())),
            NoRoute::Open(OpenError::Route(error)) => Some(said(None, error.to_string())),
            NoRoute::Open(OpenError::Rejected { reply, server }) => {
                Some(said(Some(server), reply.to_string()))
            }
            NoRoute::Open(OpenError::Auth(failure)) => Some(said(None, failure.to_string())),
            NoRoute::Open(
                OpenError::Unreachable { failures, .. }
                | OpenError::TlsNotAchieved { failures, .. }
                | OpenError::Local { failures }
                | OpenError::RequireTlsRefused { failures },
            ) => failures.last().map(|failed| failed.to_ledger(at)),
            NoRoute::OtherHop { .. } | NoRoute::NotJoined { .. } => None,
        }
    }

    /// Whether what the recipient domain publishes (MTA-STS, DANE) is all that refused
    /// every server: what a message's `TLS-Required: No` sets aside (RFC 8689 5).
    pub fn refused_by_domain_policy(&self) -> bool {
        let NoRoute::Open(OpenError::TlsNotAchieved { failures, .. }) = self else {
            return false;
        };
        let mut refusals = failures.iter().filter_map(|failed| match failed {
            Failed::Refused { refusal, .. } => Some(refusal),
            _ => None,
        });
        let mut any = false;
        let all = refusals.all(|refusal| {
            any = true;
            matches!(
                refusal.under,
                Some(Binding::MtaStsEnforce | Binding::Dane | Binding::DaneUnusable)
            )
        });
        any && all
    }

    /// The line in the log when a recipient is not delivered for want of TLS, DNS or a
    /// reachable server, or goes to another transaction: what an admin looks for, besides
    /// the transaction's own line.
    pub fn log(&self, client: SocketAddr, domain: &str, plan: &Plan) {
        match self {
            NoRoute::Hop(error @ RouteError::DaneUnknown { lookup, .. }) => {
                let (kind, name) = lookup.fields();
                tracing::warn!(event = "dane.unknown", lookup = kind, name, client = %client, domain, "not delivered: {error}");
            }
            NoRoute::Open(
                OpenError::TlsNotAchieved { .. }
                | OpenError::RequireTlsRefused { .. }
                | OpenError::Local { .. }
                | OpenError::Unreachable { .. },
            ) => {
                tracing::warn!(event = "not_delivered", client = %client, domain, rule = %plan.base_rule().name, reply = %self.reply(), "not delivered: {}", self.reply());
            }
            NoRoute::NotJoined { route, why, .. } => {
                tracing::info!(event = "not_joined", client = %client, domain, route = %route, "recipient not on the open route: {why}");
            }
            NoRoute::Hop(_) | NoRoute::Open(_) | NoRoute::OtherHop { .. } => {}
        }
    }
}

/// Why a recipient does not ride on the transaction's open route: it goes to a transaction
/// of its own.
#[derive(Debug)]
pub enum NotJoined {
    /// Another rule decides for it at the route's server.
    OtherRule {
        rule: String,
        route_rule: String,
    },
    /// Its domain refuses the route's server as the route found it.
    Refused(Refusal),
    Skipped(Skip),
    /// Its domain needs this of the server, which the route does not give.
    Needs {
        decision: HostDecision,
        server: ServerId,
    },
}

impl std::fmt::Display for NotJoined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotJoined::OtherRule { rule, route_rule } => {
                write!(f, "rule {rule:?} decides for it, not {route_rule:?}")
            }
            NotJoined::Refused(refusal) => refusal.fmt(f),
            NotJoined::Skipped(skip) => skip.fmt(f),
            NotJoined::Needs { decision, server } => {
                write!(f, "its domain needs {decision} with {server}")
            }
        }
    }
}

impl Outbound {
    /// The route for a transaction's first recipient, planned as `plan`: its next hop (the
    /// redirect's destination in transparent mode), what its domain publishes there, and the
    /// first server and address that accepted the envelope's MAIL FROM.
    pub async fn open_route(
        &self,
        plan: Plan,
        envelope: &Envelope<'_>,
        redirect: Option<&mut Redirect>,
    ) -> Result<OpenRoute, NoRoute> {
        let domain = envelope.first.0.routing_domain().to_string();
        let destination = redirect.as_ref().map(|r| r.destination);
        let hop = self.hop(&plan, &domain, destination).await?;
        let policy = match envelope.policy_waived {
            true => PolicyLookup::NotPublished,
            false => self.policy_for(&hop, &domain).await,
        };
        // The remote connected at accept serves the first transaction to it.
        let greeted = match (&hop, redirect) {
            (NextHop::OriginalDestination { .. }, Some(redirect)) => redirect.greeted.take(),
            _ => None,
        };
        // Boxed: the session's future would otherwise be as large as all the lookups and
        // handshakes below, and it is copied at every spawn.
        let opened = Box::pin(self.open(&plan, &domain, &hop, &policy, greeted, envelope)).await;
        Ok(OpenRoute {
            hop: hop.key(),
            requiretls: envelope.params.requiretls,
            upstream: opened.map_err(NoRoute::Open)?,
            domain,
            plan,
        })
    }

    /// Whether a later recipient at `domain`, planned as `plan`, may ride on the open
    /// `route`: the route's server must be its next hop too (the same MX hosts, or the
    /// route's address is one of its domain's best MX hosts), under the same rules, and
    /// its own domain must find there what it needs. `Err` tells the MTA to send it in
    /// another transaction, or why it cannot go.
    pub async fn join_route(
        &self,
        route: &OpenRoute,
        plan: &Plan,
        domain: &str,
        destination: Option<SocketAddr>,
    ) -> Result<(), NoRoute> {
        if route.domain == domain && route.plan == *plan {
            return Ok(());
        }
        let hop = self.hop(plan, domain, destination).await?;
        let facts = route.upstream.facts();
        let name = match plan.rule_names() == route.plan.rule_names() {
            false => None,
            true if hop.key() == route.hop => Some(facts.server.name.clone()),
            true => self.best_mx_at(&hop, facts.server.addr).await,
        };
        let Some(name) = name else {
            return Err(NoRoute::OtherHop {
                domain: domain.to_string(),
                route_domain: route.domain.clone(),
            });
        };
        // The same server, and still its domain is judged on its own: what it publishes
        // may ask more than the route the first recipient opened has.
        let policy = self.policy_for(&hop, domain).await;
        let joins = self.joins(route, &name, plan, domain, &hop, &policy);
        match Box::pin(joins).await {
            Ok(()) => Ok(()),
            Err(why) => Err(NoRoute::NotJoined {
                domain: domain.to_string(),
                route: Box::new(facts.clone()),
                why,
            }),
        }
    }

    /// The name of the one of `hop`'s best MX hosts (the lowest preference) that has the
    /// address `addr`: the server a transaction of its own would go to first. `None` for
    /// another kind of hop, no such host, or a lookup that failed where DANE may apply
    /// (the recipient then goes in a transaction of its own, which says why).
    async fn best_mx_at(&self, hop: &NextHop, addr: std::net::IpAddr) -> Option<String> {
        let NextHop::Mx(hosts) = hop else {
            return None;
        };
        let best = hosts.iter().map(|h| h.preference).min();
        let best: Vec<MxHost> = (hosts.iter())
            .filter(|h| Some(h.preference) == best)
            .cloned()
            .collect();
        let dane = self.resolver.check_dnssec().await;
        let host = self.mx_with_address(&best, addr, dane).await.ok()??;
        Some(host.name)
    }

    /// The next hop for `domain`: the original `destination` of a redirected session, else
    /// what the plan and DNS say.
    async fn hop(
        &self,
        plan: &Plan,
        domain: &str,
        destination: Option<SocketAddr>,
    ) -> Result<NextHop, NoRoute> {
        let hop = match destination {
            Some(addr) => Box::pin(self.original_destination_hop(plan, domain, addr)).await,
            None => Box::pin(self.next_hop(plan, domain)).await,
        };
        hop.map_err(NoRoute::Hop)
    }

    /// What `domain` publishes (MTA-STS) for `hop`: it binds its MX hosts only, never a
    /// smart host route (RFC 8461 3.4).
    async fn policy_for(&self, hop: &NextHop, domain: &str) -> PolicyLookup {
        match hop.is_domain_delivery() {
            true => Box::pin(self.policies.policy_for(domain)).await,
            false => PolicyLookup::NotPublished,
        }
    }

    /// Whether a recipient at `domain` (planned as `plan`, through `hop`, which names the
    /// route's server `mx_name`) may ride on the route that went to `route`. Its domain is
    /// judged on its own: what it publishes for the route's server (DANE, MTA-STS), with
    /// the route's own TLS as what was found, must lead the one decision to that very
    /// connection. `Err` says what its domain needs instead.
    async fn joins(
        &self,
        open: &OpenRoute,
        mx_name: &str,
        plan: &Plan,
        domain: &str,
        hop: &NextHop,
        policy: &PolicyLookup,
    ) -> Result<(), NotJoined> {
        let route = open.upstream.facts();
        let (name, port) = match hop {
            // What the domain publishes does not bind a smart host (RFC 8461 3.4).
            NextHop::Smarthost(_) => return Ok(()),
            NextHop::Mx(_) => (mx_name.to_string(), self.port),
            NextHop::OriginalDestination { addr, mx, .. } => {
                let name = mx.clone().unwrap_or_else(|| addr.ip().to_string());
                (name, addr.port())
            }
        };
        let server = ServerId::new(&name, route.server.addr);
        let policy = policy.policy().map(AsRef::as_ref);
        let published = self.published_for(hop, &server, port, policy).await;
        // Chosen from what the cache said when the route's own rule was.
        let rule = plan.rule_for_host(&server.name, &route.cached_classes);
        if rule.name != route.rule {
            return Err(NotJoined::OtherRule {
                rule: rule.name.clone(),
                route_rule: route.rule.clone(),
            });
        }
        if overridden(rule, published) {
            tracing::warn!(server = %server, rule = %rule.name, domain, "rule overrides the domain's published policy ({})", published.name().unwrap_or("none"));
        }
        let found = Known::Found {
            outcome: &route.tls,
            downgrade: route.downgrade,
        };
        let decision = decide(
            rule,
            found,
            published,
            hop.demand(open.requiretls, &server.name),
        );
        let conn = Connected {
            tls: &route.tls,
            authentication: route.authentication,
            relay: route.relay.as_ref(),
        };
        // A certificate judged for another server name says nothing of this one's.
        let renamed = server.name != route.server.name;
        if decision.admits(&conn) && !(renamed && decision.authenticates()) {
            return Ok(());
        }
        Err(match decision {
            HostDecision::Refuse(refusal) => NotJoined::Refused(refusal),
            HostDecision::Skip(skip) => NotJoined::Skipped(skip),
            decision => NotJoined::Needs { decision, server },
        })
    }
}

/// How a route is secured, in a few words: `TLS, verified`, `legacy TLS, ...`, `plain`.
fn route_terms(tls: &TlsOutcome) -> String {
    match tls {
        TlsOutcome::Encrypted(session) => match &session.verification {
            Verification::Verified => "TLS, verified".to_string(),
            Verification::Failed(problem) => format!("TLS, {}", problem.class()),
        },
        TlsOutcome::Legacy(_) => "legacy TLS, not authenticated".to_string(),
        TlsOutcome::Plain(reason) => match reason.class() {
            Some(class) => format!("plain, {class}"),
            None => "plain".to_string(),
        },
    }
}
