//! The TLS outcome taxonomy: what happened when we tried to encrypt a connection to an MX.
//!
//! One type answers "encrypted, and how" or "not encrypted, and why" (the why is never
//! lost). The cache, the rules, the logs, the admin socket and `probe` all speak it.

use std::fmt;

/// The class of an outcome, as named in logs, rules and the cache.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeClass {
    TlsVerified,
    TlsUnverified,
    TlsLegacy,
    NoStarttls,
    StarttlsRefused,
    HandshakeFailed,
    LegacyTls,
    CertExpired,
    CertNotYetValid,
    CertUntrusted,
    CertNameMismatch,
    ProtocolViolation,
    ConnectFailed,
    Timeout,
    DaneMismatch,
    DnssecBogus,
}

impl OutcomeClass {
    pub const ALL: [OutcomeClass; 16] = [
        OutcomeClass::TlsVerified,
        OutcomeClass::TlsUnverified,
        OutcomeClass::TlsLegacy,
        OutcomeClass::NoStarttls,
        OutcomeClass::StarttlsRefused,
        OutcomeClass::HandshakeFailed,
        OutcomeClass::LegacyTls,
        OutcomeClass::CertExpired,
        OutcomeClass::CertNotYetValid,
        OutcomeClass::CertUntrusted,
        OutcomeClass::CertNameMismatch,
        OutcomeClass::ProtocolViolation,
        OutcomeClass::ConnectFailed,
        OutcomeClass::Timeout,
        OutcomeClass::DaneMismatch,
        OutcomeClass::DnssecBogus,
    ];

    /// What this class means for delivery, the cache and the rules: its row of [`MEANINGS`].
    pub fn meaning(self) -> &'static Meaning {
        &MEANINGS[self as usize]
    }

    /// Whether this is how a TLS attempt failed (after which a rule may allow plain), rather
    /// than a success or a host that could not be reached at all.
    pub fn is_tls_failure(self) -> bool {
        matches!(self.meaning().kind, Kind::TlsFailure | Kind::CertFailure)
    }

    /// TLS was achieved (whether or not the certificate verified, by either stack).
    pub fn is_encrypted(self) -> bool {
        matches!(self.meaning().kind, Kind::Encrypted | Kind::Unauthenticated)
    }

    /// The host was not reached at all: not a fact about its TLS.
    pub fn is_unreachable(self) -> bool {
        self.meaning().kind == Kind::Unreachable
    }

    pub fn name(self) -> &'static str {
        match self {
            OutcomeClass::TlsVerified => "tls-verified",
            OutcomeClass::TlsUnverified => "tls-unverified",
            OutcomeClass::TlsLegacy => "tls-legacy",
            OutcomeClass::NoStarttls => "no-starttls",
            OutcomeClass::StarttlsRefused => "starttls-refused",
            OutcomeClass::HandshakeFailed => "handshake-failed",
            OutcomeClass::LegacyTls => "legacy-tls",
            OutcomeClass::CertExpired => "cert-expired",
            OutcomeClass::CertNotYetValid => "cert-not-yet-valid",
            OutcomeClass::CertUntrusted => "cert-untrusted",
            OutcomeClass::CertNameMismatch => "cert-name-mismatch",
            OutcomeClass::ProtocolViolation => "protocol-violation",
            OutcomeClass::ConnectFailed => "connect-failed",
            OutcomeClass::Timeout => "timeout",
            OutcomeClass::DaneMismatch => "dane-mismatch",
            OutcomeClass::DnssecBogus => "dnssec-bogus",
        }
    }
}

/// What kind of fact a class is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// TLS is up.
    Encrypted,
    /// TLS is up through the legacy stack: encrypted, never authenticated.
    Unauthenticated,
    /// The server would not, or could not, do TLS with us.
    TlsFailure,
    /// TLS came up but the certificate did not verify, and the policy required that it did.
    CertFailure,
    /// The server was not reached: not a fact about its TLS.
    Unreachable,
}

/// What a cached entry of a class does to the next message's attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenCached {
    /// TLS is tried as usual.
    TryTls,
    /// EHLO is read again (it costs nothing); STARTTLS is skipped only when an operator
    /// pinned the class.
    TryTlsUnlessPinned,
    /// No new handshake: the doomed one is skipped.
    SkipTls,
    /// No new handshake when the rule requires a verified certificate (the certificate
    /// is known to fail that); otherwise TLS is tried, and encrypts.
    SkipTlsIfVerifyRequired,
    /// The address is skipped until the entry expires.
    SkipAddress,
    /// rustls is skipped (it fails with this server): straight to the legacy stack, where
    /// the rule allows it.
    LegacyTls,
}

