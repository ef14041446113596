//! A new lease, in the order invariant 1 needs: the checks before anything
//! is written, the intent stored before the user exists, the audit record
//! before the password leaves. Renew repeats the network and TTL checks
//! from here (and `check_locks` from `locks`), so the two cannot drift
//! apart.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{check_role_name, truncate_text, Broker, IssuedLease};
use crate::audit::{Event, Outcome};
use crate::backend::{Backend, NewUser};
use crate::config::{Config, RoleConfig};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{truncate_ms, Lease, LeaseId, LeaseState, Password, Username};
use crate::policy::any_matches;
use crate::revocation::UNREACHABLE_RETRY_CAP;

impl Broker {
    /// Leases `role` for `who`. `ttl` None means the role's default. For
    /// callers inside the broker; a network caller goes through
    /// [`Broker::issue_from`] with its address.
    pub async fn issue(
        &self,
        who: &Identity,
        role_name: &str,
        ttl: Option<Duration>,
    ) -> Result<IssuedLease> {
        self.issue_from(who, None, role_name, ttl).await
    }

    /// `issue` for a caller at `peer` (its TCP peer address), checked
    /// against the role's `allowed_networks`.
    pub async fn issue_from(
        &self,
        who: &Identity,
        peer: Option<IpAddr>,
        role_name: &str,
        ttl: Option<Duration>,
    ) -> Result<IssuedLease> {
        self.issue_through(who, peer, role_name, ttl, None).await
    }

    /// `issue_from`, and with `token` (a Vault token's accessor) the lease
    /// is linked to that token in the step that activates it
    /// (`broker::tokens`).
    pub(super) async fn issue_through(
        &self,
        who: &Identity,
        peer: Option<IpAddr>,
        role_name: &str,
        ttl: Option<Duration>,
        token: Option<&str>,
    ) -> Result<IssuedLease> {
        let started = Instant::now();
        let mut event = Event::new(who.as_str(), "issue");
        event.role = Some(truncate_text(role_name));
        let result = self
            .issue_inner(who, peer, role_name, ttl, token, &mut event)
            .await;
        match result {
            Ok(issued) => {
                self.metrics.issued(
                    &issued.lease.role,
                    &issued.lease.database,
                    started.elapsed(),
                );
                Ok(issued)
            }
            Err(e) => {
                self.metrics.request_failed("issue", &e);
                Err(self.audit_failure(event, e))
            }
        }
    }

