//! A handover on MySQL/MariaDB: logins refused at once, sessions drained
//! as they go idle, a transaction left to commit, the rest ended at the
//! deadline.

use std::time::{Duration, Instant};

use credbroker::pb;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::*;

/// A role whose leases may insert (to prove a transaction commits) and
/// drain for `deadline` on a handover.
fn drain_role(schema: &str, deadline: &str) -> String {
    format!(
        "[roles.app]\ndatabase = \"main\"\ndefault_ttl = \"5m\"\nmax_ttl = \"10m\"\n\
         allowed = [\"{APP}\"]\ndrain_deadline = \"{deadline}\"\n\
         grants = [\"GRANT SELECT, INSERT ON `{schema}`.orders TO {{{{name}}}}\"]\n\n"
    )
}

impl MyBroker {
    /// The sidecar's revoke of a lease it replaced: a handover, drained.
    async fn hand_over(&self, lease: &pb::Lease) -> pb::LeaseState {
        let r = self
            .client()
            .await
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: lease.lease_id.clone(),
                handover: true,
            })
            .await
            .unwrap()
            .into_inner();
        pb::LeaseState::try_from(r.state).unwrap()
    }
}

/// Whether the server ends the session within `within`: watched from
/// root's PROCESSLIST every 100 ms, not by querying it (a query wakes it,
/// and a drain kills only a session asleep for a second, `drain::SETTLE`,
/// until its final third); then it no longer answers.
async fn gone_within(t: &Target, c: &mut Conn, within: Duration) -> bool {
    let id = c.id();
    let mut root = t.root().await;
    let until = Instant::now() + within;
    loop {
        let n: Option<u64> = root
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?",
                (id,),
            )
            .await
            .unwrap();
        if n == Some(0) {
            return !answers(c).await;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn answers(c: &mut Conn) -> bool {
    tokio::time::timeout(Duration::from_secs(2), c.query_drop("SELECT 1"))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// A handover on MariaDB: the account is locked at once, an idle session
/// (`Sleep` for a second, no InnoDB transaction) is killed within about a
/// second (it slept since before the handover), a
/// `SLEEP(3)` in flight completes and an open transaction commits — then
/// their sessions end too, and the user is dropped before the deadline.
/// Immediate termination would fail the query and the transaction.
#[tokio::test]
async fn mysql_handover_drains_idle_sessions_and_lets_a_query_and_a_transaction_finish() {
    let t = local().await;
    let b = MyBroker::start(&t, |s| drain_role(s, "30s")).await;
    let lease = b.issue("app", 0).await.unwrap();
    let user = lease.username.clone();
    let mut idle = b.login(&lease).await.unwrap();
    let mut busy = b.login(&lease).await.unwrap();
    let mut tx = b.login(&lease).await.unwrap();
    tx.query_drop("START TRANSACTION").await.unwrap();
    tx.query_drop("INSERT INTO orders VALUES (1000, 'tea')")
        .await
        .unwrap();
    let query = tokio::spawn(async move {
        let r: Result<Option<(i64, i64)>, _> = busy.query_first("SELECT SLEEP(3), 42").await;
        (r, busy)
    });
    t.wait_running(&user, "SELECT SLEEP").await;

    let started = Instant::now();
    assert_eq!(b.hand_over(&lease).await, pb::LeaseState::Draining);
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(
        locked_out(&refused),
        "a new login is refused at once: {refused}"
    );
    assert!(t.is_locked(&user).await);
    assert!(
        gone_within(&t, &mut idle, Duration::from_secs(3)).await,
        "the idle session is killed within about a second"
    );
    let idle_gone = started.elapsed();
    let (result, mut busy) = query.await.unwrap();
    assert_eq!(
        result.expect("the query in flight completes").map(|r| r.1),
        Some(42)
    );
    let done = Instant::now();
    assert!(
        gone_within(&t, &mut busy, Duration::from_secs(4)).await,
        "the finished query's session ends once asleep for the settle time"
    );
    let settled = done.elapsed();
    assert!(
        settled >= Duration::from_millis(900),
        "not the instant it went idle ({settled:?}): that races a pool's next query"
    );
    assert!(
        answers(&mut tx).await,
        "a session inside a transaction is left alone"
    );
    tx.query_drop("COMMIT")
        .await
        .expect("the open transaction commits");
    let mut root = t.root().await;
    let n: Option<u64> = root
        .query_first(format!(
            "SELECT COUNT(*) FROM `{}`.orders WHERE id = 1000",
            b.schema
        ))
        .await
        .unwrap();
    assert_eq!(n, Some(1), "what the transaction wrote is there");
    let dropped = t.dropped_within(&user, Duration::from_secs(5)).await;
    assert!(dropped, "the user is dropped once its last session is gone");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "before the 30 s deadline"
    );
    assert_eq!(b.state(&lease).await, pb::LeaseState::Revoked);
    println!("handover → idle MariaDB session killed in {idle_gone:?}");
    b.finish().await;
}

/// At the deadline, a session that never goes idle — here one idle *inside*
/// an open transaction, which must not be taken for idle — is killed and
/// the user dropped.
#[tokio::test]
async fn mysql_handover_drain_deadline_ends_an_open_transaction() {
    let t = local().await;
    let b = MyBroker::start(&t, |s| drain_role(s, "3s")).await;
    let lease = b.issue("app", 0).await.unwrap();
    let mut tx = b.login(&lease).await.unwrap();
    tx.query_drop("START TRANSACTION").await.unwrap();
    tx.query_drop("INSERT INTO orders VALUES (1001, 'tea')")
        .await
        .unwrap();
    let started = Instant::now();
    b.hand_over(&lease).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        answers(&mut tx).await,
        "asleep inside a transaction is not idle: left alone until the deadline"
    );
    let mut ended = None;
    for _ in 0..100 {
        if !answers(&mut tx).await {
            ended = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = ended.expect("ended at the deadline");
    assert!(
        ended >= Duration::from_millis(2500),
        "not before the deadline: {ended:?}"
    );
    let dropped = t
        .dropped_within(&lease.username, Duration::from_secs(5))
        .await;
    assert!(dropped, "the user is dropped at the deadline");
    // The drain task and the reaper are both due at the deadline; when the
    // reaper claims first, the drain's own record follows the drop by a
    // pass, so wait for it rather than race it.
    let drain_rec = || {
        b.audit_records()
            .into_iter()
            .find(|r| r.action == "drain" && r.lease_id.as_deref() == Some(&lease.lease_id))
    };
    let mut rec = drain_rec();
    for _ in 0..50 {
        if rec.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        rec = drain_rec();
    }
    let rec = rec.expect("the drain is audited");
    assert_eq!(
        rec.detail.as_deref(),
        Some("deadline: sessions ended idle=0 at_deadline=1")
    );
    b.finish().await;
}
