//! SMTP TLS Reporting (RFC 8460): counting what each TLS session to a domain's servers came
//! to, per policy domain and UTC day, and sending the day's aggregate report to the `rua`
//! addresses the domain publishes in `_smtp._tls.<domain>` TXT: by HTTPS POST, or as a
//! multipart/report message handed to the local mail server.
//!
//! Counting is always on (it feeds `ctl tlsrpt`); reports are written and sent only when
//! `tls_rpt.directory` is set.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cache::Clock;
use crate::net::dialer::Dialer;
use crate::net::dns::MxResolver;
use crate::net::https::HttpsClient;
use crate::outcome::{OutcomeClass, format_date};
use crate::policy::mta_sts::{PolicyError, StsPolicy};

/// The media type of a gzip-compressed report (RFC 8460 6.4).
pub const GZIP_MEDIA_TYPE: &str = "application/tlsrpt+gzip";

const DAY_SECONDS: u64 = 86_400;

// ---------------------------------------------------------------------------------------
// Configuration

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsRptConfig {
    /// Where each day's reports are written (`*.json.gz`); `null` (the default) writes and
    /// sends none. Counting goes on either way.
    pub directory: Option<PathBuf>,
    /// The SMTP server (`address:port`, usually the local MTA) that takes reports for
    /// `mailto:` addresses, in plain and without AUTH, as a local MTA takes mail from its
    /// own host; `null` sends only to `https:` addresses.
    pub mail_relay: Option<SocketAddr>,
    /// The sender of mailed reports; default `postmaster@` and `hostname`.
    pub from: Option<String>,
    /// `organization-name` in reports; default `hostname`.
    pub organization_name: Option<String>,
    /// `contact-info` in reports; default the `from` address.
    pub contact_info: Option<String>,
    /// The most policy domains counted per day.
    pub max_domains: usize,
}

impl Default for TlsRptConfig {
    fn default() -> Self {
        TlsRptConfig {
            directory: None,
            mail_relay: None,
            from: None,
            organization_name: None,
            contact_info: None,
            max_domains: 100_000,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Discovery

/// Where a domain wants its reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Rua {
    Https(String),
    /// The mailbox, percent-decoded, without any `?` header fields.
    Mailto(String),
}

impl fmt::Display for Rua {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rua::Https(url) => f.write_str(url),
            Rua::Mailto(address) => write!(f, "mailto:{address}"),
        }
    }
}

/// Parses the `_smtp._tls` TXT records of a domain: exactly one must start with
/// `v=TLSRPTv1` (RFC 8460 3), with an `rua` of `https:` or `mailto:` URIs. URIs of other
/// schemes are skipped; a record with none usable is an error.
pub fn parse_tlsrpt_records(records: &[String]) -> Result<Vec<Rua>, String> {
    let candidates: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.strip_prefix("v=TLSRPTv1").is_some_and(|rest| {
                let rest = rest.trim_start_matches([' ', '\t']);
                rest.is_empty() || rest.starts_with(';')
            })
        })
        .collect();
    let record = match candidates.as_slice() {
        [] => return Err("no v=TLSRPTv1 record".into()),
        [one] => *one,
        more => {
            return Err(format!(
                "{} v=TLSRPTv1 records, RFC 8460 wants one",
                more.len()
            ));
        }
    };
    let mut rua = None;
    for field in record
        .split(';')
        .skip(1)
        .map(|f| f.trim_matches([' ', '\t']))
    {
        if field.is_empty() {
            continue;
        }
        let (name, value) = field
            .split_once('=')
            .ok_or_else(|| format!("{field:?} is not name=value"))?;
        if name == "rua" {
            if rua.is_some() {
                return Err("rua given twice".into());
            }
            let uris: Vec<Rua> = value
                .split(',')
                .map(|u| u.trim_matches([' ', '\t']))
                .filter_map(parse_rua)
                .collect();
            rua = Some(uris);
        }
    }
    match rua {
        None => Err("no rua".into()),
        Some(uris) if uris.is_empty() => Err("no https: or mailto: address in rua".into()),
        Some(uris) => Ok(uris),
    }
}

