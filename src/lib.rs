//! tlsrouter: an opportunistic-TLS routing proxy for outbound SMTP.
//!
//! It stands between an MTA and the Internet. For each message it reads the remote MX's
//! EHLO, tries STARTTLS, classifies what went wrong when TLS fails, and delivers encrypted or
//! in plain as the rules say, relaying the remote's own replies (cut-through, no queue).
//!
//! The modules, in the order a message passes them:
//! - [`inbound`]: the listener and the ESMTP server session toward the MTA.
//! - [`smtp`]: the wire protocol both sides share: commands, replies, lines, the DATA filter.
//! - [`router`]: turns a recipient into a [`router::Plan`] (the rules that may decide), and
//!   holds the one host decision ([`router::decision::decide`]) and `explain`.
//! - [`rules`]: the YAML rule list and its TLS vocabulary, validated and indexed.
//! - [`outbound`]: delivery attempts, the pool, and the remote dialogue of an open
//!   transaction ([`outbound::upstream::Upstream`]).
//! - [`net`]: DNS, client connections, TLS handshakes (rustls, DANE, OpenSSL), HTTPS.
//! - [`outcome`]: the TLS outcome taxonomy that logs and decisions speak, with its table.
//! - [`certificate`]: what a server's certificate says (subject, names, validity).
//! - [`policy`]: what recipient domains publish (MTA-STS) and what we report (TLS-RPT).
//! - [`cache`]: what the last attempts to each MX found, with expiry and persistence.
//! - [`ledger`]: per recipient domain, what became of its messages over the last week.
//! - [`config`]: the daemon's configuration, with defaults embedded, assembled from the
//!   sections of the modules it configures; [`settings`]: what those sections share.
//! - [`probe`]: step-by-step diagnosis of a remote MX.
//! - [`stats`]: counters for `ctl stats` and Prometheus.
//! - [`sessions`]: the sessions open now, and the shutdown signal that drains them.
//! - [`server_tls`]: STARTTLS toward the MTA: the certificate offered, reloaded, and the stream.
//! - [`proxy`]: the assembled parts shared by every session.
//! - [`admin`]: the admin socket, the metrics endpoint and `tlsrouter ctl`.

// No unsafe code, but on Windows in the one module that gives the admin pipe its access
// control list (FFI, see admin::named_pipe).
#![cfg_attr(not(windows), forbid(unsafe_code))]
#![cfg_attr(windows, deny(unsafe_code))]

pub mod admin;
pub mod cache;
pub mod certificate;
pub mod config;
pub mod inbound;
pub mod ledger;
pub mod net;
pub mod outbound;
pub mod outcome;
pub mod policy;
pub mod probe;
pub mod proxy;
pub mod router;
pub mod rules;
pub mod server_tls;
pub mod sessions;
pub mod settings;
pub mod smtp;
pub mod stats;

pub use proxy::Proxy;
