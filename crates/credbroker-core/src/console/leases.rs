//! The leases page: a filtered, sorted page of the store (filtered, sorted,
//! counted and paged *in the store*: 100,000 leases cost one page), and the
//! revocations — one lease, or every lease the filter selects behind a
//! confirmation that states the count.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Form};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::broker::{BulkOutcome, Mode, Selector};
use crate::console::format::{relative, utc};
use crate::console::page::{self, Head};
use crate::console::{Console, Viewer};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{Lease, LeaseId, LeaseState};
use crate::store::{LeaseFilter, LeaseOrder};

/// Rows per page.
pub const PAGE_SIZE: usize = 50;
/// Longest `expiring within` a filter takes.
const MAX_WITHIN: std::time::Duration = std::time::Duration::from_secs(366 * 86_400);

/// The filter as the form sends it: text, kept as typed so a page with an
/// error shows the admin's input back instead of losing it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FilterForm {
    #[serde(default)]
    pub database: String,
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub identity: String,
    /// Empty: every live state.
    #[serde(default)]
    pub state: String,
    /// A duration (`15m`, `2h`).
    #[serde(default)]
    pub within: String,
    /// `expires` (soonest first, the default) or `-expires`.
    #[serde(default)]
    pub sort: String,
    #[serde(default)]
    pub page: String,
}

impl FilterForm {
    /// The store filter, or what is wrong with the form, in words.
    pub fn to_filter(&self, console: &Console, now: DateTime<Utc>) -> Result<LeaseFilter> {
        let config = console.broker.config();
        let database = nonempty(&self.database);
        if let Some(d) = &database {
            if !config.databases.contains_key(d) {
                return Err(Error::invalid(format!("no database {d:?} is configured")));
            }
        }
        let role = nonempty(&self.role);
        if let Some(r) = &role {
            if config.role(r).is_none() {
                return Err(Error::invalid(format!("no role {r:?} is configured")));
            }
        }
        let identity = nonempty(&self.identity)
            .map(|i| Identity::parse(&i).map(|i| i.as_str().to_string()))
            .transpose()?;
        let states = match nonempty(&self.state) {
            None => vec![],
            Some(s) => vec![LeaseState::parse(&s).map_err(|_| {
                Error::invalid(format!(
                    "unknown state {s:?}: choose pending, active, draining, failing or revoked"
                ))
            })?],
        };
        let expiring_before = nonempty(&self.within)
            .map(|w| {
                let d = humantime::parse_duration(&w).map_err(|e| {
                    Error::invalid(format!(
                        "expiring within {w:?}: {e} (write e.g. 90s, 15m, 2h)"
                    ))
                })?;
                if d > MAX_WITHIN {
                    return Err(Error::invalid("expiring within: at most 366 days"));
                }
                Ok(now + chrono::Duration::from_std(d).unwrap_or_default())
            })
            .transpose()?;
        let order = match self.sort.as_str() {
            "" | "expires" => LeaseOrder::ExpiresFirst,
            "-expires" => LeaseOrder::ExpiresLast,
            other => {
                return Err(Error::invalid(format!(
                    "unknown sort {other:?}: expires or -expires"
                )))
            }
        };
        Ok(LeaseFilter {
            role,
            database,
            identity,
            states,
            expiring_before,
            order,
            ..Default::default()
        })
    }

    /// The page number (1-based), or what is wrong with it.
    fn page_number(&self) -> Result<usize> {
        match nonempty(&self.page) {
            None => Ok(1),
            Some(p) => match p.parse::<usize>() {
                Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
                _ => Err(Error::invalid(format!("page {p:?}: a whole number from 1"))),
            },
        }
    }

    /// This filter as a query string (without the page), for links.
    fn query(&self, sort: &str) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("database", &self.database),
            ("role", &self.role),
            ("identity", &self.identity),
            ("state", &self.state),
            ("within", &self.within),
        ] {
            if !v.trim().is_empty() {
                q.append_pair(k, v.trim());
            }
        }
        if !sort.is_empty() && sort != "expires" {
            q.append_pair("sort", sort);
        }
        q.finish()
    }

    /// The filter in words, for a confirmation.
    fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("database", &self.database),
            ("role", &self.role),
            ("identity", &self.identity),
            ("state", &self.state),
            ("expiring within", &self.within),
        ]
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| format!("{k} = {}", v.trim()))
        .collect();
        if parts.is_empty() {
            "every live lease".into()
        } else {
            parts.join(", ")
        }
    }
}

