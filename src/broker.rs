//! The lease path: issue, renew, revoke, look up — and the revocation
//! routine the reaper shares. No gRPC types here; the server module turns
//! requests into these calls and `Error`s into statuses.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::Rng;
use tokio::sync::Notify;

use crate::audit::{AuditLog, Event, Outcome};
use crate::backend::{Backend, Backends, Endpoint, NewUser, UserRef};
use crate::config::{Config, ConfigHandle, RoleConfig};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{truncate_ms, Lease, LeaseId, LeaseState, Password, Reason, Username};
use crate::limits::RateLimiter;
use crate::lock::{Lock, LockId, LockTarget, NewLock};
use crate::metrics::Metrics;
use crate::policy::any_matches;
use crate::revocation::UNREACHABLE_RETRY_CAP;
pub use crate::revocation::{BulkOutcome, Mode, Revoker};
use crate::static_roles::rotation::Force;
use crate::static_roles::{Rotator, Sealer, StaticCredential, StaticRoleConfig, StaticStatus};
use crate::steps;
use crate::store::{Claim, LeaseFilter, LeaseStore, DEFAULT_CLAIM};
use crate::watch::{LeaseEvent, Scope, WatchHub};

/// Longest role name a request may carry; config keys are shorter.
const MAX_ROLE_LEN: usize = 64;

/// A freshly issued credential. The only value that ever holds a leased
/// password, and only until the reply is sent.
pub struct IssuedLease {
    pub lease: Lease,
    pub password: Password,
    pub dsn: String,
    pub endpoint: Endpoint,
}

/// Which leases an admin revokes at once.
#[derive(Debug, Clone)]
pub enum Selector {
    Lease(LeaseId),
    Role(String),
    Database(String),
    /// Matched against the stored canonical text (`spiffe://…`, `dns:…`,
    /// `cn:…`); typed, so a bare name cannot get here and match nothing.
    Identity(Identity),
    /// Every live lease a listing filter selects (the console's "revoke
    /// all these"): its limit and offset are ignored.
    Matching(LeaseFilter),
    All,
}

pub struct Broker {
    config: ConfigHandle,
    /// The revocation engine, sharing this broker's store, databases,
    /// audit log and config.
    revoker: Arc<Revoker>,
    store: Arc<dyn LeaseStore>,
    backends: Backends,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    limiter: RateLimiter,
    /// Wakes the reaper when a lease may be due earlier than it planned.
    reaper_wake: Arc<Notify>,
    /// This process, for revocation claims in a shared store.
    owner: String,
    /// One per database: concurrent rotate-root calls otherwise interleave
    /// staging, `ALTER ROLE` and keeping, and the password file can end up
    /// holding a password the database no longer accepts. Per process
    /// only: replicas keep password files of their own (docs/HA.md).
    rotations: BTreeMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Lease events for `WatchLeases` streams.
    watch: Arc<WatchHub>,
    /// Static roles' rotations (`static_roles`), sharing store, databases,
    /// audit log and config.
    statics: Arc<Rotator>,
}

