//! The values configuration sections share, kept apart from the assembled
//! [`crate::config::Config`] so that the modules whose sections it assembles can use them:
//! durations, timeouts, errors that name file, line and column, and the one error of the
//! start-up that names the setting at fault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Timeouts; the defaults are RFC 5321 4.5.3.2's.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect, per MX address.
    #[serde(with = "duration")]
    pub connect: Duration,
    /// Waiting for a remote's 220 greeting.
    #[serde(with = "duration")]
    pub greeting: Duration,
    /// A remote's reply to EHLO, STARTTLS, MAIL, RCPT, RSET.
    #[serde(with = "duration")]
    pub command: Duration,
    /// The TLS handshake after STARTTLS.
    #[serde(with = "duration")]
    pub tls_handshake: Duration,
    /// A remote's reply to DATA (the 354).
    #[serde(with = "duration")]
    pub data_start: Duration,
    /// Sending one block of the body to the remote.
    #[serde(with = "duration")]
    pub data_block: Duration,
    /// A remote's reply after the final dot.
    #[serde(with = "duration")]
    pub data_end: Duration,
    /// The MTA's silence before we close its session.
    #[serde(with = "duration")]
    pub client_idle: Duration,
    /// DNS lookups.
    #[serde(with = "duration")]
    pub dns: Duration,
    /// How long one recipient's route may take to find a server (every MX host and address
    /// tried); after it, no further server is tried and the MTA hears what was.
    #[serde(with = "duration")]
    pub route: Duration,
    /// At shutdown, how long transactions in flight may take to finish.
    #[serde(with = "duration")]
    pub shutdown_drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: min(5),
            command: min(5),
            tls_handshake: Duration::from_secs(60),
            data_start: min(2),
            data_block: min(3),
            data_end: min(10),
            client_idle: min(5),
            dns: Duration::from_secs(10),
            route: min(3),
            shutdown_drain: Duration::from_secs(30),
        }
    }
}

/// Durations written as `30s`, `5m`, `1h`, `7d` or `250ms`.
pub mod duration {
    use serde::Deserialize;
    use std::time::Duration;

    /// Longer is a typo, and would overflow the clock arithmetic it goes into.
    const LONGEST: Duration = Duration::from_secs(10 * 365 * 86_400);

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like 30s, 5m, 1h or 7d"))?;
        let duration = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(format!("{s:?} has an unknown unit (use ms, s, m, h or d)")),
        };
        if duration > LONGEST {
            return Err(format!("{s:?} is longer than ten years"));
        }
        Ok(duration)
    }

    /// As written in a configuration: the largest unit that says it exactly (`30d`, `90m`).
    pub fn format(duration: Duration) -> String {
        let seconds = duration.as_secs();
        if duration.subsec_nanos() != 0 || seconds == 0 {
            return format!("{}ms", duration.as_millis());
        }
        let unit = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")]
            .into_iter()
            .find(|(size, _)| seconds.is_multiple_of(*size))
            .unwrap_or((1, "s"));
        format!("{}{}", seconds / unit.0, unit.1)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The io error is part of the message, not a `source()`: printed as a chain it would
    /// otherwise appear twice.
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
}

/// The port the MTA connects to by default: none a common Postfix recipe uses (10023 is
/// postgrey's, 10024 to 10028 are content filters' and their re-injection: amavis,
/// clamsmtp, spampd, dkimproxy), so that tlsrouter starts beside them as it comes.
pub const DEFAULT_LISTEN_PORT: u16 = 11025;

/// A file kept beside the cache file, named after it: `cache.json` and `ledger` make
/// `cache.ledger.json`.
pub fn file_beside(cache_file: &Path, what: &str) -> PathBuf {
    let stem = cache_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cache".into());
    cache_file.with_file_name(format!("{stem}.{what}.json"))
}

