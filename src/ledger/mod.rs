//! The per-domain ledger: for each recipient domain, what became of its messages over the
//! last week, hour by hour (by route and TLS version), its last failure, what it published,
//! the rule that applied and the MX hosts it went to. It answers "who got my mail in plain
//! this week, and why" (`ctl domains`, `ctl domain`). Bounded by `ledger.max_domains`, the
//! least recently used dropped and counted; saved beside the cache file.

mod domain;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

pub use domain::{DomainView, Failure, Message, Route, RouteCounts};

use domain::{DomainLedger, HOURS};

/// `ledger:` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// The most recipient domains kept; a new one beyond it drops the least recently used.
    pub max_domains: NonZeroUsize,
    /// With a fleet (`cache.backend: redis`): how often this relay's ledger is written to
    /// Redis for the others to add up.
    #[serde(with = "crate::settings::duration")]
    pub share_interval: std::time::Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            max_domains: NonZeroUsize::new(10_000).expect("not zero"),
            share_interval: std::time::Duration::from_secs(60),
        }
    }
}

/// The longest window the ledger answers for: its week.
pub const WEEK: u64 = 7 * 86_400;

/// Every domain's ledger.
pub struct Ledger {
    domains: Mutex<HashMap<String, DomainLedger>>,
    max_domains: usize,
    /// Domains dropped to stay within `max_domains`.
    dropped: AtomicU64,
    /// Messages recorded since start: whether there is anything new to share.
    recorded: AtomicU64,
}

/// The saved form, versioned so that a later format is refused, not misread.
#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    domains: HashMap<String, DomainLedger>,
}

const FILE_VERSION: u32 = 1;

/// Why the ledger file was not read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerFileError {
    #[error("ledger file {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("ledger file {} is not one this build reads: {problem}", path.display())]
    Corrupt { path: PathBuf, problem: String },
}

impl Ledger {
    pub fn new(config: &LedgerConfig) -> Ledger {
        Ledger {
            domains: Mutex::default(),
            max_domains: config.max_domains.get(),
            dropped: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
        }
    }