/// One `rua` URI, if it is an `https:` or `mailto:` address. What a domain publishes is
/// read byte-safely: a multi-byte character anywhere is no reason to stop.
pub fn parse_rua(uri: &str) -> Option<Rua> {
    let is_https = uri
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    if is_https && uri.len() > 8 {
        return uri
            .parse::<hyper::Uri>()
            .ok()
            .map(|_| Rua::Https(uri.to_string()));
    }
    let rest = uri
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("mailto:"))
        .map(|_| &uri[7..])?;
    let address = percent_decode(rest.split('?').next()?)?;
    let (local, domain) = address.rsplit_once('@')?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>')
    };
    (plain(local) && plain(domain)).then_some(Rua::Mailto(address))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------------------------------
// Result types

/// RFC 8460 4.3's result types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultType {
    StarttlsNotSupported,
    CertificateHostMismatch,
    CertificateExpired,
    CertificateNotTrusted,
    ValidationFailure,
    TlsaInvalid,
    DnssecInvalid,
    DaneRequired,
    StsPolicyFetchError,
    StsPolicyInvalid,
    StsWebpkiInvalid,
}

impl ResultType {
    pub fn name(self) -> &'static str {
        match self {
            ResultType::StarttlsNotSupported => "starttls-not-supported",
            ResultType::CertificateHostMismatch => "certificate-host-mismatch",
            ResultType::CertificateExpired => "certificate-expired",
            ResultType::CertificateNotTrusted => "certificate-not-trusted",
            ResultType::ValidationFailure => "validation-failure",
            ResultType::TlsaInvalid => "tlsa-invalid",
            ResultType::DnssecInvalid => "dnssec-invalid",
            ResultType::DaneRequired => "dane-required",
            ResultType::StsPolicyFetchError => "sts-policy-fetch-error",
            ResultType::StsPolicyInvalid => "sts-policy-invalid",
            ResultType::StsWebpkiInvalid => "sts-webpki-invalid",
        }
    }
}

/// What one TLS session (or attempt) came to, for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionResult {
    Success,
    Failure {
        result_type: ResultType,
        /// RFC 8460 4.4's `failure-reason-code`: our class, for the generic result types.
        reason_code: Option<String>,
    },
}

impl SessionResult {
    /// The TLS-RPT result type of one of our classes (docs/ARCHITECTURE.md): `tls-verified` is
    /// a success; `tls-unverified` is judged by its certificate class, which the caller
    /// passes instead. `connect-failed` and `timeout` are no TLS session: `None`.
    pub fn from_class(class: OutcomeClass) -> Option<SessionResult> {
        let failure = |result_type, reason: Option<&str>| {
            Some(SessionResult::Failure {
                result_type,
                reason_code: reason.map(str::to_string),
            })
        };
        match class {
            OutcomeClass::TlsVerified => Some(SessionResult::Success),
            OutcomeClass::NoStarttls | OutcomeClass::StarttlsRefused => failure(
                ResultType::StarttlsNotSupported,
                (class == OutcomeClass::StarttlsRefused).then_some(class.name()),
            ),
            OutcomeClass::CertExpired => failure(ResultType::CertificateExpired, None),
            OutcomeClass::CertNameMismatch => failure(ResultType::CertificateHostMismatch, None),
            OutcomeClass::CertUntrusted => failure(ResultType::CertificateNotTrusted, None),
            // The legacy stack never authenticates: for a policy, no valid session.
            OutcomeClass::TlsUnverified
            | OutcomeClass::TlsLegacy
            | OutcomeClass::HandshakeFailed
            | OutcomeClass::LegacyTls
            | OutcomeClass::CertNotYetValid
            | OutcomeClass::ProtocolViolation => {
                failure(ResultType::ValidationFailure, Some(class.name()))
            }
            OutcomeClass::DaneMismatch => {
                failure(ResultType::ValidationFailure, Some(class.name()))
            }
            OutcomeClass::DnssecBogus => failure(ResultType::DnssecInvalid, None),
            OutcomeClass::ConnectFailed | OutcomeClass::Timeout => None,
        }
    }

    /// TLSA records present for the host, none of them usable (RFC 8460 4.3.2.1).
    pub fn tlsa_invalid() -> SessionResult {
        SessionResult::Failure {
            result_type: ResultType::TlsaInvalid,
            reason_code: None,
        }
    }

