use super::*;
use crate::lease::LeaseState;
use crate::store::LeaseStore;
use crate::testkit::{admin, app, role, Kit};
use chrono::Utc;

async fn claimed(kit: &Kit, n: usize, role: &str) -> Vec<Lease> {
    let mut out = Vec::new();
    for _ in 0..n {
        let issued = kit.broker.issue(&app(), role, None).await.unwrap();
        let l = kit
            .store
            .claim_one(&issued.lease.id, &kit.broker.claim())
            .await
            .unwrap()
            .unwrap();
        out.push(l);
    }
    out
}

async fn state(kit: &Kit, id: &LeaseId) -> Lease {
    kit.store.get(id).await.unwrap().unwrap()
}

/// The engine revokes `leases` (claimed) for actor `t`.
async fn revoke(kit: &Kit, leases: Vec<Lease>, reason: Reason, mode: Mode) -> BulkOutcome {
    kit.broker
        .revoker()
        .revoke_claimed(leases, "t", reason, mode)
        .await
}

/// The revoke calls the fake database has seen so far.
fn revoke_calls_now(kit: &Kit) -> Vec<String> {
    kit.server
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("revoke"))
        .collect()
}

#[tokio::test]
async fn a_batch_is_one_call_and_reports_what_was_reassigned() {
    let kit = Kit::new("", &role("ro", "main"));
    let leases = claimed(&kit, 3, "ro").await;
    kit.server.give_objects(leases[1].username.as_str(), 4);
    let out = revoke(&kit, leases.clone(), Reason::Admin, Mode::UntilDropped).await;
    assert_eq!(out.revoked.len(), 3);
    assert!(out.failed.is_empty());
    let revokes = revoke_calls_now(&kit);
    assert_eq!(revokes.len(), 1, "{revokes:?}");
    for l in &leases {
        assert_eq!(state(&kit, &l.id).await.state, LeaseState::Revoked);
        assert!(kit.server.user(l.username.as_str()).is_none());
    }
    let moved: Vec<_> = kit
        .audit()
        .into_iter()
        .filter(|r| r.action == "admin_revoke")
        .map(|r| (r.username.unwrap(), r.objects_reassigned, r.reassigned_to))
        .collect();
    assert_eq!(moved.len(), 3);
    assert!(moved.contains(&(
        leases[1].username.to_string(),
        Some(4),
        Some("fake_admin".into())
    )));
}

#[tokio::test]
async fn the_role_owner_inherits_objects() {
    let kit = Kit::new(
        "",
        &(role("mig", "main").replace("allowed", "owner = \"app_owner\"\nallowed")),
    );
    let leases = claimed(&kit, 1, "mig").await;
    kit.server.give_objects(leases[0].username.as_str(), 2);
    revoke(&kit, leases, Reason::Expired, Mode::UntilDropped).await;
    let rec = kit
        .audit()
        .into_iter()
        .find(|r| r.action == "reap")
        .unwrap();
    assert_eq!(rec.objects_reassigned, Some(2));
    assert_eq!(rec.reassigned_to.as_deref(), Some("app_owner"));
}

#[tokio::test]
async fn one_bad_lease_does_not_hold_back_the_batch() {
    let kit = Kit::new("", &role("ro", "main"));
    let leases = claimed(&kit, 3, "ro").await;
    kit.server.refuse_revoke(leases[0].username.as_str());
    let out = revoke(&kit, leases.clone(), Reason::Expired, Mode::UntilDropped).await;
    assert_eq!(out.revoked.len(), 2);
    assert_eq!(out.failed.len(), 1);
    assert_eq!(out.failed[0].0, leases[0].id);
    let bad = state(&kit, &leases[0].id).await;
    assert_eq!(
        bad.state,
        LeaseState::Active,
        "one failure is not failing yet"
    );
    assert_eq!(bad.revoke_attempts, 1);
    assert!(bad.last_error.unwrap().contains("refuses to drop"));
    assert!(bad.due_at > Utc::now(), "retry is scheduled later");
    assert_eq!(kit.store.claim_owner(&bad.id), None, "claim released");
    // Batch first, then one call per lease.
    let revokes = revoke_calls_now(&kit).len();
    assert_eq!(revokes, 4);
}

