//! The DBA's console: admin-only API, bulk revocation that ends live
//! sessions, tamper-evident audit, metrics, root rotation.

use std::process::Command;
use std::time::{Duration, Instant};

use credbroker::audit::Outcome;
use credbroker::pb;
use credbroker::pb::revoke_leases_request::Selector;
use tonic::Code;

use crate::support::*;

const OTHER: &str = "spiffe://credbroker.dev/ns/demo/other";

/// Roles on two PostgreSQL databases of the shared cluster — `main` (the
/// test's fresh database) and `second` (another fresh one) — and on the
/// shared throwaway MariaDB (`maria`, a fresh schema). Returns the schema too.
async fn three_database_broker() -> (TestBroker, String) {
    let mut roles = demo_role("ro", "5m", "10m");
    roles += &role(
        "ro2",
        "second",
        "5m",
        "10m",
        "spiffe://credbroker.dev/ns/demo/*",
    );
    let b = TestBroker::prepare(&roles).await;
    let second = fresh_database_on(cluster()).await;
    let section = b.env.pg_database("second", cluster(), &second).unwrap();

    let schema = b
        .add_mariadb("adm", "ro3", "spiffe://credbroker.dev/ns/demo/*")
        .await;
    b.edit_config(|t| t + &section);
    (b, schema)
}

#[tokio::test]
async fn non_admins_are_denied_every_admin_method_and_it_is_audited() {
    let mut b = TestBroker::start(&role("ro", "{db}", "5m", "10m", APP)).await;
    let lease = issue(&b, "app", "ro", 0).await.unwrap();
    let mut app = b.admin("app").await;
    let denied = [
        app.list_leases(pb::ListLeasesRequest::default())
            .await
            .map(|_| ()),
        app.revoke_leases(pb::RevokeLeasesRequest {
            selector: Some(Selector::All(true)),
            force: false,
        })
        .await
        .map(|_| ()),
        app.rotate_root(pb::RotateRootRequest {
            database: "main".into(),
        })
        .await
        .map(|_| ()),
    ];
    for (i, r) in denied.into_iter().enumerate() {
        assert_eq!(r.unwrap_err().code(), Code::PermissionDenied, "method {i}");
    }
    // Nothing happened: the lease still logs in.
    assert!(b.role_exists(&lease.username).await);
    let denials = b
        .audit_records()
        .into_iter()
        .filter(|r| r.identity == APP && matches!(r.outcome, Outcome::Denied))
        .count();
    assert_eq!(denials, 3, "each denied admin call is audited");
    b.stop().await;
}

