//! The side toward the Internet: MX resolution, SMTP client connections, TLS with a
//! classifying verifier, the delivery attempts a plan asks for, and the remote dialogue of a
//! transaction once it is open.

pub mod connection;
pub mod credentials;
pub mod delivery;
pub mod mx;
pub mod tls;
pub mod upstream;
