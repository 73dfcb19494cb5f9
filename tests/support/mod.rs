//! The test kit: real servers on loopback (DNS, SMTP with TLS), certificates made at test
//! time, an SMTP client, and the proxy itself, in-process or as the daemon binary, started
//! through one lab builder. Everything binds 127.0.0.0/8 on port 0 unless a test asks for
//! a port, and waits on events, never on sleeps.
//!
//! - `lab`: the lab builder (`Lab::new().zone(..).rules(..).admin().start()`), and `ctl`.
//! - `settings`: the one configuration builder, YAML for both the proxy and the daemon.
//! - `smtp_server`: the one scriptable SMTP server, with presets and per-step actions.
//! - `smtp_client`: the MTA side; `mta`: one message through the proxy and the assertions
//!   on what the MTA was told; `mx`: receiving servers and the one-MX lab.
//! - `dns`, `pki`: the DNS server and the certificates; `dnssec`: a signed DNS tree for DANE.
//! - `https`: a real HTTPS server (MTA-STS policies, TLS-RPT reports).
//! - `daemon`: the `tlsrouter` binary as a child process; `logs`: log capture in process;
//!   `events`: assertions on log events by their fields.
//! - `postfix`: a real Postfix instance of the test's own, and waiting on its queue.
//! - `netns`: a network namespace with a veth pair, for the transparent-mode tests.
//! - `metrics`: scraping the Prometheus endpoint.
//! - `browser`: headless Chromium through chromedriver (WebDriver), for the web console;
//!   and one raw HTTP request, for what a browser would not send.
//! - `documents`: the README, docs/ and the examples' READMEs, and their fenced blocks.
//! - `redis`: a real `redis-server` on a free port, for the fleet's shared cache.
//! - `reports`: reading the TLS-RPT reports sent (gzip JSON, a mailed attachment).
//! - `partners`: recipient domains of every kind (TLS, plain, an expired certificate,
//!   deferred, refused), for the ledger and the console.
//! - `sts`: a recipient domain that publishes an MTA-STS enforce policy, for a lab.
//! - `wine`: the Windows build under Wine (`.ci/windows` builds it and prepares the prefix).
//! - `proxy`: older entry points (`test_config`, `start_proxy`), thin wrappers over `settings`.
//!
//! The end-to-end tests (`tests/e2e/`) are one test binary that includes this module.
#![allow(dead_code)]

pub mod browser;
pub mod daemon;
pub mod dns;
pub mod dnssec;
pub mod documents;
pub mod events;
pub mod https;
pub mod lab;
pub mod logs;
pub mod metrics;
pub mod mta;
pub mod mx;
pub mod netns;
pub mod partners;
pub mod pki;
pub mod postfix;
pub mod proxy;
pub mod redis;
pub mod reports;
pub mod settings;
pub mod smtp_client;
pub mod smtp_server;
pub mod sts;
pub mod wine;

/// Sends `tracing` output to the test harness (shown for failing tests). `RUST_LOG` picks
/// the level, default info. Later calls, from other tests in the same binary, do nothing.
pub fn init_tracing() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // tracing caches per call site whether anyone listens. The tests that capture the SMTP
    // dialogue listen at debug on their own thread only; a global layer that listens at
    // debug too (and discards) keeps those call sites enabled whichever test came first.
    let keep_debug_sites = tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(tracing_subscriber::EnvFilter::new("tlsrouter=debug"));
    // Err only when a subscriber is already set, which is what we want anyway.
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(filter),
        )
        .with(keep_debug_sites)
        .try_init();
}
