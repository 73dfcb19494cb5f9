//! The message body between DATA's 354 and the final dot, as a streaming filter.
//!
//! The filter reads what the MTA sends and writes what the remote gets. It ends the body only
//! at `<CRLF>.<CRLF>`, undoes the MTA's dot-stuffing and redoes its own, and never passes a
//! bare CR or LF on as it came: those are the raw material of SMTP smuggling, where a remote
//! that reads line endings differently would see a second message inside the first.

use crate::smtp::header::MessageIdScan;

/// What to do with a bare CR or LF (or a NUL) inside the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BareLineEndings {
    /// A bare LF becomes CRLF, a bare CR a space, a NUL is dropped.
    Normalize,
    /// The message is refused.
    Reject,
}

/// Why a body was refused; known only once its end has been read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyError {
    LineTooLong { limit: usize },
    TooLarge { limit: u64 },
    BareLineEnding,
}

impl BodyError {
    pub fn reply(&self) -> crate::smtp::reply::Reply {
        use crate::smtp::reply::Reply;
        match self {
            BodyError::LineTooLong { limit } => Reply::new(
                500,
                "5.5.2",
                format!("message has a line longer than {limit} octets"),
            ),
            BodyError::TooLarge { limit } => Reply::new(
                552,
                "5.3.4",
                format!("message larger than the limit of {limit} octets"),
            ),
            BodyError::BareLineEnding => Reply::new(
                550,
                "5.5.2",
                "message has a bare CR or LF, or a NUL (not allowed by RFC 5321 2.3.8)",
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Just after a CRLF (or at the start): a dot here is special.
    LineStart,
    /// A dot at the start of a line.
    Dot,
    /// A dot at the start of a line and then CR.
    DotCr,
    /// Inside a line.
    Text,
    /// A CR inside a line, not yet known to be followed by LF.
    Cr,
    Done,
}

/// Result of one [`BodyFilter::feed`] call.
#[derive(Debug, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of the input used; the rest belongs to whatever follows the body.
    pub consumed: usize,
    /// Set once `<CRLF>.<CRLF>` has been read.
    pub end: Option<Result<(), BodyError>>,
}

pub struct BodyFilter {
    state: State,
    bare: BareLineEndings,
    line_limit: usize,
    size_limit: u64,
    /// Length of the output line so far (without CRLF).
    out_line: usize,
    out_size: u64,
    error: Option<BodyError>,
    /// The Message-ID, from the text as it goes out.
    message_id: MessageIdScan,
}

impl BodyFilter {
    /// `line_limit` counts the CRLF, as RFC 5321 does (1000).
    pub fn new(bare: BareLineEndings, line_limit: usize, size_limit: u64) -> BodyFilter {
        BodyFilter {
            state: State::LineStart,
            bare,
            line_limit,
            size_limit,
            out_line: 0,
            out_size: 0,
            error: None,
            message_id: MessageIdScan::default(),
        }
    }

    /// Octets of the body written so far, dot-stuffing included.
    pub fn size(&self) -> u64 {
        self.out_size
    }

    /// The message's Message-ID as the MTA sent it, from the text read so far.
    pub fn message_id(&self) -> Option<String> {
        self.message_id.message_id()
    }

    /// Filters `input` into `out`. After an error nothing more is written, but the input is
    /// still read up to the end of the body, so that the session stays in step.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Fed {
        let start = out.len();
        let fed = self.filter(input, out);
        self.message_id.see(&out[start..]);
        fed
    }

    fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> Fed {
        let mut i = 0;
        // Set once clean_lines found a bare CR or a NUL ahead: byte by byte from there on.
        let mut careful = false;
        while i < input.len() {
            if !careful {
                match self.clean_lines(&input[i..]) {
                    Some(0) => {}
                    Some(lines) => {
                        self.write(&input[i..i + lines], out);
                        i += lines;
                        continue;
                    }
                    None => careful = true,
                }
            }
            let plain = self.plain_run(&input[i..]);
            if plain > 0 {
                self.pass(&input[i..i + plain], out);
                i += plain;
                continue;
            }
            self.step(input[i], out);
            i += 1;
            if self.state == State::Done {
                let end = match self.error {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
                return Fed {
                    consumed: i,
                    end: Some(end),
                };
            }
        }
        Fed {
            consumed: input.len(),
            end: None,
        }
    }

    /// Whether the next byte starts a line (and nothing has failed the text): where whole
    /// clean lines can pass.
    pub fn at_line_start(&self) -> bool {
        self.state == State::LineStart && self.error.is_none()
    }

    /// The whole clean lines at the start of `input` (see `clean_lines`), when they are at
    /// least `at_least` bytes: counted as written, not copied, for the caller to send as
    /// they are. 0, and nothing counted, when there are fewer.
    pub fn pass_clean(&mut self, input: &[u8], at_least: usize) -> usize {
        if input.len() < at_least {
            return 0;
        }
        let clean = self.clean_lines(input).unwrap_or(0);
        if clean == 0 || clean < at_least {
            return 0;
        }
        self.out_size += clean as u64;
        self.message_id.see(&input[..clean]);
        clean
    }

    /// How many bytes at the start of `input` are whole lines that pass as they are, all
    /// at once: from the start of a line, each ending in CRLF, none starting with a dot,
    /// none holding another CR or a NUL, within the limits. What this takes, `step` would
    /// have written unchanged; it is only faster, finding line ends a block at a time.
    /// `None` when one of those lines holds a bare CR or a NUL.
    fn clean_lines(&self, input: &[u8]) -> Option<usize> {
        if self.state != State::LineStart || self.error.is_some() {
            return Some(0);
        }
        let room =
            usize::try_from(self.size_limit.saturating_sub(self.out_size)).unwrap_or(usize::MAX);
        let (mut end, mut lines) = (0, 0);
        for lf in memchr::memchr_iter(b'\n', input) {
            let line = &input[end..=lf];
            let clean = line.len() >= 2
                && line[line.len() - 2] == b'\r'
                && line[0] != b'.'
                && line.len() <= self.line_limit
                && lf < room;
            if !clean {
                break;
            }
            end = lf + 1;
            lines += 1;
        }
        // Each of those lines has the CR of its CRLF: any other CR is a bare one.
        let span = &input[..end];
        let bare = memchr::memchr_iter(b'\r', span).count() != lines;
        if bare || memchr::memchr(0, span).is_some() {
            return None;
        }
        Some(end)
    }

    /// How many bytes at the start of `input` can pass as they are, all at once: inside a
    /// line already begun (a dot at its start needs stuffing), up to the next CR, LF or
    /// NUL, when they stay within the limits. What this takes, byte by byte `step` would
    /// have written unchanged; it is only faster.
    fn plain_run(&self, input: &[u8]) -> usize {
        if self.state != State::Text || self.out_line == 0 || self.error.is_some() {
            return 0;
        }
        let run = memchr::memchr3(b'\r', b'\n', 0, input).unwrap_or(input.len());
        let fits = self.out_line + run + 2 <= self.line_limit
            && self.out_size + run as u64 <= self.size_limit;
        if fits { run } else { 0 }
    }

    fn pass(&mut self, run: &[u8], out: &mut Vec<u8>) {
        self.out_line += run.len();
        self.out_size += run.len() as u64;
        out.extend_from_slice(run);
    }

    fn step(&mut self, byte: u8, out: &mut Vec<u8>) {
        self.state = match (self.state, byte) {
            (State::LineStart, b'.') => State::Dot,
            (State::Dot, b'\r') => State::DotCr,
            (State::DotCr, b'\n') => State::Done,
            // A dot followed by anything else was the MTA's stuffing: drop it.
            (State::Dot, _) => self.text(byte, out),
            (State::DotCr, _) => {
                self.stray_cr(out);
                self.text(byte, out)
            }
            (State::LineStart | State::Text, _) => self.text(byte, out),
            (State::Cr, b'\n') => {
                self.end_line(out);
                State::LineStart
            }
            (State::Cr, _) => {
                self.stray_cr(out);
                self.text(byte, out)
            }
            (State::Done, _) => State::Done,
        };
    }

    /// One byte inside a line (CR and LF included, as they come).
    fn text(&mut self, byte: u8, out: &mut Vec<u8>) -> State {
        match byte {
            b'\r' => State::Cr,
            b'\n' => {
                // A bare LF: a line break for the remote, but not the start of a line
                // where a dot could end the message.
                if self.normalises_bare() {
                    self.end_line(out);
                }
                State::Text
            }
            // A remote that drops NULs would see `<CRLF>.<CRLF>` in `<CRLF>NUL.<CRLF>`.
            0 => {
                self.normalises_bare();
                State::Text
            }
            // The stuffing dot and the dot go out in one piece, so that a limit can never
            // cut the line between them and leave a lone `.` behind.
            b'.' if self.out_line == 0 => {
                self.emit(b"..", out);
                State::Text
            }
            _ => {
                self.emit(&[byte], out);
                State::Text
            }
        }
    }

    fn stray_cr(&mut self, out: &mut Vec<u8>) {
        if self.normalises_bare() {
            self.emit(b" ", out);
        }
    }

    /// Records a bare line ending; true when it is normalised, false when it fails the body.
    fn normalises_bare(&mut self) -> bool {
        if self.bare == BareLineEndings::Reject {
            self.fail(BodyError::BareLineEnding);
            return false;
        }
        true
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        self.write(b"\r\n", out);
        self.out_line = 0;
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.out_line += bytes.len();
        if self.out_line + 2 > self.line_limit {
            self.fail(BodyError::LineTooLong {
                limit: self.line_limit,
            });
        }
        self.write(bytes, out);
    }

    fn write(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.out_size += bytes.len() as u64;
        if self.out_size > self.size_limit {
            self.fail(BodyError::TooLarge {
                limit: self.size_limit,
            });
        }
        if self.error.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    fn fail(&mut self, error: BodyError) {
        self.error.get_or_insert(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Run = (Vec<u8>, Option<Result<(), BodyError>>, usize);

    /// Runs `f` over `input` cut into pieces of `chunk` bytes.
    fn run(f: &mut BodyFilter, input: &[u8], chunk: usize) -> Run {
        let mut out = Vec::new();
        let mut used = 0;
        for piece in input.chunks(chunk) {
            let fed = f.feed(piece, &mut out);
            used += fed.consumed;
            if fed.end.is_some() {
                return (out, fed.end, used);
            }
        }
        (out, None, used)
    }

    /// The filter with the usual limits over `input` cut into pieces of `chunk` bytes.
    fn filter(input: &[u8], chunk: usize, bare: BareLineEndings) -> Run {
        run(&mut BodyFilter::new(bare, 1000, 1 << 20), input, chunk)
    }

    fn normalize(input: &[u8]) -> Run {
        filter(input, 7, BareLineEndings::Normalize)
    }

    #[test]
    fn a_stuffed_body_passes_through_unchanged_and_ends_at_the_dot() {
        let body = b"Subject: x\r\n\r\n..leading dot\r\nend\r\n.\r\nMAIL FROM:<next>\r\n";
        let (out, end, used) = normalize(body);
        assert_eq!(out, b"Subject: x\r\n\r\n..leading dot\r\nend\r\n");
        assert_eq!(end, Some(Ok(())));
        assert_eq!(&body[used..], b"MAIL FROM:<next>\r\n");
    }

    #[test]
    fn an_empty_body_ends_at_once() {
        let (out, end, used) = normalize(b".\r\n");
        assert!(out.is_empty());
        assert_eq!((end, used), (Some(Ok(())), 3));
    }

    #[test]
    fn bare_line_endings_never_end_the_message_and_are_normalised() {
        for seq in [
            &b"\n.\n"[..],
            b"\n.\r",
            b"\r.\n",
            b"\r.\r",
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n\x00.\r\n",
            b"\r\n.\n",
            b"\r\n.\r",
            b"\r\n.\r\r\n",
            b"\r\r\n.\r\r\n",
        ] {
            let mut body = b"a".to_vec();
            body.extend_from_slice(seq);
            body.extend_from_slice(b"MAIL FROM:<x@y>\r\n.\r\n");
            let (out, end, used) = normalize(&body);
            assert_eq!(end, Some(Ok(())), "{seq:?}");
            assert_eq!(used, body.len(), "{seq:?} ended early");
            assert_crlf_only_and_stuffed(&out);
        }
    }

    #[test]
    fn reject_mode_refuses_bare_line_endings_but_reads_to_the_end() {
        let body = b"a\nb\r\n.\r\n";
        let (out, end, used) = filter(body, 3, BareLineEndings::Reject);
        assert_eq!(end, Some(Err(BodyError::BareLineEnding)));
        assert_eq!(used, body.len());
        assert!(
            !out.windows(2).any(|w| w == b"b\r"),
            "nothing after the error"
        );
    }

    #[test]
    fn long_lines_and_large_bodies_are_refused_at_the_end() {
        let mut f = BodyFilter::new(BareLineEndings::Normalize, 10, 1 << 20);
        let mut out = Vec::new();
        let fed = f.feed(b"0123456789\r\n.\r\n", &mut out);
        assert_eq!(fed.end, Some(Err(BodyError::LineTooLong { limit: 10 })));

        let mut f = BodyFilter::new(BareLineEndings::Normalize, 1000, 5);
        let fed = f.feed(b"012\r\n345\r\n.\r\n", &mut out);
        assert_eq!(fed.end, Some(Err(BodyError::TooLarge { limit: 5 })));
    }

    #[test]
    fn a_dot_that_starts_a_line_after_a_bare_lf_or_a_dropped_nul_is_stuffed() {
        for chunk in [1, 3, 64] {
            let body = b"long text line\n.after a bare LF\r\n\0.after a NUL\r\n.\r\n";
            let (out, end, _) = filter(body, chunk, BareLineEndings::Normalize);
            assert_eq!(
                out, b"long text line\r\n..after a bare LF\r\n..after a NUL\r\n",
                "chunk {chunk}"
            );
            assert_eq!(end, Some(Ok(())));
        }
    }

    #[test]
    fn a_limit_never_cuts_a_stuffed_line_after_its_stuffing_dot() {
        // (line limit, size limit): each allows "a\r\n" and one more byte, not two.
        for (line_limit, size_limit) in [(3, 1 << 20), (1000, 4)] {
            let mut f = BodyFilter::new(BareLineEndings::Normalize, line_limit, size_limit);
            let mut out = Vec::new();
            let fed = f.feed(b"a\r\n..x\r\n.\r\n", &mut out);
            assert!(matches!(fed.end, Some(Err(_))), "{line_limit} {size_limit}");
            assert_eq!(out, b"a\r\n", "no lone stuffing dot is written");
        }
    }

    fn assert_crlf_only_and_stuffed(out: &[u8]) {
        for (i, &b) in out.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && out[i - 1] == b'\r', "bare LF in {out:?}");
            }
            if b == b'\r' {
                assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR in {out:?}");
            }
        }
        for line in out.split(|&b| b == b'\n') {
            assert_ne!(line, b".\r", "unstuffed dot line in {out:?}");
        }
        assert!(!out.contains(&0), "NUL in {out:?}");
    }

    #[test]
    fn whole_clean_lines_pass_in_one_piece_as_byte_by_byte() {
        let body = b"Subject: x\r\n\r\nline one\r\n..dot\r\nbare\rcr\r\nnul\0\r\nlast\r\n.\r\n";
        for bare in [BareLineEndings::Normalize, BareLineEndings::Reject] {
            for (line_limit, size_limit) in [(1000, 1 << 20), (12, 1 << 20), (1000, 30)] {
                let pieces = |chunk| {
                    let mut f = BodyFilter::new(bare, line_limit, size_limit);
                    (run(&mut f, body, chunk), f.size())
                };
                let case = format!("{bare:?}, lines {line_limit}, size {size_limit}");
                assert_eq!(pieces(body.len()), pieces(1), "{case}");
                assert_eq!(pieces(body.len()), pieces(9), "{case}");
            }
        }
    }

    #[test]
    fn any_input_gives_crlf_only_stuffed_output_in_any_chunking() {
        // A small exhaustive check over an alphabet that holds every special byte.
        let alphabet = [b'.', b'\r', b'\n', b'a', 0];
        let mut input = Vec::new();
        for n in 0..5usize.pow(7) {
            input.clear();
            let mut k = n;
            for _ in 0..7 {
                input.push(alphabet[k % 5]);
                k /= 5;
            }
            input.extend_from_slice(b"\r\n.\r\n");
            let whole = filter(&input, input.len(), BareLineEndings::Normalize);
            assert_crlf_only_and_stuffed(&whole.0);
            assert_eq!(whole, filter(&input, 1, BareLineEndings::Normalize));
            assert_eq!(whole, normalize(&input));
        }
    }
}
