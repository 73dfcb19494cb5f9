//! Has the peer sent something we did not ask for yet? Looked at without reading it and
//! without waiting: the kernel's receive queue is peeked.

use std::mem::MaybeUninit;

use tokio::net::TcpStream;

/// True when bytes are waiting on the socket (not yet read into any buffer of ours).
pub fn bytes_waiting(stream: &TcpStream) -> bool {
    let mut probe = [MaybeUninit::<u8>::uninit(); 1];
    // The socket is non-blocking: no data is WouldBlock, not a wait.
    matches!(socket2::SockRef::from(stream).peek(&mut probe), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn waiting_bytes_are_seen_without_being_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert!(!bytes_waiting(&server));
        client.write_all(b"early").await.unwrap();
        client.flush().await.unwrap();
        // Loopback delivery is synchronous with the write.
        assert!(bytes_waiting(&server));
        assert!(bytes_waiting(&server), "peeking consumed nothing");
    }
}
