//! What a connection runs over: plain TCP, TLS by rustls, or the legacy stack; and the
//! one trait the SMTP connection needs of each.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// What a connection runs over. A plain
/// [`Connection<TcpStream>`](crate::net::connection::Connection) can be secured once; a
/// secured one (`Connection<TlsStream<TcpStream>>`, or over the legacy stack) cannot be
/// secured again, which the types say: only `Connection<TcpStream>` has `starttls`.
/// [`Transport`] holds any of them, for the open transaction and the pool.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {
    /// The TCP connection underneath, to see whether bytes wait on it.
    fn tcp(&self) -> &TcpStream;
}

impl Stream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Stream for TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

#[cfg(feature = "legacy-tls")]
impl Stream for tokio_openssl::SslStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref()
    }
}

/// Any of the streams a connection can run over.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// The legacy stack (OpenSSL), for servers rustls cannot talk to.
    #[cfg(feature = "legacy-tls")]
    Legacy(Box<tokio_openssl::SslStream<TcpStream>>),
}

impl Stream for Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(tcp) => tcp,
            Transport::Tls(tls) => tls.tcp(),
            #[cfg(feature = "legacy-tls")]
            Transport::Legacy(tls) => tls.tcp(),
        }
    }
}

impl From<TcpStream> for Transport {
    fn from(tcp: TcpStream) -> Transport {
        Transport::Plain(tcp)
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            #[cfg(feature = "legacy-tls")]
            Transport::Legacy(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(feature = "legacy-tls")]
            Transport::Legacy(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(feature = "legacy-tls")]
            Transport::Legacy(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(feature = "legacy-tls")]
            Transport::Legacy(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
