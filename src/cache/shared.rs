//! The fleet's shared cache: outcome entries, the memory of TLS, operator pins and flushes
//! kept in Redis, so that the relays of a fleet learn together. Each relay's
//! [`OutcomeCache`] stays in front of it as a near cache.
//!
//! Keys, under `cache.redis.key_prefix` (default `tlsrouter:`):
//! - `entry:HOST|ADDR`: a hash with `entry` (the [`CacheEntry`] as JSON), `kind` (`success`,
//!   `failure`, `unreachable`, `pin`), `source` (who saw it, see [`source_identity`]),
//!   `pinned` and `expires_at`. The key expires with the class's TTL (or the pin's).
//! - `tls:HOST|ADDR`: the last TLS any relay did with the host ([`TlsMark`], with the
//!   host's recipient domains, so a domain flush finds it after the entry expired); it
//!   expires after `cache.ttl.success`, so downgrades are seen across the fleet as long as
//!   locally.
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

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, ConnectionAddr, IntoConnectionInfo, Script};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{CacheEntry, CacheKey, Clock, Observer, OutcomeCache, SystemClock, TtlConfig};
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

/// `cache.redis` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://HOST:PORT/DB`, `rediss://HOST:PORT/DB` (TLS) or `unix:///PATH`; never with
    /// credentials in it.
    pub url: Option<String>,
    /// Put before every key and the channel, so that fleets (or tests) can share a Redis.
    pub key_prefix: String,
    /// For Redis ACLs; without it the password is for the `default` user.
    pub username: Option<String>,
    /// A file holding the password (its first line).
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// This relay's name in the fleet, in entries and logs; default: `hostname`.
    pub relay_name: Option<String>,
    /// The longest any Redis call may take; a message never waits longer for one.
    #[serde(with = "crate::settings::duration")]
    pub timeout: Duration,
    /// How long a copy read from Redis is used before Redis is asked again.
    #[serde(with = "crate::settings::duration")]
    pub near_ttl: Duration,
    /// How far ahead of this relay's clock a time read from Redis may be (another relay's
    /// clock may run a little fast); an entry further ahead is not believed.
    #[serde(with = "crate::settings::duration")]
    pub clock_skew: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            key_prefix: "tlsrouter:".to_string(),
            username: None,
            password_file: None,
            password_env: None,
            relay_name: None,
            timeout: Duration::from_millis(500),
            near_ttl: Duration::from_secs(10),
            clock_skew: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SharedCacheError {
    #[error("cache.redis.url: {0}")]
    Url(String),
    #[error("cache.redis: {0}")]
    Credentials(String),
    #[error("cache.redis: Redis at {target} refused the credentials: {detail}")]
    Refused { target: String, detail: String },
    #[error("cache.redis: Redis at {target} cannot be reached: {detail}")]
    Unreachable { target: String, detail: String },
}

impl SharedCacheError {
    /// A configuration that can never work, as opposed to a Redis that is away for now.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, SharedCacheError::Unreachable { .. })
    }
}

/// What `rediss://` trusts: delivery's roots (`tls.system_roots`, `tls.ca_file`), given
/// as they are so that this module needs nothing of `outbound`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Roots<'a> {
    pub system: bool,
    pub ca_file: Option<&'a std::path::Path>,
}

/// The last TLS a relay of the fleet did with a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsMark {
    pub at: u64,
    pub by: Observer,
    /// The recipient domains seen for the host, so that flushing a domain forgets the mark
    /// even once the host's entry has expired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
}

/// What the writer task does, in order.
#[derive(Debug)]
enum Write {
    Record(Box<CacheEntry>),
    Pin(Vec<CacheEntry>),
    Flush(Option<String>),
    /// Other shared state (MTA-STS policies): JSON under `KIND:NAME`.
    Value {
        kind: &'static str,
        name: String,
        json: String,
        ttl: Duration,
    },
    Forget {
        kind: &'static str,
        name: String,
    },
}

/// The announcement of a pin or flush on the channel.
#[derive(Debug, Serialize, Deserialize)]
struct Invalidation {
    relay: String,
    #[serde(flatten)]
    what: What,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum What {
    Flush { name: Option<String> },
    Pin { keys: Vec<(String, IpAddr)> },
}

pub struct SharedCache {
    client: Client,
    /// Where Redis is, without credentials: for logs and errors.
    target: String,
    prefix: String,
    me: Observer,
    timeout: Duration,
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

/// The write of one observation; see the merge rules in the module documentation.
const WRITE_SCRIPT: &str = r#"
local now = tonumber(ARGV[6])
local cur = redis.call('HMGET', KEYS[1], 'kind', 'source', 'pinned', 'expires_at', 'entry')
local cur_expires = tonumber(cur[4]) or 0
local status = 'written'
if ARGV[4] ~= '1' and cur_expires > now then
  -- What holds past any TTL a relay gives was not written by one: it holds nothing back.
  if cur[3] == '1' and cur_expires <= now + tonumber(ARGV[10]) then
    status = 'pinned'
  elseif ARGV[2] == 'success' and cur[1] == 'failure' and cur[2] ~= ARGV[3]
      and cur_expires <= now + tonumber(ARGV[11]) then
    status = 'kept'
  end
end
if status == 'written' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'entry', ARGV[1], 'kind', ARGV[2], 'source', ARGV[3],
    'pinned', ARGV[4], 'expires_at', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[7])
end
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[2], ARGV[8], 'EX', ARGV[9])
end
if status == 'kept' then
  return {status, cur[5]}