#[tokio::test]
async fn an_unreachable_database_is_not_split_and_retried_within_seconds() {
    let kit = Kit::new("", &role("ro", "main"));
    let leases = claimed(&kit, 4, "ro").await;
    kit.server.set_unavailable(true);
    let out = revoke(&kit, leases.clone(), Reason::Expired, Mode::UntilDropped).await;
    assert_eq!(out.failed.len(), 4);
    let revokes = revoke_calls_now(&kit).len();
    assert_eq!(revokes, 1, "a database that is away is asked once");
    for l in &leases {
        let s = state(&kit, &l.id).await;
        assert!(s.due_at <= Utc::now() + chrono::Duration::seconds(2));
    }
}

#[tokio::test]
async fn failing_after_n_attempts_and_still_retried() {
    let kit = Kit::new(
        "[reaper]\nfailing_after_attempts = 3\n",
        &role("ro", "main"),
    );
    let leases = claimed(&kit, 1, "ro").await;
    kit.server.refuse_revoke(leases[0].username.as_str());
    for attempt in 1..=3u32 {
        let l = kit
            .store
            .claim_one(&leases[0].id, &kit.broker.claim())
            .await
            .unwrap()
            .unwrap();
        revoke(&kit, vec![l], Reason::Expired, Mode::UntilDropped).await;
        let s = state(&kit, &leases[0].id).await;
        assert_eq!(s.revoke_attempts, attempt);
        let want = if attempt < 3 {
            LeaseState::Active
        } else {
            LeaseState::Failing
        };
        assert_eq!(s.state, want, "after attempt {attempt}");
    }
    // Its login is gone whatever the drop did.
    assert!(!kit.server.user(leases[0].username.as_str()).unwrap().login);
}

#[tokio::test]
async fn forced_forgets_only_an_account_the_database_confirms_disabled() {
    let kit = Kit::new("", &role("ro", "main"));
    let leases = claimed(&kit, 2, "ro").await;
    for l in &leases {
        kit.server.refuse_revoke(l.username.as_str());
    }
    let out = revoke(&kit, vec![leases[0].clone()], Reason::Admin, Mode::Forced).await;
    assert_eq!(out.revoked, vec![leases[0].id.clone()]);
    assert_eq!(state(&kit, &leases[0].id).await.state, LeaseState::Revoked);
    let rec = kit
        .audit()
        .into_iter()
        .find(|r| {
            r.lease_id.as_deref() == Some(leases[0].id.as_str()) && r.action == "admin_revoke"
        })
        .unwrap();
    assert!(rec.detail.unwrap().contains("forced"));

    kit.server.refuse_disable(true);
    let out = revoke(&kit, vec![leases[1].clone()], Reason::Admin, Mode::Forced).await;
    assert!(out.revoked.is_empty());
    assert!(
        out.failed[0]
            .1
            .to_string()
            .contains("forced revoke refused"),
        "{:?}",
        out.failed
    );
    let kept = state(&kit, &leases[1].id).await;
    assert_ne!(
        kept.state,
        LeaseState::Revoked,
        "an unverified account stays tracked"
    );
    assert_eq!(kept.revoke_attempts, 1);
}

#[tokio::test]
async fn a_claim_lost_mid_revocation_is_neither_marked_nor_audited_by_us() {
    let kit = Kit::new("", &role("ro", "main"));
    let leases = claimed(&kit, 1, "ro").await;
    let (store, id) = (kit.store.clone(), leases[0].id.clone());
    kit.server
        .before_next_revoke(move || store.steal_claim(&id, "another-replica"));
    let out = revoke(&kit, leases.clone(), Reason::Expired, Mode::UntilDropped).await;
    assert!(out.revoked.is_empty());
    assert!(
        matches!(&out.failed[0].1, Error::FailedPrecondition(m) if m == CLAIM_LOST),
        "{:?}",
        out.failed
    );
    assert_ne!(state(&kit, &leases[0].id).await.state, LeaseState::Revoked);
    assert!(!kit.audit().iter().any(|r| r.action == "reap"));
}

