//! The lease path on PostgreSQL: issue, use, expire, revoke, renew.

use std::time::Duration;

use chrono::Utc;
use credbroker::pb;
use tonic::Code;

use crate::support::*;

const OTHER: &str = "spiffe://credbroker.dev/ns/demo/other";

fn roles() -> String {
    role("ro", "{db}", "1m", "10m", APP) + &demo_role("short", "2s", "8s")
}

/// Every password a test saw must be absent from PostgreSQL's statement log
/// (log_statement=all): the broker sends verifiers, never plaintext.
fn assert_not_in_server_log(passwords: &[String]) {
    let log = cluster().read_log().unwrap();
    assert!(
        log.contains("CREATE ROLE"),
        "the server log should hold statements (log_statement=all)"
    );
    for p in passwords {
        assert!(!p.is_empty());
        assert!(
            !log.contains(p.as_str()),
            "an issued password appears in PostgreSQL's log"
        );
    }
}

#[tokio::test]
async fn issued_credential_logs_in_and_has_exactly_its_grants() {
    let mut b = TestBroker::start(&roles()).await;
    let lease = issue(&b, "app", "ro", 0).await.unwrap();
    assert_eq!(lease.role, "ro");
    assert!(lease.dsn.starts_with("postgresql://"));
    assert_eq!(lease.database_name, b.db);
    assert!(lease.renewable);
    let default_ttl = ts(&lease.expires_at) - ts(&lease.issued_at);
    assert_eq!(default_ttl.num_seconds(), 60);
    assert_eq!(
        (ts(&lease.max_expires_at) - ts(&lease.issued_at)).num_seconds(),
        600
    );

    let c = login(&b.db, &lease.username, &lease.password)
        .await
        .expect("leased login");
    let who: String = one_value(&c, "SELECT current_user::text", &[]).await;
    assert_eq!(who, lease.username);
    let n: i64 = one_value(&c, "SELECT count(*) FROM orders", &[]).await;
    assert_eq!(n, 1);
    let err = c.query("SELECT * FROM payroll", &[]).await.unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("permission denied"),
        "{err}"
    );
    let err = c
        .batch_execute("INSERT INTO orders VALUES (2, 'x')")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("permission denied"),
        "{err}"
    );

    // The dsn itself works as given.
    let (dsn_client, conn) = tokio_postgres::connect(&lease.dsn, tokio_postgres::NoTls)
        .await
        .expect("dsn login");
    tokio::spawn(conn);
    dsn_client.query_one("SELECT 1", &[]).await.unwrap();

    // A wrong password is refused: the server really checks.
    assert!(login(&b.db, &lease.username, "wrong-password")
        .await
        .is_err());

    let issue_record = b
        .audit_records()
        .into_iter()
        .find(|r| r.action == "issue")
        .unwrap();
    assert_eq!(issue_record.identity, APP);
    assert_eq!(
        issue_record.lease_id.as_deref(),
        Some(lease.lease_id.as_str())
    );
    assert_not_in_server_log(std::slice::from_ref(&lease.password));
    let audit_text = std::fs::read_to_string(&b.env.audit_path).unwrap();
    assert!(
        !audit_text.contains(&lease.password),
        "password in the audit log"
    );
    b.stop().await;
}

#[tokio::test]
async fn expired_lease_is_refused_by_the_database_and_reaped() {
    let mut b = TestBroker::start(&roles()).await;
    let lease = issue(&b, "app", "short", 2).await.unwrap();
    login(&b.db, &lease.username, &lease.password)
        .await
        .expect("fresh lease logs in");

    // VALID UNTIL is stored as the exact UTC expiry despite the server's
    // UTC+14 time zone.
    let su = b.superuser().await;
    let valid: chrono::DateTime<Utc> = one_value(
        &su,
        "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1",
        &[&lease.username],
    )
    .await;
    assert_eq!(valid, ts(&lease.expires_at));
    let tz: String = one_value(&su, "SHOW timezone", &[]).await;
    assert_eq!(tz, FAR_TIMEZONE);

    assert!(
        eventually(Duration::from_secs(10), || async {
            !b.role_exists(&lease.username).await
        })
        .await,
        "reaper did not drop the expired role"
    );
    let refused = login(&b.db, &lease.username, &lease.password).await;
    assert!(refused.is_err());
    // The record follows the drop (revoked only after it succeeded).
    let reaped = eventually(Duration::from_secs(5), || async {
        b.audit_records().into_iter().any(|r| {
            r.action == "reap"
                && r.lease_id.as_deref() == Some(&lease.lease_id)
                && r.identity == "credbroker:reaper"
        })
    })
    .await;
    assert!(reaped, "no audit record of the reaper's revocation");
    let dropped_after = Utc::now() - ts(&lease.expires_at);
    assert!(
        dropped_after < chrono::Duration::seconds(9),
        "dropped {dropped_after} after expiry"
    );
    assert_not_in_server_log(std::slice::from_ref(&lease.password));
    b.stop().await;
}