end
return {status, ''}
"#;

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
    pub async fn start(self: &Arc<Self>, cache: Arc<OutcomeCache>) -> Result<(), SharedCacheError> {
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
                "shared cache: Redis at {} failed ({what}: {why}); going on with the local \
                 cache until it is back",
                self.target
            );
        }
    }

    /// The near-cache step of a lookup: Redis is read only when the near copy is stale.
    pub async fn refresh(&self, cache: &OutcomeCache, key: &CacheKey) {
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
                "shared cache: the {name} in Redis is not believed: {why}; ignored (whoever \
                 can write to Redis, or a relay with a wrong clock, wrote it)"
            );
        }
    }

    /// Every entry Redis holds for a host or recipient domain (for `ctl cache show`).
    pub async fn find(&self, name: &str) -> Option<Vec<CacheEntry>> {
        let mut conn = self.connection()?;
        let pattern = format!("{}entry:*", glob_escape(&self.prefix));
        let name = name.to_string();
        let find = async move {
            let keys = scan(&mut conn, &pattern).await?;
            let mut found = Vec::new();
            for key in keys {
                let json: Option<String> = conn.hget(&key, "entry").await?;
                if let Some(entry) = json.and_then(|j| serde_json::from_str::<CacheEntry>(&j).ok())
                    && (entry.host == name || entry.domains.contains(&name))
                {
                    found.push(entry);
                }
            }
            Ok(found)
        };
        self.call("find", find).await
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
                    server = %format!("{}[{}]", entry.host, entry.addr),
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

    /// After a local flush (`None`: everything).
    pub fn flushed(&self, name: Option<String>) {
        self.near.invalidate_all();
        self.queue(Write::Flush(name));
    }

    fn queue(&self, write: Write) {
        if self.writes.try_send(write).is_err() {
            // Full (Redis slower than the mail) or not started: the near cache still has it.
            self.stats.redis_errors.inc();
        }
    }

    /// Drains the write queue, one write at a time, each bounded by the timeout.
    async fn write_queued(self: Arc<Self>, mut queued: mpsc::Receiver<Write>) {
        while let Some(write) = queued.recv().await {
            if !self.is_up() {
                self.keep_for_later(write);
                continue;
            }
            let done = match &write {
                Write::Record(entry) => self.write_entry(entry, false).await,
                Write::Pin(entries) => self.write_pins(entries).await,
                Write::Flush(name) => self.write_flush(name.as_deref()).await,
                Write::Value {
                    kind,
                    name,
                    json,
                    ttl,
                } => self.write_value(kind, name, json, *ttl).await,
                Write::Forget { kind, name } => self.forget_value(kind, name).await,
            };
            if !done {
                self.keep_for_later(write);
            }
        }
    }

    fn keep_for_later(&self, write: Write) {
        match write {
            Write::Record(entry) => {
                if let Ok(mut dirty) = self.dirty.lock()
                    && dirty.len() < QUEUE
                {
                    dirty.insert(entry.key());
                }
            }
            other => {
                if let Ok(mut pending) = self.pending.lock()
                    && pending.len() < PENDING
                {
                    pending.push(other);
                }
            }
        }
    }

    /// Runs the write script; false when Redis did not take it.
    async fn write_entry(&self, entry: &CacheEntry, pin: bool) -> bool {
        let Some(mut conn) = self.connection() else {
            return false;
        };
        let key = entry.key();
        let now = SystemClock.now();
        let by = entry.observed_by.clone().unwrap_or_else(|| self.me.clone());
        let kind = if pin { "pin" } else { kind_of(entry.class) };
        // A pin is written as one (`ctl cache pin`) or not at all: readers believe a pin
        // only from a pin's write.
        let written = match pin {
            true => Cow::Borrowed(entry),
            false => Cow::Owned(CacheEntry {
                pinned: false,
                pinned_at: None,
                ..entry.clone()
            }),
        };
        let Ok(json) = serde_json::to_string(&*written) else {
            return true;
        };
        let tls = match (entry.last_tls_at, &entry.last_tls_by) {
            (Some(at), Some(by)) if by == &self.me && !pin => {
                let mark = TlsMark {
                    at,
                    by: by.clone(),
                    domains: entry.domains.clone(),
                };
                serde_json::to_string(&mark).unwrap_or_default()
            }
            _ => String::new(),
        };
        let ttl = entry.expires_at.saturating_sub(now).max(1);
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.key("entry", &key))
            .key(self.key("tls", &key))
            .arg(json)
            .arg(kind)
            .arg(source_identity(&by))
            .arg(if pin { "1" } else { "0" })
            .arg(entry.expires_at)
            .arg(now)
            .arg(ttl)
            .arg(tls)
            .arg(self.ttl.success.as_secs().max(1))
            .arg(self.ttl.pin_max.as_secs() + self.clock_skew.as_secs())
            .arg(self.ttl.tls_failure.as_secs() + self.clock_skew.as_secs());
        let run = async move { invocation.invoke_async::<(String, String)>(&mut conn).await };
        let Some((status, held)) = self.call("write", run).await else {
            return false;
        };
        tracing::debug!(
            "shared cache: wrote {}[{}] ({}): {status}",
            entry.host,
            entry.addr,
            entry.class
        );
        if status == "kept"
            && let Ok(held) = serde_json::from_str::<CacheEntry>(&held)
        {
            let other = held
                .observed_by
                .map_or_else(|| "another relay".to_string(), |o| o.to_string());
            self.stats.split_source_downgrades.inc();
            tracing::warn!(
                server = %format!("{}[{}]", entry.host, entry.addr),
                "split-source downgrade: {} did TLS with this host, {other} gets {} ({}); the \
                 shared entry keeps that failure for its source address",
                self.me,
                held.class,
                held.detail
            );
        }
        true
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

    async fn write_value(&self, kind: &str, name: &str, json: &str, ttl: Duration) -> bool {
        let Some(mut conn) = self.connection() else {
            return false;
        };
        let key = format!("{}{kind}:{name}", self.prefix);
        let (json, seconds) = (json.to_string(), ttl.as_secs().max(1));
        let set = async move { conn.set_ex::<_, _, ()>(key, json, seconds).await };
        let done = self.call("write", set).await.is_some();
        if done {
            tracing::debug!("shared cache: wrote {kind} {name}");
        }
        done
    }

    async fn forget_value(&self, kind: &str, name: &str) -> bool {
        let Some(mut conn) = self.connection() else {
            return false;
        };
        let key = format!("{}{kind}:{name}", self.prefix);
        let del = async move { conn.del::<_, ()>(key).await };
        self.call("delete", del).await.is_some()
    }

    async fn write_pins(&self, entries: &[CacheEntry]) -> bool {
        for entry in entries {
            if !self.write_entry(entry, true).await {
                return false;
            }
        }
        let keys = entries.iter().map(|e| (e.host.clone(), e.addr)).collect();
        self.publish(What::Pin { keys }).await
    }

    async fn write_flush(&self, name: Option<&str>) -> bool {
        let Some(mut conn) = self.connection() else {
            return false;
        };
        let prefix = glob_escape(&self.prefix);
        let (entry_prefix, tls_prefix) = (
            format!("{}entry:", self.prefix),
            format!("{}tls:", self.prefix),
        );
        let name = name.map(str::to_string);
        let announced = name.clone();
        let flush = async move {
            let Some(name) = name else {
                let keys = scan(&mut conn, &format!("{prefix}*")).await?;
                for key in keys {
                    let _: () = conn.del(&key).await?;
                }
                return Ok(());
            };
            for key in scan(&mut conn, &format!("{prefix}entry:*")).await? {
                let json: Option<String> = conn.hget(&key, "entry").await?;
                let Some(entry) = json.and_then(|j| serde_json::from_str::<CacheEntry>(&j).ok())
                else {
                    continue;
                };
                if entry.host == name || entry.domains.contains(&name) {
                    let tls = key.replacen(&entry_prefix, &tls_prefix, 1);
                    let _: () = conn.del(&[key, tls]).await?;
                }
            }
            let host_marks = format!("{prefix}tls:{}|*", glob_escape(&name));
            for key in scan(&mut conn, &host_marks).await? {
                let _: () = conn.del(&key).await?;
            }
            // The marks of the domain's hosts whose entries have expired: only the mark
            // itself still names the domain.
            for key in scan(&mut conn, &format!("{prefix}tls:*")).await? {
                let json: Option<String> = conn.get(&key).await?;
                let mark = json.and_then(|j| serde_json::from_str::<TlsMark>(&j).ok());
                if mark.is_some_and(|m| m.domains.contains(&name)) {
                    let _: () = conn.del(&key).await?;
                }
            }
            Ok(())
        };
        if self.call("flush", flush).await.is_none() {
            return false;
        }
        let what = announced.as_deref().unwrap_or("everything");
        tracing::debug!("shared cache: flushed {what}");
        self.publish(What::Flush { name: announced }).await
    }

    async fn publish(&self, what: What) -> bool {
        let Some(mut conn) = self.connection() else {
            return false;
        };
        let message = Invalidation {
            relay: self.me.relay.clone(),
            what,
        };
        let Ok(json) = serde_json::to_string(&message) else {
            return true;
        };
        let channel = self.channel();
        let publish = async move { conn.publish::<_, _, i64>(channel, json).await };
        self.call("publish", publish).await.is_some()
    }

    /// Listens for other relays' pins and flushes; resubscribes after Redis comes back.
    async fn subscribe(self: Arc<Self>, cache: Arc<OutcomeCache>) {
        use futures_util::StreamExt;
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(self.channel()).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            if let Ok(Ok(pubsub)) = tokio::time::timeout(self.timeout * 4, subscribed).await {
                // What was announced while we were not listening is unknown: read afresh.
                self.near.invalidate_all();
                tracing::info!("shared cache: listening for pins and flushes");
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    if let Ok(invalidation) = serde_json::from_str::<Invalidation>(&payload) {
                        self.invalidated(&cache, invalidation).await;
                    }
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn invalidated(&self, cache: &OutcomeCache, invalidation: Invalidation) {
        if invalidation.relay == self.me.relay {
            return;
        }
        match invalidation.what {
            What::Flush { name } => {
                self.near.invalidate_all();
                let flushed = match &name {
                    Some(name) => cache.flush_local(name),
                    None => cache.flush_all_local(),
                };
                tracing::info!(
                    "shared cache: relay {} flushed {}; {flushed} entries dropped here",
                    invalidation.relay,
                    name.as_deref().unwrap_or("everything")
                );
            }
            What::Pin { keys } => {
                for (host, addr) in keys {
                    let key = CacheKey::new(&host, addr);
                    self.near.invalidate(&key);
                    self.refresh(cache, &key).await;
                }
                tracing::info!(
                    "shared cache: relay {} pinned an entry; taken in here",
                    invalidation.relay
                );
            }
        }
    }

    /// While Redis is down, tries it every second; when it is back, writes what was kept
    /// and drops the near copies, which may have missed pins and flushes.
    async fn watch_health(self: Arc<Self>, cache: Arc<OutcomeCache>) {
        let mut ticker = tokio::time::interval(RETRY);
        loop {
            ticker.tick().await;
            if self.is_up() {
                continue;
            }
            let Some(mut conn) = self.connection() else {
                continue;
            };
            let ping = async move { redis::cmd("PING").query_async::<String>(&mut conn).await };
            let started = Instant::now();
            let Ok(Ok(_)) = tokio::time::timeout(self.timeout, ping).await else {
                continue;
            };
            self.stats.redis_round_trip(started.elapsed());
            self.up.store(true, Ordering::SeqCst);
            self.stats.redis_connected.set(1);
            self.near.invalidate_all();
            let pending: Vec<Write> = self
                .pending
                .lock()
                .map(|mut p| std::mem::take(&mut *p))
                .unwrap_or_default();
            let dirty: Vec<CacheKey> = self
                .dirty
                .lock()
                .map(|mut d| d.drain().collect())
                .unwrap_or_default();
            tracing::info!(
                "shared cache: Redis at {} is back; writing {} entries and {} pins or flushes \
                 made meanwhile",
                self.target,
                dirty.len(),
                pending.len()
            );
            for write in pending {
                self.queue(write);
            }
            for key in dirty {
                if let Some(entry) = cache.entry_for_resync(&key) {
                    self.queue(Write::Record(Box::new(entry)));
                }
            }
        }
    }
}

/// What Redis holds under `entry:HOST|ADDR`, as read back: the entry's JSON and the fields
/// the write script set beside it.
#[derive(Clone, Copy, Debug)]
pub struct Stored<'a> {
    pub json: &'a str,
    /// `success`, `failure`, `unreachable` or `pin`.
    pub kind: Option<&'a str>,
    /// `1` for a pin.
    pub pinned: Option<&'a str>,
}

/// What an entry read from the fleet is checked against: this relay's TTLs and how far
/// another relay's clock may run ahead.
#[derive(Clone, Debug)]
pub struct Limits {
    pub ttl: TtlConfig,
    pub clock_skew: Duration,
}

/// Why something read from the fleet is not believed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Forged {
    #[error("it does not parse ({0})")]
    Malformed(String),
    #[error("it is for {found}, not for the key it is under")]
    WrongKey { found: String },
    #[error(
        "its {field} is {ahead}s ahead of this relay's clock, more than cache.redis.clock_skew \
         ({skew}s) allows"
    )]
    Future {
        field: &'static str,
        ahead: u64,
        skew: u64,
    },
    #[error("it says pinned, but was not written as a pin (ctl cache pin)")]
    PinNotWritten,
    #[error("its pin lasts {lasts}s, longer than cache.ttl.pin_max ({max}s)")]
    PinTooLong { lasts: u64, max: u64 },
    #[error("the MTA-STS policy {0}")]
    Policy(String),
}

