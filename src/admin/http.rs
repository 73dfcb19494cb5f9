//! The HTTP endpoints' one server (hyper, HTTP/1.1): the Prometheus endpoint and the web
//! console. A few connections at a time, each with a deadline and one request, so that a
//! client holding connections open cannot take the relay's descriptors.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What one endpoint allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are closed at accept.
    pub connections: usize,
    /// How long a connection may take to ask and be answered.
    pub deadline: Duration,
}

/// A request head larger than this is no client of ours.
const MAX_HEAD: usize = 16 * 1024;
/// A request body larger than this (a form) is refused.
pub const MAX_BODY: usize = 16 * 1024;

/// A request as a handler gets it: its head, and its body read in full (at most
/// [`MAX_BODY`]; `None` when it was larger or broke off).
pub struct Asked {
    pub head: hyper::http::request::Parts,
    pub body: Option<Bytes>,
}

/// Serves `listener` with `handler`, one request per connection; `what` names the endpoint
/// in the log.
pub async fn serve<H, F>(listener: TcpListener, what: &'static str, limits: Limits, handler: H)
where
    H: Fn(Asked) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let open = Arc::new(Semaphore::new(limits.connections));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: wait for some to come back instead of spinning.
                tracing::warn!("{what}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let (head, body) = request.into_parts();
                    let body = Limited::new(body, MAX_BODY).collect().await;
                    let asked = Asked {
                        head,
                        body: body.ok().map(|b| b.to_bytes()),
                    };
                    Ok::<_, Infallible>(handler(asked).await)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.deadline, connection).await;
        });
    }
}

/// A response with this status, content type and body.
pub fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
