//! What every page shares: the frame (`base.html`), the error and refusal
//! pages, the result page a form post answers with, and rendering.

use askama::Template;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::console::Viewer;
use crate::error::{Class, Error};

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

/// Renders `view` after the read that fills it: with `status` when `read`
/// went through, else with the caller's text of its error on the page's
/// error line (the field `error_line` picks) and the error's status.
pub fn render_read<V: Template>(
    status: StatusCode,
    view: &mut V,
    error_line: fn(&mut V) -> &mut Option<String>,
    read: Result<(), Error>,
) -> Response {
    match read {
        Ok(()) => render(status, view),
        Err(e) => {
            *error_line(view) = Some(caller_text(&e));
            render(status_of(&e), view)
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

/// What a caller is told about an error: the one caller text
/// (`Error::for_caller`, which logs what it withholds), with the class's
/// words in front as an HTML page has no code to carry them — the same
/// text the Vault API sends.
pub fn caller_text(err: &Error) -> String {
    err.for_caller().line()
}

/// The status a failed admin call answers with: the error's class, mapped.
pub fn status_of(err: &Error) -> StatusCode {
    status(err.class())
}

/// Each class's HTTP status on the console. A state conflict is 409 here
/// (a form is re-posted against a changed lease), where the Vault API keeps
/// Vault's 400.
pub fn status(class: Class) -> StatusCode {
    match class {
        Class::InvalidArgument => StatusCode::BAD_REQUEST,
        Class::PermissionDenied | Class::Unauthenticated => StatusCode::FORBIDDEN,
        Class::NotFound => StatusCode::NOT_FOUND,
        Class::FailedPrecondition => StatusCode::CONFLICT,
        Class::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Class::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Class::Internal => StatusCode::INTERNAL_SERVER_ERROR,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The console agrees with the rule on every class: the status is the
    /// class's, the text the caller line — so a `Config` error is a 500
    /// with no detail and an `Unavailable` is cut as on the other doors.
    #[test]
    fn every_class_maps_by_the_rule() {
        for e in crate::error::samples() {
            let caller = e.for_caller();
            assert_eq!(status_of(&e), status(caller.class), "{e}");
            assert_eq!(caller_text(&e), caller.line(), "{e}");
            assert!(!caller_text(&e).contains("SOURCE-TEXT"), "{e}");
            assert!(!caller_text(&e).contains("10.0.0.1"), "{e}");
        }
        assert_eq!(
            status_of(&Error::config("x")),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
