//! `tlsrouter ctl`: sends one request to the admin socket and shows the answer, as a table
//! for people or as JSON for scripts.

use std::path::Path;

use serde_json::Value;

use crate::admin::endpoint;
use crate::admin::protocol::{Request, Response};
use crate::admin::table::{relative, row, table, text};
use crate::cache::shared::Unfinished;

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("tlsrouter is not running (no admin socket at {0})")]
    NotRunning(String),
    #[error("{0} is not a socket (give the daemon's admin.socket with --socket)")]
    NotASocket(String),
    #[error("permission denied on the admin socket {0} (are you in its group?)")]
    Permission(String),
    /// The io error is in the message, not a `source()`, so a chain prints it once.
    #[error("admin socket {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("admin socket {0}: the daemon sent no valid answer")]
    BadAnswer(String),
}

/// Sends `request` to the daemon's admin endpoint at `socket` and reads its answer.
pub async fn ask(socket: &Path, request: &Request) -> Result<Response, CtlError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let path = socket.display().to_string();
    let stream = endpoint::connect(socket).await?;
    let (read, mut write) = tokio::io::split(stream);
    let mut line = serde_json::to_string(request).map_err(|_| CtlError::BadAnswer(path.clone()))?;
    line.push('\n');
    let io = |error| CtlError::Io {
        path: path.clone(),
        error,
    };
    write.write_all(line.as_bytes()).await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    serde_json::from_str(&answer).map_err(|_| CtlError::BadAnswer(path))
}

/// Why a walk over the fleet's shared cache stopped early, in words; `None` when it did not.
fn unfinished(swept: &Value) -> Option<&'static str> {
    let why: Unfinished = serde_json::from_value(swept.get("unfinished")?.clone()).ok()?;
    Some(why.why())
}

/// The human form of a successful answer.
pub fn render(request: &Request, result: &Value) -> String {
    if let Some(rendered) = crate::admin::domains::render(request, result) {
        return rendered;
    }
    let now = result.get("now").and_then(Value::as_u64).unwrap_or(0);
    match request {
        Request::CacheList { .. } => cache_table(result, now),
        Request::CacheShow { .. } => {
            let mut out = cache_table(result, now);
            if let Some(fleet) = result["fleet"].as_array() {
                out.push_str("\nin the fleet's shared cache:\n");
                out.push_str(&cache_table(&serde_json::json!({ "entries": fleet }), now));
                if let Some(why) = unfinished(&result["fleet_sweep"]) {
                    out.push_str(&format!(
                        "(not all of it: {why}; {} keys looked at)\n",
                        result["fleet_sweep"]["scanned"]
                    ));
                }
            }
            out
        }
        Request::CacheFlush { .. } => {
            let mut out = format!("flushed {} here\n", entries(&result["flushed"]));
            let fleet = &result["fleet"];
            match unfinished(fleet) {
                _ if fleet.is_null() => {}
                None => out.push_str(&format!(
                    "the fleet's shared cache: {} keys deleted of {} looked at\n",
                    fleet["matched"], fleet["scanned"]
                )),
                Some(why) => out.push_str(&format!(
                    "the fleet's shared cache: not finished, {why}; {} keys deleted of {} \
                     looked at. Run the flush again\n",
                    fleet["matched"], fleet["scanned"]
                )),
            }
            out
        }
        Request::CachePin { class, .. } if result["domain"].is_string() => {
            let hosts: Vec<String> = (result["hosts"].as_array().into_iter().flatten())
                .map(|h| {
                    let addrs: Vec<String> = (h["addrs"].as_array().into_iter().flatten())
                        .map(text)
                        .collect();
                    format!("{} at {}", text(&h["host"]), addrs.join(", "))
                })
                .collect();
            let mut out = format!(
                "pinned {} as {class}: the MX hosts of {}: {}\n",
                entries(&result["pinned"]),
                text(&result["domain"]),
                hosts.join("; ")
            );
            for h in result["without_address"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "not pinned: {} ({})\n",
                    text(&h["host"]),
                    text(&h["why"])
                ));
            }
            out
        }
        Request::CachePin { class, .. } => {
            let addrs: Vec<String> = result["addrs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            format!(
                "pinned {} as {class}: {} at {}\n",
                entries(&result["pinned"]),
                text(&result["host"]),
                addrs.join(", ")
            )
        }
        Request::RulesShow {} => rules_table(result),
        Request::RulesReload {} => {
            let count = result["rules"].as_u64().unwrap_or(0);
            format!(
                "rules reloaded: {}\n",
                crate::rules::in_force(count as usize)
            )
        }
        Request::RulesExplain { .. } => result["explanation"].as_str().unwrap_or("").to_string(),
        Request::Stats {} => stats_lines(result),
        Request::Sessions {} => sessions_table(result),
        Request::Pool {} => pool_table(result),
        Request::Probe(_) => {
            match serde_json::from_value::<crate::probe::ProbeReport>(result.clone()) {
                Ok(report) => crate::probe::render(&report),
                Err(_) => format!("{result:#}\n"),
            }
        }
        Request::PolicyList {} | Request::PolicyShow { .. } | Request::PolicyRefresh { .. } => {
            policy_table(result, now)
        }
        Request::PolicyFlush { .. } => format!("flushed {} policies\n", result["flushed"]),
        Request::Tlsrpt {} => tlsrpt_table(result),
        Request::TlsrptSend { .. } => tlsrpt_sent_table(result),
        Request::Domains { .. } | Request::Domain { .. } | Request::Certs { .. } => {
            format!("{result:#}\n")
        }
    }
}

