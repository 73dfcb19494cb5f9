//! A recipient held for the sender's word (RFC 8689 5): its domain's published policy
//! (MTA-STS, DANE) refused every server, and `TLS-Required: No` in the message would set
//! that aside, but the header comes after DATA. The RCPT gets 250 and no remote is opened;
//! at DATA tlsrouter answers 354 itself and reads the header block (never the body): with
//! the header, the route is opened then, as the rules alone decide, and the text follows
//! cut-through as always; without it, the text is read to its end and the MTA gets the
//! policy's refusal. Either way the MTA's 250 for the message is the remote's 250.
//!
//! One recipient is held per transaction; a later one gets `452 4.5.3` and its own
//! transaction, so that the one reply to the message is that recipient's.

use tokio::io::AsyncBufReadExt;

use crate::inbound::session::data::{BODY_BLOCK, BodyEnd, ClientGone};
use crate::inbound::session::transaction::{End, Held, Remote, Transaction};
use crate::inbound::session::{Next, Session};
use crate::outbound::TlsRequiredNo;
use crate::outbound::attempt::Envelope;
use crate::outbound::upstream::Answer;
use crate::sessions::SessionState;
use crate::smtp::Reply;
use crate::smtp::data::{BodyError, BodyFilter};
use crate::smtp::header::{field, header_end};

/// How much of the message text is read for its header block; a longer one is taken as
/// without `TLS-Required: No`.
const HEADER_LIMIT: usize = 256 * 1024;

/// The start of the message text, as read for its header block.
struct Head {
    /// The text so far, as it goes to the remote.
    text: Vec<u8>,
    /// Set when the text ended within it.
    end: Option<Result<(), BodyError>>,
}

impl Session {
    /// DATA for a held recipient.
    pub(super) async fn data_held(&mut self, mut tx: Box<Transaction>, held: Box<Held>) -> Next {
        if self
            .reply(&Reply::new(354, "2.0.0", "go ahead"))
            .await
            .is_err()
        {
            return self.client_gone(&mut tx, None).await;
        }
        let mut filter = self.body_filter();
        let head = self.read_head(&mut filter).await;
        tx.read_text(&filter);
        let head = match head {
            Ok(head) => head,
            Err(why) => return self.client_gone(&mut tx, Some(why)).await,
        };
        if let Some(Err(error)) = head.end {
            let reply = error.reply();
            return self.ended(&mut tx, &reply, End::MessageFailed).await;
        }
        let waived = self.proxy.config.delivery.tls_required_no == TlsRequiredNo::Honour
            && says_tls_required_no(&head.text);
        if !waived {
            return self.refuse_held(tx, head, filter, held.refusal).await;
        }
        let envelope = Envelope {
            sender: tx.sender.as_ref(),
            params: &tx.params,
            first: (&held.recipient, &held.params),
            policy_waived: true,
        };
        let redirect = self.redirect.as_mut();
        let opened = Box::pin(self.proxy.outbound.open_route(
            held.plan.clone(),
            &envelope,
            redirect,
        ));
        let mut route = match opened.await {
            Ok(route) => route,
            Err(no_route) => {
                no_route.log(self.client, held.recipient.routing_domain(), &held.plan);
                return self.refuse_held(tx, head, filter, no_route.reply()).await;
            }
        };
        self.registered
            .update(SessionState::Data, Some(route.upstream.facts().to_string()));
        let accepted = match route
            .upstream
            .recipient(&held.recipient, &held.params)
            .await
        {
            Answer::Reply(reply) if reply.is_positive() => Ok(()),
            Answer::Reply(reply) | Answer::Lost(reply) => Err(reply),
        };
        let accepted = match accepted {
            Ok(()) => route.upstream.start_data().await,
            Err(reply) => Answer::Lost(reply),
        };
        if let Answer::Lost(reply) = accepted {
            tx.remote = Remote::Open(Box::new(route));
            tx.lose(reply.clone());
            return self.refuse_held(tx, head, filter, reply).await;
        }
        let upstream = &mut route.upstream;
        let ended = match head.end {
            Some(_) => BodyEnd::Complete(head.text),
            None => match upstream.body_block(&head.text).await {
                Ok(()) => (self.relay_body(Some(upstream), &mut filter, Vec::new())).await,
                Err(why) => {
                    let rest = self.relay_body(None, &mut filter, Vec::new()).await;
                    match rest {
                        BodyEnd::Complete(_) => BodyEnd::UpstreamFailed(why),
                        other => other,
                    }
                }
            },
        };
        tx.remote = Remote::Open(Box::new(route));
        tx.read_text(&filter);
        self.deliver(tx, ended).await
    }

    /// The text up to the end of its header block (or HEADER_LIMIT, or its end), read
    /// through `filter` as it goes to the remote.
    async fn read_head(&mut self, filter: &mut BodyFilter) -> Result<Head, ClientGone> {
        let client_idle = self.proxy.config.timeouts.client_idle;
        let mut text = Vec::with_capacity(BODY_BLOCK);
        loop {
            let input = match tokio::time::timeout(client_idle, self.io.fill_buf()).await {
                Err(_) => return Err(ClientGone::TimedOut),
                Ok(Err(e)) => return Err(ClientGone::Failed(e)),
                Ok(Ok([])) => return Err(ClientGone::Closed),
                Ok(Ok(input)) => input,
            };
            let room = (HEADER_LIMIT.saturating_sub(text.len()) / 3).max(1);
            let fed = filter.feed(&input[..input.len().min(room)], &mut text);
            self.io.consume(fed.consumed);
            if fed.end.is_some() || header_end(&text).is_some() || text.len() >= HEADER_LIMIT {
                return Ok(Head { text, end: fed.end });
            }
        }
    }

    /// The held recipient is not delivered: the rest of the text is read, and the MTA gets
    /// `reply`.
    async fn refuse_held(
        &mut self,
        mut tx: Box<Transaction>,
        head: Head,
        mut filter: BodyFilter,
        reply: Reply,
    ) -> Next {
        if head.end.is_none() {
            let rest = self.relay_body(None, &mut filter, Vec::new()).await;
            tx.read_text(&filter);
            if let BodyEnd::ClientGone(why) = rest {
                return self.client_gone(&mut tx, Some(why)).await;
            }
        }
        for recipient in std::mem::take(&mut tx.accepted) {
            tx.refused.push((recipient, reply.clone()));
        }
        tx.deferred_any |= reply.is_transient();
        self.ended(&mut tx, &reply, End::NotWaived).await
    }
}

/// Whether the header block at the start of `text` has `TLS-Required: No` (RFC 8689 5),
/// field name and value in any case, folded or not.
fn says_tls_required_no(text: &[u8]) -> bool {
    field(text, "TLS-Required").is_some_and(|value| value.eq_ignore_ascii_case("No"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_found_in_any_case_folded_or_not_and_only_in_the_header_block() {
        let says = |text: &str| says_tls_required_no(text.as_bytes());
        assert!(says("Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n"));
        assert!(says("tls-required:no\r\n\r\n"));
        assert!(says("TLS-Required:\r\n  No\r\nSubject: x\r\n\r\n"));
        assert!(!says("TLS-Required: Yes\r\n\r\n"));
        assert!(!says("X-TLS-Required: No\r\n\r\n"));
        assert!(!says("Subject: x\r\n\r\nTLS-Required: No\r\n"));
        assert!(!says("\r\nTLS-Required: No\r\n"));
    }
}
