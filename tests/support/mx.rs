//! Receiving servers as topics use them: on a loopback address, with STARTTLS or without,
//! the lab where example.test has one of them as its only MX, and a tarpit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

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

/// A host that accepts connections and never says a word, as a dead MX host behind
/// something that answers for it does; it counts what it accepted and holds it all.
pub struct Tarpit {
    addr: SocketAddr,
    accepted: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Tarpit {
    /// On `ip`; port 0 picks one, later tarpits share it.
    pub async fn start(ip: Ipv4Addr, port: u16) -> Tarpit {
        let listener = TcpListener::bind((ip, port)).await.expect("bind a tarpit");
        let addr = listener.local_addr().expect("tarpit address");
        let (count, accepted) = watch::channel(0);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
                count.send_replace(held.len());
            }
        });
        Tarpit {
            addr,
            accepted,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }

    /// Returns once at least `n` connections have been accepted.
    pub async fn wait_accepted(&self, n: usize) {
        let mut accepted = self.accepted.clone();
        accepted
            .wait_for(|&count| count >= n)
            .await
            .expect("the tarpit runs");
    }
}

impl Drop for Tarpit {
    fn drop(&mut self) {
        self.task.abort();
    }
}
