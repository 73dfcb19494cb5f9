//! `tlsrouter probe`: what an MX says and does, step by step, for an admin whose mail to
//! one partner is stuck. It dials through delivery's dialer (source address, socket mark)
//! and takes the same secure step (`PlainConnection::starttls`, PKIX or the legacy stack),
//! and says what the host decision makes of what it found.

pub mod render;
pub mod report;
pub mod run;

pub use render::render;
pub use report::ProbeReport;
pub use run::{ProbeTarget, probe};
