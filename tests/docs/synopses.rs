//! The command synopses the documents show (a plain fenced block of `tlsrouter ...` lines,
//! like docs/ADMIN.md's list of `ctl` commands) name commands the binary has, with options
//! it takes: for each line, `tlsrouter COMMAND... --help` succeeds and names every `--option`
//! the line shows. The runnable examples are run against a lab daemon (tests/e2e/doc_sessions.rs).

use std::process::Command;

use crate::{documents, fenced_blocks, shown};

#[test]
fn every_synopsis_names_commands_and_options_the_binary_has() {
    let mut checked = 0;
    for document in documents() {
        let text = std::fs::read_to_string(&document).expect("a document");
        for block in fenced_blocks(&text)
            .into_iter()
            .filter(|b| b.language.is_empty())
        {
            for (at, line) in block.text.lines().enumerate() {
                if !line.starts_with("tlsrouter ") {
                    continue;
                }
                let place = format!("{}:{}", shown(&document), block.line + at);
                let line = line.split(" #").next().unwrap_or(line);
                for (command, options) in alternatives(line) {
                    let out = Command::new(env!("CARGO_BIN_EXE_tlsrouter"))
                        .args(&command)
                        .arg("--help")
                        .output()
                        .expect("tlsrouter runs");
                    let help = String::from_utf8_lossy(&out.stdout);
                    assert!(
                        out.status.success(),
                        "{place}: `tlsrouter {}` is no command: {}",
                        command.join(" "),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    for option in options {
                        assert!(
                            help.contains(&format!("{option} "))
                                || help.contains(&format!("{option},")),
                            "{place}: `tlsrouter {}` has no option {option}:\n{help}",
                            command.join(" ")
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 10, "only {checked} synopsis lines found");
}

/// The commands a synopsis line names: `rules show | reload | explain --rcpt R` is three,
/// each with its own options; an alternative of options only (`flush HOST | --all`) is the
/// first command with other options.
fn alternatives(line: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (at, c) in line.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '|' if depth == 0 && line[at..].starts_with("| ") && line[..at].ends_with(' ') => {
                parts.push(&line[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&line[start..]);
    let (first, others) = parts.split_first().expect("a line");
    let (command, options) = synopsis(first);
    let mut found = vec![(command.clone(), options)];
    for other in others {
        let (words, options) = synopsis(&format!("tlsrouter {}", other.trim()));
        let mut alternative = command.clone();
        if !words.is_empty() {
            alternative.pop();
            alternative.extend(words);
        }
        found.push((alternative, options));
    }
    found
}

/// The command a synopsis line names (its lowercase words outside brackets, up to the first
/// `|` or placeholder) and every `--option` it shows.
fn synopsis(line: &str) -> (Vec<String>, Vec<String>) {
    let mut command = Vec::new();
    let mut depth = 0usize;
    let mut done = false;
    for word in line.split_whitespace().skip(1) {
        let opened = word.starts_with('[');
        depth += word.matches('[').count();
        let closed = word.matches(']').count();
        let inside = depth > 0 || opened;
        depth = depth.saturating_sub(closed);
        let plain =
            word.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !word.starts_with('-');
        if !done && !inside && plain {
            command.push(word.to_string());
        } else if !inside {
            done = true;
        }
    }
    let options = line
        .split(|c: char| c.is_whitespace() || "[]|".contains(c))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect();
    (command, options)
}

#[test]
fn a_synopsis_line_gives_its_command_and_options() {
    let (command, options) = synopsis(
        "tlsrouter ctl [--socket PATH | --config FILE] [--json] cache list [--class CLASS]",
    );
    assert_eq!(command, ["ctl", "cache", "list"]);
    assert_eq!(options, ["--socket", "--config", "--json", "--class"]);
    let found = alternatives("tlsrouter ctl rules show | reload | explain --rcpt user@domain");
    let commands: Vec<String> = found.iter().map(|(c, _)| c.join(" ")).collect();
    assert_eq!(
        commands,
        ["ctl rules show", "ctl rules reload", "ctl rules explain"]
    );
    assert_eq!(found[2].1, ["--rcpt"]);
    let found = alternatives("tlsrouter ctl cache flush HOST|DOMAIN | --all");
    assert_eq!(
        found[1],
        (
            vec!["ctl".into(), "cache".into(), "flush".into()],
            vec!["--all".into()]
        )
    );
    let (command, _) = synopsis("tlsrouter ctl cache pin HOST CLASS --addr ADDRESS");
    assert_eq!(command, ["ctl", "cache", "pin"]);
}
