//! The assembled proxy: configuration, outbound side and router, shared by all sessions.

use std::sync::Arc;

use crate::cache::{OutcomeCache, SystemClock};
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
        let cache = Arc::new(OutcomeCache::new(&config.cache, Arc::new(SystemClock)));
        if let Some(path) = &config.cache.file {
            // A cache that cannot be read costs a few handshakes, never the start.
            match cache.load(path) {
                Ok(count) => {
                    tracing::info!("cache: {count} entries loaded from {}", path.display())
                }
                Err(e) => tracing::warn!("cache not loaded, starting empty: {e}"),
            }
        }
        let outbound = Outbound {
            resolver,
            tls,
            hostname: config.hostname.0.clone(),
            port: config.delivery.port,
            timeouts: config.timeouts.clone(),
            cache,
        };
        Ok(Arc::new(Proxy {
            config,
            outbound,
            router,
        }))
    }
}

impl Proxy {
    /// Writes the cache to its file, if it has one.
    pub fn save_cache(&self) {
        let Some(path) = &self.config.cache.file else {
            return;
        };
        self.outbound.cache.purge();
        match self.outbound.cache.save(path) {
            Ok(count) => tracing::debug!("cache: {count} entries saved to {}", path.display()),
            Err(e) => tracing::warn!("cache not saved: {e}"),
        }
    }

    /// Saves the cache every `cache.save_interval`, so a crash loses little.
    pub async fn save_cache_periodically(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.config.cache.save_interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            self.save_cache();
        }
    }

    /// Reloads the rule file, logging the outcome; the rules in force stay when it is bad.
    pub fn reload_rules(&self, why: &str) -> Result<usize, crate::config::ConfigError> {
        match self.router.reload() {
            Ok(count) => {
                tracing::info!("rules reloaded ({why}): {count} rules in force");
                Ok(count)
            }
            Err(e) => {
                tracing::error!(
                    "rules not reloaded ({why}), the previous rules stay in force: {e}"
                );
                Err(e)
            }
        }
    }

    /// Reloads the rule file whenever it changes on disk (checked every `every`).
    pub async fn watch_rule_file(self: Arc<Self>, every: std::time::Duration) {
        let Some(path) = self.router.file.clone() else {
            return;
        };
        let stamp = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut last = stamp(&path);
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            let now = stamp(&path);
            if now != last {
                last = now;
                let _ = self.reload_rules("file changed");
            }
        }
    }
}
