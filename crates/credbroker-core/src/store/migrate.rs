//! `credbroker store migrate`: every live row of one store copied, as it
//! is, into an empty one — how a broker that started on SQLite moves to
//! a PostgreSQL store shared by replicas, without draining its leases.
//!
//! The copy is per concern ([`Concern`]: leases, locks, Vault-API tokens,
//! their lease links, static roles); a new kind of row is one more
//! implementation and one more line in [`concerns`]. Each reads its
//! source a page at a time through the store traits' raw listings and
//! writes through their `import_*` methods, so no SQL lives here and the
//! same code moves SQLite → PostgreSQL, PostgreSQL → PostgreSQL or (the
//! fast tier) memory → memory.
//!
//! What is copied: leases in every live state (pending, active,
//! draining, failing) with their times, attempts and last error, but not
//! their claims (the brokers that held them are stopped); locks that
//! have not run out; every stored token (a hash, never the token) and
//! every token↔lease link; static roles with their passwords still
//! sealed (the bytes copied, never opened: no sealing key is read).
//! Revoked leases are not copied: the audit log is the record of the past
//! and the source file keeps them.
//!
//! The source is only read. The counts are checked on both sides after
//! the copy; a mismatch is an error that says which kind, and the
//! operator keeps serving from the untouched source.

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::lease::{Lease, LeaseId, LeaseState};
use crate::store::access::{AccessFilter, AccessRequest, AccessState, MAX_ACCESS_LIST};
use crate::store::{LeaseFilter, Store, VaultToken};

/// Rows per read and per write transaction: small enough that a page
/// is a short transaction on the target, large enough to be quick.
pub const PAGE: usize = 500;

/// One kind of row, as counted by the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// `leases`, `locks`, … (the audit record and the report use it).
    pub kind: &'static str,
    /// Rows read from the source and written to the target.
    pub copied: u64,
    /// Rows the target holds afterwards, counted anew.
    pub in_target: u64,
    /// Rows the source holds afterwards, counted anew: the same as
    /// before unless something wrote to it during the copy.
    pub in_source: u64,
}

impl Moved {
    fn agrees(&self) -> bool {
        self.copied == self.in_target && self.copied == self.in_source
    }
}

