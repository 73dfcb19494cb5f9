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
use crate::net::connection::{Connection, ExchangeError, StartTlsResult};
use crate::net::dane::TlsaRecord;
use crate::net::dns::{
    AddressError, Dnssec, MxHost, MxResolver, RouteError, ServerId, TlsaAnswer, literal_address,
};
use crate::net::tls::TlsClient;
use crate::outbound::pool::{Idle, Lineage, Pool, PoolConfig, PoolKey};
use crate::outbound::upstream::{FirstReply, RemoteFacts, Upstream, relayable};
use crate::outcome::{NoTls, OutcomeClass, TlsOutcome, TlsSession, Verification};
use crate::policy::mta_sts::{Mode, PolicyLookup, StsPolicy};
use crate::policy::tlsrpt::{PolicyFacts, SessionResult, SessionSite, TlsReports};
use crate::router::Plan;
use crate::router::decision::{
    Authentication, Connected, DaneState, HostDecision, Known, Published, StsMode, TlsTerms,
    decide, is_fact_about_server, overridden,
};
use crate::rules::model::{AuthSpec, HostPort};
use crate::rules::{Fallback, Route, Rule, VerifyMode};
use crate::settings::Timeouts;
use crate::smtp::data::BareLineEndings;
use crate::smtp::{Capabilities, Mailbox, MissingExtension, RcptParams, Reply};
use crate::stats::Stats;

/// `delivery:` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// The port of remote MX servers: 25 on the Internet, anything in a lab.
    pub port: u16,
    /// What to do with a bare CR or LF in a message body.
    pub bare_line_endings: BareLineEndings,
    /// `SO_MARK` on every outbound connection, so that a transparent redirect can let
    /// ours pass (needs `CAP_NET_ADMIN`).
    pub socket_mark: Option<u32>,
    /// Keeping remote connections for later messages.
    pub pool: PoolConfig,
    /// The local address connections to remote servers come from; none: the system's
    /// choice.
    pub source_address: Option<std::net::IpAddr>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            port: 25,
            bare_line_endings: BareLineEndings::Normalize,
            socket_mark: None,
            pool: PoolConfig::default(),
            source_address: None,
        }
    }
}

/// Everything the outbound side needs, shared by all sessions.
pub struct Outbound {
    pub resolver: Arc<MxResolver>,
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
    /// `delivery.socket_mark`.
    pub socket_mark: Option<u32>,
    /// Remote connections kept between transactions.
    pub pool: Arc<Pool>,
    /// `delivery.source_address`.
    pub source_address: Option<std::net::IpAddr>,
}

/// Where a transaction goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// The recipient domain's mail exchangers, best first.
    Mx(Vec<MxHost>),
    Smarthost(HostPort),
    /// The address a redirected MTA connection was going to (transparent mode), with the
    /// recipient domain's MX name that has this address, if one has.
    OriginalDestination {
        addr: SocketAddr,
        mx: Option<String>,
        /// Whether the MX answer that gave `mx` was DNSSEC-secure.
        mx_dnssec: Dnssec,
    },
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
            NextHop::OriginalDestination { addr, .. } => vec![addr.to_string()],
        }
    }

    /// Whether the recipient domain's published policy binds this hop (not a smart host's).
    pub fn is_domain_delivery(&self) -> bool {
        !matches!(self, NextHop::Smarthost(_))
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
    /// What judged the certificate of a rustls session.
    authentication: Authentication,
    /// The server did TLS recently and this attempt did not get it.
    downgrade: bool,
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
    /// A connection greeted before the transaction (transparent mode), not yet used.
    greeted: &'a std::sync::Mutex<Option<(Connection, Capabilities)>>,
    /// The recipient to pipeline with MAIL FROM, where the remote allows it.
    first_recipient: Option<(&'a Mailbox, &'a RcptParams)>,
    /// The server's usable TLSA records, when DANE applies.
    tlsa: &'a [TlsaRecord],
    /// All its TLSA records in presentation form, for TLS-RPT.
    tlsa_records: &'a [String],
}

impl Attempt<'_> {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.server.addr, self.port)
    }

    /// The connection greeted in advance, if it goes to this attempt's server; it takes the
    /// server's name, which its TLS handshake verifies.
    fn take_greeted(&self) -> Option<(Connection, Capabilities)> {
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
}

