//! The MTA side of a test: one message sent through the proxy in its own session, what
//! the MTA was told, and the assertions on it that many topics share.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::daemon::replace_file;
use super::lab::{Lab, LabBuilder};
use super::pki::{TestCa, Validity};
use super::smtp_client::{Reply, SmtpClient};

/// Dot-stuffed and CRLF-terminated, as an MTA sends it; the servers must see exactly this.
pub const BODY: &[u8] = b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\n\
..a line that starts with a dot\r\nbye\r\n";

/// What the MTA was told for one message.
pub struct Sent {
    pub mail: Reply,
    pub rcpts: Vec<Reply>,
    pub data: Reply,
}

/// What the MTA was told in the end for a recipient: its RCPT reply when that was not a
/// 250, else the reply to the message (a recipient taken at RCPT, or one held for the
/// message's `TLS-Required` header, gets its verdict there).
pub fn verdict<'a>(rcpt: &'a Reply, message: &'a Reply) -> &'a Reply {
    match rcpt.code {
        250 => message,
        _ => rcpt,
    }
}

/// One message of [`BODY`] from `a@sender.test`.
pub async fn send(proxy: SocketAddr, rcpts: &[&str]) -> Sent {
    send_from(proxy, "a@sender.test", rcpts).await
}

/// One message in its own session: MAIL, each RCPT, DATA (the final reply, or DATA's own
/// when there was nothing to send), QUIT.
pub async fn send_from(proxy: SocketAddr, sender: &str, rcpts: &[&str]) -> Sent {
    let (mail, rcpts, data) = send_message(proxy, sender, rcpts, BODY).await;
    Sent { mail, rcpts, data }
}

/// One message with this body from `a@sender.test`; the replies to MAIL, each RCPT, and
/// DATA's final reply.
pub async fn send_body(
    proxy: SocketAddr,
    rcpts: &[&str],
    body: &[u8],
) -> (Reply, Vec<Reply>, Reply) {
    send_message(proxy, "a@sender.test", rcpts, body).await
}

/// One message with this body in its own session; the replies to MAIL, each RCPT, and
/// DATA's final reply.
pub async fn send_message(
    proxy: SocketAddr,
    sender: &str,
    rcpts: &[&str],
    body: &[u8],
) -> (Reply, Vec<Reply>, Reply) {
    let (mut client, greeting) = SmtpClient::connect(proxy).await;
    assert_eq!(greeting.code, 220, "{greeting:?}");
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    let mail = client.cmd(&format!("MAIL FROM:<{sender}>")).await;
    let mut replies = Vec::new();
    for rcpt in rcpts {
        replies.push(client.cmd(&format!("RCPT TO:<{rcpt}>")).await);
    }
    let data = client.data(body).await;
    let _ = client.cmd("QUIT").await;
    (mail, replies, data)
}

/// One transaction of [`BODY`] on an open session: MAIL, each RCPT, DATA.
pub async fn transaction(client: &mut SmtpClient, sender: &str, rcpts: &[&str]) -> Sent {
    let mail = client.cmd(&format!("MAIL FROM:<{sender}>")).await;
    let mut replies = Vec::new();
    for rcpt in rcpts {
        replies.push(client.cmd(&format!("RCPT TO:<{rcpt}>")).await);
    }
    let data = client.data(BODY).await;
    Sent {
        mail,
        rcpts: replies,
        data,
    }
}

/// The reply has this code and enhanced code, and says each of `says`.
#[track_caller]
pub fn assert_reply(reply: &Reply, code: u16, enhanced: &str, says: &[&str]) {
    assert_eq!(reply.code, code, "{reply:?}");
    assert_eq!(reply.enhanced().as_deref(), Some(enhanced), "{reply:?}");
    for text in says {
        assert!(reply.text().contains(text), "{reply:?} lacks {text:?}");
    }
}

/// The message went through, and the MTA heard the remote's own 250.
#[track_caller]
pub fn assert_delivered(sent: &Sent) {
    assert_eq!(sent.mail.code, 250, "{:?}", sent.mail);
    for rcpt in &sent.rcpts {
        assert_eq!(rcpt.code, 250, "{rcpt:?}");
    }
    assert_reply(&sent.data, 250, "2.0.0", &["queued as X"]);
}

/// The RCPT was deferred for TLS (451 4.7.5, naming the rule and what happened) and so
/// nothing was sent.
#[track_caller]
pub fn assert_deferred_for_tls(sent: &Sent, says: &[&str]) {
    assert_reply(&sent.rcpts[0], 451, "4.7.5", says);
    assert_ne!(sent.data.code, 250, "{:?}", sent.data);
}

/// The proxy offers STARTTLS to the MTA (`inbound.tls`) with a certificate for relay.test
/// from `ca`.
pub fn with_inbound_tls(lab: LabBuilder, ca: &TestCa) -> LabBuilder {
    let cert = ca.leaf(&["relay.test"], Validity::Current);
    let dir = lab.dir().to_path_buf();
    replace_file(&dir.join("relay.crt"), &cert.cert_pem);
    replace_file(&dir.join("relay.key"), &cert.key_pem);
    lab.set_path("inbound.tls.certificate", &dir.join("relay.crt"))
        .set_path("inbound.tls.key", &dir.join("relay.key"))
}

/// An MTA session with the proxy in TLS (a rustls client trusting `ca`), and the reply to
/// its EHLO after the handshake.
pub async fn mta_in_tls(lab: &Lab, ca: &TestCa) -> (SmtpClient<TlsStream<TcpStream>>, Reply) {
    let (mut client, greeting) = SmtpClient::connect(lab.smtp).await;
    assert_eq!(greeting.code, 220);
    assert_eq!(client.cmd("EHLO mta.sender.test").await.code, 250);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    let mut client = client
        .starttls(Arc::new(config), "relay.test")
        .await
        .expect("TLS with the proxy");
    let ehlo = client.cmd("EHLO mta.sender.test").await;
    assert_eq!(ehlo.code, 250, "{ehlo:?}");
    (client, ehlo)
}
