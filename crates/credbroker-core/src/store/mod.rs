//! The lease store: the broker's memory of every lease, and the reason no
//! database user is ever untracked.
//!
//! Rules every implementation keeps:
//! - an intent row (`pending`) is written **before** the user is created;
//! - a lease becomes `revoked` only **after** its drop succeeded;
//! - nothing secret is stored: there is no column for a password;
//! - nothing loads every lease into memory: the reaper asks for what is due;
//! - static-role passwords are stored sealed only (`static_roles::seal`),
//!   and their rotations are intents first, like leases.

pub mod access;
pub mod group_commit;
// Test doubles: core's unit tests, and the integration tests through the
// `fakes` feature; not in the shipped binary.
#[cfg(any(test, feature = "fakes"))]
pub mod memory;
pub mod migrate;
pub mod postgres;
pub mod sqlite;
pub mod static_state;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::lease::{Lease, LeaseId, LeaseState};
use crate::lock::{Lock, LockId, NewLock};
pub use access::{AccessFilter, AccessRequest, AccessState, AccessStore, Approval};
pub use static_state::StaticState;

/// Which leases `list` returns. Empty fields match everything; an empty
/// `states` means every live state.
#[derive(Debug, Clone, Default)]
pub struct LeaseFilter {
    pub role: Option<String>,
    pub database: Option<String>,
    pub identity: Option<String>,
    /// Leases issued under this access grant (`access`).
    pub grant: Option<String>,
    pub states: Vec<LeaseState>,
    pub expiring_before: Option<DateTime<Utc>>,
    pub limit: Option<usize>,
    /// Rows to skip before the first one returned (a page of a listing).
    pub offset: Option<usize>,
    /// Expiry order; the id breaks ties, so pages never overlap.
    pub order: LeaseOrder,
}

/// The order `list` returns leases in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LeaseOrder {
    /// Soonest expiry first: what the reaper and an on-call want first.
    #[default]
    ExpiresFirst,
    ExpiresLast,
}

impl LeaseOrder {
    /// The SQL `ORDER BY` both SQL stores use.
    pub fn sql(self) -> &'static str {
        match self {
            LeaseOrder::ExpiresFirst => " ORDER BY expires_at, id",
            LeaseOrder::ExpiresLast => " ORDER BY expires_at DESC, id DESC",
        }
    }
}

/// One failed revocation attempt, for [`LeaseStore::record_failures`].
#[derive(Debug, Clone)]
pub struct FailureRecord {
    pub id: LeaseId,
    /// Already free of secrets.
    pub error: String,
    pub next_due: DateTime<Utc>,
    pub failing: bool,
}

/// A claim on a lease's revocation: held by one broker (`owner`) until
/// `until`, so two reapers — or a reaper and an explicit revoke — never drop
/// the same user twice; a crashed owner's claim simply runs out.
#[derive(Debug, Clone)]
pub struct Claim {
    pub owner: String,
    pub until: DateTime<Utc>,
}

/// What [`LeaseStore::claim_for`] found.
#[derive(Debug)]
pub enum HolderClaim {
    /// Claimed for revocation now.
    Claimed(Lease),
    /// Not claimed: another identity's, already revoked, or held by another
    /// claim; the lease as stored says which.
    Refused(Lease),
    Missing,
}

