//! The `tlsrouter` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tlsrouter::Proxy;
use tlsrouter::config::{Config, LogFormat};
use tlsrouter::outcome::OutcomeClass;
use tlsrouter::rules::RuleSet;
use tlsrouter::rules::explain::{Question, explain};

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Commands::Run { config, log_format } => run(config, log_format),
        Commands::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Commands::Check { file } => check_rules(&file),
        Commands::Explain {
            rules,
            rcpt,
            sender,
            mx,
            outcome,
        } => explain_rcpt(rules, &rcpt, sender.as_deref(), mx.as_deref(), outcome),
    }
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
        let (rule, by) = (&rules.rules()[s.rule], &rules.rules()[s.by]);
        eprintln!(
            "{}:{}:5: rule {:?} can never match: rule {:?} (line {}) takes all its messages",
            file.display(),
            rule.line,
            rule.name,
            by.name,
            by.line
        );
    }
    if !shadowed.is_empty() {
        return ExitCode::FAILURE;
    }
    println!("{}: OK, {} rules", file.display(), rules.rules().len());
    ExitCode::SUCCESS
}

fn explain_rcpt(
    rules: Option<PathBuf>,
    rcpt: &str,
    sender: Option<&str>,
    mx: Option<&str>,
    outcome: Option<OutcomeClass>,
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
        address
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
    };
    let Some(domain) = domain_of(rcpt) else {
        eprintln!("--rcpt {rcpt:?}: expected user@domain");
        return ExitCode::from(EXIT_CONFIG);
    };
    let sender_domain = sender.and_then(domain_of);
    let question = Question {
        recipient_domain: &domain,
        sender_domain: sender_domain.as_deref(),
        mx,
        outcome,
    };
    print!("{}", explain(&rules, &question).1);
    ExitCode::SUCCESS
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
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("tlsrouter: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%listen, "tlsrouter listening");
    tokio::spawn(
        proxy
            .clone()
            .watch_rule_file(std::time::Duration::from_secs(2)),
    );
    spawn_reload_on_sighup(proxy.clone());
    tokio::spawn(proxy.clone().save_cache_periodically());
    tlsrouter::inbound::listener::run(listener, proxy.clone(), shutdown_signal()).await;
    proxy.save_cache();
    tracing::info!("tlsrouter stopped");
    ExitCode::SUCCESS
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
                }
            });
        }
    }
    #[cfg(not(unix))]
    let _ = proxy;
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}
