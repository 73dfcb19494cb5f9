//! The TLS outcome cache: what happened the last time we tried to encrypt to each MX.
//!
//! Entries are keyed by MX host name and address and carry the recipient domains seen for
//! them. A failure entry lets the next message skip a doomed handshake; a success leaves
//! `last_tls_at` behind so that a later "no STARTTLS" can be recognised as a downgrade.
//!
//! Expiry is decided by our own timestamps (`expires_at`, read from a [`Clock`] that tests
//! can drive), not by moka, whose clock cannot be moved by a test. moka only bounds the
//! number of entries, least recently used first.
//!
//! An entry whose class has expired is invisible ([`OutcomeCache::get`] says `None`), but
//! while its `last_tls_at` is younger than the success TTL it is retained: a failure's
//! short TTL must not erase the memory that the host did TLS, or downgrades would go unseen
//! an hour after the first one. Only [`OutcomeCache::is_downgrade`] and persistence see it.
//!
//! With `cache.backend: redis` this cache is the near cache of a fleet's shared one
//! ([`shared`]): lookups read Redis when the near copy is older than `cache.redis.near_ttl`,
//! and observations, pins and flushes are written there in the background.

pub mod shared;

use std::borrow::Cow;
use std::fmt;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::Equivalent;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use serde::{Deserialize, Serialize};

use crate::certificate::Certificate;
use crate::outcome::{CertProblem, NoTls, OutcomeClass, TlsOutcome, TlsSession, Ttl, Verification};

/// At most this many recipient domains are kept per entry; an MX shared by thousands of
/// domains (a hosting provider) must not grow without bound.
pub const MAX_DOMAINS: usize = 16;

/// The persistence format's version, written into every file.
const FILE_VERSION: u32 = 1;

/// The detail given to entries the operator pinned.
const PINNED_DETAIL: &str = "pinned by operator";

// ---------------------------------------------------------------------------------------
// Clocks

/// The time, in unix seconds. Injected so that tests decide when entries expire.
pub trait Clock: Send + Sync {
    fn now(&self) -> u64;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        // A clock before 1970 is a broken machine; treating it as 0 only expires entries.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A clock that moves only when told to: for tests, here and elsewhere.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(now: u64) -> ManualClock {
        ManualClock(AtomicU64::new(now))
    }

    pub fn set(&self, now: u64) {
        self.0.store(now, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_secs(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// Configuration

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Where the cache is saved on shutdown and periodically; `None` keeps it in memory only.
    pub file: Option<PathBuf>,
    #[serde(with = "crate::settings::duration")]
    pub save_interval: Duration,
    /// The most entries kept; the least recently used go first.
    pub max_entries: u64,
    pub ttl: TtlConfig,
    /// This relay's memory only, or a fleet's shared cache in Redis.
    pub backend: Backend,
    /// `cache.redis`: where the shared cache is, used with `backend: redis`.
    pub redis: shared::RedisConfig,
}

/// Where outcomes are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process only (the default; needs nothing else).
    #[default]
    Memory,
    /// Shared by every relay of a fleet through Redis, with this process's cache in front.
    Redis,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            file: None,
            save_interval: Duration::from_secs(5 * 60),
            max_entries: 100_000,
            ttl: TtlConfig::default(),
            backend: Backend::Memory,
            redis: shared::RedisConfig::default(),
        }
    }
}

/// How long an outcome is believed, by kind.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtlConfig {
    /// `tls-verified` and `tls-unverified`; also how long a downgrade is watched for.
    #[serde(with = "crate::settings::duration")]
    pub success: Duration,
    /// Every other TLS class: worth retrying after a while, the remote may be fixed.
    #[serde(with = "crate::settings::duration")]
    pub tls_failure: Duration,
    /// `connect-failed` and `timeout`: not TLS facts, so kept only briefly.
    #[serde(with = "crate::settings::duration")]
    pub unreachable: Duration,
    /// The longest an operator's pin (`ctl cache pin --ttl`) may last; a pin read from the
    /// fleet that lasts longer is not believed.
    #[serde(with = "crate::settings::duration")]
    pub pin_max: Duration,
}

impl Default for TtlConfig {
    fn default() -> Self {
        TtlConfig {
            success: Duration::from_secs(7 * 86_400),
            tls_failure: Duration::from_secs(3600),
            unreachable: Duration::from_secs(5 * 60),
            pin_max: Duration::from_secs(30 * 86_400),
        }
    }
}

impl TtlConfig {
    pub fn for_class(&self, class: OutcomeClass) -> Duration {
        match class.meaning().ttl {
            Ttl::Success => self.success,
            Ttl::TlsFailure => self.tls_failure,
            Ttl::Unreachable => self.unreachable,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Keys and entries

/// An MX host: its name (lower case, no trailing dot) and one of its addresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    pub host: String,
    pub addr: IpAddr,
}

impl CacheKey {
    pub fn new(host: &str, addr: IpAddr) -> CacheKey {
        CacheKey {
            host: normalize_name(host).into_owned(),
            addr,
        }
    }
}

/// A borrowed key, so that a lookup of an already normalised name allocates nothing.
/// Its derived `Hash` matches `CacheKey`'s: `&str` and `String` hash alike.
#[derive(Hash)]
struct KeyRef<'a> {
    host: &'a str,
    addr: IpAddr,
}

impl Equivalent<CacheKey> for KeyRef<'_> {
    fn equivalent(&self, key: &CacheKey) -> bool {
        self.addr == key.addr && self.host == key.host
    }
}

