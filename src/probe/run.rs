//! Running a probe: each MX host and address reached through delivery's dialer and secure
//! step, the legacy stack where rustls could not, and the decision on what was found.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::cache::Observation;
use crate::net::connection::{Connection, StartTls};
use crate::net::dane::{DaneVerdict, DaneVerifier, NoMatch, TlsaRecord};
use crate::net::dns::{Dnssec, MxHost, ServerId, TlsaAnswer, literal_address};
use crate::net::dnssec_check::DnssecCheck;
use crate::net::tls::{Handshake, Session};
use crate::outbound::Outbound;
use crate::outcome::{NoTls, OutcomeClass, TlsOutcome, TlsSession, Verification};
use crate::policy::mta_sts::{PolicyLookup, PolicyStore, StsPolicy};
use crate::probe::report::{
    LegacyReport, MxReport, ProbeReport, ServerReport, policy_report, tls_report, tlsa_report,
};
use crate::router::Plan;
use crate::router::decision::{Demand, HostDecision, Known, Published, decide};
use crate::router::explain::{Question, assumed_entry, explain};
use crate::rules::{MinTls, RuleSet};

/// What to probe.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeTarget {
    /// A recipient domain (its MX hosts are probed).
    pub domain: Option<String>,
    /// One server instead of the domain's MX hosts.
    pub mx: Option<String>,
    /// The port to use instead of the configured delivery port.
    pub port: Option<u16>,
    /// Stop after EHLO.
    #[serde(default)]
    pub no_tls: bool,
}

impl ProbeTarget {
    /// Why there is nothing to probe, when neither a domain nor a server is given.
    pub fn missing(&self) -> Option<&'static str> {
        (self.domain.is_none() && self.mx.is_none())
            .then_some("nothing to probe: give a domain or an MX host")
    }
}

/// Probes the target. With `record`, what is found goes into the cache (as a delivery's
/// attempt would).
pub async fn probe(
    outbound: &Outbound,
    rules: &Arc<RuleSet>,
    policies: &Arc<PolicyStore>,
    target: &ProbeTarget,
    record: bool,
) -> ProbeReport {
    let lookup = match &target.domain {
        Some(domain) => policies.policy_for(domain).await,
        None => PolicyLookup::NotPublished,
    };
    let policy = lookup.policy().cloned();
    let port = target.port.unwrap_or(outbound.port);
    let dane_on = outbound.resolver.check_dnssec().await;
    let (hosts, dns_error, mx_dnssec) = match (&target.mx, &target.domain) {
        (Some(mx), domain) => {
            let mx_dnssec = match domain {
                Some(domain) => outbound
                    .resolver
                    .mail_exchangers_checked(domain)
                    .await
                    .ok()
                    .map(|(_, dnssec)| dnssec),
                None => None,
            };
            let host = MxHost {
                name: mx.clone(),
                preference: 0,
                dnssec: mx_dnssec.unwrap_or(Dnssec::Insecure),
            };
            (vec![host], None, mx_dnssec)
        }
        (None, Some(domain)) => match outbound.resolver.mail_exchangers_checked(domain).await {
            Ok((hosts, dnssec)) => (hosts, None, Some(dnssec)),
            Err(e) => (Vec::new(), Some(e.to_string()), None),
        },
        (None, None) => (Vec::new(), target.missing().map(String::from), None),
    };
    let mx_secure = mx_dnssec == Some(Dnssec::Secure);
    let mut mx = Vec::new();
    for host in hosts {
        let probed = probe_host(
            outbound,
            rules,
            policy.as_deref(),
            (host, mx_secure),
            port,
            target,
            record,
        );
        mx.push(probed.await);
    }
    let (rule, plan) = explain_for(rules, target, target.mx.as_deref(), &[]).unzip();
    ProbeReport {
        domain: target.domain.clone(),
        dns_error,
        mx,
        rule,
        plan,
        mta_sts: target.domain.as_ref().map(|_| policy_report(&lookup)),
        dane: Some(match (dane_on, outbound.resolver.dnssec_check()) {
            (true, Some(DnssecCheck::Unknown)) => {
                "unknown (the name servers did not answer the DNSSEC check yet; asked again with back-off, and what cannot be validated is deferred)".to_string()
            }
            (true, _) => "on".to_string(),
            (false, _) => {
                "off (resolver.dane: off, or the name servers cannot serve DNSSEC)".to_string()
            }
        }),
        mx_dnssec: mx_dnssec.map(|d| d.name().to_string()),
    }
}

