//! A real DNSSEC-signed DNS tree on loopback (hickory-server), for DANE tests: a root zone
//! signed with a key made at test time, that key the only trust anchor (written to a file
//! the daemon is given as `resolver.trust_anchor_file`), and below it:
//! - records put straight into the root zone: DNSSEC-secure;
//! - an `insecure_zone`: delegated without a DS record (the signed root proves there is
//!   none), its records unsigned: insecure;
//! - a `bogus_zone`: delegated with a DS record that no key of the zone matches, its
//!   records signed with a key nobody trusts: bogus (unless a test trusts that key, which
//!   [`SignedDns::zone_anchor_file`] writes);
//! - `servfail` names: SERVFAIL to every question for them, as a broken or unreachable
//!   authority gives, while the rest of the tree answers; `servfail_first`: only to the
//!   first questions, as a resolver that is not up yet gives.
//!
//! The server counts the questions it is asked ([`SignedDns::questions`]).
//!
//! One server answers for every zone on one port (UDP and TCP), as a validating stub
//! resolver expects: each question goes to the zone it belongs to, a DS question to the
//! parent zone (RFC 4035 3.1.4.1).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::dnssec::NxProofKind;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::proto::dnssec::crypto::Ed25519SigningKey;
use hickory_server::proto::dnssec::rdata::{DNSKEY, DNSSECRData, DS};
use hickory_server::proto::dnssec::{Algorithm, DigestType, DnssecSigner, SigningKey};
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, MX, NS, SOA, TLSA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, MessageResponseBuilder, ZoneType};
use tokio::net::{TcpListener, UdpSocket};

use super::dns::{bind_udp_and_tcp_at, bind_udp_and_tcp_on_one_port};

/// As in the unsigned test server: nothing is cached, by the resolver or its validator.
const TTL: u32 = 0;

/// The records of one zone, built by a test.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    records: Vec<(Name, RData)>,
}

impl Zone {
    pub fn new() -> Zone {
        Zone::default()
    }

    pub fn mx(self, domain: &str, preference: u16, exchange: &str) -> Zone {
        self.record(domain, RData::MX(MX::new(preference, fqdn(exchange))))
    }

    pub fn a(self, host: &str, ip: Ipv4Addr) -> Zone {
        self.record(host, RData::A(A(ip)))
    }

    pub fn aaaa(self, host: &str, ip: std::net::Ipv6Addr) -> Zone {
        self.record(host, RData::AAAA(AAAA(ip)))
    }

    /// `_<port>._tcp.<host> TLSA usage selector matching data`.
    pub fn tlsa(
        self,
        host: &str,
        port: u16,
        (usage, selector, matching): (u8, u8, u8),
        data: &[u8],
    ) -> Zone {
        let tlsa = TLSA::new(
            usage.into(),
            selector.into(),
            matching.into(),
            data.to_vec(),
        );
        self.record(&format!("_{port}._tcp.{host}"), RData::TLSA(tlsa))
    }

    pub fn record(mut self, name: &str, rdata: RData) -> Zone {
        self.records.push((fqdn(name), rdata));
        self
    }
}

/// The signed tree a test serves: the root zone's records and the zones below it.
#[derive(Default)]
pub struct SignedTree {
    root: Zone,
    insecure: Vec<(Name, Zone)>,
    bogus: Vec<(Name, Zone)>,
    /// Names, with the type of question that gets SERVFAIL (`None`: every type).
    servfail: Vec<(LowerName, Option<RecordType>)>,
    /// Names and types whose first questions, as many as counted, get SERVFAIL.
    servfail_first: Vec<(LowerName, RecordType, Arc<AtomicUsize>)>,
}

impl SignedTree {
    /// `secure`: records of the signed root zone (secure names of any depth).
    pub fn new(secure: Zone) -> SignedTree {
        SignedTree {
            root: secure,
            ..SignedTree::default()
        }
    }

    /// A zone at `apex`, delegated without DS: its answers are insecure.
    pub fn insecure_zone(mut self, apex: &str, zone: Zone) -> SignedTree {
        self.insecure.push((fqdn(apex), zone));
        self
    }

    /// A zone at `apex` signed with a key the root's DS record does not name: bogus.
    pub fn bogus_zone(mut self, apex: &str, zone: Zone) -> SignedTree {
        self.bogus.push((fqdn(apex), zone));
        self
    }

    /// Every question for `name` gets SERVFAIL, whatever its type.
    pub fn servfail(mut self, name: &str) -> SignedTree {
        self.servfail.push((LowerName::new(&fqdn(name)), None));
        self
    }

    /// The first `n` questions of type `rtype` for `name` get SERVFAIL, later ones are
    /// answered.
    pub fn servfail_first(mut self, name: &str, rtype: RecordType, n: usize) -> SignedTree {
        let left = Arc::new(AtomicUsize::new(n));
        self.servfail_first
            .push((LowerName::new(&fqdn(name)), rtype, left));
        self
    }

