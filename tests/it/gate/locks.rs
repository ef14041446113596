//! Locks beyond the matrix: static-role reads on gRPC and the Vault API,
//! fifty issues racing `lock --revoke` (the race helpers are shared with
//! `mysql/`), and an identity lock ending its open watch streams.

use super::*;

/// Issue 25 item 1: a lock locks static roles too. An identity lock and a
/// database lock refuse `GetStaticCredential` and `static-creds` (audited
/// as denied, on each door), a static role can be locked by name, and its
/// `--revoke` replaces the passwords already read, so the one the holder
/// kept stops logging in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_locks_cover_static_role_reads_on_grpc_and_the_vault_api() {
    let (mut b, _users) = crate::static_roles::pg_static(2, "1h", "").await;
    b.enable_vault_api("").await;
    b.start_in_process().await;
    let d = Doors { b, console: 0 };
    let b = &d.b;
    let read = || static_read(b, "app", "st");
    let dref = &d;
    let vault_read = move |token: String| async move {
        dref.vault_call("app", &token, "GET", "/v1/database/static-creds/st", "")
            .await
    };
    let held = read().await.unwrap();
    crate::support::login(&b.db, &held.username, &held.password)
        .await
        .unwrap();
    let token = d.vault_login("app").await.unwrap();
    assert_eq!(vault_read(token.clone()).await.code, "200");

    let lock = |target: pb::lock_request::Target, revoke: bool| async move {
        let req = pb::LockRequest {
            target: Some(target),
            reason: "INC-25".into(),
            revoke,
            ..Default::default()
        };
        admin_lock_with(b, req).await.lock_id
    };
    let unlock = |lock_id: String| async move {
        b.admin("admin")
            .await
            .unlock(pb::UnlockRequest { lock_id })
            .await
            .unwrap();
    };
    use pb::lock_request::Target as T;

    // The identity: both doors refuse, and the Vault API refuses a new token.
    let id = lock(T::Identity(APP.into()), false).await;
    let e = read().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("INC-25"), "{e:?}");
    assert_eq!(vault_read(token.clone()).await.code, "403");
    assert!(d.vault_login("app").await.is_err());
    unlock(id).await;
    assert_eq!(vault_read(token.clone()).await.code, "200");

    // The database.
    let id = lock(T::Database("main".into()), false).await;
    assert_eq!(
        read().await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    assert_eq!(vault_read(token.clone()).await.code, "403");
    unlock(id).await;

    // The static role by name, with --revoke: the password already read
    // stops working at once.
    let id = lock(T::StaticRole("st".into()), true).await;
    assert_eq!(
        read().await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    assert_eq!(vault_read(token.clone()).await.code, "403");
    assert!(
        crate::support::login(&b.db, &held.username, &held.password)
            .await
            .is_err(),
        "the static password read before the lock still logs in"
    );
    unlock(id).await;
    let fresh = read().await.unwrap();
    assert_ne!(fresh.password, held.password);
    crate::support::login(&b.db, &fresh.username, &fresh.password)
        .await
        .unwrap();

    // Each refusal is one denied record, naming its door.
    let records = b.audit_records();
    let denied = |via: &str| {
        records
            .iter()
            .filter(|r| {
                r.action == "static_read"
                    && r.outcome == Outcome::Denied
                    && r.via.as_deref() == Some(via)
            })
            .count()
    };
    assert_eq!(denied("grpc_broker"), 3, "gRPC static reads refused");
    assert_eq!(denied("vault_api"), 3, "Vault static reads refused");
    // A static role cannot be locked by a typo.
    let e = b
        .admin("admin")
        .await
        .lock(pb::LockRequest {
            target: Some(T::StaticRole("nope".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let mut b = d.b;
    b.stop().await;
}

/// Issues `n` leases of `role` as `app` at once while an admin locks `app`
/// with `--revoke` in the middle of them; returns how many issues
/// succeeded. Used on PostgreSQL here and on MariaDB in `mysql.rs`.
pub(crate) async fn race_issues_against_lock_revoke(b: &TestBroker, role: &str, n: usize) -> usize {
    let mut issues = Vec::new();
    for i in 0..n {
        let client = b.client("app").await;
        let role = role.to_string();
        issues.push(tokio::spawn(async move {
            // Spread the issues over the lock's whole run.
            tokio::time::sleep(Duration::from_millis((i % 10) as u64 * 3)).await;
            let mut c = client;
            c.issue_lease(pb::IssueLeaseRequest {
                role,
                ttl_seconds: 0,
            })
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let race = pb::LockRequest {
        target: Some(pb::lock_request::Target::Identity(APP.into())),
        reason: "INC-25 race".into(),
        revoke: true,
        ..Default::default()
    };
    admin_lock_with(b, race).await;
    let mut ok = 0;
    for t in issues {
        if t.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    ok
}

/// The broker's live leases' user names (pending, active, failing).
pub(crate) async fn live_usernames(b: &TestBroker) -> BTreeSet<String> {
    let live = pb::ListLeasesRequest {
        states: vec![
            pb::LeaseState::Pending as i32,
            pb::LeaseState::Active as i32,
            pb::LeaseState::Failing as i32,
        ],
        ..Default::default()
    };
    b.list_as("admin", live)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.username)
        .collect()
}

/// Issue 25 item 6 on real PostgreSQL: 50 issues racing `lock --revoke`.
/// Afterwards no broker-made role exists whose lease is not live — and
/// since the lock revoked every lease it found and refuses the rest, none
/// exists at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_fifty_issues_racing_lock_revoke_leave_no_role_behind_a_dead_lease() {
    let mut b = TestBroker::start(&role("ro", "{db}", "5m", "10m", APP)).await;
    let issued = race_issues_against_lock_revoke(&b, "ro", 50).await;
    let last = std::sync::Mutex::new((BTreeSet::new(), BTreeSet::new()));
    let (bref, lref) = (&b, &last);
    let settled = crate::support::eventually(Duration::from_secs(30), move || async move {
        let roles = bref.broker_roles().await;
        let live = live_usernames(bref).await;
        let ok = roles.is_subset(&live) && live.is_empty();
        *lref.lock().unwrap() = (roles, live);
        ok
    })
    .await;
    let last = last.into_inner().unwrap();
    assert!(
        settled,
        "{issued} of 50 issued; roles in the database {:?}, live leases {:?}",
        last.0, last.1
    );
    b.stop().await;
}

/// A lock covers watch streams: the locked identity's open stream gets
/// the lock's own event first, then ends with the lock's refusal, and a
/// new watch is refused (audited). Another identity's stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_an_identity_lock_ends_the_identitys_open_watch_streams() {
    let roles = demo_role("ro", "5m", "10m");
    let mut b = TestBroker::start(&roles).await;
    let held = issue(&b, "app", "ro", 0).await.unwrap();
    let mut mine = b
        .client("app")
        .await
        .watch_leases(pb::WatchLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut theirs = b
        .client("other")
        .await
        .watch_leases(pb::WatchLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    lock_identity(&b, APP).await;
    let e = next_within_2s(&mut mine).await.unwrap().unwrap().unwrap();
    assert_eq!(
        (e.kind, e.lease_id.as_str()),
        (pb::LeaseEventKind::Locked as i32, held.lease_id.as_str()),
        "the lock's own event is delivered first: {e:?}"
    );
    let end = next_within_2s(&mut mine)
        .await
        .expect("the stream ended within 2 s");
    let err = end.expect_err("ended with the lock's refusal");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("INC-25 gate matrix"), "{err:?}");
    let again = b
        .client("app")
        .await
        .watch_leases(pb::WatchLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");
    // The other identity's stream is untouched: it still hears its own.
    let other_lease = issue(&b, "other", "ro", 0).await.unwrap();
    b.client("other")
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: other_lease.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = next_within_2s(&mut theirs).await.unwrap().unwrap().unwrap();
    assert_eq!(e.lease_id, other_lease.lease_id);
    assert!(b.audit_records().iter().any(|r| r.action == "watch"
        && r.identity == APP
        && r.outcome == Outcome::Denied
        && r.via.as_deref() == Some("grpc_broker")));
    b.stop().await;
}

async fn next_within_2s(
    s: &mut tonic::Streaming<pb::LeaseEvent>,
) -> Result<Result<Option<pb::LeaseEvent>, tonic::Status>, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(2), s.message()).await
}
