//! One lease-store suite, run against every store: each `case_*` function
//! takes an `Arc<dyn LeaseStore>` (and, for the concurrency cases, a way to
//! open a second handle on the same store), and `store_suite!` instantiates
//! it once for SQLite and once for PostgreSQL.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as CDuration, Utc};
use credbroker::config::SecretSource;
use credbroker::lease::{BackendKind, Lease, LeaseId, LeaseState, Username};
use credbroker::metrics::Metrics;
use credbroker::pruner::Pruner;
use credbroker::store::postgres::PostgresStore;
use credbroker::store::{Claim, FailureRecord, LeaseFilter, LeaseOrder, LeaseStore};

use crate::support::*;

type Store = Arc<dyn LeaseStore>;
type Opener = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Store> + Send>> + Send + Sync>;

/// Where a store under test lives; dropped after the test.
pub struct StoreHome {
    _dir: tempfile::TempDir,
    pub open: Opener,
    /// The PostgreSQL database name, for direct checks.
    pub pg_database: Option<String>,
    /// The SQLite file, for direct (test-only) writes while it is closed.
    pub sqlite_path: Option<PathBuf>,
}

pub async fn sqlite_home() -> StoreHome {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let url = format!("sqlite://{}", path.display());
    StoreHome {
        _dir: dir,
        open: Arc::new(move || {
            let url = url.clone();
            Box::pin(async move { credbroker::store::open(&url).await.unwrap() })
        }),
        pg_database: None,
        sqlite_path: Some(path),
    }
}

/// A fresh database in the shared throwaway cluster, reached with the
/// superuser password from a file, as a deployment would.
pub async fn postgres_home() -> StoreHome {
    let dir = tempfile::tempdir().unwrap();
    let db = unique("store");
    cluster().create_database(&db).await.unwrap();
    let secret = dir.path().join("store-password");
    std::fs::write(&secret, cluster().superuser_password()).unwrap();
    let url = cluster().url(&db);
    StoreHome {
        _dir: dir,
        open: Arc::new(move || {
            let (url, secret) = (url.clone(), secret.clone());
            Box::pin(async move {
                let s = PostgresStore::open(&url, &SecretSource::File(secret))
                    .await
                    .unwrap();
                Arc::new(s) as Store
            })
        }),
        pg_database: Some(db),
        sqlite_path: None,
    }
}

fn t(base: DateTime<Utc>, secs: i64) -> DateTime<Utc> {
    base + CDuration::seconds(secs)
}

/// Whole milliseconds: both stores keep at least that precision.
fn ms(d: DateTime<Utc>) -> i64 {
    d.timestamp_millis()
}

fn lease(n: usize, role: &str, identity: &str, now: DateTime<Utc>, ttl: i64) -> Lease {
    Lease {
        id: LeaseId::generate(),
        role: role.into(),
        database: "main".into(),
        kind: BackendKind::Postgres,
        username: Username::from_store(format!("u_{n}_{}", &unique("")[1..9])),
        user_host: String::new(),
        identity: identity.into(),
        state: LeaseState::Pending,
        issued_at: now,
        expires_at: t(now, ttl),
        max_expires_at: t(now, ttl * 4),
        due_at: t(now, 60),
        revoked_at: None,
        revoke_attempts: 0,
        last_error: None,
    }
}

fn claim(owner: &str, secs: i64) -> Claim {
    Claim {
        owner: owner.into(),
        until: Utc::now() + CDuration::seconds(secs),
    }
}

async fn active(s: &Store, n: usize, role: &str, who: &str, ttl: i64) -> Lease {
    let now = Utc::now();
    let l = lease(n, role, who, now, ttl);
    s.insert_intent(&l, None).await.unwrap();
    s.activate(&l.id).await.unwrap();
    s.get(&l.id).await.unwrap().unwrap()
}

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

