//! What a relay believes of what it reads from the fleet, and how it merges it with its own:
//! the checks, the merge rules, and the memory of TLS a relay shares.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cache::config::TtlConfig;
use crate::cache::entry::{CacheEntry, CacheKey, Observer};
use crate::outcome::OutcomeClass;

/// The last TLS a relay of the fleet did with a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsMark {
    pub at: u64,
    pub by: Observer,
    /// The recipient domains seen for the host, so that flushing a domain forgets the mark
    /// even once the host's entry has expired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
}

/// What Redis holds under `entry:HOST|ADDR`, as read back: the entry's JSON and the fields
/// the write script set beside it.
#[derive(Clone, Copy, Debug)]
pub struct Stored<'a> {
    pub json: &'a str,
    /// `success`, `failure`, `unreachable` or `pin`.
    pub kind: Option<&'a str>,
    /// `1` for a pin.
    pub pinned: Option<&'a str>,
}

/// What an entry read from the fleet is checked against: this relay's TTLs and how far
/// another relay's clock may run ahead.
#[derive(Clone, Debug)]
pub struct Limits {
    pub ttl: TtlConfig,
    pub clock_skew: Duration,
}

/// Why something read from the fleet is not believed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Forged {
    #[error("it does not parse ({0})")]
    Malformed(String),
    #[error("it is for {found}, not for the key it is under")]
    WrongKey { found: String },
    #[error(
        "its {field} is {ahead}s ahead of this relay's clock, more than cache.redis.clock_skew \
         ({skew}s) allows"
    )]
    Future {
        field: &'static str,
        ahead: u64,
        skew: u64,
    },
    #[error("it says pinned, but was not written as a pin (ctl cache pin)")]
    PinNotWritten,
    #[error("its pin lasts {lasts}s, longer than cache.ttl.pin_max ({max}s)")]
    PinTooLong { lasts: u64, max: u64 },
    /// What the policy layer found wrong with a shared MTA-STS policy, in its words (the
    /// cache sits below the policies and cannot name their types).
    #[error("the MTA-STS policy {0}")]
    Policy(String),
}

impl Forged {
    /// Its name, for the log line's `forged` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Forged::Malformed(_) => "malformed",
            Forged::WrongKey { .. } => "wrong-key",
            Forged::Future { .. } => "future",
            Forged::PinNotWritten => "pin-not-written",
            Forged::PinTooLong { .. } => "pin-too-long",
            Forged::Policy(_) => "policy",
        }
    }
}

/// A time read from the fleet, which may be only a little ahead of ours.
pub(super) fn not_ahead(
    field: &'static str,
    at: u64,
    now: u64,
    skew: Duration,
) -> Result<(), Forged> {
    let ahead = at.saturating_sub(now);
    if ahead > skew.as_secs() {
        return Err(Forged::Future {
            field,
            ahead,
            skew: skew.as_secs(),
        });
    }
    Ok(())
}

/// An entry read from the fleet, checked as this relay would check what it saw itself:
/// its times no later than now plus the clock skew, a pin only as `ctl cache pin` writes
/// one (and no longer than `cache.ttl.pin_max`), and an observation believed no longer
/// than this relay's TTL for its class.
pub fn checked(
    stored: &Stored<'_>,
    key: &CacheKey,
    now: u64,
    limits: &Limits,
) -> Result<CacheEntry, Forged> {
    let mut entry: CacheEntry =
        serde_json::from_str(stored.json).map_err(|e| Forged::Malformed(e.to_string()))?;
    entry = entry.normalized();
    if entry.key() != *key {
        return Err(Forged::WrongKey {
            found: format!("{}[{}]", entry.host, entry.addr),
        });
    }
    let skew = limits.clock_skew;
    not_ahead("first_seen", entry.first_seen, now, skew)?;
    not_ahead("last_seen", entry.last_seen, now, skew)?;
    if let Some(at) = entry.last_tls_at {
        not_ahead("last_tls_at", at, now, skew)?;
    }
    if let Some(at) = entry.last_verified_at {
        not_ahead("last_verified_at", at, now, skew)?;
    }
    let written_as_pin = stored.kind == Some("pin") && stored.pinned == Some("1");
    if entry.pinned != written_as_pin {
        return Err(Forged::PinNotWritten);
    }
    if entry.pinned {
        // A pin written before pins carried their time lasts no longer than one made now.
        let at = entry.pinned_at.unwrap_or(now);
        not_ahead("pinned_at", at, now, skew)?;
        let lasts = entry.expires_at.saturating_sub(at);
        if lasts > limits.ttl.pin_max.as_secs() {
            return Err(Forged::PinTooLong {
                lasts,
                max: limits.ttl.pin_max.as_secs(),
            });
        }
    } else {
        let believed = limits.ttl.for_class(entry.class).as_secs();
        entry.expires_at = entry
            .expires_at
            .min(entry.last_seen.saturating_add(believed));
    }
    Ok(entry)
}

