//! A fleet of relays sharing one memory through a real `redis-server`: two `tlsrouter`
//! daemons, one Redis. What one relay learns spares the other the doomed handshake; a pin
//! or flush on one applies on both; a firewall that strips STARTTLS for one source address
//! only is called a split-source downgrade, with both sides named; a Redis that stops
//! costs no mail and is caught up with when it returns, and so does one that hangs; `rediss://` works with our CA; bad
//! URLs and wrong passwords are refused at `check-config` and `run`.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;

use crate::support::lab::{DaemonLab, Lab, LabBuilder, ctl, one_mx_zone, tlsrouter};
use crate::support::pki::{TestCa, Validity};
use crate::support::redis::{RedisOptions, RedisServer};
use crate::support::smtp_server::SmtpServer;

use crate::support::events::{assert_fields, field};
use crate::support::https::POLICY_HOST;
use crate::support::https::{Answer, HttpsServer, txt};
use crate::support::mta::{assert_delivered, send};
use crate::support::mx::{loopback, server, starttls, tls10_only};

/// Every relay says this once it hears the fleet's pins and flushes.
const LISTENING: [(&str, &str); 1] = [("event", "fleet.listening")];

const LEGACY_PLAIN: &str = r#"
    rules:
      - name: default
        match: { domains: ["*"] }
        legacy_tls: plain
"#;

/// A relay of the fleet: example.test's MX is `mx`, the cache is shared in `redis`.
fn relay(name: &str, redis: &RedisServer, ca: &TestCa, mx: &SmtpServer) -> LabBuilder {
    Lab::new()
        .ca(ca)
        .one_mx(mx)
        .set("cache.backend", "redis")
        .set("cache.redis.url", redis.url())
        .set("cache.redis.relay_name", name)
        .set("cache.redis.timeout", "2s")
        .set("log.level", "info,tlsrouter::cache::shared=debug")
        // What each relay learns from a new connection is the point, not a pooled one.
        .set("delivery.pool.enabled", false)
}

/// Starts the relay and waits until it listens to the fleet.
async fn started(builder: LabBuilder) -> DaemonLab {
    let mut lab = builder.start_daemon().await;
    lab.daemon.wait_for_event_once(&LISTENING).await;
    lab
}

async fn tls_mx(ca: &TestCa) -> SmtpServer {
    server(
        loopback(1),
        0,
        starttls(ca.leaf(&["mx.example.test"], Validity::Current)),
    )
    .await
}

fn entries(answer: &Value) -> Vec<Value> {
    answer["result"]["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_tls_failure_learned_by_one_relay_makes_the_other_skip_the_doomed_handshake() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = server(
        loopback(1),
        0,
        tls10_only(ca.leaf(&["mx.example.test"], Validity::Current)),
    )
    .await;
    let mut a = started(relay("relay-a", &redis, &ca, &mx).rules(LEGACY_PLAIN)).await;
    let b = started(relay("relay-b", &redis, &ca, &mx).rules(LEGACY_PLAIN)).await;

    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    assert_eq!(mx.tls_handshakes_attempted(), 1, "relay a tried TLS");
    a.daemon
        .wait_for_event(&[
            ("event", "fleet.wrote"),
            ("name", "mx.example.test[127.0.0.1]"),
            ("class", "legacy-tls"),
        ])
        .await;

    assert_delivered(&send(b.smtp(), &["b@example.test"]).await);
    assert_eq!(
        mx.tls_handshakes_attempted(),
        1,
        "relay b skipped the handshake relay a found doomed"
    );
    let got = mx.messages();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|m| m.tls.is_none()), "both in plain");

    let listed = entries(&b.daemon.ctl(&["cache", "list"]).await);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["class"], "legacy-tls");
    assert_eq!(listed[0]["shared"], true, "{listed:?}");
    assert_eq!(listed[0]["observed_by"]["relay"], "relay-a");
    let (code, shown, err) = ctl(
        &b.daemon.admin_socket,
        &["cache", "show", "mx.example.test"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains("shared: relay-a"), "{shown}");
    assert!(shown.contains("in the fleet's shared cache"), "{shown}");
    assert!(
        shown.contains("local: relay-a"),
        "Redis holds relay a's own: {shown}"
    );
}

#[tokio::test]
async fn a_pin_on_one_relay_applies_on_the_other() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = tls_mx(&ca).await;
    let a = started(relay("relay-a", &redis, &ca, &mx)).await;
    let mut b = started(relay("relay-b", &redis, &ca, &mx)).await;

    let pinned = a
        .daemon
        .ctl(&[
            "cache",
            "pin",
            "mx.example.test[127.0.0.1]",
            "no-starttls",
            "--ttl",
            "1h",
        ])
        .await;
    assert_eq!(pinned["result"]["pinned"], 1, "{pinned}");
    b.daemon
        .wait_for_event(&[("event", "fleet.pin_taken"), ("relay", "relay-a")])
        .await;

    assert_delivered(&send(b.smtp(), &["b@example.test"]).await);
    assert_eq!(
        mx.tls_handshakes_attempted(),
        0,
        "relay b followed relay a's pin: no STARTTLS"
    );
    assert!(mx.messages()[0].tls.is_none());
    let listed = entries(&b.daemon.ctl(&["cache", "list"]).await);
    assert_eq!(listed[0]["pinned"], true, "{listed:?}");
    assert_eq!(listed[0]["observed_by"]["relay"], "relay-a");
}

