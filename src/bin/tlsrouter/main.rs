//! The `tlsrouter` command.

mod cli;
mod commands;
#[cfg(windows)]
mod event_log;
mod serve;
#[cfg(windows)]
mod service;

use std::process::ExitCode;

use clap::Parser;
use tlsrouter::Proxy;
use tlsrouter::config::Config;
use tlsrouter::router::decision::Demand;
use tlsrouter::settings::SetupError;

use crate::cli::{Cli, Commands, EXIT_CONFIG};
use crate::commands::{
    admin_socket, assumed_policy, check_rules, check_shared_cache, ctl, explain_rcpt,
    probe_standalone, rules_file,
};
use crate::serve::run;

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
                eprintln!("{}", e.at_setting(Some(&file)));
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Commands::Check { file } => check_rules(&file),
        Commands::Ctl {
            socket,
            config,
            json,
            command,
        } => match admin_socket(socket, config.as_deref()) {
            Ok(socket) => ctl(&socket, json, command),
            Err(code) => code,
        },
        Commands::Probe {
            target,
            json,
            config,
        } => probe_standalone(config, target.into(), json),
        Commands::Explain {
            rules,
            config,
            rcpt,
            sender,
            mx,
            assumed,
            mta_sts,
            mta_sts_mx,
            requiretls,
            dnssec_mx,
        } => {
            let published = match assumed_policy(mta_sts, &mta_sts_mx, mx.as_deref()) {
                Ok(published) => published,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let rules = match rules_file(rules, config.as_deref()) {
                Ok(rules) => rules,
                Err(code) => return code,
            };
            explain_rcpt(
                rules,
                &rcpt,
                sender.as_deref(),
                mx.as_deref(),
                assumed,
                published,
                match requiretls {
                    true => Demand::RequireTls {
                        name_authentic: dnssec_mx,
                    },
                    false => Demand::Nothing,
                },
            )
        }
        #[cfg(windows)]
        Commands::Service { action } => service::service(action),
    }
}
