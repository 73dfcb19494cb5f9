//! What a domain publishes, parsed strictly: the `_mta-sts` TXT record, the policy text,
//! its `mx` patterns; and a policy another relay shared, checked as a fetched one.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// RFC 8461 3.2: `max_age` is at most a year.
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

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

/// Why a policy text is not a valid policy (RFC 8461 3.2).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("line {0}: no \"key: value\"")]
    NoKeyValue(usize),
    #[error("line {line}: {key:?} is not a field name")]
    FieldName { line: usize, key: String },
    #[error("line {line}: version {value:?} is not STSv1")]
    Version { line: usize, value: String },
    #[error("line {line}: {key} given twice")]
    Twice { line: usize, key: String },
    #[error("line {line}: unknown mode {value:?}")]
    UnknownMode { line: usize, value: String },
    #[error("line {line}: max_age {value:?} is not 1 to 10 digits")]
    MaxAge { line: usize, value: String },
    #[error("line {line}: {error}")]
    Mx { line: usize, error: NotAnMxPattern },
    #[error("no \"version: STSv1\"")]
    NoVersion,
    #[error("no mode")]
    NoMode,
    #[error("no max_age")]
    NoMaxAge,
    #[error("mode {0} without any mx")]
    NoMx(Mode),
}

/// An `mx:` value that is neither a host name nor `*.` and a domain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("mx {0:?} is not a host name or *.domain")]
pub struct NotAnMxPattern(pub String);

/// Why a domain's `_mta-sts` TXT answer names no policy (RFC 8461 3.1).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxtError {
    #[error("no v=STSv1 record")]
    NoRecord,
    #[error("{0} v=STSv1 records, RFC 8461 wants one")]
    Several(usize),
    #[error("{0:?} does not start with v=STSv1")]
    NotStsv1(String),
    #[error("{0:?} is not name=value")]
    NotNameValue(String),
    #[error("{0:?} is not a valid field")]
    BadField(String),
    #[error("id given twice")]
    IdTwice,
    #[error("id {0:?} is not 1 to 32 letters and digits")]
    BadId(String),
    #[error("no id")]
    NoId,
}

/// Why a policy another relay shared is not believed.
#[derive(Debug, thiserror::Error)]
pub enum SharedPolicyError {
    #[error("does not parse ({0})")]
    Json(serde_json::Error),
    #[error("is for {found}, not {domain}")]
    OtherDomain { found: String, domain: String },
    #[error("has the id {0:?}, not 1 to 32 letters and digits")]
    BadId(String),
    #[error("quotes no valid policy ({0})")]
    Text(TextError),
    #[error(
        "says mode {mode}, max_age {max_age} where the text it quotes says mode {text_mode}, \
         max_age {text_max_age}"
    )]
    Disagrees {
        mode: Mode,
        max_age: u64,
        text_mode: Mode,
        text_max_age: u64,
    },
    #[error(
        "was fetched {0}s ahead of this relay's clock, more than cache.redis.clock_skew allows"
    )]
    Ahead(u64),
    #[error("says mode {mode} (mx {mx}) under the id {id} of the enforce policy held here")]
    Weakens { mode: Mode, mx: String, id: String },
}

/// A policy's `mx:` value: a host name, or `*.` and a domain (RFC 8461 4.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MxPattern(String);

impl MxPattern {
    pub fn parse(text: &str) -> Result<MxPattern, NotAnMxPattern> {
        let lower = text.trim_end_matches('.').to_ascii_lowercase();
        let name = lower.strip_prefix("*.").unwrap_or(&lower);
        if !is_host_name(name) {
            return Err(NotAnMxPattern(text.to_string()));
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
    type Error = NotAnMxPattern;
    fn try_from(text: String) -> Result<Self, NotAnMxPattern> {
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
pub fn parse_policy(text: &str) -> Result<PolicyText, TextError> {
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
        let (key, value) = line.split_once(':').ok_or(TextError::NoKeyValue(line_no))?;
        let key = key.trim_end_matches([' ', '\t']);
        let value = value.trim_matches([' ', '\t']);
        if key.is_empty() || !key.bytes().all(is_field_name_byte) {
            return Err(TextError::FieldName {
                line: line_no,
                key: key.to_string(),
            });
        }
        match key {
            "version" => {
                once(&version, key, line_no)?;
                if value != "STSv1" {
                    return Err(TextError::Version {
                        line: line_no,
                        value: value.to_string(),
                    });
                }
                version = Some(());
            }
            "mode" => {
                once(&mode, key, line_no)?;
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    _ => {
                        return Err(TextError::UnknownMode {
                            line: line_no,
                            value: value.to_string(),
                        });
                    }
                });
            }
            "max_age" => {
                once(&max_age, key, line_no)?;
                let bad = || TextError::MaxAge {
                    line: line_no,
                    value: value.to_string(),
                };
                if value.is_empty()
                    || value.len() > 10
                    || !value.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(bad());
                }
                let seconds: u64 = value.parse().map_err(|_| bad())?;
                max_age = Some(seconds.min(MAX_AGE_LIMIT));
            }
            "mx" => mx.push(MxPattern::parse(value).map_err(|error| TextError::Mx {
                line: line_no,
                error,
            })?),
            _ => {}
        }
    }
    if version.is_none() {
        return Err(TextError::NoVersion);
    }
    let mode = mode.ok_or(TextError::NoMode)?;
    let max_age = max_age.ok_or(TextError::NoMaxAge)?;
    if mx.is_empty() && mode != Mode::None {
        return Err(TextError::NoMx(mode));
    }
    Ok(PolicyText { mode, mx, max_age })
}

