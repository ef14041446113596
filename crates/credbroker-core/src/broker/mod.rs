//! The lease path: issue, renew, revoke, look up, the admin calls — and
//! the revocation routine the reaper shares. No gRPC types here; the server
//! module turns requests into these calls and `Error`s into statuses.
//!
//! One `Broker`; its calls live in `impl Broker` blocks by who makes them,
//! so a change to one path is read in one file: `issue` (a new lease, and
//! the network and TTL checks renew shares), `holder` (a holder's calls on
//! its lease), `admin`, `locks`, `static_roles` and `tokens` (the Vault
//! API's). What they all use
//! (audit, the backend of a database, claims) stays here.

mod admin;
mod grants;
mod holder;
mod issue;
mod locks;
mod static_roles;
mod tokens;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::Notify;

use crate::audit::{AuditLog, Event, Outcome};
use crate::backend::{Backend, Backends, Endpoint};
use crate::clock::Clock;
use crate::config::{Config, ConfigHandle};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{Lease, LeaseId, Password};
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use crate::policy::any_matches;
pub use crate::revocation::{BulkOutcome, Mode, Parts, Revoker};
use crate::static_roles::{Rotator, Sealer};
use crate::store::{Claim, LeaseFilter, Store, DEFAULT_CLAIM};
use crate::token_cache::TokenCache;
use crate::watch::{Scope, WatchHub};

pub(crate) use admin::check_admin_network;
pub use issue::CALLER_HOST;
pub(crate) use issue::{check_network, lookup_role, not_allowed};
pub(crate) use static_roles::lookup_static;
pub use tokens::Tokens;

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
    store: Arc<dyn Store>,
    backends: Backends,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    limiter: RateLimiter,
    /// Wakes the reaper when a lease may be due earlier than it planned.
    reaper_wake: Arc<ReaperWake>,
    /// This process, for revocation claims in a shared store.
    owner: String,
    /// One per database: concurrent rotate-root calls otherwise interleave
    /// staging, `ALTER ROLE` and keeping, and the password file can end up
    /// holding a password the database no longer accepts. Per process
    /// only: replicas keep password files of their own (docs/HA.md).
    rotations: BTreeMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Lease events for `WatchLeases` streams.
    watch: Arc<WatchHub>,
    /// The Vault API's verified tokens (`token_cache.rs`): read through
    /// and forgotten by `tokens.rs` and `locks.rs`, and by the relay.
    token_cache: Arc<TokenCache>,
    /// Static roles' rotations (`static_roles`), sharing store, databases,
    /// audit log and config.
    statics: Arc<Rotator>,
    /// Lease times and claims; the revocation engine and the reaper read
    /// it too. `Clock::System` but in the fast tier.
    clock: Clock,
}

impl Broker {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        backends: Backends,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::with_clock(config, store, backends, audit, metrics, Clock::System)
    }

    /// `new` on `clock` (the fast tier's paused tokio time).
    pub fn with_clock(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        backends: Backends,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        clock: Clock,
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
        metrics.count_audit_failures(audit.write_failures());
        let config = ConfigHandle::new(config);
        let watch = Arc::new(WatchHub::new());
        let parts = Parts {
            config: config.clone(),
            store: store.clone(),
            backends: backends.clone(),
            audit: audit.clone(),
            metrics: metrics.clone(),
            owner: owner.clone(),
        };
        let revoker = Arc::new(
            Revoker::new(parts.clone())
                .with_watch(watch.clone())
                .with_clock(clock),
        );
        let sealer = if config.get().static_roles.is_empty() {
            None
        } else {
            // Daemon::open has refused to start without a readable key;
            // here (tests, tools) a missing one fails static calls only.
            match Sealer::load(&config.get().sealing_key) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    tracing::error!(error = %crate::error::chain(&e), "static roles disabled: no sealing key");
                    None
                }
            }
        };
        let statics = Arc::new(Rotator::new(parts, sealer));
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
            reaper_wake: Arc::default(),
            owner,
            watch,
            token_cache: Arc::new(TokenCache::default()),
            clock,
        }
    }

    pub fn clock(&self) -> Clock {
        self.clock
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

    pub fn store(&self) -> &Arc<dyn Store> {
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

    /// The Vault API's verified-token cache, for the relay to feed.
    pub fn token_cache(&self) -> &Arc<TokenCache> {
        &self.token_cache
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

    pub fn reaper_wake(&self) -> Arc<ReaperWake> {
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
        let _step = crate::steps::span("audit: append").entered();
        self.audit.append(event).inspect_err(|e| {
            tracing::error!(error = %crate::error::chain(e), "audit write failed");
        })
    }

    /// Audits a refused or failed request and hands the error back.
    /// A request that failed: counted under `action` and audited
    /// ([`Self::audit_failure`]); the error to return.
    fn refused(&self, action: &str, event: Event, err: Error) -> Error {
        self.metrics.request_failed(action, &err);
        self.audit_failure(event, err)
    }

    fn audit_failure(&self, mut event: Event, err: Error) -> Error {
        event.outcome = Some(match err {
            Error::PermissionDenied(_)
            | Error::Unauthenticated(_)
            | Error::ResourceExhausted(_) => Outcome::Denied,
            _ => Outcome::Error,
        });
        event.detail = Some(err.to_string());
        if let Err(e) = self.audit.append_relaxed(event) {
            tracing::error!(error = %crate::error::chain(&e), "audit write failed");
        }
        err
    }

    /// Refuses a request of `who` that a front end turned down itself
    /// (e.g. the console's missing CSRF token): counted and audited like
    /// the broker's own refusals.
    pub fn refuse(&self, who: &str, action: &'static str, err: Error) -> Error {
        tracing::info!(identity = %who, action, error = %crate::error::chain(&err), "request refused");
        self.metrics.request_failed(action, &err);
        self.audit_failure(Event::new(who, action), err)
    }

    /// Refuses a request the gate turned down: counted, and audited as
    /// `event` (which names what the request was about) with the error.
    pub fn refuse_event(&self, event: Event, err: Error) -> Error {
        tracing::info!(identity = %event.identity, action = event.action, error = %crate::error::chain(&err), "request refused");
        self.metrics.request_failed(event.action, &err);
        self.audit_failure(event, err)
    }

    /// Audits a request refused because its certificate yields no identity
    /// (more than one SPIFFE ID, a malformed one…) and hands the error
    /// back. Like a refused TLS handshake, the record names the peer
    /// address: the only identity such a caller has.
    pub fn refuse_unauthenticated(
        &self,
        peer: Option<std::net::IpAddr>,
        action: &'static str,
        err: Error,
    ) -> Error {
        let who = match peer {
            Some(ip) => format!("unauthenticated:{ip}"),
            None => "unauthenticated".to_string(),
        };
        tracing::info!(peer = %who, error = %crate::error::chain(&err), "request refused: no usable identity");
        self.metrics.request_failed(action, &err);
        self.audit_failure(Event::new(who, action), err)
    }

    pub fn claim(&self) -> Claim {
        Claim {
            owner: self.owner.clone(),
            until: self.clock.now()
                + chrono::Duration::from_std(self.config().store.claim_timeout).unwrap_or_else(
                    |_| chrono::Duration::from_std(DEFAULT_CLAIM).unwrap_or_default(),
                ),
        }
    }
}

/// A role name a caller sent, before it is looked up: there (else
/// "`field` is required") and no longer than [`MAX_ROLE_LEN`]; `kind`
/// says which name (`role`, `static role`).
fn check_role_name(name: &str, field: &str, kind: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!("{field} is required")));
    }
    if name.len() > MAX_ROLE_LEN {
        return Err(Error::invalid(format!(
            "{kind} name longer than {MAX_ROLE_LEN} bytes"
        )));
    }
    Ok(())
}

