//! What a certificate says: subject, names, issuer and validity, read from its DER form.
//! `probe` shows every certificate of a chain; the cache keeps the leaf's subject and expiry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

use crate::outcome::format_date;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub subject: String,
    /// The DNS names and IP addresses it is valid for.
    pub sans: Vec<String>,
    pub issuer: String,
    /// `YYYY-MM-DD`.
    pub not_before: String,
    /// `YYYY-MM-DD`.
    pub not_after: String,
    /// Days from when it was read until `not_after`; negative once expired.
    pub days_left: i64,
}

impl Certificate {
    /// `None` when `der` is not a certificate x509-parser can read.
    pub fn parse(der: &[u8]) -> Option<Certificate> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let sans = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|ext| ext.value.general_names.iter().filter_map(san).collect())
            .unwrap_or_default();
        let validity = cert.validity();
        let date = |t: &ASN1Time| format_date(t.timestamp().max(0) as u64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Some(Certificate {
            subject: cert.subject().to_string(),
            sans,
            issuer: cert.issuer().to_string(),
            not_before: date(&validity.not_before),
            not_after: date(&validity.not_after),
            days_left: (validity.not_after.timestamp() - now).div_euclid(86_400),
        })
    }
}

/// Who issued a certificate, as an admin asks it when no trusted CA vouches for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Issuer {
    /// Itself: its issuer is its subject (self-signed).
    Itself,
    /// A CA, by its common name (or its whole name when it has none).
    Ca(String),
}

impl Issuer {
    /// `None` when `der` is not a certificate x509-parser can read.
    pub fn of(der: &[u8]) -> Option<Issuer> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        if cert.issuer().as_raw() == cert.subject().as_raw() {
            return Some(Issuer::Itself);
        }
        let common_name = (cert.issuer().iter_common_name().next()).and_then(|cn| cn.as_str().ok());
        Some(Issuer::Ca(
            common_name.map_or_else(|| cert.issuer().to_string(), str::to_string),
        ))
    }
}

/// A subject alternative name as people write it; other kinds (email, URI) are left out.
fn san(name: &GeneralName<'_>) -> Option<String> {
    match name {
        GeneralName::DNSName(dns) => Some(dns.to_string()),
        GeneralName::IPAddress(bytes) => ip_address(bytes).map(|ip| ip.to_string()),
        _ => None,
    }
}

/// The 4 or 16 octets of an iPAddress name (RFC 5280, 4.2.1.6).
fn ip_address(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    <[u8; 16]>::try_from(bytes)
        .ok()
        .map(|v6| IpAddr::V6(Ipv6Addr::from(v6)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_address_names_are_written_as_addresses() {
        let v4 = GeneralName::IPAddress(&[192, 0, 2, 7]);
        assert_eq!(san(&v4).as_deref(), Some("192.0.2.7"));
        let mut octets = [0u8; 16];
        octets[..2].copy_from_slice(&[0x20, 0x01]);
        octets[15] = 1;
        let v6 = GeneralName::IPAddress(&octets);
        assert_eq!(san(&v6).as_deref(), Some("2001::1"));
        assert_eq!(san(&GeneralName::IPAddress(&[1, 2, 3])), None);
        assert_eq!(
            san(&GeneralName::DNSName("mx.example.net")).as_deref(),
            Some("mx.example.net")
        );
    }
}
