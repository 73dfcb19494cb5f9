//! The HTTPS client of MTA-STS policy fetches and TLS-RPT report submissions: hyper's
//! HTTP/1.1 client over tokio-rustls, with the crate's one crypto provider (ring), the
//! roots delivery trusts and delivery's dialer. Strict PKIX verification; no redirects are
//! followed, ever.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::net::connection::ExchangeError;
use crate::net::dialer::Dialer;
use crate::net::dns::{AddressError, MxResolver};

/// What went wrong with an HTTPS exchange, in the terms TLS-RPT reports.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// The server's certificate did not verify (RFC 8460: `sts-webpki-invalid`).
    #[error("certificate of {host} not valid: {detail}")]
    Certificate { host: String, detail: String },
    /// No answer that could be used.
    #[error("{url}: {problem}")]
    Failed { url: String, problem: HttpsProblem },
}

/// Why an HTTPS exchange brought no answer that could be used.
#[derive(Debug, thiserror::Error)]
pub enum HttpsProblem {
    #[error("not a URL: {0}")]
    NotAUrl(hyper::http::uri::InvalidUri),
    #[error("only https: URLs are fetched")]
    NotHttps,
    #[error("no host")]
    NoHost,
    #[error("{host}: {error}")]
    Addresses { host: String, error: AddressError },
    #[error("{0}: no address")]
    NoAddress(String),
    #[error("connect to {target}: {error}")]
    Connect {
        target: SocketAddr,
        error: ExchangeError,
    },
    #[error("{0:?} is not a valid TLS name")]
    BadName(String),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("HTTP: {0}")]
    Http(hyper::Error),
    #[error("request: {0}")]
    Request(hyper::http::Error),
    #[error("body larger than {0} octets")]
    BodyTooLarge(usize),
    #[error("body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    #[error("no complete answer within {0}s")]
    Timeout(u64),
}

/// A response whose status and body were read within the limits.
#[derive(Debug)]
pub struct HttpsResponse {
    pub status: StatusCode,
    /// The media type without parameters, lower case; empty when there was none.
    pub media_type: String,
    pub body: Bytes,
}

pub struct HttpsClient {
    tls: Arc<rustls::ClientConfig>,
    resolver: Arc<MxResolver>,
    /// Host names sent to another address:port instead of their own, for labs and tests.
    connect_to: HashMap<String, SocketAddr>,
    /// Delivery's (source address, socket mark), with its own connect timeout.
    dialer: Dialer,
    total_timeout: Duration,
}

impl HttpsClient {
    pub fn new(
        roots: rustls::RootCertStore,
        resolver: Arc<MxResolver>,
        connect_to: HashMap<String, SocketAddr>,
        dialer: Dialer,
        total_timeout: Duration,
    ) -> Result<HttpsClient, crate::settings::SetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| crate::settings::SetupError::setting("mta_sts (HTTPS client)", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connect_to = connect_to
            .into_iter()
            .map(|(host, addr)| (host.trim_end_matches('.').to_ascii_lowercase(), addr))
            .collect();
        Ok(HttpsClient {
            tls: Arc::new(tls),
            resolver,
            connect_to,
            dialer,
            total_timeout,
        })
    }

    /// `GET url`, reading at most `body_limit` octets of body.
    pub async fn get(&self, url: &str, body_limit: usize) -> Result<HttpsResponse, HttpsError> {
        self.exchange("GET", url, None, body_limit).await
    }

    /// `POST url` with a body of type `content_type`; the answer's body is read up to 64 KiB.
    pub async fn post(
        &self,
        url: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<HttpsResponse, HttpsError> {
        self.exchange("POST", url, Some((content_type, body)), 64 * 1024)
            .await
    }

    async fn exchange(
        &self,
        method: &str,
        url: &str,
        body: Option<(&str, Vec<u8>)>,
        body_limit: usize,
    ) -> Result<HttpsResponse, HttpsError> {
        let work = self.exchange_untimed(method, url, body, body_limit);
        match tokio::time::timeout(self.total_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(HttpsError::Failed {
                url: url.to_string(),
                problem: HttpsProblem::Timeout(self.total_timeout.as_secs()),
            }),
        }
    }

    async fn exchange_untimed(
        &self,
        method: &str,
        url: &str,
        body: Option<(&str, Vec<u8>)>,
        body_limit: usize,
    ) -> Result<HttpsResponse, HttpsError> {
        let failed = |problem| HttpsError::Failed {
            url: url.to_string(),
            problem,
        };
        let uri: Uri = url.parse().map_err(|e| failed(HttpsProblem::NotAUrl(e)))?;
        if uri.scheme_str() != Some("https") {
            return Err(failed(HttpsProblem::NotHttps));
        }
        let host = uri
            .host()
            .ok_or_else(|| failed(HttpsProblem::NoHost))?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(443);
        let tcp = self.connect(&host, port).await.map_err(failed)?;
        let name = ServerName::try_from(host.clone())
            .map_err(|_| failed(HttpsProblem::BadName(host.clone())))?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| handshake_error(&host, e).unwrap_or_else(failed))?;

        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| failed(HttpsProblem::Http(e)))?;
        // The connection task ends when the exchange is over and `sender` is dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });

        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = match uri.port_u16() {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(
                hyper::header::USER_AGENT,
                concat!("tlsrouter/", env!("CARGO_PKG_VERSION")),
            );
        let payload = match body {
            Some((content_type, bytes)) => {
                request = request.header(hyper::header::CONTENT_TYPE, content_type);
                Full::new(Bytes::from(bytes))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(payload)
            .map_err(|e| failed(HttpsProblem::Request(e)))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| failed(HttpsProblem::Http(e)))?;

        let status = response.status();
        let media_type = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        let body = Limited::new(response.into_body(), body_limit)
            .collect()
            .await
            .map_err(|e| {
                failed(match e.is::<http_body_util::LengthLimitError>() {
                    true => HttpsProblem::BodyTooLarge(body_limit),
                    false => HttpsProblem::Body(e),
                })
            })?
            .to_bytes();
        Ok(HttpsResponse {
            status,
            media_type,
            body,
        })
    }

    /// A TCP connection to `host`, at the address `connect_to` gives it or at each of its
    /// own addresses in turn.
    async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, HttpsProblem> {
        let targets: Vec<SocketAddr> = match self.connect_to.get(host) {
            Some(addr) => vec![*addr],
            None => (self.resolver.addresses(host).await)
                .map_err(|error| HttpsProblem::Addresses {
                    host: host.to_string(),
                    error,
                })?
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect(),
        };
        let mut last_error = HttpsProblem::NoAddress(host.to_string());
        for target in targets {
            match self.dialer.tcp(target).await {
                Ok(tcp) => return Ok(tcp),
                Err(error) => last_error = HttpsProblem::Connect { target, error },
            }
        }
        Err(last_error)
    }
}

/// A certificate that does not verify is told apart from other handshake failures.
fn handshake_error(host: &str, error: std::io::Error) -> Result<HttpsError, HttpsProblem> {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(cert)) => Ok(HttpsError::Certificate {
            host: host.to_string(),
            detail: format!("{cert:?}"),
        }),
        _ => Err(HttpsProblem::Handshake(error)),
    }
}