/// A time read from the fleet, which may be only a little ahead of ours.
fn not_ahead(field: &'static str, at: u64, now: u64, skew: Duration) -> Result<(), Forged> {
    let ahead = at.saturating_sub(now);
    if ahead > skew.as_secs() {
        return Err(Forged::Future {
            field,
            ahead,
            skew: skew.as_secs(),
        });
    }
    Ok(())
}

/// An entry read from the fleet, checked as this relay would check what it saw itself:
/// its times no later than now plus the clock skew, a pin only as `ctl cache pin` writes
/// one (and no longer than `cache.ttl.pin_max`), and an observation believed no longer
/// than this relay's TTL for its class.
pub fn checked(
    stored: &Stored<'_>,
    key: &CacheKey,
    now: u64,
    limits: &Limits,
) -> Result<CacheEntry, Forged> {
    let mut entry: CacheEntry =
        serde_json::from_str(stored.json).map_err(|e| Forged::Malformed(e.to_string()))?;
    entry = entry.normalized();
    if entry.key() != *key {
        return Err(Forged::WrongKey {
            found: format!("{}[{}]", entry.host, entry.addr),
        });
    }
    let skew = limits.clock_skew;
    not_ahead("first_seen", entry.first_seen, now, skew)?;
    not_ahead("last_seen", entry.last_seen, now, skew)?;
    if let Some(at) = entry.last_tls_at {
        not_ahead("last_tls_at", at, now, skew)?;
    }
    if let Some(at) = entry.last_verified_at {
        not_ahead("last_verified_at", at, now, skew)?;
    }
    let written_as_pin = stored.kind == Some("pin") && stored.pinned == Some("1");
    if entry.pinned != written_as_pin {
        return Err(Forged::PinNotWritten);
    }
    if entry.pinned {
        // A pin written before pins carried their time lasts no longer than one made now.
        let at = entry.pinned_at.unwrap_or(now);
        not_ahead("pinned_at", at, now, skew)?;
        let lasts = entry.expires_at.saturating_sub(at);
        if lasts > limits.ttl.pin_max.as_secs() {
            return Err(Forged::PinTooLong {
                lasts,
                max: limits.ttl.pin_max.as_secs(),
            });
        }
    } else {
        let believed = limits.ttl.for_class(entry.class).as_secs();
        entry.expires_at = entry
            .expires_at
            .min(entry.last_seen.saturating_add(believed));
    }
    Ok(entry)
}

