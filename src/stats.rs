//! Counters since start, shared by `tlsrouter ctl stats` and the Prometheus endpoint (one set
//! of numbers, two ways to read them).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::outcome::OutcomeClass;

type Labels = Vec<(&'static str, &'static str)>;

pub struct Stats {
    registry: Registry,
    pub sessions: Counter,
    pub active_sessions: Gauge,
    pub transactions: Counter,
    /// Messages the remote accepted, by `route` (tls-verified, tls-unverified, plain).
    delivered: Family<Labels, Counter>,
    /// Plain deliveries, by the class that allowed them.
    fallbacks: Family<Labels, Counter>,
    /// Messages answered with a 4xx.
    pub deferrals: Counter,
    /// Messages not delivered to a recipient domain, by `verdict` (deferred, refused) and
    /// the `class` of why (an outcome class, or `other`): bounded labels, no domain.
    not_delivered: Family<Labels, Counter>,
    /// Recipient domains whose last delivery went in plain (set when read).
    pub plain_domains: Gauge,
    /// Cached servers whose certificate expires within 14 days or has expired (set when
    /// read).
    pub expiring_certificates: Gauge,
    pub downgrades: Counter,
    pub cache_hits: Counter,
    pub cache_entries: Gauge,
    /// 1 for the DNSSEC start-up check's state, by `state`; 0 for the others.
    dane: Family<Labels, Gauge>,
    /// MTA-STS policy fetches started, and those that failed.
    pub sts_fetches: Counter,
    pub sts_fetch_failures: Counter,
    /// Messages deferred because an enforced MTA-STS policy left no server to take them.
    pub sts_enforced_deferrals: Counter,
    /// Messages whose sender asked REQUIRETLS (RFC 8689): delivered so, and refused for
    /// good because no server could keep it.
    pub requiretls_delivered: Counter,
    pub requiretls_refused: Counter,
    /// Messages delivered with their domain's policy set aside by `TLS-Required: No`.
    pub policy_waived_by_sender: Counter,
    /// Connections this host could not make for a reason of its own.
    pub local_errors: Counter,
    /// Recipients answered 452 4.5.3, to come again in a transaction of their own: not a
    /// deferral of the message.
    pub recipients_split: Counter,
    transaction_seconds: Histogram,
    handshake_seconds: Histogram,
    /// Transactions that went on a pooled connection.
    pub pool_reuses: Counter,
    /// Pooled connections found dead (or unusable) when taken; a new one was made.
    pub pool_dead: Counter,
    /// Connections idle in the pool now.
    pub pool_idle: Gauge,
    /// TLS handshakes toward remotes, full and resumed.
    pub tls_full_handshakes: Counter,
    pub tls_resumed_handshakes: Counter,
    /// The fleet's shared cache (Redis): calls that failed or timed out.
    pub redis_errors: Counter,
    /// 1 while Redis answers, 0 while it does not (and without a shared cache).
    pub redis_connected: Gauge,
    /// Lookups the near cache answered without asking Redis, and those it did not.
    pub near_cache_hits: Counter,
    pub near_cache_misses: Counter,
    /// A host did TLS for one source address and fails it for another.
    pub split_source_downgrades: Counter,
    /// Entries and policies read from the fleet that were not believed (future times, a pin
    /// not written as one, a policy that does not parse or weakens one held).
    pub fleet_forged: Counter,
    redis_seconds: Histogram,
    redis_calls: std::sync::atomic::AtomicU64,
    redis_micros: std::sync::atomic::AtomicU64,
}