/// The counts as one line (`leases=100 locks=2 …`), for the report and
/// the audit record.
pub fn summary(moved: &[Moved]) -> String {
    moved
        .iter()
        .map(|m| format!("{}={}", m.kind, m.copied))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One kind of row the migration moves.
#[async_trait]
pub trait Concern: Send + Sync {
    /// Its name in counts and errors (plural: `leases`).
    fn kind(&self) -> &'static str;

    /// Rows of this kind in `store` that the copy would move.
    async fn count(&self, store: &dyn Store) -> Result<u64>;

    /// Rows of this kind in `store` at all, moved or not (a target with
    /// any is not empty: a revoked lease's id or user name would collide).
    async fn occupied(&self, store: &dyn Store) -> Result<u64> {
        self.count(store).await
    }

    /// Copies every row `count` counts; returns how many.
    async fn copy(&self, from: &dyn Store, to: &dyn Store) -> Result<u64>;
}

/// A concern whose rows the store lists a page at a time, in key order.
#[async_trait]
trait Paged: Send + Sync {
    type Row: Send + Sync;
    type Key: Send + Sync;

    /// Up to `PAGE` rows after `after` (None: from the first).
    async fn page(&self, store: &dyn Store, after: Option<&Self::Key>) -> Result<Vec<Self::Row>>;

    /// The key the next page starts after.
    fn key(&self, row: &Self::Row) -> Self::Key;

    /// Writes one page into the target.
    async fn import(&self, to: &dyn Store, rows: &[Self::Row]) -> Result<()>;

    /// Every row of `from`, a page at a time, written to `to` when there
    /// is one; returns how many.
    async fn walk(&self, from: &dyn Store, to: Option<&dyn Store>) -> Result<u64> {
        let mut after: Option<Self::Key> = None;
        let mut n = 0;
        loop {
            let page = self.page(from, after.as_ref()).await?;
            let Some(last) = page.last() else {
                return Ok(n);
            };
            after = Some(self.key(last));
            if let Some(to) = to {
                self.import(to, &page).await?;
            }
            n += page.len() as u64;
        }
    }
}

/// A [`Paged`] concern named `.0` whose rows all move: counted by
/// walking its pages, copied by walking them into the target.
struct Walked<P>(&'static str, P);

#[async_trait]
impl<P: Paged> Concern for Walked<P> {
    fn kind(&self) -> &'static str {
        self.0
    }

    async fn count(&self, store: &dyn Store) -> Result<u64> {
        self.1.walk(store, None).await
    }

    async fn copy(&self, from: &dyn Store, to: &dyn Store) -> Result<u64> {
        self.1.walk(from, Some(to)).await
    }
}

/// Every kind of row, in the order they are copied: leases before the
/// links that name them (no store enforces it, but a reader of a half
/// copy then finds no link to a lease that is not there).
pub fn concerns() -> Vec<Box<dyn Concern>> {
    vec![
        Box::new(Leases),
        Box::new(Locks),
        Box::new(Walked("vault_tokens", VaultTokens)),
        Box::new(Walked("vault_token_links", TokenLinks)),
        Box::new(StaticRoles),
        Box::new(AccessRequests),
    ]
}

/// Refuses a target that holds any row of any kind, naming them.
pub async fn ensure_empty(target: &dyn Store) -> Result<()> {
    let mut found = Vec::new();
    for c in concerns() {
        let n = c.occupied(target).await?;
        if n > 0 {
            found.push(format!("{n} {}", c.kind()));
        }
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(Error::FailedPrecondition(format!(
            "the target store is not empty (it holds {}); migrate only into a store no broker \
             has used; nothing was written",
            found.join(", ")
        )))
    }
}

/// Copies every concern from `source` into `target` (which the caller
/// has found empty), then counts both sides again. Fails on the first
/// error, or when a count disagrees, saying which.
pub async fn copy_all(source: &dyn Store, target: &dyn Store) -> Result<Vec<Moved>> {
    let mut moved = Vec::new();
    for c in concerns() {
        let copied = c
            .copy(source, target)
            .await
            .map_err(|e| partial(format!("copying {} failed: {e}", c.kind())))?;
        moved.push(Moved {
            kind: c.kind(),
            copied,
            in_target: c.count(target).await?,
            in_source: c.count(source).await?,
        });
    }
    let wrong: Vec<String> = moved
        .iter()
        .filter(|m| !m.agrees())
        .map(|m| {
            format!(
                "{}: copied {}, the target holds {}, the source now holds {}",
                m.kind, m.copied, m.in_target, m.in_source
            )
        })
        .collect();
    if !wrong.is_empty() {
        return Err(partial(format!(
            "the counts disagree ({}); was a broker writing to the source?",
            wrong.join("; ")
        )));
    }
    Ok(moved)
}

/// A failure after the target was written to: the source is untouched,
/// the target must be emptied before another try.
fn partial(what: String) -> Error {
    Error::FailedPrecondition(format!(
        "{what}. The source store is untouched: keep serving from it. The target holds a \
         partial copy: drop and recreate its database (or its credbroker_* tables) before \
         migrating again"
    ))
}

struct Leases;

#[async_trait]
impl Concern for Leases {
    fn kind(&self) -> &'static str {
        "leases"
    }

    async fn count(&self, store: &dyn Store) -> Result<u64> {
        // An empty filter counts every live state, in the store.
        store.count(&LeaseFilter::default()).await
    }

    async fn occupied(&self, store: &dyn Store) -> Result<u64> {
        let revoked = LeaseFilter {
            states: vec![LeaseState::Revoked],
            ..Default::default()
        };
        Ok(self.count(store).await? + store.count(&revoked).await?)
    }

    async fn copy(&self, from: &dyn Store, to: &dyn Store) -> Result<u64> {
        self.walk(from, Some(to)).await
    }
}

#[async_trait]
impl Paged for Leases {
    type Row = Lease;
    type Key = LeaseId;

    async fn page(&self, store: &dyn Store, after: Option<&LeaseId>) -> Result<Vec<Lease>> {
        store.live_page(after, PAGE).await
    }

    fn key(&self, row: &Lease) -> LeaseId {
        row.id.clone()
    }

    async fn import(&self, to: &dyn Store, rows: &[Lease]) -> Result<()> {
        to.import_leases(rows).await
    }
}

struct Locks;

#[async_trait]
impl Concern for Locks {
    fn kind(&self) -> &'static str {
        "locks"
    }

    async fn count(&self, store: &dyn Store) -> Result<u64> {
        Ok(store.active_locks().await?.len() as u64)
    }

    /// Locks are few (an admin places them by hand): one read, one write.
    async fn copy(&self, from: &dyn Store, to: &dyn Store) -> Result<u64> {
        let locks = from.active_locks().await?;
        to.import_locks(&locks).await?;
        Ok(locks.len() as u64)
    }
}

/// Just-in-time access requests that still matter: pending ones, live
/// grants, and ended grants whose leases are not all revoked yet (they
/// keep a `due_at`, so the new store's expiry loop finishes them).
/// Decided and finished ones stay behind with the revoked leases: the
/// audit log is their record.
struct AccessRequests;

