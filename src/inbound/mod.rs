//! The side toward the MTA: accepting connections and running each SMTP session.

pub mod listener;
pub mod registry;
pub mod session;

use crate::smtp::Reply;

/// A remote's reply as the MTA should hear it. A 421 or 221 from the remote closes the remote
/// connection, not the MTA's session, so the MTA gets a 451 4.4.2 that quotes it instead.
pub fn relayable(reply: &Reply) -> Reply {
    if reply.closes_connection() {
        return Reply::new(
            451,
            "4.4.2",
            format!("remote closed the connection: {reply}"),
        );
    }
    reply.clone()
}