impl Default for Stats {
    fn default() -> Stats {
        let mut stats = Stats {
            registry: Registry::with_prefix("tlsrouter"),
            sessions: Counter::default(),
            active_sessions: Gauge::default(),
            transactions: Counter::default(),
            delivered: Family::default(),
            fallbacks: Family::default(),
            deferrals: Counter::default(),
            not_delivered: Family::default(),
            plain_domains: Gauge::default(),
            expiring_certificates: Gauge::default(),
            downgrades: Counter::default(),
            cache_hits: Counter::default(),
            cache_entries: Gauge::default(),
            dane: Family::default(),
            sts_fetches: Counter::default(),
            sts_fetch_failures: Counter::default(),
            sts_enforced_deferrals: Counter::default(),
            requiretls_delivered: Counter::default(),
            requiretls_refused: Counter::default(),
            policy_waived_by_sender: Counter::default(),
            local_errors: Counter::default(),
            recipients_split: Counter::default(),
            transaction_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            handshake_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            pool_reuses: Counter::default(),
            pool_dead: Counter::default(),
            pool_idle: Gauge::default(),
            tls_full_handshakes: Counter::default(),
            tls_resumed_handshakes: Counter::default(),
            redis_errors: Counter::default(),
            redis_connected: Gauge::default(),
            near_cache_hits: Counter::default(),
            near_cache_misses: Counter::default(),
            split_source_downgrades: Counter::default(),
            fleet_forged: Counter::default(),
            redis_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 14)),
            redis_calls: Default::default(),
            redis_micros: Default::default(),
        };
        stats.register();
        stats
    }
}

/// A snapshot for `ctl stats`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    pub sessions: u64,
    pub active_sessions: i64,
    pub transactions: u64,
    pub delivered_tls_verified: u64,
    pub delivered_tls_unverified: u64,
    #[serde(default)]
    pub delivered_tls_legacy: u64,
    pub delivered_plain: u64,
    pub fallbacks: Vec<(String, u64)>,
    pub deferrals: u64,
    pub downgrades: u64,
    pub cache_hits: u64,
    pub cache_entries: i64,
    #[serde(default)]
    pub sts_fetches: u64,
    #[serde(default)]
    pub sts_fetch_failures: u64,
    #[serde(default)]
    pub sts_enforced_deferrals: u64,
    #[serde(default)]
    pub requiretls_delivered: u64,
    #[serde(default)]
    pub requiretls_refused: u64,
    #[serde(default)]
    pub policy_waived_by_sender: u64,
    #[serde(default)]
    pub local_errors: u64,
    #[serde(default)]
    pub recipients_split: u64,
    #[serde(default)]
    pub plain_domains: i64,
    #[serde(default)]
    pub expiring_certificates: i64,
    #[serde(default)]
    pub pool_reuses: u64,
    #[serde(default)]
    pub pool_dead: u64,
    #[serde(default)]
    pub pool_idle: i64,
    #[serde(default)]
    pub tls_full_handshakes: u64,
    #[serde(default)]
    pub tls_resumed_handshakes: u64,
    #[serde(default)]
    pub redis_connected: i64,
    #[serde(default)]
    pub redis_calls: u64,
    /// The mean round trip of a Redis call, in microseconds.
    #[serde(default)]
    pub redis_round_trip_us: u64,
    #[serde(default)]
    pub redis_errors: u64,
    #[serde(default)]
    pub near_cache_hits: u64,
    #[serde(default)]
    pub near_cache_misses: u64,
    #[serde(default)]
    pub split_source_downgrades: u64,
    #[serde(default)]
    pub fleet_forged: u64,
}

