//! The host decision: what delivery does with one server, from its rule, what is known of
//! it, and what its domain publishes. Delivery, `explain` and `probe` all ask [`decide`], so
//! what the tools say is what the daemon does.
//!
//! It is asked twice for a server: before connecting (with what the cache knows), and after
//! the TLS attempt (with what the attempt found). What a class means on its own is the
//! table beside [`OutcomeClass`] ([`crate::outcome::MEANINGS`]); this function adds the rule.

use std::fmt;

use crate::cache::{CacheEntry, TlsMemory};
use crate::outcome::{
    CLOSED_IN_HANDSHAKE, Kind, NoTls, OutcomeClass, RESET_IN_HANDSHAKE, TlsOutcome, Verification,
    WhenCached,
};
use crate::rules::model::{HostPort, SmarthostTls};
use crate::rules::{Fallback, LegacyTls, MinTls, OnDowngrade, Route, Rule, TlsMode, VerifyMode};

/// Whether this build has the legacy TLS stack; without it the decision never picks it.
const LEGACY_BUILT: bool = cfg!(feature = "legacy-tls");

/// What is known of a server when its fate is decided.
#[derive(Clone, Copy, Debug)]
pub enum Known<'a> {
    /// Nothing believed: no cache entry, or an expired one.
    Nothing,
    /// What the cache believes: an earlier observation, or an operator's pin; and what the
    /// server did within the success memory, over which a cached failure an attacker on the
    /// path could cause is not believed.
    Cached {
        entry: &'a CacheEntry,
        memory: TlsMemory,
    },
    /// What the attempt just made found. `downgrade`: the server did TLS within the
    /// success TTL, and this is not TLS.
    Found {
        outcome: &'a TlsOutcome,
        downgrade: bool,
    },
}

impl<'a> Known<'a> {
    /// What the cache holds for a server (see [`Known::Cached`]).
    pub fn cached(entry: &'a CacheEntry, memory: TlsMemory) -> Known<'a> {
        Known::Cached { entry, memory }
    }
}

/// What the recipient domain publishes about how its servers must be reached, as it
/// bears on one server. It comes before the rules: a rule can make delivery stricter,
/// never weaker, unless it sets `override_published_policy` (see [`overridden`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Published {
    #[default]
    Nothing,
    /// An MTA-STS policy (RFC 8461). `mx_listed`: the server's name matches one of the
    /// policy's `mx` patterns.
    MtaSts { mode: StsMode, mx_listed: bool },
    /// DANE (RFC 7672): the server's MX and address answers were DNSSEC-secure, and so is
    /// what its TLSA lookup found. Comes before MTA-STS.
    Dane(DaneState),
}

/// What a secure MX host's TLSA lookup says (RFC 7672 2.2, 2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaneState {
    /// Usable TLSA records: TLS required, the certificate must match one of them.
    Usable,
    /// TLSA records, none usable: TLS required, unauthenticated.
    Unusable,
    /// The TLSA lookup was bogus, indeterminate or failed: nothing may be sent now.
    Bogus,
}

/// The MTA-STS modes that bear on delivery (`none` is as no policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StsMode {
    /// Only the listed MX hosts, only over TLS with a certificate verified for the name.
    Enforce,
    /// Deliver as the rules say; failures are only reported.
    Testing,
}

/// What the message's sender demands of every server it goes to (RFC 8689).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Demand {
    /// Nothing beyond the rules and what the domain publishes.
    #[default]
    Nothing,
    /// REQUIRETLS: only over TLS with a verified certificate (by its TLSA records where
    /// DANE applies, else PKIX for the server's name), to a server whose name is authentic:
    /// named by a DNSSEC-secure MX answer, by the domain's MTA-STS `enforce` policy, or by
    /// the admin (a smart host). `name_authentic`: the first or the last holds. Never
    /// plain, never the legacy stack, never a relay, whatever the rule.
    RequireTls { name_authentic: bool },
}

impl Published {
    /// The policy as the log line names it: `mta-sts:enforce`, `mta-sts:testing`.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Published::Nothing => None,
            Published::MtaSts {
                mode: StsMode::Enforce,
                ..
            } => Some("mta-sts:enforce"),
            Published::MtaSts {
                mode: StsMode::Testing,
                ..
            } => Some("mta-sts:testing"),
            Published::Dane(DaneState::Usable) => Some("dane"),
            Published::Dane(DaneState::Unusable) => Some("dane:unusable-tlsa"),
            Published::Dane(DaneState::Bogus) => Some("dane:dnssec-bogus"),
        }
    }
}

