//! Fair shares of a listener's connections. After the TLS handshake a
//! connection is counted against its identity and its source (an IPv4
//! address, or an IPv6 network of `server.ipv6_source_prefix` bits, /64 by
//! default: one host gets a whole /64 and could otherwise pose as 2^64
//! sources). One identity, and one source, holds at most its share of the
//! listener; past it, *that* identity's or source's new connection is
//! closed — the rest of the listener stays free for everyone else.
//!
//! Every listener that speaks mTLS (gRPC, the Vault API, the console) goes
//! through `tls::incoming`, which admits each finished handshake here; the
//! count is held by the connection ([`Admitted`]) and given back when it
//! closes.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::audit::AuditLog;
use crate::config::ServerConfig;
use crate::identity::Identity;
use crate::metrics::Metrics;

/// How many connections one listener holds, and how many of them one
/// identity or one source may hold; and how long a request may take to
/// arrive. From `[server]`, read when the listener starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareLimits {
    /// Most open connections on the listener (`server.max_connections`).
    pub total: usize,
    /// Most of them one identity holds (`server.max_connections_per_identity`).
    pub per_identity: usize,
    /// Most of them one source holds (`server.max_connections_per_source`).
    pub per_source: usize,
    /// IPv6 sources are grouped by this many leading bits
    /// (`server.ipv6_source_prefix`).
    pub ipv6_prefix: u8,
}

impl ShareLimits {
    pub fn from_config(server: &ServerConfig) -> Self {
        ShareLimits {
            total: server.max_connections,
            per_identity: server.max_connections_per_identity,
            per_source: server.max_connections_per_source,
            ipv6_prefix: server.ipv6_source_prefix,
        }
    }
}

impl Default for ShareLimits {
    fn default() -> Self {
        ShareLimits {
            total: DEFAULT_MAX_CONNECTIONS,
            per_identity: DEFAULT_MAX_CONNECTIONS / DEFAULT_SHARE_DIVISOR,
            per_source: DEFAULT_MAX_CONNECTIONS / DEFAULT_SHARE_DIVISOR,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
        }
    }
}

// The defaults live in `config` (which reads them; config sits below
// server in the layers).
pub use crate::config::{DEFAULT_IPV6_PREFIX, DEFAULT_MAX_CONNECTIONS, DEFAULT_SHARE_DIVISOR};

/// Where a connection comes from, as the per-source limits count it: an
/// IPv4 address, or an IPv6 network (IPv4-mapped IPv6 addresses count as
/// their IPv4 address).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Source {
    addr: IpAddr,
    /// 32 for IPv4; the grouping prefix for IPv6.
    prefix: u8,
}

impl Source {
    pub fn of(ip: IpAddr, ipv6_prefix: u8) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source {
                addr: IpAddr::V4(v4),
                prefix: 32,
            },
            IpAddr::V6(v6) => {
                let prefix = ipv6_prefix.min(128);
                let mask = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix))
                };
                Source {
                    addr: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)),
                    prefix,
                }
            }
        }
    }
}

impl fmt::Display for Source {
    /// `192.0.2.7`, or `2001:db8:1:2::/64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) if self.prefix == 128 => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/{}", self.prefix),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its identity already holds `per_identity` connections.
    IdentityShare,
    /// Its source already holds `per_source` connections.
    SourceShare,
    /// The listener holds `total` connections.
    Full,
}

