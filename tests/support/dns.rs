//! A real DNS server on loopback (hickory-server), UDP and TCP on one port, answering from a
//! table that each test builds:
//! - a name with records of the asked type: those records (NOERROR);
//! - a name that exists (it, or a name below it, has records) but has none of that type:
//!   NOERROR with no answers (NODATA);
//! - a name marked `servfail`: SERVFAIL, whatever the type (a temporary failure);
//! - any other name: NXDOMAIN.
//!
//! Names are case-insensitive, with or without the trailing dot. Negative answers carry an
//! SOA for the root, as a real server's would. Every TTL is 0, so nothing is cached.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, MX, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

/// Zero: no resolver keeps an answer, so `replace_zone` takes effect at once, without a
/// test waiting for a cache to expire. (The proxy takes no timing from DNS TTLs.)
const TTL: u32 = 0;

/// What the server answers; built once per test, replaceable while it runs.
#[derive(Clone, Debug, Default)]
pub struct TestZone {
    records: HashMap<LowerName, Vec<Record>>,
    servfail: HashSet<LowerName>,
}

impl TestZone {
    pub fn new() -> TestZone {
        TestZone::default()
    }

    pub fn mx(self, domain: &str, preference: u16, exchange: &str) -> TestZone {
        self.record(domain, RData::MX(MX::new(preference, fqdn(exchange))))
    }

    /// RFC 7505: the single MX of preference 0 whose exchange is the root.
    pub fn null_mx(self, domain: &str) -> TestZone {
        self.record(domain, RData::MX(MX::new(0, Name::root())))
    }

    pub fn a(self, host: &str, ip: Ipv4Addr) -> TestZone {
        self.record(host, RData::A(A(ip)))
    }

    pub fn aaaa(self, host: &str, ip: Ipv6Addr) -> TestZone {
        self.record(host, RData::AAAA(AAAA(ip)))
    }

    /// Any other record type.
    pub fn record(mut self, name: &str, rdata: RData) -> TestZone {
        let owner = fqdn(name);
        let record = Record::from_rdata(owner.clone(), TTL, rdata);
        self.records
            .entry(LowerName::new(&owner))
            .or_default()
            .push(record);
        self
    }

    /// Every question about `name` gets SERVFAIL: how a test makes a temporary DNS failure.
    pub fn servfail(mut self, name: &str) -> TestZone {
        self.servfail.insert(LowerName::new(&fqdn(name)));
        self
    }

    /// Names not in the table already get NXDOMAIN; this only says so in a test.
    pub fn nxdomain_by_default(self) -> TestZone {
        self
    }

    /// The response code and answers for one question.
    fn answer(&self, name: &LowerName, rtype: RecordType) -> (ResponseCode, Vec<Record>) {
        if self.servfail.contains(name) {
            return (ResponseCode::ServFail, Vec::new());
        }
        if !self.exists(name) {
            return (ResponseCode::NXDomain, Vec::new());
        }
        let answers = self.records.get(name).into_iter().flatten();
        let answers = answers.filter(|r| r.record_type() == rtype || rtype == RecordType::ANY);
        (ResponseCode::NoError, answers.cloned().collect())
    }

    /// A name exists if it or a name below it has records (an "empty non-terminal").
    fn exists(&self, name: &LowerName) -> bool {
        self.records.keys().any(|owner| name.zone_of(owner))
    }
}

/// `text` as an absolute name.
fn fqdn(text: &str) -> Name {
    let absolute = format!("{}.", text.trim_end_matches('.'));
    Name::from_str(&absolute).unwrap_or_else(|e| panic!("test DNS name {text:?}: {e}"))
}

/// Serves a [`TestZone`] on 127.0.0.1 until dropped.
pub struct DnsServer {
    /// UDP and TCP both listen here.
    pub addr: SocketAddr,
    zone: Arc<RwLock<TestZone>>,
    server: Server<ZoneTable>,
}

