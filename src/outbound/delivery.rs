//! Carrying out a plan: try each next-hop server and address in turn until one accepts
//! MAIL FROM. For each, [`decide`] says what to do (TLS, plain and on which path, refuse,
//! skip) from what the cache knows, and again from what the TLS attempt found; this module
//! only does it, classifies what happened, and records it.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use crate::cache::{Observation, OutcomeCache};
use crate::config::values::Timeouts;
use crate::outbound::connection::{Connection, ExchangeError, StartTlsResult};
use crate::outbound::mx::{
    AddressError, MxHost, MxResolver, RouteError, ServerId, literal_address,
};
use crate::outbound::tls::TlsClient;
use crate::outbound::upstream::{RemoteFacts, Upstream, relayable};
use crate::outcome::{NoTls, OutcomeClass, TlsOutcome, TlsSession, Verification};
use crate::policy::mta_sts::{Mode, PolicyLookup, StsPolicy};
use crate::policy::tlsrpt::{PolicyFacts, SessionResult, SessionSite, TlsReports};
use crate::router::Plan;
use crate::router::decision::{
    HostDecision, Known, Published, StsMode, TlsTerms, decide, is_fact_about_server, overridden,
};
use crate::rules::model::{AuthSpec, HostPort};
use crate::rules::{Fallback, Route, Rule};
use crate::smtp::data::BareLineEndings;
use crate::smtp::{Capabilities, MissingExtension, Reply};
use crate::stats::Stats;

/// `delivery:` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// The port of remote MX servers: 25 on the Internet, anything in a lab.
    pub port: u16,
    /// What to do with a bare CR or LF in a message body.
    pub bare_line_endings: BareLineEndings,
    /// The local address connections to remote servers come from; none: the system's
    /// choice.
    pub source_address: Option<std::net::IpAddr>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            port: 25,
            bare_line_endings: BareLineEndings::Normalize,
            source_address: None,
        }
    }
}

/// Everything the outbound side needs, shared by all sessions.
pub struct Outbound {
    pub resolver: MxResolver,
    pub tls: TlsClient,
    /// Our EHLO name.
    pub hostname: String,
    /// Remote SMTP port of MX hosts.
    pub port: u16,
    pub timeouts: Timeouts,
    pub cache: Arc<OutcomeCache>,
    pub stats: Arc<Stats>,
    /// What TLS-RPT reports count: every attempt to a domain with an MTA-STS policy.
    pub tls_reports: Arc<TlsReports>,
    /// `delivery.source_address`.
    pub source_address: Option<std::net::IpAddr>,
}

/// Where a transaction goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// The recipient domain's mail exchangers, best first.
    Mx(Vec<MxHost>),
    Smarthost(HostPort),
}

impl NextHop {
    /// Identifies the hop, to tell whether two recipients can share a transaction.
    pub fn key(&self) -> Vec<String> {
        match self {
            NextHop::Mx(hosts) => {
                let mut names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
                names.sort();
                names
            }
            NextHop::Smarthost(server) => vec![server.to_string()],
        }
    }
}

/// Why no remote transaction could be opened.
#[derive(Debug)]
pub enum OpenError {
    Route(RouteError),
    /// The remote answered MAIL FROM with this; it goes to the MTA as it is.
    Rejected {
        reply: Reply,
        server: String,
    },
    /// Something on our side (credentials, configuration) stops delivery for now.
    Deferred(Reply),
    Unreachable {
        domain: String,
        failures: Vec<String>,
    },
    TlsNotAchieved {
        rule: String,
        failures: Vec<String>,
    },
}

impl OpenError {
    pub fn reply(&self) -> Reply {
        match self {
            OpenError::Route(e) => e.reply(),
            OpenError::Rejected { reply, .. } => relayable(reply),
            OpenError::Deferred(reply) => reply.clone(),
            OpenError::Unreachable { domain, failures } => Reply::new(
                451,
                "4.4.1",
                format!("no MX of {domain} reachable: {}", summary(failures)),
            ),
            OpenError::TlsNotAchieved { rule, failures } => Reply::new(
                451,
                "4.7.5",
                format!("rule {rule:?}: {}", summary(failures)),
            ),
        }
    }
}

