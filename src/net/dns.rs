//! Finding the next hop for a recipient domain: MX records (RFC 5321 5.1), null MX
//! (RFC 7505), implicit MX, and the addresses of each host.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::net::dane::{TlsaRecord, Unusable};
use crate::net::dnssec_check::{CheckState, DnssecCheck};
pub use crate::net::lookup_error::{AddressError, Lookup, RouteError};
use crate::net::lookup_error::{Answer, address_error, answer, local_cause, temporary};
use crate::settings::{Problem, SetupError};

/// `resolver:` in the configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// `ip:port` of the name servers to ask; empty means the system's (resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// DANE (RFC 7672): validate MX, address and TLSA answers with DNSSEC and follow the
    /// TLSA records of secure MX hosts.
    pub dane: Dane,
    /// DNSKEY records (zone-file syntax) to trust instead of the root's keys: for labs.
    pub trust_anchor_file: Option<PathBuf>,
}

/// `resolver.dane`: `on` (the default) or `off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dane {
    #[default]
    On,
    Off,
}

/// What DNSSEC says of an answer (RFC 4035 4.3). Bogus answers never get this far: they
/// are failed lookups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dnssec {
    /// Validated from the trust anchor down.
    Secure,
    /// Not signed (or DANE is off): nothing is proven either way.
    Insecure,
}

impl Dnssec {
    pub fn name(self) -> &'static str {
        match self {
            Dnssec::Secure => "secure",
            Dnssec::Insecure => "insecure",
        }
    }

    /// Whether a validating resolver found any of the records bogus. hickory hands such
    /// records back marked, not as an error: they must not be used (RFC 4035 4.3).
    fn bogus(records: &[&Record]) -> bool {
        records.iter().any(|r| r.proof == Proof::Bogus)
    }

    /// Secure only when every record is.
    fn of(records: &[&Record]) -> Dnssec {
        if !records.is_empty() && records.iter().all(|r| r.proof == Proof::Secure) {
            Dnssec::Secure
        } else {
            Dnssec::Insecure
        }
    }
}

/// What the TLSA lookup of an MX host found (RFC 7672 2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsaAnswer {
    /// Secure TLSA records: the usable ones, and why each other one is not.
    Records {
        usable: Vec<TlsaRecord>,
        unusable: Vec<(String, Unusable)>,
        /// Every record in presentation form (`3 1 1 <hex>`), as TLS-RPT reports them.
        presentation: Vec<String>,
    },
    /// No TLSA records (securely denied, or in an insecure zone): no DANE for this host.
    None,
    /// The records were found but are not secure (an insecure zone): no DANE.
    Insecure,
    /// Bogus, indeterminate or failed (SERVFAIL, timeout): delivery must wait (RFC 7672 2.2).
    Failed(String),
}

/// One mail exchanger of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxHost {
    /// Lower case, without the trailing dot.
    pub name: String,
    pub preference: u16,
    /// Whether the MX answer that named this host was DNSSEC-secure (for an implicit MX,
    /// its address answer), so that DANE needs no second MX lookup.
    pub dnssec: Dnssec,
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

pub struct MxResolver {
    resolver: TokioResolver,
    /// Validates with DNSSEC; used instead of `resolver` once the start-up check found the
    /// name servers can serve it. `None` with `dane: off`.
    validating: Option<TokioResolver>,
    /// What [`MxResolver::check_dnssec`] found, and when an unknown state is asked again.
    dane: std::sync::Mutex<CheckState>,
    /// One check at a time.
    checking: tokio::sync::Mutex<()>,
    timeout: Duration,
    /// The zone whose DNSKEY set the start-up check asks: the trust anchor's (the root
    /// unless `resolver.trust_anchor_file` names another zone).
    anchor_zone: String,
}

