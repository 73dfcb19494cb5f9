//! Walks over the whole shared cache (a flush, `ctl cache show`) in batches: each batch is
//! one SCAN step and at most one pipelined read and one delete, each a bounded call, and
//! the whole walk stops at `cache.redis.sweep_deadline`. A walk that could not finish says
//! how far it got; it is not tried again on its own.

use std::time::Instant;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::cache::entry::CacheEntry;
use crate::cache::shared::client::glob_escape;
use crate::cache::shared::{SharedCache, TlsMark};

/// Keys per SCAN step, so per batch of reads and deletes.
const BATCH: usize = 500;

/// Why a walk stopped before it had seen every key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unfinished {
    /// `cache.redis.sweep_deadline` passed.
    OutOfTime,
    /// A call failed or outlasted `cache.redis.timeout`; Redis is taken for down.
    RedisFailed,
    /// Redis was down when asked: a flush is made when it is back.
    RedisDown,
    /// The writer had not come to the flush while the operator waited.
    StillQueued,
    /// The write queue was full (Redis slower than the mail): the flush was not queued.
    QueueFull,
}

impl Unfinished {
    /// What the operator reads.
    pub fn why(self) -> &'static str {
        match self {
            Unfinished::OutOfTime => "it ran out of time (cache.redis.sweep_deadline)",
            Unfinished::RedisFailed => "Redis failed or was too slow (cache.redis.timeout)",
            Unfinished::RedisDown => "Redis is down; the flush is made when it is back",
            Unfinished::StillQueued => "it is still waiting behind other writes",
            Unfinished::QueueFull => "the shared cache's write queue is full",
        }
    }
}

/// How far a walk got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Swept {
    /// Keys looked at.
    pub scanned: usize,
    /// Keys deleted (a flush) or entries found (`show`).
    pub matched: usize,
    /// `None`: every key was seen.
    pub unfinished: Option<Unfinished>,
}

impl Swept {
    pub fn not_begun(why: Unfinished) -> Swept {
        Swept {
            scanned: 0,
            matched: 0,
            unfinished: Some(why),
        }
    }
}

/// One walk over the keys that match a pattern.
struct Walk<'a> {
    cache: &'a SharedCache,
    conn: ConnectionManager,
    pattern: String,
    /// `None` once SCAN said it had given every key.
    cursor: Option<u64>,
    deadline: Instant,
    swept: Swept,
}

impl<'a> Walk<'a> {
    fn begin(cache: &'a SharedCache, pattern: String) -> Result<Walk<'a>, Unfinished> {
        let conn = cache
            .connection()
            .filter(|_| cache.is_up())
            .ok_or(Unfinished::RedisDown)?;
        Ok(Walk {
            cache,
            conn,
            pattern,
            cursor: Some(0),
            deadline: Instant::now() + cache.sweep_deadline,
            swept: Swept::not_begun(Unfinished::OutOfTime),
        })
    }

    /// The next batch of keys; `None` once every key was given.
    async fn next(&mut self) -> Result<Option<Vec<String>>, Unfinished> {
        let Some(cursor) = self.cursor else {
            return Ok(None);
        };
        if Instant::now() >= self.deadline {
            return Err(Unfinished::OutOfTime);
        }
        let mut conn = self.conn.clone();
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(BATCH);
        let step = async move { scan.query_async::<(u64, Vec<String>)>(&mut conn).await };
        let (next, keys) = self
            .cache
            .call("scan", step)
            .await
            .ok_or(Unfinished::RedisFailed)?;
        self.cursor = (next != 0).then_some(next);
        self.swept.scanned += keys.len();
        Ok(Some(keys))
    }

    /// What each key holds, in one round trip: an entry's JSON for `entry:` keys, a mark's
    /// for `tls:` keys, a relay's ledger for `ledger:` keys, nothing for others.
    async fn read(&mut self, keys: &[String]) -> Result<Vec<Option<String>>, Unfinished> {
        let (entry, tls, ledger) = (
            self.cache.kind_prefix("entry"),
            self.cache.kind_prefix("tls"),
            self.cache.kind_prefix("ledger"),
        );
        let mut pipe = redis::pipe();
        let asked: Vec<bool> = keys
            .iter()
            .map(|key| {
                if key.starts_with(&entry) {
                    pipe.hget(key, "entry");
                } else if key.starts_with(&tls) || key.starts_with(&ledger) {
                    pipe.get(key);
                } else {
                    return false;
                }
                true
            })
            .collect();
        let mut values = Vec::new().into_iter();
        if asked.contains(&true) {
            let mut conn = self.conn.clone();
            let read = async move { pipe.query_async::<Vec<Option<String>>>(&mut conn).await };
            values = self
                .cache
                .call("read", read)
                .await
                .ok_or(Unfinished::RedisFailed)?
                .into_iter();
        }
        Ok(asked
            .into_iter()
            .map(|asked| if asked { values.next().flatten() } else { None })
            .collect())
    }

    async fn delete(&mut self, keys: Vec<String>) -> Result<(), Unfinished> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let unlink = async move {
            redis::cmd("UNLINK")
                .arg(keys)
                .query_async::<usize>(&mut conn)
                .await
        };
        let deleted = self
            .cache
            .call("delete", unlink)
            .await
            .ok_or(Unfinished::RedisFailed)?;
        self.swept.matched += deleted;
        Ok(())
    }

