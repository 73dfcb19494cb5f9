//! Why a server did not take a transaction, in types: one attempt's failure, where its
//! dialogue broke, a smart host's AUTH, and each line of why no server took it. The log
//! line, the MTA's reply and the counters are rendered from these.

use crate::net::connection::ExchangeError;
use crate::net::dns::{AddressError, ServerId};
use crate::outbound::credentials::CredentialsError;
use crate::outbound::greetings::Busy;
use crate::outcome::{Kind, OutcomeClass};
use crate::router::decision::{Refusal, RefusalReason, Skip};
use crate::rules::model::HostPort;
use crate::smtp::{MissingExtension, Reply};

/// Why one server did not take the transaction.
#[derive(Debug)]
pub enum AttemptFailure {
    /// Not tried: it could not be reached moments ago.
    Skipped(Skip),
    /// No connection (remembered briefly, as `class`).
    Unreachable {
        class: OutcomeClass,
        error: ExchangeError,
    },
    /// The dialogue broke before MAIL FROM was accepted: not a TLS fact about the server.
    Broken(Broken),
    /// This host could not connect for a reason of its own (descriptors, buffers, the
    /// source address): nothing is learnt of the server, so nothing is cached or shared.
    Local(ExchangeError),
    /// TLS is required here (by the rule or what the domain publishes) and was not had.
    Refused(Refusal),
    /// The message needs an extension the server lacks; another server may have it.
    Unsupported(MissingExtension),
    /// The remote answered MAIL FROM with this; the MTA hears it.
    Rejected(Reply),
    /// The smart host's AUTH did not go through: delivery waits, whatever server.
    Auth(AuthFailure),
    /// Not tried: so many connections already wait for the server's greeting.
    Busy(Busy),
    /// Abandoned when the transaction's time for finding a server ran out.
    OutOfTime { secs: u64 },
}

impl From<AuthFailure> for AttemptFailure {
    fn from(failure: AuthFailure) -> AttemptFailure {
        AttemptFailure::Auth(failure)
    }
}

impl std::fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptFailure::Skipped(skip) => skip.fmt(f),
            AttemptFailure::Unreachable { error, .. } => match error {
                ExchangeError::Io(e) => write!(f, "connect failed: {e}"),
                other => other.fmt(f),
            },
            AttemptFailure::Broken(broken) => broken.fmt(f),
            AttemptFailure::Local(error) => write!(f, "local error on this relay: {error}"),
            AttemptFailure::Refused(refusal) => refusal.fmt(f),
            AttemptFailure::Unsupported(missing) => missing.fmt(f),
            AttemptFailure::Rejected(reply) => reply.fmt(f),
            AttemptFailure::Auth(failure) => failure.fmt(f),
            AttemptFailure::Busy(busy) => busy.fmt(f),
            AttemptFailure::OutOfTime { secs } => {
                write!(
                    f,
                    "abandoned when the {secs}s to find a server ran out (timeouts.route)"
                )
            }
        }
    }
}

/// Where a dialogue broke, and how.
#[derive(Debug, thiserror::Error)]
pub enum Broken {
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    #[error("greeting: {0}")]
    Greeting(Reply),
    #[error("EHLO: {0}")]
    Ehlo(Reply),
    #[error("EHLO and HELO refused: {0}")]
    EhloAndHelo(Reply),
    /// The server ended the session at STARTTLS (421/221).
    #[error("STARTTLS: {}", .0.one_line())]
    Starttls(Reply),
    /// The EHLO after a successful handshake failed: the server is in trouble, not its TLS.
    #[error("after TLS: {0}")]
    AfterTls(Box<Broken>),
    #[error("MAIL FROM: {0}")]
    MailFrom(Reply),
    #[error("during AUTH: {0}")]
    Auth(ExchangeError),
    #[error("fallback relay {relay}: no address")]
    RelayUnknown { relay: HostPort },
    #[error("fallback relay {relay}: {why}")]
    Relay {
        relay: HostPort,
        why: Box<AttemptFailure>,
    },
}

impl From<Broken> for AttemptFailure {
    fn from(broken: Broken) -> AttemptFailure {
        AttemptFailure::Broken(broken)
    }
}

/// Why a smart host's AUTH did not go through. Mail waits (4xx) until an admin sees to it.
#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    /// The legacy stack never authenticates the server: the password could go to anyone
    /// in the middle.
    #[error("{0}: no AUTH over unauthenticated legacy TLS")]
    LegacyTls(ServerId),
    #[error("{0}: AUTH only over TLS")]
    NotTls(String),
    #[error("smarthost credentials: {0}")]
    Credentials(CredentialsError),
    #[error("{0} offers neither AUTH PLAIN nor LOGIN")]
    NoMechanism(String),
    #[error("{host} refused AUTH: {reply}")]
    Refused { host: String, reply: Reply },
}

