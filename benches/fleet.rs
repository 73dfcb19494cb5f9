//! The cost of a lookup with the fleet's shared cache: a near-cache hit (this process's
//! cache, Redis not asked) against a miss that reads Redis on loopback. Starts its own
//! `redis-server` on a free port (it must be installed).
//!
//! `cargo bench --bench fleet` measures; `cargo bench --bench fleet -- --test` runs each
//! benchmark once as a smoke test.

use std::hint::black_box;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tlsrouter::cache::config::RedisConfig;
use tlsrouter::cache::shared::{Roots, SharedCache};
use tlsrouter::cache::{Backend, CacheConfig, Observation, OutcomeCache, SystemClock};
use tlsrouter::outcome::{TlsOutcome, TlsSession, Verification};
use tlsrouter::stats::Stats;

const HOST: &str = "mx.example.net";
const ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

/// The Redis server, killed when the benchmark ends.
struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(dir: &std::path::Path) -> (Redis, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--logfile", ""])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("Ready to accept connections") => break,
            Some(Ok(_)) => continue,
            _ => panic!("redis-server ended before it was ready"),
        }
    }
    // Keep reading, so that the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Redis(child), port)
}

/// A relay's cache in front of the Redis on `port`, copies kept for `near_ttl`.
fn fleet_cache(
    runtime: &tokio::runtime::Runtime,
    port: u16,
    near_ttl: Duration,
) -> Arc<OutcomeCache> {
    let redis = RedisConfig {
        url: Some(format!("redis://127.0.0.1:{port}")),
        near_ttl,
        relay_name: Some("bench".into()),
        ..RedisConfig::default()
    };
    let config = CacheConfig {
        backend: Backend::Redis,
        redis: redis.clone(),
        ..CacheConfig::default()
    };
    let cache = Arc::new(OutcomeCache::new(&config, Arc::new(SystemClock)));
    let shared = SharedCache::new(
        &redis,
        Roots::default(),
        "bench",
        None,
        &config.ttl,
        Arc::new(Stats::default()),
    )
    .expect("shared cache");
    let shared = Arc::new(shared);
    cache.attach(shared.clone());
    runtime
        .block_on(shared.start(cache.clone()))
        .expect("Redis answers");
    cache
}

fn verified() -> Observation {
    Observation::from_outcome(&TlsOutcome::Encrypted(TlsSession {
        chain: Vec::new(),
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
        verification: Verification::Verified,
    }))
    .expect("an observation")
}

fn fleet_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_redis, port) = start_redis(dir.path());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let writer = fleet_cache(&runtime, port, Duration::from_secs(3600));
    writer.record(HOST, ADDR, "example.net", verified());
    let shared = writer.shared().expect("shared").clone();
    let key = tlsrouter::cache::CacheKey::new(HOST, ADDR);
    // The write is queued: wait until Redis has it.
    while runtime
        .block_on(shared.read(&key))
        .and_then(|(entry, _)| entry)
        .is_none()
    {
        std::thread::yield_now();
    }

    let near = fleet_cache(&runtime, port, Duration::from_secs(3600));
    // Every copy outlives its TTL at once: each lookup reads Redis.
    let far = fleet_cache(&runtime, port, Duration::from_nanos(1));
    let lookup = |cache: &OutcomeCache| {
        runtime.block_on(async {
            cache.refresh(black_box(HOST), black_box(ADDR)).await;
            cache.get(HOST, ADDR)
        })
    };
    assert!(lookup(&near).is_some() && lookup(&far).is_some());

    let mut group = c.benchmark_group("fleet_lookup");
    group.bench_function("near_cache_hit", |b| b.iter(|| lookup(&near)));
    group.bench_function("near_cache_miss_reads_redis", |b| b.iter(|| lookup(&far)));
    group.finish();
}

criterion_group!(benches, fleet_benches);
criterion_main!(benches);
