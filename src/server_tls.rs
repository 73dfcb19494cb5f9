//! TLS toward the MTA (STARTTLS offered on our listeners): the certificate and key of
//! `inbound.tls`, loaded at start (a bad pair stops the start), reloaded on SIGHUP and
//! when either file changes; a pair that fails to load on reload leaves the one in force.
//! Also the MTA-side stream, which is plain TCP until the MTA says STARTTLS.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::settings::{Problem, SetupError};

/// `inbound.tls`: the certificate chain and key offered to the MTA, PEM files.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundTlsConfig {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// The acceptor in force, if STARTTLS is offered at all.
pub struct ServerTls {
    files: Option<InboundTlsConfig>,
    acceptor: RwLock<Option<TlsAcceptor>>,
}

impl ServerTls {
    pub fn load(files: Option<&InboundTlsConfig>) -> Result<ServerTls, SetupError> {
        let acceptor = files.map(acceptor).transpose()?;
        Ok(ServerTls {
            files: files.cloned(),
            acceptor: RwLock::new(acceptor),
        })
    }

    /// What a STARTTLS is answered with now; `None` when it is not offered.
    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        match self.acceptor.read() {
            Ok(slot) => slot.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads the certificate and key again; on any error the pair in force stays.
    pub fn reload(&self, why: &str) {
        let Some(files) = &self.files else {
            return;
        };
        match acceptor(files) {
            Ok(new) => {
                match self.acceptor.write() {
                    Ok(mut slot) => *slot = Some(new),
                    Err(poisoned) => *poisoned.into_inner() = Some(new),
                }
                tracing::info!(
                    event = "inbound_tls.reloaded",
                    why,
                    "inbound TLS certificate reloaded ({why}): {}",
                    files.certificate.display()
                );
            }
            Err(e) => tracing::error!(
                event = "inbound_tls.not_reloaded",
                why,
                "inbound TLS certificate not reloaded ({why}), the one in force stays: {e:#}"
            ),
        }
    }

    /// Reloads whenever the certificate or key file changes (checked every `every`).
    pub fn watch(
        self: Arc<Self>,
        every: std::time::Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let stamps = |files: &InboundTlsConfig| (stamp(&files.certificate), stamp(&files.key));
        let mut last = self.files.as_ref().map(stamps);
        async move {
            let Some(files) = self.files.clone() else {
                return;
            };
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                let now = Some(stamps(&files));
                if now != last {
                    last = now;
                    self.reload("file changed");
                }
            }
        }
    }
}

fn stamp(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn acceptor(files: &InboundTlsConfig) -> Result<TlsAcceptor, SetupError> {
    let (cert_path, key_path) = (&files.certificate, &files.key);
    let bad_cert = |e: Problem| SetupError::file("inbound.tls.certificate", cert_path, e);
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad_cert(e.into()))?;
    if certs.is_empty() {
        return Err(bad_cert("no certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| SetupError::file("inbound.tls.key", key_path, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pair = || {
        let (cert, key) = (cert_path.display(), key_path.display());
        format!("inbound.tls: {cert} and {key}")
    };
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::setting(pair(), e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| SetupError::setting(pair(), e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The MTA's connection: plain until STARTTLS, then TLS.
pub enum MtaStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Taken for the handshake; reads end, writes fail.
    Gone,
}

impl MtaStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, MtaStream::Tls(_))
    }

    /// The TCP connection underneath, to see whether bytes wait on it.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            MtaStream::Plain(tcp) => Some(tcp),
            MtaStream::Tls(tls) => Some(tls.get_ref().0),
            MtaStream::Gone => None,
        }
    }
}

impl AsyncRead for MtaStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MtaStream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            MtaStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            MtaStream::Gone => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for MtaStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MtaStream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            MtaStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
            MtaStream::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MtaStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            MtaStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            MtaStream::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MtaStream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            MtaStream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            MtaStream::Gone => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> InboundTlsConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["relay.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = InboundTlsConfig {
            certificate: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.certificate, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_certificate_with_another_certificates_key_is_refused_and_the_pair_in_force_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (pair(dir.path(), "one"), pair(dir.path(), "two"));
        let mixed = InboundTlsConfig {
            certificate: one.certificate.clone(),
            key: two.key.clone(),
        };
        let err = ServerTls::load(Some(&mixed))
            .err()
            .expect("a mismatched pair");
        assert!(format!("{err:#}").contains("one.crt"), "{err:#}");

        let tls = ServerTls::load(Some(&one)).unwrap();
        let in_force = |tls: &ServerTls| tls.acceptor().unwrap().config().clone();
        let before = in_force(&tls);
        std::fs::copy(&two.key, &one.key).unwrap();
        tls.reload("test");
        assert!(
            Arc::ptr_eq(&before, &in_force(&tls)),
            "the pair in force stays"
        );
        std::fs::copy(&two.certificate, &one.certificate).unwrap();
        tls.reload("test");
        assert!(
            !Arc::ptr_eq(&before, &in_force(&tls)),
            "a matching pair replaces it"
        );
    }
}
