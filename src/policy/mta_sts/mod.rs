//! MTA-STS (RFC 8461): discovery through `_mta-sts.<domain>` TXT, the policy fetched from
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt`, strict parsing, and a policy store
//! that never makes a message wait longer than a short bound.
//!
//! The store follows RFC 8461 section 5.1: a cached policy is used while its TXT id is
//! unchanged; a new id, or none cached, starts a fetch; a vanished TXT record or a failed
//! fetch leaves a valid cached policy in force; failed fetches are retried at most every
//! `retry_after_failure`. A policy is refetched once half its `max_age` has passed, so it
//! is renewed long before it expires.

pub mod config;
pub mod fetch;
pub mod lookup;
pub mod persistence;
pub mod policy;
pub mod store;

pub use config::MtaStsConfig;
pub use lookup::{PolicyError, PolicyErrorKind, PolicyLookup};
pub use persistence::policy_file;
pub use policy::{
    MAX_AGE_LIMIT, Mode, MxPattern, PolicyText, StsPolicy, checked_policy, parse_policy,
    parse_txt_records,
};
pub use store::PolicyStore;
