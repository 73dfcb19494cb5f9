//! The one log line of a transaction, with its fields.

use std::net::SocketAddr;

use crate::inbound::session::transaction::{End, Transaction};
use crate::outcome::{NoTls, TlsOutcome, Verification};
use crate::smtp::Reply;

pub(super) fn log_transaction(
    client: SocketAddr,
    tx: &Transaction,
    reply: Option<&Reply>,
    end: End,
) {
    use tracing::field::display;
    let sender = tx
        .sender
        .as_ref()
        .map_or_else(|| "<>".to_string(), ToString::to_string);
    let recipients: Vec<String> = tx.accepted.iter().map(ToString::to_string).collect();
    let mut refused: Vec<String> = (tx.refused.iter())
        .map(|(rcpt, reply)| format!("{rcpt} ({reply})"))
        .collect();
    if tx.refused_more > 0 {
        refused.push(format!("and {} more", tx.refused_more));
    }
    // A field with nothing to say is left out of the line, not written as `key=`.
    let listed = |items: &[String], separator: &str| {
        (!items.is_empty()).then(|| display(items.join(separator)))
    };
    let reply_code = reply.map(|r| r.code);
    // The sender's REQUIRETLS (RFC 8689), when it asked for it.
    let requiretls = tx.params.requiretls.then_some(display("yes"));
    let reply = reply.map_or_else(|| "none".to_string(), ToString::to_string);
    // To match the line with the MTA's own: the Message-ID, the size and how long it took.
    let message_id = tx.text.as_ref().and_then(|t| t.message_id.as_deref());
    let size = tx.text.as_ref().map(|t| t.size);
    let duration_ms = tx.started.elapsed().as_millis() as u64;
    let Some(facts) = tx.remote.facts() else {
        tracing::info!(
            target: "tlsrouter::transaction",
            client = %client,
            from = %sender,
            to = listed(&recipients, ","),
            refused = listed(&refused, "; "),
            route = "none",
            requiretls,
            message_id,
            size,
            duration_ms,
            end = end.label(),
            reply_code,
            reply = %reply,
            "transaction"
        );
        return;
    };
    // The outcome class of the route: what the cache would record, and the counters count.
    let class = facts.tls.class().map_or("tls-never", |c| c.name());
    let (route, version, cipher, verify, fallback) = match &facts.tls {
        TlsOutcome::Encrypted(session) => {
            let verify = verdict(&session.verification, "verified");
            (
                "tls",
                Some(session.version.as_str()),
                Some(session.cipher.as_str()),
                Some(verify),
                None,
            )
        }
        // Whatever the chain is worth, this session authenticated nothing.
        TlsOutcome::Legacy(session) => {
            let chain = verdict(&session.verification, "the chain verifies");
            (
                "tls",
                Some(session.version.as_str()),
                Some(session.cipher.as_str()),
                Some(format!("tls-legacy: not authenticated ({chain})")),
                None,
            )
        }
        TlsOutcome::Plain(reason) => {
            let class = reason.class().map(|c| c.name()).unwrap_or("tls-never");
            (
                "plain",
                None,
                None,
                None,
                Some(format!("{class}: {reason}")),
            )
        }
    };
    let earlier: Vec<String> = (facts.earlier_failures.iter())
        .map(ToString::to_string)
        .collect();
    tracing::info!(
        target: "tlsrouter::transaction",
        client = %client,
        from = %sender,
        to = listed(&recipients, ","),
        refused = listed(&refused, "; "),
        next_hop = %facts.server,
        mx = %facts.server.name,
        addr = %facts.server.addr,
        relay = facts.relay.as_ref().map(display),
        route,
        class,
        tls_version = version,
        cipher,
        verify = verify.map(display),
        fallback = fallback.map(display),
        rule = %facts.rule,
        policy = facts.published.name(),
        // The sender's TLS-Required: No set the domain's policy aside (RFC 8689 5).
        policy_overridden_by = facts.policy_waived.then_some("sender"),
        downgrade = facts.downgrade.then(|| facts.tls.class().map_or("", |c| c.name())),
        reused = facts.reused.then_some(display("yes")),
        // Plain because the cache said so: no handshake was tried this time.
        cached = matches!(facts.tls, TlsOutcome::Plain(NoTls::Cached { .. })).then_some(display("yes")),
        requiretls,
        message_id,
        size,
        duration_ms,
        end = end.label(),
        reply_code,
        reply = %reply,
        earlier_failures = listed(&earlier, "; "),
        "transaction"
    );
}

/// What the certificate check found: `verified` as given, or the problem's class and words.
fn verdict(verification: &Verification, verified: &str) -> String {
    match verification {
        Verification::Verified => verified.to_string(),
        Verification::Failed(problem) => format!("{}: {problem}", problem.class()),
    }
}
