//! `/metrics` (Prometheus text) and `/healthz` on their own listener, plain
//! HTTP, so scraping needs no client certificate.

use std::future::Future;
use std::sync::Arc;

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

pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(broker);
    // Plain HTTP with no client certificate: whoever reaches the port may
    // scrape, so it gets the same header timeout and connection cap.
    super::https::serve_plain(app, listener, shutdown).await;
}

/// Refreshes the gauges that describe state (store, pools), then encodes.
async fn metrics(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
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
        limit: Some(10_000),
        ..Default::default()
    };
    if let Ok(due) = broker.store().list(&due).await {
        m.reaper_backlog.set(due.len() as i64);
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

async fn healthz(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    match broker.store().next_due().await {
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
