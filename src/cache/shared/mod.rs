//! The fleet's shared cache: outcome entries, the memory of TLS, operator pins and flushes
//! kept in Redis, so that the relays of a fleet learn together. Each relay's
//! [`OutcomeCache`](crate::cache::OutcomeCache) stays in front of it as a near cache, which
//! this module knows only as a [`NearCache`].
//!
//! Keys, under `cache.redis.key_prefix` (default `tlsrouter:`):
//! - `entry:HOST|ADDR`: a hash with `entry` (the [`CacheEntry`] as JSON), `kind` (`success`,
//!   `failure`, `unreachable`, `pin`), `source` (who saw it, see [`source_identity`]),
//!   `pinned` and `expires_at`. The key expires with the class's TTL (or the pin's).
//! - `tls:HOST|ADDR`: the last TLS any relay did with the host ([`TlsMark`], with the
//!   host's recipient domains, so a domain flush finds it after the entry expired); it
//!   expires after `cache.ttl.success`, so downgrades are seen across the fleet as long as
//!   locally.
//! - `ledger:RELAY`: a relay's per-domain ledger (its own counts only, written every
//!   `ledger.share_interval`); `ctl domains` on any relay adds up every relay's.
//! - the channel `invalidate`: flushes and pins, so every relay drops its near copy at once.
//!
//! Merge rules, in Redis (one script, atomic) when a relay writes an observation:
//! 1. an unexpired pin is replaced only by another pin (or removed by a flush);
//! 2. a success never replaces an unexpired failure that another source address saw: for
//!    that address the failure still holds. The success still writes `tls:`, and the
//!    writer logs the split-source downgrade with both sides named;
//! 3. anything else replaces the entry. A pin or failure that would hold longer than any
//!    relay writes one (`cache.ttl.pin_max`, `cache.ttl.tls_failure`) holds nothing back.
//!
//! What a relay reads is checked first ([`checked`], [`checked_mark`]), as it would check
//! what it saw itself: no time further ahead of its clock than `cache.redis.clock_skew`,
//! a pin only as `ctl cache pin` writes one and no longer than `cache.ttl.pin_max`, an
//! observation believed no longer than its class's TTL here. What fails is logged and
//! counted once ([`SharedCache::forged`]) and ignored.
//!
//! Then it is merged ([`merge`]): an unexpired pin wins over no pin; another relay's
//! failure never replaces this relay's own unexpired success (that relay's path may be the
//! attacked one); otherwise the later observation (`last_seen`) wins; the memory of TLS is
//! the latest of both. A relay's own success therefore stands in its near cache even
//! while Redis keeps another source's failure.
//!
//! Redis never stops mail: every call has a timeout; writes go through a queue drained by a
//! task of their own; while Redis is down lookups use the near cache alone, writes are
//! remembered, and on its return they are written and the near cache is read afresh.

mod check;
mod client;
mod health;
mod queue;
mod sweep;
mod writer;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use check::{Forged, Limits, Stored, TlsMark, checked, checked_mark, merge, source_identity};
pub use client::{Roots, SharedCacheError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, Script};
pub use sweep::{Swept, Unfinished};
use tokio::sync::{mpsc, oneshot};

use crate::cache::clock::{Clock, SystemClock};
use crate::cache::config::{RedisConfig, TtlConfig};
use crate::cache::entry::{CacheEntry, CacheKey, Observer};
use crate::cache::shared::client::{client, is_refusal};
use crate::cache::shared::queue::{WRITE_SCRIPT, Write};
use crate::outcome::OutcomeClass;
use crate::stats::Stats;

/// Writes waiting for Redis; past this many, new ones are dropped (and counted).
const QUEUE: usize = 10_000;
/// Pins and flushes kept while Redis is down, to be replayed when it is back.
const PENDING: usize = 1_000;
/// How long a forgery, once said, is not said again.
const FORGERY_REPEAT: Duration = Duration::from_secs(3600);
/// How often a relay whose Redis is down tries it again.
const RETRY: Duration = Duration::from_secs(1);

