//! `store migrate`'s reads and writes (`live_page`, `import_leases`,
//! `import_locks`, `token_page`, `token_link_page`, `import_*`): every
//! store takes a copy in and gives the same copy back, field for field,
//! over more than one page.

use super::*;
use credbroker::lock::{LockId, LockTarget, NewLock};
use credbroker::store::access::{AccessFilter, AccessRequest, AccessState, AccessStore, Approval};
use credbroker::store::memory::MemoryStore;
use credbroker::store::migrate::{copy_all, ensure_empty, PAGE};
use credbroker::store::static_state::{CurrentUser, Pending, PendingKind, PreviousUser};
use credbroker::store::{LeaseStore, LockStore, StaticState, StaticStore, TokenStore, VaultToken};

/// A memory store with every kind of row: leases in every state (more
/// than two pages), locks, tokens and links, a static role mid-rotation.
async fn source() -> MemoryStore {
    let s = MemoryStore::new();
    let now = credbroker::lease::truncate_ms(Utc::now());
    let states = [
        LeaseState::Active,
        LeaseState::Pending,
        LeaseState::Failing,
        LeaseState::Draining,
        LeaseState::Revoked,
    ];
    let leases: Vec<Lease> = (0..PAGE * 2 + 3)
        .map(|i| {
            let state = states[i % states.len()];
            Lease {
                id: LeaseId::generate(),
                role: format!("r{}", i % 3),
                database: "main".into(),
                kind: if i % 2 == 0 {
                    BackendKind::Postgres
                } else {
                    BackendKind::Mysql
                },
                username: Username::from_store(format!("m_{i:06}")),
                user_host: if i % 2 == 0 {
                    String::new()
                } else {
                    "%".into()
                },
                identity: format!("spiffe://x/{}", i % 7),
                state,
                issued_at: now,
                expires_at: now + CDuration::seconds(600 + i as i64),
                max_expires_at: now + CDuration::hours(2),
                due_at: now + CDuration::seconds(30 + i as i64),
                revoked_at: (state == LeaseState::Revoked).then_some(now),
                revoke_attempts: if state == LeaseState::Failing { 9 } else { 0 },
                last_error: (state == LeaseState::Failing).then(|| "connection refused".into()),
                grant_id: (i % 4 == 1).then(|| format!("ar_{i:026}")),
            }
        })
        .collect();
    s.import_leases(&leases).await.unwrap();
    for (i, target) in [
        LockTarget::Role("r1".into()),
        LockTarget::StaticRole("st".into()),
    ]
    .into_iter()
    .enumerate()
    {
        s.insert_lock(&NewLock {
            id: LockId::generate(),
            target,
            reason: "INC-7".into(),
            created_by: "spiffe://credbroker.dev/dba/oncall".into(),
            duration: (i == 0).then(|| Duration::from_secs(3600)),
        })
        .await
        .unwrap();
    }
    let mut links = Vec::new();
    for i in 0..5u32 {
        s.insert_vault_token(
            &VaultToken {
                hash: format!("{i:064x}"),
                accessor: format!("acc{i}"),
                identity: "spiffe://x/1".into(),
                cert_sha256: "cd".repeat(32),
                issued_at: now,
                expires_at: now + CDuration::minutes(i64::from(i) + 1),
            },
            100,
        )
        .await
        .unwrap();
        links.push((format!("acc{i}"), leases[i as usize].id.clone()));
    }
    s.import_token_links(&links).await.unwrap();
    s.import_static(&StaticState {
        role: "st".into(),
        generation: 3,
        current: Some(CurrentUser {
            user: "st_a".into(),
            sealed: "v1:AAAA-sealed-current".into(),
            rotated_at: now,
            valid_until: now + CDuration::days(1),
        }),
        next_rotation_at: Some(now + CDuration::hours(1)),
        previous: Some(PreviousUser {
            user: "st_b".into(),
            retire_at: now + CDuration::minutes(5),
        }),
        pending: Some(Pending {
            kind: PendingKind::Rotate,
            user: "st_b".into(),
            sealed: "v1:BBBB-sealed-pending".into(),
            generation: 4,
            valid_until: now + CDuration::days(1),
        }),
        last_error: Some("timeout".into()),
    })
    .await
    .unwrap();
    // Access requests: a pending one, a live grant, an ended grant whose
    // leases are still being revoked (all three move), and a denied one
    // (stays behind).
    for (i, (state, leases_done)) in [
        (AccessState::Pending, false),
        (AccessState::Granted, false),
        (AccessState::Ended, false),
        (AccessState::Denied, true),
    ]
    .into_iter()
    .enumerate()
    {
        let granted = matches!(state, AccessState::Granted | AccessState::Ended);
        s.insert_access(&AccessRequest {
            id: format!("ar_{i:026}"),
            policy: "orders-incident".into(),
            roles: vec!["r1".into()],
            requester: "spiffe://x/user/ana".into(),
            reason: "INC-4711".into(),
            duration_secs: 3600,
            state,
            break_glass: false,
            created_at: now,
            pending_until: now + CDuration::minutes(30),
            approvals: vec![Approval {
                identity: "spiffe://x/user/dba-bo".into(),
                at: now,
            }],
            approvals_needed: 1,
            denied_by: (state == AccessState::Denied).then(|| "spiffe://x/user/dba-bo".into()),
            deny_reason: None,
            granted_at: granted.then_some(now),
            until: granted.then(|| now + CDuration::hours(1)),
            ended_at: (state == AccessState::Ended).then_some(now),
            ended_by: None,
            end_reason: None,
            leases_done,
            version: 2,
        })
        .await
        .unwrap();
    }
    s
}

