//! The side toward the MTA: accepting connections and running each SMTP session.

pub mod listener;
pub mod session;
