//! Where a transaction goes, and what each recipient domain publishes there: the next hop
//! (the MX hosts, a smart host, or the original destination of a redirected connection),
//! and DANE (TLSA records where the MX and address answers were DNSSEC-secure) before
//! MTA-STS.

use std::net::SocketAddr;

use crate::net::dane::TlsaRecord;
use crate::net::dns::{
    AddressError, Dnssec, Lookup, MxHost, RouteError, ServerId, TlsaAnswer, literal_address,
};
use crate::outbound::Outbound;
use crate::policy::mta_sts::{Mode, StsPolicy};
use crate::router::Plan;
use crate::router::decision::{
    Authentication, DaneState, Demand, HostDecision, Published, StsMode, TlsTerms,
};
use crate::rules::model::HostPort;
use crate::rules::{Route, VerifyMode};

/// Where a transaction goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// The recipient domain's mail exchangers, best first.
    Mx(Vec<MxHost>),
    Smarthost(HostPort),
    /// The address a redirected MTA connection was going to (transparent mode), with the
    /// recipient domain's MX name that has this address, if one has.
    OriginalDestination {
        addr: SocketAddr,
        mx: Option<String>,
        /// Whether the MX answer that gave `mx` was DNSSEC-secure.
        mx_dnssec: Dnssec,
    },
}

impl NextHop {
    /// Identifies the hop, to tell whether two recipients can share a transaction.
    pub fn key(&self) -> Vec<String> {
        match self {
            NextHop::Mx(hosts) => {
                let mut names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
                names.sort();
                names
            }
            NextHop::Smarthost(server) => vec![server.to_string()],
            NextHop::OriginalDestination { addr, .. } => vec![addr.to_string()],
        }
    }

    /// What a message demands of the server `name` on this hop: with the sender's
    /// REQUIRETLS, whether its name is authentic without an MTA-STS policy (a smart host
    /// the admin named, or an MX host named by a DNSSEC-secure answer).
    pub fn demand(&self, requiretls: bool, name: &str) -> Demand {
        if !requiretls {
            return Demand::Nothing;
        }
        let name_authentic = match self {
            NextHop::Smarthost(_) => true,
            NextHop::Mx(hosts) => hosts
                .iter()
                .any(|h| h.name == name && h.dnssec == Dnssec::Secure),
            NextHop::OriginalDestination { mx, mx_dnssec, .. } => {
                mx.as_deref() == Some(name) && *mx_dnssec == Dnssec::Secure
            }
        };
        Demand::RequireTls { name_authentic }
    }

    /// Whether the recipient domain's published policy binds this hop (not a smart host's).
    pub fn is_domain_delivery(&self) -> bool {
        !matches!(self, NextHop::Smarthost(_))
    }
}

impl Outbound {
    /// Where a transaction for `domain` goes under `plan`.
    pub async fn next_hop(&self, plan: &Plan, domain: &str) -> Result<NextHop, RouteError> {
        if let Route::Smarthost { server, .. } = plan.route() {
            return Ok(NextHop::Smarthost(server.clone()));
        }
        if domain.starts_with('[') {
            return Ok(NextHop::Mx(vec![MxHost {
                name: domain.to_string(),
                preference: 0,
                dnssec: Dnssec::Insecure,
            }]));
        }
        self.mail_exchangers(domain).await.map(NextHop::Mx)
    }

    /// The domain's MX hosts; a failure that may pass is believed for a while.
    async fn mail_exchangers(&self, domain: &str) -> Result<Vec<MxHost>, RouteError> {
        let lookup = self.resolver.mail_exchangers(domain);
        let found = self.failed_mx_lookups.ask(domain, lookup).await;
        if let Err(RouteError::Local { cause, .. }) = &found {
            self.stats.local_errors.inc();
            tracing::warn!(event = "local_error", domain, error = %cause, "MX of {domain} not looked up for a reason of this host's own (nothing cached): {cause}");
        }
        found
    }

    /// Where a transaction for `domain` goes when the MTA was connecting to `addr` and was
    /// redirected to us. A rule's smart-host route still wins; otherwise the next hop is
    /// `addr`, named by the MX of `domain` that has this address, so that the certificate
    /// and the domain's policy are checked against that name.
    ///
    /// With DANE in force, a failed lookup that could tell whether DANE applies (the MX
    /// answer, or the address answer of a host named by a secure one) is an error: whoever
    /// can drop one DNS answer must not take DANE away.
    pub async fn original_destination_hop(
        &self,
        plan: &Plan,
        domain: &str,
        addr: SocketAddr,
    ) -> Result<NextHop, RouteError> {
        if let Route::Smarthost { server, .. } = plan.route() {
            return Ok(NextHop::Smarthost(server.clone()));
        }
        let dane = self.resolver.check_dnssec().await;
        let hosts = match self.mail_exchangers(domain).await {
            Ok(hosts) => hosts,
            Err(RouteError::DnsTemporary { detail, .. }) if dane => {
                return Err(RouteError::DaneUnknown {
                    lookup: Lookup::Mx(domain.to_string()),
                    server: addr.ip().to_string(),
                    detail,
                });
            }
            // Nothing can be asked now: not even whether DANE applies.
            Err(local @ RouteError::Local { .. }) => return Err(local),
            Err(e) => {
                tracing::info!(
                    domain,
                    "no MX set to name the original destination {addr}: {e}"
                );
                Vec::new()
            }
        };
        let mx = self.mx_with_address(&hosts, addr.ip(), dane).await?;
        let (mx, mx_dnssec) = mx.map_or((None, Dnssec::Insecure), |host| {
            (Some(host.name), host.dnssec)
        });
        if mx.is_none() {
            tracing::warn!(
                event = "original_destination.unnamed",
                domain,
                addr = %addr,
                "the original destination {addr} is no MX host of {domain}: its certificate cannot be verified for an MX name (tls-unverified at best)"
            );
        }
        Ok(NextHop::OriginalDestination {
            addr,
            mx,
            mx_dnssec,
        })
    }

