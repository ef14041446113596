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
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Config(format!("network {s:?}: {why}"));
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
