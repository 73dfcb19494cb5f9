//! DANE for SMTP (RFC 7672): the TLSA records an MX host publishes, and a rustls verifier
//! that accepts the server's certificate only when it matches one of them.
//!
//! Only DANE-TA(2) and DANE-EE(3) are usable for SMTP (RFC 7672 3.1.3): a record with
//! PKIX-TA(0), PKIX-EE(1) or any unknown field, or a digest of the wrong length, is
//! unusable and never matches. The handshake's signatures are always checked by the
//! crypto provider: a match proves which key the server must hold, the signature that it
//! holds it.

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

/// TLSA certificate usage (RFC 6698 2.1.1), the two RFC 7672 allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// 2: the record names a trust anchor; the chain must lead to it and name the MX host.
    DaneTa,
    /// 3: the record names the server's own certificate or key; nothing else is checked.
    DaneEe,
}

/// TLSA selector (RFC 6698 2.1.2): what part of the certificate is matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selector {
    /// 0: the whole certificate, DER.
    Certificate,
    /// 1: its SubjectPublicKeyInfo, DER.
    PublicKey,
}

/// TLSA matching type (RFC 6698 2.1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matching {
    /// 0: the selected bytes themselves.
    Exact,
    /// 1: their SHA-256.
    Sha256,
    /// 2: their SHA-512.
    Sha512,
}

/// One usable TLSA record.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsaRecord {
    pub usage: Usage,
    pub selector: Selector,
    pub matching: Matching,
    pub data: Vec<u8>,
}

/// Why a TLSA record cannot be used for SMTP.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("certificate usage {0} is not DANE-TA(2) or DANE-EE(3)")]
    Usage(u8),
    #[error("unknown selector {0}")]
    Selector(u8),
    #[error("unknown matching type {0}")]
    Matching(u8),
    #[error("a {kind} digest of {length} bytes")]
    DigestLength { kind: &'static str, length: usize },
    #[error("no association data")]
    Empty,
}

impl TlsaRecord {
    /// A record from its wire fields, or why it is unusable (RFC 7672 3.1.3, RFC 7671 4).
    pub fn from_fields(
        usage: u8,
        selector: u8,
        matching: u8,
        data: &[u8],
    ) -> Result<TlsaRecord, Unusable> {
        let usage = match usage {
            2 => Usage::DaneTa,
            3 => Usage::DaneEe,
            other => return Err(Unusable::Usage(other)),
        };
        let selector = match selector {
            0 => Selector::Certificate,
            1 => Selector::PublicKey,
            other => return Err(Unusable::Selector(other)),
        };
        let (matching, length) = match matching {
            0 => (Matching::Exact, None),
            1 => (Matching::Sha256, Some(("SHA-256", 32))),
            2 => (Matching::Sha512, Some(("SHA-512", 64))),
            other => return Err(Unusable::Matching(other)),
        };
        match length {
            _ if data.is_empty() => return Err(Unusable::Empty),
            Some((kind, wanted)) if data.len() != wanted => {
                return Err(Unusable::DigestLength {
                    kind,
                    length: data.len(),
                });
            }
            _ => {}
        }
        Ok(TlsaRecord {
            usage,
            selector,
            matching,
            data: data.to_vec(),
        })
    }

    /// Whether this record names `cert` (DER). A certificate that does not parse matches
    /// nothing.
    pub fn matches(&self, cert: &[u8]) -> bool {
        let selected = match self.selector {
            Selector::Certificate => Some(cert.to_vec()),
            Selector::PublicKey => x509_parser::parse_x509_certificate(cert)
                .ok()
                .map(|(_, parsed)| parsed.tbs_certificate.subject_pki.raw.to_vec()),
        };
        let Some(selected) = selected else {
            return false;
        };
        match self.matching {
            Matching::Exact => selected == self.data,
            Matching::Sha256 => digest(&ring::digest::SHA256, &selected) == self.data,
            Matching::Sha512 => digest(&ring::digest::SHA512, &selected) == self.data,
        }
    }
}

fn digest(algorithm: &'static ring::digest::Algorithm, bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(algorithm, bytes).as_ref().to_vec()
}