impl Broker {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn LeaseStore>,
        backends: Backends,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let owner = format!(
            "{}-{}-{}",
            hostname(),
            std::process::id(),
            rand::rng().random::<u32>()
        );
        let rotations = backends
            .keys()
            .map(|db| (db.clone(), Arc::new(tokio::sync::Mutex::new(()))))
            .collect();
        let config = ConfigHandle::new(config);
        let watch = Arc::new(WatchHub::new());
        let revoker = Arc::new(
            Revoker::new(
                config.clone(),
                store.clone(),
                backends.clone(),
                audit.clone(),
                metrics.clone(),
                owner.clone(),
            )
            .with_watch(watch.clone()),
        );
        let sealer = if config.get().static_roles.is_empty() {
            None
        } else {
            // Daemon::open has refused to start without a readable key;
            // here (tests, tools) a missing one fails static calls only.
            match Sealer::load(&config.get().sealing_key) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    tracing::error!(error = %e, "static roles disabled: no sealing key");
                    None
                }
            }
        };
        let statics = Arc::new(Rotator::new(
            config.clone(),
            store.clone(),
            backends.clone(),
            audit.clone(),
            metrics.clone(),
            sealer,
            owner.clone(),
        ));
        Broker {
            statics,
            config,
            revoker,
            store,
            rotations,
            backends,
            audit,
            metrics,
            limiter: RateLimiter::default(),
            reaper_wake: Arc::new(Notify::new()),
            owner,
            watch,
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    /// Swaps in a reloaded config (roles, policies, limits). Databases are
    /// not reconnected: their changes need a restart.
    pub fn replace_config(&self, config: Arc<Config>) {
        self.config.replace(config);
    }

    pub fn revoker(&self) -> &Revoker {
        &self.revoker
    }

    /// See [`Revoker::revoke_claimed`].
    pub async fn revoke_claimed(
        &self,
        leases: Vec<Lease>,
        actor: &str,
        reason: Reason,
        mode: Mode,
    ) -> BulkOutcome {
        self.revoker
            .revoke_claimed(leases, actor, reason, mode)
            .await
    }

    /// See [`Revoker::revoke_orphans`].
    pub async fn revoke_orphans(&self, database: &str, users: Vec<UserRef>) -> Result<()> {
        self.revoker.revoke_orphans(database, users).await
    }

    pub fn store(&self) -> &Arc<dyn LeaseStore> {
        &self.store
    }

    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    pub fn watch(&self) -> &Arc<WatchHub> {
        &self.watch
    }

    /// What a `WatchLeases` stream of `who` may see: its own leases, or for
    /// an admin whatever the selector names (an empty one: everything).
    pub fn watch_scope(&self, who: &Identity, requested: Scope, others: bool) -> Result<Scope> {
        if !others {
            return Ok(Scope {
                identity: Some(who.as_str().to_string()),
                ..requested
            });
        }
        self.require_admin(who, "watch")?;
        Ok(requested)
    }

    pub fn reaper_wake(&self) -> Arc<Notify> {
        self.reaper_wake.clone()
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn is_admin(&self, who: &Identity) -> bool {
        any_matches(&self.config().admins, who)
    }

    fn backend(&self, database: &str) -> Result<&Arc<dyn Backend>> {
        self.backends.get(database).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "database {database:?} is not configured on this broker"
            ))
        })
    }

    /// Writes the audit record; when that fails, the request fails too.
    fn audit_event(&self, event: Event) -> Result<()> {
        let started = std::time::Instant::now();
        let r = self.audit.append(event).inspect_err(|e| {
            tracing::error!(error = %e, "audit write failed");
        });
        steps::record("audit: append", started.elapsed());
        r
    }

    /// Audits a refused or failed request and hands the error back.
    fn audit_failure(&self, mut event: Event, err: Error) -> Error {
        event.outcome = Some(match err {
            Error::PermissionDenied(_)
            | Error::Unauthenticated(_)
            | Error::ResourceExhausted(_) => Outcome::Denied,
            _ => Outcome::Error,
        });
        event.detail = Some(err.to_string());
        if let Err(e) = self.audit.append_relaxed(event) {
            tracing::error!(error = %e, "audit write failed");
        }
        err
    }

    /// Refuses a request of `who` that a front end turned down itself
    /// (e.g. the console's missing CSRF token): counted and audited like
    /// the broker's own refusals.
    pub fn refuse(&self, who: &str, action: &'static str, err: Error) -> Error {
        tracing::info!(identity = %who, action, error = %err, "request refused");
        self.metrics.request_failed(action, &err);
        self.audit_failure(Event::new(who, action), err)
    }

    /// Audits a request refused because its certificate yields no identity
    /// (more than one SPIFFE ID, a malformed one…) and hands the error
    /// back. Like a refused TLS handshake, the record names the peer
    /// address: the only identity such a caller has.
    pub fn refuse_unauthenticated(
        &self,
        peer: Option<std::net::SocketAddr>,
        action: &'static str,
        err: Error,
    ) -> Error {
        let who = match peer {
            Some(p) => format!("unauthenticated:{}", p.ip()),
            None => "unauthenticated".to_string(),
        };
        tracing::info!(peer = %who, error = %err, "request refused: no usable identity");
        self.metrics.request_failed(action, &err);
        self.audit_failure(Event::new(who, action), err)
    }

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
        let started = Instant::now();
        let mut event = Event::new(who.as_str(), "issue");
        event.role = Some(truncate_text(role_name));
        let result = self
            .issue_inner(who, peer, role_name, ttl, &mut event)
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
        event: &mut Event,
    ) -> Result<IssuedLease> {
        let config = self.config();
        let role = lookup_role(&config, role_name)?;
        if !any_matches(&role.allowed, who) {
            return Err(Error::denied(format!(
                "identity may not lease role {role_name:?}"
            )));
        }
        check_network(role, peer)?;
        event.database = Some(role.database.clone());
        let ttl = effective_ttl(role, ttl)?;
        // Before anything is written: a locked-out caller costs one read.
        self.check_locks(who, &role.name, &role.database).await?;
        self.check_limits(who, role).await?;
        let backend = self.backend(&role.database)?.clone();

        let now = truncate_ms(Utc::now());
        let expires_at = now + ttl;
        let max_expires_at =
            now + chrono::Duration::from_std(role.max_ttl).map_err(Error::internal)?;
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
        };
        event.lease_id = Some(lease.id.to_string());
        event.username = Some(username.to_string());

        // Invariant 1: the intent is durable before the user exists. The
        // per-identity cap is checked by the store in the same step, so
        // parallel issues cannot overshoot it.
        let intent = self
            .store
            .insert_intent(&lease, role.max_leases_per_identity);
        if let Err(e) = steps::timed("store: write intent", intent).await {
            if matches!(e, Error::ResourceExhausted(_)) {
                // Refused: no such lease or user ever existed.
                event.lease_id = None;
                event.username = None;
            }
            return Err(e);
        }
        // The intent may now be due before the reaper's next planned wake.
        self.reaper_wake.notify_one();
        // Again, now that the intent is in the store: a lock written after
        // the first check lists its leases after writing itself, so either
        // its `--revoke` sees this intent or this check sees the lock.
        if let Err(e) = self.check_locks(who, &role.name, &role.database).await {
            self.drop_unused_intent(&lease).await;
            return Err(e);
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
        if let Err(e) = steps::timed("database: create user", backend.create_user(&new_user)).await
        {
            self.clean_up_failed_issue(lease.clone(), backend.clone());
            return Err(e);
        }
        if let Err(e) = steps::timed("store: activate", self.store.activate(&lease.id)).await {
            self.clean_up_failed_issue(lease.clone(), backend.clone());
            return Err(e);
        }
        let mut lease = lease;
        lease.state = LeaseState::Active;
        lease.due_at = expires_at;

        let mut ok = event.clone();
        ok.outcome = Some(Outcome::Ok);
        ok.detail = Some(format!("ttl={}s", ttl.num_seconds()));
        if let Err(e) = self.audit_event(ok) {
            // An unaudited credential must not be handed out.
            let _ = self.store.claim_one(&lease.id, &self.claim()).await;
            self.clean_up_failed_issue(lease, backend);
            return Err(e);
        }
        self.reaper_wake.notify_one();
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
        tokio::spawn(async move {
            match backend.revoke(&[revokee]).await {
                Ok(_) => {
                    if store
                        .mark_revoked(std::slice::from_ref(&lease.id), Utc::now())
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
                    let next = Utc::now()
                        + chrono::Duration::from_std(UNREACHABLE_RETRY_CAP).unwrap_or_default();
                    let _ = store
                        .record_failure(&lease.id, &e.to_string(), next, false)
                        .await;
                    tracing::warn!(lease_id = %lease.id, error = %e, "cleanup after failed issue deferred to the reaper")
                }
            }
        });
    }

    /// Refuses a lease that an active lock matches. Read from the store on
    /// every call, so a lock written by any replica applies at once.
    async fn check_locks(&self, identity: &Identity, role: &str, database: &str) -> Result<()> {
        let locks = steps::timed("store: read locks", self.store.active_locks()).await?;
        match crate::lock::first_match(&locks, identity, role, database) {
            Some(lock) => Err(lock.refusal()),
            None => Ok(()),
        }
    }

    /// An intent refused before its user was created: nothing exists in the
    /// database, so the row leaves the live set directly. When another task
    /// holds it (a lock's `--revoke` found it), that task finishes it.
    async fn drop_unused_intent(&self, lease: &Lease) {
        match self.store.claim_one(&lease.id, &self.claim()).await {
            Ok(Some(_)) => {
                if let Err(e) = self
                    .store
                    .mark_revoked_claimed(std::slice::from_ref(&lease.id), &self.owner, Utc::now())
                    .await
                {
                    // The reaper resolves it after the intent grace.
                    tracing::warn!(lease_id = %lease.id, error = %e, "cannot retire a refused intent");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(lease_id = %lease.id, error = %e, "cannot retire a refused intent")
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

    /// Loads a lease the caller may act on: its own, or any for an admin.
    async fn owned_lease(&self, who: &Identity, id: &LeaseId) -> Result<Lease> {
        let lease = steps::timed("store: read lease", self.store.get(id))
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
            Err(e) => {
                self.metrics.request_failed("renew", &e);
                Err(self.audit_failure(event, e))
            }
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
        let now = Utc::now();
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
        if !any_matches(
            &role.allowed,
            &Identity::from_trusted(lease.identity.clone()),
        ) {
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
        let ttl = effective_ttl(role, ttl)?;
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

    /// Revokes one lease at its holder's request.
    pub async fn revoke(&self, who: &Identity, id: &LeaseId) -> Result<Lease> {
        let mut event = Event::new(who.as_str(), "revoke");
        event.lease_id = Some(id.to_string());
        let lease = match self.owned_lease(who, id).await {
            Ok(l) => l,
            Err(e) => {
                self.metrics.request_failed("revoke", &e);
                return Err(self.audit_failure(event, e));
            }
        };
        if lease.state == LeaseState::Revoked {
            event.role = Some(lease.role.clone());
            event.outcome = Some(Outcome::Ok);
            event.detail = Some("already revoked".into());
            self.audit_event(event)?;
            return Ok(lease);
        }
        let claim = self.claim();
        let Some(claimed) = steps::timed("store: claim", self.store.claim_one(id, &claim)).await?
        else {
            return Err(self.audit_failure(
                event,
                Error::Unavailable(format!(
                    "lease {id} is being revoked right now; look it up again shortly"
                )),
            ));
        };
        let mut lease = claimed.clone();
        if let Err(err) = self.revoker.revoke_requested(claimed, who.as_str()).await {
            return Err(Error::Unavailable(format!(
                "revocation of lease {id} failed and will be retried: {err}"
            )));
        }
        // As marked; reading it back would cost a store round trip.
        lease.state = LeaseState::Revoked;
        lease.revoked_at = Some(Utc::now());
        Ok(lease)
    }

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
                        self.revoke_claimed(vec![l], who.as_str(), Reason::Admin, mode)
                            .await
                    }
                    None => BulkOutcome {
                        revoked: vec![],
                        failed: vec![(
                            id.clone(),
                            "being revoked by another task right now".into(),
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
    async fn revoke_listed(
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
                    "being revoked by another task right now".into(),
                )),
            }
        }
        for chunk in claimed.chunks(batch) {
            let out = self
                .revoke_claimed(chunk.to_vec(), who.as_str(), reason, mode)
                .await;
            total.revoked.extend(out.revoked);
            total.failed.extend(out.failed);
        }
        Ok(total)
    }

    /// Locks `target` out: from now on issue and renew refuse whatever it
    /// matches, on every replica. With `revoke`, every live lease it
    /// matches is then revoked in the same call, sessions included — after
    /// the lock is stored, so nothing issued meanwhile escapes (see the
    /// second check in `issue_inner`).
    pub async fn admin_lock(
        &self,
        who: &Identity,
        target: LockTarget,
        duration: Option<Duration>,
        reason: String,
        revoke: bool,
    ) -> Result<(Lock, Option<BulkOutcome>)> {
        self.require_admin(who, "lock")?;
        let mut event = Event::new(who.as_str(), "lock");
        event.detail = Some(truncate_text(&format!("{target}")));
        let checked = self.check_lock_request(&target, duration, &reason);
        if let Err(e) = checked {
            self.metrics.request_failed("lock", &e);
            return Err(self.audit_failure(event, e));
        }
        let new = NewLock {
            id: LockId::generate(),
            target,
            reason,
            created_by: who.as_str().to_string(),
            duration,
        };
        let lock = match self.store.insert_lock(&new).await {
            Ok(l) => l,
            Err(e) => {
                self.metrics.request_failed("lock", &e);
                return Err(self.audit_failure(event, e));
            }
        };
        event.outcome = Some(Outcome::Ok);
        event.detail = Some(lock_detail(&lock, revoke));
        self.audit_event(event)?;
        tracing::warn!(lock_id = %lock.id, target = %lock.target, reason = %lock.reason, "lock set");
        if !revoke {
            // Watchers learn at once that their leases can no longer be
            // renewed; the credentials stay valid until they expire.
            match self.leases_matching_lock(&lock).await {
                Ok(leases) => {
                    for l in &leases {
                        self.watch.publish(LeaseEvent::locked(l, &lock));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot tell watchers about the lock"),
            }
            return Ok((lock, None));
        }
        let out = self.revoke_locked(who, &lock).await?;
        Ok((lock, Some(out)))
    }

    fn check_lock_request(
        &self,
        target: &LockTarget,
        duration: Option<Duration>,
        reason: &str,
    ) -> Result<()> {
        crate::lock::check_reason(reason)?;
        if let Some(d) = duration {
            if d < Duration::from_secs(1) || d > crate::lock::MAX_LOCK_DURATION {
                return Err(Error::invalid(
                    "lock duration must be between 1 second and 366 days",
                ));
            }
        }
        // A typo must not look like a lock that holds.
        let config = self.config();
        match target {
            LockTarget::Role(r) if config.role(r).is_none() => {
                Err(Error::NotFound(format!("no role {r:?} is configured")))
            }
            LockTarget::Database(d) if !config.databases.contains_key(d) => {
                Err(Error::NotFound(format!("no database {d:?} is configured")))
            }
            _ => Ok(()),
        }
    }

    /// Every live lease `lock` matches. An identity pattern is matched
    /// against the identities holding live leases, then each is listed on
    /// its own: memory follows the number of callers, not of leases.
    async fn leases_matching_lock(&self, lock: &Lock) -> Result<Vec<Lease>> {
        let filters: Vec<LeaseFilter> = match &lock.target {
            LockTarget::Role(r) => vec![LeaseFilter {
                role: Some(r.clone()),
                ..Default::default()
            }],
            LockTarget::Database(d) => vec![LeaseFilter {
                database: Some(d.clone()),
                ..Default::default()
            }],
            LockTarget::Identity(p) => self
                .store
                .live_identities()
                .await?
                .into_iter()
                .filter(|i| p.matches(&Identity::from_trusted(i.clone())))
                .map(|i| LeaseFilter {
                    identity: Some(i),
                    ..Default::default()
                })
                .collect(),
        };
        let mut out = Vec::new();
        for f in &filters {
            out.extend(self.store.list(f).await?);
        }
        Ok(out)
    }

    /// Tells watchers of every lease `lock` matches, and with `revoke` ends
    /// those leases through the revocation engine (Reason::Locked).
    async fn revoke_locked(&self, who: &Identity, lock: &Lock) -> Result<BulkOutcome> {
        let leases = self.leases_matching_lock(lock).await?;
        self.revoke_listed(who, leases, Reason::Locked, Mode::UntilDropped)
            .await
    }

    /// Lifts a lock (expired or not). Audited.
    pub async fn admin_unlock(&self, who: &Identity, id: &LockId) -> Result<Lock> {
        self.require_admin(who, "unlock")?;
        let mut event = Event::new(who.as_str(), "unlock");
        event.detail = Some(id.to_string());
        let result = match self.store.delete_lock(id).await {
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err(Error::NotFound(format!("no lock {id}"))),
            Err(e) => Err(e),
        };
        match result {
            Ok(lock) => {
                event.outcome = Some(Outcome::Ok);
                event.detail = Some(lock_detail(&lock, false));
                self.audit_event(event)?;
                tracing::warn!(lock_id = %lock.id, target = %lock.target, "lock lifted");
                Ok(lock)
            }
            Err(e) => {
                self.metrics.request_failed("unlock", &e);
                Err(self.audit_failure(event, e))
            }
        }
    }

    /// The locks in force.
    pub async fn admin_locks(&self, who: &Identity) -> Result<Vec<Lock>> {
        self.require_admin(who, "list_locks")?;
        self.store.active_locks().await
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
            Err(e) => {
                self.metrics.request_failed("rotate_root", &e);
                Err(self.audit_failure(event, e))
            }
        }
    }

    /// Refuses an admin call from outside `admin_networks` (audited with
    /// the address). The gRPC layer calls it before any Admin method, and
    /// for a watch of other identities' leases.
    pub fn check_admin_network(
        &self,
        who: &Identity,
        peer: Option<IpAddr>,
        action: &'static str,
    ) -> Result<()> {
        let config = self.config();
        if crate::policy::network_allowed(&config.admin_networks, peer) {
            return Ok(());
        }
        let err = Error::denied(match peer {
            Some(p) => format!("admin calls from {p} are outside admin_networks"),
            None => "admin calls need a known caller address (admin_networks)".into(),
        });
        self.metrics.request_failed(action, &err);
        Err(self.audit_failure(Event::new(who.as_str(), action), err))
    }

    /// Refuses (and audits) `who` unless it is an admin.
    pub fn require_admin(&self, who: &Identity, action: &'static str) -> Result<()> {
        if self.is_admin(who) {
            return Ok(());
        }
        let err = Error::denied("identity is not an admin");
        self.metrics.request_failed(action, &err);
        Err(self.audit_failure(Event::new(who.as_str(), action), err))
    }

    /// The static roles' rotator (its loop runs in the daemon).
    pub fn static_rotator(&self) -> &Arc<Rotator> {
        &self.statics
    }

    /// The current credential of static role `name`, for a caller its
    /// `allowed` patterns match (else `PermissionDenied`). Audited either way.
    pub async fn static_credential(&self, who: &Identity, name: &str) -> Result<StaticCredential> {
        let mut event = Event::new(who.as_str(), "static_read");
        event.role = Some(truncate_text(name));
        let result = async {
            let config = self.config();
            let role = lookup_static(&config, name)?;
            event.database = Some(role.database.clone());
            if !any_matches(&role.allowed, who) {
                return Err(Error::denied(format!(
                    "identity may not read static role {name:?}"
                )));
            }
            let backend = self.backend(&role.database)?.clone();
            let st = self.statics.readable(role).await?;
            let (cur, password) = self.statics.unseal_current(&st)?;
            event.username = Some(cur.user.clone());
            let dsn = backend.dsn(&Username::from_store(cur.user.clone()), Some(&password));
            Ok(StaticCredential {
                static_role: role.name.clone(),
                database: role.database.clone(),
                kind: backend.kind(),
                username: cur.user,
                password,
                dsn,
                endpoint: backend.endpoint().clone(),
                generation: st.generation,
                rotated_at: cur.rotated_at,
                next_rotation_at: st.next_rotation_at.unwrap_or(cur.valid_until),
                valid_until: cur.valid_until,
            })
        }
        .await;
        match result {
            Ok(c) => {
                let mut ok = event;
                ok.outcome = Some(Outcome::Ok);
                ok.detail = Some(format!("generation={}", c.generation));
                // An unaudited credential must not be handed out.
                self.audit_event(ok)?;
                Ok(c)
            }
            Err(e) => {
                self.metrics.request_failed("static_read", &e);
                Err(self.audit_failure(event, e))
            }
        }
    }

    /// Every configured static role with its state, for an admin.
    pub async fn admin_static_roles(&self, who: &Identity) -> Result<Vec<StaticStatus>> {
        self.require_admin(who, "static_roles")?;
        let config = self.config();
        let states = self.store.static_list().await?;
        Ok(config
            .static_roles
            .values()
            .map(|r| {
                let st = states.iter().find(|s| s.role == r.name);
                StaticStatus {
                    name: r.name.clone(),
                    database: r.database.clone(),
                    users: r.users.clone(),
                    current_user: st.and_then(|s| s.current.as_ref().map(|c| c.user.clone())),
                    generation: st.map(|s| s.generation).unwrap_or(0),
                    rotated_at: st.and_then(|s| s.current.as_ref().map(|c| c.rotated_at)),
                    next_rotation_at: st.and_then(|s| s.next_rotation_at),
                    valid_until: st.and_then(|s| s.current.as_ref().map(|c| c.valid_until)),
                    previous_user: st.and_then(|s| s.previous.as_ref().map(|p| p.user.clone())),
                    previous_retire_at: st.and_then(|s| s.previous.as_ref().map(|p| p.retire_at)),
                    pending: st.is_some_and(|s| s.pending.is_some()),
                    last_error: st.and_then(|s| s.last_error.clone()),
                }
            })
            .collect())
    }

    /// Rotates static role `name` now (admin). The previous user keeps its
    /// overlap unless it is the one being rotated onto.
    pub async fn rotate_static(&self, who: &Identity, name: &str) -> Result<StaticStatus> {
        self.force_static(who, name, Force::Rotate, "static_rotate")
            .await
    }

    /// Incident: both users' passwords replaced and their sessions ended;
    /// whoever reads next gets a new credential (admin).
    pub async fn revoke_static(&self, who: &Identity, name: &str) -> Result<StaticStatus> {
        self.force_static(who, name, Force::Revoke, "static_revoke")
            .await
    }

    async fn force_static(
        &self,
        who: &Identity,
        name: &str,
        force: Force,
        action: &'static str,
    ) -> Result<StaticStatus> {
        self.require_admin(who, action)?;
        let config = self.config();
        let role = match lookup_static(&config, name) {
            Ok(r) => r.clone(),
            Err(e) => {
                let mut ev = Event::new(who.as_str(), action);
                ev.role = Some(truncate_text(name));
                return Err(self.audit_failure(ev, e));
            }
        };
        let statics = self.statics.clone();
        let actor = who.as_str().to_string();
        // Its own task: a caller that hangs up must not cut a rotation off
        // between the database's change and the commit (the intent would
        // be finished later, but the admin deserves a clear answer).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (statics, role2, actor2) = (statics.clone(), role.clone(), actor.clone());
            let out = tokio::spawn(async move { statics.step(&role2, force, &actor2).await })
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("static rotation task: {e}"))))?;
            if out.is_some() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let mut ev = Event::new(who.as_str(), action);
                ev.role = Some(role.name.clone());
                return Err(self.audit_failure(
                    ev,
                    Error::Unavailable(
                        "another replica is rotating this static role; try again".into(),
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.statics.wake();
        self.admin_static_roles(who)
            .await?
            .into_iter()
            .find(|s| s.name == role.name)
            .ok_or_else(|| Error::internal("static role vanished"))
    }

    pub fn claim(&self) -> Claim {
        Claim {
            owner: self.owner.clone(),
            until: Utc::now()
                + chrono::Duration::from_std(self.config().store.claim_timeout).unwrap_or_else(
                    |_| chrono::Duration::from_std(DEFAULT_CLAIM).unwrap_or_default(),
                ),
        }
    }
}

fn lookup_role<'c>(config: &'c Config, name: &str) -> Result<&'c RoleConfig> {
    if name.is_empty() {
        return Err(Error::invalid("role is required"));
    }
    if name.len() > MAX_ROLE_LEN {
        return Err(Error::invalid(format!(
            "role name longer than {MAX_ROLE_LEN} bytes"
        )));
    }
    config
        .role(name)
        .ok_or_else(|| Error::NotFound(format!("no role {name:?} is configured")))
}

fn lookup_static<'c>(config: &'c Config, name: &str) -> Result<&'c StaticRoleConfig> {
    if name.is_empty() {
        return Err(Error::invalid("static_role is required"));
    }
    if name.len() > MAX_ROLE_LEN {
        return Err(Error::invalid(format!(
            "static role name longer than {MAX_ROLE_LEN} bytes"
        )));
    }
    config
        .static_roles
        .get(name)
        .ok_or_else(|| Error::NotFound(format!("no static role {name:?} is configured")))
}

