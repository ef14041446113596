//! Leases in memory.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{activate_row, live, MemoryStore, Row};
use crate::error::{Error, Result};
use crate::lease::{Lease, LeaseId, LeaseState};
use crate::store::{Claim, LeaseFilter, LeaseOrder, LeaseStore};

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
        let activated = self.with(|rows| activate_row(rows, id))?;
        if activated {
            Ok(())
        } else {
            Err(crate::store::not_activated())
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
                // Due now, as in both real stores: a claim that runs out
                // mid-revocation leaves the lease to the next reaper pass.
                r.lease.due_at = r.lease.due_at.min(now);
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

    async fn busiest_identity(&self) -> Result<Vec<(String, u64)>> {
        self.with(|rows| {
            let mut per: BTreeMap<(String, String), u64> = BTreeMap::new();
            for r in rows.values().filter(|r| live(&r.lease)) {
                *per.entry((r.lease.role.clone(), r.lease.identity.to_string()))
                    .or_default() += 1;
            }
            let mut most: BTreeMap<String, u64> = BTreeMap::new();
            for ((role, _), n) in per {
                let m = most.entry(role).or_default();
                *m = (*m).max(n);
            }
            most.into_iter().collect()
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

    async fn live_page(&self, after: Option<&LeaseId>, limit: usize) -> Result<Vec<Lease>> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.with(|rows| {
            rows.range((from, Bound::Unbounded))
                .filter(|(_, r)| live(&r.lease))
                .take(limit)
                .map(|(_, r)| r.lease.clone())
                .collect()
        })
    }

    async fn import_leases(&self, leases: &[Lease]) -> Result<()> {
        self.with(|rows| {
            // All or none, as the real stores' one transaction.
            for (i, l) in leases.iter().enumerate() {
                let taken = rows.contains_key(&l.id)
                    || leases[..i].iter().any(|o| o.id == l.id)
                    || rows
                        .values()
                        .any(|r| r.lease.database == l.database && r.lease.username == l.username);
                if taken {
                    return Err(Error::internal(format!(
                        "import: lease {} or its user name is already stored",
                        l.id
                    )));
                }
            }
            for l in leases {
                let row = Row {
                    lease: l.clone(),
                    claim: None,
                };
                rows.insert(l.id.clone(), row);
            }
            Ok(())
        })?
    }
}

/// Whether `l` passes every field of `f` (limit and offset aside).
fn matches(f: &LeaseFilter, l: &Lease) -> bool {
    f.role.as_ref().is_none_or(|x| &l.role == x)
        && f.database.as_ref().is_none_or(|x| &l.database == x)
        && f.identity.as_ref().is_none_or(|x| &l.identity == x)
        && f.grant
            .as_ref()
            .is_none_or(|x| l.grant_id.as_ref() == Some(x))
        && if f.states.is_empty() {
            live(l)
        } else {
            f.states.contains(&l.state)
        }
        && f.expiring_before.is_none_or(|t| l.expires_at <= t)
}