/// `n` rows written around the store API, for volume. `revoked_at` is set
/// on live rows too (no store does that), to show the pruner goes by state.
pub struct Bulk {
    pub tag: &'static str,
    pub n: usize,
    pub state: LeaseState,
    pub revoked_at: DateTime<Utc>,
}

/// Test-only bulk insert, straight into the store's table. The store must
/// be closed: SQLite holds its file exclusively while open.
pub async fn bulk_insert(home: &StoreHome, batches: &[Bulk]) {
    let now = Utc::now();
    let (expires, due) = (t(now, 3600), t(now, 3600));
    if let Some(path) = home.sqlite_path.clone() {
        let rows: Vec<(String, usize, String, i64)> = batches
            .iter()
            .map(|b| {
                (
                    b.tag.to_string(),
                    b.n,
                    b.state.as_str().to_string(),
                    ms(b.revoked_at),
                )
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            let mut c = rusqlite::Connection::open(path).unwrap();
            let tx = c.transaction().unwrap();
            {
                let mut insert = tx
                    .prepare(
                        "INSERT INTO leases (id, role, database, kind, username, identity, state, \
                         issued_at, expires_at, max_expires_at, due_at, revoked_at) \
                         VALUES (?1, 'ro', 'main', 'postgres', ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8)",
                    )
                    .unwrap();
                for (tag, n, state, revoked_at) in rows {
                    for i in 0..n {
                        insert
                            .execute(rusqlite::params![
                                format!("l_{tag}{i:010}"),
                                format!("b_{tag}_{i}"),
                                APP,
                                state,
                                ms(now),
                                ms(expires),
                                ms(due),
                                revoked_at
                            ])
                            .unwrap();
                    }
                }
            }
            tx.commit().unwrap();
        })
        .await
        .unwrap();
        return;
    }
    let c = cluster()
        .connect(home.pg_database.as_deref().unwrap())
        .await
        .unwrap();
    for b in batches {
        c.execute(
            "INSERT INTO credbroker_leases (id, role, database, kind, username, identity, state, \
             issued_at, expires_at, max_expires_at, due_at, revoked_at) \
             SELECT 'l_' || $1::text || lpad(g::text, 10, '0'), 'ro', 'main', 'postgres', \
                    'b_' || $1::text || '_' || g, $2::text, $3::text, $4, $5, $5, $6, $7 \
             FROM generate_series(1, $8::int) g",
            &[
                &b.tag,
                &APP,
                &b.state.as_str(),
                &now,
                &expires,
                &due,
                &b.revoked_at,
                &(b.n as i32),
            ],
        )
        .await
        .unwrap();
    }
}