/// The memory of TLS read from the fleet, checked as [`checked`] checks an entry.
pub fn checked_mark(json: &str, now: u64, limits: &Limits) -> Result<TlsMark, Forged> {
    let mark: TlsMark = serde_json::from_str(json).map_err(|e| Forged::Malformed(e.to_string()))?;
    not_ahead("time of TLS", mark.at, now, limits.clock_skew)?;
    Ok(mark)
}

/// Takes in what the fleet holds; see the module documentation for the rules.
pub fn merge(
    local: Option<CacheEntry>,
    fleet: Option<CacheEntry>,
    tls: Option<TlsMark>,
    key: &CacheKey,
    me: &Observer,
    now: u64,
) -> Option<CacheEntry> {
    let mut entry = match (local, fleet) {
        (None, None) => {
            // Only the memory of TLS: kept, invisible to lookups, for the downgrade check.
            let tls = tls.as_ref()?;
            let mut entry = CacheEntry::new(key, OutcomeClass::TlsVerified, tls.at);
            entry.detail = "TLS seen by another relay".to_string();
            entry.expires_at = 0;
            entry.shared = true;
            entry
        }
        (Some(local), None) => local,
        (None, Some(fleet)) => from_fleet(fleet, me),
        (Some(local), Some(fleet)) => {
            let fleet_pin = fleet.pinned && !fleet.is_expired(now);
            let local_pin = local.pinned && !local.is_expired(now);
            // Another relay's failure may be its own path's (a 454 injected there only):
            // it never replaces this relay's own success while that still counts.
            let own_success = !local.shared && local.class.is_encrypted() && !local.is_expired(now);
            let others_failure = !fleet.class.is_encrypted()
                && (fleet.observed_by.as_ref()).is_none_or(|by| by.relay != me.relay);
            let take_fleet = if fleet_pin != local_pin {
                fleet_pin
            } else if own_success && others_failure {
                false
            } else {
                fleet.last_seen > local.last_seen
            };
            let (mut kept, other) = if take_fleet {
                (from_fleet(fleet, me), local)
            } else {
                (local, fleet)
            };
            for domain in &other.domains {
                kept.add_domain(domain);
            }
            if other.last_tls_at > kept.last_tls_at {
                kept.last_tls_at = other.last_tls_at;
                kept.last_tls_by = other.last_tls_by;
            }
            kept.last_verified_at = kept.last_verified_at.max(other.last_verified_at);
            kept
        }
    };
    if let Some(tls) = tls
        && Some(tls.at) > entry.last_tls_at
    {
        entry.last_tls_at = Some(tls.at);
        entry.last_tls_by = Some(tls.by);
    }
    Some(entry)
}

pub(super) fn from_fleet(mut entry: CacheEntry, me: &Observer) -> CacheEntry {
    entry.shared = entry
        .observed_by
        .as_ref()
        .is_some_and(|by| by.relay != me.relay);
    entry.normalized()
}

/// What the write script compares: who saw it, by address (or by relay, without one).
pub fn source_identity(observer: &Observer) -> String {
    match observer.source {
        Some(source) => source.to_string(),
        None => format!("relay:{}", observer.relay),
    }
}

