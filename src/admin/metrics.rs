//! The Prometheus endpoint: `GET /metrics` over plain HTTP, loopback by default. A
//! scraper asks once and goes: a few connections at a time, each with a deadline, so that
//! a client holding connections open cannot take the relay's descriptors.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response};
use tokio::net::TcpListener;

use crate::admin::http::{self, Asked, Limits, respond};
use crate::proxy::Proxy;

/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a connection may take to ask and be answered.
pub const DEADLINE: Duration = Duration::from_secs(5);

pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    let limits = Limits {
        connections: MAX_CONNECTIONS,
        deadline: DEADLINE,
    };
    http::serve(listener, "metrics endpoint", limits, move |asked| {
        let proxy = proxy.clone();
        async move { answer(&proxy, &asked) }
    })
    .await;
}

fn answer(proxy: &Proxy, asked: &Asked) -> Response<Full<Bytes>> {
    if asked.head.method != Method::GET || asked.head.uri.path() != "/metrics" {
        return respond(404, "text/plain", "only GET /metrics is served here\n");
    }
    crate::admin::refresh_gauges(proxy);
    let text = proxy.stats.prometheus_text();
    respond(200, "text/plain; version=0.0.4", text)
}