impl Refusal {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::IdentityShare => "identity_share",
            Refusal::SourceShare => "source_share",
            Refusal::Full => "listener_full",
        }
    }

    /// The audit detail: fixed per listener and limits, so refusals of one
    /// flood aggregate into one record per interval.
    pub fn reason(self, listener: &str, limits: &ShareLimits) -> String {
        match self {
            Refusal::IdentityShare => format!(
                "connection refused: this identity holds its share of the {listener} listener ({} connections)",
                limits.per_identity
            ),
            Refusal::SourceShare => format!(
                "connection refused: this source holds its share of the {listener} listener ({} connections)",
                limits.per_source
            ),
            Refusal::Full => format!(
                "connection refused: the {listener} listener holds its most connections ({})",
                limits.total
            ),
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    identities: HashMap<String, usize>,
    sources: HashMap<Source, usize>,
}

/// The open connections of one listener, by identity and by source.
pub struct Shares {
    limits: ShareLimits,
    counts: Mutex<Counts>,
    /// `connections_open{listener}`, when the listener reports it.
    gauge: Option<prometheus_client::metrics::gauge::Gauge>,
}

impl Shares {
    pub fn new(limits: ShareLimits) -> Arc<Self> {
        Arc::new(Shares {
            limits,
            counts: Mutex::default(),
            gauge: None,
        })
    }

    /// Shares whose open connections `gauge` shows.
    pub fn with_gauge(
        limits: ShareLimits,
        gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Arc<Self> {
        Arc::new(Shares {
            limits,
            counts: Mutex::default(),
            gauge: Some(gauge),
        })
    }

    pub fn limits(&self) -> &ShareLimits {
        &self.limits
    }

    /// Counts one connection of `identity` from `source`, or says why it
    /// may not have one. The count is given back when the [`Held`] drops.
    pub fn admit(self: &Arc<Self>, identity: &str, source: Source) -> Result<Held, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.identities.get(identity).copied().unwrap_or(0) >= self.limits.per_identity {
            return Err(Refusal::IdentityShare);
        }
        if c.sources.get(&source).copied().unwrap_or(0) >= self.limits.per_source {
            return Err(Refusal::SourceShare);
        }
        if c.total >= self.limits.total {
            return Err(Refusal::Full);
        }
        c.total += 1;
        *c.identities.entry(identity.to_string()).or_insert(0) += 1;
        *c.sources.entry(source).or_insert(0) += 1;
        if let Some(g) = &self.gauge {
            g.inc();
        }
        Ok(Held {
            shares: self.clone(),
            identity: identity.to_string(),
            source,
        })
    }

    /// Open connections: in total, of `identity`, from `source`.
    pub fn held(&self, identity: &str, source: Source) -> (usize, usize, usize) {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        (
            c.total,
            c.identities.get(identity).copied().unwrap_or(0),
            c.sources.get(&source).copied().unwrap_or(0),
        )
    }
}

/// One admitted connection's place in its listener's counts.
pub struct Held {
    shares: Arc<Shares>,
    identity: String,
    source: Source,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut c = self.shares.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(g) = &self.shares.gauge {
            g.dec();
        }
        if let Some(n) = c.identities.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                c.identities.remove(&self.identity);
            }
        }
        if let Some(n) = c.sources.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.sources.remove(&self.source);
            }
        }
    }
}

/// What a listener that admits connections needs: its name (for audit
/// and metrics), where refusals go, and its limits.
#[derive(Clone)]
pub struct ListenerOptions {
    /// `grpc`, `vault_api`, `console`.
    pub name: &'static str,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    pub limits: ShareLimits,
    /// A request's head must arrive within this, and its body within this
    /// again (`server.request_timeout`; the HTTP listeners).
    pub request_timeout: Duration,
    /// Connections older than this are closed after their current request
    /// (`server.max_connection_age`).
    pub max_age: Duration,
}

impl ListenerOptions {
    /// The options of the listener `name` of `broker`, from its `[server]`.
    pub fn of(name: &'static str, broker: &crate::broker::Broker) -> Self {
        let config = broker.config();
        ListenerOptions {
            name,
            audit: broker.audit().clone(),
            metrics: broker.metrics().clone(),
            limits: ShareLimits::from_config(&config.server),
            request_timeout: config.server.request_timeout,
            max_age: config.server.max_connection_age,
        }
    }
}

/// The key a connection's identity is counted under: the identity, or for a
/// certificate that names none, the certificate itself (its handlers refuse
/// it, but it still holds a connection).
pub fn identity_key(
    identity: &Result<Identity, crate::error::Error>,
    cert_sha256: &[u8; 32],
) -> String {
    match identity {
        Ok(id) => id.as_str().to_string(),
        Err(_) => format!("certificate:{}", hex::encode(cert_sha256)),
    }
}

/// A stream admitted to its listener: holds its count until it closes, and
/// carries the caller as the handshake established it.
pub struct Admitted<S> {
    pub io: S,
    /// The identity of the leaf certificate, or why it names none.
    pub identity: Result<Identity, crate::error::Error>,
    /// SHA-256 of the leaf certificate's DER.
    pub cert_sha256: [u8; 32],
    _held: Held,
}

