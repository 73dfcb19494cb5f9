//! Certificates made at test time with rcgen: a CA, leaves it signs (valid, expired, not yet
//! valid, for any names) and self-signed ones. Nothing is read from disk or the system.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    date_time_ymd,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// When a leaf is valid, relative to today.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From yesterday until a year from now.
    Current,
    /// From two years ago until 30 days ago.
    Expired,
    /// From 30 days from now, for a year.
    NotYetValid,
}

/// A certificate chain and its key, as PEM (for OpenSSL and files) and DER (for rustls).
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
    /// The leaf only: the CA is what the client trusts, not part of the chain.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The last day of validity (at 00:00 UTC).
    pub not_after: Date,
}

/// A UTC calendar date; shown as `YYYY-MM-DD`, the way the proxy reports certificate dates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub year: i32,
    pub month: u8,
    pub day: u8,
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

// `PrivateKeyDer` is not `Clone` (so secrets are not copied by accident): `clone_key` is.
impl Clone for CertKey {
    fn clone(&self) -> CertKey {
        CertKey {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_after: self.not_after,
        }
    }
}

static CA_SERIAL: AtomicU64 = AtomicU64::new(1);

/// A fresh CA per test, so no test can pass by trusting another test's certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // A name of its own: with a shared name, another CA's leaf would fail on its signature
        // instead of as an unknown issuer.
        let serial = CA_SERIAL.fetch_add(1, Ordering::Relaxed);
        let name = format!("tlsrouter test CA {} #{serial}", std::process::id());
        params.distinguished_name.push(DnType::CommonName, name);
        set_validity(&mut params, Validity::Current);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        TestCa {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn ca_pem(&self) -> String {
        self.pem.clone()
    }

    /// Trust anchors holding this CA only, for a rustls client in a test.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.der.clone())
            .expect("the test CA as a trust anchor");
        roots
    }

    /// Writes the CA certificate as `ca.pem` in `dir`, for configurations that name a file.
    pub fn write_ca_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem)
            .unwrap_or_else(|e| panic!("write the CA to {}: {e}", path.display()));
        path
    }

    /// A leaf for `names` (DNS names, or IP addresses as text) signed by this CA.
    pub fn leaf(&self, names: &[&str], validity: Validity) -> CertKey {
        let (params, not_after) = leaf_params(names, validity);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        cert_key(&cert, &key, not_after)
    }
}

impl Default for TestCa {
    fn default() -> TestCa {
        TestCa::new()
    }
}

/// A currently valid certificate that no CA vouches for.
pub fn self_signed(names: &[&str]) -> CertKey {
    let (params, not_after) = leaf_params(names, Validity::Current);
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-sign");
    cert_key(&cert, &key, not_after)
}

/// A self-signed certificate as `openssl req -x509` makes it: marked as a CA.
pub fn self_signed_ca(names: &[&str]) -> CertKey {
    let (mut params, not_after) = leaf_params(names, Validity::Current);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-sign");
    cert_key(&cert, &key, not_after)
}

fn leaf_params(names: &[&str], validity: Validity) -> (CertificateParams, Date) {
    let owned: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(owned).expect("leaf params (names)");
    if let Some(first) = names.first() {
        params.distinguished_name.push(DnType::CommonName, *first);
    }
    let not_after = set_validity(&mut params, validity);
    (params, not_after)
}

/// Sets whole days (so the dates do not depend on the second the test ran); returns
/// not_after.
fn set_validity(params: &mut CertificateParams, validity: Validity) -> Date {
    let (before, after) = match validity {
        Validity::Current => (-1, 365),
        Validity::Expired => (-730, -30),
        Validity::NotYetValid => (30, 395),
    };
    let at = |date: Date| date_time_ymd(date.year, date.month, date.day);
    let not_after = date_in_days(after);
    params.not_before = at(date_in_days(before));
    params.not_after = at(not_after);
    not_after
}

/// The UTC date `days` from today.
fn date_in_days(days: i64) -> Date {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let seconds = u64::try_from(now + days * 86_400).expect("date after 1970");
    // rcgen's date type does the calendar arithmetic.
    let date = date_time_ymd(1970, 1, 1) + Duration::from_secs(seconds);
    Date {
        year: date.year(),
        month: date.month().into(),
        day: date.day(),
    }
}

fn cert_key(cert: &rcgen::Certificate, key: &KeyPair, not_after: Date) -> CertKey {
    CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_after,
    }
}

/// The SHA-256 digest of the certificate's public key (its SubjectPublicKeyInfo): a DANE-EE
/// `3 1 1` record's data, computed by OpenSSL, apart from the code under test.
pub fn spki_sha256(cert: &CertKey) -> Vec<u8> {
    let spki = openssl::x509::X509::from_der(&cert.chain[0])
        .and_then(|c| c.public_key())
        .and_then(|k| k.public_key_to_der())
        .expect("the certificate's public key, by OpenSSL");
    openssl::sha::sha256(&spki).to_vec()
}