/// Leases: intents, activation, claims for revocation, listings.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Records the intent to create `lease.username`. `lease.state` is
    /// `Pending` and `lease.due_at` the deadline after which the reaper may
    /// assume the issuer died and clean up.
    ///
    /// With a `cap`, fails with [`Error::ResourceExhausted`] (see
    /// [`cap_reached`]) when `lease.identity` already holds `cap` or more
    /// live leases on `lease.role`. The count and the insert are one atomic
    /// step — across replicas too — so parallel issues cannot overshoot.
    async fn insert_intent(&self, lease: &Lease, cap: Option<u32>) -> Result<()>;

    /// Pending → active, due at its expiry — only while nobody has claimed
    /// the intent. A revoker (a lock's `--revoke`, an admin's bulk revoke,
    /// the reaper after `intent_grace`) that claimed it may already have
    /// found no user and be marking it revoked: activating it then would
    /// leave a working credential behind a `revoked` row. Fails with
    /// `FailedPrecondition` instead; the issuing path drops what it made.
    async fn activate(&self, id: &LeaseId) -> Result<()>;

    async fn get(&self, id: &LeaseId) -> Result<Option<Lease>>;

    /// Moves the expiry of an active, unclaimed lease. Returns false when the
    /// lease is no longer active (revoked or being revoked meanwhile).
    async fn set_expiry(&self, id: &LeaseId, expires_at: DateTime<Utc>) -> Result<bool>;

    /// Starts a handover's drain (`revocation::drain`): an active,
    /// unclaimed lease of `holder` becomes `draining`, its expiry and due
    /// time both `until` (the drain deadline), durably, before the database
    /// is touched — so should the drain's task die with its broker, the
    /// reaper revokes the lease in full at the deadline all the same.
    /// Returns the lease as now stored, or None when it was not active,
    /// unclaimed and `holder`'s (the caller then revokes it at once).
    async fn start_drain(
        &self,
        id: &LeaseId,
        holder: &str,
        until: DateTime<Utc>,
    ) -> Result<Option<Lease>>;

    /// Claims one live lease for revocation now (an explicit revoke).
    /// Returns None when it is not live or another owner holds a claim.
    async fn claim_one(&self, id: &LeaseId, claim: &Claim) -> Result<Option<Lease>>;

    /// A holder's revoke in one store step where the store can: claims the
    /// lease when it is live, claimable and `holder`'s (any identity's
    /// when `holder` is None, an admin's call); otherwise says why not.
    async fn claim_for(
        &self,
        id: &LeaseId,
        claim: &Claim,
        holder: Option<&str>,
    ) -> Result<HolderClaim> {
        let Some(lease) = self.get(id).await? else {
            return Ok(HolderClaim::Missing);
        };
        if holder.is_some_and(|h| h != lease.identity) || lease.state == LeaseState::Revoked {
            return Ok(HolderClaim::Refused(lease));
        }
        Ok(match self.claim_one(id, claim).await? {
            Some(claimed) => HolderClaim::Claimed(claimed),
            None => HolderClaim::Refused(lease),
        })
    }

    /// Claims up to `limit` live leases due at or before `now` that no one
    /// else holds a live claim on, earliest first.
    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        claim: &Claim,
    ) -> Result<Vec<Lease>>;

    /// Marks leases revoked; the caller has confirmed the users are gone.
    async fn mark_revoked(&self, ids: &[LeaseId], at: DateTime<Utc>) -> Result<()>;

    /// `mark_revoked` for the leases whose claim `owner` still holds;
    /// returns those. A claim that ran out mid-revocation and was taken
    /// over belongs to its new owner, who records (and audits) the
    /// revocation: the old owner must not do it a second time.
    ///
    /// The default ignores claims (for a store only one broker uses); both
    /// real stores override it.
    async fn mark_revoked_claimed(
        &self,
        ids: &[LeaseId],
        owner: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<LeaseId>> {
        let _ = owner;
        self.mark_revoked(ids, at).await?;
        Ok(ids.to_vec())
    }

    /// Records a failed revocation: attempts + 1, the error (already free of
    /// secrets), the next attempt time, and `failing` once retries are many.
    /// Releases the claim.
    async fn record_failure(
        &self,
        id: &LeaseId,
        error: &str,
        next_due: DateTime<Utc>,
        failing: bool,
    ) -> Result<()>;

    /// `record_failure` for many leases; stores override it to use one
    /// transaction (a database outage fails whole batches at once).
    async fn record_failures(&self, failures: &[FailureRecord]) -> Result<()> {
        for f in failures {
            self.record_failure(&f.id, &f.error, f.next_due, f.failing)
                .await?;
        }
        Ok(())
    }

    /// Releases a claim without other change (e.g. shutting down).
    async fn release(&self, id: &LeaseId) -> Result<()>;

    /// The earliest `due_at` among live leases: when the reaper must wake.
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>>;

    async fn list(&self, filter: &LeaseFilter) -> Result<Vec<Lease>>;

    /// How many leases `filter` matches, ignoring its limit and offset:
    /// a listing's page count, counted in the store.
    async fn count(&self, filter: &LeaseFilter) -> Result<u64>;

    /// Live leases of `identity` on `role`. The cap itself is checked by
    /// `insert_intent`, atomically; a separate count would race.
    async fn count_live(&self, identity: &str, role: &str) -> Result<u64>;

    /// User names of every live lease on `database` (for the orphan sweep).
    async fn live_usernames(&self, database: &str) -> Result<HashSet<String>>;

    /// Which of `names` belong to a live lease on *any* database. The
    /// orphan sweep asks only about users a server has, so its memory
    /// follows the number of roles, not the number of rows in the store;
    /// and it asks across databases, because one server's user list holds
    /// the users of every `[databases.*]` entry that reaches it.
    async fn live_among(&self, names: &[String]) -> Result<HashSet<String>>;

    /// Live lease counts by (role, database, state), for metrics.
    async fn live_counts(&self) -> Result<Vec<(String, String, LeaseState, u64)>>;

    /// Per role, the most live leases any one identity holds: what
    /// `max_leases_per_identity` is compared with, for the metric an
    /// alert warns on before callers are refused. One row per role.
    async fn busiest_identity(&self) -> Result<Vec<(String, u64)>>;

    /// Deletes up to `limit` rows that are `revoked` with `revoked_at`
    /// before `before`; returns how many. Never touches a live row: those
    /// are the broker's memory of users that may still exist. Callers prune
    /// in small batches so the lease path's writes are never held up long.
    async fn prune_revoked(&self, before: DateTime<Utc>, limit: usize) -> Result<u64>;

    /// The distinct identities holding live leases: a lock on an identity
    /// pattern revokes by matching these, then listing per identity, so
    /// it never loads every lease.
    async fn live_identities(&self) -> Result<Vec<String>>;

    /// Up to `limit` live leases (every state but `revoked`) whose id
    /// sorts after `after`, in id order: `store migrate` reads a store a
    /// page at a time with it, so no step holds every lease. Claims are
    /// not part of a [`Lease`]; they stay behind.
    async fn live_page(&self, after: Option<&LeaseId>, limit: usize) -> Result<Vec<Lease>>;

    /// Writes `leases` exactly as given — state, times, attempts, last
    /// error — unclaimed, in one transaction where the store has them:
    /// `store migrate`'s copy into an empty store. Fails (writing none of
    /// them) when an id or a (database, user name) is already stored.
    async fn import_leases(&self, leases: &[Lease]) -> Result<()>;
}