/// How long an observation of a class is believed: which `cache.ttl` applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl {
    Success,
    TlsFailure,
    Unreachable,
}

/// One row of the decision table: everything the code decides from a class alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meaning {
    pub class: OutcomeClass,
    pub kind: Kind,
    pub when_cached: WhenCached,
    /// Seen from a host that did TLS within the success TTL, this class is a downgrade
    /// (STARTTLS stripped, or TLS broken on the way).
    pub downgrade: bool,
    pub ttl: Ttl,
}

const fn row(class: OutcomeClass, kind: Kind, when_cached: WhenCached, downgrade: bool) -> Meaning {
    let ttl = match kind {
        Kind::Encrypted | Kind::Unauthenticated => Ttl::Success,
        Kind::TlsFailure | Kind::CertFailure => Ttl::TlsFailure,
        Kind::Unreachable => Ttl::Unreachable,
    };
    Meaning {
        class,
        kind,
        when_cached,
        downgrade,
        ttl,
    }
}

/// The decision table, in the order of [`OutcomeClass::ALL`]. A certificate failure is
/// no downgrade: TLS still came up. Nor is `tls-legacy`: it is TLS, and a later failure of
/// such a host is a downgrade from it.
pub const MEANINGS: [Meaning; 16] = {
    use Kind::*;
    use OutcomeClass as C;
    use WhenCached::*;
    [
        row(C::TlsVerified, Encrypted, TryTls, false),
        row(C::TlsUnverified, Encrypted, SkipTlsIfVerifyRequired, false),
        row(C::TlsLegacy, Unauthenticated, WhenCached::LegacyTls, false),
        row(C::NoStarttls, TlsFailure, TryTlsUnlessPinned, true),
        row(C::StarttlsRefused, TlsFailure, SkipTls, true),
        row(C::HandshakeFailed, TlsFailure, SkipTls, true),
        row(C::LegacyTls, TlsFailure, SkipTls, true),
        row(C::CertExpired, CertFailure, SkipTlsIfVerifyRequired, false),
        row(
            C::CertNotYetValid,
            CertFailure,
            SkipTlsIfVerifyRequired,
            false,
        ),
        row(
            C::CertUntrusted,
            CertFailure,
            SkipTlsIfVerifyRequired,
            false,
        ),
        row(
            C::CertNameMismatch,
            CertFailure,
            SkipTlsIfVerifyRequired,
            false,
        ),
        row(C::ProtocolViolation, TlsFailure, SkipTls, true),
        row(C::ConnectFailed, Unreachable, SkipAddress, false),
        row(C::Timeout, Unreachable, SkipAddress, false),
        // The TLSA records may change at any time: always tried again under DANE.
        row(C::DaneMismatch, CertFailure, TryTls, false),
        // A fact about the domain's DNS, not the server: never cached, always asked again.
        row(C::DnssecBogus, TlsFailure, TryTls, false),
    ]
};

impl fmt::Display for OutcomeClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for OutcomeClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        OutcomeClass::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = OutcomeClass::ALL.iter().map(|c| c.name()).collect();
                format!("unknown outcome class {s:?} (known: {})", names.join(", "))
            })
    }
}

/// Why a certificate did not verify for the MX name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertProblem {
    /// `not_after` as a date, `YYYY-MM-DD`.
    Expired {
        not_after: String,
    },
    NotYetValid {
        not_before: String,
    },
    /// No trusted CA vouches for it; `name_ok` says whether the name would have matched.
    Untrusted {
        why: Distrust,
        name_ok: bool,
    },
    NameMismatch {
        presented: Vec<String>,
    },
    Other(String),
}

/// A handshake the server ended without a word (no alert), as old servers (Schannel) and
/// middleboxes do when a ClientHello offers what they cannot parse: the legacy stack may
/// get past it.
pub const CLOSED_IN_HANDSHAKE: &str = "connection closed during the handshake, without an alert";
/// The same, with a reset.
pub const RESET_IN_HANDSHAKE: &str = "connection reset during the handshake, without an alert";

/// Why no trusted CA vouches for a certificate, in an admin's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Distrust {
    /// Its issuer is itself.
    SelfSigned,
    /// Issued by a CA this relay does not trust, by name.
    UnknownIssuer(String),
    /// A CA certificate, not issued to itself, shown as the server's own.
    CaAsServer,
    /// This relay trusts no root certificate at all.
    NoRoots,
    /// What the verifier said otherwise, in words.
    Other(String),
}

impl fmt::Display for Distrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Distrust::SelfSigned => write!(f, "self-signed"),
            Distrust::UnknownIssuer(issuer) => {
                write!(f, "issued by {issuer}, a CA this relay does not trust")
            }
            Distrust::CaAsServer => write!(f, "a CA certificate shown as the server's own"),
            Distrust::NoRoots => write!(f, "no trusted root certificates are configured"),
            Distrust::Other(words) => f.write_str(words),
        }
    }
}

