//! Counting sessions per policy domain and UTC day, saving the counts, and the day's
//! aggregate report (RFC 8460 4).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::outcome::format_date;
use crate::policy::tlsrpt::TlsReports;
use crate::policy::tlsrpt::day::{
    DAY_SECONDS, DomainCounts, DomainDay, FailureKey, Period, UtcDay,
};
use crate::policy::tlsrpt::results::{PolicyFacts, SessionResult, SessionSite};

/// One row of the counts file: a domain's counts under one policy on one day.
#[derive(Serialize, Deserialize)]
struct SavedCounts {
    day: u64,
    domain: String,
    policy: PolicyFacts,
    successes: u64,
    failures: Vec<(FailureKey, u64)>,
    /// Where the day's next report starts, after one was sent on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct SavedFile {
    version: u32,
    counts: Vec<SavedCounts>,
}

/// The counts file's format version.
const FILE_VERSION: u32 = 1;

/// Policies counted per domain and day; a domain whose published policy changes more often
/// than this in a day has the rest of its sessions left out of the report.
pub const MAX_POLICIES_PER_DOMAIN: usize = 8;

impl TlsReports {
    /// Counts one session to `policy_domain` (the recipient domain) under `policy`.
    pub fn record(
        &self,
        policy_domain: &str,
        policy: &PolicyFacts,
        result: &SessionResult,
        site: &SessionSite,
    ) {
        let day = UtcDay::of(self.clock.now());
        let domain = policy_domain.trim_end_matches('.').to_ascii_lowercase();
        let Ok(mut counts) = self.counts.lock() else {
            return;
        };
        let key = (day, domain);
        if !counts.contains_key(&key) {
            // Days before yesterday are reported or never will be: they go, sent or not.
            let kept = counts.split_off(&(day.previous(), String::new()));
            *counts = kept;
            let that_day = (counts.range((day, String::new())..)).count();
            if that_day >= self.config.max_domains {
                return;
            }
        }
        let policies = counts.entry(key).or_default();
        // A domain whose policy changes at every lookup would add its text each time.
        if !policies.contains_key(policy) && policies.len() >= MAX_POLICIES_PER_DOMAIN {
            return;
        }
        let counts = policies.entry(policy.clone()).or_default();
        match result {
            SessionResult::Success => counts.successes += 1,
            SessionResult::Failure {
                result_type,
                reason_code,
            } => {
                let key = FailureKey {
                    result_type: *result_type,
                    reason_code: reason_code.clone(),
                    site: site.clone(),
                };
                *counts.failures.entry(key).or_default() += 1;
            }
        }
    }

    /// The counts of `day` (today by default in `ctl`), by domain.
    pub fn counts(&self, day: UtcDay) -> Vec<DomainCounts> {
        let Ok(counts) = self.counts.lock() else {
            return Vec::new();
        };
        counts
            .iter()
            .filter(|((d, _), _)| *d == day)
            .map(|((_, domain), policies)| {
                let mut summary = DomainCounts {
                    domain: domain.clone(),
                    successes: 0,
                    failures: 0,
                    failure_types: BTreeMap::new(),
                };
                for counts in policies.values() {
                    summary.successes += counts.successes;
                    for (key, n) in &counts.failures {
                        summary.failures += n;
                        *summary
                            .failure_types
                            .entry(key.result_type.name().to_string())
                            .or_default() += n;
                    }
                }
                summary
            })
            .collect()
    }

    /// Writes the counts of the days not yet reported to `path`, atomically, so that a
    /// restart does not lose them from the day's report. Returns how many rows.
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<usize> {
        let rows: Vec<SavedCounts> = {
            let counts = self
                .counts
                .lock()
                .map_err(|_| std::io::Error::other("TLS-RPT counts lock poisoned"))?;
            let sent_until = self.sent_until_of();
            counts
                .iter()
                .flat_map(|((day, domain), policies)| {
                    let since = sent_until.get(&(*day, domain.clone())).copied();
                    policies.iter().map(move |(policy, counts)| SavedCounts {
                        day: day.0,
                        domain: domain.clone(),
                        policy: policy.clone(),
                        successes: counts.successes,
                        failures: counts
                            .failures
                            .iter()
                            .map(|(k, n)| (k.clone(), *n))
                            .collect(),
                        since,
                    })
                })
                .collect()
        };
        let file = SavedFile {
            version: FILE_VERSION,
            counts: rows,
        };
        crate::cache::persistence::write_atomically(path, |w| {
            serde_json::to_writer(w, &file).map_err(std::io::Error::from)
        })?;
        Ok(file.counts.len())
    }

