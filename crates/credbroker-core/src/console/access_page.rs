//! The access page: just-in-time access requests (issue 31), undecided
//! ones first, with Approve and Deny for each pending request and Revoke
//! for each live grant. Every button goes through the `Access` service —
//! the same calls the gRPC door makes — so every rule (never the
//! requester, only the policy's approvers, locks, decided or expired
//! requests) applies and each step or refusal is audited as there, with
//! `via = console` (set by `admit`). The console is admin-only at its
//! gate; an admin who is not one of a policy's approvers gets the access
//! module's own refusal on the result page.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Form};
use chrono::Utc;
use serde::Deserialize;

use crate::access::{AccessRequest, AccessState};
use crate::console::format::{relative, utc};
use crate::console::page::{self, Head};
use crate::console::{Console, Viewer};

/// The most requests one page lists (pending ones first): an incident's
/// worth; older decided ones are in the audit log and `credbroker access
/// list`.
const MAX_ROWS: usize = 500;

pub struct Row {
    pub id: String,
    pub policy: String,
    pub roles: String,
    pub requester: String,
    pub reason: String,
    pub state: &'static str,
    pub break_glass: bool,
    pub approvals: String,
    pub approvers: String,
    /// "pending until …", "granted until …", or how it was decided.
    pub when: String,
    pub pending: bool,
    pub live_grant: bool,
}

#[derive(Template)]
#[template(path = "access.html")]
pub struct AccessPage {
    pub head: Head,
    pub csrf: String,
    pub rows: Vec<Row>,
    pub more: usize,
    pub error: Option<String>,
}

/// Pending (still decidable) first, then live grants, then the rest;
/// newest first within each.
fn rank(r: &AccessRequest, now: chrono::DateTime<Utc>) -> u8 {
    match r.state {
        AccessState::Pending if r.pending_until > now => 0,
        AccessState::Granted => 1,
        _ => 2,
    }
}

fn row(r: &AccessRequest, now: chrono::DateTime<Utc>) -> Row {
    let pending = r.state == AccessState::Pending && r.pending_until > now;
    let live_grant = r.state == AccessState::Granted;
    let at = |t| format!("{} ({})", utc(t), relative(t, now));
    let when = match r.state {
        AccessState::Pending if pending => format!("pending until {}", at(r.pending_until)),
        AccessState::Pending => format!("expired at {}", at(r.pending_until)),
        AccessState::Granted => match r.until {
            Some(u) => format!("granted until {}", at(u)),
            None => "granted".into(),
        },
        AccessState::Denied => format!(
            "denied by {}: {}",
            r.denied_by.as_deref().unwrap_or("?"),
            r.deny_reason.as_deref().unwrap_or("")
        ),
        AccessState::Expired => format!("expired undecided at {}", utc(r.pending_until)),
        AccessState::Ended => format!(
            "ended{}{}",
            r.ended_at
                .map(|t| format!(" {}", utc(t)))
                .unwrap_or_default(),
            r.end_reason
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        ),
    };
    Row {
        id: r.id.clone(),
        policy: r.policy.clone(),
        roles: r.roles.join(", "),
        requester: r.requester.clone(),
        reason: r.reason.clone(),
        state: if pending || r.state != AccessState::Pending {
            r.state.as_str()
        } else {
            "expired"
        },
        break_glass: r.break_glass,
        approvals: format!("{}/{}", r.approvals.len(), r.approvals_needed),
        approvers: r
            .approvals
            .iter()
            .map(|a| a.identity.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        when,
        pending,
        live_grant,
    }
}

pub async fn page(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    let now = Utc::now();
    let mut view = AccessPage {
        head: Head::new("Access", "access", Some(&viewer)),
        csrf: viewer.csrf.clone(),
        rows: vec![],
        more: 0,
        error: None,
    };
    let read = console.access.list(&viewer.identity, false).await;
    let read = read.map(|mut list| {
        list.sort_by(|a, b| {
            rank(a, now)
                .cmp(&rank(b, now))
                .then(b.created_at.cmp(&a.created_at))
        });
        view.more = list.len().saturating_sub(MAX_ROWS);
        view.rows = list.iter().take(MAX_ROWS).map(|r| row(r, now)).collect();
    });
    page::render_read(StatusCode::OK, &mut view, |v| &mut v.error, read)
}

#[derive(Deserialize)]
pub struct Decision {
    #[serde(default)]
    request_id: String,
    #[serde(default)]
    reason: String,
}

/// The result page of one step: what it did, or the access module's own
/// refusal (already audited by it).
fn answer(
    viewer: &Viewer,
    result: crate::error::Result<AccessRequest>,
    done: &str,
    said: impl FnOnce(&AccessRequest) -> String,
) -> Response {
    match result {
        Ok(r) => page::outcome(viewer, StatusCode::OK, done, vec![said(&r)], "/access"),
        Err(e) => page::outcome(
            viewer,
            page::status_of(&e),
            "Nothing changed",
            vec![page::caller_text(&e)],
            "/access",
        ),
    }
}

pub async fn approve(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Form(form): Form<Decision>,
) -> Response {
    let result = console
        .access
        .approve(&viewer.identity, form.request_id.trim())
        .await;
    answer(&viewer, result, "Approved", |r| match r.state {
        AccessState::Granted => format!(
            "Request {} is granted: {} may lease {} until {}.",
            r.id,
            r.requester,
            r.roles.join(", "),
            r.until.map(utc).unwrap_or_default()
        ),
        _ => format!(
            "Request {}: approval {}/{} recorded; it waits for more.",
            r.id,
            r.approvals.len(),
            r.approvals_needed
        ),
    })
}

pub async fn deny(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Form(form): Form<Decision>,
) -> Response {
    // The console asks every denial for its reason (the requester reads
    // it); bad input changes nothing and reaches no store.
    if form.reason.trim().is_empty() {
        return page::outcome(
            &viewer,
            StatusCode::BAD_REQUEST,
            "Nothing changed",
            vec!["say why the request is denied: the requester is told the reason".into()],
            "/access",
        );
    }
    let result = console
        .access
        .deny(&viewer.identity, form.request_id.trim(), form.reason.trim())
        .await;
    answer(&viewer, result, "Denied", |r| {
        format!("Request {} of {} is denied; no grant.", r.id, r.requester)
    })
}

pub async fn revoke(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Form(form): Form<Decision>,
) -> Response {
    let result = console
        .access
        .revoke(&viewer.identity, form.request_id.trim(), form.reason.trim())
        .await;
    answer(&viewer, result, "Revoked", |r| {
        format!(
            "Request {} of {} has ended; the leases under it are revoked, sessions included.",
            r.id, r.requester
        )
    })
}
