//! Leases: intents, activation, claims, failures, listings.

use super::*;

pub async fn case_lifecycle(s: Store) {
    let now = Utc::now();
    let l = lease(1, "ro", APP, now, 600);
    s.insert_intent(&l, None).await.unwrap();
    let got = s.get(&l.id).await.unwrap().unwrap();
    assert_eq!(got.state, LeaseState::Pending);
    assert_eq!(got.username, l.username);
    assert_eq!(ms(got.expires_at), ms(l.expires_at));
    assert_eq!(
        ms(got.due_at),
        ms(l.due_at),
        "a pending intent is due at its grace deadline"
    );

    s.activate(&l.id).await.unwrap();
    let got = s.get(&l.id).await.unwrap().unwrap();
    assert_eq!(got.state, LeaseState::Active);
    assert_eq!(
        ms(got.due_at),
        ms(l.expires_at),
        "an active lease is due at its expiry"
    );
    assert!(
        s.activate(&l.id).await.is_err(),
        "activating twice is an error"
    );

    let later = t(now, 1200);
    assert!(s.set_expiry(&l.id, later).await.unwrap());
    let got = s.get(&l.id).await.unwrap().unwrap();
    assert_eq!(ms(got.expires_at), ms(later));
    assert_eq!(ms(got.due_at), ms(later));

    let claimed = s.claim_one(&l.id, &claim("me", 60)).await.unwrap().unwrap();
    assert!(
        claimed.due_at <= Utc::now(),
        "an explicit revoke is due now"
    );
    assert!(
        !s.set_expiry(&l.id, t(now, 1800)).await.unwrap(),
        "a lease being revoked cannot be renewed"
    );
    let at = Utc::now();
    s.mark_revoked(std::slice::from_ref(&l.id), at)
        .await
        .unwrap();
    let got = s.get(&l.id).await.unwrap().unwrap();
    assert_eq!(got.state, LeaseState::Revoked);
    assert_eq!(got.revoked_at.map(ms), Some(ms(at)));
    assert!(!s.set_expiry(&l.id, t(now, 1800)).await.unwrap());
    assert!(s
        .claim_one(&l.id, &claim("me", 60))
        .await
        .unwrap()
        .is_none());
    assert!(s.list(&LeaseFilter::default()).await.unwrap().is_empty());
    assert!(s.next_due().await.unwrap().is_none());
    assert!(s.get(&LeaseId::generate()).await.unwrap().is_none());
}

pub async fn case_username_is_unique_per_database(s: Store) {
    let now = Utc::now();
    let a = lease(1, "ro", APP, now, 60);
    s.insert_intent(&a, None).await.unwrap();
    let mut b = lease(2, "ro", APP, now, 60);
    b.username = a.username.clone();
    assert!(s.insert_intent(&b, None).await.is_err());
    b.database = "other".into();
    s.insert_intent(&b, None).await.unwrap();
}

pub async fn case_claims_exclude_other_owners_until_they_expire(s: Store) {
    let l = active(&s, 1, "ro", APP, 600).await;
    assert!(s.claim_one(&l.id, &claim("a", 60)).await.unwrap().is_some());
    assert!(
        s.claim_one(&l.id, &claim("b", 60)).await.unwrap().is_none(),
        "another owner's live claim is respected"
    );
    assert!(
        s.claim_one(&l.id, &claim("a", 60)).await.unwrap().is_some(),
        "an owner may renew its own claim"
    );
    assert!(
        s.claim_due(t(Utc::now(), 1), 10, &claim("b", 60))
            .await
            .unwrap()
            .is_empty(),
        "claimed leases are not handed to another reaper"
    );
    s.release(&l.id).await.unwrap();
    assert!(s.claim_one(&l.id, &claim("b", 60)).await.unwrap().is_some());

    // A claim that ran out (its holder died) is taken over.
    let m = active(&s, 2, "ro", APP, 600).await;
    assert!(s
        .claim_one(&m.id, &claim("dead", 1))
        .await
        .unwrap()
        .is_some());
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let taken = s
        .claim_due(Utc::now(), 10, &claim("alive", 60))
        .await
        .unwrap();
    assert_eq!(
        taken.iter().map(|l| l.id.clone()).collect::<Vec<_>>(),
        vec![m.id.clone()]
    );
}

