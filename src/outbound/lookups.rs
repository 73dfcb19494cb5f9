//! MX and address lookups that failed for a reason that may pass (a timeout, SERVFAIL),
//! kept for a short while: a domain whose MX answer or MX hosts do not resolve then costs
//! one lookup per name per minute, not one per message (hickory keeps answers and
//! denials, not failures).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::net::dns::{AddressError, RouteError};

/// How long a failed lookup is believed.
pub const FAILED_LOOKUP_TTL: Duration = Duration::from_secs(60);
/// At most so many hosts are kept; beyond, the expired ones go, then all.
const MAX_KEPT: usize = 10_000;

/// A lookup's error, of which only some may pass.
pub trait LookupError: Clone {
    fn may_pass(&self) -> bool;
}

impl LookupError for AddressError {
    fn may_pass(&self) -> bool {
        matches!(self, AddressError::Temporary(_))
    }
}

impl LookupError for RouteError {
    /// Not `DaneUnknown`: that is decided from a temporary failure, which is what is kept.
    fn may_pass(&self) -> bool {
        matches!(self, RouteError::DnsTemporary { .. })
    }
}

pub struct FailedLookups<E> {
    failed: Mutex<HashMap<String, (Instant, E)>>,
}

impl<E> Default for FailedLookups<E> {
    fn default() -> Self {
        FailedLookups {
            failed: Mutex::new(HashMap::new()),
        }
    }
}

impl<E: LookupError> FailedLookups<E> {
    /// The failure of the lookup of `name` while it is believed; else what `lookup` finds,
    /// its failure kept when it may pass.
    pub async fn ask<T>(
        &self,
        name: &str,
        lookup: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let now = Instant::now();
        if let Some(failed) = self.get(name, now) {
            return Err(failed);
        }
        let found = lookup.await;
        if let Err(error) = &found {
            self.remember(name, error, now);
        }
        found
    }

    /// The failure of the lookup of `name`, while it is believed.
    pub fn get(&self, name: &str, now: Instant) -> Option<E> {
        let failed = self.failed.lock().ok()?;
        let (at, error) = failed.get(name)?;
        (now.duration_since(*at) < FAILED_LOOKUP_TTL).then(|| error.clone())
    }

    /// Keeps a failure that may pass; answers and denials are the resolver's to keep.
    pub fn remember(&self, name: &str, error: &E, now: Instant) {
        if !error.may_pass() {
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
        failed.insert(name.to_string(), (now, error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_that_may_pass_is_believed_for_a_minute_and_a_denial_not_at_all() {
        let lookups = FailedLookups::<AddressError>::default();
        let now = Instant::now();
        let failed = AddressError::Temporary("SERVFAIL".into());
        lookups.remember("mx.example", &failed, now);
        lookups.remember("gone.example", &AddressError::NotFound, now);
        assert_eq!(lookups.get("mx.example", now), Some(failed));
        assert_eq!(lookups.get("mx.example", now + FAILED_LOOKUP_TTL), None);
        assert_eq!(lookups.get("gone.example", now), None);

        let mx = FailedLookups::<RouteError>::default();
        let failed = RouteError::DnsTemporary {
            domain: "example".into(),
            detail: "SERVFAIL".into(),
        };
        mx.remember("example", &failed, now);
        mx.remember(
            "gone.example",
            &RouteError::DomainNotFound("gone.example".into()),
            now,
        );
        assert_eq!(mx.get("example", now), Some(failed));
        assert_eq!(mx.get("gone.example", now), None);
    }
}
