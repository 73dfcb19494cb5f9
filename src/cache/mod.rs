//! The TLS outcome cache: what happened the last time we tried to encrypt to each MX.
//!
//! Entries are keyed by MX host name and address and carry the recipient domains seen for
//! them. A failure entry lets the next message skip a doomed handshake; a success leaves
//! `last_tls_at` behind so that a later "no STARTTLS" can be recognised as a downgrade.
//!
//! Expiry is decided by our own timestamps (`expires_at`, read from a [`Clock`] that tests
//! can drive), not by moka, whose clock cannot be moved by a test. moka only bounds the
//! number of entries, least recently used first.
//!
//! An entry whose class has expired is invisible ([`OutcomeCache::get`] says `None`), but
//! while its `last_tls_at` is younger than the success TTL it is retained: a failure's
//! short TTL must not erase the memory that the host did TLS, or downgrades would go unseen
//! an hour after the first one. Only [`OutcomeCache::is_downgrade`] and persistence see it.
//!
//! With `cache.backend: redis` this cache is the near cache of a fleet's shared one
//! ([`shared`]): lookups read Redis when the near copy is older than `cache.redis.near_ttl`,
//! and observations, pins and flushes are written there in the background.

pub mod clock;
pub mod config;
pub mod entry;
pub mod persistence;
pub mod shared;
pub mod store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Backend, CacheConfig, TtlConfig};
pub use entry::{
    CacheEntry, CacheKey, MAX_DOMAINS, Observation, Observer, TlsMemory, is_downgrade,
};
pub use store::{CacheError, Flushed, OutcomeCache};

#[cfg(test)]
mod tests;
