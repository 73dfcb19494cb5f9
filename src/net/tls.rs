//! TLS toward remote MX servers: rustls with a verifier that always verifies, records the
//! result for the connection, and lets the policy decide what a bad certificate means.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, HandshakeKind, PeerIncompatible,
    RootCertStore, SignatureScheme, SupportedProtocolVersion,
};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::net::dane::{DaneVerdict, DaneVerifier, TlsaRecord};

use crate::certificate::{Certificate, Issuer};
#[cfg(feature = "legacy-tls")]
use crate::net::legacy::LegacyConnector;
use crate::net::transport::Transport;
use crate::outcome::{
    CLOSED_IN_HANDSHAKE, CertProblem, Distrust, NoTls, RESET_IN_HANDSHAKE, TlsSession,
    Verification, format_date,
};
use crate::rules::MinTls;
use crate::settings::SetupError;

/// `tls:` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Extra root certificates (PEM) to trust besides, or instead of, the system's.
    pub ca_file: Option<PathBuf>,
    /// Trust the operating system's root certificates.
    pub system_roots: bool,
    /// Remote hosts whose TLS sessions are kept for resumption, per verification policy.
    pub session_cache: usize,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca_file: None,
            system_roots: true,
            session_cache: 1024,
        }
    }
}

/// How a connection is to be secured: the one handshake step delivery, `probe` and the
/// legacy retry all take.
#[derive(Clone, Debug)]
pub enum Handshake {
    /// rustls, the certificate verified for the server's name and recorded (the decision
    /// says what a bad one means).
    Pkix(MinTls),
    /// rustls, the certificate judged by these usable TLSA records alone (RFC 7672 3).
    Dane {
        min_tls: MinTls,
        records: Vec<TlsaRecord>,
    },
    /// The legacy stack (OpenSSL): encrypted, never authenticated; for servers rustls
    /// cannot talk to.
    Legacy,
}

/// What a handshake made: a rustls session, or the legacy stack's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Session {
    Rustls(TlsSession),
    Legacy(crate::outcome::LegacySession),
}

impl From<Session> for crate::outcome::TlsOutcome {
    fn from(session: Session) -> crate::outcome::TlsOutcome {
        match session {
            Session::Rustls(session) => crate::outcome::TlsOutcome::Encrypted(session),
            Session::Legacy(session) => crate::outcome::TlsOutcome::Legacy(session),
        }
    }
}

static TLS12_AND_UP: [&SupportedProtocolVersion; 2] =
    [&rustls::version::TLS13, &rustls::version::TLS12];
static TLS13_ONLY: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];

impl MinTls {
    /// The protocol versions a handshake offers under this minimum.
    fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        match self {
            MinTls::Tls12 => &TLS12_AND_UP,
            MinTls::Tls13 => &TLS13_ONLY,
        }
    }
}

pub struct TlsClient {
    /// `None` when no root is trusted: every certificate is then unverified.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    #[cfg(feature = "legacy-tls")]
    legacy: LegacyConnector,
    /// One client configuration per minimum version, shared by every connection so that
    /// their resumption stores work. Each has a store of its own: a session is only ever
    /// resumed under the policy it was made under. The certificate is verified after each
    /// handshake (full or resumed) from the chain the session holds.
    pkix: [(MinTls, Arc<rustls::ClientConfig>); 2],
    /// Counters of full and resumed handshakes (`Stats` registers them).
    full_handshakes: Counter,
    resumed_handshakes: Counter,
    /// The one crypto provider (ring), for configurations made per handshake (DANE).
    provider: Arc<CryptoProvider>,
}

