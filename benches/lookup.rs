//! Lookup speed on the paths every message takes: the rule list and the outcome cache.
//!
//! `cargo bench --bench lookup` measures; `cargo bench --bench lookup -- --test` runs each
//! benchmark once as a smoke test.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use tlsrouter::cache::{CacheConfig, Observation, OutcomeCache, SystemClock};
use tlsrouter::outcome::{NoTls, OutcomeClass, TlsOutcome, TlsSession, Verification};
use tlsrouter::rules::RuleSet;

const CACHE_ENTRIES: u32 = 1_000_000;

fn cache_benches(c: &mut Criterion) {
    let cache = filled_cache(CACHE_ENTRIES);
    let present = host(CACHE_ENTRIES / 2);
    let present_addr = addr(CACHE_ENTRIES / 2);
    assert!(cache.get(&present, present_addr).is_some());

    let mut group = c.benchmark_group("cache_lookup_1m");
    group.bench_function("get_present", |b| {
        b.iter(|| cache.get(black_box(&present), black_box(present_addr)))
    });
    group.bench_function("get_absent", |b| {
        b.iter(|| cache.get(black_box("mx.absent.example"), black_box(present_addr)))
    });
    group.finish();
}

/// A cache of `n` hosts, as many as a large relay might meet; reports fill time and RSS.
fn filled_cache(n: u32) -> OutcomeCache {
    let config = CacheConfig {
        max_entries: 2_000_000,
        ..CacheConfig::default()
    };
    let cache = OutcomeCache::new(&config, Arc::new(SystemClock));
    let rss_before = rss_kib();
    let started = Instant::now();
    for i in 0..n {
        let domain = format!("example{}.net", i % 50_000);
        cache.record(&host(i), addr(i), &domain, observation(i));
    }
    let held = cache.len();
    let elapsed = started.elapsed();
    println!(
        "cache fill: {held} entries in {:.2?} ({:.0} ns per record); \
         VmRSS {} MiB (+{} MiB for the cache)",
        elapsed,
        elapsed.as_nanos() as f64 / f64::from(n),
        rss_kib() / 1024,
        rss_kib().saturating_sub(rss_before) / 1024,
    );
    cache
}

fn host(i: u32) -> String {
    format!("mx{}.example{}.net", i % 4, i / 4)
}

fn addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

/// Mostly successes, some of each failure, as a real cache would hold.
fn observation(i: u32) -> Observation {
    let outcome = match i % 10 {
        0 => TlsOutcome::Plain(NoTls::NoStarttls),
        1 => {
            return Observation::unreachable(OutcomeClass::ConnectFailed, "connection refused");
        }
        _ => TlsOutcome::Encrypted(TlsSession {
            chain: Vec::new(),
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
            verification: Verification::Verified,
        }),
    };
    Observation::from_outcome(&outcome).expect("TLS outcomes are observations")
}

/// The resident set size from /proc (Linux); 0 where there is none.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

const RULES: usize = 10_000;

/// 10,000 rules: exact recipient domains, `*.suffix` patterns, sender domains (every fifth
/// rule), and a catch-all at the end.
fn rule_file(n: usize) -> String {
    let mut text = String::from("rules:\n");
    for i in 0..n - 1 {
        let condition = if i % 5 == 0 {
            format!("senders: [sender{i}.example]")
        } else if i % 3 == 0 {
            format!("domains: [\"*.corp{i}.example\"]")
        } else {
            format!("domains: [partner{i}.example]")
        };
        let tls = ["opportunistic", "require", "never"][i % 3];
        text.push_str(&format!(
            "  - name: r{i}\n    match: {{ {condition} }}\n    tls: {tls}\n"
        ));
    }
    text.push_str("  - name: default\n    match: { domains: [\"*\"] }\n");
    text
}

fn rule_benches(c: &mut Criterion) {
    let text = rule_file(RULES);
    let started = Instant::now();
    let rules = RuleSet::parse(&text, std::path::Path::new("bench.yaml")).expect("rules");
    println!(
        "rules: {} parsed and indexed in {:.2?}",
        rules.rules().len(),
        started.elapsed()
    );
    let mut group = c.benchmark_group("rule_lookup_10k");
    for (name, domain, sender) in [
        ("exact", "partner4999.example", None),
        ("suffix", "mx.eu.corp6003.example", None),
        ("sender", "nobody.example", Some("sender5000.example")),
        ("catch_all", "nobody.example", Some("nobody.example")),
    ] {
        assert_ne!(rules.select(domain, sender).base, None);
        group.bench_function(name, |b| {
            b.iter(|| rules.select(black_box(domain), black_box(sender)))
        });
    }
    // What the index saves: testing every rule's patterns in order.
    group.bench_function("linear_scan_catch_all", |b| {
        b.iter(|| {
            rules.rules().iter().position(|rule| {
                rule.conditions
                    .domains
                    .iter()
                    .any(|p| p.matches(black_box("nobody.example")))
            })
        })
    });
    group.finish();
}

criterion_group!(benches, rule_benches, cache_benches);
criterion_main!(benches);
