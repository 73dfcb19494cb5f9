//! The policy store: what each domain published, looked up with a bounded wait, fetched
//! once at a time per domain, refreshed before it expires, and shared through the fleet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::cache::Clock;
use crate::net::dns::MxResolver;
use crate::net::https::HttpsClient;
use crate::policy::mta_sts::config::MtaStsConfig;
use crate::policy::mta_sts::lookup::{PolicyError, PolicyLookup};
use crate::policy::mta_sts::policy::{Mode, StsPolicy, checked_policy, parse_txt_records};
use crate::stats::Stats;

/// What is known about one policy domain.
#[derive(Clone, Debug, Default)]
pub(super) struct DomainState {
    pub(super) policy: Option<Arc<StsPolicy>>,
    /// The last failed fetch: when, for which TXT id, and why.
    pub(super) failure: Option<Failure>,
    /// The last `_mta-sts` answer, kept for its DNS lifetime.
    pub(super) txt: Option<TxtSeen>,
}

/// What the `_mta-sts` record said (its id, or nothing usable) and until when that holds.
#[derive(Clone, Debug)]
pub(super) struct TxtSeen {
    id: Option<String>,
    valid_until: Instant,
}

#[derive(Clone, Debug)]
pub(super) struct Failure {
    at: u64,
    id: String,
    error: PolicyError,
}

/// A fetch in progress: its result, once there, is sent to every waiter.
pub(super) type InFlight = watch::Receiver<Option<PolicyLookup>>;

/// The policies of every domain we sent to, shared by all sessions.
pub struct PolicyStore {
    pub(super) config: MtaStsConfig,
    pub(super) resolver: Arc<MxResolver>,
    pub(super) https: Arc<HttpsClient>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) stats: Arc<Stats>,
    pub(super) domains: Mutex<HashMap<String, DomainState>>,
    pub(super) in_flight: Mutex<HashMap<String, InFlight>>,
    /// The fleet's shared cache, with `cache.backend: redis`: policies fetched by one
    /// relay serve the others.
    pub(super) shared: std::sync::OnceLock<Arc<crate::cache::shared::SharedCache>>,
}