impl TlsClient {
    /// Trusts the system's roots (unless turned off) and those in `ca_file`.
    pub fn new(config: &TlsConfig) -> Result<TlsClient, SetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = trusted_roots(config)?;
        if roots.is_empty() {
            tracing::warn!("no trusted root certificates: every certificate will be unverified");
        }
        let webpki = if roots.is_empty() {
            None
        } else {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| SetupError::setting("tls", e))?,
            )
        };
        let sessions = config.session_cache;
        let pkix = [
            (
                MinTls::Tls12,
                shared_config(&provider, MinTls::Tls12, sessions)?,
            ),
            (
                MinTls::Tls13,
                shared_config(&provider, MinTls::Tls13, sessions)?,
            ),
        ];
        Ok(TlsClient {
            webpki,
            pkix,
            full_handshakes: Counter::default(),
            resumed_handshakes: Counter::default(),
            provider,
            #[cfg(feature = "legacy-tls")]
            legacy: LegacyConnector::new()
                .map_err(|e| SetupError::setting("the legacy TLS stack (OpenSSL)", e))?,
        })
    }

    /// Runs the handshake `how` asks for on `tcp`, where STARTTLS was just accepted (or at
    /// once, for implicit TLS): the stream it made, and what it negotiated.
    pub async fn secure(
        &self,
        tcp: TcpStream,
        host: &str,
        how: &Handshake,
        timeout: Duration,
    ) -> Result<(Transport, Session), NoTls> {
        match how {
            Handshake::Pkix(min_tls) => {
                let (stream, session) = self.handshake(tcp, host, *min_tls, timeout).await?;
                Ok((Transport::Tls(Box::new(stream)), Session::Rustls(session)))
            }
            Handshake::Dane { min_tls, records } => {
                let (stream, session) =
                    (self.handshake_dane(tcp, host, *min_tls, records.clone(), timeout)).await?;
                Ok((Transport::Tls(Box::new(stream)), Session::Rustls(session)))
            }
            #[cfg(feature = "legacy-tls")]
            Handshake::Legacy => {
                let (stream, session) = self.legacy_handshake(tcp, host, timeout).await?;
                Ok((
                    Transport::Legacy(Box::new(stream)),
                    Session::Legacy(session),
                ))
            }
            #[cfg(not(feature = "legacy-tls"))]
            Handshake::Legacy => Err(NoTls::LegacyFailed(
                "this build has no legacy TLS stack".into(),
            )),
        }
    }

    /// The PKIX handshake, on a connection where STARTTLS was just accepted.
    async fn handshake(
        &self,
        tcp: TcpStream,
        host: &str,
        min_tls: MinTls,
        timeout: Duration,
    ) -> Result<(TlsStream<TcpStream>, TlsSession), NoTls> {
        let config = (self.pkix.iter())
            .find(|(min, _)| *min == min_tls)
            .map(|(_, config)| config.clone())
            .ok_or_else(|| NoTls::HandshakeFailed("no TLS configuration".into()))?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| NoTls::HandshakeFailed(format!("{host:?} is not a valid TLS name")))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let stream = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(classify_handshake_error(&error, min_tls)),
            Err(_) => return Err(no_handshake_within(timeout)),
        };
        let (version, cipher, chain) = negotiated(&stream);
        let (_, conn) = stream.get_ref();
        match conn.handshake_kind() {
            Some(HandshakeKind::Resumed) => self.resumed_handshakes.inc(),
            _ => self.full_handshakes.inc(),
        };
        // A resumed session holds the chain of the handshake it resumes: verified now, as
        // a full handshake's is.
        let verification = self.verify_chain(&chain, host);
        Ok((
            stream,
            TlsSession {
                version,
                cipher,
                verification,
                chain,
            },
        ))
    }
}

/// What a completed rustls handshake negotiated: the protocol version and cipher suite as
/// the log names them, and the server's chain, end entity first.
fn negotiated(stream: &TlsStream<TcpStream>) -> (String, String, Vec<CertificateDer<'static>>) {
    let (_, conn) = stream.get_ref();
    let version = conn
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("TLS")
        .replace('_', ".");
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown")
        .to_string();
    let chain = conn
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    (version, cipher, chain)
}

fn no_handshake_within(timeout: Duration) -> NoTls {
    NoTls::HandshakeFailed(format!("no TLS handshake within {}s", timeout.as_secs()))
}

impl TlsClient {
    /// Counts handshakes into these counters (shared with `Stats`).
    pub fn count_handshakes(&mut self, full: Counter, resumed: Counter) {
        self.full_handshakes = full;
        self.resumed_handshakes = resumed;
    }

    /// What verification of `chain` (end entity first) for `host` finds, now: for a session
    /// whose handshake did not run our verifier.
    pub fn verify_chain(&self, chain: &[CertificateDer<'_>], host: &str) -> Verification {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return Verification::Failed(CertProblem::Other("no certificate was sent".into()));
        };
        let Ok(name) = ServerName::try_from(host) else {
            return Verification::Failed(CertProblem::Other(format!(
                "{host:?} is not a valid TLS name"
            )));
        };
        verify(
            self.webpki.as_deref(),
            end_entity,
            intermediates,
            &name,
            &[],
            UnixTime::now(),
        )
    }

