//! The command line: its commands, options and exit codes.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tlsrouter::cache::TlsMemory;
use tlsrouter::config::LogFormat;
use tlsrouter::ledger::Route;
use tlsrouter::outcome::OutcomeClass;

/// EX_USAGE from sysexits.h: the configuration is wrong.
pub(crate) const EXIT_CONFIG: u8 = 64;

/// EX_UNAVAILABLE from sysexits.h: `probe` found no server it could probe.
pub(crate) const EXIT_NOTHING_PROBED: u8 = 69;

#[derive(Parser)]
#[command(version, about = "Opportunistic-TLS routing proxy for outbound SMTP")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Commands,
}

#[derive(Subcommand)]
pub(crate) enum Commands {
    /// Run the proxy (on the embedded defaults when no --config is given).
    Run {
        /// YAML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Log format; overrides log.format in the configuration.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        /// YAML configuration file.
        file: PathBuf,
    },
    /// Check a rule file: syntax, values, and rules that can never match.
    Check {
        /// YAML rule file.
        file: PathBuf,
    },
    /// Ask the running daemon: cache, rules, stats, sessions, probe.
    Ctl {
        /// The admin socket (default: admin.socket of the configuration, else
        /// /run/tlsrouter/admin.sock).
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
        /// The daemon's configuration, for its admin.socket (default: the packaged
        /// /etc/tlsrouter/tlsrouter.yaml when it is there and readable).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// Print the daemon's JSON answer instead of a table (before or after the command).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Diagnose a remote domain or server: MX, banner, EHLO, STARTTLS, certificate, timings.
    #[command(
        after_help = "Exit status: 0 when at least one server was probed (whatever its \
        TLS); 69 when nothing could be probed: the domain does not exist, has no MX or no \
        address, or no server got through the probe (connect failed, timeout, or the \
        dialogue broke off); 64 for a bad configuration; 2 for bad arguments."
    )]
    Probe {
        #[command(flatten)]
        target: ProbeArgs,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Configuration file (resolver, CA file, timeouts, rules).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show which rule a message would hit and what would happen, without sending anything.
    Explain {
        /// YAML rule file (default: the rules_file of the configuration, else the shipped
        /// default rules).
        #[arg(long)]
        rules: Option<PathBuf>,
        /// The daemon's configuration, for its rules_file (default: the packaged
        /// /etc/tlsrouter/tlsrouter.yaml when it is there and readable).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The recipient, user@domain.
        #[arg(long)]
        rcpt: String,
        /// The sender, user@domain.
        #[arg(long)]
        sender: Option<String>,
        /// An MX host name, for rules that match on it.
        #[arg(long)]
        mx: Option<String>,
        #[command(flatten)]
        assumed: Assumed,
        /// Assume the recipient domain publishes an MTA-STS policy in this mode.
        #[arg(long, value_enum)]
        mta_sts: Option<AssumedStsMode>,
        /// An `mx:` pattern of the assumed policy (repeatable); without one, the policy
        /// names the --mx host.
        #[arg(long, requires = "mta_sts")]
        mta_sts_mx: Vec<String>,
        /// The sender asks REQUIRETLS (RFC 8689) on MAIL FROM.
        #[arg(long)]
        requiretls: bool,
        /// The MX answer that names the --mx host is DNSSEC-secure (REQUIRETLS needs that
        /// or an MTA-STS enforce policy naming the host).
        #[arg(long, requires = "requiretls")]
        dnssec_mx: bool,
    },
    /// The Windows service: install, uninstall, start, stop (as an administrator).
    #[cfg(windows)]
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
}

