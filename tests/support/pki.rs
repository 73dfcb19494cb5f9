//! Certificates made at test time with rcgen: a CA, leaves it signs (valid, expired, not yet
//! valid, for another name) and self-signed ones.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, date_time_ymd};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tlsrouter::outcome::format_date;

#[derive(Clone, Copy, Debug)]
pub enum Validity {
    Current,
    /// Ended 30 days ago.
    Expired,
    /// Begins in 30 days.
    NotYetValid,
}

pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// `YYYY-MM-DD`
    pub not_after: String,
}

impl Clone for CertKey {
    fn clone(&self) -> CertKey {
        CertKey {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_after: self.not_after.clone(),
        }
    }
}

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

const DAY: i64 = 86_400;

/// `days` from today, `YYYY-MM-DD`.
fn date(days: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    format_date((now + days * DAY) as u64)
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tlsrouter test CA");
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn ca_pem(&self) -> String {
        self.pem.clone()
    }

    pub fn write_ca_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem).expect("write ca file");
        path
    }

    pub fn leaf(&self, names: &[&str], validity: Validity) -> CertKey {
        let (params, not_after) = leaf_params(names, validity);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        cert_key(cert, key, not_after)
    }
}

pub fn self_signed(names: &[&str]) -> CertKey {
    let (params, not_after) = leaf_params(names, Validity::Current);
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed cert");
    cert_key(cert, key, not_after)
}

fn leaf_params(names: &[&str], validity: Validity) -> (CertificateParams, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("leaf params");
    let (before, after) = match validity {
        Validity::Current => (-1, 365),
        Validity::Expired => (-730, -30),
        Validity::NotYetValid => (30, 395),
    };
    let ymd = |text: &str| {
        let parts: Vec<i64> = text.split('-').map(|p| p.parse().expect("date")).collect();
        date_time_ymd(parts[0] as i32, parts[1] as u8, parts[2] as u8)
    };
    params.not_before = ymd(&date(before));
    let not_after = date(after);
    params.not_after = ymd(&not_after);
    (params, not_after)
}

fn cert_key(cert: rcgen::Certificate, key: KeyPair, not_after: String) -> CertKey {
    CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_after,
    }
}