/// Lower case, without the trailing dot of a fully qualified name. DNS hands us A-labels
/// (punycode), so ASCII case folding is enough.
fn normalize_name(name: &str) -> Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// What is known about one MX host address.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CacheEntry {
    pub host: String,
    pub addr: IpAddr,
    /// Recipient domains seen for this host, the latest last, at most [`MAX_DOMAINS`]: on
    /// an MX shared by many domains the one an admin looks up after a failure is there.
    pub domains: Vec<String>,
    pub class: OutcomeClass,
    /// Human text: the alert, io error or certificate problem.
    pub detail: String,
    pub tls_version: Option<String>,
    pub cipher: Option<String>,
    /// The server certificate's subject, when TLS was up.
    #[serde(default)]
    pub cert_subject: Option<String>,
    /// `YYYY-MM-DD`: the server certificate's expiry, when TLS was up or it was refused as
    /// expired.
    pub cert_not_after: Option<String>,
    /// The certificate's class (`cert-expired`, ...) when it did not verify.
    #[serde(default)]
    pub cert_problem: Option<OutcomeClass>,
    pub first_seen: u64,
    pub last_seen: u64,
    /// How many observations.
    pub count: u64,
    pub expires_at: u64,
    /// Set by the operator: observations do not replace the class until it expires.
    pub pinned: bool,
    /// When the operator pinned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_at: Option<u64>,
    /// The last time TLS was achieved with this host, kept across later failures so that a
    /// downgrade can be detected.
    pub last_tls_at: Option<u64>,
    /// The last time that TLS had a certificate verified for the host's name (PKIX), kept
    /// like `last_tls_at`: a certificate failure after it may be an attacker's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_at: Option<u64>,
    /// The relay (and its source address) that saw the class; set in a fleet only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_by: Option<Observer>,
    /// The relay that last did TLS with the host (at `last_tls_at`); set in a fleet only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tls_by: Option<Observer>,
    /// The class was read from the fleet's shared cache, not observed by this relay.
    #[serde(default)]
    pub shared: bool,
}

/// Who saw an outcome: a relay of the fleet, by name, and the address it sends from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observer {
    pub relay: String,
    /// `delivery.source_address`; `None`: the system's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<IpAddr>,
}

impl Observer {
    /// Whether two observers reach remote servers from the same address. Without a
    /// configured source address a relay is taken to have its own.
    pub fn same_source(&self, other: &Observer) -> bool {
        match (self.source, other.source) {
            (Some(a), Some(b)) => a == b,
            _ => self.relay == other.relay,
        }
    }
}

impl fmt::Display for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source {
            Some(source) => write!(f, "relay {} (from {source})", self.relay),
            None => write!(f, "relay {}", self.relay),
        }
    }
}

impl CacheEntry {
    fn new(key: &CacheKey, class: OutcomeClass, now: u64) -> CacheEntry {
        CacheEntry {
            host: key.host.clone(),
            addr: key.addr,
            domains: Vec::new(),
            class,
            detail: String::new(),
            tls_version: None,
            cipher: None,
            cert_subject: None,
            cert_not_after: None,
            cert_problem: None,
            first_seen: now,
            last_seen: now,
            count: 0,
            expires_at: now,
            pinned: false,
            pinned_at: None,
            last_tls_at: None,
            last_verified_at: None,
            observed_by: None,
            last_tls_by: None,
            shared: false,
        }
    }

    /// An entry as an attempt that found `class` would leave it, for questions about what
    /// would happen (`explain`).
    pub fn assumed(
        host: &str,
        addr: IpAddr,
        class: OutcomeClass,
        cert_problem: Option<OutcomeClass>,
    ) -> CacheEntry {
        let mut entry = CacheEntry::new(&CacheKey::new(host, addr), class, 0);
        entry.detail = format!("{class} (assumed)");
        entry.cert_problem = cert_problem;
        entry
    }

    /// The classes a rule's `outcome` condition can match: the class, and the certificate's.
    pub fn classes(&self) -> Vec<OutcomeClass> {
        classes(self.class, self.cert_problem)
    }

    pub fn key(&self) -> CacheKey {
        CacheKey {
            host: self.host.clone(),
            addr: self.addr,
        }
    }

    /// Past its class's TTL (or its pin's): no longer believed.
    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }

    /// Whether `name` (normalised) is this entry's host or one of its recipient domains.
    fn matches(&self, name: &str) -> bool {
        self.host == name || self.domains.iter().any(|d| d == name)
    }

    fn add_domain(&mut self, domain: &str) {
        let domain = normalize_name(domain);
        if domain.is_empty() {
            return;
        }
        if let Some(seen) = self.domains.iter().position(|d| *d == domain) {
            self.domains.remove(seen);
        } else if self.domains.len() >= MAX_DOMAINS {
            self.domains.remove(0);
        }
        self.domains.push(domain.into_owned());
    }

    /// Until when the entry is worth keeping: its own expiry, or longer while it still
    /// remembers TLS recently enough to detect a downgrade.
    fn retained_until(&self, success_ttl: Duration) -> u64 {
        let tls_memory = self
            .last_tls_at
            .map_or(0, |at| at.saturating_add(success_ttl.as_secs()));
        self.expires_at.max(tls_memory)
    }

    /// Repairs what a hand-edited or older file might carry: case, the domain bound.
    pub(crate) fn normalized(mut self) -> CacheEntry {
        self.host = normalize_name(&self.host).into_owned();
        let domains = std::mem::take(&mut self.domains);
        for domain in &domains {
            self.add_domain(domain);
        }
        self
    }
}

/// The classes rules see for an entry (`match: outcome:`). A `tls-legacy` host is still a
/// server that speaks only old TLS: it keeps matching `legacy-tls` rules, so the rule a host
/// gets does not change because the legacy stack reached it.
fn classes(class: OutcomeClass, cert_problem: Option<OutcomeClass>) -> Vec<OutcomeClass> {
    let mut classes = vec![class];
    classes.extend(cert_problem);
    if class == OutcomeClass::TlsLegacy {
        classes.push(OutcomeClass::LegacyTls);
    }
    classes
}

/// True when `now_class` says a host that did TLS within the success TTL now offers no
/// STARTTLS: a middlebox stripping it, or a misconfiguration worth treating with suspicion.
pub fn is_downgrade(
    entry: &CacheEntry,
    now_class: OutcomeClass,
    now: u64,
    success_ttl: Duration,
) -> bool {
    now_class.meaning().downgrade && did_tls_within(entry, now, success_ttl)
}

/// Whether the entry's host did TLS within `success_ttl` before `now`.
fn did_tls_within(entry: &CacheEntry, now: u64, success_ttl: Duration) -> bool {
    within(entry.last_tls_at, now, success_ttl)
}

fn within(at: Option<u64>, now: u64, ttl: Duration) -> bool {
    at.is_some_and(|at| now.saturating_sub(at) < ttl.as_secs())
}

/// What a server did within the success memory (`cache.ttl.success`), as the cache
/// remembers it: what a cached failure is weighed against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMemory {
    /// No TLS remembered.
    #[default]
    Nothing,
    /// TLS, whatever its certificate was worth.
    Tls,
    /// TLS with a certificate verified for the server's name.
    VerifiedTls,
}