    /// The host's TLSA answer was bogus or could not be had (RFC 8460 4.3.2.1).
    pub fn dnssec_invalid() -> SessionResult {
        SessionResult::Failure {
            result_type: ResultType::DnssecInvalid,
            reason_code: None,
        }
    }

    /// DANE required the host's TLSA records and no secure ones could be had.
    pub fn dane_required() -> SessionResult {
        SessionResult::Failure {
            result_type: ResultType::DaneRequired,
            reason_code: None,
        }
    }

    /// An MX host the enforced policy does not name.
    pub fn mx_not_in_policy() -> SessionResult {
        SessionResult::Failure {
            result_type: ResultType::ValidationFailure,
            reason_code: Some("mx-not-in-policy".into()),
        }
    }

    /// A published policy that could not be had.
    pub fn from_policy_error(error: &PolicyError) -> SessionResult {
        use crate::policy::mta_sts::PolicyErrorKind;
        let result_type = match error.kind {
            PolicyErrorKind::FetchError => ResultType::StsPolicyFetchError,
            PolicyErrorKind::Invalid => ResultType::StsPolicyInvalid,
            PolicyErrorKind::WebpkiInvalid => ResultType::StsWebpkiInvalid,
        };
        SessionResult::Failure {
            result_type,
            reason_code: None,
        }
    }
}

/// The policy a session was judged under (RFC 8460 4.4 `policy`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyFacts {
    Sts {
        /// The policy's lines.
        policy_string: Vec<String>,
        mx_host: Vec<String>,
    },
    /// DANE (RFC 8460 4.4 `tlsa`): the TLSA records of one MX host.
    Tlsa {
        /// The records in presentation form (`3 1 1 <hex>`); none when they could not be
        /// had.
        policy_string: Vec<String>,
        /// The MX host they are published for.
        mx_host: Vec<String>,
    },
    NoPolicyFound,
}

impl PolicyFacts {
    pub fn sts(policy: &StsPolicy) -> PolicyFacts {
        PolicyFacts::Sts {
            policy_string: policy
                .raw
                .lines()
                .map(|l| l.trim_end_matches('\r').to_string())
                .filter(|l| !l.is_empty())
                .collect(),
            mx_host: policy.mx.iter().map(|p| p.to_string()).collect(),
        }
    }

    pub fn tlsa(records: &[String], mx_host: &str) -> PolicyFacts {
        PolicyFacts::Tlsa {
            policy_string: records.to_vec(),
            mx_host: vec![mx_host.to_string()],
        }
    }

    fn json(&self, domain: &str) -> serde_json::Value {
        match self {
            PolicyFacts::Tlsa {
                policy_string,
                mx_host,
            } => json!({
                "policy-type": "tlsa",
                "policy-string": policy_string,
                "policy-domain": domain,
                "mx-host": mx_host,
            }),
            PolicyFacts::Sts {
                policy_string,
                mx_host,
            } => json!({
                "policy-type": "sts",
                "policy-string": policy_string,
                "policy-domain": domain,
                "mx-host": mx_host,
            }),
            PolicyFacts::NoPolicyFound => json!({
                "policy-type": "no-policy-found",
                "policy-domain": domain,
            }),
        }
    }
}

/// Where a failed session was: RFC 8460 4.4's failure details.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionSite {
    pub receiving_mx: Option<String>,
    pub receiving_ip: Option<IpAddr>,
    /// Our own address on that connection.
    pub sending_ip: Option<IpAddr>,
}

// ---------------------------------------------------------------------------------------
// Counting

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

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct FailureKey {
    result_type: ResultType,
    reason_code: Option<String>,
    site: SessionSite,
}

#[derive(Debug, Default)]
struct PolicyCounts {
    successes: u64,
    failures: BTreeMap<FailureKey, u64>,
}

/// One row of the counts file: a domain's counts under one policy on one day.
#[derive(Serialize, Deserialize)]
struct SavedCounts {
    day: u64,
    domain: String,
    policy: PolicyFacts,
    successes: u64,
    failures: Vec<(FailureKey, u64)>,
}

#[derive(Serialize, Deserialize)]
struct SavedFile {
    version: u32,
    counts: Vec<SavedCounts>,
}

/// The counts file's format version.
const FILE_VERSION: u32 = 1;