fn nonempty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// An error's caller text without its class's words, for a form's own
/// message line (the same text `page::caller_text` shows after them).
fn plain(e: &Error) -> String {
    e.for_caller().message
}

pub struct Row {
    pub id: String,
    pub identity: String,
    pub role: String,
    pub database: String,
    pub username: String,
    pub issued: String,
    pub expires: String,
    pub expires_in: String,
    pub hard_limit: String,
    pub state: &'static str,
    pub attempts: u32,
    pub last_error: String,
    pub live: bool,
}

impl Row {
    fn new(l: &Lease, now: DateTime<Utc>) -> Self {
        Row {
            id: l.id.to_string(),
            identity: l.identity.clone(),
            role: l.role.clone(),
            database: l.database.clone(),
            username: l.username.to_string(),
            issued: utc(l.issued_at),
            expires: utc(l.expires_at),
            expires_in: relative(l.expires_at, now),
            hard_limit: utc(l.max_expires_at),
            state: l.state.as_str(),
            attempts: l.revoke_attempts,
            // Stored free of secrets by the revocation engine.
            last_error: l.last_error.clone().unwrap_or_default(),
            live: l.state.is_live(),
        }
    }
}

#[derive(Template)]
#[template(path = "leases.html")]
pub struct LeasesPage {
    pub head: Head,
    pub csrf: String,
    pub form: FilterForm,
    pub databases: Vec<String>,
    pub roles: Vec<String>,
    pub error: Option<String>,
    pub rows: Vec<Row>,
    pub total: u64,
    pub first: u64,
    pub last: u64,
    pub page: usize,
    pub pages: usize,
    pub prev: Option<String>,
    pub next: Option<String>,
    /// The expiry column's sort link: the other direction.
    pub sort_link: String,
    pub sort_mark: &'static str,
    /// `/leases/revoke-matching?…` for this filter.
    pub revoke_all: String,
    /// This page's own address, for a revoke to come back to.
    pub here: String,
}

pub async fn page(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Query(form): Query<FilterForm>,
) -> Response {
    let now = Utc::now();
    let config = console.broker.config();
    let mut view = LeasesPage {
        head: Head::new("Leases", "leases", Some(&viewer)),
        csrf: viewer.csrf.clone(),
        databases: config.databases.keys().cloned().collect(),
        roles: config.roles.keys().cloned().collect(),
        error: None,
        rows: vec![],
        total: 0,
        first: 0,
        last: 0,
        page: 1,
        pages: 1,
        prev: None,
        next: None,
        sort_link: String::new(),
        sort_mark: "",
        revoke_all: String::new(),
        here: String::new(),
        form: form.clone(),
    };
    let descending = form.sort == "-expires";
    view.sort_link = format!(
        "/leases?{}",
        form.query(if descending { "expires" } else { "-expires" })
    );
    view.sort_mark = if descending { "▼" } else { "▲" };
    let sort = if descending { "-expires" } else { "" };
    let query = form.query(sort);
    view.revoke_all = format!("/leases/revoke-matching?{query}");
    view.here = format!("/leases?{query}");
    let filter = form
        .to_filter(&console, now)
        .and_then(|f| form.page_number().map(|p| (f, p)));
    let (mut filter, page_no) = match filter {
        Ok(v) => v,
        Err(e) => {
            view.error = Some(plain(&e));
            return page::render(StatusCode::BAD_REQUEST, &view);
        }
    };
    let listed = async {
        let total = console.broker.store().count(&filter).await?;
        filter.limit = Some(PAGE_SIZE);
        filter.offset = Some((page_no - 1) * PAGE_SIZE);
        let leases = console.broker.admin_list(&viewer.identity, &filter).await?;
        Ok::<_, Error>((total, leases))
    };
    let read = listed.await.map(|(total, leases)| {
        view.total = total;
        view.pages = (total as usize).div_ceil(PAGE_SIZE).max(1);
        view.page = page_no;
        view.first = if leases.is_empty() {
            0
        } else {
            ((page_no - 1) * PAGE_SIZE + 1) as u64
        };
        view.last = ((page_no - 1) * PAGE_SIZE + leases.len()) as u64;
        let link = |p: usize| {
            let sep = if query.is_empty() { "" } else { "&" };
            format!("/leases?{query}{sep}page={p}")
        };
        view.prev = (page_no > 1).then(|| link(page_no - 1));
        view.next = (page_no < view.pages).then(|| link(page_no + 1));
        view.rows = leases.iter().map(|l| Row::new(l, now)).collect();
    });
    page::render_read(StatusCode::OK, &mut view, |v| &mut v.error, read)
}