impl TlsMemory {
    /// What `entry` remembers at `now`.
    pub fn of(entry: &CacheEntry, now: u64, success_ttl: Duration) -> TlsMemory {
        if within(entry.last_verified_at, now, success_ttl) {
            TlsMemory::VerifiedTls
        } else if within(entry.last_tls_at, now, success_ttl) {
            TlsMemory::Tls
        } else {
            TlsMemory::Nothing
        }
    }
}

// ---------------------------------------------------------------------------------------
// Observations

/// One attempt's result, as the cache records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub class: OutcomeClass,
    pub detail: String,
    pub tls_version: Option<String>,
    pub cipher: Option<String>,
    pub cert_subject: Option<String>,
    pub cert_not_after: Option<String>,
    pub cert_problem: Option<OutcomeClass>,
}

impl Observation {
    /// `None` for a plain session no one tried to encrypt (`tls: never`): nothing learned.
    /// `None` too for a decision taken from the cache itself: it is no new observation.
    pub fn from_outcome(outcome: &TlsOutcome) -> Option<Observation> {
        if let TlsOutcome::Plain(NoTls::Cached { .. }) = outcome {
            return None;
        }
        let class = outcome.class()?;
        Some(match outcome {
            TlsOutcome::Encrypted(session) => Observation::encrypted(class, session),
            TlsOutcome::Legacy(session) => {
                let as_session = TlsSession {
                    version: session.version.clone(),
                    cipher: session.cipher.clone(),
                    verification: session.verification.clone(),
                    chain: session.chain.clone(),
                };
                let mut observation = Observation::encrypted(class, &as_session);
                observation.detail = format!(
                    "legacy TLS stack, not authenticated ({})",
                    observation.detail
                );
                observation
            }
            TlsOutcome::Plain(reason) => Observation {
                class,
                detail: reason.to_string(),
                tls_version: None,
                cipher: None,
                cert_subject: None,
                cert_not_after: match reason {
                    NoTls::CertRejected(problem) => expiry(problem),
                    _ => None,
                },
                cert_problem: match reason {
                    NoTls::CertRejected(problem) => Some(problem.class()),
                    _ => None,
                },
            },
        })
    }

    fn encrypted(class: OutcomeClass, session: &TlsSession) -> Observation {
        let (detail, problem_expiry, cert_problem) = match &session.verification {
            Verification::Verified => ("certificate verified".to_string(), None, None),
            Verification::Failed(problem) => {
                (problem.to_string(), expiry(problem), Some(problem.class()))
            }
        };
        let leaf = session
            .chain
            .first()
            .and_then(|der| Certificate::parse(der));
        let (cert_subject, cert_not_after) = match leaf {
            Some(leaf) => (Some(leaf.subject), Some(leaf.not_after)),
            None => (None, problem_expiry),
        };
        Observation {
            class,
            detail,
            tls_version: Some(session.version.clone()),
            cipher: Some(session.cipher.clone()),
            cert_subject,
            cert_not_after,
            cert_problem,
        }
    }

    /// The classes a rule's `outcome` condition will match once this is cached.
    pub fn classes(&self) -> Vec<OutcomeClass> {
        classes(self.class, self.cert_problem)
    }

    /// The host was not reached: `class` is `ConnectFailed` or `Timeout`.
    pub fn unreachable(class: OutcomeClass, detail: impl Into<String>) -> Observation {
        debug_assert!(class.is_unreachable(), "{class} is a TLS outcome");
        Observation {
            class,
            detail: detail.into(),
            tls_version: None,
            cipher: None,
            cert_subject: None,
            cert_not_after: None,
            cert_problem: None,
        }
    }
}

fn expiry(problem: &CertProblem) -> Option<String> {
    match problem {
        CertProblem::Expired { not_after } => Some(not_after.clone()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Errors

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The io error is in the message, not a `source()`, so a chain prints it once.
    #[error("cache file {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("cache file {} is corrupt, ignoring it: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("no cached entry for {host}: name an address to pin, {host}[ADDRESS]")]
    NotCached { host: String },
    #[error(
        "a pin lasts at most {} (cache.ttl.pin_max): give a shorter --ttl, or pin again later",
        crate::settings::duration::format(*max)
    )]
    PinTooLong { max: Duration },
}

// ---------------------------------------------------------------------------------------
// The cache

/// The persisted form: versioned so that a later format is refused, not misread.
#[derive(Serialize)]
struct SavedRef<'a> {
    version: u32,
    entries: &'a [CacheEntry],
}

#[derive(Deserialize)]
struct Saved {
    entries: Vec<CacheEntry>,
}

/// Read first, so that another version is reported as such rather than as a field error.
#[derive(Deserialize)]
struct SavedHeader {
    version: u32,
}

pub struct OutcomeCache {
    entries: Cache<CacheKey, CacheEntry>,
    ttl: TtlConfig,
    clock: Arc<dyn Clock>,
    /// The fleet's shared cache, with `backend: redis`.
    shared: std::sync::OnceLock<Arc<shared::SharedCache>>,
}

