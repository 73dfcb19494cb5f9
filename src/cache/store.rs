//! The near cache itself: what each host and address did, believed until it expires,
//! bounded in size, told to the fleet when there is one.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use crate::cache::clock::Clock;
use crate::cache::config::{CacheConfig, TtlConfig};
use crate::cache::entry::{
    CacheEntry, CacheKey, KeyRef, Observation, Observer, TlsMemory, is_downgrade, normalize_name,
    pinned,
};
use crate::cache::persistence::{self, FileError};
use crate::cache::shared::{self, NearCache, TlsMark, merge};
use crate::outcome::OutcomeClass;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("no cached entry for {host}: name an address to pin, {host}[ADDRESS]")]
    NotCached { host: String },
    #[error(
        "a pin lasts at most {} (cache.ttl.pin_max): give a shorter --ttl, or pin again later",
        crate::settings::duration::format(*max)
    )]
    PinTooLong { max: Duration },
}

/// What a flush did: how many unexpired entries went here, and, with a fleet, how far the
/// flush of the shared cache got once the writer came to it.
#[derive(Debug)]
pub struct Flushed {
    pub here: usize,
    pub fleet: Option<tokio::sync::oneshot::Receiver<shared::Swept>>,
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

    /// Forgets everything about a host or a recipient domain (history included), here and
    /// in the fleet's shared cache.
    pub fn flush(&self, host_or_domain: &str) -> Flushed {
        Flushed {
            here: self.flush_local(host_or_domain),
            fleet: self
                .shared
                .get()
                .map(|shared| shared.flushed(Some(normalize_name(host_or_domain).into_owned()))),
        }
    }

    /// Forgets everything, here and in the fleet's shared cache.
    pub fn flush_all(&self) -> Flushed {
        Flushed {
            here: self.flush_all_local(),
            fleet: self.shared.get().map(|shared| shared.flushed(None)),
        }
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
        persistence::save(path, &entries)?;
        Ok(entries.len())
    }

    /// Reads a file written by [`save`](Self::save), dropping what has expired meanwhile.
    /// A missing file is no error; a corrupt one changes nothing. An entry already held
    /// wins over the file's unless the file's was seen later. Returns how many were loaded.
    /// How many entries were loaded; `None` when there is no file yet (a first start).
    pub fn load(&self, path: &Path) -> Result<Option<usize>, CacheError> {
        let Some(entries) = persistence::read(path)? else {
            return Ok(None);
        };
        let now = self.clock.now();
        let mut loaded = 0;
        for entry in entries {
            if self.is_retained(&entry, now) && self.insert_if_newer(entry.normalized()) {
                loaded += 1;
            }
        }
        Ok(Some(loaded))
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

/// The fleet's tasks act on this cache through this.
impl NearCache for OutcomeCache {
    /// [`flush`](Self::flush) in this process only: for a flush another relay announced.
    fn flush_local(&self, host_or_domain: &str) -> usize {
        let name = normalize_name(host_or_domain);
        self.remove_where(|e| e.matches(&name))
    }

    /// [`flush_all`](Self::flush_all) in this process only.
    fn flush_all_local(&self) -> usize {
        self.remove_where(|_| true)
    }

    /// Takes in what the fleet's shared cache holds for `key` (its entry, and the last TLS
    /// any relay did with the host), by the merge rules of [`shared`]: an unexpired pin
    /// wins, else the later observation; the memory of TLS is the latest of both.
    fn adopt(&self, key: &CacheKey, from_fleet: Option<CacheEntry>, tls: Option<TlsMark>) {
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
            match merge(local, from_fleet, tls, key, &me, now) {
                Some(entry) if self.is_retained(&entry, now) => Op::Put(entry),
                _ => Op::Nop,
            }
        });
    }

    /// The entry this relay observed for `key`, to write again when Redis is back.
    fn entry_for_resync(&self, key: &CacheKey) -> Option<CacheEntry> {
        let me = self.shared.get()?.observer();
        let entry = self.entries.get(key)?;
        let mine = entry
            .observed_by
            .as_ref()
            .is_some_and(|by| by.relay == me.relay);
        (mine && self.is_retained(&entry, self.clock.now())).then_some(entry)
    }
}
