//! The console's pages (maud: every value written into a page is escaped, and a remote's
//! certificate subject or banner can hold anything). Tables carry `data-` attributes with
//! the facts they show, for scripts and tests that read a page.

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use crate::admin::console::session::Session;
use crate::admin::domains::{CertRow, CertsAnswer, DomainAnswer, DomainsAnswer};
use crate::admin::table::relative;
use crate::cache::CacheEntry;
use crate::ledger::{DomainView, Route, RouteCounts};
use crate::outcome::{OutcomeClass, format_date};
use crate::probe::ProbeReport;

fn layout(session: Option<&Session>, title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · tlsrouter" }
                link rel="stylesheet" href="/static/console.css";
            }
            body {
                header {
                    span.brand { "tlsrouter" }
                    @if let Some(session) = session {
                        nav {
                            a href="/" { "Dashboard" }
                            a href="/cache" { "Cache" }
                            a href="/rules" { "Rules" }
                            form.inline method="get" action="/domain" {
                                input type="search" name="name" placeholder="recipient domain" aria-label="recipient domain";
                                button type="submit" { "Show" }
                            }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(session.csrf);
                                button type="submit" id="logout" { "Log out" }
                            }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (content)
                }
            }
        }
    }
}

pub fn login(refused: bool) -> Markup {
    layout(
        None,
        "Log in",
        html! {
            @if refused {
                p.notice.error id="notice" { "That is not the admin token." }
            }
            form method="post" action="/login" id="login" {
                label for="token" { "Admin token (the first line of console.token_file)" }
                input type="password" name="token" id="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Log in" }
            }
        },
    )
}

pub fn problem(session: &Session, what: &str) -> Markup {
    layout(
        Some(session),
        "Not done",
        html! { p.notice.error id="notice" { (what) } },
    )
}

/// `2026-12-07 14:00 UTC`.
fn hour(unix: u64) -> String {
    format!("{} {:02}:00 UTC", format_date(unix), unix % 86_400 / 3600)
}

fn route_table(id: &str, counts: &RouteCounts) -> Markup {
    html! {
        table id=(id) {
            thead { tr { th { "route" } th.number { "messages" } } }
            tbody {
                @for route in Route::ALL {
                    tr data-route=(route.name()) {
                        th scope="row" { (route.name()) }
                        td.number data-count=(counts.get(route)) { (counts.get(route)) }
                    }
                }
            }
        }
    }
}

fn failure(view: &DomainView, now: u64) -> Markup {
    match &view.last_failure {
        None => html! { "–" },
        Some(f) => html! {
            @if let Some(class) = f.class { span.class data-class=(class.name()) { (class.name()) } " " }
            @if let Some(host) = &f.host { "at " (host) ", " }
            (relative(now, f.at)) ": " (f.reason)
        },
    }
}

fn certs_table(certs: &[CertRow]) -> Markup {
    html! {
        table id="certs" {
            thead { tr { th { "host" } th { "address" } th { "subject" } th { "expires" } th.number { "days left" } th { "domains" } } }
            tbody {
                @for c in certs {
                    tr data-host=(c.host) data-days-left=(c.days_left) {
                        td { (c.host) }
                        td { @for (i, a) in c.addrs.iter().enumerate() { @if i > 0 { ", " } (a) } }
                        td { (c.subject.as_deref().unwrap_or("–")) }
                        td { (c.not_after) @if let Some(p) = c.problem { " (" (p.name()) ")" } }
                        td.number { (c.days_left) }
                        td { @for (i, d) in c.domains.iter().enumerate() { @if i > 0 { ", " } a href={ "/domain?name=" (d) } { (d) } } }
                    }
                }
            }
        }
    }
}