    /// Questions of type `rtype` for `name` get SERVFAIL; the others are answered (one of
    /// the A and AAAA lookups of a host failing, say).
    pub fn servfail_for(mut self, name: &str, rtype: RecordType) -> SignedTree {
        self.servfail
            .push((LowerName::new(&fqdn(name)), Some(rtype)));
        self
    }
}

/// Serves a [`SignedTree`] until dropped.
pub struct SignedDns {
    /// UDP and TCP both listen here.
    pub addr: SocketAddr,
    /// The root's key as a trust anchor file (one DNSKEY record, zone-file syntax).
    pub trust_anchor_file: PathBuf,
    /// Each bogus zone's own key as a trust anchor file, by apex.
    zone_anchor_files: Vec<(Name, PathBuf)>,
    asked: Arc<Mutex<Vec<(LowerName, RecordType)>>>,
    _dir: tempfile::TempDir,
    server: Server<Zones>,
}

impl SignedDns {
    /// On a free port of 127.0.0.1.
    pub async fn start(tree: SignedTree) -> SignedDns {
        SignedDns::serve(tree, bind_udp_and_tcp_on_one_port().await).await
    }

    /// At `addr` (UDP and TCP), e.g. port 53 of a network namespace's far side, for
    /// resolvers that take only an address (resolv.conf).
    pub async fn start_at(tree: SignedTree, addr: SocketAddr) -> SignedDns {
        SignedDns::serve(tree, bind_udp_and_tcp_at(addr).await).await
    }

    async fn serve(tree: SignedTree, (udp, tcp): (UdpSocket, TcpListener)) -> SignedDns {
        let root_key = new_key();
        let root_dnskey = dnskey(&root_key);
        let mut root = tree.root;
        for (apex, _) in &tree.insecure {
            root = root.record(&apex.to_string(), RData::NS(NS(fqdn("ns.test"))));
        }
        for (apex, _) in &tree.bogus {
            root = root.record(&apex.to_string(), RData::NS(NS(fqdn("ns.test"))));
            // A DS that no key matches: the digest of nothing the zone holds.
            let ds = DS::new(1, Algorithm::ED25519, DigestType::SHA256, vec![0x5a; 32]);
            root = root.record(&apex.to_string(), RData::DNSSEC(DNSSECRData::DS(ds)));
        }
        let root_zone = zone_handler(Name::root(), root, Some(root_key));
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut children = Vec::new();
        for (apex, zone) in tree.insecure {
            children.push((apex.clone(), zone_handler(apex, zone, None)));
        }
        let mut zone_anchor_files = Vec::new();
        for (i, (apex, zone)) in tree.bogus.into_iter().enumerate() {
            let key = new_key();
            let file = dir.path().join(format!("zone-{i}.key"));
            write_anchor(&file, &apex, dnskey(&key));
            zone_anchor_files.push((apex.clone(), file));
            children.push((apex.clone(), zone_handler(apex, zone, Some(key))));
        }
        let asked = Arc::new(Mutex::new(Vec::new()));
        let zones = Zones {
            asked: asked.clone(),
            servfail: tree.servfail,
            servfail_first: tree.servfail_first,
            root: catalog(Name::root(), root_zone),
            children: children
                .into_iter()
                .map(|(apex, handler)| (LowerName::new(&apex), catalog(apex, handler)))
                .collect(),
        };
        let trust_anchor_file = dir.path().join("root.key");
        write_anchor(&trust_anchor_file, &Name::root(), root_dnskey);
        let mut server = Server::new(zones);
        let addr = udp.local_addr().expect("DNS UDP address");
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(10), 64);
        SignedDns {
            addr,
            trust_anchor_file,
            zone_anchor_files,
            asked,
            _dir: dir,
            server,
        }
    }

    /// How many questions for `name` of type `rtype` the server has been asked.
    pub fn questions(&self, name: &str, rtype: RecordType) -> usize {
        let name = LowerName::new(&fqdn(name));
        let asked = self.asked.lock().expect("questions lock");
        asked
            .iter()
            .filter(|(n, t)| *n == name && *t == rtype)
            .count()
    }

    /// The key the bogus zone at `apex` is signed with, as a trust anchor file for that
    /// zone: trusting it instead of the root's makes the zone secure.
    pub fn zone_anchor_file(&self, apex: &str) -> PathBuf {
        let apex = fqdn(apex);
        self.zone_anchor_files
            .iter()
            .find(|(name, _)| *name == apex)
            .map(|(_, file)| file.clone())
            .unwrap_or_else(|| panic!("no bogus zone at {apex} in this tree"))
    }
}

/// One DNSKEY record in zone-file syntax, as `resolver.trust_anchor_file` reads it.
fn write_anchor(file: &std::path::Path, owner: &Name, key: DNSKEY) {
    let anchor = Record::from_rdata(owner.clone(), 3600, RData::DNSSEC(DNSSECRData::DNSKEY(key)));
    std::fs::write(file, format!("{anchor}\n")).expect("write trust anchor");
}

