//! The ledger's commands: `domains` (who got mail in plain, and why), `domain` (one
//! domain's hour, day and week) and `certs` (whose certificates expire soon), answered from
//! the ledger and the cache, and rendered for `ctl`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::admin::protocol::{ErrorKind, Request, Response};
use crate::admin::table::{relative, row, table, text};
use crate::cache::shared::Swept;
use crate::config::duration;
use crate::ledger::{DomainView, Route, RouteCounts, Snapshot, WEEK, window_start};
use crate::outcome::{OutcomeClass, days_of_date, format_date};
use crate::proxy::Proxy;

/// A domain in `ctl domains`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DomainRow {
    #[serde(flatten)]
    pub view: DomainView,
    /// Of the delivered messages, the share that went in plain, 0 to 1.
    pub plain_share: f64,
    /// The earliest expiry (`YYYY-MM-DD`) of a certificate cached for its MX hosts.
    pub cert_expires: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DomainsAnswer {
    pub now: u64,
    /// Where the counts begin: the start of the hour the window begins in.
    pub since: u64,
    pub domains: Vec<DomainRow>,
    /// Domains dropped since start to keep within `ledger.max_domains`.
    pub dropped: u64,
    /// With a fleet: whose ledgers were added to this relay's.
    #[serde(default)]
    pub fleet: Option<Fleet>,
}

/// The other relays whose ledgers a fleet's answer adds up, and how far the walk over
/// Redis got.
#[derive(Debug, Serialize, Deserialize)]
pub struct Fleet {
    pub relays: Vec<String>,
    pub sweep: Swept,
}

/// One window of `ctl domain`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Window {
    pub name: String,
    pub since: u64,
    pub counts: RouteCounts,
    pub tls_versions: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DomainAnswer {
    pub now: u64,
    /// The week's view: the facts (policy, rule, hosts, last failure) and its counts.
    pub domain: DomainView,
    /// With a fleet: whose ledgers were added to this relay's.
    #[serde(default)]
    pub fleet: Option<Fleet>,
    /// The last hour, day and week.
    pub windows: Vec<Window>,
    /// The mode of the MTA-STS policy held for it now, if any.
    pub mta_sts: Option<String>,
    pub certificates: Vec<CertRow>,
}

/// A server's certificate as the cache holds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertRow {
    pub host: String,
    pub addrs: Vec<IpAddr>,
    pub subject: Option<String>,
    /// `YYYY-MM-DD`.
    pub not_after: String,
    /// Days from today (UTC) to `not_after`; negative once expired.
    pub days_left: i64,
    /// Why it did not verify, when it did not.
    pub problem: Option<OutcomeClass>,
    /// The recipient domains it serves, as the cache and the ledger know them.
    pub domains: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CertsAnswer {
    pub now: u64,
    pub within_days: i64,
    pub certificates: Vec<CertRow>,
}

/// Answers `domains`, `domain` and `certs`.
pub(super) async fn answer(proxy: &Proxy, request: Request) -> Response {
    let now = proxy.outbound.cache.now();
    let answer = match request {
        Request::Domains { since, route } => domains(proxy, now, since.as_deref(), route)
            .await
            .map(|a| serde_json::to_value(a).unwrap_or_default()),
        Request::Domain { domain } => (one_domain(proxy, now, &domain).await)
            .map(|a| serde_json::to_value(a).unwrap_or_default()),
        Request::Certs { expiring } => (certs(proxy, now, &expiring).await)
            .map(|a| serde_json::to_value(a).unwrap_or_default()),
        _ => return Response::error(ErrorKind::UnknownCommand, "not a ledger command"),
    };
    match answer {
        Ok(value) => Response::ok(value),
        Err(error) => error,
    }
}

