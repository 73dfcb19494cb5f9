//! The second TLS stack (OpenSSL), for servers rustls cannot talk to: those that speak only
//! TLS 1.0/1.1, or TLS 1.2 with only CBC or static-RSA suites. Such a session is encrypted
//! but never authenticated: it is meant for hosts that would otherwise get plain SMTP, and
//! never where a policy requires a verified certificate.

use std::pin::Pin;
use std::time::Duration;

use openssl::ssl::{Ssl, SslContext, SslMethod, SslOptions, SslRef, SslVerifyMode, SslVersion};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use crate::outcome::NoTls;

/// Every suite OpenSSL has, except those without encryption or without a certificate (no
/// certificate, no facts to log). Security level 0 admits what these servers have: TLS 1.0
/// and 1.1, SHA-1 signatures, 3DES, small keys.
const LEGACY_CIPHERS: &str = "ALL:!aNULL:!eNULL:@SECLEVEL=0";

/// SSL_OP_LEGACY_SERVER_CONNECT, which the crate does not name: OpenSSL 3 refuses servers
/// without secure renegotiation (RFC 5746) unless told, and old servers lack it. We never
/// renegotiate, so the attack it guards against does not apply.
const LEGACY_SERVER_CONNECT: SslOptions = SslOptions::from_bits_retain(0x0000_0004);

/// An OpenSSL client context made once and shared by every legacy handshake.
pub struct LegacyConnector {
    context: SslContext,
}

/// What a legacy handshake negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegacyHandshake {
    /// "TLSv1.0" ... "TLSv1.3", spelled as the rustls path spells them.
    pub version: String,
    /// The IANA name, e.g. "TLS_RSA_WITH_AES_128_CBC_SHA".
    pub cipher: String,
    /// The certificates the server sent, end entity first.
    pub chain: Vec<CertificateDer<'static>>,
}

impl LegacyConnector {
    pub fn new() -> Result<LegacyConnector, openssl::error::ErrorStack> {
        let mut builder = SslContext::builder(SslMethod::tls_client())?;
        builder.set_min_proto_version(Some(SslVersion::TLS1))?;
        // None: the highest this OpenSSL has, so a server that can do better still does.
        builder.set_max_proto_version(None)?;
        builder.set_cipher_list(LEGACY_CIPHERS)?;
        // The certificate is recorded, not required: the caller verifies it for the log.
        builder.set_verify(SslVerifyMode::NONE);
        builder.set_options(
            SslOptions::NO_COMPRESSION | SslOptions::NO_RENEGOTIATION | LEGACY_SERVER_CONNECT,
        );
        Ok(LegacyConnector {
            context: builder.build(),
        })
    }

    /// Runs the client handshake on a connection where STARTTLS was just accepted (or at
    /// once, for implicit TLS), naming `host` in SNI.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        host: &str,
        timeout: Duration,
    ) -> Result<(SslStream<TcpStream>, LegacyHandshake), NoTls> {
        let failed = NoTls::LegacyFailed;
        let mut ssl = Ssl::new(&self.context).map_err(|e| failed(e.to_string()))?;
        if sni_allowed(host) {
            ssl.set_hostname(host).map_err(|e| failed(e.to_string()))?;
        }
        let mut stream = SslStream::new(ssl, tcp).map_err(|e| failed(e.to_string()))?;
        match tokio::time::timeout(timeout, Pin::new(&mut stream).connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(failed(error.to_string())),
            Err(_) => {
                return Err(failed(format!(
                    "no TLS handshake within {}s",
                    timeout.as_secs()
                )));
            }
        }
        let negotiated = negotiated(stream.ssl());
        Ok((stream, negotiated))
    }
}

/// SNI carries host names only (RFC 6066 3), and OpenSSL's setter cannot take a NUL.
fn sni_allowed(host: &str) -> bool {
    !host.is_empty() && !host.contains('\0') && host.parse::<std::net::IpAddr>().is_err()
}

fn negotiated(ssl: &SslRef) -> LegacyHandshake {
    let cipher = ssl
        .current_cipher()
        .map(|c| c.standard_name().unwrap_or(c.name()).to_string())
        .unwrap_or_else(|| "unknown".into());
    let chain = ssl
        .peer_cert_chain()
        .map(|certs| {
            certs
                .iter()
                .filter_map(|cert| cert.to_der().ok())
                .map(CertificateDer::from)
                .collect()
        })
        .unwrap_or_default();
    LegacyHandshake {
        version: version_name(ssl.version2()).into(),
        cipher,
        chain,
    }
}

fn version_name(version: Option<SslVersion>) -> &'static str {
    let known = [
        (SslVersion::TLS1, "TLSv1.0"),
        (SslVersion::TLS1_1, "TLSv1.1"),
        (SslVersion::TLS1_2, "TLSv1.2"),
        (SslVersion::TLS1_3, "TLSv1.3"),
        (SslVersion::SSL3, "SSLv3"),
    ];
    known
        .into_iter()
        .find(|(v, _)| Some(*v) == version)
        .map_or("TLS", |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_names_hosts_not_addresses() {
        assert!(sni_allowed("mx.example.com"));
        assert!(!sni_allowed("192.0.2.7"));
        assert!(!sni_allowed("2001:db8::1"));
        assert!(!sni_allowed(""));
    }
}
