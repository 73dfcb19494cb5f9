//! A recipient domain that publishes an MTA-STS `enforce` policy naming its one MX host, on
//! 127.0.0.1: its DNS records and a real HTTPS server serving the policy, for a lab.

use std::net::Ipv4Addr;

use super::dns::TestZone;
use super::https::{Answer, HttpsServer, txt};
use super::lab::LabBuilder;
use super::pki::{TestCa, Validity};

pub struct EnforcingDomain {
    /// The domain's MX and `_mta-sts` records; a test may add its own.
    pub zone: TestZone,
    policy_host: String,
    pub policy: HttpsServer,
}

/// `domain` publishes `mode: enforce` with `mx` its one MX host, the policy served over
/// HTTPS with a certificate from `ca`.
pub async fn enforcing_domain(ca: &TestCa, domain: &str, mx: &str) -> EnforcingDomain {
    let policy_host = format!("mta-sts.{domain}");
    let text = format!("version: STSv1\r\nmode: enforce\r\nmx: {mx}\r\nmax_age: 86400\r\n");
    let policy = HttpsServer::start(
        ca.leaf(&[&policy_host], Validity::Current),
        Answer::policy(&text),
    )
    .await;
    let zone = TestZone::new()
        .mx(domain, 10, mx)
        .a(mx, Ipv4Addr::LOCALHOST)
        .record(&format!("_mta-sts.{domain}"), txt("v=STSv1; id=20261207a;"));
    EnforcingDomain {
        zone,
        policy_host,
        policy,
    }
}

impl EnforcingDomain {
    /// The lab asks this DNS zone, and fetches the policy from this server.
    pub fn in_lab(&self, lab: LabBuilder) -> LabBuilder {
        self.policy_only(lab.zone(self.zone.clone()))
    }

    /// The lab fetches the policy from this server (its zone set by the test).
    pub fn policy_only(&self, lab: LabBuilder) -> LabBuilder {
        lab.set(
            "mta_sts.connect_to",
            serde_json::json!({ self.policy_host.as_str(): self.policy.addr.to_string() }),
        )
    }
}
