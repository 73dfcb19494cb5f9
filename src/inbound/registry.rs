//! The sessions open now, for `tlsrouter ctl sessions`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: u64,
    pub client: SocketAddr,
    /// `greeted`, `ready`, `mail`, `data`.
    pub state: String,
    /// The remote of the transaction in progress, if any.
    pub next_hop: Option<String>,
    /// Unix seconds.
    pub started: u64,
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, SessionInfo>>,
}

/// Removes its session from the registry when dropped.
pub struct Entry {
    id: u64,
    registry: Arc<Registry>,
}

impl Registry {
    pub fn open(self: &Arc<Self>, client: SocketAddr) -> Entry {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let info = SessionInfo {
            id,
            client,
            state: "greeted".into(),
            next_hop: None,
            started,
        };
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, info);
        }
        Entry {
            id,
            registry: self.clone(),
        }
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        self.open
            .lock()
            .map(|open| open.values().cloned().collect())
            .unwrap_or_default()
    }
}

impl Entry {
    pub fn update(&self, state: &str, next_hop: Option<String>) {
        if let Ok(mut open) = self.registry.open.lock()
            && let Some(info) = open.get_mut(&self.id)
        {
            info.state = state.to_string();
            info.next_hop = next_hop;
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Ok(mut open) = self.registry.open.lock() {
            open.remove(&self.id);
        }
    }
}
