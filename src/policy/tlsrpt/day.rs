//! The counts of one day: a UTC day, and per policy domain and policy the sessions that
//! succeeded and those that failed, by result type and where.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::outcome::format_date;
use crate::policy::tlsrpt::results::{PolicyFacts, ResultType, SessionSite};

pub(super) const DAY_SECONDS: u64 = 86_400;

/// A UTC day, as days since 1970-01-01.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcDay(pub u64);

impl UtcDay {
    pub fn of(unix_seconds: u64) -> UtcDay {
        UtcDay(unix_seconds / DAY_SECONDS)
    }

    pub fn start(self) -> u64 {
        self.0 * DAY_SECONDS
    }

    /// The day's last second.
    pub fn end(self) -> u64 {
        self.start() + DAY_SECONDS - 1
    }

    pub fn previous(self) -> UtcDay {
        UtcDay(self.0.saturating_sub(1))
    }

    /// `YYYY-MM-DD`.
    pub fn date(self) -> String {
        format_date(self.start())
    }
}

/// The time a report covers: a UTC day from its start (or from the end of the last report
/// sent on demand that day) to `end`, the day's last second or the moment of a report sent
/// on demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub day: UtcDay,
    pub start: u64,
    pub end: u64,
}

impl Period {
    /// Whether it is the whole day, as the nightly report covers it.
    pub fn is_whole_day(self) -> bool {
        self.start == self.day.start() && self.end == self.day.end()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(super) struct FailureKey {
    pub(super) result_type: ResultType,
    pub(super) reason_code: Option<String>,
    pub(super) site: SessionSite,
}

#[derive(Debug, Default)]
pub(super) struct PolicyCounts {
    pub(super) successes: u64,
    pub(super) failures: BTreeMap<FailureKey, u64>,
}

/// The file the counts are saved in: beside the outcome cache file, `cache.json` giving
/// `cache.tls-rpt.json`.
pub fn counts_file(cache_file: &std::path::Path) -> PathBuf {
    crate::settings::file_beside(cache_file, "tls-rpt")
}

/// The counts of one policy domain on one day, by the policy they were judged under.
pub(super) type DomainDay = BTreeMap<PolicyFacts, PolicyCounts>;

/// Today's counts for one domain, as `ctl tlsrpt` shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainCounts {
    pub domain: String,
    pub successes: u64,
    pub failures: u64,
    /// By result type.
    pub failure_types: BTreeMap<String, u64>,
}
