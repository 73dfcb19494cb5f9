//! The writer task: drains the queue one bounded write at a time, and keeps what Redis did
//! not take for when it is back.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use tokio::sync::{mpsc, oneshot};

use crate::cache::clock::{Clock, SystemClock};
use crate::cache::entry::CacheEntry;
use crate::cache::shared::check::kind_of;
use crate::cache::shared::health::What;
use crate::cache::shared::queue::Write;
use crate::cache::shared::{
    PENDING, QUEUE, SharedCache, Swept, TlsMark, Unfinished, source_identity,
};

impl SharedCache {
    /// Drains the write queue, one write at a time, each bounded by the timeout.
    pub(super) async fn write_queued(self: Arc<Self>, mut queued: mpsc::Receiver<Write>) {
        while let Some(mut write) = queued.recv().await {
            if !self.is_up() {
                self.keep_for_later(write);
                continue;
            }
            let done = match &mut write {
                Write::Record(entry) => self.write_entry(entry, false).await,
                Write::Pin(entries) => self.write_pins(entries).await,
                Write::Flush { name, reply } => {
                    self.write_flush(name.as_deref(), reply.take()).await
                }
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

    fn keep_for_later(&self, mut write: Write) {
        if let Write::Flush { reply, .. } = &mut write
            && let Some(reply) = reply.take()
        {
            let _ = reply.send(Swept::not_begun(Unfinished::RedisDown));
        }
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
            event = "fleet.wrote",
            kind = "entry",
            name = %format!("{}[{}]", entry.host, entry.addr),
            class = %entry.class,
            status = %status,
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
                event = "split_source_downgrade",
                server = %format!("{}[{}]", entry.host, entry.addr),
                did_tls = %self.me,
                failed = %other,
                class = %held.class,
                "split-source downgrade: {} did TLS with this host, {other} gets {} ({}); the \
                 shared entry keeps that failure for its source address",
                self.me,
                held.class,
                held.detail
            );
        }
        true
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
            tracing::debug!(
                event = "fleet.wrote",
                kind,
                name,
                "shared cache: wrote {kind} {name}"
            );
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

    /// Flushes a name (or everything) from the shared cache and tells the fleet; false
    /// when Redis was down, so that it is made when Redis is back. A flush that began and
    /// could not finish is said, and not made again on its own: the operator runs it again.
    async fn write_flush(&self, name: Option<&str>, reply: Option<oneshot::Sender<Swept>>) -> bool {
        let swept = self.walk_flush(name).await;
        if let Some(reply) = reply {
            let _ = reply.send(swept);
        }
        let what = name.unwrap_or("everything");
        match swept.unfinished {
            Some(Unfinished::RedisDown) => return false,
            None => tracing::debug!(
                event = "fleet.flushed",
                name = what,
                deleted = swept.matched,
                scanned = swept.scanned,
                "shared cache: flushed {what}: {} keys deleted of {} looked at",
                swept.matched,
                swept.scanned
            ),
            Some(why) => tracing::warn!(
                event = "fleet.flush_unfinished",
                name = what,
                deleted = swept.matched,
                scanned = swept.scanned,
                why = ?why,
                "shared cache: the flush of {what} did not finish: {}; {} keys deleted of \
                 {} looked at. Run `tlsrouter ctl cache flush` again",
                why.why(),
                swept.matched,
                swept.scanned
            ),
        }
        // Even a partial flush is announced: every relay forgets its near copies.
        let name = name.map(str::to_string);
        self.publish(What::Flush { name }).await;
        true
    }
}