impl<S> Admitted<S> {
    pub fn new(
        io: S,
        identity: Result<Identity, crate::error::Error>,
        cert_sha256: [u8; 32],
        held: Held,
    ) -> Self {
        Admitted {
            io,
            identity,
            cert_sha256,
            _held: held,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// tonic reads the peer's certificates and address from the stream it
/// serves: hand it the TLS stream's.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Admitted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Source {
        Source::of(s.parse().unwrap(), 64)
    }

    fn limits(total: usize, per_identity: usize, per_source: usize) -> ShareLimits {
        ShareLimits {
            total,
            per_identity,
            per_source,
            ipv6_prefix: 64,
        }
    }

    #[test]
    fn one_identity_past_its_share_is_refused_and_no_one_else() {
        let shares = Shares::new(limits(10, 3, 100));
        let a: Vec<_> = (0..3)
            .map(|_| shares.admit("spiffe://d/a", v4("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(
            shares.admit("spiffe://d/a", v4("10.0.0.2")).err(),
            Some(Refusal::IdentityShare),
            "a fourth connection of one identity, even from elsewhere"
        );
        // Another identity, even from the same address, is admitted.
        let b = shares.admit("spiffe://d/b", v4("10.0.0.1")).unwrap();
        assert_eq!(shares.held("spiffe://d/a", v4("10.0.0.1")), (4, 3, 4));
        // A closed connection gives its place back.
        drop(a);
        let again = shares.admit("spiffe://d/a", v4("10.0.0.2")).unwrap();
        assert_eq!(shares.held("spiffe://d/a", v4("10.0.0.1")), (2, 1, 1));
        drop((b, again));
        assert_eq!(shares.held("spiffe://d/a", v4("10.0.0.1")), (0, 0, 0));
        let c = shares.counts.lock().unwrap();
        assert!(
            c.identities.is_empty() && c.sources.is_empty(),
            "nothing kept for closed connections"
        );
    }

    #[test]
    fn one_source_past_its_share_is_refused_whatever_its_identities() {
        let shares = Shares::new(limits(10, 100, 2));
        let _held: Vec<_> = ["spiffe://d/a", "spiffe://d/b"]
            .iter()
            .map(|id| shares.admit(id, v4("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(
            shares.admit("spiffe://d/c", v4("10.0.0.1")).err(),
            Some(Refusal::SourceShare)
        );
        shares.admit("spiffe://d/c", v4("10.0.0.2")).unwrap();
    }

    #[test]
    fn the_listener_cap_refuses_only_once_every_share_is_within_limits() {
        let shares = Shares::new(limits(4, 2, 2));
        let mut held = Vec::new();
        for (id, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2")] {
            for _ in 0..2 {
                held.push(shares.admit(id, v4(ip)).unwrap());
            }
        }
        assert_eq!(shares.admit("c", v4("10.0.0.3")).err(), Some(Refusal::Full));
        held.pop();
        shares.admit("c", v4("10.0.0.3")).unwrap();
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_prefix_and_ipv4_by_address() {
        let a = Source::of("2001:db8:1:2:aaaa::1".parse().unwrap(), 64);
        let b = Source::of("2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap(), 64);
        let other = Source::of("2001:db8:1:3::1".parse().unwrap(), 64);
        assert_eq!(a, b, "one /64 is one source");
        assert_ne!(a, other);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        // A configured /56 groups the neighbouring /64 in with it.
        let a56 = Source::of("2001:db8:1:2::1".parse().unwrap(), 56);
        assert_eq!(a56, Source::of("2001:db8:1:3::1".parse().unwrap(), 56));
        assert_eq!(a56.to_string(), "2001:db8:1::/56");
        // /128 is per address.
        let exact = Source::of("2001:db8::1".parse().unwrap(), 128);
        assert_eq!(exact.to_string(), "2001:db8::1");
        assert_ne!(exact, Source::of("2001:db8::2".parse().unwrap(), 128));
        // IPv4 is per address; a mapped address is the IPv4 one.
        assert_ne!(v4("192.0.2.1"), v4("192.0.2.2"));
        assert_eq!(
            Source::of("::ffff:192.0.2.1".parse().unwrap(), 64),
            v4("192.0.2.1")
        );
        assert_eq!(v4("192.0.2.1").to_string(), "192.0.2.1");
    }

    #[test]
    fn one_ipv6_64_holds_one_share_however_many_addresses_it_uses() {
        let shares = Shares::new(limits(100, 100, 3));
        let mut held = Vec::new();
        for i in 1..=3u16 {
            let ip: IpAddr = format!("2001:db8:0:1::{i:x}").parse().unwrap();
            held.push(shares.admit(&format!("id{i}"), Source::of(ip, 64)).unwrap());
        }
        let fourth: IpAddr = "2001:db8:0:1:dead:beef::4".parse().unwrap();
        assert_eq!(
            shares.admit("id4", Source::of(fourth, 64)).err(),
            Some(Refusal::SourceShare)
        );
        let neighbour: IpAddr = "2001:db8:0:2::1".parse().unwrap();
        shares.admit("id4", Source::of(neighbour, 64)).unwrap();
    }

    #[test]
    fn the_open_connections_gauge_counts_admitted_connections_only() {
        let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        let shares = Shares::with_gauge(limits(10, 1, 10), gauge.clone());
        let a = shares.admit("a", v4("10.0.0.1")).unwrap();
        assert!(shares.admit("a", v4("10.0.0.1")).is_err());
        let b = shares.admit("b", v4("10.0.0.1")).unwrap();
        assert_eq!(gauge.get(), 2, "a refusal is not an open connection");
        drop((a, b));
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn a_certificate_without_identity_is_counted_by_its_fingerprint() {
        let none: Result<Identity, crate::error::Error> = Err(
            crate::error::Error::Unauthenticated("two SPIFFE IDs".into()),
        );
        assert_eq!(
            identity_key(&none, &[0xab; 32]),
            format!("certificate:{}", "ab".repeat(32))
        );
        let id = Identity::from_trusted("spiffe://d/a");
        assert_eq!(identity_key(&Ok(id), &[0; 32]), "spiffe://d/a");
    }
}
