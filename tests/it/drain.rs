//! Routine handovers drain (issue 27), on a real PostgreSQL, connected as
//! the issued credential: after a handover revoke the old credential
//! refuses new logins at once, its sessions end once idle for a second
//! (at once in the drain's final third), a query in flight completes and
//! an open transaction commits —
//! then they end too; at the drain deadline what never went idle is ended
//! and the role dropped. An admin revoke still cuts at once, and a broker
//! killed mid-drain leaves the reaper to finish it. The MariaDB cases are
//! in `mysql.rs` (`mysql_handover_drain_*`), the static role's overlap end
//! in `static_roles.rs` (`static_overlap_end_drains_*`).
//!
//! These fail if draining is replaced by immediate termination: the query
//! in flight and the open transaction then die with `AdminShutdown`.

use std::time::{Duration, Instant};

use credbroker::pb;

use crate::support::{admin_revoke, eventually, issue, login, lookup, TestBroker, APP};

/// A role whose leases may insert (to prove a transaction commits) and
/// drain for `deadline`.
fn drain_role(deadline: &str) -> String {
    format!(
        "[roles.app]\ndatabase = \"{{db}}\"\ndefault_ttl = \"5m\"\nmax_ttl = \"10m\"\n\
         allowed = [\"{APP}\"]\ndrain_deadline = \"{deadline}\"\n\
         grants = [\"GRANT SELECT, INSERT ON orders TO {{{{name}}}}\"]\n\n"
    )
}

async fn hand_over(b: &TestBroker, who: &str, id: &str) -> Result<pb::LeaseState, tonic::Status> {
    b.client(who)
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: id.to_string(),
            handover: true,
        })
        .await
        .map(|r| pb::LeaseState::try_from(r.into_inner().state).unwrap())
}

async fn state(b: &TestBroker, id: &str) -> pb::LeaseState {
    let l = lookup(b, "app", id).await.unwrap();
    pb::LeaseState::try_from(l.state).unwrap()
}

/// Whether the session still answers a query. (A session a drain is to
/// end once idle is watched with `is_closed` instead: a query would make
/// it busy, and a drain ends only a session idle for a second,
/// `drain::SETTLE`, until its final third.)
async fn alive(c: &tokio_postgres::Client) -> bool {
    tokio::time::timeout(Duration::from_secs(2), c.simple_query("SELECT 1"))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Waits until `user` has a session in state `active` (a query running).
async fn wait_active(b: &TestBroker, user: &str) {
    let su = b.superuser().await;
    assert!(
        eventually(Duration::from_secs(5), || {
            let su = &su;
            async move {
                su.query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active'",
                    &[&user],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                    > 0
            }
        })
        .await,
        "the query never started"
    );
}

fn drain_record(b: &TestBroker, id: &str) -> Option<credbroker::audit::Record> {
    b.audit_records()
        .into_iter()
        .find(|r| r.action == "drain" && r.lease_id.as_deref() == Some(id))
}

#[tokio::test]
async fn drain_refuses_logins_ends_idle_and_lets_a_query_and_a_transaction_finish() {
    let b = TestBroker::start(&drain_role("30s")).await;
    let lease = issue(&b, "app", "app", 0).await.unwrap();
    let (user, pw) = (lease.username.clone(), lease.password.clone());
    let idle = login(&b.db, &user, &pw).await.unwrap();
    let busy = login(&b.db, &user, &pw).await.unwrap();
    let tx = login(&b.db, &user, &pw).await.unwrap();
    let row = 1000;
    tx.batch_execute(&format!("BEGIN; INSERT INTO orders VALUES ({row}, 'tea')"))
        .await
        .unwrap();
    let query = tokio::spawn(async move {
        let r = busy.query_one("SELECT pg_sleep(3)::text, 42", &[]).await;
        (r.map(|r| r.get::<_, i32>(1)), busy)
    });
    wait_active(&b, &user).await;

    let started = Instant::now();
    assert_eq!(
        hand_over(&b, "app", &lease.lease_id).await.unwrap(),
        pb::LeaseState::Draining,
        "a handover answers at once, draining"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the answer does not wait for the drain"
    );
    let refused = login(&b.db, &user, &pw).await.unwrap_err();
    assert!(
        refused.contains("not permitted to log in"),
        "a new login is refused at once: {refused}"
    );
    assert_eq!(state(&b, &lease.lease_id).await, pb::LeaseState::Draining);
    // Idle since before the handover: settled, ended at a pass or two.
    assert!(
        eventually(Duration::from_secs(3), || async { idle.is_closed() }).await,
        "the idle session ends within about a second"
    );
    assert!(!alive(&idle).await);
    let idle_gone = started.elapsed();

    // The query in flight completes, then its session, once idle for the
    // settle time, ends — long before the drain's final third (20 s on).
    let (result, busy) = query.await.unwrap();
    assert_eq!(result.expect("the query in flight completes"), 42);
    let done = Instant::now();
    assert!(
        eventually(Duration::from_secs(4), || async { busy.is_closed() }).await,
        "the finished query's session ends once idle for the settle time"
    );
    assert!(!alive(&busy).await);
    let settled = done.elapsed();
    assert!(
        settled >= Duration::from_millis(900),
        "not the instant it went idle ({settled:?}): that races a pool's next query"
    );
    // The open transaction still works and commits, then its session ends
    // and, the last one gone, the lease is revoked in full.
    assert!(alive(&tx).await, "a session in a transaction is left alone");
    tx.batch_execute("COMMIT")
        .await
        .expect("the open transaction commits");
    let su = b.superuser().await;
    let committed: i64 = su
        .query_one("SELECT count(*) FROM orders WHERE id = $1", &[&row])
        .await
        .unwrap()
        .get(0);
    assert_eq!(committed, 1, "what the transaction wrote is there");
    assert!(
        eventually(Duration::from_secs(5), || async {
            !b.role_exists(&user).await
        })
        .await,
        "the role is dropped once its last session is gone, before the deadline"
    );
    assert_eq!(state(&b, &lease.lease_id).await, pb::LeaseState::Revoked);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "finished at the last session, not at the 30 s deadline"
    );
    let rec = drain_record(&b, &lease.lease_id).expect("the drain is audited");
    assert_eq!(
        rec.detail.as_deref(),
        Some("drained: sessions ended idle=3 at_deadline=0")
    );
    assert!(b
        .audit_records()
        .iter()
        .any(|r| r.action == "handover_revoke" && r.lease_id.as_deref() == Some(&lease.lease_id)));
    eprintln!(
        "idle session ended {idle_gone:?} after the handover; the finished query's {settled:?} \
         after it went idle"
    );
}