/// A holder's revoke claims in one step: its own live lease only (any
/// lease for an admin's None), never a revoked one or one claimed by
/// another owner, and it says which of these it was.
pub async fn case_a_holder_claims_only_its_own_live_unclaimed_lease(s: Store) {
    use credbroker::store::HolderClaim;
    let mine = active(&s, 1, "ro", APP, 600).await;
    let other = "spiffe://credbroker.dev/ns/demo/other";
    match s
        .claim_for(&mine.id, &claim("me", 60), Some(other))
        .await
        .unwrap()
    {
        HolderClaim::Refused(l) => assert_eq!(l.identity, APP),
        got => panic!("another identity's claim: {got:?}"),
    }
    // Refused means not claimed: the holder still gets it.
    match s
        .claim_for(&mine.id, &claim("me", 60), Some(APP))
        .await
        .unwrap()
    {
        HolderClaim::Claimed(l) => assert_eq!(l.id, mine.id),
        got => panic!("the holder's claim: {got:?}"),
    }
    // Claimed by "me" now: another owner's claim is refused, live state kept.
    match s
        .claim_for(&mine.id, &claim("you", 60), None)
        .await
        .unwrap()
    {
        HolderClaim::Refused(l) => assert_eq!(l.state, LeaseState::Active),
        got => panic!("a claimed lease: {got:?}"),
    }
    s.mark_revoked_claimed(std::slice::from_ref(&mine.id), "me", Utc::now())
        .await
        .unwrap();
    match s
        .claim_for(&mine.id, &claim("me", 60), Some(APP))
        .await
        .unwrap()
    {
        HolderClaim::Refused(l) => assert_eq!(l.state, LeaseState::Revoked),
        got => panic!("a revoked lease: {got:?}"),
    }
    let theirs = active(&s, 2, "ro", other, 600).await;
    assert!(matches!(
        s.claim_for(&theirs.id, &claim("admin", 60), None)
            .await
            .unwrap(),
        HolderClaim::Claimed(_)
    ));
    let missing = credbroker::lease::LeaseId::generate();
    assert!(matches!(
        s.claim_for(&missing, &claim("me", 60), None).await.unwrap(),
        HolderClaim::Missing
    ));
}

pub async fn case_claim_due_is_ordered_limited_and_only_due(s: Store) {
    let now = Utc::now();
    let mut ids = Vec::new();
    for (i, ttl) in [30i64, 10, 20, 3600].into_iter().enumerate() {
        let l = active(&s, i, "ro", APP, ttl).await;
        ids.push((ttl, l.id));
    }
    let at = t(now, 40);
    let first = s.claim_due(at, 2, &claim("r", 60)).await.unwrap();
    let got: Vec<i64> = first
        .iter()
        .map(|l| (l.expires_at - l.issued_at).num_seconds())
        .collect();
    assert_eq!(got, vec![10, 20], "earliest first, at most `limit`");
    let rest = s.claim_due(at, 10, &claim("r", 60)).await.unwrap();
    assert_eq!(
        rest.len(),
        1,
        "the one due lease left; the far one is not due"
    );
    assert_eq!((rest[0].expires_at - rest[0].issued_at).num_seconds(), 30);
    let next = s.next_due().await.unwrap().unwrap();
    assert!(
        ms(next) <= ms(t(now, 31)),
        "next_due counts claimed live leases too"
    );
}

/// A replica whose claim ran out mid-revocation and was taken over must not
/// record the revocation: the new owner does, so it is audited once.
pub async fn case_only_the_claim_holder_marks_revoked(s: Store) {
    let l = active(&s, 1, "ro", APP, 600).await;
    s.claim_one(&l.id, &claim("slow", 1))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    s.claim_one(&l.id, &claim("taker", 60))
        .await
        .unwrap()
        .expect("a claim that ran out is taken over");
    let at = Utc::now();
    let slow = s
        .mark_revoked_claimed(std::slice::from_ref(&l.id), "slow", at)
        .await
        .unwrap();
    assert!(slow.is_empty(), "the old owner marked a lease it lost");
    assert_eq!(
        s.get(&l.id).await.unwrap().unwrap().state,
        LeaseState::Active
    );
    let taker = s
        .mark_revoked_claimed(std::slice::from_ref(&l.id), "taker", at)
        .await
        .unwrap();
    assert_eq!(taker, vec![l.id.clone()]);
    assert_eq!(
        s.get(&l.id).await.unwrap().unwrap().state,
        LeaseState::Revoked
    );
    let again = s
        .mark_revoked_claimed(std::slice::from_ref(&l.id), "taker", at)
        .await
        .unwrap();
    assert!(again.is_empty(), "a revoked lease is not revoked again");
}

