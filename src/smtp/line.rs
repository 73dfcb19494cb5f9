//! Reading CRLF-terminated lines with a length limit, from either side.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// What one call to [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// A whole line is in the buffer, without its line ending.
    Line,
    /// The line was longer than the limit; it was consumed and thrown away.
    TooLong,
    /// The peer closed the connection before a line ending (a partial line is discarded).
    Eof,
}

/// Reads one line, never holding more than `limit` bytes of it (the limit counts the CRLF,
/// as RFC 5321 4.5.3.1 does).
pub async fn read_line<R>(
    reader: &mut R,
    limit: usize,
    line: &mut Vec<u8>,
) -> std::io::Result<LineRead>
where
    R: AsyncBufRead + Unpin,
{
    line.clear();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(LineRead::Eof);
        }
        let (chunk, found_end) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let used = chunk.len();
        if !too_long {
            if line.len() + used > limit {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        reader.consume(used);
        if found_end {
            if too_long {
                return Ok(LineRead::TooLong);
            }
            strip_line_ending(line);
            return Ok(LineRead::Line);
        }
    }
}

fn strip_line_ending(line: &mut Vec<u8>) {
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    async fn lines(input: &[u8], limit: usize) -> Vec<(LineRead, Vec<u8>)> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            let mut line = Vec::new();
            let read = read_line(&mut reader, limit, &mut line).await.unwrap();
            let eof = read == LineRead::Eof;
            out.push((read, line));
            if eof {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn lines_are_split_across_small_reads_and_long_ones_are_refused() {
        let got = lines(b"EHLO a\r\n0123456789\r\nok\npartial", 8).await;
        assert_eq!(got[0], (LineRead::Line, b"EHLO a".to_vec()));
        assert_eq!(got[1].0, LineRead::TooLong);
        assert_eq!(got[2], (LineRead::Line, b"ok".to_vec()));
        assert_eq!(got[3].0, LineRead::Eof);
    }
}
