//! `/metrics` (Prometheus text) and `/healthz` on their own listener, plain
//! HTTP, so scraping needs no client certificate.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::metrics::{CertificateLabels, DatabaseLabels, LiveLabels, LockLabels, RoleOnlyLabels};
use crate::store::LeaseFilter;

/// How long the store-derived gauges are reused while this process sees
/// no lease change (another replica's changes show within this): a
/// scrape flood costs the store nothing new, however often `/metrics` is
/// asked.
const STORE_GAUGES_TTL: Duration = Duration::from_secs(5);

struct MetricsState {
    broker: Arc<Broker>,
    /// When the store gauges were last refreshed, and `Metrics::changes`
    /// then; one refresh at a time.
    refreshed: tokio::sync::Mutex<Option<(Instant, u64)>>,
    /// When the databases were last pinged and the TLS files read: at most
    /// once per `STORE_GAUGES_TTL`, however often `/metrics` is asked.
    probed: tokio::sync::Mutex<Option<Instant>>,
}

pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let state = Arc::new(MetricsState {
        broker,
        refreshed: tokio::sync::Mutex::new(None),
        probed: tokio::sync::Mutex::new(None),
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state);
    // Plain HTTP with no client certificate: whoever reaches the port may
    // scrape, so it gets the same header timeout and connection cap.
    super::https::serve_plain(app, listener, shutdown).await;
}

/// Refreshes the gauges that describe state (store, pools), then encodes.
async fn metrics(State(state): State<Arc<MetricsState>>) -> impl IntoResponse {
    refresh(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.broker.metrics().encode(),
    )
}

/// The gauges that describe state: the store's (when this process changed
/// something, or they are old), the databases' and TLS files' (when old),
/// the pools' (always: in memory).
async fn refresh(state: &MetricsState) {
    let broker = &state.broker;
    let m = broker.metrics();
    {
        let mut refreshed = state.refreshed.lock().await;
        let changes = m.changes.load(std::sync::atomic::Ordering::Relaxed);
        let stale =
            refreshed.is_none_or(|(t, seen)| seen != changes || t.elapsed() >= STORE_GAUGES_TTL);
        if stale {
            refresh_store_gauges(broker).await;
            *refreshed = Some((Instant::now(), changes));
        }
    }
    {
        let mut probed = state.probed.lock().await;
        if probed.is_none_or(|t| t.elapsed() >= STORE_GAUGES_TTL) {
            probe_databases(broker).await;
            refresh_tls_gauges(broker);
            *probed = Some(Instant::now());
        }
    }
    for (name, b) in broker.backends() {
        let s = b.pool_state();
        let l = DatabaseLabels {
            database: name.clone(),
        };
        m.pool_size.get_or_create(&l).set(s.size as i64);
        m.pool_available.get_or_create(&l).set(s.available as i64);
        m.pool_max.get_or_create(&l).set(s.max_size as i64);
    }
}

/// Three bounded store questions: live leases grouped by (role, database,
/// state) — one row per group, on an index —, the earliest due time, and
/// how many are due (a count, not a listing).
async fn refresh_store_gauges(broker: &Broker) {
    let m = broker.metrics();
    if let Ok(counts) = broker.store().live_counts().await {
        m.live.clear();
        for (role, database, state, n) in counts {
            m.live
                .get_or_create(&LiveLabels {
                    role,
                    database,
                    state: state.as_str().into(),
                })
                .set(n as i64);
        }
    }
    let now = Utc::now();
    match broker.store().next_due().await {
        Ok(next) => {
            m.reaper_lag_seconds.set(lag(next, now).as_secs_f64());
            m.store_up.set(1);
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::chain(&e), "metrics: the lease store does not answer");
            m.store_up.set(0);
        }
    }
    if let Ok(locks) = broker.store().active_locks().await {
        m.locks.clear();
        for kind in ["identity", "role", "static_role", "database"] {
            let n = locks
                .iter()
                .filter(|l| l.target.kind() == kind && l.is_active(now))
                .count();
            m.locks
                .get_or_create(&LockLabels {
                    target: kind.into(),
                })
                .set(n as i64);
        }
    }
    if let Ok(most) = broker.store().busiest_identity().await {
        let config = broker.config();
        m.identity_leases_most.clear();
        m.identity_leases_cap.clear();
        for (name, role) in &config.roles {
            let l = RoleOnlyLabels { role: name.clone() };
            let n = most.iter().find(|(r, _)| r == name).map_or(0, |(_, n)| *n);
            m.identity_leases_most.get_or_create(&l).set(n as i64);
            if let Some(cap) = role.max_leases_per_identity {
                m.identity_leases_cap.get_or_create(&l).set(cap as i64);
            }
        }
    }
    let due = LeaseFilter {
        expiring_before: Some(now),
        ..Default::default()
    };
    if let Ok(n) = broker.store().count(&due).await {
        m.reaper_backlog.set(n as i64);
    }
}

