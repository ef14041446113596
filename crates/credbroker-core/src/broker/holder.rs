//! What a lease's holder does with it afterwards: look it up, renew it,
//! revoke it. Each call loads the lease through `owned_lease` (its own, or
//! any for an admin); renew checks policy again, as issue does.

use std::net::IpAddr;
use std::time::Duration;

use super::issue::{check_network, effective_ttl};
use super::Broker;
use crate::audit::{Event, Outcome};
use crate::backend::{Endpoint, UserRef};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{truncate_ms, Lease, LeaseId, LeaseState};
use crate::policy::any_matches;
use crate::store::HolderClaim;
use crate::watch::LeaseEvent;

impl Broker {
    /// Loads a lease the caller may act on: its own, or any for an admin.
    async fn owned_lease(&self, who: &Identity, id: &LeaseId) -> Result<Lease> {
        let lease = crate::steps::timed("store: read lease", self.store.get(id))
            .await?
            .ok_or_else(|| Error::NotFound(format!("no lease {id}")))?;
        if lease.identity != who.as_str() && !self.is_admin(who) {
            return Err(Error::denied(format!(
                "lease {id} belongs to another identity"
            )));
        }
        Ok(lease)
    }

    pub async fn lookup(&self, who: &Identity, id: &LeaseId) -> Result<(Lease, String)> {
        let lease = self.owned_lease(who, id).await?;
        let dsn = self
            .backends
            .get(&lease.database)
            .map(|b| b.dsn(&lease.username, None))
            .unwrap_or_default();
        Ok((lease, dsn))
    }

    /// The connection string of a lease (no password), "" when its
    /// database is no longer configured.
    pub fn dsn_of(&self, lease: &Lease) -> String {
        self.backends
            .get(&lease.database)
            .map(|b| b.dsn(&lease.username, None))
            .unwrap_or_default()
    }

    pub fn endpoint(&self, database: &str) -> Option<Endpoint> {
        self.backends.get(database).map(|b| b.endpoint().clone())
    }

    /// Moves a live lease's expiry to now + ttl, capped at its hard limit.
    /// For callers inside the broker; see [`Broker::renew_from`].
    pub async fn renew(
        &self,
        who: &Identity,
        id: &LeaseId,
        ttl: Option<Duration>,
    ) -> Result<Lease> {
        self.renew_from(who, None, id, ttl).await
    }

    /// `renew` for a caller at `peer`, checked against `allowed_networks`.
    pub async fn renew_from(
        &self,
        who: &Identity,
        peer: Option<IpAddr>,
        id: &LeaseId,
        ttl: Option<Duration>,
    ) -> Result<Lease> {
        let mut event = Event::new(who.as_str(), "renew");
        event.lease_id = Some(id.to_string());
        match self.renew_inner(who, peer, id, ttl, &mut event).await {
            Ok(lease) => {
                event.outcome = Some(Outcome::Ok);
                event.detail = Some(format!("expires_at={}", lease.expires_at.to_rfc3339()));
                self.audit_event(event)?;
                self.metrics.renewed(&lease.role, &lease.database);
                self.watch
                    .publish(LeaseEvent::renewed(&lease, who.as_str()));
                Ok(lease)
            }
            Err(e) => Err(self.refused("renew", event, e)),
        }
    }

