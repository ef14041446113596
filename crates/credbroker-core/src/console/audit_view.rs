//! The audit page: the latest records, filtered, and whether the hash
//! chain verifies. The listing reads only the log's tail; verifying reads
//! every file of the chain, so its answer is cached for a while and
//! computed off the request threads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;

use crate::audit::{self, Outcome, Verdict};
use crate::console::page::{self, Head};
use crate::console::{Console, Viewer};

/// How much of the current file the listing reads.
pub const TAIL_BYTES: u64 = 1 << 20;
/// Most records shown.
pub const SHOWN: usize = 200;
/// How long a chain verification's answer is reused.
const CHECK_CACHE: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct ChainCheck {
    last: Mutex<Option<(Instant, Chain)>>,
}

#[derive(Clone)]
pub struct Chain {
    pub ok: bool,
    pub text: String,
}

impl ChainCheck {
    async fn verdict(&self, path: &std::path::Path) -> Chain {
        if let Some((at, c)) = &*self.lock() {
            if at.elapsed() < CHECK_CACHE {
                return c.clone();
            }
        }
        let path = path.to_path_buf();
        let chain = tokio::task::spawn_blocking(move || {
            let files = audit::rotated_files(&path)?;
            let n = files.len();
            audit::verify_files(&files).map(|v| (v, n))
        })
        .await;
        let chain = match chain {
            Ok(Ok((Verdict::Intact { records, .. }, files))) => Chain {
                ok: true,
                text: format!("intact: {records} records in {files} file(s) verified"),
            },
            Ok(Ok((Verdict::Broken { file, line, reason }, _))) => Chain {
                ok: false,
                text: format!("BROKEN at {} line {line}: {reason}", file.display()),
            },
            Ok(Err(e)) => Chain {
                ok: false,
                text: format!("cannot read the audit log: {e}"),
            },
            Err(e) => Chain {
                ok: false,
                text: format!("verification failed: {e}"),
            },
        };
        *self.lock() = Some((Instant::now(), chain.clone()));
        chain
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Chain)>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuditForm {
    #[serde(default)]
    pub identity: String,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub outcome: String,
}

pub struct Row {
    pub seq: u64,
    pub ts: String,
    pub identity: String,
    pub action: String,
    pub outcome: &'static str,
    pub role: String,
    pub database: String,
    pub lease_id: String,
    pub username: String,
    pub detail: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
pub struct AuditPage {
    pub head: Head,
    pub form: AuditForm,
    pub error: Option<String>,
    pub chain: Chain,
    pub rows: Vec<Row>,
    pub scanned: usize,
}

fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::Denied => "denied",
        Outcome::Error => "error",
    }
}

pub async fn page(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Query(form): Query<AuditForm>,
) -> Response {
    let path = console.broker.audit().path().to_path_buf();
    let chain = console.audit_check.verdict(&path).await;
    let mut view = AuditPage {
        head: Head::new("Audit", "audit", Some(&viewer)),
        form: form.clone(),
        error: None,
        chain,
        rows: vec![],
        scanned: 0,
    };
    let outcome = form.outcome.trim();
    if !["", "ok", "denied", "error"].contains(&outcome) {
        view.error = Some(format!(
            "unknown outcome {outcome:?}: choose ok, denied or error"
        ));
        return page::render(StatusCode::BAD_REQUEST, &view);
    }
    let tail = tokio::task::spawn_blocking(move || audit::read_tail(&path, TAIL_BYTES)).await;
    let records = match tail {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            view.error = Some(format!("cannot read the audit log: {e}"));
            return page::render(StatusCode::SERVICE_UNAVAILABLE, &view);
        }
        Err(e) => {
            view.error = Some(format!("cannot read the audit log: {e}"));
            return page::render(StatusCode::INTERNAL_SERVER_ERROR, &view);
        }
    };
    view.scanned = records.len();
    let (identity, action) = (form.identity.trim(), form.action.trim());
    view.rows = records
        .into_iter()
        .rev()
        .filter(|r| identity.is_empty() || r.identity.contains(identity))
        .filter(|r| action.is_empty() || r.action == action)
        .filter(|r| outcome.is_empty() || outcome_str(r.outcome) == outcome)
        .take(SHOWN)
        .map(|r| Row {
            seq: r.seq,
            ts: r.ts,
            identity: r.identity,
            action: r.action,
            outcome: outcome_str(r.outcome),
            role: r.role.unwrap_or_default(),
            database: r.database.unwrap_or_default(),
            lease_id: r.lease_id.unwrap_or_default(),
            username: r.username.unwrap_or_default(),
            detail: r.detail.unwrap_or_default(),
        })
        .collect();
    page::render(StatusCode::OK, &view)
}