#[tokio::test]
async fn revoke_by_identity_ends_live_sessions_on_three_databases_and_spares_others() {
    use mysql_async::prelude::Queryable;
    let (mut b, schema) = three_database_broker().await;
    b.start_in_process().await;
    let second_db = {
        let t = std::fs::read_to_string(&b.env.config_path).unwrap();
        let at = t.find("[databases.second]").unwrap();
        let url = t[at..]
            .lines()
            .find(|l| l.starts_with("admin_url"))
            .unwrap();
        url.rsplit('/')
            .next()
            .unwrap()
            .trim_end_matches('"')
            .to_string()
    };
    let a1 = issue(&b, "app", "ro", 0).await.unwrap();
    let a2 = issue(&b, "app", "ro", 0).await.unwrap();
    let a3 = issue(&b, "app", "ro2", 0).await.unwrap();
    let a4 = issue(&b, "app", "ro3", 0).await.unwrap();
    let o1 = issue(&b, "other", "ro", 0).await.unwrap();
    let open = login(&second_db, &a3.username, &a3.password)
        .await
        .expect("issued credential logs in to the second database");
    open.simple_query("SELECT 1").await.unwrap();
    let mut open_maria = mysql_async::Conn::new(maria_opts(
        Some((&a4.username, &a4.password)),
        Some(&schema),
    ))
    .await
    .expect("issued credential logs in to MariaDB");
    open_maria.query_drop("SELECT 1").await.unwrap();

    let mut admin = b.admin("admin").await;
    let listed = admin
        .list_leases(pb::ListLeasesRequest {
            identity: APP.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(listed.len(), 4);

    let t0 = Instant::now();
    let out = admin
        .revoke_leases(pb::RevokeLeasesRequest {
            selector: Some(Selector::Identity(APP.into())),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.revoked, 4, "{out:?}");
    assert!(out.failures.is_empty(), "{out:?}");
    let err = open
        .simple_query("SELECT 1")
        .await
        .expect_err("an open session of a revoked lease must be cut");
    let maria_err = open_maria
        .query_drop("SELECT 1")
        .await
        .expect_err("an open MariaDB session of a revoked lease must be cut");
    let cut = t0.elapsed();
    assert!(cut < Duration::from_secs(1), "sessions cut after {cut:?}");
    println!(
        "revoke by identity: 4 leases on 3 databases (PostgreSQL x2, MariaDB), \
         open sessions cut {cut:?} after the call ({err}; {maria_err})"
    );
    assert!(
        mysql_async::Conn::new(maria_opts(
            Some((&a4.username, &a4.password)),
            Some(&schema)
        ))
        .await
        .is_err(),
        "a revoked MariaDB login must be refused"
    );

    for l in [&a1, &a2] {
        assert!(!b.role_exists(&l.username).await);
        assert!(login(&b.db, &l.username, &l.password).await.is_err());
    }
    assert!(login(&second_db, &a3.username, &a3.password).await.is_err());
    assert!(
        login(&b.db, &o1.username, &o1.password).await.is_ok(),
        "another identity's lease is untouched"
    );
    let left = b.admin_leases().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].identity, OTHER);
    b.stop().await;
    maria_root()
        .await
        .query_drop(format!("DROP DATABASE `{schema}`"))
        .await
        .unwrap();
}

#[tokio::test]
async fn admin_cli_lists_as_table_and_json_and_confirms_bulk_revokes() {
    let mut b = TestBroker::start(&demo_role("ro", "5m", "10m")).await;
    let a = issue(&b, "app", "ro", 0).await.unwrap();
    issue(&b, "other", "ro", 0).await.unwrap();

    let table = cli(&b, "admin", &["admin", "leases"]).await;
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8(table.stdout).unwrap();
    for col in [
        "IDENTITY", "ROLE", "DATABASE", "USERNAME", "ISSUED", "EXPIRES", "STATE",
    ] {
        assert!(text.contains(col), "table header lacks {col}:\n{text}");
    }
    assert!(text.contains(&a.username), "{text}");
    println!("admin leases:\n{text}");

    let json = cli(
        &b,
        "admin",
        &["admin", "leases", "--identity", APP, "--format", "json"],
    )
    .await;
    assert!(json.status.success(), "{json:?}");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let rows = v.as_array().expect("a JSON array");
    assert_eq!(rows.len(), 1);
    for key in [
        "lease_id",
        "identity",
        "role",
        "database",
        "username",
        "state",
        "issued_at",
        "expires_at",
    ] {
        assert!(rows[0].get(key).is_some(), "json lacks {key}: {v}");
    }
    assert!(!String::from_utf8_lossy(&json.stdout).contains(&a.password));

    // A bulk revoke without --yes and without a terminal refuses to act.
    let refused = cli(&b, "admin", &["admin", "revoke", "--role", "ro"]).await;
    assert!(!refused.status.success());
    assert_eq!(
        b.broker_role_count().await,
        2,
        "nothing revoked unconfirmed"
    );
    let done = cli(&b, "admin", &["admin", "revoke", "--role", "ro", "--yes"]).await;
    assert!(done.status.success(), "{done:?}");
    let said = String::from_utf8(done.stdout).unwrap();
    assert!(said.contains('2'), "prints what it did: {said}");
    assert_eq!(b.broker_role_count().await, 0);
    b.stop().await;
}

#[tokio::test]
async fn audit_verify_finds_a_flipped_byte_a_deleted_line_and_a_swap() {
    let mut b = TestBroker::start(&role("ro", "{db}", "5m", "10m", APP)).await;
    for _ in 0..3 {
        let l = issue(&b, "app", "ro", 0).await.unwrap();
        b.client("app")
            .await
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: l.lease_id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    b.stop().await;
    let original = std::fs::read_to_string(&b.env.audit_path).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert!(lines.len() >= 6);
    let verify = |text: &str| {
        let path = b.env.dir.join("tampered.log");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["audit", "verify"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, said) = verify(&original);
    assert!(ok, "an untouched log verifies: {said}");

    let mut flipped = original.clone().into_bytes();
    let at = original.find("\"action\":\"revoke\"").unwrap() + 11;
    flipped[at] ^= 0x01;
    let (ok, said) = verify(&String::from_utf8_lossy(&flipped));
    assert!(!ok, "flipped byte not found: {said}");

    let deleted: String = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let (ok, said) = verify(&deleted);
    assert!(!ok && said.contains("line 4"), "deleted line: {said}");

    let mut swapped = lines.clone();
    swapped.swap(2, 3);
    let (ok, said) = verify(&(swapped.join("\n") + "\n"));
    assert!(!ok && said.contains("line 3"), "swapped lines: {said}");
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_requests() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "5m", "10m", APP)).await;
    let mport = b.listen_metrics();
    b.spawn_binary().await;
    let scrape = || async move {
        let body = http_get(mport, "/metrics").await;
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
        (body, parsed)
    };
    let value = |s: &prometheus_parse::Scrape, name: &str| -> f64 {
        s.samples
            .iter()
            .filter(|x| x.metric == name)
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let (_, before) = scrape().await;
    let l = issue(&b, "app", "ro", 0).await.unwrap();
    issue(&b, "other", "ro", 0).await.unwrap_err();
    let (_, live) = scrape().await;
    assert_eq!(
        value(&live, "credbroker_leases_issued_total")
            - value(&before, "credbroker_leases_issued_total"),
        1.0
    );
    assert_eq!(value(&live, "credbroker_leases_live"), 1.0);
    assert!(value(&live, "credbroker_requests_failed_total") >= 1.0);
    b.client("app")
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: l.lease_id,
            ..Default::default()
        })
        .await
        .unwrap();
    let (body, after) = scrape().await;
    assert_eq!(value(&after, "credbroker_leases_revoked_total"), 1.0);
    assert_eq!(value(&after, "credbroker_leases_live"), 0.0);
    for family in [
        "credbroker_issue_duration_seconds_count",
        "credbroker_reaper_lag_seconds",
        "credbroker_reaper_backlog",
        "credbroker_backend_pool_max",
        "credbroker_revocation_failures",
    ] {
        assert!(
            body.contains(family),
            "metrics page lacks {family}:\n{body}"
        );
    }
    assert!(!body.contains(&l.password));
    println!(
        "metrics sample:\n{}",
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        http_get(mport, "/healthz")
            .await
            .lines()
            .last()
            .unwrap_or(""),
        "ok"
    );
    b.kill_binary();
}

