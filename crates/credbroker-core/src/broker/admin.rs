//! Admin calls on leases and on the broker's own database logins. Each
//! starts with `require_admin`; every door's gate checks `admin_networks`
//! first (`check_admin_network`, here so its wording lives beside the
//! admin calls). Bulk revocations claim each lease before revoking it, so
//! they never race the reaper.

use std::net::IpAddr;

use super::{truncate_text, Broker, BulkOutcome, Mode, Selector};
use crate::audit::{Event, Outcome};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{Lease, Reason};
use crate::store::LeaseFilter;

impl Broker {
    /// Lists leases for an admin.
    pub async fn admin_list(&self, who: &Identity, filter: &LeaseFilter) -> Result<Vec<Lease>> {
        self.require_admin(who, "admin_list")?;
        self.store.list(filter).await
    }

    /// Revokes every live lease the selector names.
    pub async fn admin_revoke(
        &self,
        who: &Identity,
        selector: &Selector,
        mode: Mode,
    ) -> Result<BulkOutcome> {
        self.require_admin(who, "admin_revoke")?;
        let mut filter = LeaseFilter::default();
        match selector {
            Selector::Lease(id) => {
                let lease = self
                    .store
                    .get(id)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("no lease {id}")))?;
                if !lease.state.is_live() {
                    return Ok(BulkOutcome::default());
                }
                let claimed = self.store.claim_one(id, &self.claim()).await?;
                return Ok(match claimed {
                    Some(l) => {
                        self.revoker
                            .revoke_claimed(vec![l], who.as_str(), Reason::Admin, mode)
                            .await
                    }
                    None => BulkOutcome {
                        revoked: vec![],
                        failed: vec![(
                            id.clone(),
                            Error::FailedPrecondition(
                                "being revoked by another task right now".into(),
                            ),
                        )],
                    },
                });
            }
            Selector::Role(r) => filter.role = Some(r.clone()),
            Selector::Database(d) => filter.database = Some(d.clone()),
            Selector::Identity(i) => filter.identity = Some(i.as_str().to_string()),
            Selector::Matching(f) => {
                filter = LeaseFilter {
                    limit: None,
                    offset: None,
                    ..f.clone()
                }
            }
            Selector::All => {}
        }
        self.revoke_matching(who, &filter, Reason::Admin, mode, |_| true)
            .await
    }

    /// Claims and revokes every live lease `filter` lists and `keep` accepts,
    /// in batches, through the revocation engine.
    async fn revoke_matching(
        &self,
        who: &Identity,
        filter: &LeaseFilter,
        reason: Reason,
        mode: Mode,
        keep: impl Fn(&Lease) -> bool,
    ) -> Result<BulkOutcome> {
        let candidates = self.store.list(filter).await?;
        let candidates = candidates.into_iter().filter(|l| keep(l)).collect();
        self.revoke_listed(who, candidates, reason, mode).await
    }

    /// Claims and revokes `candidates`, in batches, through the engine.
    pub(super) async fn revoke_listed(
        &self,
        who: &Identity,
        candidates: Vec<Lease>,
        reason: Reason,
        mode: Mode,
    ) -> Result<BulkOutcome> {
        let mut total = BulkOutcome::default();
        let batch = self.config().reaper.batch_size;
        let mut claimed = Vec::new();
        for lease in candidates {
            match self.store.claim_one(&lease.id, &self.claim()).await? {
                Some(l) => claimed.push(l),
                None => total.failed.push((
                    lease.id.clone(),
                    Error::FailedPrecondition("being revoked by another task right now".into()),
                )),
            }
        }
        for chunk in claimed.chunks(batch) {
            let out = self
                .revoker
                .revoke_claimed(chunk.to_vec(), who.as_str(), reason, mode)
                .await;
            total.revoked.extend(out.revoked);
            total.failed.extend(out.failed);
        }
        Ok(total)
    }

    /// Replaces the broker's own admin password on `database`. A call while
    /// another runs on the same database waits for it, then rotates again.
    pub async fn rotate_root(&self, who: &Identity, database: &str) -> Result<()> {
        self.require_admin(who, "rotate_root")?;
        let mut event = Event::new(who.as_str(), "rotate_root");
        event.database = Some(truncate_text(database));
        let result = match (self.backends.get(database), self.rotations.get(database)) {
            (Some(b), Some(lock)) => {
                let (b, lock) = (b.clone(), lock.clone());
                // A task of its own, holding the lock: a caller that hangs
                // up must not cut a rotation off between the database's
                // ALTER ROLE and the keeping of the new password.
                tokio::spawn(async move {
                    let _one_at_a_time = lock.lock_owned().await;
                    b.rotate_root().await
                })
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("rotate-root task: {e}"))))
            }
            _ => Err(Error::NotFound(format!(
                "no database {database:?} is configured"
            ))),
        };
        match result {
            Ok(()) => {
                event.outcome = Some(Outcome::Ok);
                self.audit_event(event)
            }
            Err(e) => Err(self.refused("rotate_root", event, e)),
        }
    }

    /// Refuses (and audits) `who` unless it is an admin.
    pub fn require_admin(&self, who: &Identity, action: &'static str) -> Result<()> {
        if self.is_admin(who) {
            return Ok(());
        }
        let err = Error::denied("identity is not an admin");
        Err(self.refused(action, Event::new(who.as_str(), action), err))
    }
}

/// Refuses an admin call from outside `admin_networks`; the gate asks it
/// whenever a caller acts as an admin, on every door, and audits the
/// refusal with the door.
pub(crate) fn check_admin_network(config: &Config, peer: Option<IpAddr>) -> Result<()> {
    if crate::policy::network_allowed(&config.admin_networks, peer) {
        return Ok(());
    }
    Err(Error::denied(match peer {
        Some(p) => format!("admin calls from {p} are outside admin_networks"),
        None => "admin calls need a known caller address (admin_networks)".into(),
    }))
}