/// 100,000 old revoked rows go, in batches, while intents keep being
/// written and activated; every live row and every recent revoked one stays.
pub async fn case_pruning_deletes_only_old_revoked_rows(home: StoreHome) {
    let now = Utc::now();
    let before = t(now, -24 * 3600);
    let (old, recent) = (t(now, -30 * 24 * 3600), t(now, -3600));

    let s = (home.open)().await;
    let act = active(&s, 1, "ro", APP, 600).await;
    let pend = lease(2, "ro", APP, now, 600);
    s.insert_intent(&pend, None).await.unwrap();
    let fail = active(&s, 3, "ro", APP, 600).await;
    s.record_failure(&fail.id, "stuck", t(now, 60), true)
        .await
        .unwrap();
    let kept = active(&s, 4, "ro", APP, 600).await;
    s.mark_revoked(std::slice::from_ref(&kept.id), recent)
        .await
        .unwrap();
    let gone = active(&s, 5, "ro", APP, 600).await;
    s.mark_revoked(std::slice::from_ref(&gone.id), old)
        .await
        .unwrap();
    drop(s);
    let loaded = Instant::now();
    bulk_insert(
        &home,
        &[
            Bulk {
                tag: "old",
                n: 100_000,
                state: LeaseState::Revoked,
                revoked_at: old,
            },
            Bulk {
                tag: "new",
                n: 500,
                state: LeaseState::Revoked,
                revoked_at: recent,
            },
            Bulk {
                tag: "act",
                n: 200,
                state: LeaseState::Active,
                revoked_at: old,
            },
            Bulk {
                tag: "fai",
                n: 200,
                state: LeaseState::Failing,
                revoked_at: old,
            },
            Bulk {
                tag: "pen",
                n: 100,
                state: LeaseState::Pending,
                revoked_at: old,
            },
        ],
    )
    .await;
    let loaded = loaded.elapsed();
    let s = (home.open)().await;

    // The lease path, running all along: issue (capped, as a broker does),
    // activate, and now and then revoke (a recent revocation: kept).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut live, mut revoked, mut worst) = (0usize, 0usize, Duration::ZERO);
            let mut errors = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let l = lease(1_000_000 + i, "rw", APP, Utc::now(), 600);
                let started = Instant::now();
                let r = match s.insert_intent(&l, Some(1_000_000)).await {
                    Ok(()) => s.activate(&l.id).await,
                    Err(e) => Err(e),
                };
                worst = worst.max(started.elapsed());
                if let Err(e) = r {
                    errors.push(e.to_string());
                    continue;
                }
                if i % 10 == 0 {
                    s.mark_revoked(std::slice::from_ref(&l.id), Utc::now())
                        .await
                        .unwrap();
                    revoked += 1;
                } else {
                    live += 1;
                }
            }
            (live, revoked, worst, errors)
        })
    };
    // Let the writer get going first, so pruning overlaps it throughout.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let metrics = Arc::new(Metrics::new());
    let pruner = Pruner::new(s.clone(), metrics.clone());
    let started = Instant::now();
    let pruned = pruner.prune(before).await.unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (live, revoked, worst, errors) = writer.await.unwrap();
    eprintln!(
        "pruning: bulk load {loaded:?}; {pruned} rows pruned in {took:?}; \
         meanwhile {} intents written and activated, slowest {worst:?}",
        live + revoked
    );
    assert!(
        errors.is_empty(),
        "the lease path failed during pruning: {errors:?}"
    );
    assert!(
        live + revoked > 10,
        "the writer hardly ran: {}",
        live + revoked
    );
    assert_eq!(pruned, 100_001);
    assert_eq!(metrics.pruned.get(), 100_001);

    let list = |states: Vec<LeaseState>| {
        let s = s.clone();
        async move {
            s.list(&LeaseFilter {
                states,
                ..Default::default()
            })
            .await
            .unwrap()
        }
    };
    let left = list(vec![LeaseState::Revoked]).await;
    assert!(left.iter().all(|l| l.revoked_at.unwrap() >= before));
    assert_eq!(left.len(), 500 + 1 + revoked, "a recent revoked row went");
    let live_rows = list(vec![
        LeaseState::Pending,
        LeaseState::Active,
        LeaseState::Failing,
    ])
    .await;
    assert_eq!(live_rows.len(), 500 + 3 + live, "a live row went");
    for l in [&act, &pend, &fail, &kept] {
        assert!(s.get(&l.id).await.unwrap().is_some(), "{} went", l.id);
    }
    assert!(s.get(&gone.id).await.unwrap().is_none());
    assert_eq!(
        pruner.prune(before).await.unwrap(),
        0,
        "nothing is left to prune"
    );
    assert_eq!(
        s.prune_revoked(Utc::now(), 10).await.unwrap(),
        10,
        "a batch is at most `limit` rows"
    );
}

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

