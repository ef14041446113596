//! The web console: one place for an on-call engineer to see what is
//! leased, by whom, where and until when, what is failing — and to revoke
//! or lock. Server-rendered pages on a listener of its own (`[console]
//! listen`), served by `server::https` with the broker's server certificate
//! and *required* client certificates; only `admins` see anything.
//!
//! Every request passes [`admit`]: no identity, or not an admin, or outside
//! `admin_networks` is a 403 page, audited. Every state-changing request is
//! a POST whose CSRF token (`csrf.rs`) is checked there too, before any
//! handler runs, so no handler can forget it. Actions go through the
//! broker's admin calls (`admin_revoke`, `admin_lock`, `admin_unlock`,
//! `rotate_static`, `revoke_static`) and the `Access` service (approve,
//! deny, revoke of access requests), so they are audited exactly as the
//! CLI's and gRPC's are. Responses carry a strict
//! Content-Security-Policy: no inline script or style, only the two assets
//! served from the binary (`assets.rs`), and an icon.

mod access_page;
mod assets;
mod audit_view;
mod chart;
mod csrf;
mod format;
mod leases;
mod locks;
mod overview;
mod page;
mod probe;
mod statics;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use tokio::net::TcpListener;

use crate::access::Access;
use crate::broker::Broker;
use crate::error::Error;
use crate::gate::{Ask, Door, Target};
use crate::identity::Identity;
use crate::server::https::{self, Peer};
use crate::server::SharedTls;

/// The action name the console's refusals are counted and audited under.
const ACTION: &str = "console";
/// The action of a page view (GET), audited by the gate.
const VIEW_ACTION: &str = "console_view";

/// The largest form body the console reads (its forms are a few fields).
const MAX_FORM_BYTES: usize = 16 * 1024;

/// What the pages share: the broker, the CSRF key, cached probes.
pub struct Console {
    broker: Arc<Broker>,
    /// The daemon's access service (its notifier included), so a step
    /// taken here is notified as one taken over gRPC.
    access: Arc<Access>,
    csrf: csrf::CsrfKey,
    probes: probe::Probes,
    audit_check: audit_view::ChainCheck,
}

/// The admin a request comes from, as `admit` established it.
#[derive(Clone)]
pub struct Viewer {
    pub identity: Identity,
    /// This viewer's CSRF token, for the forms of the page being rendered.
    pub csrf: String,
}

impl Console {
    /// A console with a CSRF key of its own (tests, the benchmark); its
    /// access events go to the log.
    pub fn new(broker: Arc<Broker>) -> Self {
        let access = Arc::new(Access::new(
            broker.clone(),
            Arc::new(crate::access::LogNotifier),
        ));
        Self::with_key(access, csrf::CsrfKey::random())
    }

    fn with_key(access: Arc<Access>, csrf: csrf::CsrfKey) -> Self {
        Console {
            broker: access.broker().clone(),
            access,
            csrf,
            probes: probe::Probes::default(),
            audit_check: audit_view::ChainCheck::default(),
        }
    }
}

/// Serves the console on `listener` until `shutdown`, with the CSRF key
/// shared by every replica of the store (`csrf::shared`). `access`: the
/// daemon's access service, over the broker the console serves.
pub async fn serve(
    access: Arc<Access>,
    listener: TcpListener,
    tls: SharedTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let broker = access.broker().clone();
    let mut shutdown = Box::pin(shutdown);
    let key = tokio::select! {
        k = csrf::shared(&broker) => k,
        _ = &mut shutdown => return,
    };
    let options = https::ListenerOptions::of("console", &broker);
    let app = router(Arc::new(Console::with_key(access, key)));
    https::serve(app, listener, tls, options, shutdown).await
}