    async fn issue_inner(
        &self,
        who: &Identity,
        peer: Option<IpAddr>,
        role_name: &str,
        ttl: Option<Duration>,
        token: Option<&str>,
        event: &mut Event,
    ) -> Result<IssuedLease> {
        let config = self.config();
        let role = lookup_role(&config, role_name)?;
        // A person outside `allowed` is admitted while a live access grant
        // covers (identity, role): the lease is tied to the grant, and
        // never outlives it (`access`).
        let grant = if any_matches(&role.allowed, who) {
            None
        } else {
            match self.grant_covering(who, role_name).await? {
                Some(g) => Some(g),
                None => return Err(not_allowed(who, role_name)),
            }
        };
        event.request_id = grant.as_ref().map(|g| g.id.clone());
        check_network(role, peer)?;
        event.database = Some(role.database.clone());
        let mut ttl = effective_ttl(role, ttl)?;
        // Before anything is written: a locked-out caller costs one read.
        self.check_locks(who, &role.name, &role.database).await?;
        self.check_limits(who, role).await?;
        let backend = self.backend(&role.database)?.clone();

        let now = truncate_ms(self.clock.now());
        let mut max_expires_at =
            now + chrono::Duration::from_std(role.max_ttl).map_err(Error::internal)?;
        if let Some(until) = grant.as_ref().and_then(|g| g.until) {
            // The database itself refuses after the grant's end: VALID
            // UNTIL / the failsafe are the lease's, clamped here.
            let until = truncate_ms(until);
            if until <= now {
                return Err(not_allowed(who, role_name));
            }
            max_expires_at = max_expires_at.min(until);
            ttl = ttl.min(until - now);
        }
        let expires_at = now + ttl;
        let username = Username::generate(&config.server.name_prefix, &role.name);
        let password = Password::generate();
        let lease = Lease {
            id: LeaseId::generate(),
            role: role.name.clone(),
            database: role.database.clone(),
            kind: backend.kind(),
            username: username.clone(),
            user_host: if backend.kind() == crate::lease::BackendKind::Mysql {
                account_host(role, peer)?
            } else {
                String::new()
            },
            identity: who.as_str().to_string(),
            state: LeaseState::Pending,
            issued_at: now,
            expires_at,
            max_expires_at,
            due_at: now
                + chrono::Duration::from_std(config.reaper.intent_grace)
                    .map_err(Error::internal)?,
            revoked_at: None,
            revoke_attempts: 0,
            last_error: None,
            grant_id: grant.as_ref().map(|g| g.id.clone()),
        };
        event.lease_id = Some(lease.id.to_string());
        event.username = Some(username.to_string());

        // Invariant 1: the intent is durable before the user exists. The
        // per-identity cap is checked by the store in the same step, so
        // parallel issues cannot overshoot it.
        let intent = self
            .store
            .insert_intent(&lease, role.max_leases_per_identity);
        if let Err(e) = crate::steps::timed("store: write intent", intent).await {
            if matches!(e, Error::ResourceExhausted(_)) {
                // Refused: no such lease or user ever existed.
                event.lease_id = None;
                event.username = None;
            }
            return Err(e);
        }
        // The intent may now be due before the reaper's next planned wake.
        self.reaper_wake.due(lease.due_at);
        // Again, now that the intent is in the store: a lock written after
        // the first check lists its leases after writing itself, so either
        // its `--revoke` sees this intent or this check sees the lock.
        if let Err(e) = self.check_locks(who, &role.name, &role.database).await {
            self.drop_unused_intent(&lease).await;
            return Err(e);
        }
        // Likewise the grant: ending it stores the end, then lists its
        // leases, so either that listing sees this intent or this sees
        // the end.
        if let Some(g) = &grant {
            match self.grant_live(&g.id, who.as_str(), &role.name).await {
                Ok(true) => {}
                Ok(false) => {
                    self.drop_unused_intent(&lease).await;
                    return Err(Error::denied(format!(
                        "access grant {} ended while this lease was being issued",
                        g.id
                    )));
                }
                Err(e) => {
                    self.drop_unused_intent(&lease).await;
                    return Err(e);
                }
            }
        }

        let new_user = NewUser {
            role: &role.name,
            username: &username,
            password: &password,
            valid_until: expires_at,
            hard_limit: max_expires_at,
            grants: &role.grants,
            host: &lease.user_host,
            owner: role.owner.as_deref(),
        };
        let create = backend.create_user(&new_user);
        if let Err(e) = crate::steps::timed("database: create user", create).await {
            self.clean_up_failed_issue(lease.clone(), backend.clone());
            return Err(e);
        }
        // Through a token, the link is written in the activation's own
        // step: a lease is never active without the link that lets
        // revoking its token reach it.
        let activate = async {
            match token {
                Some(accessor) => self.store.activate_linked(&lease.id, accessor).await,
                None => self.store.activate(&lease.id).await,
            }
        };
        if let Err(e) = crate::steps::timed("store: activate", activate).await {
            self.clean_up_failed_issue(lease.clone(), backend.clone());
            return Err(e);
        }
        let mut lease = lease;
        lease.state = LeaseState::Active;
        lease.due_at = expires_at;

        let mut ok = event.clone();
        ok.outcome = Some(Outcome::Ok);
        ok.detail = Some(match &grant {
            Some(g) => format!("ttl={}s grant={}", ttl.num_seconds(), g.id),
            None => format!("ttl={}s", ttl.num_seconds()),
        });
        if let Err(e) = self.audit_event(ok) {
            // An unaudited credential must not be handed out.
            let _ = self.store.claim_one(&lease.id, &self.claim()).await;
            self.clean_up_failed_issue(lease, backend);
            return Err(e);
        }
        self.reaper_wake.due(lease.due_at);
        let dsn = backend.dsn(&username, Some(&password));
        Ok(IssuedLease {
            lease,
            password,
            dsn,
            endpoint: backend.endpoint().clone(),
        })
    }