/// The file the counts are saved in: beside the outcome cache file, `cache.json` giving
/// `cache.tls-rpt.json`.
pub fn counts_file(cache_file: &std::path::Path) -> PathBuf {
    let stem = cache_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cache".into());
    cache_file.with_file_name(format!("{stem}.tls-rpt.json"))
}

/// The counts of one policy domain on one day, by the policy they were judged under.
type DomainDay = BTreeMap<PolicyFacts, PolicyCounts>;

/// Today's counts for one domain, as `ctl tlsrpt` shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainCounts {
    pub domain: String,
    pub successes: u64,
    pub failures: u64,
    /// By result type.
    pub failure_types: BTreeMap<String, u64>,
}

/// What became of one report for one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportDelivery {
    pub domain: String,
    pub rua: Rua,
    pub file: PathBuf,
    pub result: Result<(), String>,
}

pub struct TlsReports {
    config: TlsRptConfig,
    /// Our host name: the report's submitter.
    submitter: String,
    from: String,
    resolver: Arc<MxResolver>,
    https: Arc<HttpsClient>,
    clock: Arc<dyn Clock>,
    /// How the mailed reports' connections are made: as mail's are.
    dialer: Dialer,
    timeouts: crate::settings::Timeouts,
    counts: Mutex<BTreeMap<(UtcDay, String), DomainDay>>,
}