/// Admin locks (`broker::locks`).
#[async_trait]
pub trait LockStore: Send + Sync {
    /// Writes a lock; the store stamps `created_at` and `expires_at` on its
    /// own clock, so every replica agrees on when a lock ends.
    async fn insert_lock(&self, lock: &NewLock) -> Result<Lock>;

    /// Removes a lock (expired or not); the removed lock, if it existed.
    async fn delete_lock(&self, id: &LockId) -> Result<Option<Lock>>;

    /// Locks that have not run out, oldest first. On the request path of
    /// every issue and renew: a read of a small table (or of memory).
    async fn active_locks(&self) -> Result<Vec<Lock>>;

    /// Deletes locks that ran out before `before`; returns how many.
    async fn prune_locks(&self, before: DateTime<Utc>) -> Result<u64>;

    /// Writes locks exactly as given (their own `created_at` and
    /// `expires_at`, not this store's clock): `store migrate`'s copy.
    /// Fails when an id is already stored.
    async fn import_locks(&self, locks: &[Lock]) -> Result<()>;
}

/// Tokens of the Vault-compatible API (`vault_api`, through
/// `broker::tokens`) and the leases each created.
#[async_trait]
pub trait TokenStore: Send + Sync {
    /// Stores a Vault-API token (`vault_api`): its hash, never the token;
    /// and keeps `token.identity` at `cap` tokens or fewer, in the same
    /// atomic step — across replicas too — so parallel logins cannot
    /// overshoot. When the identity already holds `cap`, those nearest
    /// their expiry (expired ones first) are **evicted** — deleted with
    /// their lease links — until the new one fits (see [`evictions`]);
    /// their accessors are returned, for the audit record. An evicted
    /// token is refused afterwards like an unknown one.
    ///
    /// Evict rather than refuse: a client that restarts often (Vault Agent
    /// logs in at every start) must never lock itself out, and a login
    /// flood then costs only the flooding identity its own oldest tokens,
    /// never anyone else a login. The leases an evicted token created stay
    /// live: revoke-self can no longer reach them, but they end at their
    /// own expiry, and their holder (any token of the identity, by lease
    /// id) or an admin can still revoke them.
    async fn insert_vault_token(&self, token: &VaultToken, cap: u32) -> Result<Vec<String>>;