/// Whether `rule` is applied as it is although `published` asks for more: it says so
/// explicitly. Delivery logs every such use at warn.
pub fn overridden(rule: &Rule, published: Published) -> bool {
    rule.override_published_policy && binding(published)
}

/// A published policy that delivery must follow (not one that only asks for reports).
fn binding(published: Published) -> bool {
    matches!(
        published,
        Published::MtaSts {
            mode: StsMode::Enforce,
            ..
        } | Published::Dane(_)
    )
}

/// How to run TLS with a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsTerms {
    pub verify: VerifyMode,
    pub min_tls: MinTls,
    /// Implicit TLS from the first byte (port 465), not STARTTLS.
    pub implicit: bool,
    /// What the certificate is judged by.
    pub authentication: Authentication,
}

/// What a server's certificate is judged by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authentication {
    /// PKIX: a chain to a trusted root, valid for the server's name (`verify` says whether
    /// that is required).
    Pkix,
    /// DANE with usable TLSA records (RFC 7672 3): the certificate must match one of them.
    Tlsa,
    /// DANE with TLSA records of which none is usable (RFC 7672 2.2): STARTTLS is required,
    /// unauthenticated (unless the rule's own `verify: require` asks for PKIX).
    UnusableTlsa,
}

/// What delivery does with one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostDecision {
    /// Connect and encrypt with these terms (STARTTLS when offered); after a successful
    /// attempt, deliver on that session.
    Tls(TlsTerms),
    /// Connect, STARTTLS, and encrypt with the legacy stack (OpenSSL): for a server rustls
    /// cannot talk to. Encrypted, never authenticated (`tls-legacy`); no AUTH goes over it.
    LegacyTls,
    /// Deliver in plain, for this reason, on this path.
    Plain { reason: NoTls, path: Fallback },
    /// Not this server: TLS is required here and cannot be had. When no server takes the
    /// message, the MTA gets `451 4.7.5` saying why.
    Refuse(Refusal),
    /// Not this address for now: it could not be reached moments ago.
    Skip(Skip),
}

/// Why a server is refused: what required TLS (a published policy, or the rule), and why
/// it cannot be had here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The published policy that requires it; `None`: the rule.
    pub under: Option<Binding>,
    pub reason: RefusalReason,
}

/// A published policy that binds delivery to a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// The sender's REQUIRETLS (RFC 8689).
    RequireTls,
    MtaStsEnforce,
    /// DANE with usable TLSA records.
    Dane,
    /// DANE with TLSA records of which none is usable: TLS required, unauthenticated.
    DaneUnusable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// No TLS here, for this reason, and nothing allows plain after it.
    NoTls(NoTls),
    /// The server is no MX host the domain's MTA-STS policy names.
    NotInPolicy,
    /// REQUIRETLS: the server's name is not authentic (the MX answer was not
    /// DNSSEC-secure, and no MTA-STS `enforce` policy names it).
    NameNotAuthentic,
    /// The TLSA answer (or a lookup that says whether DANE applies) was bogus,
    /// indeterminate or could not be had: nothing may be sent now.
    TlsaUnknown,
    /// The server did TLS recently, and now fails it (with this class), under
    /// `on_downgrade: defer`.
    Downgrade(Option<OutcomeClass>),
}

impl Refusal {
    fn by_rule(reason: NoTls) -> Refusal {
        Refusal {
            under: None,
            reason: RefusalReason::NoTls(reason),
        }
    }