/// `host = "caller"` on a MySQL role: the account is `'user'@'<caller's
/// address>'`, so the credential logs in only from the machine that
/// leased it (as the database sees it: through NAT or a proxy, that is
/// the last hop's address).
pub const CALLER_HOST: &str = "caller";

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
fn check_network(role: &RoleConfig, peer: Option<IpAddr>) -> Result<()> {
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

fn effective_ttl(role: &RoleConfig, ttl: Option<Duration>) -> Result<chrono::Duration> {
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

/// A lock in an audit record: id, target, expiry and reason.
fn lock_detail(lock: &Lock, revoke: bool) -> String {
    format!(
        "{} {} until {}{}: {}",
        lock.id,
        lock.target,
        lock.expires_at
            .map(|e| e.to_rfc3339())
            .unwrap_or_else(|| "unlocked".into()),
        if revoke { ", revoking its leases" } else { "" },
        lock.reason
    )
}

/// Caps caller-supplied text before it goes into an audit record.
fn truncate_text(s: &str) -> String {
    let mut out: String = s
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_ROLE_LEN)
        .collect();
    if s.chars().count() > MAX_ROLE_LEN {
        out.push('…');
    }
    out
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "broker".into())
}

#[cfg(test)]
mod lock_tests {
    use super::*;
    use crate::policy::IdentityPattern;
    use crate::store::LeaseFilter;
    use crate::testkit::{admin, app, role, Kit, APP};
    use std::path::Path;

