//! The web console in a real headless Chromium (Debian's `chromium`,
//! driven by playwright-core from `tests/console/node_modules`): this side
//! issues leases and holds real database sessions as the leased users;
//! `tests/console/console_flow.mjs` uses the pages as an on-call would;
//! then this side checks that what the page revoked is gone — sessions
//! ended, logins refused — and that what it did not touch still works.
//! A static role's "Rotate now" is clicked on a real PostgreSQL user and
//! the new credential logged in with from here.
//!
//! A missing browser or node module fails with the command that installs
//! them. Screenshots go to `docs/console/` only with CONSOLE_SCREENSHOTS=1,
//! so ordinary runs leave the tree clean.

use std::path::{Path, PathBuf};
use std::time::Duration;

use credbroker_testkit::throwaway::{PostgresOptions, ThrowawayPostgres};
use mysql_async::prelude::Queryable;

use crate::support::*;

const OTHER: &str = "spiffe://credbroker.dev/ns/demo/other";
const ADMIN: &str = "spiffe://credbroker.dev/dba/oncall";
const CHROMIUM: &str = "/usr/bin/chromium";
const INSTALL: &str = "run `scripts/ensure-console-deps.sh` (installs Debian's chromium and \
                       tests/console/node_modules from its package-lock.json)";

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console")
}

/// Fails, naming the install command, when the browser or the driver is
/// missing: a browser test never skips.
fn require_browser() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: {INSTALL}"
    );
    assert!(
        console_dir()
            .join("node_modules/playwright-core/package.json")
            .exists(),
        "tests/console/node_modules/playwright-core is missing: {INSTALL}"
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is missing: {INSTALL}"
    );
}