    /// The outcome class behind the refusal, for counters and reports.
    pub fn class(&self) -> Option<OutcomeClass> {
        match &self.reason {
            RefusalReason::NoTls(reason) => reason.class(),
            RefusalReason::NotInPolicy | RefusalReason::NameNotAuthentic => None,
            RefusalReason::TlsaUnknown => Some(OutcomeClass::DnssecBogus),
            RefusalReason::Downgrade(class) => *class,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.under {
            None => {}
            Some(Binding::RequireTls) => f.write_str("REQUIRETLS: ")?,
            Some(Binding::MtaStsEnforce) => f.write_str("MTA-STS enforce: ")?,
            Some(Binding::Dane) => f.write_str("DANE: ")?,
            Some(Binding::DaneUnusable) => f.write_str("DANE (no usable TLSA record): ")?,
        }
        match &self.reason {
            RefusalReason::NoTls(reason) => reason.fmt(f),
            RefusalReason::NotInPolicy => f.write_str("not an MX host of the policy"),
            RefusalReason::NameNotAuthentic => f.write_str(
                "the MX answer was not DNSSEC-secure and no MTA-STS enforce policy names the host",
            ),
            RefusalReason::TlsaUnknown => write!(
                f,
                "{}: the TLSA answer is bogus or could not be had",
                OutcomeClass::DnssecBogus
            ),
            RefusalReason::Downgrade(class) => write!(
                f,
                "downgrade: did TLS before, now {}",
                class.map_or("no TLS", OutcomeClass::name)
            ),
        }
    }
}

/// Why an address is skipped: it could not be reached moments ago.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    /// `connect-failed` or `timeout`.
    pub class: OutcomeClass,
    pub detail: String,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (cached, retried after it expires)", self.detail)
    }
}

impl HostDecision {
    /// The decision's name, for scripts: `tls`, `legacy-tls`, `plain`, `refuse` or `skip`.
    pub fn action(&self) -> &'static str {
        match self {
            HostDecision::Tls(_) => "tls",
            HostDecision::LegacyTls => "legacy-tls",
            HostDecision::Plain { .. } => "plain",
            HostDecision::Refuse(_) => "refuse",
            HostDecision::Skip(_) => "skip",
        }
    }
}

/// A connection that is already open (the transaction's route, or one kept in the pool),
/// as a decision sees it: how it is secured, what judged its certificate, which path.
#[derive(Clone, Copy, Debug)]
pub struct Connected<'a> {
    pub tls: &'a TlsOutcome,
    /// What its certificate was judged by, when rustls secured it.
    pub authentication: Authentication,
    /// The fallback relay it goes to instead of the server.
    pub relay: Option<&'a HostPort>,
}

impl HostDecision {
    /// Whether this decision asks that the certificate be judged for the server's name (or
    /// by its TLSA records): TLS that must verify, or DANE.
    pub fn authenticates(&self) -> bool {
        matches!(self, HostDecision::Tls(terms)
            if terms.verify == VerifyMode::Require || terms.authentication == Authentication::Tlsa)
    }

    /// Whether `conn` is a connection this decision would have made: TLS under these
    /// terms (TLS 1.3 where it is required, a certificate judged as they require), the
    /// legacy stack, or plain on this path. Refusing and skipping admit nothing.
    pub fn admits(&self, conn: &Connected<'_>) -> bool {
        match (self, conn.tls) {
            (HostDecision::Tls(terms), TlsOutcome::Encrypted(session)) => {
                let version = terms.min_tls == MinTls::Tls12 || session.version == "TLSv1.3";
                let judged = match (terms.authentication, terms.verify) {
                    (Authentication::Tlsa, _) => conn.authentication == Authentication::Tlsa,
                    (_, VerifyMode::Require) => {
                        conn.authentication == Authentication::Pkix
                            && session.verification == Verification::Verified
                    }
                    (_, VerifyMode::Try) => true,
                };
                conn.relay.is_none() && version && judged
            }
            (HostDecision::LegacyTls, TlsOutcome::Legacy(_)) => conn.relay.is_none(),
            (HostDecision::Plain { path, .. }, TlsOutcome::Plain(_)) => match path {
                Fallback::Direct => conn.relay.is_none(),
                Fallback::Relay(relay) => conn.relay == Some(relay),
            },
            _ => false,
        }
    }
}

/// The one decision. Pure: it reads nothing but its arguments.
pub fn decide(rule: &Rule, known: Known<'_>, published: Published, demand: Demand) -> HostDecision {
    if let Demand::RequireTls { name_authentic } = demand {
        return require_tls(rule, known, published, name_authentic);
    }
    if overridden(rule, published) {
        // An overridden policy still binds this far: never the unauthenticated stack.
        return under_rule(rule, known, false);
    }
    match published {
        Published::Dane(state) => dane(rule, known, state),
        Published::MtaSts {
            mode: StsMode::Enforce,
            mx_listed: false,
        } => HostDecision::Refuse(Refusal {
            under: Some(Binding::MtaStsEnforce),
            reason: RefusalReason::NotInPolicy,
        }),
        Published::MtaSts {
            mode: StsMode::Enforce,
            mx_listed: true,
        } => bound(
            Binding::MtaStsEnforce,
            under_rule(&enforced(rule), known, false),
        ),
        Published::MtaSts {
            mode: StsMode::Testing,
            ..
        }
        | Published::Nothing => under_rule(rule, known, true),
    }
}

