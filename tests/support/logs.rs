//! Captures what the proxy logs during one test (current-thread runtime: every task of the
//! test runs on this thread, so a thread-local subscriber sees them all): as text, and as
//! structured events whose fields a test asserts on (`event["class"]`, `event["route"]`),
//! so that a reworded sentence breaks no test and a wrong value does.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Clone, Default)]
pub struct Logs {
    text: Arc<Mutex<Vec<u8>>>,
    events: Arc<Mutex<Vec<Value>>>,
}

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
        let text = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        let events = Recorder(logs.events.clone());
        let subscriber = tracing_subscriber::registry()
            .with(text.and_then(events).with_filter(EnvFilter::new(filter)));
        (logs.clone(), tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().expect("logs")).into_owned()
    }

    /// Every event so far, each a JSON object: `target`, `level`, `message` and its fields.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().expect("events").clone()
    }

    /// The transaction lines as written, for a test of the line's own format; every other
    /// test asserts on [`Logs::transaction_events`].
    pub fn transaction_lines(&self) -> Vec<String> {
        let text = self.text();
        let lines = text
            .lines()
            .filter(|l| l.contains("tlsrouter::transaction"));
        lines.map(String::from).collect()
    }

    /// The events with these fields (`("event", "not_delivered")`, `("level", "WARN")`).
    pub fn events_with(&self, fields: &[(&str, &str)]) -> Vec<Value> {
        let events = self.events().into_iter();
        events
            .filter(|e| super::events::has_fields(e, fields))
            .collect()
    }

    /// The transactions' log lines, as events.
    pub fn transaction_events(&self) -> Vec<Value> {
        let events = self.events();
        let lines = events.into_iter();
        lines
            .filter(|e| e["target"] == "tlsrouter::transaction")
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A layer that keeps every event as a JSON object of its fields.
struct Recorder(Arc<Mutex<Vec<Value>>>);

impl<S: tracing::Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let metadata = event.metadata();
        let mut fields = Fields(Map::new());
        fields.0.insert("target".into(), metadata.target().into());
        fields
            .0
            .insert("level".into(), metadata.level().as_str().into());
        event.record(&mut fields);
        self.0.lock().expect("events").push(Value::Object(fields.0));
    }
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}
