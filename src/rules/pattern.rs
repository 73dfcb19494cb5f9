//! Domain and host patterns: `example.com` (exactly), `*.example.com` (any name below it,
//! not the name itself), `**.example.com` (the name and any name below it) and `*`
//! (anything).

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DomainPattern {
    Exact(String),
    /// The suffix without `*.`.
    Below(String),
    /// The name without `**.`: it and every name below it.
    AndBelow(String),
    Any,
}

impl DomainPattern {
    /// One domain by name, not a wildcard.
    pub fn is_exact(&self) -> bool {
        matches!(self, DomainPattern::Exact(_))
    }

    pub fn matches(&self, name: &str) -> bool {
        // An absolute name (with its trailing dot) is the same name, as in patterns.
        let name = name.strip_suffix('.').unwrap_or(name);
        match self {
            DomainPattern::Any => true,
            DomainPattern::Exact(exact) => exact.eq_ignore_ascii_case(name),
            DomainPattern::Below(suffix) => is_below(name, suffix),
            DomainPattern::AndBelow(base) => {
                base.eq_ignore_ascii_case(name) || is_below(name, base)
            }
        }
    }

    /// Whether `self` matches every name that `other` matches (for finding shadowed rules).
    pub fn covers(&self, other: &DomainPattern) -> bool {
        match (self, other) {
            (DomainPattern::Any, _) => true,
            (_, DomainPattern::Any) => false,
            (_, DomainPattern::Exact(name)) => self.matches(name),
            (DomainPattern::Exact(_), _) => false,
            // Every name strictly below `b`, with `b` itself for `**.b`.
            (_, DomainPattern::Below(b)) => {
                self.matches(b) || self == &DomainPattern::Below(b.clone())
            }
            (_, DomainPattern::AndBelow(b)) => self.matches(b),
        }
    }
}

impl TryFrom<String> for DomainPattern {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        if lower == "*" {
            return Ok(DomainPattern::Any);
        }
        let (pattern, name): (fn(String) -> DomainPattern, &str) =
            if let Some(base) = lower.strip_prefix("**.") {
                (DomainPattern::AndBelow, base)
            } else if let Some(suffix) = lower.strip_prefix("*.") {
                (DomainPattern::Below, suffix)
            } else {
                (DomainPattern::Exact, lower.as_str())
            };
        // A trailing dot (an absolute name) means the same name.
        let name = name.strip_suffix('.').unwrap_or(name);
        if !is_domain(name) {
            return Err(format!(
                "{text:?} is not a domain pattern (use example.com, *.example.com, **.example.com or *)"
            ));
        }
        // Names are matched in their A-label form, as mail is routed.
        let name = crate::smtp::command::a_label(name).ok_or_else(|| {
            format!("{text:?} is not a valid internationalised domain name (IDNA)")
        })?;
        Ok(pattern(name))
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(name) => f.write_str(name),
            DomainPattern::Below(suffix) => write!(f, "*.{suffix}"),
            DomainPattern::AndBelow(base) => write!(f, "**.{base}"),
            DomainPattern::Any => f.write_str("*"),
        }
    }
}