    /// The first of `hosts` (best first) that has the address `ip`. With `dane`, a host
    /// named by a secure MX answer whose address lookup fails before one is found stops
    /// the search: it might be the one, and DANE would apply to it.
    pub(crate) async fn mx_with_address(
        &self,
        hosts: &[MxHost],
        ip: std::net::IpAddr,
        dane: bool,
    ) -> Result<Option<MxHost>, RouteError> {
        for host in hosts {
            let found = match literal_address(&host.name) {
                Some(literal) => Ok(vec![literal]),
                None => (self.resolver.addresses_like(&host.name, ip).await).map(|(a, _)| a),
            };
            match found {
                Ok(addrs) if addrs.contains(&ip) => return Ok(Some(host.clone())),
                Ok(_) | Err(AddressError::NotFound) => {}
                Err(AddressError::Temporary(detail) | AddressError::Local(detail))
                    if dane && host.dnssec == Dnssec::Secure =>
                {
                    return Err(RouteError::DaneUnknown {
                        lookup: Lookup::Address(host.name.clone()),
                        server: ip.to_string(),
                        detail,
                    });
                }
                Err(AddressError::Temporary(_) | AddressError::Local(_)) => {}
            }
        }
        Ok(None)
    }

    /// What `server`'s domain publishes for it, reached through `hop`: DANE where the MX
    /// and address answers that name it were DNSSEC-secure (before MTA-STS), else what its
    /// MTA-STS `policy` says of it.
    pub(crate) async fn published_for(
        &self,
        hop: &NextHop,
        server: &ServerId,
        port: u16,
        policy: Option<&StsPolicy>,
    ) -> Published {
        let mx_secure = match hop {
            NextHop::Mx(hosts) => {
                (hosts.iter()).any(|h| h.name == server.name && h.dnssec == Dnssec::Secure)
            }
            NextHop::OriginalDestination { mx, mx_dnssec, .. } => {
                mx.as_deref() == Some(server.name.as_str()) && *mx_dnssec == Dnssec::Secure
            }
            NextHop::Smarthost(_) => false,
        };
        let dane = match mx_secure {
            false => None,
            true => match self
                .resolver
                .addresses_like(&server.name, server.addr)
                .await
            {
                Ok((found, Dnssec::Secure)) if found.contains(&server.addr) => {
                    self.dane(&server.name, port).await.published
                }
                Ok((_, Dnssec::Insecure)) => None,
                // Whether DANE applies cannot be known: as a failed TLSA lookup.
                _ => Some(Published::Dane(DaneState::Bogus)),
            },
        };
        dane.unwrap_or_else(|| published(policy, &server.name))
    }

    /// Whether the domain's MX answer is DNSSEC-secure, when DANE is in force: for
    /// `explain` and `probe`, which have no next hop (delivery has it from the MX answer).
    pub(crate) async fn mx_secure(&self, domain: &str) -> bool {
        if domain.starts_with('[') || !self.resolver.check_dnssec().await {
            return false;
        }
        matches!(
            self.resolver.mail_exchangers_checked(domain).await,
            Ok((_, Dnssec::Secure))
        )
    }

    /// What DANE says of a host whose MX and address answers were secure: its published
    /// policy (none when it has no secure TLSA records), its usable records, and all.
    pub(crate) async fn dane(&self, host: &str, port: u16) -> Dane {
        let answer = self.resolver.tlsa(host, port).await;
        match &answer {
            TlsaAnswer::Records {
                usable, unusable, ..
            } if usable.is_empty() => {
                let why: Vec<String> = unusable.iter().map(|(r, e)| format!("{r}: {e}")).collect();
                tracing::info!(
                    host,
                    "DANE: no usable TLSA record ({}); TLS required, unauthenticated",
                    why.join("; ")
                );
            }
            TlsaAnswer::Failed(why) => {
                tracing::warn!(
                    event = "dane.unknown",
                    lookup = "tlsa",
                    name = host,
                    "DANE: {why}; nothing is sent to this host until it can be had"
                );
            }
            _ => {}
        }
        let published = dane_published(&answer);
        let (usable, presentation) = match answer {
            TlsaAnswer::Records {
                usable,
                presentation,
                ..
            } => (usable, presentation),
            _ => (Vec::new(), Vec::new()),
        };
        Dane {
            published,
            usable,
            presentation,
        }
    }

