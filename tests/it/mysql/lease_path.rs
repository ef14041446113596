//! The lease path on MySQL/MariaDB: issue, login, grants and host
//! pinning; expiry, renew and the failsafe event; revoke cutting live
//! sessions; an outage and rotate-root; the orphan sweep; a broker without
//! the failsafe's privileges.

use std::time::{Duration, Instant};

use credbroker::pb;
use credbroker::pb::revoke_leases_request::Selector;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::*;
use crate::support::{admin_revoke_by, eventually};

/// Point 1: issue → login works, grants hold, other tables are refused, a
/// host-pinned role cannot log in from elsewhere; the password reaches the
/// server only as a hash; start-up warns when the failsafe cannot run.
#[tokio::test]
async fn mysql_issue_login_grants_and_host_pinning() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| {
        role("reader", s, "5m", "1h", None)
            + &role("pinned", s, "5m", "1h", Some("10.255.255.%"))
            + &role("loopback", s, "5m", "1h", Some("127.0.0.1"))
    })
    .await;
    let warnings = b.start_in_process().await;
    let mut root = t.root().await;
    let scheduler: Option<String> = root
        .query_first("SELECT @@global.event_scheduler")
        .await
        .unwrap();
    if scheduler.as_deref() != Some("ON") {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("NO DATABASE-SIDE EXPIRY") && w.contains("event_scheduler")),
            "scheduler {scheduler:?} but no loud warning: {warnings:?}"
        );
    }

    let lease = b.issue("reader", 120).await.unwrap();
    assert_eq!(lease.kind, "mysql");
    assert!(lease.username.starts_with(&b.prefix) && lease.username.len() <= 32);
    assert!(lease
        .dsn
        .starts_with(&format!("mysql://{}:", lease.username)));
    assert_eq!(t.user_hosts(&lease.username).await, vec!["%".to_string()]);
    let (plugin, stored): (String, String) = root
        .exec_first(
            "SELECT plugin, authentication_string FROM mysql.user WHERE User = ?",
            (&lease.username,),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(plugin, "mysql_native_password");
    assert!(stored.starts_with('*') && !stored.contains(&lease.password));
    assert!(
        t.failsafe_at(&lease.username).await.is_some(),
        "no failsafe event for {}",
        lease.username
    );

    let mut conn = b.login(&lease).await.expect("leased login");
    let item: Option<String> = conn
        .query_first("SELECT item FROM orders WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(item.as_deref(), Some("coffee"));
    let e = conn.query_drop("SELECT * FROM payroll").await.unwrap_err();
    assert_eq!(server_code(&e), Some(1142), "{e}");
    let e = conn
        .query_drop("INSERT INTO orders VALUES (2, 'tea')")
        .await
        .unwrap_err();
    assert_eq!(server_code(&e), Some(1142), "{e}");
    let e = conn.query_drop("CREATE USER 'evil'@'%'").await.unwrap_err();
    assert!(server_code(&e).is_some(), "{e}");
    drop(conn);

    let pinned = b.issue("pinned", 120).await.unwrap();
    assert_eq!(
        t.user_hosts(&pinned.username).await,
        vec!["10.255.255.%".to_string()]
    );
    let refused = b.login(&pinned).await.map(|_| ()).unwrap_err();
    assert!(access_denied(&refused), "{refused}");

    let loopback = b.issue("loopback", 120).await.unwrap();
    b.login(&loopback)
        .await
        .expect("pinned to 127.0.0.1 logs in from it");

    for l in [&lease, &pinned, &loopback] {
        b.revoke(l).await;
        assert!(t.user_hosts(&l.username).await.is_empty());
        assert!(t.failsafe_at(&l.username).await.is_none());
    }
    b.finish().await;
}

/// Point 2a: the reaper drops an expired user; renew moves the failsafe.
#[tokio::test]
async fn mysql_expiry_reaper_drops_user_and_renew_moves_failsafe() {
    let t = local().await;
    let b = MyBroker::start(&t, |s| role("reader", s, "2s", "10m", None)).await;

    let kept = b.issue("reader", 5).await.unwrap();
    let before = t.failsafe_at(&kept.username).await.expect("failsafe event");
    let renewed = b
        .client()
        .await
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: kept.lease_id.clone(),
            ttl_seconds: 300,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(crate::support::ts(&renewed.expires_at) > crate::support::ts(&kept.expires_at));
    let after = t.failsafe_at(&kept.username).await.expect("failsafe event");
    assert!(after > before, "failsafe not moved: {before} -> {after}");

    let short = b.issue("reader", 2).await.unwrap();
    b.login(&short).await.expect("leased login");
    let gone = b.reaped_within(&short, Duration::from_secs(20)).await;
    assert!(gone, "expired user {} still exists", short.username);
    assert!(t.failsafe_at(&short.username).await.is_none());
    assert!(b.login(&short).await.is_err());
    // The renewed lease is untouched by the reaper.
    assert_eq!(b.state(&kept).await, pb::LeaseState::Active);
    b.login(&kept).await.expect("renewed lease still logs in");

    b.revoke(&kept).await;
    b.finish().await;
}

/// Point 2b: revoke cuts a live connection (mid-query) within 1 s, and the
/// login is refused afterwards.
#[tokio::test]
async fn mysql_revoke_cuts_live_connection_within_a_second() {
    let t = local().await;
    let b = MyBroker::start(&t, reader).await;
    let lease = b.issue("reader", 120).await.unwrap();
    let mut idle = b.login(&lease).await.expect("leased login");
    let mut busy = b.login(&lease).await.expect("leased login");
    let busy_query = tokio::spawn(async move {
        let r = busy.query_drop("SELECT SLEEP(30)").await;
        (r, Instant::now())
    });
    // Wait until the query is running, so the revocation meets it mid-way.
    t.wait_running(&lease.username, "SELECT SLEEP").await;

    let started = Instant::now();
    b.revoke(&lease).await;
    let (result, ended) = tokio::time::timeout(Duration::from_secs(5), busy_query)
        .await
        .expect("the running query was not cut")
        .unwrap();
    // SLEEP() killed from outside returns 1 instead of 0 on MariaDB when only
    // the query is killed; a killed connection makes the call fail.
    assert!(result.is_err(), "the live session survived revocation");
    let cut = ended.duration_since(started);
    assert!(cut < Duration::from_secs(1), "cut after {cut:?}");
    assert!(idle.query_drop("SELECT 1").await.is_err());
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(access_denied(&refused), "{refused}");
    println!("revoke → live session cut in {cut:?}");
    b.finish().await;
}

/// Statements in `mysql.general_log` containing `needle`.
async fn general_log_count(root: &mut Conn, needle: &str) -> u64 {
    let n: Option<u64> = root
        .exec_first(
            "SELECT COUNT(*) FROM mysql.general_log \
             WHERE CONVERT(argument USING utf8mb4) LIKE CONCAT('%', ?, '%')",
            (needle,),
        )
        .await
        .unwrap();
    n.unwrap_or(0)
}

/// Point 3: the broker is SIGKILLed and never restarted; the failsafe event
/// drops the user and ends its session by the hard limit anyway.
#[tokio::test]
async fn mysql_failsafe_removes_user_after_broker_sigkill() {
    let db = throwaway().await;
    let t = target_of(&db);
    let mut b = MyBroker::prepare(&t, |s| role("reader", s, "4s", "8s", None)).await;
    // Every statement the server receives goes to mysql.general_log.
    let mut root = t.root().await;
    root.query_drop("SET GLOBAL log_output = 'TABLE'; SET GLOBAL general_log = 'ON'")
        .await
        .unwrap();
    b.spawn_binary().await;
    let lease = b.issue("reader", 4).await.unwrap();
    let mut session = b.login(&lease).await.expect("leased login");
    session.query_drop("SELECT 1").await.unwrap();
    b.kill_binary();
    // Off before searching, or the search itself is logged.
    root.query_drop("SET GLOBAL general_log = 'OFF'")
        .await
        .unwrap();
    let create = format!("CREATE USER '{}'", lease.username);
    assert!(
        general_log_count(&mut root, &create).await >= 1,
        "the general log missed CREATE USER"
    );
    assert_eq!(
        general_log_count(&mut root, &lease.password).await,
        0,
        "the password is in the server's general log"
    );
    let log = std::fs::read_to_string(b.env.dir.join("broker.log")).unwrap();
    assert!(
        !log.contains("NO DATABASE-SIDE EXPIRY"),
        "the throwaway runs the event scheduler, yet the broker warned: {log}"
    );

    let hard_limit = crate::support::ts(&lease.max_expires_at);
    // The scheduler has one-second resolution; allow it a few.
    let slack = chrono::Duration::seconds(3);
    let within = (hard_limit + slack - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    let gone = t.dropped_within(&lease.username, within).await;
    assert!(
        gone,
        "user {} still exists after its hard limit {hard_limit} with no broker",
        lease.username
    );
    assert!(
        cut(&mut session).await,
        "the failsafe dropped the user but left its session running"
    );
    assert!(b.login(&lease).await.is_err());
    assert!(t.failsafe_at(&lease.username).await.is_none());
    b.drop_schema().await;
}

/// Point 4: names fit the server and many issues in a row never repeat
/// one. (The unit test in backend::mysql checks 20,000 generated names.)
async fn issue_many(n: usize) {
    let t = local().await;
    let b = MyBroker::start(&t, |s| role("reader-with-a-long-name", s, "5m", "1h", None)).await;
    let mut client = b.client().await;
    let mut names = std::collections::BTreeSet::new();
    let started = Instant::now();
    for _ in 0..n {
        let l = client
            .issue_lease(pb::IssueLeaseRequest {
                role: "reader-with-a-long-name".into(),
                ttl_seconds: 300,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(l.username.len() <= 32, "{}", l.username);
        assert!(names.insert(l.username), "duplicate user name");
    }
    let took = started.elapsed();
    let on_server = t.users_with_prefix(&b.prefix).await;
    assert_eq!(on_server, names);
    println!(
        "{n} MySQL issues in {took:?} ({:.0}/s), {} distinct names",
        n as f64 / took.as_secs_f64(),
        names.len()
    );
    let r = admin_revoke_by(&b, Selector::All(true), false).await;
    assert_eq!(r.revoked as usize, n);
    assert!(t.users_with_prefix(&b.prefix).await.is_empty());
    b.finish().await;
}

/// ~11 s alone on this machine (2,000 issues at ~180/s).
#[tokio::test]
async fn mysql_two_thousand_issues_give_distinct_names_within_the_limit() {
    issue_many(2000).await;
}

/// Point 5: a database that is down gives `Unavailable` quickly, and once it
/// is back no intent is left unresolved and no user is left behind.
#[tokio::test]
async fn mysql_down_database_is_unavailable_quickly_and_leaves_no_intent() {
    let mut db = throwaway().await;
    let t = target_of(&db);
    let mut b = MyBroker::start(&t, reader).await;
    let warm = b.issue("reader", 120).await.unwrap();

    db.stop().await.unwrap();
    for _ in 0..2 {
        // The first attempt meets the dead pooled connection, the second a
        // refused new one: both must fail fast.
        let started = Instant::now();
        let err = b.issue("reader", 120).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        // connect_timeout is 2 s in this config.
        assert!(took < Duration::from_secs(3), "Unavailable after {took:?}");
        println!("database down → Unavailable in {took:?}");
    }

    db.restart().await.unwrap();
    let settled = eventually(Duration::from_secs(30), || async {
        let pending = b
            .admin()
            .await
            .list_leases(pb::ListLeasesRequest {
                states: vec![
                    pb::LeaseState::Pending as i32,
                    pb::LeaseState::Failing as i32,
                ],
                ..Default::default()
            })
            .await;
        matches!(pending, Ok(r) if r.get_ref().leases.is_empty())
    })
    .await;
    assert!(
        settled,
        "intents still unresolved after the database came back"
    );
    let users = t.users_with_prefix(&b.prefix).await;
    assert_eq!(
        users,
        std::iter::once(warm.username.clone()).collect(),
        "only the lease issued before the outage may have a user"
    );
    b.issue("reader", 120).await.expect("issuing works again");

    // rotate-root: the broker's admin password changes, the broker keeps
    // working with the new one, the old one stops working.
    b.admin()
        .await
        .rotate_root(pb::RotateRootRequest {
            database: "main".into(),
        })
        .await
        .unwrap();
    b.issue("reader", 120)
        .await
        .expect("issuing works after rotate-root");
    let new_password = std::fs::read_to_string(b.env.dir.join("secrets/main-admin")).unwrap();
    assert_ne!(new_password.trim(), t.password);
    let old = Conn::new(t.opts(None)).await.map(|_| ()).unwrap_err();
    assert_eq!(server_code(&old), Some(1045), "{old}");
    let rotated = Target {
        port: t.port,
        password: new_password.trim().to_string(),
    };
    rotated.root().await;
    b.stop().await;
}

/// The orphan sweep drops broker-shaped users no lease accounts for, and
/// never a name the broker could not have made, even with its prefix.
#[tokio::test]
async fn mysql_orphan_sweep_drops_only_broker_made_names() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, reader).await;
    let orphan = format!("{}reader_{}", b.prefix, "0123456789abcdef");
    let lookalike = format!("{}app", b.prefix);
    let mut root = t.root().await;
    for u in [&orphan, &lookalike] {
        root.query_drop(format!("CREATE USER '{u}'@'%'"))
            .await
            .unwrap();
    }
    b.start_in_process().await;
    let kept = b.issue("reader", 120).await.unwrap();
    let swept = t.dropped_within(&orphan, Duration::from_secs(20)).await;
    assert!(swept, "orphan {orphan} was not swept");
    assert_eq!(t.user_hosts(&lookalike).await, vec!["%".to_string()]);
    assert_eq!(t.user_hosts(&kept.username).await, vec!["%".to_string()]);
    root.query_drop(format!("DROP USER '{lookalike}'@'%'"))
        .await
        .unwrap();
    b.revoke(&kept).await;
    b.finish().await;
}

/// Without the privileges the failsafe needs, start-up says so loudly and
/// everything else works: issue, login, renew, revoke. Also shows the least
/// privileges the broker's admin account needs for that.
#[tokio::test]
async fn mysql_without_event_privilege_warns_and_keeps_working() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, reader).await;
    let admin = b.limited_admin("127.0.0.1").await;
    let warnings = b.start_in_process().await;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("NO DATABASE-SIDE EXPIRY") && w.contains("EVENT")),
        "no loud warning about the missing failsafe: {warnings:?}"
    );
    println!("start-up warnings: {warnings:#?}");
    let lease = b.issue("reader", 120).await.unwrap();
    assert!(t.failsafe_at(&lease.username).await.is_none());
    let mut conn = b.login(&lease).await.expect("leased login");
    conn.query_drop("SELECT * FROM orders").await.unwrap();
    b.client()
        .await
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.lease_id.clone(),
            ttl_seconds: 300,
        })
        .await
        .expect("renew without a failsafe");
    b.revoke(&lease).await;
    assert!(conn.query_drop("SELECT 1").await.is_err());
    assert!(t.user_hosts(&lease.username).await.is_empty());
    b.finish().await;
    t.root()
        .await
        .query_drop(format!("DROP USER '{admin}'@'127.0.0.1'"))
        .await
        .unwrap();
}
