//! MTA-STS (RFC 8461): discovery through `_mta-sts.<domain>` TXT, the policy fetched from
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt`, strict parsing, and a policy store
//! that never makes a message wait longer than a short bound.
//!
//! The store follows RFC 8461 section 5.1: a cached policy is used while its TXT id is
//! unchanged; a new id, or none cached, starts a fetch; a vanished TXT record or a failed
//! fetch leaves a valid cached policy in force; failed fetches are retried at most every
//! `retry_after_failure`. A policy is refetched once half its `max_age` has passed, so it
//! is renewed long before it expires.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cache::Clock;
use crate::net::dns::MxResolver;
use crate::net::https::{HttpsClient, HttpsError};
use crate::stats::Stats;

/// RFC 8461 3.2: `max_age` is at most a year.
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

/// RFC 8461 3.3: senders may refuse policies larger than this.
pub const POLICY_BODY_LIMIT: usize = 64 * 1024;

/// The persistence format's version, written into every file.
const FILE_VERSION: u32 = 1;

// ---------------------------------------------------------------------------------------
// Configuration

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtaStsConfig {
    /// Look up and apply MTA-STS policies.
    pub enabled: bool,
    /// The longest a message waits for a policy lookup; a fetch that takes longer goes on in
    /// the background and the next message has its result.
    #[serde(with = "crate::settings::duration")]
    pub wait: Duration,
    /// TCP connect to the policy host.
    #[serde(with = "crate::settings::duration")]
    pub connect_timeout: Duration,
    /// The whole fetch: connect, handshake, request and body.
    #[serde(with = "crate::settings::duration")]
    pub fetch_timeout: Duration,
    /// After a failed fetch, the next one for the domain waits this long.
    #[serde(with = "crate::settings::duration")]
    pub retry_after_failure: Duration,
    /// How often cached policies are checked for a refresh, so that a domain mailed
    /// rarely still has a current policy (RFC 8461 5.1: refresh before expiry, not only
    /// when sending). `0s` refreshes only when a message needs the policy.
    #[serde(with = "crate::settings::duration")]
    pub refresh_interval: Duration,
    /// The most policy domains remembered.
    pub max_policies: usize,
    /// For labs and tests only: HTTPS host names (`mta-sts.example.com`) connected to at
    /// another `address:port`, as `delivery.port` does for SMTP. The certificate must still
    /// be valid for the host name.
    pub connect_to: HashMap<String, SocketAddr>,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: true,
            wait: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            fetch_timeout: Duration::from_secs(30),
            retry_after_failure: Duration::from_secs(5 * 60),
            refresh_interval: Duration::from_secs(60 * 60),
            max_policies: 100_000,
            connect_to: HashMap::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Policies

/// RFC 8461 5: what a policy asks of senders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to matching MX hosts over verified TLS.
    Enforce,
    /// Deliver as usual, and report failures.
    Testing,
    /// The domain withdrew its policy.
    None,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy's `mx:` value: a host name, or `*.` and a domain (RFC 8461 4.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MxPattern(String);

impl MxPattern {
    pub fn parse(text: &str) -> Result<MxPattern, String> {
        let lower = text.trim_end_matches('.').to_ascii_lowercase();
        let name = lower.strip_prefix("*.").unwrap_or(&lower);
        if !is_host_name(name) {
            return Err(format!("mx {text:?} is not a host name or *.domain"));
        }
        Ok(MxPattern(lower))
    }

    /// RFC 8461 4.1: `*.example.com` matches `mx.example.com`, not `example.com` nor
    /// `a.b.example.com`; anything else matches only itself. Case does not matter.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match self.0.strip_prefix("*.") {
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => host == self.0,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MxPattern {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        MxPattern::parse(&text)
    }
}

impl From<MxPattern> for String {
    fn from(pattern: MxPattern) -> String {
        pattern.0
    }
}

impl fmt::Display for MxPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The parts of a policy text (RFC 8461 3.2), before it has an id and a fetch time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyText {
    pub mode: Mode,
    pub mx: Vec<MxPattern>,
    /// Seconds, capped at [`MAX_AGE_LIMIT`].
    pub max_age: u64,
}

/// Parses a policy strictly: `version: STSv1`, one `mode`, one `max_age`, and at least one
/// `mx` unless the mode is `none`. Unknown keys are ignored, as the RFC requires.
pub fn parse_policy(text: &str) -> Result<PolicyText, String> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for (number, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line_no = number + 1;
        if line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .ok_or_else(|| format!("line {line_no}: no \"key: value\""))?;
        let key = key.trim_end_matches([' ', '\t']);
        let value = value.trim_matches([' ', '\t']);
        if key.is_empty() || !key.bytes().all(is_field_name_byte) {
            return Err(format!("line {line_no}: {key:?} is not a field name"));
        }
        match key {
            "version" => {
                once(&version, key, line_no)?;
                if value != "STSv1" {
                    return Err(format!("line {line_no}: version {value:?} is not STSv1"));
                }
                version = Some(());
            }
            "mode" => {
                once(&mode, key, line_no)?;
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    _ => return Err(format!("line {line_no}: unknown mode {value:?}")),
                });
            }
            "max_age" => {
                once(&max_age, key, line_no)?;
                if value.is_empty()
                    || value.len() > 10
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(format!(
                        "line {line_no}: max_age {value:?} is not 1 to 10 digits"
                    ));
                }
                let seconds: u64 = value
                    .parse()
                    .map_err(|_| format!("line {line_no}: max_age {value:?}"))?;
                max_age = Some(seconds.min(MAX_AGE_LIMIT));
            }
            "mx" => mx.push(MxPattern::parse(value).map_err(|e| format!("line {line_no}: {e}"))?),
            _ => {}
        }
    }
    if version.is_none() {
        return Err("no \"version: STSv1\"".into());
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mx.is_empty() && mode != Mode::None {
        return Err(format!("mode {mode} without any mx"));
    }
    Ok(PolicyText { mode, mx, max_age })
}

/// A field that may be given only once.
fn once<T>(slot: &Option<T>, key: &str, line_no: usize) -> Result<(), String> {
    match slot {
        Some(_) => Err(format!("line {line_no}: {key} given twice")),
        None => Ok(()),
    }
}

/// RFC 8461 3.2's field-name: ALPHA / DIGIT / "_" / "-" / ".".
fn is_field_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses the `_mta-sts` TXT records of a domain: exactly one must start with `v=STSv1;`
/// (others are ignored), and it must be well formed (RFC 8461 3.1). Returns its id.
pub fn parse_txt_records(records: &[String]) -> Result<String, String> {
    let candidates: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.strip_prefix("v=STSv1")
                .is_some_and(|rest| rest.trim_start_matches([' ', '\t']).starts_with(';'))
        })
        .collect();
    match candidates.as_slice() {
        [] => Err("no v=STSv1 record".into()),
        [one] => parse_txt_record(one),
        more => Err(format!(
            "{} v=STSv1 records, RFC 8461 wants one",
            more.len()
        )),
    }
}

fn parse_txt_record(record: &str) -> Result<String, String> {
    let mut fields = record.split(';').map(|f| f.trim_matches([' ', '\t']));
    if fields.next() != Some("v=STSv1") {
        return Err(format!("{record:?} does not start with v=STSv1"));
    }
    let mut id = None;
    for field in fields {
        if field.is_empty() {
            continue;
        }
        let (name, value) = field
            .split_once('=')
            .ok_or_else(|| format!("{field:?} is not name=value"))?;
        let name_ok = name.len() <= 32
            && name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && name.bytes().all(is_field_name_byte);
        let value_ok = !value.is_empty()
            && value
                .bytes()
                .all(|b| matches!(b, 0x21..=0x3a | 0x3c | 0x3e..=0x7e));
        if !name_ok || !value_ok {
            return Err(format!("{field:?} is not a valid field"));
        }
        if name == "id" {
            if id.is_some() {
                return Err("id given twice".into());
            }
            if value.len() > 32 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!("id {value:?} is not 1 to 32 letters and digits"));
            }
            id = Some(value.to_string());
        }
    }
    id.ok_or_else(|| "no id".into())
}

/// A policy in force for a domain: what it says, and when we fetched it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StsPolicy {
    /// The policy domain (the recipient domain), lower case.
    pub domain: String,
    /// The id of the TXT record the policy was fetched under.
    pub id: String,
    pub mode: Mode,
    pub mx: Vec<MxPattern>,
    pub max_age: u64,
    /// Unix seconds.
    pub fetched_at: u64,
    /// `fetched_at + max_age`.
    pub expires_at: u64,
    /// The policy text as served (TLS-RPT reports quote it).
    pub raw: String,
}

impl StsPolicy {
    /// Whether an MX host of the domain is one the policy names.
    pub fn mx_matches(&self, host: &str) -> bool {
        self.mx.iter().any(|pattern| pattern.matches(host))
    }

    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }

    /// Half its life has passed: time to fetch it again while it is still in force.
    fn wants_refresh(&self, now: u64) -> bool {
        now >= self.fetched_at.saturating_add(self.max_age / 2)
    }
}

/// A policy another relay shared, checked exactly as a fetched one: the text it quotes
/// must parse and say what its fields say (mode, `mx`, `max_age` capped at a year), it must
/// be for `domain`, fetched no later than now plus `clock_skew`, and it expires `max_age`
/// after that, whatever it claims. It may never weaken an `enforce` policy `held` under the
/// same id: one id is one policy (RFC 8461 3.1).
pub fn checked_policy(
    json: &str,
    domain: &str,
    now: u64,
    clock_skew: Duration,
    held: Option<&StsPolicy>,
) -> Result<StsPolicy, String> {
    let shared: StsPolicy =
        serde_json::from_str(json).map_err(|e| format!("does not parse ({e})"))?;
    if shared.domain != domain {
        return Err(format!("is for {}, not {domain}", shared.domain));
    }
    if shared.id.is_empty()
        || shared.id.len() > 32
        || !shared.id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(format!(
            "has the id {:?}, not 1 to 32 letters and digits",
            shared.id
        ));
    }
    let text = parse_policy(&shared.raw).map_err(|e| format!("quotes no valid policy ({e})"))?;
    if (text.mode, &text.mx, text.max_age) != (shared.mode, &shared.mx, shared.max_age) {
        return Err(format!(
            "says mode {}, max_age {} where the text it quotes says mode {}, max_age {}",
            shared.mode, shared.max_age, text.mode, text.max_age
        ));
    }
    let ahead = shared.fetched_at.saturating_sub(now);
    if ahead > clock_skew.as_secs() {
        return Err(format!(
            "was fetched {ahead}s ahead of this relay's clock, more than \
             cache.redis.clock_skew allows"
        ));
    }
    if let Some(held) = held
        && held.id == shared.id
        && held.mode == Mode::Enforce
        && (text.mode != Mode::Enforce || text.mx != held.mx)
    {
        return Err(format!(
            "says mode {} (mx {}) under the id {} of the enforce policy held here",
            text.mode,
            text.mx
                .iter()
                .map(MxPattern::as_str)
                .collect::<Vec<_>>()
                .join(", "),
            held.id
        ));
    }
    Ok(StsPolicy {
        expires_at: shared.fetched_at.saturating_add(text.max_age),
        mode: text.mode,
        mx: text.mx,
        max_age: text.max_age,
        ..shared
    })
}

// ---------------------------------------------------------------------------------------
// Lookup results and errors

/// Why a published policy could not be had; each kind is a TLS-RPT result type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyErrorKind {
    /// `sts-policy-fetch-error`: DNS, connect, timeout, a status other than 200, a redirect,
    /// a type other than text/plain, a body over 64 KiB.
    FetchError,
    /// `sts-policy-invalid`: the text is not a valid policy.
    Invalid,
    /// `sts-webpki-invalid`: the certificate of `mta-sts.<domain>` did not verify.
    WebpkiInvalid,
}

impl PolicyErrorKind {
    /// The RFC 8460 result type.
    pub fn result_type(self) -> &'static str {
        match self {
            PolicyErrorKind::FetchError => "sts-policy-fetch-error",
            PolicyErrorKind::Invalid => "sts-policy-invalid",
            PolicyErrorKind::WebpkiInvalid => "sts-webpki-invalid",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {detail}", kind.result_type())]
pub struct PolicyError {
    pub kind: PolicyErrorKind,
    pub detail: String,
}

impl PolicyError {
    fn new(kind: PolicyErrorKind, detail: impl Into<String>) -> PolicyError {
        PolicyError {
            kind,
            detail: detail.into(),
        }
    }
}

/// What [`PolicyStore::policy_for`] found for a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyLookup {
    /// A valid policy is in force (its mode may be `none`).
    Found(Arc<StsPolicy>),
    /// The domain publishes no usable `_mta-sts` record and nothing is cached.
    NotPublished,
    /// A record is published, nothing is cached, and the fetch has not finished within the
    /// wait: deliver as if there were no policy (RFC 8461 5.1); the fetch goes on.
    NotYet,
    /// A record is published but its policy could not be had and nothing is cached:
    /// deliver as if there were no policy, and report the error.
    Unavailable(PolicyError),
}

impl PolicyLookup {
    pub fn policy(&self) -> Option<&Arc<StsPolicy>> {
        match self {
            PolicyLookup::Found(policy) => Some(policy),
            _ => None,
        }
    }

    /// The policy in `enforce` mode, if that is what applies.
    pub fn enforced(&self) -> Option<&Arc<StsPolicy>> {
        self.policy().filter(|p| p.mode == Mode::Enforce)
    }

    /// For the log line: `mta-sts:enforce`, `mta-sts:none-yet`, `none`...
    pub fn label(&self) -> String {
        match self {
            PolicyLookup::Found(policy) => format!("mta-sts:{}", policy.mode),
            PolicyLookup::NotPublished => "none".into(),
            PolicyLookup::NotYet => "mta-sts:pending".into(),
            PolicyLookup::Unavailable(e) => format!("mta-sts:{}", e.kind.result_type()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The store

/// What is known about one policy domain.
#[derive(Clone, Debug, Default)]
struct DomainState {
    policy: Option<Arc<StsPolicy>>,
    /// The last failed fetch: when, for which TXT id, and why.
    failure: Option<Failure>,
    /// The last `_mta-sts` answer, kept for its DNS lifetime.
    txt: Option<TxtSeen>,
}

/// What the `_mta-sts` record said (its id, or nothing usable) and until when that holds.
#[derive(Clone, Debug)]
struct TxtSeen {
    id: Option<String>,
    valid_until: Instant,
}

#[derive(Clone, Debug)]
struct Failure {
    at: u64,
    id: String,
    error: PolicyError,
}

/// A fetch in progress: its result, once there, is sent to every waiter.
type InFlight = watch::Receiver<Option<PolicyLookup>>;

#[derive(Serialize)]
struct SavedRef<'a> {
    version: u32,
    policies: Vec<&'a StsPolicy>,
}

#[derive(Deserialize)]
struct Saved {
    version: u32,
    policies: Vec<StsPolicy>,
}

/// The policies of every domain we sent to, shared by all sessions.
pub struct PolicyStore {
    config: MtaStsConfig,
    resolver: Arc<MxResolver>,
    https: Arc<HttpsClient>,
    clock: Arc<dyn Clock>,
    stats: Arc<Stats>,
    domains: Mutex<HashMap<String, DomainState>>,
    in_flight: Mutex<HashMap<String, InFlight>>,
    /// The fleet's shared cache, with `cache.backend: redis`: policies fetched by one
    /// relay serve the others.
    shared: std::sync::OnceLock<Arc<crate::cache::shared::SharedCache>>,
}

impl PolicyStore {
    pub fn new(
        config: MtaStsConfig,
        resolver: Arc<MxResolver>,
        https: Arc<HttpsClient>,
        clock: Arc<dyn Clock>,
        stats: Arc<Stats>,
    ) -> PolicyStore {
        PolicyStore {
            config,
            resolver,
            https,
            clock,
            stats,
            domains: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Shares policies with the fleet (once).
    pub fn share_through(&self, shared: Arc<crate::cache::shared::SharedCache>) {
        let _ = self.shared.set(shared);
    }

    /// The fleet's copy of `domain`'s policy, when it is the one the TXT record names and
    /// is not due for a fetch. It is checked as a fetched one would be ([`checked_policy`]);
    /// one that fails is logged and counted once, and a fetch is made instead.
    async fn fleet_copy(&self, domain: &str, id: &str, now: u64) -> Option<Arc<StsPolicy>> {
        let shared = self.shared.get()?;
        let json = shared.shared_value("sts", domain).await?;
        let held = self.held(domain);
        let checked = checked_policy(&json, domain, now, shared.clock_skew(), held.as_deref());
        let policy = match checked {
            Ok(policy) => policy,
            Err(why) => {
                let forged = crate::cache::shared::Forged::Policy(why);
                shared.forged(&format!("MTA-STS policy of {domain}"), &forged);
                return None;
            }
        };
        // Only a fetch over HTTPS may weaken an enforce policy held here, whatever id the
        // (unsigned) TXT record names now.
        let weakens = held.as_ref().is_some_and(|held| {
            held.mode == Mode::Enforce && (policy.mode != Mode::Enforce || policy.mx != held.mx)
        });
        if weakens {
            tracing::debug!(
                domain,
                id,
                "the fleet's MTA-STS policy would weaken the enforce policy held here; fetching it instead"
            );
            return None;
        }
        let usable = policy.id == id && !policy.is_expired(now) && !policy.wants_refresh(now);
        usable.then(|| Arc::new(policy))
    }

    /// The policy held for `domain`, expired or not.
    fn held(&self, domain: &str) -> Option<Arc<StsPolicy>> {
        let domains = self.domains.lock().ok()?;
        domains.get(domain)?.policy.clone()
    }

    fn share(&self, policy: &StsPolicy, now: u64) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        if let Ok(json) = serde_json::to_string(policy) {
            let ttl = std::time::Duration::from_secs(policy.expires_at.saturating_sub(now));
            shared.share("sts", &policy.domain, json, ttl);
        }
    }

    /// The policy that applies to mail for `domain` now. Waits at most `mta_sts.wait`: a
    /// lookup that takes longer goes on in the background, and meanwhile a valid cached
    /// policy is what applies (or, with none, [`PolicyLookup::NotYet`]).
    pub async fn policy_for(self: &Arc<Self>, domain: &str) -> PolicyLookup {
        if !self.config.enabled {
            return PolicyLookup::NotPublished;
        }
        let domain = normalize(domain);
        if let Some(settled) = self.settled(&domain) {
            return settled;
        }
        let mut result = self.lookup_in_background(&domain, false);
        let wait = result.wait_for(|r| r.is_some());
        match tokio::time::timeout(self.config.wait, wait).await {
            Ok(Ok(done)) => done.clone().unwrap_or(PolicyLookup::NotYet),
            // Too slow, or the task died: what the cache holds applies.
            _ => match self.cached(&domain) {
                Some(policy) => PolicyLookup::Found(policy),
                None => PolicyLookup::NotYet,
            },
        }
    }

    /// Fetches `domain`'s policy now, whatever the cache holds (for `ctl policy refresh`);
    /// when the fetch fails, a valid cached policy stays in force.
    pub async fn refresh(self: &Arc<Self>, domain: &str) -> PolicyLookup {
        let domain = normalize(domain);
        let mut result = self.lookup_in_background(&domain, true);
        match result.wait_for(|r| r.is_some()).await {
            Ok(done) => done.clone().unwrap_or(PolicyLookup::NotYet),
            Err(_) => PolicyLookup::NotYet,
        }
    }

    /// The answer when nothing needs asking: the `_mta-sts` answer is within its TTL and
    /// says there is no policy, or names the id of a cached policy not yet due for a
    /// refresh. Most messages take this path, with no task and no lookup.
    fn settled(&self, domain: &str) -> Option<PolicyLookup> {
        let now = self.clock.now();
        let domains = self.domains.lock().ok()?;
        let state = domains.get(domain)?;
        let txt = state
            .txt
            .as_ref()
            .filter(|t| Instant::now() < t.valid_until)?;
        let policy = state.policy.clone().filter(|p| !p.is_expired(now));
        match (&txt.id, policy) {
            // A vanished record does not drop a valid cached policy.
            (None, Some(policy)) => Some(PolicyLookup::Found(policy)),
            (None, None) => Some(PolicyLookup::NotPublished),
            (Some(id), Some(policy)) if *id == policy.id && !policy.wants_refresh(now) => {
                Some(PolicyLookup::Found(policy))
            }
            (Some(_), _) => None,
        }
    }

    /// A valid cached policy, without any lookup.
    pub fn cached(&self, domain: &str) -> Option<Arc<StsPolicy>> {
        let now = self.clock.now();
        let domains = self.domains.lock().ok()?;
        domains
            .get(&normalize(domain))?
            .policy
            .clone()
            .filter(|p| !p.is_expired(now))
    }

    /// Every valid cached policy, by domain.
    pub fn policies(&self) -> Vec<Arc<StsPolicy>> {
        let now = self.clock.now();
        let Ok(domains) = self.domains.lock() else {
            return Vec::new();
        };
        let mut policies: Vec<_> = domains
            .values()
            .filter_map(|s| s.policy.clone())
            .filter(|p| !p.is_expired(now))
            .collect();
        policies.sort_by(|a, b| a.domain.cmp(&b.domain));
        policies
    }

    /// Every `mta_sts.refresh_interval`, looks up again each cached policy that is due for a
    /// refresh (half its max_age gone), as a message to its domain would; a failed fetch
    /// keeps the policy, as it does then.
    pub async fn refresh_periodically(self: Arc<Self>) {
        if !self.config.enabled || self.config.refresh_interval.is_zero() {
            return;
        }
        let mut ticker = tokio::time::interval(self.config.refresh_interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let now = self.clock.now();
            for policy in self.policies() {
                if policy.wants_refresh(now) {
                    // Shared with any message that asks meanwhile, as its own lookups are.
                    let mut done = self.lookup_in_background(&policy.domain, false);
                    let _ = done.wait_for(|r| r.is_some()).await;
                }
            }
        }
    }

    /// Forgets `domain`'s policy; the next message looks it up again. Whether one was held.
    pub fn flush(&self, domain: &str) -> bool {
        if let Some(shared) = self.shared.get() {
            shared.forget("sts", &normalize(domain));
        }
        self.domains
            .lock()
            .map(|mut d| d.remove(&normalize(domain)).is_some())
            .unwrap_or(false)
    }

    /// Starts the lookup for `domain` unless one is running, and returns its result channel.
    /// `force` fetches even when the cache would do.
    fn lookup_in_background(self: &Arc<Self>, domain: &str, force: bool) -> InFlight {
        let Ok(mut in_flight) = self.in_flight.lock() else {
            let (_, receiver) = watch::channel(Some(PolicyLookup::NotYet));
            return receiver;
        };
        if let Some(running) = in_flight.get(domain) {
            return running.clone();
        }
        let (sender, receiver) = watch::channel(None);
        in_flight.insert(domain.to_string(), receiver.clone());
        drop(in_flight);
        let store = self.clone();
        let domain = domain.to_string();
        tokio::spawn(async move {
            let lookup = store.look_up(&domain, force).await;
            if let Ok(mut in_flight) = store.in_flight.lock() {
                in_flight.remove(&domain);
            }
            let _ = sender.send(Some(lookup));
        });
        receiver
    }

    /// RFC 8461 5.1, for one domain: TXT, then the cache or a fetch.
    async fn look_up(&self, domain: &str, force: bool) -> PolicyLookup {
        let cached = self.cached(domain);
        let keep_cached = |or: PolicyLookup| match &cached {
            Some(policy) => PolicyLookup::Found(policy.clone()),
            None => or,
        };
        let answer = match self
            .resolver
            .txt_lookup(&format!("_mta-sts.{domain}"))
            .await
        {
            Ok(answer) => answer,
            Err(e) => {
                tracing::debug!(domain, "_mta-sts lookup failed: {e}");
                return keep_cached(PolicyLookup::NotPublished);
            }
        };
        let parsed = parse_txt_records(&answer.records);
        self.note_txt(
            domain,
            TxtSeen {
                id: parsed.as_ref().ok().cloned(),
                valid_until: answer.valid_until,
            },
        );
        let id = match parsed {
            Ok(id) => id,
            Err(why) => {
                if !answer.records.is_empty() {
                    tracing::debug!(domain, "_mta-sts record ignored: {why}");
                }
                // A vanished or broken record does not drop a valid cached policy.
                return keep_cached(PolicyLookup::NotPublished);
            }
        };
        let now = self.clock.now();
        if let Some(policy) = &cached
            && policy.id == id
            && !policy.wants_refresh(now)
            && !force
        {
            return PolicyLookup::Found(policy.clone());
        }
        if let Some(failure) = self.recent_failure(domain, &id, now)
            && !force
        {
            return keep_cached(PolicyLookup::Unavailable(failure.error));
        }
        if !force && let Some(policy) = self.fleet_copy(domain, &id, now).await {
            tracing::info!(domain, id = %policy.id, mode = %policy.mode, "MTA-STS policy taken from the fleet's shared cache");
            self.store(domain, Some(policy.clone()), None);
            return PolicyLookup::Found(policy);
        }
        self.stats.sts_fetches.inc();
        match self.fetch(domain).await {
            Ok(text) => {
                let policy = Arc::new(StsPolicy {
                    domain: domain.to_string(),
                    id,
                    mode: text.0.mode,
                    mx: text.0.mx,
                    max_age: text.0.max_age,
                    fetched_at: now,
                    expires_at: now.saturating_add(text.0.max_age),
                    raw: text.1,
                });
                tracing::info!(
                    domain,
                    id = %policy.id,
                    mode = %policy.mode,
                    max_age = policy.max_age,
                    "MTA-STS policy fetched"
                );
                self.store(domain, Some(policy.clone()), None);
                self.share(&policy, now);
                PolicyLookup::Found(policy)
            }
            Err(error) => {
                self.stats.sts_fetch_failures.inc();
                tracing::warn!(
                    domain,
                    id,
                    "MTA-STS policy not fetched{}: {error}",
                    if cached.is_some() {
                        ", the cached policy stays in force"
                    } else {
                        ""
                    }
                );
                let failure = Failure {
                    at: now,
                    id,
                    error: error.clone(),
                };
                self.store(domain, cached.clone(), Some(failure));
                keep_cached(PolicyLookup::Unavailable(error))
            }
        }
    }

    fn recent_failure(&self, domain: &str, id: &str, now: u64) -> Option<Failure> {
        let domains = self.domains.lock().ok()?;
        let failure = domains.get(domain)?.failure.clone()?;
        let retry_at = failure
            .at
            .saturating_add(self.config.retry_after_failure.as_secs());
        (failure.id == id && now < retry_at).then_some(failure)
    }

    fn store(&self, domain: &str, policy: Option<Arc<StsPolicy>>, failure: Option<Failure>) {
        self.update(domain, |state| {
            state.policy = policy;
            state.failure = failure;
        });
    }

    fn note_txt(&self, domain: &str, txt: TxtSeen) {
        self.update(domain, |state| state.txt = Some(txt));
    }

    /// Changes `domain`'s state, making room for it (within `max_policies`) when it is new.
    fn update(&self, domain: &str, change: impl FnOnce(&mut DomainState)) {
        let Ok(mut domains) = self.domains.lock() else {
            return;
        };
        if !domains.contains_key(domain) && domains.len() >= self.config.max_policies {
            let now = self.clock.now();
            domains.retain(|_, s| s.policy.as_ref().is_some_and(|p| !p.is_expired(now)));
            if domains.len() >= self.config.max_policies {
                tracing::warn!(domain, "MTA-STS policy store full (mta_sts.max_policies)");
                return;
            }
        }
        change(domains.entry(domain.to_string()).or_default());
    }

    /// `GET https://mta-sts.<domain>/.well-known/mta-sts.txt`, checked as RFC 8461 3.3 says.
    async fn fetch(&self, domain: &str) -> Result<(PolicyText, String), PolicyError> {
        let url = format!("https://mta-sts.{domain}/.well-known/mta-sts.txt");
        let response = self
            .https
            .get(&url, POLICY_BODY_LIMIT)
            .await
            .map_err(|e| match e {
                HttpsError::Certificate { .. } => {
                    PolicyError::new(PolicyErrorKind::WebpkiInvalid, e.to_string())
                }
                HttpsError::Failed { .. } => {
                    PolicyError::new(PolicyErrorKind::FetchError, e.to_string())
                }
            })?;
        let fetch_error = |detail: String| PolicyError::new(PolicyErrorKind::FetchError, detail);
        if response.status.is_redirection() {
            return Err(fetch_error(format!(
                "{url}: {} (redirects are not followed, RFC 8461 3.3)",
                response.status
            )));
        }
        if response.status != hyper::StatusCode::OK {
            return Err(fetch_error(format!("{url}: {}", response.status)));
        }
        if response.media_type != "text/plain" {
            return Err(fetch_error(format!(
                "{url}: content type {:?}, not text/plain",
                response.media_type
            )));
        }
        let raw = String::from_utf8(response.body.to_vec())
            .map_err(|_| PolicyError::new(PolicyErrorKind::Invalid, format!("{url}: not UTF-8")))?;
        let text = parse_policy(&raw)
            .map_err(|e| PolicyError::new(PolicyErrorKind::Invalid, format!("{url}: {e}")))?;
        Ok((text, raw))
    }

    /// Writes every valid policy to `path`, atomically, readable by the owner only.
    pub fn save(&self, path: &Path) -> io::Result<usize> {
        let now = self.clock.now();
        let policies: Vec<Arc<StsPolicy>> = {
            let domains = self
                .domains
                .lock()
                .map_err(|_| io::Error::other("policy store lock poisoned"))?;
            domains
                .values()
                .filter_map(|s| s.policy.clone())
                .filter(|p| !p.is_expired(now))
                .collect()
        };
        let saved = SavedRef {
            version: FILE_VERSION,
            policies: policies.iter().map(|p| p.as_ref()).collect(),
        };
        crate::cache::persistence::write_atomically(path, |w| {
            serde_json::to_writer(w, &saved).map_err(io::Error::from)
        })?;
        Ok(policies.len())
    }

    /// Reads a file written by [`save`](Self::save), keeping the policies that are still
    /// valid. A policy already held wins when it was fetched later. A missing file is none.
    pub fn load(&self, path: &Path) -> io::Result<usize> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let saved: Saved = serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if saved.version != FILE_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("version {} is not supported", saved.version),
            ));
        }
        let now = self.clock.now();
        let mut domains = self
            .domains
            .lock()
            .map_err(|_| io::Error::other("policy store lock poisoned"))?;
        let mut loaded = 0;
        for policy in saved.policies {
            if policy.is_expired(now) || domains.len() >= self.config.max_policies {
                continue;
            }
            let state = domains.entry(policy.domain.clone()).or_default();
            let newer = state
                .policy
                .as_ref()
                .is_none_or(|held| held.fetched_at < policy.fetched_at);
            if newer {
                state.policy = Some(Arc::new(policy));
                loaded += 1;
            }
        }
        Ok(loaded)
    }
}