#[tokio::test]
async fn a_flush_on_one_relay_clears_both_and_the_shared_cache() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = tls_mx(&ca).await;
    let mut a = started(relay("relay-a", &redis, &ca, &mx)).await;
    let mut b = started(relay("relay-b", &redis, &ca, &mx)).await;
    let wrote = [
        ("event", "fleet.wrote"),
        ("name", "mx.example.test[127.0.0.1]"),
        ("class", "tls-verified"),
    ];
    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    a.daemon.wait_for_event(&wrote).await;
    assert_delivered(&send(b.smtp(), &["b@example.test"]).await);
    b.daemon.wait_for_event(&wrote).await;
    assert_eq!(entries(&b.daemon.ctl(&["cache", "list"]).await).len(), 1);

    let flushed = a.daemon.ctl(&["cache", "flush", "example.test"]).await;
    assert_eq!(flushed["result"]["flushed"], 1, "{flushed}");
    b.daemon
        .wait_for_event(&[
            ("event", "fleet.flush_taken"),
            ("relay", "relay-a"),
            ("name", "example.test"),
        ])
        .await;

    assert!(entries(&b.daemon.ctl(&["cache", "list"]).await).is_empty());
    for relay in [&a, &b] {
        let (code, _, err) = ctl(
            &relay.daemon.admin_socket,
            &["cache", "show", "mx.example.test"],
        )
        .await;
        assert_ne!(code, 0, "nothing left, here or in Redis");
        assert!(err.contains("nothing cached"), "{err}");
    }
}

/// Grows the fleet's cache by `n` entries of other.test's hosts, as relays would have
/// written them.
async fn grow(redis: &RedisServer, n: usize) {
    let t = now();
    let commands = (0..n)
        .map(|i| {
            let mut entry = entry_json("no-starttls", t, t + 3600);
            entry["host"] = format!("mx{i}.other.test").into();
            entry["domains"] = serde_json::json!(["other.test"]);
            let mut hset = redis::cmd("HSET");
            hset.arg(format!("tlsrouter:entry:mx{i}.other.test|127.0.0.1"))
                .arg(&["entry", &entry.to_string(), "kind", "failure"])
                .arg(&["source", "relay:relay-x", "pinned", "0"])
                .arg(&["expires_at", &(t + 3600).to_string()]);
            hset
        })
        .collect();
    redis.run_all(commands).await;
}

/// What a walk over the shared cache answered: how far it got.
fn swept(answer: &Value) -> (u64, u64, Value) {
    (
        answer["scanned"].as_u64().expect("scanned"),
        answer["matched"].as_u64().expect("matched"),
        answer["unfinished"].clone(),
    )
}

#[tokio::test]
async fn a_show_and_a_flush_walk_a_large_shared_cache_in_batches_and_redis_stays_up() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = tls_mx(&ca).await;
    // The default call timeout: once a walk was one call, 100,000 reads outlasted it.
    let builder = relay("relay-a", &redis, &ca, &mx).set("cache.redis.timeout", "500ms");
    let mut a = started(builder).await;
    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    a.daemon
        .wait_for_event(&[("event", "fleet.wrote"), ("class", "tls-verified")])
        .await;
    grow(&redis, 100_000).await;

    let shown = a.daemon.ctl(&["cache", "show", "mx.example.test"]).await;
    let (scanned, matched, unfinished) = swept(&shown["result"]["fleet_sweep"]);
    assert_eq!(unfinished, Value::Null, "{shown}");
    assert_eq!(
        (scanned, matched),
        (100_001, 1),
        "every entry looked at, one found"
    );
    assert_eq!(shown["result"]["fleet"][0]["host"], "mx.example.test");

    let flushed = a.daemon.ctl(&["cache", "flush", "example.test"]).await;
    let (scanned, matched, unfinished) = swept(&flushed["result"]["fleet"]);
    assert_eq!(unfinished, Value::Null, "{flushed}");
    // The memory of TLS goes with its entry, so the walk may not come to it again.
    assert!((100_001..=100_002).contains(&scanned), "{flushed}");
    assert_eq!(matched, 2, "the entry and the memory of TLS");
    assert!(
        redis
            .keys("tlsrouter:*example.test*")
            .await
            .iter()
            .all(|k| k.contains("other.test"))
    );
    assert_eq!(redis.size().await, 100_000, "other.test's entries stay");
    let stats = a.daemon.ctl(&["stats"]).await;
    assert_eq!(stats["result"]["redis_connected"], 1, "{stats}");
    assert_eq!(stats["result"]["redis_errors"], 0, "{stats}");
}

