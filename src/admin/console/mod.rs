//! The web console: the ledger (who got mail in plain, and why), one domain with what
//! `explain` says and a probe, the cache (search, flush, pin), the rules in force. Pages
//! made here from the same answers `ctl` gets (flush and pin are `ctl`'s own requests,
//! their results in `ctl`'s words); no script, one stylesheet, both in the binary.
//!
//! Who may use it: see `session`. Every response forbids framing, scripts and any source
//! but this one (Content-Security-Policy), and caching. No request reads a file or makes
//! the relay connect anywhere, but a probe of a recipient domain.

mod pages;
mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::admin::domains;
use crate::admin::http::{self, Asked, Limits, respond};
use crate::admin::protocol::{Request, Response as Answer};
use crate::admin::server::handle;
use crate::outcome::OutcomeClass;
use crate::probe::{ProbeReport, ProbeTarget};
use crate::proxy::Proxy;

pub use session::COOKIE;
use session::{Session, Sessions};

/// Connections served at once, and how long one may take: a probe waits for the remote
/// servers, as `ctl probe` does.
pub const LIMITS: Limits = Limits {
    connections: 16,
    deadline: Duration::from_secs(120),
};

const STYLESHEET: &str = include_str!("console.css");

/// No script, no frame, nothing from elsewhere; forms post only here.
const POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
    form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

struct Console {
    proxy: Arc<Proxy>,
    sessions: Sessions,
}

/// Serves the console on `listener`; `token` is what the login form asks for.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, token: String) {
    let console = Arc::new(Console {
        proxy,
        sessions: Sessions::new(&token),
    });
    http::serve(listener, "web console", LIMITS, move |asked| {
        let console = console.clone();
        async move { secured(answer(&console, asked).await) }
    })
    .await;
}

async fn answer(console: &Console, asked: Asked) -> Response<Full<Bytes>> {
    let method = asked.head.method.clone();
    let path = asked.head.uri.path().to_string();
    match (&method, path.as_str()) {
        (&Method::GET, "/static/console.css") => respond(200, "text/css", STYLESHEET),
        (&Method::GET, "/login") => page(200, pages::login(false)),
        (&Method::POST, "/login") => {
            let form = form(&asked);
            let token = form.get("token").map_or("", String::as_str);
            match console.sessions.login(token) {
                Some(id) => {
                    tracing::info!(target: "tlsrouter::admin", event = "console.login", "web console: logged in");
                    let mut response = redirect("/");
                    set_cookie(&mut response, &session::cookie(&id));
                    response
                }
                None => {
                    tracing::warn!(target: "tlsrouter::admin", event = "console.login_refused", "web console: a login with a wrong token was refused");
                    page(401, pages::login(true))
                }
            }
        }
        _ => {
            let cookie = asked.head.headers.get(header::COOKIE);
            let cookie = cookie.and_then(|c| c.to_str().ok());
            match console.sessions.find(cookie) {
                Some((id, session)) => signed_in(console, &asked, &id, &session).await,
                None if method == Method::GET => redirect("/login"),
                None => respond(403, "text/plain", "log in first\n"),
            }
        }
    }
}

/// A request of a logged-in browser; a POST only with the session's CSRF token.
async fn signed_in(
    console: &Console,
    asked: &Asked,
    id: &str,
    session: &Session,
) -> Response<Full<Bytes>> {
    let proxy = &console.proxy;
    let query = query(asked);
    let path = asked.head.uri.path();
    if asked.head.method == Method::POST {
        let form = form(asked);
        if form.get("csrf") != Some(&session.csrf) {
            return respond(
                403,
                "text/plain",
                "the form's CSRF token is missing or wrong: reload the page and send it again\n",
            );
        }
        return match path {
            "/logout" => {
                console.sessions.logout(id);
                let mut response = redirect("/login");
                set_cookie(&mut response, &session::expired_cookie());
                response
            }
            "/probe" => {
                probe(
                    proxy,
                    session,
                    form.get("domain").map_or("", String::as_str),
                )
                .await
            }
            "/cache/flush" => {
                let target = form.get("target").cloned().unwrap_or_default();
                let request = Request::CacheFlush {
                    target: Some(target),
                    all: false,
                };
                let notice = as_ctl_says(&request, handle(proxy, request.clone()).await);
                cache_page(proxy, session, form.get("q"), Some(notice))
            }
            "/cache/pin" => {
                let class = form
                    .get("class")
                    .and_then(|c| c.parse::<OutcomeClass>().ok());
                let notice = match class {
                    Some(class) => {
                        let request = Request::CachePin {
                            host: form.get("host").cloned().unwrap_or_default(),
                            class,
                            ttl: form.get("ttl").cloned().unwrap_or_else(|| "1d".into()),
                            addrs: Vec::new(),
                        };
                        as_ctl_says(&request, handle(proxy, request.clone()).await)
                    }
                    None => Err("choose an outcome class to pin".to_string()),
                };
                cache_page(proxy, session, form.get("q"), Some(notice))
            }
            _ => respond(404, "text/plain", "no such form\n"),
        };
    }
    if asked.head.method != Method::GET {
        return respond(405, "text/plain", "GET or POST only\n");
    }
    let now = proxy.outbound.cache.now();
    match path {
        "/" => {
            let day = domains::domains(proxy, now, Some("24h"), None).await;
            let certs = domains::certs(proxy, now, "14d").await;
            match (day, certs) {
                (Ok(day), Ok(certs)) => page(200, pages::dashboard(session, &day, &certs)),
                _ => respond(500, "text/plain", "the ledger could not be read\n"),
            }
        }
        "/domain" => {
            let name = query.get("name").map_or("", String::as_str);
            if !is_domain_name(name) {
                return page(
                    400,
                    pages::problem(session, &format!("{name:?} is not a domain name")),
                );
            }
            let explained = handle(
                proxy,
                Request::RulesExplain {
                    rcpt: format!("postmaster@{name}"),
                    sender: None,
                    mx: None,
                    outcome: None,
                    pinned: false,
                    did_tls: Default::default(),
                    requiretls: false,
                },
            )
            .await;
            let explanation = explained
                .result
                .as_ref()
                .and_then(|r| r["explanation"].as_str())
                .unwrap_or_default()
                .to_string();
            let ledger = domains::one_domain(proxy, now, name).await.ok();
            page(
                200,
                pages::domain(session, name, ledger.as_ref(), &explanation),
            )
        }
        "/cache" => cache_page(proxy, session, query.get("q"), None),
        "/rules" => {
            let shown = handle(proxy, Request::RulesShow {}).await;
            page(
                200,
                pages::rules(session, shown.result.as_ref().unwrap_or(&Value::Null)),
            )
        }
        _ => respond(404, "text/plain", "no such page\n"),
    }
}

