//! The daemon's configuration: YAML with embedded defaults, validated completely before any
//! socket is bound. Every error names file, line and column.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::smtp::data::BareLineEndings;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The name we give in EHLO to remote servers and in our greeting to the MTA.
    pub hostname: Hostname,
    pub listen: SocketAddr,
    pub allow_clients: Vec<ClientNet>,
    /// The rule list; none means the shipped rules/default.yaml, embedded.
    pub rules_file: Option<PathBuf>,
    pub resolver: ResolverConfig,
    pub tls: TlsConfig,
    pub delivery: DeliveryConfig,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub cache: crate::cache::CacheConfig,
    pub mta_sts: crate::policy::mta_sts::MtaStsConfig,
    pub tls_rpt: crate::policy::tlsrpt::TlsRptConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: Hostname::of_this_machine(),
            listen: SocketAddr::from(([127, 0, 0, 1], 10025)),
            allow_clients: vec![
                ClientNet("127.0.0.0/8".parse().expect("literal")),
                ClientNet("::1/128".parse().expect("literal")),
            ],
            rules_file: None,
            resolver: ResolverConfig::default(),
            tls: TlsConfig::default(),
            delivery: DeliveryConfig::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            cache: crate::cache::CacheConfig::default(),
            mta_sts: crate::policy::mta_sts::MtaStsConfig::default(),
            tls_rpt: crate::policy::tlsrpt::TlsRptConfig::default(),
            admin: AdminConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// `ip:port` of the name servers to ask; empty means the system's (resolv.conf).
    pub nameservers: Vec<SocketAddr>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Extra root certificates (PEM) to trust besides, or instead of, the system's.
    pub ca_file: Option<PathBuf>,
    /// Trust the operating system's root certificates.
    pub system_roots: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca_file: None,
            system_roots: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// The port of remote MX servers: 25 on the Internet, anything in a lab.
    pub port: u16,
    /// What to do with a bare CR or LF in a message body.
    pub bare_line_endings: BareLineEndings,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            port: 25,
            bare_line_endings: BareLineEndings::Normalize,
        }
    }
}

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
            shutdown_drain: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message accepted, in octets (advertised as SIZE).
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// Concurrent MTA sessions; more get 421 4.3.2.
    pub max_sessions: usize,
    /// Concurrent sessions from one client address; more get 421 4.3.2.
    pub max_sessions_per_client: usize,
    /// Longest command line, CRLF included.
    pub command_line: usize,
    /// Longest body line, CRLF included.
    pub text_line: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 1000,
            max_sessions: 200,
            max_sessions_per_client: 100,
            command_line: 512,
            text_line: 1000,
        }
    }
}

/// Where `tlsrouter ctl` finds the daemon unless told otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tlsrouter/admin.sock";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin socket; `null` turns it off.
    pub socket: Option<PathBuf>,
    /// The socket's permissions, octal.
    pub mode: FileMode,
    /// The socket's group (name or number), for admins who are not root.
    pub group: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: Some(PathBuf::from(DEFAULT_ADMIN_SOCKET)),
            mode: FileMode(0o660),
            group: None,
        }
    }
}

/// Unix permissions written in octal, like `0660`. Never writable by others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FileMode(pub u32);

impl TryFrom<String> for FileMode {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| format!("{text:?} is not an octal mode like 0660"))?;
        if mode & 0o002 != 0 {
            return Err(format!("{text:?} lets anyone write to the admin socket"));
        }
        Ok(FileMode(mode))
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `ip:port` of the Prometheus endpoint (`GET /metrics`); `null` (the default) is off.
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug` (shows the SMTP dialogue), `tlsrouter=debug,warn`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// A host name for EHLO: letters, digits, hyphens and dots.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Hostname(pub String);

impl Hostname {
    fn of_this_machine() -> Hostname {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .and_then(|name| Hostname::try_from(name.trim().to_string()).ok())
            .unwrap_or_else(|| Hostname("localhost".into()))
    }
}

impl TryFrom<String> for Hostname {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if valid {
            Ok(Hostname(name))
        } else {
            Err(format!("{name:?} is not a valid host name"))
        }
    }
}

/// A client network: a CIDR (`10.0.0.0/8`) or a single address (`192.0.2.1`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ClientNet(pub IpNet);

impl ClientNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

impl TryFrom<String> for ClientNet {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(ClientNet(net));
        }
        s.parse::<IpAddr>()
            .map(|ip| ClientNet(IpNet::from(ip)))
            .map_err(|_| format!("{s:?} is neither an address nor a CIDR network"))
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

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses YAML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_saphyr::from_str::<Config>(text).map_err(|e| yaml_error(path, &e))
    }
}

/// Turns a YAML error into `file:line:column: message`, without the snippet rendering.
pub fn yaml_error(path: &Path, error: &serde_saphyr::Error) -> ConfigError {
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
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.yaml"))
    }

    #[test]
    fn empty_file_gives_the_embedded_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.listen, "127.0.0.1:10025".parse().unwrap());
        assert!(config.allow_clients[0].contains("127.0.0.1".parse().unwrap()));
        assert_eq!(config.delivery.port, 25);
        assert_eq!(config.timeouts.data_end, Duration::from_secs(600));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_line_and_column() {
        let err = parse("listen: 127.0.0.1:25\ntimeouts:\n  conect: 5s\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("t.yaml:3:3: "), "{text}");
        assert!(text.contains("conect"), "{text}");

        let err = parse("allow_clients:\n  - 10.0.0.0/8\n  - bogus\n").unwrap_err();
        assert!(err.to_string().starts_with("t.yaml:3:5: "), "{err}");

        let err = parse("timeouts:\n  connect: 5 parsecs\n").unwrap_err();
        assert!(err.to_string().starts_with("t.yaml:2:12: "), "{err}");
        assert!(err.to_string().contains("unknown unit"), "{err}");
    }

    #[test]
    fn the_shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tlsrouter.yaml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.hostname.0, "relay.example.com");
    }

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration::parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(duration::parse("5").is_err());
        assert!(duration::parse("m").is_err());
        assert_eq!(
            duration::parse("3650d"),
            Ok(Duration::from_secs(3650 * 86_400))
        );
        assert!(duration::parse("3651d").is_err());
        assert!(duration::parse("18446744073709551615d").is_err());
        let err = parse("timeouts:\n  dns: 99999999999d\n").unwrap_err();
        assert!(err.to_string().starts_with("t.yaml:2:"), "{err}");
    }
}
