//! Captures what the proxy logs during one test (current-thread runtime: every task of the
//! test runs on this thread, so a thread-local subscriber sees them all).

use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Starts capturing at info level; capture stops when the guard is dropped.
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        Logs::capture_at("tlsrouter=info")
    }

    /// Starts capturing with this filter (`tlsrouter=debug` shows the SMTP dialogue).
    pub fn capture_at(filter: &str) -> (Logs, tracing::subscriber::DefaultGuard) {
        // The global subscriber keeps debug call sites enabled (see `init_tracing`).
        super::init_tracing();
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs.clone(), tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }

    /// The transaction lines.
    pub fn transactions(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("tlsrouter::transaction"))
            .map(String::from)
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
