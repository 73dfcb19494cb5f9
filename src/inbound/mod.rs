//! The side toward the MTA: accepting connections (smart-host and transparent listeners)
//! and running each SMTP session.

pub mod listener;
pub mod reader;
pub mod session;
pub mod transparent;
