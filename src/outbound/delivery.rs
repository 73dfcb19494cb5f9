//! Carrying out a plan: try each MX and address in turn until one accepts MAIL FROM, with
//! STARTTLS, classification of what went wrong, and a plain fallback where the policy allows.

use std::net::{IpAddr, SocketAddr};

use crate::config::Timeouts;
use crate::outbound::connection::{Connection, ExchangeError, StartTlsResult};
use crate::outbound::mx::{AddressError, MxHost, MxResolver, RouteError};
use crate::outbound::tls::TlsClient;
use crate::outcome::{NoTls, TlsOutcome, TlsSession, Verification};
use crate::router::{Plan, TlsMode, VerifyMode};
use crate::smtp::{Capabilities, Reply};

/// Everything the outbound side needs, shared by all sessions.
pub struct Outbound {
    pub resolver: MxResolver,
    pub tls: TlsClient,
    /// Our EHLO name.
    pub hostname: String,
    /// Remote SMTP port.
    pub port: u16,
    pub timeouts: Timeouts,
}

/// A remote transaction that has accepted MAIL FROM.
pub struct Upstream {
    pub conn: Connection,
    pub caps: Capabilities,
    pub tls: TlsOutcome,
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
    /// The policy wanted TLS and did not get it here; try the next address.
    TlsNotAchieved(String),
    /// The remote answered, and the MTA should hear it.
    Final(Reply),
}

enum Secured {
    Tls(Connection, Capabilities, TlsSession),
    Plain(Connection, Capabilities, NoTls),
    /// The connection is gone; a plain fallback needs a new one.
    Lost(NoTls),
}

impl Outbound {
    /// The mail exchangers for a domain, or the address of an address literal.
    pub async fn next_hop(&self, domain: &str) -> Result<Vec<MxHost>, RouteError> {
        if domain.starts_with('[') {
            return Ok(vec![MxHost {
                name: domain.to_string(),
                preference: 0,
            }]);
        }
        self.resolver.mail_exchangers(domain).await
    }

    /// Opens a remote transaction: the first MX and address that accepts MAIL FROM wins.
    /// `mail_from` writes the command for the capabilities the remote announced.
    pub async fn open(
        &self,
        plan: &Plan,
        domain: &str,
        hosts: &[MxHost],
        mail_from: impl Fn(&Capabilities) -> String + Sync,
    ) -> Result<Upstream, OpenError> {
        let mut failures = Vec::new();
        let mut tls_failures = Vec::new();
        for host in hosts {
            let addrs = match self.addresses(&host.name).await {
                Ok(addrs) => addrs,
                Err(e) => {
                    failures.push(format!("{}: {e}", host.name));
                    continue;
                }
            };
            for ip in addrs {
                let addr = SocketAddr::new(ip, self.port);
                let server = format!("{}[{}]", host.name, ip);
                match self.attempt(plan, &host.name, addr, &mail_from).await {
                    Ok(mut upstream) => {
                        upstream.earlier_failures = failures;
                        upstream.earlier_failures.extend(tls_failures);
                        return Ok(upstream);
                    }
                    Err(Failure::Next(why)) => {
                        tracing::info!(server = %server, "MX attempt failed: {why}");
                        failures.push(format!("{server}: {why}"));
                    }
                    Err(Failure::TlsNotAchieved(why)) => {
                        tracing::warn!(server = %server, rule = %plan.rule, "TLS required but not achieved: {why}");
                        tls_failures.push(format!("{server} {why}"));
                    }
                    Err(Failure::Final(reply)) => {
                        return Err(OpenError::Rejected { reply, server });
                    }
                }
            }
        }
        if !tls_failures.is_empty() {
            tls_failures.extend(failures);
            return Err(OpenError::TlsNotAchieved {
                rule: plan.rule.clone(),
                failures: tls_failures,
            });
        }
        Err(OpenError::Unreachable {
            domain: domain.to_string(),
            failures,
        })
    }