impl fmt::Debug for OutcomeCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutcomeCache")
            .field("entries", &self.entries.entry_count())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl OutcomeCache {
    pub fn new(config: &CacheConfig, clock: Arc<dyn Clock>) -> OutcomeCache {
        // LRU rather than moka's default TinyLFU: TinyLFU may refuse a new key when full,
        // and the newest observation is the one worth keeping.
        let entries = Cache::builder()
            .max_capacity(config.max_entries)
            .eviction_policy(EvictionPolicy::lru())
            .build();
        OutcomeCache {
            entries,
            ttl: config.ttl.clone(),
            clock,
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Makes this cache the near cache of a fleet's shared one (once).
    pub fn attach(&self, shared: Arc<shared::SharedCache>) {
        let _ = self.shared.set(shared);
    }

    /// The fleet's shared cache, if this relay has one.
    pub fn shared(&self) -> Option<&Arc<shared::SharedCache>> {
        self.shared.get()
    }

    /// Brings what the fleet knows of `host`/`addr` into this cache when the near copy is
    /// older than the near TTL; waits at most the Redis timeout, and not at all while
    /// Redis is down. Without a fleet it does nothing.
    pub async fn refresh(&self, host: &str, addr: IpAddr) {
        if let Some(shared) = self.shared.get() {
            shared.refresh(self, &CacheKey::new(host, addr)).await;
        }
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    pub fn ttl(&self) -> &TtlConfig {
        &self.ttl
    }

    /// Records what an attempt to `host`/`addr` for a recipient at `domain` found.
    pub fn record(&self, host: &str, addr: IpAddr, domain: &str, obs: Observation) {
        let key = CacheKey::new(host, addr);
        let now = self.clock.now();
        let me = self.shared.get().map(|s| s.observer().clone());
        let class = obs.class;
        let mut before = None;
        let result = self.entries.entry(key.clone()).and_compute_with(|current| {
            let current = current
                .map(|e| e.into_value())
                .filter(|e| self.is_retained(e, now));
            before = current.clone();
            let mut entry = self.merge(current, &key, domain, obs, now);
            if let Some(me) = &me {
                if !entry.pinned || entry.observed_by.is_none() {
                    entry.observed_by = Some(me.clone());
                }
                if class.is_encrypted() {
                    entry.last_tls_by = Some(me.clone());
                }
            }
            Op::Put(entry)
        });
        if let (Some(shared), Some(entry)) = (self.shared.get(), result_entry(result)) {
            shared.recorded(before.as_ref(), &entry, class, now, self.ttl.success);
        }
    }

    fn merge(
        &self,
        current: Option<CacheEntry>,
        key: &CacheKey,
        domain: &str,
        obs: Observation,
        now: u64,
    ) -> CacheEntry {
        let mut entry = current.unwrap_or_else(|| CacheEntry::new(key, obs.class, now));
        entry.last_seen = now;
        entry.count += 1;
        entry.add_domain(domain);
        // A fact even under a pin: the pin overrides the decision, not the history.
        if obs.class.is_encrypted() {
            entry.last_tls_at = Some(now);
        }
        if obs.class == OutcomeClass::TlsVerified {
            entry.last_verified_at = Some(now);
        }
        if entry.pinned && !entry.is_expired(now) {
            return entry;
        }
        entry.pinned = false;
        entry.pinned_at = None;
        entry.shared = false;
        entry.expires_at = now.saturating_add(self.ttl.for_class(obs.class).as_secs());
        entry.class = obs.class;
        entry.detail = obs.detail;
        entry.tls_version = obs.tls_version;
        entry.cipher = obs.cipher;
        entry.cert_subject = obs.cert_subject;
        entry.cert_not_after = obs.cert_not_after;
        entry.cert_problem = obs.cert_problem;
        entry
    }

    /// The unexpired entry for `host`/`addr`, if any.
    pub fn get(&self, host: &str, addr: IpAddr) -> Option<CacheEntry> {
        let now = self.clock.now();
        let host = normalize_name(host);
        let entry = self.entries.get(&KeyRef { host: &host, addr })?;
        if !entry.is_expired(now) {
            return Some(entry);
        }
        if !self.is_retained(&entry, now) {
            self.remove_if_stale(entry.key(), now);
        }
        None
    }

    /// What `entry`'s host did within the success memory (`cache.ttl.success`): a cached
    /// failure an attacker on the path could cause is not believed over it.
    pub fn tls_memory(&self, entry: &CacheEntry) -> TlsMemory {
        TlsMemory::of(entry, self.clock.now(), self.ttl.success)
    }

    /// True when `now_class` is a downgrade from TLS seen with `host`/`addr` recently,
    /// even if the entry's own class has since expired.
    pub fn is_downgrade(&self, host: &str, addr: IpAddr, now_class: OutcomeClass) -> bool {
        let host = normalize_name(host);
        self.entries
            .get(&KeyRef { host: &host, addr })
            .is_some_and(|e| is_downgrade(&e, now_class, self.clock.now(), self.ttl.success))
    }

    /// Removes an entry nothing needs any more; checked under the entry's lock so that a
    /// concurrent `record` is not lost.
    fn remove_if_stale(&self, key: CacheKey, now: u64) -> bool {
        let result = self
            .entries
            .entry(key)
            .and_compute_with(|current| match current {
                Some(e) if !self.is_retained(e.value(), now) => Op::Remove,
                _ => Op::Nop,
            });
        matches!(result, moka::ops::compute::CompResult::Removed(_))
    }

    fn is_retained(&self, entry: &CacheEntry, now: u64) -> bool {
        now < entry.retained_until(self.ttl.success)
    }

    /// Every unexpired entry, sorted by host, then address.
    pub fn entries(&self) -> Vec<CacheEntry> {
        let now = self.clock.now();
        self.collect(|e| !e.is_expired(now))
    }

    /// Unexpired entries whose host is `host_or_domain` or that saw it as recipient domain.
    pub fn find(&self, host_or_domain: &str) -> Vec<CacheEntry> {
        let now = self.clock.now();
        let name = normalize_name(host_or_domain);
        self.collect(|e| !e.is_expired(now) && e.matches(&name))
    }

    fn collect(&self, keep: impl Fn(&CacheEntry) -> bool) -> Vec<CacheEntry> {
        let mut found: Vec<CacheEntry> = self
            .entries
            .iter()
            .map(|(_, e)| e)
            .filter(|e| keep(e))
            .collect();
        found.sort_by(|a, b| (&a.host, a.addr).cmp(&(&b.host, b.addr)));
        found
    }

    /// Forgets everything about a host or a recipient domain (history included); returns
    /// how many unexpired entries went.
    pub fn flush(&self, host_or_domain: &str) -> usize {
        let flushed = self.flush_local(host_or_domain);
        if let Some(shared) = self.shared.get() {
            shared.flushed(Some(normalize_name(host_or_domain).into_owned()));
        }
        flushed
    }

    /// Forgets everything; returns how many unexpired entries went.
    pub fn flush_all(&self) -> usize {
        let flushed = self.flush_all_local();
        if let Some(shared) = self.shared.get() {
            shared.flushed(None);
        }
        flushed
    }

    /// [`flush`](Self::flush) in this process only: for a flush another relay announced.
    pub fn flush_local(&self, host_or_domain: &str) -> usize {
        let name = normalize_name(host_or_domain);
        self.remove_where(|e| e.matches(&name))
    }

    /// [`flush_all`](Self::flush_all) in this process only.
    pub fn flush_all_local(&self) -> usize {
        self.remove_where(|_| true)
    }

    /// Takes in what the fleet's shared cache holds for `key` (its entry, and the last TLS
    /// any relay did with the host), by the merge rules of [`shared`]: an unexpired pin
    /// wins, else the later observation; the memory of TLS is the latest of both.
    pub fn adopt(
        &self,
        key: &CacheKey,
        from_fleet: Option<CacheEntry>,
        tls: Option<shared::TlsMark>,
    ) {
        let now = self.clock.now();
        if from_fleet.is_none() && tls.is_none() {
            return;
        }
        self.entries.entry(key.clone()).and_compute_with(|current| {
            let local = current
                .map(|e| e.into_value())
                .filter(|e| self.is_retained(e, now));
            let me = self.shared.get().map(|s| s.observer().clone());
            let me = me.unwrap_or_else(|| Observer {
                relay: String::new(),
                source: None,
            });
            match shared::merge(local, from_fleet, tls, key, &me, now) {
                Some(entry) if self.is_retained(&entry, now) => Op::Put(entry),
                _ => Op::Nop,
            }
        });
    }

    fn remove_where(&self, matches: impl Fn(&CacheEntry) -> bool) -> usize {
        let now = self.clock.now();
        let keys: Vec<Arc<CacheKey>> = self
            .entries
            .iter()
            .filter(|(_, e)| matches(e))
            .map(|(k, _)| k)
            .collect();
        keys.iter()
            .filter_map(|key| self.entries.remove(key.as_ref()))
            .filter(|e| !e.is_expired(now))
            .count()
    }

    /// Drops entries that are neither believed nor remembered; for a periodic sweep, since
    /// `get` only removes what it trips over. Returns how many went.
    pub fn purge(&self) -> usize {
        let now = self.clock.now();
        let stale: Vec<Arc<CacheKey>> = self
            .entries
            .iter()
            .filter(|(_, e)| !self.is_retained(e, now))
            .map(|(k, _)| k)
            .collect();
        stale
            .into_iter()
            .filter(|key| self.remove_if_stale(CacheKey::clone(key), now))
            .count()
    }

    /// The operator's override: `class` is believed for `ttl` whatever is observed.
    /// `addr: None` pins every cached address of `host`, and fails if there is none.
    pub fn pin(
        &self,
        host: &str,
        addr: Option<IpAddr>,
        class: OutcomeClass,
        ttl: Duration,
    ) -> Result<usize, CacheError> {
        if ttl > self.ttl.pin_max {
            return Err(CacheError::PinTooLong {
                max: self.ttl.pin_max,
            });
        }
        let host = normalize_name(host).into_owned();
        let addrs = match addr {
            Some(addr) => vec![addr],
            None => self.cached_addrs(&host),
        };
        if addrs.is_empty() {
            return Err(CacheError::NotCached { host });
        }
        let now = self.clock.now();
        for &addr in &addrs {
            let key = CacheKey {
                host: host.clone(),
                addr,
            };
            let result = self.entries.entry(key.clone()).and_compute_with(|current| {
                let current = current
                    .map(|e| e.into_value())
                    .filter(|e| self.is_retained(e, now));
                let mut entry = pinned(current, &key, class, ttl, now);
                if let Some(shared) = self.shared.get() {
                    entry.observed_by = Some(shared.observer().clone());
                }
                Op::Put(entry)
            });
            if let (Some(shared), Some(entry)) = (self.shared.get(), result_entry(result)) {
                shared.pinned(entry, now);
            }
        }
        Ok(addrs.len())
    }

    /// The entry this relay observed for `key`, to write again when Redis is back.
    pub fn entry_for_resync(&self, key: &CacheKey) -> Option<CacheEntry> {
        let me = self.shared.get()?.observer();
        let entry = self.entries.get(key)?;
        let mine = entry
            .observed_by
            .as_ref()
            .is_some_and(|by| by.relay == me.relay);
        (mine && self.is_retained(&entry, self.clock.now())).then_some(entry)
    }

    /// The addresses of `host` with an entry that still counts.
    pub fn cached_addrs(&self, host: &str) -> Vec<IpAddr> {
        let host = normalize_name(host);
        let now = self.clock.now();
        self.collect(|e| e.host == host && !e.is_expired(now))
            .into_iter()
            .map(|e| e.addr)
            .collect()
    }

    /// Roughly how many entries are held (moka's count, after its pending bookkeeping).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes every entry still worth keeping to `path`, atomically (a temporary file in the
    /// same directory, then a rename), readable by the owner only. Returns how many.
    pub fn save(&self, path: &Path) -> Result<usize, CacheError> {
        let now = self.clock.now();
        let entries = self.collect(|e| self.is_retained(e, now));
        let saved = SavedRef {
            version: FILE_VERSION,
            entries: &entries,
        };
        write_atomically(path, |w| {
            serde_json::to_writer(w, &saved).map_err(io::Error::from)
        })
        .map_err(|error| CacheError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Ok(entries.len())
    }

    /// Reads a file written by [`save`](Self::save), dropping what has expired meanwhile.
    /// A missing file is no error; a corrupt one changes nothing. An entry already held
    /// wins over the file's unless the file's was seen later. Returns how many were loaded.
    pub fn load(&self, path: &Path) -> Result<usize, CacheError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(error) => {
                return Err(CacheError::Io {
                    path: path.to_path_buf(),
                    error,
                });
            }
        };
        let entries = parse_saved(&bytes).map_err(|detail| CacheError::Corrupt {
            path: path.to_path_buf(),
            detail,
        })?;
        let now = self.clock.now();
        let mut loaded = 0;
        for entry in entries {
            if self.is_retained(&entry, now) && self.insert_if_newer(entry.normalized()) {
                loaded += 1;
            }
        }
        Ok(loaded)
    }

    fn insert_if_newer(&self, entry: CacheEntry) -> bool {
        let result = self
            .entries
            .entry(entry.key())
            .and_compute_with(|current| match current {
                Some(held) if held.value().last_seen >= entry.last_seen => Op::Nop,
                _ => Op::Put(entry),
            });
        !matches!(result, moka::ops::compute::CompResult::Unchanged(_))
    }
}

/// The entry a compute left in the cache, if it left one.
fn result_entry(
    result: moka::ops::compute::CompResult<CacheKey, CacheEntry>,
) -> Option<CacheEntry> {
    use moka::ops::compute::CompResult;
    match result {
        CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
            Some(e.into_value())
        }
        CompResult::Removed(_) | CompResult::StillNone(_) => None,
    }
}

/// The entry an operator's pin leaves: history kept, class and expiry from the pin.
fn pinned(
    current: Option<CacheEntry>,
    key: &CacheKey,
    class: OutcomeClass,
    ttl: Duration,
    now: u64,
) -> CacheEntry {
    let mut entry = current.unwrap_or_else(|| CacheEntry::new(key, class, now));
    entry.class = class;
    entry.detail = PINNED_DETAIL.to_string();
    entry.pinned = true;
    entry.pinned_at = Some(now);
    entry.shared = false;
    entry.expires_at = now.saturating_add(ttl.as_secs());
    entry
}

fn parse_saved(bytes: &[u8]) -> Result<Vec<CacheEntry>, String> {
    let header: SavedHeader = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if header.version != FILE_VERSION {
        return Err(format!(
            "version {} is not supported (this build reads version {FILE_VERSION})",
            header.version
        ));
    }
    let saved: Saved = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(saved.entries)
}

/// Writes through `fill` into a fresh temporary file beside `path`, then renames it over
/// `path`, so that a crash leaves the old file or the new one, never half of one.
pub(crate) fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let temp = path.with_file_name(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_new(&temp, fill).and_then(|()| fs::rename(&temp, path));
    if result.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = fs::remove_file(&temp);
    }
    result
}