#[tokio::test]
async fn a_flush_that_runs_out_of_time_says_how_far_it_got_and_is_not_made_again() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = tls_mx(&ca).await;
    let builder = relay("relay-a", &redis, &ca, &mx).set("cache.redis.sweep_deadline", "1ms");
    let mut a = started(builder).await;
    grow(&redis, 100_000).await;

    let flushed = a.daemon.ctl(&["cache", "flush", "other.test"]).await;
    let (scanned, matched, unfinished) = swept(&flushed["result"]["fleet"]);
    assert_eq!(unfinished, "out-of-time", "{flushed}");
    assert!(scanned < 100_000, "{flushed}");
    assert_eq!(
        redis.size().await,
        100_000 - matched,
        "what was deleted is said"
    );
    let said = a
        .daemon
        .wait_for_event(&[("event", "fleet.flush_unfinished"), ("name", "other.test")])
        .await;
    assert_fields(&said, &[("level", "WARN"), ("why", "OutOfTime")]);
    // Redis was never taken for down, so nothing is kept to be made again when it is back.
    let stats = a.daemon.ctl(&["stats"]).await;
    assert_eq!(stats["result"]["redis_connected"], 1, "{stats}");
    assert_eq!(stats["result"]["redis_errors"], 0, "{stats}");
}

#[tokio::test]
async fn a_flush_while_redis_is_down_is_said_and_made_once_redis_is_back() {
    let mut redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = tls_mx(&ca).await;
    let mut a = started(relay("relay-a", &redis, &ca, &mx)).await;
    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    a.daemon
        .wait_for_event(&[("event", "fleet.wrote"), ("class", "tls-verified")])
        .await;
    redis.stop();
    // A send finds Redis gone; the relay says so.
    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    a.daemon.wait_for_event(&[("event", "fleet.down")]).await;

    let flushed = a.daemon.ctl(&["cache", "flush", "example.test"]).await;
    assert_eq!(
        flushed["result"]["fleet"]["unfinished"], "redis-down",
        "{flushed}"
    );
    redis.restart().await;
    let back = a.daemon.wait_for_event(&[("event", "fleet.back")]).await;
    assert_fields(&back, &[("pending", "1")]);
    a.daemon
        .wait_for_event(&[("event", "fleet.flushed"), ("name", "example.test")])
        .await;
}

#[tokio::test]
async fn a_domain_flush_forgets_the_memory_of_tls_of_a_host_whose_entry_has_expired() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = tls_mx(&ca).await;
    let mut a = started(relay("relay-a", &redis, &ca, &mx)).await;
    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    a.daemon
        .wait_for_event(&[
            ("event", "fleet.wrote"),
            ("name", "mx.example.test[127.0.0.1]"),
            ("class", "tls-verified"),
        ])
        .await;
    let mark = "tlsrouter:tls:mx.example.test|127.0.0.1";
    assert_eq!(redis.keys("tlsrouter:tls:*").await, vec![mark]);

    // The entry expires before the memory of TLS does (the class's TTL against
    // cache.ttl.success): left alone, the mark would make the next relay that finds no
    // STARTTLS there call it a downgrade, flush or not.
    redis
        .delete("tlsrouter:entry:mx.example.test|127.0.0.1")
        .await;
    let flushed = a.daemon.ctl(&["cache", "flush", "example.test"]).await;
    assert_eq!(flushed["ok"], true, "{flushed}");
    a.daemon
        .wait_for_event(&[("event", "fleet.flushed"), ("name", "example.test")])
        .await;
    assert!(
        redis.keys("tlsrouter:*").await.is_empty(),
        "nothing of example.test is left in Redis"
    );
}