/// Vault-API tokens: stored by hash, found by hash only, renewed, linked
/// to the leases they created, deleted with their links, pruned once
/// expired — and a second token's links are never touched.
async fn case_vault_tokens_and_their_lease_links(s: Store) {
    use credbroker::store::VaultToken;
    let now = credbroker::lease::truncate_ms(Utc::now());
    let token = |n: u8, expires: i64| VaultToken {
        hash: format!("{n:02x}").repeat(32),
        accessor: format!("acc{n}"),
        identity: APP.to_string(),
        cert_sha256: "ab".repeat(32),
        issued_at: now,
        expires_at: t(now, expires),
    };
    let (a, b, old) = (token(1, 3600), token(2, 3600), token(3, -10));
    for tok in [&a, &b, &old] {
        assert!(s.insert_vault_token(tok, 32).await.unwrap().is_empty());
    }
    assert!(
        s.insert_vault_token(&a, 32).await.is_err(),
        "a token hash is stored once"
    );
    assert_eq!(s.vault_token(&a.hash).await.unwrap().as_ref(), Some(&a));
    assert_eq!(s.vault_token(&"ff".repeat(32)).await.unwrap(), None);

    assert!(s
        .set_vault_token_expiry(&a.hash, t(now, 7200))
        .await
        .unwrap());
    assert!(!s
        .set_vault_token_expiry(&"ff".repeat(32), now)
        .await
        .unwrap());
    assert_eq!(
        ms(s.vault_token(&a.hash).await.unwrap().unwrap().expires_at),
        ms(t(now, 7200))
    );

    let (l1, l2, l3) = (
        active(&s, 1, "ro", APP, 600).await,
        active(&s, 2, "ro", APP, 600).await,
        active(&s, 3, "ro", APP, 600).await,
    );
    s.link_vault_lease(&a.accessor, &l1.id).await.unwrap();
    s.link_vault_lease(&a.accessor, &l2.id).await.unwrap();
    s.link_vault_lease(&a.accessor, &l2.id).await.unwrap(); // idempotent
    s.link_vault_lease(&b.accessor, &l3.id).await.unwrap();
    s.link_vault_lease(&old.accessor, &l3.id).await.unwrap();
    let mut got = s.vault_token_leases(&a.accessor).await.unwrap();
    got.sort();
    let mut want = vec![l1.id.clone(), l2.id.clone()];
    want.sort();
    assert_eq!(got, want);

    assert!(s.delete_vault_token(&a.hash).await.unwrap());
    assert!(!s.delete_vault_token(&a.hash).await.unwrap());
    assert!(s.vault_token(&a.hash).await.unwrap().is_none());
    assert!(s.vault_token_leases(&a.accessor).await.unwrap().is_empty());

    assert_eq!(
        s.prune_vault_tokens(now).await.unwrap(),
        1,
        "only the expired one"
    );
    assert!(s.vault_token(&old.hash).await.unwrap().is_none());
    assert!(s
        .vault_token_leases(&old.accessor)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.vault_token_leases(&b.accessor).await.unwrap(),
        vec![l3.id.clone()]
    );
    assert!(s.vault_token(&b.hash).await.unwrap().is_some());
    // Lease rows are untouched by any of it.
    assert!(s.get(&l1.id).await.unwrap().is_some());
}

/// A Vault-API token as a login stores it: `n` names it, `identity` and
/// `cert` bind it, it expires `expires` seconds after `now`.
fn vault_token(
    n: usize,
    identity: &str,
    cert: &str,
    now: DateTime<Utc>,
    expires: i64,
) -> credbroker::store::VaultToken {
    let now = credbroker::lease::truncate_ms(now);
    credbroker::store::VaultToken {
        hash: format!("{:064x}", n + 1),
        accessor: format!("acc{n:04}"),
        identity: identity.to_string(),
        cert_sha256: cert.repeat(32),
        issued_at: now,
        expires_at: t(now, expires),
    }
}

