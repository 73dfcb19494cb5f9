//! The MTA sessions open now (for `tlsrouter ctl sessions`), and the shutdown signal that
//! drains them. Shared by the listener, the sessions and the admin socket.

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
    pub state: SessionState,
    /// The remote of the transaction in progress, if any.
    pub next_hop: Option<String>,
    /// Where a transparent listener's connection was going, known from accept on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_destination: Option<SocketAddr>,
    /// Unix seconds.
    pub started: u64,
}

/// Where a session stands, as `ctl sessions` shows it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Connected, no EHLO yet.
    Greeted,
    /// Between transactions.
    Ready,
    /// In a transaction, before DATA.
    Mail,
    /// Relaying the message text.
    Data,
    /// The text is complete: waiting for the remote's verdict on it. Ending the session
    /// now could make the MTA send a message the remote took again.
    Verdict,
}

impl SessionState {
    pub fn name(self) -> &'static str {
        match self {
            SessionState::Greeted => "greeted",
            SessionState::Ready => "ready",
            SessionState::Mail => "mail",
            SessionState::Data => "data",
            SessionState::Verdict => "verdict",
        }
    }
}

/// Where a shutdown stands; sessions watch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    Running,
    /// No new connections; sessions finish their transaction, then get 421 4.3.2.
    Draining,
    /// The drain time is over: every session gets 421 4.3.2 now.
    Forced,
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
            state: SessionState::Greeted,
            next_hop: None,
            original_destination: None,
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

    /// How many sessions stand at `state`.
    pub fn count(&self, state: SessionState) -> usize {
        (self.open.lock()).map_or(0, |open| open.values().filter(|s| s.state == state).count())
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        self.open
            .lock()
            .map(|open| open.values().cloned().collect())
            .unwrap_or_default()
    }
}

impl Entry {
    pub fn set_original_destination(&self, destination: SocketAddr) {
        if let Ok(mut open) = self.registry.open.lock()
            && let Some(info) = open.get_mut(&self.id)
        {
            info.original_destination = Some(destination);
        }
    }

    /// A new state, at the same next hop.
    pub fn set_state(&self, state: SessionState) {
        if let Ok(mut open) = self.registry.open.lock()
            && let Some(info) = open.get_mut(&self.id)
        {
            info.state = state;
        }
    }

    pub fn update(&self, state: SessionState, next_hop: Option<String>) {
        if let Ok(mut open) = self.registry.open.lock()
            && let Some(info) = open.get_mut(&self.id)
        {
            info.state = state;
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
