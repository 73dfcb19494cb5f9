//! The daemon's configuration: YAML with embedded defaults, validated completely before any
//! socket is bound. Every error names file, line and column.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ipnet::IpNet;
use serde::Deserialize;

pub use crate::settings::{ConfigError, Timeouts, duration, yaml_error};

use crate::net::dns::ResolverConfig;
use crate::net::tls::TlsConfig;
use crate::outbound::DeliveryConfig;
use crate::settings::DEFAULT_LISTEN_PORT;

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
    /// The per-domain ledger (`ctl domains`).
    pub ledger: crate::ledger::LedgerConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub console: ConsoleConfig,
    pub log: LogConfig,
    /// More listeners beside `listen` (which is always a smart-host listener).
    pub listeners: Vec<ListenerConfig>,
    pub inbound: InboundConfig,
}

/// `inbound:`: the side toward the MTA.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboundConfig {
    /// With a certificate and key, STARTTLS is offered to the MTA on every listener.
    pub tls: Option<crate::server_tls::InboundTlsConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: Hostname::of_this_machine(),
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_LISTEN_PORT)),
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
            ledger: crate::ledger::LedgerConfig::default(),
            admin: AdminConfig::default(),
            metrics: MetricsConfig::default(),
            console: ConsoleConfig::default(),
            log: LogConfig::default(),
            listeners: Vec::new(),
            inbound: InboundConfig::default(),
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

/// One entry of `listeners:`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    #[serde(default)]
    pub mode: ListenerMode,
}

/// Where a listener's next hop comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerMode {
    /// The MTA relays to us; the recipient domain's MX (or the rule's route) is the next hop.
    #[default]
    SmartHost,
    /// The MTA's connections to port 25 are redirected to us (nftables/iptables); the
    /// address it was connecting to is the next hop.
    Transparent,
}

/// Where the installed daemon's configuration is (the Debian package's, or on Windows the
/// MSI's under `%ProgramData%`): what the service runs with, and what `ctl` and `explain`
/// read when given none.
pub fn packaged_config() -> PathBuf {
    program_data().join("tlsrouter.yaml")
}

/// The folder of the installed daemon's own files: its configuration, and on Windows its
/// log (`log\`) and cache.
#[cfg(not(windows))]
pub fn program_data() -> PathBuf {
    PathBuf::from("/etc/tlsrouter")
}

#[cfg(windows)]
pub fn program_data() -> PathBuf {
    let base = std::env::var_os("ProgramData").unwrap_or_else(|| r"C:\ProgramData".into());
    PathBuf::from(base).join("tlsrouter")
}

/// Where `tlsrouter ctl` finds the daemon unless told otherwise.
#[cfg(not(windows))]
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tlsrouter/admin.sock";
/// On Windows the admin endpoint is a named pipe.
#[cfg(windows)]
pub const DEFAULT_ADMIN_SOCKET: &str = r"\\.\pipe\tlsrouter-admin";

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

impl AdminConfig {
    /// The socket's group as a number, from a number or a name in /etc/group.
    #[cfg(unix)]
    pub fn group_id(&self) -> Result<Option<u32>, crate::settings::SetupError> {
        let Some(group) = &self.group else {
            return Ok(None);
        };
        if let Ok(gid) = group.parse() {
            return Ok(Some(gid));
        }
        let groups = std::fs::read_to_string("/etc/group")
            .map_err(|e| crate::settings::SetupError::setting("admin.group: /etc/group", e))?;
        groups
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let gid = fields.nth(1)?.parse().ok()?;
                Some((name, gid))
            })
            .find_map(|(name, gid)| (name == group).then_some(Some(gid)))
            .ok_or_else(|| {
                crate::settings::SetupError::setting(
                    "admin.group",
                    format!(
                        "no group {group:?} on this host: create it (groupadd {group}) and add the admins to it, or remove admin.group"
                    ),
                )
            })
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

/// `console:`: the web console (docs/ADMIN.md), off by default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// `ip:port` of the console; `null` (the default) is off. Keep it on loopback.
    pub listen: Option<SocketAddr>,
    /// A file whose first line is the admin token the login form asks for; required with
    /// `listen`, readable by the daemon and by no one else.
    pub token_file: Option<PathBuf>,
}