pub(super) fn kind_of(class: OutcomeClass) -> &'static str {
    if class.is_encrypted() {
        "success"
    } else if class.is_unreachable() {
        "unreachable"
    } else {
        "failure"
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    const T0: u64 = 1_772_323_200;

    fn observer(relay: &str, source: Option<[u8; 4]>) -> Observer {
        Observer {
            relay: relay.to_string(),
            source: source.map(IpAddr::from),
        }
    }

    fn entry(class: OutcomeClass, last_seen: u64, by: &Observer) -> CacheEntry {
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let mut entry = CacheEntry::new(&key, class, last_seen);
        entry.expires_at = last_seen + 3600;
        entry.observed_by = Some(by.clone());
        if class.is_encrypted() {
            entry.last_tls_at = Some(last_seen);
            entry.last_tls_by = Some(by.clone());
        }
        entry
    }

    #[test]
    fn the_later_observation_wins_and_the_memory_of_tls_is_the_latest() {
        let (a, b) = (
            observer("a", Some([127, 0, 0, 2])),
            observer("b", Some([127, 0, 0, 3])),
        );
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        // A's own failure, then B's: the later one.
        let local = entry(OutcomeClass::StarttlsRefused, T0, &a);
        let fleet = entry(OutcomeClass::NoStarttls, T0 + 10, &b);
        let merged = merge(Some(local), Some(fleet.clone()), None, &key, &a, T0 + 20);
        let merged = merged.expect("merged");
        assert_eq!(merged.class, OutcomeClass::NoStarttls);
        assert!(merged.shared, "seen by relay b");

        // A's success whose class has expired (kept for the memory of TLS): B's failure is
        // what holds, and the memory of A's TLS stays.
        let mut expired = entry(OutcomeClass::TlsVerified, T0, &a);
        expired.expires_at = T0 + 5;
        let merged = merge(Some(expired), Some(fleet.clone()), None, &key, &a, T0 + 20);
        let merged = merged.expect("merged");
        assert_eq!(merged.class, OutcomeClass::NoStarttls);
        assert_eq!(merged.last_tls_at, Some(T0));
        assert_eq!(merged.last_tls_by, Some(a.clone()));

        // A's own success after B's failure stands here.
        let newer = entry(OutcomeClass::TlsVerified, T0 + 30, &a);
        let merged = merge(Some(newer), Some(fleet), None, &key, &a, T0 + 40).expect("merged");
        assert_eq!(merged.class, OutcomeClass::TlsVerified);
        assert!(!merged.shared);
    }

    #[test]
    fn another_relays_later_failure_never_replaces_this_relays_own_success_while_it_counts() {
        let (a, b) = (
            observer("a", Some([127, 0, 0, 2])),
            observer("b", Some([127, 0, 0, 3])),
        );
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let own = entry(OutcomeClass::TlsVerified, T0, &a);
        for class in [OutcomeClass::StarttlsRefused, OutcomeClass::NoStarttls] {
            let theirs = entry(class, T0 + 10, &b);
            let merged = merge(Some(own.clone()), Some(theirs), None, &key, &a, T0 + 20);
            let merged = merged.expect("merged");
            assert_eq!(merged.class, OutcomeClass::TlsVerified, "{class}");
            assert!(!merged.shared);
            assert_eq!(merged.domains, own.domains);
        }
        // Its own later failure does replace it.
        let mine = entry(OutcomeClass::StarttlsRefused, T0 + 10, &a);
        let merged = merge(Some(own), Some(mine), None, &key, &a, T0 + 20).expect("merged");
        assert_eq!(merged.class, OutcomeClass::StarttlsRefused);
    }

    #[test]
    fn a_pin_from_the_fleet_wins_over_a_newer_observation() {
        let (a, b) = (observer("a", None), observer("b", None));
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let local = entry(OutcomeClass::TlsVerified, T0 + 100, &a);
        let mut pin = entry(OutcomeClass::NoStarttls, T0, &b);
        pin.pinned = true;
        let merged = merge(Some(local), Some(pin), None, &key, &a, T0 + 200).expect("merged");
        assert!(merged.pinned && merged.shared);
        assert_eq!(merged.class, OutcomeClass::NoStarttls);
    }

    #[test]
    fn only_a_tls_mark_gives_an_entry_lookups_do_not_see() {
        let (a, b) = (observer("a", None), observer("b", None));
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let mark = TlsMark {
            at: T0,
            by: b.clone(),
            domains: Vec::new(),
        };
        let merged = merge(None, None, Some(mark), &key, &a, T0 + 5).expect("kept");
        assert!(merged.is_expired(T0 + 5));
        assert_eq!(
            (merged.last_tls_at, merged.last_tls_by),
            (Some(T0), Some(b))
        );
    }

    #[test]
    fn sources_are_compared_by_address_or_else_by_relay() {
        let a2 = observer("a", Some([127, 0, 0, 2]));
        let b2 = observer("b", Some([127, 0, 0, 2]));
        let b3 = observer("b", Some([127, 0, 0, 3]));
        assert!(a2.same_source(&b2) && !a2.same_source(&b3));
        assert!(!observer("a", None).same_source(&observer("b", None)));
        assert_eq!(source_identity(&b3), "127.0.0.3");
        assert_eq!(source_identity(&observer("a", None)), "relay:a");
    }

    fn limits() -> Limits {
        Limits {
            ttl: TtlConfig::default(),
            clock_skew: Duration::from_secs(60),
        }
    }

    fn stored<'a>(json: &'a str, kind: &'a str, pinned: &'a str) -> Stored<'a> {
        Stored {
            json,
            kind: Some(kind),
            pinned: Some(pinned),
        }
    }

    #[test]
    fn an_entry_from_the_fleet_is_believed_only_as_this_relay_would_believe_its_own() {
        let b = observer("b", None);
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let now = T0 + 100;
        let failure = entry(OutcomeClass::StarttlsRefused, T0, &b);
        let json = serde_json::to_string(&failure).expect("json");
        assert_eq!(
            checked(&stored(&json, "failure", "0"), &key, now, &limits()),
            Ok(failure.clone())
        );
        // Written by a clock far ahead, or by hand: not believed.
        let mut future = failure.clone();
        future.last_seen = now + 86_400 * 3650;
        future.expires_at = future.last_seen + 3600;
        let json = serde_json::to_string(&future).expect("json");
        assert!(matches!(
            checked(&stored(&json, "failure", "0"), &key, now, &limits()),
            Err(Forged::Future {
                field: "last_seen",
                ..
            })
        ));
        // A little ahead (another relay's clock): believed.
        let mut skewed = failure.clone();
        skewed.last_seen = now + 30;
        let json = serde_json::to_string(&skewed).expect("json");
        assert!(checked(&stored(&json, "failure", "0"), &key, now, &limits()).is_ok());
        // An expiry far beyond the class's TTL is cut to it.
        let mut long = failure.clone();
        long.expires_at = T0 + 86_400 * 3650;
        let json = serde_json::to_string(&long).expect("json");
        let believed = checked(&stored(&json, "failure", "0"), &key, now, &limits());
        assert_eq!(believed.map(|e| e.expires_at), Ok(T0 + 3600));
        // Under another key: not believed.
        let other = CacheKey::new("mx.other.example", IpAddr::from([192, 0, 2, 1]));
        let json = serde_json::to_string(&failure).expect("json");
        assert!(matches!(
            checked(&stored(&json, "failure", "0"), &other, now, &limits()),
            Err(Forged::WrongKey { .. })
        ));
    }

    #[test]
    fn a_pin_from_the_fleet_is_believed_only_as_ctl_cache_pin_writes_one() {
        let b = observer("b", None);
        let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
        let now = T0 + 100;
        let mut pin = entry(OutcomeClass::NoStarttls, T0, &b);
        pin.pinned = true;
        pin.pinned_at = Some(T0);
        pin.expires_at = T0 + 86_400;
        let json = serde_json::to_string(&pin).expect("json");
        assert_eq!(
            checked(&stored(&json, "pin", "1"), &key, now, &limits()),
            Ok(pin.clone())
        );
        // The entry says pinned; the write did not.
        assert_eq!(
            checked(&stored(&json, "failure", "0"), &key, now, &limits()),
            Err(Forged::PinNotWritten)
        );
        // One written by a relay from before pins carried their time: believed for as long
        // as a pin made now could last, no longer.
        let mut no_time = pin.clone();
        no_time.pinned_at = None;
        let json = serde_json::to_string(&no_time).expect("json");
        assert_eq!(
            checked(&stored(&json, "pin", "1"), &key, now, &limits()),
            Ok(no_time.clone())
        );
        no_time.expires_at = now + 31 * 86_400;
        let json = serde_json::to_string(&no_time).expect("json");
        assert!(matches!(
            checked(&stored(&json, "pin", "1"), &key, now, &limits()),
            Err(Forged::PinTooLong { .. })
        ));
        // Longer than any pin an operator can make.
        let mut forever = pin.clone();
        forever.expires_at = T0 + 86_400 * 3650;
        let json = serde_json::to_string(&forever).expect("json");
        assert!(matches!(
            checked(&stored(&json, "pin", "1"), &key, now, &limits()),
            Err(Forged::PinTooLong { .. })
        ));
    }

    #[test]
    fn a_memory_of_tls_from_the_future_is_not_believed() {
        let mark = TlsMark {
            at: T0 + 86_400,
            by: observer("b", None),
            domains: Vec::new(),
        };
        let json = serde_json::to_string(&mark).expect("json");
        assert!(matches!(
            checked_mark(&json, T0, &limits()),
            Err(Forged::Future { .. })
        ));
        assert_eq!(checked_mark(&json, T0 + 86_400, &limits()), Ok(mark));
    }
}
