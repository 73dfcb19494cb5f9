//! How every outbound connection is made: from `delivery.source_address`, with
//! `delivery.socket_mark`, within the connect timeout. Delivery, `probe`, the TLS-RPT
//! sender and the HTTPS client dial through one, so that what a probe or a report meets is
//! what mail meets, and none of them is redirected into tlsrouter itself behind a
//! transparent redirect.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::net::connection::{ExchangeError, PlainConnection};

#[derive(Clone, Debug)]
pub struct Dialer {
    /// How long a TCP connect may take.
    pub timeout: Duration,
    /// `SO_MARK` on every socket (`delivery.socket_mark`).
    pub mark: Option<u32>,
    /// The local address connections come from (`delivery.source_address`).
    pub source: Option<IpAddr>,
}

impl Dialer {
    /// Connects to `peer`, the server `host`: a connection no TLS was started on.
    pub async fn connect(
        &self,
        host: &str,
        peer: SocketAddr,
    ) -> Result<PlainConnection, ExchangeError> {
        Ok(PlainConnection::new(self.tcp(peer).await?, peer, host))
    }

    /// A TCP connection to `peer`, for a protocol of its own (HTTPS).
    pub async fn tcp(&self, peer: SocketAddr) -> Result<TcpStream, ExchangeError> {
        let connecting = async {
            match (self.mark, self.source) {
                (None, None) => TcpStream::connect(peer).await,
                (mark, source) => {
                    let socket = crate::net::socket_mark::socket_for(peer, mark, source)?;
                    socket.connect(peer).await
                }
            }
        };
        match tokio::time::timeout(self.timeout, connecting).await {
            Ok(tcp) => Ok(tcp?),
            Err(_) => Err(ExchangeError::Timeout(
                self.timeout.as_secs(),
                "the TCP connection",
            )),
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_leaves_from_the_source_address_with_the_mark_or_says_why_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let peer = listener.local_addr().expect("address");
        let source = IpAddr::from([127, 0, 0, 2]);
        let dialer = Dialer {
            timeout: Duration::from_secs(5),
            mark: Some(42),
            source: Some(source),
        };
        match dialer.connect("mx.example.test", peer).await {
            Ok(_conn) => {
                let (accepted, from) = listener.accept().await.expect("accept");
                assert_eq!(from.ip(), source);
                drop(accepted);
            }
            // Not root: the reason names the capability.
            Err(e) => assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}"),
        }
        let plain = Dialer {
            mark: None,
            ..dialer
        };
        let _conn = plain
            .connect("mx.example.test", peer)
            .await
            .expect("connect");
        let (_, from) = listener.accept().await.expect("accept");
        assert_eq!(from.ip(), source);
    }
}