/// `max_tokens_per_identity`: a login beyond the cap evicts the
/// identity's token nearest its expiry (an expired one first, a renewed
/// one last), deletes it with its lease links (the lease rows stay), and
/// says which; another identity's tokens are never touched; a refused
/// insert (a hash stored twice) evicts nothing.
async fn case_vault_tokens_are_capped_per_identity(s: Store) {
    let other = "spiffe://credbroker.dev/ns/demo/other";
    let now = Utc::now();
    let (t1, t2, t3) = (
        vault_token(1, APP, "ab", now, 100),
        vault_token(2, APP, "cd", now, 200),
        vault_token(3, APP, "ab", now, 300),
    );
    let theirs = vault_token(9, other, "ef", now, 10);
    for tok in [&t1, &theirs, &t2, &t3] {
        assert!(s.insert_vault_token(tok, 3).await.unwrap().is_empty());
    }
    let lease = active(&s, 1, "ro", APP, 600).await;
    s.link_vault_lease(&t1.accessor, &lease.id).await.unwrap();

    let t4 = vault_token(4, APP, "ab", now, 400);
    assert_eq!(
        s.insert_vault_token(&t4, 3).await.unwrap(),
        vec![t1.accessor.clone()],
        "the one nearest its expiry makes room"
    );
    assert!(s.vault_token(&t1.hash).await.unwrap().is_none(), "evicted");
    assert!(s.vault_token_leases(&t1.accessor).await.unwrap().is_empty());
    // A request that authenticated just before the eviction links no
    // lease to the gone token: refused, nothing left behind.
    let late = active(&s, 2, "ro", APP, 600).await;
    match s.link_vault_lease(&t1.accessor, &late.id).await {
        Err(credbroker::Error::PermissionDenied(m)) => assert!(m.contains("log in again"), "{m}"),
        other => panic!("a link to an evicted token: {other:?}"),
    }
    assert!(s.vault_token_leases(&t1.accessor).await.unwrap().is_empty());
    assert!(
        s.get(&lease.id).await.unwrap().is_some(),
        "its lease stays, to end at its own expiry"
    );
    for tok in [&t2, &t3, &t4, &theirs] {
        assert!(s.vault_token(&tok.hash).await.unwrap().is_some());
    }

    // A renewed token is a live client's: the unrenewed one goes first.
    assert!(s
        .set_vault_token_expiry(&t2.hash, t(now, 900))
        .await
        .unwrap());
    let t5 = vault_token(5, APP, "ab", now, 500);
    assert_eq!(
        s.insert_vault_token(&t5, 3).await.unwrap(),
        vec![t3.accessor.clone()]
    );

    // The same hash twice is refused and evicts nothing.
    assert!(s.insert_vault_token(&t5, 3).await.is_err());
    for tok in [&t2, &t4, &t5] {
        assert!(s.vault_token(&tok.hash).await.unwrap().is_some());
    }

    // A smaller cap (a config change) evicts down to it at the next login,
    // expired tokens first.
    let expired = vault_token(6, APP, "ab", now, -5);
    assert_eq!(
        s.insert_vault_token(&expired, 32).await.unwrap(),
        Vec::<String>::new()
    );
    let t7 = vault_token(7, APP, "ab", now, 700);
    assert_eq!(
        s.insert_vault_token(&t7, 2).await.unwrap(),
        vec![
            expired.accessor.clone(),
            t4.accessor.clone(),
            t5.accessor.clone()
        ]
    );
    assert!(s.vault_token(&t2.hash).await.unwrap().is_some());
    assert!(s.vault_token(&t7.hash).await.unwrap().is_some());

    // Cap 1: each login replaces the identity's one token.
    let t8 = vault_token(8, APP, "ab", now, 800);
    let mut gone = s.insert_vault_token(&t8, 1).await.unwrap();
    gone.sort();
    assert_eq!(gone, vec![t2.accessor.clone(), t7.accessor.clone()]);
    assert!(
        s.vault_token(&theirs.hash).await.unwrap().is_some(),
        "another identity is never evicted, even expiring first"
    );
}

