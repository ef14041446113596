//! What the lease path needs of just-in-time access grants (`access` is
//! the lifecycle; it sits above the broker): is there a live grant that
//! lets this identity lease this role, is a given grant still live, and
//! the revocation of every lease issued under a grant.

use super::{Broker, BulkOutcome, Mode};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{LeaseState, Reason};
use crate::lock::Subject;
use crate::store::{AccessFilter, AccessRequest, AccessState, LeaseFilter};

impl Broker {
    /// The live grant that lets `who` lease `role` now, if any: granted,
    /// the requester's, naming the role, before its end, and its policy
    /// still configured and still granting the role (a SIGHUP that removes
    /// either suspends the grant). The grant ending soonest is not
    /// preferred: the latest end is, so a lease gets the most room.
    pub async fn grant_covering(
        &self,
        who: &Identity,
        role: &str,
    ) -> Result<Option<AccessRequest>> {
        let config = self.config();
        if config.access.is_empty() {
            return Ok(None);
        }
        let now = self.clock.now();
        let granted = self
            .store
            .list_access(&AccessFilter {
                requester: Some(who.as_str().to_string()),
                states: vec![AccessState::Granted],
                limit: None,
            })
            .await?;
        Ok(granted
            .into_iter()
            .filter(|g| g.covers(who.as_str(), role, now))
            .filter(|g| {
                config
                    .access
                    .get(&g.policy)
                    .is_some_and(|p| p.roles.iter().any(|r| r == role))
            })
            .max_by_key(|g| g.until))
    }

    /// Whether grant `id` still lets its holder use `role` now (renewals
    /// and the re-check after an intent is stored).
    pub async fn grant_live(&self, id: &str, holder: &str, role: &str) -> Result<bool> {
        let now = self.clock.now();
        let config = self.config();
        Ok(self.store.get_access(id).await?.is_some_and(|g| {
            g.covers(holder, role, now)
                && config
                    .access
                    .get(&g.policy)
                    .is_some_and(|p| p.roles.iter().any(|r| r == role))
        }))
    }

    /// Refuses `who` when an identity lock matches it: what the access
    /// calls (request, approve, deny) check for in-process callers, as
    /// the gate does on the `Access` door.
    pub async fn check_identity_lock(&self, who: &Identity) -> Result<()> {
        let locks = self.store.active_locks().await?;
        match crate::lock::first_match_subject(&locks, &Subject::identity(who)) {
            Some(lock) => Err(lock.refusal()),
            None => Ok(()),
        }
    }

    /// Revokes every live lease issued under grant `id` through the
    /// revocation engine (`Reason::GrantEnded`, sessions ended at once).
    /// Called after the grant's end is stored, so an issue racing it
    /// either sees the grant ended on its re-check or has its intent
    /// listed here (the same order a lock's `--revoke` relies on).
    pub async fn revoke_grant_leases(&self, actor: &Identity, id: &str) -> Result<BulkOutcome> {
        if id.is_empty() {
            return Err(Error::invalid("grant id is required"));
        }
        let filter = LeaseFilter {
            grant: Some(id.to_string()),
            states: vec![
                LeaseState::Pending,
                LeaseState::Active,
                LeaseState::Draining,
                LeaseState::Failing,
            ],
            ..LeaseFilter::default()
        };
        let leases = self.store.list(&filter).await?;
        self.revoke_listed(actor, leases, Reason::GrantEnded, Mode::UntilDropped)
            .await
    }
}
