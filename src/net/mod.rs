//! The network below the decisions: DNS (MX, addresses, TLSA and TXT answers, validated with
//! DNSSEC when DANE is on), TCP connections from the configured source address and with the
//! socket mark, one SMTP client connection and its reply discipline, the TLS handshakes
//! (rustls with a classifying verifier, DANE, and with the `legacy-tls` feature OpenSSL),
//! and the HTTPS client the policies are fetched with. Nothing here decides anything.

pub mod connection;
pub mod dane;
pub mod dialer;
pub mod dns;
pub mod dnssec_check;
pub mod https;
#[cfg(feature = "legacy-tls")]
pub mod legacy;
pub mod lookup_error;
pub mod socket_mark;
pub mod tls;
pub mod transport;