    /// The token whose SHA-256 is `hash`, expired or not (the caller
    /// decides, so an expired token is refused with a reason).
    async fn vault_token(&self, hash: &str) -> Result<Option<VaultToken>>;

    /// Moves a token's expiry; false when there is no such token.
    async fn set_vault_token_expiry(&self, hash: &str, expires_at: DateTime<Utc>) -> Result<bool>;

    /// Deletes a token and its lease links; false when there was none.
    async fn delete_vault_token(&self, hash: &str) -> Result<bool>;

    /// Pending → active, as [`LeaseStore::activate`], *and* linked to the
    /// token with `accessor`, in one atomic step: a lease issued through a
    /// token is never active without the link that lets revoking the
    /// token reach it (two writes could stop between them, leaving an
    /// active lease its token's revoke-self misses). Fails with
    /// [`gone_token`] when the token is no longer stored (evicted or
    /// revoked while the request ran), and with [`not_activated`] when the
    /// intent was claimed; either way nothing is written, the lease stays
    /// pending, and the issuing path drops its user.
    async fn activate_linked(&self, id: &LeaseId, accessor: &str) -> Result<()>;

    /// The leases the token with `accessor` created (any state).
    async fn vault_token_leases(&self, accessor: &str) -> Result<Vec<LeaseId>>;

    /// Deletes tokens that expired before `before`, and their links;
    /// returns how many tokens went.
    async fn prune_vault_tokens(&self, before: DateTime<Utc>) -> Result<u64>;

    /// Up to `limit` stored tokens (expired or not) whose hash sorts after
    /// `after`, in hash order: `store migrate`'s read, a page at a time.
    async fn token_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<VaultToken>>;

    /// Up to `limit` (accessor, lease) links sorting after `after`, in
    /// that order: `store migrate`'s read of the links.
    async fn token_link_page(
        &self,
        after: Option<&(String, LeaseId)>,
        limit: usize,
    ) -> Result<Vec<(String, LeaseId)>>;

    /// Writes tokens exactly as given (hash, accessor, times), with no
    /// cap and no eviction: `store migrate`'s copy. The default is a
    /// login with a cap nothing reaches (so nothing is evicted); an
    /// accessor or hash already stored fails it.
    async fn import_vault_tokens(&self, tokens: &[VaultToken]) -> Result<()> {
        for t in tokens {
            let evicted = self.insert_vault_token(t, u32::MAX).await?;
            debug_assert!(evicted.is_empty());
        }
        Ok(())
    }

    /// Writes (accessor, lease) links as given, whatever state their lease
    /// is in: `store migrate`'s copy.
    async fn import_token_links(&self, links: &[(String, LeaseId)]) -> Result<()>;
}

/// Static roles' rotation state (`static_roles`).
#[async_trait]
pub trait StaticStore: Send + Sync {
    /// One static role's rotation state (`static_roles`); passwords in it
    /// are sealed, never plaintext.
    async fn static_get(&self, role: &str) -> Result<Option<StaticState>>;

    /// Every static role's state, by name.
    async fn static_list(&self) -> Result<Vec<StaticState>>;

    /// Claims `role` for one rotation step — creating its row, empty, when
    /// it has none — unless another owner holds a live claim (then None).
    /// Like revocation claims: only one replica rotates a role at a time,
    /// and a dead owner's claim runs out.
    async fn static_claim(&self, role: &str, claim: &Claim) -> Result<Option<StaticState>>;

    /// Writes `state` while `owner` still holds the role's claim; false
    /// when it does not (the claim ran out and was taken over).
    async fn static_save(&self, state: &StaticState, owner: &str) -> Result<bool>;