#[tokio::test]
async fn a_firewall_that_strips_starttls_for_one_source_address_is_a_split_source_downgrade() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = tls_mx(&ca).await;
    mx.strip_starttls_for(IpAddr::from(loopback(3)));
    let mut a =
        started(relay("relay-a", &redis, &ca, &mx).set("delivery.source_address", "127.0.0.2"))
            .await;
    let mut b =
        started(relay("relay-b", &redis, &ca, &mx).set("delivery.source_address", "127.0.0.3"))
            .await;

    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    assert!(mx.messages()[0].tls.is_some(), "relay a: TLS");
    a.daemon
        .wait_for_event(&[
            ("event", "fleet.wrote"),
            ("name", "mx.example.test[127.0.0.1]"),
            ("class", "tls-verified"),
        ])
        .await;

    assert_delivered(&send(b.smtp(), &["b@example.test"]).await);
    assert!(mx.messages()[1].tls.is_none(), "relay b: stripped");
    let peers: Vec<_> = mx.connection_logs().iter().map(|c| c.peer).collect();
    assert_eq!(
        peers,
        [
            Some(IpAddr::from(loopback(2))),
            Some(IpAddr::from(loopback(3)))
        ],
        "each relay from its own address"
    );
    b.daemon
        .wait_for_event(&[("event", "downgrade"), ("downgrade", "no-starttls")])
        .await;
    let warning = (b.daemon)
        .wait_for_event(&[("event", "split_source_downgrade")])
        .await;
    assert_fields(
        &warning,
        &[
            ("level", "WARN"),
            ("server", "mx.example.test[127.0.0.1]"),
            ("did_tls", "relay relay-a (from 127.0.0.2)"),
            ("failed", "relay relay-b (from 127.0.0.3)"),
            ("class", "no-starttls"),
        ],
    );
    b.daemon
        .wait_for_event(&[
            ("event", "fleet.wrote"),
            ("name", "mx.example.test[127.0.0.1]"),
            ("class", "no-starttls"),
        ])
        .await;

    // Relay a still does TLS; its success does not erase what relay b's address gets.
    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    assert!(mx.messages()[2].tls.is_some(), "relay a: TLS again");
    let warning = (a.daemon)
        .wait_for_event(&[("event", "split_source_downgrade")])
        .await;
    assert_fields(
        &warning,
        &[
            ("did_tls", "relay relay-a (from 127.0.0.2)"),
            ("failed", "relay relay-b (from 127.0.0.3)"),
            ("class", "no-starttls"),
        ],
    );
    let (_, shown, _) = ctl(
        &a.daemon.admin_socket,
        &["cache", "show", "mx.example.test"],
    )
    .await;
    let fleet = shown
        .split("in the fleet's shared cache:")
        .nth(1)
        .unwrap_or_default();
    assert!(
        fleet.contains("no-starttls") && fleet.contains("relay-b from 127.0.0.3"),
        "{shown}"
    );
    let stats = b.daemon.ctl(&["stats"]).await;
    assert_eq!(stats["result"]["split_source_downgrades"], 1, "{stats}");
}

#[tokio::test]
async fn with_redis_stopped_mail_keeps_flowing_and_the_shared_view_comes_back_after_a_restart() {
    let mut redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = tls_mx(&ca).await;
    let mut a = started(relay("relay-a", &redis, &ca, &mx)).await;
    let mut b = started(relay("relay-b", &redis, &ca, &mx)).await;
    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    a.daemon.wait_for_event(&[("event", "fleet.wrote")]).await;

    redis.stop();
    for relay in [&a, &b, &a, &b] {
        assert_delivered(&send(relay.smtp(), &["b@example.test"]).await);
    }
    assert_eq!(mx.messages().len(), 5);
    assert!(
        mx.messages().iter().all(|m| m.tls.is_some()),
        "TLS throughout"
    );
    let down = [("event", "fleet.down")];
    a.daemon.wait_for_event(&down).await;
    b.daemon.wait_for_event(&down).await;
    let stats = b.daemon.ctl(&["stats"]).await;
    assert_eq!(stats["result"]["redis_connected"], 0, "{stats}");
    assert!(
        stats["result"]["redis_errors"].as_u64() > Some(0),
        "{stats}"
    );

    redis.restart().await;
    for relay in [&mut a, &mut b] {
        relay
            .daemon
            .wait_for_event(&[("event", "fleet.back")])
            .await;
        // Listening again may come before or after; once at start, once now.
        if relay.daemon.count_events(&LISTENING) < 2 {
            relay.daemon.wait_for_event(&LISTENING).await;
        }
        assert_eq!(
            relay.daemon.count_events(&down),
            1,
            "one warning per outage:\n{}",
            relay.daemon.log_text()
        );
    }
    // What was learned meanwhile is written again, and pins travel again.
    a.daemon
        .wait_for_event(&[
            ("event", "fleet.wrote"),
            ("name", "mx.example.test[127.0.0.1]"),
        ])
        .await;
    let (code, shown, err) = ctl(
        &b.daemon.admin_socket,
        &["cache", "show", "mx.example.test"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains("in the fleet's shared cache"), "{shown}");
    a.daemon
        .ctl(&[
            "cache",
            "pin",
            "mx.example.test[127.0.0.1]",
            "no-starttls",
            "--ttl",
            "1h",
        ])
        .await;
    b.daemon
        .wait_for_event(&[("event", "fleet.pin_taken"), ("relay", "relay-a")])
        .await;
    let stats = b.daemon.ctl(&["stats"]).await;
    assert_eq!(stats["result"]["redis_connected"], 1, "{stats}");
}

#[tokio::test]
async fn with_redis_hanging_mail_keeps_flowing_on_the_local_cache_and_redis_is_used_again_after() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = tls_mx(&ca).await;
    let hanging = |name| relay(name, &redis, &ca, &mx).set("cache.redis.timeout", "300ms");
    let mut a = started(hanging("relay-a")).await;
    let mut b = started(hanging("relay-b")).await;
    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    a.daemon.wait_for_event(&[("event", "fleet.wrote")]).await;

    // Connections are still accepted, but no call is answered: each must give up on its
    // timeout. relay-b has nothing of the host in its near cache, so its message asks
    // Redis first; relay-a's writes wait on Redis.
    redis.pause();
    for relay in [&b, &a, &b] {
        assert_delivered(&send(relay.smtp(), &["b@example.test"]).await);
    }
    assert_eq!(mx.messages().len(), 4);
    assert!(
        mx.messages().iter().all(|m| m.tls.is_some()),
        "TLS throughout"
    );
    let down = [("event", "fleet.down")];
    let warned = b.daemon.wait_for_event(&down).await;
    assert_fields(&warned, &[("why", "no answer in 300ms")]);
    a.daemon.wait_for_event(&down).await;
    let stats = b.daemon.ctl(&["stats"]).await;
    assert_eq!(stats["result"]["redis_connected"], 0, "{stats}");

    redis.resume();
    b.daemon.wait_for_event(&[("event", "fleet.back")]).await;
    assert_delivered(&send(b.smtp(), &["b@example.test"]).await);
    b.daemon
        .wait_for_event(&[
            ("event", "fleet.wrote"),
            ("name", "mx.example.test[127.0.0.1]"),
        ])
        .await;
    let stats = b.daemon.ctl(&["stats"]).await;
    assert_eq!(stats["result"]["redis_connected"], 1, "{stats}");
}

