//! The access lifecycle on the fast tier: a real broker, audit chain and
//! config over the memory store and fake databases, a recording notifier.

use std::sync::Arc;
use std::time::Duration;

use super::notify::Recorder;
use super::*;
use crate::error::Error;
use crate::store::LeaseStore;
use crate::testkit::{role, Kit, APP};

const ALICE: &str = "spiffe://credbroker.dev/user/alice";
const DBA1: &str = "spiffe://credbroker.dev/user/dba-1";
const DBA2: &str = "spiffe://credbroker.dev/user/dba-2";
const DBA3: &str = "spiffe://credbroker.dev/user/dba-3";
const ONCALL: &str = "spiffe://credbroker.dev/user/oncall-1";

const POLICY: &str = "[access.orders-incident]\nroles = [\"ro\"]\n\
    requesters = [\"spiffe://credbroker.dev/user/*\"]\n\
    approvers = [\"spiffe://credbroker.dev/user/dba-*\"]\napprovals = 2\n\
    max_duration = \"4h\"\npending_for = \"30m\"\n\
    break_glass = [\"spiffe://credbroker.dev/user/oncall-*\"]\n\
    notify = \"https://chat.example.org/hooks/x\"\n";

fn id(s: &str) -> Identity {
    Identity::from_trusted(s.to_string())
}

fn setup(kit: Kit) -> (Kit, Access, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let access = Access::new(kit.broker.clone(), rec.clone());
    (kit, access, rec)
}

fn kit() -> Kit {
    Kit::new(
        "",
        &format!("{}{}{POLICY}", role("ro", "main"), role("rw", "main")),
    )
}

fn ask(reason: &str, secs: u64) -> NewRequest {
    NewRequest {
        roles: vec!["ro".into()],
        reason: reason.into(),
        duration: Some(Duration::from_secs(secs)),
        ..NewRequest::default()
    }
}

/// A break-glass request.
fn glass(reason: &str, secs: u64) -> NewRequest {
    NewRequest {
        break_glass: true,
        ..ask(reason, secs)
    }
}

/// Request `id` as stored.
async fn stored(access: &Access, id: &str) -> AccessRequest {
    let store = access.broker().store();
    store.get_access(id).await.unwrap().unwrap()
}

/// An admin's lock on `target`, for incident INC-8.
async fn lock(kit: &Kit, target: crate::lock::LockTarget) -> crate::lock::Lock {
    let admin = crate::testkit::admin();
    let locked = kit
        .broker
        .admin_lock(&admin, target, None, "INC-8".into(), false);
    locked.await.unwrap().0
}

#[tokio::test]
async fn request_approve_issue_then_revoke_ends_every_lease_and_notifies() {
    let (kit, access, rec) = setup(kit());
    let alice = id(ALICE);
    assert!(kit.broker.issue(&alice, "ro", None).await.is_err());
    let r = access
        .request(&alice, None, ask("INC-4711", 1800))
        .await
        .unwrap();
    assert_eq!(r.state, AccessState::Pending);
    let one = access.approve(&id(DBA1), &r.id).await.unwrap();
    assert_eq!(one.state, AccessState::Pending);
    assert!(kit.broker.issue(&alice, "ro", None).await.is_err());
    let two = access.approve(&id(DBA2), &r.id).await.unwrap();
    assert_eq!(two.state, AccessState::Granted);
    let until = two.until.unwrap();

    let a = kit
        .broker
        .issue(&alice, "ro", Some(Duration::from_secs(60)))
        .await
        .unwrap();
    let b = kit.broker.issue(&alice, "ro", None).await.unwrap();
    assert_eq!(a.lease.grant_id.as_deref(), Some(r.id.as_str()));
    assert!(a.lease.max_expires_at <= until);
    assert!(
        kit.broker.issue(&alice, "rw", None).await.is_err(),
        "rw is not granted"
    );
    // Renewal while the grant lives.
    kit.broker
        .renew(&alice, &a.lease.id, Some(Duration::from_secs(300)))
        .await
        .unwrap();

    let ended = access.revoke(&id(DBA3), &r.id, "done").await.unwrap();
    assert_eq!(ended.state, AccessState::Ended);
    assert!(ended.leases_done);
    for l in [&a.lease, &b.lease] {
        let stored = kit.store.get(&l.id).await.unwrap().unwrap();
        assert_eq!(stored.state, crate::lease::LeaseState::Revoked);
        assert!(
            kit.server.user(l.username.as_str()).is_none(),
            "user dropped"
        );
    }
    let e = kit
        .broker
        .renew(&alice, &a.lease.id, None)
        .await
        .unwrap_err();
    assert!(!matches!(e, Error::Internal(_)), "{e}");
    assert!(kit.broker.issue(&alice, "ro", None).await.is_err());

    assert_eq!(
        rec.kinds(),
        [
            "access.requested",
            "access.approved",
            "access.approved",
            "access.grant_ended"
        ]
    );
    let events = rec.0.lock().unwrap();
    let (url, ev) = &events[3];
    assert_eq!(url.as_deref(), Some("https://chat.example.org/hooks/x"));
    assert_eq!(ev["request_id"], r.id.as_str());
    assert_eq!(ev["actor"], DBA3);
    assert_eq!(ev["requester"], ALICE);
    // Never a secret: no password, DSN or user name in any event.
    for (_, e) in events.iter() {
        let text = e.to_string();
        assert!(!text.contains(a.password.expose()) && !text.contains(a.lease.username.as_str()));
    }
    let revoked: Vec<_> = kit
        .audit()
        .into_iter()
        .filter(|x| x.action == "grant_revoke")
        .collect();
    assert_eq!(revoked.len(), 2);
    assert!(revoked
        .iter()
        .all(|x| x.request_id.as_deref() == Some(r.id.as_str())));
}

