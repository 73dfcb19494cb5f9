//! DATA: the message text streamed from the MTA to the remote in bounded blocks, and the
//! remote's verdict passed back.

use tokio::io::AsyncBufReadExt;

use crate::inbound::session::transaction::{End, Remote, Transaction};
use crate::inbound::session::{COMMAND_BLOCK, Next, Session, Stage};
use crate::net::connection::ExchangeError;
use crate::outbound::upstream::{Answer, Upstream};
use crate::sessions::SessionState;
use crate::smtp::Reply;
use crate::smtp::data::{BodyError, BodyFilter};
use crate::smtp::peek::Look;

/// Body bytes gathered before they are written to the remote.
pub(super) const BODY_BLOCK: usize = 64 * 1024;

/// The read buffer when a text begins: most messages fit. A text that fills it twice gets
/// BODY_BLOCK.
const TEXT_BLOCK: usize = 4 * 1024;

/// Clean text at least this long is written from the read buffer as it is.
const DIRECT_BLOCK: usize = 16 * 1024;

/// How the body transfer ended.
pub(super) enum BodyEnd {
    /// The whole text was read; its last bytes, not yet sent, go with the final dot.
    Complete(Vec<u8>),
    Refused(BodyError),
    /// The remote failed while we were still reading the body.
    UpstreamFailed(ExchangeError),
    ClientGone(ClientGone),
}

/// Why the MTA's message text did not come to its end.
#[derive(Debug, thiserror::Error)]
pub(super) enum ClientGone {
    #[error("timed out waiting for the message text")]
    TimedOut,
    #[error("{0}")]
    Failed(std::io::Error),
    #[error("connection closed")]
    Closed,
}

impl Session {
    pub(super) async fn data(&mut self) -> Next {
        let stage = std::mem::replace(&mut self.stage, Stage::Ready);
        let mut tx = match stage {
            Stage::Mail(tx) => tx,
            other => {
                self.stage = other;
                return self
                    .reply_or_close(&Reply::new(503, "5.5.1", "MAIL and RCPT first"))
                    .await;
            }
        };
        if self.client_sent_early(Look::Seen) {
            return self.pipelining_violation(&mut tx).await;
        }
        if let Remote::Held(_) = tx.remote
            && let Remote::Held(held) = std::mem::replace(&mut tx.remote, Remote::None)
        {
            return self.data_held(tx, held).await;
        }
        let route = match &mut tx.remote {
            Remote::Open(route) if !tx.accepted.is_empty() => route,
            Remote::Lost { reply, .. } => {
                let reply = reply.clone();
                return self.refuse_data(&mut tx, &reply, End::NoData).await;
            }
            _ => {
                let reply = Reply::new(554, "5.5.1", "no valid recipients");
                return self.refuse_data(&mut tx, &reply, End::NoData).await;
            }
        };
        let start = match route.upstream.start_data().await {
            Answer::Reply(start) => start,
            Answer::Lost(reply) => {
                tx.lose(reply.clone());
                return self.refuse_data(&mut tx, &reply, End::DataRefused).await;
            }
        };
        let remote = route.upstream.facts().to_string();
        self.registered.update(SessionState::Data, Some(remote));
        if self.client_sent_early(Look::Seen) {
            // Text that came while the remote was asked: the same violation, found later.
            return self.pipelining_violation(&mut tx).await;
        }
        if self.reply(&start).await.is_err() {
            return self.client_gone(&mut tx, None).await;
        }
        let mut filter = self.body_filter();
        let ended = self
            .relay_body(Some(&mut route.upstream), &mut filter, Vec::new())
            .await;
        tx.read_text(&filter);
        self.deliver(tx, ended).await
    }

    /// The text was relayed to the transaction's remote as far as it went: the remote's
    /// verdict on a complete text, or why there is none.
    pub(super) async fn deliver(&mut self, mut tx: Box<Transaction>, ended: BodyEnd) -> Next {
        self.io.resize(COMMAND_BLOCK);
        let Remote::Open(route) = &mut tx.remote else {
            let reply = Reply::new(451, "4.4.2", "lost the remote during DATA");
            return self.ended(&mut tx, &reply, End::MessageFailed).await;
        };
        if !matches!(ended, BodyEnd::Complete(_)) {
            route.upstream.abandon();
        }
        let (reply, end) = match ended {
            BodyEnd::Complete(tail) => {
                self.registered.set_state(SessionState::Verdict);
                (route.upstream.finish(tail).await, End::Answered)
            }
            BodyEnd::Refused(error) => (error.reply(), End::MessageFailed),
            BodyEnd::UpstreamFailed(why) => (
                Reply::new(451, "4.4.2", format!("lost the remote during DATA: {why}")),
                End::MessageFailed,
            ),
            // The final dot is never sent, so the remote discards the message.
            BodyEnd::ClientGone(why) => return self.client_gone(&mut tx, Some(why)).await,
        };
        self.ended(&mut tx, &reply, end).await
    }

    /// The transaction ends with `reply` to the MTA.
    pub(super) async fn ended(&mut self, tx: &mut Transaction, reply: &Reply, end: End) -> Next {
        self.finish(tx, Some(reply), end).await;
        self.reply_or_close(reply).await
    }

