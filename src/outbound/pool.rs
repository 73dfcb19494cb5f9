//! Remote connections kept open between transactions, so that the next message to the same
//! server under the same security conditions skips the connect, banner, EHLO and handshake.
//!
//! A connection is pooled only after a transaction the remote accepted, or one the MTA ended
//! before DATA (the remote then gets RSET before its next MAIL FROM). Never after an error,
//! a 421, or a reply out of step: [`crate::outbound::upstream::Upstream`] says whether its
//! connection may come back. Whether a pooled connection fits a message is asked of the one
//! decision, by delivery, for every message.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::net::connection::Connection;
use crate::outcome::TlsOutcome;
use crate::settings::duration;
use crate::smtp::Capabilities;

/// `delivery.pool:` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Keep remote connections for later messages at all.
    pub enabled: bool,
    /// How long a connection may wait unused before it is closed.
    #[serde(with = "duration")]
    pub idle: Duration,
    /// How long after it was opened a connection may still be taken for a new message.
    #[serde(with = "duration")]
    pub max_age: Duration,
    /// Messages (MAIL FROM accepted) on one connection before it is closed.
    pub max_messages: u32,
    /// Idle connections kept per server address and port.
    pub per_destination: usize,
    /// Idle connections kept in all.
    pub total: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: true,
            idle: Duration::from_secs(5),
            max_age: Duration::from_secs(300),
            max_messages: 100,
            per_destination: 8,
            total: 1000,
        }
    }
}

/// What must match before a connection is even considered: where it goes and who we said
/// we are. Its TLS state is judged per message by the decision.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    /// The MX host (or smarthost) name the connection was made for.
    pub name: String,
    /// Our EHLO name on it.
    pub ehlo: String,
}

/// A connection's history, carried from one transaction to the next.
#[derive(Clone, Copy, Debug)]
pub struct Lineage {
    pub opened: Instant,
    /// Transactions opened on it before this one.
    pub messages: u32,
    /// This transaction took a pooled connection.
    pub reused: bool,
}

impl Lineage {
    pub fn fresh() -> Lineage {
        Lineage {
            opened: Instant::now(),
            messages: 0,
            reused: false,
        }
    }
}

/// A connection waiting for its next message.
pub struct Idle {
    pub conn: Connection,
    pub caps: Capabilities,
    /// What its TLS is: the session it has, or why it is plain.
    pub tls: TlsOutcome,
    /// The last transaction was left open at the remote: RSET before MAIL FROM.
    pub needs_rset: bool,
    pub lineage: Lineage,
    since: Instant,
}

impl Idle {
    pub fn new(
        conn: Connection,
        caps: Capabilities,
        tls: TlsOutcome,
        needs_rset: bool,
        lineage: Lineage,
    ) -> Idle {
        Idle {
            conn,
            caps,
            tls,
            needs_rset,
            lineage,
            since: Instant::now(),
        }
    }
}

/// One row of `ctl pool`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PoolEntry {
    pub server: String,
    pub addr: String,
    pub tls: String,
    pub messages: u32,
    pub idle_ms: u64,
    pub age_ms: u64,
}

#[derive(Default)]
struct Held {
    by_key: HashMap<PoolKey, VecDeque<Idle>>,
    count: usize,
}

pub struct Pool {
    pub config: PoolConfig,
    held: Mutex<Held>,
    sweeper: std::sync::OnceLock<()>,
}

impl Pool {
    pub fn new(config: PoolConfig) -> Arc<Pool> {
        Arc::new(Pool {
            config,
            held: Mutex::new(Held::default()),
            sweeper: std::sync::OnceLock::new(),
        })
    }

    /// Whether a connection with this history may take another message.
    pub fn may_keep(&self, lineage: &Lineage) -> bool {
        self.config.enabled
            && lineage.messages + 1 < self.config.max_messages
            && lineage.opened.elapsed() < self.config.max_age
    }

    /// Keeps `idle` for a later message, or closes it when the pool is full.
    pub fn put(self: &Arc<Pool>, key: PoolKey, idle: Idle) {
        self.start_sweeper();
        let refused = {
            let Ok(mut held) = self.held.lock() else {
                return;
            };
            let full = held.count >= self.config.total;
            let list = held.by_key.entry(key).or_default();
            if full || list.len() >= self.config.per_destination {
                Some(idle)
            } else {
                list.push_back(idle);
                held.count += 1;
                None
            }
        };
        if let Some(idle) = refused {
            tokio::spawn(idle.conn.quit());
        }
    }