    async fn renew_inner(
        &self,
        who: &Identity,
        peer: Option<IpAddr>,
        id: &LeaseId,
        ttl: Option<Duration>,
        event: &mut Event,
    ) -> Result<Lease> {
        let mut lease = self.owned_lease(who, id).await?;
        event.role = Some(lease.role.clone());
        event.database = Some(lease.database.clone());
        event.username = Some(lease.username.to_string());
        let now = self.clock.now();
        if lease.state != LeaseState::Active {
            return Err(Error::FailedPrecondition(format!(
                "lease {id} is {}, not active",
                lease.state.as_str()
            )));
        }
        if lease.expires_at <= now {
            return Err(Error::FailedPrecondition(format!(
                "lease {id} has expired; issue a new one"
            )));
        }
        if lease.expires_at >= lease.max_expires_at {
            return Err(Error::FailedPrecondition(format!(
                "lease {id} is at its hard limit ({}); issue a new one",
                lease.max_expires_at.to_rfc3339()
            )));
        }
        // A removed role keeps its leases revocable, but not renewable.
        let config = self.config();
        let role = config.role(&lease.role).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "role {:?} is no longer configured; lease {id} cannot be renewed",
                lease.role
            ))
        })?;
        // Policy is checked on every call that extends a credential's life:
        // an identity removed from `allowed` (SIGHUP) stops renewing too.
        // A lease under an access grant renews while its grant lives (and
        // never past it: its hard limit is the grant's end).
        let admitted = match &lease.grant_id {
            Some(g) => self.grant_live(g, &lease.identity, &lease.role).await?,
            None => any_matches(
                &role.allowed,
                &Identity::from_trusted(lease.identity.clone()),
            ),
        };
        if !admitted {
            return Err(Error::denied(format!(
                "identity may no longer lease role {:?}; lease {id} cannot be renewed",
                lease.role
            )));
        }
        check_network(role, peer)?;
        self.check_locks(
            &Identity::from_trusted(lease.identity.clone()),
            &lease.role,
            &lease.database,
        )
        .await?;
        // Over max_ttl a renewal is capped, not refused, as Vault does
        // (and our Vault API); `lease renew` says so.
        let ttl = effective_ttl(role, ttl.map(|t| t.min(role.max_ttl)))?;
        let new_expiry = truncate_ms((now + ttl).min(lease.max_expires_at));
        let backend = self.backend(&lease.database)?.clone();
        let user = UserRef {
            username: lease.username.clone(),
            host: lease.user_host.clone(),
        };
        // Database first: if the store write then fails, the database allows
        // less than the store would revoke at, never more.
        backend.extend(&user, new_expiry).await?;
        if !self.store.set_expiry(id, new_expiry).await? {
            return Err(Error::FailedPrecondition(format!(
                "lease {id} is being revoked"
            )));
        }
        lease.expires_at = new_expiry;
        lease.due_at = new_expiry;
        Ok(lease)
    }

    /// A routine handover's revoke — the sidecar's, of the lease it has
    /// replaced: the lease drains (`revocation::drain`) instead of being
    /// cut, and the answer comes at once, the lease `draining`. Only its
    /// own holder may hand a lease over (an admin's revoke never drains).
    /// A lease with no drain time left (a zero `drain_deadline`, its hard
    /// limit reached), expired or not active, or on a database that cannot
    /// refuse logins while sessions stay, is revoked at once, as by
    /// `revoke`. The drain may outlast the lease's current expiry, never
    /// its hard limit: the database's own end (`VALID UNTIL`, the failsafe)
    /// moves to the deadline with it, and no login is possible meanwhile.
    pub async fn revoke_handover(&self, who: &Identity, id: &LeaseId) -> Result<Lease> {
        let mut event = Event::new(who.as_str(), "revoke");
        event.lease_id = Some(id.to_string());
        let lease = match self.store.get(id).await? {
            Some(l) => l,
            None => return self.revoke(who, id).await,
        };
        event.role = Some(lease.role.clone());
        event.database = Some(lease.database.clone());
        event.username = Some(lease.username.to_string());
        if lease.identity != who.as_str() {
            let e = Error::denied(format!(
                "lease {id} belongs to another identity; only its holder hands it over"
            ));
            return Err(self.refused("revoke", event, e));
        }
        if lease.state == LeaseState::Draining {
            event.outcome = Some(Outcome::Ok);
            event.detail = Some("handover: already draining".into());
            self.audit_event(event)?;
            return Ok(lease);
        }
        let now = self.clock.now();
        let drain = self.config().drain_deadline(&lease.role);
        let until = truncate_ms(
            (now + chrono::Duration::from_std(drain).unwrap_or_default()).min(lease.max_expires_at),
        );
        let backend = match self.backends.get(&lease.database) {
            Some(b)
                if lease.state == LeaseState::Active && lease.expires_at > now && until > now =>
            {
                b.clone()
            }
            _ => return self.revoke(who, id).await,
        };
        // Durable first: from here the reaper revokes it at `until`
        // whatever happens to this process.
        let Some(draining) = self.store.start_drain(id, who.as_str(), until).await? else {
            return self.revoke(who, id).await;
        };
        let user = UserRef {
            username: lease.username.clone(),
            host: lease.user_host.clone(),
        };
        if let Err(e) = backend.drain_begin(&user, until).await {
            // Logins may still work: no draining without that. Cut instead.
            tracing::warn!(lease_id = %id, error = %crate::error::chain(&e),
                "cannot refuse the replaced credential's logins; revoking it at once");
            return self.revoke(who, id).await;
        }
        event.outcome = Some(Outcome::Ok);
        event.detail = Some(format!(
            "handover: logins refused, sessions drain until {}",
            until.to_rfc3339()
        ));
        self.audit_event(event)?;
        self.revoker.drain(draining.clone(), who.as_str());
        Ok(draining)
    }

    /// Resumes the handover drains a previous run left (see
    /// `Revoker::resume_drains`); how many.
    pub async fn resume_drains(&self) -> Result<usize> {
        self.revoker.resume_drains().await
    }

    /// Revokes one lease at its holder's request.
    pub async fn revoke(&self, who: &Identity, id: &LeaseId) -> Result<Lease> {
        let mut event = Event::new(who.as_str(), "revoke");
        event.lease_id = Some(id.to_string());
        // Ownership, state and the claim in one store step.
        let claim = self.claim();
        let holder = (!self.is_admin(who)).then(|| who.as_str());
        let claiming = self.store.claim_for(id, &claim, holder);
        let claimed = match crate::steps::timed("store: claim", claiming).await? {
            HolderClaim::Claimed(l) => l,
            HolderClaim::Missing => {
                let e = Error::NotFound(format!("no lease {id}"));
                return Err(self.refused("revoke", event, e));
            }
            HolderClaim::Refused(l) if holder.is_some_and(|h| h != l.identity) => {
                let e = Error::denied(format!("lease {id} belongs to another identity"));
                return Err(self.refused("revoke", event, e));
            }
            HolderClaim::Refused(l) if l.state == LeaseState::Revoked => {
                event.role = Some(l.role.clone());
                event.outcome = Some(Outcome::Ok);
                event.detail = Some("already revoked".into());
                self.audit_event(event)?;
                return Ok(l);
            }
            HolderClaim::Refused(_) => {
                return Err(self.audit_failure(
                    event,
                    Error::unavailable(format!(
                        "lease {id} is being revoked right now; look it up again shortly"
                    )),
                ))
            }
        };
        let mut lease = claimed.clone();
        if let Err(err) = self.revoker.revoke_requested(claimed, who.as_str()).await {
            return Err(Error::unavailable(format!(
                "revocation of lease {id} failed and will be retried: {err}"
            )));
        }
        // As marked; reading it back would cost a store round trip.
        lease.state = LeaseState::Revoked;
        lease.revoked_at = Some(self.clock.now());
        Ok(lease)
    }
}