impl DnsServer {
    pub async fn start(zone: TestZone) -> DnsServer {
        let zone = Arc::new(RwLock::new(zone));
        let mut server = Server::new(ZoneTable(zone.clone()));
        let (udp, tcp) = bind_udp_and_tcp_on_one_port().await;
        let addr = udp.local_addr().expect("DNS UDP address");
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(10), 64);
        DnsServer { addr, zone, server }
    }

    /// Serves `zone` at `addr` (UDP and TCP), e.g. port 53 for resolvers that take only an
    /// address (resolv.conf).
    pub async fn start_at(zone: TestZone, addr: SocketAddr) -> DnsServer {
        let zone = Arc::new(RwLock::new(zone));
        let mut server = Server::new(ZoneTable(zone.clone()));
        let (udp, tcp) = bind_udp_and_tcp_at(addr).await;
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(10), 64);
        DnsServer { addr, zone, server }
    }

    /// Answers from `zone` from now on.
    pub fn replace_zone(&self, zone: TestZone) {
        *self.zone.write().expect("zone lock") = zone;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // The listeners stop; dropping `server` then aborts its tasks.
        self.server.shutdown_token().cancel();
    }
}

/// UDP and TCP at `addr`, for resolvers that take only an address (resolv.conf).
pub async fn bind_udp_and_tcp_at(addr: SocketAddr) -> (UdpSocket, TcpListener) {
    let udp = UdpSocket::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind DNS UDP on {addr}: {e}"));
    let tcp = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind DNS TCP on {addr}: {e}"));
    (udp, tcp)
}

/// Resolvers ask over UDP and retry truncated answers over TCP at the same address.
pub async fn bind_udp_and_tcp_on_one_port() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind DNS UDP on 127.0.0.1");
        let port = udp.local_addr().expect("DNS UDP address").port();
        // Another process may hold this port for TCP: try another.
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            return (udp, tcp);
        }
    }
    panic!("no port on 127.0.0.1 was free for both UDP and TCP after 50 tries");
}

/// The request handler: looks each question up in the shared zone.
struct ZoneTable(Arc<RwLock<TestZone>>);

impl ZoneTable {
    async fn respond<R: ResponseHandler>(&self, request: &Request, mut handle: R) -> ResponseInfo {
        let (code, answers) = match request.request_info() {
            Ok(info) => self.lookup(info.query.name(), info.query.query_type()),
            // Not exactly one question.
            Err(_) => (ResponseCode::FormErr, Vec::new()),
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = code;
        metadata.authoritative = code != ResponseCode::ServFail;
        metadata.recursion_available = true;
        let soa = negative_soa(code, &answers);
        let edns = response_edns(request);
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            answers.iter(),
            [],
            soa.iter(),
            [],
        );
        match handle.send_response(response).await {
            Ok(info) => info,
            // The client went away; report a failure to the server loop, as Catalog does.
            Err(_) => failed(request),
        }
    }

    fn lookup(&self, name: &LowerName, rtype: RecordType) -> (ResponseCode, Vec<Record>) {
        self.0.read().expect("zone lock").answer(name, rtype)
    }
}

/// EDNS in the answer when the question had it (RFC 6891), else none.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|asked| {
        let mut edns = Edns::new();
        edns.set_max_payload(asked.max_payload().max(512));
        edns
    })
}

/// NXDOMAIN and NODATA carry an SOA, whose minimum is the negative-caching TTL.
fn negative_soa(code: ResponseCode, answers: &[Record]) -> Option<Record> {
    let nodata = code == ResponseCode::NoError && answers.is_empty();
    (code == ResponseCode::NXDomain || nodata).then(|| {
        let soa = SOA::new(
            fqdn("ns.test"),
            fqdn("hostmaster.test"),
            1,
            3600,
            600,
            86_400,
            TTL,
        );
        Record::from_rdata(Name::root(), TTL, RData::SOA(soa))
    })
}

fn failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

// `RequestHandler` is an `async_trait`; this is its expansion, written out so the tests need
// no dependency on the async-trait crate.
impl RequestHandler for ZoneTable {
    fn handle_request<'s, 'r, 'f, R, T>(
        &'s self,
        request: &'r Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'f>>
    where
        R: ResponseHandler + 'f,
        T: Time + 'f,
        's: 'f,
        'r: 'f,
        Self: 'f,
    {
        Box::pin(self.respond(request, response_handle))
    }
}
