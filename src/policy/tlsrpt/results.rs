//! What one TLS session to a domain's servers came to, in RFC 8460's terms: the result
//! type, the policy it was judged under, and where it failed.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::net::dns::ServerId;
use crate::outcome::OutcomeClass;
use crate::policy::mta_sts::{PolicyError, StsPolicy};

/// RFC 8460 4.3's result types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultType {
    StarttlsNotSupported,
    CertificateHostMismatch,
    CertificateExpired,
    CertificateNotTrusted,
    ValidationFailure,
    TlsaInvalid,
    DnssecInvalid,
    StsPolicyFetchError,
    StsPolicyInvalid,
    StsWebpkiInvalid,
}

impl ResultType {
    pub fn name(self) -> &'static str {
        match self {
            ResultType::StarttlsNotSupported => "starttls-not-supported",
            ResultType::CertificateHostMismatch => "certificate-host-mismatch",
            ResultType::CertificateExpired => "certificate-expired",
            ResultType::CertificateNotTrusted => "certificate-not-trusted",
            ResultType::ValidationFailure => "validation-failure",
            ResultType::TlsaInvalid => "tlsa-invalid",
            ResultType::DnssecInvalid => "dnssec-invalid",
            ResultType::StsPolicyFetchError => "sts-policy-fetch-error",
            ResultType::StsPolicyInvalid => "sts-policy-invalid",
            ResultType::StsWebpkiInvalid => "sts-webpki-invalid",
        }
    }
}

/// What one TLS session (or attempt) came to, for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionResult {
    Success,
    Failure {
        result_type: ResultType,
        /// RFC 8460 4.4's `failure-reason-code`: our class, for the generic result types.
        reason_code: Option<String>,
    },
}

impl SessionResult {
    /// The TLS-RPT result type of one of our classes (docs/ARCHITECTURE.md): `tls-verified` is
    /// a success; `tls-unverified` is judged by its certificate class, which the caller
    /// passes instead. `connect-failed` and `timeout` are no TLS session: `None`.
    pub fn from_class(class: OutcomeClass) -> Option<SessionResult> {
        let failure = |result_type, reason: Option<&str>| {
            Some(SessionResult::Failure {
                result_type,
                reason_code: reason.map(str::to_string),
            })
        };
        match class {
            OutcomeClass::TlsVerified => Some(SessionResult::Success),
            OutcomeClass::NoStarttls | OutcomeClass::StarttlsRefused => failure(
                ResultType::StarttlsNotSupported,
                (class == OutcomeClass::StarttlsRefused).then_some(class.name()),
            ),
            OutcomeClass::CertExpired => failure(ResultType::CertificateExpired, None),
            OutcomeClass::CertNameMismatch => failure(ResultType::CertificateHostMismatch, None),
            OutcomeClass::CertUntrusted => failure(ResultType::CertificateNotTrusted, None),
            // The legacy stack never authenticates: for a policy, no valid session.
            OutcomeClass::TlsUnverified
            | OutcomeClass::TlsLegacy
            | OutcomeClass::HandshakeFailed
            | OutcomeClass::LegacyTls
            | OutcomeClass::CertNotYetValid
            | OutcomeClass::ProtocolViolation => {
                failure(ResultType::ValidationFailure, Some(class.name()))
            }
            OutcomeClass::DaneMismatch => {
                failure(ResultType::ValidationFailure, Some(class.name()))
            }
            OutcomeClass::DnssecBogus => failure(ResultType::DnssecInvalid, None),
            OutcomeClass::ConnectFailed | OutcomeClass::Timeout => None,
        }
    }

    /// TLSA records present for the host, none of them usable (RFC 8460 4.3.2.1).
    pub fn tlsa_invalid() -> SessionResult {
        SessionResult::Failure {
            result_type: ResultType::TlsaInvalid,
            reason_code: None,
        }
    }

    /// The host's TLSA answer was bogus or could not be had (RFC 8460 4.3.2.1).
    pub fn dnssec_invalid() -> SessionResult {
        SessionResult::Failure {
            result_type: ResultType::DnssecInvalid,
            reason_code: None,
        }
    }

    /// An MX host the enforced policy does not name.
    pub fn mx_not_in_policy() -> SessionResult {
        SessionResult::Failure {
            result_type: ResultType::ValidationFailure,
            reason_code: Some("mx-not-in-policy".into()),
        }
    }