    /// The legacy stack's handshake (OpenSSL, TLS 1.0 to 1.3, legacy suites), for a host
    /// rustls could not talk to; the chain is verified for the log, never required.
    #[cfg(feature = "legacy-tls")]
    async fn legacy_handshake(
        &self,
        tcp: TcpStream,
        host: &str,
        timeout: Duration,
    ) -> Result<
        (
            tokio_openssl::SslStream<TcpStream>,
            crate::outcome::LegacySession,
        ),
        NoTls,
    > {
        let (stream, negotiated) = self.legacy.handshake(tcp, host, timeout).await?;
        let verification = self.verify_chain(&negotiated.chain, host);
        let session = crate::outcome::LegacySession {
            version: negotiated.version,
            cipher: negotiated.cipher,
            verification,
            chain: negotiated.chain,
        };
        Ok((stream, session))
    }
}

/// The real verification of a chain for a name: what the certificate is worth.
fn verify(
    webpki: Option<&WebPkiServerVerifier>,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    server_name: &ServerName<'_>,
    ocsp_response: &[u8],
    now: UnixTime,
) -> Verification {
    match webpki {
        None => Verification::Failed(CertProblem::Untrusted {
            why: Distrust::NoRoots,
            name_ok: name_matches(end_entity, server_name),
        }),
        Some(webpki) => {
            let verified = webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
            match verified {
                Ok(_) => Verification::Verified,
                Err(error) => Verification::Failed(cert_problem(&error, end_entity, server_name)),
            }
        }
    }
}

/// The roots every verification trusts: the system's (unless turned off) and those in
/// `tls.ca_file`. Shared by SMTP delivery and the HTTPS fetches of MTA-STS and TLS-RPT, so
/// that both trust the same authorities.
pub fn trusted_roots(config: &TlsConfig) -> Result<RootCertStore, SetupError> {
    let mut roots = RootCertStore::empty();
    if config.system_roots {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!("system root certificates: {error}");
        }
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "system root certificates loaded");
    }
    if let Some(path) = &config.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| SetupError::file("tls.ca_file", path, e))?;
        if certs.is_empty() {
            return Err(SetupError::file(
                "tls.ca_file",
                path,
                "no certificates in it",
            ));
        }
        for cert in certs {
            (roots.add(cert)).map_err(|e| SetupError::file("tls.ca_file", path, e))?;
        }
    }
    Ok(roots)
}