impl CertProblem {
    pub fn class(&self) -> OutcomeClass {
        match self {
            CertProblem::Expired { .. } => OutcomeClass::CertExpired,
            CertProblem::NotYetValid { .. } => OutcomeClass::CertNotYetValid,
            CertProblem::Untrusted { .. } | CertProblem::Other(_) => OutcomeClass::CertUntrusted,
            CertProblem::NameMismatch { .. } => OutcomeClass::CertNameMismatch,
        }
    }
}

impl fmt::Display for CertProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertProblem::Expired { not_after } => write!(f, "certificate expired on {not_after}"),
            CertProblem::NotYetValid { not_before } => {
                write!(f, "certificate not valid before {not_before}")
            }
            CertProblem::Untrusted { why, name_ok } => {
                let name = if *name_ok {
                    ""
                } else {
                    ", and not valid for the name"
                };
                write!(f, "certificate untrusted ({why}){name}")
            }
            CertProblem::NameMismatch { presented } if presented.is_empty() => {
                write!(f, "certificate not valid for the MX name")
            }
            CertProblem::NameMismatch { presented } => write!(
                f,
                "certificate not valid for the MX name (it names {})",
                presented.join(", ")
            ),
            CertProblem::Other(detail) => write!(f, "certificate rejected ({detail})"),
        }
    }
}

/// The result of certificate verification, which runs in every TLS attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verification {
    Verified,
    Failed(CertProblem),
}

/// An encrypted session's parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSession {
    pub version: String,
    pub cipher: String,
    pub verification: Verification,
    /// The certificates the server sent, end entity first (for `probe` and the cache).
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// An encrypted session made by the legacy stack (OpenSSL) with a server that rustls could
/// not talk to: encrypted, never authenticated, whatever `verification` says. A type of its
/// own, so it cannot be taken for a [`TlsSession`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegacySession {
    /// "TLSv1.0" ... "TLSv1.3".
    pub version: String,
    /// The IANA name, e.g. "TLS_RSA_WITH_AES_128_CBC_SHA".
    pub cipher: String,
    /// What verification of the chain for the MX name found: a fact for the log only.
    pub verification: Verification,
    /// The certificates the server sent, end entity first.
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// Why a connection carries no TLS. Every plain delivery carries one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoTls {
    /// The EHLO reply has no STARTTLS.
    NoStarttls,
    /// STARTTLS was answered with this reply.
    StarttlsRefused(String),
    HandshakeFailed(String),
    LegacyTls(String),
    /// The legacy stack failed too, after rustls had: classed `handshake-failed`, never
    /// tried with the legacy stack again until its entry ends.
    LegacyFailed(String),
    /// The certificate did not verify and the policy requires that it does.
    CertRejected(CertProblem),
    ProtocolViolation(String),
    /// A rule says `tls: never`.
    NotWanted,
    /// The cache says this host failed TLS recently: no new attempt until the entry ends.
    Cached {
        class: OutcomeClass,
        detail: String,
    },
    /// DANE: the certificate matched none of the host's usable TLSA records.
    DaneMismatch(String),
}

impl NoTls {
    pub fn class(&self) -> Option<OutcomeClass> {
        Some(match self {
            NoTls::NoStarttls => OutcomeClass::NoStarttls,
            NoTls::StarttlsRefused(_) => OutcomeClass::StarttlsRefused,
            NoTls::HandshakeFailed(_) | NoTls::LegacyFailed(_) => OutcomeClass::HandshakeFailed,
            NoTls::LegacyTls(_) => OutcomeClass::LegacyTls,
            NoTls::CertRejected(problem) => problem.class(),
            NoTls::ProtocolViolation(_) => OutcomeClass::ProtocolViolation,
            NoTls::Cached { class, .. } => *class,
            NoTls::DaneMismatch(_) => OutcomeClass::DaneMismatch,
            NoTls::NotWanted => return None,
        })
    }
}

impl fmt::Display for NoTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoTls::NoStarttls => f.write_str("no STARTTLS offered"),
            NoTls::StarttlsRefused(reply) => write!(f, "STARTTLS refused: {reply}"),
            NoTls::HandshakeFailed(detail) => write!(f, "TLS handshake failed: {detail}"),
            NoTls::LegacyTls(detail) => write!(f, "server speaks only TLS 1.0/1.1: {detail}"),
            NoTls::LegacyFailed(detail) => write!(f, "legacy TLS handshake failed: {detail}"),
            NoTls::CertRejected(problem) => problem.fmt(f),
            NoTls::ProtocolViolation(detail) => write!(f, "protocol violation: {detail}"),
            NoTls::NotWanted => f.write_str("TLS not wanted by rule"),
            NoTls::DaneMismatch(detail) => write!(f, "dane-mismatch: {detail}"),
            NoTls::Cached { detail, .. } => write!(
                f,
                "{detail} (cached: not tried again until the entry expires or is flushed)"
            ),
        }
    }
}

