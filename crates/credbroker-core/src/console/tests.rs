//! The console's rules over the fast tier's broker (memory store, fake
//! databases): who gets in, what every response carries, CSRF, bad input.
//! The browser tests (`tests/it/console.rs`) do the same through Chromium
//! against real databases; these pin the rules in milliseconds.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use tower::ServiceExt;

use crate::audit::Outcome;
use crate::console::{router, Console};
use crate::identity::Identity;
use crate::server::https::Peer;
use crate::store::StaticStore;
use crate::testkit::{role, Kit, ADMIN, APP};

const CERT: [u8; 32] = [9; 32];

fn peer(identity: std::result::Result<&str, &str>) -> Peer {
    Peer {
        addr: "127.0.0.1:5555".parse().unwrap(),
        identity: identity
            .map(Identity::from_trusted)
            .map_err(|why| crate::error::Error::Unauthenticated(why.into())),
        cert_sha256: CERT,
    }
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn send(console: &Arc<Console>, who: &Peer, req: Request<Body>) -> Answer {
    let app = router(console.clone()).layer(axum::Extension(who.clone()));
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn post(path: &str, form: &str) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_string()))
        .unwrap()
}

fn kit() -> (Kit, Arc<Console>) {
    let kit = Kit::new("", &role("ro", "main"));
    let console = Arc::new(Console::new(kit.broker.clone()));
    (kit, console)
}

/// A form posted by `who`.
async fn submit(console: &Arc<Console>, who: &Peer, path: &str, form: &str) -> Answer {
    send(console, who, post(path, form)).await
}

/// A form posted by `who` with CSRF token `token` appended.
async fn submit_csrf(
    console: &Arc<Console>,
    who: &Peer,
    path: &str,
    form: &str,
    token: &str,
) -> Answer {
    submit(console, who, path, &format!("{form}&csrf={token}")).await
}

/// A form the admin posts on `CERT`, its CSRF token appended.
async fn post_as_admin(console: &Arc<Console>, path: &str, form: &str) -> Answer {
    let token = admin_token(console);
    submit_csrf(console, &peer(Ok(ADMIN)), path, form, &token).await
}

/// The CSRF token the console gives the admin on `CERT`.
fn admin_token(console: &Console) -> String {
    console.csrf.token(&CERT, &Identity::from_trusted(ADMIN))
}

async fn admin_locks(kit: &Kit) -> Vec<crate::lock::Lock> {
    kit.broker
        .admin_locks(&Identity::from_trusted(ADMIN))
        .await
        .unwrap()
}

async fn stored_lease(kit: &Kit, id: &crate::lease::LeaseId) -> crate::lease::Lease {
    kit.broker.store().get(id).await.unwrap().unwrap()
}

/// The app reads static role `orders` (its first read sets generation 1).
async fn read_orders(kit: &Kit) -> crate::static_roles::StaticCredential {
    kit.broker
        .static_credential(&crate::testkit::app(), "orders")
        .await
        .unwrap()
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    // Held to the end: its directory has the audit log.
    let (_kit, console) = kit();
    let admin = peer(Ok(ADMIN));
    for (who, path, status) in [
        (&admin, "/leases", StatusCode::OK),
        (&admin, "/", StatusCode::OK),
        (&admin, "/audit", StatusCode::OK),
        (&admin, "/locks", StatusCode::OK),
        (&admin, "/static-roles", StatusCode::OK),
        (&admin, "/nope", StatusCode::NOT_FOUND),
        (&admin, "/static/console.css", StatusCode::OK),
        (&peer(Ok(APP)), "/leases", StatusCode::FORBIDDEN),
    ] {
        let a = send(&console, who, get(path)).await;
        assert_eq!(a.status, status, "{path}");
        let h = |k| a.headers.get(k).map(|v| v.to_str().unwrap().to_string());
        let csp = h(header::CONTENT_SECURITY_POLICY).unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(h(header::X_FRAME_OPTIONS).as_deref(), Some("DENY"));
        assert_eq!(h(header::CACHE_CONTROL).as_deref(), Some("no-store"));
        assert_eq!(h(header::PRAGMA).as_deref(), Some("no-cache"));
        // No inline script or style on any page: the CSP would refuse it.
        assert!(
            !a.body.contains("<style") && !a.body.contains("style=\""),
            "{path}"
        );
        assert!(!a.body.contains("<script>"), "{path}");
    }
}