#[cfg(windows)]
#[derive(Subcommand)]
pub(crate) enum ServiceAction {
    /// Register the service: started at boot, as NT SERVICE\tlsrouter, with --config.
    Install {
        /// The configuration it runs with (default: %ProgramData%\tlsrouter\tlsrouter.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start it once registered (the installer does).
        #[arg(long)]
        start: bool,
    },
    /// Stop the service if it runs, and remove it.
    Uninstall,
    /// Start the service.
    Start,
    /// Stop the service: the sessions drain first, as with Ctrl-C.
    Stop,
    /// What the Service Control Manager starts; not for a console (use run there).
    Run {
        /// The configuration (default: %ProgramData%\tlsrouter\tlsrouter.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// The mode of a policy `explain` is asked to assume.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum AssumedStsMode {
    Enforce,
    Testing,
}

#[derive(Subcommand)]
pub(crate) enum CtlCommand {
    /// The outcome cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// The rules in force.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Counters since start.
    Stats,
    /// Sessions open now.
    Sessions,
    /// Remote connections idle in the pool, waiting for the next message.
    Pool,
    /// Probe from the daemon's position; the result goes into its cache.
    Probe {
        #[command(flatten)]
        target: ProbeArgs,
    },
    /// MTA-STS policies held for recipient domains.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Today's TLS-RPT counts, by domain; `send`: today's reports so far, now.
    Tlsrpt {
        #[command(subcommand)]
        command: Option<TlsrptCommand>,
    },
    /// Recipient domains and what became of their messages, the most in plain first.
    Domains {
        /// How far back, up to a week: 1h, 24h, 7d (default 7d; counted by whole hours).
        #[arg(long)]
        since: Option<String>,
        /// Only the domains with messages by this route: tls-verified, tls-unverified,
        /// tls-legacy, plain, deferred, refused.
        #[arg(long)]
        route: Option<Route>,
    },
    /// One recipient domain: its last hour, day and week, its last failure, its policy,
    /// its MX hosts and their certificates.
    Domain { domain: String },
    /// Cached servers whose certificate expires within a while (or has expired), with
    /// the days left and the domains they serve.
    Certs {
        /// The window: 14d, 30d.
        #[arg(long, default_value = "14d")]
        expiring: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum TlsrptCommand {
    /// Send today's reports so far now (from midnight UTC, or the last report sent this
    /// way, until now), to see that reporting works before the first night.
    Send {
        /// Only this recipient domain's report.
        domain: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Every policy held.
    List,
    /// One domain's policy.
    Show { domain: String },
    /// Fetch the domain's policy now.
    Refresh { domain: String },
    /// Forget the domain's policy: the next message looks it up again.
    Flush { domain: String },
}

#[derive(Subcommand)]
pub(crate) enum CacheCommand {
    /// Every cached host.
    List {
        /// Only the hosts cached with this outcome class, e.g. no-starttls.
        #[arg(long)]
        class: Option<OutcomeClass>,
        /// Only the hosts met delivering to this recipient domain.
        #[arg(long)]
        domain: Option<String>,
    },
    /// One host, or the hosts of a domain.
    Show {
        /// A host name, an address, or a recipient domain.
        target: String,
    },
    /// Forget a host, a domain's hosts, or everything.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["target", "all"])))]
    Flush {
        /// A host name, an address, or a recipient domain.
        target: Option<String>,
        /// Everything cached (and, with a fleet, the shared cache).
        #[arg(long)]
        all: bool,
    },
    /// An operator's override: treat HOST as CLASS for a while.
    ///
    /// Pins every address of HOST, those cached and those DNS gives now, so a host the
    /// daemon has not met yet can be pinned too. To pin one address only, or a host DNS
    /// does not know, name it: HOST[ADDRESS] (mx.example.com[192.0.2.7]) or --addr ADDRESS.
    Pin {
        /// The MX host name, HOST[ADDRESS], or a recipient domain (each of its MX hosts).
        host: String,
        /// The outcome class to treat it as, e.g. no-starttls or tls-legacy.
        class: OutcomeClass,
        /// How long the pin holds, e.g. 1h, 7d.
        #[arg(long, default_value = "1d")]
        ttl: String,
        /// An address of HOST to pin instead of all of them (may be repeated).
        #[arg(long = "addr", value_name = "ADDRESS")]
        addrs: Vec<std::net::IpAddr>,
    },
}

#[derive(Subcommand)]
pub(crate) enum RulesCommand {
    /// The rules in force, in order, with what each one does.
    Show,
    /// Load the rule file again; a bad file is reported and the rules in force stay.
    Reload,
    /// Which rule the daemon's rules give a message, and what would happen to it.
    Explain {
        /// The recipient address.
        #[arg(long)]
        rcpt: String,
        /// The sender address.
        #[arg(long)]
        sender: Option<String>,
        /// An MX host name; without --outcome, the daemon's cache entry for it is used.
        #[arg(long)]
        mx: Option<String>,
        #[command(flatten)]
        assumed: Assumed,
        /// The sender asks REQUIRETLS (RFC 8689); whether the MX answer is DNSSEC-secure is
        /// looked up as delivery would.
        #[arg(long)]
        requiretls: bool,
    },
}

/// What `--did-tls` says the host did within the success memory.
/// What `probe` and `ctl probe` are asked to look at.
#[derive(clap::Args)]
pub(crate) struct ProbeArgs {
    /// The recipient domain to probe (its MX hosts).
    domain: Option<String>,
    /// Probe this server instead of the domain's MX hosts.
    #[arg(long)]
    mx: Option<String>,
    /// The port (default: delivery.port from the configuration, 25).
    #[arg(long)]
    port: Option<u16>,
    /// Stop after EHLO.
    #[arg(long)]
    no_tls: bool,
}

impl From<ProbeArgs> for tlsrouter::probe::ProbeTarget {
    fn from(args: ProbeArgs) -> Self {
        tlsrouter::probe::ProbeTarget {
            domain: args.domain,
            mx: args.mx,
            port: args.port,
            no_tls: args.no_tls,
        }
    }
}

/// What `explain` is asked to assume of the MX host's cache entry.
#[derive(clap::Args)]
pub(crate) struct Assumed {
    /// The MX host's cached outcome class, e.g. legacy-tls.
    #[arg(long)]
    pub(crate) outcome: Option<OutcomeClass>,
    /// The outcome was pinned by an operator (`ctl cache pin`), not observed.
    #[arg(long, requires = "outcome")]
    pub(crate) pinned: bool,
    /// The MX host did TLS within the success memory (cache.ttl.success) before the
    /// outcome was seen; `verified-tls`: with a certificate that verified.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "tls", requires = "outcome")]
    pub(crate) did_tls: Option<DidTls>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum DidTls {
    /// TLS, whatever its certificate was worth.
    Tls,
    /// TLS with a certificate verified for its name.
    VerifiedTls,
}

impl DidTls {
    pub(crate) fn memory(did: Option<DidTls>) -> TlsMemory {
        match did {
            None => TlsMemory::Nothing,
            Some(DidTls::Tls) => TlsMemory::Tls,
            Some(DidTls::VerifiedTls) => TlsMemory::VerifiedTls,
        }
    }
}
