//! The commands an admin types besides `run`: `ctl`, `probe`, `explain`, `check`,
//! `check-config`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tlsrouter::Proxy;
use tlsrouter::admin::client;
use tlsrouter::admin::protocol::Request;
use tlsrouter::config::Config;
use tlsrouter::outcome::OutcomeClass;
use tlsrouter::policy::mta_sts::MxPattern;
use tlsrouter::probe::ProbeTarget;
use tlsrouter::router::decision::{Demand, Published, StsMode};
use tlsrouter::router::explain::{Question, assumed_entry, explain};
use tlsrouter::rules::RuleSet;

use crate::cli::{
    Assumed, AssumedStsMode, CacheCommand, CtlCommand, DidTls, EXIT_CONFIG, EXIT_NOTHING_PROBED,
    PolicyCommand, RulesCommand, TlsrptCommand,
};

pub(crate) fn ctl(socket: &std::path::Path, json: bool, command: CtlCommand) -> ExitCode {
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
                assumed,
                requiretls,
            } => Request::RulesExplain {
                rcpt,
                sender,
                mx,
                outcome: assumed.outcome,
                pinned: assumed.pinned,
                did_tls: DidTls::memory(assumed.did_tls),
                requiretls,
            },
        },
        CtlCommand::Policy { command } => match command {
            PolicyCommand::List => Request::PolicyList {},
            PolicyCommand::Show { domain } => Request::PolicyShow { domain },
            PolicyCommand::Refresh { domain } => Request::PolicyRefresh { domain },
            PolicyCommand::Flush { domain } => Request::PolicyFlush { domain },
        },
        CtlCommand::Tlsrpt { command: None } => Request::Tlsrpt {},
        CtlCommand::Tlsrpt {
            command: Some(TlsrptCommand::Send { domain }),
        } => Request::TlsrptSend { domain },
        CtlCommand::Stats => Request::Stats {},
        CtlCommand::Sessions => Request::Sessions {},
        CtlCommand::Pool => Request::Pool {},
        CtlCommand::Domains { since, route } => Request::Domains { since, route },
        CtlCommand::Domain { domain } => Request::Domain { domain },
        CtlCommand::Certs { expiring } => Request::Certs { expiring },
        CtlCommand::Probe { target } => Request::Probe(target.into()),
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

pub(crate) fn probe_standalone(path: Option<PathBuf>, target: ProbeTarget, json: bool) -> ExitCode {
    if let Some(missing) = target.missing() {
        eprintln!("tlsrouter probe: {missing}");
        return ExitCode::from(2);
    }
    let config = match crate::serve::load_config(path.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        eprintln!("tlsrouter probe: cannot start");
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let proxy = match crate::serve::proxy(config, path.as_deref()) {
            Ok(proxy) => proxy,
            Err(code) => return code,
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

pub(crate) fn check_rules(file: &std::path::Path) -> ExitCode {
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
    let missing = rules.missing_credential_files();
    for m in &missing {
        eprintln!("{m}");
    }
    if !shadowed.is_empty() || !missing.is_empty() {
        return ExitCode::FAILURE;
    }
    // Allowed, but an operator reviewing the file must see them.
    for warning in rules
        .policy_overrides()
        .into_iter()
        .chain(rules.parents_left_out())
    {
        eprintln!("{warning}");
    }
    let count = rules.rules().len();
    let noun = if count == 1 { "rule" } else { "rules" };
    println!("{}: OK, {count} {noun}", file.display());
    ExitCode::SUCCESS
}

/// The configuration `ctl` and `explain` answer for: the one given (an error when it
/// cannot be read), else the packaged one when it is there and readable, else none; so
/// that on a production host they speak of the daemon's socket and rules.
fn tool_config(given: Option<&Path>) -> Result<Option<Config>, ExitCode> {
    match given {
        Some(path) => Config::load(path).map(Some).map_err(|e| {
            eprintln!("tlsrouter: {e}");
            ExitCode::from(EXIT_CONFIG)
        }),
        None => Ok(Config::load(&tlsrouter::config::packaged_config()).ok()),
    }
}

/// The admin socket `ctl` asks: `--socket`, else the configuration's `admin.socket`, else
/// the default path.
pub(crate) fn admin_socket(
    socket: Option<PathBuf>,
    config: Option<&Path>,
) -> Result<PathBuf, ExitCode> {
    if let Some(socket) = socket {
        return Ok(socket);
    }
    let configured = tool_config(config)?.and_then(|c| c.admin.socket);
    Ok(configured.unwrap_or_else(|| PathBuf::from(tlsrouter::config::DEFAULT_ADMIN_SOCKET)))
}

/// The rule file `explain` answers for: `--rules`, else the configuration's `rules_file`;
/// `None` for the embedded default rules.
pub(crate) fn rules_file(
    rules: Option<PathBuf>,
    config: Option<&Path>,
) -> Result<Option<PathBuf>, ExitCode> {
    if rules.is_some() {
        return Ok(rules);
    }
    Ok(tool_config(config)?.and_then(|c| c.rules_file))
}

pub(crate) fn explain_rcpt(
    rules: Option<PathBuf>,
    rcpt: &str,
    sender: Option<&str>,
    mx: Option<&str>,
    assumed: Assumed,
    published: Published,
    demand: Demand,
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
        demand,
    };
    // Which rules answer: an admin must not mistake the embedded ones for those in force.
    println!("rules:       {}", rules.source.display());
    print!("{}", explain(Arc::new(rules), &question).text);
    ExitCode::SUCCESS
}

/// What the domain publishes, as `explain --mta-sts` asks to assume: whether the MX host
/// is one the policy names is judged by the given patterns, as delivery judges it.
pub(crate) fn assumed_policy(
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

/// `check-config` with a shared cache: Redis is asked, so that a wrong password shows now.
/// A Redis that cannot be reached is only a warning: `run` starts without it.
pub(crate) fn check_shared_cache(proxy: &Proxy, file: &std::path::Path) -> ExitCode {
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
