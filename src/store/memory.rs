//! An in-memory lease store for the fast test tier: the same rules as the
//! real stores (claims, revoked only through `mark_revoked*`, no password),
//! none of the durability. Never used by `serve`: a broker whose store
//! forgets on restart would break invariant 1.
//!
//! The test knobs (`steal_claim`, `fail_next`) reproduce what a shared
//! store does to a replica — a claim taken over, a store that is away —
//! without a second process.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::lease::{Lease, LeaseId, LeaseState};
use crate::lock::{Lock, LockId, NewLock};
use crate::store::StaticState;
use crate::store::{stamp_lock, Claim, LeaseFilter, LeaseOrder, LeaseStore, VaultToken};

#[derive(Default)]
pub struct MemoryStore {
    rows: Mutex<BTreeMap<LeaseId, Row>>,
    locks: Mutex<Vec<Lock>>,
    statics: Mutex<BTreeMap<String, (StaticState, Option<Claim>)>>,
    /// Vault-API tokens by hash, and (accessor, lease) links.
    vault_tokens: Mutex<BTreeMap<String, VaultToken>>,
    vault_links: Mutex<std::collections::BTreeSet<(String, LeaseId)>>,
    /// Calls that fail with `Unavailable` before the store answers again.
    fail_next: Mutex<u32>,
    /// Claim expiry and lock times: the broker's clock, as a real store's
    /// are its own. Static roles' claims stay on the system clock, which
    /// their `Rotator` uses.
    clock: Clock,
}

struct Row {
    lease: Lease,
    claim: Option<Claim>,
}

impl Row {
    fn claimed_by_other(&self, owner: &str, now: DateTime<Utc>) -> bool {
        self.claim
            .as_ref()
            .is_some_and(|c| c.owner != owner && c.until > now)
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store on `clock` (the broker's, in the fast tier's paused time).
    pub fn with_clock(clock: Clock) -> Self {
        MemoryStore {
            clock,
            ..Self::default()
        }
    }

    /// Hands a lease's claim to `owner`, as a replica does when ours ran
    /// out mid-revocation.
    pub fn steal_claim(&self, id: &LeaseId, owner: &str) {
        if let Some(row) = self.rows.lock().unwrap().get_mut(id) {
            row.claim = Some(Claim {
                owner: owner.to_string(),
                until: self.clock.now() + chrono::Duration::minutes(5),
            });
        }
    }

    /// Hands a static role's claim to `owner` until `until`, as a replica
    /// does when ours ran out mid-rotation.
    pub fn steal_static_claim(&self, role: &str, owner: &str, until: DateTime<Utc>) {
        if let Some((_, c)) = self.statics.lock().unwrap().get_mut(role) {
            *c = Some(Claim {
                owner: owner.to_string(),
                until,
            });
        }
    }

    /// Moves a static role's clock on: its next rotation and its previous
    /// user's retirement are due now (the fast tier's time travel).
    pub fn make_static_due(&self, role: &str) {
        let past = Utc::now() - chrono::Duration::milliseconds(1);
        if let Some((s, _)) = self.statics.lock().unwrap().get_mut(role) {
            s.next_rotation_at = Some(past);
            if let Some(p) = s.previous.as_mut() {
                p.retire_at = past;
            }
        }
    }

    /// The next `n` calls fail as if the store were unreachable.
    pub fn fail_next(&self, n: u32) {
        *self.fail_next.lock().unwrap() = n;
    }

    /// Who holds a claim on the lease, if anyone.
    pub fn claim_owner(&self, id: &LeaseId) -> Option<String> {
        self.rows
            .lock()
            .unwrap()
            .get(id)
            .and_then(|r| r.claim.as_ref().map(|c| c.owner.clone()))
    }

    fn check(&self) -> Result<()> {
        let mut n = self.fail_next.lock().unwrap();
        if *n > 0 {
            *n -= 1;
            return Err(Error::unavailable("lease store: in-memory outage"));
        }
        Ok(())
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<LeaseId, Row>) -> T) -> Result<T> {
        self.check()?;
        Ok(f(&mut self.rows.lock().unwrap()))
    }
}

