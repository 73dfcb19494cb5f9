//! Administration: the admin socket served by the daemon, its JSON-lines protocol, and the
//! `tlsrouter ctl` client.

pub mod client;
pub mod metrics;
pub mod protocol;
pub mod server;