/// The client configuration shared by every connection with this minimum version, with its
/// own resumption store.
fn shared_config(
    provider: &Arc<CryptoProvider>,
    min_tls: MinTls,
    sessions: usize,
) -> Result<Arc<rustls::ClientConfig>, SetupError> {
    let versions = min_tls.versions();
    let verifier = Arc::new(ChainCheckedAfterwards {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| SetupError::setting("tls", e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = Resumption::in_memory_sessions(sessions.max(1));
    Ok(Arc::new(config))
}

/// Lets the handshake go on whatever the certificate is; the chain is verified for real
/// right after it (`verify_chain`), so the policy decides what a bad certificate means.
/// Signatures are always checked, so the session is encrypted to whoever holds the
/// certificate's key.
#[derive(Debug)]
struct ChainCheckedAfterwards {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainCheckedAfterwards {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn cert_problem(
    error: &rustls::Error,
    end_entity: &CertificateDer<'_>,
    name: &ServerName<'_>,
) -> CertProblem {
    let rustls::Error::InvalidCertificate(cert_error) = error else {
        return CertProblem::Other(error.to_string());
    };
    match cert_error {
        CertificateError::Expired => CertProblem::Expired {
            not_after: "(date unknown)".into(),
        },
        CertificateError::ExpiredContext { not_after, .. } => CertProblem::Expired {
            not_after: format_date(not_after.as_secs()),
        },
        CertificateError::NotValidYet => CertProblem::NotYetValid {
            not_before: "(date unknown)".into(),
        },
        CertificateError::NotValidYetContext { not_before, .. } => CertProblem::NotYetValid {
            not_before: format_date(not_before.as_secs()),
        },
        // The names as the certificate has them (rustls gives them in Rust's debug form).
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            CertProblem::NameMismatch {
                presented: Certificate::parse(end_entity).map_or_else(Vec::new, |c| c.sans),
            }
        }
        // webpki checks the chain before the name: check the name on its own as well.
        other => CertProblem::Untrusted {
            why: distrust(other, end_entity),
            name_ok: name_matches(end_entity, name),
        },
    }
}

/// Why the chain did not verify, in words; the verifier's own words stay in the debug log.
fn distrust(error: &CertificateError, end_entity: &CertificateDer<'_>) -> Distrust {
    tracing::debug!("certificate verification: {error:?}");
    let issuer = Issuer::of(end_entity);
    // OpenSSL's `req -x509` makes a self-signed certificate a CA: webpki then says
    // CaUsedAsEndEntity, which an admin knows as "self-signed".
    let ca_as_server = matches!(error, CertificateError::Other(other)
        if other.to_string() == "CaUsedAsEndEntity");
    match (error, issuer) {
        (CertificateError::UnknownIssuer, Some(Issuer::Itself)) => Distrust::SelfSigned,
        (_, Some(Issuer::Itself)) if ca_as_server => Distrust::SelfSigned,
        (CertificateError::UnknownIssuer, Some(Issuer::Ca(name))) => Distrust::UnknownIssuer(name),
        (CertificateError::UnknownIssuer, None) => Distrust::Other("issuer unknown".into()),
        _ if ca_as_server => Distrust::CaAsServer,
        (CertificateError::BadSignature, _) => {
            Distrust::Other("its signature does not verify".into())
        }
        (CertificateError::Revoked, _) => Distrust::Other("revoked by its issuer".into()),
        (CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }, _) => {
            Distrust::Other("not issued for TLS servers".into())
        }
        (CertificateError::BadEncoding, _) => Distrust::Other("it cannot be read".into()),
        (other, _) => Distrust::Other(format!("rejected by the verifier: {other}")),
    }
}

fn name_matches(end_entity: &CertificateDer<'_>, name: &ServerName<'_>) -> bool {
    rustls::server::ParsedCertificate::try_from(end_entity)
        .and_then(|cert| rustls::client::verify_server_name(&cert, name))
        .is_ok()
}

/// Names what went wrong in a handshake, from the rustls error inside the io error.
/// A version alert means "only TLS 1.0/1.1" when we offered 1.2; when a rule made us offer
/// only 1.3 it means only that the server lacks 1.3.
fn classify_handshake_error(error: &std::io::Error, min_tls: MinTls) -> NoTls {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::AlertReceived(AlertDescription::ProtocolVersion))
            if min_tls == MinTls::Tls13 =>
        {
            NoTls::HandshakeFailed(
                "the server does not offer TLS 1.3, the rule's minimum (protocol_version alert)"
                    .into(),
            )
        }
        Some(rustls::Error::AlertReceived(AlertDescription::ProtocolVersion))
        | Some(rustls::Error::PeerIncompatible(
            PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig,
        )) => NoTls::LegacyTls(rustls_error.map(|e| e.to_string()).unwrap_or_default()),
        Some(other) => NoTls::HandshakeFailed(other.to_string()),
        None => match error.kind() {
            std::io::ErrorKind::UnexpectedEof => NoTls::HandshakeFailed(CLOSED_IN_HANDSHAKE.into()),
            std::io::ErrorKind::ConnectionReset => {
                NoTls::HandshakeFailed(RESET_IN_HANDSHAKE.into())
            }
            _ => NoTls::HandshakeFailed(error.to_string()),
        },
    }
}

impl TlsClient {
    /// The handshake under DANE (RFC 7672 3): the certificate must match one of `records`,
    /// checked by [`DaneVerifier`] alone; no PKIX, and no session resumed from any other
    /// configuration (the DANE configuration resumes none). A mismatch is
    /// [`NoTls::DaneMismatch`], with why.
    async fn handshake_dane(
        &self,
        tcp: TcpStream,
        host: &str,
        min_tls: MinTls,
        records: Vec<TlsaRecord>,
        timeout: Duration,
    ) -> Result<(TlsStream<TcpStream>, TlsSession), NoTls> {
        let verifier = Arc::new(DaneVerifier::new(records, self.provider.clone()));
        let config = DaneVerifier::client_config(verifier.clone(), min_tls.versions())
            .map_err(|e| NoTls::HandshakeFailed(e.to_string()))?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| NoTls::HandshakeFailed(format!("{host:?} is not a valid TLS name")))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let stream = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Ok(Ok(stream)) => {
                self.full_handshakes.inc();
                stream
            }
            Ok(Err(error)) => {
                return Err(match verifier.verdict() {
                    Some(DaneVerdict::NoMatch(why)) => NoTls::DaneMismatch(why.to_string()),
                    _ => classify_handshake_error(&error, min_tls),
                });
            }
            Err(_) => return Err(no_handshake_within(timeout)),
        };
        let (version, cipher, chain) = negotiated(&stream);
        if let Some(verdict) = verifier.verdict() {
            tracing::debug!(host, "{verdict}");
        }
        Ok((
            stream,
            TlsSession {
                version,
                cipher,
                // The handshake completed only because a TLSA record matched.
                verification: Verification::Verified,
                chain,
            },
        ))
    }
}