pub async fn case_failures_are_recorded_and_release_the_claim(s: Store) {
    let a = active(&s, 1, "ro", APP, 600).await;
    let b = active(&s, 2, "ro", APP, 600).await;
    for l in [&a, &b] {
        s.claim_one(&l.id, &claim("r", 60)).await.unwrap().unwrap();
    }
    let retry = t(Utc::now(), 30);
    s.record_failure(&a.id, "database \"main\": timed out", retry, false)
        .await
        .unwrap();
    s.record_failures(&[
        FailureRecord {
            id: a.id.clone(),
            error: "second".into(),
            next_due: retry,
            failing: true,
        },
        FailureRecord {
            id: b.id.clone(),
            error: "first".into(),
            next_due: retry,
            failing: false,
        },
    ])
    .await
    .unwrap();
    let got_a = s.get(&a.id).await.unwrap().unwrap();
    assert_eq!(got_a.revoke_attempts, 2);
    assert_eq!(got_a.state, LeaseState::Failing);
    assert_eq!(got_a.last_error.as_deref(), Some("second"));
    assert_eq!(ms(got_a.due_at), ms(retry));
    let got_b = s.get(&b.id).await.unwrap().unwrap();
    assert_eq!(
        (got_b.revoke_attempts, got_b.state),
        (1, LeaseState::Active)
    );
    // Released: another owner may claim both now.
    for l in [&a, &b] {
        assert!(s
            .claim_one(&l.id, &claim("other", 60))
            .await
            .unwrap()
            .is_some());
    }
    s.record_failures(&[]).await.unwrap();
}

pub async fn case_queries_see_only_what_they_ask_for(s: Store) {
    let other = "spiffe://credbroker.dev/ns/demo/other";
    let a = active(&s, 1, "ro", APP, 100).await;
    let b = active(&s, 2, "rw", APP, 200).await;
    let c = active(&s, 3, "ro", other, 300).await;
    let now = Utc::now();
    let p = lease(4, "ro", APP, now, 400);
    s.insert_intent(&p, None).await.unwrap();
    let gone = active(&s, 5, "ro", APP, 50).await;
    s.mark_revoked(std::slice::from_ref(&gone.id), Utc::now())
        .await
        .unwrap();

    let ids = |v: Vec<Lease>| v.into_iter().map(|l| l.id).collect::<Vec<_>>();
    let all = ids(s.list(&LeaseFilter::default()).await.unwrap());
    assert_eq!(
        all,
        vec![a.id.clone(), b.id.clone(), c.id.clone(), p.id.clone()],
        "live leases by expiry"
    );
    let f = |f: LeaseFilter| {
        let s = s.clone();
        async move { ids(s.list(&f).await.unwrap()) }
    };
    assert_eq!(
        f(LeaseFilter {
            role: Some("ro".into()),
            ..Default::default()
        })
        .await,
        vec![a.id.clone(), c.id.clone(), p.id.clone()]
    );
    assert_eq!(
        f(LeaseFilter {
            identity: Some(other.into()),
            ..Default::default()
        })
        .await,
        vec![c.id.clone()]
    );
    assert_eq!(
        f(LeaseFilter {
            database: Some("nope".into()),
            ..Default::default()
        })
        .await,
        Vec::<LeaseId>::new()
    );
    assert_eq!(
        f(LeaseFilter {
            states: vec![LeaseState::Pending, LeaseState::Revoked],
            ..Default::default()
        })
        .await,
        vec![gone.id.clone(), p.id.clone()]
    );
    assert_eq!(
        f(LeaseFilter {
            expiring_before: Some(t(now, 250)),
            ..Default::default()
        })
        .await,
        vec![a.id.clone(), b.id.clone()]
    );
    assert_eq!(
        f(LeaseFilter {
            limit: Some(1),
            ..Default::default()
        })
        .await,
        vec![a.id.clone()]
    );

    assert_eq!(s.count_live(APP, "ro").await.unwrap(), 2);
    assert_eq!(s.count_live(APP, "rw").await.unwrap(), 1);
    assert_eq!(s.count_live(other, "rw").await.unwrap(), 0);
    let names: BTreeSet<String> = s
        .live_usernames("main")
        .await
        .unwrap()
        .into_iter()
        .collect();
    let want: BTreeSet<String> = [&a, &b, &c, &p]
        .iter()
        .map(|l| l.username.as_str().to_string())
        .collect();
    assert_eq!(names, want);
    let mut counts = s.live_counts().await.unwrap();
    counts.sort_by(|x, y| (&x.0, x.2.as_str()).cmp(&(&y.0, y.2.as_str())));
    assert_eq!(
        counts,
        vec![
            ("ro".into(), "main".into(), LeaseState::Active, 2),
            ("ro".into(), "main".into(), LeaseState::Pending, 1),
            ("rw".into(), "main".into(), LeaseState::Active, 1),
        ]
    );
    assert_eq!(ms(s.next_due().await.unwrap().unwrap()), ms(p.due_at));
}