/// What the fleet's tasks do to this relay's own cache: take in what Redis holds, forget
/// what another relay flushed, and find again what to write once Redis is back.
pub trait NearCache: Send + Sync {
    /// Merges what the fleet holds for `key` into the near cache.
    fn adopt(&self, key: &CacheKey, from_fleet: Option<CacheEntry>, tls: Option<TlsMark>);
    /// Forgets a host or recipient domain here only; returns how many entries went.
    fn flush_local(&self, host_or_domain: &str) -> usize;
    /// Forgets everything here only.
    fn flush_all_local(&self) -> usize;
    /// The entry this relay observed for `key`, to write again.
    fn entry_for_resync(&self, key: &CacheKey) -> Option<CacheEntry>;
}

pub struct SharedCache {
    client: Client,
    /// Where Redis is, without credentials: for logs and errors.
    target: String,
    prefix: String,
    me: Observer,
    timeout: Duration,
    /// How long a walk over the whole cache (a flush, `show`) may take.
    sweep_deadline: Duration,
    /// The TTLs an entry read from Redis is checked against.
    ttl: TtlConfig,
    clock_skew: Duration,
    /// What was read and not believed lately, so that each is logged and counted once (and
    /// again after a while, if it is still there).
    forged: moka::sync::Cache<String, ()>,
    /// Keys read from Redis within the near TTL: a lookup of one of them asks no one.
    near: moka::sync::Cache<CacheKey, ()>,
    conn: OnceLock<ConnectionManager>,
    up: AtomicBool,
    writes: mpsc::Sender<Write>,
    queued: Mutex<Option<mpsc::Receiver<Write>>>,
    /// Keys observed while Redis was down, written when it is back.
    dirty: Mutex<HashSet<CacheKey>>,
    /// Pins and flushes made while Redis was down.
    pending: Mutex<Vec<Write>>,
    script: Script,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("target", &self.target)
            .field("relay", &self.me)
            .finish_non_exhaustive()
    }
}

