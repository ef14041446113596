//! Who may do what: identity patterns for roles and admins.
//!
//! A pattern names the kind of identity it is for, exactly as identities
//! do (`spiffe://…`, `dns:…`, `cn:…`), and matches only identities of that
//! kind (invariant 8). A pattern without a kind is a config error: which
//! kind it meant is the operator's call, not ours.

use crate::error::Error;

use crate::identity::{
    check_trust_domain, has_spiffe_scheme, no_kind_hint, Identity, IdentityKind,
};

/// Why a pattern or network someone wrote cannot be read. Its class is
/// the writer's: a config key makes it `Config` (`config::identity_pattern`),
/// a lock request `InvalidArgument`, a stored lock `Config` again
/// (`lock::LockTarget::from_parts`) — through the two helpers below, so
/// no reader strips a class off an error's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError(String);

impl std::fmt::Display for PatternError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PatternError {}

impl PatternError {
    /// A request's error: the caller wrote it (a lock's target).
    pub fn invalid(self) -> Error {
        Error::InvalidArgument(self.0)
    }

    /// A configuration error under `key` (a config key, a stored row).
    pub fn config(self, key: &str) -> Error {
        Error::config_from(format!("{key}: {self}"), self)
    }
}

/// A glob over the identities of one kind. `*` matches within one segment,
/// `**` crosses segments, so `spiffe://example.org/ns/shop/*` grants the
/// services of one namespace and nothing nested below it.
///
/// - `spiffe://TD/PATH`: the trust domain is literal (a trust domain is a
///   trust boundary; no glob should cross it), the path is globbed with
///   `/` between segments.
/// - `dns:NAME`: globbed with `.` between segments (labels), so
///   `dns:*.internal` is one label deep, like a TLS wildcard; case-insensitive.
/// - `cn:NAME`: globbed with `/` between segments, case-sensitive.
#[derive(Clone)]
pub struct IdentityPattern {
    text: String,
    kind: IdentityKind,
    /// For SPIFFE patterns: the literal trust domain.
    trust_domain: String,
    matcher: globset::GlobMatcher,
}

impl IdentityPattern {
    pub fn new(pattern: &str) -> Result<Self, PatternError> {
        let err = |m: &str| PatternError(format!("identity pattern {pattern:?} {m}"));
        if pattern.is_empty() {
            return Err(PatternError("empty identity pattern".into()));
        }
        let (kind, trust_domain, glob) = if has_spiffe_scheme(pattern) {
            let rest = pattern.strip_prefix("spiffe://").ok_or_else(|| {
                err("must start with \"spiffe://\" (lowercase scheme, then \"//\")")
            })?;
            let (td, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            check_trust_domain(td).map_err(|why| {
                err(&format!(
                    "has a bad trust domain: {why} (patterns take a literal trust domain)"
                ))
            })?;
            if path.is_empty() || path == "/" {
                return Err(err(&format!(
                    "has no path; a workload's SPIFFE ID always has one (\"spiffe://{td}/**\" matches the whole trust domain)"
                )));
            }
            if path.ends_with('/')
                || path[1..]
                    .split('/')
                    .any(|s| s.is_empty() || s == "." || s == "..")
            {
                return Err(err(
                    "has an empty, '.' or '..' path segment or a trailing '/': no SPIFFE ID could match it",
                ));
            }
            (IdentityKind::Spiffe, td.to_string(), path.to_string())
        } else if let Some(name) = pattern.strip_prefix("dns:") {
            if name.is_empty() {
                return Err(err("names no DNS name"));
            }
            if name.contains('/') {
                return Err(err("has a '/', which no DNS name holds"));
            }
            // Labels become segments, so `*` stays within one label.
            (
                IdentityKind::Dns,
                String::new(),
                dns_as_path(&name.to_ascii_lowercase()),
            )
        } else if let Some(name) = pattern.strip_prefix("cn:") {
            if name.is_empty() {
                return Err(err("names no CN"));
            }
            (IdentityKind::Cn, String::new(), name.to_string())
        } else {
            return Err(err(&no_kind_hint(pattern)));
        };
        let matcher = globset::GlobBuilder::new(&glob)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| err(&format!("is not a valid glob: {e}")))?
            .compile_matcher();
        Ok(IdentityPattern {
            text: pattern.to_string(),
            kind,
            trust_domain,
            matcher,
        })
    }