#[tokio::test]
async fn racing_approvals_count_each_approver_once() {
    let (_kit, access, _) = setup(kit());
    let access = Arc::new(access);
    let r = access
        .request(&id(ALICE), None, ask("INC-1", 1800))
        .await
        .unwrap();
    let (d1, d2, d3) = (id(DBA1), id(DBA2), id(DBA3));
    let (x, y, z) = tokio::join!(
        access.approve(&d1, &r.id),
        access.approve(&d2, &r.id),
        access.approve(&d3, &r.id)
    );
    let oks = [x.is_ok(), y.is_ok(), z.is_ok()];
    let stored = stored(&access, &r.id).await;
    assert_eq!(stored.state, AccessState::Granted);
    // Two made the grant; the third found it decided (or, racing, came
    // first and counted): never more approvals than approvers who got Ok.
    assert_eq!(stored.approvals.len(), oks.iter().filter(|o| **o).count());
    assert!(stored.approvals.len() >= 2);
}

#[tokio::test]
async fn break_glass_grants_at_once_and_is_marked() {
    let (kit, access, rec) = setup(kit());
    let e = access
        .request(&id(ALICE), None, glass("INC-9", 600))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
    let g = access
        .request(&id(ONCALL), None, glass("INC-9", 600))
        .await
        .unwrap();
    assert_eq!(g.state, AccessState::Granted);
    assert!(g.break_glass);
    kit.broker.issue(&id(ONCALL), "ro", None).await.unwrap();
    assert_eq!(rec.kinds(), ["access.break_glass"]);
    let audit = kit.audit();
    let rec = audit
        .iter()
        .find(|r| r.action == "access_break_glass" && r.outcome == crate::audit::Outcome::Ok)
        .unwrap();
    assert!(rec.detail.as_deref().unwrap().contains("break_glass"));
}

#[tokio::test(start_paused = true)]
async fn undecided_requests_expire_and_grants_end_at_their_time() {
    let kit = Kit::paused("", &format!("{}{POLICY}", role("ro", "main")));
    let (kit, access, rec) = setup(kit);
    let pending = access
        .request(&id(ALICE), None, ask("INC-2", 1800))
        .await
        .unwrap();
    let g = access
        .request(&id(ONCALL), None, glass("INC-3", 900))
        .await
        .unwrap();
    let lease = kit.broker.issue(&id(ONCALL), "ro", None).await.unwrap();
    assert_eq!(access.run_due().await.unwrap(), 0, "nothing due yet");

    tokio::time::advance(Duration::from_secs(15 * 60)).await;
    assert_eq!(access.run_due().await.unwrap(), 1, "the grant ended");
    let ended = stored(&access, &g.id).await;
    assert_eq!(ended.state, AccessState::Ended);
    assert!(ended.leases_done);
    let l = kit.store.get(&lease.lease.id).await.unwrap().unwrap();
    assert_eq!(l.state, crate::lease::LeaseState::Revoked);

    tokio::time::advance(Duration::from_secs(15 * 60)).await;
    assert_eq!(access.run_due().await.unwrap(), 1, "the request expired");
    let expired = stored(&access, &pending.id).await;
    assert_eq!(expired.state, AccessState::Expired);
    let e = access.approve(&id(DBA1), &pending.id).await.unwrap_err();
    assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
    assert_eq!(access.run_due().await.unwrap(), 0);
    assert_eq!(
        rec.kinds(),
        [
            "access.requested",
            "access.break_glass",
            "access.grant_ended",
            "access.request_expired"
        ]
    );
}

#[tokio::test]
async fn locks_refuse_requests_approvals_and_use() {
    use crate::lock::LockTarget;
    let (kit, access, _) = setup(kit());
    let admin = crate::testkit::admin();
    let pattern = |p: &str| LockTarget::Identity(crate::policy::IdentityPattern::new(p).unwrap());
    let l = lock(&kit, pattern(ALICE)).await;
    let e = access
        .request(&id(ALICE), None, ask("INC-8", 600))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
    kit.broker.admin_unlock(&admin, &l.id).await.unwrap();
    let r = access
        .request(&id(ALICE), None, ask("INC-8", 600))
        .await
        .unwrap();
    let l = lock(&kit, pattern(DBA1)).await;
    assert!(access.approve(&id(DBA1), &r.id).await.is_err());
    assert!(access.deny(&id(DBA1), &r.id, "").await.is_err());
    kit.broker.admin_unlock(&admin, &l.id).await.unwrap();
    access.approve(&id(DBA2), &r.id).await.unwrap();
    access.approve(&id(DBA3), &r.id).await.unwrap();
    let l = lock(&kit, LockTarget::Role("ro".into())).await;
    assert!(
        kit.broker.issue(&id(ALICE), "ro", None).await.is_err(),
        "suspended"
    );
    kit.broker.admin_unlock(&admin, &l.id).await.unwrap();
    kit.broker.issue(&id(ALICE), "ro", None).await.unwrap();
    // A role lock asked for: refused to request it too.
    let _l = lock(&kit, LockTarget::Role("ro".into())).await;
    assert!(access
        .request(&id(ALICE), None, ask("INC-8", 600))
        .await
        .is_err());
    let _ = APP;
}

#[test]
fn request_ids_have_one_shape() {
    let a = new_id();
    assert_eq!(parse_id(&a).unwrap(), a);
    assert_ne!(new_id(), a);
    for bad in [
        "",
        "ar_",
        "l_abc",
        "ar_ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        &format!("{a}x"),
        "ar_'; drop table",
    ] {
        assert!(parse_id(bad).is_err(), "{bad}");
    }
}