    const OTHER: &str = "spiffe://credbroker.dev/ns/demo/other";

    fn kit() -> Kit {
        let two = role("ro", "main").replace(
            &format!("allowed = [\"{APP}\"]"),
            &format!("allowed = [\"{APP}\", \"{OTHER}\"]"),
        ) + &role("ro2", "second");
        Kit::new("", &two)
    }

    fn pattern(p: &str) -> LockTarget {
        LockTarget::Identity(IdentityPattern::new(p).unwrap())
    }

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

    #[tokio::test]
    async fn an_identity_lock_refuses_issue_and_renew_with_its_reason_until_unlocked() {
        let kit = kit();
        let other = Identity::from_trusted(OTHER);
        let held = kit.broker.issue(&app(), "ro", None).await.unwrap();
        let (lock, revoked) = kit
            .broker
            .admin_lock(
                &admin(),
                pattern("spiffe://credbroker.dev/ns/demo/app"),
                None,
                "INC-7 leaked cert".into(),
                false,
            )
            .await
            .unwrap();
        assert!(revoked.is_none());
        let refused = kit.broker.issue(&app(), "ro", None).await.err().unwrap();
        assert!(matches!(refused, Error::PermissionDenied(_)), "{refused}");
        let text = refused.to_string();
        assert!(
            text.contains("INC-7 leaked cert") && text.contains(lock.id.as_str()),
            "{text}"
        );
        let renew = kit.broker.renew(&app(), &held.lease.id, None).await;
        assert!(
            matches!(renew, Err(Error::PermissionDenied(_))),
            "{renew:?}"
        );
        // Without --revoke the held credential keeps working until expiry.
        assert!(kit.server.user(held.lease.username.as_str()).is_some());
        kit.broker.issue(&other, "ro", None).await.unwrap();

        let denied: Vec<_> = kit
            .audit()
            .into_iter()
            .filter(|r| r.outcome == crate::audit::Outcome::Denied && r.identity == APP)
            .map(|r| (r.action, r.detail.unwrap_or_default()))
            .collect();
        assert_eq!(denied.len(), 2, "{denied:?}");
        assert!(
            denied.iter().all(|(_, d)| d.contains("INC-7")),
            "{denied:?}"
        );
        assert_eq!(
            kit.broker.admin_locks(&admin()).await.unwrap().len(),
            1,
            "listed"
        );

        kit.broker.admin_unlock(&admin(), &lock.id).await.unwrap();
        kit.broker.issue(&app(), "ro", None).await.unwrap();
        kit.broker
            .renew(&app(), &held.lease.id, None)
            .await
            .unwrap();
        let again = kit.broker.admin_unlock(&admin(), &lock.id).await;
        assert!(matches!(again, Err(Error::NotFound(_))), "{again:?}");
        let actions: Vec<String> = kit.audit().into_iter().map(|r| r.action).collect();
        assert!(actions.contains(&"lock".to_string()) && actions.contains(&"unlock".to_string()));
    }

