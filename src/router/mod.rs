//! The routing decision: which rule decides a message, and what it allows.
//!
//! A [`Plan`] holds the rules that were in force when the transaction began (a reload does
//! not change a transaction in flight), the rules that can apply to its recipient, and so
//! the next hop. The outbound side asks it, host by host, which rule applies there.

pub mod decision;
pub mod explain;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::outcome::OutcomeClass;
use crate::rules::{Route, Rule, RuleSet, Selection};
use crate::settings::ConfigError;

/// What the rules say about one transaction.
#[derive(Clone, Debug)]
pub struct Plan {
    rules: Arc<RuleSet>,
    selection: Selection,
}

impl PartialEq for Plan {
    fn eq(&self, other: &Plan) -> bool {
        Arc::ptr_eq(&self.rules, &other.rules) && self.selection == other.selection
    }
}

impl Plan {
    /// The plan under a given rule set (a transaction keeps the set it started with).
    pub fn new(rules: Arc<RuleSet>, recipient_domain: &str, sender_domain: Option<&str>) -> Plan {
        let selection = rules.select(recipient_domain, sender_domain);
        Plan { rules, selection }
    }

    /// The rule that decides the next hop (and the policy where no host-specific rule applies).
    pub fn base_rule(&self) -> &Rule {
        self.rules.rule(self.selection.base)
    }

    /// The rule for a delivery attempt to `host`, whose cached classes are `cached`.
    pub fn rule_for_host(&self, host: &str, cached: &[OutcomeClass]) -> &Rule {
        self.selection
            .conditional
            .iter()
            .map(|&i| self.rules.rule(Some(i)))
            .find(|rule| rule.conditions.host_matches(host, cached))
            .unwrap_or_else(|| self.base_rule())
    }

    pub fn route(&self) -> &Route {
        &self.base_rule().route
    }

    /// Names of every rule that may decide, for logs and `explain`.
    pub fn rule_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .selection
            .conditional
            .iter()
            .map(|&i| self.rules.rule(Some(i)).name.as_str())
            .collect();
        names.push(&self.base_rule().name);
        names
    }
}

/// Turns a recipient into a plan, with the rules currently in force.
pub struct Router {
    rules: RwLock<Arc<RuleSet>>,
    /// The rule file to reload, if any.
    pub file: Option<PathBuf>,
}

impl Router {
    pub fn new(rules: RuleSet, file: Option<PathBuf>) -> Router {
        Router {
            rules: RwLock::new(Arc::new(rules)),
            file,
        }
    }

    /// The rules in force now.
    pub fn rules(&self) -> Arc<RuleSet> {
        match self.rules.read() {
            Ok(rules) => rules.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn plan(&self, recipient_domain: &str, sender_domain: Option<&str>) -> Plan {
        Plan::new(self.rules(), recipient_domain, sender_domain)
    }

    /// Loads the rule file again; on any error the rules in force stay.
    pub fn reload(&self) -> Result<usize, ConfigError> {
        let Some(file) = &self.file else {
            return Ok(self.rules().rules().len());
        };
        let rules = RuleSet::load(file)?;
        for shadowed in rules.shadowed() {
            tracing::warn!("{}", rules.describe_shadowed(&shadowed));
        }
        for warning in rules.policy_overrides() {
            tracing::warn!("{warning}");
        }
        let count = rules.rules().len();
        match self.rules.write() {
            Ok(mut slot) => *slot = Arc::new(rules),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(rules),
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_host_specific_rule_applies_only_to_its_hosts() {
        let text = "rules:\n  - name: old\n    match: { mx: [\"*.old.example\"] }\n    tls: never\n  - name: all\n";
        let router = Router::new(RuleSet::parse(text, Path::new("r.yaml")).unwrap(), None);
        let plan = router.plan("example.com", None);
        assert_eq!(plan.base_rule().name, "all");
        assert_eq!(plan.rule_for_host("mx.old.example", &[]).name, "old");
        assert_eq!(plan.rule_for_host("mx.new.example", &[]).name, "all");
    }
}