/// 60 parallel logins of one identity, on two handles (two replicas on a
/// shared store), against a cap of 8: exactly 8 tokens stay, the newest
/// one among them; each of the other 52 was evicted by exactly one login
/// and is gone; the other identity's token is untouched.
pub async fn case_vault_token_cap_holds_under_concurrency(open: Opener, shared: bool) {
    let first = open().await;
    let second = if shared { open().await } else { first.clone() };
    let other = "spiffe://credbroker.dev/ns/demo/other";
    let now = Utc::now();
    let theirs = vault_token(999, other, "ef", now, 1);
    first.insert_vault_token(&theirs, 8).await.unwrap();
    let tokens: Vec<_> = (0..60)
        .map(|i| vault_token(i, APP, "ab", now, 100 + i as i64))
        .collect();
    let tasks: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, tok)| {
            let s = if i % 2 == 0 { &first } else { &second }.clone();
            let tok = tok.clone();
            tokio::spawn(async move { s.insert_vault_token(&tok, 8).await })
        })
        .collect();
    let mut evicted = Vec::new();
    for task in tasks {
        evicted.extend(task.await.unwrap().unwrap());
    }
    let unique: BTreeSet<&String> = evicted.iter().collect();
    assert_eq!(
        evicted.len(),
        52,
        "each eviction reported once: {evicted:?}"
    );
    assert_eq!(unique.len(), 52);
    let mut kept = 0;
    for tok in &tokens {
        let stored = second.vault_token(&tok.hash).await.unwrap();
        assert_eq!(
            stored.is_some(),
            !unique.contains(&tok.accessor),
            "{} is stored iff not evicted",
            tok.accessor
        );
        kept += usize::from(stored.is_some());
    }
    assert_eq!(kept, 8, "the cap holds under parallel logins");
    assert!(first.vault_token(&theirs.hash).await.unwrap().is_some());
    // Serially, the cap keeps the ones furthest from expiry.
    let last = vault_token(60, APP, "ab", now, 10_000);
    let gone = first.insert_vault_token(&last, 8).await.unwrap();
    assert_eq!(gone.len(), 1);
    assert!(first.vault_token(&last.hash).await.unwrap().is_some());
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

