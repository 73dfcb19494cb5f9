//! The admin endpoint served by the daemon: the JSON-lines protocol over the local
//! [`endpoint`] (a Unix socket, or a named pipe on Windows).

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::admin::endpoint;
use crate::admin::protocol::{ErrorKind, Request, Response, parse_request};
use crate::cache::shared::{Swept, Unfinished};
use crate::config::duration;
use crate::net::dns::Dnssec;
use crate::outcome::OutcomeClass;
use crate::probe::probe;
use crate::proxy::Proxy;
use crate::router::decision::Demand;
use crate::router::explain::{Question, assumed_entry, explain};

/// Requests longer than this are not from `tlsrouter ctl`.
const MAX_REQUEST: u64 = 64 * 1024;

/// Answers one request.
pub async fn handle(proxy: &Proxy, request: Request) -> Response {
    let cache = &proxy.outbound.cache;
    match request {
        Request::CacheList { class, domain } => {
            let entries: Vec<_> = cache
                .entries()
                .into_iter()
                .filter(|e| class.is_none_or(|c| e.classes().contains(&c)))
                .filter(|e| {
                    domain
                        .as_ref()
                        .is_none_or(|d| e.domains.iter().any(|x| x.eq_ignore_ascii_case(d)))
                })
                .collect();
            Response::ok(json!({ "now": cache.now(), "entries": entries }))
        }
        Request::CacheShow { target } => {
            let name = crate::net::dns::bare_name(&target);
            // With a fleet: what the shared cache holds too, beside this relay's view.
            let (fleet, swept) = match cache.shared() {
                Some(shared) => {
                    let (found, swept) = shared.find(&name.to_ascii_lowercase()).await;
                    (Some(found), Some(swept))
                }
                None => (None, None),
            };
            let entries = cache.find(&target);
            let complete = swept.is_none_or(|s| s.unfinished.is_none());
            if entries.is_empty() && fleet.as_ref().is_none_or(Vec::is_empty) && complete {
                return Response::error(ErrorKind::Failed, format!("nothing cached for {target}"));
            }
            Response::ok(json!({
                "now": cache.now(),
                "entries": entries,
                "fleet": fleet,
                "fleet_sweep": swept,
            }))
        }
        Request::CacheFlush { target, all } => {
            let flushed = match (target, all) {
                (None, true) => cache.flush_all(),
                (Some(target), false) => cache.flush(&target),
                _ => {
                    return Response::error(
                        ErrorKind::BadArguments,
                        "name what to flush (a host, an address or a domain), or give --all to flush everything",
                    );
                }
            };
            let fleet = match (flushed.fleet, cache.shared()) {
                (Some(answer), Some(shared)) => Some(
                    match tokio::time::timeout(shared.flush_wait(), answer).await {
                        Ok(Ok(swept)) => swept,
                        Ok(Err(_)) => Swept::not_begun(Unfinished::QueueFull),
                        Err(_) => Swept::not_begun(Unfinished::StillQueued),
                    },
                ),
                _ => None,
            };
            Response::ok(json!({ "flushed": flushed.here, "fleet": fleet }))
        }
        Request::CachePin {
            host,
            class,
            ttl,
            addrs,
        } => {
            let ttl = match duration::parse(&ttl) {
                Ok(ttl) => ttl,
                Err(e) => return Response::error(ErrorKind::BadArguments, e),
            };
            let (host, named) = match split_pin_target(&host) {
                Ok(target) => target,
                Err(e) => return Response::error(ErrorKind::BadArguments, e),
            };
            let mut addrs: Vec<IpAddr> = addrs.into_iter().chain(named).collect();
            // A recipient domain, as show and flush take: its MX hosts, each in full.
            if addrs.is_empty()
                && let Some(exchangers) = mx_hosts_of(proxy, &host).await
            {
                return pin_mx_hosts(proxy, &host, &exchangers, class, ttl).await;
            }
            if addrs.is_empty() {
                addrs = match addresses_to_pin(proxy, &host).await {
                    Ok(addrs) => addrs,
                    Err(e) => {
                        return Response::error(ErrorKind::Failed, no_address(&host, class, e));
                    }
                };
            }
            addrs.sort();
            addrs.dedup();
            let mut pinned = 0;
            for &addr in &addrs {
                match cache.pin(&host, Some(addr), class, ttl) {
                    Ok(n) => pinned += n,
                    Err(e) => return Response::error(ErrorKind::Failed, e.to_string()),
                }
            }
            Response::ok(json!({ "pinned": pinned, "host": host, "addrs": addrs }))
        }
        Request::RulesShow {} => {
            let rules = proxy.router.rules();
            let list: Vec<_> = rules
                .rules()
                .iter()
                .map(|r| json!({ "name": r.name, "line": r.line, "summary": summary(r) }))
                .collect();
            let last_reload = proxy.last_reload.lock().map(|r| r.clone()).unwrap_or(None);
            Response::ok(json!({
                "source": rules.source.display().to_string(),
                "rules": list,
                "last_reload": last_reload,
            }))
        }
        Request::RulesReload {} => match proxy.reload_rules("admin request") {
            Ok(count) => Response::ok(json!({ "rules": count })),
            Err(e) => Response::error(ErrorKind::Failed, e.to_string()),
        },
        Request::RulesExplain {
            rcpt,
            sender,
            mx,
            outcome,
            pinned,
            did_tls,
            requiretls,
        } => {
            let domain_of =
                |a: &str| (a.rsplit_once('@')).and_then(|(_, d)| crate::smtp::command::a_label(d));
            let Some(domain) = domain_of(&rcpt) else {
                return Response::error(
                    ErrorKind::BadArguments,
                    "rcpt must be user@domain, the domain a valid (IDNA) name",
                );
            };
            let sender_domain = sender.as_deref().and_then(domain_of);
            // Without an outcome, what this daemon knows of the host now.
            let (cached, memory) = match (&mx, outcome) {
                (Some(mx), None) => {
                    let host = crate::net::dns::bare_name(mx);
                    let entry = cache.find(&host).into_iter().find(|e| e.host == host);
                    let memory = entry.as_ref().map(|e| cache.tls_memory(e));
                    (entry, memory.unwrap_or_default())
                }
                (mx, outcome) => (
                    assumed_entry(mx.as_deref().unwrap_or(""), outcome.as_slice(), pinned),
                    did_tls,
                ),
            };
            // The domain's policy as this daemon holds it now.
            let policy = proxy.policies.cached(&domain);
            let host = crate::net::dns::bare_name(mx.as_deref().unwrap_or(""));
            let published = crate::outbound::hop::published(policy.as_deref(), &host);
            // DANE comes first, as the daemon would find it for that MX host now.
            let published = match &mx {
                Some(_) => proxy.outbound.dane_policy(&domain, &host).await,
                None => None,
            }
            .unwrap_or(published);
            let question = Question {
                recipient_domain: &domain,
                sender_domain: sender_domain.as_deref(),
                mx: mx.as_deref(),
                cached,
                memory,
                published,
                demand: match requiretls {
                    false => Demand::Nothing,
                    true => {
                        // As delivery would find it now: an MX answer that is secure and
                        // names the host.
                        let mx_answer = proxy.outbound.resolver.mail_exchangers_checked(&domain);
                        let name_authentic = match mx_answer.await {
                            Ok((hosts, Dnssec::Secure)) => hosts.iter().any(|h| h.name == host),
                            _ => false,
                        };
                        Demand::RequireTls { name_authentic }
                    }
                },
            };
            let answer = explain(proxy.router.rules(), &question);
            Response::ok(json!({
                "rule": answer.rule,
                "decision": {
                    "action": answer.decision.action(),
                    "text": answer.decision.to_string(),
                },
                "explanation": answer.text,
            }))
        }
        Request::Stats {} => {
            crate::admin::refresh_gauges(proxy);
            let mut snapshot = json!(proxy.stats.snapshot());
            snapshot["dane"] = json!(proxy.outbound.resolver.dane_state());
            Response::ok(snapshot)
        }
        Request::Sessions {} => Response::ok(json!({ "sessions": proxy.sessions.list() })),
        Request::Pool {} => Response::ok(json!({ "pool": proxy.outbound.pool.list() })),
        Request::Domains { .. } | Request::Domain { .. } | Request::Certs { .. } => {
            crate::admin::domains::answer(proxy, request).await
        }
        Request::Probe(target) => {
            if let Some(missing) = target.missing() {
                return Response::error(ErrorKind::BadArguments, missing);
            }
            let report = probe(
                &proxy.outbound,
                &proxy.router.rules(),
                &proxy.policies,
                &target,
                true,
            )
            .await;
            Response::ok(json!(report))
        }
        Request::PolicyList {}
        | Request::PolicyShow { .. }
        | Request::PolicyRefresh { .. }
        | Request::PolicyFlush { .. }
        | Request::Tlsrpt {}
        | Request::TlsrptSend { .. } => handle_policy(proxy, request).await,
    }
}

