//! Carrying out a plan: try each next-hop host and address in turn until one accepts MAIL
//! FROM, with STARTTLS, classification of what went wrong, and the plain fallback path the
//! host's rule allows (the same server, or a relay).

use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use std::sync::Arc;

use crate::cache::{CacheEntry, Observation, OutcomeCache, is_unreachable};
use crate::config::Timeouts;
use crate::outbound::connection::{Connection, ExchangeError, StartTlsResult};
use crate::outbound::mx::{AddressError, MxHost, MxResolver, RouteError};
use crate::outbound::tls::{MinTls, TlsClient};
use crate::outcome::{NoTls, OutcomeClass, TlsOutcome, TlsSession, Verification};
use crate::router::{Plan, TlsMode, VerifyMode};
use crate::rules::model::{AuthSpec, HostPort, SmarthostTls};
use crate::rules::{Fallback, OnDowngrade, Route, Rule};
use crate::smtp::{Capabilities, MissingExtension, Reply};
use crate::stats::Stats;

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

/// A remote transaction that has accepted MAIL FROM.
pub struct Upstream {
    pub conn: Connection,
    pub caps: Capabilities,
    pub tls: TlsOutcome,
    /// The rule that applied to this host.
    pub rule: String,
    /// The next-hop server the attempt was for, `name[ip]` (the connection may be to a
    /// fallback relay instead).
    pub next_hop: String,
    /// Attempts that failed before this one, for the log.
    pub earlier_failures: Vec<String>,
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
            OpenError::Rejected { reply, .. } => crate::inbound::relayable(reply),
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

enum Secured {
    Tls(Connection, Capabilities, TlsSession),
    Plain(Connection, Capabilities, NoTls),
    /// The connection is gone; a plain fallback needs a new one.
    Lost(NoTls),
    /// The server ended the session at STARTTLS (421/221), or failed the EHLO after TLS: a
    /// temporary failure of this server, not a TLS fact about it. Try the next server.
    Closed(String),
}

/// One delivery attempt: the rule for this host, the route, the server, and what the cache
/// knew of it beforehand.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    rule: &'a Rule,
    route: &'a Route,
    target: &'a Target,
    domain: &'a str,
    cached: Option<&'a CacheEntry>,
}

/// One server to try: the name it is known by (for TLS and logs) and where it listens.
#[derive(Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
}

impl Outbound {
    /// Where a transaction for `domain` goes under `plan`.
    pub async fn next_hop(&self, plan: &Plan, domain: &str) -> Result<NextHop, RouteError> {
        if let Route::Smarthost { server, .. } = plan.route() {
            return Ok(NextHop::Smarthost(server.clone()));
        }
        if domain.starts_with('[') {
            let name = domain.to_string();
            return Ok(NextHop::Mx(vec![MxHost {
                name,
                preference: 0,
            }]));
        }
        self.resolver.mail_exchangers(domain).await.map(NextHop::Mx)
    }