impl ConsoleConfig {
    /// The admin token, from `token_file`, when the console is on: required then, and long
    /// enough not to be guessed.
    pub fn token(&self) -> Result<Option<String>, crate::settings::SetupError> {
        use crate::settings::SetupError;
        if self.listen.is_none() {
            return Ok(None);
        }
        let Some(path) = &self.token_file else {
            return Err(SetupError::setting(
                "console.listen",
                "the console needs console.token_file, a file whose first line is the admin token (make one with: openssl rand -hex 32 > /etc/tlsrouter/console.token; chmod 600 it)",
            ));
        };
        let text = crate::outbound::credentials::from_file(path)
            .map_err(|e| SetupError::setting("console.token_file", e))?;
        let token = text.lines().next().unwrap_or_default().trim().to_string();
        if token.len() < 16 {
            return Err(SetupError::setting(
                "console.token_file",
                format!(
                    "{}: the admin token has {} characters; give it 16 or more (openssl rand -hex 32)",
                    path.display(),
                    token.len()
                ),
            ));
        }
        Ok(Some(token))
    }
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
    /// `info`, `debug` (shows the SMTP dialogue): tlsrouter's level, libraries' errors only;
    /// or a tracing filter, taken as written: `tlsrouter=debug,warn`.
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
    /// Whether receivers can take it in EHLO: a domain name with a dot, not `localhost`.
    pub fn is_fully_qualified(&self) -> bool {
        self.0.contains('.')
            && !self
                .0
                .split('.')
                .next()
                .is_some_and(|label| label.eq_ignore_ascii_case("localhost"))
    }

    /// This machine's name as `hostname -f` gives it: the system's host name, or its
    /// canonical name from the system resolver (/etc/hosts, then DNS) when that is fully
    /// qualified. Looked up once per process.
    pub fn of_this_machine() -> Hostname {
        static NAME: OnceLock<Hostname> = OnceLock::new();
        NAME.get_or_init(|| {
            let short = dns_lookup::get_hostname().ok();
            let canonical = short.as_deref().and_then(canonical_name);
            Hostname::choose(short.as_deref(), canonical.as_deref())
        })
        .clone()
    }

    /// The first fully-qualified name of the host name and its canonical name, else the
    /// host name as it is, else `localhost`.
    fn choose(host_name: Option<&str>, canonical: Option<&str>) -> Hostname {
        let valid = |name: Option<&str>| {
            name.and_then(|n| Hostname::try_from(n.trim().trim_end_matches('.').to_string()).ok())
        };
        let (host_name, canonical) = (valid(host_name), valid(canonical));
        [&host_name, &canonical]
            .into_iter()
            .flatten()
            .find(|name| name.is_fully_qualified())
            .or(host_name.as_ref())
            .cloned()
            .unwrap_or_else(|| Hostname("localhost".into()))
    }
}

/// The canonical name of `host` from getaddrinfo (AI_CANONNAME).
#[cfg(unix)]
fn canonical_name(host: &str) -> Option<String> {
    let hints = dns_lookup::AddrInfoHints {
        flags: libc::AI_CANONNAME,
        address: 0,
        socktype: libc::SOCK_STREAM,
        protocol: 0,
    };
    dns_lookup::getaddrinfo(Some(host), None, Some(hints))
        .ok()?
        .filter_map(Result::ok)
        .find_map(|info| info.canonname)
}

