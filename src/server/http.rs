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
use crate::metrics::{DatabaseLabels, LiveLabels};
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
}

pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let state = Arc::new(MetricsState {
        broker,
        refreshed: tokio::sync::Mutex::new(None),
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
    for (name, b) in broker.backends() {
        let s = b.pool_state();
        let l = DatabaseLabels {
            database: name.clone(),
        };
        m.pool_size.get_or_create(&l).set(s.size as i64);
        m.pool_available.get_or_create(&l).set(s.available as i64);
        m.pool_max.get_or_create(&l).set(s.max_size as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
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
    if let Ok(next) = broker.store().next_due().await {
        m.reaper_lag_seconds.set(lag(next, now).as_secs_f64());
    }
    let due = LeaseFilter {
        expiring_before: Some(now),
        ..Default::default()
    };
    if let Ok(n) = broker.store().count(&due).await {
        m.reaper_backlog.set(n as i64);
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