/// The MTA-STS and TLS-RPT commands.
async fn handle_policy(proxy: &Proxy, request: Request) -> Response {
    use crate::policy::mta_sts::{PolicyLookup, StsPolicy};
    let now = proxy.outbound.cache.now();
    let policies = &proxy.policies;
    match request {
        Request::PolicyList {} => {
            let held = policies.policies();
            let held: Vec<&StsPolicy> = held.iter().map(|p| p.as_ref()).collect();
            Response::ok(json!({ "now": now, "policies": held }))
        }
        Request::PolicyShow { domain } => match policies.cached(&domain) {
            Some(policy) => Response::ok(json!({ "now": now, "policies": [&*policy] })),
            None => Response::error(
                ErrorKind::Failed,
                format!("no MTA-STS policy is held for {domain}"),
            ),
        },
        Request::PolicyRefresh { domain } => match policies.refresh(&domain).await {
            PolicyLookup::Found(policy) => {
                Response::ok(json!({ "now": now, "policies": [&*policy] }))
            }
            PolicyLookup::NotPublished => Response::error(
                ErrorKind::Failed,
                format!("{domain} publishes no usable _mta-sts record"),
            ),
            PolicyLookup::NotYet => Response::error(
                ErrorKind::Failed,
                format!("{domain}: the fetch did not finish"),
            ),
            PolicyLookup::Unavailable(error) => {
                Response::error(ErrorKind::Failed, format!("{domain}: {error}"))
            }
        },
        Request::PolicyFlush { domain } => {
            Response::ok(json!({ "flushed": usize::from(policies.flush(&domain)) }))
        }
        Request::Tlsrpt {} => {
            let today = proxy.tls_reports.today();
            Response::ok(json!({
                "day": today.date(),
                "domains": proxy.tls_reports.counts(today),
            }))
        }
        Request::TlsrptSend { domain } => {
            let deliveries = proxy.tls_reports.send_now(domain.as_deref()).await;
            let reports: Vec<serde_json::Value> = (deliveries.iter())
                .map(|d| {
                    json!({
                        "domain": d.domain,
                        "rua": d.rua.to_string(),
                        "file": d.file,
                        "sent": d.result.is_ok(),
                        "error": d.result.as_ref().err().map(ToString::to_string),
                    })
                })
                .collect();
            Response::ok(json!({ "reports": reports }))
        }
        _ => Response::error(ErrorKind::UnknownCommand, "not a policy command"),
    }
}