    #[tokio::test]
    async fn lock_with_revoke_ends_every_matching_lease_through_the_engine() {
        let kit = kit();
        let other = Identity::from_trusted(OTHER);
        let mine = [
            kit.broker.issue(&app(), "ro", None).await.unwrap(),
            kit.broker.issue(&app(), "ro2", None).await.unwrap(),
        ];
        let theirs = kit.broker.issue(&other, "ro", None).await.unwrap();
        let (_, out) = kit
            .broker
            .admin_lock(
                &admin(),
                pattern("spiffe://credbroker.dev/ns/demo/a*"),
                Some(Duration::from_secs(60)),
                "leak".into(),
                true,
            )
            .await
            .unwrap();
        let out = out.unwrap();
        assert_eq!(out.revoked.len(), 2, "{out:?}");
        for l in &mine {
            assert!(kit.server.user(l.lease.username.as_str()).is_none());
            let s = kit.store.get(&l.lease.id).await.unwrap().unwrap();
            assert_eq!(s.state, LeaseState::Revoked);
        }
        assert!(kit.server.user(theirs.lease.username.as_str()).is_some());
        let revoked_records = kit
            .audit()
            .into_iter()
            .filter(|r| r.action == "lock_revoke" && r.outcome == crate::audit::Outcome::Ok)
            .count();
        assert_eq!(revoked_records, 2);
    }