impl Drop for SignedDns {
    fn drop(&mut self) {
        self.server.shutdown_token().cancel();
    }
}

fn new_key() -> Ed25519SigningKey {
    let pkcs8 = Ed25519SigningKey::generate_pkcs8().expect("generate an Ed25519 key");
    Ed25519SigningKey::from_pkcs8(&pkcs8).expect("read the Ed25519 key")
}

fn dnskey(key: &Ed25519SigningKey) -> DNSKEY {
    DNSKEY::from_key(&key.to_public_key().expect("public key"))
}

/// An authoritative zone at `apex` with SOA and NS, `zone`'s records, and signed with
/// `key` (NSEC denials) when one is given.
fn zone_handler(
    apex: Name,
    zone: Zone,
    key: Option<Ed25519SigningKey>,
) -> InMemoryZoneHandler<TokioRuntimeProvider> {
    let signed = key.is_some();
    let mut handler = InMemoryZoneHandler::empty(
        apex.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
        signed.then_some(NxProofKind::Nsec),
    );
    let soa = SOA::new(
        fqdn("ns.test"),
        fqdn("hostmaster.test"),
        1,
        3600,
        600,
        86_400,
        TTL,
    );
    let mut records = vec![
        (apex.clone(), RData::SOA(soa)),
        (apex.clone(), RData::NS(NS(fqdn("ns.test")))),
    ];
    records.extend(zone.records);
    for (name, rdata) in records {
        let record = Record::from_rdata(name.clone(), TTL, rdata);
        assert!(
            handler.upsert_mut(record, 1),
            "record {name} does not belong in zone {apex}"
        );
    }
    if let Some(key) = key {
        let signer = DnssecSigner::new(
            dnskey(&key),
            Box::new(key),
            apex.clone(),
            Duration::from_secs(86_400),
        );
        handler
            .add_zone_signing_key_mut(signer)
            .expect("add the zone signing key");
        handler.secure_zone_mut().expect("sign the zone");
    }
    handler
}

fn catalog(apex: Name, handler: InMemoryZoneHandler<TokioRuntimeProvider>) -> Catalog {
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&apex), vec![Arc::new(handler)]);
    catalog
}

/// `text` as an absolute name.
fn fqdn(text: &str) -> Name {
    let absolute = format!("{}.", text.trim_end_matches('.'));
    Name::from_str(&absolute).unwrap_or_else(|e| panic!("test DNS name {text:?}: {e}"))
}

/// Every zone, each behind its own catalog; [`Zones::catalog_for`] picks one per question.
struct Zones {
    root: Catalog,
    children: Vec<(LowerName, Catalog)>,
    servfail: Vec<(LowerName, Option<RecordType>)>,
    servfail_first: Vec<(LowerName, RecordType, Arc<AtomicUsize>)>,
    asked: Arc<Mutex<Vec<(LowerName, RecordType)>>>,
}

impl Zones {
    fn catalog_for(&self, request: &Request) -> &Catalog {
        let Ok(info) = request.request_info() else {
            return &self.root;
        };
        let (name, rtype) = (info.query.name(), info.query.query_type());
        self.children
            .iter()
            .find(|(apex, _)| apex.zone_of(name) && !(rtype == RecordType::DS && apex == name))
            .map_or(&self.root, |(_, catalog)| catalog)
    }
}

// `RequestHandler` is an `async_trait`; written out as in `dns.rs`.
impl RequestHandler for Zones {
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
        if let (Ok(info), Ok(mut asked)) = (request.request_info(), self.asked.lock()) {
            asked.push((info.query.name().clone(), info.query.query_type()));
        }
        let servfail = request.request_info().is_ok_and(|info| {
            let (name, rtype) = (info.query.name(), info.query.query_type());
            let first = (self.servfail_first.iter()).any(|(n, t, left)| {
                n == name
                    && *t == rtype
                    && left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
                        .is_ok()
            });
            first || (self.servfail.iter()).any(|(n, t)| n == name && t.is_none_or(|t| t == rtype))
        });
        if servfail {
            return Box::pin(servfail_response(request, response_handle));
        }
        self.catalog_for(request)
            .handle_request::<R, T>(request, response_handle)
    }
}

/// SERVFAIL, no records: what a resolver gets from an authority that cannot answer.
async fn servfail_response<R: ResponseHandler>(request: &Request, mut handle: R) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    metadata.recursion_available = true;
    let response = MessageResponseBuilder::new(&request.queries, None).build(
        metadata,
        [].iter(),
        [],
        [].iter(),
        [],
    );
    match handle.send_response(response).await {
        Ok(info) => info,
        // The client went away; the server loop hears of a failure, as from Catalog.
        Err(_) => ResponseInfo::from(Header {
            metadata,
            counts: HeaderCounts::default(),
        }),
    }
}
