//! A real browser: headless Chromium driven through chromedriver, over the WebDriver
//! protocol (W3C, JSON over HTTP on loopback). Debian's `chromium` and `chromium-driver`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The element key of the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

fn found(name: &str, places: &[&str]) -> PathBuf {
    places
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{name} is not installed (looked at {places:?}): apt-get install chromium chromium-driver")
        })
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start() -> Browser {
        let driver_path = found("chromedriver", &["/usr/bin/chromedriver"]);
        let chromium = found(
            "chromium",
            &["/usr/lib/chromium/chromium", "/usr/bin/chromium"],
        );
        let port = super::metrics::free_port();
        let mut driver = Command::new(driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        // It says when it listens; the rest of what it says is read and dropped.
        let stdout = driver.stdout.take().expect("stdout");
        let (listening, ready) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut listening = Some(listening);
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("started successfully")
                    && let Some(said) = listening.take()
                {
                    let _ = said.send(());
                }
            }
        });
        ready.await.expect("chromedriver ended before it listened");
        let profile = tempfile::tempdir().expect("a profile directory");
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "acceptInsecureCerts": false,
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless=new",
                        // Root in a container has no user namespace to sandbox in.
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-dev-shm-usage",
                        "--no-first-run",
                        "--window-size=1280,900",
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
            }},
        });
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let answer = browser.call("POST", "/session", Some(capabilities)).await;
        browser.session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session from chromedriver: {answer}"))
            .to_string();
        browser
    }

    /// One WebDriver call: its `value`; panics on an error the test did not expect.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.try_call(method, path, body).await;
        assert!(status < 300, "WebDriver {method} {path}: {status} {value}");
        value
    }

    async fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("chromedriver");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let answered = read_answer(&mut stream).await;
        let (status, body) = (answered.status, answered.body);
        let value: Value = serde_json::from_str(&body).expect("JSON from chromedriver");
        (status, value["value"].clone())
    }

    fn at(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", &self.at("/url"), Some(json!({ "url": url })))
            .await;
    }

    pub async fn url(&self) -> String {
        let url = self.call("GET", &self.at("/url"), None).await;
        url.as_str().unwrap_or_default().to_string()
    }

    /// The elements matching a CSS selector, in document order.
    pub async fn all(&self, css: &str) -> Vec<String> {
        let found = self
            .call(
                "POST",
                &self.at("/elements"),
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        (found.as_array().into_iter().flatten())
            .filter_map(|e| e[ELEMENT].as_str().map(String::from))
            .collect()
    }

    /// The one element matching `css`; panics, with the page's address, when there is none.
    pub async fn one(&self, css: &str) -> String {
        match self.all(css).await.into_iter().next() {
            Some(element) => element,
            None => {
                let source = self.call("GET", &self.at("/source"), None).await;
                let source = source.as_str().unwrap_or_default();
                panic!("no {css} on {}:\n{source}", self.url().await)
            }
        }
    }

    pub async fn text(&self, css: &str) -> String {
        let element = self.one(css).await;
        let text = self
            .call("GET", &self.at(&format!("/element/{element}/text")), None)
            .await;
        text.as_str().unwrap_or_default().to_string()
    }

    pub async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let element = self.one(css).await;
        let value = self
            .call(
                "GET",
                &self.at(&format!("/element/{element}/attribute/{name}")),
                None,
            )
            .await;
        value.as_str().map(String::from)
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.one(css).await;
        let path = self.at(&format!("/element/{element}/clear"));
        self.call("POST", &path, Some(json!({}))).await;
        let path = self.at(&format!("/element/{element}/value"));
        self.call("POST", &path, Some(json!({ "text": text })))
            .await;
    }

    /// Picks the option with this value in a `<select>`.
    pub async fn select(&self, css: &str, value: &str) {
        self.click(&format!("{css} option[value=\"{value}\"]"))
            .await;
    }

    /// Clicks something that stays on the page (an option of a select).
    pub async fn click(&self, css: &str) {
        let element = self.one(css).await;
        let path = self.at(&format!("/element/{element}/click"));
        self.call("POST", &path, Some(json!({}))).await;
    }

    /// Clicks a button that submits its form, and returns once the page it leads to is
    /// there: chromedriver may answer the click before a POST's answer has replaced the
    /// page, so this waits until the old page's root is gone (for at most 10 s), then asks
    /// for the new one, which chromedriver answers once it has loaded.
    pub async fn submit(&self, css: &str) {
        let old = self.one("html").await;
        self.click(css).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let path = self.at(&format!("/element/{old}/name"));
            let (status, _) = self.try_call("GET", &path, None).await;
            // Stale, or (mid-navigation) no longer in the document: either way gone.
            if status >= 400 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the page did not change after clicking {css}"
            );
            tokio::task::yield_now().await;
        }
        self.one("html").await;
    }

    /// The cookies the browser holds for the page, as WebDriver gives them.
    pub async fn cookies(&self) -> Vec<Value> {
        let cookies = self.call("GET", &self.at("/cookie"), None).await;
        cookies.as_array().cloned().unwrap_or_default()
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let shot = self.call("GET", &self.at("/screenshot"), None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().expect("base64"))
            .expect("a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshots' folder");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends Chromium with the session, then the driver.
        use std::io::{Read, Write};
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                self.session
            );
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
            let _ = stream.write_all(request.as_bytes());
            // Its answer comes once the browser is gone; the connection stays open.
            let _ = stream.read(&mut [0u8; 1024]);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What an HTTP server answered: status, headers (names in lower case) and body.
#[derive(Debug)]
pub struct Answered {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answered {
    pub fn header(&self, name: &str) -> Option<&str> {
        (self.headers.iter())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request as written (no browser): for what a browser would never send, or send for
/// us (a request without the cookie, a form without its CSRF token).
pub async fn http(port: u16, request: &str) -> Answered {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the HTTP server");
    stream.write_all(request.as_bytes()).await.expect("write");
    read_answer(&mut stream).await
}

/// One HTTP answer: to its Content-Length (chromedriver keeps the connection open), or
/// to the end of the connection.
async fn read_answer(stream: &mut tokio::net::TcpStream) -> Answered {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "the connection closed before the answer's head");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = (lines.next().and_then(|l| l.split(' ').nth(1)))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = (headers.iter())
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = raw.split_off(head_end + 4);
    match length {
        Some(length) => {
            while body.len() < length {
                let n = stream.read(&mut buf).await.expect("read");
                assert!(n > 0, "the connection closed within the body");
                body.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            stream.read_to_end(&mut body).await.expect("read");
        }
    }
    Answered {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}