impl TlsReports {
    pub fn new(
        config: TlsRptConfig,
        hostname: &str,
        resolver: Arc<MxResolver>,
        https: Arc<HttpsClient>,
        clock: Arc<dyn Clock>,
        dialer: Dialer,
        timeouts: crate::settings::Timeouts,
    ) -> anyhow::Result<TlsReports> {
        let from = config
            .from
            .clone()
            .unwrap_or_else(|| format!("postmaster@{hostname}"));
        if !from
            .rsplit_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
            || from.contains(['<', '>', ' '])
        {
            anyhow::bail!("tls_rpt.from: {from:?} is not a mail address");
        }
        if let Some(directory) = &config.directory
            && !directory.is_dir()
        {
            anyhow::bail!("tls_rpt.directory {}: not a directory", directory.display());
        }
        Ok(TlsReports {
            config,
            submitter: hostname.to_string(),
            from,
            resolver,
            https,
            clock,
            dialer,
            timeouts,
            counts: Mutex::new(BTreeMap::new()),
        })
    }

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
            let that_day = counts.keys().filter(|(d, _)| *d == day).count();
            if that_day >= self.config.max_domains {
                return;
            }
        }
        let counts = counts
            .entry(key)
            .or_default()
            .entry(policy.clone())
            .or_default();
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
            counts
                .iter()
                .flat_map(|((day, domain), policies)| {
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
                    })
                })
                .collect()
        };
        let file = SavedFile {
            version: FILE_VERSION,
            counts: rows,
        };
        crate::cache::write_atomically(path, |w| {
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

    /// The RFC 8460 JSON report of `domain` for `day`, or `None` when nothing was counted.
    pub fn report(&self, day: UtcDay, domain: &str) -> Option<serde_json::Value> {
        let counts = self.counts.lock().ok()?;
        let policies = counts.get(&(day, domain.to_string()))?;
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
        Some(json!({
            "organization-name": self
                .config
                .organization_name
                .clone()
                .unwrap_or_else(|| self.submitter.clone()),
            "date-range": {
                "start-datetime": rfc3339(day.start()),
                "end-datetime": rfc3339(day.end()),
            },
            "contact-info": self.config.contact_info.clone().unwrap_or_else(|| self.from.clone()),
            "report-id": self.report_id(day, domain),
            "policies": policies,
        }))
    }

    fn report_id(&self, day: UtcDay, domain: &str) -> String {
        format!("{}_{domain}@{}", day.date(), self.submitter)
    }

    /// RFC 8460 5.3: `submitter!policy-domain!begin!end.json.gz`.
    fn file_name(&self, day: UtcDay, domain: &str) -> String {
        format!(
            "{}!{domain}!{}!{}.json.gz",
            self.submitter,
            day.start(),
            day.end() + 1
        )
    }

    /// Writes and sends the reports of `day` for every domain that publishes a TLS-RPT
    /// record, then forgets the day's counts. Nothing when `tls_rpt.directory` is unset.
    pub async fn send_reports(&self, day: UtcDay) -> Vec<ReportDelivery> {
        let Some(directory) = self.config.directory.clone() else {
            return Vec::new();
        };
        let domains: Vec<String> = match self.counts.lock() {
            Ok(counts) => counts
                .keys()
                .filter(|(d, _)| *d == day)
                .map(|(_, domain)| domain.clone())
                .collect(),
            Err(_) => return Vec::new(),
        };
        let mut deliveries = Vec::new();
        for domain in domains {
            let rua = match self
                .resolver
                .txt_records(&format!("_smtp._tls.{domain}"))
                .await
                .map_err(|e| e.to_string())
                .and_then(|records| parse_tlsrpt_records(&records))
            {
                Ok(rua) => rua,
                Err(why) => {
                    tracing::debug!(domain, "no TLS-RPT report: {why}");
                    continue;
                }
            };
            let Some(report) = self.report(day, &domain) else {
                continue;
            };
            let gzip = match gzip_json(&report) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(domain, "TLS-RPT report not compressed: {e}");
                    continue;
                }
            };
            let name = self.file_name(day, &domain);
            let file = directory.join(&name);
            if let Err(e) = std::fs::write(&file, &gzip) {
                tracing::warn!(
                    domain,
                    "TLS-RPT report not written to {}: {e}",
                    file.display()
                );
            }
            for address in rua {
                let result = match &address {
                    Rua::Https(url) => self.post(url, &gzip).await,
                    Rua::Mailto(to) => self.mail(day, &domain, to, &name, &gzip).await,
                };
                match &result {
                    Ok(()) => tracing::info!(domain, rua = %address, "TLS-RPT report sent"),
                    Err(e) => {
                        tracing::warn!(domain, rua = %address, "TLS-RPT report not sent: {e}")
                    }
                }
                deliveries.push(ReportDelivery {
                    domain: domain.clone(),
                    rua: address,
                    file: file.clone(),
                    result,
                });
            }
        }
        if let Ok(mut counts) = self.counts.lock() {
            counts.retain(|(d, _), _| *d > day);
        }
        deliveries
    }

    async fn post(&self, url: &str, gzip: &[u8]) -> Result<(), String> {
        let response = self
            .https
            .post(url, GZIP_MEDIA_TYPE, gzip.to_vec())
            .await
            .map_err(|e| e.to_string())?;
        if response.status.is_success() {
            Ok(())
        } else {
            Err(format!("{url}: {}", response.status))
        }
    }

    /// RFC 8460 5.3: a multipart/report message with the gzip report attached, handed to
    /// `tls_rpt.mail_relay`.
    async fn mail(
        &self,
        day: UtcDay,
        domain: &str,
        to: &str,
        file_name: &str,
        gzip: &[u8],
    ) -> Result<(), String> {
        let relay = self
            .config
            .mail_relay
            .ok_or("tls_rpt.mail_relay is not set: mailto: reports are not sent")?;
        let message = self.report_message(day, domain, to, file_name, gzip);
        submit(
            &self.dialer,
            relay,
            &self.submitter,
            &self.from,
            to,
            &message,
            &self.timeouts,
        )
        .await
        .map_err(|e| format!("via {relay}: {e}"))
    }

    fn report_message(
        &self,
        day: UtcDay,
        domain: &str,
        to: &str,
        file_name: &str,
        gzip: &[u8],
    ) -> String {
        let report_id = self.report_id(day, domain);
        let submitter = &self.submitter;
        let boundary = format!("tlsrpt-{}-{}", day.start(), rand::random::<u64>());
        let encoded = base64::engine::general_purpose::STANDARD.encode(gzip);
        let mut attachment = String::with_capacity(encoded.len() + encoded.len() / 76 * 2);
        for line in encoded.as_bytes().chunks(76) {
            attachment.push_str(&String::from_utf8_lossy(line));
            attachment.push_str("\r\n");
        }
        let date = rfc5322_date(self.clock.now());
        let from = &self.from;
        let day_text = day.date();
        format!(
            "From: {from}\r\n\
             To: {to}\r\n\
             Date: {date}\r\n\
             Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>\r\n\
             Message-ID: <{report_id}>\r\n\
             TLS-Report-Domain: {domain}\r\n\
             TLS-Report-Submitter: {submitter}\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n \
             boundary=\"{boundary}\"\r\n\
             \r\n\
             This is a TLS report (RFC 8460) in MIME format.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: text/plain; charset=us-ascii\r\n\
             \r\n\
             The SMTP TLS report of {submitter} for {domain} on {day_text} (UTC) is attached.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: {GZIP_MEDIA_TYPE}\r\n\
             Content-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment;\r\n \
             filename=\"{file_name}\"\r\n\
             \r\n\
             {attachment}\
             --{boundary}--\r\n"
        )
    }

    /// Sends yesterday's reports shortly after each UTC midnight, for as long as it runs.
    pub async fn send_daily(self: Arc<Self>) {
        if self.config.directory.is_none() {
            return;
        }
        loop {
            let now = self.clock.now();
            let next_midnight = UtcDay::of(now).start() + DAY_SECONDS;
            // Spread over the first hour, as RFC 8460 5.1 asks, so that relays do not all
            // send at once.
            let spread = rand::random::<u64>() % 3600;
            let wait = next_midnight.saturating_sub(now) + spread;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            let yesterday = UtcDay::of(self.clock.now()).previous();
            self.send_reports(yesterday).await;
        }
    }
}

