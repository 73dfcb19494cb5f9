//! The test kit: real servers on loopback (DNS, SMTP with TLS), certificates made at test
//! time, an SMTP client, and the proxy itself, in-process or as the daemon binary, started
//! through one lab builder. Everything binds 127.0.0.0/8 on port 0 unless a test asks for
//! a port, and waits on events, never on sleeps.
//!
//! - `lab`: the lab builder (`Lab::new().zone(..).rules(..).admin().start()`), and `ctl`.
//! - `settings`: the one configuration builder, YAML for both the proxy and the daemon.
//! - `smtp_server`: the one scriptable SMTP server, with presets and per-step actions.
//! - `smtp_client`: the MTA side.
//! - `dns`, `pki`: the DNS server and the certificates.
//! - `daemon`: the `tlsrouter` binary as a child process; `logs`: log capture in process.
//! - `redis`: a real `redis-server` on a free port, for the fleet's shared cache.
//! - `proxy`: older entry points (`test_config`, `start_proxy`), thin wrappers over `settings`.
//!
//! The end-to-end tests (`tests/e2e/`) are one test binary that includes this module.
#![allow(dead_code)]

pub mod daemon;
pub mod dns;
pub mod lab;
pub mod logs;
pub mod pki;
pub mod proxy;
pub mod redis;
pub mod settings;
pub mod smtp_client;
pub mod smtp_server;

/// Sends `tracing` output to the test harness (shown for failing tests). `RUST_LOG` picks
/// the level, default info. Later calls, from other tests in the same binary, do nothing.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Err only when a subscriber is already set, which is what we want anyway.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