/// A broker (prepared, not started) whose main database's admin is a
/// role of its own, `SUPERUSER` with `password` in the admin password file,
/// so rotating it does not touch the shared cluster's superuser: the
/// broker, the role and the password file.
async fn own_admin_broker(password: &str) -> (TestBroker, String, std::path::PathBuf) {
    let b = TestBroker::prepare(&role("ro", "{db}", "5m", "10m", APP)).await;
    let admin_role = unique("adm");
    b.superuser()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {admin_role} SUPERUSER LOGIN PASSWORD '{password}'"
        ))
        .await
        .unwrap();
    let secret = b.env.dir.join("secrets").join("main-admin");
    credbroker::fsutil::write_secret_file(&secret, password.as_bytes()).unwrap();
    let su = cluster().superuser().to_string();
    b.edit_config(|t| t.replace(&format!("://{su}@"), &format!("://{admin_role}@")));
    (b, admin_role, secret)
}

#[tokio::test]
async fn rotate_root_locks_out_the_old_password_and_issuing_goes_on() {
    let old_password = "old-admin-password";
    let (mut b, admin_role, secret) = own_admin_broker(old_password).await;
    b.start_in_process().await;
    issue(&b, "app", "ro", 0)
        .await
        .expect("issues before rotation");

    b.admin("admin")
        .await
        .rotate_root(pb::RotateRootRequest {
            database: "main".into(),
        })
        .await
        .unwrap();
    assert!(
        login(&b.db, &admin_role, old_password).await.is_err(),
        "the old admin password still logs in"
    );
    let new_password = std::fs::read_to_string(&secret).unwrap();
    assert_ne!(new_password.trim(), old_password);
    assert!(new_password.trim().len() >= 24);
    assert!(login(&b.db, &admin_role, new_password.trim()).await.is_ok());
    let l = issue(&b, "app", "ro", 0)
        .await
        .expect("issues after rotation");
    assert!(login(&b.db, &l.username, &l.password).await.is_ok());
    let audit = std::fs::read_to_string(&b.env.audit_path).unwrap();
    assert!(audit.contains("rotate_root"));
    assert!(!audit.contains(new_password.trim()));
    b.stop().await;
    b.superuser()
        .await
        .batch_execute(&format!("DROP ROLE IF EXISTS {admin_role}"))
        .await
        .unwrap();
}