/// Hands one message to an SMTP server: EHLO, MAIL, RCPT, DATA, in plain.
async fn submit(
    dialer: &Dialer,
    relay: SocketAddr,
    hostname: &str,
    from: &str,
    to: &str,
    message: &str,
    timeouts: &crate::settings::Timeouts,
) -> Result<(), String> {
    // Dialled as mail is: from the source address, with the socket mark.
    let mut conn = (dialer.connect(&relay.to_string(), relay).await).map_err(|e| e.to_string())?;
    let result = async {
        let greeting = conn
            .read_reply(timeouts.greeting, "the greeting")
            .await
            .map_err(|e| e.to_string())?;
        if greeting.code != 220 {
            return Err(format!("greeting: {}", greeting.one_line()));
        }
        let steps: [(String, &[u16], &'static str); 4] = [
            (format!("EHLO {hostname}"), &[250], "the reply to EHLO"),
            (format!("MAIL FROM:<{from}>"), &[250], "the reply to MAIL"),
            (format!("RCPT TO:<{to}>"), &[250, 251], "the reply to RCPT"),
            ("DATA".into(), &[354], "the reply to DATA"),
        ];
        for (line, due, what) in steps {
            let reply = conn
                .exchange(&line, due, timeouts.command, what)
                .await
                .map_err(|e| e.to_string())?;
            if !due.contains(&reply.code) {
                return Err(format!("{line}: {}", reply.one_line()));
            }
        }
        let mut body = Vec::with_capacity(message.len() + 16);
        for line in message.split_inclusive("\r\n") {
            if line.starts_with('.') {
                body.push(b'.');
            }
            body.extend_from_slice(line.as_bytes());
        }
        body.extend_from_slice(b".\r\n");
        conn.write(&body, timeouts.data_block, "the message")
            .await
            .map_err(|e| e.to_string())?;
        let reply = conn
            .read_reply(timeouts.data_end, "the reply to the final dot")
            .await
            .map_err(|e| e.to_string())?;
        if reply.code != 250 {
            return Err(format!("after the message: {}", reply.one_line()));
        }
        Ok(())
    }
    .await;
    conn.quit().await;
    result
}

fn gzip_json(report: &serde_json::Value) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    serde_json::to_writer(&mut encoder, report)?;
    encoder.flush()?;
    encoder.finish()
}

