//! What every page shares: the frame (`base.html`), the error and refusal
//! pages, the result page a form post answers with, and rendering.

use askama::Template;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::console::Viewer;
use crate::error::Error;

/// The frame's fields: the page title, which tab is lit, who is looking.
pub struct Head {
    pub title: String,
    pub tab: &'static str,
    pub who: Option<String>,
}

impl Head {
    pub fn new(title: impl Into<String>, tab: &'static str, viewer: Option<&Viewer>) -> Self {
        Head {
            title: title.into(),
            tab,
            who: viewer.map(|v| v.identity.as_str().to_string()),
        }
    }
}

/// Renders a page with `status`. A template that fails to render (it
/// cannot, short of a bug) is a plain 500 naming no detail.
pub fn render(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %crate::error::chain(&e), "console template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "message.html")]
pub struct MessagePage {
    pub head: Head,
    pub heading: String,
    pub lines: Vec<String>,
    /// Where "back" goes, e.g. the listing a revoke came from.
    pub back: String,
    pub ok: bool,
}

/// An error page: what went wrong and what to do, nothing internal.
pub fn error(viewer: Option<&Viewer>, status: StatusCode, heading: &str, why: &str) -> Response {
    render(
        status,
        &MessagePage {
            head: Head::new(heading, "", viewer),
            heading: heading.to_string(),
            lines: vec![why.to_string()],
            back: "/".into(),
            ok: false,
        },
    )
}

/// The page a refused caller sees. The refusal is already audited.
pub fn refused(status: StatusCode, err: &Error) -> Response {
    render(
        status,
        &MessagePage {
            head: Head::new("Access refused", "", None),
            heading: "Access refused".into(),
            lines: vec![
                caller_text(err),
                "The console is for the broker's admins (the config's admins = [...]). \
                 This refusal was recorded in the audit log."
                    .into(),
            ],
            back: "/".into(),
            ok: false,
        },
    )
}

/// What a caller is told about an error: the broker's own message, except
/// for internal errors, whose detail is logged and not shown.
pub fn caller_text(err: &Error) -> String {
    match err {
        Error::Internal(_) => {
            tracing::error!(error = %crate::error::chain(err), "console request failed");
            "internal error (details are in the broker's log)".into()
        }
        other => other.to_string(),
    }
}

/// The status a failed admin call answers with.
pub fn status_of(err: &Error) -> StatusCode {
    match err {
        Error::InvalidArgument(_) | Error::Config(_) => StatusCode::BAD_REQUEST,
        Error::PermissionDenied(_) | Error::Unauthenticated(_) => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::FailedPrecondition(_) => StatusCode::CONFLICT,
        Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A result page for a form post.
pub fn outcome(
    viewer: &Viewer,
    status: StatusCode,
    heading: &str,
    lines: Vec<String>,
    back: &str,
) -> Response {
    render(
        status,
        &MessagePage {
            head: Head::new(heading, "", Some(viewer)),
            heading: heading.to_string(),
            lines,
            back: back.to_string(),
            ok: status.is_success(),
        },
    )
}