    /// The MTA left during the message text (`why`), or could not be answered: the
    /// transaction ends, and so does the session.
    pub(super) async fn client_gone(
        &mut self,
        tx: &mut Transaction,
        why: Option<ClientGone>,
    ) -> Next {
        let text = match why {
            Some(why) => format!("client gone during DATA: {why}"),
            None => "client gone".to_string(),
        };
        let reply = Reply::new(451, "4.4.2", text);
        self.finish(tx, Some(&reply), End::ClientGone).await;
        Next::Close
    }

    /// RFC 2920: DATA ends a pipelined group; the client must wait for our 354.
    /// DATA refused: text the MTA sent without waiting for a 354 would be read as commands
    /// next, so the kernel is asked whether any came.
    async fn refuse_data(&mut self, tx: &mut Transaction, reply: &Reply, end: End) -> Next {
        if self.client_sent_early(Look::Kernel) {
            return self.pipelining_violation(tx).await;
        }
        self.finish(tx, Some(reply), end).await;
        self.reply_or_close(reply).await
    }

    async fn pipelining_violation(&mut self, tx: &mut Transaction) -> Next {
        let reply = Reply::new(
            554,
            "5.5.0",
            "synchronization error: data sent before the 354",
        );
        self.finish(tx, Some(&reply), End::PipeliningViolation)
            .await;
        let _ = self.reply(&reply).await;
        Next::Close
    }

    /// What reads the MTA's message text: its limits and line endings.
    pub(super) fn body_filter(&self) -> BodyFilter {
        let config = &self.proxy.config;
        BodyFilter::new(
            config.delivery.bare_line_endings,
            config.limits.text_line,
            config.limits.max_message_size,
        )
    }

    /// Streams the rest of the body from the MTA to the remote in bounded blocks, after
    /// `out` (text already read through `filter`); with no remote, reads it to its end.
    pub(super) async fn relay_body(
        &mut self,
        mut upstream: Option<&mut Upstream>,
        filter: &mut BodyFilter,
        mut out: Vec<u8>,
    ) -> BodyEnd {
        let client_idle = self.proxy.config.timeouts.client_idle;
        // A short text in one read, not in as many as the command buffer takes.
        if self.io.capacity() < TEXT_BLOCK {
            self.io.resize(TEXT_BLOCK);
        }
        out.reserve(BODY_BLOCK + 1024);
        let mut upstream_error = None;
        let mut full_reads = 0;
        loop {
            let capacity = self.io.capacity();
            let held = self.io.buffer();
            // A line begun at the end of the last block: read more behind it, so that the
            // block starts at a line's start and its clean lines can pass whole.
            let line_begun = filter.at_line_start()
                && !held.is_empty()
                && held.len() < capacity
                && memchr::memchr(b'\n', held).is_none();
            let read = if line_begun {
                let more = self.io.fill_more();
                tokio::time::timeout(client_idle, more)
                    .await
                    .map(|r| r.map(|n| n > 0))
            } else {
                let fill = self.io.fill_buf();
                tokio::time::timeout(client_idle, fill)
                    .await
                    .map(|r| r.map(|b| !b.is_empty()))
            };
            match read {
                Err(_) => return BodyEnd::ClientGone(ClientGone::TimedOut),
                Ok(Err(e)) => return BodyEnd::ClientGone(ClientGone::Failed(e)),
                Ok(Ok(false)) => return BodyEnd::ClientGone(ClientGone::Closed),
                Ok(Ok(true)) => {}
            }
            let input = self.io.buffer();
            // A text that fills the small buffer twice is large: read it in whole blocks.
            // (A text of a few KiB ends before it needs the larger buffer.)
            full_reads += usize::from(input.len() == capacity);
            let grow = full_reads == 2 && capacity < BODY_BLOCK;
            // Whole clean lines of a large text go to the remote as they were read, not
            // copied into a block first, after what the block holds. (They never hold the
            // end of the text; a short text keeps its one write with the final dot.)
            let clean = filter.pass_clean(input, DIRECT_BLOCK);
            if clean > 0 {
                if let Some(upstream) = upstream.as_deref_mut() {
                    for block in [&out[..], &input[..clean]] {
                        if upstream_error.is_none() && !block.is_empty() {
                            upstream_error = upstream.body_block(block).await.err();
                        }
                    }
                }
                out.clear();
                self.io.consume(clean);
                if grow {
                    self.io.resize(BODY_BLOCK);
                }
                continue;
            }
            // One input byte makes at most three output bytes (a stray CR, then a stuffed
            // dot): take no more than keeps a block within BODY_BLOCK.
            let room = (BODY_BLOCK.saturating_sub(out.len()) / 3).max(1);
            let fed = filter.feed(&input[..input.len().min(room)], &mut out);
            self.io.consume(fed.consumed);
            if grow {
                self.io.resize(BODY_BLOCK);
            }
            // The end of a complete text is held back: it goes with the final dot, in one
            // write (one packet for the remote, one wake-up less on both sides).
            let complete = matches!(fed.end, Some(Ok(())));
            let flush = !complete && (out.len() >= BODY_BLOCK || fed.end.is_some());
            if flush
                && !out.is_empty()
                && upstream_error.is_none()
                && let Some(upstream) = upstream.as_deref_mut()
            {
                upstream_error = upstream.body_block(&out).await.err();
            }
            if flush {
                out.clear();
            }
            match fed.end {
                None => continue,
                Some(Err(error)) => return BodyEnd::Refused(error),
                Some(Ok(())) => {
                    return match upstream_error {
                        Some(why) => BodyEnd::UpstreamFailed(why),
                        None => BodyEnd::Complete(out),
                    };
                }
            }
        }
    }
}