/// A window back from now, at most the ledger's week.
fn window(text: &str) -> Result<u64, Response> {
    let window = duration::parse(text).map_err(|e| Response::error(ErrorKind::BadArguments, e))?;
    match window.as_secs() {
        secs if secs > WEEK => Err(Response::error(
            ErrorKind::BadArguments,
            format!("--since {text}: the ledger keeps a week; give 7d or less"),
        )),
        secs => Ok(secs),
    }
}

pub(super) async fn domains(
    proxy: &Proxy,
    now: u64,
    since: Option<&str>,
    route: Option<Route>,
) -> Result<DomainsAnswer, Response> {
    let since = now.saturating_sub(window(since.unwrap_or("7d"))?);
    let ledgers = Ledgers::read(proxy).await;
    let certs = certificate_rows(proxy, now, ledgers.views(now.saturating_sub(WEEK)));
    let mut rows: Vec<DomainRow> = (ledgers.views(since).into_iter())
        .filter(|v| route.is_none_or(|r| v.counts.get(r) > 0))
        .map(|view| DomainRow {
            plain_share: view.counts.plain_share(),
            cert_expires: earliest_expiry(&certs, &view.hosts),
            view,
        })
        .collect();
    // The most in plain first; then the most plain messages, the most messages, the name.
    rows.sort_by(|a, b| {
        (b.plain_share.total_cmp(&a.plain_share))
            .then(b.view.counts.plain.cmp(&a.view.counts.plain))
            .then(b.view.counts.total().cmp(&a.view.counts.total()))
            .then(a.view.domain.cmp(&b.view.domain))
    });
    Ok(DomainsAnswer {
        now,
        since: window_start(since),
        domains: rows,
        dropped: proxy.ledger.dropped(),
        fleet: ledgers.fleet,
    })
}

pub(super) async fn one_domain(
    proxy: &Proxy,
    now: u64,
    domain: &str,
) -> Result<DomainAnswer, Response> {
    let domain = crate::net::dns::bare_name(domain).to_ascii_lowercase();
    let ledgers = Ledgers::read(proxy).await;
    let Some(week) = ledgers.view(&domain, now.saturating_sub(WEEK)) else {
        return Err(Response::error(
            ErrorKind::Failed,
            format!("the ledger has no message to {domain} this week"),
        ));
    };
    let windows = [("1h", 3600), ("24h", 86_400), ("7d", WEEK)]
        .into_iter()
        .map(|(name, secs)| {
            let since = now.saturating_sub(secs);
            let view = ledgers.view(&domain, since);
            Window {
                name: name.to_string(),
                since: window_start(since),
                counts: view.as_ref().map(|v| v.counts).unwrap_or_default(),
                tls_versions: view.map(|v| v.tls_versions).unwrap_or_default(),
            }
        })
        .collect();
    let certificates = certificate_rows(proxy, now, ledgers.views(now.saturating_sub(WEEK)))
        .into_iter()
        .filter(|c| week.hosts.contains(&c.host) || c.domains.contains(&domain))
        .collect();
    let mta_sts = (proxy.policies.cached(&domain)).map(|p| p.mode.name().to_string());
    Ok(DomainAnswer {
        now,
        domain: week,
        fleet: ledgers.fleet,
        windows,
        mta_sts,
        certificates,
    })
}

/// The ledgers an answer adds up: this relay's, and with a fleet every other relay's,
/// read from Redis once per request. A relay's ledger that does not read is counted as not
/// believed (`fleet_forged`) and left out.
struct Ledgers<'a> {
    proxy: &'a Proxy,
    others: Vec<Snapshot>,
    fleet: Option<Fleet>,
}