/// The file the policies are saved in: beside the outcome cache file, `cache.json` giving
/// `cache.mta-sts.json`.
pub fn policy_file(cache_file: &Path) -> PathBuf {
    let stem = cache_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cache".into());
    cache_file.with_file_name(format!("{stem}.mta-sts.json"))
}

fn normalize(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_policy(mode: &str, max_age: u64, fetched_at: u64) -> StsPolicy {
        let raw = format!("version: STSv1\nmode: {mode}\nmx: mx.example.com\nmax_age: {max_age}\n");
        let text = parse_policy(&raw).expect("a valid policy");
        StsPolicy {
            domain: "example.com".into(),
            id: "a1".into(),
            mode: text.mode,
            mx: text.mx,
            max_age: text.max_age,
            fetched_at,
            expires_at: fetched_at + max_age,
            raw,
        }
    }

    #[test]
    fn a_policy_from_the_fleet_is_checked_as_a_fetched_one() {
        const NOW: u64 = 1_796_040_000;
        let skew = Duration::from_secs(60);
        let check = |policy: &StsPolicy, held: Option<&StsPolicy>| {
            let json = serde_json::to_string(policy).expect("json");
            checked_policy(&json, "example.com", NOW, skew, held)
        };
        let good = shared_policy("enforce", 86_400, NOW - 10);
        assert_eq!(check(&good, None), Ok(good.clone()));
        // Fields that say more than the text: the text wins, or it is refused.
        let mut lying = good.clone();
        lying.mode = Mode::None;
        assert!(check(&lying, None).is_err());
        let mut forever = good.clone();
        forever.expires_at = u64::MAX;
        assert_eq!(
            check(&forever, None).map(|p| p.expires_at),
            Ok(NOW - 10 + 86_400)
        );
        // Fetched in the future.
        let future = shared_policy("enforce", 86_400, NOW + 86_400);
        assert!(check(&future, None).is_err());
        // For another domain.
        let mut elsewhere = good.clone();
        elsewhere.domain = "other.example".into();
        assert!(check(&elsewhere, None).is_err());
        // A weaker policy under the id of an enforce policy held here: refused; a stricter
        // one, or one under a new id, is taken.
        let none = shared_policy("none", 86_400, NOW - 5);
        assert!(check(&none, Some(&good)).is_err());
        let testing = shared_policy("testing", 86_400, NOW - 5);
        assert!(check(&testing, Some(&good)).is_err());
        assert!(check(&good, Some(&testing)).is_ok());
        let mut renewed = none.clone();
        renewed.id = "a2".into();
        assert!(check(&renewed, Some(&good)).is_ok());
        // Under the same id, another MX list is another policy.
        let mut wider = shared_policy("enforce", 86_400, NOW - 5);
        wider.raw = wider.raw.replace(
            "mx: mx.example.com\n",
            "mx: mx.example.com\nmx: *.attacker.example\n",
        );
        wider.mx = parse_policy(&wider.raw).expect("valid").mx;
        assert!(check(&wider, Some(&good)).is_err());
    }

    const GOOD: &str = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n";

    #[test]
    fn a_good_policy_parses_with_crlf_or_lf() {
        let policy = parse_policy(GOOD).unwrap();
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.max_age, 604_800);
        assert_eq!(policy.mx.len(), 2);
        assert_eq!(parse_policy(&GOOD.replace("\r\n", "\n")).unwrap(), policy);
        // Unknown keys are extensions: ignored.
        let extended = format!("{GOOD}future_key: anything\n");
        assert_eq!(parse_policy(&extended).unwrap(), policy);
    }

    #[test]
    fn a_malformed_policy_is_refused_with_the_reason() {
        let cases = [
            ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
            (
                "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
                "STSv1",
            ),
            (
                "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
                "unknown mode",
            ),
            (
                "version: STSv1\nmode: enforce\nmax_age: 1\n",
                "without any mx",
            ),
            ("version: STSv1\nmode: enforce\nmx: a.example\n", "max_age"),
            (
                "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
                "digits",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n",
                "digits",
            ),
            (
                "version: STSv1\nmode: enforce\nmode: testing\nmx: a\nmax_age: 1\n",
                "twice",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a..b\nmax_age: 1\n",
                "host name",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: *.*.a\nmax_age: 1\n",
                "host name",
            ),
            ("<html>version: STSv1</html>\n", "field name"),
            ("version STSv1\n", "key: value"),
        ];
        for (text, why) in cases {
            let error = parse_policy(text).expect_err(text);
            assert!(error.contains(why), "{text:?}: {error}");
        }
        // `none` needs no mx.
        assert!(parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n").is_ok());
    }

    #[test]
    fn max_age_is_capped_at_a_year() {
        let text = "version: STSv1\nmode: testing\nmx: a.example\nmax_age: 9999999999\n";
        assert_eq!(parse_policy(text).unwrap().max_age, MAX_AGE_LIMIT);
    }

    #[test]
    fn a_wildcard_matches_exactly_one_label() {
        let wild = MxPattern::parse("*.Example.com.").unwrap();
        assert!(wild.matches("mx1.example.com"));
        assert!(wild.matches("MX1.EXAMPLE.COM."));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("a.b.example.com"));
        assert!(!wild.matches("mx1.example.org"));
        let exact = MxPattern::parse("mail.example.com").unwrap();
        assert!(exact.matches("mail.example.com"));
        assert!(!exact.matches("x.mail.example.com"));
    }

    #[test]
    fn txt_records_need_exactly_one_valid_stsv1_record() {
        let one = |r: &str| parse_txt_records(&[r.to_string()]);
        assert_eq!(
            one("v=STSv1; id=20160831085700Z;"),
            Ok("20160831085700Z".into())
        );
        assert_eq!(one("v=STSv1;id=abc"), Ok("abc".into()));
        assert_eq!(one("v=STSv1; id=abc; ext=value"), Ok("abc".into()));
        assert!(one("v=STSv1; id=").is_err());
        assert!(one("v=STSv1; id=has-dash").is_err());
        assert!(one("v=STSv1;").is_err());
        assert!(one("v=STSv1; id=a; id=b").is_err());
        assert!(one(&format!("v=STSv1; id={}", "a".repeat(33))).is_err());
        assert!(one("v=STSv10; id=a").is_err());
        let others = ["v=spf1 -all".to_string(), "v=STSv1; id=a".to_string()];
        assert_eq!(parse_txt_records(&others), Ok("a".into()));
        let two = ["v=STSv1; id=a".to_string(), "v=STSv1; id=b".to_string()];
        assert!(parse_txt_records(&two).is_err());
    }

    #[test]
    fn the_config_sections_refuse_unknown_keys_and_default_to_on_without_reports() {
        use crate::config::Config;
        let config = Config::parse("", Path::new("t.yaml")).unwrap();
        assert!(config.mta_sts.enabled);
        assert_eq!(config.mta_sts.wait, Duration::from_secs(2));
        assert!(config.tls_rpt.directory.is_none());
        let error = Config::parse("mta_sts:\n  wiat: 2s\n", Path::new("t.yaml")).unwrap_err();
        assert!(error.to_string().starts_with("t.yaml:2:3: "), "{error}");
        let error =
            Config::parse("tls_rpt:\n  mail_relay: nowhere\n", Path::new("t.yaml")).unwrap_err();
        assert!(error.to_string().starts_with("t.yaml:2:"), "{error}");
        let config = Config::parse(
            "mta_sts:\n  connect_to: { \"mta-sts.lab.test\": \"127.0.0.1:8443\" }\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        assert_eq!(
            config.mta_sts.connect_to.get("mta-sts.lab.test"),
            Some(&"127.0.0.1:8443".parse().unwrap())
        );
    }

    #[test]
    fn the_policy_file_sits_beside_the_cache_file() {
        assert_eq!(
            policy_file(Path::new("/var/lib/tlsrouter/cache.json")),
            Path::new("/var/lib/tlsrouter/cache.mta-sts.json")
        );
    }
}
