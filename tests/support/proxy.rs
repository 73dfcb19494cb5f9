//! Starts the real proxy in-process on a loopback port, pointed at the test DNS server.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tlsrouter::Proxy;
use tlsrouter::config::{ClientNet, Config, Hostname};
use tokio::net::TcpListener;

/// A configuration for tests: our DNS server, our CA only, remote port `port`, short timeouts.
pub fn test_config(dns: SocketAddr, ca_file: &Path, port: u16) -> Config {
    let mut config = Config {
        hostname: Hostname("relay.test".into()),
        ..Config::default()
    };
    config.resolver.nameservers = vec![dns];
    config.tls.ca_file = Some(ca_file.to_path_buf());
    config.tls.system_roots = false;
    config.delivery.port = port;
    let t = &mut config.timeouts;
    t.connect = Duration::from_secs(5);
    t.greeting = Duration::from_secs(10);
    t.command = Duration::from_secs(10);
    t.tls_handshake = Duration::from_secs(10);
    t.data_start = Duration::from_secs(10);
    t.data_block = Duration::from_secs(10);
    t.data_end = Duration::from_secs(10);
    t.dns = Duration::from_secs(2);
    config
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