#[tokio::test]
async fn rediss_with_the_configured_ca_encrypts_the_shared_cache() {
    let ca = TestCa::new();
    let files = tempfile::tempdir().expect("temp dir");
    let cert = ca.leaf(&["127.0.0.1"], Validity::Current);
    let (cert_file, key_file) = (
        files.path().join("redis.pem"),
        files.path().join("redis.key"),
    );
    std::fs::write(&cert_file, &cert.cert_pem).expect("write cert");
    std::fs::write(&key_file, &cert.key_pem).expect("write key");
    let redis = RedisServer::start_with(RedisOptions {
        tls: Some((cert_file, key_file)),
        ..RedisOptions::default()
    })
    .await;
    assert!(redis.url().starts_with("rediss://"));
    let mx = tls_mx(&ca).await;
    let mut a = started(relay("relay-a", &redis, &ca, &mx)).await;
    let b = started(relay("relay-b", &redis, &ca, &mx)).await;

    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    a.daemon.wait_for_event(&[("event", "fleet.wrote")]).await;
    let (code, shown, err) = ctl(
        &b.daemon.admin_socket,
        &["cache", "show", "mx.example.test"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains("local: relay-a"), "read over TLS: {shown}");
    let stats = a.daemon.ctl(&["stats"]).await;
    assert_eq!(stats["result"]["redis_errors"], 0, "{stats}");

    // A relay that does not trust the CA never talks to it.
    let other_ca = files.path().join("other-ca.pem");
    std::fs::write(&other_ca, TestCa::new().ca_pem()).expect("write ca");
    let config = files.path().join("untrusting.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {{ socket: null }}\ntls: {{ ca_file: \"{}\", system_roots: false }}\n\
             cache: {{ backend: redis, redis: {{ url: \"{}\" }} }}\n",
            other_ca.display(),
            redis.url()
        ),
    )
    .expect("write config");
    let (code, _, err) = tlsrouter(vec!["check-config".into(), config.display().to_string()]).await;
    assert_eq!(code, 0, "unreachable is a warning: {err}");
    assert!(err.contains("cannot be reached"), "{err}");
}