/// Whether the decision's first try (`decide` with nothing known) requires a certificate
/// verified for the server's name of an original destination that no MX host names, so
/// that it cannot succeed.
fn no_mx_name(hop: &NextHop, first_try: &HostDecision) -> bool {
    let name_verified = matches!(
        first_try,
        HostDecision::Tls(TlsTerms {
            verify: VerifyMode::Require,
            authentication: Authentication::Pkix | Authentication::UnusableTlsa,
            ..
        })
    );
    name_verified && matches!(hop, NextHop::OriginalDestination { mx: None, .. })
}

/// Whether the connection made at accept is to `addr`.
fn is_connected(
    greeted: &std::sync::Mutex<Option<(Connection, Capabilities)>>,
    addr: SocketAddr,
) -> bool {
    (greeted.lock()).is_ok_and(|slot| slot.as_ref().is_some_and(|(conn, _)| conn.peer == addr))
}

/// A remote connected at accept for a transparent session: its greeting and EHLO reply
/// are what the MTA is shown, and the connection serves the session's first transaction.
pub struct Greeted {
    conn: Connection,
    caps: Capabilities,
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
    Failed(String),
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
                dnssec: Dnssec::Insecure,
            }]));
        }
        self.resolver.mail_exchangers(domain).await.map(NextHop::Mx)
    }

    /// Where a transaction for `domain` goes when the MTA was connecting to `addr` and was
    /// redirected to us. A rule's smart-host route still wins; otherwise the next hop is
    /// `addr`, named by the MX of `domain` that has this address, so that the certificate
    /// and the domain's policy are checked against that name.
    ///
    /// With DANE in force, a failed lookup that could tell whether DANE applies (the MX
    /// answer, or the address answer of a host named by a secure one) is an error: whoever
    /// can drop one DNS answer must not take DANE away.
    pub async fn original_destination_hop(
        &self,
        plan: &Plan,
        domain: &str,
        addr: SocketAddr,
    ) -> Result<NextHop, RouteError> {
        if let Route::Smarthost { server, .. } = plan.route() {
            return Ok(NextHop::Smarthost(server.clone()));
        }
        let dane = self.resolver.check_dnssec().await;
        let hosts = match self.resolver.mail_exchangers(domain).await {
            Ok(hosts) => hosts,
            Err(RouteError::DnsTemporary { detail, .. }) if dane => {
                return Err(RouteError::DaneUnknown {
                    lookup: format!("MX lookup of {domain}"),
                    server: addr.ip().to_string(),
                    detail,
                });
            }
            Err(e) => {
                tracing::info!(
                    domain,
                    "no MX set to name the original destination {addr}: {e}"
                );
                Vec::new()
            }
        };
        let mx = self.mx_with_address(&hosts, addr.ip(), dane).await?;
        let (mx, mx_dnssec) = mx.map_or((None, Dnssec::Insecure), |host| {
            (Some(host.name), host.dnssec)
        });
        if mx.is_none() {
            tracing::warn!(
                domain,
                "the original destination {addr} is no MX host of {domain}: its certificate cannot be verified for an MX name (tls-unverified at best)"
            );
        }
        Ok(NextHop::OriginalDestination {
            addr,
            mx,
            mx_dnssec,
        })
    }

    /// The first of `hosts` (best first) that has the address `ip`. With `dane`, a host
    /// named by a secure MX answer whose address lookup fails before one is found stops
    /// the search: it might be the one, and DANE would apply to it.
    async fn mx_with_address(
        &self,
        hosts: &[MxHost],
        ip: std::net::IpAddr,
        dane: bool,
    ) -> Result<Option<MxHost>, RouteError> {
        for host in hosts {
            let found = match literal_address(&host.name) {
                Some(literal) => Ok(vec![literal]),
                None => (self.resolver.addresses_like(&host.name, ip).await).map(|(a, _)| a),
            };
            match found {
                Ok(addrs) if addrs.contains(&ip) => return Ok(Some(host.clone())),
                Ok(_) | Err(AddressError::NotFound) => {}
                Err(AddressError::Temporary(detail)) if dane && host.dnssec == Dnssec::Secure => {
                    return Err(RouteError::DaneUnknown {
                        lookup: format!("address lookup of {}", host.name),
                        server: ip.to_string(),
                        detail,
                    });
                }
                Err(AddressError::Temporary(_)) => {}
            }
        }
        Ok(None)
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
        self.open_for(plan, domain, hop, policy, None, None, mail_from)
            .await
    }

    /// Connects to `addr`, reads its greeting and says EHLO: a transparent session does
    /// this at accept, so that the MTA sees the remote's own greeting and capabilities.
    pub async fn greet_at_accept(&self, addr: SocketAddr) -> Greeting {
        let server = ServerId::new(&addr.ip().to_string(), addr.ip());
        let mut conn = match self.connect(&server, addr).await {
            Ok(conn) => conn,
            Err(Failure::Unreachable(_, why) | Failure::Next(why)) => return Greeting::Failed(why),
            Err(_) => return Greeting::Failed("connection failed".into()),
        };
        let greeting = match conn
            .read_reply(self.timeouts.greeting, "the greeting")
            .await
        {
            Ok(greeting) => greeting,
            Err(e) => return Greeting::Failed(e.to_string()),
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
                return Greeting::Failed(format!("EHLO: {reply}"));
            }
            Err(e) => return Greeting::Failed(e.to_string()),
        };
        let caps = Capabilities::from_ehlo(&ehlo);
        Greeting::Greeted(Box::new(Greeted {
            conn,
            caps,
            greeting,
            ehlo,
        }))
    }

    /// As [`Outbound::open`], with what a session may bring: `greeted`, the connection a
    /// transparent session made at accept (the first attempt to that server goes on it, its
    /// STARTTLS or plain path still to come); `first`, the first recipient, which goes with
    /// MAIL FROM in one write to a remote that offers PIPELINING (its reply waits in the
    /// upstream for `Upstream::recipient`).
    #[allow(clippy::too_many_arguments)]
    pub async fn open_for(
        &self,
        plan: &Plan,
        domain: &str,
        hop: &NextHop,
        policy: &PolicyLookup,
        greeted: Option<Box<Greeted>>,
        first: Option<(&Mailbox, &RcptParams)>,
        mail_from: impl Fn(&Capabilities) -> Result<String, MissingExtension> + Sync,
    ) -> Result<Upstream, OpenError> {
        let greeted = std::sync::Mutex::new(greeted.map(|g| (g.conn, g.caps)));
        let opened = self
            .open_with(plan, domain, hop, policy, &greeted, first, &mail_from)
            .await;
        if let Some((conn, _)) = greeted.lock().ok().and_then(|mut slot| slot.take()) {
            tokio::spawn(conn.quit());
        }
        opened
    }

    #[allow(clippy::too_many_arguments)]
    async fn open_with(
        &self,
        plan: &Plan,
        domain: &str,
        hop: &NextHop,
        policy: &PolicyLookup,
        greeted: &std::sync::Mutex<Option<(Connection, Capabilities)>>,
        first: Option<(&Mailbox, &RcptParams)>,
        mail_from: &(dyn Fn(&Capabilities) -> Result<String, MissingExtension> + Sync),
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
        // The last refusal for a missing extension, and how many servers gave one.
        let (mut unsupported, mut unsupported_count) = (None, 0);
        let mut tls_rule = plan.base_rule().name.clone();
        for (host, port, mx_secure) in servers {
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
                        Err(AddressError::Temporary(e)) if mx_secure => {
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
                Err(e) => {
                    failures.push(format!("{host}: {e}"));
                    continue;
                }
            };
            let Dane {
                published: dane,
                usable: tlsa,
                presentation: tlsa_records,
            } = if let Some(why) = dane_unknown.take() {
                tracing::warn!(
                    host,
                    "DANE: the address lookup failed ({why}); nothing is sent to this host until it can be had"
                );
                Dane {
                    published: Some(Published::Dane(DaneState::Bogus)),
                    ..Dane::default()
                }
            } else if mx_secure && addr_dnssec == Dnssec::Secure {
                self.dane(&host, port).await
            } else {
                Dane::default()
            };
            for ip in addrs {
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
                let mut decision = decide(rule, known, published);
                let stale = cached.as_ref().is_some_and(|e| !e.pinned);
                if stale
                    && matches!(decision, HostDecision::Skip(_))
                    && is_connected(greeted, SocketAddr::new(ip, port))
                {
                    // Connected at accept moments ago: "unreachable" from before is stale,
                    // and the attempt's outcome will replace it.
                    decision = decide(rule, Known::Nothing, published);
                }
                if decision != decide(rule, Known::Nothing, published) {
                    self.stats.cache_hits.inc();
                }
                if let HostDecision::Skip(why) = &decision {
                    failures.push(format!("{server}: {why}"));
                    continue;
                }
                if published == Published::Dane(DaneState::Bogus) {
                    // Refused before any connection: counted here, as RFC 8460's
                    // dnssec-invalid, under the TLSA policy that could not be had.
                    (self.tls_reports).record(
                        domain,
                        &PolicyFacts::tlsa(&tlsa_records, &server.name),
                        &SessionResult::dnssec_invalid(),
                        &site(&server),
                    );
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
                    greeted,
                    first_recipient: first,
                    tlsa: &tlsa,
                    tlsa_records: &tlsa_records,
                };
                // The connection made at accept comes first; else a pooled one that fits.
                let has_greeted = greeted.lock().is_ok_and(|slot| slot.is_some());
                let reused = match has_greeted {
                    true => None,
                    false => self.reuse(&attempt, mail_from).await,
                };
                let attempted = match reused {
                    Some(reused) => Ok(reused),
                    None => (self.attempt(&attempt, mail_from).await)
                        .map(|(session, first)| (session, Lineage::fresh(), first)),
                };
                match attempted {
                    Ok((session, lineage, first_reply)) => {
                        failures.extend(tls_failures);
                        let key = self.pool_key(&attempt, &session);
                        let facts = RemoteFacts {
                            server,
                            relay: session.relay,
                            tls: session.tls,
                            authentication: session.authentication,
                            downgrade: session.downgrade,
                            rule: rule.name.clone(),
                            cached_classes: classes,
                            published,
                            earlier_failures: failures,
                            reused: false,
                        };
                        let timeouts = self.timeouts.clone();
                        let upstream = Upstream::new(session.conn, session.caps, facts, timeouts);
                        let upstream = upstream.poolable(key, lineage);
                        return Ok(match first_reply {
                            Some(reply) => upstream.with_first_reply(reply),
                            None => upstream,
                        });
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
                        let failure = format!("{server} {why}");
                        let first_try = decide(rule, Known::Nothing, published);
                        tls_failures.push(match no_mx_name(hop, &first_try) {
                            // The cause, first: the MTA's queue shows it before any cut.
                            true => format!("{ip} is no MX host of {domain}: the certificate cannot be verified for an MX name ({failure})"),
                            false => failure,
                        });
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

    /// Whether a recipient at `domain` (planned as `plan`, through `hop`) may ride on the
    /// transaction's open `route`. Its domain is judged on its own: what it publishes for
    /// the route's server (DANE, MTA-STS), with the route's own TLS as what was found, must
    /// lead the one decision to that very connection. `Err` says what its domain needs
    /// instead; the MTA is then told to send it in another transaction.
    pub async fn joins(
        &self,
        route: &RemoteFacts,
        plan: &Plan,
        domain: &str,
        hop: &NextHop,
        policy: &PolicyLookup,
    ) -> Result<(), String> {
        let (name, port) = match hop {
            // What the domain publishes does not bind a smart host (RFC 8461 3.4).
            NextHop::Smarthost(_) => return Ok(()),
            NextHop::Mx(_) => (route.server.name.clone(), self.port),
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
            return Err(format!(
                "rule {:?} decides for it, not {:?}",
                rule.name, route.rule
            ));
        }
        if overridden(rule, published) {
            tracing::warn!(server = %server, rule = %rule.name, domain, "rule overrides the domain's published policy ({})", published.name().unwrap_or("none"));
        }
        let found = Known::Found {
            outcome: &route.tls,
            downgrade: route.downgrade,
        };
        let decision = decide(rule, found, published);
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
            HostDecision::Refuse(why) | HostDecision::Skip(why) => why,
            other => format!("its domain needs {other} with {server}"),
        })
    }

    /// What `server`'s domain publishes for it, reached through `hop`: DANE where the MX
    /// and address answers that name it were DNSSEC-secure (before MTA-STS), else what its
    /// MTA-STS `policy` says of it.
    async fn published_for(
        &self,
        hop: &NextHop,
        server: &ServerId,
        port: u16,
        policy: Option<&StsPolicy>,
    ) -> Published {
        let mx_secure = match hop {
            NextHop::Mx(hosts) => {
                (hosts.iter()).any(|h| h.name == server.name && h.dnssec == Dnssec::Secure)
            }
            NextHop::OriginalDestination { mx, mx_dnssec, .. } => {
                mx.as_deref() == Some(server.name.as_str()) && *mx_dnssec == Dnssec::Secure
            }
            NextHop::Smarthost(_) => false,
        };
        let dane = match mx_secure {
            false => None,
            true => match self
                .resolver
                .addresses_like(&server.name, server.addr)
                .await
            {
                Ok((found, Dnssec::Secure)) if found.contains(&server.addr) => {
                    self.dane(&server.name, port).await.published
                }
                Ok((_, Dnssec::Insecure)) => None,
                // Whether DANE applies cannot be known: as a failed TLSA lookup.
                _ => Some(Published::Dane(DaneState::Bogus)),
            },
        };
        dane.unwrap_or_else(|| published(policy, &server.name))
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

    /// Where a connection this attempt made could be pooled: never one to a relay, one that
    /// authenticated (its credentials are not part of the key), or a legacy-stack session.
    fn pool_key(&self, attempt: &Attempt<'_>, session: &Session) -> Option<PoolKey> {
        let authenticated = matches!(attempt.route, Route::Smarthost { auth: Some(_), .. });
        // A DANE session is judged by its TLSA records, which the pool does not keep.
        if !self.pool.config.enabled
            || authenticated
            || session.relay.is_some()
            || matches!(session.tls, TlsOutcome::Legacy(_))
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
    /// deliver under when the decision, asked as if the connection had just been made (the
    /// memory of TLS included), would have chosen it; `None` when it has less (or other).
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
        let found = decide(attempt.rule, found, attempt.published);
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

    /// Whether the domain's MX answer is DNSSEC-secure, when DANE is in force: for
    /// `explain` and `probe`, which have no next hop (delivery has it from the MX answer).
    async fn mx_secure(&self, domain: &str) -> bool {
        if domain.starts_with('[') || !self.resolver.check_dnssec().await {
            return false;
        }
        matches!(
            self.resolver.mail_exchangers_checked(domain).await,
            Ok((_, Dnssec::Secure))
        )
    }

    /// What DANE says of a host whose MX and address answers were secure: its published
    /// policy (none when it has no secure TLSA records), its usable records, and all.
    async fn dane(&self, host: &str, port: u16) -> Dane {
        let answer = self.resolver.tlsa(host, port).await;
        match &answer {
            TlsaAnswer::Records {
                usable, unusable, ..
            } if usable.is_empty() => {
                let why: Vec<String> = unusable.iter().map(|(r, e)| format!("{r}: {e}")).collect();
                tracing::info!(
                    host,
                    "DANE: no usable TLSA record ({}); TLS required, unauthenticated",
                    why.join("; ")
                );
            }
            TlsaAnswer::Failed(why) => {
                tracing::warn!(
                    host,
                    "DANE: {why}; nothing is sent to this host until it can be had"
                );
            }
            _ => {}
        }
        let published = dane_published(&answer);
        let (usable, presentation) = match answer {
            TlsaAnswer::Records {
                usable,
                presentation,
                ..
            } => (usable, presentation),
            _ => (Vec::new(), Vec::new()),
        };
        Dane {
            published,
            usable,
            presentation,
        }
    }

    /// What DANE says of `host` as an MX of `domain` now, for `explain` and `probe`:
    /// `None` when DANE is off or does not apply (an insecure answer, no TLSA records).
    pub async fn dane_policy(&self, domain: &str, host: &str) -> Option<Published> {
        if !self.mx_secure(domain).await {
            return None;
        }
        match self.addresses_checked(host).await {
            Ok((_, Dnssec::Secure)) => self.dane(host, self.port).await.published,
            _ => None,
        }
    }

    /// A pooled connection for this attempt, up to the remote's acceptance of MAIL FROM.
    /// One that turns out dead (or answers anything but 250) is closed and the next is
    /// tried; `None` when none is left, and the attempt connects anew: nothing was
    /// committed, so the MTA never hears of it.
    async fn reuse(
        &self,
        attempt: &Attempt<'_>,
        mail_from: &(dyn Fn(&Capabilities) -> Result<String, MissingExtension> + Sync),
    ) -> Option<(Session, Lineage, Option<FirstReply>)> {
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
            let fits = |idle: &Idle| {
                self.fitting(attempt, &idle.tls).is_some() && mail_from(&idle.caps).is_ok()
            };
            let taken = self.pool.take(&key, fits);
            self.stats.pool_idle.set(self.pool.len() as i64);
            let mut idle = taken?;
            let (tls, downgrade) = self.fitting(attempt, &idle.tls)?;
            let command = mail_from(&idle.caps).ok()?;
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
                    .mail_from(conn, &idle.caps, &command, attempt.first_recipient)
                    .await;
                let why = match accepted {
                    Ok((reply, first)) if reply.code == 250 => {
                        self.stats.pool_reuses.inc();
                        let lineage = Lineage {
                            opened: idle.lineage.opened,
                            messages: idle.lineage.messages + 1,
                            reused: true,
                        };
                        let session = Session {
                            conn: idle.conn,
                            caps: idle.caps,
                            tls,
                            relay: None,
                            authentication: Authentication::Pkix,
                            downgrade,
                        };
                        return Some((session, lineage, first));
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

    async fn addresses_checked(
        &self,
        host: &str,
    ) -> Result<(Vec<std::net::IpAddr>, Dnssec), AddressError> {
        match literal_address(host) {
            Some(ip) => Ok((vec![ip], Dnssec::Insecure)),
            None => self.resolver.addresses_checked(host).await,
        }
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
    ) -> Result<(Session, Option<FirstReply>), Failure> {
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
        let (reply, first) = self
            .mail_from(conn, caps, &command, attempt.first_recipient)
            .await
            .map_err(|e| Failure::Next(e.to_string()))?;
        if reply.closes_connection() {
            return Err(Failure::Next(format!("MAIL FROM: {reply}")));
        }
        if !reply.is_positive() {
            tokio::spawn(session.conn.quit());
            return Err(Failure::Final(reply));
        }
        Ok((session, first))
    }

    /// MAIL FROM; to a remote that offers PIPELINING, with the first recipient in the same
    /// write (RFC 2920), its reply read after MAIL FROM's and kept for the upstream.
    async fn mail_from(
        &self,
        conn: &mut Connection,
        caps: &Capabilities,
        command: &str,
        first: Option<(&Mailbox, &RcptParams)>,
    ) -> Result<(Reply, Option<FirstReply>), ExchangeError> {
        let timeout = self.timeouts.command;
        let what = "the reply to MAIL FROM";
        let Some((recipient, params)) = first.filter(|_| caps.pipelining) else {
            let reply = conn.exchange(command, &[250], timeout, what).await?;
            return Ok((reply, None));
        };
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
    async fn session(&self, attempt: &Attempt<'_>) -> Result<Session, Failure> {
        let terms = match &attempt.decision {
            HostDecision::Tls(terms) => *terms,
            HostDecision::Plain { reason, path } => {
                let open = attempt.take_greeted();
                return self.plain_path(path, open, attempt, reason.clone()).await;
            }
            HostDecision::LegacyTls => return self.legacy(attempt).await,
            HostDecision::Refuse(why) => return Err(Failure::TlsNotAchieved(why.clone())),
            HostDecision::Skip(why) => return Err(Failure::Next(why.clone())),
        };
        if terms.implicit {
            return self.implicit_tls(attempt, terms).await;
        }
        let (conn, caps) = match attempt.take_greeted() {
            Some(greeted) => greeted,
            None => self.greet(attempt.server, attempt.addr()).await?,
        };
        let authentication = match attempt.published == Published::Dane(DaneState::Usable)
            && !overridden(attempt.rule, attempt.published)
        {
            true => Authentication::Tlsa,
            false => Authentication::Pkix,
        };
        let secured = match authentication {
            Authentication::Tlsa => self.secure_dane(terms, conn, caps, attempt.tlsa).await,
            _ => self.secure(terms, conn, caps).await,
        };
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
                authentication,
                downgrade,
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
                let plain = self.plain_path(&path, open, attempt, reason).await;
                plain.map(|session| Session {
                    downgrade,
                    ..session
                })
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
        let decision = decide(attempt.rule, found, attempt.published);
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
                authentication: Authentication::Pkix,
                downgrade: false,
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
                let plain = self.plain_path(&path, open, attempt, reason).await;
                plain.map(|session| Session {
                    downgrade,
                    ..session
                })
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
            let site = site(attempt.server);
            (self.tls_reports).record(attempt.domain, &facts, &result, &site);
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
        Connection::connect_with(
            &server.name,
            addr,
            self.timeouts.connect,
            self.socket_mark,
            self.source_address,
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
                    authentication: Authentication::Pkix,
                    downgrade: false,
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

    /// As [`Outbound::secure`], with the certificate judged by the host's TLSA records.
    async fn secure_dane(
        &self,
        terms: TlsTerms,
        conn: Connection,
        caps: Capabilities,
        tlsa: &[TlsaRecord],
    ) -> Secured {
        if !caps.starttls {
            return Secured::Plain(conn, caps, NoTls::NoStarttls);
        }
        let t = &self.timeouts;
        let clock = std::time::Instant::now();
        let started = conn
            .starttls_dane(
                &self.tls,
                terms.min_tls,
                tlsa.to_vec(),
                t.command,
                t.tls_handshake,
            )
            .await;
        self.stats.handshake_time(clock.elapsed().as_secs_f64());
        let (mut conn, session) = match started {
            StartTlsResult::Encrypted(conn, session) => (conn, session),
            StartTlsResult::Refused(conn, reason) => return Secured::Plain(conn, caps, reason),
            StartTlsResult::Lost(reason) => return Secured::Lost(reason),
            StartTlsResult::Closed(reply) => return Secured::Closed(format!("STARTTLS: {reply}")),
        };
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

/// What DANE says of one MX host.
#[derive(Default)]
struct Dane {
    /// `None`: DANE does not apply.
    published: Option<Published>,
    usable: Vec<TlsaRecord>,
    /// Every TLSA record in presentation form.
    presentation: Vec<String>,
}

/// What a secure MX host's TLSA answer publishes (RFC 7672 2.2); `None`: no DANE.
pub fn dane_published(answer: &TlsaAnswer) -> Option<Published> {
    match answer {
        TlsaAnswer::Records { usable, .. } if !usable.is_empty() => {
            Some(Published::Dane(DaneState::Usable))
        }
        TlsaAnswer::Records { .. } => Some(Published::Dane(DaneState::Unusable)),
        TlsaAnswer::None | TlsaAnswer::Insecure => None,
        TlsaAnswer::Failed(_) => Some(Published::Dane(DaneState::Bogus)),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> Rule {
        let rules =
            crate::rules::RuleSet::parse(yaml, std::path::Path::new("r.yaml")).expect("rules");
        rules.rules()[0].clone()
    }

    #[test]
    fn an_unnamed_original_destination_is_the_cause_only_where_the_decision_verifies_its_name() {
        let unnamed = NextHop::OriginalDestination {
            addr: "192.0.2.25:25".parse().expect("address"),
            mx: None,
            mx_dnssec: Dnssec::Insecure,
        };
        let named = NextHop::OriginalDestination {
            addr: "192.0.2.25:25".parse().expect("address"),
            mx: Some("mx.example".into()),
            mx_dnssec: Dnssec::Insecure,
        };
        let enforce = Published::MtaSts {
            mode: StsMode::Enforce,
            mx_listed: true,
        };
        let strict = rule("rules:\n  - name: r\n    tls: require\n    verify: require\n");
        let lenient = rule("rules:\n  - name: r\n");
        let first_try = |rule: &Rule, published| decide(rule, Known::Nothing, published);
        assert!(no_mx_name(
            &unnamed,
            &first_try(&strict, Published::Nothing)
        ));
        assert!(no_mx_name(&unnamed, &first_try(&lenient, enforce)));
        assert!(!no_mx_name(
            &unnamed,
            &first_try(&lenient, Published::Nothing)
        ));
        assert!(!no_mx_name(&named, &first_try(&strict, Published::Nothing)));
        // DANE judges by the TLSA records, not the name.
        let dane = Published::Dane(DaneState::Usable);
        assert!(!no_mx_name(&unnamed, &first_try(&lenient, dane)));
    }
}
