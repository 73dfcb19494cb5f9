//! Every example log line in the documents is one the binary can write: a `tracing` call
//! in `src/` has its level and target (the module, or the `target:` it names), its message
//! (what the call's format string leaves fixed) and, in the call's order, each field the
//! example shows; no field is empty (a line leaves out a field with nothing to say).
//! A message reworded, a field renamed or a call moved to another module without its
//! examples fails here.

use std::path::Path;

use crate::{documents, fenced_blocks, root, shown};

const LEVELS: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];

/// One `tracing::LEVEL!(...)` call of the source.
#[derive(Debug)]
struct Call {
    level: String,
    target: String,
    /// The format string: fixed text, and `None` where a value is put in.
    message: Vec<Option<String>>,
    fields: Vec<String>,
    place: String,
}

/// A part of what a line must look like.
#[derive(Clone, Debug)]
enum Part {
    Text(String),
    /// Any text, empty too: a value put into the message.
    Value,
    /// Text that is not empty: a field's value.
    Field,
    /// Parts that may be left out together: a field.
    Optional(Vec<Part>),
}

#[test]
fn every_example_log_line_is_one_the_binary_writes() {
    let calls = calls();
    assert!(
        calls.len() > 100 && calls.iter().any(|c| c.target == "tlsrouter::transaction"),
        "the tracing calls were read from src/: {} found",
        calls.len()
    );
    let mut checked = 0;
    let mut wrong = Vec::new();
    for document in documents() {
        let text = std::fs::read_to_string(&document).expect("a document");
        for block in fenced_blocks(&text) {
            for (offset, line) in example_lines(&block.text) {
                let place = format!("{}:{}", shown(&document), block.line + offset);
                wrong.extend(check_line(&calls, &line, &place).err());
                checked += 1;
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    assert!(checked > 30, "only {checked} example log lines found");
}

/// The log lines of a block, each with its line within the block; a line the document
/// wraps goes on indented.
fn example_lines(block: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut lines = block.lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let Some((level, _)) = line.split_once(" tlsrouter") else {
            continue;
        };
        if !LEVELS.contains(&level) {
            continue;
        }
        let mut example = line.to_string();
        while let Some((_, more)) = lines.next_if(|(_, l)| l.starts_with("  ")) {
            example.push(' ');
            example.push_str(more.trim());
        }
        found.push((i, example));
    }
    found
}

fn check_line(calls: &[Call], line: &str, place: &str) -> Result<(), String> {
    let (level, rest) = line.split_once(' ').expect("a level");
    let Some((target, text)) = rest.split_once(": ") else {
        return Err(format!("{place}: no target in {line}"));
    };
    let candidates: Vec<&Call> = calls
        .iter()
        .filter(|c| c.level == level && c.target == target)
        .collect();
    if candidates.is_empty() {
        return Err(format!(
            "{place}: no {level} line with target {target} is written anywhere: {line}"
        ));
    }
    if !candidates.iter().any(|call| matches(&call.parts(), text)) {
        let shapes: Vec<String> = candidates.iter().map(|c| c.shape()).collect();
        return Err(format!(
            "{place}: no {level} line of {target} looks like\n  {text}\nthe lines it writes:\n  {}",
            shapes.join("\n  ")
        ));
    }
    if ["=\"\" ", "= "]
        .iter()
        .any(|empty| format!("{text} ").contains(empty))
    {
        return Err(format!(
            "{place}: a field is empty, and the line leaves an empty field out: {line}"
        ));
    }
    Ok(())
}

impl Call {
    fn parts(&self) -> Vec<Part> {
        let mut parts: Vec<Part> = self
            .message
            .iter()
            .map(|piece| match piece {
                Some(text) => Part::Text(text.clone()),
                None => Part::Value,
            })
            .collect();
        for field in &self.fields {
            let leading = if parts.is_empty() { "" } else { " " };
            parts.push(Part::Optional(vec![
                Part::Text(format!("{leading}{field}=")),
                Part::Field,
            ]));
        }
        parts
    }

    /// The call as the failure message shows it.
    fn shape(&self) -> String {
        let message: String = (self.message.iter())
            .map(|p| p.clone().unwrap_or_else(|| "{…}".to_string()))
            .collect();
        format!("{message} [{}] ({})", self.fields.join(" "), self.place)
    }
}

/// Whether `text` is what `parts` describe, all of it.
fn matches(parts: &[Part], text: &str) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return text.is_empty();
    };
    match first {
        Part::Text(fixed) => text
            .strip_prefix(fixed.as_str())
            .is_some_and(|after| matches(rest, after)),
        // A value never holds ` name=`: that is where the next field starts, so a field the
        // call does not write cannot hide in the value before it.
        Part::Value | Part::Field => {
            let least = usize::from(matches!(first, Part::Field));
            (least..=text.len())
                .filter(|&at| text.is_char_boundary(at))
                .take_while(|&at| !ends_with_field_name(&text[..at]))
                .any(|at| matches(rest, &text[at..]))
        }
        Part::Optional(group) => {
            let mut with: Vec<Part> = group.clone();
            with.extend_from_slice(rest);
            matches(&with, text) || matches(rest, text)
        }
    }
}

/// Whether `text` ends with ` name=`, the start of a field.
fn ends_with_field_name(text: &str) -> bool {
    let Some(before) = text.strip_suffix('=') else {
        return false;
    };
    let name_start = before
        .rfind(|c: char| !(c.is_ascii_lowercase() || c == '_'))
        .map_or(0, |at| at + 1);
    name_start < before.len() && before[..name_start].ends_with(' ')
}