fn tlsrpt_sent_table(result: &Value) -> String {
    let reports = result["reports"].as_array().into_iter().flatten();
    let mut rows = vec![row(&["DOMAIN", "RUA", "RESULT"])];
    for r in reports {
        let outcome = match r["sent"].as_bool() {
            Some(true) => "sent".to_string(),
            _ => format!("not sent: {}", text(&r["error"])),
        };
        rows.push(vec![text(&r["domain"]), text(&r["rua"]), outcome]);
    }
    if rows.len() == 1 {
        return "no report sent: nothing counted today for a domain that publishes a TLS-RPT record\n"
            .to_string();
    }
    table(&rows)
}

fn policy_table(result: &Value, now: u64) -> String {
    let mut rows = vec![row(&[
        "DOMAIN", "MODE", "ID", "MX", "MAX AGE", "FETCHED", "EXPIRES",
    ])];
    for p in result["policies"].as_array().into_iter().flatten() {
        let mx: Vec<&str> = p["mx"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        rows.push(vec![
            text(&p["domain"]),
            text(&p["mode"]),
            text(&p["id"]),
            mx.join(","),
            format!("{}s", text(&p["max_age"])),
            relative(now, p["fetched_at"].as_u64().unwrap_or(0)),
            relative(now, p["expires_at"].as_u64().unwrap_or(0)),
        ]);
    }
    table(&rows)
}

fn tlsrpt_table(result: &Value) -> String {
    let mut rows = vec![row(&["DOMAIN", "SUCCESSES", "FAILURES", "BY RESULT TYPE"])];
    for d in result["domains"].as_array().into_iter().flatten() {
        let types: Vec<String> = d["failure_types"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, count)| format!("{name}={count}"))
            .collect();
        rows.push(vec![
            text(&d["domain"]),
            text(&d["successes"]),
            text(&d["failures"]),
            types.join(" "),
        ]);
    }
    format!(
        "TLS-RPT counts for {} (UTC)\n{}",
        text(&result["day"]),
        table(&rows)
    )
}

