//! The side toward the Internet, above [`crate::net`] and [`crate::policy`]: what the
//! session asks for ([`route`]), where a transaction goes ([`hop`]), the servers tried in
//! turn ([`delivery`]), one conversation with one server ([`attempt`]), why one did not
//! take it ([`failure`]), the remote dialogue of an open transaction ([`upstream`]), the
//! connections kept between transactions ([`pool`]), those waiting for a greeting
//! ([`greetings`]) and a smart host's credentials.
//! [`Outbound`] is what they share.

pub mod attempt;
pub mod credentials;
pub mod delivery;
pub mod failure;
pub mod greetings;
pub mod hop;
pub mod lookups;
pub mod pool;
pub mod route;
pub mod upstream;

use std::num::NonZeroUsize;
use std::sync::Arc;

use serde::Deserialize;

use crate::cache::OutcomeCache;
use crate::net::dialer::Dialer;
use crate::net::dns::{AddressError, MxResolver, RouteError};
use crate::net::tls::TlsClient;
use crate::outbound::greetings::Greetings;
use crate::outbound::lookups::FailedLookups;
use crate::outbound::pool::{Pool, PoolConfig};
use crate::policy::mta_sts::PolicyStore;
use crate::policy::tlsrpt::TlsReports;
use crate::settings::Timeouts;
use crate::smtp::data::BareLineEndings;
use crate::stats::Stats;

/// `delivery:` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// The port of remote MX servers: 25 on the Internet, anything in a lab.
    pub port: u16,
    /// What to do with a bare CR or LF in a message body.
    pub bare_line_endings: BareLineEndings,
    /// `SO_MARK` on every outbound connection, so that a transparent redirect can let
    /// ours pass (needs `CAP_NET_ADMIN`).
    pub socket_mark: Option<u32>,
    /// Keeping remote connections for later messages.
    pub pool: PoolConfig,
    /// The local address connections to remote servers come from; none: the system's
    /// choice.
    pub source_address: Option<std::net::IpAddr>,
    /// Whether a message's `TLS-Required: No` header sets aside what the recipient domain
    /// publishes (RFC 8689 5).
    pub tls_required_no: TlsRequiredNo,
    /// MX hosts tried per transaction, best first (as Postfix's smtp_mx_session_limit):
    /// a domain with many dead MX hosts costs its own messages, not everyone's sessions.
    pub max_mx_hosts: NonZeroUsize,
    /// Addresses tried per transaction, over all its MX hosts (smtp_mx_address_limit).
    pub max_addresses: NonZeroUsize,
    /// Connections to one server address that may wait longer than `slow_greeting` for
    /// its greeting; then no more are opened to it for a while.
    pub max_waiting_per_server: NonZeroUsize,
    /// Longer than a server that greets in time takes: only such waits count.
    #[serde(with = "crate::settings::duration")]
    pub slow_greeting: std::time::Duration,
}

/// What a message's `TLS-Required: No` header does.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsRequiredNo {
    /// As RFC 8689 says: MTA-STS and DANE refuse no server for it; the rules decide, and a
    /// rule's `tls: require` still binds.
    #[default]
    Honour,
    /// The header changes nothing.
    Ignore,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            port: 25,
            bare_line_endings: BareLineEndings::Normalize,
            socket_mark: None,
            pool: PoolConfig::default(),
            source_address: None,
            tls_required_no: TlsRequiredNo::Honour,
            max_mx_hosts: NonZeroUsize::new(5).expect("not zero"),
            max_addresses: NonZeroUsize::new(10).expect("not zero"),
            max_waiting_per_server: NonZeroUsize::new(10).expect("not zero"),
            slow_greeting: std::time::Duration::from_secs(10),
        }
    }
}

/// Everything the outbound side needs, shared by all sessions.
pub struct Outbound {
    pub resolver: Arc<MxResolver>,
    pub tls: TlsClient,
    /// How every connection is made (source address, socket mark, connect timeout).
    pub dialer: Dialer,
    /// Our EHLO name.
    pub hostname: String,
    /// Remote SMTP port of MX hosts.
    pub port: u16,
    pub timeouts: Timeouts,
    pub cache: Arc<OutcomeCache>,
    pub stats: Arc<Stats>,
    /// What TLS-RPT reports count: every attempt to a domain with an MTA-STS policy.
    pub tls_reports: Arc<TlsReports>,
    /// Remote connections kept between transactions.
    pub pool: Arc<Pool>,
    /// The MTA-STS policies of recipient domains.
    pub policies: Arc<PolicyStore>,
    /// What one transaction may try before the MTA is told.
    pub budget: Budget,
    /// Address lookups that failed moments ago.
    pub failed_lookups: FailedLookups<AddressError>,
    /// MX lookups that failed moments ago.
    pub failed_mx_lookups: FailedLookups<RouteError>,
    /// Connections waiting for a server's greeting, per server.
    pub greetings: Greetings,
}

/// What one transaction may try before the MTA is told: so many MX hosts and addresses,
/// within `timeouts.route`.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub mx_hosts: usize,
    pub addresses: usize,
}
