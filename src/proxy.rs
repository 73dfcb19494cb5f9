//! The assembled proxy: configuration, outbound side and router, shared by all sessions.

use std::sync::Arc;

use crate::cache::shared::{SharedCache, SharedCacheError};
use crate::cache::{OutcomeCache, SystemClock};
use crate::config::Config;
use crate::ledger::{Ledger, ledger_file};
use crate::net::dns::MxResolver;
use crate::net::https::HttpsClient;
use crate::net::tls::{TlsClient, trusted_roots};
use crate::outbound::Outbound;
use crate::outbound::greetings::Greetings;
use crate::policy::mta_sts::{PolicyStore, policy_file};
use crate::policy::tlsrpt::{TlsReports, counts_file};
use crate::router::Router;
use crate::rules::RuleSet;
use crate::sessions::{Drain, Registry};
use crate::settings::SetupError;
use crate::stats::Stats;

pub struct Proxy {
    pub config: Config,
    pub outbound: Outbound,
    pub router: Router,
    pub stats: Arc<Stats>,
    pub sessions: Arc<Registry>,
    /// MTA-STS policies of recipient domains.
    pub policies: Arc<PolicyStore>,
    /// TLS-RPT counts and reports.
    pub tls_reports: Arc<TlsReports>,
    /// Per recipient domain, what became of its messages this week.
    pub ledger: Arc<Ledger>,
    /// The web console's admin token, when the console is on.
    pub(crate) console_token: Option<String>,
    /// The last reload of the rule file since start, and how it went.
    pub last_reload: std::sync::Mutex<Option<Reload>>,
    /// Tells sessions that a shutdown is draining them.
    pub drain: tokio::sync::watch::Sender<Drain>,
    /// The admin socket this daemon bound, the only one it may remove.
    pub(crate) admin_socket: std::sync::OnceLock<std::path::PathBuf>,
    /// STARTTLS toward the MTA: the certificate in force, if any.
    pub server_tls: Arc<crate::server_tls::ServerTls>,
    /// One permit per session slot, shared by every listener, so that
    /// `limits.max_sessions` bounds them all together.
    pub session_slots: Arc<tokio::sync::Semaphore>,
    /// How many permits `session_slots` has.
    pub session_slots_max: usize,
    /// Sessions per client address, over every listener too.
    pub sessions_per_client:
        Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl Proxy {
    /// Builds everything the configuration names; fails before any socket is bound.
    pub fn new(config: Config) -> Result<Arc<Proxy>, SetupError> {
        #[cfg(unix)]
        config.admin.group_id()?;
        // One resolver, so delivery and policy lookups share hickory's cache.
        let resolver = Arc::new(MxResolver::with_config(
            &config.resolver,
            config.timeouts.dns,
        )?);
        let mut tls = TlsClient::new(&config.tls)?;
        if let Some(mark) = config.delivery.socket_mark {
            crate::net::socket_mark::check(mark).map_err(|e| SetupError::Named(e.into()))?;
        }
        let server_tls = Arc::new(crate::server_tls::ServerTls::load(
            config.inbound.tls.as_ref(),
        )?);
        let rules = match &config.rules_file {
            // A file that cannot be read is the setting's problem; one with an error in it
            // names its own line.
            Some(path) => RuleSet::load(path).map_err(|e| match e {
                crate::settings::ConfigError::Read { error, .. } => {
                    SetupError::file("rules_file", path, error)
                }
                other => SetupError::from(other),
            })?,
            None => RuleSet::embedded_default(),
        };
        let router = Router::new(rules, config.rules_file.clone());
        let stats = Arc::new(Stats::default());
        tls.count_handshakes(
            stats.tls_full_handshakes.clone(),
            stats.tls_resumed_handshakes.clone(),
        );
        let cache = Arc::new(OutcomeCache::new(&config.cache, Arc::new(SystemClock)));
        if config.cache.backend == crate::cache::Backend::Redis {
            let roots = crate::cache::shared::Roots {
                system: config.tls.system_roots,
                ca_file: config.tls.ca_file.as_deref(),
            };
            if let Some(path) = &config.cache.redis.password_file {
                crate::outbound::credentials::warn_if_readable_by_others(path);
            }
            cache.attach(Arc::new(
                SharedCache::new(
                    &config.cache.redis,
                    roots,
                    &config.hostname.0,
                    config.delivery.source_address,
                    &config.cache.ttl,
                    stats.clone(),
                )
                .map_err(|e| SetupError::Named(e.into()))?,
            ));
        }
        if let Some(path) = &config.cache.file {
            // A cache that cannot be read costs a few handshakes, never the start.
            match cache.load(path) {
                Ok(Some(count)) => {
                    tracing::info!(
                        event = "cache.loaded",
                        count,
                        "cache: {count} entries loaded from {}",
                        path.display()
                    )
                }
                Ok(None) => tracing::info!(
                    event = "cache.no_file",
                    "cache: no file at {} yet, starting empty; it is written there while running and at shutdown",
                    path.display()
                ),
                Err(e) => tracing::warn!(
                    event = "cache.not_loaded",
                    "cache not loaded, starting empty: {e}"
                ),
            }
        }
        let (policies, tls_reports) = policy_parts(&config, resolver.clone(), stats.clone())?;
        if let Some(shared) = cache.shared() {
            policies.share_through(shared.clone());
        }
        if let Some(path) = &config.cache.file {
            let path = policy_file(path);
            match policies.load(&path) {
                Ok(count) => {
                    tracing::info!("MTA-STS: {count} policies loaded from {}", path.display())
                }
                Err(e) => tracing::warn!(
                    "MTA-STS policies not loaded from {}, starting empty: {e}",
                    path.display()
                ),
            }
        }
        if let Some(path) = &config.cache.file {
            let path = counts_file(path);
            if let Err(e) = tls_reports.load(&path) {
                tracing::warn!("TLS-RPT counts not loaded from {}: {e}", path.display());
            }
        }
        let console_token = config.console.token()?;
        let ledger = Arc::new(Ledger::new(&config.ledger));
        if let Some(path) = &config.cache.file {
            let path = ledger_file(path);
            match ledger.load(&path) {
                Ok(count) => tracing::debug!(
                    "ledger: {} domains loaded from {}",
                    count.unwrap_or(0),
                    path.display()
                ),
                Err(e) => tracing::warn!("ledger not loaded, starting empty: {e}"),
            }
        }
        let outbound = Outbound {
            resolver,
            tls,
            dialer: dialer(&config),
            hostname: config.hostname.0.clone(),
            port: config.delivery.port,
            timeouts: config.timeouts.clone(),
            cache,
            stats: stats.clone(),
            tls_reports: tls_reports.clone(),
            pool: crate::outbound::pool::Pool::new(config.delivery.pool.clone()),
            policies: policies.clone(),
            budget: crate::outbound::Budget {
                mx_hosts: config.delivery.max_mx_hosts.get(),
                addresses: config.delivery.max_addresses.get(),
            },
            failed_lookups: Default::default(),
            failed_mx_lookups: Default::default(),
            greetings: Greetings::new(
                config.delivery.max_waiting_per_server.get(),
                config.delivery.slow_greeting,
            ),
        };
        // The semaphore's own bound, and one drain can take back at once.
        let session_slots_max = (config.limits.max_sessions)
            .min(tokio::sync::Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize);
        Ok(Arc::new(Proxy {
            session_slots: Arc::new(tokio::sync::Semaphore::new(session_slots_max)),
            session_slots_max,
            sessions_per_client: Arc::default(),
            config,
            outbound,
            router,
            stats,
            sessions: Arc::new(Registry::default()),
            policies,
            tls_reports,
            ledger,
            last_reload: std::sync::Mutex::new(None),
            console_token,
            drain: tokio::sync::watch::Sender::new(Drain::Running),
            admin_socket: std::sync::OnceLock::new(),
            server_tls,
        }))
    }
}

/// A reload of the rule file: when, why, and the rules then in force or why the file was
/// refused (the rules before it stayed).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Reload {
    /// Unix seconds.
    pub at: u64,
    pub why: String,
    /// How many rules are in force after it; `None` when it was refused.
    pub rules: Option<usize>,
    /// Why it was refused (`file:line:column: ...`).
    pub error: Option<String>,
}

