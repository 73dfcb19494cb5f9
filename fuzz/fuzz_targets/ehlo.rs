//! `smtp::Capabilities::from_ehlo` on any EHLO reply a remote can send (any lines after the
//! greeting name; the reply parser has a target of its own): never panics, every keyword it
//! keeps came from a line, and a SIZE it reads came with the SIZE keyword.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrouter::smtp::{Capabilities, Reply};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<String> = text.split('\n').map(String::from).collect();
    let reply = Reply::multiline(250, lines);
    let caps = Capabilities::from_ehlo(&reply);
    assert!(caps.keywords.len() < reply.lines.len().max(1));
    if caps.size.is_some() {
        assert!(caps.keywords.iter().any(|k| k == "SIZE"));
    }
    assert_eq!(caps.starttls, caps.keywords.iter().any(|k| k == "STARTTLS"));
});