    /// A published policy that could not be had.
    pub fn from_policy_error(error: &PolicyError) -> SessionResult {
        use crate::policy::mta_sts::PolicyErrorKind;
        let result_type = match error.kind {
            PolicyErrorKind::FetchError => ResultType::StsPolicyFetchError,
            PolicyErrorKind::Invalid => ResultType::StsPolicyInvalid,
            PolicyErrorKind::WebpkiInvalid => ResultType::StsWebpkiInvalid,
        };
        SessionResult::Failure {
            result_type,
            reason_code: None,
        }
    }
}

/// The policy a session was judged under (RFC 8460 4.4 `policy`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyFacts {
    Sts {
        /// The policy's lines.
        policy_string: Vec<String>,
        mx_host: Vec<String>,
    },
    /// DANE (RFC 8460 4.4 `tlsa`): the TLSA records of one MX host.
    Tlsa {
        /// The records in presentation form (`3 1 1 <hex>`); none when they could not be
        /// had.
        policy_string: Vec<String>,
        /// The MX host they are published for.
        mx_host: Vec<String>,
    },
    NoPolicyFound,
}

impl PolicyFacts {
    pub fn sts(policy: &StsPolicy) -> PolicyFacts {
        PolicyFacts::Sts {
            policy_string: policy
                .raw
                .lines()
                .map(|l| l.trim_end_matches('\r').to_string())
                .filter(|l| !l.is_empty())
                .collect(),
            mx_host: policy.mx.iter().map(|p| p.to_string()).collect(),
        }
    }

    pub fn tlsa(records: &[String], mx_host: &str) -> PolicyFacts {
        PolicyFacts::Tlsa {
            policy_string: records.to_vec(),
            mx_host: vec![mx_host.to_string()],
        }
    }

    pub(super) fn json(&self, domain: &str) -> serde_json::Value {
        match self {
            PolicyFacts::Tlsa {
                policy_string,
                mx_host,
            } => json!({
                "policy-type": "tlsa",
                "policy-string": policy_string,
                "policy-domain": domain,
                "mx-host": mx_host,
            }),
            PolicyFacts::Sts {
                policy_string,
                mx_host,
            } => json!({
                "policy-type": "sts",
                "policy-string": policy_string,
                "policy-domain": domain,
                "mx-host": mx_host,
            }),
            PolicyFacts::NoPolicyFound => json!({
                "policy-type": "no-policy-found",
                "policy-domain": domain,
            }),
        }
    }
}
/// Where a failed session was: RFC 8460 4.4's failure details.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionSite {
    pub receiving_mx: Option<String>,
    pub receiving_ip: Option<IpAddr>,
    /// Our own address on that connection.
    pub sending_ip: Option<IpAddr>,
}

impl SessionSite {
    /// Where a session to `server` was.
    pub fn at(server: &ServerId) -> SessionSite {
        SessionSite {
            receiving_mx: Some(server.name.clone()),
            receiving_ip: Some(server.addr),
            sending_ip: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_maps_to_the_result_type_of_the_design_table() {
        let result_type = |class| match SessionResult::from_class(class) {
            Some(SessionResult::Failure { result_type, .. }) => Some(result_type),
            _ => None,
        };
        use OutcomeClass as C;
        use ResultType as R;
        for (class, want) in [
            (C::NoStarttls, R::StarttlsNotSupported),
            (C::StarttlsRefused, R::StarttlsNotSupported),
            (C::CertExpired, R::CertificateExpired),
            (C::CertNameMismatch, R::CertificateHostMismatch),
            (C::CertUntrusted, R::CertificateNotTrusted),
            (C::HandshakeFailed, R::ValidationFailure),
            (C::LegacyTls, R::ValidationFailure),
            (C::TlsLegacy, R::ValidationFailure),
            (C::CertNotYetValid, R::ValidationFailure),
            (C::ProtocolViolation, R::ValidationFailure),
            (C::DaneMismatch, R::ValidationFailure),
            (C::DnssecBogus, R::DnssecInvalid),
        ] {
            assert_eq!(result_type(class), Some(want), "{class}");
        }
        assert_eq!(
            SessionResult::from_class(C::TlsVerified),
            Some(SessionResult::Success)
        );
        assert_eq!(SessionResult::from_class(C::ConnectFailed), None);
        assert_eq!(SessionResult::from_class(C::Timeout), None);
    }
}
