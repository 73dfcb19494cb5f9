//! The MTA session's read buffer: small while the session reads commands (most sessions
//! are idle most of the time), one body block while it relays a message. A fixed 64 KiB
//! buffer per session would cost every idle session 64 KiB once the allocator hands it
//! memory that was used before.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

/// A buffered reader (and pass-through writer) whose buffer can be grown for a message
/// and shrunk after it, keeping what it holds.
pub struct SessionReader<S> {
    inner: S,
    buf: Vec<u8>,
    /// `buf[pos..filled]` is read and not yet consumed.
    pos: usize,
    filled: usize,
}

impl<S> SessionReader<S> {
    pub fn with_capacity(capacity: usize, inner: S) -> Self {
        SessionReader {
            inner,
            buf: vec![0; capacity.max(1)],
            pos: 0,
            filled: 0,
        }
    }

    /// What is read and not yet consumed.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..self.filled]
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Makes the buffer `capacity` bytes, keeping what it holds; it never becomes smaller
    /// than that.
    pub fn resize(&mut self, capacity: usize) {
        let held = self.filled - self.pos;
        let capacity = capacity.max(held).max(1);
        if capacity == self.buf.len() {
            return;
        }
        let mut buf = vec![0; capacity];
        buf[..held].copy_from_slice(&self.buf[self.pos..self.filled]);
        self.buf = buf;
        self.pos = 0;
        self.filled = held;
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncBufRead for SessionReader<S> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pos >= this.filled {
            let mut read = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            this.filled = read.filled().len();
            this.pos = 0;
        }
        Poll::Ready(Ok(&this.buf[this.pos..this.filled]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = (this.pos + amt).min(this.filled);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SessionReader<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let available = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = available.len().min(out.remaining());
        out.put_slice(&available[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SessionReader<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn growing_and_shrinking_keeps_what_was_read_and_not_consumed() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut reader = SessionReader::with_capacity(8, server);
        client
            .write_all(b"DATA\r\nbody text\r\n.\r\n")
            .await
            .unwrap();

        assert_eq!(reader.fill_buf().await.unwrap(), b"DATA\r\nbo");
        reader.consume(6);
        reader.resize(64);
        assert_eq!(reader.capacity(), 64);
        assert_eq!(reader.buffer(), b"bo", "kept across the resize");
        let mut body = vec![0; 13];
        reader.read_exact(&mut body).await.unwrap();
        assert_eq!(body, b"body text\r\n.\r");

        reader.resize(1);
        assert_eq!(reader.capacity(), 1, "only the LF is held");
        assert_eq!(reader.buffer(), b"\n");
        reader.consume(1);
        client.write_all(b"QUIT\r\n").await.unwrap();
        reader.resize(16);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "QUIT\r\n");
    }

    #[tokio::test]
    async fn a_buffer_is_never_made_smaller_than_what_it_holds() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut reader = SessionReader::with_capacity(64, server);
        client.write_all(b"0123456789").await.unwrap();
        assert_eq!(reader.fill_buf().await.unwrap().len(), 10);

        reader.resize(4);

        assert_eq!(reader.capacity(), 10);
        assert_eq!(reader.buffer(), b"0123456789");
    }
}