/// `name[address]` (as in a next-hop text) or a bare name.
fn split_pin_target(target: &str) -> Result<(String, Option<IpAddr>), String> {
    let Some((name, rest)) = target.split_once('[') else {
        return Ok((target.to_string(), None));
    };
    let addr = rest
        .strip_suffix(']')
        .and_then(|a| a.parse::<IpAddr>().ok())
        .filter(|_| !name.is_empty())
        .ok_or_else(|| {
            format!("{target:?}: expected HOST[ADDRESS], like mx.example.com[192.0.2.7]")
        })?;
    Ok((name.to_string(), Some(addr)))
}

/// Every address of `host` a message could go to: the cached ones and those DNS gives now
/// (an admin pins a broken host before the next message meets it).
/// The MX hosts of `name` when it is a domain whose mail goes to other hosts; `None` for a
/// host (no MX records: its implicit MX is itself) or a name DNS does not know.
async fn mx_hosts_of(proxy: &Proxy, name: &str) -> Option<Vec<String>> {
    let hosts = proxy.outbound.resolver.mail_exchangers(name).await.ok()?;
    let names: Vec<String> = hosts.into_iter().map(|h| h.name).collect();
    let itself = names.len() == 1 && names[0].eq_ignore_ascii_case(name.trim_end_matches('.'));
    (!names.is_empty() && !itself).then_some(names)
}

