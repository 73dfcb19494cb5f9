//! The web console, in a real browser (headless Chromium): an admin logs in, reads the
//! dashboard (its numbers are those of the messages sent and of `ctl domains`), probes a
//! domain, flushes and pins a cache entry and sees `ctl` agree, reads the rules; and
//! requests without the token or without the CSRF token are refused. Screenshots of each
//! page go to the target directory's `tmp/console/`.

use std::path::PathBuf;

use serde_json::Value;

use crate::support::browser::{Browser, http};
use crate::support::lab::DaemonLab;
use crate::support::metrics::free_port;
use crate::support::partners::{Partners, partners, traffic};
use crate::support::pki::TestCa;

const TOKEN: &str = "console-token-0123456789abcdef";

struct ConsoleLab {
    lab: DaemonLab,
    port: u16,
    _partners: Partners,
}

/// The partners' lab as the daemon with its console on, and the week's traffic sent.
async fn console_lab() -> ConsoleLab {
    let ca = TestCa::new();
    let (builder, partners) = partners(&ca).await;
    let port = free_port();
    let token_file = builder.dir().join("console.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let mut lab = builder
        .set("console.listen", format!("127.0.0.1:{port}"))
        .set_path("console.token_file", &token_file)
        .admin()
        .start_daemon()
        .await;
    let sent = traffic(lab.smtp()).await;
    for _ in &sent {
        lab.daemon.wait_for_transaction().await;
    }
    ConsoleLab {
        lab,
        port,
        _partners: partners,
    }
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console")
}

/// The count a route's row shows in a table (`#routes`, or one window of `#windows`).
async fn count(browser: &Browser, css: &str) -> u64 {
    let shown = browser.attribute(css, "data-count").await;
    shown.and_then(|n| n.parse().ok()).expect("a count")
}

fn cached<'a>(entries: &'a Value, host: &str) -> Vec<&'a Value> {
    (entries["entries"].as_array().into_iter().flatten())
        .filter(|e| e["host"] == host)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_reads_the_dashboard_probes_flushes_and_pins_in_a_real_browser() {
    let d = console_lab().await;
    let base = format!("http://127.0.0.1:{}", d.port);
    let browser = Browser::start().await;
    let shots = screenshots();

    // Without a session every page leads to the login form; a wrong token is refused.
    browser.goto(&format!("{base}/cache")).await;
    assert_eq!(browser.url().await, format!("{base}/login"));
    browser.type_into("#token", "not the token").await;
    browser.submit("#login button").await;
    assert!(browser.all("#notice").await.len() == 1, "refused");
    assert!(browser.cookies().await.is_empty(), "no session");
    browser.screenshot(&shots.join("login.png")).await;
    browser.type_into("#token", TOKEN).await;
    browser.submit("#login button").await;
    assert_eq!(browser.url().await, format!("{base}/"));
    let cookies = browser.cookies().await;
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    assert_eq!(cookies[0]["httpOnly"], true);
    assert_eq!(cookies[0]["secure"], true);
    assert_eq!(cookies[0]["sameSite"], "Strict");

    // The dashboard: the day's messages by route, as sent (a message counts once per
    // recipient domain: tls.test's three and alias.test's one) and as ctl counts them.
    let routes = [
        ("tls-verified", 4),
        ("tls-unverified", 1),
        ("tls-legacy", 0),
        ("plain", 2),
        ("deferred", 1),
        ("refused", 1),
    ];
    let ledger = d.lab.ctl_json(&["domains", "--since", "24h"]).await;
    for (route, sent) in routes {
        let shown = count(&browser, &format!("#routes tr[data-route=\"{route}\"] td")).await;
        assert_eq!(shown, sent, "{route}");
        let key = route.replace('-', "_");
        let counted: u64 = (ledger["domains"].as_array().into_iter().flatten())
            .map(|d| d["counts"][&key].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(counted, sent, "ctl domains agrees on {route}");
    }
    let attention: Vec<String> = {
        let mut names = Vec::new();
        for row in browser.all("#attention tbody tr").await.iter().enumerate() {
            let css = format!("#attention tbody tr:nth-child({})", row.0 + 1);
            names.push(
                browser
                    .attribute(&css, "data-domain")
                    .await
                    .unwrap_or_default(),
            );
        }
        names
    };
    assert_eq!(attention, ["plain.test", "refusing.test", "strict.test"]);
    let why = "#attention tr[data-domain=\"plain.test\"] [data-class]";
    assert_eq!(
        browser.attribute(why, "data-class").await.as_deref(),
        Some("no-starttls")
    );
    let expiring = browser.attribute("#certs tbody tr", "data-host").await;
    assert_eq!(expiring.as_deref(), Some("mx.expired.test"));
    browser.screenshot(&shots.join("dashboard.png")).await;

    // One domain: its week, what explain says, and a probe.
    browser.goto(&format!("{base}/domain?name=tls.test")).await;
    let week = "#windows tr[data-route=\"tls-verified\"] td[data-window=\"7d\"]";
    assert_eq!(count(&browser, week).await, 3);
    assert!(!browser.text("#explain").await.is_empty());
    browser.screenshot(&shots.join("domain.png")).await;
    browser.submit("#probe").await;
    let server = "#probe-servers tr[data-host=\"mx.tls.test\"] td[data-class]";
    assert_eq!(
        browser.attribute(server, "data-class").await.as_deref(),
        Some("tls-verified")
    );
    assert!(!browser.text("#probe-report").await.is_empty());
    browser.screenshot(&shots.join("probe.png")).await;

    // The cache: flush plain.test's host, then pin it; ctl sees both.
    browser.goto(&format!("{base}/cache")).await;
    assert_eq!(
        browser
            .all("#cache tr[data-host=\"mx.plain.test\"]")
            .await
            .len(),
        1
    );
    browser.submit("button[data-flush=\"mx.plain.test\"]").await;
    assert_eq!(browser.all("#notice").await.len(), 1);
    let listed = d.lab.ctl_json(&["cache", "list"]).await;
    assert!(
        cached(&listed, "mx.plain.test").is_empty(),
        "flushed: {listed}"
    );
    assert!(!cached(&listed, "mx.tls.test").is_empty(), "only that host");
    browser
        .type_into("#pin input[name=\"host\"]", "mx.plain.test")
        .await;
    browser
        .select("#pin select[name=\"class\"]", "no-starttls")
        .await;
    browser.type_into("#pin input[name=\"ttl\"]", "2d").await;
    browser.submit("#pin-button").await;
    let listed = d.lab.ctl_json(&["cache", "list"]).await;
    let pinned = cached(&listed, "mx.plain.test");
    assert_eq!(pinned.len(), 1, "{listed}");
    assert_eq!(pinned[0]["class"], "no-starttls");
    assert_eq!(pinned[0]["pinned"], true);
    let row = "#cache tr[data-host=\"mx.plain.test\"]";
    assert_eq!(
        browser.attribute(row, "data-pinned").await.as_deref(),
        Some("true")
    );
    browser.screenshot(&shots.join("cache.png")).await;

    // The rules in force, read-only, with their file.
    browser.goto(&format!("{base}/rules")).await;
    assert_eq!(
        browser.all("#rules tr[data-rule=\"strict\"]").await.len(),
        1
    );
    assert_eq!(
        browser.all("#rules tr[data-rule=\"default\"]").await.len(),
        1
    );
    let source = browser.text("#source").await;
    assert_eq!(source, d.lab.rules_file().display().to_string());
    browser.screenshot(&shots.join("rules.png")).await;

    // Logging out ends the session.
    browser.submit("#logout").await;
    assert_eq!(browser.url().await, format!("{base}/login"));
    browser.goto(&format!("{base}/")).await;
    assert_eq!(browser.url().await, format!("{base}/login"));
}

/// A request a browser would not send for us: without the session, with a forged one,
/// a form without its CSRF token. Each is refused and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn requests_without_the_token_or_the_csrf_token_are_refused() {
    let d = console_lab().await;
    let get = |path: &str, cookie: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie}Connection: close\r\n\r\n")
    };
    let post = |path: &str, cookie: &str, form: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
            form.len()
        )
    };
    for path in ["/", "/cache", "/rules", "/domain?name=tls.test"] {
        let answer = http(d.port, &get(path, "")).await;
        assert_eq!(answer.status, 303, "{path}");
        assert_eq!(answer.header("location"), Some("/login"));
    }
    let forged = "Cookie: tlsrouter_console=0123456789abcdef\r\n";
    assert_eq!(http(d.port, &get("/", forged)).await.status, 303);
    let flush = post("/cache/flush", "", "target=mx.tls.test");
    assert_eq!(http(d.port, &flush).await.status, 403);

    let wrong = http(d.port, &post("/login", "", "token=guess")).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.header("set-cookie"), None);
    let login = http(d.port, &post("/login", "", &format!("token={TOKEN}"))).await;
    assert_eq!(login.status, 303);
    let set = login.header("set-cookie").expect("a session cookie");
    for attribute in ["Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    let session = set.split(';').next().expect("name=value");
    let cookie = format!("Cookie: {session}\r\n");
    let page = http(d.port, &get("/", &cookie)).await;
    assert_eq!(page.status, 200);
    let policy = page.header("content-security-policy").expect("a CSP");
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert_eq!(page.header("x-frame-options"), Some("DENY"));

    for form in ["target=mx.tls.test", "target=mx.tls.test&csrf=forged"] {
        let answer = http(d.port, &post("/cache/flush", &cookie, form)).await;
        assert_eq!(answer.status, 403, "{form}");
    }
    let probe = post("/probe", &cookie, "domain=tls.test");
    assert_eq!(
        http(d.port, &probe).await.status,
        403,
        "a probe is a form too"
    );
    let listed = d.lab.ctl_json(&["cache", "list"]).await;
    assert!(
        !cached(&listed, "mx.tls.test").is_empty(),
        "nothing was flushed"
    );

    // With its CSRF token (from the page), the same form goes through; a probe only of a
    // domain name, never of an address or a path.
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page's CSRF token");
    let not_a_domain = format!("domain=127.0.0.1&csrf={csrf}");
    let answer = http(d.port, &post("/probe", &cookie, &not_a_domain)).await;
    assert_eq!(answer.status, 400);
    let flush = format!("target=mx.tls.test&csrf={csrf}");
    assert_eq!(
        http(d.port, &post("/cache/flush", &cookie, &flush))
            .await
            .status,
        200
    );
    let listed = d.lab.ctl_json(&["cache", "list"]).await;
    assert!(cached(&listed, "mx.tls.test").is_empty(), "flushed now");
}

