//! `smtp::Capabilities::from_ehlo` on any EHLO reply a remote can send (read with the
//! reply parser delivery uses): never panics, and a SIZE it reads came from the reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrouter::smtp::Capabilities;
use tlsrouter::smtp::reply::ReplyBuilder;

fuzz_target!(|data: &[u8]| {
    let mut builder = ReplyBuilder::default();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match builder.push(line) {
            Ok(Some(reply)) => {
                let caps = Capabilities::from_ehlo(&reply);
                assert!(caps.keywords.len() < reply.lines.len().max(1));
                if caps.size.is_some() {
                    assert!(caps.keywords.iter().any(|k| k == "SIZE"));
                }
            }
            Ok(None) => {}
            Err(_) => builder = ReplyBuilder::default(),
        }
    }
});