/// `probe` of a recipient domain, as `ctl probe DOMAIN`: the one request that makes the
/// relay connect anywhere.
async fn probe(proxy: &Proxy, session: &Session, domain: &str) -> Response<Full<Bytes>> {
    if !is_domain_name(domain) {
        return page(
            400,
            pages::problem(session, &format!("{domain:?} is not a domain name")),
        );
    }
    let target = ProbeTarget {
        domain: Some(domain.to_string()),
        mx: None,
        port: None,
        no_tls: false,
    };
    let answer = handle(proxy, Request::Probe(target)).await;
    let report = answer
        .result
        .and_then(|r| serde_json::from_value::<ProbeReport>(r).ok());
    match report {
        Some(report) => page(200, pages::probe(session, domain, &report)),
        None => page(502, pages::problem(session, "the probe gave no report")),
    }
}

fn cache_page(
    proxy: &Proxy,
    session: &Session,
    q: Option<&String>,
    notice: Option<Result<String, String>>,
) -> Response<Full<Bytes>> {
    let q = q.map_or("", String::as_str).trim().to_ascii_lowercase();
    let entries: Vec<_> = (proxy.outbound.cache.entries().into_iter())
        .filter(|e| {
            q.is_empty()
                || e.host.to_ascii_lowercase().contains(&q)
                || e.addr.to_string().contains(&q)
                || e.domains
                    .iter()
                    .any(|d| d.to_ascii_lowercase().contains(&q))
        })
        .collect();
    let now = proxy.outbound.cache.now();
    page(
        200,
        pages::cache(session, &q, &entries, now, notice.as_ref()),
    )
}

/// What `ctl` prints for this answer: its table on success, its error otherwise.
fn as_ctl_says(request: &Request, answer: Answer) -> Result<String, String> {
    match (answer.ok, answer.result, answer.error) {
        (true, Some(result), _) => Ok(crate::admin::client::render(request, &result)),
        (_, _, Some(error)) => Err(error.message),
        _ => Err("no answer".to_string()),
    }
}

/// A name a probe may be asked for: a DNS name (an internationalised one by its A-labels)
/// of letters, digits and hyphens, with a dot, not an address.
fn is_domain_name(name: &str) -> bool {
    let Some(name) = crate::smtp::command::a_label(name) else {
        return false;
    };
    let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
    name.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && !labels
            .last()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
}

fn form(asked: &Asked) -> HashMap<String, String> {
    let body = asked.body.as_deref().unwrap_or_default();
    form_urlencoded::parse(body).into_owned().collect()
}

fn query(asked: &Asked) -> HashMap<String, String> {
    let query = asked.head.uri.query().unwrap_or_default();
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn page(status: u16, markup: maud::Markup) -> Response<Full<Bytes>> {
    respond(status, "text/html; charset=utf-8", markup.into_string())
}

fn redirect(to: &'static str) -> Response<Full<Bytes>> {
    let mut response = respond(303, "text/plain", "");
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    response
}

fn set_cookie(response: &mut Response<Full<Bytes>>, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
}

/// The headers every answer carries.
fn secured(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", POLICY),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_domain_names_are_probed() {
        assert!(is_domain_name("partner.example"));
        assert!(is_domain_name("mx-1.partner.example."));
        assert!(is_domain_name("bücher.example"), "by its A-labels");
        for not in [
            "",
            "localhost",
            "127.0.0.1",
            "[::1]",
            "partner.example:25",
            "/etc/passwd",
            "-bad.example",
            "a..example",
            "http://partner.example",
        ] {
            assert!(!is_domain_name(not), "{not:?}");
        }
    }
}
