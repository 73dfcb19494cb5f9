//! A small SMTP client for talking to the proxy the way an MTA does.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The enhanced status code of the first line, e.g. "4.7.5".
    pub fn enhanced(&self) -> Option<String> {
        let first = self.lines.first()?.split(' ').next()?;
        let parts: Vec<&str> = first.split('.').collect();
        (parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
        .then(|| first.to_string())
    }
}

pub struct SmtpClient {
    io: BufReader<TcpStream>,
}

/// Generous: a reply slower than this is a hung test, not a slow machine.
const REPLY_WAIT: Duration = Duration::from_secs(30);

impl SmtpClient {
    pub async fn connect(addr: SocketAddr) -> (SmtpClient, Reply) {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        let mut client = SmtpClient {
            io: BufReader::new(stream),
        };
        let greeting = client.read_reply().await;
        (client, greeting)
    }

    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        self.read_reply().await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io
            .get_mut()
            .write_all(bytes)
            .await
            .expect("send to the proxy");
    }

    /// DATA, then (on 354) `body` (dot-stuffed, CRLF-terminated) and `.<CRLF>`; returns the
    /// final reply, or DATA's own reply when it was not 354.
    pub async fn data(&mut self, body: &[u8]) -> Reply {
        let start = self.cmd("DATA").await;
        if start.code != 354 {
            return start;
        }
        self.send_raw(body).await;
        self.send_raw(b".\r\n").await;
        self.read_reply().await
    }

    pub async fn read_reply(&mut self) -> Reply {
        self.try_read_reply()
            .await
            .expect("the proxy closed the connection instead of replying")
    }

    /// `None` when the connection is closed.
    pub async fn try_read_reply(&mut self) -> Option<Reply> {
        let read = async {
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                if self.io.read_line(&mut line).await.ok()? == 0 {
                    return None;
                }
                let line = line.trim_end_matches(['\r', '\n']);
                let code: u16 = line.get(..3)?.parse().ok()?;
                lines.push(line.get(4..).unwrap_or("").to_string());
                if line.as_bytes().get(3) != Some(&b'-') {
                    return Some(Reply { code, lines });
                }
            }
        };
        tokio::time::timeout(REPLY_WAIT, read)
            .await
            .expect("no reply within 30 s")
    }
}
