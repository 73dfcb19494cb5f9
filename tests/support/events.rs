//! Log events as facts: a test names the fields it expects and their values, never a
//! sentence, so that rewording a log line breaks no test and a wrong value does.

use serde_json::Value;

/// A field's value as text (a string as it is; a number or a boolean as written), or
/// `None` when the event has no such field.
pub fn field(event: &Value, name: &str) -> Option<String> {
    match event.get(name)? {
        Value::String(text) => Some(text.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Whether every named field has the value given.
pub fn has_fields(event: &Value, expected: &[(&str, &str)]) -> bool {
    expected
        .iter()
        .all(|(name, value)| field(event, name).as_deref() == Some(*value))
}

/// Asserts that every named field has the value given.
#[track_caller]
pub fn assert_fields(event: &Value, expected: &[(&str, &str)]) {
    for (name, value) in expected {
        assert_eq!(
            field(event, name).as_deref(),
            Some(*value),
            "field {name} of {event}"
        );
    }
}

/// Asserts that the event has none of these fields.
#[track_caller]
pub fn assert_no_fields(event: &Value, names: &[&str]) {
    for name in names {
        assert_eq!(field(event, name), None, "field {name} in {event}");
    }
}
