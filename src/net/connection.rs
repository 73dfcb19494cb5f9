//! One SMTP client connection to a remote server: its reply discipline, and STARTTLS, which
//! only a connection not yet secured can say.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::net::tls::{Handshake, Session, TlsClient};
use crate::net::transport::{Stream, Transport};
use crate::outcome::NoTls;
use crate::smtp::Reply;
use crate::smtp::line::{LineRead, read_line};
use crate::smtp::peek::Look;
use crate::smtp::reply::{ReplyBuilder, ReplyError};

/// Reply lines longer than this are not SMTP (RFC 5321 allows 512).
const REPLY_LINE_LIMIT: usize = 4096;

/// How long bytes the kernel already holds may take to be read (and under TLS, decrypted):
/// a moment, since they are there; a remote that keeps sending records without data could
/// otherwise hold us.
const WAITING_RECORD: Duration = Duration::from_millis(250);

/// Why a remote exchange did not produce a reply.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("timed out after {0}s waiting for {1}")]
    Timeout(u64, &'static str),
    #[error("connection closed by the remote while waiting for {0}")]
    Closed(&'static str),
    // Transparent: the inner error's text and its causes, each once.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ReplyError),
    /// More came than the one reply the command is due: the reply stream is out of step.
    #[error("protocol violation: more than one reply to {0}: {1:?}")]
    ExtraReply(&'static str, String),
    /// A positive reply the command cannot get: the remote is answering something else.
    #[error("protocol violation: {1:?} cannot be {0}")]
    OutOfStep(&'static str, String),
}

/// Whether an I/O error is this host's, not the remote's: out of descriptors, buffers or
/// memory, a source address or port that cannot be had, a local firewall or a missing
/// capability.
pub fn is_local_cause(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::AddrNotAvailable
            | ErrorKind::AddrInUse
            | ErrorKind::OutOfMemory
            | ErrorKind::PermissionDenied
    ) {
        return true;
    }
    // Too many open files (process, system), no buffer space.
    #[cfg(unix)]
    let local = [libc::EMFILE, libc::ENFILE, libc::ENOBUFS];
    #[cfg(windows)]
    let local = [10024, 10055];
    #[cfg(not(any(unix, windows)))]
    let local: [i32; 0] = [];
    error
        .raw_os_error()
        .is_some_and(|code| local.contains(&code))
}

/// Why this host cannot open a socket now (out of descriptors or buffers), if it cannot:
/// asked when a library hides the cause of a failure (the resolver says only "no
/// connections available").
pub fn local_shortage() -> Option<std::io::Error> {
    match std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)) {
        Err(error) if is_local_cause(&error) => Some(error),
        _ => None,
    }
}

impl ExchangeError {
    /// Whether the error is this host's, not the remote's: out of descriptors, buffers or
    /// memory, a source address or port that cannot be had, a local firewall or missing
    /// capability. Such a failure says nothing of the server.
    pub fn is_local(&self) -> bool {
        matches!(self, ExchangeError::Io(error) if is_local_cause(error))
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, ExchangeError::Timeout(..))
    }
}

/// A connection that no TLS was started on: STARTTLS (or implicit TLS) may still follow.
pub type PlainConnection = Connection<TcpStream>;

pub struct Connection<T = Transport> {
    io: BufReader<T>,
    pub peer: SocketAddr,
    /// The server's name, for logs and for the certificate a handshake verifies.
    pub host: String,
    line: Vec<u8>,
    /// The server said 421 or 221, or we are stuck inside the message text: no further
    /// command goes on this connection.
    closed_by_remote: bool,
}

/// The read buffer of a connection.
const READ_BUFFER: usize = 16 * 1024;

impl PlainConnection {
    /// A connection over `tcp`, connected to `peer` for the server `host`.
    pub fn new(tcp: TcpStream, peer: SocketAddr, host: &str) -> PlainConnection {
        let _ = tcp.set_nodelay(true);
        Connection {
            io: BufReader::with_capacity(READ_BUFFER, tcp),
            peer,
            host: host.to_string(),
            line: Vec::with_capacity(512),
            closed_by_remote: false,
        }
    }