/// As in zone files: `3 1 1 8f2e…` (the data shortened for logs).
impl fmt::Display for TlsaRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let usage = match self.usage {
            Usage::DaneTa => 2,
            Usage::DaneEe => 3,
        };
        let selector = match self.selector {
            Selector::Certificate => 0,
            Selector::PublicKey => 1,
        };
        let matching = match self.matching {
            Matching::Exact => 0,
            Matching::Sha256 => 1,
            Matching::Sha512 => 2,
        };
        write!(f, "{usage} {selector} {matching} ")?;
        for byte in self.data.iter().take(8) {
            write!(f, "{byte:02x}")?;
        }
        if self.data.len() > 8 {
            f.write_str("…")?;
        }
        Ok(())
    }
}

impl fmt::Debug for TlsaRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsaRecord({self})")
    }
}

/// What DANE made of the server's certificate chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaneVerdict {
    /// `record` matched the certificate at `depth` (0: the server's own).
    Matched { record: TlsaRecord, depth: usize },
    /// No usable record matched, and why.
    NoMatch(NoMatch),
}

/// Why none of a host's usable TLSA records matched the certificates a server sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoMatch {
    #[error("the host has no usable TLSA record")]
    NoUsableRecord,
    #[error("the server sent no certificate")]
    NoCertificate,
    #[error("{0:?} is not a valid TLS name")]
    BadName(String),
    /// The handshake ended before the certificate was checked.
    #[error("not checked")]
    NotChecked,
    /// Each kind of record the host has, and why it failed.
    #[error("{}", records_failed(.ee, .ta))]
    Records {
        /// The number of DANE-EE records, none of which names the server's key.
        ee: Option<usize>,
        ta: Option<TaFailure>,
    },
}

/// Why the host's DANE-TA records led to no trust anchor the chain verifies to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaFailure {
    #[error("no certificate the server sent matches its {0} DANE-TA record(s)")]
    NoAnchorSent(usize),
    #[error("the DANE-TA anchor {record} is not a usable CA: {error}")]
    AnchorUnusable { record: TlsaRecord, error: String },
    #[error("the chain to the DANE-TA anchor {record} does not verify: {error}")]
    ChainInvalid { record: TlsaRecord, error: String },
}

fn records_failed(ee: &Option<usize>, ta: &Option<TaFailure>) -> String {
    let ee =
        ee.map(|count| format!("the server certificate matches none of {count} DANE-EE record(s)"));
    let ta = ta.as_ref().map(ToString::to_string);
    let why: Vec<String> = ee.into_iter().chain(ta).collect();
    why.join("; ")
}

impl fmt::Display for DaneVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaneVerdict::Matched { record, depth: 0 } => {
                write!(f, "TLSA {record} matched the server certificate")
            }
            DaneVerdict::Matched { record, depth } => {
                write!(f, "TLSA {record} matched the trust anchor at depth {depth}")
            }
            DaneVerdict::NoMatch(why) => write!(f, "no TLSA record matched: {why}"),
        }
    }
}

/// The error a failed DANE check gives the handshake, recoverable from the rustls error
/// (`CertificateError::Other`) by downcasting.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DANE: {0}")]
pub struct DaneMismatch(pub NoMatch);

/// Accepts a server certificate only when it matches one of the host's usable TLSA records;
/// remembers which one did, or why none did. One verifier per handshake.
#[derive(Debug)]
pub struct DaneVerifier {
    records: Vec<TlsaRecord>,
    provider: Arc<CryptoProvider>,
    verdict: Mutex<Option<DaneVerdict>>,
}

impl DaneVerifier {
    pub fn new(records: Vec<TlsaRecord>, provider: Arc<CryptoProvider>) -> DaneVerifier {
        DaneVerifier {
            records,
            provider,
            verdict: Mutex::new(None),
        }
    }

    /// What the last handshake found; `None` before one reached the certificate.
    pub fn verdict(&self) -> Option<DaneVerdict> {
        self.verdict.lock().ok().and_then(|v| v.clone())
    }