/// Turns a YAML error in `text` into `file:line:column: message`, without the snippet
/// rendering, and with what to type instead where a first configuration often goes wrong.
pub fn yaml_error(path: &Path, text: &str, error: &serde_saphyr::Error) -> ConfigError {
    let (line, column) = error
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let message = error.without_snippet().to_string();
    // The message repeats the position it was given; keep only what it says.
    let message = message
        .split_once(" at line ")
        .map(|(m, _)| m.to_string())
        .unwrap_or(message);
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        column,
        message: with_fix(message, text, line as usize, column as usize),
    }
}

/// `message` with what to type instead, where it can be told, from the `text` at the
/// error's `line` and `column` (both from 1).
fn with_fix(message: String, text: &str, line: usize, column: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let this = lines.get(line.wrapping_sub(1)).copied().unwrap_or("");
    let at = this.get(column.saturating_sub(1)..).unwrap_or("");
    // A key's error points at the key: its value follows it.
    let is_key = |k: &str| !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || c == '_');
    let at = match at.split_once(": ") {
        Some((key, value)) if is_key(key) => value,
        _ => at,
    };
    // The value as written there: up to the end of a flow item or of the line.
    let token = at
        .split([',', ']', '}', '#'])
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches(|c| c == '"' || c == '\'');
    if message.contains("alias references unknown anchor") && token.starts_with('*') {
        return format!(
            "a value that starts with `*` must be quoted in YAML: write \"{token}\" instead of {token}"
        );
    }
    if message.contains("invalid socket address syntax") {
        let (port, what) = match key_of(&lines, line, column) {
            Some("nameservers") => ("53".to_string(), "a name server"),
            Some("listen") => (DEFAULT_LISTEN_PORT.to_string(), "a listener"),
            _ => ("PORT".to_string(), "it"),
        };
        let example = match token.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(ip)) => format!("\"[{ip}]:{port}\""),
            Ok(ip) => format!("\"{ip}:{port}\""),
            Err(_) => format!("\"127.0.0.1:{port}\""),
        };
        return format!(
            "{token:?} is not an address with a port: write IP:PORT, e.g. {example} for {what} (an IPv6 address in brackets)"
        );
    }
    if message.contains("expected a nonzero usize") {
        return format!("{token:?} is not allowed here: write a whole number, 1 or more");
    }
    if let Some(suggestion) = did_you_mean(&message) {
        return format!("{message}; did you mean `{suggestion}`?");
    }
    message
}

/// The key whose value is at `line` and `column`: on the line itself (`key: value`), or
/// for an item of a block list, on the nearest line above that is less indented.
fn key_of<'a>(lines: &[&'a str], line: usize, column: usize) -> Option<&'a str> {
    let this = lines.get(line.checked_sub(1)?)?;
    let before = this.get(..column.saturating_sub(1)).unwrap_or(this);
    if let Some((key, _)) = before.rsplit_once(':') {
        return key.rsplit(['{', ',', ' ']).next().map(str::trim);
    }
    let indent = this.len() - this.trim_start().len();
    let above = lines[..line - 1].iter().rev();
    let parent = above.into_iter().find(|l| {
        let trimmed = l.trim_start();
        !trimmed.is_empty() && l.len() - trimmed.len() < indent
    })?;
    parent.trim().strip_suffix(':')
}

/// For "unknown field `x`, expected one of a, b" (and variants): the one meant, when one
/// is close enough to be a slip of the keyboard.
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (given, rest) = rest.split_once('`')?;
    let expected = rest.split_once("expected one of ")?.1;
    expected
        .split(", ")
        .map(|name| name.trim_matches('`'))
        .map(|name| (edit_distance(given, name), name))
        .filter(|(distance, name)| *distance <= (name.len() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name.to_string())
}

