//! What is kept per MX host and address: the entry, its key, who observed it, what an
//! observation brings, and the memory of TLS it holds.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use moka::Equivalent;
use serde::{Deserialize, Serialize};

use crate::certificate::Certificate;
use crate::outcome::{CertProblem, NoTls, OutcomeClass, TlsOutcome, TlsSession, Verification};

/// At most this many recipient domains are kept per entry; an MX shared by thousands of
/// domains (a hosting provider) must not grow without bound.
pub const MAX_DOMAINS: usize = 16;

/// The detail given to entries the operator pinned.
pub(super) const PINNED_DETAIL: &str = "pinned by operator";

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
pub(super) struct KeyRef<'a> {
    pub(super) host: &'a str,
    pub(super) addr: IpAddr,
}

impl Equivalent<CacheKey> for KeyRef<'_> {
    fn equivalent(&self, key: &CacheKey) -> bool {
        self.addr == key.addr && self.host == key.host
    }
}

/// Lower case, without the trailing dot of a fully qualified name. DNS hands us A-labels
/// (punycode), so ASCII case folding is enough.
pub(super) fn normalize_name(name: &str) -> Cow<'_, str> {
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
    pub(super) fn new(key: &CacheKey, class: OutcomeClass, now: u64) -> CacheEntry {
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
    pub(super) fn matches(&self, name: &str) -> bool {
        self.host == name || self.domains.iter().any(|d| d == name)
    }

    pub(super) fn add_domain(&mut self, domain: &str) {
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
    pub(super) fn retained_until(&self, success_ttl: Duration) -> u64 {
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
pub(super) fn classes(
    class: OutcomeClass,
    cert_problem: Option<OutcomeClass>,
) -> Vec<OutcomeClass> {
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
pub(super) fn did_tls_within(entry: &CacheEntry, now: u64, success_ttl: Duration) -> bool {
    within(entry.last_tls_at, now, success_ttl)
}

pub(super) fn within(at: Option<u64>, now: u64, ttl: Duration) -> bool {
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

    pub(super) fn encrypted(class: OutcomeClass, session: &TlsSession) -> Observation {
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

pub(super) fn expiry(problem: &CertProblem) -> Option<String> {
    match problem {
        CertProblem::Expired { not_after } => Some(not_after.clone()),
        _ => None,
    }
}

/// The entry an operator's pin leaves: history kept, class and expiry from the pin. A
/// certificate problem found before stays only under a pin of the same class: under another
/// it would still match rules' `outcome` conditions and read as the pin's reason.
pub(super) fn pinned(
    current: Option<CacheEntry>,
    key: &CacheKey,
    class: OutcomeClass,
    ttl: Duration,
    now: u64,
) -> CacheEntry {
    let mut entry = current.unwrap_or_else(|| CacheEntry::new(key, class, now));
    if entry.class != class {
        entry.cert_problem = None;
    }
    entry.class = class;
    entry.detail = PINNED_DETAIL.to_string();
    entry.pinned = true;
    entry.pinned_at = Some(now);
    entry.shared = false;
    entry.expires_at = now.saturating_add(ttl.as_secs());
    entry
}
