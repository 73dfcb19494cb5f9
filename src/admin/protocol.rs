//! The admin protocol: one JSON request per line, one JSON response per line (docs/ADMIN.md).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::outcome::OutcomeClass;
use crate::probe::ProbeTarget;

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
/// Commands without arguments are empty struct variants so that stray fields are refused.
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    CacheList {
        #[serde(default)]
        class: Option<OutcomeClass>,
        #[serde(default)]
        domain: Option<String>,
    },
    /// A host name or a recipient domain.
    CacheShow {
        target: String,
    },
    CacheFlush {
        #[serde(default)]
        target: Option<String>,
        #[serde(default)]
        all: bool,
    },
    CachePin {
        /// A host name, or `name[address]` to pin that address only.
        host: String,
        class: OutcomeClass,
        /// A duration: `30m`, `7d`.
        ttl: String,
        /// The addresses to pin; none means every address of the host, cached or in DNS.
        #[serde(default)]
        addrs: Vec<IpAddr>,
    },
    RulesShow {},
    RulesReload {},
    RulesExplain {
        rcpt: String,
        #[serde(default)]
        sender: Option<String>,
        #[serde(default)]
        mx: Option<String>,
        #[serde(default)]
        outcome: Option<OutcomeClass>,
        /// With `outcome`: it was pinned by an operator, not observed.
        #[serde(default)]
        pinned: bool,
        /// With `outcome`: what the host did within the success memory before (`tls`,
        /// `verified-tls`).
        #[serde(default)]
        did_tls: crate::cache::TlsMemory,
        /// The sender asks REQUIRETLS; whether the MX answer vouches for `mx` is looked up.
        #[serde(default)]
        requiretls: bool,
    },
    Stats {},
    Sessions {},
    Probe(ProbeTarget),
    /// Every MTA-STS policy held.
    PolicyList {},
    PolicyShow {
        domain: String,
    },
    /// Fetch the domain's policy now.
    PolicyRefresh {
        domain: String,
    },
    PolicyFlush {
        domain: String,
    },
    /// Today's TLS-RPT counts.
    Tlsrpt {},
    /// Today's TLS-RPT reports so far, sent now: of one domain, or of all.
    TlsrptSend {
        #[serde(default)]
        domain: Option<String>,
    },
    /// The remote connections idle in the pool.
    Pool {},
    /// The ledger's recipient domains, the most in plain first.
    Domains {
        /// A duration back from now, up to the ledger's week: `24h`, `7d`.
        #[serde(default)]
        since: Option<String>,
        /// Only the domains with messages by this route in the window.
        #[serde(default)]
        route: Option<crate::ledger::Route>,
    },
    /// One domain's ledger over the last hour, day and week, and its hosts' certificates.
    Domain {
        domain: String,
    },
    /// The certificates of the cached servers that expire within `expiring` (a duration).
    Certs {
        expiring: String,
    },
}

/// The commands, for telling an unknown command from bad arguments.
pub const COMMANDS: [&str; 21] = [
    "cache-list",
    "cache-show",
    "cache-flush",
    "cache-pin",
    "rules-show",
    "rules-reload",
    "rules-explain",
    "stats",
    "sessions",
    "probe",
    "policy-list",
    "policy-show",
    "policy-refresh",
    "policy-flush",
    "tlsrpt",
    "tlsrpt-send",
    "pool",
    "domains",
    "domain",
    "certs",
    // Listed last: every other name is an unknown command.
    "",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The line is not JSON.
    BadJson,
    UnknownCommand,
    BadArguments,
    /// The command was understood and failed (a bad rule file on reload, say).
    Failed,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Response {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(ErrorBody {
                kind,
                message: message.into(),
            }),
        }
    }
}

/// Parses a request line, telling bad JSON, unknown commands and bad arguments apart.
pub fn parse_request(line: &str) -> Result<Request, Response> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| Response::error(ErrorKind::BadJson, format!("not JSON: {e}")))?;
    let command = value
        .get("command")
        .and_then(|c| c.as_str())
        .ok_or_else(|| Response::error(ErrorKind::BadArguments, "no \"command\" string"))?
        .to_string();
    if command.is_empty() || !COMMANDS.contains(&command.as_str()) {
        let known = COMMANDS[..COMMANDS.len() - 1].join(", ");
        return Err(Response::error(
            ErrorKind::UnknownCommand,
            format!("unknown command {command:?} (known: {known})"),
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| Response::error(ErrorKind::BadArguments, format!("{command}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_errors_are_told_apart() {
        assert_eq!(
            parse_request(r#"{"command":"cache-flush","all":true}"#).unwrap(),
            Request::CacheFlush {
                target: None,
                all: true
            }
        );
        let kind = |line: &str| parse_request(line).unwrap_err().error.unwrap().kind;
        assert_eq!(kind("{nope"), ErrorKind::BadJson);
        assert_eq!(
            kind(r#"{"command":"frobnicate"}"#),
            ErrorKind::UnknownCommand
        );
        assert_eq!(
            kind(r#"{"command":"cache-pin","host":"x"}"#),
            ErrorKind::BadArguments
        );
        assert_eq!(
            kind(r#"{"command":"stats","extra":1}"#),
            ErrorKind::BadArguments
        );
        assert_eq!(
            kind(r#"{"command":"cache-list","class":"tls-maybe"}"#),
            ErrorKind::BadArguments
        );
    }
}