/// A console without its token file, or with a token short enough to guess, does not
/// start: `check-config` says which setting, where, and what to type.
#[tokio::test]
async fn a_console_without_a_good_token_is_refused_at_check_config() {
    let dir = tempfile::tempdir().expect("a folder");
    let short = dir.path().join("short.token");
    std::fs::write(&short, "guessable\n").expect("token file");
    let cases = [
        (
            "console:\n  listen: 127.0.0.1:9126\n",
            "2:3: console.listen",
            "openssl rand -hex 32",
        ),
        (
            &format!(
                "console:\n  listen: 127.0.0.1:9126\n  token_file: {}\n",
                short.display()
            ),
            "3:3: console.token_file",
            "16 or more",
        ),
        (
            "console:\n  listen: 127.0.0.1:9126\n  token_file: /nonexistent/console.token\n",
            "3:3: console.token_file",
            "No such file",
        ),
    ];
    for (i, (yaml, at, says)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("console{i}.yaml"));
        std::fs::write(&file, yaml).expect("config");
        let args = vec!["check-config".to_string(), file.display().to_string()];
        let (code, _, err) = crate::support::lab::tlsrouter(args).await;
        assert_eq!(code, 64, "{yaml}: {err}");
        assert!(err.contains(at) && err.contains(says), "{yaml}: {err}");
    }
}
