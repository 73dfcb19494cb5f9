//! What a recipient domain publishes about its mail's security, and what we report back:
//! MTA-STS policies (RFC 8461) and TLS-RPT reports (RFC 8460). The host decision applies the
//! policies; this module finds, keeps and counts.

pub mod mta_sts;
pub mod tlsrpt;