/// Edits from `a` to `b`, a swap of two neighbours counting as one (`jsno` is one from
/// `json`), ignoring case, `-` and `_` (`fallback-on` is `fallback_on`).
fn edit_distance(a: &str, b: &str) -> usize {
    let norm = |s: &str| -> Vec<char> {
        s.chars()
            .map(|c| {
                if c == '-' {
                    '_'
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    };
    let (a, b) = (norm(a), norm(b));
    // d[i][j]: edits from a[..i] to b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// Why the daemon cannot start with these settings: the configuration's text, or a setting
/// whose value cannot be used (a file, a group, an address), named with what it names.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The problem is part of the message, not a `source()`: printed as a chain it would
    /// otherwise appear twice.
    #[error("{setting}: {problem}")]
    Setting {
        /// `tls.ca_file /etc/ssl/ours.pem`, `admin.group`...
        setting: String,
        problem: Problem,
    },
    /// An error that names its setting itself (`cache.redis: ...`).
    #[error(transparent)]
    Named(Problem),
}

/// What is wrong with a setting's value.
pub type Problem = Box<dyn std::error::Error + Send + Sync>;

impl SetupError {
    /// The error, after `file:line:column` of the setting it names when that can be found
    /// in `file` (the configuration it came from).
    pub fn at_setting(&self, file: Option<&Path>) -> String {
        let text = format!("{self:#}");
        let SetupError::Setting { setting, .. } = self else {
            return text;
        };
        let key = setting.split_whitespace().next().unwrap_or(setting);
        let found = file.and_then(|file| {
            let source = std::fs::read_to_string(file).ok()?;
            Some((file, locate(&source, key)?))
        });
        match found {
            Some((file, (line, column))) => format!("{}:{line}:{column}: {text}", file.display()),
            None => text,
        }
    }

    pub fn setting(setting: impl Into<String>, problem: impl Into<Problem>) -> SetupError {
        SetupError::Setting {
            setting: setting.into(),
            problem: problem.into(),
        }
    }

    /// A problem with the file `path` that `setting` names.
    pub fn file(setting: &str, path: &Path, problem: impl Into<Problem>) -> SetupError {
        SetupError::setting(format!("{setting} {}", path.display()), problem)
    }
}

/// Where the dotted `key` (`admin.group`) is set in the YAML `text`, block or flow style:
/// its line and column, from 1.
fn locate(text: &str, key: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    // The line and column of the part found last, and its indentation.
    let mut found: Option<(usize, usize, usize)> = None;
    for part in key.split('.') {
        let needle = format!("{part}:");
        // In a flow mapping on the same line: `admin: { group: x }`.
        let flow = found.and_then(|(line, column, _)| {
            let rest = lines[line - 1].get(column..)?;
            let at = rest
                .match_indices(&needle)
                .find(|(at, _)| rest[..*at].ends_with(['{', ' ', ',']))?;
            Some((line, column + at.0 + 1))
        });
        if let Some((line, column)) = flow {
            found = Some((line, column, found.map_or(0, |f| f.2)));
            continue;
        }
        let (from, parent) = found.map_or((0, None), |(line, _, indent)| (line, Some(indent)));
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(from) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            match parent {
                Some(parent) if indent <= parent => break,
                None if indent != 0 => continue,
                _ => {}
            }
            if trimmed.starts_with(&needle) {
                hit = Some((i + 1, indent + 1, indent));
                break;
            }
        }
        found = Some(hit?);
    }
    found.map(|(line, column, _)| (line, column))
}

#[cfg(test)]
mod locate_tests {
    use super::locate;

    #[test]
    fn a_setting_is_found_in_block_and_flow_style_and_nowhere_else() {
        let text = "# tlsrouter\nrules_file: /x.yaml\nadmin:\n  socket: /run/a\n  group: admins\ncache: { file: /c }\n";
        assert_eq!(locate(text, "rules_file"), Some((2, 1)));
        assert_eq!(locate(text, "admin.group"), Some((5, 3)));
        assert_eq!(locate(text, "cache.file"), Some((6, 10)));
        assert_eq!(locate(text, "admin.file"), None);
        assert_eq!(locate(text, "group"), None, "only at the top level");
    }
}
