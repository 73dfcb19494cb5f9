//! What a remote's EHLO reply says it can do.

use crate::smtp::reply::Reply;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub starttls: bool,
    pub pipelining: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// DSN (RFC 3461): RET, ENVID, NOTIFY and ORCPT may be sent.
    pub dsn: bool,
    /// REQUIRETLS (RFC 8689): a message that demands verified TLS may be passed on.
    pub requiretls: bool,
    /// `Some(0)` means SIZE without a limit.
    pub size: Option<u64>,
    pub auth: Vec<String>,
    /// Every keyword as advertised, for logs and `probe`.
    pub keywords: Vec<String>,
}

impl Capabilities {
    /// Reads the lines after the first (which is the server's greeting name).
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "STARTTLS" => caps.starttls = true,
                "PIPELINING" => caps.pipelining = true,
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "REQUIRETLS" => caps.requiretls = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "AUTH" => caps.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
            caps.keywords.push(keyword);
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ehlo_keywords_are_read_case_insensitively() {
        let reply = Reply::multiline(
            250,
            [
                "mx.example",
                "starttls",
                "SIZE 1000",
                "AUTH plain LOGIN",
                "8BITMIME",
            ]
            .map(String::from)
            .to_vec(),
        );
        let caps = Capabilities::from_ehlo(&reply);
        assert!(caps.starttls && caps.eight_bit_mime && !caps.smtputf8);
        assert_eq!(caps.size, Some(1000));
        assert_eq!(caps.auth, vec!["PLAIN", "LOGIN"]);
    }
}