fn cache_table(result: &Value, now: u64) -> String {
    let listed = || result["entries"].as_array().into_iter().flatten();
    // Only a relay of a fleet has anyone else to name.
    let fleet = listed().any(|e| e["observed_by"].is_object());
    let mut rows = vec![row(&[
        "HOST",
        "ADDRESS",
        "DOMAINS",
        "CLASS",
        "TLS",
        "CERT SUBJECT",
        "CERT EXPIRES",
        "LAST SEEN",
        "EXPIRES",
    ])];
    if fleet {
        rows[0].push("SEEN BY".to_string());
    }
    for e in result["entries"].as_array().into_iter().flatten() {
        let domains: Vec<&str> = e["domains"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let mut class = e["class"].as_str().unwrap_or("").to_string();
        if let Some(cert) = e["cert_problem"].as_str() {
            class = format!("{class} ({cert})");
        }
        if e["pinned"].as_bool() == Some(true) {
            class.push_str(" [pinned]");
        }
        let mut cells = vec![
            text(&e["host"]),
            text(&e["addr"]),
            domains.join(","),
            class,
            text(&e["tls_version"]),
            text(&e["cert_subject"]),
            text(&e["cert_not_after"]),
            relative(now, e["last_seen"].as_u64().unwrap_or(0)),
            relative(now, e["expires_at"].as_u64().unwrap_or(0)),
        ];
        if fleet {
            cells.push(seen_by(e));
        }
        rows.push(cells);
    }
    table(&rows)
}

/// Where an entry came from: this relay or another of the fleet (and its address).
fn seen_by(e: &Value) -> String {
    let by = &e["observed_by"];
    let Some(relay) = by["relay"].as_str() else {
        return "local".to_string();
    };
    let who = match by["source"].as_str() {
        Some(source) => format!("{relay} from {source}"),
        None => relay.to_string(),
    };
    if e["shared"].as_bool() == Some(true) {
        format!("shared: {who}")
    } else {
        format!("local: {who}")
    }
}

fn rules_table(result: &Value) -> String {
    let mut rows = vec![row(&["#", "NAME", "LINE", "WHAT"])];
    for (i, r) in result["rules"].as_array().into_iter().flatten().enumerate() {
        rows.push(vec![
            (i + 1).to_string(),
            text(&r["name"]),
            text(&r["line"]),
            text(&r["summary"]),
        ]);
    }
    format!("rules from {}\n{}", text(&result["source"]), table(&rows))
}

fn stats_lines(result: &Value) -> String {
    let mut out = String::new();
    for key in [
        "sessions",
        "active_sessions",
        "transactions",
        "delivered_tls_verified",
        "delivered_tls_unverified",
        "delivered_tls_legacy",
        "delivered_plain",
        "deferrals",
        "recipients_split",
        "plain_domains",
        "expiring_certificates",
        "downgrades",
        "cache_hits",
        "cache_entries",
        "sts_fetches",
        "sts_fetch_failures",
        "sts_enforced_deferrals",
        "requiretls_delivered",
        "requiretls_refused",
        "policy_waived_by_sender",
        "local_errors",
        "pool_reuses",
        "pool_dead",
        "pool_idle",
        "tls_full_handshakes",
        "tls_resumed_handshakes",
    ] {
        out.push_str(&format!("{:<26}{}\n", key.replace('_', " "), result[key]));
    }
    out.push_str(&format!("{:<26}{}\n", "dane", text(&result["dane"])));
    out.push_str(&shared_cache_lines(result));
    for pair in result["fallbacks"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<26}{}\n",
            format!("fallback {}", text(&pair[0])),
            pair[1]
        ));
    }
    out
}

/// The fleet's shared cache, when there is one (any call or lookup made).
fn shared_cache_lines(result: &Value) -> String {
    let number = |key: &str| result[key].as_u64().unwrap_or(0);
    let (hits, misses) = (number("near_cache_hits"), number("near_cache_misses"));
    if hits + misses + number("redis_calls") + number("redis_errors") == 0 {
        return String::new();
    }
    let rate = (hits * 100).checked_div(hits + misses).unwrap_or(0);
    let connected = if result["redis_connected"].as_i64() == Some(1) {
        "up"
    } else {
        "down"
    };
    let round_trip = number("redis_round_trip_us") as f64 / 1000.0;
    let mut out = String::new();
    for (key, value) in [
        ("redis", connected.to_string()),
        ("redis calls", number("redis_calls").to_string()),
        ("redis round trip", format!("{round_trip:.2} ms (mean)")),
        ("redis errors", number("redis_errors").to_string()),
        (
            "near cache hits",
            format!("{hits} ({rate}% of {})", hits + misses),
        ),
        ("near cache misses", misses.to_string()),
        (
            "split-source downgrades",
            number("split_source_downgrades").to_string(),
        ),
        ("forged, not believed", number("fleet_forged").to_string()),
    ] {
        out.push_str(&format!("{key:<26}{value}\n"));
    }
    out
}

