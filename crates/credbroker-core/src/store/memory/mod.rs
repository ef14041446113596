//! An in-memory lease store for the fast test tier: the same rules as the
//! real stores (claims, revoked only through `mark_revoked*`, no password),
//! none of the durability. Never used by `serve`: a broker whose store
//! forgets on restart would break invariant 1.
//!
//! The test knobs (`steal_claim`, `fail_next`) reproduce what a shared
//! store does to a replica — a claim taken over, a store that is away —
//! without a second process.

mod access;
mod leases;
mod locks;
mod statics;
mod tokens;

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::lease::{Lease, LeaseId, LeaseState};
use crate::lock::Lock;
use crate::store::{Claim, StaticState, Store, VaultToken};

#[derive(Default)]
pub struct MemoryStore {
    rows: Mutex<BTreeMap<LeaseId, Row>>,
    locks: Mutex<Vec<Lock>>,
    statics: Mutex<BTreeMap<String, (StaticState, Option<Claim>)>>,
    /// Vault-API tokens by hash, and (accessor, lease) links.
    vault_tokens: Mutex<BTreeMap<String, VaultToken>>,
    vault_links: Mutex<std::collections::BTreeSet<(String, LeaseId)>>,
    /// Access requests by id.
    access: Mutex<BTreeMap<String, crate::store::AccessRequest>>,
    /// Calls that fail with `Unavailable` before the store answers again.
    fail_next: Mutex<u32>,
    /// Claim expiry and lock times: the broker's clock, as a real store's
    /// are its own. Static roles' claims stay on the system clock, which
    /// their `Rotator` uses.
    clock: Clock,
}

/// A lease as the memory store keeps it: the lease and its claim.
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

/// Pending → active, unless a revoker claimed the intent; whether it was.
fn activate_row(rows: &mut BTreeMap<LeaseId, Row>, id: &LeaseId) -> bool {
    match rows.get_mut(id) {
        Some(r) if r.lease.state == LeaseState::Pending && r.claim.is_none() => {
            r.lease.state = LeaseState::Active;
            r.lease.due_at = r.lease.expires_at;
            true
        }
        _ => false,
    }
}

fn live(l: &Lease) -> bool {
    l.state != LeaseState::Revoked
}

#[async_trait]
impl Store for MemoryStore {
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
}