/// Caps caller-supplied text before it goes into an audit record.
pub(crate) fn truncate_text(s: &str) -> String {
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

/// The reaper's alarm clock. The reaper says when it plans to wake
/// (`sleeping_until`, after each pass) and that it is looking (`awake`,
/// before each pass); a lease that falls due (`due`) wakes it only when
/// that is before the planned time. Before, every issue woke it twice,
/// and each wake was a pass — a store write and a read on the store's one
/// thread, queued beside the lease's own writes — for leases due an hour
/// later. Never late: a row written after a pass read the store is
/// checked against that pass's plan or against `awake`, which wakes.
pub struct ReaperWake {
    notify: Notify,
    /// Milliseconds (the broker's clock) the reaper sleeps until at the
    /// latest; `i64::MAX` while it is awake or has planned nothing.
    planned_ms: std::sync::atomic::AtomicI64,
}

impl Default for ReaperWake {
    fn default() -> Self {
        ReaperWake {
            notify: Notify::new(),
            planned_ms: std::sync::atomic::AtomicI64::new(i64::MAX),
        }
    }
}

impl ReaperWake {
    /// A pass starts: every lease that falls due from now on wakes it
    /// again, since the pass may have read the store before its row.
    pub fn awake(&self) {
        self.planned_ms
            .store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
    }

    /// The pass is over; the reaper wakes at `at` at the latest.
    pub fn sleeping_until(&self, at: DateTime<Utc>) {
        self.planned_ms
            .store(at.timestamp_millis(), std::sync::atomic::Ordering::SeqCst);
    }

    /// A lease (already in the store) falls due at `at`.
    pub fn due(&self, at: DateTime<Utc>) {
        if at.timestamp_millis() < self.planned_ms.load(std::sync::atomic::Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }

    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod reaper_wake_tests {
    use futures::FutureExt;

    use super::ReaperWake;

    fn woken(w: &ReaperWake) -> bool {
        w.notified().now_or_never().is_some()
    }

    /// A lease due after the planned wake leaves the reaper asleep; one due
    /// before it, or any while a pass runs, wakes it.
    #[test]
    fn wakes_the_reaper_only_for_what_falls_due_before_its_plan() {
        let w = ReaperWake::default();
        let now = chrono::Utc::now();
        let s = chrono::Duration::seconds;
        // Nothing planned yet (or a pass under way): every lease wakes it.
        w.due(now + s(3600));
        assert!(woken(&w));
        w.sleeping_until(now + s(30));
        w.due(now + s(3600));
        w.due(now + s(60));
        assert!(!woken(&w), "a lease due after the planned wake woke it");
        w.due(now + s(2));
        assert!(
            woken(&w),
            "a lease due before the planned wake did not wake it"
        );
        w.awake();
        w.due(now + s(3600));
        assert!(woken(&w), "a lease written during a pass did not wake it");
    }
}
