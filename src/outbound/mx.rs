//! Finding the next hop for a recipient domain: MX records (RFC 5321 5.1), null MX
//! (RFC 7505), implicit MX, and the addresses of each host.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use rand::seq::SliceRandom;

use serde::Deserialize;

use crate::smtp::Reply;

/// `resolver:` in the configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// `ip:port` of the name servers to ask; empty means the system's (resolv.conf).
    pub nameservers: Vec<SocketAddr>,
}

/// One mail exchanger of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxHost {
    /// Lower case, without the trailing dot.
    pub name: String,
    pub preference: u16,
}

/// One server as every part of tlsrouter names it: the name it is known by (for TLS, the
/// cache and the log) and the address it was reached at. An address literal
/// (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) is named by its bare address, so that what the
/// cache learns of it is found again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServerId {
    /// Lower case, no trailing dot, no brackets.
    pub name: String,
    pub addr: IpAddr,
}

impl ServerId {
    pub fn new(name: &str, addr: IpAddr) -> ServerId {
        ServerId {
            name: bare_name(name),
            addr,
        }
    }

    /// Whether the name is the address itself (an address literal).
    pub fn is_literal(&self) -> bool {
        self.name.parse::<IpAddr>().is_ok()
    }
}

impl std::fmt::Display for ServerId {
    /// `name[address]`, or `[address]` for an address literal.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_literal() {
            write!(f, "[{}]", self.addr)
        } else {
            write!(f, "{}[{}]", self.name, self.addr)
        }
    }
}

/// A host name or address literal as a server name: lower case, no trailing dot, and the
/// address alone for `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
pub fn bare_name(host: &str) -> String {
    let host = host.strip_suffix('.').unwrap_or(host);
    let literal = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let host = match literal {
        Some(inner) => inner
            .get(..5)
            .filter(|p| p.eq_ignore_ascii_case("IPv6:"))
            .map_or(inner, |_| &inner[5..]),
        None => host,
    };
    host.to_ascii_lowercase()
}

/// The address of an address literal or a bare address, if `host` is one.
pub fn literal_address(host: &str) -> Option<IpAddr> {
    bare_name(host).parse().ok()
}

/// Why a domain has no next hop; each maps to a reply of the README's reply table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("domain {0} does not exist")]
    DomainNotFound(String),
    #[error("domain {0} accepts no mail (null MX)")]
    NullMx(String),
    #[error("DNS lookup for {domain} failed temporarily: {detail}")]
    DnsTemporary { domain: String, detail: String },
}

impl RouteError {
    pub fn reply(&self) -> Reply {
        match self {
            RouteError::DomainNotFound(_) => Reply::new(550, "5.1.2", self),
            RouteError::NullMx(_) => Reply::new(556, "5.1.10", self),
            RouteError::DnsTemporary { .. } => Reply::new(451, "4.4.3", self),
        }
    }
}

pub struct MxResolver {
    resolver: TokioResolver,
    timeout: Duration,
}