pub(super) fn normalize(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

impl PolicyStore {
    pub fn new(
        config: MtaStsConfig,
        resolver: Arc<MxResolver>,
        https: Arc<HttpsClient>,
        clock: Arc<dyn Clock>,
        stats: Arc<Stats>,
    ) -> PolicyStore {
        PolicyStore {
            config,
            resolver,
            https,
            clock,
            stats,
            domains: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Shares policies with the fleet (once).
    pub fn share_through(&self, shared: Arc<crate::cache::shared::SharedCache>) {
        let _ = self.shared.set(shared);
    }

    /// The fleet's copy of `domain`'s policy, when it is the one the TXT record names and
    /// is not due for a fetch. It is checked as a fetched one would be ([`checked_policy`]);
    /// one that fails is logged and counted once, and a fetch is made instead.
    async fn fleet_copy(&self, domain: &str, id: &str, now: u64) -> Option<Arc<StsPolicy>> {
        let shared = self.shared.get()?;
        let json = shared.shared_value("sts", domain).await?;
        let held = self.held(domain);
        let checked = checked_policy(&json, domain, now, shared.clock_skew(), held.as_deref());
        let policy = match checked {
            Ok(policy) => policy,
            Err(why) => {
                let forged = crate::cache::shared::Forged::Policy(why.to_string());
                shared.forged(&format!("MTA-STS policy of {domain}"), &forged);
                return None;
            }
        };
        // Only a fetch over HTTPS may weaken an enforce policy held here, whatever id the
        // (unsigned) TXT record names now.
        let weakens = held.as_ref().is_some_and(|held| {
            held.mode == Mode::Enforce && (policy.mode != Mode::Enforce || policy.mx != held.mx)
        });
        if weakens {
            tracing::debug!(
                domain,
                id,
                "the fleet's MTA-STS policy would weaken the enforce policy held here; fetching it instead"
            );
            return None;
        }
        let usable = policy.id == id && !policy.is_expired(now) && !policy.wants_refresh(now);
        usable.then(|| Arc::new(policy))
    }

    /// The policy held for `domain`, expired or not.
    fn held(&self, domain: &str) -> Option<Arc<StsPolicy>> {
        let domains = self.domains.lock().ok()?;
        domains.get(domain)?.policy.clone()
    }

    fn share(&self, policy: &StsPolicy, now: u64) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        if let Ok(json) = serde_json::to_string(policy) {
            let ttl = std::time::Duration::from_secs(policy.expires_at.saturating_sub(now));
            shared.share("sts", &policy.domain, json, ttl);
        }
    }

    /// The policy that applies to mail for `domain` now. Waits at most `mta_sts.wait`: a
    /// lookup that takes longer goes on in the background, and meanwhile a valid cached
    /// policy is what applies (or, with none, [`PolicyLookup::NotYet`]).
    pub async fn policy_for(self: &Arc<Self>, domain: &str) -> PolicyLookup {
        if !self.config.enabled {
            return PolicyLookup::NotPublished;
        }
        let domain = normalize(domain);
        if let Some(settled) = self.settled(&domain) {
            return settled;
        }
        let mut result = self.lookup_in_background(&domain, false);
        let wait = result.wait_for(|r| r.is_some());
        match tokio::time::timeout(self.config.wait, wait).await {
            Ok(Ok(done)) => done.clone().unwrap_or(PolicyLookup::NotYet),
            // Too slow, or the task died: what the cache holds applies.
            _ => match self.cached(&domain) {
                Some(policy) => PolicyLookup::Found(policy),
                None => PolicyLookup::NotYet,
            },
        }
    }

    /// Fetches `domain`'s policy now, whatever the cache holds (for `ctl policy refresh`);
    /// when the fetch fails, a valid cached policy stays in force.
    pub async fn refresh(self: &Arc<Self>, domain: &str) -> PolicyLookup {
        let domain = normalize(domain);
        let mut result = self.lookup_in_background(&domain, true);
        match result.wait_for(|r| r.is_some()).await {
            Ok(done) => done.clone().unwrap_or(PolicyLookup::NotYet),
            Err(_) => PolicyLookup::NotYet,
        }
    }

    /// The answer when nothing needs asking: the `_mta-sts` answer is within its TTL and
    /// says there is no policy, or names the id of a cached policy not yet due for a
    /// refresh. Most messages take this path, with no task and no lookup.
    fn settled(&self, domain: &str) -> Option<PolicyLookup> {
        let now = self.clock.now();
        let domains = self.domains.lock().ok()?;
        let state = domains.get(domain)?;
        let txt = state
            .txt
            .as_ref()
            .filter(|t| Instant::now() < t.valid_until)?;
        let policy = state.policy.clone().filter(|p| !p.is_expired(now));
        match (&txt.id, policy) {
            // A vanished record does not drop a valid cached policy.
            (None, Some(policy)) => Some(PolicyLookup::Found(policy)),
            (None, None) => Some(PolicyLookup::NotPublished),
            (Some(id), Some(policy)) if *id == policy.id && !policy.wants_refresh(now) => {
                Some(PolicyLookup::Found(policy))
            }
            (Some(_), _) => None,
        }
    }

    /// A valid cached policy, without any lookup.
    pub fn cached(&self, domain: &str) -> Option<Arc<StsPolicy>> {
        let now = self.clock.now();
        let domains = self.domains.lock().ok()?;
        domains
            .get(&normalize(domain))?
            .policy
            .clone()
            .filter(|p| !p.is_expired(now))
    }

    /// Every valid cached policy, by domain.
    pub fn policies(&self) -> Vec<Arc<StsPolicy>> {
        let now = self.clock.now();
        let Ok(domains) = self.domains.lock() else {
            return Vec::new();
        };
        let mut policies: Vec<_> = domains
            .values()
            .filter_map(|s| s.policy.clone())
            .filter(|p| !p.is_expired(now))
            .collect();
        policies.sort_by(|a, b| a.domain.cmp(&b.domain));
        policies
    }

    /// Every `mta_sts.refresh_interval`, looks up again each cached policy that is due for a
    /// refresh (half its max_age gone), as a message to its domain would; a failed fetch
    /// keeps the policy, as it does then.
    pub async fn refresh_periodically(self: Arc<Self>) {
        if !self.config.enabled || self.config.refresh_interval.is_zero() {
            return;
        }
        let mut ticker = tokio::time::interval(self.config.refresh_interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let now = self.clock.now();
            for policy in self.policies() {
                if policy.wants_refresh(now) {
                    // Shared with any message that asks meanwhile, as its own lookups are.
                    let mut done = self.lookup_in_background(&policy.domain, false);
                    let _ = done.wait_for(|r| r.is_some()).await;
                }
            }
        }
    }

    /// Forgets `domain`'s policy; the next message looks it up again. Whether one was held.
    pub fn flush(&self, domain: &str) -> bool {
        if let Some(shared) = self.shared.get() {
            shared.forget("sts", &normalize(domain));
        }
        self.domains
            .lock()
            .map(|mut d| d.remove(&normalize(domain)).is_some())
            .unwrap_or(false)
    }

    /// Starts the lookup for `domain` unless one is running, and returns its result channel.
    /// `force` fetches even when the cache would do.
    fn lookup_in_background(self: &Arc<Self>, domain: &str, force: bool) -> InFlight {
        let Ok(mut in_flight) = self.in_flight.lock() else {
            let (_, receiver) = watch::channel(Some(PolicyLookup::NotYet));
            return receiver;
        };
        if let Some(running) = in_flight.get(domain) {
            return running.clone();
        }
        let (sender, receiver) = watch::channel(None);
        in_flight.insert(domain.to_string(), receiver.clone());
        drop(in_flight);
        let store = self.clone();
        let domain = domain.to_string();
        tokio::spawn(async move {
            let lookup = store.look_up(&domain, force).await;
            if let Ok(mut in_flight) = store.in_flight.lock() {
                in_flight.remove(&domain);
            }
            let _ = sender.send(Some(lookup));
        });
        receiver
    }

    /// RFC 8461 5.1, for one domain: TXT, then the cache or a fetch.
    async fn look_up(&self, domain: &str, force: bool) -> PolicyLookup {
        let cached = self.cached(domain);
        let keep_cached = |or: PolicyLookup| match &cached {
            Some(policy) => PolicyLookup::Found(policy.clone()),
            None => or,
        };
        let answer = match self
            .resolver
            .txt_lookup(&format!("_mta-sts.{domain}"))
            .await
        {
            Ok(answer) => answer,
            Err(e) => {
                tracing::debug!(domain, "_mta-sts lookup failed: {e}");
                return keep_cached(PolicyLookup::NotPublished);
            }
        };
        let parsed = parse_txt_records(&answer.records);
        self.note_txt(
            domain,
            TxtSeen {
                id: parsed.as_ref().ok().cloned(),
                valid_until: answer.valid_until,
            },
        );
        let id = match parsed {
            Ok(id) => id,
            Err(why) => {
                if !answer.records.is_empty() {
                    tracing::debug!(domain, "_mta-sts record ignored: {why}");
                }
                // A vanished or broken record does not drop a valid cached policy.
                return keep_cached(PolicyLookup::NotPublished);
            }
        };
        let now = self.clock.now();
        if let Some(policy) = &cached
            && policy.id == id
            && !policy.wants_refresh(now)
            && !force
        {
            return PolicyLookup::Found(policy.clone());
        }
        if let Some(failure) = self.recent_failure(domain, &id, now)
            && !force
        {
            return keep_cached(PolicyLookup::Unavailable(failure.error));
        }
        if !force && let Some(policy) = self.fleet_copy(domain, &id, now).await {
            tracing::info!(event = "mta_sts.from_fleet", domain, id = %policy.id, mode = %policy.mode, "MTA-STS policy taken from the fleet's shared cache");
            self.store(domain, Some(policy.clone()), None);
            return PolicyLookup::Found(policy);
        }
        self.stats.sts_fetches.inc();
        match self.fetch(domain).await {
            Ok(text) => {
                let policy = Arc::new(StsPolicy {
                    domain: domain.to_string(),
                    id,
                    mode: text.0.mode,
                    mx: text.0.mx,
                    max_age: text.0.max_age,
                    fetched_at: now,
                    expires_at: now.saturating_add(text.0.max_age),
                    raw: text.1,
                });
                tracing::info!(
                    domain,
                    id = %policy.id,
                    mode = %policy.mode,
                    max_age = policy.max_age,
                    "MTA-STS policy fetched"
                );
                self.store(domain, Some(policy.clone()), None);
                self.share(&policy, now);
                PolicyLookup::Found(policy)
            }
            Err(error) => {
                self.stats.sts_fetch_failures.inc();
                tracing::warn!(
                    domain,
                    id,
                    "MTA-STS policy not fetched{}: {error}",
                    if cached.is_some() {
                        ", the cached policy stays in force"
                    } else {
                        ""
                    }
                );
                let failure = Failure {
                    at: now,
                    id,
                    error: error.clone(),
                };
                self.store(domain, cached.clone(), Some(failure));
                keep_cached(PolicyLookup::Unavailable(error))
            }
        }
    }

    fn recent_failure(&self, domain: &str, id: &str, now: u64) -> Option<Failure> {
        let domains = self.domains.lock().ok()?;
        let failure = domains.get(domain)?.failure.clone()?;
        let retry_at = failure
            .at
            .saturating_add(self.config.retry_after_failure.as_secs());
        (failure.id == id && now < retry_at).then_some(failure)
    }

    fn store(&self, domain: &str, policy: Option<Arc<StsPolicy>>, failure: Option<Failure>) {
        self.update(domain, |state| {
            state.policy = policy;
            state.failure = failure;
        });
    }

    fn note_txt(&self, domain: &str, txt: TxtSeen) {
        self.update(domain, |state| state.txt = Some(txt));
    }

    /// Changes `domain`'s state, making room for it (within `max_policies`) when it is new.
    fn update(&self, domain: &str, change: impl FnOnce(&mut DomainState)) {
        let Ok(mut domains) = self.domains.lock() else {
            return;
        };
        if !domains.contains_key(domain) && domains.len() >= self.config.max_policies {
            let now = self.clock.now();
            domains.retain(|_, s| s.policy.as_ref().is_some_and(|p| !p.is_expired(now)));
            if domains.len() >= self.config.max_policies {
                tracing::warn!(domain, "MTA-STS policy store full (mta_sts.max_policies)");
                return;
            }
        }
        change(domains.entry(domain.to_string()).or_default());
    }
}