/// Everything a store holds that the migration reads, in one comparable form.
async fn dump(s: &dyn credbroker::store::Store) -> String {
    // Page order is the store's collation's; compared sorted.
    let mut leases = Vec::new();
    let mut after = None;
    loop {
        let page = s.live_page(after.as_ref(), 100).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        leases.extend(page.into_iter().map(|l| format!("{l:?}")));
    }
    let n = leases.len();
    leases.sort();
    leases.dedup();
    assert_eq!(leases.len(), n, "a page walk saw a lease twice");
    let mut out = leases.join("\n") + "\n";
    let mut locks: Vec<_> = s
        .active_locks()
        .await
        .unwrap()
        .into_iter()
        .map(|l| {
            format!(
                "{:?}",
                (
                    l.id.as_str().to_string(),
                    l.target.kind(),
                    l.target.value().to_string(),
                    l.reason,
                    l.created_by,
                    l.created_at,
                    l.expires_at
                )
            )
        })
        .collect();
    locks.sort();
    out += &format!("{locks:?}\n{:?}\n", s.token_page(None, 1000).await.unwrap());
    out += &format!("{:?}\n", s.token_link_page(None, 1000).await.unwrap());
    out += &format!("{:?}\n", s.static_list().await.unwrap());
    let mut access = s
        .list_access(&AccessFilter {
            states: vec![
                AccessState::Pending,
                AccessState::Granted,
                AccessState::Ended,
            ],
            ..AccessFilter::default()
        })
        .await
        .unwrap();
    access.sort_by(|a, b| a.id.cmp(&b.id));
    out += &format!("{access:?}\n");
    out
}

/// Into this store and back out: the same rows, and the counts agree.
pub async fn case_migration_copies_in_and_out_field_for_field(s: Store) {
    let src = source().await;
    ensure_empty(s.as_ref()).await.unwrap();
    let moved = copy_all(&src, s.as_ref()).await.unwrap();
    let leases = moved.iter().find(|m| m.kind == "leases").unwrap();
    assert_eq!(
        leases.copied,
        (0..PAGE * 2 + 3).filter(|i| i % 5 != 4).count() as u64
    );
    assert_eq!(leases.in_target, leases.copied);
    let access = moved.iter().find(|m| m.kind == "access_requests").unwrap();
    assert_eq!(
        (access.copied, access.in_target),
        (3, 3),
        "the denied request stays behind"
    );
    let want = dump(&src).await;
    assert_eq!(dump(s.as_ref()).await, want, "copied in");
    // The page walk saw every live lease once.
    assert_eq!(want.matches("Lease {").count() as u64, leases.copied);
    let back = MemoryStore::new();
    copy_all(s.as_ref(), &back).await.unwrap();
    assert_eq!(dump(&back).await, want, "copied back out");
    // The store serves what it took: a lease renewable, a token readable.
    let active = s
        .list(&LeaseFilter {
            states: vec![LeaseState::Active],
            limit: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(s
        .set_expiry(&active[0].id, active[0].expires_at + CDuration::seconds(5))
        .await
        .unwrap());
    assert_eq!(s.vault_token_leases("acc2").await.unwrap().len(), 1);
    // Not empty now; a second copy is refused before it writes.
    let e = ensure_empty(s.as_ref()).await.unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
}

store_suite! {
    stores: [case_migration_copies_in_and_out_field_for_field],
    openers: [],
    homes: [],
}