impl MxResolver {
    /// Asks `nameservers` (UDP, then TCP), or the system's resolvers when the list is empty.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<MxResolver, SetupError> {
        Ok(MxResolver {
            resolver: Self::build(nameservers, timeout, None)?,
            validating: None,
            dane: std::sync::Mutex::new(CheckState::off()),
            checking: tokio::sync::Mutex::new(()),
            timeout,
            anchor_zone: ".".into(),
        })
    }

    /// As [`MxResolver::new`], with a validating resolver besides when `config.dane` is on;
    /// [`MxResolver::check_dnssec`] decides at start which one answers.
    pub fn with_config(
        config: &ResolverConfig,
        timeout: Duration,
    ) -> Result<MxResolver, SetupError> {
        let mut resolver = Self::new(&config.nameservers, timeout)?;
        if config.dane == Dane::On {
            let anchors = match &config.trust_anchor_file {
                Some(path) => {
                    let bad = |e: Problem| SetupError::file("resolver.trust_anchor_file", path, e);
                    let text = std::fs::read_to_string(path).map_err(|e| bad(e.into()))?;
                    resolver.anchor_zone = anchor_zone(&text).map_err(|e| bad(e.into()))?;
                    text.parse::<TrustAnchors>()
                        .map_err(|e| bad(e.to_string().into()))?
                }
                None => TrustAnchors::default(),
            };
            resolver.validating = Some(Self::build(
                &config.nameservers,
                timeout,
                Some(Arc::new(anchors)),
            )?);
            resolver.dane = std::sync::Mutex::new(CheckState::unchecked());
        }
        Ok(resolver)
    }

    fn build(
        nameservers: &[SocketAddr],
        timeout: Duration,
        anchors: Option<Arc<TrustAnchors>>,
    ) -> Result<TokioResolver, SetupError> {
        let provider = TokioRuntimeProvider::default();
        let resolver_error = |e: NetError| SetupError::setting("resolver", e);
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(resolver_error)?
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
        if let Some(anchors) = anchors {
            builder = builder.with_trust_anchor(anchors);
        }
        builder.build().map_err(resolver_error)
    }

    /// Whether lookups validate: `dane: on`, and the name servers served a validated
    /// DNSKEY set of the trust anchor, or could not be asked yet (see
    /// [`crate::net::dnssec_check`]): what cannot be known is then deferred, not taken as
    /// insecure. An unknown state is asked again when due; a known one never.
    pub async fn check_dnssec(&self) -> bool {
        let due = self.dnssec_state().due(Instant::now());
        if due {
            let _one = self.checking.lock().await;
            let still_due = self.dnssec_state().due(Instant::now());
            if still_due {
                let (found, why) = self.ask_dnssec().await;
                self.record_dnssec(found, &why);
            }
        }
        self.dane_active()
    }

    /// Asks the validating resolver for the trust anchor's DNSKEY set.
    async fn ask_dnssec(&self) -> (DnssecCheck, String) {
        let Some(validating) = &self.validating else {
            return (DnssecCheck::Off, "dane: off".into());
        };
        let zone = self.anchor_zone.as_str();
        let lookup = self
            .bounded(validating.lookup(zone, RecordType::DNSKEY))
            .await;
        let validated = lookup.map(|found| {
            let keys: Vec<&Record> = (found.answers().iter())
                .filter(|r| r.record_type() == RecordType::DNSKEY)
                .collect();
            Dnssec::of(&keys) == Dnssec::Secure
        });
        crate::net::dnssec_check::judge(zone, validated)
    }

    fn record_dnssec(&self, found: DnssecCheck, why: &str) {
        let retry = match self.dane.lock() {
            Ok(mut state) => state.record(found, Instant::now()),
            Err(_) => None,
        };
        match (found, retry) {
            (DnssecCheck::On, _) => {
                tracing::info!(
                    event = "dane",
                    dane = "on",
                    "DANE on: the name servers serve DNSSEC and the trust anchor's keys validate"
                )
            }
            (DnssecCheck::Off, _) => {
                tracing::warn!(
                    event = "dane",
                    dane = "off",
                    "DANE off: the name servers cannot serve DNSSEC ({why}); MX, address and TLSA answers are not validated"
                )
            }
            (DnssecCheck::Unknown, retry) => {
                let retry = retry.unwrap_or_default().as_secs();
                tracing::warn!(
                    event = "dane",
                    dane = "unknown",
                    retry_in = retry,
                    "DANE unknown: {why}; answers are validated meanwhile, and what cannot be validated is deferred; asking again in {retry}s"
                )
            }
        }
    }

    /// What the start-up check found; `None` before it ran.
    pub fn dnssec_check(&self) -> Option<DnssecCheck> {
        self.dnssec_state().found()
    }

    /// The check's state in a word: `on`, `off`, `unknown`, or `unchecked` before it is
    /// first made.
    pub fn dane_state(&self) -> &'static str {
        self.dnssec_check().map_or("unchecked", DnssecCheck::name)
    }

    fn dnssec_state(&self) -> std::sync::MutexGuard<'_, CheckState> {
        self.dane
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks again, with back-off, while the start-up check's answer is unknown; returns
    /// once it is known.
    pub async fn keep_checking_dnssec(self: Arc<Self>) {
        loop {
            let wait = self.dnssec_state().wait(Instant::now());
            let Some(wait) = wait else {
                return;
            };
            tokio::time::sleep(wait).await;
            self.check_dnssec().await;
        }
    }

    /// Whether lookups validate (false before [`MxResolver::check_dnssec`] ran; every
    /// lookup runs it first).
    pub fn dane_active(&self) -> bool {
        matches!(
            self.dnssec_state().found(),
            Some(DnssecCheck::On | DnssecCheck::Unknown)
        )
    }

    /// The resolver that answers: the validating one when DANE is in force.
    fn active(&self) -> &TokioResolver {
        match &self.validating {
            Some(validating) if self.dane_active() => validating,
            _ => &self.resolver,
        }
    }

    /// The domain's mail exchangers, best first, equal preferences in random order; each
    /// says whether the answer was DNSSEC-secure.
    pub async fn mail_exchangers(&self, domain: &str) -> Result<Vec<MxHost>, RouteError> {
        self.mail_exchangers_checked(domain)
            .await
            .map(|(hosts, _)| hosts)
    }

    /// As [`MxResolver::mail_exchangers`], with whether the answer was DNSSEC-secure (an
    /// implicit MX: whether its address answer was).
    pub async fn mail_exchangers_checked(
        &self,
        domain: &str,
    ) -> Result<(Vec<MxHost>, Dnssec), RouteError> {
        self.check_dnssec().await;
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let lookup = match self.bounded(self.active().mx_lookup(fqdn.as_str())).await {
            Ok(lookup) => lookup,
            Err(e) => {
                return match answer(&e) {
                    Answer::NoSuchName => Err(RouteError::DomainNotFound(domain.into())),
                    // No MX records: the domain itself is the implicit MX (RFC 5321 5.1).
                    Answer::NoData => self.implicit_mx(domain).await,
                    Answer::Failed => match local_cause(&e) {
                        Some(cause) => Err(RouteError::Local {
                            domain: domain.into(),
                            cause,
                        }),
                        None => Err(temporary(domain, &e)),
                    },
                };
            }
        };
        let records: Vec<&Record> = lookup
            .answers()
            .iter()
            .filter(|r| matches!(r.record_type(), RecordType::MX | RecordType::CNAME))
            .collect();
        if Dnssec::bogus(&records) {
            return Err(RouteError::DnsTemporary {
                domain: domain.into(),
                detail: "DNSSEC: the MX answer is bogus".into(),
            });
        }
        let dnssec = Dnssec::of(&records);
        let mut hosts: Vec<MxHost> = records
            .into_iter()
            .filter_map(|record| match &record.data {
                RData::MX(mx) => Some(MxHost {
                    name: mx
                        .exchange
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                    preference: mx.preference,
                    dnssec,
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
        Ok((hosts, dnssec))
    }

    async fn implicit_mx(&self, domain: &str) -> Result<(Vec<MxHost>, Dnssec), RouteError> {
        match self.addresses_checked(domain).await {
            Ok((addrs, dnssec)) if !addrs.is_empty() => Ok((
                vec![MxHost {
                    name: domain.to_ascii_lowercase(),
                    preference: 0,
                    dnssec,
                }],
                dnssec,
            )),
            Ok(_) => Err(RouteError::DomainNotFound(domain.into())),
            Err(AddressError::NotFound) => Err(RouteError::DomainNotFound(domain.into())),
            Err(AddressError::Temporary(detail) | AddressError::Local(detail)) => {
                Err(RouteError::DnsTemporary {
                    domain: domain.into(),
                    detail,
                })
            }
        }
    }

    /// The host's IPv6 and IPv4 addresses.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, AddressError> {
        self.addresses_checked(host).await.map(|(addrs, _)| addrs)
    }

    /// As [`MxResolver::addresses`], with whether the answer was DNSSEC-secure. A and AAAA
    /// are asked apart: what one of them found is the answer when the other fails, and when
    /// neither found an address, a failure is said as one, not as "no address".
    pub async fn addresses_checked(
        &self,
        host: &str,
    ) -> Result<(Vec<IpAddr>, Dnssec), AddressError> {
        let (v4, v6) = tokio::join!(
            self.addresses_of(host, RecordType::A),
            self.addresses_of(host, RecordType::AAAA)
        );
        let found: Vec<(Vec<IpAddr>, Dnssec)> = [&v4, &v6]
            .into_iter()
            .filter_map(|answer| answer.as_ref().ok().cloned().flatten())
            .collect();
        if found.is_empty() {
            // Neither found an address: a failure, if either failed, else there is none.
            return Err(v4.and(v6).err().unwrap_or(AddressError::NotFound));
        }
        // Secure only when every answer that gave addresses is.
        let dnssec = match found.iter().all(|(_, dnssec)| *dnssec == Dnssec::Secure) {
            true => Dnssec::Secure,
            false => Dnssec::Insecure,
        };
        Ok((
            found.into_iter().flat_map(|(addrs, _)| addrs).collect(),
            dnssec,
        ))
    }

    /// The host's addresses of the family of `like` (A for IPv4, AAAA for IPv6), with
    /// whether the answer was DNSSEC-secure. One question, so its failure is a failure:
    /// [`MxResolver::addresses_checked`] asks both and gives what one of them found when
    /// the other fails, which cannot tell whether an address is the host's.
    pub async fn addresses_like(
        &self,
        host: &str,
        like: IpAddr,
    ) -> Result<(Vec<IpAddr>, Dnssec), AddressError> {
        let rtype = match like {
            IpAddr::V4(_) => RecordType::A,
            IpAddr::V6(_) => RecordType::AAAA,
        };
        self.addresses_of(host, rtype)
            .await?
            .ok_or(AddressError::NotFound)
    }

    /// One question, A or AAAA: the addresses and whether the answer was DNSSEC-secure;
    /// `None` for a NODATA or NXDOMAIN answer.
    async fn addresses_of(
        &self,
        host: &str,
        rtype: RecordType,
    ) -> Result<Option<(Vec<IpAddr>, Dnssec)>, AddressError> {
        self.check_dnssec().await;
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self
            .bounded(self.active().lookup(fqdn.as_str(), rtype))
            .await
        {
            Ok(lookup) => address_answer(lookup.answers())
                .map(|(found, dnssec)| (!found.is_empty()).then_some((found, dnssec))),
            Err(e) => match address_error(&e) {
                AddressError::NotFound => Ok(None),
                failed => Err(failed),
            },
        }
    }

    /// The TLSA records of `host` for SMTP on `port` (`_25._tcp.<host>`, RFC 7672 2.2),
    /// validated. Only asked for a host whose MX and address answers were secure.
    pub async fn tlsa(&self, host: &str, port: u16) -> TlsaAnswer {
        self.check_dnssec().await;
        let fqdn = format!("_{port}._tcp.{}.", host.trim_end_matches('.'));
        let lookup = match self
            .bounded(self.active().lookup(fqdn.as_str(), RecordType::TLSA))
            .await
        {
            Ok(lookup) => lookup,
            Err(e) => {
                return match answer(&e) {
                    Answer::NoSuchName | Answer::NoData => TlsaAnswer::None,
                    Answer::Failed => TlsaAnswer::Failed(format!("TLSA lookup of {fqdn}: {e}")),
                };
            }
        };
        let records: Vec<&Record> = lookup
            .answers()
            .iter()
            .filter(|r| matches!(r.record_type(), RecordType::TLSA | RecordType::CNAME))
            .collect();
        if !records.iter().any(|r| r.record_type() == RecordType::TLSA) {
            return TlsaAnswer::None;
        }
        // Bogus or indeterminate TLSA records: delivery waits (RFC 7672 2.2).
        if records
            .iter()
            .any(|r| matches!(r.proof, Proof::Bogus | Proof::Indeterminate))
        {
            return TlsaAnswer::Failed(format!(
                "the TLSA records of {fqdn} are bogus or indeterminate"
            ));
        }
        if Dnssec::of(&records) != Dnssec::Secure {
            return TlsaAnswer::Insecure;
        }
        let (mut usable, mut unusable, mut presentation) = (Vec::new(), Vec::new(), Vec::new());
        for record in records {
            let RData::TLSA(tlsa) = &record.data else {
                continue;
            };
            presentation.push(tlsa.to_string());
            let (usage, selector, matching) = (
                u8::from(tlsa.cert_usage),
                u8::from(tlsa.selector),
                u8::from(tlsa.matching),
            );
            match TlsaRecord::from_fields(usage, selector, matching, &tlsa.cert_data) {
                Ok(usable_record) => usable.push(usable_record),
                Err(why) => unusable.push((format!("{usage} {selector} {matching}"), why)),
            }
        }
        TlsaAnswer::Records {
            usable,
            unusable,
            presentation,
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
        self.check_dnssec().await;
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.bounded(self.active().txt_lookup(fqdn.as_str())).await {
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

/// The addresses in an answer and whether it was DNSSEC-secure; a bogus answer is a
/// temporary failure. A CNAME on the way counts: every link must be secure (RFC 7672 2.2.2).
fn address_answer(answers: &[Record]) -> Result<(Vec<IpAddr>, Dnssec), AddressError> {
    let records: Vec<&Record> = (answers.iter())
        .filter(|r| {
            matches!(
                r.record_type(),
                RecordType::A | RecordType::AAAA | RecordType::CNAME
            )
        })
        .collect();
    if Dnssec::bogus(&records) {
        return Err(AddressError::Temporary(
            "DNSSEC: the address answer is bogus".into(),
        ));
    }
    let addrs = (records.iter())
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect();
    Ok((addrs, Dnssec::of(&records)))
}

/// The zone a trust anchor file's DNSKEY records are for: hickory trusts a key at the name
/// it is given for, so a lab may anchor below the root. With keys for several zones, the
/// closest to the root (the first of them given, among equals).
fn anchor_zone(text: &str) -> Result<String, String> {
    use hickory_resolver::proto::serialize::txt::trust_anchor::{Entry, Parser};
    let entries = Parser::new(text).parse().map_err(|e| e.to_string())?;
    entries
        .iter()
        .filter_map(|entry| match entry {
            Entry::DNSKEY(record) => Some(record.name().clone()),
            _ => None,
        })
        .min_by_key(|name| name.num_labels())
        .map(|name| name.to_ascii())
        .ok_or_else(|| "no DNSKEY record".to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dane_is_on_unless_the_configuration_says_off() {
        let default: ResolverConfig = serde_saphyr::from_str("nameservers: []\n").expect("yaml");
        assert_eq!(default.dane, Dane::On);
        let off: ResolverConfig = serde_saphyr::from_str("dane: off\n").expect("yaml");
        assert_eq!(off.dane, Dane::Off);
        let on: ResolverConfig = serde_saphyr::from_str("dane: on\n").expect("yaml");
        assert_eq!(on.dane, Dane::On);
        assert!(serde_saphyr::from_str::<ResolverConfig>("dane: maybe\n").is_err());
    }
}