    /// Opens a remote transaction: the first host and address that accepts MAIL FROM wins.
    /// `mail_from` writes the command for the capabilities the remote announced, or says
    /// which one the message needs and the remote lacks.
    pub async fn open(
        &self,
        plan: &Plan,
        domain: &str,
        hop: &NextHop,
        mail_from: impl Fn(&Capabilities) -> Result<String, MissingExtension> + Sync,
    ) -> Result<Upstream, OpenError> {
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
                let target = Target {
                    name: host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                    addr: SocketAddr::new(ip, port),
                };
                let server = format!("{host}[{ip}]");
                let cached = self.cache.get(&host, ip);
                if let Some(entry) = cached.as_ref().filter(|e| is_unreachable(e.class)) {
                    self.stats.cache_hits.inc();
                    failures.push(format!(
                        "{server}: {} (cached, retried after it expires)",
                        entry.detail
                    ));
                    continue;
                }
                let classes = cached.as_ref().map(CacheEntry::classes).unwrap_or_default();
                let rule = plan.rule_for_host(&host, &classes);
                let attempt = Attempt {
                    rule,
                    route: plan.route(),
                    target: &target,
                    domain,
                    cached: cached.as_ref(),
                };
                match self.attempt(&attempt, &mail_from).await {
                    Ok(mut upstream) => {
                        upstream.next_hop = server;
                        failures.extend(tls_failures);
                        upstream.earlier_failures = failures;
                        return Ok(upstream);
                    }
                    Err(Failure::Next(why)) => {
                        tracing::info!(server = %server, "delivery attempt failed: {why}");
                        failures.push(format!("{server}: {why}"));
                    }
                    Err(Failure::Unreachable(class, why)) => {
                        tracing::info!(server = %server, "delivery attempt failed: {why}");
                        self.cache
                            .record(&host, ip, domain, Observation::unreachable(class, &why));
                        failures.push(format!("{server}: {why}"));
                    }
                    Err(Failure::TlsNotAchieved(why)) => {
                        tracing::warn!(server = %server, rule = %rule.name, "TLS required but not achieved: {why}");
                        tls_failures.push(format!("{server} {why}"));
                        tls_rule = rule.name.clone();
                    }
                    Err(Failure::Final(reply)) => {
                        return Err(OpenError::Rejected { reply, server });
                    }
                    Err(Failure::Unsupported(reply)) => {
                        tracing::info!(server = %server, "delivery attempt failed: {reply}");
                        failures.push(format!("{server}: {reply}"));
                        unsupported = Some((reply, server));
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

    async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, AddressError> {
        let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        let literal = literal
            .map(|l| l.strip_prefix("IPv6:").unwrap_or(l))
            .unwrap_or(host);
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        self.resolver.addresses(host).await
    }

    async fn attempt(
        &self,
        attempt: &Attempt<'_>,
        mail_from: &(dyn Fn(&Capabilities) -> Result<String, MissingExtension> + Sync),
    ) -> Result<Upstream, Failure> {
        let (rule, route) = (attempt.rule, attempt.route);
        let (mut conn, caps, tls) = self.session(attempt).await?;
        if let Route::Smarthost {
            auth: Some(auth), ..
        } = route
        {
            self.authenticate(&mut conn, &caps, auth).await?;
        }
        let command = match mail_from(&caps) {
            Ok(command) => command,
            Err(missing) => {
                let why = Reply::new(554, "5.6.9", format!("{} {missing}", conn.host));
                tokio::spawn(conn.quit());
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
            tokio::spawn(conn.quit());
            return Err(Failure::Final(reply));
        }
        Ok(Upstream {
            conn,
            caps,
            tls,
            rule: rule.name.clone(),
            next_hop: String::new(),
            earlier_failures: Vec::new(),
        })
    }

    /// A greeted connection, encrypted or on the plain path the rule allows, and why.
    async fn session(
        &self,
        attempt: &Attempt<'_>,
    ) -> Result<(Connection, Capabilities, TlsOutcome), Failure> {
        let Attempt { rule, target, .. } = *attempt;
        if let Route::Smarthost {
            tls: SmarthostTls::Wrapper,
            ..
        } = attempt.route
        {
            return self.implicit_tls(rule, target).await;
        }
        if rule.policy.tls == TlsMode::Never {
            let (conn, caps) = self.plain_path(rule, None, target).await?;
            return Ok((conn, caps, TlsOutcome::Plain(NoTls::NotWanted)));
        }
        if let Some(reason) = attempt.cached.and_then(|entry| skip_tls(rule, entry)) {
            self.stats.cache_hits.inc();
            allow_plain(rule, &reason)?;
            let (conn, caps) = self.plain_path(rule, None, target).await?;
            return Ok((conn, caps, TlsOutcome::Plain(reason)));
        }
        let (conn, caps) = self.greet(target).await?;
        let secured = self.secure(rule, conn, caps).await;
        self.check_downgrade(attempt, &secured)?;
        self.remember(attempt, &secured);
        match secured {
            Secured::Tls(conn, caps, session) => Ok((conn, caps, TlsOutcome::Encrypted(session))),
            Secured::Plain(conn, caps, reason) => {
                allow_plain(rule, &reason)?;
                let (conn, caps) = self.plain_path(rule, Some((conn, caps)), target).await?;
                Ok((conn, caps, TlsOutcome::Plain(reason)))
            }
            Secured::Closed(why) => Err(Failure::Next(why)),
            Secured::Lost(reason) => {
                allow_plain(rule, &reason)?;
                tracing::info!(server = %target.addr, "TLS failed ({reason}); taking the plain path");
                let (conn, caps) = self.plain_path(rule, None, target).await?;
                Ok((conn, caps, TlsOutcome::Plain(reason)))
            }
        }
    }

    /// A host that did TLS before and offers no STARTTLS now may have it stripped on the
    /// way: always a warning, and a deferral when the rule says so.
    fn check_downgrade(&self, attempt: &Attempt<'_>, secured: &Secured) -> Result<(), Failure> {
        let reason = match secured {
            _ if failed_only_by_rule(attempt, secured) => return Ok(()),
            Secured::Plain(_, _, reason) | Secured::Lost(reason) => reason,
            Secured::Tls(..) | Secured::Closed(_) => return Ok(()),
        };
        let Some(class) = reason.class() else {
            return Ok(());
        };
        let (host, ip) = (&attempt.target.name, attempt.target.addr.ip());
        if !self.cache.is_downgrade(host, ip, class) {
            return Ok(());
        }
        let rule = attempt.rule;
        self.stats.downgrades.inc();
        tracing::warn!(
            server = %format!("{host}[{ip}]"),
            rule = %rule.name,
            "downgrade: this host did TLS before and now fails it ({class}: {reason})"
        );
        if rule.on_downgrade == OnDowngrade::Defer {
            return Err(Failure::TlsNotAchieved(format!(
                "downgrade: did TLS before, now {class}"
            )));
        }
        Ok(())
    }

    /// Writes what the TLS attempt found to the cache.
    fn remember(&self, attempt: &Attempt<'_>, secured: &Secured) {
        if failed_only_by_rule(attempt, secured) {
            return;
        }
        let outcome = match secured {
            Secured::Tls(_, _, session) => TlsOutcome::Encrypted(session.clone()),
            Secured::Plain(_, _, reason) | Secured::Lost(reason) => {
                TlsOutcome::Plain(reason.clone())
            }
            Secured::Closed(_) => return,
        };
        if let Some(observation) = Observation::from_outcome(&outcome) {
            let target = attempt.target;
            self.cache
                .record(&target.name, target.addr.ip(), attempt.domain, observation);
        }
    }

    /// The plain path of a rule: the same server (reusing `open` when there is one), or the
    /// fallback relay.
    async fn plain_path(
        &self,
        rule: &Rule,
        open: Option<(Connection, Capabilities)>,
        target: &Target,
    ) -> Result<(Connection, Capabilities), Failure> {
        match &rule.fallback {
            Fallback::Direct => match open {
                Some(pair) => Ok(pair),
                None => self.greet(target).await,
            },
            Fallback::Relay(relay) => {
                if let Some((conn, _)) = open {
                    tokio::spawn(conn.quit());
                }
                let ip = self
                    .addresses(&relay.host)
                    .await
                    .ok()
                    .and_then(|addrs| addrs.into_iter().next())
                    .ok_or_else(|| Failure::Next(format!("fallback relay {relay}: no address")))?;
                let relay_target = Target {
                    name: relay.host.clone(),
                    addr: SocketAddr::new(ip, relay.port),
                };
                self.greet(&relay_target)
                    .await
                    .map_err(|f| prefix(f, &format!("fallback relay {relay}")))
            }
        }
    }

    /// Connects, reads the greeting and says EHLO (HELO when EHLO is refused).
    async fn greet(&self, target: &Target) -> Result<(Connection, Capabilities), Failure> {
        let t = &self.timeouts;
        let mut conn = Connection::connect(&target.name, target.addr, t.connect)
            .await
            .map_err(|e| unreachable(&e))?;
        let caps = self.greeting_and_ehlo(&mut conn).await?;
        Ok((conn, caps))
    }

    async fn greeting_and_ehlo(&self, conn: &mut Connection) -> Result<Capabilities, Failure> {
        let greeting = conn
            .read_reply(self.timeouts.greeting, "the greeting")
            .await
            .map_err(|e| Failure::Next(e.to_string()))?;
        if greeting.code != 220 {
            return Err(Failure::Next(format!("greeting: {greeting}")));
        }
        self.ehlo(conn).await.map_err(Failure::Next)
    }

    /// Implicit TLS (port 465): the handshake comes before the greeting.
    async fn implicit_tls(
        &self,
        rule: &Rule,
        target: &Target,
    ) -> Result<(Connection, Capabilities, TlsOutcome), Failure> {
        let t = &self.timeouts;
        let conn = Connection::connect(&target.name, target.addr, t.connect)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut conn, session) = conn
            .upgrade(&self.tls, rule.policy.min_tls, t.tls_handshake)
            .await
            .map_err(|reason| Failure::TlsNotAchieved(reason.to_string()))?;
        if let Some(reason) = rejected_certificate(rule, &session) {
            tokio::spawn(conn.quit());
            return Err(Failure::TlsNotAchieved(reason.to_string()));
        }
        let caps = self.greeting_and_ehlo(&mut conn).await?;
        Ok((conn, caps, TlsOutcome::Encrypted(session)))
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

    /// Brings the connection to TLS if the remote offers it.
    async fn secure(&self, rule: &Rule, conn: Connection, caps: Capabilities) -> Secured {
        if !caps.starttls {
            return Secured::Plain(conn, caps, NoTls::NoStarttls);
        }
        let t = &self.timeouts;
        let clock = std::time::Instant::now();
        let started = conn
            .starttls(&self.tls, rule.policy.min_tls, t.command, t.tls_handshake)
            .await;
        self.stats.handshake_time(clock.elapsed().as_secs_f64());
        let (mut conn, session) = match started {
            StartTlsResult::Encrypted(conn, session) => (conn, session),
            StartTlsResult::Refused(conn, reason) => return Secured::Plain(conn, caps, reason),
            StartTlsResult::Lost(reason) => return Secured::Lost(reason),
            StartTlsResult::Closed(reply) => return Secured::Closed(format!("STARTTLS: {reply}")),
        };
        if let Some(reason) = rejected_certificate(rule, &session) {
            tokio::spawn(conn.quit());
            return Secured::Lost(reason);
        }
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

/// The certificate's failure, when the rule requires a verified certificate.
fn rejected_certificate(rule: &Rule, session: &TlsSession) -> Option<NoTls> {
    match &session.verification {
        Verification::Failed(problem) if rule.policy.verify == VerifyMode::Require => {
            Some(NoTls::CertRejected(problem.clone()))
        }
        _ => None,
    }
}

fn allow_plain(rule: &Rule, reason: &NoTls) -> Result<(), Failure> {
    if rule.policy.allows_plain(reason) {
        Ok(())
    } else {
        Err(Failure::TlsNotAchieved(reason.to_string()))
    }
}

/// A failure of the fallback relay is not a fact about the MX host: never cached under it.
fn prefix(failure: Failure, what: &str) -> Failure {
    match failure {
        Failure::Next(why) | Failure::Unreachable(_, why) => {
            Failure::Next(format!("{what}: {why}"))
        }
        other => other,
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

/// A handshake that failed under a rule asking for more than TLS 1.2 may say nothing about
/// the host: it is neither cached nor a downgrade.
fn failed_only_by_rule(attempt: &Attempt<'_>, secured: &Secured) -> bool {
    attempt.rule.policy.min_tls != MinTls::Tls12
        && matches!(
            secured,
            Secured::Lost(NoTls::HandshakeFailed(_) | NoTls::LegacyTls(_))
        )
}

/// The reason to skip TLS with a host the cache says failed it, under this rule. A host
/// the operator pinned as lacking STARTTLS is not asked for it either.
fn skip_tls(rule: &Rule, entry: &CacheEntry) -> Option<NoTls> {
    use OutcomeClass::*;
    let class = match entry.class {
        StarttlsRefused | HandshakeFailed | LegacyTls | ProtocolViolation => entry.class,
        NoStarttls if entry.pinned => entry.class,
        CertExpired | CertNotYetValid | CertUntrusted | CertNameMismatch
            if rule.policy.verify == VerifyMode::Require =>
        {
            entry.class
        }
        TlsUnverified if rule.policy.verify == VerifyMode::Require => {
            entry.cert_problem.unwrap_or(CertUntrusted)
        }
        _ => return None,
    };
    Some(NoTls::Cached {
        class,
        detail: entry.detail.clone(),
    })
}
