//! What a probe found, as `--json` prints it and `render` words it.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::certificate::Certificate;
use crate::net::dns::TlsaAnswer;
use crate::outcome::{OutcomeClass, TlsSession, Verification};
use crate::policy::mta_sts::PolicyLookup;

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ProbeReport {
    pub domain: Option<String>,
    /// Why the domain has no MX to probe, when it has none.
    pub dns_error: Option<String>,
    pub mx: Vec<MxReport>,
    /// What the rules in force would do with a message to the domain before anything is
    /// known about its servers (each server's report says what they do after the probe).
    pub rule: Option<String>,
    pub plan: Option<String>,
    /// What the domain publishes through MTA-STS, as the daemon's policy store has it.
    #[serde(default)]
    pub mta_sts: Option<PolicyReport>,
    /// Whether DANE is in force (`on`, or `off` and why).
    #[serde(default)]
    pub dane: Option<String>,
    /// Whether the domain's MX answer was DNSSEC-`secure` or `insecure`.
    #[serde(default)]
    pub mx_dnssec: Option<String>,
}

/// A domain's MTA-STS policy, for people.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct PolicyReport {
    /// `mta-sts:enforce`, `mta-sts:testing`, `none`, `mta-sts:sts-policy-fetch-error`...
    pub state: String,
    pub id: Option<String>,
    pub mode: Option<String>,
    pub mx: Vec<String>,
    pub max_age: Option<u64>,
    /// `YYYY-MM-DD`, UTC.
    pub fetched: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct MxReport {
    pub host: String,
    pub preference: u16,
    pub addresses: Vec<IpAddr>,
    pub error: Option<String>,
    /// Whether the domain's MTA-STS policy names this host (`None`: no policy).
    #[serde(default)]
    pub in_policy: Option<bool>,
    pub servers: Vec<ServerReport>,
    /// Whether the host's address answer was DNSSEC-`secure` or `insecure`.
    #[serde(default)]
    pub dnssec: Option<String>,
    /// The host's TLSA records, when its MX and address answers were secure.
    #[serde(default)]
    pub tlsa: Option<TlsaReport>,
}

/// What an MX host's TLSA lookup found, for people.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TlsaReport {
    /// `usable`, `none usable`, `none`, `insecure`, or `failed: ...`.
    pub state: String,
    /// Each record as in a zone file, with `usable` or why it is not.
    pub records: Vec<String>,
}

#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct ServerReport {
    pub addr: Option<SocketAddr>,
    /// Milliseconds per step: connect, greeting, ehlo, starttls, ehlo-after-tls.
    pub timings_ms: Vec<(String, u64)>,
    pub banner: Option<String>,
    pub ehlo: Vec<String>,
    pub starttls_offered: bool,
    /// The outcome class of the attempt.
    pub class: Option<OutcomeClass>,
    /// The alert, io error or reply behind the class.
    pub detail: Option<String>,
    pub tls: Option<TlsReport>,
    pub error: Option<String>,
    /// The rule a message to the domain gets through this server, given what was found
    /// here (its class, and its certificate's): rules may match on `mx` and `outcome`.
    pub rule: Option<String>,
    pub plan: Option<String>,
    /// What a delivery through this server does now, given what was found here.
    #[serde(default)]
    pub decision: Option<String>,
    /// Which TLSA record matched the certificate the server sent, or why none did.
    #[serde(default)]
    pub dane: Option<String>,
    /// When rustls could not talk to the server and the decision is the legacy stack:
    /// what that stack negotiated, or why it failed.
    #[serde(default)]
    pub legacy: Option<LegacyReport>,
    /// What the fleet's shared cache holds for this server, with `cache.backend: redis`.
    #[serde(default)]
    pub fleet: Option<String>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct LegacyReport {
    /// What rustls found first: the class and its detail.
    pub rustls: String,
    pub version: Option<String>,
    pub cipher: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TlsReport {
    pub version: String,
    pub cipher: String,
    pub verified: bool,
    /// Why the certificate did not verify for the MX name.
    pub problem: Option<String>,
    pub ehlo_after_tls: Vec<String>,
    pub certificates: Vec<Certificate>,
}

pub(super) fn tlsa_report(answer: &TlsaAnswer) -> TlsaReport {
    let (state, records) = match answer {
        TlsaAnswer::Records {
            usable, unusable, ..
        } => {
            let state = if usable.is_empty() {
                "none usable"
            } else {
                "usable"
            };
            let records = usable
                .iter()
                .map(|r| format!("{r} usable"))
                .chain(
                    unusable
                        .iter()
                        .map(|(r, why)| format!("{r}: unusable, {why}")),
                )
                .collect();
            (state.to_string(), records)
        }
        TlsaAnswer::None => ("none".to_string(), Vec::new()),
        TlsaAnswer::Insecure => ("insecure".to_string(), Vec::new()),
        TlsaAnswer::Failed(why) => (format!("failed: {why}"), Vec::new()),
    };
    TlsaReport { state, records }
}

pub(super) fn policy_report(lookup: &PolicyLookup) -> PolicyReport {
    let policy = lookup.policy();
    PolicyReport {
        state: lookup.label(),
        id: policy.map(|p| p.id.clone()),
        mode: policy.map(|p| p.mode.to_string()),
        mx: policy
            .map(|p| p.mx.iter().map(|m| m.to_string()).collect())
            .unwrap_or_default(),
        max_age: policy.map(|p| p.max_age),
        fetched: policy.map(|p| crate::outcome::format_date(p.fetched_at)),
        error: match lookup {
            PolicyLookup::Unavailable(e) => Some(e.to_string()),
            _ => None,
        },
    }
}

pub(super) fn tls_report(session: &TlsSession, ehlo_after_tls: Vec<String>) -> TlsReport {
    let problem = match &session.verification {
        Verification::Verified => None,
        Verification::Failed(problem) => Some(format!("{}: {problem}", problem.class())),
    };
    TlsReport {
        version: session.version.clone(),
        cipher: session.cipher.clone(),
        verified: problem.is_none(),
        problem,
        ehlo_after_tls,
        certificates: session
            .chain
            .iter()
            .filter_map(|der| Certificate::parse(der))
            .collect(),
    }
}