#[tokio::test]
async fn a_store_that_is_away_when_marking_leaves_the_lease_live() {
    let kit = Kit::new("", &role("ro", "main"));
    let leases = claimed(&kit, 1, "ro").await;
    let store = kit.store.clone();
    kit.server.before_next_revoke(move || store.fail_next(1));
    let out = revoke(&kit, leases.clone(), Reason::Expired, Mode::UntilDropped).await;
    assert!(out.revoked.is_empty());
    let e = &out.failed[0].1;
    // The store's own error, which names the store to every caller.
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    assert!(e.caller_message().starts_with("lease store"), "{e}");
    // Invariant 2: still live, so the next pass finds the user gone and
    // marks it then.
    assert_ne!(state(&kit, &leases[0].id).await.state, LeaseState::Revoked);
}

#[tokio::test]
async fn admin_revoke_by_database_touches_only_that_database() {
    let kit = Kit::new("", &(role("a", "main") + &role("b", "second")));
    let a = claimed(&kit, 2, "a").await;
    let b = kit.broker.issue(&app(), "b", None).await.unwrap();
    for l in &a {
        kit.store.release(&l.id).await.unwrap();
    }
    let out = kit
        .broker
        .admin_revoke(
            &admin(),
            &crate::broker::Selector::Database("main".into()),
            Mode::UntilDropped,
        )
        .await
        .unwrap();
    assert_eq!(out.revoked.len(), 2);
    assert!(kit.server.user(b.lease.username.as_str()).is_some());
    assert_eq!(state(&kit, &b.lease.id).await.state, LeaseState::Active);
}