fn write_new(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    // create_new: never follow a link someone planted at the temporary name.
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut writer = BufWriter::new(options.open(path)?);
    fill(&mut writer)?;
    writer.flush()?;
    writer.get_ref().sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const T0: u64 = 1_772_323_200;
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn cache_with(config: CacheConfig) -> (OutcomeCache, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(T0));
        (OutcomeCache::new(&config, clock.clone()), clock)
    }

    fn new_cache() -> (OutcomeCache, Arc<ManualClock>) {
        cache_with(CacheConfig::default())
    }

    fn verified() -> Observation {
        Observation::from_outcome(&TlsOutcome::Encrypted(TlsSession {
            chain: Vec::new(),
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            verification: Verification::Verified,
        }))
        .expect("encrypted sessions are observations")
    }

    fn plain(reason: NoTls) -> Observation {
        Observation::from_outcome(&TlsOutcome::Plain(reason)).expect("a TLS failure")
    }

    #[test]
    fn a_host_the_legacy_stack_reached_still_gets_the_rule_for_legacy_servers() {
        let (cache, _) = new_cache();
        let legacy =
            Observation::from_outcome(&TlsOutcome::Legacy(crate::outcome::LegacySession {
                version: "TLSv1.0".into(),
                cipher: "TLS_RSA_WITH_AES_128_CBC_SHA".into(),
                verification: Verification::Verified,
                chain: Vec::new(),
            }))
            .expect("a legacy session is an observation");
        cache.record("mx.old.example", ip(1), "old.example", legacy);
        let entry = cache.find("mx.old.example").remove(0);
        assert_eq!(entry.class, OutcomeClass::TlsLegacy);

        let rules = crate::rules::RuleSet::parse(
            "rules:\n  - name: old-servers\n    match: { domains: [\"*\"], outcome: [legacy-tls] }\n    legacy_tls: plain\n  - name: everyone\n    match: { domains: [\"*\"] }\n",
            std::path::Path::new("rules.yaml"),
        )
        .expect("rules");
        let plan = crate::router::Plan::new(Arc::new(rules), "old.example", None);
        assert_eq!(
            plan.rule_for_host("mx.old.example", &entry.classes()).name,
            "old-servers"
        );
        assert_eq!(plan.rule_for_host("mx.old.example", &[]).name, "everyone");
    }

    #[test]
    fn a_failure_expires_after_its_ttl_while_a_success_lives_longer() {
        let (cache, clock) = new_cache();
        cache.record("mx1.example.net", ip(1), "example.net", verified());
        cache.record(
            "mx2.example.net",
            ip(2),
            "example.net",
            plain(NoTls::HandshakeFailed("received fatal alert".into())),
        );
        cache.record(
            "mx3.example.net",
            ip(3),
            "example.net",
            Observation::unreachable(OutcomeClass::Timeout, "no answer in 30s"),
        );

        clock.advance(Duration::from_secs(5 * 60));
        assert!(
            cache.get("mx3.example.net", ip(3)).is_none(),
            "unreachable: 5m"
        );
        let failure = cache.get("mx2.example.net", ip(2)).expect("still fresh");
        assert_eq!(failure.class, OutcomeClass::HandshakeFailed);
        assert!(failure.detail.contains("received fatal alert"));

        clock.advance(HOUR);
        assert!(cache.get("mx2.example.net", ip(2)).is_none(), "failure: 1h");
        let success = cache.get("mx1.example.net", ip(1)).expect("success: 7d");
        assert_eq!(success.tls_version.as_deref(), Some("TLSv1.3"));

        clock.advance(7 * DAY);
        assert!(cache.get("mx1.example.net", ip(1)).is_none());
        assert!(cache.entries().is_empty());
    }

    #[test]
    fn a_second_observation_counts_and_keeps_first_seen() {
        let (cache, clock) = new_cache();
        cache.record("mx.example.net", ip(1), "example.net", verified());
        clock.advance(HOUR);
        cache.record("MX.Example.NET.", ip(1), "example.net", verified());

        let entry = cache.get("mx.example.net.", ip(1)).expect("cached");
        assert_eq!(entry.host, "mx.example.net");
        assert_eq!(entry.count, 2);
        assert_eq!(entry.first_seen, T0);
        assert_eq!(entry.last_seen, T0 + 3600);
        assert_eq!(entry.expires_at, T0 + 3600 + 7 * 86_400);
        assert_eq!(cache.entries().len(), 1, "one host, one entry");
        assert!(
            cache.get("mx.example.net", ip(2)).is_none(),
            "keyed by address too"
        );
    }

    #[test]
    fn domains_are_kept_latest_last_and_bounded() {
        let (cache, _) = new_cache();
        for domain in ["b.example", "A.example.", "b.example", ""] {
            cache.record("mx.example.net", ip(1), domain, verified());
        }
        let entry = cache.get("mx.example.net", ip(1)).expect("cached");
        assert_eq!(entry.domains, ["a.example", "b.example"]);

        for n in 0..40 {
            cache.record(
                "mx.example.net",
                ip(1),
                &format!("d{n:02}.example"),
                verified(),
            );
        }
        cache.record("mx.example.net", ip(1), "d30.example", verified());
        let entry = cache.get("mx.example.net", ip(1)).expect("cached");
        assert_eq!(entry.domains.len(), MAX_DOMAINS);
        assert_eq!(entry.domains[0], "d24.example", "the oldest went first");
        assert_eq!(
            entry.domains[MAX_DOMAINS - 1],
            "d30.example",
            "seen again: latest"
        );
        assert!(entry.matches("d39.example") && !entry.matches("a.example"));
    }

    #[test]
    fn a_host_that_did_tls_and_now_offers_no_starttls_is_a_downgrade() {
        let (cache, clock) = new_cache();
        cache.record("mx.example.net", ip(1), "example.net", verified());
        clock.advance(DAY);
        cache.record(
            "mx.example.net",
            ip(1),
            "example.net",
            plain(NoTls::NoStarttls),
        );

        let entry = cache.get("mx.example.net", ip(1)).expect("cached");
        assert_eq!(entry.class, OutcomeClass::NoStarttls);
        assert_eq!(entry.last_tls_at, Some(T0), "kept across the failure");
        let (now, success) = (cache.now(), cache.ttl().success);
        assert!(is_downgrade(&entry, OutcomeClass::NoStarttls, now, success));
        // Any TLS failure after a success is a downgrade (STARTTLS refused, handshake broken).
        assert!(is_downgrade(
            &entry,
            OutcomeClass::HandshakeFailed,
            now,
            success
        ));
        assert!(cache.is_downgrade("mx.example.net", ip(1), OutcomeClass::NoStarttls));

        // The failure's 1h expires, but the memory of TLS does not, so the next message
        // still sees the downgrade, and a new failure keeps last_tls_at.
        clock.advance(2 * HOUR);
        assert!(cache.get("mx.example.net", ip(1)).is_none());
        assert!(cache.is_downgrade("mx.example.net", ip(1), OutcomeClass::NoStarttls));
        cache.record(
            "mx.example.net",
            ip(1),
            "example.net",
            plain(NoTls::NoStarttls),
        );
        let entry = cache.get("mx.example.net", ip(1)).expect("cached");
        assert_eq!((entry.last_tls_at, entry.first_seen), (Some(T0), T0));

        clock.set(T0 + 7 * 86_400);
        assert!(!cache.is_downgrade("mx.example.net", ip(1), OutcomeClass::NoStarttls));
        assert!(!is_downgrade(
            &entry,
            OutcomeClass::NoStarttls,
            cache.now(),
            success
        ));
    }

    #[test]
    fn a_pin_overrides_observations_until_its_ttl() {
        let (cache, clock) = new_cache();
        cache.record(
            "mx.example.net",
            ip(1),
            "example.net",
            plain(NoTls::NoStarttls),
        );
        let pinned = cache
            .pin("mx.example.net", None, OutcomeClass::TlsVerified, 2 * HOUR)
            .expect("host is cached");
        assert_eq!(pinned, 1);

        clock.advance(HOUR);
        cache.record(
            "mx.example.net",
            ip(1),
            "other.example",
            plain(NoTls::NoStarttls),
        );
        let entry = cache.get("mx.example.net", ip(1)).expect("pinned");
        assert_eq!(entry.class, OutcomeClass::TlsVerified);
        assert_eq!(entry.detail, "pinned by operator");
        assert!(entry.pinned);
        assert_eq!(entry.count, 2);
        assert_eq!(entry.last_seen, T0 + 3600);
        assert_eq!(entry.domains, ["example.net", "other.example"]);

        clock.advance(HOUR);
        cache.record(
            "mx.example.net",
            ip(1),
            "example.net",
            plain(NoTls::NoStarttls),
        );
        let entry = cache.get("mx.example.net", ip(1)).expect("observed");
        assert_eq!(entry.class, OutcomeClass::NoStarttls);
        assert!(!entry.pinned);
    }

    #[test]
    fn pinning_an_uncached_host_needs_an_address() {
        let (cache, _) = new_cache();
        let err = cache
            .pin("mx.example.net", None, OutcomeClass::NoStarttls, HOUR)
            .expect_err("nothing cached");
        assert!(err.to_string().contains("mx.example.net"), "{err}");

        let pinned = cache.pin(
            "MX.example.net",
            Some(ip(9)),
            OutcomeClass::NoStarttls,
            HOUR,
        );
        assert_eq!(pinned.ok(), Some(1));
        let entry = cache.get("mx.example.net", ip(9)).expect("pinned");
        assert_eq!((entry.count, entry.class), (0, OutcomeClass::NoStarttls));
    }

    #[test]
    fn flush_by_host_and_by_domain() {
        let (cache, _) = new_cache();
        cache.record("mx1.example.net", ip(1), "example.net", verified());
        cache.record("mx1.example.net", ip(2), "example.net", verified());
        cache.record("mx2.example.net", ip(3), "example.net", verified());
        cache.record("mx.other.example", ip(4), "other.example", verified());

        assert_eq!(cache.find("example.net").len(), 3);
        assert_eq!(cache.find("MX1.example.net").len(), 2);
        assert_eq!(cache.flush("mx1.example.net."), 2);
        assert!(cache.get("mx1.example.net", ip(1)).is_none());
        assert_eq!(cache.flush("example.net"), 1);
        assert_eq!(cache.flush("example.net"), 0);
        let left = cache.entries();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].host, "mx.other.example");
        assert_eq!(cache.flush_all(), 1);
        assert!(cache.entries().is_empty());
    }

    #[test]
    fn save_then_load_into_a_fresh_cache_restores_entries_and_drops_expired_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cache.json");
        let (cache, _) = new_cache();
        let expired = CertProblem::Expired {
            not_after: "2026-03-01".into(),
        };
        cache.record("mx1.example.net", ip(1), "example.net", verified());
        cache.record(
            "mx2.example.net",
            ip(2),
            "example.net",
            plain(NoTls::CertRejected(expired)),
        );
        assert_eq!(cache.save(&path).expect("saved"), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("written").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let saved = cache.entries();

        let (fresh, _) = new_cache();
        assert_eq!(fresh.load(&path).expect("loaded"), 2);
        assert_eq!(fresh.entries(), saved);
        let cert = fresh.get("mx2.example.net", ip(2)).expect("restored");
        assert_eq!(cert.class, OutcomeClass::CertExpired);
        assert_eq!(cert.cert_not_after.as_deref(), Some("2026-03-01"));

        let (later, later_clock) = new_cache();
        later_clock.set(T0 + 2 * 3600);
        assert_eq!(
            later.load(&path).expect("loaded"),
            1,
            "the 1h failure is gone"
        );
        assert_eq!(later.entries().len(), 1);

        let files = dir.path().read_dir().expect("dir").count();
        assert_eq!(files, 1, "no temporary file left behind");
        assert_eq!(fresh.load(&dir.path().join("missing.json")).ok(), Some(0));
    }

    #[test]
    fn a_corrupt_file_is_reported_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cache, _) = new_cache();
        cache.record("mx.example.net", ip(1), "example.net", verified());
        for (name, text) in [
            ("truncated.json", r#"{"version":1,"entries":[{"host":"#),
            ("garbage.json", "\u{0}\u{1}not json"),
            ("future.json", r#"{"version":2,"entries":[]}"#),
            ("wrong.json", r#"{"version":1,"entries":[{"host":"mx"}]}"#),
        ] {
            let path = dir.path().join(name);
            fs::write(&path, text).expect("written");
            match cache.load(&path) {
                Err(err @ CacheError::Corrupt { .. }) => {
                    assert!(err.to_string().contains(name), "{err}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(cache.entries().len(), 1);
    }

    #[test]
    fn max_entries_bounds_the_size() {
        let config = CacheConfig {
            max_entries: 10,
            ..CacheConfig::default()
        };
        let (cache, _) = cache_with(config);
        for n in 0..100 {
            cache.record(
                &format!("mx{n}.example.net"),
                ip(1),
                "example.net",
                verified(),
            );
        }
        assert!(cache.len() <= 10, "{} entries", cache.len());
        assert!(
            cache.get("mx99.example.net", ip(1)).is_some(),
            "the newest kept"
        );
    }

    #[test]
    fn purge_drops_only_what_is_neither_believed_nor_remembered() {
        let (cache, clock) = new_cache();
        cache.record("mx1.example.net", ip(1), "a.example", verified());
        cache.record(
            "mx1.example.net",
            ip(1),
            "a.example",
            plain(NoTls::NoStarttls),
        );
        cache.record(
            "mx2.example.net",
            ip(2),
            "b.example",
            plain(NoTls::NoStarttls),
        );
        clock.advance(2 * HOUR);
        assert_eq!(cache.purge(), 1);
        assert!(cache.is_downgrade("mx1.example.net", ip(1), OutcomeClass::NoStarttls));
    }

    #[test]
    fn observations_carry_the_why() {
        let unverified = Observation::from_outcome(&TlsOutcome::Encrypted(TlsSession {
            chain: Vec::new(),
            version: "TLSv1.2".into(),
            cipher: "ECDHE".into(),
            verification: Verification::Failed(CertProblem::Expired {
                not_after: "2026-03-01".into(),
            }),
        }))
        .expect("observed");
        assert_eq!(unverified.class, OutcomeClass::TlsUnverified);
        assert_eq!(unverified.detail, "certificate expired 2026-03-01");
        assert_eq!(unverified.cert_not_after.as_deref(), Some("2026-03-01"));
        assert_eq!(unverified.tls_version.as_deref(), Some("TLSv1.2"));

        let legacy = plain(NoTls::LegacyTls("protocol_version alert".into()));
        assert_eq!(legacy.class, OutcomeClass::LegacyTls);
        assert!(legacy.detail.contains("protocol_version alert"));
        assert_eq!(
            Observation::from_outcome(&TlsOutcome::Plain(NoTls::NotWanted)),
            None
        );
    }

    /// A certificate for `mx.example.net` valid until 2031-06-30.
    fn certificate() -> rustls::pki_types::CertificateDer<'static> {
        let mut params =
            rcgen::CertificateParams::new(vec!["mx.example.net".to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mx.example.net");
        params.not_after = rcgen::date_time_ymd(2031, 6, 30);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("certificate").der().clone()
    }

    #[test]
    fn every_encrypted_observation_keeps_the_certificate_subject_and_expiry() {
        let (cache, _) = new_cache();
        for (host, verification) in [
            ("mx1.example.net", Verification::Verified),
            (
                "mx2.example.net",
                Verification::Failed(CertProblem::NameMismatch { presented: vec![] }),
            ),
        ] {
            let session = TlsSession {
                chain: vec![certificate()],
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_128_GCM_SHA256".into(),
                verification,
            };
            let obs = Observation::from_outcome(&TlsOutcome::Encrypted(session)).expect("obs");
            cache.record(host, ip(1), "example.net", obs);
            let entry = cache.get(host, ip(1)).expect("cached");
            assert_eq!(entry.cert_subject.as_deref(), Some("CN=mx.example.net"));
            assert_eq!(entry.cert_not_after.as_deref(), Some("2031-06-30"));
        }
    }

    #[test]
    fn a_file_from_before_the_certificate_subject_was_kept_still_loads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cache.json");
        let old = format!(
            r#"{{"version":1,"entries":[{{"host":"mx.example.net","addr":"192.0.2.1",
            "domains":["example.net"],"class":"tls-verified","detail":"certificate verified",
            "tls_version":"TLSv1.3","cipher":"TLS13_AES_128_GCM_SHA256",
            "cert_not_after":null,"first_seen":{T0},"last_seen":{T0},"count":1,
            "expires_at":{},"pinned":false,"last_tls_at":{T0}}}]}}"#,
            T0 + 86_400
        );
        fs::write(&path, old).expect("written");
        let (cache, _) = new_cache();
        assert_eq!(cache.load(&path).expect("loaded"), 1);
        let entry = cache.get("mx.example.net", ip(1)).expect("restored");
        assert_eq!(
            (entry.class, entry.cert_subject),
            (OutcomeClass::TlsVerified, None)
        );
    }

    #[test]
    fn the_config_reads_durations_and_defaults_the_rest() {
        let config: CacheConfig = serde_json::from_str(
            r#"{"file":"/var/lib/tlsrouter/cache.json","ttl":{"tls_failure":"30m"}}"#,
        )
        .expect("valid");
        assert_eq!(config.ttl.tls_failure, Duration::from_secs(1800));
        assert_eq!(config.ttl.success, 7 * DAY);
        assert_eq!(config.save_interval, Duration::from_secs(300));
        assert_eq!(config.max_entries, 100_000);
        assert!(serde_json::from_str::<CacheConfig>(r#"{"tll":{}}"#).is_err());
        assert!(serde_json::from_str::<CacheConfig>(r#"{"save_interval":"5x"}"#).is_err());
    }
}
