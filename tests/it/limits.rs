//! Bounds a broker keeps under load: the per-identity lease cap holds under
//! parallel issues, and revoked rows leave the store after their retention.

use std::time::{Duration, Instant};

use credbroker::pb;
use tonic::Code;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_issues_never_overshoot_the_per_identity_cap() {
    let roles = role("capped", "{db}", "5m", "10m", APP) + "max_leases_per_identity = 5\n\n";
    let mut b = TestBroker::start(&roles).await;
    let client = b.client("app").await;
    let started = Instant::now();
    let (mut issued, mut refused) = (Vec::new(), 0);
    for answer in issue_at_once(std::slice::from_ref(&client), "capped", 50).await {
        match answer {
            Ok(l) => issued.push(l),
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    s.message()
                        .contains("identity holds 5 live leases on role \"capped\""),
                    "{}",
                    s.message()
                );
                refused += 1;
            }
            Err(s) => panic!("unexpected status: {s:?}"),
        }
    }
    eprintln!(
        "50 parallel issues with a cap of 5 took {:?}",
        started.elapsed()
    );
    assert_eq!((issued.len(), refused), (5, 45));
    assert_eq!(b.broker_role_count().await, 5, "roles in the database");
    for l in &issued {
        assert!(login(&b.db, &l.username, &l.password).await.is_ok());
    }
    let records = b.audit_records();
    let denied = records
        .iter()
        .filter(|r| r.action == "issue" && r.outcome == credbroker::audit::Outcome::Denied)
        .inspect(|r| {
            assert!(
                r.lease_id.is_none(),
                "a refusal names a lease that never was"
            )
        })
        .count();
    assert_eq!(denied, 45, "each refusal is audited");

    // A revoked lease frees its slot.
    client
        .clone()
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: issued[0].lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    issue(&b, "app", "capped", 0)
        .await
        .expect("a slot is free again");
    let err = issue(&b, "app", "capped", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    b.stop().await;
}

#[tokio::test]
async fn the_pruner_removes_revoked_rows_past_retention_and_keeps_live_ones() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "5m", "10m", APP)).await;
    b.edit_config(|t| {
        t.replace(
            "[store]\n",
            "[store]\nretention = \"1s\"\nprune_interval = \"1s\"\n",
        )
    });
    b.start_in_process().await;
    let mut app = b.client("app").await;
    let live = issue(&b, "app", "ro", 0).await.unwrap();
    let done = issue(&b, "app", "ro", 0).await.unwrap();
    app.revoke_lease(pb::RevokeLeaseRequest {
        lease_id: done.lease_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let lookup = |id: String| {
        let mut app = app.clone();
        async move {
            app.lookup_lease(pb::LookupLeaseRequest { lease_id: id })
                .await
                .map(|r| r.into_inner())
        }
    };
    assert_eq!(
        lookup(done.lease_id.clone()).await.unwrap().state,
        pb::LeaseState::Revoked as i32,
        "a revoked lease is kept for its retention"
    );
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || {
            let l = lookup(done.lease_id.clone());
            async move { matches!(l.await, Err(s) if s.code() == Code::NotFound) }
        })
        .await,
        "the revoked lease's row was never pruned"
    );
    eprintln!(
        "revoked row pruned {:?} after the revoke",
        started.elapsed()
    );
    // Two more runs of the pruner: the live lease stays.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let l = lookup(live.lease_id.clone()).await.unwrap();
    assert_eq!(l.state, pb::LeaseState::Active as i32);
    assert!(login(&b.db, &live.username, &live.password).await.is_ok());
    b.stop().await;
}
