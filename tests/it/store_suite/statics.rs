//! Static roles' rotation state.

use super::*;

/// Static roles' rows: claimed by one owner at a time (created empty on
/// the first claim), saved only by the claim holder, every field read back
/// as written (to the millisecond), released.
pub async fn case_static_roles_are_claimed_saved_only_by_the_holder_and_round_trip(s: Store) {
    use credbroker::static_roles::{CurrentUser, Pending, PendingKind, PreviousUser, StaticState};
    assert!(s.static_get("orders").await.unwrap().is_none());
    let mine = claim("broker-a", 60);
    let st = s.static_claim("orders", &mine).await.unwrap().unwrap();
    assert_eq!(
        st,
        StaticState {
            role: "orders".into(),
            ..Default::default()
        }
    );
    assert!(s
        .static_claim("orders", &claim("broker-b", 60))
        .await
        .unwrap()
        .is_none());
    let now = credbroker::lease::truncate_ms(Utc::now());
    let full = StaticState {
        role: "orders".into(),
        generation: 7,
        current: Some(CurrentUser {
            user: "app_a".into(),
            sealed: "v1.sealed-a".into(),
            rotated_at: now,
            valid_until: t(now, 7200),
        }),
        next_rotation_at: Some(t(now, 3600)),
        previous: Some(PreviousUser {
            user: "app_b".into(),
            retire_at: t(now, 3600),
        }),
        pending: Some(Pending {
            kind: PendingKind::Revoke,
            user: "app_b".into(),
            sealed: "v1.sealed-b".into(),
            generation: 8,
            valid_until: t(now, 7300),
        }),
        last_error: Some("database away".into()),
    };
    assert!(
        !s.static_save(&full, "broker-b").await.unwrap(),
        "not the holder"
    );
    assert!(s.static_save(&full, "broker-a").await.unwrap());
    assert_eq!(s.static_get("orders").await.unwrap().unwrap(), full);
    assert_eq!(s.static_list().await.unwrap(), vec![full.clone()]);
    let cleared = StaticState {
        pending: None,
        previous: None,
        last_error: None,
        ..full.clone()
    };
    assert!(s.static_save(&cleared, "broker-a").await.unwrap());
    assert_eq!(s.static_get("orders").await.unwrap().unwrap(), cleared);
    s.static_release("orders", "broker-b").await.unwrap();
    assert!(
        s.static_claim("orders", &claim("broker-b", 60))
            .await
            .unwrap()
            .is_none(),
        "only the holder releases"
    );
    s.static_release("orders", "broker-a").await.unwrap();
    let theirs = s
        .static_claim("orders", &claim("broker-b", 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(theirs, cleared);
    assert!(
        !s.static_save(&cleared, "broker-a").await.unwrap(),
        "a released claim saves nothing"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        s.static_claim("orders", &mine).await.unwrap().is_some(),
        "a dead owner's claim runs out"
    );
}

store_suite! {
    stores: [case_static_roles_are_claimed_saved_only_by_the_holder_and_round_trip],
    openers: [],
    homes: [],
}