    /// A client configuration that verifies with `verifier` alone and never resumes a
    /// session: a resumed session skips certificate checks, so a session made under a
    /// weaker policy must never stand in for this one.
    pub fn client_config(
        verifier: Arc<DaneVerifier>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<rustls::ClientConfig, rustls::Error> {
        let mut config = rustls::ClientConfig::builder_with_provider(verifier.provider.clone())
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }

    fn judge(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> DaneVerdict {
        if self.records.is_empty() {
            return DaneVerdict::NoMatch(NoMatch::NoUsableRecord);
        }
        let ee: Vec<_> = self.of(Usage::DaneEe).collect();
        if let Some(record) = ee.iter().find(|r| r.matches(end_entity)) {
            // DANE-EE: the key is the identity; names and dates do not count (RFC 7672 3.1.1).
            return DaneVerdict::Matched {
                record: (*record).clone(),
                depth: 0,
            };
        }
        let ta: Vec<_> = self.of(Usage::DaneTa).collect();
        let ta = match ta.is_empty() {
            true => None,
            false => match self.chain_to_anchor(&ta, end_entity, intermediates, server_name, now) {
                Ok(matched) => return matched,
                Err(failure) => Some(failure),
            },
        };
        let ee = (!ee.is_empty()).then_some(ee.len());
        DaneVerdict::NoMatch(NoMatch::Records { ee, ta })
    }

    fn of(&self, usage: Usage) -> impl Iterator<Item = &TlsaRecord> {
        self.records.iter().filter(move |r| r.usage == usage)
    }

    /// DANE-TA: a certificate the server sent matches a record, and the chain from the
    /// server's certificate leads to it and is valid for the MX name (RFC 7672 3.1.2). The
    /// server must send the anchor (3.1.2 asks it to), so only sent certificates count.
    fn chain_to_anchor(
        &self,
        records: &[&TlsaRecord],
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<DaneVerdict, TaFailure> {
        let mut anchor_found = None;
        for (index, cert) in intermediates.iter().enumerate() {
            if let Some(record) = records.iter().find(|r| r.matches(cert)) {
                anchor_found = Some(((*record).clone(), index + 1, cert));
                break;
            }
        }
        let Some((record, depth, anchor)) = anchor_found else {
            return Err(TaFailure::NoAnchorSent(records.len()));
        };
        let mut roots = RootCertStore::empty();
        let unusable = |error: String| TaFailure::AnchorUnusable {
            record: record.clone(),
            error,
        };
        (roots.add(anchor.clone().into_owned())).map_err(|e| unusable(e.to_string()))?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| unusable(e.to_string()))?;
        match webpki.verify_server_cert(end_entity, intermediates, server_name, &[], now) {
            Ok(_) => Ok(DaneVerdict::Matched { record, depth }),
            Err(error) => Err(TaFailure::ChainInvalid {
                record,
                error: error.to_string(),
            }),
        }
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.judge(end_entity, intermediates, server_name, now);
        if let Ok(mut slot) = self.verdict.lock() {
            *slot = Some(verdict.clone());
        }
        match verdict {
            DaneVerdict::Matched { .. } => Ok(ServerCertVerified::assertion()),
            DaneVerdict::NoMatch(why) => Err(rustls::Error::InvalidCertificate(
                CertificateError::Other(OtherError(Arc::new(DaneMismatch(why)))),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dane_ta_and_dane_ee_with_known_fields_are_usable() {
        let sha256 = [7u8; 32];
        assert!(TlsaRecord::from_fields(3, 1, 1, &sha256).is_ok());
        assert!(TlsaRecord::from_fields(2, 0, 1, &sha256).is_ok());
        assert_eq!(
            TlsaRecord::from_fields(0, 0, 1, &sha256),
            Err(Unusable::Usage(0))
        );
        assert_eq!(
            TlsaRecord::from_fields(1, 1, 1, &sha256),
            Err(Unusable::Usage(1))
        );
        assert_eq!(
            TlsaRecord::from_fields(3, 2, 1, &sha256),
            Err(Unusable::Selector(2))
        );
        assert_eq!(
            TlsaRecord::from_fields(3, 1, 3, &sha256),
            Err(Unusable::Matching(3))
        );
        assert_eq!(
            TlsaRecord::from_fields(3, 1, 2, &sha256),
            Err(Unusable::DigestLength {
                kind: "SHA-512",
                length: 32
            })
        );
        assert_eq!(TlsaRecord::from_fields(3, 0, 0, &[]), Err(Unusable::Empty));
    }

    #[test]
    fn a_record_is_shown_as_in_a_zone_file() {
        let record = TlsaRecord::from_fields(3, 1, 1, &[0xab; 32]).expect("usable");
        assert_eq!(record.to_string(), "3 1 1 abababababababab…");
    }
}