    /// Adds the counts saved in `path` (of yesterday and today only) to those held. A
    /// missing file is none.
    pub fn load(&self, path: &std::path::Path) -> std::io::Result<usize> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let file: SavedFile = serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if file.version != FILE_VERSION {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("version {} is not supported", file.version),
            ));
        }
        let yesterday = self.today().previous();
        let mut counts = self
            .counts
            .lock()
            .map_err(|_| std::io::Error::other("TLS-RPT counts lock poisoned"))?;
        let mut loaded = 0;
        for row in file.counts.into_iter().filter(|r| r.day >= yesterday.0) {
            if let (Some(since), Ok(mut sent_until)) = (row.since, self.sent_until.lock()) {
                sent_until.insert((UtcDay(row.day), row.domain.clone()), since);
            }
            let held = counts
                .entry((UtcDay(row.day), row.domain))
                .or_default()
                .entry(row.policy)
                .or_default();
            held.successes += row.successes;
            for (key, n) in row.failures {
                *held.failures.entry(key).or_default() += n;
            }
            loaded += 1;
        }
        Ok(loaded)
    }

    pub fn today(&self) -> UtcDay {
        UtcDay::of(self.clock.now())
    }

    /// The RFC 8460 JSON report of `domain` for the rest of `day` (all of it, unless a
    /// report was sent on demand that day), or `None` when nothing was counted.
    pub fn report(&self, day: UtcDay, domain: &str) -> Option<serde_json::Value> {
        let period = self.period(day, domain, day.end());
        let counts = self.counts.lock().ok()?;
        let policies = counts.get(&(day, domain.to_string()))?;
        Some(self.report_json(period, domain, policies))
    }

    /// The time the next report of `domain` for `day` covers, up to `end`.
    pub(super) fn period(&self, day: UtcDay, domain: &str, end: u64) -> Period {
        let start = self
            .sent_until_of()
            .get(&(day, domain.to_string()))
            .copied();
        Period {
            day,
            start: start.unwrap_or(day.start()),
            end,
        }
    }

    fn sent_until_of(&self) -> BTreeMap<(UtcDay, String), u64> {
        self.sent_until
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// The report of these counts.
    pub(super) fn report_json(
        &self,
        period: Period,
        domain: &str,
        policies: &DomainDay,
    ) -> serde_json::Value {
        let policies: Vec<serde_json::Value> = policies
            .iter()
            .map(|(facts, counts)| {
                let failed: u64 = counts.failures.values().sum();
                let details: Vec<serde_json::Value> = counts
                    .failures
                    .iter()
                    .map(|(key, n)| {
                        let mut detail = serde_json::Map::new();
                        detail.insert("result-type".into(), json!(key.result_type.name()));
                        if let Some(ip) = key.site.sending_ip {
                            detail.insert("sending-mta-ip".into(), json!(ip.to_string()));
                        }
                        if let Some(mx) = &key.site.receiving_mx {
                            detail.insert("receiving-mx-hostname".into(), json!(mx));
                        }
                        if let Some(ip) = key.site.receiving_ip {
                            detail.insert("receiving-ip".into(), json!(ip.to_string()));
                        }
                        detail.insert("failed-session-count".into(), json!(n));
                        if let Some(code) = &key.reason_code {
                            detail.insert("failure-reason-code".into(), json!(code));
                        }
                        serde_json::Value::Object(detail)
                    })
                    .collect();
                let mut policy = json!({
                    "policy": facts.json(domain),
                    "summary": {
                        "total-successful-session-count": counts.successes,
                        "total-failure-session-count": failed,
                    },
                });
                if !details.is_empty() {
                    policy["failure-details"] = json!(details);
                }
                policy
            })
            .collect();
        json!({
            "organization-name": self
                .config
                .organization_name
                .clone()
                .unwrap_or_else(|| self.submitter.clone()),
            "date-range": {
                "start-datetime": rfc3339(period.start),
                "end-datetime": rfc3339(period.end),
            },
            "contact-info": self.config.contact_info.clone().unwrap_or_else(|| self.from.clone()),
            "report-id": self.report_id(period, domain),
            "policies": policies,
        })
    }

    /// The day and domain; a report of part of a day names its start and end too, so that
    /// each report has its own.
    pub(super) fn report_id(&self, period: Period, domain: &str) -> String {
        let date = period.day.date();
        match period.is_whole_day() {
            true => format!("{date}_{domain}@{}", self.submitter),
            false => {
                let (start, end) = (period.start, period.end);
                format!("{date}.{start}-{end}_{domain}@{}", self.submitter)
            }
        }
    }

    /// RFC 8460 5.3: `submitter!policy-domain!begin!end.json.gz`.
    pub(super) fn file_name(&self, period: Period, domain: &str) -> String {
        format!(
            "{}!{domain}!{}!{}.json.gz",
            self.submitter,
            period.start,
            period.end + 1
        )
    }
}

/// `2026-11-30T00:00:00Z`.
pub(super) fn rfc3339(unix_seconds: u64) -> String {
    let seconds = unix_seconds % DAY_SECONDS;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        format_date(unix_seconds),
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}