/// Per role, the most live leases one identity holds (what the lease-cap
/// alert compares with `max_leases_per_identity`): pending leases count,
/// revoked ones and other identities' smaller counts do not.
pub async fn case_busiest_identity_is_counted_per_role(s: Store) {
    let other = "spiffe://credbroker.dev/ns/demo/other";
    assert_eq!(s.busiest_identity().await.unwrap(), vec![]);
    for n in 0..2 {
        active(&s, 200 + n, "ro", APP, 600).await;
    }
    s.insert_intent(&lease(210, "ro", APP, Utc::now(), 600), None)
        .await
        .unwrap();
    for n in 0..2 {
        active(&s, 220 + n, "ro", other, 600).await;
    }
    active(&s, 230, "rw", other, 600).await;
    for n in 0..3 {
        let gone = active(&s, 240 + n, "rw", APP, 600).await;
        s.mark_revoked(std::slice::from_ref(&gone.id), Utc::now())
            .await
            .unwrap();
    }
    let mut most = s.busiest_identity().await.unwrap();
    most.sort();
    assert_eq!(most, vec![("ro".to_string(), 3), ("rw".to_string(), 1)]);
}

/// A handover's drain starts only on an active, unclaimed lease of its
/// holder; the row is then `draining`, expiry and due time the deadline
/// (what the reaper finds after a crash), is due then and not before, is
/// no longer renewable, and is listed by its state.
pub async fn case_a_drain_marks_the_holder_s_active_lease_due_at_its_deadline(s: Store) {
    let l = active(&s, 1, "ro", APP, 600).await;
    let until = Utc::now() + CDuration::seconds(30);
    let other = "spiffe://credbroker.dev/ns/demo/other";
    assert!(
        s.start_drain(&l.id, other, until).await.unwrap().is_none(),
        "not the holder's"
    );
    let d = s
        .start_drain(&l.id, APP, until)
        .await
        .unwrap()
        .expect("the holder's active lease");
    assert_eq!(d.state, LeaseState::Draining);
    assert_eq!(ms(d.expires_at), ms(until));
    assert_eq!(ms(d.due_at), ms(until));
    let again = s.get(&l.id).await.unwrap().unwrap();
    assert_eq!(again.state, LeaseState::Draining, "stored");
    assert!(
        s.start_drain(&l.id, APP, until).await.unwrap().is_none(),
        "not twice"
    );
    assert!(
        !s.set_expiry(&l.id, t(until, 600)).await.unwrap(),
        "not renewable"
    );
    let filter = LeaseFilter {
        states: vec![LeaseState::Draining],
        ..Default::default()
    };
    assert_eq!(s.list(&filter).await.unwrap().len(), 1);
    assert!(s
        .claim_due(Utc::now(), 10, &claim("reaper", 60))
        .await
        .unwrap()
        .is_empty());
    let due = s
        .claim_due(t(until, 1), 10, &claim("reaper", 60))
        .await
        .unwrap();
    assert_eq!(due.len(), 1, "due at the deadline");
    assert_eq!(due[0].state, LeaseState::Draining);
    // Claimed: a second drain cannot start on another lease being revoked.
    let c = active(&s, 2, "ro", APP, 600).await;
    s.claim_one(&c.id, &claim("admin", 60))
        .await
        .unwrap()
        .unwrap();
    assert!(
        s.start_drain(&c.id, APP, until).await.unwrap().is_none(),
        "claimed"
    );
}

