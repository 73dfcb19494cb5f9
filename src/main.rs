//! The `tlsrouter` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tlsrouter::Proxy;
use tlsrouter::admin::client;
use tlsrouter::admin::protocol::Request;
use tlsrouter::cache::TlsMemory;
use tlsrouter::config::{Config, LogFormat};
use tlsrouter::outcome::OutcomeClass;
use tlsrouter::policy::mta_sts::MxPattern;
use tlsrouter::probe::ProbeTarget;
use tlsrouter::router::decision::{Published, StsMode};
use tlsrouter::router::explain::{Question, assumed_entry, explain};
use tlsrouter::rules::RuleSet;
use tlsrouter::settings::SetupError;

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

/// EX_UNAVAILABLE from sysexits.h: `probe` found no server it could probe.
const EXIT_NOTHING_PROBED: u8 = 69;

#[derive(Parser)]
#[command(version, about = "Opportunistic-TLS routing proxy for outbound SMTP")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
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
        /// The admin socket.
        #[arg(long, default_value = tlsrouter::config::DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
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
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Configuration file (resolver, CA file, timeouts, rules).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show which rule a message would hit and what would happen, without sending anything.
    Explain {
        /// YAML rule file (default: the shipped default rules).
        #[arg(long)]
        rules: Option<PathBuf>,
        /// The recipient, user@domain.
        #[arg(long)]
        rcpt: String,
        /// The sender, user@domain.
        #[arg(long)]
        sender: Option<String>,
        /// An MX host name, for rules that match on it.
        #[arg(long)]
        mx: Option<String>,
        /// The MX host's cached outcome class, e.g. legacy-tls.
        #[arg(long)]
        outcome: Option<OutcomeClass>,
        /// The outcome was pinned by an operator (`ctl cache pin`), not observed.
        #[arg(long, requires = "outcome")]
        pinned: bool,
        /// The MX host did TLS within the success memory (cache.ttl.success) before the
        /// outcome was seen; `verified-tls`: with a certificate that verified.
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "tls", requires = "outcome")]
        did_tls: Option<DidTls>,
        /// Assume the recipient domain publishes an MTA-STS policy in this mode.
        #[arg(long, value_enum)]
        mta_sts: Option<AssumedStsMode>,
        /// An `mx:` pattern of the assumed policy (repeatable); without one, the policy
        /// names the --mx host.
        #[arg(long, requires = "mta_sts")]
        mta_sts_mx: Vec<String>,
    },
}

/// The mode of a policy `explain` is asked to assume.
#[derive(Clone, Copy, clap::ValueEnum)]
enum AssumedStsMode {
    Enforce,
    Testing,
}

#[derive(Subcommand)]
enum CtlCommand {
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
        domain: Option<String>,
        #[arg(long)]
        mx: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        no_tls: bool,
    },
    /// MTA-STS policies held for recipient domains.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Today's TLS-RPT counts, by domain.
    Tlsrpt,
}

#[derive(Subcommand)]
enum PolicyCommand {
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
enum CacheCommand {
    /// Every cached host.
    List {
        #[arg(long)]
        class: Option<OutcomeClass>,
        #[arg(long)]
        domain: Option<String>,
    },
    /// One host, or the hosts of a domain.
    Show { target: String },
    /// Forget a host, a domain's hosts, or everything.
    Flush {
        target: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// An operator's override: treat HOST as CLASS for a while.
    ///
    /// Pins every address of HOST, those cached and those DNS gives now, so a host the
    /// daemon has not met yet can be pinned too. To pin one address only, or a host DNS
    /// does not know, name it: HOST[ADDRESS] (mx.example.com[192.0.2.7]) or --addr ADDRESS.
    Pin {
        /// The MX host name, or HOST[ADDRESS].
        host: String,
        class: OutcomeClass,
        #[arg(long, default_value = "1d")]
        ttl: String,
        /// An address of HOST to pin instead of all of them (may be repeated).
        #[arg(long = "addr", value_name = "ADDRESS")]
        addrs: Vec<std::net::IpAddr>,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    Show,
    /// Load the rule file again; a bad file is reported and the rules in force stay.
    Reload,
    Explain {
        #[arg(long)]
        rcpt: String,
        #[arg(long)]
        sender: Option<String>,
        /// An MX host name; without --outcome, the daemon's cache entry for it is used.
        #[arg(long)]
        mx: Option<String>,
        /// The MX host's cached outcome class, e.g. legacy-tls.
        #[arg(long)]
        outcome: Option<OutcomeClass>,
        /// The outcome was pinned by an operator, not observed.
        #[arg(long, requires = "outcome")]
        pinned: bool,
        /// The MX host did TLS within the success memory before the outcome was seen;
        /// `verified-tls`: with a certificate that verified.
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "tls", requires = "outcome")]
        did_tls: Option<DidTls>,
    },
}

/// What `--did-tls` says the host did within the success memory.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DidTls {
    /// TLS, whatever its certificate was worth.
    Tls,
    /// TLS with a certificate verified for its name.
    VerifiedTls,
}

