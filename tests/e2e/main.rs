//! End to end, in one test binary: a real SMTP client (the MTA) talks to the real proxy,
//! in-process or as the `tlsrouter` daemon, which resolves MX records from a real DNS server
//! on loopback and delivers to real SMTP servers with real TLS. Every lab is built with
//! `support::lab::Lab`; every remote is a `support::smtp_server::SmtpServer`.
//!
//! One module per topic.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod cache;
mod cached_cost;
mod console;
mod dane;
mod dead_hosts;
mod delivery;
mod dialing;
mod doc_sessions;
mod downgrade;
mod explain;
mod fleet;
mod hardening;
mod idna;
mod kit;
mod ledger;
mod legacy_tls;
mod lifecycle;
mod mta_starttls;
mod mta_sts;
mod operator;
mod pool;
mod postfix;
mod recipient_domains;
mod requiretls;
mod rules;
mod systemd;
mod tls_outcomes;
mod tls_required_no;
mod transparent;
mod windows;
