//! Receiving servers as topics use them: on a loopback address, with STARTTLS or without,
//! and the lab where example.test has one of them as its only MX.

use std::net::{IpAddr, Ipv4Addr};

use super::dns::TestZone;
use super::lab::Lab;
use super::pki::{CertKey, TestCa};
use super::smtp_server::{ServerBehaviour, SmtpServer, StartTls};

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub fn loopback(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// A server on `ip`; port 0 picks one (the first server of a lab), later ones share it.
pub async fn server(ip: Ipv4Addr, port: u16, behaviour: ServerBehaviour) -> SmtpServer {
    SmtpServer::start(IpAddr::V4(ip), port, behaviour)
        .await
        .expect("smtp server")
}

/// A server offering STARTTLS with this certificate (rustls).
pub fn starttls(cert: CertKey) -> ServerBehaviour {
    ServerBehaviour {
        starttls: StartTls::Rustls(cert),
        ..ServerBehaviour::default()
    }
}

/// A server that speaks TLS 1.0 only, which only the legacy stack reaches.
pub fn tls10_only(cert: CertKey) -> ServerBehaviour {
    ServerBehaviour {
        starttls: StartTls::Tls10Only(cert),
        ..ServerBehaviour::default()
    }
}

/// example.test has one MX, mx.example.test on 127.0.0.1, served with `behaviour`; the
/// proxy runs on its embedded rules.
pub async fn one_mx(ca: &TestCa, behaviour: ServerBehaviour) -> (Lab, SmtpServer) {
    one_mx_under(ca, behaviour, None).await
}

/// As [`one_mx`], under these rules.
pub async fn one_mx_ruled(
    ca: &TestCa,
    behaviour: ServerBehaviour,
    rules: &str,
) -> (Lab, SmtpServer) {
    one_mx_under(ca, behaviour, Some(rules)).await
}

async fn one_mx_under(
    ca: &TestCa,
    behaviour: ServerBehaviour,
    rules: Option<&str>,
) -> (Lab, SmtpServer) {
    let mx = server(loopback(1), 0, behaviour).await;
    let zone = TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", loopback(1));
    let mut lab = Lab::new().ca(ca).zone(zone).mx_port(mx.addr().port());
    if let Some(rules) = rules {
        lab = lab.rules(rules);
    }
    (lab.start().await, mx)
}