impl SharedCache {
    /// Checks the configuration (URL, credentials, TLS roots) without connecting.
    pub fn new(
        config: &RedisConfig,
        roots: Roots<'_>,
        relay: &str,
        source: Option<IpAddr>,
        ttl: &TtlConfig,
        stats: Arc<Stats>,
    ) -> Result<SharedCache, SharedCacheError> {
        let (client, target) = client(config, roots)?;
        let (writes, queued) = mpsc::channel(QUEUE);
        let near = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.near_ttl)
            .build();
        Ok(SharedCache {
            client,
            target,
            prefix: config.key_prefix.clone(),
            me: Observer {
                relay: config
                    .relay_name
                    .clone()
                    .unwrap_or_else(|| relay.to_string()),
                source,
            },
            timeout: config.timeout,
            sweep_deadline: config.sweep_deadline,
            ttl: ttl.clone(),
            clock_skew: config.clock_skew,
            forged: moka::sync::Cache::builder()
                .max_capacity(QUEUE as u64)
                .time_to_live(FORGERY_REPEAT)
                .build(),
            near,
            conn: OnceLock::new(),
            up: AtomicBool::new(false),
            writes,
            queued: Mutex::new(Some(queued)),
            dirty: Mutex::new(HashSet::new()),
            pending: Mutex::new(Vec::new()),
            script: Script::new(WRITE_SCRIPT),
            stats,
        })
    }

    /// This relay, as entries name it.
    pub fn observer(&self) -> &Observer {
        &self.me
    }

    /// Where Redis is (no credentials).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// How long an operator waits to hear how far a flush got: the walk's own deadline,
    /// and the writes queued before it.
    pub fn flush_wait(&self) -> Duration {
        self.sweep_deadline + self.timeout * 10
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Connects once and says PING: a wrong password or TLS set-up is an error, and so is
    /// a Redis that cannot be reached (which [`SharedCacheError::is_fatal`] tells apart).
    pub async fn check(&self) -> Result<(), SharedCacheError> {
        let attempt = async {
            let mut conn = self.client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match tokio::time::timeout(self.timeout.max(Duration::from_secs(2)), attempt).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_refusal(&e) => Err(SharedCacheError::Refused {
                target: self.target.clone(),
                detail: e.to_string(),
            }),
            Ok(Err(e)) => Err(SharedCacheError::Unreachable {
                target: self.target.clone(),
                detail: e.to_string(),
            }),
            Err(_) => Err(SharedCacheError::Unreachable {
                target: self.target.clone(),
                detail: "no answer in time".to_string(),
            }),
        }
    }

    /// Connects (or, with Redis away, goes on without it and keeps trying) and starts the
    /// writer, the subscriber and the health check. Fails only when Redis refuses us.
    pub async fn start(
        self: &Arc<Self>,
        cache: Arc<dyn NearCache>,
    ) -> Result<(), SharedCacheError> {
        match self.check().await {
            Ok(()) => {
                self.up.store(true, Ordering::SeqCst);
                self.stats.redis_connected.set(1);
                tracing::info!(
                    "shared cache: Redis at {}, this relay is {}",
                    self.target,
                    self.me
                );
            }
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => tracing::warn!(
                "{e}; going on with the local cache, and trying again every {RETRY:?}"
            ),
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| SharedCacheError::Url(e.to_string()))?;
        let _ = self.conn.set(conn);
        let queued = self.queued.lock().ok().and_then(|mut q| q.take());
        if let Some(queued) = queued {
            tokio::spawn(self.clone().write_queued(queued));
        }
        tokio::spawn(self.clone().subscribe(cache.clone()));
        tokio::spawn(self.clone().watch_health(cache));
        Ok(())
    }

    fn key(&self, kind: &str, key: &CacheKey) -> String {
        format!("{}{kind}:{}|{}", self.prefix, key.host, key.addr)
    }

    fn channel(&self) -> String {
        format!("{}invalidate", self.prefix)
    }

    fn connection(&self) -> Option<ConnectionManager> {
        self.conn.get().cloned()
    }

    /// One bounded Redis call; an error or a timeout marks Redis down (logged once).
    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => {
                self.stats.redis_round_trip(started.elapsed());
                Some(value)
            }
            Ok(Err(e)) => {
                self.failed(what, &e.to_string());
                None
            }
            Err(_) => {
                self.failed(what, &format!("no answer in {:?}", self.timeout));
                None
            }
        }
    }

    fn failed(&self, what: &str, why: &str) {
        self.stats.redis_errors.inc();
        if self.up.swap(false, Ordering::SeqCst) {
            self.stats.redis_connected.set(0);
            tracing::warn!(
                event = "fleet.down",
                call = what,
                why,
                "shared cache: Redis at {} failed ({what}: {why}); going on with the local \
                 cache until it is back",
                self.target
            );
        }
    }

    /// The near-cache step of a lookup: Redis is read only when the near copy is stale.
    pub async fn refresh(&self, cache: &dyn NearCache, key: &CacheKey) {
        if self.near.contains_key(key) {
            self.stats.near_cache_hits.inc();
            return;
        }
        self.stats.near_cache_misses.inc();
        if !self.is_up() {
            return;
        }
        if let Some((entry, tls)) = self.read(key).await {
            cache.adopt(key, entry, tls);
            self.near.insert(key.clone(), ());
        }
    }

    /// What Redis holds for `key`: its entry and the last TLS with it, each checked as
    /// this relay would check what it saw itself ([`checked`], [`checked_mark`]); what
    /// fails the check is logged and counted once, and left out.
    pub async fn read(&self, key: &CacheKey) -> Option<(Option<CacheEntry>, Option<TlsMark>)> {
        let mut conn = self.connection()?;
        let (entry_key, tls_key) = (self.key("entry", key), self.key("tls", key));
        let read = async move {
            redis::pipe()
                .cmd("HMGET")
                .arg(&entry_key)
                .arg("entry")
                .arg("kind")
                .arg("pinned")
                .get(&tls_key)
                .query_async::<(Vec<Option<String>>, Option<String>)>(&mut conn)
                .await
        };
        let (fields, tls) = self.call("read", read).await?;
        let mut fields = fields.into_iter();
        let (entry, kind, pinned) = (
            fields.next().flatten(),
            fields.next().flatten(),
            fields.next().flatten(),
        );
        let now = SystemClock.now();
        let limits = self.limits();
        let entry = entry.and_then(|json| {
            let stored = Stored {
                json: &json,
                kind: kind.as_deref(),
                pinned: pinned.as_deref(),
            };
            self.believed(key, "entry", checked(&stored, key, now, &limits))
        });
        let tls = tls.and_then(|json| self.believed(key, "tls", checked_mark(&json, now, &limits)));
        Some((entry, tls))
    }

    /// What an entry read from the fleet is checked against.
    fn limits(&self) -> Limits {
        Limits {
            ttl: self.ttl.clone(),
            clock_skew: self.clock_skew,
        }
    }

    /// How far ahead of this relay's clock a time read from the fleet may be.
    pub fn clock_skew(&self) -> Duration {
        self.clock_skew
    }

    /// The value when it was believed; a forgery is logged at warn and counted, once.
    fn believed<T>(&self, key: &CacheKey, what: &str, value: Result<T, Forged>) -> Option<T> {
        match value {
            Ok(value) => Some(value),
            Err(forged) => {
                let name = format!("{what} {}[{}]", key.host, key.addr);
                self.forged(&name, &forged);
                None
            }
        }
    }

    /// Logs and counts, once per name and reason, something read from the fleet that is
    /// not believed.
    pub fn forged(&self, name: &str, why: &Forged) {
        let fingerprint = format!("{name}: {why}");
        let new = self.forged.entry(fingerprint).or_insert(()).is_fresh();
        if new {
            self.stats.fleet_forged.inc();
            tracing::warn!(
                event = "fleet.forged",
                name,
                forged = why.kind(),
                why = %why,
                "shared cache: the {name} in Redis is not believed: {why}; ignored (whoever \
                 can write to Redis, or a relay with a wrong clock, wrote it)"
            );
        }
    }

    /// After a local observation: the split-source check, and the write queued.
    pub fn recorded(
        &self,
        before: Option<&CacheEntry>,
        entry: &CacheEntry,
        class: OutcomeClass,
        now: u64,
        success_ttl: Duration,
    ) {
        if class.meaning().downgrade
            && let (Some(at), Some(by)) = (entry.last_tls_at, entry.last_tls_by.as_ref())
            && !by.same_source(&self.me)
            && now.saturating_sub(at) < success_ttl.as_secs()
        {
            let seen_before = before.is_some_and(|b| b.class == class && !b.shared);
            if !seen_before {
                self.stats.split_source_downgrades.inc();
                tracing::warn!(
                    event = "split_source_downgrade",
                    server = %format!("{}[{}]", entry.host, entry.addr),
                    did_tls = %by,
                    failed = %self.me,
                    class = %class,
                    "split-source downgrade: {by} did TLS with this host {}s ago, {} now gets \
                     {class} ({}); something on the way may strip TLS for some source addresses",
                    now.saturating_sub(at),
                    self.me,
                    entry.detail
                );
            }
        }
        self.queue(Write::Record(Box::new(entry.clone())));
    }

    /// After a local pin.
    pub fn pinned(&self, entry: CacheEntry, _now: u64) {
        self.queue(Write::Pin(vec![entry]));
    }

    /// After a local flush (`None`: everything): the fleet's flush is queued behind the
    /// writes before it; the answer says how far it got.
    pub fn flushed(&self, name: Option<String>) -> oneshot::Receiver<Swept> {
        self.near.invalidate_all();
        let (reply, answer) = oneshot::channel();
        self.queue(Write::Flush {
            name,
            reply: Some(reply),
        });
        answer
    }

    fn queue(&self, write: Write) {
        if self.writes.try_send(write).is_err() {
            // Full (Redis slower than the mail) or not started: the near cache still has it.
            self.stats.redis_errors.inc();
        }
    }

    /// Shares other state (an MTA-STS policy) under `KIND:NAME` for `ttl`, in the
    /// background.
    pub fn share(&self, kind: &'static str, name: &str, json: String, ttl: Duration) {
        self.queue(Write::Value {
            kind,
            name: name.to_string(),
            json,
            ttl,
        });
    }

    /// Removes what [`share`](Self::share) put under `KIND:NAME`, in the background.
    pub fn forget(&self, kind: &'static str, name: &str) {
        self.queue(Write::Forget {
            kind,
            name: name.to_string(),
        });
    }

    /// What the fleet shares under `KIND:NAME`; `None` too while Redis is down.
    pub async fn shared_value(&self, kind: &str, name: &str) -> Option<String> {
        if !self.is_up() {
            return None;
        }
        let mut conn = self.connection()?;
        let key = format!("{}{kind}:{name}", self.prefix);
        let get = async move { conn.get::<_, Option<String>>(key).await };
        self.call("read", get).await.flatten()
    }
}
