//! The TLS vocabulary of a rule: what it requires of a connection, and when it allows plain.

use crate::outcome::{NoTls, OutcomeClass};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS, no delivery: the message is deferred with 451 4.7.5.
    Require,
    /// TLS when the remote offers it; plain when a fallback class allows it.
    Opportunistic,
    /// Plain always, even when the remote offers STARTTLS.
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// A certificate that does not verify ends the TLS attempt.
    Require,
    /// Verify and record, but encrypt anyway.
    Try,
}

/// What to do with a server only the legacy TLS stack (OpenSSL) can talk to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LegacyTls {
    /// Encrypt with the legacy stack (unauthenticated): a weak cipher beats cleartext.
    #[default]
    Encrypt,
    /// Never use it: such a server is a TLS failure, plain where `fallback_on` allows.
    Plain,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPolicy {
    pub tls: TlsMode,
    pub verify: VerifyMode,
    pub min_tls: MinTls,
    /// The failures after which the message may go in plain.
    pub fallback_on: Vec<OutcomeClass>,
    pub legacy_tls: LegacyTls,
}

impl TlsPolicy {
    /// What a message gets when no rule says otherwise: encrypt whenever possible, with
    /// whatever certificate, and fall back to plain when TLS cannot be had.
    pub fn opportunistic() -> TlsPolicy {
        TlsPolicy {
            tls: TlsMode::Opportunistic,
            verify: VerifyMode::Try,
            min_tls: MinTls::Tls12,
            fallback_on: vec![
                OutcomeClass::NoStarttls,
                OutcomeClass::StarttlsRefused,
                OutcomeClass::HandshakeFailed,
                OutcomeClass::LegacyTls,
                OutcomeClass::ProtocolViolation,
            ],
            legacy_tls: LegacyTls::Encrypt,
        }
    }

    /// Whether a message may go in plain for this reason.
    pub fn allows_plain(&self, reason: &NoTls) -> bool {
        self.allows_plain_after(reason.class())
    }

    /// The same, by class (`None`: no TLS was wanted).
    pub fn allows_plain_after(&self, class: Option<OutcomeClass>) -> bool {
        match class {
            None => true,
            Some(_) if self.tls == TlsMode::Require => false,
            Some(class) => self.fallback_on.contains(&class),
        }
    }
}

/// The oldest TLS version a policy accepts; rustls speaks nothing below 1.2.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Deserialize,
    serde::Serialize,
)]
pub enum MinTls {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl MinTls {
    pub fn name(self) -> &'static str {
        match self {
            MinTls::Tls12 => "TLS 1.2",
            MinTls::Tls13 => "TLS 1.3",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opportunistic_policy_falls_back_on_tls_failures_but_not_on_bad_certificates() {
        let policy = TlsPolicy::opportunistic();
        assert!(policy.allows_plain(&NoTls::NoStarttls));
        assert!(policy.allows_plain(&NoTls::LegacyTls("alert".into())));
        let expired = crate::outcome::CertProblem::Expired {
            not_after: "2026-03-01".into(),
        };
        assert!(!policy.allows_plain(&NoTls::CertRejected(expired)));
    }

    #[test]
    fn required_tls_never_allows_plain_except_by_choice() {
        let policy = TlsPolicy {
            tls: TlsMode::Require,
            ..TlsPolicy::opportunistic()
        };
        assert!(!policy.allows_plain(&NoTls::NoStarttls));
        assert!(policy.allows_plain(&NoTls::NotWanted));
    }
}
