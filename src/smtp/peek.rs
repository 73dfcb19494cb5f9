//! Has the peer sent something we did not ask for yet? Looked at without reading it and
//! without waiting.
//!
//! Two ways to look, by what a miss would cost. The runtime knows, without a system call,
//! whether anything arrived on a socket since a read last emptied it: that is enough where
//! a later check, or the reply that must answer the next command, still catches bytes the
//! runtime has not been told about yet. Where nothing later would (the handshake after a
//! STARTTLS 220, the verdict after the final dot), the kernel's receive queue is peeked.

use std::future::Future;
use std::mem::MaybeUninit;
use std::task::{Context, Poll, Waker};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// How hard to look for bytes waiting on a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Look {
    /// What the runtime's event loop has seen: the kernel is asked only when it saw
    /// something arrive since the last read that emptied the socket.
    Seen,
    /// The kernel's receive queue, always: one system call.
    Kernel,
}

/// True when bytes are waiting on the socket (not yet read into any buffer of ours).
pub fn bytes_waiting(stream: &TcpStream, look: Look) -> bool {
    match look {
        Look::Seen => seen_readable(stream) && peek(stream),
        Look::Kernel => peek(stream),
    }
}

fn peek(stream: &TcpStream) -> bool {
    let mut probe = [MaybeUninit::<u8>::uninit(); 1];
    // The socket is non-blocking: no data is WouldBlock, not a wait.
    matches!(socket2::SockRef::from(stream).peek(&mut probe), Ok(n) if n > 0)
}

/// Whether the runtime holds the socket readable: set by the event loop when data (or the
/// end) arrives, cleared when a read finds nothing or (with epoll, on Linux) leaves the
/// socket empty. Asked once, without waiting: the future is dropped unready and takes its
/// waiter with it.
fn seen_readable(stream: &TcpStream) -> bool {
    let ready = std::pin::pin!(stream.ready(Interest::READABLE));
    match ready.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(ready)) => ready.is_readable() || ready.is_read_closed(),
        Poll::Ready(Err(_)) => true,
        Poll::Pending => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn waiting_bytes_are_seen_in_the_kernel_without_being_read() {
        let (mut client, server) = pair().await;
        assert!(!bytes_waiting(&server, Look::Kernel));
        client.write_all(b"early").await.unwrap();
        client.flush().await.unwrap();
        // Loopback delivery is synchronous with the write.
        assert!(bytes_waiting(&server, Look::Kernel));
        assert!(
            bytes_waiting(&server, Look::Kernel),
            "peeking consumed nothing"
        );
    }

    #[tokio::test]
    async fn the_runtime_sees_bytes_once_its_event_loop_has_run_and_forgets_them_once_read() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"one").await.unwrap();
        // A read that returns what came and leaves the socket empty clears the readiness.
        let mut buf = [0; 64];
        assert_eq!(server.read(&mut buf).await.unwrap(), 3);
        assert!(!bytes_waiting(&server, Look::Seen));
        client.write_all(b"two").await.unwrap();
        // Arrived, but the event loop has not run since: only the kernel knows. This is
        // why the checks that nothing later could make up for ask the kernel. (Where a
        // read that leaves the socket empty does not clear the readiness, as on Windows,
        // `Seen` peeks and sees them.)
        if cfg!(target_os = "linux") {
            assert!(!bytes_waiting(&server, Look::Seen));
        }
        assert!(bytes_waiting(&server, Look::Kernel));
        server.readable().await.unwrap();
        assert!(bytes_waiting(&server, Look::Seen));
        assert!(
            bytes_waiting(&server, Look::Seen),
            "looking consumed nothing"
        );
        assert_eq!(server.read(&mut buf).await.unwrap(), 3);
        assert!(!bytes_waiting(&server, Look::Seen));
    }
}