/// Keeps a reply text within one SMTP line.
fn summary(failures: &[String]) -> String {
    let mut text = failures.join("; ");
    if text.len() > 400 {
        let cut = (0..=400)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push_str(" ...");
    }
    text
}

enum Failure {
    /// Try the next address.
    Next(String),
    /// The server could not be reached (remembered briefly); try the next address.
    Unreachable(OutcomeClass, String),
    /// The rule wanted TLS and did not get it here; try the next address.
    TlsNotAchieved(String),
    /// The remote answered, and the MTA should hear it.
    Final(Reply),
    /// The server lacks an extension the message needs; another address may have it.
    Unsupported(Reply),
    /// Stop trying: nothing another address could change.
    Deferred(Reply),
}

/// What a STARTTLS attempt left.
enum Secured {
    Tls(Connection, Capabilities, TlsSession),
    /// No TLS, and the connection is still usable in plain (no STARTTLS, or refused).
    Plain(Connection, Capabilities, NoTls),
    /// The connection is gone; a plain fallback needs a new one.
    Lost(NoTls),
    /// The server ended the session at STARTTLS (421/221), or failed the EHLO after TLS: a
    /// temporary failure of this server, not a TLS fact about it. Try the next server.
    Closed(String),
}

impl Secured {
    fn outcome(&self) -> Option<TlsOutcome> {
        Some(match self {
            Secured::Tls(_, _, session) => TlsOutcome::Encrypted(session.clone()),
            Secured::Plain(_, _, reason) | Secured::Lost(reason) => {
                TlsOutcome::Plain(reason.clone())
            }
            Secured::Closed(_) => return None,
        })
    }
}

/// A greeted connection on the path a decision chose.
struct Session {
    conn: Connection,
    caps: Capabilities,
    tls: TlsOutcome,
    /// The fallback relay the connection goes to instead of the server, if any.
    relay: Option<HostPort>,
}

/// One delivery attempt: the rule for this server, the route, the server, and what the
/// decision said before connecting.
struct Attempt<'a> {
    rule: &'a Rule,
    route: &'a Route,
    server: &'a ServerId,
    port: u16,
    domain: &'a str,
    decision: HostDecision,
    /// What the domain publishes, as it bears on this server.
    published: Published,
    /// The domain's MTA-STS policy, for TLS-RPT.
    policy: Option<&'a StsPolicy>,
}

impl Attempt<'_> {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.server.addr, self.port)
    }
}

impl Outbound {
    /// Where a transaction for `domain` goes under `plan`.
    pub async fn next_hop(&self, plan: &Plan, domain: &str) -> Result<NextHop, RouteError> {
        if let Route::Smarthost { server, .. } = plan.route() {
            return Ok(NextHop::Smarthost(server.clone()));
        }
        if domain.starts_with('[') {
            return Ok(NextHop::Mx(vec![MxHost {
                name: domain.to_string(),
                preference: 0,
            }]));
        }
        self.resolver.mail_exchangers(domain).await.map(NextHop::Mx)
    }

