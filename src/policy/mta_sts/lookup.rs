//! What a lookup found for a domain, and why a published policy could not be had.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::policy::mta_sts::policy::{Mode, StsPolicy};

/// Why a published policy could not be had; each kind is a TLS-RPT result type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyErrorKind {
    /// `sts-policy-fetch-error`: DNS, connect, timeout, a status other than 200, a redirect,
    /// a type other than text/plain, a body over 64 KiB.
    FetchError,
    /// `sts-policy-invalid`: the text is not a valid policy.
    Invalid,
    /// `sts-webpki-invalid`: the certificate of `mta-sts.<domain>` did not verify.
    WebpkiInvalid,
}

impl PolicyErrorKind {
    /// The RFC 8460 result type.
    pub fn result_type(self) -> &'static str {
        match self {
            PolicyErrorKind::FetchError => "sts-policy-fetch-error",
            PolicyErrorKind::Invalid => "sts-policy-invalid",
            PolicyErrorKind::WebpkiInvalid => "sts-webpki-invalid",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {detail}", kind.result_type())]
pub struct PolicyError {
    pub kind: PolicyErrorKind,
    pub detail: String,
}

impl PolicyError {
    pub(super) fn new(kind: PolicyErrorKind, detail: impl Into<String>) -> PolicyError {
        PolicyError {
            kind,
            detail: detail.into(),
        }
    }
}

/// What [`PolicyStore::policy_for`] found for a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyLookup {
    /// A valid policy is in force (its mode may be `none`).
    Found(Arc<StsPolicy>),
    /// The domain publishes no usable `_mta-sts` record and nothing is cached.
    NotPublished,
    /// A record is published, nothing is cached, and the fetch has not finished within the
    /// wait: deliver as if there were no policy (RFC 8461 5.1); the fetch goes on.
    NotYet,
    /// A record is published but its policy could not be had and nothing is cached:
    /// deliver as if there were no policy, and report the error.
    Unavailable(PolicyError),
}

impl PolicyLookup {
    pub fn policy(&self) -> Option<&Arc<StsPolicy>> {
        match self {
            PolicyLookup::Found(policy) => Some(policy),
            _ => None,
        }
    }

    /// The policy in `enforce` mode, if that is what applies.
    pub fn enforced(&self) -> Option<&Arc<StsPolicy>> {
        self.policy().filter(|p| p.mode == Mode::Enforce)
    }

    /// For the log line: `mta-sts:enforce`, `mta-sts:none-yet`, `none`...
    pub fn label(&self) -> String {
        match self {
            PolicyLookup::Found(policy) => format!("mta-sts:{}", policy.mode),
            PolicyLookup::NotPublished => "none".into(),
            PolicyLookup::NotYet => "mta-sts:pending".into(),
            PolicyLookup::Unavailable(e) => format!("mta-sts:{}", e.kind.result_type()),
        }
    }
}