/// Waits until the fake database has seen `n` revoke calls.
async fn revoke_calls(kit: &Kit, n: usize) -> Vec<String> {
    for _ in 0..2000 {
        let calls = revoke_calls_now(kit);
        if calls.len() >= n {
            return calls;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("fewer than {n} revoke calls: {:?}", kit.server.calls());
}

/// Waits (two seconds at most) for `lease` to be marked revoked, then
/// checks that it is and that its database user is gone.
async fn revoked_in_the_end(kit: &Kit, lease: &Lease) {
    for _ in 0..2000 {
        if state(kit, &lease.id).await.state == LeaseState::Revoked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(state(kit, &lease.id).await.state, LeaseState::Revoked);
    assert!(kit.server.user(lease.username.as_str()).is_none());
}

/// Issues `n` leases and starts a holder revoke of each: the first
/// [`ROUNDS_IN_FLIGHT`] one by one (each holds its round at the gate),
/// the rest while they wait.
async fn revokes_behind_a_slow_round(
    kit: &Kit,
    n: usize,
    who: impl Fn(usize) -> crate::identity::Identity,
) -> (
    Vec<Lease>,
    Vec<tokio::task::JoinHandle<Result<Lease>>>,
    Arc<tokio::sync::Semaphore>,
) {
    let mut leases = Vec::new();
    for _ in 0..n {
        leases.push(kit.broker.issue(&app(), "ro", None).await.unwrap().lease);
    }
    let gate = kit.server.gate_revokes();
    let mut tasks = Vec::new();
    for (i, l) in leases.iter().enumerate() {
        let (broker, id, who) = (kit.broker.clone(), l.id.clone(), who(i));
        tasks.push(tokio::spawn(async move { broker.revoke(&who, &id).await }));
        if i < ROUNDS_IN_FLIGHT {
            revoke_calls(kit, i + 1).await;
        }
    }
    // Every later revoke has claimed its lease and queued behind the
    // first round, which waits at the gate.
    for _ in 0..2000 {
        if kit.broker.revoker().queued("main") == n - ROUNDS_IN_FLIGHT {
            return (leases, tasks, gate);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the revokes did not queue");
}

#[tokio::test]
async fn holder_revokes_that_arrive_together_share_one_round() {
    let kit = Kit::new("", &role("ro", "main"));
    let (leases, tasks, gate) =
        revokes_behind_a_slow_round(&kit, 5, |i| if i == 4 { admin() } else { app() }).await;
    gate.add_permits(3);
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().state, LeaseState::Revoked);
    }
    let calls = revoke_calls(&kit, 3).await;
    let names: Vec<String> = leases[2..].iter().map(|l| l.username.to_string()).collect();
    assert_eq!(
        calls,
        vec![
            format!("revoke {}", leases[0].username),
            format!("revoke {}", leases[1].username),
            format!("revoke {}", names.join(","))
        ],
        "the first two alone, the three that queued behind them in one call"
    );
    for l in &leases {
        assert_eq!(state(&kit, &l.id).await.state, LeaseState::Revoked);
        assert!(kit.server.user(l.username.as_str()).is_none());
    }
    // Each record names its own actor, though one round served them.
    let actors: Vec<(String, String)> = kit
        .audit()
        .into_iter()
        .filter(|r| r.action == "revoke")
        .map(|r| (r.lease_id.unwrap(), r.identity))
        .collect();
    assert_eq!(actors.len(), 5, "{actors:?}");
    for (i, l) in leases.iter().enumerate() {
        let who = if i == 4 { admin() } else { app() };
        assert!(
            actors.contains(&(l.id.to_string(), who.as_str().to_string())),
            "{actors:?}"
        );
    }
}

#[tokio::test]
async fn a_refused_lease_in_a_shared_round_fails_alone() {
    let kit = Kit::new("", &role("ro", "main"));
    let (leases, tasks, gate) = revokes_behind_a_slow_round(&kit, 5, |_| app()).await;
    kit.server.refuse_revoke(leases[3].username.as_str());
    // The first two rounds, the shared one, then one call per lease of it.
    gate.add_permits(6);
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (3, Err(Error::Unavailable(m))) => assert!(m.contains("will be retried"), "{m}"),
            (3, other) => panic!("the refused lease: {other:?}"),
            (_, r) => assert_eq!(r.as_ref().unwrap().state, LeaseState::Revoked),
        }
    }
    let bad = state(&kit, &leases[3].id).await;
    assert_eq!(bad.state, LeaseState::Active);
    assert_eq!(bad.revoke_attempts, 1);
    assert!(kit.server.user(leases[3].username.as_str()).is_some());
}

#[tokio::test]
async fn a_caller_that_goes_away_does_not_cancel_the_round() {
    let kit = Kit::new("", &role("ro", "main"));
    let (leases, tasks, gate) = revokes_behind_a_slow_round(&kit, 4, |_| app()).await;
    // The first caller, whose request started a round, hangs up; so
    // does one of those waiting behind it.
    tasks[0].abort();
    tasks[2].abort();
    gate.add_permits(3);
    tasks.into_iter().nth(3).unwrap().await.unwrap().unwrap();
    for l in &leases {
        revoked_in_the_end(&kit, l).await;
    }
}

/// A revoke with no round to share runs on its caller's task; a
/// caller that hangs up at the database still gets its lease dropped,
/// marked and audited.
#[tokio::test]
async fn a_lone_revoke_whose_caller_goes_away_is_finished_and_audited() {
    let kit = Kit::new("", &role("ro", "main"));
    let lease = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
    let gate = kit.server.gate_revokes();
    let (broker, id) = (kit.broker.clone(), lease.id.clone());
    let task = tokio::spawn(async move { broker.revoke(&app(), &id).await });
    revoke_calls(&kit, 1).await;
    assert_eq!(kit.broker.revoker().queued("main"), 0, "it ran alone");
    task.abort();
    gate.add_permits(1);
    revoked_in_the_end(&kit, &lease).await;
    let audited = kit
        .audit()
        .into_iter()
        .any(|r| r.action == "revoke" && r.lease_id.as_deref() == Some(lease.id.as_str()));
    assert!(audited, "{:?}", kit.audit());
}

/// The round writes its records in a task of its own: each still says
/// which front end its request came through.
#[tokio::test]
async fn a_shared_round_keeps_each_request_s_front_end_in_its_record() {
    let kit = Kit::new("", &role("ro", "main"));
    let a = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
    let b = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
    crate::audit::via("vault_api", kit.broker.revoke(&app(), &a.id))
        .await
        .unwrap();
    kit.broker.revoke(&app(), &b.id).await.unwrap();
    let via = |id: &LeaseId| {
        kit.audit()
            .into_iter()
            .find(|r| r.action == "revoke" && r.lease_id.as_deref() == Some(id.as_str()))
            .unwrap()
            .via
    };
    assert_eq!(via(&a.id).as_deref(), Some("vault_api"));
    assert_eq!(via(&b.id), None);
}