#[tokio::test]
async fn drain_deadline_ends_a_session_that_never_goes_idle_and_drops_the_role() {
    let b = TestBroker::start(&drain_role("3s")).await;
    let lease = issue(&b, "app", "app", 0).await.unwrap();
    let (user, pw) = (lease.username.clone(), lease.password.clone());
    let busy = login(&b.db, &user, &pw).await.unwrap();
    let query = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(60)").await });
    wait_active(&b, &user).await;
    let started = Instant::now();
    hand_over(&b, "app", &lease.lease_id).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(15), query)
        .await
        .expect("the busy session is ended at the deadline")
        .unwrap()
        .expect_err("a session still busy at the deadline is ended");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "not before the deadline: {took:?} ({err})"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            !b.role_exists(&user).await
        })
        .await,
        "the role is dropped at the deadline"
    );
    let rec = drain_record(&b, &lease.lease_id).expect("the drain is audited");
    assert_eq!(
        rec.detail.as_deref(),
        Some("deadline: sessions ended idle=0 at_deadline=1")
    );
}

#[tokio::test]
async fn drain_is_cut_by_an_admin_revoke_and_only_the_holder_hands_over() {
    let b = TestBroker::start(&drain_role("60s")).await;
    let lease = issue(&b, "app", "app", 0).await.unwrap();
    let (user, pw) = (lease.username.clone(), lease.password.clone());
    // Not the holder: refused, even to an admin, and nothing changes.
    let e = hand_over(&b, "admin", &lease.lease_id).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert_eq!(state(&b, &lease.lease_id).await, pb::LeaseState::Active);

    let busy = login(&b.db, &user, &pw).await.unwrap();
    let query = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(60)").await });
    wait_active(&b, &user).await;
    hand_over(&b, "app", &lease.lease_id).await.unwrap();
    // A second handover is a no-op, still draining.
    assert_eq!(
        hand_over(&b, "app", &lease.lease_id).await.unwrap(),
        pb::LeaseState::Draining
    );
    let started = Instant::now();
    admin_revoke(&b, &lease.lease_id).await;
    tokio::time::timeout(Duration::from_secs(2), query)
        .await
        .expect("an admin revoke ends a draining lease's busy session within a second or so")
        .unwrap()
        .expect_err("ended");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!b.role_exists(&user).await);
    assert_eq!(state(&b, &lease.lease_id).await, pb::LeaseState::Revoked);
}

/// SIGKILL mid-drain: the lease is `draining` in the store, due at its
/// deadline, and the restarted broker finishes it (resuming the passes:
/// an idle session need not wait for the deadline).
#[tokio::test]
async fn drain_survives_a_broker_sigkill() {
    let mut b = TestBroker::prepare(&drain_role("8s")).await;
    b.spawn_binary().await;
    let lease = issue(&b, "app", "app", 0).await.unwrap();
    let (user, pw) = (lease.username.clone(), lease.password.clone());
    let busy = login(&b.db, &user, &pw).await.unwrap();
    let query = tokio::spawn(async move {
        let r = busy.simple_query("SELECT pg_sleep(2)").await;
        (r.is_ok(), busy)
    });
    wait_active(&b, &user).await;
    hand_over(&b, "app", &lease.lease_id).await.unwrap();
    b.kill_binary();
    let started = Instant::now();
    let store = b.open_store().await;
    let row = store
        .get(&credbroker::lease::LeaseId::parse(&lease.lease_id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.state, credbroker::lease::LeaseState::Draining);
    assert_eq!(row.due_at, row.expires_at, "due at the drain deadline");
    drop(store);
    assert!(
        login(&b.db, &user, &pw).await.is_err(),
        "logins stay refused with the broker gone"
    );
    b.spawn_binary().await;
    let (completed, busy) = query.await.unwrap();
    assert!(completed, "the query in flight completes across the crash");
    assert!(
        eventually(Duration::from_secs(5), || async { busy.is_closed() }).await,
        "the restarted broker resumes the drain: the session ends once idle"
    );
    assert!(!alive(&busy).await);
    assert!(
        eventually(Duration::from_secs(12), || async {
            !b.role_exists(&user).await
        })
        .await,
        "revoked by the deadline at the latest"
    );
    assert!(started.elapsed() < Duration::from_secs(12));
    assert_eq!(state(&b, &lease.lease_id).await, pb::LeaseState::Revoked);
}
