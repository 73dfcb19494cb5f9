//! SMTP replies: parsing what a remote says and formatting what we say.

use std::fmt;

/// The longest text line of a reply of ours, after the code and its space: 512 octets
/// less "NNN " and CRLF.
const MAX_OWN_LINE: usize = 512 - 4 - 2;

/// One SMTP reply: a three-digit code and one or more text lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply with an enhanced status code (RFC 3463) in front of the text, kept within
    /// one reply line (RFC 5321 4.5.3.1.5: 512 octets with the code and CRLF): a longer
    /// text is cut, at a character, and ends in " ...".
    pub fn new(code: u16, enhanced: &str, text: impl fmt::Display) -> Reply {
        let mut line = format!("{enhanced} {text}");
        if line.len() > MAX_OWN_LINE {
            let cut = (0..=MAX_OWN_LINE - 4)
                .rev()
                .find(|&i| line.is_char_boundary(i))
                .unwrap_or(0);
            line.truncate(cut);
            line.push_str(" ...");
        }
        Reply {
            code,
            lines: vec![line],
        }
    }

    pub fn multiline(code: u16, lines: Vec<String>) -> Reply {
        Reply { code, lines }
    }

    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// 421 and 221 mean the server is closing the connection, whatever the command was.
    pub fn closes_connection(&self) -> bool {
        self.code == 421 || self.code == 221
    }

    /// The enhanced status code of the first line, if it has one.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let token = first.split(' ').next()?;
        let parts: Vec<&str> = token.split('.').collect();
        let well_formed = parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        well_formed.then_some(token)
    }

    /// The text on one line, for logs and for quoting in our own replies.
    pub fn one_line(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }

    /// The reply as it goes on the wire, CRLF-terminated.
    /// Written byte by byte: it is on the path of every reply to the MTA.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut digits = [0u8; 5];
        let code = decimal(self.code, &mut digits);
        let text: usize = self.lines.iter().map(|l| l.len()).sum();
        let mut out = Vec::with_capacity(text + self.lines.len().max(1) * (code.len() + 3));
        let last = self.lines.len().saturating_sub(1);
        if self.lines.is_empty() {
            out.extend_from_slice(code);
            out.extend_from_slice(b"\r\n");
        }
        for (i, line) in self.lines.iter().enumerate() {
            out.extend_from_slice(code);
            out.push(if i == last { b' ' } else { b'-' });
            // A reply text never carries a line break of its own. CR and LF are ASCII, so
            // replacing their bytes leaves every other character of the UTF-8 text whole.
            let start = out.len();
            out.extend_from_slice(line.as_bytes());
            for byte in &mut out[start..] {
                if *byte == b'\r' || *byte == b'\n' {
                    *byte = b' ';
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

/// `n` in decimal digits, in `buf`.
fn decimal(mut n: u16, buf: &mut [u8; 5]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

/// What a reply line parser makes of one line from a remote.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyLine {
    /// `250-...`: more lines follow.
    Continued(u16, String),
    /// `250 ...` or `250`: the last line.
    Last(u16, String),
}

/// Why a remote's reply could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplyError {
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("reply lines disagree on the code ({0} then {1})")]
    CodeChanged(u16, u16),
    #[error("reply has more than {0} lines")]
    TooManyLines(usize),
}

/// Parses one reply line (without its CRLF).
pub fn parse_reply_line(line: &[u8]) -> Result<ReplyLine, ReplyError> {
    let text = String::from_utf8_lossy(line);
    let malformed = || ReplyError::Malformed(text.chars().take(80).collect());
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    let code: u16 = text[..3].parse().map_err(|_| malformed())?;
    if !(200..600).contains(&code) {
        return Err(malformed());
    }
    match line.get(3) {
        None => Ok(ReplyLine::Last(code, String::new())),
        Some(b' ') => Ok(ReplyLine::Last(code, text[4..].to_string())),
        Some(b'-') => Ok(ReplyLine::Continued(code, text[4..].to_string())),
        Some(_) => Err(malformed()),
    }
}

/// Accumulates reply lines until the reply is complete.
#[derive(Default)]
pub struct ReplyBuilder {
    code: Option<u16>,
    lines: Vec<String>,
}

/// Replies longer than this are a misbehaving server, not a capability list.
pub const MAX_REPLY_LINES: usize = 100;

impl ReplyBuilder {
    /// Adds one line; returns the reply when it was the last one.
    pub fn push(&mut self, line: &[u8]) -> Result<Option<Reply>, ReplyError> {
        let parsed = parse_reply_line(line)?;
        let (code, text, last) = match parsed {
            ReplyLine::Continued(c, t) => (c, t, false),
            ReplyLine::Last(c, t) => (c, t, true),
        };
        if let Some(previous) = self.code
            && previous != code
        {
            return Err(ReplyError::CodeChanged(previous, code));
        }
        self.code = Some(code);
        self.lines.push(text);
        if self.lines.len() > MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines(MAX_REPLY_LINES));
        }
        if last {
            let lines = std::mem::take(&mut self.lines);
            self.code = None;
            return Ok(Some(Reply { code, lines }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_of_ours_fits_one_line_whatever_its_text() {
        let long = "é".repeat(600);
        let reply = Reply::new(451, "4.7.5", &long);
        let wire = reply.to_wire();
        assert!(wire.len() <= 512, "{} octets", wire.len());
        assert!(reply.lines[0].ends_with(" ..."));
        assert_eq!(reply.enhanced(), Some("4.7.5"));
        assert_eq!(Reply::new(250, "2.0.0", "ok").lines, ["2.0.0 ok"]);
    }

    fn parse_all(lines: &[&str]) -> Result<Option<Reply>, ReplyError> {
        let mut builder = ReplyBuilder::default();
        let mut result = None;
        for line in lines {
            result = builder.push(line.as_bytes())?;
        }
        Ok(result)
    }

    #[test]
    fn multiline_ehlo_reply_is_collected_until_the_last_line() {
        let reply = parse_all(&["250-mx.example", "250-STARTTLS", "250 SIZE 1000"])
            .unwrap()
            .unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(reply.lines, vec!["mx.example", "STARTTLS", "SIZE 1000"]);
    }

    #[test]
    fn malformed_and_inconsistent_lines_are_errors() {
        assert!(parse_all(&["25O ok"]).is_err());
        assert!(parse_all(&["250x"]).is_err());
        assert!(parse_all(&["199 too low"]).is_err());
        assert_eq!(
            parse_all(&["250-a", "550 b"]),
            Err(ReplyError::CodeChanged(250, 550))
        );
        assert_eq!(parse_all(&["250"]).unwrap().unwrap().lines, vec![""]);
    }

    #[test]
    fn enhanced_code_is_read_only_when_well_formed() {
        assert_eq!(Reply::new(451, "4.7.5", "x").enhanced(), Some("4.7.5"));
        let plain = Reply::multiline(250, vec!["mx.example".into()]);
        assert_eq!(plain.enhanced(), None);
    }

    #[test]
    fn wire_format_uses_dash_on_all_but_the_last_line_and_strips_line_breaks() {
        let reply = Reply::multiline(250, vec!["a".into(), "b\r\nc".into()]);
        assert_eq!(reply.to_wire(), b"250-a\r\n250 b  c\r\n");
        assert_eq!(Reply::multiline(354, vec![]).to_wire(), b"354\r\n");
        let text = Reply::new(550, "5.1.1", "Empfänger\r\nunbekannt");
        assert_eq!(
            text.to_wire(),
            "550 5.1.1 Empfänger  unbekannt\r\n".as_bytes()
        );
    }
}
