//! The static roles page: each `[static_roles.NAME]` with its state (never
//! a password or a sealed value: `admin_static_roles` returns neither), a
//! "Rotate now" and an incident "Revoke" per role. Through the broker's
//! admin calls (`rotate_static`, `revoke_static`), so each is audited
//! exactly as `credbroker admin rotate/revoke --static-role` is.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Form};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::console::format::{relative, utc};
use crate::console::page::{self, Head};
use crate::console::{Console, Viewer};
use crate::error::Error;
use crate::static_roles::StaticStatus;

pub struct Row {
    pub name: String,
    pub database: String,
    pub mode: String,
    pub current_user: String,
    pub generation: u64,
    pub rotated_at: String,
    pub next_rotation: String,
    pub valid_until: String,
    pub previous: String,
    pub last_error: String,
}

fn when(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) => format!("{} ({})", utc(t), relative(t, now)),
        None => "—".into(),
    }
}

impl Row {
    fn new(s: &StaticStatus, now: DateTime<Utc>) -> Self {
        Row {
            name: s.name.clone(),
            database: s.database.clone(),
            mode: if s.users.len() > 1 {
                format!("alternating ({})", s.users.join(", "))
            } else {
                format!("single user ({})", s.users.join(", "))
            },
            current_user: s
                .current_user
                .clone()
                .unwrap_or_else(|| "none yet (set at the first read or rotation)".into()),
            generation: s.generation,
            rotated_at: when(s.rotated_at, now),
            next_rotation: when(s.next_rotation_at, now),
            valid_until: when(s.valid_until, now),
            previous: match (&s.previous_user, s.previous_retire_at) {
                (Some(u), Some(t)) => format!("{u}, retires {}", when(Some(t), now)),
                (Some(u), None) => u.clone(),
                _ => "—".into(),
            },
            // Stored free of secrets by the rotator.
            last_error: match (&s.last_error, s.pending) {
                (Some(e), true) => format!("{e} (a rotation is pending)"),
                (Some(e), false) => e.clone(),
                (None, true) => "a rotation is pending".into(),
                (None, false) => String::new(),
            },
        }
    }
}

#[derive(Template)]
#[template(path = "static_roles.html")]
pub struct StaticRolesPage {
    pub head: Head,
    pub csrf: String,
    pub rows: Vec<Row>,
    pub error: Option<String>,
}

pub async fn page(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    let now = Utc::now();
    let mut view = StaticRolesPage {
        head: Head::new("Static roles", "static-roles", Some(&viewer)),
        csrf: viewer.csrf.clone(),
        rows: vec![],
        error: None,
    };
    let read = console.broker.admin_static_roles(&viewer.identity).await;
    let read = read.map(|list| view.rows = list.iter().map(|s| Row::new(s, now)).collect());
    page::render_read(StatusCode::OK, &mut view, |v| &mut v.error, read)
}

#[derive(Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    static_role: String,
    /// `yes` once the admin confirmed: the script sets it after the
    /// browser's confirm dialog; without script, a confirmation page does.
    #[serde(default)]
    confirmed: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Rotate,
    Revoke,
}

#[derive(Template)]
#[template(path = "confirm_static.html")]
pub struct ConfirmPage {
    pub head: Head,
    pub csrf: String,
    pub row: Row,
    pub revoke: bool,
}

pub async fn rotate(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Form(form): Form<ActionForm>,
) -> Response {
    act(&console, &viewer, form, Action::Rotate).await
}

pub async fn revoke(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Form(form): Form<ActionForm>,
) -> Response {
    act(&console, &viewer, form, Action::Revoke).await
}

async fn act(console: &Console, viewer: &Viewer, form: ActionForm, action: Action) -> Response {
    let name = form.static_role.trim();
    let nothing = match action {
        Action::Rotate => "Nothing rotated",
        Action::Revoke => "Nothing revoked",
    };
    if form.confirmed != "yes" {
        return confirm(console, viewer, name, action, nothing).await;
    }
    let out = match action {
        Action::Rotate => console.broker.rotate_static(&viewer.identity, name).await,
        Action::Revoke => console.broker.revoke_static(&viewer.identity, name).await,
    };
    match out {
        Ok(s) => {
            let now = Utc::now();
            let user = s.current_user.as_deref().unwrap_or("?");
            let mut lines = vec![match action {
                Action::Rotate => format!(
                    "Static role {} rotated: current user {user} (generation {}), next rotation {}.",
                    s.name,
                    s.generation,
                    when(s.next_rotation_at, now)
                ),
                Action::Revoke => format!(
                    "Static role {} revoked: every old password is refused and its sessions \
                     are ended; new credential for {user} (generation {}).",
                    s.name, s.generation
                ),
            }];
            if let (Some(p), Some(t)) = (&s.previous_user, s.previous_retire_at) {
                lines.push(format!(
                    "The previous user {p} keeps working until {}.",
                    when(Some(t), now)
                ));
            }
            let heading = match action {
                Action::Rotate => "Rotated",
                Action::Revoke => "Revoked",
            };
            page::outcome(viewer, StatusCode::OK, heading, lines, "/static-roles")
        }
        Err(e) => failed(viewer, nothing, &e),
    }
}

fn failed(viewer: &Viewer, heading: &str, e: &Error) -> Response {
    page::outcome(
        viewer,
        page::status_of(e),
        heading,
        vec![page::caller_text(e)],
        "/static-roles",
    )
}

/// The confirmation, for a browser without script: what the action does
/// to this role, and the form that does it.
async fn confirm(
    console: &Console,
    viewer: &Viewer,
    name: &str,
    action: Action,
    nothing: &str,
) -> Response {
    let list = match console.broker.admin_static_roles(&viewer.identity).await {
        Ok(l) => l,
        Err(e) => return failed(viewer, nothing, &e),
    };
    let Some(status) = list.iter().find(|s| s.name == name) else {
        let e = if name.is_empty() {
            Error::invalid("static_role is required")
        } else {
            Error::NotFound(format!("no static role {name:?} is configured"))
        };
        return failed(viewer, nothing, &e);
    };
    let title = match action {
        Action::Rotate => "Confirm rotation",
        Action::Revoke => "Confirm revocation",
    };
    page::render(
        StatusCode::OK,
        &ConfirmPage {
            head: Head::new(title, "static-roles", Some(viewer)),
            csrf: viewer.csrf.clone(),
            row: Row::new(status, Utc::now()),
            revoke: action == Action::Revoke,
        },
    )
}