/// A console page: filtered, sorted and paged in the store, with a total
/// that ignores the page — the same answer from every store.
pub async fn case_pages_are_counted_sorted_and_disjoint(s: Store) {
    let mut made = Vec::new();
    for n in 0..7 {
        made.push(
            active(
                &s,
                n,
                if n % 2 == 0 { "ro" } else { "rw" },
                APP,
                100 + n as i64,
            )
            .await,
        );
    }
    let gone = active(&s, 9, "ro", APP, 50).await;
    s.mark_revoked(std::slice::from_ref(&gone.id), Utc::now())
        .await
        .unwrap();
    let ids = |v: Vec<Lease>| v.into_iter().map(|l| l.id).collect::<Vec<_>>();
    let page = |offset: usize, order: LeaseOrder, role: Option<&str>| {
        let s = s.clone();
        let f = LeaseFilter {
            role: role.map(str::to_string),
            limit: Some(3),
            offset: Some(offset),
            order,
            ..Default::default()
        };
        async move { ids(s.list(&f).await.unwrap()) }
    };
    let want: Vec<LeaseId> = made.iter().map(|l| l.id.clone()).collect();
    let first = LeaseOrder::ExpiresFirst;
    assert_eq!(page(0, first, None).await, want[0..3]);
    assert_eq!(page(3, first, None).await, want[3..6]);
    assert_eq!(page(6, first, None).await, want[6..7]);
    assert_eq!(page(9, first, None).await, Vec::<LeaseId>::new());
    let mut reversed = want.clone();
    reversed.reverse();
    assert_eq!(page(0, LeaseOrder::ExpiresLast, None).await, reversed[0..3]);
    assert_eq!(page(3, LeaseOrder::ExpiresLast, None).await, reversed[3..6]);
    let ro: Vec<LeaseId> = made.iter().step_by(2).map(|l| l.id.clone()).collect();
    assert_eq!(page(2, first, Some("ro")).await, ro[2..4]);
    let count = |f: LeaseFilter| {
        let s = s.clone();
        async move { s.count(&f).await.unwrap() }
    };
    // The total ignores limit and offset, and counts only what matches.
    assert_eq!(
        count(LeaseFilter {
            limit: Some(1),
            offset: Some(5),
            ..Default::default()
        })
        .await,
        7
    );
    assert_eq!(
        count(LeaseFilter {
            role: Some("ro".into()),
            ..Default::default()
        })
        .await,
        4
    );
    assert_eq!(
        count(LeaseFilter {
            states: vec![LeaseState::Revoked],
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(
        count(LeaseFilter {
            expiring_before: Some(made[2].expires_at),
            ..Default::default()
        })
        .await,
        3,
        "expiring_before includes a lease expiring at that instant"
    );
}

/// Two handles (two replicas) reaping at once split the due leases between
/// them: every lease claimed exactly once.
pub async fn case_concurrent_reapers_claim_disjoint_sets(open: Opener, shared: bool) {
    let first = open().await;
    // SQLite allows one process per file: its "second replica" is a second
    // task on the same handle, which must still claim disjointly.
    let second = if shared { open().await } else { first.clone() };
    let mut want = BTreeSet::new();
    for i in 0..60 {
        want.insert(active(&first, i, "ro", APP, 1).await.id);
    }
    let at = t(Utc::now(), 5);
    let reap = |s: Store, owner: &'static str| async move {
        let mut mine = Vec::new();
        loop {
            let got = s.claim_due(at, 7, &claim(owner, 60)).await.unwrap();
            if got.is_empty() {
                return mine;
            }
            mine.extend(got.into_iter().map(|l| l.id));
            tokio::task::yield_now().await;
        }
    };
    let (a, b) = tokio::join!(
        tokio::spawn(reap(first.clone(), "a")),
        tokio::spawn(reap(second.clone(), "b"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let all: Vec<LeaseId> = a.iter().chain(b.iter()).cloned().collect();
    let unique: BTreeSet<LeaseId> = all.iter().cloned().collect();
    assert_eq!(all.len(), unique.len(), "a lease was claimed twice");
    assert_eq!(unique, want, "a due lease was never claimed");
}

/// 50 intents at once for one identity and role with a cap of 5 — half of
/// them through a second handle (a second replica, on a shared store):
/// exactly 5 are written, whatever the interleaving.
pub async fn case_identity_cap_holds_under_concurrency(open: Opener, shared: bool) {
    let first = open().await;
    let second = if shared { open().await } else { first.clone() };
    let now = Utc::now();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let s = if i % 2 == 0 { &first } else { &second }.clone();
            tokio::spawn(async move {
                s.insert_intent(&lease(i, "ro", APP, now, 600), Some(5))
                    .await
            })
        })
        .collect();
    let (mut written, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => written += 1,
            Err(credbroker::Error::ResourceExhausted(m)) => {
                assert_eq!(
                    m,
                    "identity holds 5 live leases on role \"ro\", the most allowed; revoke some first"
                );
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((written, refused), (5, 45));
    assert_eq!(first.count_live(APP, "ro").await.unwrap(), 5);
    assert_eq!(second.count_live(APP, "ro").await.unwrap(), 5);

    // Per identity and role: the others are not held back.
    let other = "spiffe://credbroker.dev/ns/demo/other";
    first
        .insert_intent(&lease(60, "rw", APP, now, 600), Some(5))
        .await
        .unwrap();
    first
        .insert_intent(&lease(61, "ro", other, now, 600), Some(5))
        .await
        .unwrap();

    // Pending, active and failing all count; a revoked lease frees a slot.
    let mine = first
        .list(&LeaseFilter {
            role: Some("ro".into()),
            identity: Some(APP.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(mine.len(), 5);
    first.activate(&mine[0].id).await.unwrap();
    first.activate(&mine[1].id).await.unwrap();
    first
        .record_failure(&mine[1].id, "stuck", t(Utc::now(), 60), true)
        .await
        .unwrap();
    let refused = first
        .insert_intent(&lease(62, "ro", APP, now, 600), Some(5))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, credbroker::Error::ResourceExhausted(_)),
        "{refused}"
    );
    first
        .mark_revoked(std::slice::from_ref(&mine[0].id), Utc::now())
        .await
        .unwrap();
    second
        .insert_intent(&lease(63, "ro", APP, now, 600), Some(5))
        .await
        .unwrap();
    assert!(first
        .insert_intent(&lease(64, "ro", APP, now, 600), Some(5))
        .await
        .is_err());
    // No cap, no count.
    first
        .insert_intent(&lease(65, "ro", APP, now, 600), None)
        .await
        .unwrap();
    assert_eq!(first.count_live(APP, "ro").await.unwrap(), 6);
}

store_suite! {
    stores: [
        case_lifecycle,
        case_username_is_unique_per_database,
        case_claims_exclude_other_owners_until_they_expire,
        case_a_holder_claims_only_its_own_live_unclaimed_lease,
        case_claim_due_is_ordered_limited_and_only_due,
        case_only_the_claim_holder_marks_revoked,
        case_failures_are_recorded_and_release_the_claim,
        case_queries_see_only_what_they_ask_for,
        case_pages_are_counted_sorted_and_disjoint,
        case_busiest_identity_is_counted_per_role,
        case_a_drain_marks_the_holder_s_active_lease_due_at_its_deadline,
    ],
    openers: [
        case_concurrent_reapers_claim_disjoint_sets,
        case_identity_cap_holds_under_concurrency,
    ],
    homes: [],
}
