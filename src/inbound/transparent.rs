//! Transparent mode: a connection the MTA made to a remote port 25, redirected to us by
//! nftables or iptables (`redirect`, `REDIRECT`). Its original destination becomes the
//! next hop; one of our own listeners as original destination would be a loop.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Where the client was connecting before the redirect (`SO_ORIGINAL_DST`, IPv4 or IPv6).
/// A connection that was not redirected has none.
#[cfg(target_os = "linux")]
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        // A v4-mapped local address is an IPv4 connection on a dual-stack socket.
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    }
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("no original destination (was the connection redirected?): {e}"),
        )
    })?;
    let original = original
        .as_socket()
        .ok_or_else(|| io::Error::other("the original destination is not an IP address"))?;
    // With connection tracking but no redirect, the kernel answers with our own address.
    if canonical(original) == canonical(local) {
        return Err(io::Error::other(
            "the connection was not redirected: its destination is this listener",
        ));
    }
    Ok(original)
}

#[cfg(not(target_os = "linux"))]
pub fn original_destination(_stream: &TcpStream) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "transparent listeners need Linux (SO_ORIGINAL_DST)",
    ))
}

/// Whether `destination` is one of the addresses we listen on. A listener on an unspecified
/// address (`0.0.0.0`, `::`) takes its port on every local address; an address is local
/// when a socket can be bound to it.
pub fn is_own_listener(destination: SocketAddr, listening: &[SocketAddr]) -> bool {
    let destination = canonical(destination);
    listening.iter().map(|&l| canonical(l)).any(|listener| {
        listener.port() == destination.port()
            && (listener.ip() == destination.ip()
                || (listener.ip().is_unspecified() && is_local(destination)))
    })
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn is_local(addr: SocketAddr) -> bool {
    std::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_on_one_of_our_listeners_is_ours() {
        let listening: Vec<SocketAddr> = vec![
            "127.0.0.1:10025".parse().unwrap(),
            "0.0.0.0:2525".parse().unwrap(),
        ];
        assert!(is_own_listener(
            "127.0.0.1:10025".parse().unwrap(),
            &listening
        ));
        assert!(is_own_listener(
            "[::ffff:127.0.0.1]:10025".parse().unwrap(),
            &listening
        ));
        assert!(is_own_listener(
            "127.0.0.2:2525".parse().unwrap(),
            &listening
        ));
        // Another port, and another host's address on a port of the wildcard listener.
        assert!(!is_own_listener(
            "127.0.0.1:25".parse().unwrap(),
            &listening
        ));
        assert!(!is_own_listener(
            "192.0.2.7:2525".parse().unwrap(),
            &listening
        ));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let err = original_destination(&accepted).unwrap_err();
        assert!(err.to_string().contains("redirected"), "{err}");
    }
}
