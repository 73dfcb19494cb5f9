//! `cache:` in the configuration: where outcomes are kept, for how long, and the fleet's
//! Redis.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::outcome::{OutcomeClass, Ttl};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Where the cache is saved on shutdown and periodically; `None` keeps it in memory only.
    pub file: Option<PathBuf>,
    #[serde(with = "crate::settings::duration")]
    pub save_interval: Duration,
    /// The most entries kept; the least recently used go first.
    pub max_entries: u64,
    pub ttl: TtlConfig,
    /// This relay's memory only, or a fleet's shared cache in Redis.
    pub backend: Backend,
    /// `cache.redis`: where the shared cache is, used with `backend: redis`.
    pub redis: RedisConfig,
}

/// Where outcomes are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process only (the default; needs nothing else).
    #[default]
    Memory,
    /// Shared by every relay of a fleet through Redis, with this process's cache in front.
    Redis,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            file: None,
            save_interval: Duration::from_secs(5 * 60),
            max_entries: 100_000,
            ttl: TtlConfig::default(),
            backend: Backend::Memory,
            redis: RedisConfig::default(),
        }
    }
}

/// How long an outcome is believed, by kind.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtlConfig {
    /// `tls-verified` and `tls-unverified`; also how long a downgrade is watched for.
    #[serde(with = "crate::settings::duration")]
    pub success: Duration,
    /// Every other TLS class: worth retrying after a while, the remote may be fixed.
    #[serde(with = "crate::settings::duration")]
    pub tls_failure: Duration,
    /// `connect-failed` and `timeout`: not TLS facts, so kept only briefly.
    #[serde(with = "crate::settings::duration")]
    pub unreachable: Duration,
    /// The longest an operator's pin (`ctl cache pin --ttl`) may last; a pin read from the
    /// fleet that lasts longer is not believed.
    #[serde(with = "crate::settings::duration")]
    pub pin_max: Duration,
}

impl Default for TtlConfig {
    fn default() -> Self {
        TtlConfig {
            success: Duration::from_secs(7 * 86_400),
            tls_failure: Duration::from_secs(3600),
            unreachable: Duration::from_secs(5 * 60),
            pin_max: Duration::from_secs(30 * 86_400),
        }
    }
}

impl TtlConfig {
    pub fn for_class(&self, class: OutcomeClass) -> Duration {
        match class.meaning().ttl {
            Ttl::Success => self.success,
            Ttl::TlsFailure => self.tls_failure,
            Ttl::Unreachable => self.unreachable,
        }
    }
}

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
    /// The longest a walk over the whole shared cache (a flush, `ctl cache show`) may take;
    /// one that could not finish says how far it got.
    #[serde(with = "crate::settings::duration")]
    pub sweep_deadline: Duration,
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
            sweep_deadline: Duration::from_secs(30),
        }
    }
}
