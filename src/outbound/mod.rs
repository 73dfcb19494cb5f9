//! The side toward the Internet: MX resolution, SMTP client connections, TLS with a
//! classifying verifier, and the delivery attempts a plan asks for.

pub mod connection;
pub mod credentials;
pub mod delivery;
pub mod mx;
pub mod tls;