impl AuthFailure {
    /// What the MTA is told.
    pub fn reply(&self) -> Reply {
        let code = match self {
            AuthFailure::LegacyTls(_) | AuthFailure::NotTls(_) => "4.7.5",
            AuthFailure::Credentials(_) => "4.3.5",
            AuthFailure::NoMechanism(_) | AuthFailure::Refused { .. } => "4.7.0",
        };
        Reply::new(451, code, self)
    }
}

/// Why no more servers were tried: the transaction's budget was spent.
#[derive(Debug, thiserror::Error)]
pub enum Spent {
    #[error("{left} more MX hosts not tried (at most {limit} per transaction)")]
    MxHosts { left: usize, limit: usize },
    #[error("no more addresses tried (at most {limit} per transaction)")]
    Addresses { limit: usize },
    #[error("no more servers tried after {secs}s (timeouts.route)")]
    Time { secs: u64 },
}

/// One line of why no server took a transaction.
#[derive(Debug)]
pub enum Failed {
    /// The transaction's budget was spent before every server was tried.
    Budget(Spent),
    /// A host whose addresses could not be had.
    Addresses { host: String, error: AddressError },
    /// A server, and why it did not take the transaction.
    Server {
        server: ServerId,
        failure: AttemptFailure,
    },
    /// TLS required at a server and not had there. `unnamed_in`: the server is an original
    /// destination that no MX host of this domain names, which is why it cannot verify.
    Refused {
        server: ServerId,
        refusal: Refusal,
        unnamed_in: Option<String>,
    },
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Budget(spent) => spent.fmt(f),
            Failed::Addresses { host, error } => write!(f, "{host}: {error}"),
            Failed::Server {
                server,
                failure: AttemptFailure::Unsupported(missing),
            } => write!(f, "{server}: {}", unsupported_reply(server, missing)),
            Failed::Server { server, failure } => write!(f, "{server}: {failure}"),
            // The cause, first: the MTA's queue shows it before any cut.
            Failed::Refused {
                server,
                refusal,
                unnamed_in: Some(domain),
            } => write!(
                f,
                "{} is no MX host of {domain}: the certificate cannot be verified for an MX \
                 name ({server} {refusal})",
                server.addr
            ),
            Failed::Refused {
                server, refusal, ..
            } => write!(f, "{server} {refusal}"),
        }
    }
}

impl Failed {
    /// The failure as the ledger keeps it: the host it was about, its class, its words.
    pub fn to_ledger(&self, at: u64) -> crate::ledger::Failure {
        let (host, class) = match self {
            Failed::Budget(_) => (None, None),
            Failed::Addresses { host, .. } => (Some(host.clone()), None),
            Failed::Server { server, failure } => {
                let class = match failure {
                    AttemptFailure::Unreachable { class, .. } => Some(*class),
                    AttemptFailure::Refused(refusal) => refusal.class(),
                    _ => None,
                };
                (Some(server.name.clone()), class)
            }
            Failed::Refused {
                server, refusal, ..
            } => (Some(server.name.clone()), refusal.class()),
        };
        crate::ledger::Failure {
            at,
            host,
            class,
            reason: self.to_string(),
        }
    }

    /// Whether the failure is this host's own (out of descriptors, a source address it
    /// lacks): it says nothing of the server, and is neither cached nor shared.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            Failed::Server {
                failure: AttemptFailure::Local(_),
                ..
            } | Failed::Addresses {
                error: AddressError::Local(_),
                ..
            }
        )
    }

    /// Whether trying again later cannot help: TLS refused for what the server is (no
    /// STARTTLS, a certificate that does not verify, a name nothing vouches for), or an
    /// extension the message needs. Not a lookup, a connection or a dialogue that failed,
    /// a handshake that broke, a downgrade, nor a TLSA answer that could not be had.
    pub fn is_permanent(&self) -> bool {
        match self {
            Failed::Budget(_) => false,
            Failed::Addresses { error, .. } => *error == AddressError::NotFound,
            Failed::Server { failure, .. } => matches!(failure, AttemptFailure::Unsupported(_)),
            Failed::Refused { refusal, .. } => match &refusal.reason {
                RefusalReason::NameNotAuthentic | RefusalReason::NotInPolicy => true,
                RefusalReason::NoTls(_) => refusal.class().is_some_and(|class| {
                    class == OutcomeClass::NoStarttls
                        || class == OutcomeClass::TlsUnverified
                        || class.meaning().kind == Kind::CertFailure
                }),
                RefusalReason::TlsaUnknown | RefusalReason::Downgrade(_) => false,
            },
        }
    }
}

/// The reply for a message a server cannot take for want of an extension: for
/// REQUIRETLS, RFC 8689's own status.
pub(crate) fn unsupported_reply(server: &ServerId, missing: &MissingExtension) -> Reply {
    match missing.0 {
        "REQUIRETLS" => Reply::new(550, "5.7.30", format!("{server} {missing}")),
        _ => Reply::new(554, "5.6.9", format!("{server} {missing}")),
    }
}