    fn end(mut self, walked: Result<(), Unfinished>) -> Swept {
        self.swept.unfinished = walked.err();
        self.swept
    }
}

impl SharedCache {
    fn kind_prefix(&self, kind: &str) -> String {
        format!("{}{kind}:", self.prefix)
    }

    fn pattern(&self, kind: &str) -> String {
        format!("{}{kind}:*", glob_escape(&self.prefix))
    }

    /// Every entry Redis holds for a host or recipient domain (for `ctl cache show`), as
    /// far as the walk got.
    pub async fn find(&self, name: &str) -> (Vec<CacheEntry>, Swept) {
        let mut walk = match Walk::begin(self, self.pattern("entry")) {
            Ok(walk) => walk,
            Err(why) => return (Vec::new(), Swept::not_begun(why)),
        };
        let mut found = Vec::new();
        let walked = async {
            while let Some(keys) = walk.next().await? {
                for json in walk.read(&keys).await?.into_iter().flatten() {
                    if let Ok(entry) = serde_json::from_str::<CacheEntry>(&json)
                        && (entry.host == name || entry.domains.iter().any(|d| d == name))
                    {
                        found.push(entry);
                    }
                }
            }
            Ok(())
        }
        .await;
        let mut swept = walk.end(walked);
        swept.matched = found.len();
        (found, swept)
    }

    /// Every relay's ledger in Redis, by relay name, as far as the walk got.
    pub async fn ledgers(&self) -> (Vec<(String, String)>, Swept) {
        let mut walk = match Walk::begin(self, self.pattern("ledger")) {
            Ok(walk) => walk,
            Err(why) => return (Vec::new(), Swept::not_begun(why)),
        };
        let prefix = self.kind_prefix("ledger");
        let mut found = Vec::new();
        let walked = async {
            while let Some(keys) = walk.next().await? {
                let values = walk.read(&keys).await?;
                for (key, json) in keys.into_iter().zip(values) {
                    if let (Some(relay), Some(json)) = (key.strip_prefix(&prefix), json) {
                        found.push((relay.to_string(), json));
                    }
                }
            }
            Ok(())
        }
        .await;
        let mut swept = walk.end(walked);
        swept.matched = found.len();
        (found, swept)
    }

    /// Deletes what the shared cache holds for a host or recipient domain (`None`:
    /// everything of this fleet): entries, and the memory of TLS of the name's hosts, also
    /// where the entry itself has expired and only the mark still names the domain.
    pub(super) async fn walk_flush(&self, name: Option<&str>) -> Swept {
        let everything = format!("{}*", glob_escape(&self.prefix));
        let mut walk = match Walk::begin(self, everything) {
            Ok(walk) => walk,
            Err(why) => return Swept::not_begun(why),
        };
        let (entry, tls) = (self.kind_prefix("entry"), self.kind_prefix("tls"));
        // The relays' ledgers are no cache: a flush leaves them.
        let ledger = self.kind_prefix("ledger");
        let walked = async {
            while let Some(keys) = walk.next().await? {
                let Some(name) = name else {
                    let keys = keys.into_iter().filter(|k| !k.starts_with(&ledger));
                    walk.delete(keys.collect()).await?;
                    continue;
                };
                let values = walk.read(&keys).await?;
                let mut doomed = Vec::new();
                for (key, json) in keys.into_iter().zip(values) {
                    let Some(json) = json else { continue };
                    let named = if let Some(rest) = key.strip_prefix(&entry) {
                        let held = serde_json::from_str::<CacheEntry>(&json).ok();
                        let named = held
                            .is_some_and(|e| e.host == name || e.domains.iter().any(|d| d == name));
                        if named {
                            doomed.push(format!("{tls}{rest}"));
                        }
                        named
                    } else if let Some(rest) = key.strip_prefix(&tls) {
                        rest.split_once('|').is_some_and(|(host, _)| host == name)
                            || serde_json::from_str::<TlsMark>(&json)
                                .is_ok_and(|mark| mark.domains.iter().any(|d| d == name))
                    } else {
                        false
                    };
                    if named {
                        doomed.push(key);
                    }
                }
                walk.delete(doomed).await?;
            }
            Ok(())
        }
        .await;
        walk.end(walked)
    }
}
