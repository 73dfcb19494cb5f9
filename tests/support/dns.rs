//! A real DNS server on loopback (hickory-server with an in-memory zone), UDP and TCP on
//! one port. It is authoritative for `test.` only: a name there that does not exist gets
//! NXDOMAIN, a name there without the asked type gets an empty answer (NODATA), and a
//! name anywhere else (say `broken.lab`) gets REFUSED, which a resolver treats as a
//! temporary failure. (Not `.invalid`: resolvers answer that one themselves.)

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, AAAA, MX, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use tokio::net::{TcpListener, UdpSocket};

/// The zone every test name lives in.
pub const ORIGIN: &str = "test.";

#[derive(Default)]
pub struct TestZone {
    records: Vec<Record>,
}

fn name(text: &str) -> Name {
    let absolute = if text.ends_with('.') {
        text.to_string()
    } else {
        format!("{text}.")
    };
    Name::from_str(&absolute).expect("test DNS name")
}

impl TestZone {
    pub fn new() -> TestZone {
        TestZone::default()
    }

    pub fn mx(mut self, domain: &str, preference: u16, exchange: &str) -> TestZone {
        let rdata = RData::MX(MX::new(preference, name(exchange)));
        self.records
            .push(Record::from_rdata(name(domain), 60, rdata));
        self
    }

    /// RFC 7505: one MX of preference 0 whose exchange is the root.
    pub fn null_mx(mut self, domain: &str) -> TestZone {
        let rdata = RData::MX(MX::new(0, Name::root()));
        self.records
            .push(Record::from_rdata(name(domain), 60, rdata));
        self
    }

    pub fn a(mut self, host: &str, ip: Ipv4Addr) -> TestZone {
        self.records
            .push(Record::from_rdata(name(host), 60, RData::A(A(ip))));
        self
    }

    pub fn aaaa(mut self, host: &str, ip: Ipv6Addr) -> TestZone {
        self.records
            .push(Record::from_rdata(name(host), 60, RData::AAAA(AAAA(ip))));
        self
    }

    fn handler(self) -> InMemoryZoneHandler {
        let origin = name(ORIGIN);
        let mut handler =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            name("ns.test"),
            name("hostmaster.test"),
            1,
            3600,
            600,
            86_400,
            60,
        );
        handler.upsert_mut(Record::from_rdata(origin, 60, RData::SOA(soa)), 1);
        for record in self.records {
            handler.upsert_mut(record, 1);
        }
        handler
    }
}

/// Serves the zone until dropped.
pub struct DnsServer {
    pub addr: SocketAddr,
    server: Server<Catalog>,
}

impl DnsServer {
    pub async fn start(zone: TestZone) -> DnsServer {
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::from(name(ORIGIN)),
            vec![Arc::new(zone.handler())],
        );
        let mut server = Server::new(catalog);
        let (udp, tcp) = bind_udp_and_tcp_on_one_port().await;
        let addr = udp.local_addr().expect("dns addr");
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 4096);
        DnsServer { addr, server }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // Stops the listeners; the tasks end with the test's runtime anyway.
        self.server.shutdown_token().cancel();
    }
}

/// The resolver asks over UDP and retries over TCP on the same port.
async fn bind_udp_and_tcp_on_one_port() -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns udp");
        let port = udp.local_addr().expect("udp addr").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP");
}