#[tokio::test]
async fn database_refuses_an_expired_credential_even_with_the_broker_stopped() {
    let mut b = TestBroker::start(&roles()).await;
    let lease = issue(&b, "app", "short", 2).await.unwrap();
    b.stop().await;
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(2300)).await;
    assert!(
        b.role_exists(&lease.username).await,
        "role should still exist: the broker is stopped"
    );
    let err = login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
    // Started again, the broker reaps what fell due while it was down.
    b.start_in_process().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            !b.role_exists(&lease.username).await
        })
        .await
    );
    b.stop().await;
}

#[tokio::test]
async fn revoke_ends_login_and_drops_role_and_refuses_unknown_or_foreign_leases() {
    let mut b = TestBroker::start(&roles()).await;
    let mine = issue(&b, "app", "short", 5).await.unwrap();
    let theirs = issue(&b, "other", "short", 5).await.unwrap();
    let open = login(&b.db, &mine.username, &mine.password).await.unwrap();

    // Someone else's lease: refused, nothing dropped.
    let err = b.revoke_as("app", &theirs.lease_id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(b.role_exists(&theirs.username).await);
    // Unknown and malformed ids.
    let unknown = "l_aaaaaaaaaaaaaaaaaaaaaaaaaa".to_string();
    let err = b.revoke_as("app", &unknown).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = b.revoke_as("app", "'; DROP ROLE x; --").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let r = b.revoke_as("app", &mine.lease_id).await.unwrap();
    assert_eq!(r.state, pb::LeaseState::Revoked as i32);
    assert!(
        !b.role_exists(&mine.username).await,
        "role still exists after revoke returned"
    );
    assert!(
        open.query_one("SELECT 1", &[]).await.is_err(),
        "open session survived revocation"
    );
    assert!(login(&b.db, &mine.username, &mine.password).await.is_err());
    assert!(
        b.role_exists(&theirs.username).await,
        "another identity's role was touched"
    );
    let looked = lookup(&b, "app", &mine.lease_id).await.unwrap();
    assert_eq!(looked.state, pb::LeaseState::Revoked as i32);
    assert!(looked.password.is_empty());
    assert_not_in_server_log(&[mine.password, theirs.password]);
    b.stop().await;
}

#[tokio::test]
async fn renew_moves_valid_until_but_never_past_the_hard_limit() {
    let mut b = TestBroker::start(&roles()).await;
    let lease = issue(&b, "app", "short", 2).await.unwrap();
    let su = b.superuser().await;
    let valid_until = |name: String| {
        let su = &su;
        async move {
            su.query_one(
                "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get::<_, chrono::DateTime<Utc>>(0)
        }
    };
    let before = valid_until(lease.username.clone()).await;
    let renewed = renew(&b, "app", &lease.lease_id, 5).await.unwrap();
    let after = valid_until(lease.username.clone()).await;
    assert!(after > before, "VALID UNTIL did not move");
    assert_eq!(after, ts(&renewed.expires_at));
    assert!(
        renewed.password.is_empty(),
        "renew must not resend the password"
    );

    // Beyond max_ttl (8s) a renewal is capped, as Vault (and our Vault API)
    // does — `lease renew` says so — and never past the hard limit.
    let capped = renew(&b, "app", &lease.lease_id, 9)
        .await
        .expect("a renewal over max_ttl is capped, not refused");
    assert!(ts(&capped.expires_at) > ts(&renewed.expires_at));
    assert!(ts(&capped.expires_at) <= ts(&lease.max_expires_at));
    assert_eq!(
        valid_until(lease.username.clone()).await,
        ts(&capped.expires_at)
    );
    // Renewals stop at the hard limit.
    let mut last = capped;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        match renew(&b, "app", &lease.lease_id, 8).await {
            Ok(r) => last = r,
            Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}"),
        }
        assert!(ts(&last.expires_at) <= ts(&lease.max_expires_at));
        assert!(valid_until(lease.username.clone()).await <= ts(&lease.max_expires_at));
    }
    assert_eq!(
        ts(&last.expires_at),
        ts(&lease.max_expires_at),
        "should reach exactly the hard limit"
    );
    let err = renew(&b, "app", &lease.lease_id, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("hard limit"), "{}", err.message());

    // An expired lease cannot be renewed.
    let short = issue(&b, "app", "short", 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = renew(&b, "app", &short.lease_id, 2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    b.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_leave_no_role() {
    let mut b = TestBroker::start(&roles()).await;
    let su = b.superuser().await;
    let before = b.broker_role_count().await;
    let cases: Vec<(String, i64, Code)> = vec![
        ("nope".into(), 0, Code::NotFound),
        ("".into(), 0, Code::InvalidArgument),
        ("ro".into(), -5, Code::InvalidArgument),
        ("ro".into(), 601, Code::InvalidArgument),
        ("ro".into(), i64::MAX, Code::InvalidArgument),
        ("x".repeat(10_000), 0, Code::InvalidArgument),
        ("ro'; DROP TABLE orders; --".into(), 0, Code::NotFound),
        ("rö\u{0}".into(), 0, Code::NotFound),
    ];
    for (role, ttl, want) in cases {
        let err = issue(&b, "app", &role, ttl).await.unwrap_err();
        assert_eq!(
            err.code(),
            want,
            "role {:?} ttl {ttl}: {err:?}",
            &role[..role.len().min(20)]
        );
        assert!(!err.message().is_empty());
    }
    // Not allowed for this identity.
    let err = issue(&b, "other", "ro", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let denied = b.audit_records().into_iter().any(|r| {
        r.identity == OTHER
            && r.action == "issue"
            && r.outcome == credbroker::audit::Outcome::Denied
    });
    assert!(denied, "denial not audited");
    let mut app = b.client("app").await;
    for bad in ["", "l_short", &"l_".repeat(100)] {
        let err = app
            .lookup_lease(pb::LookupLeaseRequest {
                lease_id: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    assert_eq!(
        b.broker_role_count().await,
        before,
        "a rejected request left a role behind"
    );
    let n: i64 = one_value(&su, "SELECT count(*) FROM orders", &[]).await;
    assert_eq!(n, 1);
    b.stop().await;
}

#[tokio::test]
async fn leases_survive_a_sigkilled_broker_and_still_expire() {
    let mut b = TestBroker::prepare(&roles()).await;
    b.spawn_binary().await;
    let keep = issue(&b, "app", "ro", 600).await.unwrap();
    let short = issue(&b, "app", "short", 3).await.unwrap();
    b.kill_binary();
    b.spawn_binary().await;
    let looked = lookup(&b, "app", &keep.lease_id).await.unwrap();
    assert_eq!(looked.state, pb::LeaseState::Active as i32);
    let ids: Vec<_> = b
        .admin_leases()
        .await
        .iter()
        .map(|l| l.lease_id.clone())
        .collect();
    assert!(
        ids.contains(&keep.lease_id) && ids.contains(&short.lease_id),
        "{ids:?}"
    );
    assert!(
        eventually(Duration::from_secs(12), || async {
            !b.role_exists(&short.username).await
        })
        .await,
        "lease issued before the crash was not reaped after restart"
    );
    assert!(b.role_exists(&keep.username).await);
    login(&b.db, &keep.username, &keep.password)
        .await
        .expect("long lease still works after restart");
    b.kill_binary();
    assert_not_in_server_log(&[keep.password, short.password]);
}
