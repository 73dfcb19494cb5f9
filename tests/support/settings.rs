//! The one configuration builder: settings as the YAML the daemon reads, built from the lab's
//! defaults and whatever a test adds (a dotted key and a value, or a YAML fragment). The
//! in-process proxy gets them through the crate's own parser (`Config::parse`), the daemon
//! as its configuration file, so both read exactly the same text.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::{Map, Value};
use tlsrouter::config::Config;

#[derive(Clone, Debug, Default)]
pub struct Settings(Map<String, Value>);

impl Settings {
    /// No settings at all: the embedded defaults.
    pub fn new() -> Settings {
        Settings::default()
    }

    /// What every lab needs: our DNS server, our CA only, remote port `port`, and timeouts
    /// short enough for tests but long enough for a loaded machine.
    pub fn lab(dns: SocketAddr, ca_file: &Path, port: u16) -> Settings {
        Settings::new()
            .set("hostname", "relay.test")
            .set("resolver.nameservers", vec![dns.to_string()])
            .set("tls.ca_file", path(ca_file))
            .set("tls.system_roots", false)
            .set("delivery.port", port)
            .set("timeouts.connect", "5s")
            .set("timeouts.greeting", "10s")
            .set("timeouts.command", "10s")
            .set("timeouts.tls_handshake", "10s")
            .set("timeouts.data_start", "10s")
            .set("timeouts.data_block", "10s")
            .set("timeouts.data_end", "10s")
            .set("timeouts.dns", "2s")
    }

    /// Sets `key` (dotted, e.g. "timeouts.connect") to `value`, replacing what was there.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Settings {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().expect("a key");
        let mut map = &mut self.0;
        for part in parts {
            let entry = map
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            map = entry.as_object_mut().expect("an object");
        }
        map.insert(last.to_string(), value.into());
        self
    }

    /// Merges a YAML fragment (a mapping), key by key: a nested mapping adds to what is
    /// there, anything else replaces it.
    pub fn yaml(mut self, text: &str) -> Settings {
        let fragment: Value = serde_saphyr::from_str(text)
            .unwrap_or_else(|e| panic!("test settings are not YAML: {e}\n{text}"));
        let Value::Object(fragment) = fragment else {
            panic!("test settings must be a mapping: {text}");
        };
        merge(&mut self.0, fragment);
        self
    }

    /// Every setting from `other` on top of these.
    pub fn merge(mut self, other: &Settings) -> Settings {
        merge(&mut self.0, other.0.clone());
        self
    }

    /// The value at a dotted key, if set.
    pub fn get(&self, key: &str) -> Option<&Value> {
        let mut parts = key.split('.');
        let mut value = self.0.get(parts.next()?)?;
        for part in parts {
            value = value.get(part)?;
        }
        Some(value)
    }

    /// As a configuration file.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        render(&self.0, 0, &mut out);
        out
    }

    /// As the daemon would read it; panics with the parser's message when it would refuse.
    pub fn to_config(&self) -> Config {
        let yaml = self.to_yaml();
        Config::parse(&yaml, Path::new("test settings")).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }
}

/// A path as the string a setting holds.
pub fn path(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("not UTF-8: {}", path.display()))
        .to_string()
}

fn merge(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Object(old)), Value::Object(new)) => merge(old, new),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Block mappings, one key a line; every other value in JSON form, which YAML reads as
/// flow style (quoted strings, `[...]`, `{...}`).
fn render(map: &Map<String, Value>, indent: usize, out: &mut String) {
    for (key, value) in map {
        let pad = " ".repeat(indent);
        match value {
            Value::Object(inner) if !inner.is_empty() => {
                out.push_str(&format!("{pad}{key}:\n"));
                render(inner, indent + 2, out);
            }
            other => out.push_str(&format!("{pad}{key}: {other}\n")),
        }
    }
}
