//! Administration: the admin endpoint served by the daemon (a Unix socket, or a named
//! pipe on Windows), its JSON-lines protocol, and the `tlsrouter ctl` client.

pub mod client;
pub mod console;
pub mod domains;
pub mod http;
pub mod metrics;
#[cfg(windows)]
#[allow(unsafe_code)]
pub mod named_pipe;
pub mod protocol;
pub mod server;
pub mod table;
#[cfg(unix)]
pub mod unix_socket;

/// Where the admin protocol is spoken on this host.
#[cfg(windows)]
pub use named_pipe as endpoint;
#[cfg(unix)]
pub use unix_socket as endpoint;

use std::sync::Arc;

use crate::proxy::Proxy;
use crate::settings::SetupError;

/// Sets the gauges that are read, not counted, before `ctl stats` or a scrape shows them.
pub fn refresh_gauges(proxy: &Proxy) {
    let stats = &proxy.stats;
    stats.cache_entries.set(proxy.outbound.cache.len() as i64);
    stats.dane_state(proxy.outbound.resolver.dane_state());
    stats
        .plain_domains
        .set(proxy.ledger.delivered_in_plain() as i64);
    let expiring = domains::expiring_within(proxy, 14);
    stats.expiring_certificates.set(expiring as i64);
}

/// Opens the admin socket and the metrics endpoint the configuration asks for, and
/// serves them in the background. A file in the way of the socket is an error; a socket
/// directory that cannot be created only turns the admin socket off, with a warning.
pub async fn start(proxy: &Arc<Proxy>) -> Result<(), SetupError> {
    if let Some(path) = &proxy.config.admin.socket {
        #[cfg(unix)]
        let bound = {
            let group = proxy.config.admin.group_id()?;
            endpoint::bind(path, proxy.config.admin.mode.0, group)
        };
        #[cfg(windows)]
        let bound = endpoint::bind(path);
        match bound {
            Ok(listener) => {
                tracing::info!("admin socket {}", path.display());
                let _ = proxy.admin_socket.set(path.clone());
                tokio::spawn(server::serve(proxy.clone(), listener));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SetupError::setting("admin.socket", e));
            }
            Err(e) => tracing::warn!("admin socket {} not opened: {e}", path.display()),
        }
    }
    if let Some(listen) = proxy.config.metrics.listen {
        if !listen.ip().is_loopback() {
            tracing::warn!("metrics endpoint on {listen} is reachable from other hosts");
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| SetupError::setting(format!("metrics.listen {listen}"), e))?;
        tracing::info!("metrics on http://{listen}/metrics");
        tokio::spawn(metrics::serve(proxy.clone(), listener));
    }
    if let (Some(listen), Some(token)) = (proxy.config.console.listen, &proxy.console_token) {
        let token = token.clone();
        if !listen.ip().is_loopback() {
            tracing::warn!(
                event = "console.exposed",
                listen = %listen,
                "the web console on {listen} is reachable from other hosts: keep it on loopback, or behind an HTTPS reverse proxy that only admins reach"
            );
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| SetupError::setting(format!("console.listen {listen}"), e))?;
        tracing::info!("web console on http://{listen}/");
        tokio::spawn(console::serve(proxy.clone(), listener, token));
    }
    Ok(())
}