#[derive(Deserialize)]
pub struct RevokeOne {
    #[serde(default)]
    lease_id: String,
    /// The listing to go back to.
    #[serde(default)]
    back: String,
    /// `yes` once the admin confirmed: the script sets it after the
    /// browser's confirm dialog; without script, a confirmation page does.
    #[serde(default)]
    confirmed: String,
}

#[derive(Template)]
#[template(path = "confirm_one.html")]
pub struct ConfirmOnePage {
    pub head: Head,
    pub csrf: String,
    pub row: Row,
    pub back: String,
}

pub async fn revoke_one(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Form(form): Form<RevokeOne>,
) -> Response {
    let back = local_path(&form.back);
    let id = match LeaseId::parse(form.lease_id.trim()) {
        Ok(id) => id,
        Err(e) => {
            return page::outcome(
                &viewer,
                StatusCode::BAD_REQUEST,
                "Nothing revoked",
                vec![plain(&e)],
                &back,
            )
        }
    };
    if form.confirmed != "yes" {
        return confirm_one(&console, &viewer, &id, back).await;
    }
    let out = console
        .broker
        .admin_revoke(&viewer.identity, &Selector::Lease(id), Mode::UntilDropped)
        .await;
    outcome(&viewer, out, &back)
}

/// The confirmation of a single revoke, for a browser without script.
async fn confirm_one(console: &Console, viewer: &Viewer, id: &LeaseId, back: String) -> Response {
    match console.broker.store().get(id).await {
        Ok(Some(lease)) if lease.state.is_live() => page::render(
            StatusCode::OK,
            &ConfirmOnePage {
                head: Head::new("Confirm revocation", "leases", Some(viewer)),
                csrf: viewer.csrf.clone(),
                row: Row::new(&lease, Utc::now()),
                back,
            },
        ),
        Ok(_) => page::outcome(
            viewer,
            StatusCode::NOT_FOUND,
            "Nothing to revoke",
            vec![format!("no live lease {id}")],
            &back,
        ),
        Err(e) => page::outcome(
            viewer,
            page::status_of(&e),
            "Nothing revoked",
            vec![page::caller_text(&e)],
            &back,
        ),
    }
}

/// `back` if it is one of the console's own paths, else the listing: a
/// form field must not send the admin to another site.
fn local_path(back: &str) -> String {
    if back.starts_with('/') && !back.starts_with("//") && !back.contains('\\') {
        back.to_string()
    } else {
        "/leases".into()
    }
}

/// The result page of a revocation.
fn outcome(viewer: &Viewer, out: Result<BulkOutcome>, back: &str) -> Response {
    match out {
        Ok(out) if out.failed.is_empty() && out.revoked.is_empty() => page::outcome(
            viewer,
            StatusCode::OK,
            "Nothing to revoke",
            vec!["the lease is no longer live".into()],
            back,
        ),
        Ok(out) => {
            let mut lines = vec![format!(
                "{} revoked: their database users are dropped and their sessions ended.",
                count(out.revoked.len())
            )];
            if !out.failed.is_empty() {
                lines.push(format!(
                    "{} failed and will be retried (see their last error on the leases page):",
                    count(out.failed.len())
                ));
                lines.extend(
                    out.failed
                        .iter()
                        .take(20)
                        .map(|(id, e)| format!("{id}: {}", e.caller().line())),
                );
            }
            let status = if out.failed.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let heading = match (out.revoked.is_empty(), out.failed.is_empty()) {
                (_, true) => "Revoked",
                (false, false) => "Revoked in part",
                (true, false) => "Not revoked yet",
            };
            page::outcome(viewer, status, heading, lines, back)
        }
        Err(e) => page::outcome(
            viewer,
            page::status_of(&e),
            "Nothing revoked",
            vec![page::caller_text(&e)],
            back,
        ),
    }
}

fn count(n: usize) -> String {
    if n == 1 {
        "1 lease".into()
    } else {
        format!("{n} leases")
    }
}

