//! The MTA session's read buffer: small while the session reads commands (most sessions
//! are idle most of the time), one body block while it relays a message. A fixed 64 KiB
//! buffer per session would cost every idle session 64 KiB once the allocator hands it
//! memory that was used before.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A buffered reader (and pass-through writer) whose buffer can be grown for a message
/// and shrunk after it, keeping what it holds.
pub struct SessionReader<S> {
    inner: S,
    /// Its length is what was read, its capacity the block size: reads go to the spare
    /// capacity, so a new buffer is never zeroed first.
    buf: Vec<u8>,
    /// `buf[pos..]` is read and not yet consumed.
    pos: usize,
}

impl<S> SessionReader<S> {
    pub fn with_capacity(capacity: usize, inner: S) -> Self {
        SessionReader {
            inner,
            buf: Vec::with_capacity(capacity.max(1)),
            pos: 0,
        }
    }

    /// What is read and not yet consumed.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Makes the buffer `capacity` bytes, keeping what it holds; it never becomes smaller
    /// than that.
    pub fn resize(&mut self, capacity: usize) {
        let held = self.buffer();
        let capacity = capacity.max(held.len()).max(1);
        if capacity == self.buf.capacity() {
            return;
        }
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(held);
        self.buf = buf;
        self.pos = 0;
    }

    /// Moves what is held to the front and reads more behind it, into the rest of the
    /// buffer (one read, which may wait): how many bytes came, 0 at the end of the stream.
    /// The buffer must have room.
    pub async fn fill_more(&mut self) -> io::Result<usize>
    where
        S: AsyncRead + Unpin,
    {
        self.buf.drain(..self.pos);
        self.pos = 0;
        debug_assert!(self.buf.len() < self.buf.capacity(), "no room to read more");
        self.inner.read_buf(&mut self.buf).await
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
        if this.pos >= this.buf.len() {
            this.buf.clear();
            this.pos = 0;
            // One read into the spare capacity; the future holds no state between polls.
            let read = std::pin::pin!(this.inner.read_buf(&mut this.buf));
            ready!(read.poll(cx))?;
        }
        Poll::Ready(Ok(&this.buf[this.pos..]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = (this.pos + amt).min(this.buf.len());
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
    async fn reading_more_keeps_what_is_held_in_front_of_it() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut reader = SessionReader::with_capacity(16, server);
        client.write_all(b"line one\r\nhalf").await.unwrap();
        assert_eq!(reader.fill_buf().await.unwrap(), b"line one\r\nhalf");
        reader.consume(10);
        client.write_all(b" a line\r\n").await.unwrap();

        assert_eq!(reader.fill_more().await.unwrap(), 9);

        assert_eq!(reader.buffer(), b"half a line\r\n");
        assert_eq!(reader.capacity(), 16);
        drop(client);
        reader.consume(13);
        assert_eq!(
            reader.fill_more().await.unwrap(),
            0,
            "the end of the stream"
        );
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