    /// A failed issue may have left a user behind (e.g. the connection broke
    /// after COMMIT). Dropping it is tried in the background so the caller
    /// gets its error at once; if that fails too, the pending intent stays
    /// and the reaper resolves it after the intent grace period.
    fn clean_up_failed_issue(&self, lease: Lease, backend: Arc<dyn Backend>) {
        let store = self.store.clone();
        let audit = self.audit.clone();
        let revokee = self.revoker.revokee(&lease);
        let clock = self.clock;
        tokio::spawn(async move {
            match backend.revoke(&[revokee]).await {
                Ok(_) => {
                    if store
                        .mark_revoked(std::slice::from_ref(&lease.id), clock.now())
                        .await
                        .is_ok()
                    {
                        let mut e = Event::new("credbroker:system", "resolve_intent");
                        e.lease_id = Some(lease.id.to_string());
                        e.username = Some(lease.username.to_string());
                        e.database = Some(lease.database.clone());
                        e.role = Some(lease.role.clone());
                        e.outcome = Some(Outcome::Ok);
                        e.detail = Some("issue failed; user dropped".into());
                        let _ = audit.append(e);
                    }
                }
                Err(e) => {
                    // No issue is in flight for this intent any more, so the
                    // reaper need not wait out the intent grace: it retries
                    // on its usual backoff and resolves the intent as soon
                    // as the database is back.
                    let next = clock.now()
                        + chrono::Duration::from_std(UNREACHABLE_RETRY_CAP).unwrap_or_default();
                    let _ = store
                        .record_failure(&lease.id, &e.to_string(), next, false)
                        .await;
                    tracing::warn!(lease_id = %lease.id, error = %crate::error::chain(&e), "cleanup after failed issue deferred to the reaper")
                }
            }
        });
    }

    /// An intent refused before its user was created: nothing exists in the
    /// database, so the row leaves the live set directly. When another task
    /// holds it (a lock's `--revoke` found it), that task finishes it.
    async fn drop_unused_intent(&self, lease: &Lease) {
        match self.store.claim_one(&lease.id, &self.claim()).await {
            Ok(Some(_)) => {
                if let Err(e) = self
                    .store
                    .mark_revoked_claimed(
                        std::slice::from_ref(&lease.id),
                        &self.owner,
                        self.clock.now(),
                    )
                    .await
                {
                    // The reaper resolves it after the intent grace.
                    tracing::warn!(lease_id = %lease.id, error = %crate::error::chain(&e), "cannot retire a refused intent");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(lease_id = %lease.id, error = %crate::error::chain(&e), "cannot retire a refused intent")
            }
        }
    }

    async fn check_limits(&self, who: &Identity, role: &RoleConfig) -> Result<()> {
        if let Some(rate) = role.issue_rate {
            let burst = role
                .issue_burst
                .unwrap_or_else(|| rate.ceil().max(1.0) as u32);
            if !self
                .limiter
                .try_acquire(&role.name, who.as_str(), rate, burst)
            {
                return Err(Error::ResourceExhausted(format!(
                    "issue rate limit of {rate}/s for role {:?} reached; slow down",
                    role.name
                )));
            }
        }
        Ok(())
    }
}

/// The refusal of a role to an identity not in its `allowed`, in the same
/// words from the gate and the broker. It names the caller's own identity
/// (from its certificate: no secret), so a service run under the wrong
/// certificate sees which one the broker saw.
pub(crate) fn not_allowed(who: &Identity, role: &str) -> Error {
    Error::denied(format!(
        "identity {:?} may not lease role {role:?}",
        who.as_str()
    ))
}

pub(crate) fn lookup_role<'c>(config: &'c Config, name: &str) -> Result<&'c RoleConfig> {
    check_role_name(name, "role", "role")?;
    config
        .role(name)
        .ok_or_else(|| Error::NotFound(format!("no role {name:?} is configured")))
}

/// Defined in `config` (static roles' validation refuses it too).
pub use crate::config::CALLER_HOST;

fn account_host(role: &RoleConfig, peer: Option<IpAddr>) -> Result<String> {
    if role.host != CALLER_HOST {
        return Ok(role.host.clone());
    }
    let peer = peer.ok_or_else(|| {
        Error::denied(format!(
            "role {:?} pins its users to the caller's address, which is unknown",
            role.name
        ))
    })?;
    // A dual-stack listener reports IPv4 callers as ::ffff:a.b.c.d; the
    // database sees them as a.b.c.d.
    let peer = match peer {
        IpAddr::V6(v) => v.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
        v4 => v4,
    };
    Ok(peer.to_string())
}