    /// Counts one message for `domain` at `now` (unix seconds).
    pub fn record(&self, now: u64, domain: &str, message: &Message<'_>) {
        let lower;
        let domain = match domain.bytes().any(|b| b.is_ascii_uppercase()) {
            true => {
                lower = domain.to_ascii_lowercase();
                lower.as_str()
            }
            false => domain,
        };
        let mut domains = self.domains.lock().expect("ledger");
        // A domain met before, the usual case: no allocation.
        if let Some(ledger) = domains.get_mut(domain) {
            ledger.record(now, message);
            self.recorded.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if domains.len() >= self.max_domains {
            // The least recently used: one walk, only when a new domain finds it full.
            let oldest = (domains.iter())
                .min_by_key(|(_, d)| d.last_at)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                domains.remove(&oldest);
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut ledger = DomainLedger::default();
        ledger.record(now, message);
        domains.insert(domain.to_string(), ledger);
        self.recorded.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages recorded since start.
    pub fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// The whole ledger as its file holds it: what a relay shares with its fleet.
    pub fn snapshot(&self) -> String {
        let saved = Saved {
            version: FILE_VERSION,
            domains: self.domains.lock().expect("ledger").clone(),
        };
        serde_json::to_string(&saved).unwrap_or_default()
    }

    /// A snapshot (another relay's, or the file's), read once: at most `max_domains` of its
    /// domains (the most recently used).
    pub fn read_snapshot(&self, json: &str) -> Result<Snapshot, String> {
        let saved: Saved = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if saved.version != FILE_VERSION {
            return Err(format!(
                "version {} (this build reads version {FILE_VERSION})",
                saved.version
            ));
        }
        let mut domains: Vec<(String, DomainLedger)> = (saved.domains.into_iter())
            .map(|(name, d)| (name.to_ascii_lowercase(), d))
            .collect();
        domains.sort_by_key(|(_, d)| std::cmp::Reverse(d.last_at));
        domains.truncate(self.max_domains);
        Ok(Snapshot(domains))
    }

    /// Every domain with messages since `since` (unix seconds; counted by whole hours, from
    /// the hour `since` falls in).
    pub fn views(&self, since: u64) -> Vec<DomainView> {
        let hour = since_hour(since);
        let domains = self.domains.lock().expect("ledger");
        (domains.iter())
            .map(|(name, d)| d.view(name, hour))
            .filter(|v| v.counts.total() > 0)
            .collect()
    }

    /// One domain since `since`; `None` when the ledger has nothing of it.
    pub fn view(&self, domain: &str, since: u64) -> Option<DomainView> {
        let domains = self.domains.lock().expect("ledger");
        let name = domain.to_ascii_lowercase();
        domains.get(&name).map(|d| d.view(&name, since_hour(since)))
    }

    /// Domains whose last delivery went in plain.
    pub fn delivered_in_plain(&self) -> usize {
        let domains = self.domains.lock().expect("ledger");
        domains.values().filter(|d| d.delivered_in_plain()).count()
    }

    pub fn len(&self) -> usize {
        self.domains.lock().expect("ledger").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Drops the hours older than a week before `now`, and the domains left with none.
    pub fn purge(&self, now: u64) {
        let oldest = ((now / 3600) as u32).saturating_sub(HOURS - 1);
        let mut domains = self.domains.lock().expect("ledger");
        domains.retain(|_, d| {
            d.forget_before(oldest);
            !d.is_empty()
        });
    }

    /// Writes the ledger to `path`, atomically.
    pub fn save(&self, path: &Path) -> Result<usize, LedgerFileError> {
        let saved = Saved {
            version: FILE_VERSION,
            domains: self.domains.lock().expect("ledger").clone(),
        };
        crate::cache::persistence::write_atomically(path, |w| {
            serde_json::to_writer(w, &saved).map_err(std::io::Error::from)
        })
        .map_err(|error| LedgerFileError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Ok(saved.domains.len())
    }

    /// Reads a file written by [`save`](Self::save); `None` when there is none yet. The
    /// domains in it beyond `max_domains` are dropped, the least recently used first.
    pub fn load(&self, path: &Path) -> Result<Option<usize>, LedgerFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(LedgerFileError::Io {
                    path: path.to_path_buf(),
                    error,
                });
            }
        };
        let Snapshot(loaded) =
            self.read_snapshot(&text)
                .map_err(|problem| LedgerFileError::Corrupt {
                    path: path.to_path_buf(),
                    problem,
                })?;
        let count = loaded.len();
        let mut domains = self.domains.lock().expect("ledger");
        for (name, ledger) in loaded {
            // What this run counted already is newer than the file.
            domains.entry(name).or_insert(ledger);
        }
        Ok(Some(count))
    }
}

/// Another relay's ledger, as read from its snapshot.
pub struct Snapshot(Vec<(String, DomainLedger)>);

impl Snapshot {
    /// Its domains with messages since `since`, as [`Ledger::views`] gives this relay's.
    pub fn views(&self, since: u64) -> Vec<DomainView> {
        let hour = since_hour(since);
        (self.0.iter())
            .map(|(name, d)| d.view(name, hour))
            .filter(|v| v.counts.total() > 0)
            .collect()
    }

    /// One domain since `since`; `None` when the snapshot has nothing of it.
    pub fn view(&self, domain: &str, since: u64) -> Option<DomainView> {
        let (name, d) = self.0.iter().find(|(name, _)| name == domain)?;
        Some(d.view(name, since_hour(since))).filter(|v| v.counts.total() > 0)
    }
}

/// The ledger file beside the cache file: `cache.json` → `cache.ledger.json`.
pub fn ledger_file(cache_file: &Path) -> PathBuf {
    crate::settings::file_beside(cache_file, "ledger")
}

fn since_hour(since: u64) -> u32 {
    (since / 3600) as u32
}

/// The start of the hour `since` falls in: where a window's counts begin.
pub fn window_start(since: u64) -> u64 {
    since - since % 3600
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::OutcomeClass;

    const NOW: u64 = 1_800_000_000;

    fn message(route: Route) -> Message<'static> {
        Message {
            route,
            tls_version: route
                .is_delivery()
                .then_some("TLSv1.3")
                .filter(|_| route != Route::Plain),
            host: Some("mx.example.test"),
            policy: Some(None),
            rule: Some("default"),
            failure: None,
        }
    }

    fn ledger(max: usize) -> Ledger {
        Ledger::new(&LedgerConfig {
            max_domains: NonZeroUsize::new(max).unwrap(),
            ..LedgerConfig::default()
        })
    }

    #[test]
    fn messages_count_by_route_and_version_in_the_window_asked() {
        let l = ledger(10);
        l.record(NOW - 3 * 86_400, "Example.test", &message(Route::Plain));
        l.record(NOW - 60, "example.test", &message(Route::TlsVerified));
        l.record(NOW, "example.test", &message(Route::TlsVerified));
        l.record(NOW, "example.test", &message(Route::Deferred));
        let day = l.view("example.test", NOW - 86_400).unwrap();
        assert_eq!(day.counts.tls_verified, 2);
        assert_eq!(day.counts.plain, 0, "three days ago is outside the day");
        assert_eq!(day.counts.deferred, 1);
        assert_eq!(day.tls_versions.get("TLSv1.3"), Some(&2));
        let week = l.view("EXAMPLE.test", NOW - WEEK).unwrap();
        assert_eq!(week.counts.plain, 1);
        assert_eq!(week.counts.delivered(), 3);
        assert!((week.counts.plain_share() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(week.last_delivery, Some((Route::TlsVerified, NOW)));
    }

    #[test]
    fn a_week_is_kept_and_no_more() {
        let l = ledger(10);
        l.record(NOW - WEEK - 7200, "old.test", &message(Route::Plain));
        l.record(NOW - WEEK - 7200, "both.test", &message(Route::Plain));
        l.record(NOW, "both.test", &message(Route::TlsVerified));
        l.purge(NOW);
        assert!(l.view("old.test", 0).is_none(), "nothing left of it");
        let both = l.view("both.test", 0).unwrap();
        assert_eq!(both.counts.plain, 0);
        assert_eq!(both.counts.tls_verified, 1);
    }

    #[test]
    fn a_full_ledger_drops_the_least_recently_used_and_counts_it() {
        let l = ledger(2);
        l.record(NOW - 10, "a.test", &message(Route::Plain));
        l.record(NOW - 5, "b.test", &message(Route::Plain));
        l.record(NOW - 1, "a.test", &message(Route::Plain));
        l.record(NOW, "c.test", &message(Route::Plain));
        assert!(l.view("b.test", 0).is_none());
        assert!(l.view("a.test", 0).is_some() && l.view("c.test", 0).is_some());
        assert_eq!(l.dropped(), 1);
        assert_eq!(l.delivered_in_plain(), 2);
    }

    #[test]
    fn the_last_failure_and_policy_stay_until_replaced() {
        let l = ledger(10);
        let failure = Failure {
            at: NOW - 10,
            host: Some("mx.example.test".into()),
            class: Some(OutcomeClass::NoStarttls),
            reason: "no STARTTLS offered".into(),
        };
        l.record(
            NOW - 10,
            "example.test",
            &Message {
                policy: Some(Some("mta-sts:testing")),
                failure: Some(&failure),
                ..message(Route::Plain)
            },
        );
        l.record(
            NOW,
            "example.test",
            &Message {
                policy: None,
                host: None,
                ..message(Route::Deferred)
            },
        );
        let view = l.view("example.test", 0).unwrap();
        assert_eq!(view.last_failure, Some(failure));
        assert_eq!(view.policy.as_deref(), Some("mta-sts:testing"));
        assert_eq!(view.hosts, ["mx.example.test"]);
        assert_eq!(l.delivered_in_plain(), 1, "a deferral is no delivery");
    }

    #[test]
    fn the_file_keeps_the_week_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = ledger_file(&dir.path().join("cache.json"));
        assert_eq!(path, dir.path().join("cache.ledger.json"));
        let l = ledger(10);
        assert!(l.load(&path).unwrap().is_none(), "no file yet");
        l.record(NOW, "example.test", &message(Route::Plain));
        l.record(NOW, "other.test", &message(Route::TlsVerified));
        assert_eq!(l.save(&path).unwrap(), 2);
        let again = ledger(1);
        assert_eq!(again.load(&path).unwrap(), Some(1), "within max_domains");
        std::fs::write(&path, b"{\"version\": 9, \"domains\": {}}").unwrap();
        assert!(matches!(
            ledger(10).load(&path),
            Err(LedgerFileError::Corrupt { .. })
        ));
    }

    #[test]
    fn another_relays_snapshot_is_read_within_the_bound() {
        let other = ledger(10);
        other.record(NOW - 10, "a.test", &message(Route::Plain));
        other.record(NOW, "b.test", &message(Route::TlsVerified));
        let here = ledger(1);
        let views = here
            .read_snapshot(&other.snapshot())
            .unwrap()
            .views(NOW - 3600);
        let names: Vec<_> = views.iter().map(|v| v.domain.as_str()).collect();
        assert_eq!(names, ["b.test"], "the most recent within max_domains");
        assert!(
            here.read_snapshot("{\"version\": 7, \"domains\": {}}")
                .is_err()
        );
        assert!(here.read_snapshot("not json").is_err());
    }

    #[test]
    fn views_of_two_relays_add_up() {
        let a = ledger(10);
        let b = ledger(10);
        a.record(NOW - 100, "example.test", &message(Route::Plain));
        b.record(NOW, "example.test", &message(Route::TlsVerified));
        b.record(NOW, "example.test", &message(Route::TlsVerified));
        let mut view = a.view("example.test", 0).unwrap();
        view.merge(b.view("example.test", 0).unwrap());
        assert_eq!(view.counts.plain, 1);
        assert_eq!(view.counts.tls_verified, 2);
        assert_eq!(view.last_delivery, Some((Route::TlsVerified, NOW)));
    }
}
