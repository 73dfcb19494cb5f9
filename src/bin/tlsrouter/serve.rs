//! `tlsrouter run`: the daemon, from its configuration to a clean stop.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tlsrouter::Proxy;
use tlsrouter::config::{Config, LogFormat};

use crate::cli::EXIT_CONFIG;

/// The configuration in `path`, or the embedded defaults without one; a bad one is told
/// on stderr and is exit code 64.
pub(crate) fn load_config(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    path.map(Config::load)
        .unwrap_or_else(|| Ok(Config::default()))
        .map_err(|e| {
            eprintln!("tlsrouter: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
}

pub(crate) fn run(path: Option<PathBuf>, log_format: Option<LogFormat>) -> ExitCode {
    let config = match load_config(path.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let format = log_format.unwrap_or(config.log.format);
    if let Err(e) = init_logging(format, &config.log.level, LogTo::Stderr) {
        eprintln!("tlsrouter: log.level: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    run_logged(config, path, None)
}

/// The daemon on `config`, once logging is set up: stopped by a signal, or by a request
/// from `requests` (the service's).
pub(crate) fn run_logged(
    config: Config,
    path: Option<PathBuf>,
    requests: Option<StopRequests>,
) -> ExitCode {
    warn_if_not_fully_qualified(&config.hostname);
    raise_open_files_limit(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tlsrouter: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config, path.as_deref(), requests))
}

/// Raises the soft limit of open descriptors to the hard one (the default soft 1024 is too
/// few for the default limits), and warns when the limits could still use more: each
/// session holds two sockets, each pooled connection one.
#[cfg(unix)]
fn raise_open_files_limit(config: &Config) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            ..limit
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let needed = 2 * config.limits.max_sessions + config.delivery.pool.total + 64;
    if (limit.rlim_cur as u128) < needed as u128 {
        tracing::warn!(
            event = "open_files_limit",
            limit = limit.rlim_cur,
            needed,
            "the open-files limit ({}) is below what limits.max_sessions and delivery.pool.total can use ({needed}): raise it (LimitNOFILE= in the unit, ulimit -n) or lower them",
            limit.rlim_cur
        );
    }
}

#[cfg(not(unix))]
fn raise_open_files_limit(_config: &Config) {}

/// The proxy for `config` (read from `file`, if any), or the exit code of a configuration
/// it cannot start with.
pub(crate) fn proxy(config: Config, file: Option<&Path>) -> Result<Arc<Proxy>, ExitCode> {
    Proxy::new(config).map_err(|e| {
        eprintln!("tlsrouter: {}", e.at_setting(file));
        ExitCode::from(EXIT_CONFIG)
    })
}

pub(crate) async fn serve(
    config: Config,
    file: Option<&Path>,
    requests: Option<StopRequests>,
) -> ExitCode {
    let listen = config.listen;
    let proxy = match proxy(config, file) {
        Ok(proxy) => proxy,
        Err(code) => return code,
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
    let signals = Termination::new(requests);
    // Whether DANE is in force is known, and logged, before the first message; while the
    // name servers do not answer the check, it is asked again with back-off.
    proxy.outbound.resolver.check_dnssec().await;
    tokio::spawn(proxy.outbound.resolver.clone().keep_checking_dnssec());
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
    tracing::info!(event = "listening", listen = %bound, "tlsrouter listening");
    notify_systemd_ready(bound);
    tokio::spawn(proxy.clone().save_cache_periodically());
    tokio::spawn(proxy.clone().share_ledger_periodically());
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
    tracing::info!(event = "stopped", "tlsrouter stopped");
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

/// Many receivers refuse an EHLO name without a domain: say so, and what to set.
fn warn_if_not_fully_qualified(name: &tlsrouter::config::Hostname) {
    if name.is_fully_qualified() {
        return;
    }
    if *name == tlsrouter::config::Hostname::of_this_machine() {
        tracing::warn!(
            event = "hostname.not_fqdn",
            hostname = name.0,
            source = "this machine",
            "no fully-qualified domain name was found for this machine: the greeting and EHLO \
             say {:?}, which many receivers refuse; set hostname: in the configuration, e.g. \
             hostname: relay.example.com",
            name.0
        );
    } else {
        tracing::warn!(
            event = "hostname.not_fqdn",
            hostname = name.0,
            source = "hostname:",
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
    tracing::info!(
        event = "shutting_down",
        "shutting down: draining sessions (signal again to exit at once)"
    );
    // A second stop request of the service (a Shutdown after a Stop) is no reason to cut
    // the drain short: only a signal is.
    signals.requests = None;
    tokio::spawn(async move {
        signals.recv().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(1);
    });
}

/// Requests to stop that come from outside the process's signals: the Windows Service
/// Control Manager's, for the service.
pub(crate) type StopRequests = tokio::sync::mpsc::UnboundedReceiver<()>;

/// SIGTERM and SIGINT, registered when made (Ctrl-C elsewhere), and the service's stop
/// requests: each stops the daemon the same way.
struct Termination {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
    requests: Option<StopRequests>,
}

impl Termination {
    fn new(requests: Option<StopRequests>) -> Termination {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = signal(SignalKind::terminate())
                .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)))
                .ok();
            Termination { streams, requests }
        }
        #[cfg(not(unix))]
        Termination { requests }
    }

    async fn recv(&mut self) {
        let requested = async {
            match &mut self.requests {
                Some(requests) => {
                    requests.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(unix)]
        let signalled = async {
            match &mut self.streams {
                Some((term, interrupt)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        #[cfg(not(unix))]
        let signalled = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        tokio::select! {
            _ = requested => {}
            _ = signalled => {}
        }
    }
}

/// Where the log goes: standard error (a console, journald), or, for the Windows service,
/// a file a day in a folder, the last 14 kept, and its errors to the Windows Event Log.
pub(crate) enum LogTo {
    Stderr,
    #[cfg(windows)]
    Files(PathBuf),
}

pub(crate) fn init_logging(format: LogFormat, level: &str, to: LogTo) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter(level)).map_err(|e| e.to_string())?;
    match to {
        LogTo::Stderr => {
            let colour = use_colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            );
            install(format, filter, colour, std::io::stderr, None);
        }
        #[cfg(windows)]
        LogTo::Files(folder) => {
            std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
            let files = tracing_appender::rolling::Builder::new()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix("tlsrouter")
                .filename_suffix("log")
                .max_log_files(14)
                .build(&folder)
                .map_err(|e| format!("{}: {e}", folder.display()))?;
            install(
                format,
                filter,
                false,
                files,
                crate::event_log::EventLog::open(),
            );
        }
    }
    Ok(())
}

/// Errors also go to the Windows Event Log, for the service.
#[cfg(windows)]
type EventLog = crate::event_log::EventLog;
#[cfg(not(windows))]
type EventLog = tracing_subscriber::layer::Identity;

fn install<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    colour: bool,
    writer: W,
    event_log: Option<EventLog>,
) where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(writer);
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .with(event_log)
        .init();
}

/// The tracing filter for `log.level`. A bare level (`info`, `debug`) is tlsrouter's; the
/// libraries below it say only errors, since what they warn about comes as Rust debug text
/// and tlsrouter says what matters in its own words. A filter with directives is taken
/// as written (`info,hickory_net=debug`).
fn filter(level: &str) -> String {
    if level.contains(['=', ',']) {
        level.to_string()
    } else {
        format!("error,tlsrouter={level}")
    }
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

    #[test]
    fn a_bare_level_is_tlsrouters_and_a_filter_is_taken_as_written() {
        assert_eq!(filter("debug"), "error,tlsrouter=debug");
        assert_eq!(filter("info,hickory_net=debug"), "info,hickory_net=debug");
        assert_eq!(filter("tlsrouter=trace"), "tlsrouter=trace");
    }
}
