//! `smtp::reply::ReplyBuilder` on any sequence of lines from a remote: never panics, every
//! complete reply is in range, and what the MTA is told about it (`inbound::relayable`)
//! is a well-formed reply that reads back as exactly one reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrouter::smtp::Reply;
use tlsrouter::smtp::reply::{MAX_REPLY_LINES, ReplyBuilder};

fuzz_target!(|data: &[u8]| {
    let mut builder = ReplyBuilder::default();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match builder.push(line) {
            Ok(Some(reply)) => check(&reply),
            Ok(None) => {}
            // The proxy drops a connection whose replies it cannot read; start afresh.
            Err(_) => builder = ReplyBuilder::default(),
        }
    }
});

fn check(reply: &Reply) {
    assert!((200..600).contains(&reply.code), "{reply:?}");
    assert!(!reply.lines.is_empty() && reply.lines.len() <= MAX_REPLY_LINES);
    let _ = (reply.enhanced(), reply.one_line());
    let relayed = tlsrouter::outbound::upstream::relayable(reply);
    if reply.closes_connection() {
        assert_eq!(
            relayed.code, 451,
            "a remote 421/221 is never passed on as it is"
        );
    } else {
        assert_eq!(relayed.code, reply.code);
    }
    // Read back what the MTA gets, line by line, as the MTA would.
    let wire = relayed.to_wire();
    assert!(wire.ends_with(b"\r\n"));
    let mut again = ReplyBuilder::default();
    let lines: Vec<&[u8]> = wire[..wire.len() - 2].split(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(!line.contains(&b'\r'), "bare CR in {wire:?}");
        let read = again.push(line).expect("our own reply reads back");
        assert_eq!(
            read.is_some(),
            i == lines.len() - 1,
            "one reply, ending at its last line"
        );
        if let Some(read) = read {
            assert_eq!(read.code, relayed.code);
            assert_eq!(read.lines.len(), relayed.lines.len());
        }
    }
}