/// Pings every database at once; each answer (or its absence within the
/// database's own timeouts) sets its `credbroker_database_up`.
async fn probe_databases(broker: &Broker) {
    let m = broker.metrics();
    let pings = broker.backends().iter().map(|(name, b)| async move {
        let up = match b.ping().await {
            Ok(()) => 1,
            Err(e) => {
                tracing::debug!(database = %name, error = %crate::error::chain(&e), "metrics: database does not answer");
                0
            }
        };
        (name, up)
    });
    for (name, up) in futures::future::join_all(pings).await {
        m.database_up
            .get_or_create(&DatabaseLabels {
                database: name.clone(),
            })
            .set(up);
    }
}

/// When the server certificate, the client CA and the CRL run out, read
/// from the files the config names now (the running TLS config reloads
/// from the same files when they change).
fn refresh_tls_gauges(broker: &Broker) {
    let m = broker.metrics();
    let tls = broker.config().tls.clone();
    let stamp = |t: chrono::DateTime<Utc>| t.timestamp() as f64;
    m.certificate_expiry.clear();
    for (which, path) in [("server", &tls.cert), ("client_ca", &tls.client_ca)] {
        if let Some(t) = crate::server::tls::earliest_expiry(path) {
            m.certificate_expiry
                .get_or_create(&CertificateLabels {
                    certificate: which.into(),
                })
                .set(stamp(t));
        }
    }
    m.crl_next_update.clear();
    let next = tls
        .crl
        .as_deref()
        .and_then(|p| crate::server::tls::read_crls(p).ok())
        .and_then(|crls| {
            crls.into_iter()
                .flatten()
                .filter_map(|c| c.next_update)
                .min()
        });
    if let Some(t) = next {
        m.crl_next_update
            .get_or_create(&CertificateLabels {
                certificate: "crl".into(),
            })
            .set(stamp(t));
    }
}

