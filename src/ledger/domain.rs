//! One recipient domain's week: its messages by route and TLS version in hourly buckets,
//! its last failure, what it published, the rule that applied and the MX hosts it went to.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::outcome::OutcomeClass;

/// Hours kept: a week, and the hour under way.
pub(super) const HOURS: u32 = 7 * 24 + 1;

/// MX hosts kept per domain, the latest last.
const HOSTS: usize = 8;

/// What became of one message for one recipient domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// Over TLS with the certificate verified (PKIX or DANE).
    TlsVerified,
    /// Over TLS with a certificate that did not verify.
    TlsUnverified,
    /// Over the legacy stack's TLS: encrypted, never authenticated.
    TlsLegacy,
    Plain,
    /// Answered with a 4xx: the MTA tries again.
    Deferred,
    /// Answered with a 5xx: the MTA bounces it.
    Refused,
}

impl Route {
    pub const ALL: [Route; 6] = [
        Route::TlsVerified,
        Route::TlsUnverified,
        Route::TlsLegacy,
        Route::Plain,
        Route::Deferred,
        Route::Refused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Route::TlsVerified => "tls-verified",
            Route::TlsUnverified => "tls-unverified",
            Route::TlsLegacy => "tls-legacy",
            Route::Plain => "plain",
            Route::Deferred => "deferred",
            Route::Refused => "refused",
        }
    }

    /// The remote took the message.
    pub fn is_delivery(self) -> bool {
        !matches!(self, Route::Deferred | Route::Refused)
    }
}

impl std::str::FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Route, String> {
        Route::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Route::ALL.iter().map(|r| r.name()).collect();
                format!("unknown route {s:?} (known: {})", names.join(", "))
            })
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The TLS versions counted by name; a message over any other (SSLv3 through the legacy
/// stack) counts by its route only.
const VERSIONS: [&str; 4] = ["TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3"];

/// Messages by route over some hours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCounts {
    pub tls_verified: u64,
    pub tls_unverified: u64,
    pub tls_legacy: u64,
    pub plain: u64,
    pub deferred: u64,
    pub refused: u64,
}

impl RouteCounts {
    pub fn get(&self, route: Route) -> u64 {
        match route {
            Route::TlsVerified => self.tls_verified,
            Route::TlsUnverified => self.tls_unverified,
            Route::TlsLegacy => self.tls_legacy,
            Route::Plain => self.plain,
            Route::Deferred => self.deferred,
            Route::Refused => self.refused,
        }
    }

    fn add(&mut self, route: Route, n: u64) {
        let slot = match route {
            Route::TlsVerified => &mut self.tls_verified,
            Route::TlsUnverified => &mut self.tls_unverified,
            Route::TlsLegacy => &mut self.tls_legacy,
            Route::Plain => &mut self.plain,
            Route::Deferred => &mut self.deferred,
            Route::Refused => &mut self.refused,
        };
        *slot += n;
    }

    /// Every message, whatever became of it.
    pub fn total(&self) -> u64 {
        Route::ALL.iter().map(|&r| self.get(r)).sum()
    }

    /// Messages the remote took.
    pub fn delivered(&self) -> u64 {
        (Route::ALL.iter().filter(|r| r.is_delivery()))
            .map(|&r| self.get(r))
            .sum()
    }

    /// The share of delivered messages that went in plain, 0 to 1.
    pub fn plain_share(&self) -> f64 {
        match self.delivered() {
            0 => 0.0,
            delivered => self.plain as f64 / delivered as f64,
        }
    }

    pub fn merge(&mut self, other: &RouteCounts) {
        for route in Route::ALL {
            self.add(route, other.get(route));
        }
    }
}

/// One hour's messages. Short names in the file and in Redis: a busy relay's week holds
/// many of them.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Bucket {
    /// Hours since the epoch.
    #[serde(rename = "h")]
    hour: u32,
    /// By route, in the order of `Route::ALL`.
    #[serde(rename = "r")]
    routes: [u32; 6],
    /// By version, in the order of `VERSIONS`.
    #[serde(rename = "v")]
    versions: [u32; 4],
}

/// Why the domain's last message that was not delivered encrypted went as it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Unix seconds.
    pub at: u64,
    /// The MX host (or smarthost) it was about, when it was about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Its outcome class, when it is a TLS or reachability fact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<OutcomeClass>,
    /// In words, as the log line says it.
    pub reason: String,
}

/// What one message did for one recipient domain.
#[derive(Clone, Debug)]
pub struct Message<'a> {
    pub route: Route,
    /// The negotiated version of an encrypted route.
    pub tls_version: Option<&'a str>,
    /// The server it went to or was tried at.
    pub host: Option<&'a str>,
    /// What the domain published there (`mta-sts:enforce`, `dane`), when a server was
    /// reached; `None` keeps what was known.
    pub policy: Option<Option<&'static str>>,
    pub rule: Option<&'a str>,
    pub failure: Option<&'a Failure>,
}