/// What the host's usable TLSA records make of the chain a server sent, by the verifier
/// delivery uses.
fn dane_verdict(
    records: &[TlsaRecord],
    chain: &[rustls::pki_types::CertificateDer<'static>],
    host: &str,
) -> DaneVerdict {
    use rustls::client::danger::ServerCertVerifier;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = DaneVerifier::new(records.to_vec(), provider);
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return DaneVerdict::NoMatch(NoMatch::NoCertificate);
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(host.to_string()) else {
        return DaneVerdict::NoMatch(NoMatch::BadName(host.to_string()));
    };
    let now = rustls::pki_types::UnixTime::now();
    let _ = verifier.verify_server_cert(end_entity, intermediates, &name, &[], now);
    verifier
        .verdict()
        .unwrap_or(DaneVerdict::NoMatch(NoMatch::NotChecked))
}

/// The rule a message to the target's domain gets, through `mx` when known, given the
/// outcome `classes` found there; `None` without a domain.
fn explain_for(
    rules: &Arc<RuleSet>,
    target: &ProbeTarget,
    mx: Option<&str>,
    classes: &[OutcomeClass],
) -> Option<(String, String)> {
    let question = Question {
        recipient_domain: target.domain.as_deref()?,
        sender_domain: None,
        mx,
        cached: assumed_entry(mx.unwrap_or(""), classes, false),
        memory: crate::cache::TlsMemory::Nothing,
        published: Published::Nothing,
        demand: Demand::Nothing,
    };
    let answer = explain(rules.clone(), &question);
    Some((answer.rule, answer.text))
}

/// What a delivery to the target's domain does through `server` now that `outcome` was
/// found there: the host decision's answer, with the cache's memory of TLS, as delivery
/// asks it.
fn decision_for(
    outbound: &Outbound,
    rules: &Arc<RuleSet>,
    target: &ProbeTarget,
    server: &ServerId,
    classes: &[OutcomeClass],
    outcome: Option<&TlsOutcome>,
    published: Published,
) -> Option<HostDecision> {
    let plan = Plan::new(rules.clone(), target.domain.as_deref()?, None);
    let rule = plan.rule_for_host(&server.name, classes);
    let outcome = outcome?;
    let downgrade = outcome
        .class()
        .is_some_and(|class| (outbound.cache).is_downgrade(&server.name, server.addr, class));
    let found = Known::Found { outcome, downgrade };
    Some(decide(rule, found, published, Demand::Nothing))
}

async fn probe_host(
    outbound: &Outbound,
    rules: &Arc<RuleSet>,
    policy: Option<&StsPolicy>,
    // `mx_secure`: the domain's MX answer was DNSSEC-secure.
    (host, mx_secure): (MxHost, bool),
    port: u16,
    target: &ProbeTarget,
    record: bool,
) -> MxReport {
    let addresses = match literal_address(&host.name) {
        Some(ip) => Ok((vec![ip], Dnssec::Insecure)),
        None => outbound.resolver.addresses_checked(&host.name).await,
    };
    let addr_dnssec = addresses.as_ref().ok().map(|(_, dnssec)| *dnssec);
    // Asked only where delivery asks it (RFC 7672 2.2).
    let tlsa =
        if outbound.resolver.dane_active() && mx_secure && addr_dnssec == Some(Dnssec::Secure) {
            Some(outbound.resolver.tlsa(&host.name, port).await)
        } else {
            None
        };
    let dane = tlsa.as_ref().and_then(crate::outbound::hop::dane_published);
    let usable = match &tlsa {
        Some(TlsaAnswer::Records { usable, .. }) => usable.clone(),
        _ => Vec::new(),
    };
    let mut report = MxReport {
        host: host.name.clone(),
        preference: host.preference,
        addresses: addresses
            .as_ref()
            .map(|(addrs, _)| addrs.clone())
            .unwrap_or_default(),
        error: addresses.as_ref().err().map(ToString::to_string),
        in_policy: policy.map(|p| p.mx_matches(&crate::net::dns::bare_name(&host.name))),
        servers: Vec::new(),
        dnssec: addr_dnssec.map(|d| d.name().to_string()),
        tlsa: tlsa.as_ref().map(tlsa_report),
    };
    for ip in report.addresses.clone() {
        let id = ServerId::new(&host.name, ip);
        let fleet = fleet_view(outbound, &id.name, ip).await;
        let server = probe_server(outbound, &id, port, target.no_tls).await;
        let mut server = server;
        let published = dane.unwrap_or_else(|| crate::outbound::hop::published(policy, &id.name));
        // Where delivery would turn to the legacy stack, so does the probe, and what that
        // stack found replaces what rustls found.
        if !target.no_tls {
            let classes = server.outcome.as_ref().and_then(TlsOutcome::class);
            let decision = decision_for(
                outbound,
                rules,
                target,
                &id,
                classes.as_slice(),
                server.outcome.as_ref(),
                published,
            );
            if matches!(decision, Some(HostDecision::LegacyTls)) {
                server = probe_legacy(outbound, &id, port, server).await;
            }
        }
        let observation = server.class.and_then(|class| match class {
            OutcomeClass::ConnectFailed | OutcomeClass::Timeout => Some(Observation::unreachable(
                class,
                server.detail.clone().unwrap_or_default(),
            )),
            _ => server.outcome.as_ref().and_then(Observation::from_outcome),
        });
        let classes = observation
            .as_ref()
            .map(Observation::classes)
            .unwrap_or_default();
        let mut outcome = server.outcome.clone();
        let mut server = server.report;
        (server.rule, server.plan) = explain_for(rules, target, Some(&id.name), &classes).unzip();
        if let Some(TlsOutcome::Encrypted(session)) = &outcome
            && !usable.is_empty()
        {
            // Under DANE the TLSA records judge the certificate, as in delivery.
            let verdict = dane_verdict(&usable, &session.chain, &id.name);
            server.dane = Some(verdict.to_string());
            outcome = Some(match verdict {
                DaneVerdict::Matched { .. } => TlsOutcome::Encrypted(TlsSession {
                    verification: Verification::Verified,
                    ..session.clone()
                }),
                DaneVerdict::NoMatch(why) => {
                    TlsOutcome::Plain(NoTls::DaneMismatch(why.to_string()))
                }
            });
        }
        server.decision = decision_for(
            outbound,
            rules,
            target,
            &id,
            &classes,
            outcome.as_ref(),
            published,
        )
        .map(|d| d.to_string());
        server.fleet = fleet;
        if record && let Some(observation) = observation {
            let domain = target.domain.as_deref().unwrap_or("");
            outbound.cache.record(&id.name, ip, domain, observation);
        }
        report.servers.push(server);
    }
    report
}

/// The fleet's view of a server, in words, when there is a fleet.
async fn fleet_view(outbound: &Outbound, host: &str, ip: std::net::IpAddr) -> Option<String> {
    let shared = outbound.cache.shared()?;
    let key = crate::cache::CacheKey::new(host, ip);
    let Some((entry, tls)) = shared.read(&key).await else {
        return Some(format!(
            "unknown (Redis at {} does not answer)",
            shared.target()
        ));
    };
    let now = outbound.cache.now();
    let mut text = match entry {
        Some(e) => {
            let by = e
                .observed_by
                .as_ref()
                .map_or_else(|| "a relay".to_string(), ToString::to_string);
            let pinned = if e.pinned { ", pinned" } else { "" };
            format!(
                "{}{pinned}, seen by {by} {}s ago ({})",
                e.class,
                now.saturating_sub(e.last_seen),
                e.detail
            )
        }
        None => "nothing cached".to_string(),
    };
    if let Some(tls) = tls {
        let _ = write!(
            text,
            "; last TLS by {} {}s ago",
            tls.by,
            now.saturating_sub(tls.at)
        );
    }
    Some(text)
}

/// A server's report, and the outcome to cache.
struct Probed {
    report: ServerReport,
    outcome: Option<TlsOutcome>,
}

impl Probed {
    /// A report with no TLS outcome to cache: the probe stopped before one was known.
    fn without_outcome(report: ServerReport) -> Probed {
        Probed {
            report,
            outcome: None,
        }
    }
}

impl std::ops::Deref for Probed {
    type Target = ServerReport;
    fn deref(&self) -> &ServerReport {
        &self.report
    }
}

/// How probe runs TLS with rustls: whatever the rules say, the fullest diagnosis.
const PROBE_HANDSHAKE: Handshake = Handshake::Pkix(MinTls::Tls12);

async fn probe_server(outbound: &Outbound, server: &ServerId, port: u16, no_tls: bool) -> Probed {
    let addr = SocketAddr::new(server.addr, port);
    let mut report = ServerReport {
        addr: Some(addr),
        ..ServerReport::default()
    };
    let t = &outbound.timeouts;
    let mut clock = Instant::now();
    let mut lap = |report: &mut ServerReport, step: &str| {
        report
            .timings_ms
            .push((step.to_string(), clock.elapsed().as_millis() as u64));
        clock = Instant::now();
    };
    // Dialled as delivery dials: from the source address, with the socket mark.
    let mut conn = match outbound.dialer.connect(&server.name, addr).await {
        Ok(conn) => conn,
        Err(e) => {
            report.class = Some(if e.is_timeout() {
                OutcomeClass::Timeout
            } else {
                OutcomeClass::ConnectFailed
            });
            report.detail = Some(e.to_string());
            return Probed::without_outcome(report);
        }
    };
    lap(&mut report, "connect");
    match outbound.read_greeting(&mut conn).await {
        Ok(reply) => report.banner = Some(reply.one_line()),
        Err(e) => {
            report.error = Some(e.to_string());
            return Probed::without_outcome(report);
        }
    }
    lap(&mut report, "greeting");
    let caps = match outbound.ehlo(&mut conn).await {
        Ok(caps) => caps,
        Err(e) => {
            report.error = Some(e.to_string());
            return Probed::without_outcome(report);
        }
    };
    lap(&mut report, "ehlo");
    report.ehlo = caps.keywords.clone();
    report.starttls_offered = caps.starttls;
    if no_tls {
        tokio::spawn(conn.quit());
        return Probed::without_outcome(report);
    }
    if !caps.starttls {
        return finish(
            report,
            TlsOutcome::Plain(NoTls::NoStarttls),
            Some(conn.into_any()),
        );
    }
    let started = conn
        .starttls(&outbound.tls, &PROBE_HANDSHAKE, t.command, t.tls_handshake)
        .await;
    lap(&mut report, "starttls");
    match started {
        StartTls::Secured(mut conn, session) => {
            let after = outbound
                .ehlo(&mut conn)
                .await
                .map(|c| c.keywords)
                .unwrap_or_default();
            lap(&mut report, "ehlo-after-tls");
            if let Session::Rustls(session) = &session {
                report.tls = Some(tls_report(session, after));
            }
            finish(report, session.into(), Some(conn))
        }
        StartTls::Refused(conn, reason) => {
            finish(report, TlsOutcome::Plain(reason), Some(conn.into_any()))
        }
        StartTls::Lost(reason) => finish(report, TlsOutcome::Plain(reason), None),
        StartTls::Closed(reply) => {
            report.error = Some(format!(
                "STARTTLS: {} (the server closed the connection)",
                reply.one_line()
            ));
            Probed::without_outcome(report)
        }
    }
}

/// The legacy stack on a new connection, as delivery uses it: greeting, EHLO, STARTTLS,
/// the OpenSSL handshake.
async fn probe_legacy(
    outbound: &Outbound,
    server: &ServerId,
    port: u16,
    mut probed: Probed,
) -> Probed {
    let t = &outbound.timeouts;
    let rustls = rustls_finding(&probed.report);
    let attempt = async {
        let addr = SocketAddr::new(server.addr, port);
        let failed = |e: &dyn std::fmt::Display| NoTls::LegacyFailed(e.to_string());
        let mut conn =
            (outbound.dialer.connect(&server.name, addr).await).map_err(|e| failed(&e))?;
        outbound
            .read_greeting(&mut conn)
            .await
            .map_err(|e| failed(&e))?;
        outbound.ehlo(&mut conn).await.map_err(|e| failed(&e))?;
        let started = conn.starttls(
            &outbound.tls,
            &Handshake::Legacy,
            t.command,
            t.tls_handshake,
        );
        match started.await {
            StartTls::Secured(conn, session) => {
                tokio::spawn(conn.quit());
                Ok(session)
            }
            StartTls::Refused(conn, reason) => {
                tokio::spawn(conn.quit());
                Err(reason)
            }
            StartTls::Lost(reason) => Err(reason),
            StartTls::Closed(reply) => Err(NoTls::LegacyFailed(format!(
                "STARTTLS: {} (the server closed the connection)",
                reply.one_line()
            ))),
        }
    };
    let outcome = match attempt.await {
        Ok(session) => TlsOutcome::from(session),
        Err(reason) => TlsOutcome::Plain(reason),
    };
    let legacy = match &outcome {
        TlsOutcome::Plain(reason) => LegacyReport {
            rustls,
            version: None,
            cipher: None,
            error: Some(reason.to_string()),
        },
        encrypted => LegacyReport {
            rustls,
            version: encrypted
                .parameters()
                .map(|(version, _, _)| version.to_string()),
            cipher: encrypted
                .parameters()
                .map(|(_, cipher, _)| cipher.to_string()),
            error: None,
        },
    };
    probed.report.legacy = Some(legacy);
    finish(probed.report, outcome, None)
}

/// `legacy-tls (TLS handshake failed: ... ProtocolVersion)`.
fn rustls_finding(report: &ServerReport) -> String {
    format!(
        "{} ({})",
        report.class.map_or("?", OutcomeClass::name),
        report.detail.as_deref().unwrap_or("")
    )
}

fn finish(mut report: ServerReport, outcome: TlsOutcome, conn: Option<Connection>) -> Probed {
    if let Some(conn) = conn {
        tokio::spawn(conn.quit());
    }
    report.class = outcome.class();
    report.detail = match &outcome {
        TlsOutcome::Plain(reason) => Some(reason.to_string()),
        TlsOutcome::Encrypted(session) => match &session.verification {
            Verification::Verified => Some("certificate verified".into()),
            Verification::Failed(problem) => Some(format!("{}: {problem}", problem.class())),
        },
        TlsOutcome::Legacy(session) => Some(format!(
            "legacy TLS stack, not authenticated: {} {}",
            session.version, session.cipher
        )),
    };
    Probed {
        report,
        outcome: Some(outcome),
    }
}
