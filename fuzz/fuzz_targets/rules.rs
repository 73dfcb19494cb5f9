//! `rules::RuleSet::parse` on any text: never panics; a rule set that parses answers
//! `select` and `shadowed` for any domain without panicking, and parsing is deterministic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tlsrouter::rules::RuleSet;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    let Ok(rules) = RuleSet::parse(text, path) else {
        assert!(RuleSet::parse(text, path).is_err());
        return;
    };
    // Domains: some fixed, and the words of the input itself.
    let words = text
        .split(|c: char| !(c.is_alphanumeric() || "-.*[]:".contains(c)))
        .filter(|w| !w.is_empty())
        .take(16);
    let fixed = [
        "example.com",
        "a.b.example.com",
        "",
        ".",
        "*",
        "[127.0.0.1]",
    ];
    for domain in fixed.into_iter().chain(words) {
        let first = rules.select(domain, Some(domain));
        let again = rules.select(domain, None);
        for i in first.conditional.iter().chain(&again.conditional) {
            assert!(*i < rules.rules().len());
        }
        let _ = (rules.rule(first.base), rules.rule(again.base));
    }
    let _ = rules.shadowed();
    assert_eq!(
        RuleSet::parse(text, path).map(|r| r.rules().len()).ok(),
        Some(rules.rules().len())
    );
});
