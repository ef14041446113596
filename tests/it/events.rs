//! Lease events across replicas (issue 28): two broker binaries on one
//! PostgreSQL store; what one replica does reaches the watchers of the
//! other through the store (`NOTIFY` and its event table, `relay.rs`).

use std::time::{Duration, Instant};

use credbroker::pb;

use crate::ha::use_pg_store;
use crate::support::*;

/// A sidecar following its lease through replica A; an admin revokes it
/// through replica B. The sidecar hears of it on its watch stream from A
/// (not at its next renewal, 40 s away) and writes a new working
/// credential; the time from the revoke to the new file is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_through_replica_b_reaches_a_sidecar_on_replica_a() {
    let mut a = TestBroker::prepare(&role("ev", "{db}", "1m", "10m", APP)).await;
    use_pg_store(&a, cluster(), "20s").await;
    a.spawn_binary().await;
    let mut b = a.replica();
    b.spawn_binary().await;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("db.conn");
    let log = dir.path().join("sidecar.log");
    let mut sidecar = spawn_sidecar(&a, &["--role", "ev"], &out, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(20), || async { out.exists() }).await,
        "the sidecar wrote no file:\n{}",
        log_text()
    );
    let first = std::fs::read_to_string(&out).unwrap();
    // Time for its watch stream on A to open after the first issue.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let revoked_at = Instant::now();
    let r = admin_revoke_by(
        &b,
        pb::revoke_leases_request::Selector::Role("ev".into()),
        false,
    )
    .await;
    assert_eq!(r.revoked, 1, "the sidecar's lease, revoked through B");
    let mut replaced = None;
    while revoked_at.elapsed() < Duration::from_secs(15) {
        if std::fs::read_to_string(&out).is_ok_and(|t| !t.is_empty() && t != first) {
            replaced = Some(revoked_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = replaced.unwrap_or_else(|| {
        panic!(
            "no new credential within 15 s of a revoke through B:\n{}",
            log_text()
        )
    });
    // The event, not a refused renewal (due in 40 s), told the sidecar.
    assert!(
        log_text().contains("the current lease was revoked; replacing it now"),
        "{}",
        log_text()
    );
    let now = std::fs::read_to_string(&out).unwrap();
    let cfg: tokio_postgres::Config = now.trim().parse().expect("the file holds a DSN");
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .expect("the new credential logs in");
    tokio::spawn(conn);
    client
        .query_one("SELECT item FROM orders", &[])
        .await
        .unwrap();
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    eprintln!(
        "EVENTS ACROSS REPLICAS: a revoke through replica B reached the sidecar on replica A, \
         which wrote a new working credential {:.0} ms after the revoke was sent",
        took.as_secs_f64() * 1000.0
    );
}
