//! What a relay reads from the fleet's shared cache (Redis): an entry's JSON with the
//! fields written beside it (`checked`), the memory of TLS (`checked_mark`), and their merge
//! with this relay's own entry (`merge`). Never panics; nothing believed holds a time
//! further ahead than the clock skew allows, a pin is believed only as written and no
//! longer than `pin_max`, an observation no longer than its class's TTL, and another
//! relay's failure never replaces this relay's own unexpired success.
#![no_main]

use std::net::IpAddr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tlsrouter::cache::shared::{Limits, Stored, checked, checked_mark, merge};
use tlsrouter::cache::{CacheEntry, CacheKey, Observer, TtlConfig};
use tlsrouter::outcome::OutcomeClass;

const NOW: u64 = 1_796_040_000;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\u{1f}');
    let (json, kind, pinned, mark) = (
        parts.next().unwrap_or(""),
        parts.next(),
        parts.next(),
        parts.next(),
    );
    let key = CacheKey::new("mx.example.net", IpAddr::from([192, 0, 2, 1]));
    let limits = Limits {
        ttl: TtlConfig::default(),
        clock_skew: Duration::from_secs(60),
    };
    let ahead = NOW + limits.clock_skew.as_secs();
    let stored = Stored { json, kind, pinned };
    let fleet = checked(&stored, &key, NOW, &limits).ok();
    if let Some(entry) = &fleet {
        assert_eq!(entry.key(), key);
        assert!(entry.last_seen <= ahead && entry.first_seen <= ahead);
        assert!(entry.last_tls_at.is_none_or(|at| at <= ahead));
        if entry.pinned {
            assert_eq!((kind, pinned), (Some("pin"), Some("1")));
            let at = entry.pinned_at.unwrap_or(NOW);
            assert!(entry.expires_at.saturating_sub(at) <= limits.ttl.pin_max.as_secs());
        } else {
            let ttl = limits.ttl.for_class(entry.class).as_secs();
            assert!(entry.expires_at <= entry.last_seen.saturating_add(ttl));
        }
    }
    let tls = mark.and_then(|json| checked_mark(json, NOW, &limits).ok());
    if let Some(mark) = &tls {
        assert!(mark.at <= ahead);
    }
    let me = Observer {
        relay: "here".into(),
        source: None,
    };
    let mut own = CacheEntry::assumed("mx.example.net", key.addr, OutcomeClass::TlsVerified, None);
    own.last_seen = NOW - 5;
    own.expires_at = NOW + 3600;
    own.last_tls_at = Some(NOW - 5);
    own.observed_by = Some(me.clone());
    let merged = merge(Some(own), fleet.clone(), tls, &key, &me, NOW).expect("an entry");
    let fleet_pin = fleet.as_ref().is_some_and(|e| e.pinned && !e.is_expired(NOW));
    let mine = fleet
        .as_ref()
        .and_then(|e| e.observed_by.as_ref())
        .is_some_and(|by| by.relay == me.relay);
    if !fleet_pin && !mine {
        assert!(
            merged.class.is_encrypted(),
            "another relay's failure replaced this relay's own success: {merged:?}"
        );
    }
});