/// Pins every address of each MX host of `domain`; a host without one is left out and
/// said so.
async fn pin_mx_hosts(
    proxy: &Proxy,
    domain: &str,
    exchangers: &[String],
    class: OutcomeClass,
    ttl: std::time::Duration,
) -> Response {
    let cache = &proxy.outbound.cache;
    let (mut pinned, mut hosts, mut without) = (0, Vec::new(), Vec::new());
    for host in exchangers {
        let mut addrs = match addresses_to_pin(proxy, host).await {
            Ok(addrs) => addrs,
            Err(why) => {
                without.push(json!({ "host": host, "why": why }));
                continue;
            }
        };
        addrs.sort();
        addrs.dedup();
        for &addr in &addrs {
            match cache.pin(host, Some(addr), class, ttl) {
                Ok(n) => pinned += n,
                Err(e) => return Response::error(ErrorKind::Failed, e.to_string()),
            }
        }
        hosts.push(json!({ "host": host, "addrs": addrs }));
    }
    if hosts.is_empty() {
        return Response::error(
            ErrorKind::Failed,
            format!(
                "no MX host of {domain} has an address to pin; name one: tlsrouter ctl cache pin HOST[ADDRESS] {class}"
            ),
        );
    }
    Response::ok(json!({
        "pinned": pinned,
        "domain": domain,
        "hosts": hosts,
        "without_address": without,
    }))
}

async fn addresses_to_pin(proxy: &Proxy, host: &str) -> Result<Vec<IpAddr>, String> {
    let mut addrs = proxy.outbound.cache.cached_addrs(host);
    match proxy.outbound.resolver.addresses(host).await {
        Ok(found) => addrs.extend(found),
        Err(e) if addrs.is_empty() => return Err(e.to_string()),
        // The cached addresses are still worth pinning.
        Err(_) => {}
    }
    Ok(addrs)
}

fn no_address(host: &str, class: OutcomeClass, why: String) -> String {
    format!(
        "{host} is not cached and DNS gives no address for it ({why}); name the address: \
         tlsrouter ctl cache pin {host}[ADDRESS] {class}, or --addr ADDRESS"
    )
}

fn summary(rule: &crate::rules::Rule) -> String {
    let c = &rule.conditions;
    let list = |v: &[crate::rules::pattern::DomainPattern]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut parts = Vec::new();
    if !c.domains.is_empty() {
        parts.push(format!("domains={}", list(&c.domains)));
    }
    if !c.senders.is_empty() {
        parts.push(format!("senders={}", list(&c.senders)));
    }
    if !c.mx.is_empty() {
        parts.push(format!("mx={}", list(&c.mx)));
    }
    if !c.outcome.is_empty() {
        let classes: Vec<&str> = c.outcome.iter().map(|o| o.name()).collect();
        parts.push(format!("outcome={}", classes.join(",")));
    }
    // As the rule file spells each value.
    let p = &rule.policy;
    parts.push(format!(
        "tls={} verify={} min_tls={} legacy_tls={}",
        spelt(p.tls),
        spelt(p.verify),
        spelt(p.min_tls),
        spelt(p.legacy_tls)
    ));
    if p.tls != crate::rules::TlsMode::Require && !p.fallback_on.is_empty() {
        let classes: Vec<&str> = p.fallback_on.iter().map(|o| o.name()).collect();
        parts.push(format!("fallback_on={}", classes.join(",")));
    }
    parts.join(" ")
}

/// A rule setting's value as the rule file spells it.
fn spelt(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(word)) => word,
        _ => "?".to_string(),
    }
}

/// Serves the admin endpoint until the task is dropped: each connection on a task of its
/// own, one request per line, one answer per line.
pub async fn serve(proxy: Arc<Proxy>, mut listener: endpoint::Listener) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                // Out of descriptors, say: wait for some to come back instead of spinning.
                tracing::warn!("admin socket: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(converse(proxy.clone(), stream));
    }
}

/// Answers the requests of one connection until it ends or sends a line too long.
async fn converse(proxy: Arc<Proxy>, stream: impl AsyncRead + AsyncWrite) {
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let limited = (&mut lines).take(MAX_REQUEST).read_line(&mut line).await;
        let response = match limited {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') => {
                let r = Response::error(ErrorKind::BadArguments, "request line too long");
                let _ = send(&mut write, &r).await;
                return;
            }
            Ok(_) => match parse_request(line.trim()) {
                Ok(request) => handle(&proxy, request).await,
                Err(response) => response,
            },
        };
        if send(&mut write, &response).await.is_err() {
            return;
        }
    }
}

async fn send(write: &mut (impl AsyncWrite + Unpin), response: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    write.write_all(text.as_bytes()).await
}