    async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, AddressError> {
        if let Some(literal) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let ip = literal.strip_prefix("IPv6:").unwrap_or(literal);
            return ip
                .parse()
                .map(|ip| vec![ip])
                .map_err(|_| AddressError::NotFound);
        }
        self.resolver.addresses(host).await
    }

    async fn attempt(
        &self,
        plan: &Plan,
        host: &str,
        addr: SocketAddr,
        mail_from: &(dyn Fn(&Capabilities) -> String + Sync),
    ) -> Result<Upstream, Failure> {
        let tls_name = host.trim_start_matches('[').trim_end_matches(']');
        let (conn, caps) = self.greet(tls_name, addr).await?;
        let (mut conn, caps, tls) = match self.secure(plan, conn, caps).await {
            Secured::Tls(conn, caps, session) => (conn, caps, TlsOutcome::Encrypted(session)),
            Secured::Plain(conn, caps, reason) => {
                allow_plain(plan, &reason)?;
                (conn, caps, TlsOutcome::Plain(reason))
            }
            Secured::Lost(reason) => {
                allow_plain(plan, &reason)?;
                tracing::info!(server = %addr, "TLS failed ({reason}); reconnecting in plain");
                let (conn, caps) = self.greet(tls_name, addr).await?;
                (conn, caps, TlsOutcome::Plain(reason))
            }
        };
        let reply = conn
            .command(
                &mail_from(&caps),
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
            earlier_failures: Vec::new(),
        })
    }

    /// Connects, reads the greeting and says EHLO (HELO when EHLO is refused).
    async fn greet(
        &self,
        host: &str,
        addr: SocketAddr,
    ) -> Result<(Connection, Capabilities), Failure> {
        let t = &self.timeouts;
        let mut conn = Connection::connect(host, addr, t.connect)
            .await
            .map_err(|e| Failure::Next(connect_failure(&e)))?;
        let greeting = conn
            .read_reply(t.greeting, "the greeting")
            .await
            .map_err(|e| Failure::Next(e.to_string()))?;
        if greeting.code != 220 {
            return Err(Failure::Next(format!("greeting: {greeting}")));
        }
        let caps = self.ehlo(&mut conn).await.map_err(Failure::Next)?;
        Ok((conn, caps))
    }

    async fn ehlo(&self, conn: &mut Connection) -> Result<Capabilities, String> {
        let timeout = self.timeouts.command;
        let ehlo = format!("EHLO {}", self.hostname);
        let reply = conn
            .command(&ehlo, timeout, "the reply to EHLO")
            .await
            .map_err(|e| e.to_string())?;
        if reply.is_positive() {
            return Ok(Capabilities::from_ehlo(&reply));
        }
        if reply.closes_connection() {
            return Err(format!("EHLO: {reply}"));
        }
        let helo = format!("HELO {}", self.hostname);
        let reply = conn
            .command(&helo, timeout, "the reply to HELO")
            .await
            .map_err(|e| e.to_string())?;
        if reply.is_positive() {
            Ok(Capabilities::default())
        } else {
            Err(format!("EHLO and HELO refused: {reply}"))
        }
    }

    /// Brings the connection to TLS if the policy wants it and the remote offers it.
    async fn secure(&self, plan: &Plan, conn: Connection, caps: Capabilities) -> Secured {
        let policy = &plan.policy;
        if policy.tls == TlsMode::Never {
            return Secured::Plain(conn, caps, NoTls::NotWanted);
        }
        if !caps.starttls {
            return Secured::Plain(conn, caps, NoTls::NoStarttls);
        }
        let t = &self.timeouts;
        let (mut conn, session) = match conn
            .starttls(&self.tls, policy.min_tls, t.command, t.tls_handshake)
            .await
        {
            StartTlsResult::Encrypted(conn, session) => (conn, session),
            StartTlsResult::Refused(conn, reason) => return Secured::Plain(conn, caps, reason),
            StartTlsResult::Lost(reason) => return Secured::Lost(reason),
        };
        if let Verification::Failed(problem) = &session.verification
            && policy.verify == VerifyMode::Require
        {
            tokio::spawn(conn.quit());
            return Secured::Lost(NoTls::CertRejected(problem.clone()));
        }
        // Nothing said before TLS counts after it: a fresh EHLO, fresh capabilities.
        match self.ehlo(&mut conn).await {
            Ok(caps) => Secured::Tls(conn, caps, session),
            Err(why) => Secured::Lost(NoTls::HandshakeFailed(format!("after TLS: {why}"))),
        }
    }
}

fn allow_plain(plan: &Plan, reason: &NoTls) -> Result<(), Failure> {
    if plan.policy.allows_plain(reason) {
        Ok(())
    } else {
        Err(Failure::TlsNotAchieved(reason.to_string()))
    }
}

fn connect_failure(error: &ExchangeError) -> String {
    match error {
        ExchangeError::Io(e) => format!("connect failed: {e}"),
        other => format!("connect failed: {other}"),
    }
}