/// The sender's REQUIRETLS (RFC 8689 4.2.1): verified TLS to a server whose name is
/// authentic, whatever the rule, and whatever a rule's override of the domain's policy
/// (it is the sender's word, not the domain's). What the domain publishes binds as well.
fn require_tls(
    rule: &Rule,
    known: Known<'_>,
    published: Published,
    name_authentic: bool,
) -> HostDecision {
    let mut strict = enforced(rule);
    strict.override_published_policy = false;
    match published {
        Published::Dane(state) => dane(&strict, known, state),
        Published::MtaSts {
            mode: StsMode::Enforce,
            ..
        } => decide(&strict, known, published, Demand::Nothing),
        _ if !name_authentic => HostDecision::Refuse(Refusal {
            under: Some(Binding::RequireTls),
            reason: RefusalReason::NameNotAuthentic,
        }),
        _ => bound(Binding::RequireTls, under_rule(&strict, known, false)),
    }
}

/// A refusal of the rule made strict by a published policy is that policy's.
fn bound(binding: Binding, decision: HostDecision) -> HostDecision {
    match decision {
        HostDecision::Refuse(refusal) => HostDecision::Refuse(Refusal {
            under: Some(binding),
            ..refusal
        }),
        decision => decision,
    }
}

/// DANE's decision (RFC 7672 2.2): TLS required whatever the rule, never plain, never the
/// legacy stack. The certificate is judged by the TLSA records during the handshake (the
/// DANE verifier), so what the cache knows of it under PKIX does not count: only an
/// unreachable address is skipped.
fn dane(rule: &Rule, known: Known<'_>, state: DaneState) -> HostDecision {
    if state == DaneState::Bogus {
        return HostDecision::Refuse(Refusal {
            under: Some(Binding::Dane),
            reason: RefusalReason::TlsaUnknown,
        });
    }
    let mut strict = enforced(rule);
    if state == DaneState::Unusable {
        // TLS required, unauthenticated, unless the rule itself asks for more.
        strict.policy.verify = rule.policy.verify;
    }
    let known = match known {
        Known::Cached { entry, .. } if entry.class.is_unreachable() => known,
        Known::Cached { .. } => Known::Nothing,
        found => found,
    };
    let (binding, authentication) = match state {
        DaneState::Usable => (Binding::Dane, Authentication::Tlsa),
        _ => (Binding::DaneUnusable, Authentication::UnusableTlsa),
    };
    match bound(binding, under_rule(&strict, known, false)) {
        HostDecision::Tls(terms) => HostDecision::Tls(TlsTerms {
            authentication,
            ..terms
        }),
        decision => decision,
    }
}

fn under_rule(rule: &Rule, known: Known<'_>, legacy_ok: bool) -> HostDecision {
    let terms = terms(rule);
    let legacy = legacy_ok && legacy_allowed(rule, terms);
    match known {
        Known::Nothing => initial(rule, terms),
        Known::Cached { entry, memory } => cached(rule, terms, entry, memory, legacy),
        Known::Found { outcome, downgrade } => found(rule, terms, outcome, downgrade, legacy),
    }
}

/// Whether the rule lets the legacy stack encrypt: it is unauthenticated and speaks below
/// TLS 1.2, so never where a verified certificate or TLS 1.3 is required.
fn legacy_allowed(rule: &Rule, terms: TlsTerms) -> bool {
    LEGACY_BUILT
        && rule.policy.legacy_tls == LegacyTls::Encrypt
        && rule.policy.tls != TlsMode::Never
        && terms.verify == VerifyMode::Try
        && terms.min_tls == MinTls::Tls12
        && !terms.implicit
}

/// A rustls failure the legacy stack may get past: the server's protocol versions or cipher
/// suites are older than rustls has (a protocol_version, handshake_failure or
/// insufficient_security alert, or a close or reset without any alert, as old servers
/// answer a ClientHello they cannot parse). A failure of the legacy stack itself never is.
pub fn legacy_may_help(reason: &NoTls) -> bool {
    match reason {
        NoTls::LegacyTls(_) => true,
        NoTls::HandshakeFailed(detail) => legacy_cause(detail),
        _ => false,
    }
}