impl Proxy {
    /// Writes the cache to its file, if it has one.
    pub fn save_cache(&self) {
        let Some(path) = &self.config.cache.file else {
            return;
        };
        self.outbound.cache.purge();
        match self.outbound.cache.save(path) {
            Ok(count) => tracing::debug!(
                event = "cache.saved",
                entries = count,
                "cache: {count} entries saved to {}",
                path.display()
            ),
            Err(e) => tracing::warn!("cache not saved: {e}"),
        }
        let policy_path = policy_file(path);
        match self.policies.save(&policy_path) {
            Ok(count) => tracing::debug!(
                "MTA-STS: {count} policies saved to {}",
                policy_path.display()
            ),
            Err(e) => tracing::warn!(
                "MTA-STS policies not saved to {}: {e}",
                policy_path.display()
            ),
        }
        let counts_path = counts_file(path);
        if let Err(e) = self.tls_reports.save(&counts_path) {
            tracing::warn!("TLS-RPT counts not saved to {}: {e}", counts_path.display());
        }
        self.ledger.purge(self.outbound.cache.now());
        if let Err(e) = self.ledger.save(&ledger_file(path)) {
            tracing::warn!("ledger not saved: {e}");
        }
    }

    /// Saves the cache every `cache.save_interval`, so a crash loses little; `0s` saves
    /// only at shutdown.
    pub async fn save_cache_periodically(self: Arc<Self>) {
        if self.config.cache.save_interval.is_zero() {
            return;
        }
        let mut ticker = tokio::time::interval(self.config.cache.save_interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            self.save_cache();
        }
    }