/// One domain's ledger.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct DomainLedger {
    buckets: VecDeque<Bucket>,
    /// Unix seconds of the last message.
    pub(super) last_at: u64,
    /// The route of the last message the remote took, and when.
    last_delivery: Option<(Route, u64)>,
    last_failure: Option<Failure>,
    /// What the domain published at the server its last message reached; `None` for nothing.
    policy: Option<String>,
    rule: Option<String>,
    hosts: Vec<String>,
}

/// What the ledger says of a domain over a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainView {
    pub domain: String,
    pub counts: RouteCounts,
    /// Encrypted messages by negotiated version.
    pub tls_versions: BTreeMap<String, u64>,
    pub last_at: u64,
    #[serde(default)]
    pub last_delivery: Option<(Route, u64)>,
    #[serde(default)]
    pub last_failure: Option<Failure>,
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
}

impl DomainLedger {
    pub(super) fn record(&mut self, now: u64, message: &Message<'_>) {
        let hour = (now / 3600) as u32;
        self.forget_before(hour.saturating_sub(HOURS - 1));
        let bucket = match self.buckets.back_mut() {
            // A clock set back counts in the latest hour, never before it.
            Some(last) if last.hour >= hour => last,
            _ => {
                self.buckets.push_back(Bucket {
                    hour,
                    routes: [0; 6],
                    versions: [0; 4],
                });
                self.buckets.back_mut().expect("just pushed")
            }
        };
        let route = Route::ALL.iter().position(|&r| r == message.route);
        bucket.routes[route.expect("every route is in ALL")] += 1;
        if let Some(version) = message.tls_version
            && let Some(slot) = VERSIONS.iter().position(|&v| v == version)
        {
            bucket.versions[slot] += 1;
        }
        self.last_at = self.last_at.max(now);
        if message.route.is_delivery() {
            self.last_delivery = Some((message.route, now));
        }
        if let Some(failure) = message.failure {
            self.last_failure = Some(failure.clone());
        }
        // Written only when they change: most messages to a domain say the same.
        if let Some(policy) = message.policy
            && self.policy.as_deref() != policy
        {
            self.policy = policy.map(str::to_string);
        }
        if let Some(rule) = message.rule
            && self.rule.as_deref() != Some(rule)
        {
            self.rule = Some(rule.to_string());
        }
        if let Some(host) = message.host
            && self.hosts.last().is_none_or(|last| last != host)
        {
            self.hosts.retain(|h| h != host);
            if self.hosts.len() >= HOSTS {
                self.hosts.remove(0);
            }
            self.hosts.push(host.to_string());
        }
    }

    /// Drops the hours before `hour`.
    pub(super) fn forget_before(&mut self, hour: u32) {
        while self.buckets.front().is_some_and(|b| b.hour < hour) {
            self.buckets.pop_front();
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The counts of the hours from `since_hour` on.
    pub(super) fn view(&self, domain: &str, since_hour: u32) -> DomainView {
        let mut counts = RouteCounts::default();
        let mut versions = [0u64; 4];
        for bucket in self.buckets.iter().filter(|b| b.hour >= since_hour) {
            for (route, &n) in Route::ALL.iter().zip(&bucket.routes) {
                counts.add(*route, u64::from(n));
            }
            for (total, &n) in versions.iter_mut().zip(&bucket.versions) {
                *total += u64::from(n);
            }
        }
        DomainView {
            domain: domain.to_string(),
            counts,
            tls_versions: (VERSIONS.iter().zip(versions))
                .filter(|(_, n)| *n > 0)
                .map(|(v, n)| (v.to_string(), n))
                .collect(),
            last_at: self.last_at,
            last_delivery: self.last_delivery,
            last_failure: self.last_failure.clone(),
            policy: self.policy.clone(),
            rule: self.rule.clone(),
            hosts: self.hosts.clone(),
        }
    }

    /// The domain's last delivery went in plain.
    pub(super) fn delivered_in_plain(&self) -> bool {
        matches!(self.last_delivery, Some((Route::Plain, _)))
    }
}

impl DomainView {
    /// Adds another relay's view of the same domain: counts summed, the latest facts kept.
    pub fn merge(&mut self, other: DomainView) {
        self.counts.merge(&other.counts);
        for (version, n) in other.tls_versions {
            *self.tls_versions.entry(version).or_default() += n;
        }
        let latest = |a: &Option<(Route, u64)>| a.map_or(0, |(_, at)| at);
        if latest(&other.last_delivery) > latest(&self.last_delivery) {
            self.last_delivery = other.last_delivery;
        }
        let failed_at = |f: &Option<Failure>| f.as_ref().map_or(0, |f| f.at);
        if failed_at(&other.last_failure) > failed_at(&self.last_failure) {
            self.last_failure = other.last_failure;
        }
        if other.last_at > self.last_at {
            self.last_at = other.last_at;
            self.policy = other.policy;
            self.rule = other.rule;
        }
        for host in other.hosts {
            if !self.hosts.contains(&host) {
                self.hosts.push(host);
            }
        }
    }
}
