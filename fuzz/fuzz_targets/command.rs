//! `smtp::parse_command` on any line: never panics, every error has a well-formed reply,
//! and what the proxy would send a remote for MAIL and RCPT parses back to the same command
//! (a forwarded address means to the remote what it meant to us), without a control
//! character or a Unicode line separator in it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrouter::smtp::{Capabilities, Command, parse_command};

fuzz_target!(|line: &[u8]| {
    let command = match parse_command(line) {
        Ok(command) => command,
        Err(error) => {
            let wire = error.reply().to_wire();
            assert!(wire.ends_with(b"\r\n") && (b'4'..=b'5').contains(&wire[0]));
            return;
        }
    };
    // Every parameter the proxy knows, as a remote that supports them all would get them.
    let everything = Capabilities {
        size: Some(0),
        eight_bit_mime: true,
        smtputf8: true,
        dsn: true,
        ..Capabilities::default()
    };
    let forwarded = match &command {
        Command::Mail(sender, params) => format!(
            "MAIL FROM:<{}>{}",
            sender.as_ref().map(ToString::to_string).unwrap_or_default(),
            params
                .to_wire(&everything)
                .expect("a remote with every extension takes every message")
        ),
        Command::Rcpt(recipient, params) => {
            format!("RCPT TO:<{recipient}>{}", params.to_wire(&everything))
        }
        _ => return,
    };
    assert_eq!(
        parse_command(forwarded.as_bytes()).as_ref(),
        Ok(&command),
        "{forwarded:?} does not parse back"
    );
    // A control character in an address would reach the remote inside a command line,
    // where a bare CR (or NEL, or U+2028, for a Unicode-minded server) can end the line
    // for a lenient server (command injection).
    let address = match &command {
        Command::Mail(Some(m), _) | Command::Rcpt(m, _) => m.to_string(),
        _ => String::new(),
    };
    assert!(
        !address
            .chars()
            .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}'),
        "control character forwarded: {forwarded:?}"
    );
});