impl<'a> Ledgers<'a> {
    async fn read(proxy: &'a Proxy) -> Ledgers<'a> {
        let mut ledgers = Ledgers {
            proxy,
            others: Vec::new(),
            fleet: None,
        };
        let Some(shared) = proxy.outbound.cache.shared() else {
            return ledgers;
        };
        let me = &shared.observer().relay;
        let (found, sweep) = shared.ledgers().await;
        let mut relays = Vec::new();
        for (relay, json) in found.into_iter().filter(|(relay, _)| relay != me) {
            match proxy.ledger.read_snapshot(&json) {
                Ok(snapshot) => {
                    ledgers.others.push(snapshot);
                    relays.push(relay);
                }
                Err(why) => {
                    proxy.stats.fleet_forged.inc();
                    tracing::warn!(
                        event = "fleet.forged",
                        relay,
                        "the ledger of relay {relay} in the shared cache is not read: {why}"
                    );
                }
            }
        }
        relays.sort();
        ledgers.fleet = Some(Fleet { relays, sweep });
        ledgers
    }

    /// Every domain with messages since `since`, added up domain by domain.
    fn views(&self, since: u64) -> Vec<DomainView> {
        let mut views: BTreeMap<String, DomainView> = (self.proxy.ledger.views(since).into_iter())
            .map(|v| (v.domain.clone(), v))
            .collect();
        for view in self.others.iter().flat_map(|s| s.views(since)) {
            match views.get_mut(&view.domain) {
                Some(ours) => ours.merge(view),
                None => {
                    views.insert(view.domain.clone(), view);
                }
            }
        }
        views.into_values().collect()
    }

    /// One domain since `since`, added up; `None` when no ledger has messages of it.
    fn view(&self, domain: &str, since: u64) -> Option<DomainView> {
        let here = self.proxy.ledger.view(domain, since);
        let here = here.filter(|v| v.counts.total() > 0);
        let theirs = self.others.iter().filter_map(|s| s.view(domain, since));
        theirs.fold(here, |sum, view| match sum {
            Some(mut sum) => {
                sum.merge(view);
                Some(sum)
            }
            None => Some(view),
        })
    }
}

pub(super) async fn certs(
    proxy: &Proxy,
    now: u64,
    expiring: &str,
) -> Result<CertsAnswer, Response> {
    let within =
        duration::parse(expiring).map_err(|e| Response::error(ErrorKind::BadArguments, e))?;
    let within_days = (within.as_secs() / 86_400) as i64;
    let ledgers = Ledgers::read(proxy).await;
    let week = ledgers.views(now.saturating_sub(WEEK));
    let mut certificates: Vec<CertRow> = (certificate_rows(proxy, now, week).into_iter())
        .filter(|c| c.days_left <= within_days)
        .collect();
    certificates.sort_by(|a, b| a.days_left.cmp(&b.days_left).then(a.host.cmp(&b.host)));
    Ok(CertsAnswer {
        now,
        within_days,
        certificates,
    })
}

/// How many cached servers' certificates expire within `days` (or have expired): the
/// metrics' gauge.
pub fn expiring_within(proxy: &Proxy, days: i64) -> usize {
    let now = proxy.outbound.cache.now();
    // This relay's ledger alone: a scrape does not ask Redis.
    let week = proxy.ledger.views(now.saturating_sub(WEEK));
    (certificate_rows(proxy, now, week).iter())
        .filter(|c| c.days_left <= days)
        .count()
}

/// Every cached server's certificate, one row per host, with the domains it serves as
/// the cache and `views` (the ledgers' week) know them.
fn certificate_rows(proxy: &Proxy, now: u64, views: Vec<DomainView>) -> Vec<CertRow> {
    let today = (now / 86_400) as i64;
    // The domains the ledger saw going to each host this week.
    let mut served: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for view in views {
        for host in &view.hosts {
            served
                .entry(host.clone())
                .or_default()
                .insert(view.domain.clone());
        }
    }
    let mut rows: BTreeMap<String, CertRow> = BTreeMap::new();
    for entry in proxy.outbound.cache.entries() {
        let Some(not_after) = entry.cert_not_after.clone() else {
            continue;
        };
        let Some(expiry) = days_of_date(&not_after) else {
            continue;
        };
        let row = rows.entry(entry.host.clone()).or_insert_with(|| CertRow {
            host: entry.host.clone(),
            addrs: Vec::new(),
            subject: entry.cert_subject.clone(),
            not_after: not_after.clone(),
            days_left: expiry - today,
            problem: entry.cert_problem,
            domains: Vec::new(),
        });
        row.addrs.push(entry.addr);
        // Of several addresses, the certificate that expires first.
        if expiry - today < row.days_left {
            row.days_left = expiry - today;
            row.not_after = not_after;
            row.subject = entry.cert_subject.clone();
            row.problem = entry.cert_problem;
        }
        let domains = served.entry(entry.host.clone()).or_default();
        domains.extend(entry.domains.iter().map(|d| d.to_ascii_lowercase()));
    }
    for row in rows.values_mut() {
        row.addrs.sort();
        row.addrs.dedup();
        row.domains = served
            .get(&row.host)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
    }
    rows.into_values().collect()
}

fn earliest_expiry(certs: &[CertRow], hosts: &[String]) -> Option<String> {
    (certs.iter())
        .filter(|c| hosts.contains(&c.host))
        .min_by_key(|c| c.days_left)
        .map(|c| c.not_after.clone())
}

/// The human form of `domains`, `domain` and `certs`; `None` for another command.
pub(super) fn render(request: &Request, result: &Value) -> Option<String> {
    let rendered = match request {
        Request::Domains { .. } => render_domains(&serde_json::from_value(result.clone()).ok()?),
        Request::Domain { .. } => render_domain(&serde_json::from_value(result.clone()).ok()?),
        Request::Certs { .. } => render_certs(&serde_json::from_value(result.clone()).ok()?),
        _ => return None,
    };
    Some(rendered)
}

/// `2026-12-07 14:00 UTC`.
fn hour(unix: u64) -> String {
    format!("{} {:02}:00 UTC", format_date(unix), unix % 86_400 / 3600)
}

fn shown(s: &str) -> String {
    text(&Value::String(s.to_string()))
}

/// The last failure in words: `no-starttls at mx.example.com, 2h ago: ...`.
fn failure(view: &DomainView, now: u64) -> String {
    let Some(f) = &view.last_failure else {
        return "-".to_string();
    };
    let mut said = f.class.map(|c| c.name().to_string()).unwrap_or_default();
    if let Some(host) = &f.host {
        said.push_str(&format!(" at {}", shown(host)));
    }
    format!(
        "{}, {}: {}",
        said.trim(),
        relative(now, f.at),
        shown(&f.reason)
    )
}

fn render_domains(answer: &DomainsAnswer) -> String {
    if answer.domains.is_empty() {
        return format!("no message in the ledger since {}\n", hour(answer.since));
    }
    let mut rows = vec![row(&[
        "DOMAIN",
        "PLAIN %",
        "DELIVERED",
        "VERIFIED",
        "UNVERIFIED",
        "LEGACY",
        "PLAIN",
        "DEFERRED",
        "REFUSED",
        "POLICY",
        "CERT EXPIRES",
        "LAST FAILURE",
    ])];
    for d in &answer.domains {
        let c = &d.view.counts;
        rows.push(vec![
            shown(&d.view.domain),
            format!("{:.0}%", d.plain_share * 100.0),
            c.delivered().to_string(),
            c.tls_verified.to_string(),
            c.tls_unverified.to_string(),
            c.tls_legacy.to_string(),
            c.plain.to_string(),
            c.deferred.to_string(),
            c.refused.to_string(),
            d.view.policy.clone().unwrap_or_else(|| "-".into()),
            d.cert_expires.clone().unwrap_or_else(|| "-".into()),
            failure(&d.view, answer.now),
        ]);
    }
    let mut out = format!(
        "recipient domains since {}, the most in plain first\n{}",
        hour(answer.since),
        table(&rows)
    );
    if let Some(fleet) = &answer.fleet {
        out.push_str(&fleet_line(fleet));
    }
    if answer.dropped > 0 {
        out.push_str(&format!(
            "({} domains dropped since start to keep within ledger.max_domains)\n",
            answer.dropped
        ));
    }
    out
}

/// Whose ledgers an answer adds up.
fn fleet_line(fleet: &Fleet) -> String {
    let mut line = match fleet.relays.len() {
        0 => "this relay's messages only: no other relay's ledger in the shared cache".to_string(),
        _ => format!(
            "this relay's messages and those of {}",
            fleet.relays.join(", ")
        ),
    };
    if let Some(why) = fleet.sweep.unfinished {
        line.push_str(&format!(" (not every relay's: {})", why.why()));
    }
    line + "\n"
}

fn render_domain(answer: &DomainAnswer) -> String {
    let d = &answer.domain;
    let mut out = format!("{}\n", shown(&d.domain));
    if let Some(fleet) = &answer.fleet {
        out.push_str(&format!("  {}", fleet_line(fleet)));
    }
    let line = |out: &mut String, what: &str, value: String| {
        out.push_str(&format!("  {what:<14}{value}\n"));
    };
    line(
        &mut out,
        "policy",
        d.policy.clone().unwrap_or_else(|| "none".into()),
    );
    if let Some(mode) = &answer.mta_sts {
        line(&mut out, "MTA-STS held", mode.clone());
    }
    line(
        &mut out,
        "rule",
        d.rule.clone().unwrap_or_else(|| "-".into()),
    );
    let hosts: Vec<String> = d.hosts.iter().map(|h| shown(h)).collect();
    line(&mut out, "MX hosts", hosts.join(", "));
    if let Some((route, at)) = d.last_delivery {
        line(
            &mut out,
            "last delivery",
            format!("{route}, {}", relative(answer.now, at)),
        );
    }
    line(&mut out, "last failure", failure(d, answer.now));
    let mut rows = vec![vec![String::new()]];
    rows[0].extend(
        answer
            .windows
            .iter()
            .map(|w| format!("SINCE {}", hour(w.since))),
    );
    for route in Route::ALL {
        let mut cells = vec![route.name().to_string()];
        cells.extend(
            answer
                .windows
                .iter()
                .map(|w| w.counts.get(route).to_string()),
        );
        rows.push(cells);
    }
    let mut versions = vec!["TLS versions".to_string()];
    versions.extend(answer.windows.iter().map(|w| {
        let each: Vec<String> = (w.tls_versions.iter())
            .map(|(v, n)| format!("{v}={n}"))
            .collect();
        if each.is_empty() {
            "-".to_string()
        } else {
            each.join(" ")
        }
    }));
    rows.push(versions);
    out.push('\n');
    out.push_str(&table(&rows));
    if !answer.certificates.is_empty() {
        out.push('\n');
        out.push_str(&certs_table(&answer.certificates));
    }
    out
}

fn render_certs(answer: &CertsAnswer) -> String {
    if answer.certificates.is_empty() {
        return format!(
            "no cached server's certificate expires within {} days\n",
            answer.within_days
        );
    }
    certs_table(&answer.certificates)
}

fn certs_table(certs: &[CertRow]) -> String {
    let mut rows = vec![row(&[
        "HOST",
        "ADDRESS",
        "SUBJECT",
        "EXPIRES",
        "DAYS LEFT",
        "DOMAINS",
    ])];
    for c in certs {
        let addrs: Vec<String> = c.addrs.iter().map(ToString::to_string).collect();
        let mut expires = c.not_after.clone();
        if let Some(problem) = c.problem {
            expires.push_str(&format!(" ({problem})"));
        }
        rows.push(vec![
            shown(&c.host),
            addrs.join(","),
            c.subject.as_deref().map_or_else(|| "-".into(), shown),
            expires,
            c.days_left.to_string(),
            c.domains
                .iter()
                .map(|d| shown(d))
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    table(&rows)
}