impl AccessRequests {
    async fn live(store: &dyn Store) -> Result<Vec<AccessRequest>> {
        let all = store
            .list_access(&AccessFilter {
                requester: None,
                states: vec![
                    AccessState::Pending,
                    AccessState::Granted,
                    AccessState::Ended,
                ],
                limit: Some(MAX_ACCESS_LIST),
            })
            .await?;
        if all.len() >= MAX_ACCESS_LIST {
            // One listing is all the trait offers; refusing beats copying
            // part of them.
            return Err(Error::invalid(format!(
                "the source holds {MAX_ACCESS_LIST} or more access requests in pending, \
                 granted or ended state: end or let them expire, then migrate"
            )));
        }
        Ok(all
            .into_iter()
            .filter(|r| r.state != AccessState::Ended || r.due_at().is_some())
            .collect())
    }
}

#[async_trait]
impl Concern for AccessRequests {
    fn kind(&self) -> &'static str {
        "access_requests"
    }

    async fn count(&self, store: &dyn Store) -> Result<u64> {
        Ok(Self::live(store).await?.len() as u64)
    }

    async fn occupied(&self, store: &dyn Store) -> Result<u64> {
        let any = store
            .list_access(&AccessFilter {
                limit: Some(1),
                ..AccessFilter::default()
            })
            .await?;
        Ok(any.len() as u64)
    }

    /// Rows as they are, version included (the compare-and-set goes on
    /// from where it was).
    async fn copy(&self, from: &dyn Store, to: &dyn Store) -> Result<u64> {
        let live = Self::live(from).await?;
        for r in &live {
            to.insert_access(r).await?;
        }
        Ok(live.len() as u64)
    }
}

struct VaultTokens;

#[async_trait]
impl Paged for VaultTokens {
    type Row = VaultToken;
    type Key = String;

    async fn page(&self, store: &dyn Store, after: Option<&String>) -> Result<Vec<VaultToken>> {
        store.token_page(after.map(String::as_str), PAGE).await
    }

    fn key(&self, row: &VaultToken) -> String {
        row.hash.clone()
    }

    async fn import(&self, to: &dyn Store, rows: &[VaultToken]) -> Result<()> {
        to.import_vault_tokens(rows).await
    }
}

struct TokenLinks;

/// (accessor, lease): a link is its own key.
type Link = (String, LeaseId);

#[async_trait]
impl Paged for TokenLinks {
    type Row = Link;
    type Key = Link;

    async fn page(&self, store: &dyn Store, after: Option<&Link>) -> Result<Vec<Link>> {
        store.token_link_page(after, PAGE).await
    }

    fn key(&self, row: &Link) -> Link {
        row.clone()
    }

    async fn import(&self, to: &dyn Store, rows: &[Link]) -> Result<()> {
        to.import_token_links(rows).await
    }
}

struct StaticRoles;