#[cfg(not(unix))]
fn canonical_name(_host: &str) -> Option<String> {
    None
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

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Config::parse(&text, path)
    }

    /// Parses YAML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_saphyr::from_str::<Config>(text).map_err(|e| yaml_error(path, text, &e))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.yaml"))
    }

    #[test]
    fn a_transparent_listener_runs_beside_the_smart_host_listener() {
        let config = parse(
            "listeners:\n  - { listen: 127.0.0.1:10026, mode: transparent }\n  - listen: 127.0.0.1:2525\n",
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:11025".parse().unwrap());
        assert_eq!(config.listeners[0].mode, ListenerMode::Transparent);
        assert_eq!(config.listeners[1].mode, ListenerMode::SmartHost);
        let err = parse("listeners:\n  - { listen: 127.0.0.1:1, mode: tproxy }\n").unwrap_err();
        assert!(err.to_string().contains("tproxy"), "{err}");
    }

    #[test]
    fn empty_file_gives_the_embedded_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.listen, "127.0.0.1:11025".parse().unwrap());
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

    /// The error's position, and what it says to type instead.
    fn invalid(text: &str) -> (u64, u64, String) {
        match parse(text).unwrap_err() {
            ConfigError::Invalid {
                line,
                column,
                message,
                ..
            } => (line, column, message),
            other => panic!("not a config error: {other}"),
        }
    }

    #[test]
    fn an_address_without_a_port_is_shown_with_one_for_what_it_is_for() {
        let (line, column, message) = invalid("listen: 127.0.0.1\n");
        assert_eq!((line, column), (1, 9));
        assert!(
            message.contains("\"127.0.0.1:11025\" for a listener"),
            "{message}"
        );
        let (_, _, message) = invalid("resolver:\n  nameservers: [\"192.0.2.53\"]\n");
        assert!(
            message.contains("\"192.0.2.53:53\" for a name server"),
            "{message}"
        );
        let (line, _, message) = invalid("resolver:\n  nameservers:\n    - \"::1\"\n");
        assert_eq!(line, 3);
        assert!(
            message.contains("\"[::1]:53\" for a name server"),
            "{message}"
        );
        let (_, _, message) = invalid("listeners:\n  - { listen: 127.0.0.1, mode: transparent }\n");
        assert!(
            message.contains("\"127.0.0.1:11025\" for a listener"),
            "{message}"
        );
    }

    #[test]
    fn a_misspelt_key_or_value_gets_the_one_meant() {
        let (_, _, message) = invalid("delivery:\n  max_mx_hostz: 3\n");
        assert!(
            message.ends_with("did you mean `max_mx_hosts`?"),
            "{message}"
        );
        let (_, _, message) = invalid("log:\n  format: jsno\n");
        assert!(message.ends_with("did you mean `json`?"), "{message}");
        // Nothing close: no guess.
        let (_, _, message) = invalid("delivery:\n  colour: blue\n");
        assert!(!message.contains("did you mean"), "{message}");
    }

    #[test]
    fn a_zero_where_one_or_more_is_needed_says_so() {
        let (line, _, message) = invalid("delivery:\n  max_waiting_per_server: 0\n");
        assert_eq!(line, 2);
        assert_eq!(
            message,
            "\"0\" is not allowed here: write a whole number, 1 or more"
        );
    }

    #[test]
    fn the_shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tlsrouter.yaml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.hostname.0, "relay.example.com");
    }

    #[test]
    fn the_default_name_is_the_first_fully_qualified_of_host_name_and_canonical_name() {
        let choose =
            |host: Option<&str>, canonical: Option<&str>| Hostname::choose(host, canonical).0;
        assert_eq!(choose(Some("vm"), Some("vm.example.com")), "vm.example.com");
        assert_eq!(
            choose(Some("mx1.example.com"), Some("other.example.com")),
            "mx1.example.com"
        );
        assert_eq!(
            choose(Some("vm"), Some("vm")),
            "vm",
            "no FQDN: the host name as it is"
        );
        assert_eq!(choose(Some("vm"), None), "vm");
        assert_eq!(
            choose(Some("vm"), Some("localhost.localdomain")),
            "vm",
            "a loopback alias is not the machine's name"
        );
        assert_eq!(
            choose(Some("vm"), Some("vm.example.com.")),
            "vm.example.com"
        );
        assert_eq!(
            choose(Some("bad_name"), Some("vm.example.com")),
            "vm.example.com"
        );
        assert_eq!(choose(None, None), "localhost");
        assert_eq!(choose(Some(""), Some("not valid!")), "localhost");
    }

    #[test]
    fn only_names_with_a_dot_other_than_localhost_are_fully_qualified() {
        let fq = |name: &str| Hostname(name.into()).is_fully_qualified();
        assert!(fq("relay.example.com"));
        assert!(!fq("relay"));
        assert!(!fq("localhost"));
        assert!(!fq("localhost.localdomain"));
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
