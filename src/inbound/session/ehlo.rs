//! What the session offers the MTA: its EHLO reply (in transparent mode built from the
//! remote's), and STARTTLS toward the MTA.

use crate::inbound::reader::SessionReader;
use crate::inbound::session::{COMMAND_BLOCK, Next, Session, Stage};
use crate::server_tls::MtaStream;
use crate::smtp::Reply;
use crate::smtp::peek::Look;

impl Session {
    pub(super) fn ehlo_reply(&self) -> Reply {
        let mut reply = self.ehlo_extensions();
        if self.offers_starttls() {
            reply.lines.push("STARTTLS".into());
        }
        if self.offers_requiretls() {
            reply.lines.push("REQUIRETLS".into());
        }
        reply
    }

    /// REQUIRETLS (RFC 8689) is offered on a session in TLS only: a message that must
    /// travel over TLS every hop cannot come to us in clear.
    pub(super) fn offers_requiretls(&self) -> bool {
        self.io.get_ref().is_tls()
    }

    /// DSN is offered only where its parameters reach a remote known to take them: a
    /// transparent session whose remote offers DSN. A smart-host session does not know its
    /// remote at EHLO time.
    pub(super) fn offers_dsn(&self) -> bool {
        (self.remote_ehlo.as_ref())
            .is_some_and(|ehlo| crate::smtp::Capabilities::from_ehlo(ehlo).dsn)
    }

    /// STARTTLS is offered when a certificate is configured, until the session is in TLS.
    fn offers_starttls(&self) -> bool {
        !self.io.get_ref().is_tls() && self.proxy.server_tls.acceptor().is_some()
    }

    /// The MTA's STARTTLS (RFC 3207). Commands sent after it in the same packet would
    /// count as said under TLS though they came in clear: such a session is refused and
    /// closed. After the handshake the session starts over, EHLO first.
    pub(super) async fn starttls(&mut self) -> Next {
        let acceptor = match self.proxy.server_tls.acceptor() {
            Some(acceptor) if !self.io.get_ref().is_tls() => acceptor,
            Some(_) => {
                return self
                    .reply_or_close(&Reply::new(503, "5.5.1", "already in TLS"))
                    .await;
            }
            None => {
                return self
                    .reply_or_close(&Reply::new(502, "5.5.1", "STARTTLS not offered here"))
                    .await;
            }
        };
        if matches!(self.stage, Stage::Mail(_)) {
            let reply = Reply::new(503, "5.5.1", "STARTTLS inside a transaction");
            return self.reply_or_close(&reply).await;
        }
        // What follows is a handshake, which nothing could check afterwards.
        if self.client_sent_early(Look::Kernel) {
            tracing::warn!(client = %self.client, "commands pipelined after STARTTLS: session refused");
            let reply = Reply::new(554, "5.5.0", "commands sent after STARTTLS before TLS");
            let _ = self.reply(&reply).await;
            return Next::Close;
        }
        if self
            .reply(&Reply::new(220, "2.0.0", "ready to start TLS"))
            .await
            .is_err()
        {
            return Next::Close;
        }
        let io = std::mem::replace(
            &mut self.io,
            SessionReader::with_capacity(0, MtaStream::Gone),
        );
        let MtaStream::Plain(tcp) = io.into_inner() else {
            return Next::Close;
        };
        let timeout = self.proxy.config.timeouts.tls_handshake;
        match Box::pin(tokio::time::timeout(timeout, acceptor.accept(tcp))).await {
            Ok(Ok(tls)) => {
                let (_, session) = tls.get_ref();
                tracing::debug!(client = %self.client, version = ?session.protocol_version(), "MTA session in TLS");
                self.io =
                    SessionReader::with_capacity(COMMAND_BLOCK, MtaStream::Tls(Box::new(tls)));
                self.stage = Stage::Greeted;
                Next::Continue
            }
            Ok(Err(e)) => {
                tracing::info!(client = %self.client, "TLS handshake with the MTA failed: {e}");
                Next::Close
            }
            Err(_) => {
                tracing::info!(client = %self.client, "TLS handshake with the MTA timed out");
                Next::Close
            }
        }
    }

    /// Our EHLO reply without STARTTLS.
    fn ehlo_extensions(&self) -> Reply {
        let config = &self.proxy.config;
        if let Some(remote) = &self.remote_ehlo {
            return transparent_ehlo_reply(remote, config.limits.max_message_size);
        }
        Reply::multiline(
            250,
            vec![
                config.hostname.0.clone(),
                "PIPELINING".into(),
                format!("SIZE {}", config.limits.max_message_size),
                "8BITMIME".into(),
                "ENHANCEDSTATUSCODES".into(),
                "SMTPUTF8".into(),
            ],
        )
    }
}

/// Our EHLO reply in transparent mode: the remote's name, and of its extensions those a
/// cut-through relay can pass on (DSN too: its parameters are passed on). SIZE is the
/// smaller of its limit and ours; STARTTLS,
/// AUTH and anything we do not understand are left out (TLS toward the remote is ours).
fn transparent_ehlo_reply(remote: &Reply, our_max_size: u64) -> Reply {
    let caps = crate::smtp::Capabilities::from_ehlo(remote);
    let mut lines = vec![remote.lines.first().cloned().unwrap_or_default()];
    if caps.pipelining {
        lines.push("PIPELINING".into());
    }
    let size = match caps.size {
        Some(limit) if limit > 0 => limit.min(our_max_size),
        _ => our_max_size,
    };
    lines.push(format!("SIZE {size}"));
    let offered = |keyword: &str| caps.keywords.iter().any(|k| k == keyword);
    for keyword in ["8BITMIME", "DSN", "ENHANCEDSTATUSCODES", "SMTPUTF8"] {
        if offered(keyword) {
            lines.push(keyword.into());
        }
    }
    Reply::multiline(250, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mta_is_offered_what_the_remote_offers_and_a_relay_can_pass_on() {
        let remote = Reply::multiline(
            250,
            [
                "mx.partner.example Hello",
                "PIPELINING",
                "SIZE 1000",
                "STARTTLS",
                "AUTH PLAIN",
                "CHUNKING",
                "DSN",
                "SMTPUTF8",
            ]
            .map(String::from)
            .to_vec(),
        );
        let ours = transparent_ehlo_reply(&remote, 50_000_000);
        assert_eq!(
            ours.lines,
            [
                "mx.partner.example Hello",
                "PIPELINING",
                "SIZE 1000",
                "DSN",
                "SMTPUTF8"
            ]
        );
        // No limit from the remote, or a larger one: ours.
        let remote = Reply::multiline(250, ["mx", "SIZE", "8BITMIME"].map(String::from).to_vec());
        assert_eq!(
            transparent_ehlo_reply(&remote, 5000).lines,
            ["mx", "SIZE 5000", "8BITMIME"]
        );
    }
}