/// Runs one scenario of console_flow.mjs against `b`'s console on `port`.
async fn browse(b: &TestBroker, port: u16, scenario: &str, data: serde_json::Value) {
    require_browser();
    let shots = std::env::var("CONSOLE_SCREENSHOTS")
        .is_ok_and(|v| v == "1")
        .then(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console"));
    let run = tokio::process::Command::new("node")
        .arg("console_flow.mjs")
        .current_dir(console_dir())
        .env("CONSOLE_URL", format!("https://127.0.0.1:{port}"))
        .env("CONSOLE_PKI", &b.env.pki)
        .env("CONSOLE_SCENARIO", scenario)
        .env("CONSOLE_DATA", data.to_string())
        .env("CONSOLE_SCREENSHOTS", shots.unwrap_or_default())
        .env("CHROMIUM", CHROMIUM)
        // Playwright's TLS to the console runs in Node: trust the dev CA
        // there, so the broker's server certificate is verified, not waved
        // through.
        .env("NODE_EXTRA_CA_CERTS", b.env.pki.join("ca.pem"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser run finished within 240 s")
        .expect("node runs");
    assert!(
        out.status.success(),
        "browser scenario {scenario} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lease_json(
    l: &credbroker::pb::Lease,
    identity: &str,
    role: &str,
    database: &str,
) -> serde_json::Value {
    serde_json::json!({
        "id": l.lease_id,
        "username": l.username,
        "identity": identity,
        "role": role,
        "database": database,
        // Only to check that no page shows it.
        "password": l.password,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_browser_sees_filters_and_revokes_leases_with_their_sessions() {
    require_browser();
    let b_roles = demo_role("ro", "5m", "10m");
    let mut b = TestBroker::prepare(&b_roles).await;
    let schema = b.add_mariadb("con", "mro", APP).await;
    let port = b.enable_console().await;
    b.start_in_process().await;

    let revoked_one = issue(&b, "app", "ro", 0).await.unwrap();
    let keep = issue(&b, "app", "ro", 0).await.unwrap();
    let others = issue(&b, "other", "ro", 0).await.unwrap();
    let on_maria = issue(&b, "app", "mro", 0).await.unwrap();
    // Open sessions as the leased users, held through the browser run.
    let pg_session = login(&b.db, &revoked_one.username, &revoked_one.password)
        .await
        .expect("the leased PostgreSQL user logs in");
    pg_session.simple_query("SELECT 1").await.unwrap();
    let mut maria_session = mysql_async::Conn::new(maria_opts(
        Some((&on_maria.username, &on_maria.password)),
        None,
    ))
    .await
    .expect("the leased MariaDB user logs in");
    let n: Option<i64> = maria_session
        .query_first(format!("SELECT COUNT(*) FROM `{schema}`.orders"))
        .await
        .unwrap();
    assert_eq!(n, Some(0));

    let data = serde_json::json!({
        "leases": [
            lease_json(&revoked_one, APP, "ro", "main"),
            lease_json(&keep, APP, "ro", "main"),
            lease_json(&others, OTHER, "ro", "main"),
            lease_json(&on_maria, APP, "mro", "maria"),
        ],
        "revokeOne": revoked_one.lease_id,
        "keep": keep.lease_id,
        "maria": "maria",
        "databases": ["main", "maria"],
        "otherIdentity": OTHER,
        "adminIdentity": ADMIN,
    });
    browse(&b, port, "flow", data).await;

    // The lease revoked from its row: session ended, login refused, role gone.
    assert!(
        pg_session.simple_query("SELECT 1").await.is_err(),
        "the open PostgreSQL session of the revoked lease still runs"
    );
    assert!(login(&b.db, &revoked_one.username, &revoked_one.password)
        .await
        .is_err());
    assert!(!b.role_exists(&revoked_one.username).await);
    // The bulk revoke of database maria: the MariaDB session is killed too.
    let after: Result<Option<i64>, _> = maria_session.query_first("SELECT 1").await;
    assert!(
        after.is_err(),
        "the open MariaDB session of a revoked lease still runs"
    );
    assert!(mysql_async::Conn::new(maria_opts(
        Some((&on_maria.username, &on_maria.password)),
        None
    ))
    .await
    .is_err());
    // What the page did not select still works: the CSRF-less and forged
    // POSTs and the non-admin's POST on `keep` revoked nothing.
    let kept = login(&b.db, &keep.username, &keep.password)
        .await
        .expect("a lease the page did not revoke still logs in");
    kept.simple_query("SELECT 1").await.unwrap();
    assert!(login(&b.db, &others.username, &others.password)
        .await
        .is_ok());

    // Audited as the CLI's are: admin_revoke by the admin's identity.
    let records = b.audit_records();
    let revoked_by_admin: Vec<_> = records
        .iter()
        .filter(|r| r.action == "admin_revoke" && r.identity == ADMIN)
        .filter_map(|r| r.lease_id.clone())
        .collect();
    assert!(revoked_by_admin.contains(&revoked_one.lease_id));
    assert!(revoked_by_admin.contains(&on_maria.lease_id));
    assert!(!revoked_by_admin.contains(&keep.lease_id));
    let denied = |who: &str| {
        records
            .iter()
            .filter(|r| {
                // Page views are `console_view` (the gate's record), forms
                // `console`.
                (r.action == "console" || r.action == "console_view")
                    && r.identity == who
                    && matches!(r.outcome, credbroker::audit::Outcome::Denied)
            })
            .count()
    };
    assert!(
        denied(OTHER) >= 5,
        "each non-admin request is audited: {}",
        denied(OTHER)
    );
    assert!(
        denied(ADMIN) >= 3,
        "CSRF refusals are audited: {}",
        denied(ADMIN)
    );
    // The lock made and lifted on the page, audited as `admin lock` is.
    assert!(records
        .iter()
        .any(|r| r.action == "lock" && r.identity == ADMIN));
    assert!(records
        .iter()
        .any(|r| r.action == "unlock" && r.identity == ADMIN));
    // Nothing secret reached the audit log.
    let log = std::fs::read_to_string(&b.env.audit_path).unwrap();
    for l in [&revoked_one, &keep, &others, &on_maria] {
        assert!(!log.contains(&l.password));
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_overview_shows_a_stopped_database_as_unreachable() {
    require_browser();
    // A server of this test's own: it is stopped below.
    let mut pg = ThrowawayPostgres::start(PostgresOptions::default())
        .await
        .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL: {e}"));
    let mut b = TestBroker::prepare_on(&pg, &role("ro", "{db}", "5m", "10m", APP)).await;
    let port = b.enable_console().await;
    b.start_in_process().await;
    let lease = issue(&b, "app", "ro", 0).await.unwrap();
    pg.stop().await.unwrap();
    browse(
        &b,
        port,
        "unreachable",
        serde_json::json!({ "stopped": "main", "lease": lease.lease_id }),
    )
    .await;
    // The failed attempt is the store's, not the page's: recorded, retried.
    let records = b.audit_records();
    assert!(records.iter().any(|r| r.action == "admin_revoke"
        && r.lease_id.as_deref() == Some(lease.lease_id.as_str())
        && matches!(r.outcome, credbroker::audit::Outcome::Error)));
    b.stop().await;
}

/// One HTTP/1.1 request over mTLS as `who` (a dev certificate's name, or
/// None for no client certificate); the status code and body, or the error.
async fn https_get(
    b: &TestBroker,
    port: u16,
    who: Option<&str>,
    path: &str,
) -> Result<(u16, String), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    credbroker::server::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(b.env.pki.join("ca.pem")).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match who {
        Some(w) => {
            let cert = CertificateDer::from_pem_file(b.env.pki.join(format!("{w}.pem"))).unwrap();
            let key = PrivateKeyDer::from_pem_file(b.env.pki.join(format!("{w}-key.pem"))).unwrap();
            builder.with_client_auth_cert(vec![cert], key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
    let raw = String::from_utf8_lossy(&raw).to_string();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {raw:?}"))?;
    Ok((status, raw))
}

/// `credbroker serve` binds `[console] listen` and serves it over mTLS:
/// the admin's certificate gets the overview, another a 403, none no
/// connection at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_serve_binary_serves_the_console_to_admins_only() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "5m", "10m", APP)).await;
    let port = b.enable_console().await;
    b.spawn_binary().await;
    wait_port(port).await;
    let (status, page) = https_get(&b, port, Some("admin"), "/").await.unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<h1>Overview</h1>") && page.contains("data-database=\"main\""));
    assert!(page
        .to_ascii_lowercase()
        .contains("content-security-policy: default-src 'none'"));
    let (status, page) = https_get(&b, port, Some("app"), "/leases").await.unwrap();
    assert_eq!(status, 403, "{page}");
    let refused = https_get(&b, port, None, "/").await;
    assert!(
        refused.is_err(),
        "a client without a certificate got an answer: {refused:?}"
    );
    assert!(
        b.broker_log().contains("console=https://127.0.0.1:"),
        "serve does not log where the console is: {}",
        b.broker_log()
    );
}

/// A database that checks no passwords (`trust` in pg_hba.conf): the
/// broker's own preflight logs in as a throwaway role with a wrong
/// password, is let in, and says so — `serve` logs it at start and the
/// overview shows NOT ENFORCED with the reason, not "VALID UNTIL". On a
/// server that asks for scram-sha-256 the overview shows VALID UNTIL and
/// nothing is logged. Either way the probe role does not outlive the probe,
/// and a later refresh reuses the verdict instead of probing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_overview_shows_a_trust_database_as_not_enforced() {
    for trust in [true, false] {
        let hba = trust.then(|| vec!["host all all 127.0.0.1/32 trust".to_string()]);
        let pg = ThrowawayPostgres::start(PostgresOptions {
            hba,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL: {e}"));
        let mut b = TestBroker::prepare_on(&pg, &role("ro", "{db}", "5m", "10m", APP)).await;
        let port = b.enable_console().await;
        b.spawn_binary().await;
        wait_port(port).await;
        let (status, page) = https_get(&b, port, Some("admin"), "/").await.unwrap();
        assert_eq!(status, 200, "{page}");
        assert!(page.contains("data-database=\"main\""), "{page}");
        let log = b.broker_log();
        if trust {
            assert!(page.contains("NOT ENFORCED"), "{page}");
            assert!(
                page.contains("NO DATABASE-SIDE EXPIRY")
                    && page.contains("pg_hba.conf trust for this address"),
                "{page}"
            );
            assert!(!page.contains("VALID UNTIL on every leased role"), "{page}");
            assert!(
                log.contains("NO DATABASE-SIDE EXPIRY") && log.contains("pg_hba.conf trust"),
                "serve did not log the warning at start: {log}"
            );
        } else {
            assert!(page.contains("VALID UNTIL on every leased role"), "{page}");
            assert!(!page.contains("NOT ENFORCED"), "{page}");
            assert!(!log.contains("NO DATABASE-SIDE EXPIRY"), "{log}");
        }
        // The verdict is cached: a refresh after the console's own 5 s
        // cache asks preflight again, which creates no second probe role.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let (status, again) = https_get(&b, port, Some("admin"), "/").await.unwrap();
        assert_eq!(status, 200, "{again}");
        assert_eq!(
            page.contains("NOT ENFORCED"),
            again.contains("NOT ENFORCED")
        );
        let created = pg
            .read_log()
            .unwrap()
            .matches("CREATE ROLE \"credbroker_check_")
            .count();
        assert_eq!(created, 1, "one probe role per 10 minutes, not per refresh");
        assert_eq!(
            probe_roles_left(&pg, &b.db).await,
            0,
            "a probe role was left behind (trust: {trust})"
        );
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_static_role_rotate_now_rotates_a_real_postgres_user() {
    require_browser();
    let (mut b, users) = crate::static_roles::pg_static(2, "1h", "").await;
    let port = b.enable_console().await;
    b.start_in_process().await;
    let first = read(&b).await;
    assert_eq!(
        (first.username.as_str(), first.generation),
        (users[0].as_str(), 1)
    );
    login(&b.db, &first.username, &first.password)
        .await
        .expect("the static role's first credential logs in");

    let data = serde_json::json!({
        "staticRole": "st",
        "database": "main",
        "users": users,
        "generation": first.generation,
        // Only to check that no page shows it.
        "password": first.password,
    });
    browse(&b, port, "static", data).await;

    // The page's "Rotate now" (confirmed in the dialog) moved the role on
    // once — the no-script confirmation it then cancelled did nothing.
    let second = read(&b).await;
    assert_eq!(
        (second.username.as_str(), second.generation),
        (users[1].as_str(), 2)
    );
    let session = login(&b.db, &second.username, &second.password)
        .await
        .expect("the credential the page rotated to logs in");
    session
        .simple_query("SELECT count(*) FROM orders")
        .await
        .unwrap();
    // Alternating users: the previous password works for the overlap.
    assert!(login(&b.db, &first.username, &first.password).await.is_ok());
    let records = b.audit_records();
    let by_admin: Vec<_> = records
        .iter()
        .filter(|r| r.action == "static_rotate" && r.identity == ADMIN)
        .collect();
    assert_eq!(by_admin.len(), 1, "{by_admin:?}");
    assert_eq!(by_admin[0].role.as_deref(), Some("st"));
    assert_eq!(by_admin[0].username.as_deref(), Some(users[1].as_str()));
    let log = std::fs::read_to_string(&b.env.audit_path).unwrap();
    assert!(!log.contains(&first.password) && !log.contains(&second.password));
    b.stop().await;
}

async fn read(b: &TestBroker) -> credbroker::pb::StaticCredential {
    b.client("app")
        .await
        .get_static_credential(credbroker::pb::GetStaticCredentialRequest {
            static_role: "st".into(),
        })
        .await
        .expect("the app reads static role st")
        .into_inner()
}

/// The Access page (issue 31): a request made over gRPC shows as pending;
/// a forged CSRF token is refused and changes nothing; the admin — also
/// the policy's one approver here — approves in the browser and the
/// request is a grant, audited as the console's step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_access_page_approves_a_request_made_over_grpc() {
    require_browser();
    const ALICE: &str = "spiffe://credbroker.dev/user/alice";
    let mut b = TestBroker::prepare(&role("ro", "{db}", "5m", "1h", APP)).await;
    b.edit_config(|t| {
        format!(
            "{t}\n[access.incident]\nroles = [\"ro\"]\n\
             requesters = [\"spiffe://credbroker.dev/user/*\"]\n\
             approvers = [\"{ADMIN}\"]\napprovals = 1\nmax_duration = \"4h\"\n\
             pending_for = \"30m\"\n"
        )
    });
    write_client(
        &b,
        "alice",
        &credbroker_testkit::pki::ClientSpec::spiffe(ALICE),
    );
    let port = b.enable_console().await;
    b.start_in_process().await;
    let mut alice = b.env.client(&b.addr, "alice").access().unwrap();
    let r = alice
        .request(credbroker::pb::AccessRequestRequest {
            roles: vec!["ro".into()],
            reason: "INC-88: orders stuck".into(),
            duration_seconds: 3600,
            policy: "incident".into(),
            break_glass: false,
        })
        .await
        .expect("alice asks over gRPC")
        .into_inner();
    assert_eq!(r.state, "pending");
    browse(
        &b,
        port,
        "access",
        serde_json::json!({ "request": r.request_id, "requester": ALICE }),
    )
    .await;
    let now = alice
        .get(credbroker::pb::AccessRequestId {
            request_id: r.request_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.state, "granted", "{now:?}");
    let records = b.audit_records();
    let of = |action: &str, outcome: credbroker::audit::Outcome| {
        records
            .iter()
            .filter(|x| {
                x.action == action
                    && x.identity == ADMIN
                    && x.outcome == outcome
                    && x.via.as_deref() == Some("console")
            })
            .count()
    };
    use credbroker::audit::Outcome;
    assert_eq!(of("access_approve", Outcome::Ok), 1, "{records:?}");
    assert_eq!(of("access_grant", Outcome::Ok), 1);
    assert_eq!(of("console", Outcome::Denied), 1, "the forged token");
    // The grant is real: alice leases the role under it.
    let lease = issue(&b, "alice", "ro", 0)
        .await
        .expect("alice leases under the grant approved in the browser");
    assert!(login(&b.db, &lease.username, &lease.password).await.is_ok());
    b.stop().await;
}