pub fn dashboard(session: &Session, day: &DomainsAnswer, certs: &CertsAnswer) -> Markup {
    let mut total = RouteCounts::default();
    for d in &day.domains {
        total.merge(&d.view.counts);
    }
    let attention: Vec<_> = (day.domains.iter())
        .filter(|d| d.view.counts.plain + d.view.counts.deferred + d.view.counts.refused > 0)
        .collect();
    layout(
        Some(session),
        "Dashboard",
        html! {
            section {
                h2 { "Messages since " (hour(day.since)) }
                (route_table("routes", &total))
            }
            section {
                h2 { "Domains that went in plain, were deferred or refused" }
                @if attention.is_empty() {
                    p id="attention-none" { "None: every message went over TLS." }
                } @else {
                    table id="attention" {
                        thead { tr { th { "domain" } th.number { "plain" } th.number { "deferred" } th.number { "refused" } th { "policy" } th { "why (the last failure)" } } }
                        tbody {
                            @for d in &attention {
                                tr data-domain=(d.view.domain) {
                                    td { a href={ "/domain?name=" (d.view.domain) } { (d.view.domain) } }
                                    td.number data-route="plain" { (d.view.counts.plain) }
                                    td.number data-route="deferred" { (d.view.counts.deferred) }
                                    td.number data-route="refused" { (d.view.counts.refused) }
                                    td { (d.view.policy.as_deref().unwrap_or("–")) }
                                    td { (failure(&d.view, day.now)) }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Certificates expiring within " (certs.within_days) " days" }
                @if certs.certificates.is_empty() {
                    p id="certs-none" { "None of the cached servers' certificates." }
                } @else {
                    (certs_table(&certs.certificates))
                }
            }
        },
    )
}

pub fn domain(
    session: &Session,
    name: &str,
    ledger: Option<&DomainAnswer>,
    explanation: &str,
) -> Markup {
    layout(
        Some(session),
        name,
        html! {
            @match ledger {
                None => p id="ledger-none" { "The ledger has no message to " (name) " this week." },
                Some(answer) => {
                    @let d = &answer.domain;
                    dl id="facts" {
                        dt { "policy" } dd data-fact="policy" { (d.policy.as_deref().unwrap_or("none")) }
                        @if let Some(mode) = &answer.mta_sts { dt { "MTA-STS held" } dd data-fact="mta-sts" { (mode) } }
                        dt { "rule" } dd data-fact="rule" { (d.rule.as_deref().unwrap_or("–")) }
                        dt { "MX hosts" } dd data-fact="hosts" { @for (i, h) in d.hosts.iter().enumerate() { @if i > 0 { ", " } (h) } }
                        @if let Some((route, at)) = d.last_delivery {
                            dt { "last delivery" } dd data-fact="last-delivery" { (route.name()) ", " (relative(answer.now, at)) }
                        }
                        dt { "last failure" } dd data-fact="last-failure" { (failure(d, answer.now)) }
                    }
                    table id="windows" {
                        thead { tr { th { "route" } @for w in &answer.windows { th.number { "since " (hour(w.since)) } } } }
                        tbody {
                            @for route in Route::ALL {
                                tr data-route=(route.name()) {
                                    th scope="row" { (route.name()) }
                                    @for w in &answer.windows {
                                        td.number data-window=(w.name) data-count=(w.counts.get(route)) { (w.counts.get(route)) }
                                    }
                                }
                            }
                        }
                    }
                    @if !answer.certificates.is_empty() {
                        h2 { "Certificates" }
                        (certs_table(&answer.certificates))
                    }
                }
            }
            h2 { "What the rules in force do with a message to it" }
            pre id="explain" { (explanation) }
            form method="post" action="/probe" id="probe-form" {
                input type="hidden" name="csrf" value=(session.csrf);
                input type="hidden" name="domain" value=(name);
                button type="submit" id="probe" { "Probe now" }
                span.hint { " connects to its MX hosts as delivery would; what it finds goes into the cache" }
            }
        },
    )
}

pub fn probe(session: &Session, domain: &str, report: &ProbeReport) -> Markup {
    layout(
        Some(session),
        &format!("Probe of {domain}"),
        html! {
            @if let Some(error) = &report.dns_error { p.notice.error id="notice" { (error) } }
            table id="probe-servers" {
                thead { tr { th { "MX host" } th { "address" } th { "class" } th { "TLS" } th { "rule then" } } }
                tbody {
                    @for mx in &report.mx {
                        @for server in &mx.servers {
                            tr data-host=(mx.host) data-addr=(server.addr.map(|a| a.ip().to_string()).unwrap_or_default()) {
                                td { (mx.host) }
                                td { (server.addr.map(|a| a.to_string()).unwrap_or_default()) }
                                td data-class=(server.class.map_or("", OutcomeClass::name)) { (server.class.map_or("–", OutcomeClass::name)) }
                                td { @if let Some(tls) = &server.tls { (tls.version) " " @if tls.verified { "verified" } @else { "not verified" } } @else { "–" } }
                                td { (server.plan.as_deref().unwrap_or("–")) }
                            }
                        }
                    }
                }
            }
            h2 { "Report" }
            pre id="probe-report" { (crate::probe::render(report)) }
            p { a href={ "/domain?name=" (domain) } { "Back to " (domain) } }
        },
    )
}

pub fn cache(
    session: &Session,
    q: &str,
    entries: &[CacheEntry],
    now: u64,
    notice: Option<&Result<String, String>>,
) -> Markup {
    layout(
        Some(session),
        "Cache",
        html! {
            @match notice {
                Some(Ok(said)) => pre.notice.ok id="notice" { (said) },
                Some(Err(said)) => p.notice.error id="notice" { (said) },
                None => {},
            }
            form method="get" action="/cache" id="search" {
                input type="search" name="q" value=(q) placeholder="host, address or domain" aria-label="search";
                button type="submit" { "Search" }
            }
            form method="post" action="/cache/pin" id="pin" {
                input type="hidden" name="csrf" value=(session.csrf);
                input type="hidden" name="q" value=(q);
                input type="text" name="host" placeholder="host, host[address] or domain" aria-label="host" required;
                select name="class" aria-label="class" {
                    @for class in OutcomeClass::ALL { option value=(class.name()) { (class.name()) } }
                }
                input type="text" name="ttl" value="1d" size="5" aria-label="for how long";
                button type="submit" id="pin-button" { "Pin" }
            }
            table id="cache" {
                thead { tr { th { "host" } th { "address" } th { "domains" } th { "class" } th { "TLS" } th { "cert expires" } th { "last seen" } th { "expires" } th {} } }
                tbody {
                    @for e in entries {
                        tr data-host=(e.host) data-addr=(e.addr) data-class=(e.class.name()) data-pinned=(e.pinned) {
                            td { (e.host) }
                            td { (e.addr) }
                            td { @for (i, d) in e.domains.iter().enumerate() { @if i > 0 { ", " } (d) } }
                            td { (e.class.name()) @if let Some(p) = e.cert_problem { " (" (p.name()) ")" } @if e.pinned { " [pinned]" } }
                            td { (e.tls_version.as_deref().unwrap_or("–")) }
                            td { (e.cert_not_after.as_deref().unwrap_or("–")) }
                            td { (relative(now, e.last_seen)) }
                            td { (relative(now, e.expires_at)) }
                            td {
                                form.inline method="post" action="/cache/flush" {
                                    input type="hidden" name="csrf" value=(session.csrf);
                                    input type="hidden" name="q" value=(q);
                                    input type="hidden" name="target" value=(e.host);
                                    button type="submit" data-flush=(e.host) { "Flush" }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub fn rules(session: &Session, shown: &Value) -> Markup {
    let reload = &shown["last_reload"];
    layout(
        Some(session),
        "Rules in force",
        html! {
            p { "From " code id="source" { (shown["source"].as_str().unwrap_or("–")) } " (read-only here: edit the file; it is reloaded when it changes)." }
            @if reload.is_object() {
                @let at = reload["at"].as_u64().unwrap_or(0);
                @let why = reload["why"].as_str().unwrap_or("");
                @match reload["error"].as_str() {
                    Some(error) => p.notice.error id="last-reload" data-ok="false" { "The last reload (" (why) ", " (format_date(at)) ") was refused; the rules before it stay in force: " (error) },
                    None => p.notice.ok id="last-reload" data-ok="true" { "The last reload (" (why) ", " (format_date(at)) ") put " (reload["rules"]) " rules in force." },
                }
            } @else {
                p id="last-reload" { "Not reloaded since start." }
            }
            table id="rules" {
                thead { tr { th.number { "#" } th { "name" } th.number { "line" } th { "what" } } }
                tbody {
                    @for (i, rule) in shown["rules"].as_array().into_iter().flatten().enumerate() {
                        tr data-rule=(rule["name"].as_str().unwrap_or("")) {
                            td.number { (i + 1) }
                            td { (rule["name"].as_str().unwrap_or("")) }
                            td.number { (rule["line"]) }
                            td { (rule["summary"].as_str().unwrap_or("")) }
                        }
                    }
                }
            }
        },
    )
}