impl Stats {
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register("sessions", "MTA sessions accepted", self.sessions.clone());
        r.register(
            "active_sessions",
            "MTA sessions open now",
            self.active_sessions.clone(),
        );
        r.register(
            "transactions",
            "transactions ended",
            self.transactions.clone(),
        );
        r.register(
            "delivered",
            "messages the remote accepted, by route",
            self.delivered.clone(),
        );
        r.register(
            "fallbacks",
            "plain deliveries, by the class that allowed them",
            self.fallbacks.clone(),
        );
        r.register(
            "deferrals",
            "messages answered with a 4xx",
            self.deferrals.clone(),
        );
        r.register(
            "not_delivered",
            "messages not delivered to a recipient domain, by verdict (deferred, refused) and the outcome class of why (other: no TLS fact)",
            self.not_delivered.clone(),
        );
        r.register(
            "plain_domains",
            "recipient domains whose last delivery went in plain",
            self.plain_domains.clone(),
        );
        r.register(
            "expiring_certificates",
            "cached servers whose certificate expires within 14 days or has expired",
            self.expiring_certificates.clone(),
        );
        r.register(
            "downgrades",
            "hosts that did TLS before and offered no STARTTLS",
            self.downgrades.clone(),
        );
        r.register(
            "cache_hits",
            "delivery decisions taken from the cache",
            self.cache_hits.clone(),
        );
        r.register(
            "cache_entries",
            "entries in the outcome cache",
            self.cache_entries.clone(),
        );
        r.register(
            "dane",
            "1 for what the DNSSEC start-up check found (on, off, unknown: asked again, \
             unchecked: not yet asked), 0 for the others",
            self.dane.clone(),
        );
        r.register(
            "mta_sts_fetches",
            "MTA-STS policy fetches started",
            self.sts_fetches.clone(),
        );
        r.register(
            "mta_sts_fetch_failures",
            "MTA-STS policy fetches that failed",
            self.sts_fetch_failures.clone(),
        );
        r.register(
            "mta_sts_enforced_deferrals",
            "messages deferred because an enforced MTA-STS policy left no server",
            self.sts_enforced_deferrals.clone(),
        );
        r.register(
            "requiretls_delivered",
            "messages with REQUIRETLS delivered over verified TLS to a server that offers it",
            self.requiretls_delivered.clone(),
        );
        r.register(
            "requiretls_refused",
            "messages with REQUIRETLS refused because no server could keep it",
            self.requiretls_refused.clone(),
        );
        r.register(
            "policy_waived_by_sender",
            "messages delivered with their domain's MTA-STS or DANE policy set aside by TLS-Required: No",
            self.policy_waived_by_sender.clone(),
        );
        r.register(
            "local_errors",
            "connections not made for a reason of this host's own (descriptors, buffers, source address); nothing cached",
            self.local_errors.clone(),
        );
        r.register(
            "recipients_split",
            "recipients answered 452 4.5.3 to come again in a transaction of their own (another next hop, other TLS terms, too many recipients); not deferrals",
            self.recipients_split.clone(),
        );
        r.register(
            "transaction_seconds",
            "time from MAIL FROM to the final reply",
            self.transaction_seconds.clone(),
        );
        r.register(
            "handshake_seconds",
            "TLS handshake time",
            self.handshake_seconds.clone(),
        );
        r.register(
            "pool_reuses",
            "transactions that went on a pooled remote connection",
            self.pool_reuses.clone(),
        );
        r.register(
            "pool_dead",
            "pooled remote connections found dead when taken",
            self.pool_dead.clone(),
        );
        r.register(
            "pool_idle",
            "remote connections idle in the pool",
            self.pool_idle.clone(),
        );
        r.register(
            "tls_full_handshakes",
            "full TLS handshakes toward remotes",
            self.tls_full_handshakes.clone(),
        );
        r.register(
            "tls_resumed_handshakes",
            "resumed TLS handshakes toward remotes",
            self.tls_resumed_handshakes.clone(),
        );
        self.register_shared_cache();
    }

    fn register_shared_cache(&mut self) {
        let r = &mut self.registry;
        r.register(
            "redis_seconds",
            "round trip of a call to the shared cache (Redis)",
            self.redis_seconds.clone(),
        );
        r.register(
            "redis_errors",
            "calls to the shared cache (Redis) that failed or timed out",
            self.redis_errors.clone(),
        );
        r.register(
            "redis_connected",
            "1 while the shared cache (Redis) answers",
            self.redis_connected.clone(),
        );
        r.register(
            "near_cache_hits",
            "lookups answered by the near cache without asking Redis",
            self.near_cache_hits.clone(),
        );
        r.register(
            "near_cache_misses",
            "lookups that went to Redis (or would have, while it is down)",
            self.near_cache_misses.clone(),
        );
        r.register(
            "split_source_downgrades",
            "hosts that did TLS for one source address and failed it for another",
            self.split_source_downgrades.clone(),
        );
        r.register(
            "fleet_forged",
            "entries and policies read from the shared cache that were not believed",
            self.fleet_forged.clone(),
        );
    }

    /// What the DNSSEC start-up check found now: `on`, `off`, `unknown` or `unchecked`.
    pub fn dane_state(&self, now: &'static str) {
        for state in ["on", "off", "unknown", "unchecked"] {
            let gauge = self.dane.get_or_create(&vec![("state", state)]);
            gauge.set(i64::from(state == now));
        }
    }

    /// One Redis call's round trip.
    pub fn redis_round_trip(&self, elapsed: std::time::Duration) {
        use std::sync::atomic::Ordering;
        self.redis_seconds.observe(elapsed.as_secs_f64());
        self.redis_calls.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.redis_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// A message the remote accepted; `route` is its class (or "plain").
    pub fn delivered(&self, route: &'static str) {
        self.delivered.get_or_create(&vec![("route", route)]).inc();
    }

    /// A message not delivered to a recipient domain: `verdict` is `deferred` or `refused`.
    pub fn not_delivered(&self, verdict: &'static str, class: Option<OutcomeClass>) {
        let class = class.map_or("other", OutcomeClass::name);
        let labels = vec![("verdict", verdict), ("class", class)];
        self.not_delivered.get_or_create(&labels).inc();
    }

    pub fn fallback(&self, class: OutcomeClass) {
        self.fallbacks
            .get_or_create(&vec![("class", class.name())])
            .inc();
    }

    pub fn transaction_time(&self, seconds: f64) {
        self.transaction_seconds.observe(seconds);
    }

    pub fn handshake_time(&self, seconds: f64) {
        self.handshake_seconds.observe(seconds);
    }

    pub fn snapshot(&self) -> Snapshot {
        let delivered = |route| {
            self.delivered
                .get(&vec![("route", route)])
                .map_or(0, |c| c.get())
        };
        let fallbacks = OutcomeClass::ALL
            .iter()
            .filter_map(|class| {
                let count = self.fallbacks.get(&vec![("class", class.name())])?.get();
                Some((class.name().to_string(), count))
            })
            .collect();
        Snapshot {
            sessions: self.sessions.get(),
            active_sessions: self.active_sessions.get(),
            transactions: self.transactions.get(),
            delivered_tls_verified: delivered("tls-verified"),
            delivered_tls_unverified: delivered("tls-unverified"),
            delivered_tls_legacy: delivered("tls-legacy"),
            delivered_plain: delivered("plain"),
            fallbacks,
            deferrals: self.deferrals.get(),
            downgrades: self.downgrades.get(),
            cache_hits: self.cache_hits.get(),
            cache_entries: self.cache_entries.get(),
            sts_fetches: self.sts_fetches.get(),
            sts_fetch_failures: self.sts_fetch_failures.get(),
            sts_enforced_deferrals: self.sts_enforced_deferrals.get(),
            requiretls_delivered: self.requiretls_delivered.get(),
            requiretls_refused: self.requiretls_refused.get(),
            policy_waived_by_sender: self.policy_waived_by_sender.get(),
            local_errors: self.local_errors.get(),
            recipients_split: self.recipients_split.get(),
            plain_domains: self.plain_domains.get(),
            expiring_certificates: self.expiring_certificates.get(),
            pool_reuses: self.pool_reuses.get(),
            pool_dead: self.pool_dead.get(),
            pool_idle: self.pool_idle.get(),
            tls_full_handshakes: self.tls_full_handshakes.get(),
            tls_resumed_handshakes: self.tls_resumed_handshakes.get(),
            redis_connected: self.redis_connected.get(),
            redis_calls: self.redis_calls.load(std::sync::atomic::Ordering::Relaxed),
            redis_round_trip_us: self
                .redis_micros
                .load(std::sync::atomic::Ordering::Relaxed)
                .checked_div(self.redis_calls.load(std::sync::atomic::Ordering::Relaxed))
                .unwrap_or(0),
            redis_errors: self.redis_errors.get(),
            near_cache_hits: self.near_cache_hits.get(),
            near_cache_misses: self.near_cache_misses.get(),
            split_source_downgrades: self.split_source_downgrades.get(),
            fleet_forged: self.fleet_forged.get(),
        }
    }

    /// The Prometheus text format.
    pub fn prometheus_text(&self) -> String {
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}
