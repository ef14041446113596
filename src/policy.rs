//! Who may do what: identity patterns for roles and admins.

use crate::error::{Error, Result};

/// A glob over caller identities. `*` matches within one path segment (it
/// does not cross `/`), `**` crosses segments, so
/// `spiffe://example.org/ns/shop/*` grants the services of one namespace
/// and nothing nested below it.
#[derive(Clone)]
pub struct IdentityPattern {
    text: String,
    matcher: globset::GlobMatcher,
}

impl IdentityPattern {
    pub fn new(pattern: &str) -> Result<Self> {
        if pattern.is_empty() {
            return Err(Error::Config("empty identity pattern".into()));
        }
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| Error::Config(format!("identity pattern {pattern:?}: {e}")))?;
        Ok(IdentityPattern {
            text: pattern.to_string(),
            matcher: glob.compile_matcher(),
        })
    }

    pub fn matches(&self, identity: &str) -> bool {
        self.matcher.is_match(identity)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Debug for IdentityPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityPattern({:?})", self.text)
    }
}

pub fn any_matches(patterns: &[IdentityPattern], identity: &str) -> bool {
    patterns.iter().any(|p| p.matches(identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_stays_within_a_segment() {
        let p = IdentityPattern::new("spiffe://example.org/ns/shop/*").unwrap();
        assert!(p.matches("spiffe://example.org/ns/shop/cart"));
        assert!(!p.matches("spiffe://example.org/ns/shop/cart/evil"));
        assert!(!p.matches("spiffe://example.org/ns/shopping/cart"));
        let deep = IdentityPattern::new("spiffe://example.org/**").unwrap();
        assert!(deep.matches("spiffe://example.org/ns/shop/cart"));
        let exact = IdentityPattern::new("billing.internal").unwrap();
        assert!(exact.matches("billing.internal"));
        assert!(!exact.matches("billing.internal.evil"));
    }
}