impl MxResolver {
    /// Asks `nameservers` (UDP, then TCP), or the system's resolvers when the list is empty.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> anyhow::Result<MxResolver> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder(provider)?
        } else {
            let servers = nameservers.iter().map(|addr| name_server(*addr)).collect();
            TokioResolver::builder_with_config(
                hickory_resolver::config::ResolverConfig::from_name_servers(servers),
                provider,
            )
        };
        let options = builder.options_mut();
        options.timeout = timeout;
        options.attempts = 2;
        // Mail domains are absolute: never try them below a local search domain.
        options.ndots = 0;
        Ok(MxResolver {
            resolver: builder.build()?,
            timeout,
        })
    }

    /// The domain's mail exchangers, best first, equal preferences in random order.
    pub async fn mail_exchangers(&self, domain: &str) -> Result<Vec<MxHost>, RouteError> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let lookup = match self.bounded(self.resolver.mx_lookup(fqdn.as_str())).await {
            Ok(lookup) => lookup,
            Err(e) => {
                return match answer(&e) {
                    Answer::NoSuchName => Err(RouteError::DomainNotFound(domain.into())),
                    // No MX records: the domain itself is the implicit MX (RFC 5321 5.1).
                    Answer::NoData => self.implicit_mx(domain).await,
                    Answer::Failed => Err(temporary(domain, &e)),
                };
            }
        };
        let mut hosts: Vec<MxHost> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::MX(mx) => Some(MxHost {
                    name: mx
                        .exchange
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                    preference: mx.preference,
                }),
                _ => None,
            })
            .collect();
        if hosts.iter().any(|h| h.name.is_empty()) {
            return Err(RouteError::NullMx(domain.into()));
        }
        if hosts.is_empty() {
            return self.implicit_mx(domain).await;
        }
        hosts.shuffle(&mut rand::rng());
        hosts.sort_by_key(|h| h.preference);
        Ok(hosts)
    }

    async fn implicit_mx(&self, domain: &str) -> Result<Vec<MxHost>, RouteError> {
        match self.addresses(domain).await {
            Ok(addrs) if !addrs.is_empty() => Ok(vec![MxHost {
                name: domain.to_ascii_lowercase(),
                preference: 0,
            }]),
            Ok(_) => Err(RouteError::DomainNotFound(domain.into())),
            Err(AddressError::NotFound) => Err(RouteError::DomainNotFound(domain.into())),
            Err(AddressError::Temporary(detail)) => Err(RouteError::DnsTemporary {
                domain: domain.into(),
                detail,
            }),
        }
    }

    /// The host's IPv6 and IPv4 addresses.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, AddressError> {
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.bounded(self.resolver.lookup_ip(fqdn.as_str())).await {
            Ok(lookup) => Ok(lookup.iter().collect()),
            Err(e) => match answer(&e) {
                Answer::NoSuchName | Answer::NoData => Err(AddressError::NotFound),
                Answer::Failed => Err(AddressError::Temporary(e.to_string())),
            },
        }
    }

    /// The TXT records at `name`, each record's strings joined (RFC 7208 3.3 style, as
    /// MTA-STS and TLS-RPT records are read). A name without TXT records gives none.
    pub async fn txt_records(&self, name: &str) -> Result<Vec<String>, AddressError> {
        self.txt_lookup(name).await.map(|answer| answer.records)
    }

    /// The TXT strings at `name` (each record's strings joined, as RFC 7208 3.3 reads them),
    /// with how long the answer may be kept: the records' TTL, or for "no record" the
    /// zone's negative TTL.
    pub async fn txt_lookup(&self, name: &str) -> Result<TxtAnswer, AddressError> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.bounded(self.resolver.txt_lookup(fqdn.as_str())).await {
            Ok(lookup) => Ok(TxtAnswer {
                valid_until: lookup.valid_until(),
                records: lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::TXT(txt) => Some(
                            txt.txt_data
                                .iter()
                                .map(|part| String::from_utf8_lossy(part))
                                .collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect(),
            }),
            Err(e) => match answer(&e) {
                Answer::NoSuchName | Answer::NoData => Ok(TxtAnswer {
                    records: Vec::new(),
                    valid_until: Instant::now() + Duration::from_secs(negative_ttl(&e).into()),
                }),
                Answer::Failed => Err(AddressError::Temporary(e.to_string())),
            },
        }
    }

    async fn bounded<T>(
        &self,
        lookup: impl Future<Output = Result<T, NetError>>,
    ) -> Result<T, NetError> {
        match tokio::time::timeout(self.timeout.saturating_mul(3), lookup).await {
            Ok(result) => result,
            Err(_) => Err(NetError::Timeout),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressError {
    NotFound,
    Temporary(String),
}

impl std::fmt::Display for AddressError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressError::NotFound => f.write_str("host has no address"),
            AddressError::Temporary(detail) => write!(f, "address lookup failed: {detail}"),
        }
    }
}

fn name_server(addr: SocketAddr) -> NameServerConfig {
    let with_port = |mut c: ConnectionConfig| {
        c.port = addr.port();
        c
    };
    NameServerConfig::new(
        addr.ip(),
        true,
        vec![
            with_port(ConnectionConfig::udp()),
            with_port(ConnectionConfig::tcp()),
        ],
    )
}

/// What a failed lookup says about the name.
enum Answer {
    /// NXDOMAIN: the name does not exist.
    NoSuchName,
    /// NOERROR without records of the type asked.
    NoData,
    /// SERVFAIL, REFUSED, a timeout: nothing is known; try again later.
    Failed,
}

/// A TXT answer and the end of its DNS lifetime.
#[derive(Clone, Debug)]
pub struct TxtAnswer {
    pub records: Vec<String>,
    pub valid_until: Instant,
}

/// The negative TTL a "no such record" answer carries (RFC 2308), 0 when it has none.
fn negative_ttl(error: &NetError) -> u32 {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(no)) => no.negative_ttl.unwrap_or(0),
        _ => 0,
    }
}

fn answer(error: &NetError) -> Answer {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::NXDomain => Answer::NoSuchName,
            ResponseCode::NoError => Answer::NoData,
            _ => Answer::Failed,
        },
        _ => Answer::Failed,
    }
}

fn temporary(domain: &str, error: &NetError) -> RouteError {
    RouteError::DnsTemporary {
        domain: domain.into(),
        detail: error.to_string(),
    }
}