    /// The most recently used connection under `key` that `fits`; the ones past their
    /// limits are closed on the way.
    pub fn take(&self, key: &PoolKey, mut fits: impl FnMut(&Idle) -> bool) -> Option<Idle> {
        let mut expired = Vec::new();
        let taken = {
            let mut held = self.held.lock().ok()?;
            let held = &mut *held;
            let list = held.by_key.get_mut(key)?;
            let before = list.len();
            self.drop_expired(list, &mut expired);
            let taken = list
                .iter()
                .rposition(&mut fits)
                .and_then(|i| list.remove(i));
            // An emptied list stays for the connection's return (the sweep removes the
            // ones left empty): the next `put` neither hashes a new key in nor allocates.
            held.count -= before - list.len();
            taken
        };
        for idle in expired {
            tokio::spawn(idle.conn.quit());
        }
        taken
    }

    /// Closes every connection idle past its limits.
    fn sweep(&self) {
        let mut expired = Vec::new();
        if let Ok(mut held) = self.held.lock() {
            let held = &mut *held;
            for list in held.by_key.values_mut() {
                self.drop_expired(list, &mut expired);
            }
            held.by_key.retain(|_, list| !list.is_empty());
            held.count -= expired.len();
        }
        for idle in expired {
            tokio::spawn(idle.conn.quit());
        }
    }

    /// Moves the connections past the idle or age limit from `list` to `expired`.
    fn drop_expired(&self, list: &mut VecDeque<Idle>, expired: &mut Vec<Idle>) {
        let config = &self.config;
        let fresh = |idle: &Idle| {
            idle.since.elapsed() < config.idle && idle.lineage.opened.elapsed() < config.max_age
        };
        // The usual case, nothing to close: no list is built.
        if list.iter().all(fresh) {
            return;
        }
        let (kept, old): (VecDeque<Idle>, VecDeque<Idle>) = list.drain(..).partition(fresh);
        *list = kept;
        expired.extend(old);
    }

    /// Closes every pooled connection (at shutdown).
    pub fn close_all(&self) {
        let all: Vec<Idle> = match self.held.lock() {
            Ok(mut held) => {
                held.count = 0;
                held.by_key.drain().flat_map(|(_, list)| list).collect()
            }
            Err(_) => return,
        };
        for idle in all {
            tokio::spawn(idle.conn.quit());
        }
    }

    pub fn len(&self) -> usize {
        self.held.lock().map_or(0, |held| held.count)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What `ctl pool` shows.
    pub fn list(&self) -> Vec<PoolEntry> {
        let Ok(held) = self.held.lock() else {
            return Vec::new();
        };
        let mut entries: Vec<PoolEntry> = (held.by_key.iter())
            .flat_map(|(key, list)| {
                list.iter().map(move |idle| PoolEntry {
                    server: key.name.clone(),
                    addr: key.addr.to_string(),
                    tls: match &idle.tls {
                        TlsOutcome::Encrypted(session) => {
                            let class = idle.tls.class().map_or("tls", |c| c.name());
                            format!("{class} {}", session.version)
                        }
                        TlsOutcome::Legacy(session) => format!("tls-legacy {}", session.version),
                        TlsOutcome::Plain(_) => "plain".into(),
                    },
                    messages: idle.lineage.messages + 1,
                    idle_ms: idle.since.elapsed().as_millis() as u64,
                    age_ms: idle.lineage.opened.elapsed().as_millis() as u64,
                })
            })
            .collect();
        entries.sort_by(|a, b| (&a.server, &a.addr).cmp(&(&b.server, &b.addr)));
        entries
    }

    /// Once, from the first connection pooled (inside the runtime): closes idle connections
    /// as their limit passes, so a remote is not held open by nobody. Ends with the pool.
    fn start_sweeper(self: &Arc<Pool>) {
        self.sweeper.get_or_init(|| {
            let pool: Weak<Pool> = Arc::downgrade(self);
            let period = (self.config.idle / 2).max(Duration::from_millis(100));
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(period);
                loop {
                    ticks.tick().await;
                    match pool.upgrade() {
                        Some(pool) => pool.sweep(),
                        None => return,
                    }
                }
            });
        });
    }
}