// --- reading the calls from the source -------------------------------------------------

fn calls() -> Vec<Call> {
    let mut calls = Vec::new();
    collect_calls(&root().join("src"), &mut calls);
    calls
}

fn collect_calls(folder: &Path, into: &mut Vec<Call>) {
    for entry in std::fs::read_dir(folder).expect("a folder") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            collect_calls(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let source = std::fs::read_to_string(&path).expect("a source file");
            let module = module_path(&path);
            for level in LEVELS {
                let opening = format!("tracing::{}!(", level.to_ascii_lowercase());
                for (at, _) in source.match_indices(&opening) {
                    let line = source[..at].lines().count();
                    let arguments = arguments(&source[at + opening.len()..]);
                    let place = format!("{}:{line}", shown(&path));
                    into.push(call(level, &module, &arguments, place));
                }
            }
        }
    }
}

/// The module path `tracing` gives a file's calls: `src/net/dns.rs` is `tlsrouter::net::dns`,
/// the binary's `src/bin/tlsrouter/serve.rs` is `tlsrouter::serve`.
fn module_path(path: &Path) -> String {
    let src = root().join("src");
    let relative = path.strip_prefix(&src).expect("under src/");
    let relative = relative
        .strip_prefix("bin/tlsrouter")
        .unwrap_or(relative)
        .with_extension("");
    let mut module = vec!["tlsrouter".to_string()];
    for part in relative.iter() {
        let part = part.to_string_lossy();
        if !["lib", "main", "mod"].contains(&part.as_ref()) {
            module.push(part.into_owned());
        }
    }
    module.join("::")
}

/// The arguments of a macro call whose text starts after its `(`, split at its own commas.
fn arguments(text: &str) -> Vec<String> {
    let mut arguments = Vec::new();
    let mut current = String::new();
    let mut depth = 0usize;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                current.push(c);
                while let Some(s) = chars.next() {
                    current.push(s);
                    match s {
                        '\\' => current.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
                continue;
            }
            // A comment between the arguments.
            '/' if chars.clone().next() == Some('/') => {
                for skipped in chars.by_ref() {
                    if skipped == '\n' {
                        break;
                    }
                }
                continue;
            }
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth == 0 => break,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                arguments.push(std::mem::take(&mut current).trim().to_string());
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    let last = current.trim();
    if !last.is_empty() {
        arguments.push(last.to_string());
    }
    arguments
}

fn call(level: &str, module: &str, arguments: &[String], place: String) -> Call {
    let mut target = module.to_string();
    let mut fields = Vec::new();
    let mut message = Vec::new();
    for argument in arguments {
        if let Some(named) = argument.strip_prefix("target:") {
            target = named.trim().trim_matches('"').to_string();
        } else if argument.starts_with('"') {
            message = format_string(argument);
            break;
        } else {
            let name = argument.trim_start_matches(['%', '?']);
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                .collect();
            fields.push(name);
        }
    }
    Call {
        level: level.to_string(),
        target,
        message,
        fields,
        place,
    }
}

/// A format string literal as fixed text and the places values go.
fn format_string(literal: &str) -> Vec<Option<String>> {
    let inner = &literal[1..literal.len() - 1];
    let mut text = String::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            text.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => text.push('\n'),
            Some('t') => text.push('\t'),
            // A line continuation: the line break and the next line's indentation go.
            Some('\n') => while chars.next_if(|c| c.is_whitespace()).is_some() {},
            Some(other) => text.push(other),
            None => {}
        }
    }
    let mut pieces = Vec::new();
    let mut fixed = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.next_if_eq(&'{').is_some() => fixed.push('{'),
            '}' if chars.next_if_eq(&'}').is_some() => fixed.push('}'),
            '{' => {
                for inside in chars.by_ref() {
                    if inside == '}' {
                        break;
                    }
                }
                if !fixed.is_empty() {
                    pieces.push(Some(std::mem::take(&mut fixed)));
                }
                pieces.push(None);
            }
            _ => fixed.push(c),
        }
    }
    if !fixed.is_empty() {
        pieces.push(Some(fixed));
    }
    pieces
}

#[test]
fn a_line_matches_its_call_and_no_other() {
    let call = call(
        "WARN",
        "tlsrouter::x",
        &[
            "event = \"downgrade\"".into(),
            "server = %server".into(),
            "rule".into(),
            "\"downgrade: {class} ({})\"".into(),
            "reason".into(),
        ],
        String::new(),
    );
    let parts = call.parts();
    assert!(matches(
        &parts,
        "downgrade: a (b c) event=\"downgrade\" rule=x"
    ));
    assert!(matches(&parts, "downgrade: a (b) server=mx[1] rule=x y"));
    assert!(!matches(&parts, "downgraded: a (b) rule=x"));
    assert!(!matches(&parts, "downgrade: a (b) rule="));
    assert!(!matches(&parts, "downgrade: a (b) route=x"));
    assert!(!matches(&parts, "downgrade: a (b) rule=x route=y"));
    assert!(!matches(&parts, "downgrade: a (b) rule=x server=mx"));
    assert_eq!(
        module_path(&root().join("src/bin/tlsrouter/serve.rs")),
        "tlsrouter::serve"
    );
    assert_eq!(
        module_path(&root().join("src/net/mod.rs")),
        "tlsrouter::net"
    );
}
