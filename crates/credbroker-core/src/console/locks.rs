//! The locks page: the locks in force, a form to lock an identity
//! pattern, a role or a database out (optionally revoking what it
//! matches), and a button to lift each. Through the broker's admin calls,
//! so each is audited exactly as `credbroker admin lock/unlock` is.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Form};
use chrono::Utc;
use serde::Deserialize;

use crate::console::format::{relative, utc};
use crate::console::page::{self, Head};
use crate::console::{Console, Viewer};
use crate::error::{Error, Result};
use crate::lock::{LockId, LockTarget};
use crate::policy::IdentityPattern;

pub struct Row {
    pub id: String,
    pub kind: &'static str,
    pub value: String,
    pub reason: String,
    pub created_by: String,
    pub created: String,
    pub expires: String,
}

/// The create form, kept as typed so an error loses nothing.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LockForm {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub reason: String,
    /// Empty: until lifted.
    #[serde(default)]
    pub duration: String,
    /// A checkbox: present when ticked.
    #[serde(default)]
    pub revoke: Option<String>,
}

#[derive(Template)]
#[template(path = "locks.html")]
pub struct LocksPage {
    pub head: Head,
    pub csrf: String,
    pub rows: Vec<Row>,
    pub form: LockForm,
    pub error: Option<String>,
}

pub async fn page(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    render(&console, &viewer, LockForm::default(), None, StatusCode::OK).await
}

async fn render(
    console: &Console,
    viewer: &Viewer,
    form: LockForm,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let now = Utc::now();
    let mut view = LocksPage {
        head: Head::new("Locks", "locks", Some(viewer)),
        csrf: viewer.csrf.clone(),
        rows: vec![],
        form,
        error,
    };
    let read = console.broker.admin_locks(&viewer.identity).await;
    let read = read.map(|locks| {
        view.rows = locks
            .iter()
            .map(|l| Row {
                id: l.id.to_string(),
                kind: l.target.kind(),
                value: l.target.value().to_string(),
                reason: l.reason.clone(),
                created_by: l.created_by.clone(),
                created: utc(l.created_at),
                expires: match l.expires_at {
                    Some(t) => format!("{} ({})", utc(t), relative(t, now)),
                    None => "until lifted".into(),
                },
            })
            .collect();
    });
    page::render_read(status, &mut view, |v| &mut v.error, read)
}

fn target(form: &LockForm) -> Result<LockTarget> {
    let value = form.value.trim();
    if value.is_empty() {
        return Err(Error::invalid("name what to lock"));
    }
    if value.len() > 1024 {
        return Err(Error::invalid("the target is longer than 1024 bytes"));
    }
    match form.kind.as_str() {
        "identity" => IdentityPattern::new(value)
            .map(LockTarget::Identity)
            .map_err(|e| e.invalid()),
        "role" => Ok(LockTarget::Role(value.to_string())),
        "static_role" => Ok(LockTarget::StaticRole(value.to_string())),
        "database" => Ok(LockTarget::Database(value.to_string())),
        other => Err(Error::invalid(format!(
            "unknown lock kind {other:?}: identity, role, static_role or database"
        ))),
    }
}

pub async fn create(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Form(form): Form<LockForm>,
) -> Response {
    let parsed = target(&form).and_then(|t| {
        let d = form.duration.trim();
        let duration = if d.is_empty() {
            None
        } else {
            Some(humantime::parse_duration(d).map_err(|e| {
                Error::invalid(format!("duration {d:?}: {e} (write e.g. 30m, 2h, 1d)"))
            })?)
        };
        Ok((t, duration))
    });
    let (target, duration) = match parsed {
        Ok(v) => v,
        Err(e) => {
            let why = message(&e);
            return render(&console, &viewer, form, Some(why), StatusCode::BAD_REQUEST).await;
        }
    };
    let revoke = form.revoke.is_some();
    match console
        .broker
        .admin_lock(
            &viewer.identity,
            target,
            duration,
            form.reason.trim().to_string(),
            revoke,
        )
        .await
    {
        Ok((lock, revoked)) => {
            let mut lines = vec![format!(
                "Lock {} on {}: issue and renew are refused from now on, on every replica.",
                lock.id, lock.target
            )];
            if let Some(out) = revoked {
                lines.push(format!(
                    "{} live lease(s) it matches revoked, {} failed and will be retried.",
                    out.revoked.len(),
                    out.failed.len()
                ));
            }
            page::outcome(&viewer, StatusCode::OK, "Locked", lines, "/locks")
        }
        Err(e) => {
            let status = page::status_of(&e);
            render(&console, &viewer, form, Some(message(&e)), status).await
        }
    }
}

/// An error's text for the form: the broker's words, without internals.
fn message(e: &Error) -> String {
    page::caller_text(e)
}

#[derive(Deserialize)]
pub struct RemoveForm {
    #[serde(default)]
    lock_id: String,
}

pub async fn remove(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Form(form): Form<RemoveForm>,
) -> Response {
    let result = match LockId::parse(form.lock_id.trim()) {
        Ok(id) => console.broker.admin_unlock(&viewer.identity, &id).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(lock) => page::outcome(
            &viewer,
            StatusCode::OK,
            "Lock lifted",
            vec![format!("Lock {} on {} is lifted.", lock.id, lock.target)],
            "/locks",
        ),
        Err(e) => page::outcome(
            &viewer,
            page::status_of(&e),
            "Nothing lifted",
            vec![page::caller_text(&e)],
            "/locks",
        ),
    }
}