/// The charts count this process's traffic: with a store of its own the
/// broker is the whole deployment and the titles say nothing more; on a
/// shared store they say "this replica" (`tests/it/cluster.rs`).
#[tokio::test]
async fn the_charts_of_a_broker_alone_on_its_store_do_not_say_replica() {
    let (_kit, console) = kit();
    let a = send(&console, &peer(Ok(ADMIN)), get("/")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("Leases issued per minute:"), "{}", a.body);
    assert!(a.body.contains("the only one on its store"), "{}", a.body);
    assert!(!a.body.contains("this replica"), "{}", a.body);
}

#[tokio::test]
async fn non_admins_and_certificates_without_identity_get_403_and_are_audited() {
    let (kit, console) = kit();
    let a = send(&console, &peer(Ok(APP)), get("/leases")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.contains("Access refused") && a.body.contains("not an admin"));
    let a = send(&console, &peer(Err("two SPIFFE IDs")), get("/")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let records = kit.audit();
    let denied = |who: &str| {
        records
            .iter()
            // A page view is `console_view`, decided and audited by the gate.
            .any(|r| {
                r.identity == who
                    && r.action == "console_view"
                    && r.outcome == Outcome::Denied
                    && r.via.as_deref() == Some("console")
            })
    };
    assert!(denied(APP));
    assert!(denied("unauthenticated:127.0.0.1"));
}

#[tokio::test]
async fn a_post_needs_this_certificates_csrf_token() {
    let (kit, console) = kit();
    let admin = peer(Ok(ADMIN));
    let form = "kind=role&value=ro&reason=INC-1";
    let missing = submit(&console, &admin, "/locks", form).await;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    let token = admin_token(&console);
    let other_cert = console.csrf.token(&[1; 32], &Identity::from_trusted(ADMIN));
    let forged = submit_csrf(&console, &admin, "/locks", form, &other_cert).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    // Each refusal is one record naming the door.
    let refused: Vec<_> = kit
        .audit()
        .into_iter()
        .filter(|r| r.action == "console" && r.outcome == Outcome::Denied)
        .collect();
    assert_eq!(refused.len(), 2, "missing and forged tokens");
    assert!(refused.iter().all(|r| r.via.as_deref() == Some("console")));
    assert!(admin_locks(&kit).await.is_empty());
    let ok = post_as_admin(&console, "/locks", form).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(admin_locks(&kit).await.len(), 1);
    // The page's own forms carry the token.
    let page = send(&console, &admin, get("/locks")).await;
    assert!(page
        .body
        .contains(&format!("name=\"csrf\" value=\"{token}\"")));
    let put = send(
        &console,
        &admin,
        Request::put("/locks").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(put.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn bad_input_is_a_clear_400_that_keeps_what_was_typed_escaped() {
    let (kit, console) = kit();
    let admin = peer(Ok(ADMIN));
    for (path, want) in [
        ("/leases?within=banana", "expiring within \"banana\""),
        ("/leases?state=dead", "unknown state \"dead\""),
        (
            "/leases?database=nope",
            "no database \"nope\" is configured",
        ),
        ("/leases?page=0", "page \"0\""),
        ("/leases?sort=size", "unknown sort"),
        ("/audit?outcome=maybe", "unknown outcome"),
    ] {
        let a = send(&console, &admin, get(path)).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(
            a.body.contains(&want.replace('"', "&#34;")) || a.body.contains(want),
            "{path}: {}",
            a.body
        );
    }
    let a = send(
        &console,
        &admin,
        get("/leases?identity=%3Cscript%3Ex&within=%3Cb%3E"),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(
        !a.body.contains("<script>x") && !a.body.contains("<b>"),
        "not escaped"
    );
    assert!(
        a.body.contains("value=\"&#60;b&#62;\"") || a.body.contains("value=\"&lt;b&gt;\""),
        "typed value lost: {}",
        a.body
    );
    // A lock form with a bad target keeps the reason typed.
    let a = post_as_admin(
        &console,
        "/locks",
        "kind=identity&value=bare&reason=keep+me",
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("value=\"keep me\""), "{}", a.body);
    assert!(admin_locks(&kit).await.is_empty());
}

#[tokio::test]
async fn a_single_revoke_without_script_asks_on_a_page_first() {
    let (kit, console) = kit();
    let app = crate::testkit::app();
    let issued = kit.broker.issue(&app, "ro", None).await.unwrap();
    let id = issued.lease.id.to_string();
    let admin = peer(Ok(ADMIN));
    let token = admin_token(&console);
    let form = format!("lease_id={id}&back=%2Fleases&csrf={token}");
    let asked = submit(&console, &admin, "/leases/revoke", &form).await;
    assert_eq!(asked.status, StatusCode::OK);
    assert!(
        asked.body.contains("Revoke lease")
            && asked.body.contains("name=\"confirmed\" value=\"yes\"")
    );
    let live = stored_lease(&kit, &issued.lease.id).await;
    assert!(live.state.is_live(), "revoked before it was confirmed");
    let done = submit(
        &console,
        &admin,
        "/leases/revoke",
        &format!("{form}&confirmed=yes"),
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert!(done.body.contains("1 lease revoked"), "{}", done.body);
    let gone = stored_lease(&kit, &issued.lease.id).await;
    assert!(!gone.state.is_live());
    assert!(kit
        .audit()
        .iter()
        .any(|r| r.action == "admin_revoke" && r.identity == ADMIN));
}

fn statics_kit() -> (Kit, Arc<Console>) {
    let kit = Kit::with_statics(&format!(
        "[static_roles.orders]\ndatabase = \"main\"\nallowed = [\"{APP}\"]\n\
         rotation_period = \"1h\"\nusers = [\"app_a\", \"app_b\"]\n\n"
    ));
    for u in ["app_a", "app_b"] {
        kit.server.add_static_user(u);
    }
    let console = Arc::new(Console::new(kit.broker.clone()));
    (kit, console)
}

async fn generation(kit: &Kit) -> u64 {
    kit.store
        .static_get("orders")
        .await
        .unwrap()
        .map(|s| s.generation)
        .unwrap_or(0)
}

#[tokio::test]
async fn the_static_roles_page_lists_each_role_and_no_secret() {
    let (kit, console) = statics_kit();
    let cred = read_orders(&kit).await;
    let admin = peer(Ok(ADMIN));
    let a = send(&console, &admin, get("/static-roles")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    for want in [
        "data-static-role=\"orders\"",
        "alternating (app_a, app_b)",
        "<code>app_a</code>",
        "class=\"generation\">1<",
        "Rotate now",
        "Revoke (incident)",
        "href=\"/static-roles\" class=\"active\"",
    ] {
        assert!(a.body.contains(want), "{want}: {}", a.body);
    }
    let token = admin_token(&console);
    assert!(a.body.contains(&format!("name=\"csrf\" value=\"{token}\"")));
    let sealed = kit
        .store
        .static_get("orders")
        .await
        .unwrap()
        .unwrap()
        .current
        .unwrap()
        .sealed;
    assert!(!a.body.contains(cred.password.expose()), "password shown");
    assert!(!a.body.contains(&sealed), "sealed value shown");
    assert!(!a.body.to_lowercase().contains("password\""));

    // A kit without static roles says so; the tab is there all the same.
    let (_plain, console) = self::kit();
    let a = send(&console, &admin, get("/static-roles")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.body.contains("No static role is configured"),
        "{}",
        a.body
    );
    let a = send(&console, &admin, get("/locks")).await;
    assert!(a.body.contains("href=\"/static-roles\""));
}

#[tokio::test]
async fn rotate_now_needs_csrf_and_confirmation_and_is_audited_as_the_cli() {
    let (kit, console) = statics_kit();
    let admin = peer(Ok(ADMIN));
    read_orders(&kit).await;
    assert_eq!(generation(&kit).await, 1);

    let form = "static_role=orders&confirmed=yes";
    let missing = submit(&console, &admin, "/static-roles/rotate", form).await;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    let forged = console.csrf.token(&[1; 32], &Identity::from_trusted(ADMIN));
    let a = submit_csrf(&console, &admin, "/static-roles/rotate", form, &forged).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(generation(&kit).await, 1, "rotated without a CSRF token");

    // Without script (no `confirmed`): a confirmation page, nothing yet.
    let asked = post_as_admin(&console, "/static-roles/rotate", "static_role=orders").await;
    assert_eq!(asked.status, StatusCode::OK);
    assert!(
        asked.body.contains("Rotate static role orders now?")
            && asked.body.contains("name=\"confirmed\" value=\"yes\""),
        "{}",
        asked.body
    );
    assert_eq!(generation(&kit).await, 1, "rotated before it was confirmed");

    let done = post_as_admin(&console, "/static-roles/rotate", form).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert!(
        done.body.contains("current user app_b (generation 2)"),
        "{}",
        done.body
    );
    assert_eq!(generation(&kit).await, 2);

    // The CLI's path (gRPC → the same broker call), for comparison.
    kit.broker
        .rotate_static(&Identity::from_trusted(ADMIN), "orders")
        .await
        .unwrap();
    assert_eq!(generation(&kit).await, 3);
    let rotations: Vec<_> = kit
        .audit()
        .into_iter()
        .filter(|r| r.action == "static_rotate" && r.identity == ADMIN)
        .collect();
    assert_eq!(rotations.len(), 2, "{rotations:?}");
    let key = |r: &crate::audit::Record| {
        (
            r.identity.clone(),
            r.action.clone(),
            r.role.clone(),
            r.database.clone(),
            r.outcome,
            r.via.clone(),
            // What was done; the generation and times after the `;` differ.
            r.detail
                .as_deref()
                .and_then(|d| d.split(';').next())
                .map(str::to_string),
        )
    };
    assert_eq!(key(&rotations[0]), key(&rotations[1]));
    assert_eq!(rotations[0].username.as_deref(), Some("app_b"));
    assert_eq!(rotations[0].outcome, Outcome::Ok);

    // An unknown role is a clear 404 and changes nothing.
    let a = post_as_admin(
        &console,
        "/static-roles/rotate",
        "static_role=%3Cb%3Enope&confirmed=yes",
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(!a.body.contains("<b>nope"), "not escaped");
    assert_eq!(generation(&kit).await, 3);
}

#[tokio::test]
async fn revoke_incident_confirms_then_replaces_both_passwords() {
    let (kit, console) = statics_kit();
    let first = read_orders(&kit).await;
    let asked = post_as_admin(&console, "/static-roles/revoke", "static_role=orders").await;
    assert_eq!(asked.status, StatusCode::OK);
    assert!(
        asked
            .body
            .contains("Both users' passwords are replaced and their sessions ended"),
        "{}",
        asked.body
    );
    assert_eq!(generation(&kit).await, 1);
    let done = post_as_admin(
        &console,
        "/static-roles/revoke",
        "static_role=orders&confirmed=yes",
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(generation(&kit).await, 2);
    assert!(!kit.server.static_logs_in(
        &first.username,
        first.password.expose(),
        chrono::Utc::now()
    ));
    assert!(kit
        .audit()
        .iter()
        .any(|r| r.action == "static_revoke" && r.identity == ADMIN && r.outcome == Outcome::Ok));
}

#[tokio::test]
async fn non_admins_cannot_see_or_rotate_static_roles() {
    let (kit, console) = statics_kit();
    let app = peer(Ok(APP));
    let a = send(&console, &app, get("/static-roles")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(!a.body.contains("app_a"));
    // Even with a token of its own certificate: the identity is refused
    // before any form is read.
    let token = console.csrf.token(&CERT, &Identity::from_trusted(APP));
    for path in ["/static-roles/rotate", "/static-roles/revoke"] {
        let a = submit_csrf(
            &console,
            &app,
            path,
            "static_role=orders&confirmed=yes",
            &token,
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(generation(&kit).await, 0, "rotated for a non-admin");
    assert!(kit
        .audit()
        .iter()
        .all(|r| r.action != "static_rotate" && r.action != "static_revoke"));
    assert!(kit
        .audit()
        .iter()
        .any(|r| r.identity == APP && r.action == "console" && r.outcome == Outcome::Denied));
}

/// A policy the console's admin (`dba/alice`) approves alone; `dba/bob`
/// (an admin too, in `access_kit`) is not one of its approvers.
const ACCESS_POLICY: &str = "[access.incident]\nroles = [\"ro\"]\n\
    requesters = [\"spiffe://credbroker.dev/user/*\", \"spiffe://credbroker.dev/dba/*\"]\n\
    approvers = [\"spiffe://credbroker.dev/dba/alice\"]\napprovals = 1\n\
    max_duration = \"4h\"\npending_for = \"30m\"\n";
const REQUESTER: &str = "spiffe://credbroker.dev/user/carol";
const NOT_APPROVER: &str = "spiffe://credbroker.dev/dba/bob";

fn access_kit() -> (Kit, Arc<Console>) {
    // The kit's admins are `dba/*`: both are admins.
    let kit = Kit::new("", &format!("{}{ACCESS_POLICY}", role("ro", "main")));
    let console = Arc::new(Console::new(kit.broker.clone()));
    (kit, console)
}

/// A pending request by `who`, made as the gRPC door makes it.
async fn ask_access(console: &Console, who: &str) -> crate::access::AccessRequest {
    console
        .access
        .request(
            &Identity::from_trusted(who),
            None,
            crate::access::NewRequest {
                roles: vec!["ro".into()],
                reason: "INC-77: orders stuck".into(),
                duration: Some(std::time::Duration::from_secs(3600)),
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

async fn state_of(kit: &Kit, id: &str) -> crate::access::AccessState {
    kit.broker
        .store()
        .get_access(id)
        .await
        .unwrap()
        .unwrap()
        .state
}

#[tokio::test]
async fn the_access_page_lists_pending_first_and_approves_with_csrf() {
    use crate::access::AccessState;
    let (kit, console) = access_kit();
    let admin = peer(Ok(ADMIN));
    let older = ask_access(&console, REQUESTER).await;
    let denied = ask_access(&console, REQUESTER).await;
    console
        .access
        .deny(&Identity::from_trusted(ADMIN), &denied.id, "not now")
        .await
        .unwrap();
    let r = ask_access(&console, REQUESTER).await;
    let page = send(&console, &admin, get("/access")).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let token = admin_token(&console);
    // Pending ones above the decided one; each pending row has both forms.
    let at = |id: &str| page.body.find(&format!("data-request=\"{id}\"")).unwrap();
    assert!(at(&r.id) < at(&denied.id) && at(&older.id) < at(&denied.id));
    for want in [
        "incident",
        REQUESTER,
        "INC-77: orders stuck",
        "0/1",
        "pending until",
        "action=\"/access/approve\"",
        "action=\"/access/deny\"",
        "denied by",
        "href=\"/access\" class=\"active\"",
    ] {
        assert!(page.body.contains(want), "page lacks {want}");
    }
    assert!(page
        .body
        .contains(&format!("name=\"csrf\" value=\"{token}\"")));

    // A tampered token: refused, audited, nothing decided.
    let mut bad = token.clone();
    bad.replace_range(..1, if bad.starts_with('0') { "1" } else { "0" });
    let forged = submit_csrf(
        &console,
        &admin,
        "/access/approve",
        &format!("request_id={}", r.id),
        &bad,
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(state_of(&kit, &r.id).await, AccessState::Pending);

    let ok = post_as_admin(&console, "/access/approve", &format!("request_id={}", r.id)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert!(ok.body.contains("is granted"), "{}", ok.body);
    assert_eq!(state_of(&kit, &r.id).await, AccessState::Granted);
    let records = kit.audit();
    let step = |action: &str| {
        records.iter().any(|x| {
            x.action == action
                && x.identity == ADMIN
                && x.request_id.as_deref() == Some(r.id.as_str())
                && x.outcome == Outcome::Ok
                && x.via.as_deref() == Some("console")
        })
    };
    assert!(step("access_approve") && step("access_grant"));
    let page = send(&console, &admin, get("/access")).await;
    assert!(page.body.contains("granted until") && page.body.contains("action=\"/access/revoke\""));

    // Revoke the live grant from the page.
    let gone = post_as_admin(
        &console,
        "/access/revoke",
        &format!("request_id={}&reason=done", r.id),
    )
    .await;
    assert_eq!(gone.status, StatusCode::OK, "{}", gone.body);
    assert_eq!(state_of(&kit, &r.id).await, AccessState::Ended);
}

#[tokio::test]
async fn the_access_modules_rules_hold_on_the_console_and_are_audited() {
    use crate::access::AccessState;
    let (kit, console) = access_kit();
    let r = ask_access(&console, REQUESTER).await;
    // An admin who is not one of the policy's approvers: the access
    // module's own refusal, audited via the console; nothing decided.
    let bob = peer(Ok(NOT_APPROVER));
    let bob_token = console
        .csrf
        .token(&CERT, &Identity::from_trusted(NOT_APPROVER));
    let a = submit_csrf(
        &console,
        &bob,
        "/access/approve",
        &format!("request_id={}", r.id),
        &bob_token,
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    assert!(
        a.body.contains("is not an approver of access policy"),
        "{}",
        a.body
    );
    assert!(kit.audit().iter().any(|x| x.action == "access_approve"
        && x.identity == NOT_APPROVER
        && x.outcome == Outcome::Denied
        && x.via.as_deref() == Some("console")));
    // The requester never decides its own request, admin or not.
    let own = ask_access(&console, ADMIN).await;
    let a = post_as_admin(
        &console,
        "/access/approve",
        &format!("request_id={}", own.id),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(
        a.body.contains("never approves or denies its own"),
        "{}",
        a.body
    );
    assert_eq!(state_of(&kit, &own.id).await, AccessState::Pending);
    // Deny needs a reason here; bad ids are a clear 400.
    let a = post_as_admin(
        &console,
        "/access/deny",
        &format!("request_id={}&reason=+", r.id),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("say why"), "{}", a.body);
    let a = post_as_admin(&console, "/access/approve", "request_id=ar_%3Cscript%3E").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("malformed access request id") && !a.body.contains("<script>"));
    assert_eq!(state_of(&kit, &r.id).await, AccessState::Pending);
    // Deny with a reason: decided; a decided request cannot be approved.
    let a = post_as_admin(
        &console,
        "/access/deny",
        &format!("request_id={}&reason=not+without+a+ticket", r.id),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(state_of(&kit, &r.id).await, AccessState::Denied);
    let a = post_as_admin(&console, "/access/approve", &format!("request_id={}", r.id)).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(a.body.contains("not pending"), "{}", a.body);
    assert_eq!(state_of(&kit, &r.id).await, AccessState::Denied);
    // A non-admin does not reach the page at all.
    let a = send(&console, &peer(Ok(REQUESTER)), get("/access")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
}
