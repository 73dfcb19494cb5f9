//! What a domain publishes for MTA-STS, and what a fleet shares of it: the policy text
//! (`parse_policy`), the `_mta-sts` TXT records (`parse_txt_records`), `mx` patterns, and a
//! shared policy's JSON (`checked_policy`). Never panics; a policy that parses has a capped
//! `max_age` and an `mx` unless its mode is `none`; a shared policy that is believed says
//! what the text it quotes says, and was not fetched in the future.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tlsrouter::policy::mta_sts::{
    MAX_AGE_LIMIT, Mode, MxPattern, checked_policy, parse_policy, parse_txt_records,
};

const NOW: u64 = 1_796_040_000;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(policy) = parse_policy(&text) {
        assert!(policy.max_age <= MAX_AGE_LIMIT);
        assert!(policy.mode == Mode::None || !policy.mx.is_empty());
    }
    let records: Vec<String> = text.split('\n').map(String::from).collect();
    if let Ok(id) = parse_txt_records(&records) {
        assert!(!id.is_empty() && id.len() <= 32);
    }
    for line in text.lines() {
        if let Ok(pattern) = MxPattern::parse(line) {
            let _ = pattern.matches(line);
        }
    }
    let skew = Duration::from_secs(60);
    if let Ok(policy) = checked_policy(&text, "example.com", NOW, skew, None) {
        let quoted = parse_policy(&policy.raw).expect("a believed policy quotes a valid one");
        assert_eq!(
            (quoted.mode, quoted.max_age),
            (policy.mode, policy.max_age)
        );
        assert!(policy.fetched_at <= NOW + 60);
        assert_eq!(policy.expires_at, policy.fetched_at.saturating_add(policy.max_age));
    }
});