    /// Whether `identity` is of this pattern's kind and matches its glob.
    pub fn matches(&self, identity: &Identity) -> bool {
        if identity.kind() != self.kind {
            return false;
        }
        let name = identity.name();
        match self.kind {
            IdentityKind::Spiffe => match name.find('/') {
                Some(i) => {
                    let (td, path) = name.split_at(i);
                    td == self.trust_domain && self.matcher.is_match(path)
                }
                None => false,
            },
            IdentityKind::Dns => self.matcher.is_match(dns_as_path(name)),
            IdentityKind::Cn => self.matcher.is_match(name),
            IdentityKind::Other => false,
        }
    }

    pub fn kind(&self) -> IdentityKind {
        self.kind
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A DNS name (or pattern) with its labels as `/`-separated segments, so
/// globset's segment rules apply to labels. Identities hold no `/`
/// (`identity.rs` refuses it), so this loses nothing.
fn dns_as_path(name: &str) -> String {
    name.replace('.', "/")
}

impl std::fmt::Debug for IdentityPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityPattern({:?})", self.text)
    }
}

/// A caller network (`10.0.0.0/8`, `2001:db8::/32`, or one address) for a
/// role's `allowed_networks`, matched against the caller's TCP peer
/// address. An IPv4 peer seen as IPv4-mapped IPv6 (`::ffff:10.1.2.3`, a
/// dual-stack listener) matches IPv4 networks.
#[derive(Clone, PartialEq, Eq)]
pub struct Network {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        let bad = |why: &str| PatternError(format!("network {s:?}: {why}"));
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr.trim().parse().map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad("prefix length out of range"))?,
            None => max,
        };
        let net = Network { addr, prefix };
        // `10.1.2.3/8` is almost surely a typo for a host or for `10.0.0.0/8`.
        if net.masked(addr) != addr {
            return Err(bad("host bits are set; write the network address"));
        }
        Ok(net)
    }

    fn masked(&self, a: std::net::IpAddr) -> std::net::IpAddr {
        use std::net::IpAddr;
        match a {
            IpAddr::V4(v) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v) & m).into())
            }
            IpAddr::V6(v) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v) & m).into())
            }
        }
    }

    pub fn contains(&self, peer: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let peer = match peer {
            IpAddr::V6(v) => v.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
            v4 => v4,
        };
        peer.is_ipv4() == self.addr.is_ipv4() && self.masked(peer) == self.addr
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Network({self})")
    }
}

/// Whether `peer` may call: no networks configured means any address; with
/// networks, an unknown address (no TCP peer) is refused.
pub fn network_allowed(networks: &[Network], peer: Option<std::net::IpAddr>) -> bool {
    networks.is_empty() || peer.is_some_and(|p| networks.iter().any(|n| n.contains(p)))
}

