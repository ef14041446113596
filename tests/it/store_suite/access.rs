//! Just-in-time access requests (`access`): stored and read back whole,
//! every change a compare-and-set on `version` (two writers, on one
//! handle or two, never both win), listings by requester and state, the
//! expiry loop's due query, and leases carrying their grant id.

use super::*;
use credbroker::store::{AccessFilter, AccessRequest, AccessState, Approval};

fn request(n: usize, requester: &str, now: DateTime<Utc>) -> AccessRequest {
    AccessRequest {
        id: format!("ar_{:0>26}", n),
        policy: "orders-incident".into(),
        roles: vec!["ro".into()],
        requester: requester.into(),
        reason: "INC-4711: orders stuck".into(),
        duration_secs: 3600,
        state: AccessState::Pending,
        break_glass: false,
        created_at: t(now, n as i64),
        pending_until: t(now, 1800),
        approvals: vec![],
        approvals_needed: 2,
        denied_by: None,
        deny_reason: None,
        granted_at: None,
        until: None,
        ended_at: None,
        ended_by: None,
        end_reason: None,
        leases_done: true,
        version: 0,
    }
}

const ALICE: &str = "spiffe://example.org/user/alice";
const BOB: &str = "spiffe://example.org/user/bob";

pub async fn case_access_requests_are_compare_and_set(s: Store) {
    let now = credbroker::lease::truncate_ms(Utc::now());
    let a = request(1, ALICE, now);
    s.insert_access(&a).await.unwrap();
    assert_eq!(s.get_access(&a.id).await.unwrap().unwrap(), a);
    assert!(s.get_access("ar_missing").await.unwrap().is_none());

    // Two approvals from the same read: the first wins, the second
    // finds the version moved and writes nothing.
    let mut one = a.clone();
    one.approvals.push(Approval {
        identity: BOB.into(),
        at: now,
    });
    let mut other = a.clone();
    other.state = AccessState::Denied;
    assert!(s.update_access(&one).await.unwrap());
    assert!(!s.update_access(&other).await.unwrap());
    let stored = s.get_access(&a.id).await.unwrap().unwrap();
    assert_eq!(stored.version, 1);
    assert_eq!(stored.approvals, one.approvals);
    assert_eq!(stored.state, AccessState::Pending);

    // Granted: due at its end; ended with leases left: due at once.
    let mut g = stored.clone();
    g.state = AccessState::Granted;
    g.granted_at = Some(now);
    g.until = Some(t(now, 3600));
    assert!(s.update_access(&g).await.unwrap());
    assert!(s.access_due(t(now, 3599), 10).await.unwrap().is_empty());
    let due = s.access_due(t(now, 3600), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].version, 2);
    let mut ended = due[0].clone();
    ended.state = AccessState::Ended;
    ended.ended_at = Some(t(now, 3600));
    ended.leases_done = false;
    assert!(s.update_access(&ended).await.unwrap());
    assert_eq!(s.access_due(t(now, 3600), 10).await.unwrap().len(), 1);
    let mut done = s.get_access(&a.id).await.unwrap().unwrap();
    done.leases_done = true;
    assert!(s.update_access(&done).await.unwrap());
    assert!(s.access_due(t(now, 99_999), 10).await.unwrap().is_empty());

    // Listings: newest first, by requester and state.
    let b = request(2, BOB, now);
    let c = request(3, ALICE, now);
    s.insert_access(&b).await.unwrap();
    s.insert_access(&c).await.unwrap();
    let ids = |v: Vec<AccessRequest>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_access(&AccessFilter::default()).await.unwrap()),
        [c.id.clone(), b.id.clone(), a.id.clone()]
    );
    let alice = AccessFilter {
        requester: Some(ALICE.into()),
        ..AccessFilter::default()
    };
    assert_eq!(
        ids(s.list_access(&alice).await.unwrap()),
        [c.id.clone(), a.id.clone()]
    );
    let pending = AccessFilter {
        states: vec![AccessState::Pending],
        limit: Some(1),
        ..AccessFilter::default()
    };
    assert_eq!(ids(s.list_access(&pending).await.unwrap()), [c.id.as_str()]);
    // Pending ones are due at their deadline.
    let due = s.access_due(t(now, 1800), 10).await.unwrap();
    assert_eq!(ids(due), [b.id, c.id]);
}

/// Two handles (two replicas on PostgreSQL) deciding one request at once:
/// exactly one compare-and-set wins, however the writes interleave.
pub async fn case_access_compare_and_set_holds_across_handles(open: Opener, shared: bool) {
    let s1 = open().await;
    let s2 = if shared { open().await } else { s1.clone() };
    let now = credbroker::lease::truncate_ms(Utc::now());
    for n in 0..20 {
        let r = request(100 + n, ALICE, now);
        s1.insert_access(&r).await.unwrap();
        let mut x = r.clone();
        x.state = AccessState::Denied;
        let mut y = r.clone();
        y.state = AccessState::Granted;
        let (a, b) = tokio::join!(s1.update_access(&x), s2.update_access(&y));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(
            a ^ b,
            "exactly one of two racing writes wins (got {a}, {b})"
        );
        let stored = s2.get_access(&r.id).await.unwrap().unwrap();
        assert_eq!(stored.state, if a { x.state } else { y.state });
    }
}

/// A lease carries its grant id, and listings select by it.
pub async fn case_leases_carry_their_grant(s: Store) {
    let now = Utc::now();
    let mut under = lease(1, "ro", ALICE, now, 600);
    under.grant_id = Some(format!("ar_{:0>26}", 7));
    let plain = lease(2, "ro", ALICE, now, 600);
    s.insert_intent(&under, None).await.unwrap();
    s.insert_intent(&plain, None).await.unwrap();
    s.activate(&under.id).await.unwrap();
    assert_eq!(
        s.get(&under.id).await.unwrap().unwrap().grant_id,
        under.grant_id
    );
    assert_eq!(s.get(&plain.id).await.unwrap().unwrap().grant_id, None);
    let by_grant = LeaseFilter {
        grant: under.grant_id.clone(),
        ..LeaseFilter::default()
    };
    let got: Vec<LeaseId> = s
        .list(&by_grant)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(got, [under.id.clone()]);
    assert_eq!(s.count(&by_grant).await.unwrap(), 1);
}

store_suite! {
    stores: [case_access_requests_are_compare_and_set, case_leases_carry_their_grant],
    openers: [case_access_compare_and_set_holds_across_handles],
    homes: [],
}
