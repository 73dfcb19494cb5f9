//! Test support: real servers on loopback (DNS, SMTP with TLS), certificates made at test
//! time, an SMTP client, the proxy itself, and log capture.
#![allow(dead_code)]

pub mod dns;
pub mod logs;
pub mod pki;
pub mod proxy;
pub mod smtp_client;
pub mod smtp_server;
