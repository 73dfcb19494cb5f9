//! Listening to the fleet and watching Redis: pins and flushes announced on the channel,
//! and what is written again and read afresh when Redis is back.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::cache::entry::CacheKey;
use crate::cache::shared::queue::Write;
use crate::cache::shared::{NearCache, RETRY, SharedCache};

/// The announcement of a pin or flush on the channel.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Invalidation {
    relay: String,
    #[serde(flatten)]
    what: What,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(super) enum What {
    Flush { name: Option<String> },
    Pin { keys: Vec<(String, IpAddr)> },
}

impl SharedCache {
    pub(super) async fn publish(&self, what: What) -> bool {
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
    pub(super) async fn subscribe(self: Arc<Self>, cache: Arc<dyn NearCache>) {
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
                tracing::info!(
                    event = "fleet.listening",
                    "shared cache: listening for pins and flushes"
                );
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    if let Ok(invalidation) = serde_json::from_str::<Invalidation>(&payload) {
                        self.invalidated(cache.as_ref(), invalidation).await;
                    }
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn invalidated(&self, cache: &dyn NearCache, invalidation: Invalidation) {
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
                    event = "fleet.flush_taken",
                    relay = %invalidation.relay,
                    name = name.as_deref().unwrap_or("*"),
                    dropped = flushed,
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
                    event = "fleet.pin_taken",
                    relay = %invalidation.relay,
                    "shared cache: relay {} pinned an entry; taken in here",
                    invalidation.relay
                );
            }
        }
    }

    /// While Redis is down, tries it every second; when it is back, writes what was kept
    /// and drops the near copies, which may have missed pins and flushes.
    pub(super) async fn watch_health(self: Arc<Self>, cache: Arc<dyn NearCache>) {
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
                event = "fleet.back",
                entries = dirty.len(),
                pending = pending.len(),
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