fn live(l: &Lease) -> bool {
    l.state != LeaseState::Revoked
}

#[async_trait]
impl LeaseStore for MemoryStore {
    async fn insert_intent(&self, lease: &Lease, cap: Option<u32>) -> Result<()> {
        self.with(|rows| {
            if let Some(cap) = cap {
                let live_now = rows
                    .values()
                    .filter(|r| {
                        live(&r.lease)
                            && r.lease.identity == lease.identity
                            && r.lease.role == lease.role
                    })
                    .count() as u64;
                if live_now >= u64::from(cap) {
                    return Err(crate::store::cap_reached(live_now, &lease.role));
                }
            }
            let taken = rows
                .values()
                .any(|r| r.lease.database == lease.database && r.lease.username == lease.username);
            if taken || rows.contains_key(&lease.id) {
                return Err(Error::internal("lease or user name already stored"));
            }
            rows.insert(
                lease.id.clone(),
                Row {
                    lease: lease.clone(),
                    claim: None,
                },
            );
            Ok(())
        })?
    }

    async fn activate(&self, id: &LeaseId) -> Result<()> {
        let activated = self.with(|rows| match rows.get_mut(id) {
            Some(r) if r.lease.state == LeaseState::Pending && r.claim.is_none() => {
                r.lease.state = LeaseState::Active;
                r.lease.due_at = r.lease.expires_at;
                true
            }
            _ => false,
        })?;
        if activated {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(
                "the lease was revoked while it was being issued (a lock or an admin revoke claimed it); nothing was handed out".into(),
            ))
        }
    }

    async fn get(&self, id: &LeaseId) -> Result<Option<Lease>> {
        self.with(|rows| rows.get(id).map(|r| r.lease.clone()))
    }

    async fn set_expiry(&self, id: &LeaseId, expires_at: DateTime<Utc>) -> Result<bool> {
        self.with(|rows| match rows.get_mut(id) {
            Some(r) if r.lease.state == LeaseState::Active && r.claim.is_none() => {
                r.lease.expires_at = expires_at;
                r.lease.due_at = expires_at;
                true
            }
            _ => false,
        })
    }

    async fn start_drain(
        &self,
        id: &LeaseId,
        holder: &str,
        until: DateTime<Utc>,
    ) -> Result<Option<Lease>> {
        self.with(|rows| match rows.get_mut(id) {
            Some(r)
                if r.lease.state == LeaseState::Active
                    && r.claim.is_none()
                    && r.lease.identity == holder =>
            {
                r.lease.state = LeaseState::Draining;
                r.lease.expires_at = until;
                r.lease.due_at = until;
                Some(r.lease.clone())
            }
            _ => None,
        })
    }

    async fn claim_one(&self, id: &LeaseId, claim: &Claim) -> Result<Option<Lease>> {
        let now = self.clock.now();
        self.with(|rows| match rows.get_mut(id) {
            Some(r) if live(&r.lease) && !r.claimed_by_other(&claim.owner, now) => {
                r.claim = Some(claim.clone());
                Some(r.lease.clone())
            }
            _ => None,
        })
    }

    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        claim: &Claim,
    ) -> Result<Vec<Lease>> {
        let wall = self.clock.now();
        self.with(|rows| {
            let mut due: Vec<&mut Row> = rows
                .values_mut()
                .filter(|r| live(&r.lease) && r.lease.due_at <= now)
                .filter(|r| r.claim.as_ref().is_none_or(|c| c.until < wall))
                .collect();
            due.sort_by_key(|r| r.lease.due_at);
            due.into_iter()
                .take(limit)
                .map(|r| {
                    r.claim = Some(claim.clone());
                    r.lease.clone()
                })
                .collect()
        })
    }

    async fn mark_revoked(&self, ids: &[LeaseId], at: DateTime<Utc>) -> Result<()> {
        self.with(|rows| {
            for id in ids {
                if let Some(r) = rows.get_mut(id) {
                    r.lease.state = LeaseState::Revoked;
                    r.lease.revoked_at = Some(at);
                    r.claim = None;
                }
            }
        })
    }

    async fn mark_revoked_claimed(
        &self,
        ids: &[LeaseId],
        owner: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<LeaseId>> {
        self.with(|rows| {
            let mut marked = Vec::new();
            for id in ids {
                if let Some(r) = rows.get_mut(id) {
                    let ours = r.claim.as_ref().is_some_and(|c| c.owner == owner);
                    if ours && live(&r.lease) {
                        r.lease.state = LeaseState::Revoked;
                        r.lease.revoked_at = Some(at);
                        r.claim = None;
                        marked.push(id.clone());
                    }
                }
            }
            marked
        })
    }

    async fn record_failure(
        &self,
        id: &LeaseId,
        error: &str,
        next_due: DateTime<Utc>,
        failing: bool,
    ) -> Result<()> {
        self.with(|rows| {
            if let Some(r) = rows.get_mut(id) {
                r.lease.revoke_attempts += 1;
                r.lease.last_error = Some(error.to_string());
                r.lease.due_at = next_due;
                if failing && live(&r.lease) {
                    r.lease.state = LeaseState::Failing;
                }
                r.claim = None;
            }
        })
    }

    async fn release(&self, id: &LeaseId) -> Result<()> {
        self.with(|rows| {
            if let Some(r) = rows.get_mut(id) {
                r.claim = None;
            }
        })
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        self.with(|rows| {
            rows.values()
                .filter(|r| live(&r.lease))
                .map(|r| r.lease.due_at)
                .min()
        })
    }

    async fn list(&self, f: &LeaseFilter) -> Result<Vec<Lease>> {
        self.with(|rows| {
            let mut out: Vec<Lease> = rows
                .values()
                .map(|r| &r.lease)
                .filter(|l| matches(f, l))
                .cloned()
                .collect();
            out.sort_by(|a, b| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)));
            if f.order == LeaseOrder::ExpiresLast {
                out.reverse();
            }
            let out = out.into_iter().skip(f.offset.unwrap_or(0));
            match f.limit {
                Some(n) => out.take(n).collect(),
                None => out.collect(),
            }
        })
    }

    async fn count(&self, f: &LeaseFilter) -> Result<u64> {
        self.with(|rows| rows.values().filter(|r| matches(f, &r.lease)).count() as u64)
    }

    async fn count_live(&self, identity: &str, role: &str) -> Result<u64> {
        self.with(|rows| {
            rows.values()
                .filter(|r| live(&r.lease) && r.lease.identity == identity && r.lease.role == role)
                .count() as u64
        })
    }

    async fn live_usernames(&self, database: &str) -> Result<HashSet<String>> {
        self.with(|rows| {
            rows.values()
                .filter(|r| live(&r.lease) && r.lease.database == database)
                .map(|r| r.lease.username.as_str().to_string())
                .collect()
        })
    }

    async fn live_among(&self, names: &[String]) -> Result<HashSet<String>> {
        self.with(|rows| {
            let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
            rows.values()
                .filter(|r| live(&r.lease) && wanted.contains(r.lease.username.as_str()))
                .map(|r| r.lease.username.as_str().to_string())
                .collect()
        })
    }

    async fn live_counts(&self) -> Result<Vec<(String, String, LeaseState, u64)>> {
        self.with(|rows| {
            let mut counts: BTreeMap<(String, String, &'static str), (LeaseState, u64)> =
                BTreeMap::new();
            for r in rows.values().filter(|r| live(&r.lease)) {
                let l = &r.lease;
                counts
                    .entry((l.role.clone(), l.database.clone(), l.state.as_str()))
                    .or_insert((l.state, 0))
                    .1 += 1;
            }
            counts
                .into_iter()
                .map(|((role, db, _), (state, n))| (role, db, state, n))
                .collect()
        })
    }

    async fn prune_revoked(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        self.with(|rows| {
            let old: Vec<LeaseId> = rows
                .values()
                .filter(|r| r.lease.state == LeaseState::Revoked)
                .filter(|r| r.lease.revoked_at.is_some_and(|t| t < before))
                .map(|r| r.lease.id.clone())
                .take(limit)
                .collect();
            for id in &old {
                rows.remove(id);
            }
            old.len() as u64
        })
    }

    async fn insert_lock(&self, new: &NewLock) -> Result<Lock> {
        self.check()?;
        let lock = stamp_lock(new, self.clock.now());
        self.locks.lock().unwrap().push(lock.clone());
        Ok(lock)
    }

    async fn delete_lock(&self, id: &LockId) -> Result<Option<Lock>> {
        self.check()?;
        let mut locks = self.locks.lock().unwrap();
        Ok(locks
            .iter()
            .position(|l| &l.id == id)
            .map(|i| locks.remove(i)))
    }

    async fn active_locks(&self) -> Result<Vec<Lock>> {
        self.check()?;
        let now = self.clock.now();
        Ok(self
            .locks
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.is_active(now))
            .cloned()
            .collect())
    }

    async fn prune_locks(&self, before: DateTime<Utc>) -> Result<u64> {
        self.check()?;
        let mut locks = self.locks.lock().unwrap();
        let n = locks.len();
        locks.retain(|l| l.expires_at.is_none_or(|e| e >= before));
        Ok((n - locks.len()) as u64)
    }

    async fn insert_vault_token(&self, token: &VaultToken, cap: u32) -> Result<Vec<String>> {
        self.check()?;
        // One lock over the count, the evictions and the insert: atomic.
        let mut tokens = self.vault_tokens.lock().unwrap();
        if tokens.contains_key(&token.hash) || tokens.values().any(|t| t.accessor == token.accessor)
        {
            return Err(Error::internal("vault token already stored"));
        }
        let held = tokens
            .values()
            .filter(|t| t.identity == token.identity)
            .map(|t| (t.accessor.clone(), t.expires_at, t.issued_at))
            .collect();
        let gone = crate::store::evictions(held, cap);
        if !gone.is_empty() {
            tokens.retain(|_, t| !gone.contains(&t.accessor));
            self.vault_links
                .lock()
                .unwrap()
                .retain(|(a, _)| !gone.contains(a));
        }
        tokens.insert(token.hash.clone(), token.clone());
        Ok(gone)
    }

    async fn vault_token(&self, hash: &str) -> Result<Option<VaultToken>> {
        self.check()?;
        Ok(self.vault_tokens.lock().unwrap().get(hash).cloned())
    }

    async fn set_vault_token_expiry(&self, hash: &str, expires_at: DateTime<Utc>) -> Result<bool> {
        self.check()?;
        Ok(match self.vault_tokens.lock().unwrap().get_mut(hash) {
            Some(t) => {
                t.expires_at = expires_at;
                true
            }
            None => false,
        })
    }

    async fn delete_vault_token(&self, hash: &str) -> Result<bool> {
        self.check()?;
        let removed = self.vault_tokens.lock().unwrap().remove(hash);
        if let Some(t) = &removed {
            self.vault_links
                .lock()
                .unwrap()
                .retain(|(a, _)| a != &t.accessor);
        }
        Ok(removed.is_some())
    }

    async fn link_vault_lease(&self, accessor: &str, lease: &LeaseId) -> Result<()> {
        self.check()?;
        // Held over the insert: an eviction cannot slip in between.
        let tokens = self.vault_tokens.lock().unwrap();
        if !tokens.values().any(|t| t.accessor == accessor) {
            return Err(crate::store::gone_token());
        }
        self.vault_links
            .lock()
            .unwrap()
            .insert((accessor.to_string(), lease.clone()));
        Ok(())
    }

    async fn vault_token_leases(&self, accessor: &str) -> Result<Vec<LeaseId>> {
        self.check()?;
        Ok(self
            .vault_links
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| a == accessor)
            .map(|(_, l)| l.clone())
            .collect())
    }

    async fn prune_vault_tokens(&self, before: DateTime<Utc>) -> Result<u64> {
        self.check()?;
        let mut tokens = self.vault_tokens.lock().unwrap();
        let gone: Vec<String> = tokens
            .values()
            .filter(|t| t.expires_at < before)
            .map(|t| t.hash.clone())
            .collect();
        let mut links = self.vault_links.lock().unwrap();
        for h in &gone {
            if let Some(t) = tokens.remove(h) {
                links.retain(|(a, _)| a != &t.accessor);
            }
        }
        Ok(gone.len() as u64)
    }

    async fn live_identities(&self) -> Result<Vec<String>> {
        self.with(|rows| {
            let ids: std::collections::BTreeSet<String> = rows
                .values()
                .filter(|r| live(&r.lease))
                .map(|r| r.lease.identity.clone())
                .collect();
            ids.into_iter().collect()
        })
    }

    async fn recover_after_start(&self, now: DateTime<Utc>) -> Result<u64> {
        self.with(|rows| {
            let mut n = 0;
            for r in rows.values_mut() {
                if r.lease.state == LeaseState::Pending {
                    r.lease.due_at = r.lease.due_at.min(now);
                    r.claim = None;
                    n += 1;
                }
            }
            n
        })
    }

    async fn static_get(&self, role: &str) -> Result<Option<StaticState>> {
        self.check()?;
        Ok(self
            .statics
            .lock()
            .unwrap()
            .get(role)
            .map(|(s, _)| s.clone()))
    }

    async fn static_list(&self) -> Result<Vec<StaticState>> {
        self.check()?;
        Ok(self
            .statics
            .lock()
            .unwrap()
            .values()
            .map(|(s, _)| s.clone())
            .collect())
    }

    async fn static_claim(&self, role: &str, claim: &Claim) -> Result<Option<StaticState>> {
        self.check()?;
        let now = Utc::now();
        let mut all = self.statics.lock().unwrap();
        let entry = all.entry(role.to_string()).or_insert_with(|| {
            (
                StaticState {
                    role: role.to_string(),
                    ..Default::default()
                },
                None,
            )
        });
        if entry
            .1
            .as_ref()
            .is_some_and(|c| c.owner != claim.owner && c.until > now)
        {
            return Ok(None);
        }
        entry.1 = Some(claim.clone());
        Ok(Some(entry.0.clone()))
    }

    async fn static_save(&self, state: &StaticState, owner: &str) -> Result<bool> {
        self.check()?;
        let now = Utc::now();
        let mut all = self.statics.lock().unwrap();
        match all.get_mut(&state.role) {
            Some((s, Some(c))) if c.owner == owner && c.until > now => {
                *s = state.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn static_release(&self, role: &str, owner: &str) -> Result<()> {
        self.check()?;
        if let Some((_, c)) = self.statics.lock().unwrap().get_mut(role) {
            if c.as_ref().is_some_and(|c| c.owner == owner) {
                *c = None;
            }
        }
        Ok(())
    }
}

/// Whether `l` passes every field of `f` (limit and offset aside).
fn matches(f: &LeaseFilter, l: &Lease) -> bool {
    f.role.as_ref().is_none_or(|x| &l.role == x)
        && f.database.as_ref().is_none_or(|x| &l.database == x)
        && f.identity.as_ref().is_none_or(|x| &l.identity == x)
        && if f.states.is_empty() {
            live(l)
        } else {
            f.states.contains(&l.state)
        }
        && f.expiring_before.is_none_or(|t| l.expires_at <= t)
}
