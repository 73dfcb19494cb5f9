//! The side toward the Internet, above [`crate::net`]: the delivery attempts a plan asks
//! for (what the one decision says, carried out and recorded), the connection pool, the
//! credentials for smart hosts, and the remote dialogue of a transaction once it is open.

pub mod attempt;
pub mod credentials;
pub mod delivery;
pub mod hop;
pub mod pool;
pub mod route;
pub mod upstream;