    /// Sends STARTTLS and, on 220, runs the handshake `how` asks for. A refusal leaves the
    /// connection usable in plain; any other failure consumes it.
    pub async fn starttls(
        self,
        tls: &TlsClient,
        how: &Handshake,
        command_timeout: Duration,
        handshake_timeout: Duration,
    ) -> StartTls {
        let conn = match self.starttls_accepted(command_timeout).await {
            Ok(conn) => conn,
            Err(result) => return result,
        };
        match conn.secure(tls, how, handshake_timeout).await {
            Ok((conn, session)) => StartTls::Secured(conn, session),
            Err(reason) => StartTls::Lost(reason),
        }
    }

    /// Runs the TLS handshake on the connection as it stands: after a STARTTLS 220, or at
    /// once for implicit TLS (port 465).
    pub async fn secure(
        self,
        tls: &TlsClient,
        how: &Handshake,
        handshake_timeout: Duration,
    ) -> Result<(Connection, Session), NoTls> {
        let Connection {
            io,
            peer,
            host,
            line,
            ..
        } = self;
        let (stream, session) = tls
            .secure(io.into_inner(), &host, how, handshake_timeout)
            .await?;
        let conn = Connection {
            io: BufReader::with_capacity(READ_BUFFER, stream),
            peer,
            host,
            line,
            closed_by_remote: false,
        };
        Ok((conn, session))
    }

    /// Sends STARTTLS; `Ok` when the 220 came and nothing after it, ready for a handshake.
    async fn starttls_accepted(self, command_timeout: Duration) -> Result<Self, StartTls> {
        let mut conn = self;
        // Not `command`: data after the 220 is checked below and has its own class.
        let what = "the reply to STARTTLS";
        let reply = match conn.send_line("STARTTLS", command_timeout, what).await {
            Ok(()) => conn.read_reply(command_timeout, what).await,
            Err(e) => Err(e),
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => return Err(StartTls::Lost(NoTls::HandshakeFailed(e.to_string()))),
        };
        if reply.code != 220 {
            let reason = NoTls::StarttlsRefused(reply.one_line());
            return Err(if reply.closes_connection() {
                StartTls::Closed(reply)
            } else {
                StartTls::Refused(conn, reason)
            });
        }
        // Anything after the 220 came before the handshake: an injection attempt or a broken
        // server. It must never be read as if it came over TLS.
        if let Some(extra) = conn.unsolicited(Look::Kernel).await {
            return Err(StartTls::Lost(NoTls::ProtocolViolation(format!(
                "data after the STARTTLS 220 and before the handshake: {extra:?}"
            ))));
        }
        Ok(conn)
    }
}

impl<T: Stream + Into<Transport>> Connection<T> {
    /// The same connection, as any connection: for the open transaction and the pool.
    pub fn into_any(self) -> Connection {
        Connection {
            io: BufReader::with_capacity(READ_BUFFER, self.io.into_inner().into()),
            peer: self.peer,
            host: self.host,
            line: self.line,
            closed_by_remote: self.closed_by_remote,
        }
    }
}