#[async_trait]
impl Concern for StaticRoles {
    fn kind(&self) -> &'static str {
        "static_roles"
    }

    async fn count(&self, store: &dyn Store) -> Result<u64> {
        Ok(store.static_list().await?.len() as u64)
    }

    /// One row per configured static role: few. Sealed bytes as stored.
    async fn copy(&self, from: &dyn Store, to: &dyn Store) -> Result<u64> {
        let all = from.static_list().await?;
        for s in &all {
            to.import_static(s).await?;
        }
        Ok(all.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::BackendKind;
    use crate::lock::{LockTarget, NewLock};
    use crate::store::memory::MemoryStore;
    use crate::store::static_state::{CurrentUser, StaticState};
    use crate::store::{Claim, LeaseStore, LockStore, StaticStore, TokenStore, VaultToken};
    use chrono::{Duration, Utc};

    fn lease(i: usize, state: LeaseState) -> crate::lease::Lease {
        let mut l = crate::testkit::pending_lease(&format!("k_r_{i:016x}"));
        l.kind = BackendKind::Postgres;
        l.state = state;
        if state == LeaseState::Failing {
            l.revoke_attempts = 7;
            l.last_error = Some("connection refused".into());
        }
        if state == LeaseState::Revoked {
            l.revoked_at = Some(Utc::now());
        }
        l
    }

    /// A source with some of every kind, more leases than a page.
    async fn filled() -> MemoryStore {
        let s = MemoryStore::new();
        let states = [
            LeaseState::Active,
            LeaseState::Pending,
            LeaseState::Failing,
            LeaseState::Draining,
            LeaseState::Revoked,
        ];
        let all: Vec<_> = (0..PAGE * 2 + 7)
            .map(|i| lease(i, states[i % states.len()]))
            .collect();
        s.import_leases(&all).await.unwrap();
        for (i, target) in [
            LockTarget::Role("ro".into()),
            LockTarget::Database("db".into()),
        ]
        .into_iter()
        .enumerate()
        {
            let new = NewLock {
                id: crate::lock::LockId::generate(),
                target,
                reason: format!("reason {i}"),
                created_by: "admin".into(),
                duration: (i == 0).then(|| std::time::Duration::from_secs(3600)),
            };
            s.insert_lock(&new).await.unwrap();
        }
        let now = crate::lease::truncate_ms(Utc::now());
        for i in 0..3 {
            let t = VaultToken {
                hash: format!("{i:064x}"),
                accessor: format!("acc{i}"),
                identity: "spiffe://x/a".into(),
                cert_sha256: "ab".repeat(32),
                issued_at: now,
                expires_at: now + Duration::hours(1),
            };
            s.insert_vault_token(&t, 10).await.unwrap();
        }
        s.import_token_links(&[("acc0".into(), all[0].id.clone())])
            .await
            .unwrap();
        let state = StaticState {
            role: "app".into(),
            generation: 4,
            current: Some(CurrentUser {
                user: "app_user".into(),
                sealed: "v1:sealed-bytes-as-stored".into(),
                rotated_at: now,
                valid_until: now + Duration::days(1),
            }),
            next_rotation_at: Some(now + Duration::hours(12)),
            ..Default::default()
        };
        s.import_static(&state).await.unwrap();
        s
    }

    #[tokio::test]
    async fn every_live_row_moves_as_it_is_and_the_counts_agree() {
        let source = filled().await;
        let target = MemoryStore::new();
        ensure_empty(&target).await.unwrap();
        let moved = copy_all(&source, &target).await.unwrap();
        let count = |k: &str| moved.iter().find(|m| m.kind == k).unwrap().copied;
        let live = (0..PAGE * 2 + 7).filter(|i| i % 5 != 4).count() as u64;
        assert_eq!(count("leases"), live, "revoked rows stay behind");
        assert_eq!(count("locks"), 2);
        assert_eq!(count("vault_tokens"), 3);
        assert_eq!(count("vault_token_links"), 1);
        assert_eq!(count("static_roles"), 1);
        assert!(summary(&moved).starts_with(&format!("leases={live} locks=2")));

        // Field for field, not only counted.
        let all = LeaseFilter {
            limit: Some(10_000),
            ..Default::default()
        };
        let (a, b) = (
            source.list(&all).await.unwrap(),
            target.list(&all).await.unwrap(),
        );
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let failing = b.iter().find(|l| l.state == LeaseState::Failing).unwrap();
        assert_eq!(failing.revoke_attempts, 7);
        assert_eq!(
            source.static_get("app").await.unwrap(),
            target.static_get("app").await.unwrap(),
            "the sealed password is copied as stored"
        );
        let locks = |v: Vec<crate::lock::Lock>| {
            let mut v: Vec<_> = v
                .into_iter()
                .map(|l| (l.id, l.created_at, l.expires_at, l.reason))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            locks(source.active_locks().await.unwrap()),
            locks(target.active_locks().await.unwrap()),
            "a lock keeps its own times"
        );
        assert_eq!(
            target.vault_token_leases("acc0").await.unwrap(),
            vec![a[0].id.clone()]
        );
        // The imported static role is unclaimed: a rotation can claim it.
        let claim = Claim {
            owner: "replica".into(),
            until: Utc::now() + Duration::minutes(1),
        };
        assert!(target.static_claim("app", &claim).await.unwrap().is_some());

        // Now it is not empty, and says what it holds.
        let e = ensure_empty(&target).await.unwrap_err().to_string();
        assert!(
            e.contains("not empty") && e.contains("leases") && e.contains("2 locks"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_target_with_only_a_revoked_lease_is_not_empty() {
        let target = MemoryStore::new();
        target
            .import_leases(&[lease(1, LeaseState::Revoked)])
            .await
            .unwrap();
        let e = ensure_empty(&target).await.unwrap_err().to_string();
        assert!(e.contains("1 leases"), "{e}");
    }

    /// A copy that fails midway says so, and that the source is untouched.
    #[tokio::test]
    async fn a_failed_copy_names_the_kind_and_leaves_the_source() {
        let source = filled().await;
        let target = MemoryStore::new();
        // A collision the empty check would have refused: the copy's own
        // error path, all the same.
        target
            .import_leases(&[source.live_page(None, 1).await.unwrap()[0].clone()])
            .await
            .unwrap();
        let before = source.count(&LeaseFilter::default()).await.unwrap();
        let e = copy_all(&source, &target).await.unwrap_err().to_string();
        assert!(e.contains("copying leases failed"), "{e}");
        assert!(e.contains("source store is untouched"), "{e}");
        assert_eq!(source.count(&LeaseFilter::default()).await.unwrap(), before);
    }
}
