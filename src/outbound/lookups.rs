//! Address lookups that failed for a reason that may pass (a timeout, SERVFAIL), kept for a
//! short while: a domain whose MX hosts do not resolve then costs one lookup per host per
//! minute, not one per message (hickory keeps answers and denials, not failures).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::net::dns::AddressError;

/// How long a failed lookup is believed.
pub const FAILED_LOOKUP_TTL: Duration = Duration::from_secs(60);
/// At most so many hosts are kept; beyond, the expired ones go, then all.
const MAX_KEPT: usize = 10_000;

#[derive(Default)]
pub struct FailedLookups {
    failed: Mutex<HashMap<String, (Instant, AddressError)>>,
}

impl FailedLookups {
    /// The failure of `host`'s lookup, while it is believed.
    pub fn get(&self, host: &str, now: Instant) -> Option<AddressError> {
        let failed = self.failed.lock().ok()?;
        let (at, error) = failed.get(host)?;
        (now.duration_since(*at) < FAILED_LOOKUP_TTL).then(|| error.clone())
    }

    /// Keeps a failure that may pass; answers and denials are the resolver's to keep.
    pub fn remember(&self, host: &str, error: &AddressError, now: Instant) {
        if !matches!(error, AddressError::Temporary(_)) {
            return;
        }
        let Ok(mut failed) = self.failed.lock() else {
            return;
        };
        if failed.len() >= MAX_KEPT {
            failed.retain(|_, (at, _)| now.duration_since(*at) < FAILED_LOOKUP_TTL);
            if failed.len() >= MAX_KEPT {
                failed.clear();
            }
        }
        failed.insert(host.to_string(), (now, error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_that_may_pass_is_believed_for_a_minute_and_a_denial_not_at_all() {
        let lookups = FailedLookups::default();
        let now = Instant::now();
        let failed = AddressError::Temporary("SERVFAIL".into());
        lookups.remember("mx.example", &failed, now);
        lookups.remember("gone.example", &AddressError::NotFound, now);
        assert_eq!(lookups.get("mx.example", now), Some(failed));
        assert_eq!(lookups.get("mx.example", now + FAILED_LOOKUP_TTL), None);
        assert_eq!(lookups.get("gone.example", now), None);
    }
}