/// Whether `name` is strictly below `suffix`, without regard to ASCII case.
fn is_below(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len() + 1
        && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

fn is_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_written_in_unicode_matches_the_a_labels_mail_is_routed_by() {
        assert_eq!(p("b\u{fc}cher.example"), p("xn--bcher-kva.example"));
        assert!(p("*.b\u{fc}cher.example").matches("mail.xn--bcher-kva.example"));
        assert!(DomainPattern::try_from("\u{300}b.example".to_string()).is_err());
    }

    fn p(text: &str) -> DomainPattern {
        DomainPattern::try_from(text.to_string()).unwrap()
    }

    #[test]
    fn patterns_match_as_documented() {
        assert!(p("example.com").matches("EXAMPLE.com"));
        assert!(!p("example.com").matches("a.example.com"));
        assert!(p("*.example.com").matches("a.b.example.com"));
        assert!(!p("*.example.com").matches("example.com"));
        assert!(!p("*.example.com").matches("badexample.com"));
        assert!(p("*").matches("anything.test"));
        assert!(p("**.example.com").matches("Example.com"));
        assert!(p("**.example.com").matches("a.b.example.com"));
        assert!(!p("**.example.com").matches("badexample.com"));
        assert_eq!(p("**.example.com").to_string(), "**.example.com");
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        for bad in [
            "",
            "a..b",
            "*.",
            "**.",
            "***.x",
            "**x.com",
            "ex ample.com",
            "a.*.com",
            "a.**.com",
        ] {
            assert!(DomainPattern::try_from(bad.to_string()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn coverage_is_what_shadowing_needs() {
        assert!(p("*").covers(&p("*.a.com")));
        assert!(p("*.a.com").covers(&p("*.b.a.com")));
        assert!(p("*.a.com").covers(&p("x.a.com")));
        assert!(!p("*.a.com").covers(&p("a.com")));
        assert!(!p("x.a.com").covers(&p("*.a.com")));
        assert!(!p("*.b.a.com").covers(&p("*.a.com")));
        assert!(p("**.a.com").covers(&p("a.com")));
        assert!(p("**.a.com").covers(&p("*.a.com")));
        assert!(p("**.a.com").covers(&p("**.b.a.com")));
        assert!(!p("*.a.com").covers(&p("**.a.com")));
        assert!(p("*.a.com").covers(&p("**.b.a.com")));
        assert!(!p("a.com").covers(&p("**.a.com")));
    }

    mod reference {
        use super::*;
        use proptest::prelude::*;

        /// What the patterns are documented to mean, label by label: a name and a pattern
        /// are the same without regard to ASCII case or one trailing dot; `*.suffix` takes
        /// names with at least one label before the suffix's labels; `**.name` takes the
        /// name and those below it; `*` takes anything.
        fn documented_match(pattern: &str, name: &str) -> bool {
            fn labels(name: &str) -> Vec<String> {
                let name = name.strip_suffix('.').unwrap_or(name);
                name.split('.').map(|l| l.to_ascii_lowercase()).collect()
            }
            let name = labels(name);
            if pattern == "*" {
                return true;
            }
            if let Some(base) = pattern.strip_prefix("**.") {
                let base = labels(base);
                return name.len() >= base.len() && name[name.len() - base.len()..] == base[..];
            }
            match pattern.strip_prefix("*.") {
                Some(suffix) => {
                    let suffix = labels(suffix);
                    name.len() > suffix.len() && name[name.len() - suffix.len()..] == suffix[..]
                }
                None => name == labels(pattern),
            }
        }

        /// A name from few labels (so patterns and names often meet), in mixed case, with
        /// or without the trailing dot of an absolute name.
        fn name() -> impl Strategy<Value = String> {
            let label =
                prop::sample::select(vec!["a", "A", "b", "com", "COM", "Com", "x-y", "X-y"]);
            (prop::collection::vec(label, 1..5), any::<bool>()).prop_map(|(labels, absolute)| {
                let mut name = labels.join(".");
                if absolute {
                    name.push('.');
                }
                name
            })
        }

        fn pattern_text() -> impl Strategy<Value = String> {
            prop_oneof![
                1 => Just("*".to_string()),
                3 => name(),
                3 => name().prop_map(|n| format!("*.{n}")),
                3 => name().prop_map(|n| format!("**.{n}")),
            ]
        }

        proptest! {
            #[test]
            fn a_pattern_matches_exactly_the_names_its_documentation_says(
                text in pattern_text(),
                name in name(),
            ) {
                let pattern = DomainPattern::try_from(text.clone()).expect("a valid pattern");
                prop_assert_eq!(
                    pattern.matches(&name),
                    documented_match(&text, &name),
                    "{:?} against {:?}", text, name
                );
            }
        }
    }
}