impl DidTls {
    fn memory(did: Option<DidTls>) -> TlsMemory {
        match did {
            None => TlsMemory::Nothing,
            Some(DidTls::Tls) => TlsMemory::Tls,
            Some(DidTls::VerifiedTls) => TlsMemory::VerifiedTls,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Commands::Run { config, log_format } => run(config, log_format),
        // Everything `run` builds before it binds a socket, so what passes here starts.
        Commands::CheckConfig { file } => match Config::load(&file)
            .map_err(SetupError::from)
            .and_then(Proxy::new)
        {
            Ok(proxy) => check_shared_cache(&proxy, &file),
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Commands::Check { file } => check_rules(&file),
        Commands::Ctl {
            socket,
            json,
            command,
        } => ctl(&socket, json, command),
        Commands::Probe {
            domain,
            mx,
            port,
            no_tls,
            json,
            config,
        } => {
            let target = ProbeTarget {
                domain,
                mx,
                port,
                no_tls,
            };
            probe_standalone(config, target, json)
        }
        Commands::Explain {
            rules,
            rcpt,
            sender,
            mx,
            outcome,
            pinned,
            did_tls,
            mta_sts,
            mta_sts_mx,
        } => {
            let published = match assumed_policy(mta_sts, &mta_sts_mx, mx.as_deref()) {
                Ok(published) => published,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            explain_rcpt(
                rules,
                &rcpt,
                sender.as_deref(),
                mx.as_deref(),
                Assumed {
                    outcome,
                    pinned,
                    did_tls,
                },
                published,
            )
        }
    }
}

fn ctl(socket: &std::path::Path, json: bool, command: CtlCommand) -> ExitCode {
    let request = match command {
        CtlCommand::Cache { command } => match command {
            CacheCommand::List { class, domain } => Request::CacheList { class, domain },
            CacheCommand::Show { target } => Request::CacheShow { target },
            CacheCommand::Flush { target, all } => Request::CacheFlush { target, all },
            CacheCommand::Pin {
                host,
                class,
                ttl,
                addrs,
            } => Request::CachePin {
                host,
                class,
                ttl,
                addrs,
            },
        },
        CtlCommand::Rules { command } => match command {
            RulesCommand::Show => Request::RulesShow {},
            RulesCommand::Reload => Request::RulesReload {},
            RulesCommand::Explain {
                rcpt,
                sender,
                mx,
                outcome,
                pinned,
                did_tls,
            } => Request::RulesExplain {
                rcpt,
                sender,
                mx,
                outcome,
                pinned,
                did_tls: DidTls::memory(did_tls),
            },
        },
        CtlCommand::Policy { command } => match command {
            PolicyCommand::List => Request::PolicyList {},
            PolicyCommand::Show { domain } => Request::PolicyShow { domain },
            PolicyCommand::Refresh { domain } => Request::PolicyRefresh { domain },
            PolicyCommand::Flush { domain } => Request::PolicyFlush { domain },
        },
        CtlCommand::Tlsrpt => Request::Tlsrpt {},
        CtlCommand::Stats => Request::Stats {},
        CtlCommand::Sessions => Request::Sessions {},
        CtlCommand::Pool => Request::Pool {},
        CtlCommand::Probe {
            domain,
            mx,
            port,
            no_tls,
        } => Request::Probe(ProbeTarget {
            domain,
            mx,
            port,
            no_tls,
        }),
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("tlsrouter ctl: cannot start");
        return ExitCode::from(2);
    };
    let response = match runtime.block_on(client::ask(socket, &request)) {
        Ok(response) => response,
        Err(e) => {
            eprintln!("tlsrouter ctl: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&response).unwrap_or_default()
        );
    }
    match (&response.result, &response.error) {
        (Some(result), _) if response.ok => {
            if !json {
                print!("{}", client::render(&request, result));
            }
            ExitCode::SUCCESS
        }
        (_, Some(error)) => {
            if !json {
                eprintln!("tlsrouter ctl: {}", error.message);
            }
            ExitCode::FAILURE
        }
        _ => ExitCode::FAILURE,
    }
}

fn probe_standalone(path: Option<PathBuf>, target: ProbeTarget, json: bool) -> ExitCode {
    if let Some(missing) = target.missing() {
        eprintln!("tlsrouter probe: {missing}");
        return ExitCode::from(2);
    }
    let config = match path
        .as_deref()
        .map(Config::load)
        .unwrap_or_else(|| Ok(Config::default()))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tlsrouter: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        eprintln!("tlsrouter probe: cannot start");
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let proxy = match Proxy::new(config) {
            Ok(proxy) => proxy,
            Err(e) => {
                eprintln!("tlsrouter: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        // The fleet's view goes beside what the probe finds; without Redis it says so.
        if let Err(e) = proxy.start_shared_cache().await {
            eprintln!("tlsrouter: {e:#}");
        }
        let report = tlsrouter::probe::probe(
            &proxy.outbound,
            &proxy.router.rules(),
            &proxy.policies,
            &target,
            false,
        )
        .await;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
        } else {
            print!("{}", tlsrouter::probe::render(&report));
        }
        if probed_a_server(&report) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_NOTHING_PROBED)
        }
    })
}

/// Whether some server got through the probe: it was reached and the dialogue did not
/// break off, whatever its TLS outcome. A DNS error leaves no server at all.
fn probed_a_server(report: &tlsrouter::probe::ProbeReport) -> bool {
    report.mx.iter().flat_map(|mx| &mx.servers).any(|server| {
        server.error.is_none()
            && !matches!(
                server.class,
                Some(OutcomeClass::ConnectFailed | OutcomeClass::Timeout)
            )
    })
}

fn check_rules(file: &std::path::Path) -> ExitCode {
    let rules = match RuleSet::load(file) {
        Ok(rules) => rules,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let shadowed = rules.shadowed();
    for s in &shadowed {
        eprintln!("{}", rules.describe_shadowed(s));
    }
    if !shadowed.is_empty() {
        return ExitCode::FAILURE;
    }
    // Allowed, but an operator reviewing the file must see them.
    for warning in rules.policy_overrides() {
        eprintln!("{warning}");
    }
    println!("{}: OK, {} rules", file.display(), rules.rules().len());
    ExitCode::SUCCESS
}

/// What `explain` is asked to assume of the MX host's cache entry.
struct Assumed {
    outcome: Option<OutcomeClass>,
    pinned: bool,
    did_tls: Option<DidTls>,
}

fn explain_rcpt(
    rules: Option<PathBuf>,
    rcpt: &str,
    sender: Option<&str>,
    mx: Option<&str>,
    assumed: Assumed,
    published: Published,
) -> ExitCode {
    let rules = match rules.as_deref().map(RuleSet::load) {
        Some(Ok(rules)) => rules,
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        None => RuleSet::embedded_default(),
    };
    let domain_of = |address: &str| {
        (address.rsplit_once('@')).and_then(|(_, d)| tlsrouter::smtp::command::a_label(d))
    };
    let Some(domain) = domain_of(rcpt) else {
        eprintln!("--rcpt {rcpt:?}: expected user@domain, the domain a valid (IDNA) name");
        return ExitCode::from(EXIT_CONFIG);
    };
    let sender_domain = sender.and_then(domain_of);
    let question = Question {
        recipient_domain: &domain,
        sender_domain: sender_domain.as_deref(),
        mx,
        cached: assumed_entry(mx.unwrap_or(""), assumed.outcome.as_slice(), assumed.pinned),
        memory: DidTls::memory(assumed.did_tls),
        published,
    };
    print!("{}", explain(Arc::new(rules), &question).text);
    ExitCode::SUCCESS
}

/// What the domain publishes, as `explain --mta-sts` asks to assume: whether the MX host
/// is one the policy names is judged by the given patterns, as delivery judges it.
fn assumed_policy(
    mode: Option<AssumedStsMode>,
    patterns: &[String],
    mx: Option<&str>,
) -> Result<Published, String> {
    let Some(mode) = mode else {
        return Ok(Published::Nothing);
    };
    let mode = match mode {
        AssumedStsMode::Enforce => StsMode::Enforce,
        AssumedStsMode::Testing => StsMode::Testing,
    };
    let mut mx_listed = patterns.is_empty();
    for text in patterns {
        let pattern = MxPattern::parse(text).map_err(|e| format!("--mta-sts-mx {text:?}: {e}"))?;
        mx_listed |= mx.is_some_and(|host| pattern.matches(&tlsrouter::net::dns::bare_name(host)));
    }
    Ok(Published::MtaSts { mode, mx_listed })
}

fn run(path: Option<PathBuf>, log_format: Option<LogFormat>) -> ExitCode {
    let config = match path
        .as_deref()
        .map(Config::load)
        .unwrap_or_else(|| Ok(Config::default()))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tlsrouter: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = init_logging(log_format.unwrap_or(config.log.format), &config.log.level) {
        eprintln!("tlsrouter: log.level: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    warn_if_not_fully_qualified(&config.hostname);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tlsrouter: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    let listen = config.listen;
    let proxy = match Proxy::new(config) {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("tlsrouter: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = proxy.start_shared_cache().await {
        eprintln!("tlsrouter: {e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // The admin side first: a daemon that cannot be managed does not take mail.
    if let Err(e) = tlsrouter::admin::start(&proxy).await {
        eprintln!("tlsrouter: {e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("tlsrouter: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let extra = match bind_more_listeners(&proxy.config.listeners).await {
        Ok(extra) => extra,
        Err(e) => {
            eprintln!("tlsrouter: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Reloading is ready before the daemon says it listens: a SIGHUP or an edit made
    // after that line is not lost.
    tokio::spawn(
        proxy
            .clone()
            .watch_rule_file(std::time::Duration::from_secs(2)),
    );
    tokio::spawn(
        proxy
            .server_tls
            .clone()
            .watch(std::time::Duration::from_secs(2)),
    );
    spawn_reload_on_sighup(proxy.clone());
    // Caught from here on: a SIGTERM or SIGINT right after the line below stops the daemon
    // cleanly instead of killing it.
    let signals = Termination::new();
    // Whether DANE is in force is known, and logged, before the first message.
    proxy.outbound.resolver.check_dnssec().await;
    let bound = listener.local_addr().map_or(listen, |a| a);
    let own: std::sync::Arc<[std::net::SocketAddr]> = std::iter::once(bound)
        .chain(extra.iter().map(|(_, addr, _)| *addr))
        .collect();
    // The first signal stops every listener.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut more_listeners = Vec::new();
    for (extra_listener, addr, mode) in extra {
        use tlsrouter::config::ListenerMode;
        use tlsrouter::inbound::listener::Accepting;
        let accepting = match mode {
            ListenerMode::SmartHost => Accepting::SmartHost,
            ListenerMode::Transparent => Accepting::Transparent { own: own.clone() },
        };
        tracing::info!(listen = %addr, mode = ?mode, "listener ready");
        let mut stopped = stopped.clone();
        more_listeners.push(tokio::spawn(tlsrouter::inbound::listener::serve(
            extra_listener,
            proxy.clone(),
            accepting,
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        )));
    }
    tracing::info!(listen = %bound, "tlsrouter listening");
    notify_systemd_ready(bound);
    tokio::spawn(proxy.clone().save_cache_periodically());
    tokio::spawn(proxy.tls_reports.clone().send_daily());
    tokio::spawn(proxy.policies.clone().refresh_periodically());
    let shutdown = async move {
        shutdown_signal(signals).await;
        let _ = stop.send(true);
    };
    // A task on the runtime, not the main thread's own future: accepting on a worker
    // thread spares each new session a wake-up of the main thread and a hand-over to a
    // worker.
    let main_listener = tokio::spawn(tlsrouter::inbound::listener::run(
        listener,
        proxy.clone(),
        shutdown,
    ));
    let _ = main_listener.await;
    for task in more_listeners {
        let _ = task.await;
    }
    proxy.save_cache();
    proxy.remove_admin_socket();
    tracing::info!("tlsrouter stopped");
    ExitCode::SUCCESS
}

/// Binds `listeners:`, each with the address it got and its mode.
async fn bind_more_listeners(
    listeners: &[tlsrouter::config::ListenerConfig],
) -> Result<
    Vec<(
        tokio::net::TcpListener,
        std::net::SocketAddr,
        tlsrouter::config::ListenerMode,
    )>,
    String,
> {
    let mut bound = Vec::new();
    for config in listeners {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr().map_or(config.listen, |a| a);
        bound.push((listener, addr, config.mode));
    }
    Ok(bound)
}

/// `check-config` with a shared cache: Redis is asked, so that a wrong password shows now.
/// A Redis that cannot be reached is only a warning: `run` starts without it.
fn check_shared_cache(proxy: &Proxy, file: &std::path::Path) -> ExitCode {
    let Some(shared) = proxy.outbound.cache.shared() else {
        println!("{}: OK", file.display());
        return ExitCode::SUCCESS;
    };
    let checked = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(shared.check()),
        Err(e) => {
            eprintln!("tlsrouter: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match checked {
        Ok(()) => {
            println!(
                "{}: OK (Redis at {} answers)",
                file.display(),
                shared.target()
            );
            ExitCode::SUCCESS
        }
        Err(e) if !e.is_fatal() => {
            eprintln!("warning: {e}; tlsrouter would start with its local cache");
            println!("{}: OK", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Many receivers refuse an EHLO name without a domain: say so, and what to set.
fn warn_if_not_fully_qualified(name: &tlsrouter::config::Hostname) {
    if name.is_fully_qualified() {
        return;
    }
    if *name == tlsrouter::config::Hostname::of_this_machine() {
        tracing::warn!(
            "no fully-qualified domain name was found for this machine: the greeting and EHLO \
             say {:?}, which many receivers refuse; set hostname: in the configuration, e.g. \
             hostname: relay.example.com",
            name.0
        );
    } else {
        tracing::warn!(
            "hostname {:?} is not a fully-qualified domain name, which many receivers refuse \
             in EHLO; set hostname: in the configuration to one, e.g. hostname: relay.example.com",
            name.0
        );
    }
}

/// systemd (`Type=notify`) starts units ordered after ours once we accept connections.
/// Without `NOTIFY_SOCKET`, as outside systemd, this does nothing.
fn notify_systemd_ready(listen: std::net::SocketAddr) {
    #[cfg(unix)]
    {
        use sd_notify::NotifyState;
        let status = format!("listening on {listen}");
        let states = [NotifyState::Ready, NotifyState::Status(&status)];
        if let Err(e) = sd_notify::notify(&states) {
            tracing::warn!("cannot tell systemd that tlsrouter is ready: {e}");
        }
    }
    #[cfg(not(unix))]
    let _ = listen;
}

/// SIGHUP reloads the rules (on Windows the admin socket's `rules reload` does).
fn spawn_reload_on_sighup(proxy: std::sync::Arc<Proxy>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let _ = proxy.reload_rules("SIGHUP");
                    proxy.server_tls.reload("SIGHUP");
                }
            });
        }
    }
    #[cfg(not(unix))]
    let _ = proxy;
}

/// Resolves at the first SIGTERM or SIGINT; a second one exits at once. The same signal
/// streams serve both, so a second signal cannot fall between two registrations.
async fn shutdown_signal(mut signals: Termination) {
    signals.recv().await;
    tracing::info!("shutting down: draining sessions (signal again to exit at once)");
    tokio::spawn(async move {
        signals.recv().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(1);
    });
}

/// SIGTERM and SIGINT, registered when made (Ctrl-C elsewhere).
struct Termination {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Termination {
    fn new() -> Termination {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = signal(SignalKind::terminate())
                .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)))
                .ok();
            Termination { streams }
        }
        #[cfg(not(unix))]
        Termination {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some((term, interrupt)) = &mut self.streams {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Colour escapes only for a person at a terminal: journald and files get plain text, and
/// a non-empty `NO_COLOR` (no-color.org) turns them off everywhere.
fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color_set() {
        use std::ffi::OsStr;
        assert!(use_colour(true, None));
        assert!(!use_colour(false, None), "a pipe, a file, journald");
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, Some(OsStr::new("1"))));
        assert!(
            use_colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
    }
}