/// The memory of TLS read from the fleet, checked as [`checked`] checks an entry.
pub fn checked_mark(json: &str, now: u64, limits: &Limits) -> Result<TlsMark, Forged> {
    let mark: TlsMark = serde_json::from_str(json).map_err(|e| Forged::Malformed(e.to_string()))?;
    not_ahead("time of TLS", mark.at, now, limits.clock_skew)?;
    Ok(mark)
}

/// Takes in what the fleet holds; see the module documentation for the rules.
pub fn merge(
    local: Option<CacheEntry>,
    fleet: Option<CacheEntry>,
    tls: Option<TlsMark>,
    key: &CacheKey,
    me: &Observer,
    now: u64,
) -> Option<CacheEntry> {
    let mut entry = match (local, fleet) {
        (None, None) => {
            // Only the memory of TLS: kept, invisible to lookups, for the downgrade check.
            let tls = tls.as_ref()?;
            let mut entry = CacheEntry::new(key, OutcomeClass::TlsVerified, tls.at);
            entry.detail = "TLS seen by another relay".to_string();
            entry.expires_at = 0;
            entry.shared = true;
            entry
        }
        (Some(local), None) => local,
        (None, Some(fleet)) => from_fleet(fleet, me),
        (Some(local), Some(fleet)) => {
            let fleet_pin = fleet.pinned && !fleet.is_expired(now);
            let local_pin = local.pinned && !local.is_expired(now);
            // Another relay's failure may be its own path's (a 454 injected there only):
            // it never replaces this relay's own success while that still counts.
            let own_success = !local.shared && local.class.is_encrypted() && !local.is_expired(now);
            let others_failure = !fleet.class.is_encrypted()
                && (fleet.observed_by.as_ref()).is_none_or(|by| by.relay != me.relay);
            let take_fleet = if fleet_pin != local_pin {
                fleet_pin
            } else if own_success && others_failure {
                false
            } else {
                fleet.last_seen > local.last_seen
            };
            let (mut kept, other) = if take_fleet {
                (from_fleet(fleet, me), local)
            } else {
                (local, fleet)
            };
            for domain in &other.domains {
                kept.add_domain(domain);
            }
            if other.last_tls_at > kept.last_tls_at {
                kept.last_tls_at = other.last_tls_at;
                kept.last_tls_by = other.last_tls_by;
            }
            kept.last_verified_at = kept.last_verified_at.max(other.last_verified_at);
            kept
        }
    };
    if let Some(tls) = tls
        && Some(tls.at) > entry.last_tls_at
    {
        entry.last_tls_at = Some(tls.at);
        entry.last_tls_by = Some(tls.by);
    }
    Some(entry)
}

