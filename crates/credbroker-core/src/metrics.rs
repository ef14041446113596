//! Prometheus metrics. Counters move as requests and the reaper act; gauges
//! about the store and pools are refreshed when `/metrics` is scraped, so
//! nothing polls the store in the background.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};

use crate::error::Error;
use crate::lease::Reason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: String,
    pub database: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LiveLabels {
    pub role: String,
    pub database: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevokeLabels {
    pub role: String,
    pub database: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub action: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StaticLabels {
    pub static_role: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionRefusalLabels {
    pub listener: String,
    pub reason: String,
}

/// A drain's counts: `role` is the lease's role or the static role.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrainLabels {
    pub role: String,
    pub database: String,
    /// Sessions: `idle` (ended once idle) or `deadline` (still busy at
    /// the drain deadline). Drains: `drained` (the last session went
    /// before the deadline), `deadline`, or `cut` (an admin revoke, a
    /// lock or the reaper ended the lease first).
    pub how: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatabaseLabels {
    pub database: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// `server` (tls.cert) or `client_ca` (tls.client_ca).
    pub certificate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LockLabels {
    /// What the locks hold: `identity`, `role`, `static_role`, `database`.
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleOnlyLabels {
    pub role: String,
}

/// A webhook notification's fate, per webhook (`scheme://host[:port]`,
/// never the path: it may hold a token).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotificationLabels {
    pub webhook: String,
    /// `delivered`, `retried` (one per retry), `dropped` (queue full or
    /// shutdown), `failed` (refused by the receiver, or given up).
    pub outcome: String,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The registry, and the sample names it exports (each family's name with
/// the suffixes its type adds), kept as families are registered: a family
/// with no series yet prints nothing at all, so a scrape alone cannot say
/// what a dashboard or an alert rule may name.
struct Families {
    registry: Registry,
    names: BTreeSet<String>,
}

impl Families {
    const PREFIX: &'static str = "credbroker";

    fn new() -> Self {
        Families {
            registry: Registry::with_prefix(Self::PREFIX),
            names: BTreeSet::new(),
        }
    }

    fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        let suffixes: &[&str] = match metric.metric_type() {
            MetricType::Counter => &["_total"],
            MetricType::Histogram => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            self.names.insert(format!("{}_{name}{s}", Self::PREFIX));
        }
        self.registry.register(name, help, metric);
    }
}

pub struct Metrics {
    registry: Mutex<Families>,
    pub issued: Family<RoleLabels, Counter>,
    pub renewed: Family<RoleLabels, Counter>,
    pub revoked: Family<RevokeLabels, Counter>,
    /// Requests refused or failed, by action and error kind
    /// (`permission_denied`, `resource_exhausted`, `unavailable`, …).
    pub failed: Family<FailureLabels, Counter>,
    pub revocation_failures: Family<DatabaseLabels, Counter>,
    pub issue_seconds: Histogram,
    pub live: Family<LiveLabels, Gauge>,
    /// Seconds the oldest due lease has waited for the reaper.
    pub reaper_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub reaper_backlog: Gauge,
    pub pool_size: Family<DatabaseLabels, Gauge>,
    pub pool_available: Family<DatabaseLabels, Gauge>,
    pub pool_max: Family<DatabaseLabels, Gauge>,
    /// Revoked rows the pruner deleted from the store (past retention).
    pub pruned: Counter,
    pub static_rotations: Family<StaticLabels, Counter>,
    pub static_failures: Family<StaticLabels, Counter>,
    /// Connections closed after the handshake, by listener and reason
    /// (`identity_share`, `source_share`, `listener_full`).
    pub connections_refused: Family<ConnectionRefusalLabels, Counter>,
    /// TLS handshakes refused, by listener and reason (`refused`: the
    /// handshake failed, a client certificate refused included; `timeout`;
    /// `in_flight`, `source_in_flight`: too many handshakes at once).
    pub handshakes_refused: Family<ConnectionRefusalLabels, Counter>,
    /// Connections admitted and open, by listener.
    pub connections_open: Family<ListenerLabels, Gauge>,
    /// Sessions a handover's drain ended, by how (`idle`, `deadline`): a
    /// pool that never lets go shows as `deadline`.
    pub drain_sessions: Family<DrainLabels, Counter>,
    /// Drains finished, by outcome (`drained`, `deadline`, `cut`).
    pub drains: Family<DrainLabels, Counter>,
    /// 1 when the lease store answered the last refresh of the store
    /// gauges (at most `STORE_GAUGES_TTL` old when scraped), else 0.
    pub store_up: Gauge,
    /// 1 when the database answered a ping at the last scrape, else 0.
    pub database_up: Family<DatabaseLabels, Gauge>,
    /// When the certificate expires (its `notAfter`, Unix seconds); the
    /// client CA's is the earliest of its file's certificates.
    pub certificate_expiry: Family<CertificateLabels, FloatGauge>,
    /// The CRL's earliest `nextUpdate` (Unix seconds); absent without a CRL.
    pub crl_next_update: Family<CertificateLabels, FloatGauge>,
    /// Locks in force, by what they hold.
    pub locks: Family<LockLabels, Gauge>,
    /// Per role, the most live leases one identity holds …
    pub identity_leases_most: Family<RoleOnlyLabels, Gauge>,
    /// … and the role's `max_leases_per_identity` (roles with one).
    pub identity_leases_cap: Family<RoleOnlyLabels, Gauge>,
    /// Webhook notifications, by webhook and outcome (`notify`).
    pub notifications: Family<NotificationLabels, Counter>,
    /// The last hour per minute, for the console's charts.
    pub history: crate::rate_history::RateHistory,
    /// Leases issued, renewed or revoked by this process: `/metrics`
    /// re-reads the store-derived gauges only when this moved (or they
    /// are old), so a scrape flood costs the store nothing new.
    pub changes: std::sync::atomic::AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Families::new();
        let m = Metrics {
            registry: Mutex::new(Families::new()),
            issued: Family::default(),
            renewed: Family::default(),
            revoked: Family::default(),
            failed: Family::default(),
            revocation_failures: Family::default(),
            issue_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            live: Family::default(),
            reaper_lag_seconds: Gauge::default(),
            reaper_backlog: Gauge::default(),
            pool_size: Family::default(),
            pool_available: Family::default(),
            pool_max: Family::default(),
            pruned: Counter::default(),
            static_rotations: Family::default(),
            static_failures: Family::default(),
            connections_refused: Family::default(),
            connections_open: Family::default(),
            drain_sessions: Family::default(),
            drains: Family::default(),
            handshakes_refused: Family::default(),
            store_up: Gauge::default(),
            database_up: Family::default(),
            certificate_expiry: Family::default(),
            crl_next_update: Family::default(),
            locks: Family::default(),
            identity_leases_most: Family::default(),
            identity_leases_cap: Family::default(),
            notifications: Family::default(),
            history: Default::default(),
            changes: Default::default(),
        };
        registry.register("leases_issued", "Leases issued", m.issued.clone());
        registry.register("leases_renewed", "Leases renewed", m.renewed.clone());
        registry.register(
            "leases_revoked",
            "Leases revoked, by reason",
            m.revoked.clone(),
        );
        registry.register(
            "requests_failed",
            "Requests refused or failed, by action and error kind",
            m.failed.clone(),
        );
        registry.register(
            "revocation_failures",
            "Failed revocation attempts (each is retried)",
            m.revocation_failures.clone(),
        );
        registry.register(
            "issue_duration_seconds",
            "Time to issue a lease",
            m.issue_seconds.clone(),
        );
        registry.register(
            "leases_live",
            "Live leases by role, database and state",
            m.live.clone(),
        );
        registry.register(
            "reaper_lag_seconds",
            "How long the oldest due lease has been waiting for revocation",
            m.reaper_lag_seconds.clone(),
        );
        registry.register(
            "reaper_backlog",
            "Leases due for revocation and not yet revoked",
            m.reaper_backlog.clone(),
        );
        registry.register(
            "backend_pool_connections",
            "Open connections per database pool",
            m.pool_size.clone(),
        );
        registry.register(
            "backend_pool_idle",
            "Idle connections per database pool",
            m.pool_available.clone(),
        );
        registry.register(
            "backend_pool_max",
            "Pool size limit per database",
            m.pool_max.clone(),
        );
        registry.register(
            "store_pruned_rows",
            "Revoked lease rows deleted from the store after their retention",
            m.pruned.clone(),
        );
        registry.register(
            "static_rotations",
            "Static-role rotations committed, by static role and kind (rotate, revoke)",
            m.static_rotations.clone(),
        );
        registry.register(
            "static_rotation_failures",
            "Static-role rotation steps that failed (each is retried)",
            m.static_failures.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed after the handshake: the caller's identity or source held its share of the listener, or the listener was full",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_open",
            "Connections admitted after the handshake and still open, by listener (at most server.max_connections each)",
            m.connections_open.clone(),
        );
        registry.register(
            "drain_sessions_ended",
            "Sessions of a replaced credential a handover's drain ended, by how: idle (once idle) or deadline (still busy at the drain deadline)",
            m.drain_sessions.clone(),
        );
        registry.register(
            "drains",
            "Handover drains finished, by how: drained (last session gone before the deadline), deadline, or cut (revoked at once meanwhile)",
            m.drains.clone(),
        );
        registry.register(
            "tls_handshakes_refused",
            "TLS handshakes refused, by listener and reason (refused, timeout, in_flight, source_in_flight)",
            m.handshakes_refused.clone(),
        );
        registry.register(
            "store_up",
            "1 when the lease store answered the last refresh of the store gauges, 0 when it did not",
            m.store_up.clone(),
        );
        registry.register(
            "database_up",
            "1 when the database answered a ping at the last scrape, 0 when it did not",
            m.database_up.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the server certificate (certificate=server) or the earliest client CA certificate (certificate=client_ca) expires, Unix time",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "tls_crl_next_update_timestamp_seconds",
            "The CRL's earliest nextUpdate, Unix time (absent when tls.crl is not set)",
            m.crl_next_update.clone(),
        );
        registry.register(
            "locks_active",
            "Admin locks in force, by what they hold (identity, role, static_role, database)",
            m.locks.clone(),
        );
        registry.register(
            "identity_leases_most",
            "Per role, the most live leases any one identity holds",
            m.identity_leases_most.clone(),
        );
        registry.register(
            "identity_leases_cap",
            "Per role with one, max_leases_per_identity: an identity holding this many is refused more",
            m.identity_leases_cap.clone(),
        );
        registry.register(
            "notifications",
            "Webhook notifications by webhook (scheme://host) and outcome: delivered, retried (one per retry), dropped (queue full or shutdown), failed (refused, or given up)",
            m.notifications.clone(),
        );
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = registry;
        m
    }

    pub fn issued(&self, role: &str, database: &str, took: Duration) {
        self.issued
            .get_or_create(&RoleLabels {
                role: role.into(),
                database: database.into(),
            })
            .inc();
        self.issue_seconds.observe(took.as_secs_f64());
        self.history.issued(chrono::Utc::now());
        self.changed();
    }

    pub fn renewed(&self, role: &str, database: &str) {
        self.renewed
            .get_or_create(&RoleLabels {
                role: role.into(),
                database: database.into(),
            })
            .inc();
        self.changed();
    }

    pub fn revoked(&self, role: &str, database: &str, reason: Reason) {
        let reason = reason.label();
        self.revoked
            .get_or_create(&RevokeLabels {
                role: role.into(),
                database: database.into(),
                reason: reason.into(),
            })
            .inc();
        self.history.revoked(chrono::Utc::now());
        self.changed();
    }

    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn request_failed(&self, action: &str, error: &Error) {
        self.failed
            .get_or_create(&FailureLabels {
                action: action.into(),
                code: error.kind().into(),
            })
            .inc();
    }

    /// Starts a database's failure counter at 0, so a dashboard's rate()
    /// has a series before the first failure rather than a gap.
    pub fn watch_database(&self, database: &str) {
        let _ = self.revocation_failures.get_or_create(&DatabaseLabels {
            database: database.into(),
        });
    }

    /// A drain's sessions ended `how` (`idle`, `deadline`).
    pub fn drain_sessions_ended(&self, role: &str, database: &str, how: &str, n: u64) {
        if n > 0 {
            self.drain_sessions
                .get_or_create(&DrainLabels {
                    role: role.into(),
                    database: database.into(),
                    how: how.into(),
                })
                .inc_by(n);
        }
    }

    /// A drain finished `how` (`drained`, `deadline`, `cut`).
    pub fn drain_finished(&self, role: &str, database: &str, how: &str) {
        self.drains
            .get_or_create(&DrainLabels {
                role: role.into(),
                database: database.into(),
                how: how.into(),
            })
            .inc();
    }

    pub fn static_rotated(&self, static_role: &str, kind: &str) {
        self.static_rotations
            .get_or_create(&StaticLabels {
                static_role: static_role.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn static_failed(&self, static_role: &str) {
        self.static_failures
            .get_or_create(&StaticLabels {
                static_role: static_role.to_string(),
                kind: "step".to_string(),
            })
            .inc();
    }

    /// The gauge of `listener`'s open connections.
    pub fn connections_open(&self, listener: &str) -> Gauge {
        self.connections_open
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .clone()
    }

    pub fn connection_refused(&self, listener: &str, reason: &str) {
        self.connections_refused
            .get_or_create(&ConnectionRefusalLabels {
                listener: listener.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn handshake_refused(&self, listener: &str, reason: &str) {
        self.handshakes_refused
            .get_or_create(&ConnectionRefusalLabels {
                listener: listener.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn notification(&self, webhook: &str, outcome: &str) {
        self.notifications
            .get_or_create(&NotificationLabels {
                webhook: webhook.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn revocation_failed(&self, database: &str) {
        self.revocation_failures
            .get_or_create(&DatabaseLabels {
                database: database.into(),
            })
            .inc();
    }

    /// Registers the audit log's count of records it could not write
    /// (the log counts them itself: it sits below this module).
    pub fn count_audit_failures(&self, failures: Counter) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(
            "audit_write_failures",
            "Audit records that could not be written; each failed the request or step it recorded",
            failures,
        );
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let families = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &families.registry);
        out
    }

    /// Every sample name this registry may export (`credbroker_leases_issued_total`,
    /// `credbroker_issue_duration_seconds_bucket`, …), series or not yet:
    /// what alert rules and dashboards are checked against.
    pub fn sample_names(&self) -> BTreeSet<String> {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .names
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_names_list_every_family_with_its_type_suffixes_and_the_scrape_holds_no_other() {
        let m = Metrics::new();
        let names = m.sample_names();
        for n in [
            "credbroker_leases_issued_total",
            "credbroker_issue_duration_seconds_bucket",
            "credbroker_issue_duration_seconds_count",
            "credbroker_store_up",
            "credbroker_tls_handshakes_refused_total",
            "credbroker_identity_leases_cap",
        ] {
            assert!(names.contains(n), "{n} missing from {names:?}");
        }
        assert!(
            !names.contains("credbroker_leases_issued"),
            "a counter's samples end in _total"
        );
        assert!(!names.contains("credbroker_audit_write_failures_total"));
        let failures = Counter::default();
        m.count_audit_failures(failures.clone());
        failures.inc();
        assert!(m
            .sample_names()
            .contains("credbroker_audit_write_failures_total"));

        m.issued("ro", "main", Duration::from_millis(3));
        m.revocation_failed("main");
        m.handshake_refused("grpc", "refused");
        m.store_up.set(1);
        let text = m.encode();
        assert!(
            text.contains("credbroker_audit_write_failures_total 1"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                m.sample_names().contains(name),
                "{name} is exported but not listed"
            );
        }
    }
}