async fn healthz(State(state): State<Arc<MetricsState>>) -> impl IntoResponse {
    match state.broker.store().next_due().await {
        Ok(_) => (StatusCode::OK, "ok\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "lease store unavailable\n"),
    }
}

/// How far behind the reaper is: since when the oldest due lease waits.
fn lag(next_due: Option<DateTime<Utc>>, now: DateTime<Utc>) -> std::time::Duration {
    next_due
        .filter(|d| *d < now)
        .and_then(|d| (now - d).to_std().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::LockTarget;
    use crate::testkit::{admin, app, role, Kit};

    fn state(kit: &Kit) -> MetricsState {
        MetricsState {
            broker: kit.broker.clone(),
            refreshed: tokio::sync::Mutex::new(None),
            probed: tokio::sync::Mutex::new(None),
        }
    }

    /// The value of the one sample line that starts with `series`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[tokio::test]
    async fn the_alerts_series_follow_the_store_databases_locks_certificates_and_audit_log() {
        let roles = format!(
            "{}max_leases_per_identity = 5\n\n{}",
            role("ro", "main"),
            role("rw", "second")
        );
        // `extra` lands in [tls].
        let kit = Kit::new("crl = \"ca.crl\"\n", &roles);
        let dir = kit.audit_path().parent().unwrap().to_path_buf();
        let ca = credbroker_testkit::pki::DevCa::generate("alerts test CA").unwrap();
        let server = ca.server_cert(&["localhost"], &[]).unwrap();
        std::fs::write(dir.join("c.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        let next_update = Utc::now() + chrono::Duration::hours(5);
        let crl = ca
            .crl_between(&[], Utc::now() - chrono::Duration::hours(1), next_update)
            .unwrap();
        std::fs::write(dir.join("ca.crl"), crl).unwrap();
        for _ in 0..3 {
            kit.broker.issue(&app(), "ro", None).await.unwrap();
        }
        kit.broker
            .admin_lock(
                &admin(),
                LockTarget::Role("rw".into()),
                None,
                "t".into(),
                false,
            )
            .await
            .unwrap();

        let s = state(&kit);
        refresh(&s).await;
        let text = kit.broker.metrics().encode();
        let at = |series: &str| sample(&text, series);
        assert_eq!(
            at("credbroker_identity_leases_most{role=\"ro\"}"),
            Some(3.0),
            "{text}"
        );
        assert_eq!(at("credbroker_identity_leases_cap{role=\"ro\"}"), Some(5.0));
        assert_eq!(
            at("credbroker_identity_leases_most{role=\"rw\"}"),
            Some(0.0)
        );
        assert_eq!(
            at("credbroker_identity_leases_cap{role=\"rw\"}"),
            None,
            "rw has no cap"
        );
        assert_eq!(at("credbroker_locks_active{target=\"role\"}"), Some(1.0));
        assert_eq!(
            at("credbroker_locks_active{target=\"identity\"}"),
            Some(0.0)
        );
        assert_eq!(at("credbroker_store_up"), Some(1.0));
        assert_eq!(at("credbroker_database_up{database=\"main\"}"), Some(1.0));
        assert_eq!(at("credbroker_database_up{database=\"second\"}"), Some(1.0));
        assert_eq!(at("credbroker_audit_write_failures_total"), Some(0.0));
        // The dev CA is valid for ten years, its server certificates for one.
        let now = Utc::now().timestamp() as f64;
        let server_exp =
            at("credbroker_tls_certificate_expiry_timestamp_seconds{certificate=\"server\"}")
                .expect("server certificate expiry");
        let ca_exp =
            at("credbroker_tls_certificate_expiry_timestamp_seconds{certificate=\"client_ca\"}")
                .expect("client CA expiry");
        assert!(
            (server_exp - (now + 365.0 * 86400.0)).abs() < 120.0,
            "{server_exp}"
        );
        assert!(
            (ca_exp - (now + 3650.0 * 86400.0)).abs() < 120.0,
            "{ca_exp}"
        );
        assert_eq!(
            at("credbroker_tls_crl_next_update_timestamp_seconds{certificate=\"crl\"}"),
            Some(next_update.timestamp() as f64)
        );

        // The databases stop answering, the store fails its questions, and
        // an audit record cannot be written.
        kit.server.set_unavailable(true);
        kit.broker.audit().fail_writes(true);
        assert!(kit.broker.issue(&app(), "ro", None).await.is_err());
        kit.broker.audit().fail_writes(false);
        // The refresh's first two questions: live counts, next due.
        kit.store.fail_next(2);
        let s = state(&kit);
        refresh(&s).await;
        let text = kit.broker.metrics().encode();
        let at = |series: &str| sample(&text, series);
        assert_eq!(
            at("credbroker_database_up{database=\"main\"}"),
            Some(0.0),
            "{text}"
        );
        assert_eq!(at("credbroker_database_up{database=\"second\"}"), Some(0.0));
        assert_eq!(at("credbroker_store_up"), Some(0.0));
        assert!(at("credbroker_audit_write_failures_total").unwrap() >= 1.0);
    }
}