    /// Releases `owner`'s claim on `role`.
    async fn static_release(&self, role: &str, owner: &str) -> Result<()>;

    /// Writes one role's state exactly as given — passwords still sealed,
    /// never opened — unclaimed: `store migrate`'s copy. The default is
    /// what a rotation does (claim, which makes the empty row; save;
    /// release) under an owner of its own, so every store gets it from
    /// the three steps it already has. Fails when the role is held.
    async fn import_static(&self, state: &StaticState) -> Result<()> {
        const OWNER: &str = "credbroker-store-migrate";
        let claim = Claim {
            owner: OWNER.to_string(),
            until: Utc::now() + chrono::Duration::minutes(5),
        };
        if self.static_claim(&state.role, &claim).await?.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "static role {:?} is claimed in the target store",
                state.role
            )));
        }
        let saved = self.static_save(state, OWNER).await?;
        self.static_release(&state.role, OWNER).await?;
        if !saved {
            return Err(Error::internal(format!(
                "static role {:?}: the import's claim was lost before its state was written",
                state.role
            )));
        }
        Ok(())
    }
}

/// Every concern in one store: what the daemon and the broker hold
/// (`Arc<dyn Store>`). Code that needs one concern may take its trait.
#[async_trait]
pub trait Store: LeaseStore + LockStore + TokenStore + StaticStore + AccessStore {
    /// Called once at start. A store only this process can use (SQLite) makes
    /// every pending intent due now, since its issuer is certainly dead; a
    /// shared store leaves them to their grace deadline.
    async fn recover_after_start(&self, now: DateTime<Utc>) -> Result<u64>;

    /// The web console's CSRF key when several brokers share this store:
    /// the same for all, so a form served by one replica is accepted by
    /// another behind a load balancer. The one secret a shared store holds
    /// (docs/HA.md says why it is there). None: a store only this process
    /// uses (SQLite, memory), where a key made at start is as good.
    async fn console_key(&self) -> Result<Option<[u8; 32]>> {
        Ok(None)
    }
}

/// A token of the Vault-compatible API, as stored: the SHA-256 of the
/// token (so a copy of the store logs no one in), bound to the identity
/// and the certificate that logged in. No field holds the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultToken {
    /// Lowercase hex SHA-256 of the token.
    pub hash: String,
    /// Vault's token accessor: names the token (audit, lease links)
    /// without being usable as one.
    pub accessor: String,
    pub identity: String,
    /// Lowercase hex SHA-256 of the client certificate's DER.
    pub cert_sha256: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A lease link refused because its token went meanwhile: the same
/// words from every store; the caller sees a 403 and logs in again.
pub fn gone_token() -> Error {
    Error::denied("invalid token: it was revoked or evicted while this request ran; log in again")
}

/// An activation refused because a revoker claimed the intent first:
/// the same words from every store.
pub fn not_activated() -> Error {
    Error::FailedPrecondition(
        "the lease was revoked while it was being issued (a lock or an admin revoke claimed it); nothing was handed out".into(),
    )
}

/// What one store step of [`TokenStore::activate_linked`] found.
pub(crate) enum Linked {
    Done,
    TokenGone,
    NotPending,
}

impl Linked {
    /// `held`: the token was stored; `activated`: the intent became active.
    pub(crate) fn of(held: bool, activated: bool) -> Linked {
        match (held, activated) {
            (false, _) => Linked::TokenGone,
            (true, false) => Linked::NotPending,
            (true, true) => Linked::Done,
        }
    }

    pub(crate) fn into_result(self) -> Result<()> {
        match self {
            Linked::Done => Ok(()),
            Linked::TokenGone => Err(gone_token()),
            Linked::NotPending => Err(not_activated()),
        }
    }
}