/// The console's routes. Public so the benchmark can serve pages without a
/// TLS listener in the way.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(overview::page))
        .route("/leases", get(leases::page))
        .route("/leases/revoke", post(leases::revoke_one))
        .route(
            "/leases/revoke-matching",
            get(leases::confirm_matching).post(leases::revoke_matching),
        )
        .route("/audit", get(audit_view::page))
        .route("/locks", get(locks::page).post(locks::create))
        .route("/locks/remove", post(locks::remove))
        .route("/access", get(access_page::page))
        .route("/access/approve", post(access_page::approve))
        .route("/access/deny", post(access_page::deny))
        .route("/access/revoke", post(access_page::revoke))
        .route("/static-roles", get(statics::page))
        .route("/static-roles/rotate", post(statics::rotate))
        .route("/static-roles/revoke", post(statics::revoke))
        .route("/static/console.css", get(assets::css))
        .route("/static/console.js", get(assets::js))
        .route("/static/favicon.svg", get(assets::icon))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(console.clone(), admit))
        .layer(middleware::map_response(security_headers))
        .with_state(console)
}

/// Lets admins in and nobody else; checks the CSRF token of every POST.
async fn admit(
    State(console): State<Arc<Console>>,
    Extension(peer): Extension<Peer>,
    req: Request,
    next: Next,
) -> Response {
    // The stylesheet and script are part of the binary, not data: serving
    // them to any verified certificate lets the 403 page look like a page.
    if req.uri().path().starts_with("/static/") {
        return next.run(req).await;
    }
    let broker = &console.broker;
    // Page views are audited by the gate; a POST's handler calls the
    // broker's admin call, which audits what it did.
    let action = if req.method() == Method::POST {
        ACTION
    } else {
        VIEW_ACTION
    };
    let ask = Ask {
        door: Door::Console,
        peer: Some(peer.addr.ip()),
        identity: peer.identity.as_ref(),
        action,
        target: Target::Admin,
    };
    let who = match crate::gate::admit(broker, ask).await {
        Ok(pass) => pass.identity,
        Err(err) => return page::refused(StatusCode::FORBIDDEN, &err),
    };
    let viewer = Viewer {
        csrf: console.csrf.token(&peer.cert_sha256, &who),
        identity: who,
    };
    let req = if req.method() == Method::POST {
        match crate::audit::via(
            Door::Console.as_str(),
            check_csrf(&console, &peer, &viewer, req),
        )
        .await
        {
            Ok(req) => req,
            Err(resp) => return resp,
        }
    } else if req.method() == Method::GET || req.method() == Method::HEAD {
        req
    } else {
        return page::error(
            Some(&viewer),
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "the console reads with GET and changes things with POST only",
        );
    };
    let mut req = req;
    req.extensions_mut().insert(viewer);
    crate::audit::via(Door::Console.as_str(), next.run(req)).await
}

/// Reads the form body, checks its `csrf` field against the token of this
/// certificate and identity, and hands the request on with the body put
/// back.
async fn check_csrf(
    console: &Console,
    peer: &Peer,
    viewer: &Viewer,
    req: Request,
) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_FORM_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return Err(page::error(
                Some(viewer),
                StatusCode::PAYLOAD_TOO_LARGE,
                "Form too large",
                "the console's forms are small; this one is over 16 KiB",
            ))
        }
    };
    let given = url::form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.into_owned());
    let ok = given
        .as_deref()
        .is_some_and(|t| console.csrf.verify(&peer.cert_sha256, &viewer.identity, t));
    if !ok {
        let err = console.broker.refuse(
            viewer.identity.as_str(),
            ACTION,
            Error::denied(if given.is_some() {
                "the form's CSRF token is not this certificate's; reload the page and try again"
            } else {
                "the form carries no CSRF token; use the console's own forms"
            }),
        );
        return Err(page::refused(StatusCode::FORBIDDEN, &err));
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

async fn not_found(Extension(viewer): Extension<Viewer>) -> Response {
    page::error(
        Some(&viewer),
        StatusCode::NOT_FOUND,
        "Not found",
        "no such page",
    )
}

/// Headers on every response, errors included: nothing framed, cached or
/// run that the binary did not serve itself.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::PRAGMA, "no-cache");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    resp
}
