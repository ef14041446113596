//! Admin locks.

use super::*;

/// Locks: stamped by the store, kept across a restart, run out on their
/// own, deleted by id; expired ones pruned. The identities holding live
/// leases are listed once each.
pub async fn case_locks_survive_a_restart_run_out_and_are_deleted(home: StoreHome) {
    use credbroker::lock::{LockId, LockTarget, NewLock};
    use credbroker::policy::IdentityPattern;
    let s = (home.open)().await;
    let new = |target: LockTarget, secs: Option<u64>| NewLock {
        id: LockId::generate(),
        target,
        reason: "INC-1 leaked".into(),
        created_by: "spiffe://credbroker.dev/dba/oncall".into(),
        duration: secs.map(Duration::from_secs),
    };
    let before = Utc::now() - CDuration::seconds(2);
    let forever = s
        .insert_lock(&new(
            LockTarget::Identity(IdentityPattern::new("spiffe://credbroker.dev/ns/*/app").unwrap()),
            None,
        ))
        .await
        .unwrap();
    let short = s
        .insert_lock(&new(LockTarget::Role("ro".into()), Some(1)))
        .await
        .unwrap();
    let db = s
        .insert_lock(&new(LockTarget::Database("main".into()), Some(3600)))
        .await
        .unwrap();
    // A static role's lock (schema 9): stored, read back as its kind.
    let st = s
        .insert_lock(&new(LockTarget::StaticRole("orders-app".into()), None))
        .await
        .unwrap();
    let read = s.active_locks().await.unwrap();
    let back = read.iter().find(|l| l.id == st.id).unwrap();
    assert_eq!(
        (back.target.kind(), back.target.value()),
        ("static_role", "orders-app")
    );
    assert!(s.delete_lock(&st.id).await.unwrap().is_some());
    assert!(forever.expires_at.is_none());
    assert!(forever.created_at > before && forever.created_at < Utc::now() + CDuration::seconds(2));
    let left = short.expires_at.unwrap() - short.created_at;
    assert_eq!(
        left.num_milliseconds(),
        1000,
        "expiry is the store's now + duration"
    );
    assert_eq!(s.active_locks().await.unwrap().len(), 3);
    // The read every issue and renew makes (twice per issue): measured, to
    // show it needs no cache.
    let started = Instant::now();
    for _ in 0..200 {
        s.active_locks().await.unwrap();
    }
    println!(
        "active_locks with 3 locks: {:?} per call",
        started.elapsed() / 200
    );

    active(&s, 1, "ro", APP, 600).await;
    active(&s, 2, "ro", APP, 600).await;
    active(&s, 3, "ro", "spiffe://credbroker.dev/ns/demo/other", 600).await;
    assert_eq!(
        s.live_identities().await.unwrap(),
        vec![
            APP.to_string(),
            "spiffe://credbroker.dev/ns/demo/other".to_string()
        ]
    );

    drop(s);
    let s = (home.open)().await;
    let after_restart = s.active_locks().await.unwrap();
    assert_eq!(after_restart.len(), 3, "locks survive a restart");
    let kept = after_restart.iter().find(|l| l.id == forever.id).unwrap();
    assert_eq!(kept.target.kind(), "identity");
    assert_eq!(kept.target.value(), "spiffe://credbroker.dev/ns/*/app");
    assert_eq!(kept.reason, "INC-1 leaked");
    assert_eq!(kept.created_at, forever.created_at);

    tokio::time::sleep(Duration::from_millis(1200)).await;
    // As a set: two locks made in the same millisecond have no order.
    let mut ids: Vec<LockId> = s
        .active_locks()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    ids.sort();
    let mut want = vec![forever.id.clone(), db.id.clone()];
    want.sort();
    assert_eq!(ids, want, "the 1 s lock ran out");
    assert!(s.delete_lock(&db.id).await.unwrap().is_some());
    assert!(s.delete_lock(&db.id).await.unwrap().is_none());
    assert_eq!(
        s.prune_locks(Utc::now()).await.unwrap(),
        1,
        "the expired one"
    );
    assert!(s.delete_lock(&short.id).await.unwrap().is_none());
    assert_eq!(s.active_locks().await.unwrap().len(), 1);
}

store_suite! {
    stores: [],
    openers: [],
    homes: [case_locks_survive_a_restart_run_out_and_are_deleted],
}
