//! What a failed DNS lookup means: no next hop for a domain ([`RouteError`]), no address
//! for a host ([`AddressError`]), and how the resolver's errors are read into them (a
//! denial, a failure to try again, or a cause of this host's own).

use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;

use crate::smtp::Reply;

/// Why a domain has no next hop; each maps to a reply of the README's reply table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("domain {0} does not exist")]
    DomainNotFound(String),
    #[error("domain {0} accepts no mail (null MX)")]
    NullMx(String),
    #[error("DNS lookup for {domain} failed temporarily: {detail}")]
    DnsTemporary { domain: String, detail: String },
    /// DANE is in force and a lookup that tells whether it applies to the server failed:
    /// nothing may be sent until it can be had (RFC 7672 2.2).
    #[error(
        "DANE: the {lookup} failed ({detail}): whether {server} must be reached under DANE \
         cannot be known, so nothing is sent until it can"
    )]
    DaneUnknown {
        lookup: Lookup,
        server: String,
        detail: String,
    },
    /// This host could not ask its name servers (out of descriptors, say): nothing is
    /// known of the domain.
    #[error("MX lookup for {domain} not made, local error on this relay: {cause}")]
    Local { domain: String, cause: String },
}

/// A DNS lookup that tells whether DANE applies to a server.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Lookup {
    #[error("MX lookup of {0}")]
    Mx(String),
    #[error("address lookup of {0}")]
    Address(String),
}

impl Lookup {
    /// `mx` or `address`, and the name asked: the log line's `lookup` and `name`.
    pub fn fields(&self) -> (&'static str, &str) {
        match self {
            Lookup::Mx(name) => ("mx", name),
            Lookup::Address(name) => ("address", name),
        }
    }
}

impl RouteError {
    pub fn reply(&self) -> Reply {
        match self {
            RouteError::DomainNotFound(_) => Reply::new(550, "5.1.2", self),
            RouteError::NullMx(_) => Reply::new(556, "5.1.10", self),
            RouteError::DnsTemporary { .. } => Reply::new(451, "4.4.3", self),
            RouteError::DaneUnknown { .. } => Reply::new(451, "4.7.5", self),
            RouteError::Local { .. } => Reply::new(451, "4.3.0", self),
        }
    }
}

/// Why a lookup could not be made, when the cause is this host's: the resolver hides why it
/// could not reach a name server, and this host may be out of descriptors, which says
/// nothing of the name.
pub(super) fn local_cause(error: &NetError) -> Option<String> {
    if !matches!(error, NetError::NoConnections | NetError::Io(_)) {
        return None;
    }
    crate::net::connection::local_shortage().map(|cause| cause.to_string())
}

/// A failed address question: no such host, a failure to try again, or this host's own.
pub(super) fn address_error(error: &NetError) -> AddressError {
    if let Some(cause) = local_cause(error) {
        return AddressError::Local(cause);
    }
    match answer(error) {
        Answer::NoSuchName | Answer::NoData => AddressError::NotFound,
        Answer::Failed => AddressError::Temporary(error.to_string()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressError {
    NotFound,
    Temporary(String),
    /// Not asked: this host could not open a socket to its name servers.
    Local(String),
}

impl std::fmt::Display for AddressError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressError::NotFound => f.write_str("host has no address"),
            AddressError::Temporary(detail) => write!(f, "address lookup failed: {detail}"),
            AddressError::Local(cause) => {
                write!(
                    f,
                    "address lookup not made, local error on this relay: {cause}"
                )
            }
        }
    }
}

/// What a failed lookup says about the name.
pub(super) enum Answer {
    /// NXDOMAIN: the name does not exist.
    NoSuchName,
    /// NOERROR without records of the type asked.
    NoData,
    /// SERVFAIL, REFUSED, a timeout: nothing is known; try again later.
    Failed,
}

pub(super) fn answer(error: &NetError) -> Answer {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::NXDomain => Answer::NoSuchName,
            ResponseCode::NoError => Answer::NoData,
            _ => Answer::Failed,
        },
        // A denial in a zone proven unsigned is as good as an unsigned one.
        NetError::Dns(DnsError::Nsec {
            response, proof, ..
        }) if proof.is_insecure() => match response.response_code {
            ResponseCode::NXDomain => Answer::NoSuchName,
            ResponseCode::NoError => Answer::NoData,
            _ => Answer::Failed,
        },
        _ => Answer::Failed,
    }
}

pub(super) fn temporary(domain: &str, error: &NetError) -> RouteError {
    RouteError::DnsTemporary {
        domain: domain.into(),
        detail: error.to_string(),
    }
}
