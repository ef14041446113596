//! The overview: per database — reachable or not, database-side expiry,
//! live and failing leases, pool use — and the last hour's issuance and
//! revocation rates. The page an on-call opens first.

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use chrono::Utc;

use crate::console::chart::{self, Chart};
use crate::console::page::{self, Head};
use crate::console::probe::Reach;
use crate::console::{Console, Viewer};
use crate::lease::{BackendKind, LeaseState};

pub struct DatabaseRow {
    pub name: String,
    pub kind: &'static str,
    pub reachable: bool,
    /// `answered in 3 ms`, or why not.
    pub reach: String,
    /// Whether the database itself ends leased users at their expiry.
    pub failsafe_ok: bool,
    pub failsafe: String,
    pub warnings: Vec<String>,
    pub live: u64,
    pub failing: u64,
    pub pool: String,
    /// Revoke-all link for this database's leases page.
    pub leases_link: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
pub struct OverviewPage {
    pub head: Head,
    pub rows: Vec<DatabaseRow>,
    pub live_total: u64,
    pub failing_total: u64,
    pub store_error: Option<String>,
    pub charts: Vec<Chart>,
    /// Whose traffic the charts count, said under them.
    pub counted: &'static str,
    pub width: u32,
    pub height: u32,
}

pub async fn page(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    let broker = &console.broker;
    // One grouped count for every database: never a listing.
    let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let store_error = match broker.store().live_counts().await {
        Ok(rows) => {
            for (_, database, state, n) in rows {
                let c = counts.entry(database).or_default();
                c.0 += n;
                if state == LeaseState::Failing {
                    c.1 += n;
                }
            }
            None
        }
        Err(e) => Some(page::caller_text(&e)),
    };
    let probes = futures::future::join_all(
        broker
            .backends()
            .values()
            .map(|b| console.probes.reach(b.as_ref())),
    )
    .await;
    let rows: Vec<DatabaseRow> = broker
        .backends()
        .iter()
        .zip(probes)
        .map(|((name, b), reach)| {
            let (live, failing) = counts.get(name).copied().unwrap_or_default();
            let pool = b.pool_state();
            let (reachable, reach_text, warnings) = match reach {
                Reach::Up { took, warnings } => (
                    true,
                    format!("answered in {} ms", took.as_millis()),
                    warnings,
                ),
                Reach::Down(why) => (false, why, vec![]),
            };
            // The MySQL backend's preflight says when its failsafe events
            // cannot run; PostgreSQL's when the server lets a wrong
            // password in (`trust`), which makes VALID UNTIL moot.
            let no_expiry = warnings
                .iter()
                .find(|w| w.contains("NO DATABASE-SIDE EXPIRY"));
            let (failsafe_ok, failsafe) = match (b.kind(), reachable, no_expiry) {
                (_, false, _) => (false, "unknown: database unreachable".to_string()),
                (_, true, Some(w)) => (false, w.clone()),
                (BackendKind::Postgres, true, None) => {
                    (true, "VALID UNTIL on every leased role".to_string())
                }
                (BackendKind::Mysql, true, None) => (
                    true,
                    "failsafe event per user, event_scheduler ON".to_string(),
                ),
            };
            DatabaseRow {
                name: name.clone(),
                kind: match b.kind() {
                    BackendKind::Postgres => "postgres",
                    BackendKind::Mysql => "mysql",
                },
                reachable,
                reach: reach_text,
                failsafe_ok,
                failsafe,
                warnings: warnings
                    .into_iter()
                    .filter(|w| !w.contains("NO DATABASE-SIDE EXPIRY"))
                    .collect(),
                live,
                failing,
                pool: format!(
                    "{} of {} in use ({} open)",
                    pool.size.saturating_sub(pool.available),
                    pool.max_size,
                    pool.size
                ),
                leases_link: format!(
                    "/leases?{}",
                    url::form_urlencoded::Serializer::new(String::new())
                        .append_pair("database", name)
                        .finish()
                ),
            }
        })
        .collect();
    let minutes = broker.metrics().history.last_hour(Utc::now());
    // The charts count what this process did (`rate_history`): on a store
    // shared by replicas that is one replica's share, and the titles say
    // so, lest an on-call read a third of the traffic as all of it.
    let shared = matches!(
        broker.config().store.url,
        crate::config::StoreUrl::Postgres(_)
    );
    let (suffix, counted) = if shared {
        (
            ", this replica",
            "Counted by this replica since it started: the store is shared, and each replica charts only the requests it served. Open each replica's console (or ask Prometheus for the sum of credbroker's counters) for the cluster.",
        )
    } else {
        (
            "",
            "Counted by this broker since it started (it is the only one on its store).",
        )
    };
    let view = OverviewPage {
        head: Head::new("Overview", "overview", Some(&viewer)),
        live_total: rows.iter().map(|r| r.live).sum(),
        failing_total: rows.iter().map(|r| r.failing).sum(),
        rows,
        store_error,
        charts: vec![
            chart::chart(
                &format!("Leases issued per minute{suffix}"),
                &minutes,
                |m| m.issued,
            ),
            chart::chart(
                &format!("Leases revoked per minute{suffix}"),
                &minutes,
                |m| m.revoked,
            ),
        ],
        counted,
        width: chart::WIDTH,
        height: chart::HEIGHT,
    };
    page::render(StatusCode::OK, &view)
}
