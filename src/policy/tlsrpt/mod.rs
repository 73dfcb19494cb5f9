//! SMTP TLS Reporting (RFC 8460): counting what each TLS session to a domain's servers came
//! to, per policy domain and UTC day, and sending the day's aggregate report to the `rua`
//! addresses the domain publishes in `_smtp._tls.<domain>` TXT: by HTTPS POST, or as a
//! multipart/report message handed to the local mail server.
//!
//! Counting is always on (it feeds `ctl tlsrpt`); reports are written and sent only when
//! `tls_rpt.directory` is set.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::cache::Clock;
use crate::net::dialer::Dialer;
use crate::net::dns::MxResolver;
use crate::net::https::HttpsClient;
use crate::settings::SetupError;

/// The media type of a gzip-compressed report (RFC 8460 6.4).
pub const GZIP_MEDIA_TYPE: &str = "application/tlsrpt+gzip";

pub mod counting;
pub mod day;
pub mod discovery;
pub mod results;
pub mod sending;

use day::DomainDay;
pub use day::{DomainCounts, UtcDay, counts_file};
pub use discovery::{RecordError, Rua, parse_rua, parse_tlsrpt_records};
pub use results::{PolicyFacts, ResultType, SessionResult, SessionSite};

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

/// The day's counts, and how the reports are sent.
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
    /// Where the next report of a domain's day starts, after one was sent on demand.
    sent_until: Mutex<BTreeMap<(UtcDay, String), u64>>,
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
    ) -> Result<TlsReports, SetupError> {
        let from = config
            .from
            .clone()
            .unwrap_or_else(|| format!("postmaster@{hostname}"));
        if !from
            .rsplit_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
            || from.contains(['<', '>', ' '])
        {
            let problem = format!("{from:?} is not a mail address");
            return Err(SetupError::setting("tls_rpt.from", problem));
        }
        if let Some(directory) = &config.directory
            && !directory.is_dir()
        {
            return Err(SetupError::file(
                "tls_rpt.directory",
                directory,
                "not a directory",
            ));
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
            sent_until: Mutex::new(BTreeMap::new()),
        })
    }
}