#[derive(Template)]
#[template(path = "confirm.html")]
pub struct ConfirmPage {
    pub head: Head,
    pub csrf: String,
    pub form: FilterForm,
    pub what: String,
    pub count: u64,
    /// The end of the `expiring within` window, fixed when the count was
    /// taken (ms since the epoch), so the confirmed selection does not
    /// drift while the admin reads.
    pub before: String,
    pub notice: Option<String>,
    pub back: String,
}

/// The filter of a confirmation form: the listing's fields plus the count
/// the admin saw and the fixed end of the expiry window.
#[derive(Deserialize)]
pub struct MatchingForm {
    #[serde(flatten)]
    filter: FilterForm,
    #[serde(default)]
    expected: String,
    #[serde(default)]
    before: String,
}

pub async fn confirm_matching(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Query(form): Query<FilterForm>,
) -> Response {
    confirm(&console, &viewer, form, None, None).await
}

/// The confirmation page: how many leases the filter selects now.
async fn confirm(
    console: &Console,
    viewer: &Viewer,
    form: FilterForm,
    before: Option<DateTime<Utc>>,
    notice: Option<String>,
) -> Response {
    let back = format!("/leases?{}", form.query(&form.sort));
    let filter = match revocable_filter(console, &form, before) {
        Ok(f) => f,
        Err(e) => {
            return page::outcome(
                viewer,
                StatusCode::BAD_REQUEST,
                "Nothing revoked",
                vec![plain(&e)],
                &back,
            )
        }
    };
    let count = match console.broker.store().count(&filter).await {
        Ok(n) => n,
        Err(e) => {
            return page::outcome(
                viewer,
                page::status_of(&e),
                "Nothing revoked",
                vec![page::caller_text(&e)],
                &back,
            )
        }
    };
    let view = ConfirmPage {
        head: Head::new("Confirm revocation", "leases", Some(viewer)),
        csrf: viewer.csrf.clone(),
        what: form.describe(),
        count,
        before: filter
            .expiring_before
            .map(|t| t.timestamp_millis().to_string())
            .unwrap_or_default(),
        form,
        notice,
        back,
    };
    page::render(StatusCode::OK, &view)
}

/// The filter a bulk revoke acts on: the listing's, for live leases only,
/// with the expiry window's end fixed at `before` when given.
fn revocable_filter(
    console: &Console,
    form: &FilterForm,
    before: Option<DateTime<Utc>>,
) -> Result<LeaseFilter> {
    let mut filter = form.to_filter(console, Utc::now())?;
    if filter.states.contains(&LeaseState::Revoked) {
        return Err(Error::invalid(
            "revoked leases need no revocation: choose a live state, or none",
        ));
    }
    if before.is_some() && filter.expiring_before.is_some() {
        filter.expiring_before = before;
    }
    Ok(filter)
}

pub async fn revoke_matching(
    State(console): State<Arc<Console>>,
    Extension(viewer): Extension<Viewer>,
    Form(form): Form<MatchingForm>,
) -> Response {
    let back = format!("/leases?{}", form.filter.query(&form.filter.sort));
    let bad = |why: String| {
        page::outcome(
            &viewer,
            StatusCode::BAD_REQUEST,
            "Nothing revoked",
            vec![why],
            &back,
        )
    };
    let Ok(expected) = form.expected.trim().parse::<u64>() else {
        return bad("the confirmation carries no count; confirm from the leases page".into());
    };
    let before = match nonempty(&form.before) {
        None => None,
        Some(ms) => match ms
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis)
        {
            Some(t) => Some(t),
            None => return bad(format!("before {ms:?}: not a time")),
        },
    };
    let filter = match revocable_filter(&console, &form.filter, before) {
        Ok(f) => f,
        Err(e) => return bad(plain(&e)),
    };
    // The admin confirmed a number: if the selection changed since, ask
    // again with the new one rather than revoke what was not confirmed.
    match console.broker.store().count(&filter).await {
        Ok(now) if now != expected => {
            let notice = format!(
                "The selection changed: {now} leases match now, not the {expected} you confirmed. \
                 Nothing was revoked; confirm again."
            );
            return confirm(&console, &viewer, form.filter, before, Some(notice)).await;
        }
        Ok(_) => {}
        Err(e) => {
            return page::outcome(
                &viewer,
                page::status_of(&e),
                "Nothing revoked",
                vec![page::caller_text(&e)],
                &back,
            )
        }
    }
    let out = console
        .broker
        .admin_revoke(
            &viewer.identity,
            &Selector::Matching(filter),
            Mode::UntilDropped,
        )
        .await;
    outcome(&viewer, out, &back)
}