fn legacy_cause(detail: &str) -> bool {
    [
        "ProtocolVersion",
        "HandshakeFailure",
        "InsufficientSecurity",
        CLOSED_IN_HANDSHAKE,
        RESET_IN_HANDSHAKE,
    ]
    .iter()
    .any(|alert| detail.contains(alert))
}

/// Whether a cached `class` could be an attacker's doing, given what the server did
/// within the success memory: then it is never believed over that, or one injection would
/// buy an hour of plain. A stripped STARTTLS, an injected `454`, a reset or a stray byte
/// after the `220` (the classes a row of the table calls a downgrade) after any TLS; a
/// certificate that did not verify after one that did (a certificate an attacker shows).
/// TLS is tried again, and what it finds decides. An operator's pin is not memory.
pub fn attacker_could(class: OutcomeClass, memory: TlsMemory) -> bool {
    let certificate =
        class.meaning().kind == Kind::CertFailure || class == OutcomeClass::TlsUnverified;
    match memory {
        TlsMemory::Nothing => false,
        TlsMemory::Tls => class.meaning().downgrade,
        TlsMemory::VerifiedTls => class.meaning().downgrade || certificate,
    }
}

/// A cache entry after which the next message goes straight to the legacy stack.
fn legacy_cached(entry: &CacheEntry) -> bool {
    match entry.class {
        OutcomeClass::TlsLegacy | OutcomeClass::LegacyTls => true,
        OutcomeClass::HandshakeFailed => legacy_cause(&entry.detail),
        _ => false,
    }
}

/// The rule made as strict as an enforced policy: TLS required, the certificate verified
/// for the MX name, no plain path of any kind. What the rule asks beyond that (TLS 1.3)
/// stays.
fn enforced(rule: &Rule) -> Rule {
    let mut strict = rule.clone();
    strict.policy.tls = TlsMode::Require;
    strict.policy.verify = VerifyMode::Require;
    strict.policy.fallback_on.clear();
    strict.on_downgrade = OnDowngrade::Defer;
    strict
}

fn terms(rule: &Rule) -> TlsTerms {
    TlsTerms {
        verify: rule.policy.verify,
        min_tls: rule.policy.min_tls,
        implicit: matches!(
            rule.route,
            Route::Smarthost {
                tls: SmarthostTls::Wrapper,
                ..
            }
        ),
        authentication: Authentication::Pkix,
    }
}

fn initial(rule: &Rule, terms: TlsTerms) -> HostDecision {
    if rule.policy.tls == TlsMode::Never && !terms.implicit {
        return HostDecision::Plain {
            reason: NoTls::NotWanted,
            path: rule.fallback.clone(),
        };
    }
    HostDecision::Tls(terms)
}

fn cached(
    rule: &Rule,
    terms: TlsTerms,
    entry: &CacheEntry,
    memory: TlsMemory,
    legacy: bool,
) -> HostDecision {
    if !entry.pinned && attacker_could(entry.class, memory) {
        return initial(rule, terms);
    }
    let tls_wanted = matches!(initial(rule, terms), HostDecision::Tls(_));
    if tls_wanted && legacy && legacy_cached(entry) {
        return HostDecision::LegacyTls;
    }
    let skip = match entry.class.meaning().when_cached {
        WhenCached::SkipAddress => {
            return HostDecision::Skip(Skip {
                class: entry.class,
                detail: entry.detail.clone(),
            });
        }
        WhenCached::TryTls => None,
        WhenCached::TryTlsUnlessPinned => entry.pinned.then_some(entry.class),
        WhenCached::SkipTls => Some(entry.class),
        // rustls failed with this server before the legacy stack encrypted.
        WhenCached::LegacyTls => Some(OutcomeClass::LegacyTls),
        WhenCached::SkipTlsIfVerifyRequired if terms.verify == VerifyMode::Require => {
            // An encrypted entry keeps its certificate's class apart.
            Some(match entry.class.meaning().kind {
                Kind::Encrypted => entry.cert_problem.unwrap_or(OutcomeClass::CertUntrusted),
                _ => entry.class,
            })
        }
        WhenCached::SkipTlsIfVerifyRequired => None,
    };
    let first = initial(rule, terms);
    match (skip, &first) {
        (Some(class), HostDecision::Tls(_)) => without_tls(
            rule,
            NoTls::Cached {
                class,
                detail: entry.detail.clone(),
            },
        ),
        _ => first,
    }
}

