//! The recipient-domain index: which rules can match a domain, found without scanning them
//! all. Exact names are a hash map; `*.suffix` and `**.name` patterns live in a trie of
//! labels read from the right; `*` (and rules without a domain condition) in a list.

use std::collections::HashMap;

use crate::rules::pattern::DomainPattern;

#[derive(Default, Debug)]
pub struct DomainIndex {
    exact: HashMap<String, Vec<usize>>,
    below: TrieNode,
    any: Vec<usize>,
}

#[derive(Default, Debug)]
struct TrieNode {
    children: HashMap<String, TrieNode>,
    /// Rules with a `*.suffix` pattern whose suffix ends at this node.
    below: Vec<usize>,
    /// Rules with a `**.name` pattern whose name ends at this node.
    and_below: Vec<usize>,
}

impl DomainIndex {
    pub fn insert(&mut self, pattern: &DomainPattern, rule: usize) {
        match pattern {
            DomainPattern::Any => self.any.push(rule),
            DomainPattern::Exact(name) => self.exact.entry(name.clone()).or_default().push(rule),
            DomainPattern::Below(suffix) => self.node(suffix).below.push(rule),
            DomainPattern::AndBelow(name) => self.node(name).and_below.push(rule),
        }
    }

    fn node(&mut self, name: &str) -> &mut TrieNode {
        let mut node = &mut self.below;
        for label in name.rsplit('.') {
            node = node.children.entry(label.to_string()).or_default();
        }
        node
    }

    /// The rules whose domain condition matches `domain`, in rule order.
    pub fn candidates(&self, domain: &str) -> Vec<usize> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut found: Vec<usize> = self.any.clone();
        if let Some(rules) = self.exact.get(&domain) {
            found.extend_from_slice(rules);
        }
        let labels: Vec<&str> = domain.rsplit('.').collect();
        let mut node = &self.below;
        for (i, label) in labels.iter().enumerate() {
            let Some(next) = node.children.get(*label) else {
                break;
            };
            node = next;
            found.extend_from_slice(&node.and_below);
            // `*.suffix` takes only names strictly below it: not where the name ends.
            if i + 1 < labels.len() {
                found.extend_from_slice(&node.below);
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index(patterns: &[DomainPattern]) -> DomainIndex {
        let mut index = DomainIndex::default();
        for (i, p) in patterns.iter().enumerate() {
            index.insert(p, i);
        }
        index
    }

    /// The reference: test every pattern in turn.
    fn linear(patterns: &[DomainPattern], domain: &str) -> Vec<usize> {
        (0..patterns.len())
            .filter(|&i| patterns[i].matches(domain))
            .collect()
    }

    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "com", "x-y"]), 1..5)
            .prop_map(|labels| labels.join("."))
    }

    fn pattern() -> impl Strategy<Value = DomainPattern> {
        prop_oneof![
            Just(DomainPattern::Any),
            name().prop_map(DomainPattern::Exact),
            name().prop_map(DomainPattern::Below),
            name().prop_map(DomainPattern::AndBelow),
        ]
    }

    proptest! {
        #[test]
        fn the_index_finds_exactly_what_a_linear_scan_finds(
            patterns in prop::collection::vec(pattern(), 0..40),
            domain in name(),
        ) {
            prop_assert_eq!(index(&patterns).candidates(&domain), linear(&patterns, &domain));
        }
    }

    #[test]
    fn candidates_come_in_rule_order() {
        let patterns = [
            DomainPattern::Below("example.com".into()),
            DomainPattern::Any,
            DomainPattern::Exact("mx.example.com".into()),
        ];
        assert_eq!(
            index(&patterns).candidates("MX.example.com."),
            vec![0, 1, 2]
        );
        assert_eq!(index(&patterns).candidates("example.com"), vec![1]);
    }
}
