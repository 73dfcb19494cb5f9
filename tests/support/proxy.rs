//! The older entry points for an in-process proxy, kept for tests written against them:
//! each is a thin layer over the lab's settings. New tests use `Lab::new()...start()`.

use std::net::SocketAddr;
use std::path::Path;

use tlsrouter::Proxy;
use tlsrouter::config::{ClientNet, Config};
use tokio::net::TcpListener;

use super::settings::Settings;

/// A configuration for tests: our DNS server, our CA only, remote port `port`, short timeouts.
pub fn test_config(dns: SocketAddr, ca_file: &Path, port: u16) -> Config {
    Settings::lab(dns, ca_file, port).to_config()
}

/// Runs the proxy until the test ends; returns where the MTA side listens.
pub async fn start_proxy(config: Config) -> SocketAddr {
    let proxy = Proxy::new(config).expect("proxy config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    tokio::spawn(tlsrouter::inbound::listener::run(
        listener,
        proxy,
        std::future::pending(),
    ));
    addr
}

/// Allows only a network the tests do not come from.
pub fn allow_only(config: &mut Config, net: &str) {
    config.allow_clients = vec![ClientNet(net.parse().expect("net"))];
}