/// Which of an identity's stored tokens a new login evicts to stay at
/// `cap` (one store's rows → accessors, in the order every store uses):
/// all but the `cap - 1` furthest from their expiry. Nearest expiry goes
/// first — an expired token first of all, then one nobody renewed (a
/// dead client's is likeliest), while a token its client keeps renewing
/// is kept; the older issue, then the accessor, break ties. `held` is
/// (accessor, expires_at, issued_at).
pub fn evictions(mut held: Vec<(String, DateTime<Utc>, DateTime<Utc>)>, cap: u32) -> Vec<String> {
    let keep = (cap.max(1) - 1) as usize;
    if held.len() <= keep {
        return Vec::new();
    }
    // Newest first: the kept ones lead, the evicted follow.
    held.sort_by(|a, b| (b.1, b.2, &b.0).cmp(&(a.1, a.2, &a.0)));
    let mut gone: Vec<String> = held.drain(keep..).map(|(a, _, _)| a).collect();
    gone.reverse();
    gone
}

/// Opens the store named by `url` (a `sqlite://` path, or a `postgres://`
/// URL whose server needs no password).
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    let url = crate::config::StoreUrl::parse(url, std::path::Path::new("."))?;
    open_with(&url, &crate::config::SecretSource::None).await
}

/// Opens the store of a config's `[store]` section.
pub async fn open_config(config: &crate::config::StoreConfig) -> Result<Arc<dyn Store>> {
    open_with(&config.url, &config.password).await
}

/// The store as `credbroker check` reads it, beside a broker that may be
/// serving it: SQLite read-only and never created (`None` when the file
/// does not exist yet: `serve` creates it); PostgreSQL as `serve` opens it
/// (replicas share it by design).
pub async fn open_to_inspect(
    config: &crate::config::StoreConfig,
) -> Result<Option<Arc<dyn Store>>> {
    use crate::config::StoreUrl;
    Ok(match &config.url {
        StoreUrl::Sqlite(path) => sqlite::SqliteStore::open_to_inspect(path)
            .await?
            .map(|s| Arc::new(s) as Arc<dyn Store>),
        StoreUrl::Postgres(_) => Some(open_config(config).await?),
    })
}

async fn open_with(
    url: &crate::config::StoreUrl,
    password: &crate::config::SecretSource,
) -> Result<Arc<dyn Store>> {
    use crate::config::StoreUrl;
    Ok(match url {
        StoreUrl::Sqlite(path) => Arc::new(sqlite::SqliteStore::open(path).await?),
        StoreUrl::Postgres(url) => Arc::new(postgres::PostgresStore::open(url, password).await?),
    })
}

/// The refusal of an intent over its identity's cap: the same words from
/// every store.
pub fn cap_reached(live: u64, role: &str) -> Error {
    Error::ResourceExhausted(format!(
        "identity holds {live} live leases on role {role:?}, the most allowed; revoke some first"
    ))
}

/// A new lock stamped with `now`: for the stores whose clock is the
/// broker's own (SQLite, memory).
pub fn stamp_lock(new: &NewLock, now: DateTime<Utc>) -> Lock {
    let now = crate::lease::truncate_ms(now);
    Lock {
        id: new.id.clone(),
        target: new.target.clone(),
        reason: new.reason.clone(),
        created_by: new.created_by.clone(),
        created_at: now,
        expires_at: new
            .duration
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .map(|d| now + d),
    }
}

/// How long a claim lasts before another owner may take the lease over,
/// unless `store.claim_timeout` says otherwise.
pub const DEFAULT_CLAIM: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evictions_keep_the_tokens_furthest_from_expiry() {
        let t0 = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        let held = |v: &[(&str, i64, i64)]| {
            v.iter()
                .map(|(a, e, i)| (a.to_string(), at(*e), at(*i)))
                .collect::<Vec<_>>()
        };
        let rows = held(&[("c", 300, 0), ("a", 100, 0), ("b", 200, 0)]);
        assert!(evictions(rows.clone(), 4).is_empty(), "room left");
        assert_eq!(evictions(rows.clone(), 3), ["a"], "full: one goes");
        assert_eq!(evictions(rows.clone(), 1), ["a", "b", "c"]);
        assert_eq!(evictions(rows, 0), ["a", "b", "c"], "0 acts as 1");
        // Same expiry: the older issue goes first, then the accessor.
        let rows = held(&[("y", 100, 5), ("x", 100, 5), ("z", 100, 1)]);
        assert_eq!(evictions(rows, 2), ["z", "x"]);
    }
}
