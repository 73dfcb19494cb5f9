//! Test support: real servers on loopback (DNS, SMTP with TLS), certificates made at test
//! time, an SMTP client, the proxy itself (in-process or as the daemon binary), and log
//! capture. Everything binds 127.0.0.0/8 on port 0 unless a test asks for a port, and waits
//! on events, never on sleeps.
//!
//! Each integration test includes it with `mod support;` and uses only some of it.
#![allow(dead_code)]

pub mod daemon;
pub mod dns;
pub mod fault_server;
pub mod logs;
pub mod pki;
pub mod proxy;
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