    /// With a fleet: writes this relay's ledger to Redis every `ledger.share_interval`
    /// when it has counted something since, under its relay name, for the others to add
    /// up (a week and a day, then it expires).
    pub async fn share_ledger_periodically(self: Arc<Self>) {
        let Some(shared) = self.outbound.cache.shared().cloned() else {
            return;
        };
        let relay = shared.observer().relay.clone();
        let keep = std::time::Duration::from_secs(crate::ledger::WEEK + 86_400);
        let mut ticker = tokio::time::interval(self.config.ledger.share_interval);
        let mut shared_at = None;
        loop {
            ticker.tick().await;
            let recorded = self.ledger.recorded();
            if shared_at != Some(recorded) && !self.ledger.is_empty() {
                shared.share("ledger", &relay, self.ledger.snapshot(), keep);
                shared_at = Some(recorded);
            }
        }
    }

    /// Reloads the rule file, logging the outcome; the rules in force stay when it is bad.
    pub fn reload_rules(&self, why: &str) -> Result<usize, crate::config::ConfigError> {
        let reloaded = self.router.reload();
        let reload = Reload {
            at: self.outbound.cache.now(),
            why: why.to_string(),
            rules: reloaded.as_ref().ok().copied(),
            error: reloaded.as_ref().err().map(ToString::to_string),
        };
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(reload);
        match reloaded {
            Ok(count) => {
                tracing::info!(
                    event = "rules.reloaded",
                    why,
                    rules = count,
                    "rules reloaded ({why}): {}",
                    crate::rules::in_force(count)
                );
                Ok(count)
            }
            Err(e) => {
                let (file, line, column) = match &e {
                    crate::config::ConfigError::Invalid {
                        path, line, column, ..
                    } => (path, Some(*line), Some(*column)),
                    crate::config::ConfigError::Read { path, .. } => (path, None, None),
                };
                tracing::error!(
                    event = "rules.not_reloaded",
                    why,
                    file = %file.display(),
                    line,
                    column,
                    "rules not reloaded ({why}), the previous rules stay in force: {e}"
                );
                Err(e)
            }
        }
    }

    /// Reloads the rule file whenever it changes on disk (checked every `every`). The file's
    /// state is read at once, not when the future first runs, so no change made after this
    /// call is missed.
    pub fn watch_rule_file(
        self: Arc<Self>,
        every: std::time::Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let stamp = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let path = self.router.file.clone();
        let mut last = path.as_deref().and_then(stamp);
        async move {
            let Some(path) = path else {
                return;
            };
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
}

impl Proxy {
    /// Connects the fleet's shared cache, when the configuration has one, and starts its
    /// tasks. A Redis that is away is no error (the relay goes on with its own cache and
    /// keeps trying); one that refuses the credentials is.
    pub async fn start_shared_cache(&self) -> Result<(), SharedCacheError> {
        if let Some(shared) = self.outbound.cache.shared() {
            shared.start(self.outbound.cache.clone()).await?;
        }
        Ok(())
    }
}

impl Proxy {
    /// At a clean stop: a socket left behind would look like a crashed daemon's. Only the
    /// socket this daemon bound: when it could not bind one, the path may be another's.
    pub fn remove_admin_socket(&self) {
        if let Some(path) = self.admin_socket.get() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The MTA-STS policy store and the TLS-RPT reports, sharing one HTTPS client that trusts
/// what delivery trusts and dials as delivery does.
fn policy_parts(
    config: &Config,
    resolver: Arc<MxResolver>,
    stats: Arc<Stats>,
) -> Result<(Arc<PolicyStore>, Arc<TlsReports>), SetupError> {
    let sts = &config.mta_sts;
    let https = Arc::new(HttpsClient::new(
        trusted_roots(&config.tls)?,
        resolver.clone(),
        sts.connect_to.clone(),
        crate::net::dialer::Dialer {
            timeout: sts.connect_timeout,
            ..dialer(config)
        },
        sts.fetch_timeout,
    )?);
    let clock = Arc::new(SystemClock);
    let policies = Arc::new(PolicyStore::new(
        sts.clone(),
        resolver.clone(),
        https.clone(),
        clock.clone(),
        stats,
    ));
    let reports = Arc::new(TlsReports::new(
        config.tls_rpt.clone(),
        &config.hostname.0,
        resolver.clone(),
        https,
        clock,
        dialer(config),
        config.timeouts.clone(),
    )?);
    Ok((policies, reports))
}

/// How every outbound SMTP connection is made: delivery's, probe's and the reports'.
fn dialer(config: &Config) -> crate::net::dialer::Dialer {
    crate::net::dialer::Dialer {
        timeout: config.timeouts.connect,
        mark: config.delivery.socket_mark,
        source: config.delivery.source_address,
    }
}
