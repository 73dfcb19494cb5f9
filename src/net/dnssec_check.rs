//! Whether the name servers serve DNSSEC, as the start-up check found: `on`, `off` (they
//! answered, and what they answered does not validate: DANE cannot be had from them), or
//! `unknown` (no answer yet: a timeout, SERVFAIL, no connection, as while a local resolver
//! starts). An unknown state is asked again with back-off, and meanwhile lookups validate
//! as when it is on, so that what cannot be known is deferred, never taken as insecure.

use std::time::{Duration, Instant};

use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;

/// What the start-up check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnssecCheck {
    On,
    Off,
    Unknown,
}

impl DnssecCheck {
    pub fn name(self) -> &'static str {
        match self {
            DnssecCheck::On => "on",
            DnssecCheck::Off => "off",
            DnssecCheck::Unknown => "unknown",
        }
    }
}

/// What the answer to the trust anchor's DNSKEY question says (`Ok`: whether its keys
/// validated), and why in words.
pub fn judge(zone: &str, validated: Result<bool, NetError>) -> (DnssecCheck, String) {
    match validated {
        Ok(true) => (DnssecCheck::On, String::new()),
        Ok(false) => (
            DnssecCheck::Off,
            format!("the DNSKEY set of {zone} did not validate against the trust anchor"),
        ),
        Err(e) if no_answer_yet(&e) => (
            DnssecCheck::Unknown,
            format!("the DNSKEY lookup of {zone} got no answer: {e}"),
        ),
        Err(e) => (
            DnssecCheck::Off,
            format!("the DNSKEY lookup of {zone} failed: {e}"),
        ),
    }
}

/// A lookup that got no answer at all (a timeout, SERVFAIL, REFUSED, no connection): the
/// name servers may answer later, as a resolver that is still starting does.
fn no_answer_yet(error: &NetError) -> bool {
    match error {
        NetError::Busy | NetError::NoConnections | NetError::Io(_) | NetError::Timeout => true,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail | ResponseCode::Refused)) => {
            true
        }
        NetError::Dns(DnsError::NoRecordsFound(no)) => no.response_code == ResponseCode::ServFail,
        _ => false,
    }
}

/// The first wait before an unknown state is asked again; it doubles up to the last.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(300);

/// The check's state: what it found, and when an unknown state is asked again.
#[derive(Debug)]
pub struct CheckState {
    /// `None`: not checked yet.
    found: Option<DnssecCheck>,
    retry_at: Option<Instant>,
    delay: Duration,
}

impl CheckState {
    pub fn unchecked() -> CheckState {
        CheckState {
            found: None,
            retry_at: None,
            delay: FIRST_RETRY,
        }
    }

    /// DANE is off by configuration: never checked.
    pub fn off() -> CheckState {
        CheckState {
            found: Some(DnssecCheck::Off),
            ..CheckState::unchecked()
        }
    }

    pub fn found(&self) -> Option<DnssecCheck> {
        self.found
    }

    /// Whether the check is to be made (again) now.
    pub fn due(&self, now: Instant) -> bool {
        match self.found {
            None => true,
            Some(DnssecCheck::Unknown) => self.retry_at.is_none_or(|at| now >= at),
            Some(_) => false,
        }
    }

    /// How long until an unknown state is asked again; `None` once it is known.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        match self.found {
            Some(DnssecCheck::Unknown) | None => Some(
                self.retry_at
                    .map_or(Duration::ZERO, |at| at.saturating_duration_since(now)),
            ),
            Some(_) => None,
        }
    }

    /// Takes what a check found; for an unknown state, when it is asked again.
    pub fn record(&mut self, found: DnssecCheck, now: Instant) -> Option<Duration> {
        self.found = Some(found);
        if found != DnssecCheck::Unknown {
            self.retry_at = None;
            return None;
        }
        let delay = self.delay;
        self.retry_at = Some(now + delay);
        self.delay = (delay * 2).min(LAST_RETRY);
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_state_is_asked_again_with_back_off_until_it_is_known() {
        let start = Instant::now();
        let mut state = CheckState::unchecked();
        assert!(state.due(start));
        assert_eq!(state.record(DnssecCheck::Unknown, start), Some(FIRST_RETRY));
        assert!(!state.due(start));
        assert!(state.due(start + FIRST_RETRY));
        let later = start + FIRST_RETRY;
        assert_eq!(
            state.record(DnssecCheck::Unknown, later),
            Some(FIRST_RETRY * 2)
        );
        let mut at = later;
        for _ in 0..20 {
            state.record(DnssecCheck::Unknown, at);
            at += LAST_RETRY;
        }
        assert_eq!(state.wait(at - LAST_RETRY), Some(LAST_RETRY), "capped");
        assert_eq!(state.record(DnssecCheck::On, at), None);
        assert!(!state.due(at + LAST_RETRY * 10), "known: never asked again");
        assert_eq!(state.wait(at), None);
        assert!(!CheckState::off().due(start));
    }
}