pub fn any_matches(patterns: &[IdentityPattern], identity: &Identity) -> bool {
    patterns.iter().any(|p| p.matches(identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> Identity {
        Identity::parse(text).unwrap()
    }

    fn pattern(text: &str) -> IdentityPattern {
        IdentityPattern::new(text).unwrap()
    }

    #[test]
    fn star_stays_within_a_segment() {
        let p = pattern("spiffe://example.org/ns/shop/*");
        assert!(p.matches(&id("spiffe://example.org/ns/shop/cart")));
        assert!(!p.matches(&id("spiffe://example.org/ns/shop/cart/evil")));
        assert!(!p.matches(&id("spiffe://example.org/ns/shopping/cart")));
        assert!(!p.matches(&id("spiffe://example.org.evil/ns/shop/cart")));
        let deep = pattern("spiffe://example.org/**");
        assert!(deep.matches(&id("spiffe://example.org/ns/shop/cart")));
        assert!(!deep.matches(&id("spiffe://other.org/ns/shop/cart")));
        let exact = pattern("dns:billing.internal");
        assert!(exact.matches(&id("dns:billing.internal")));
        assert!(exact.matches(&id("dns:BILLING.internal")));
        assert!(!exact.matches(&id("dns:billing.internal.evil")));
        let label = pattern("dns:*.internal");
        assert!(label.matches(&id("dns:billing.internal")));
        assert!(!label.matches(&id("dns:evil.billing.internal")));
        assert!(pattern("dns:**.internal").matches(&id("dns:evil.billing.internal")));
    }

    #[test]
    fn no_pattern_matches_an_identity_of_another_kind() {
        let spiffe = pattern("spiffe://credbroker.dev/dba/*");
        let dns = pattern("dns:billing.internal");
        let cn = pattern("cn:legacy-batch");
        let everything = [
            pattern("spiffe://credbroker.dev/**"),
            pattern("dns:**"),
            pattern("cn:**"),
        ];
        // Same text after the kind prefix, different kind: never a match.
        assert!(!spiffe.matches(&id("cn:spiffe://credbroker.dev/dba/x")));
        assert!(!spiffe.matches(&Identity::from_trusted("spiffe-looking")));
        assert!(!dns.matches(&id("cn:billing.internal")));
        assert!(!cn.matches(&id("dns:legacy-batch")));
        assert!(cn.matches(&id("cn:legacy-batch")));
        assert!(spiffe.matches(&id("spiffe://credbroker.dev/dba/x")));
        for (i, p) in everything.iter().enumerate() {
            for (j, who) in [
                id("spiffe://credbroker.dev/a/b"),
                id("dns:a.b"),
                id("cn:a/b"),
            ]
            .iter()
            .enumerate()
            {
                assert_eq!(p.matches(who), i == j, "{p:?} vs {who}");
            }
        }
        // Rows from before identities were typed match nothing.
        assert!(!everything
            .iter()
            .any(|p| p.matches(&Identity::from_trusted("billing.internal"))));
        assert!(!pattern("cn:*").matches(&Identity::system()));
    }

    #[test]
    fn patterns_without_a_kind_or_with_a_bad_trust_domain_are_refused() {
        let err = IdentityPattern::new("billing.internal")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                r#"identity pattern "billing.internal" has no kind; write "dns:billing.internal" (a DNS SAN) or "cn:billing.internal" (the subject CN)"#
            ),
            "{err}"
        );
        for (p, why) in [
            ("*", "has no kind"),
            ("SPIFFE://td/x", "lowercase scheme"),
            ("spiffe://TD/x", "lowercase"),
            ("spiffe://*/x", "literal trust domain"),
            ("spiffe://td:1/x", "port"),
            ("spiffe://td", "has no path"),
            ("spiffe://td/a//b", "no SPIFFE ID could match"),
            ("spiffe://td/a/../b", "no SPIFFE ID could match"),
            ("dns:", "names no DNS name"),
            ("cn:", "names no CN"),
            ("dns:a/b", "'/'"),
            ("cn:[", "not a valid glob"),
        ] {
            let err = IdentityPattern::new(p).unwrap_err().to_string();
            assert!(err.contains(why), "{p}: {err}");
        }
    }

    /// A bad pattern is the writer's error: `Config` under a config key,
    /// `InvalidArgument` as a request — the same words, no class to strip.
    #[test]
    fn a_bad_pattern_is_classed_by_whoever_wrote_it() {
        let e = IdentityPattern::new("bare").unwrap_err();
        let request = e.clone().invalid();
        assert!(matches!(&request, Error::InvalidArgument(m) if m == &e.to_string()));
        assert!(request
            .caller_message()
            .starts_with("identity pattern \"bare\" has no kind"));
        let config = e.config("admins");
        assert!(matches!(&config, Error::Config(_)), "{config}");
        assert!(
            config
                .to_string()
                .starts_with("config: admins: identity pattern \"bare\""),
            "{config}"
        );
        let n = Network::parse("10.1.2.3/8").unwrap_err();
        assert!(!n.to_string().starts_with("config"), "{n}");
        assert!(n
            .config("roles.x.allowed_networks")
            .to_string()
            .contains("host bits"));
    }

    #[test]
    fn networks_contain_their_addresses_only() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let ten = Network::parse("10.0.0.0/8").unwrap();
        assert!(ten.contains(ip("10.255.1.2")));
        assert!(ten.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(!ten.contains(ip("11.0.0.1")));
        assert!(!ten.contains(ip("::1")));
        let host = Network::parse("192.168.4.7").unwrap();
        assert!(host.contains(ip("192.168.4.7")) && !host.contains(ip("192.168.4.8")));
        let v6 = Network::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        for bad in [
            "10.1.2.3/8",
            "10.0.0.0/33",
            "nonsense",
            "10.0.0.0/x",
            "::1/129",
        ] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
        assert!(network_allowed(&[], None));
        assert!(!network_allowed(std::slice::from_ref(&ten), None));
        assert!(network_allowed(&[ten], Some(ip("10.0.0.1"))));
    }
}
