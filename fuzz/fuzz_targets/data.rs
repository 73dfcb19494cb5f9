//! `smtp::data::BodyFilter`, the DATA state machine, on any body cut into any chunks.
//!
//! Input: byte 0 picks the mode and limits, bytes 1..5 the chunk sizes (cycled), the rest
//! is what the MTA sends after the 354. Checked against an independent oracle:
//! - the end of data is found exactly where `<CRLF>.<CRLF>` first appears (the 354's line
//!   ending counts as the CRLF before a dot on the first line), whatever the chunking;
//! - the output (what the remote gets) is the same whatever the chunking, CRLF-only, and
//!   NUL-free, and no line of it starts with a single unstuffed dot, not even the last
//!   line of a body a limit cut short;
//! - within the limits, with clean input (no bare CR or LF, no NUL), the text is passed
//!   unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrouter::smtp::data::{BareLineEndings, BodyError, BodyFilter};

type Run = (Vec<u8>, Option<Result<(), BodyError>>, usize);

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (mode, pattern, body) = (data[0], &data[1..5], &data[5..]);
    let bare = if mode & 1 == 0 {
        BareLineEndings::Normalize
    } else {
        BareLineEndings::Reject
    };
    let line_limit = [1000, 10, 80, 3][usize::from(mode >> 1 & 3)];
    let size_limit = [1 << 20, 64, 300, 5][usize::from(mode >> 3 & 3)];
    let filter = || BodyFilter::new(bare, line_limit, size_limit);

    let whole = run(filter(), body, std::iter::repeat(usize::MAX));
    let bytewise = run(filter(), body, std::iter::repeat(1));
    let chunked = run(
        filter(),
        body,
        pattern.iter().map(|&b| usize::from(b % 64) + 1).cycle(),
    );
    assert_eq!(whole, bytewise, "byte by byte differs");
    assert_eq!(whole, chunked, "chunked differs");

    let (out, end, consumed) = &whole;
    // The oracle for the end.
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(body);
    match framed.windows(5).position(|w| w == b"\r\n.\r\n") {
        Some(p) => {
            assert!(end.is_some(), "missed the end at {p}");
            assert_eq!(*consumed, p + 3, "end found at the wrong place");
        }
        None => {
            assert!(end.is_none(), "an end of data where there is none");
            assert_eq!(*consumed, body.len());
        }
    }
    assert!(is_crlf_only(out), "bare CR or LF forwarded: {out:?}");
    // A remote that drops NULs would read `<CRLF>NUL.<CRLF>` as the end of data.
    assert!(!out.contains(&0), "NUL forwarded: {out:?}");
    // The last piece is a line still open, cut short when a limit failed the body: a limit
    // must not cut it between the stuffing dot and the dot.
    for line in out.split(|&b| b == b'\n') {
        assert!(
            !line.starts_with(b".") || line.starts_with(b".."),
            "unstuffed dot line forwarded: {out:?}"
        );
    }
    if let Some(Ok(())) = end {
        assert!(out.len() as u64 <= size_limit);
        for line in out.split(|&b| b == b'\n') {
            let text = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(
                text.len() + 2 <= line_limit,
                "line over the limit forwarded"
            );
        }
        let text = &body[..consumed - 3];
        if is_crlf_only(text) && !text.contains(&0) {
            assert_eq!(unstuffed(out), unstuffed(text), "clean text changed");
        }
    }
});

/// Feeds `body` in pieces of the given sizes until the end of data.
fn run(mut filter: BodyFilter, body: &[u8], sizes: impl Iterator<Item = usize>) -> Run {
    let mut out = Vec::new();
    let mut used = 0;
    for size in sizes {
        if used == body.len() {
            break;
        }
        let piece = &body[used..body.len().min(used.saturating_add(size))];
        let fed = filter.feed(piece, &mut out);
        assert!(fed.consumed <= piece.len());
        used += fed.consumed;
        if fed.end.is_some() {
            return (out, fed.end, used);
        }
        assert_eq!(fed.consumed, piece.len(), "stopped early without an end");
    }
    (out, None, used)
}

fn is_crlf_only(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        _ => true,
    })
}

/// The lines as the remote reads them: CRLF-split, one leading dot removed.
fn unstuffed(text: &[u8]) -> Vec<&[u8]> {
    text.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .map(|l| l.strip_prefix(b".").unwrap_or(l))
        .collect()
}