/// A field that may be given only once.
fn once<T>(slot: &Option<T>, key: &str, line_no: usize) -> Result<(), TextError> {
    match slot {
        Some(_) => Err(TextError::Twice {
            line: line_no,
            key: key.to_string(),
        }),
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
pub fn parse_txt_records(records: &[String]) -> Result<String, TxtError> {
    let candidates: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.strip_prefix("v=STSv1")
                .is_some_and(|rest| rest.trim_start_matches([' ', '\t']).starts_with(';'))
        })
        .collect();
    match candidates.as_slice() {
        [] => Err(TxtError::NoRecord),
        [one] => parse_txt_record(one),
        more => Err(TxtError::Several(more.len())),
    }
}

fn parse_txt_record(record: &str) -> Result<String, TxtError> {
    let mut fields = record.split(';').map(|f| f.trim_matches([' ', '\t']));
    if fields.next() != Some("v=STSv1") {
        return Err(TxtError::NotStsv1(record.to_string()));
    }
    let mut id = None;
    for field in fields {
        if field.is_empty() {
            continue;
        }
        let (name, value) = field
            .split_once('=')
            .ok_or_else(|| TxtError::NotNameValue(field.to_string()))?;
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
            return Err(TxtError::BadField(field.to_string()));
        }
        if name == "id" {
            if id.is_some() {
                return Err(TxtError::IdTwice);
            }
            if value.len() > 32 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(TxtError::BadId(value.to_string()));
            }
            id = Some(value.to_string());
        }
    }
    id.ok_or(TxtError::NoId)
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
    pub(super) fn wants_refresh(&self, now: u64) -> bool {
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
) -> Result<StsPolicy, SharedPolicyError> {
    let shared: StsPolicy = serde_json::from_str(json).map_err(SharedPolicyError::Json)?;
    if shared.domain != domain {
        return Err(SharedPolicyError::OtherDomain {
            found: shared.domain,
            domain: domain.to_string(),
        });
    }
    if shared.id.is_empty()
        || shared.id.len() > 32
        || !shared.id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(SharedPolicyError::BadId(shared.id));
    }
    let text = parse_policy(&shared.raw).map_err(SharedPolicyError::Text)?;
    if (text.mode, &text.mx, text.max_age) != (shared.mode, &shared.mx, shared.max_age) {
        return Err(SharedPolicyError::Disagrees {
            mode: shared.mode,
            max_age: shared.max_age,
            text_mode: text.mode,
            text_max_age: text.max_age,
        });
    }
    let ahead = shared.fetched_at.saturating_sub(now);
    if ahead > clock_skew.as_secs() {
        return Err(SharedPolicyError::Ahead(ahead));
    }
    if let Some(held) = held
        && held.id == shared.id
        && held.mode == Mode::Enforce
        && (text.mode != Mode::Enforce || text.mx != held.mx)
    {
        let mx: Vec<&str> = text.mx.iter().map(MxPattern::as_str).collect();
        return Err(SharedPolicyError::Weakens {
            mode: text.mode,
            mx: mx.join(", "),
            id: held.id.clone(),
        });
    }
    Ok(StsPolicy {
        expires_at: shared.fetched_at.saturating_add(text.max_age),
        mode: text.mode,
        mx: text.mx,
        max_age: text.max_age,
        ..shared
    })
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
        assert_eq!(check(&good, None).ok(), Some(good.clone()));
        // Fields that say more than the text: the text wins, or it is refused.
        let mut lying = good.clone();
        lying.mode = Mode::None;
        assert!(matches!(
            check(&lying, None),
            Err(SharedPolicyError::Disagrees { .. })
        ));
        let mut forever = good.clone();
        forever.expires_at = u64::MAX;
        assert_eq!(
            check(&forever, None).map(|p| p.expires_at).ok(),
            Some(NOW - 10 + 86_400)
        );
        // Fetched in the future.
        let future = shared_policy("enforce", 86_400, NOW + 86_400);
        assert!(matches!(
            check(&future, None),
            Err(SharedPolicyError::Ahead(86_400))
        ));
        // For another domain.
        let mut elsewhere = good.clone();
        elsewhere.domain = "other.example".into();
        assert!(matches!(
            check(&elsewhere, None),
            Err(SharedPolicyError::OtherDomain { .. })
        ));
        // A weaker policy under the id of an enforce policy held here: refused; a stricter
        // one, or one under a new id, is taken.
        let none = shared_policy("none", 86_400, NOW - 5);
        assert!(matches!(
            check(&none, Some(&good)),
            Err(SharedPolicyError::Weakens {
                mode: Mode::None,
                ..
            })
        ));
        let testing = shared_policy("testing", 86_400, NOW - 5);
        assert!(matches!(
            check(&testing, Some(&good)),
            Err(SharedPolicyError::Weakens { .. })
        ));
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
        assert!(matches!(
            check(&wider, Some(&good)),
            Err(SharedPolicyError::Weakens { .. })
        ));
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
            assert!(error.to_string().contains(why), "{text:?}: {error}");
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
}
