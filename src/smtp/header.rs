//! The header block at the start of a message text (RFC 5322 2.2): where it ends, a
//! field's value unfolded, and the Message-ID as the text streams past.

/// The most of a text's start kept to find its Message-ID; a longer header block is not
/// searched further.
const MESSAGE_ID_SCAN: usize = 64 * 1024;

/// The longest Message-ID the log line shows; a longer one is cut, and says so.
const MESSAGE_ID_SHOWN: usize = 256;

/// Where the header block ends in `text` (after its empty line), if it does.
pub fn header_end(text: &[u8]) -> Option<usize> {
    if text.starts_with(b"\r\n") {
        return Some(2);
    }
    memchr::memmem::find(text, b"\r\n\r\n").map(|at| at + 4)
}

/// The value of the first field `name` (any case) in the header block at the start of
/// `text`, unfolded and trimmed.
pub fn field(text: &[u8], name: &str) -> Option<String> {
    let block = &text[..header_end(text).unwrap_or(text.len())];
    let block = String::from_utf8_lossy(block);
    // Unfolded: a line that starts with white space continues the field before it.
    let unfolded = block.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded.split("\r\n").find_map(|line| {
        let (field, value) = line.split_once(':')?;
        (field.trim_end().eq_ignore_ascii_case(name)).then(|| value.trim().to_string())
    })
}

/// Finds the Message-ID in a text fed to it in pieces, keeping only its start.
#[derive(Debug, Default)]
pub struct MessageIdScan {
    head: Vec<u8>,
    found: Option<Option<String>>,
}

impl MessageIdScan {
    /// The next piece of the text.
    pub fn see(&mut self, piece: &[u8]) {
        if self.found.is_some() {
            return;
        }
        let take = piece.len().min(MESSAGE_ID_SCAN - self.head.len());
        self.head.extend_from_slice(&piece[..take]);
        if header_end(&self.head).is_some() || self.head.len() == MESSAGE_ID_SCAN {
            self.found = Some(self.field());
            self.head = Vec::new();
        }
    }

    /// The Message-ID as the MTA sent it, if the text had one in its header block.
    pub fn message_id(&self) -> Option<String> {
        match &self.found {
            Some(found) => found.clone(),
            // The text ended within its header block.
            None => self.field(),
        }
    }

    fn field(&self) -> Option<String> {
        let mut id = field(&self.head, "Message-ID").filter(|id| !id.is_empty())?;
        if id.len() > MESSAGE_ID_SHOWN {
            let mut cut = MESSAGE_ID_SHOWN;
            while !id.is_char_boundary(cut) {
                cut -= 1;
            }
            id.truncate(cut);
            id.push_str("...");
        }
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_is_found_in_any_case_folded_or_not_and_only_in_the_header_block() {
        let get = |text: &str| field(text.as_bytes(), "TLS-Required");
        assert_eq!(
            get("Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n").as_deref(),
            Some("No")
        );
        assert_eq!(get("tls-required:no\r\n\r\n").as_deref(), Some("no"));
        assert_eq!(
            get("TLS-Required:\r\n  No\r\nSubject: x\r\n\r\n").as_deref(),
            Some("No")
        );
        assert_eq!(get("X-TLS-Required: No\r\n\r\n"), None);
        assert_eq!(get("Subject: x\r\n\r\nTLS-Required: No\r\n"), None);
        assert_eq!(get("\r\nTLS-Required: No\r\n"), None);
    }

    #[test]
    fn the_message_id_is_found_however_the_text_is_cut_into_pieces() {
        let text = b"From: a@b.test\r\nMessage-ID:\r\n <1.2@b.test>\r\nSubject: s\r\n\r\nMessage-ID: <no>\r\n";
        for size in 1..text.len() {
            let mut scan = MessageIdScan::default();
            text.chunks(size).for_each(|piece| scan.see(piece));
            assert_eq!(
                scan.message_id().as_deref(),
                Some("<1.2@b.test>"),
                "pieces of {size}"
            );
        }
    }

    #[test]
    fn a_text_without_one_or_ending_in_its_header_block_is_told_apart() {
        let mut scan = MessageIdScan::default();
        scan.see(b"Subject: s\r\n\r\nMessage-ID: <in the body>\r\n");
        assert_eq!(scan.message_id(), None);
        let mut scan = MessageIdScan::default();
        scan.see(b"Message-ID: <only@header.test>\r\n");
        assert_eq!(scan.message_id().as_deref(), Some("<only@header.test>"));
    }

    #[test]
    fn a_huge_message_id_is_cut_and_the_scan_keeps_no_more_than_its_limit() {
        let mut scan = MessageIdScan::default();
        scan.see(format!("Message-ID: <{}>\r\n\r\n", "x".repeat(1000)).as_bytes());
        let id = scan.message_id().unwrap();
        assert_eq!(id.len(), MESSAGE_ID_SHOWN + 3);
        assert!(id.ends_with("..."));
        let mut scan = MessageIdScan::default();
        scan.see(&vec![b'a'; MESSAGE_ID_SCAN * 2]);
        assert_eq!(scan.message_id(), None);
        assert!(scan.head.is_empty(), "nothing kept once given up");
    }
}
