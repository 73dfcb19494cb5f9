//! Outbound sockets, marked and bound as configured: `SO_MARK` lets a transparent redirect (nftables `meta mark`,
//! iptables `-m mark`) tell tlsrouter's own connections from the MTA's, so they are never
//! redirected back to it.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

/// Connects to `peer` from a socket carrying `mark`. Setting a mark needs `CAP_NET_ADMIN`;
/// without it the connection fails rather than going out unmarked into a loop.
pub async fn connect_marked(peer: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    socket_for(peer, Some(mark), None)?.connect(peer).await
}

/// A socket to connect to `peer` with: marked with `mark` and bound to the local address
/// `source`, each when given.
pub fn socket_for(
    peer: SocketAddr,
    mark: Option<u32>,
    source: Option<IpAddr>,
) -> io::Result<TcpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(peer),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(mark) = mark {
        set_mark(&socket, mark)?;
    }
    if let Some(source) = source {
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    socket.set_nonblocking(true)?;
    let std_stream: std::net::TcpStream = socket.into();
    Ok(TcpSocket::from_std_stream(std_stream))
}

/// Whether this process may mark sockets: checked at start, so that a missing capability
/// stops the daemon instead of failing every delivery (and caching the remotes as
/// unreachable).
pub fn check(mark: u32) -> io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    set_mark(&socket, mark)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_mark(socket: &socket2::Socket, mark: u32) -> io::Result<()> {
    socket.set_mark(mark).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot set delivery.socket_mark {mark:#x} (needs CAP_NET_ADMIN): {e}"),
        )
    })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_mark(_socket: &socket2::Socket, _mark: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "delivery.socket_mark is supported on Linux only",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_marked_connection_carries_its_mark_or_says_why_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        match connect_marked(addr, 42).await {
            Ok(stream) => assert_eq!(socket2::SockRef::from(&stream).mark().unwrap(), 42),
            // Not root: the reason names the capability.
            Err(e) => assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}"),
        }
    }
}
