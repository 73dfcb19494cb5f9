//! The `tlsrouter` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tlsrouter::Proxy;
use tlsrouter::config::{Config, LogFormat};

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
    }
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
    tlsrouter::inbound::listener::run(listener, proxy, shutdown_signal()).await;
    tracing::info!("tlsrouter stopped");
    ExitCode::SUCCESS
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
