//! A real HTTPS server on loopback (hyper over tokio-rustls, a certificate made at test
//! time): MTA-STS policies to fetch, TLS-RPT reports to take. It records what it is asked,
//! and can hold its answers back (a slow server, without any sleep).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::proto::rr::RData;
use hickory_server::proto::rr::rdata::TXT;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::pki::CertKey;

/// How long a test waits for a request before it fails.
const GUARD: Duration = Duration::from_secs(30);

/// A TXT record's data, as `_mta-sts` and `_smtp._tls` records are published.
pub fn txt(text: &str) -> RData {
    RData::TXT(TXT::new(vec![text.to_string()]))
}

/// What the HTTPS server answers to a GET.
#[derive(Clone)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    pub location: Option<&'static str>,
}

impl Answer {
    pub fn policy(text: &str) -> Answer {
        Answer {
            status: 200,
            content_type: "text/plain",
            body: text.into(),
            location: None,
        }
    }
}

/// One request the server got.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub host: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

struct HttpsState {
    answer: Mutex<Answer>,
    seen: Mutex<Vec<Seen>>,
    /// Counts requests, so a test can wait for one to arrive.
    arrived: watch::Sender<usize>,
    /// While false, answers are held back: a slow server, without any sleep.
    released: watch::Sender<bool>,
}

pub struct HttpsServer {
    pub addr: SocketAddr,
    state: Arc<HttpsState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsServer {
    pub async fn start(cert: CertKey, answer: Answer) -> HttpsServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the HTTPS server on 127.0.0.1");
        let addr = listener.local_addr().expect("HTTPS server address");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .expect("the HTTPS server's certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let state = Arc::new(HttpsState {
            answer: Mutex::new(answer),
            seen: Mutex::new(Vec::new()),
            arrived: watch::Sender::new(0),
            released: watch::Sender::new(true),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let state = shared.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, hyper::Error>(state.respond(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        HttpsServer { addr, state, task }
    }

    pub fn answer(&self, answer: Answer) {
        *self.state.answer.lock().expect("answer lock") = answer;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("seen lock").clone()
    }

    /// How many requests came so far.
    pub fn requests(&self) -> usize {
        self.seen().len()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn hold_answers(&self) {
        self.state.released.send_replace(false);
    }

    pub fn release_answers(&self) {
        self.state.released.send_replace(true);
    }

    pub async fn wait_for_requests(&self, n: usize) {
        let mut arrived = self.state.arrived.subscribe();
        tokio::time::timeout(GUARD, arrived.wait_for(|count| *count >= n))
            .await
            .expect("the HTTPS server got no request in time")
            .expect("HTTPS server state");
    }
}

impl HttpsState {
    async fn respond(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Full<Bytes>> {
        let (head, body) = request.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let header = |name| {
            head.headers
                .get(name)
                .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        self.seen.lock().expect("seen lock").push(Seen {
            method: head.method.to_string(),
            path: head.uri.path().to_string(),
            host: header(hyper::header::HOST),
            content_type: header(hyper::header::CONTENT_TYPE),
            body: body.to_vec(),
        });
        self.arrived.send_modify(|n| *n += 1);
        let mut released = self.released.subscribe();
        let _ = released.wait_for(|r| *r).await;
        let answer = self.answer.lock().expect("answer lock").clone();
        let mut response = hyper::Response::builder()
            .status(answer.status)
            .header(hyper::header::CONTENT_TYPE, answer.content_type);
        if let Some(location) = answer.location {
            response = response.header(hyper::header::LOCATION, location);
        }
        response
            .body(Full::new(Bytes::from(answer.body)))
            .expect("a response")
    }
}

/// The MTA-STS policy host of example.test.
pub const POLICY_HOST: &str = "mta-sts.example.test";