/// The role's `allowed_networks` against the caller's address; the
/// refusal names the address, so the audit record has it.
pub(crate) fn check_network(role: &RoleConfig, peer: Option<IpAddr>) -> Result<()> {
    if crate::policy::network_allowed(&role.allowed_networks, peer) {
        return Ok(());
    }
    Err(Error::denied(match peer {
        Some(p) => format!(
            "caller address {p} is outside the allowed networks of role {:?}",
            role.name
        ),
        None => format!(
            "caller address unknown; role {:?} allows only some networks",
            role.name
        ),
    }))
}

pub(super) fn effective_ttl(role: &RoleConfig, ttl: Option<Duration>) -> Result<chrono::Duration> {
    let ttl = ttl.unwrap_or(role.default_ttl);
    if ttl < Duration::from_secs(1) {
        return Err(Error::invalid("ttl must be at least 1 second"));
    }
    if ttl > role.max_ttl {
        return Err(Error::invalid(format!(
            "ttl of {}s exceeds the role's max_ttl of {}s",
            ttl.as_secs(),
            role.max_ttl.as_secs()
        )));
    }
    chrono::Duration::from_std(ttl).map_err(Error::internal)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::path::Path;

    use crate::error::Error;
    use crate::lease::LeaseState;
    use crate::store::{LeaseFilter, LeaseStore};
    use crate::testkit::{app, role, Kit};

    #[tokio::test]
    async fn an_issue_that_cannot_be_audited_hands_out_nothing_and_leaves_nothing() {
        // Every write to /dev/full fails (ENOSPC): a full disk under the log.
        let kit = Kit::with_audit_at("", &role("ro", "main"), Some(Path::new("/dev/full")));
        let Err(err) = kit.broker.issue(&app(), "ro", None).await else {
            panic!("a lease was handed out although its audit record failed");
        };
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains("audit"), "{err}");
        // The user the backend made is dropped again, and the lease leaves
        // the live set: nothing can log in that nobody audited.
        let mut created = None;
        for _ in 0..100 {
            let calls = kit.server.calls();
            created = calls
                .iter()
                .find_map(|c| c.strip_prefix("create ").map(str::to_string));
            let dropped = calls.iter().any(|c| c.starts_with("revoke "));
            if created.is_some() && dropped {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let user = created.expect("the backend was asked to create the user");
        assert!(
            kit.server.user(&user).is_none(),
            "{user} still exists: {:?}",
            kit.server.calls()
        );
        let live = kit.store.list(&LeaseFilter::default()).await.unwrap();
        assert!(
            live.iter().all(|l| l.state == LeaseState::Revoked),
            "{live:?}"
        );
    }

    /// Over the role's max_ttl a renewal is capped, as Vault (and our
    /// Vault API) does, not refused; an issue over it is still refused.
    #[tokio::test]
    async fn a_renewal_over_max_ttl_is_capped_not_refused() {
        let kit = Kit::new("", &role("ro", "main"));
        let two_h = Some(std::time::Duration::from_secs(7200));
        let held = kit.broker.issue(&app(), "ro", None).await.unwrap();
        let renewed = kit
            .broker
            .renew(&app(), &held.lease.id, two_h)
            .await
            .unwrap();
        assert_eq!(renewed.expires_at, held.lease.max_expires_at);
        let e = kit.broker.issue(&app(), "ro", two_h).await.err().unwrap();
        assert!(e.to_string().contains("exceeds the role's max_ttl"), "{e}");
    }

    #[tokio::test]
    async fn allowed_networks_hold_for_issue_and_renew() {
        let kit = Kit::new(
            "",
            &role("net", "main").replace(
                "allowed = ",
                "allowed_networks = [\"10.0.0.0/8\"]\nallowed = ",
            ),
        );
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let l = kit
            .broker
            .issue_from(&app(), ip("10.1.2.3"), "net", None)
            .await
            .unwrap();
        kit.broker
            .renew_from(&app(), ip("::ffff:10.9.9.9"), &l.lease.id, None)
            .await
            .unwrap();
        let e = kit
            .broker
            .renew_from(&app(), ip("192.168.1.1"), &l.lease.id, None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("192.168.1.1"), "{e}");
        let e = kit.broker.issue(&app(), "net", None).await.err().unwrap();
        assert!(
            matches!(e, Error::PermissionDenied(_)),
            "unknown address: {e}"
        );
    }
}