fn found(
    rule: &Rule,
    terms: TlsTerms,
    outcome: &TlsOutcome,
    downgrade: bool,
    legacy: bool,
) -> HostDecision {
    match outcome {
        TlsOutcome::Encrypted(session) => match &session.verification {
            Verification::Failed(problem) if terms.verify == VerifyMode::Require => {
                without_tls(rule, NoTls::CertRejected(problem.clone()))
            }
            _ => HostDecision::Tls(terms),
        },
        TlsOutcome::Legacy(session) if !legacy => without_tls(
            rule,
            NoTls::LegacyTls(format!("{} not allowed by the rule", session.version)),
        ),
        TlsOutcome::Legacy(_) => HostDecision::LegacyTls,
        // No TLS was tried on this connection (a rule said `tls: never`): what it is worth
        // is what this rule wants of a connection nothing is known of.
        TlsOutcome::Plain(NoTls::NotWanted) => initial(rule, terms),
        TlsOutcome::Plain(reason) => {
            if downgrade && rule.on_downgrade == OnDowngrade::Defer {
                return HostDecision::Refuse(Refusal {
                    under: None,
                    reason: RefusalReason::Downgrade(reason.class()),
                });
            }
            if legacy && legacy_may_help(reason) {
                return HostDecision::LegacyTls;
            }
            without_tls(rule, reason.clone())
        }
    }
}

/// TLS will not be had with this server, for `reason`: plain where the rule allows it.
fn without_tls(rule: &Rule, reason: NoTls) -> HostDecision {
    if rule.policy.allows_plain(&reason) {
        HostDecision::Plain {
            reason,
            path: rule.fallback.clone(),
        }
    } else {
        HostDecision::Refuse(Refusal::by_rule(reason))
    }
}

/// Whether what an attempt found is a fact about the server, to cache and to count as a
/// downgrade. A handshake that failed only under a rule asking for more than TLS 1.2 may
/// say nothing about the server.
pub fn is_fact_about_server(rule: &Rule, outcome: &TlsOutcome) -> bool {
    !(rule.policy.min_tls != MinTls::Tls12
        && matches!(
            outcome,
            TlsOutcome::Plain(NoTls::HandshakeFailed(_) | NoTls::LegacyTls(_))
        ))
}

impl fmt::Display for HostDecision {
    /// In words, for `explain` and `probe`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostDecision::Tls(terms) => {
                let how = match (terms.implicit, terms.authentication) {
                    (true, _) => "implicit TLS",
                    (false, Authentication::Pkix) => "STARTTLS when offered",
                    // DANE: no STARTTLS, no delivery (RFC 7672 2.2).
                    (false, _) => "STARTTLS required",
                };
                let verify = match (terms.authentication, terms.verify) {
                    (Authentication::Tlsa, _) => {
                        "the certificate must match a usable TLSA record (DANE)"
                    }
                    (Authentication::UnusableTlsa, VerifyMode::Try) => {
                        "unauthenticated: no TLSA record is usable (DANE)"
                    }
                    (Authentication::UnusableTlsa, VerifyMode::Require) => {
                        "no TLSA record is usable (DANE); the rule's verify: require: the certificate must verify"
                    }
                    (Authentication::Pkix, VerifyMode::Require) => "the certificate must verify",
                    (Authentication::Pkix, VerifyMode::Try) => {
                        "encrypted even if the certificate does not verify"
                    }
                };
                write!(f, "TLS ({how}, {}+, {verify})", terms.min_tls.name())
            }
            HostDecision::LegacyTls => f.write_str(
                "legacy TLS (STARTTLS with the second stack, OpenSSL: encrypted, not authenticated)",
            ),
            HostDecision::Plain { reason, path } => {
                let path = match path {
                    Fallback::Direct => "to the same server".to_string(),
                    Fallback::Relay(relay) => format!("through relay {relay}"),
                };
                write!(f, "plain {path} ({reason})")
            }
            HostDecision::Refuse(why) if why.under == Some(Binding::RequireTls) => write!(
                f,
                "not to this server: {why}; with no other server, refused with 550 5.7.30 \
                 (deferred where trying again may help)"
            ),
            HostDecision::Refuse(why) => write!(
                f,
                "not to this server: {why}; with no other server, deferred with 451 4.7.5"
            ),
            HostDecision::Skip(why) => write!(f, "address skipped: {why}"),
        }
    }
}

#[cfg(test)]
mod property;

#[cfg(test)]
mod tests;