/// Encrypted, and how; or not, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsOutcome {
    Encrypted(TlsSession),
    /// Encrypted by the legacy stack: `tls-legacy`, not authenticated.
    Legacy(LegacySession),
    Plain(NoTls),
}

impl TlsOutcome {
    /// The class to log and cache. `None` only for a plain session no one asked to encrypt.
    pub fn class(&self) -> Option<OutcomeClass> {
        match self {
            TlsOutcome::Encrypted(TlsSession {
                verification: Verification::Verified,
                ..
            }) => Some(OutcomeClass::TlsVerified),
            TlsOutcome::Encrypted(_) => Some(OutcomeClass::TlsUnverified),
            TlsOutcome::Legacy(_) => Some(OutcomeClass::TlsLegacy),
            TlsOutcome::Plain(reason) => reason.class(),
        }
    }

    pub fn is_encrypted(&self) -> bool {
        matches!(self, TlsOutcome::Encrypted(_) | TlsOutcome::Legacy(_))
    }

    /// The negotiated protocol and cipher, and what verification found, of an encrypted
    /// session of either stack.
    pub fn parameters(&self) -> Option<(&str, &str, &Verification)> {
        match self {
            TlsOutcome::Encrypted(s) => Some((&s.version, &s.cipher, &s.verification)),
            TlsOutcome::Legacy(s) => Some((&s.version, &s.cipher, &s.verification)),
            TlsOutcome::Plain(_) => None,
        }
    }
}

/// A date `YYYY-MM-DD` (UTC) from seconds since the epoch.
pub fn format_date(unix_seconds: u64) -> String {
    // Civil-from-days, Howard Hinnant's algorithm.
    let days = (unix_seconds / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Days since the epoch of a date `YYYY-MM-DD` (UTC), as [`format_date`] writes it.
pub fn days_of_date(date: &str) -> Option<i64> {
    // Days-from-civil, the inverse of the above.
    let mut parts = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (parts.next()??, parts.next()??, parts.next()??);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_read_back_as_they_are_written() {
        for secs in [0u64, 951_782_400, 1_800_000_000, 4_102_444_800] {
            let date = format_date(secs);
            assert_eq!(days_of_date(&date), Some((secs / 86_400) as i64), "{date}");
        }
        assert_eq!(days_of_date("2026-13-01"), None);
        assert_eq!(days_of_date("soon"), None);
    }

    #[test]
    fn class_names_round_trip() {
        for class in OutcomeClass::ALL {
            assert_eq!(class.name().parse::<OutcomeClass>(), Ok(class));
        }
        assert!("tls-maybe".parse::<OutcomeClass>().is_err());
    }

    #[test]
    fn the_decision_table_has_one_row_per_class_in_order() {
        for (i, class) in OutcomeClass::ALL.into_iter().enumerate() {
            assert_eq!(MEANINGS[i].class, class, "row {i}");
            assert_eq!(class.meaning().class, class);
        }
    }

    #[test]
    fn every_row_is_consistent() {
        for class in OutcomeClass::ALL {
            let m = class.meaning();
            // Only a failed TLS attempt can be a downgrade, and only one where TLS did
            // not come up at all.
            if m.downgrade {
                assert_eq!(m.kind, Kind::TlsFailure, "{class}");
            }
            // An unreachable host is skipped, never sent in plain.
            assert_eq!(
                m.when_cached == WhenCached::SkipAddress,
                m.kind == Kind::Unreachable,
                "{class}"
            );
            assert_eq!(
                class.is_tls_failure(),
                !class.is_encrypted() && !class.is_unreachable()
            );
        }
    }

    #[test]
    fn dates_are_formatted_in_utc() {
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(format_date(1_772_323_200), "2026-03-01");
        assert_eq!(format_date(951_782_400), "2000-02-29");
    }

    #[test]
    fn an_encrypted_session_with_a_bad_certificate_is_unverified() {
        let outcome = TlsOutcome::Encrypted(TlsSession {
            chain: Vec::new(),
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            verification: Verification::Failed(CertProblem::Expired {
                not_after: "2026-03-01".into(),
            }),
        });
        assert_eq!(outcome.class(), Some(OutcomeClass::TlsUnverified));
    }
}