    /// What DANE says of `host` as an MX of `domain` now, for `explain` and `probe`:
    /// `None` when DANE is off or does not apply (an insecure answer, no TLSA records).
    pub async fn dane_policy(&self, domain: &str, host: &str) -> Option<Published> {
        if !self.mx_secure(domain).await {
            return None;
        }
        match self.addresses_checked(host).await {
            Ok((_, Dnssec::Secure)) => self.dane(host, self.port).await.published,
            _ => None,
        }
    }

    pub(crate) async fn addresses_checked(
        &self,
        host: &str,
    ) -> Result<(Vec<std::net::IpAddr>, Dnssec), AddressError> {
        if let Some(ip) = literal_address(host) {
            return Ok((vec![ip], Dnssec::Insecure));
        }
        let lookup = self.resolver.addresses_checked(host);
        self.failed_lookups.ask(host, lookup).await
    }

    pub(crate) async fn addresses(
        &self,
        host: &str,
    ) -> Result<Vec<std::net::IpAddr>, AddressError> {
        match literal_address(host) {
            Some(ip) => Ok(vec![ip]),
            None => self.resolver.addresses(host).await,
        }
    }
}

/// Whether the decision's first try (`decide` with nothing known) requires a certificate
/// verified for the server's name of an original destination that no MX host names, so
/// that it cannot succeed.
pub(crate) fn no_mx_name(hop: &NextHop, first_try: &HostDecision) -> bool {
    let name_verified = matches!(
        first_try,
        HostDecision::Tls(TlsTerms {
            verify: VerifyMode::Require,
            authentication: Authentication::Pkix | Authentication::UnusableTlsa,
            ..
        })
    );
    name_verified && matches!(hop, NextHop::OriginalDestination { mx: None, .. })
}

/// What a domain's MTA-STS policy is to one of its servers.
pub fn published(policy: Option<&StsPolicy>, server: &str) -> Published {
    let Some(policy) = policy else {
        return Published::Nothing;
    };
    let mode = match policy.mode {
        Mode::Enforce => StsMode::Enforce,
        Mode::Testing => StsMode::Testing,
        Mode::None => return Published::Nothing,
    };
    Published::MtaSts {
        mode,
        mx_listed: policy.mx_matches(server),
    }
}

/// What DANE says of one MX host.
#[derive(Default)]
pub(crate) struct Dane {
    /// `None`: DANE does not apply.
    pub published: Option<Published>,
    pub usable: Vec<TlsaRecord>,
    /// Every TLSA record in presentation form.
    pub presentation: Vec<String>,
}

/// What a secure MX host's TLSA answer publishes (RFC 7672 2.2); `None`: no DANE.
pub fn dane_published(answer: &TlsaAnswer) -> Option<Published> {
    match answer {
        TlsaAnswer::Records { usable, .. } if !usable.is_empty() => {
            Some(Published::Dane(DaneState::Usable))
        }
        TlsaAnswer::Records { .. } => Some(Published::Dane(DaneState::Unusable)),
        TlsaAnswer::None | TlsaAnswer::Insecure => None,
        TlsaAnswer::Failed(_) => Some(Published::Dane(DaneState::Bogus)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::decision::{Known, decide};
    use crate::rules::Rule;

    fn rule(yaml: &str) -> Rule {
        let rules =
            crate::rules::RuleSet::parse(yaml, std::path::Path::new("r.yaml")).expect("rules");
        rules.rules()[0].clone()
    }

    #[test]
    fn an_unnamed_original_destination_is_the_cause_only_where_the_decision_verifies_its_name() {
        let unnamed = NextHop::OriginalDestination {
            addr: "192.0.2.25:25".parse().expect("address"),
            mx: None,
            mx_dnssec: Dnssec::Insecure,
        };
        let named = NextHop::OriginalDestination {
            addr: "192.0.2.25:25".parse().expect("address"),
            mx: Some("mx.example".into()),
            mx_dnssec: Dnssec::Insecure,
        };
        let enforce = Published::MtaSts {
            mode: StsMode::Enforce,
            mx_listed: true,
        };
        let strict = rule("rules:\n  - name: r\n    tls: require\n    verify: require\n");
        let lenient = rule("rules:\n  - name: r\n");
        let first_try =
            |rule: &Rule, published| decide(rule, Known::Nothing, published, Demand::Nothing);
        assert!(no_mx_name(
            &unnamed,
            &first_try(&strict, Published::Nothing)
        ));
        assert!(no_mx_name(&unnamed, &first_try(&lenient, enforce)));
        assert!(!no_mx_name(
            &unnamed,
            &first_try(&lenient, Published::Nothing)
        ));
        assert!(!no_mx_name(&named, &first_try(&strict, Published::Nothing)));
        // DANE judges by the TLSA records, not the name.
        let dane = Published::Dane(DaneState::Usable);
        assert!(!no_mx_name(&unnamed, &first_try(&lenient, dane)));
    }
}