fn sessions_table(result: &Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rows = vec![row(&[
        "ID",
        "CLIENT",
        "STATE",
        "ORIGINAL DESTINATION",
        "NEXT HOP",
        "AGE",
    ])];
    for s in result["sessions"].as_array().into_iter().flatten() {
        rows.push(vec![
            text(&s["id"]),
            text(&s["client"]),
            text(&s["state"]),
            text(&s["original_destination"]),
            text(&s["next_hop"]),
            relative(now, s["started"].as_u64().unwrap_or(0)).replace(" ago", ""),
        ]);
    }
    table(&rows)
}

fn pool_table(result: &Value) -> String {
    let mut rows = vec![row(&["SERVER", "ADDR", "TLS", "MESSAGES", "IDLE", "AGE"])];
    let seconds = |ms: &Value| format!("{:.1}s", ms.as_u64().unwrap_or(0) as f64 / 1000.0);
    for c in result["pool"].as_array().into_iter().flatten() {
        rows.push(vec![
            text(&c["server"]),
            text(&c["addr"]),
            text(&c["tls"]),
            text(&c["messages"]),
            seconds(&c["idle_ms"]),
            seconds(&c["age_ms"]),
        ]);
    }
    table(&rows)
}

/// "1 entry", "3 entries".
fn entries(count: &serde_json::Value) -> String {
    match count.as_u64() {
        Some(1) => "1 entry".to_string(),
        _ => format!("{count} entries"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_a_remote_are_shown_escaped() {
        let subject = Value::String("CN=mx\u{1b}[2J\nevil".into());
        assert_eq!(text(&subject), "CN=mx\\u{1b}[2J\\nevil");
        assert_eq!(text(&Value::Null), "-");
    }

    /// Every counter `ctl stats --json` gives, `ctl stats` shows too (the fleet's only
    /// with a shared cache, the fallbacks by class).
    #[test]
    fn stats_show_every_counter_of_the_snapshot() {
        let snapshot = serde_json::to_value(crate::stats::Stats::default().snapshot());
        let snapshot = snapshot.expect("a snapshot");
        let mut shown = snapshot.clone();
        shown["redis_calls"] = 1.into();
        let text = stats_lines(&shown);
        let fleet = ["redis_", "near_cache", "split_source", "fleet_"];
        for key in snapshot.as_object().expect("fields").keys() {
            if key == "fallbacks" || fleet.iter().any(|f| key.starts_with(f)) {
                continue;
            }
            assert!(
                text.contains(&key.replace('_', " ")),
                "{key} not shown:\n{text}"
            );
        }
    }

    #[test]
    fn relative_times_read_naturally() {
        assert_eq!(relative(1000, 1000 + 42 * 60), "in 42m");
        assert_eq!(relative(100_000, 100_000 - 3 * 3600), "3h ago");
        assert_eq!(relative(10, 12), "now");
        assert_eq!(relative(0, 7 * 86_400), "in 7d");
        assert_eq!(relative(1, 7 * 86_400), "in 7d");
        assert_eq!(relative(0, 3599), "in 1h");
        assert_eq!(relative(100, 40), "1m ago");
    }

    #[test]
    fn counts_of_entries_read_naturally() {
        assert_eq!(entries(&serde_json::json!(1)), "1 entry");
        assert_eq!(entries(&serde_json::json!(0)), "0 entries");
        assert_eq!(entries(&serde_json::json!(3)), "3 entries");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&[row(&["A", "BB"]), row(&["CCC", "D"])]);
        assert_eq!(t, "A    BB\nCCC  D\n");
    }
}