fn from_fleet(mut entry: CacheEntry, me: &Observer) -> CacheEntry {
    entry.shared = entry
        .observed_by
        .as_ref()
        .is_some_and(|by| by.relay != me.relay);
    entry.normalized()
}

/// What the write script compares: who saw it, by address (or by relay, without one).
pub fn source_identity(observer: &Observer) -> String {
    match observer.source {
        Some(source) => source.to_string(),
        None => format!("relay:{}", observer.relay),
    }
}

fn kind_of(class: OutcomeClass) -> &'static str {
    if class.is_encrypted() {
        "success"
    } else if class.is_unreachable() {
        "unreachable"
    } else {
        "failure"
    }
}

/// A wrong password or user, as Redis says it (and not a network failure).
fn is_refusal(error: &redis::RedisError) -> bool {
    if error.kind() == redis::ErrorKind::AuthenticationFailed {
        return true;
    }
    let text = error.to_string();
    [
        "WRONGPASS",
        "NOAUTH",
        "NOPERM",
        "invalid password",
        "invalid username",
    ]
    .iter()
    .any(|word| text.contains(word))
}

async fn scan(conn: &mut ConnectionManager, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The Redis client for the configuration, and where it goes (without credentials).
fn client(config: &RedisConfig, roots: Roots<'_>) -> Result<(Client, String), SharedCacheError> {
    let url = config.url.as_deref().ok_or_else(|| {
        SharedCacheError::Url("missing: cache.backend redis needs a URL".to_string())
    })?;
    // Refused before parsing, so that no error message repeats a password.
    if url.contains('@') {
        return Err(SharedCacheError::Url(
            "credentials do not belong in the URL: use cache.redis.password_file or \
             password_env (and username)"
                .to_string(),
        ));
    }
    let mut info = url
        .into_connection_info()
        .map_err(|e| SharedCacheError::Url(format!("{url:?} is not a Redis URL: {e}")))?;
    let target = match info.addr() {
        ConnectionAddr::Unix(path) => format!("unix://{}", path.display()),
        ConnectionAddr::TcpTls { .. } => format!("rediss://{}", info.addr()),
        other => format!("redis://{other}"),
    };
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = password(config)? {
        settings = settings.set_password(password);
    }
    info = info.set_redis_settings(settings);
    let client = if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(roots_pem(roots)?),
        };
        Client::build_with_tls(info, certificates)
    } else {
        Client::open(info)
    }
    .map_err(|e| SharedCacheError::Url(e.to_string()))?;
    Ok((client, target))
}