#[tokio::test]
async fn bad_urls_and_wrong_passwords_are_refused_at_check_config_and_run() {
    let redis = RedisServer::start_with(RedisOptions {
        password: Some("right horse battery".into()),
        ..RedisOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, redis: &str| {
        let path = dir.path().join(name);
        let text = format!(
            "admin: {{ socket: null }}\nlisten: 127.0.0.1:0\ncache:\n  backend: redis\n  redis: {redis}\n"
        );
        std::fs::write(&path, text).expect("write config");
        path.display().to_string()
    };
    let password = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write password");
        path.display().to_string()
    };
    let right = password("right.pass", "right horse battery\n");
    let wrong = password("wrong.pass", "wrong\n");
    let url = redis.url();
    let cases = [
        (
            write("scheme.yaml", r#"{ url: "http://127.0.0.1:6379" }"#),
            "not a Redis URL",
        ),
        (
            write(
                "inline.yaml",
                r#"{ url: "redis://:hunter2@127.0.0.1:6379" }"#,
            ),
            "credentials do not belong in the URL",
        ),
        (
            write("missing.yaml", "{ key_prefix: fleet }"),
            "cache.redis.url",
        ),
        (
            write(
                "wrong.yaml",
                &format!(r#"{{ url: "{url}", password_file: "{wrong}" }}"#),
            ),
            "refused the credentials",
        ),
        (
            write("none.yaml", &format!(r#"{{ url: "{url}" }}"#)),
            "refused the credentials",
        ),
    ];
    for (file, says) in &cases {
        let (code, out, err) = tlsrouter(vec!["check-config".into(), file.clone()]).await;
        assert_eq!(code, 64, "check-config {file}: {out}{err}");
        assert!(err.contains(says), "check-config {file}: {err}");
        assert!(!err.contains("hunter2"), "a password was printed: {err}");
        let run = tlsrouter(vec!["run".into(), "--config".into(), file.clone()]);
        let (code, _, err) = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .unwrap_or_else(|_| panic!("run {file} did not refuse to start"));
        assert_eq!(code, 64, "run {file}: {err}");
        assert!(err.contains(says), "run {file}: {err}");
        assert!(!err.contains("hunter2"), "a password was printed: {err}");
    }
    let good = write(
        "good.yaml",
        &format!(r#"{{ url: "{url}", password_file: "{right}" }}"#),
    );
    let (code, out, err) = tlsrouter(vec!["check-config".into(), good]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("answers"), "{out}");
    assert!(!out.contains("right horse") && !err.contains("right horse"));
}

#[tokio::test]
async fn an_mta_sts_policy_fetched_by_one_relay_serves_the_other_without_a_fetch() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let policy = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.test\r\nmax_age: 86400\r\n";
    let policy_server = HttpsServer::start(
        ca.leaf(&[POLICY_HOST], Validity::Current),
        Answer::policy(policy),
    )
    .await;
    let mx = tls_mx(&ca).await;
    let with_policy = |name: &str| {
        relay(name, &redis, &ca, &mx)
            .zone(one_mx_zone().record("_mta-sts.example.test", txt("v=STSv1; id=20261201;")))
            .set(
                "mta_sts.connect_to",
                serde_json::json!({ POLICY_HOST: policy_server.addr().to_string() }),
            )
    };
    let mut a = started(with_policy("relay-a")).await;
    let mut b = started(with_policy("relay-b")).await;

    assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
    assert_eq!(policy_server.requests(), 1, "relay a fetched the policy");
    a.daemon
        .wait_for_event(&[
            ("event", "fleet.wrote"),
            ("kind", "sts"),
            ("name", "example.test"),
        ])
        .await;

    assert_delivered(&send(b.smtp(), &["b@example.test"]).await);
    b.daemon
        .wait_for_event(&[("event", "mta_sts.from_fleet"), ("domain", "example.test")])
        .await;
    let line = b.daemon.wait_for_transaction().await;
    assert_eq!(line["policy"], "mta-sts:enforce", "{line}");
    assert_eq!(policy_server.requests(), 1, "relay b fetched nothing");
    assert!(mx.messages().iter().all(|m| m.tls.is_some()));
}

// ---------------------------------------------------------------------------------------
// What Redis holds is checked, not trusted

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A cache entry for example.test's MX as a relay writes it, seen by relay x.
fn entry_json(class: &str, last_seen: u64, expires_at: u64) -> serde_json::Value {
    serde_json::json!({
        "host": "mx.example.test", "addr": "127.0.0.1", "domains": ["example.test"],
        "class": class, "detail": "x", "tls_version": null, "cipher": null,
        "cert_not_after": null, "first_seen": last_seen, "last_seen": last_seen, "count": 1,
        "expires_at": expires_at, "pinned": false, "last_tls_at": null,
        "observed_by": { "relay": "relay-x" }
    })
}

#[tokio::test]
async fn entries_forged_into_redis_are_not_believed_and_the_relay_still_tries_tls() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = tls_mx(&ca).await;
    let mut a =
        started(relay("relay-a", &redis, &ca, &mx).set("cache.redis.near_ttl", "1ms")).await;
    let key = "tlsrouter:entry:mx.example.test|127.0.0.1";
    let decade = 10 * 365 * 86_400;
    let t = now();
    let mut far_future = entry_json("starttls-refused", t + decade, t + decade + 3600);
    far_future["first_seen"] = serde_json::json!(t);
    let mut pinned_by_hand = entry_json("no-starttls", t, t + 3600);
    pinned_by_hand["pinned"] = serde_json::json!(true);
    pinned_by_hand["pinned_at"] = serde_json::json!(t);
    let mut pinned_forever = pinned_by_hand.clone();
    pinned_forever["expires_at"] = serde_json::json!(t + decade);
    // Each would make every relay skip TLS with the host: entry, how it is written (kind,
    // pinned), and what the relay says of it.
    let forgeries = [
        (far_future, "failure", "0", "future", "last_seen"),
        (
            pinned_by_hand,
            "failure",
            "0",
            "pin-not-written",
            "not written as a pin",
        ),
        (
            pinned_forever,
            "pin",
            "1",
            "pin-too-long",
            "longer than cache.ttl.pin_max",
        ),
    ];
    for (n, (entry, kind, pinned, forged, said)) in forgeries.into_iter().enumerate() {
        // Nothing of the host's TLS remembered here, so only Redis's word could decide.
        a.daemon.ctl(&["cache", "flush", "mx.example.test"]).await;
        a.daemon
            .wait_for_event(&[("event", "fleet.flushed"), ("name", "mx.example.test")])
            .await;
        redis.cli(&[
            "HSET",
            key,
            "entry",
            &entry.to_string(),
            "kind",
            kind,
            "source",
            "relay:relay-x",
            "pinned",
            pinned,
            "expires_at",
            &(t + decade).to_string(),
        ]);

        assert_delivered(&send(a.smtp(), &["b@example.test"]).await);
        let got = mx.messages();
        assert_eq!(got.len(), n + 1);
        assert!(
            got[n].tls.is_some(),
            "{said}: delivered over TLS all the same"
        );
        let warning = a.daemon.wait_for_event(&[("event", "fleet.forged")]).await;
        assert_fields(
            &warning,
            &[
                ("level", "WARN"),
                ("name", "entry mx.example.test[127.0.0.1]"),
                ("forged", forged),
            ],
        );
        let why = field(&warning, "why").unwrap_or_default();
        assert!(why.contains(said), "{said:?} not in {why}");
        // The relay's own observation replaces the forgery in Redis.
        a.daemon
            .wait_for_event(&[
                ("event", "fleet.wrote"),
                ("name", "mx.example.test[127.0.0.1]"),
                ("class", "tls-verified"),
            ])
            .await;
    }
    let stats = a.daemon.ctl(&["stats"]).await;
    assert_eq!(stats["result"]["fleet_forged"], 3, "{stats}");
}

#[tokio::test]
async fn a_forged_mta_sts_policy_in_redis_never_weakens_an_enforced_one() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    // max_age 1: every message asks again, and so reads the fleet's copy first.
    let policy = "version: STSv1\r\nmode: enforce\r\nmx: mx.example.test\r\nmax_age: 1\r\n";
    let policy_server = HttpsServer::start(
        ca.leaf(&[POLICY_HOST], Validity::Current),
        Answer::policy(policy),
    )
    .await;
    let mx = server(
        loopback(1),
        0,
        crate::support::smtp_server::ServerBehaviour::plain(),
    )
    .await;
    let id = "20261207";
    let mut a = started(
        relay("relay-a", &redis, &ca, &mx)
            .zone(one_mx_zone().record("_mta-sts.example.test", txt(&format!("v=STSv1; id={id};"))))
            .set(
                "mta_sts.connect_to",
                serde_json::json!({ POLICY_HOST: policy_server.addr().to_string() }),
            ),
    )
    .await;
    let deferred = |sent: &crate::support::mta::Sent| {
        let told = crate::support::mta::verdict(&sent.rcpts[0], &sent.data);
        assert_eq!(told.code, 451, "{told:?}");
        assert!(told.text().contains("MTA-STS enforce"), "{told:?}");
    };

    deferred(&send(a.smtp(), &["b@example.test"]).await);
    a.daemon
        .wait_for_event(&[
            ("event", "fleet.wrote"),
            ("kind", "sts"),
            ("name", "example.test"),
        ])
        .await;

    let forged = |mode: &str, fetched_at: u64| {
        let raw = format!("version: STSv1\nmode: {mode}\nmx: mx.example.test\nmax_age: 604800\n");
        serde_json::json!({
            "domain": "example.test", "id": id, "mode": mode, "mx": ["mx.example.test"],
            "max_age": 604800, "fetched_at": fetched_at, "expires_at": fetched_at + 604800,
            "raw": raw
        })
        .to_string()
    };
    let t = now();
    // A policy that says mode none under the id of the enforce policy held here, and one
    // fetched ten years from now.
    for (json, said) in [
        (forged("none", t), "under the id"),
        (
            forged("testing", t + 10 * 365 * 86_400),
            "ahead of this relay's clock",
        ),
    ] {
        redis.cli(&["SET", "tlsrouter:sts:example.test", &json, "EX", "3600"]);
        deferred(&send(a.smtp(), &["b@example.test"]).await);
        let warning = a.daemon.wait_for_event(&[("event", "fleet.forged")]).await;
        assert_fields(
            &warning,
            &[
                ("name", "MTA-STS policy of example.test"),
                ("forged", "policy"),
            ],
        );
        let why = field(&warning, "why").unwrap_or_default();
        assert!(why.contains(said), "{said:?} not in {why}");
        a.daemon
            .wait_for_event(&[
                ("event", "fleet.wrote"),
                ("kind", "sts"),
                ("name", "example.test"),
            ])
            .await;
    }

    // A weaker policy under a new id, which the (unsigned) TXT record now names: only a
    // fetch over HTTPS may weaken what is held, so it is fetched; and it is still enforce.
    let renewed = "20261208";
    a.dns.replace_zone(one_mx_zone().record(
        "_mta-sts.example.test",
        txt(&format!("v=STSv1; id={renewed};")),
    ));
    let none = forged("none", now()).replace(id, renewed);
    redis.cli(&["SET", "tlsrouter:sts:example.test", &none, "EX", "3600"]);
    let fetched = policy_server.requests();
    deferred(&send(a.smtp(), &["b@example.test"]).await);
    assert_eq!(
        policy_server.requests(),
        fetched + 1,
        "fetched rather than taken from the fleet"
    );

    assert!(mx.messages().is_empty(), "nothing went in plain");
    assert!(mx.attempts().is_empty(), "not even MAIL FROM");
    let stats = a.daemon.ctl(&["stats"]).await;
    assert_eq!(stats["result"]["fleet_forged"], 2, "{stats}");
}

/// The count of `route` for `domain` in a `ctl domains --json` answer (0 when absent).
fn ledger_count(answer: &Value, domain: &str, route: &str) -> u64 {
    (answer["result"]["domains"].as_array().into_iter().flatten())
        .find(|d| d["domain"] == domain)
        .and_then(|d| d["counts"][route].as_u64())
        .unwrap_or(0)
}

/// `ctl domains` on `reader` once `writer` (the relay `name`) has shared what it counted:
/// after each of its writes to Redis, until the sum is 3 messages (at most five writes).
async fn summed_after_share(writer: &mut DaemonLab, reader: &DaemonLab, name: &str) -> Value {
    let wrote = [("event", "fleet.wrote"), ("kind", "ledger"), ("name", name)];
    let mut summed = Value::Null;
    for _ in 0..5 {
        writer.daemon.wait_for_event(&wrote).await;
        summed = reader.daemon.ctl(&["domains"]).await;
        if ledger_count(&summed, "example.test", "plain") == 3 {
            break;
        }
    }
    summed
}

/// Each relay's ledger goes to Redis apart, and `ctl domains` on any relay adds them up:
/// who got mail in plain this week is the fleet's answer, not one relay's. A ledger in
/// Redis that does not read is not believed, and counted.
#[tokio::test]
async fn the_ledger_of_every_relay_is_summed_on_read() {
    let redis = RedisServer::start().await;
    let ca = TestCa::new();
    let mx = server(
        loopback(1),
        0,
        crate::support::smtp_server::ServerBehaviour::plain(),
    )
    .await;
    let relay_with_ledger = |name| relay(name, &redis, &ca, &mx).set("ledger.share_interval", "1s");
    let mut a = started(relay_with_ledger("a")).await;
    let mut b = started(relay_with_ledger("b")).await;
    assert_delivered(&send(a.smtp(), &["x@example.test"]).await);
    assert_delivered(&send(b.smtp(), &["y@example.test"]).await);
    assert_delivered(&send(b.smtp(), &["z@example.test"]).await);
    a.daemon.wait_for_transaction().await;
    for _ in 0..2 {
        b.daemon.wait_for_transaction().await;
    }
    redis.cli(&[
        "SET",
        "tlsrouter:ledger:forger",
        "{\"version\":1,\"domains\":7}",
        "EX",
        "3600",
    ]);

    // What b has counted reaches Redis at its next share; a reads it when asked.
    let summed = summed_after_share(&mut b, &a, "b").await;
    assert_eq!(
        ledger_count(&summed, "example.test", "plain"),
        3,
        "{summed:#}"
    );
    assert_eq!(
        summed["result"]["fleet"]["relays"],
        serde_json::json!(["b"])
    );
    let detail = a.daemon.ctl(&["domain", "example.test"]).await;
    assert_eq!(
        detail["result"]["windows"][0]["counts"]["plain"], 3,
        "{detail:#}"
    );
    let local = a.daemon.ctl(&["stats"]).await;
    assert_eq!(
        local["result"]["delivered_plain"], 1,
        "each relay counts its own"
    );
    assert!(
        local["result"]["fleet_forged"].as_u64() >= Some(1),
        "{local}"
    );

    // And the other way round.
    let summed = summed_after_share(&mut a, &b, "a").await;
    assert_eq!(
        ledger_count(&summed, "example.test", "plain"),
        3,
        "{summed:#}"
    );

    // The ledgers are no cache: flushing the fleet's cache leaves them.
    let flushed = a.daemon.ctl(&["cache", "flush", "--all"]).await;
    assert_eq!(flushed["ok"], true, "{flushed}");
    let mut ledgers = redis.keys("tlsrouter:ledger:*").await;
    ledgers.sort();
    assert_eq!(
        ledgers,
        [
            "tlsrouter:ledger:a",
            "tlsrouter:ledger:b",
            "tlsrouter:ledger:forger"
        ]
    );
}