impl<T: Stream> Connection<T> {
    /// Reads one whole reply; `what` names the step for error texts.
    pub async fn read_reply(
        &mut self,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Reply, ExchangeError> {
        let reply = match tokio::time::timeout(timeout, self.read_reply_inner(what)).await {
            Ok(result) => result?,
            Err(_) => return Err(ExchangeError::Timeout(timeout.as_secs(), what)),
        };
        if reply.closes_connection() {
            self.closed_by_remote = true;
        }
        Ok(reply)
    }

    async fn read_reply_inner(&mut self, what: &'static str) -> Result<Reply, ExchangeError> {
        let mut builder = ReplyBuilder::default();
        loop {
            match read_line(&mut self.io, REPLY_LINE_LIMIT, &mut self.line).await? {
                LineRead::Line => {}
                LineRead::TooLong => {
                    return Err(ReplyError::Malformed("over-long reply line".into()).into());
                }
                LineRead::Eof => return Err(ExchangeError::Closed(what)),
            }
            tracing::debug!(remote = %self.host, "<- {}", String::from_utf8_lossy(&self.line));
            if let Some(reply) = builder.push(&self.line)? {
                return Ok(reply);
            }
        }
    }
    /// Sends one command line and reads its reply.
    pub async fn command(
        &mut self,
        line: &str,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Reply, ExchangeError> {
        self.send_line(line, timeout, what).await?;
        let reply = self.read_reply(timeout, what).await?;
        self.expect_nothing_more(what).await?;
        Ok(reply)
    }

    /// Like `command`, for a command whose positive replies are `due` (RFC 5321 4.3.2).
    pub async fn exchange(
        &mut self,
        line: &str,
        due: &[u16],
        timeout: Duration,
        what: &'static str,
    ) -> Result<Reply, ExchangeError> {
        let reply = self.command(line, timeout, what).await?;
        self.expect_due(&reply, due, what)?;
        Ok(reply)
    }

    /// Sends `commands` in one write (RFC 2920 PIPELINING) and reads their replies one by
    /// one, in order, each checked like `exchange` checks its one: a reply out of step, a
    /// 421 or an error ends the reading there. Nothing may follow the last reply.
    pub async fn pipeline(
        &mut self,
        commands: &[(&str, &[u16], &'static str)],
        timeout: Duration,
    ) -> Vec<Result<Reply, ExchangeError>> {
        let Some(&(_, _, first)) = commands.first() else {
            return Vec::new();
        };
        let mut bytes = Vec::new();
        for (line, _, _) in commands {
            tracing::debug!(remote = %self.host, "-> {line}");
            bytes.extend_from_slice(line.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        let sent = match self.expect_nothing_more(first).await {
            Ok(()) => self.write(&bytes, timeout, first).await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            return vec![Err(e)];
        }
        let mut replies = Vec::with_capacity(commands.len());
        for (i, &(_, due, what)) in commands.iter().enumerate() {
            let read = match self.read_reply(timeout, what).await {
                Ok(reply) => self.expect_due(&reply, due, what).map(|()| reply),
                Err(e) => Err(e),
            };
            let last = i + 1 == commands.len();
            let read = match read {
                Ok(reply) if last && !reply.closes_connection() => {
                    self.expect_nothing_more(what).await.map(|()| reply)
                }
                other => other,
            };
            let stop = !matches!(&read, Ok(reply) if !reply.closes_connection());
            replies.push(read);
            if stop {
                break;
            }
        }
        replies
    }

    /// A 2xx or 3xx reply other than `due` (a 250 to DATA, a 354 to RCPT) answers some
    /// other command: the remote is out of step, and nothing more goes on this connection.
    pub fn expect_due(
        &mut self,
        reply: &Reply,
        due: &[u16],
        what: &'static str,
    ) -> Result<(), ExchangeError> {
        if (reply.is_positive() || reply.is_intermediate()) && !due.contains(&reply.code) {
            self.give_up();
            return Err(ExchangeError::OutOfStep(what, reply.one_line()));
        }
        Ok(())
    }

    /// Every reply we read was asked for (a pipelined group is read to its end), so outside
    /// a reply nothing may arrive: if
    /// something does, every later reply would be matched to the wrong command. Checked
    /// after each reply and before each command, as far as the runtime has seen (a byte it
    /// has not seen yet is caught by the next check, or answers the next command in the
    /// wrong place and fails its due reply); before the final dot, in the kernel too.
    pub async fn expect_nothing_more(&mut self, what: &'static str) -> Result<(), ExchangeError> {
        self.expect_nothing_more_in(Look::Seen, what).await
    }

    /// Nothing arrived that was not asked for, looking `look` hard.
    pub async fn expect_nothing_more_in(
        &mut self,
        look: Look,
        what: &'static str,
    ) -> Result<(), ExchangeError> {
        match self.unsolicited(look).await {
            None => Ok(()),
            Some(extra) => Err(ExchangeError::ExtraReply(what, extra)),
        }
    }

    /// Bytes that have arrived but were not asked for: in our buffer, or waiting on the
    /// socket. What waits is read (under TLS, decrypted) until the socket holds nothing
    /// more: a record that is no reply (a session ticket) is taken up and does not count.
    async fn unsolicited(&mut self, look: Look) -> Option<String> {
        if self.io.buffer().is_empty() && self.bytes_waiting(look) {
            let read = std::future::poll_fn(|cx| {
                if Pin::new(&mut self.io).poll_fill_buf(cx).is_ready() {
                    return Poll::Ready(());
                }
                // Pending with bytes still on the socket: the runtime has not seen them yet
                // and will wake us. Pending with none: what came held no data.
                if self.bytes_waiting(Look::Kernel) {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            });
            // A guard only: bytes that are there are read at once.
            let _ = tokio::time::timeout(WAITING_RECORD, read).await;
        }
        let bytes = self.io.buffer();
        (!bytes.is_empty()).then(|| String::from_utf8_lossy(bytes).chars().take(60).collect())
    }

    /// Whether bytes wait on the socket, not yet read into any buffer of ours.
    fn bytes_waiting(&self, look: Look) -> bool {
        crate::smtp::peek::bytes_waiting(self.io.get_ref().tcp(), look)
    }

    /// Sends a line that holds a secret; the debug log shows `shown` instead.
    pub async fn command_secret(
        &mut self,
        line: &str,
        shown: &str,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Reply, ExchangeError> {
        tracing::debug!(remote = %self.host, "-> {shown}");
        self.send_raw_line(line, timeout, what).await?;
        self.read_reply(timeout, what).await
    }

    async fn send_line(
        &mut self,
        line: &str,
        timeout: Duration,
        what: &'static str,
    ) -> Result<(), ExchangeError> {
        tracing::debug!(remote = %self.host, "-> {line}");
        self.expect_nothing_more(what).await?;
        self.send_raw_line(line, timeout, what).await
    }

    async fn send_raw_line(
        &mut self,
        line: &str,
        timeout: Duration,
        what: &'static str,
    ) -> Result<(), ExchangeError> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes, timeout, what).await
    }

    /// Writes raw bytes (a block of the message body).
    pub async fn write(
        &mut self,
        bytes: &[u8],
        timeout: Duration,
        what: &'static str,
    ) -> Result<(), ExchangeError> {
        let io = self.io.get_mut();
        let write = async {
            io.write_all(bytes).await?;
            io.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ExchangeError::Timeout(timeout.as_secs(), what)),
        }
    }

    /// The remote said 421 or 221, or the connection was given up.
    pub fn is_closing(&self) -> bool {
        self.closed_by_remote
    }

    /// Whether anything came that nobody asked for, without waiting: in our buffer, or on
    /// the socket as far as the runtime has seen. A connection with such bytes is out of
    /// step and is not kept (what the runtime has not seen yet, the check before the
    /// connection's next command finds).
    pub fn has_unsolicited(&self) -> bool {
        !self.io.buffer().is_empty() || self.bytes_waiting(Look::Seen)
    }

    /// No further command goes on this connection: `quit` only closes it.
    pub fn give_up(&mut self) {
        self.closed_by_remote = true;
    }

    /// Says goodbye politely, without waiting long for the answer.
    pub async fn quit(mut self) {
        if self.closed_by_remote {
            return;
        }
        let _ = self
            .command("QUIT", Duration::from_secs(5), "the reply to QUIT")
            .await;
    }
}

/// What STARTTLS led to.
pub enum StartTls {
    /// TLS is up, by rustls or the legacy stack, with what it negotiated.
    Secured(Connection, Session),
    /// STARTTLS was refused; the connection goes on in plain.
    Refused(PlainConnection, NoTls),
    /// The connection is unusable; a plain fallback needs a new one.
    Lost(NoTls),
    /// The server closed (421/221): a temporary failure of this server, not a TLS fact.
    Closed(Reply),
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn this_hosts_own_errors_are_told_from_the_remotes() {
        let io = |code| ExchangeError::Io(std::io::Error::from_raw_os_error(code));
        for local in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::EADDRNOTAVAIL,
            libc::EADDRINUSE,
            libc::EPERM,
        ] {
            assert!(io(local).is_local(), "{local}");
        }
        for remote in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ECONNRESET] {
            assert!(!io(remote).is_local(), "{remote}");
        }
        assert!(!ExchangeError::Timeout(5, "the TCP connection").is_local());
    }
}