    #[tokio::test]
    async fn role_and_database_locks_refuse_only_what_they_name() {
        let kit = kit();
        let (by_role, _) = kit
            .broker
            .admin_lock(
                &admin(),
                LockTarget::Role("ro".into()),
                None,
                String::new(),
                false,
            )
            .await
            .unwrap();
        assert!(kit.broker.issue(&app(), "ro", None).await.is_err());
        kit.broker.issue(&app(), "ro2", None).await.unwrap();
        kit.broker
            .admin_unlock(&admin(), &by_role.id)
            .await
            .unwrap();
        kit.broker
            .admin_lock(
                &admin(),
                LockTarget::Database("second".into()),
                None,
                "maintenance".into(),
                false,
            )
            .await
            .unwrap();
        kit.broker.issue(&app(), "ro", None).await.unwrap();
        let e = kit.broker.issue(&app(), "ro2", None).await.err().unwrap();
        assert!(e.to_string().contains("maintenance"), "{e}");

        for bad in [
            LockTarget::Role("nope".into()),
            LockTarget::Database("nope".into()),
        ] {
            let e = kit
                .broker
                .admin_lock(&admin(), bad, None, String::new(), false)
                .await
                .err()
                .unwrap();
            assert!(matches!(e, Error::NotFound(_)), "{e}");
        }
        let e = kit
            .broker
            .admin_lock(
                &app(),
                LockTarget::Role("ro".into()),
                None,
                String::new(),
                true,
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
        let e = kit
            .broker
            .admin_lock(
                &admin(),
                LockTarget::Role("ro".into()),
                None,
                "a\nb".into(),
                false,
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
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

    #[tokio::test]
    async fn a_lock_runs_out_on_its_own() {
        let kit = kit();
        kit.broker
            .admin_lock(
                &admin(),
                LockTarget::Role("ro".into()),
                Some(Duration::from_secs(1)),
                String::new(),
                false,
            )
            .await
            .unwrap();
        assert!(kit.broker.issue(&app(), "ro", None).await.is_err());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        kit.broker.issue(&app(), "ro", None).await.unwrap();
        assert!(kit.broker.admin_locks(&admin()).await.unwrap().is_empty());
    }
}
