//! The assembled proxy: configuration, outbound side and router, shared by all sessions.

use std::sync::Arc;

use crate::config::Config;
use crate::outbound::delivery::Outbound;
use crate::outbound::mx::MxResolver;
use crate::outbound::tls::TlsClient;
use crate::router::Router;
use crate::rules::RuleSet;

pub struct Proxy {
    pub config: Config,
    pub outbound: Outbound,
    pub router: Router,
}

impl Proxy {
    /// Builds everything the configuration names; fails before any socket is bound.
    pub fn new(config: Config) -> anyhow::Result<Arc<Proxy>> {
        let resolver = MxResolver::new(&config.resolver.nameservers, config.timeouts.dns)?;
        let tls = TlsClient::new(&config.tls)?;
        let rules = match &config.rules_file {
            Some(path) => RuleSet::load(path)?,
            None => RuleSet::embedded_default(),
        };
        let router = Router::new(rules, config.rules_file.clone());
        let outbound = Outbound {
            resolver,
            tls,
            hostname: config.hostname.0.clone(),
            port: config.delivery.port,
            timeouts: config.timeouts.clone(),
        };
        Ok(Arc::new(Proxy {
            config,
            outbound,
            router,
        }))
    }
}