fn password(config: &RedisConfig) -> Result<Option<String>, SharedCacheError> {
    match (&config.password_file, &config.password_env) {
        (Some(_), Some(_)) => Err(SharedCacheError::Credentials(
            "give password_file or password_env, not both".to_string(),
        )),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                SharedCacheError::Credentials(format!("password_file {}: {e}", path.display()))
            })?;
            Ok(Some(text.lines().next().unwrap_or("").to_string()))
        }
        (None, Some(name)) => std::env::var(name).map(Some).map_err(|_| {
            SharedCacheError::Credentials(format!("password_env: ${name} is not set"))
        }),
        (None, None) => Ok(None),
    }
}

/// The roots `rediss://` trusts: delivery's (system roots and `tls.ca_file`), as PEM.
fn roots_pem(roots: Roots<'_>) -> Result<Vec<u8>, SharedCacheError> {
    let mut ders = Vec::new();
    if roots.system {
        ders.extend(rustls_native_certs::load_native_certs().certs);
    }
    if let Some(path) = roots.ca_file {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| SharedCacheError::Url(format!("tls.ca_file {}: {e}", path.display())))?;
        ders.extend(certs);
    }
    if ders.is_empty() {
        return Err(SharedCacheError::Url(
            "rediss:// needs root certificates: tls.system_roots or tls.ca_file".to_string(),
        ));
    }
    let mut pem = String::new();
    for der in ders {
        let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in body.as_bytes().chunks(64) {
            let _ = writeln!(pem, "{}", String::from_utf8_lossy(chunk));
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    Ok(pem.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_772_323_200;

    fn observer(relay: &str, source: Option<[u8; 4]>) -> Observer {
        Observer {
            relay: relay.to_string(),
            source: source.map(IpAddr::from),
        }
    }

    fn entry(class: OutcomeClass, last_seen: u64, by: &Observer) -> CacheEntry {
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let mut entry = CacheEntry::new(&key, class, last_seen);
        entry.expires_at = last_seen + 3600;
        entry.observed_by = Some(by.clone());
        if class.is_encrypted() {
            entry.last_tls_at = Some(last_seen);
            entry.last_tls_by = Some(by.clone());
        }
        entry
    }

    #[test]
    fn the_later_observation_wins_and_the_memory_of_tls_is_the_latest() {
        let (a, b) = (
            observer("a", Some([127, 0, 0, 2])),
            observer("b", Some([127, 0, 0, 3])),
        );
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        // A's own failure, then B's: the later one.
        let local = entry(OutcomeClass::StarttlsRefused, T0, &a);
        let fleet = entry(OutcomeClass::NoStarttls, T0 + 10, &b);
        let merged = merge(Some(local), Some(fleet.clone()), None, &key, &a, T0 + 20);
        let merged = merged.expect("merged");
        assert_eq!(merged.class, OutcomeClass::NoStarttls);
        assert!(merged.shared, "seen by relay b");

        // A's success whose class has expired (kept for the memory of TLS): B's failure is
        // what holds, and the memory of A's TLS stays.
        let mut expired = entry(OutcomeClass::TlsVerified, T0, &a);
        expired.expires_at = T0 + 5;
        let merged = merge(Some(expired), Some(fleet.clone()), None, &key, &a, T0 + 20);
        let merged = merged.expect("merged");
        assert_eq!(merged.class, OutcomeClass::NoStarttls);
        assert_eq!(merged.last_tls_at, Some(T0));
        assert_eq!(merged.last_tls_by, Some(a.clone()));

        // A's own success after B's failure stands here.
        let newer = entry(OutcomeClass::TlsVerified, T0 + 30, &a);
        let merged = merge(Some(newer), Some(fleet), None, &key, &a, T0 + 40).expect("merged");
        assert_eq!(merged.class, OutcomeClass::TlsVerified);
        assert!(!merged.shared);
    }

    #[test]
    fn another_relays_later_failure_never_replaces_this_relays_own_success_while_it_counts() {
        let (a, b) = (
            observer("a", Some([127, 0, 0, 2])),
            observer("b", Some([127, 0, 0, 3])),
        );
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let own = entry(OutcomeClass::TlsVerified, T0, &a);
        for class in [OutcomeClass::StarttlsRefused, OutcomeClass::NoStarttls] {
            let theirs = entry(class, T0 + 10, &b);
            let merged = merge(Some(own.clone()), Some(theirs), None, &key, &a, T0 + 20);
            let merged = merged.expect("merged");
            assert_eq!(merged.class, OutcomeClass::TlsVerified, "{class}");
            assert!(!merged.shared);
            assert_eq!(merged.domains, own.domains);
        }
        // Its own later failure does replace it.
        let mine = entry(OutcomeClass::StarttlsRefused, T0 + 10, &a);
        let merged = merge(Some(own), Some(mine), None, &key, &a, T0 + 20).expect("merged");
        assert_eq!(merged.class, OutcomeClass::StarttlsRefused);
    }

    #[test]
    fn a_pin_from_the_fleet_wins_over_a_newer_observation() {
        let (a, b) = (observer("a", None), observer("b", None));
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let local = entry(OutcomeClass::TlsVerified, T0 + 100, &a);
        let mut pin = entry(OutcomeClass::NoStarttls, T0, &b);
        pin.pinned = true;
        let merged = merge(Some(local), Some(pin), None, &key, &a, T0 + 200).expect("merged");
        assert!(merged.pinned && merged.shared);
        assert_eq!(merged.class, OutcomeClass::NoStarttls);
    }

    #[test]
    fn only_a_tls_mark_gives_an_entry_lookups_do_not_see() {
        let (a, b) = (observer("a", None), observer("b", None));
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let mark = TlsMark {
            at: T0,
            by: b.clone(),
            domains: Vec::new(),
        };
        let merged = merge(None, None, Some(mark), &key, &a, T0 + 5).expect("kept");
        assert!(merged.is_expired(T0 + 5));
        assert_eq!(
            (merged.last_tls_at, merged.last_tls_by),
            (Some(T0), Some(b))
        );
    }

    #[test]
    fn sources_are_compared_by_address_or_else_by_relay() {
        let a2 = observer("a", Some([127, 0, 0, 2]));
        let b2 = observer("b", Some([127, 0, 0, 2]));
        let b3 = observer("b", Some([127, 0, 0, 3]));
        assert!(a2.same_source(&b2) && !a2.same_source(&b3));
        assert!(!observer("a", None).same_source(&observer("b", None)));
        assert_eq!(source_identity(&b3), "127.0.0.3");
        assert_eq!(source_identity(&observer("a", None)), "relay:a");
    }

    #[test]
    fn urls_with_credentials_or_nonsense_are_refused_without_repeating_a_password() {
        let tls = Roots::default();
        let with = |url: &str| RedisConfig {
            url: Some(url.to_string()),
            ..RedisConfig::default()
        };
        let err = client(&with("redis://user:s3cret@127.0.0.1:6379"), tls).expect_err("inline");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(err.to_string().contains("password_file"), "{err}");
        let err = client(&with("http://127.0.0.1:6379"), tls).expect_err("scheme");
        assert!(err.to_string().contains("not a Redis URL"), "{err}");
        let err = client(&RedisConfig::default(), tls).expect_err("no url");
        assert!(err.to_string().contains("cache.redis.url"), "{err}");
        let (_, target) = client(&with("redis://127.0.0.1:6390/2"), tls).expect("valid");
        assert_eq!(target, "redis://127.0.0.1:6390");
        let (_, target) = client(&with("unix:///run/redis/redis.sock"), tls).expect("valid");
        assert_eq!(target, "unix:///run/redis/redis.sock");
    }

    fn limits() -> Limits {
        Limits {
            ttl: TtlConfig::default(),
            clock_skew: Duration::from_secs(60),
        }
    }

    fn stored<'a>(json: &'a str, kind: &'a str, pinned: &'a str) -> Stored<'a> {
        Stored {
            json,
            kind: Some(kind),
            pinned: Some(pinned),
        }
    }

    #[test]
    fn an_entry_from_the_fleet_is_believed_only_as_this_relay_would_believe_its_own() {
        let b = observer("b", None);
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let now = T0 + 100;
        let failure = entry(OutcomeClass::StarttlsRefused, T0, &b);
        let json = serde_json::to_string(&failure).expect("json");
        assert_eq!(
            checked(&stored(&json, "failure", "0"), &key, now, &limits()),
            Ok(failure.clone())
        );
        // Written by a clock far ahead, or by hand: not believed.
        let mut future = failure.clone();
        future.last_seen = now + 86_400 * 3650;
        future.expires_at = future.last_seen + 3600;
        let json = serde_json::to_string(&future).expect("json");
        assert!(matches!(
            checked(&stored(&json, "failure", "0"), &key, now, &limits()),
            Err(Forged::Future {
                field: "last_seen",
                ..
            })
        ));
        // A little ahead (another relay's clock): believed.
        let mut skewed = failure.clone();
        skewed.last_seen = now + 30;
        let json = serde_json::to_string(&skewed).expect("json");
        assert!(checked(&stored(&json, "failure", "0"), &key, now, &limits()).is_ok());
        // An expiry far beyond the class's TTL is cut to it.
        let mut long = failure.clone();
        long.expires_at = T0 + 86_400 * 3650;
        let json = serde_json::to_string(&long).expect("json");
        let believed = checked(&stored(&json, "failure", "0"), &key, now, &limits());
        assert_eq!(believed.map(|e| e.expires_at), Ok(T0 + 3600));
        // Under another key: not believed.
        let other = CacheKey::new("mx.other.example", IpAddr::from([192, 0, 2, 1]));
        let json = serde_json::to_string(&failure).expect("json");
        assert!(matches!(
            checked(&stored(&json, "failure", "0"), &other, now, &limits()),
            Err(Forged::WrongKey { .. })
        ));
    }

    #[test]
    fn a_pin_from_the_fleet_is_believed_only_as_ctl_cache_pin_writes_one() {
        let b = observer("b", None);
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let now = T0 + 100;
        let mut pin = entry(OutcomeClass::NoStarttls, T0, &b);
        pin.pinned = true;
        pin.pinned_at = Some(T0);
        pin.expires_at = T0 + 86_400;
        let json = serde_json::to_string(&pin).expect("json");
        assert_eq!(
            checked(&stored(&json, "pin", "1"), &key, now, &limits()),
            Ok(pin.clone())
        );
        // The entry says pinned; the write did not.
        assert_eq!(
            checked(&stored(&json, "failure", "0"), &key, now, &limits()),
            Err(Forged::PinNotWritten)
        );
        // One written by a relay from before pins carried their time: believed for as long
        // as a pin made now could last, no longer.
        let mut no_time = pin.clone();
        no_time.pinned_at = None;
        let json = serde_json::to_string(&no_time).expect("json");
        assert_eq!(
            checked(&stored(&json, "pin", "1"), &key, now, &limits()),
            Ok(no_time.clone())
        );
        no_time.expires_at = now + 31 * 86_400;
        let json = serde_json::to_string(&no_time).expect("json");
        assert!(matches!(
            checked(&stored(&json, "pin", "1"), &key, now, &limits()),
            Err(Forged::PinTooLong { .. })
        ));
        // Longer than any pin an operator can make.
        let mut forever = pin.clone();
        forever.expires_at = T0 + 86_400 * 3650;
        let json = serde_json::to_string(&forever).expect("json");
        assert!(matches!(
            checked(&stored(&json, "pin", "1"), &key, now, &limits()),
            Err(Forged::PinTooLong { .. })
        ));
    }

    #[test]
    fn a_memory_of_tls_from_the_future_is_not_believed() {
        let mark = TlsMark {
            at: T0 + 86_400,
            by: observer("b", None),
            domains: Vec::new(),
        };
        let json = serde_json::to_string(&mark).expect("json");
        assert!(matches!(
            checked_mark(&json, T0, &limits()),
            Err(Forged::Future { .. })
        ));
        assert_eq!(checked_mark(&json, T0 + 86_400, &limits()), Ok(mark));
    }
}