macro_rules! store_suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let home = super::sqlite_home().await;
                    super::$case((home.open)().await).await;
                }
            )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn case_concurrent_reapers_claim_disjoint_sets() {
                let home = super::sqlite_home().await;
                super::case_concurrent_reapers_claim_disjoint_sets(home.open.clone(), false).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn case_identity_cap_holds_under_concurrency() {
                let home = super::sqlite_home().await;
                super::case_identity_cap_holds_under_concurrency(home.open.clone(), false).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn case_vault_token_cap_holds_under_concurrency() {
                let home = super::sqlite_home().await;
                super::case_vault_token_cap_holds_under_concurrency(home.open.clone(), false).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn case_pruning_deletes_only_old_revoked_rows() {
                super::case_pruning_deletes_only_old_revoked_rows(super::sqlite_home().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn case_locks_survive_a_restart_run_out_and_are_deleted() {
                super::case_locks_survive_a_restart_run_out_and_are_deleted(super::sqlite_home().await)
                    .await;
            }
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let home = super::postgres_home().await;
                    super::$case((home.open)().await).await;
                }
            )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn case_concurrent_reapers_claim_disjoint_sets() {
                let home = super::postgres_home().await;
                super::case_concurrent_reapers_claim_disjoint_sets(home.open.clone(), true).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn case_identity_cap_holds_under_concurrency() {
                let home = super::postgres_home().await;
                super::case_identity_cap_holds_under_concurrency(home.open.clone(), true).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn case_vault_token_cap_holds_under_concurrency() {
                let home = super::postgres_home().await;
                super::case_vault_token_cap_holds_under_concurrency(home.open.clone(), true).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn case_pruning_deletes_only_old_revoked_rows() {
                super::case_pruning_deletes_only_old_revoked_rows(super::postgres_home().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn case_locks_survive_a_restart_run_out_and_are_deleted() {
                super::case_locks_survive_a_restart_run_out_and_are_deleted(super::postgres_home().await)
                    .await;
            }
        }
    };
}

store_suite!(
    case_lifecycle,
    case_username_is_unique_per_database,
    case_claims_exclude_other_owners_until_they_expire,
    case_a_holder_claims_only_its_own_live_unclaimed_lease,
    case_claim_due_is_ordered_limited_and_only_due,
    case_only_the_claim_holder_marks_revoked,
    case_failures_are_recorded_and_release_the_claim,
    case_queries_see_only_what_they_ask_for,
    case_static_roles_are_claimed_saved_only_by_the_holder_and_round_trip,
    case_vault_tokens_and_their_lease_links,
    case_vault_tokens_are_capped_per_identity,
    case_pages_are_counted_sorted_and_disjoint,
    case_a_drain_marks_the_holder_s_active_lease_due_at_its_deadline,
);

#[tokio::test]
async fn memory_case_a_drain_marks_the_holder_s_active_lease_due_at_its_deadline() {
    let s: Store = Arc::new(credbroker::store::memory::MemoryStore::new());
    case_a_drain_marks_the_holder_s_active_lease_due_at_its_deadline(s).await;
}

/// The memory store (the fast tier's) caps Vault tokens like the real ones.
#[tokio::test]
async fn memory_case_vault_tokens_are_capped_per_identity() {
    let s: Store = Arc::new(credbroker::store::memory::MemoryStore::new());
    case_vault_tokens_are_capped_per_identity(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_case_vault_token_cap_holds_under_concurrency() {
    let s: Store = Arc::new(credbroker::store::memory::MemoryStore::new());
    let open: Opener = Arc::new(move || {
        let s = s.clone();
        Box::pin(async move { s })
    });
    case_vault_token_cap_holds_under_concurrency(open, true).await;
}

/// The memory store (the fast tier's) pages like the real ones.
#[tokio::test]
async fn memory_case_pages_are_counted_sorted_and_disjoint() {
    let s: Store = Arc::new(credbroker::store::memory::MemoryStore::new());
    case_pages_are_counted_sorted_and_disjoint(s).await;
}

#[tokio::test]
async fn memory_case_a_holder_claims_only_its_own_live_unclaimed_lease() {
    let s: Store = Arc::new(credbroker::store::memory::MemoryStore::new());
    case_a_holder_claims_only_its_own_live_unclaimed_lease(s).await;
}

// Where the stores differ on purpose: start-up recovery.

#[tokio::test]
async fn sqlite_start_up_makes_pending_intents_due_and_voids_old_claims() {
    let home = sqlite_home().await;
    let s = (home.open)().await;
    let now = Utc::now();
    let p = lease(1, "ro", APP, now, 600);
    s.insert_intent(&p, None).await.unwrap();
    let a = active(&s, 2, "ro", APP, 600).await;
    s.claim_one(&a.id, &claim("previous-life", 60))
        .await
        .unwrap()
        .unwrap();
    s.recover_after_start(now).await.unwrap();
    assert_eq!(ms(s.get(&p.id).await.unwrap().unwrap().due_at), ms(now));
    // The interrupted revocation is due at once, to be finished.
    assert_eq!(ms(s.get(&a.id).await.unwrap().unwrap().due_at), ms(now));
    assert!(s
        .claim_one(&a.id, &claim("me", 60))
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn sqlite_file_of_schema_1_is_migrated_and_pruned() {
    let home = sqlite_home().await;
    let s = (home.open)().await;
    let gone = active(&s, 1, "ro", APP, 600).await;
    s.mark_revoked(std::slice::from_ref(&gone.id), t(Utc::now(), -7200))
        .await
        .unwrap();
    let live = active(&s, 2, "ro", APP, 600).await;
    drop(s);
    // Back to what a broker of schema 1 left behind.
    let path = home.sqlite_path.clone().unwrap();
    tokio::task::spawn_blocking(move || {
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(
                "DROP INDEX leases_revoked_at; DROP TABLE locks; DROP TABLE static_roles; \
                 DROP TABLE vault_tokens; DROP TABLE vault_token_leases; PRAGMA user_version = 1;",
            )
            .unwrap();
    })
    .await
    .unwrap();
    let s = (home.open)().await;
    assert_eq!(s.prune_revoked(t(Utc::now(), -3600), 100).await.unwrap(), 1);
    assert!(s.get(&live.id).await.unwrap().is_some());
    drop(s);
    let path = home.sqlite_path.clone().unwrap();
    let (version, indexed) = tokio::task::spawn_blocking(move || {
        let c = rusqlite::Connection::open(path).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'leases_revoked_at'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (v, n)
    })
    .await
    .unwrap();
    assert_eq!((version, indexed), (9, 1));
}

#[tokio::test]
async fn postgres_start_up_leaves_other_replicas_intents_and_claims_alone() {
    let home = postgres_home().await;
    let s = (home.open)().await;
    let now = Utc::now();
    let p = lease(1, "ro", APP, now, 600);
    s.insert_intent(&p, None).await.unwrap();
    let a = active(&s, 2, "ro", APP, 600).await;
    s.claim_one(&a.id, &claim("replica-a", 60))
        .await
        .unwrap()
        .unwrap();
    // Replica B starts while A is creating p's user and revoking a.
    let b = (home.open)().await;
    b.recover_after_start(Utc::now()).await.unwrap();
    assert_eq!(
        ms(b.get(&p.id).await.unwrap().unwrap().due_at),
        ms(p.due_at),
        "a pending intent keeps its grace deadline"
    );
    assert!(
        b.claim_one(&a.id, &claim("replica-b", 60))
            .await
            .unwrap()
            .is_none(),
        "a live claim of another replica survives a start-up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_starting_together_migrate_once() {
    let home = postgres_home().await;
    let opens: Vec<_> = (0..6).map(|_| tokio::spawn((home.open)())).collect();
    for o in opens {
        o.await.unwrap();
    }
    let c = cluster()
        .connect(home.pg_database.as_deref().unwrap())
        .await
        .unwrap();
    let versions: Vec<i32> = c
        .query(
            "SELECT version FROM credbroker_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        versions,
        (1..=credbroker::store::postgres::SCHEMA_VERSION).collect::<Vec<_>>()
    );
    let secret_columns: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name LIKE 'credbroker%' \
             AND (column_name LIKE '%pass%' OR column_name LIKE '%secret%' OR column_name LIKE '%verifier%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(secret_columns, 0, "the store has no column for a secret");

    // A database migrated by a newer broker is refused, not misread.
    c.batch_execute(
        "INSERT INTO credbroker_schema_migrations (version, description) VALUES (9999, 'future')",
    )
    .await
    .unwrap();
    let secret = home._dir.path().join("store-password");
    let err = PostgresStore::open(
        &cluster().url(home.pg_database.as_deref().unwrap()),
        &SecretSource::File(secret),
    )
    .await
    .err()
    .expect("a newer schema must be refused");
    assert!(err.to_string().contains("newer than this broker"), "{err}");
}

#[tokio::test]
async fn postgres_store_down_is_unavailable_and_names_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pw");
    std::fs::write(&secret, "s3cret-store-pw").unwrap();
    let port = free_port();
    let err = PostgresStore::open(
        &format!("postgres://broker@127.0.0.1:{port}/leases"),
        &SecretSource::File(secret),
    )
    .await
    .err()
    .expect("nothing listens there");
    assert!(matches!(err, credbroker::Error::Unavailable(_)), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("s3cret-store-pw"));
}