/// `2026-11-30T00:00:00Z`.
fn rfc3339(unix_seconds: u64) -> String {
    let seconds = unix_seconds % DAY_SECONDS;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        format_date(unix_seconds),
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// `Mon, 30 Nov 2026 00:05:00 +0000`.
fn rfc5322_date(unix_seconds: u64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let date = format_date(unix_seconds);
    let mut parts = date.split('-');
    let year = parts.next().unwrap_or("1970");
    let month: usize = parts.next().and_then(|m| m.parse().ok()).unwrap_or(1);
    let day = parts.next().unwrap_or("01");
    let weekday = WEEKDAYS[(unix_seconds / DAY_SECONDS % 7) as usize];
    let seconds = unix_seconds % DAY_SECONDS;
    format!(
        "{weekday}, {day} {} {year} {:02}:{:02}:{:02} +0000",
        MONTHS[month.clamp(1, 12) - 1],
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multibyte_character_anywhere_in_a_record_is_no_reason_to_panic() {
        for record in [
            "v=TLSRPTv1; rua=abcdefg\u{e9}",
            "v=TLSRPTv1; rua=https:/\u{e9}x",
            "v=TLSRPTv1; rua=mailto\u{e9}:a@b",
            "v=TLSRPTv1; rua=\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
        ] {
            assert!(
                parse_tlsrpt_records(&[record.to_string()]).is_err(),
                "{record}"
            );
        }
        assert_eq!(
            parse_tlsrpt_records(&["v=TLSRPTv1; rua=abcdefg\u{e9},mailto:r@example.com".into()]),
            Ok(vec![Rua::Mailto("r@example.com".into())])
        );
    }

    #[test]
    fn tlsrpt_records_give_https_and_mailto_addresses() {
        let one = |r: &str| parse_tlsrpt_records(&[r.to_string()]);
        assert_eq!(
            one("v=TLSRPTv1; rua=mailto:reports@example.com,https://r.example.com/tlsrpt"),
            Ok(vec![
                Rua::Mailto("reports@example.com".into()),
                Rua::Https("https://r.example.com/tlsrpt".into())
            ])
        );
        assert_eq!(
            one("v=TLSRPTv1;rua=mailto:a%2Cb@example.com?subject=x"),
            Ok(vec![Rua::Mailto("a,b@example.com".into())])
        );
        assert!(one("v=TLSRPTv1;").is_err());
        assert!(one("v=TLSRPTv1; rua=ftp://example.com/").is_err());
        assert!(one("v=TLSRPTv2; rua=mailto:a@b").is_err());
        let two = [
            "v=TLSRPTv1; rua=mailto:a@b".to_string(),
            "v=TLSRPTv1; rua=mailto:c@d".to_string(),
        ];
        assert!(parse_tlsrpt_records(&two).is_err());
    }

    #[test]
    fn every_class_maps_to_the_result_type_of_the_design_table() {
        let result_type = |class| match SessionResult::from_class(class) {
            Some(SessionResult::Failure { result_type, .. }) => Some(result_type),
            _ => None,
        };
        use OutcomeClass as C;
        use ResultType as R;
        for (class, want) in [
            (C::NoStarttls, R::StarttlsNotSupported),
            (C::StarttlsRefused, R::StarttlsNotSupported),
            (C::CertExpired, R::CertificateExpired),
            (C::CertNameMismatch, R::CertificateHostMismatch),
            (C::CertUntrusted, R::CertificateNotTrusted),
            (C::HandshakeFailed, R::ValidationFailure),
            (C::LegacyTls, R::ValidationFailure),
            (C::TlsLegacy, R::ValidationFailure),
            (C::CertNotYetValid, R::ValidationFailure),
            (C::ProtocolViolation, R::ValidationFailure),
            (C::DaneMismatch, R::ValidationFailure),
            (C::DnssecBogus, R::DnssecInvalid),
        ] {
            assert_eq!(result_type(class), Some(want), "{class}");
        }
        assert_eq!(
            SessionResult::from_class(C::TlsVerified),
            Some(SessionResult::Success)
        );
        assert_eq!(SessionResult::from_class(C::ConnectFailed), None);
        assert_eq!(SessionResult::from_class(C::Timeout), None);
    }

    #[test]
    fn dates_are_written_as_the_rfcs_want() {
        // 2026-12-01 is a Tuesday.
        let t = 1_796_083_200 + 11 * 3600 + 21 * 60 + 2;
        assert_eq!(rfc3339(t), "2026-12-01T11:21:02Z");
        assert_eq!(rfc5322_date(t), "Tue, 01 Dec 2026 11:21:02 +0000");
        assert_eq!(UtcDay::of(t).date(), "2026-12-01");
        assert_eq!(rfc3339(UtcDay::of(t).end()), "2026-12-01T23:59:59Z");
    }
}
