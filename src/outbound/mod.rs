//! The side toward the Internet: MX resolution, SMTP client connections, TLS with a
//! classifying verifier (and, with the `legacy-tls` feature, OpenSSL for servers rustls
//! cannot talk to), DANE certificate checks, the delivery attempts a plan asks for, and the
//! remote dialogue of a transaction once it is open.

pub mod connection;
pub mod credentials;
pub mod dane;
pub mod delivery;
#[cfg(feature = "legacy-tls")]
pub mod legacy;
pub mod mx;
pub mod pool;
pub mod socket_mark;
pub mod tls;
pub mod upstream;