/// Without per-database serialization, two rotations interleave: the file
/// keeps one new password while the database took the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotate_root_calls_leave_file_and_database_agreeing() {
    let (mut b, admin_role, secret) = own_admin_broker("first-admin-password").await;
    b.start_in_process().await;
    let admin = b.admin("admin").await;
    let started = Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let mut admin = admin.clone();
            tokio::spawn(async move {
                admin
                    .rotate_root(pb::RotateRootRequest {
                        database: "main".into(),
                    })
                    .await
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap().expect("every rotation returns ok");
    }
    eprintln!(
        "5 concurrent rotate-root calls took {:?}",
        started.elapsed()
    );
    let kept = std::fs::read_to_string(&secret).unwrap();
    assert!(
        login(&b.db, &admin_role, kept.trim()).await.is_ok(),
        "the password file does not log in as the admin role"
    );
    assert!(login(&b.db, &admin_role, "first-admin-password")
        .await
        .is_err());
    assert!(
        !secret.with_extension("next").exists(),
        "a staged password was left behind"
    );
    let rotations = b
        .audit_records()
        .into_iter()
        .filter(|r| r.action == "rotate_root" && r.outcome == Outcome::Ok)
        .count();
    assert_eq!(rotations, 5, "each call rotated once, one after another");
    // The broker's own pool follows: new connections use the kept password.
    for _ in 0..3 {
        let l = issue(&b, "app", "ro", 0)
            .await
            .expect("issues after the rotations");
        assert!(login(&b.db, &l.username, &l.password).await.is_ok());
    }
    b.stop().await;
    // Restart: start-up reads the file and must still get in.
    b.start_in_process().await;
    issue(&b, "app", "ro", 0)
        .await
        .expect("issues after a restart with the kept password");
    b.stop().await;
    b.superuser()
        .await
        .batch_execute(&format!(
            "DROP OWNED BY {admin_role}; DROP ROLE IF EXISTS {admin_role}"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn main_port_answers_grpc_health_and_lists_its_services_by_reflection() {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut b = TestBroker::start(&role("ro", "{db}", "5m", "10m", APP)).await;
    let channel = b.env.client(&b.addr, "app").channel().unwrap();

    let health = HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "credbroker.v1.Broker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "credbroker.v1.Broker",
        "credbroker.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not listed: {names:?}"
        );
    }
    b.stop().await;
}

#[tokio::test]
async fn an_interrupted_rotate_root_is_resolved_at_the_next_start() {
    let (mut b, admin_role, secret) = own_admin_broker("kept-password").await;
    let staged = b.env.dir.join("secrets").join("main-admin.next");

    // A rotation that staged its password and died before telling the
    // database: the staged one is discarded.
    credbroker::fsutil::write_secret_file(&staged, b"never-applied").unwrap();
    b.start_in_process().await;
    issue(&b, "app", "ro", 0)
        .await
        .expect("issues with the kept password");
    assert!(!staged.exists());
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "kept-password");
    b.stop().await;

    // A rotation that told the database and died before keeping it: the
    // staged one becomes the kept one.
    credbroker::fsutil::write_secret_file(&staged, b"applied-then-crashed").unwrap();
    b.superuser()
        .await
        .batch_execute(&format!(
            "ALTER ROLE {admin_role} PASSWORD 'applied-then-crashed'"
        ))
        .await
        .unwrap();
    b.start_in_process().await;
    issue(&b, "app", "ro", 0)
        .await
        .expect("issues with the staged password");
    assert!(!staged.exists());
    assert_eq!(
        std::fs::read_to_string(&secret).unwrap(),
        "applied-then-crashed"
    );
    b.stop().await;
    b.superuser()
        .await
        .batch_execute(&format!(
            "DROP OWNED BY {admin_role}; DROP ROLE IF EXISTS {admin_role}"
        ))
        .await
        .unwrap();
}