    /// Opens a remote transaction: the first server and address that accepts MAIL FROM
    /// wins. `policy` is what the domain publishes (MTA-STS); it does not bind a smarthost
    /// route (RFC 8461 3.4). `mail_from` writes the command for the capabilities the remote
    /// announced, or says which one the message needs and the remote lacks.
    pub async fn open(
        &self,
        plan: &Plan,
        domain: &str,
        hop: &NextHop,
        policy: &PolicyLookup,
        mail_from: impl Fn(&Capabilities) -> Result<String, MissingExtension> + Sync,
    ) -> Result<Upstream, OpenError> {
        if let (NextHop::Mx(_), PolicyLookup::Unavailable(error)) = (hop, policy) {
            // Delivered as if there were none (RFC 8461 5.1), and reported.
            let result = SessionResult::from_policy_error(error);
            (self.tls_reports).record(
                domain,
                &PolicyFacts::NoPolicyFound,
                &result,
                &SessionSite::default(),
            );
        }
        let policy = match hop {
            NextHop::Mx(_) => policy.policy().map(AsRef::as_ref),
            NextHop::Smarthost(_) => None,
        };
        let servers: Vec<(String, u16)> = match hop {
            NextHop::Mx(hosts) => hosts.iter().map(|h| (h.name.clone(), self.port)).collect(),
            NextHop::Smarthost(server) => vec![(server.host.clone(), server.port)],
        };
        let mut failures = Vec::new();
        let mut tls_failures = Vec::new();
        // The last refusal for a missing extension, and how many servers gave one.
        let (mut unsupported, mut unsupported_count) = (None, 0);
        let mut tls_rule = plan.base_rule().name.clone();
        for (host, port) in servers {
            let addrs = match self.addresses(&host).await {
                Ok(addrs) => addrs,
                Err(e) => {
                    failures.push(format!("{host}: {e}"));
                    continue;
                }
            };
            for ip in addrs {
                let server = ServerId::new(&host, ip);
                self.cache.refresh(&server.name, ip).await;
                let cached = self.cache.get(&server.name, ip);
                let classes = cached.as_ref().map(|e| e.classes()).unwrap_or_default();
                let rule = plan.rule_for_host(&server.name, &classes);
                let known = cached.as_ref().map_or(Known::Nothing, Known::Cached);
                let published = published(policy, &server.name);
                if overridden(rule, published) {
                    tracing::warn!(server = %server, rule = %rule.name, "rule overrides the domain's published policy ({})", published.name().unwrap_or("none"));
                }
                let decision = decide(rule, known, published);
                if decision != decide(rule, Known::Nothing, published) {
                    self.stats.cache_hits.inc();
                }
                if let HostDecision::Skip(why) = &decision {
                    failures.push(format!("{server}: {why}"));
                    continue;
                }
                if let (
                    Some(policy),
                    Published::MtaSts {
                        mx_listed: false, ..
                    },
                ) = (policy, published)
                {
                    let site = site(&server);
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
                    policy,
                };
                match self.attempt(&attempt, &mail_from).await {
                    Ok(session) => {
                        failures.extend(tls_failures);
                        let facts = RemoteFacts {
                            server,
                            relay: session.relay,
                            tls: session.tls,
                            rule: rule.name.clone(),
                            policy: published.name(),
                            earlier_failures: failures,
                        };
                        let timeouts = self.timeouts.clone();
                        return Ok(Upstream::new(session.conn, session.caps, facts, timeouts));
                    }
                    Err(Failure::Next(why)) => {
                        tracing::info!(server = %server, "delivery attempt failed: {why}");
                        failures.push(format!("{server}: {why}"));
                    }
                    Err(Failure::Unreachable(class, why)) => {
                        tracing::info!(server = %server, "delivery attempt failed: {why}");
                        self.cache.record(
                            &server.name,
                            ip,
                            domain,
                            Observation::unreachable(class, &why),
                        );
                        failures.push(format!("{server}: {why}"));
                    }
                    Err(Failure::TlsNotAchieved(why)) => {
                        tracing::warn!(server = %server, rule = %rule.name, "TLS required but not achieved: {why}");
                        tls_failures.push(format!("{server} {why}"));
                        tls_rule = rule.name.clone();
                    }
                    Err(Failure::Final(reply)) => {
                        return Err(OpenError::Rejected {
                            reply,
                            server: server.to_string(),
                        });
                    }
                    Err(Failure::Unsupported(reply)) => {
                        tracing::info!(server = %server, "delivery attempt failed: {reply}");
                        failures.push(format!("{server}: {reply}"));
                        unsupported = Some((reply, server.to_string()));
                        unsupported_count += 1;
                    }
                    Err(Failure::Deferred(reply)) => return Err(OpenError::Deferred(reply)),
                }
            }
        }
        // Refused for good only when every server said it lacks what the message needs.
        if let Some((reply, server)) = unsupported
            && unsupported_count == failures.len()
            && tls_failures.is_empty()
        {
            return Err(OpenError::Rejected { reply, server });
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
        Err(OpenError::Unreachable {
            domain: domain.to_string(),
            failures,
        })
    }

    async fn addresses(&self, host: &str) -> Result<Vec<std::net::IpAddr>, AddressError> {
        match literal_address(host) {
            Some(ip) => Ok(vec![ip]),
            None => self.resolver.addresses(host).await,
        }
    }

    /// Runs one attempt up to the remote's acceptance of MAIL FROM.
    async fn attempt(
        &self,
        attempt: &Attempt<'_>,
        mail_from: &(dyn Fn(&Capabilities) -> Result<String, MissingExtension> + Sync),
    ) -> Result<Session, Failure> {
        let mut session = self.session(attempt).await?;
        let (conn, caps) = (&mut session.conn, &session.caps);
        if let Route::Smarthost {
            auth: Some(auth), ..
        } = attempt.route
        {
            // The legacy stack never authenticates the server: the password could go to
            // anyone in the middle.
            if let TlsOutcome::Legacy(_) = session.tls {
                tokio::spawn(session.conn.quit());
                return Err(Failure::Deferred(Reply::new(
                    451,
                    "4.7.5",
                    format!(
                        "{}: no AUTH over unauthenticated legacy TLS",
                        attempt.server
                    ),
                )));
            }
            self.authenticate(conn, caps, auth).await?;
        }
        let command = match mail_from(caps) {
            Ok(command) => command,
            Err(missing) => {
                let why = Reply::new(554, "5.6.9", format!("{} {missing}", attempt.server));
                tokio::spawn(session.conn.quit());
                return Err(Failure::Unsupported(why));
            }
        };
        let reply = conn
            .exchange(
                &command,
                &[250],
                self.timeouts.command,
                "the reply to MAIL FROM",
            )
            .await
            .map_err(|e| Failure::Next(e.to_string()))?;
        if reply.closes_connection() {
            return Err(Failure::Next(format!("MAIL FROM: {reply}")));
        }
        if !reply.is_positive() {
            tokio::spawn(session.conn.quit());
            return Err(Failure::Final(reply));
        }
        Ok(session)
    }

    /// A greeted connection on the path the decisions choose: encrypted, or plain for a
    /// reason, to the server or through the rule's relay.
    async fn session(&self, attempt: &Attempt<'_>) -> Result<Session, Failure> {
        let terms = match &attempt.decision {
            HostDecision::Tls(terms) => *terms,
            HostDecision::Plain { reason, path } => {
                return self.plain_path(path, None, attempt, reason.clone()).await;
            }
            HostDecision::LegacyTls => return self.legacy(attempt).await,
            HostDecision::Refuse(why) => return Err(Failure::TlsNotAchieved(why.clone())),
            HostDecision::Skip(why) => return Err(Failure::Next(why.clone())),
        };
        if terms.implicit {
            return self.implicit_tls(attempt, terms).await;
        }
        let (conn, caps) = self.greet(attempt.server, attempt.addr()).await?;
        let secured = self.secure(terms, conn, caps).await;
        let Some(outcome) = secured.outcome() else {
            let Secured::Closed(why) = secured else {
                return Err(Failure::Next("TLS attempt ended without an outcome".into()));
            };
            return Err(Failure::Next(why));
        };
        let fact = is_fact_about_server(attempt.rule, &outcome);
        let downgrade = fact && self.is_downgrade(attempt, &outcome);
        let found = Known::Found {
            outcome: &outcome,
            downgrade,
        };
        let decision = decide(attempt.rule, found, attempt.published);
        if fact {
            self.remember(attempt, &outcome, &decision);
        }
        self.report(attempt, &outcome);
        match (decision, secured) {
            (HostDecision::Tls(_), Secured::Tls(conn, caps, session)) => Ok(Session {
                conn,
                caps,
                tls: TlsOutcome::Encrypted(session),
                relay: None,
            }),
            (HostDecision::LegacyTls, secured) => {
                // rustls could not talk to this server: a new connection for the legacy stack.
                if let Secured::Tls(conn, ..) | Secured::Plain(conn, ..) = secured {
                    tokio::spawn(conn.quit());
                }
                tracing::info!(server = %attempt.server, "rustls failed ({}); trying the legacy TLS stack", outcome.class().map_or("", OutcomeClass::name));
                self.legacy(attempt).await
            }
            (HostDecision::Plain { reason, path }, secured) => {
                let open = match secured {
                    Secured::Plain(conn, caps, _) => Some((conn, caps)),
                    Secured::Tls(conn, ..) => {
                        // The certificate failed a rule that allows plain after that.
                        tokio::spawn(conn.quit());
                        None
                    }
                    Secured::Lost(_) | Secured::Closed(_) => None,
                };
                if open.is_none() {
                    tracing::info!(server = %attempt.server, "TLS failed ({reason}); taking the plain path");
                }
                self.plain_path(&path, open, attempt, reason).await
            }
            (decision, secured) => {
                if let Secured::Tls(conn, ..) | Secured::Plain(conn, ..) = secured {
                    tokio::spawn(conn.quit());
                }
                Err(Failure::TlsNotAchieved(match decision {
                    HostDecision::Refuse(why) | HostDecision::Skip(why) => why,
                    other => other.to_string(),
                }))
            }
        }
    }

    /// The legacy stack on a new connection: STARTTLS, the OpenSSL handshake, EHLO again;
    /// then what the attempt found goes through the decision like any other.
    #[cfg(not(feature = "legacy-tls"))]
    async fn legacy(&self, _attempt: &Attempt<'_>) -> Result<Session, Failure> {
        Err(Failure::TlsNotAchieved(
            "legacy TLS: this build has no legacy TLS stack".into(),
        ))
    }

    /// The legacy stack on a new connection: STARTTLS, the OpenSSL handshake, EHLO again;
    /// then what the attempt found goes through the decision like any other.
    #[cfg(feature = "legacy-tls")]
    async fn legacy(&self, attempt: &Attempt<'_>) -> Result<Session, Failure> {
        let (conn, caps) = self.greet(attempt.server, attempt.addr()).await?;
        let (outcome, open) = if !caps.starttls {
            (TlsOutcome::Plain(NoTls::NoStarttls), Some((conn, caps)))
        } else {
            let t = &self.timeouts;
            let clock = std::time::Instant::now();
            let started = conn
                .starttls_legacy(&self.tls, t.command, t.tls_handshake)
                .await;
            self.stats.handshake_time(clock.elapsed().as_secs_f64());
            match started {
                Ok((mut conn, session)) => match self.ehlo(&mut conn).await {
                    // Nothing said before TLS counts after it.
                    Ok(caps) => (TlsOutcome::Legacy(session), Some((conn, caps))),
                    Err(why) => return Err(Failure::Next(format!("after TLS: {why}"))),
                },
                Err(StartTlsResult::Refused(conn, reason)) => {
                    (TlsOutcome::Plain(reason), Some((conn, caps)))
                }
                Err(StartTlsResult::Lost(reason)) => (TlsOutcome::Plain(reason), None),
                Err(StartTlsResult::Closed(reply)) => {
                    return Err(Failure::Next(format!("STARTTLS: {reply}")));
                }
                Err(StartTlsResult::Encrypted(conn, _)) => {
                    tokio::spawn(conn.quit());
                    return Err(Failure::Next(
                        "legacy TLS: unexpected rustls session".into(),
                    ));
                }
            }
        };
        let fact = is_fact_about_server(attempt.rule, &outcome);
        let downgrade = fact && self.is_downgrade(attempt, &outcome);
        let found = Known::Found {
            outcome: &outcome,
            downgrade,
        };
        let decision = decide(attempt.rule, found, Published::Nothing);
        if fact {
            self.remember(attempt, &outcome, &decision);
        }
        let encrypted = outcome.is_encrypted();
        match (decision, open) {
            (HostDecision::LegacyTls, Some((conn, caps))) if encrypted => Ok(Session {
                conn,
                caps,
                tls: outcome,
                relay: None,
            }),
            (HostDecision::Plain { reason, path }, open) => {
                let open = match open {
                    Some((conn, _)) if encrypted => {
                        tokio::spawn(conn.quit());
                        None
                    }
                    open => open,
                };
                if open.is_none() {
                    tracing::info!(server = %attempt.server, "legacy TLS failed ({reason}); taking the plain path");
                }
                self.plain_path(&path, open, attempt, reason).await
            }
            (decision, open) => {
                if let Some((conn, _)) = open {
                    tokio::spawn(conn.quit());
                }
                Err(Failure::TlsNotAchieved(match decision {
                    HostDecision::Refuse(why) | HostDecision::Skip(why) => why,
                    other => other.to_string(),
                }))
            }
        }
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
            server = %server,
            rule = %attempt.rule.name,
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

    /// Counts the attempt for the domain's TLS-RPT report, when it has an MTA-STS policy.
    fn report(&self, attempt: &Attempt<'_>, outcome: &TlsOutcome) {
        let Some(policy) = attempt.policy else {
            return;
        };
        // An unverified session is judged by why its certificate failed.
        let class = match outcome {
            TlsOutcome::Encrypted(TlsSession {
                verification: Verification::Failed(problem),
                ..
            }) => Some(problem.class()),
            other => other.class(),
        };
        if let Some(result) = class.and_then(SessionResult::from_class) {
            let site = site(attempt.server);
            (self.tls_reports).record(attempt.domain, &PolicyFacts::sts(policy), &result, &site);
        }
    }

    /// The plain path: the same server (reusing `open` when there is one), or the relay.
    async fn plain_path(
        &self,
        path: &Fallback,
        open: Option<(Connection, Capabilities)>,
        attempt: &Attempt<'_>,
        reason: NoTls,
    ) -> Result<Session, Failure> {
        let plain = |(conn, caps), relay| Session {
            conn,
            caps,
            tls: TlsOutcome::Plain(reason.clone()),
            relay,
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
                let what = format!("fallback relay {relay}");
                let ip = self
                    .addresses(&relay.host)
                    .await
                    .ok()
                    .and_then(|addrs| addrs.into_iter().next())
                    .ok_or_else(|| Failure::Next(format!("{what}: no address")))?;
                let relay_server = ServerId::new(&relay.host, ip);
                // A failure of the relay is not a fact about the MX: never cached under it.
                let pair = self
                    .greet(&relay_server, SocketAddr::new(ip, relay.port))
                    .await
                    .map_err(|failure| match failure {
                        Failure::Next(why) | Failure::Unreachable(_, why) => {
                            Failure::Next(format!("{what}: {why}"))
                        }
                        other => other,
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
    ) -> Result<(Connection, Capabilities), Failure> {
        let mut conn = self.connect(server, addr).await?;
        self.read_greeting(&mut conn).await.map_err(Failure::Next)?;
        let caps = self.ehlo(&mut conn).await.map_err(Failure::Next)?;
        Ok((conn, caps))
    }

    async fn connect(&self, server: &ServerId, addr: SocketAddr) -> Result<Connection, Failure> {
        Connection::connect_from(
            &server.name,
            addr,
            self.source_address,
            self.timeouts.connect,
        )
        .await
        .map_err(|e| unreachable(&e))
    }

    /// The server's greeting, which must be a 220.
    pub async fn read_greeting(&self, conn: &mut Connection) -> Result<Reply, String> {
        let greeting = conn
            .read_reply(self.timeouts.greeting, "the greeting")
            .await
            .map_err(|e| e.to_string())?;
        if greeting.code != 220 {
            return Err(format!("greeting: {greeting}"));
        }
        Ok(greeting)
    }

    /// Implicit TLS (port 465): the handshake comes before the greeting.
    async fn implicit_tls(
        &self,
        attempt: &Attempt<'_>,
        terms: TlsTerms,
    ) -> Result<Session, Failure> {
        let conn = self.connect(attempt.server, attempt.addr()).await?;
        let t = &self.timeouts;
        let upgraded = conn
            .upgrade(&self.tls, terms.min_tls, t.tls_handshake)
            .await;
        let (outcome, conn) = match upgraded {
            Ok((conn, session)) => (TlsOutcome::Encrypted(session), Some(conn)),
            Err(reason) => (TlsOutcome::Plain(reason), None),
        };
        let found = Known::Found {
            outcome: &outcome,
            downgrade: false,
        };
        match (decide(attempt.rule, found, attempt.published), conn) {
            (HostDecision::Tls(_), Some(mut conn)) => {
                self.read_greeting(&mut conn).await.map_err(Failure::Next)?;
                let caps = self.ehlo(&mut conn).await.map_err(Failure::Next)?;
                Ok(Session {
                    conn,
                    caps,
                    tls: outcome,
                    relay: None,
                })
            }
            (decision, conn) => {
                if let Some(conn) = conn {
                    tokio::spawn(conn.quit());
                }
                Err(Failure::TlsNotAchieved(match decision {
                    HostDecision::Refuse(why) => why,
                    other => other.to_string(),
                }))
            }
        }
    }

    pub async fn ehlo(&self, conn: &mut Connection) -> Result<Capabilities, String> {
        let timeout = self.timeouts.command;
        let ehlo = format!("EHLO {}", self.hostname);
        let reply = conn
            .command(&ehlo, timeout, "the reply to EHLO")
            .await
            .map_err(|e| e.to_string())?;
        if reply.closes_connection() {
            return Err(format!("EHLO: {reply}"));
        }
        if reply.is_positive() {
            return Ok(Capabilities::from_ehlo(&reply));
        }
        let helo = format!("HELO {}", self.hostname);
        let reply = conn
            .command(&helo, timeout, "the reply to HELO")
            .await
            .map_err(|e| e.to_string())?;
        if reply.is_positive() && !reply.closes_connection() {
            Ok(Capabilities::default())
        } else {
            Err(format!("EHLO and HELO refused: {reply}"))
        }
    }

    /// STARTTLS and the handshake, on a connection whose EHLO offered it.
    pub async fn start_tls(&self, terms: TlsTerms, conn: Connection) -> StartTlsResult {
        let t = &self.timeouts;
        let clock = std::time::Instant::now();
        let started = conn
            .starttls(&self.tls, terms.min_tls, t.command, t.tls_handshake)
            .await;
        self.stats.handshake_time(clock.elapsed().as_secs_f64());
        started
    }

    /// Brings the connection to TLS if the remote offers it, with a fresh EHLO after.
    async fn secure(&self, terms: TlsTerms, conn: Connection, caps: Capabilities) -> Secured {
        if !caps.starttls {
            return Secured::Plain(conn, caps, NoTls::NoStarttls);
        }
        let (mut conn, session) = match self.start_tls(terms, conn).await {
            StartTlsResult::Encrypted(conn, session) => (conn, session),
            StartTlsResult::Refused(conn, reason) => return Secured::Plain(conn, caps, reason),
            StartTlsResult::Lost(reason) => return Secured::Lost(reason),
            StartTlsResult::Closed(reply) => return Secured::Closed(format!("STARTTLS: {reply}")),
        };
        // Nothing said before TLS counts after it: a fresh EHLO, fresh capabilities.
        match self.ehlo(&mut conn).await {
            Ok(caps) => Secured::Tls(conn, caps, session),
            Err(why) => Secured::Closed(format!("after TLS: {why}")),
        }
    }

    /// AUTH PLAIN or LOGIN, over TLS only, with credentials read now (so they can rotate).
    async fn authenticate(
        &self,
        conn: &mut Connection,
        caps: &Capabilities,
        auth: &AuthSpec,
    ) -> Result<(), Failure> {
        let defer = |code: &str, text: String| Failure::Deferred(Reply::new(451, code, text));
        if !conn.is_tls() {
            return Err(defer("4.7.5", format!("{}: AUTH only over TLS", conn.host)));
        }
        let (user, password) = crate::outbound::credentials::read(auth)
            .map_err(|e| defer("4.3.5", format!("smarthost credentials: {e}")))?;
        let timeout = self.timeouts.command;
        let what = "the reply to AUTH";
        let exchange = if caps.auth.iter().any(|m| m == "PLAIN") {
            let token = BASE64.encode(format!("\0{user}\0{password}"));
            let line = format!("AUTH PLAIN {token}");
            conn.command_secret(&line, "AUTH PLAIN ****", timeout, what)
                .await
        } else if caps.auth.iter().any(|m| m == "LOGIN") {
            self.auth_login(conn, &user, &password).await
        } else {
            return Err(defer(
                "4.7.0",
                format!("{} offers neither AUTH PLAIN nor LOGIN", conn.host),
            ));
        };
        match exchange {
            Ok(reply) if reply.code == 235 => Ok(()),
            Ok(reply) => Err(defer(
                "4.7.0",
                format!("{} refused AUTH: {reply}", conn.host),
            )),
            Err(e) => Err(Failure::Next(format!("during AUTH: {e}"))),
        }
    }

    async fn auth_login(
        &self,
        conn: &mut Connection,
        user: &str,
        password: &str,
    ) -> Result<Reply, ExchangeError> {
        let timeout = self.timeouts.command;
        let what = "the reply to AUTH LOGIN";
        let reply = conn.command("AUTH LOGIN", timeout, what).await?;
        if reply.code != 334 {
            return Ok(reply);
        }
        let reply = conn
            .command_secret(&BASE64.encode(user), "(username)", timeout, what)
            .await?;
        if reply.code != 334 {
            return Ok(reply);
        }
        conn.command_secret(&BASE64.encode(password), "(password)", timeout, what)
            .await
    }
}

/// What a domain's MTA-STS policy is to one of its servers.
pub fn published(policy: Option<&StsPolicy>, server: &str) -> Published {
    let Some(policy) = policy else {
        return Published::Nothing;
    };
    let mode = match policy.mode {
        Mode::Enforce => StsMode::Enforce,
        Mode::Testing => StsMode::Testing,
        Mode::None => return Published::Nothing,
    };
    Published::MtaSts {
        mode,
        mx_listed: policy.mx_matches(server),
    }
}

fn site(server: &ServerId) -> SessionSite {
    SessionSite {
        receiving_mx: Some(server.name.clone()),
        receiving_ip: Some(server.addr),
        sending_ip: None,
    }
}

fn unreachable(error: &ExchangeError) -> Failure {
    match error {
        ExchangeError::Timeout(..) => {
            Failure::Unreachable(OutcomeClass::Timeout, error.to_string())
        }
        ExchangeError::Io(e) => {
            Failure::Unreachable(OutcomeClass::ConnectFailed, format!("connect failed: {e}"))
        }
        other => Failure::Unreachable(OutcomeClass::ConnectFailed, other.to_string()),
    }
}
