//! The revocation engine: the one routine that ends leases, whoever asks —
//! the reaper (expiry, abandoned intents), a holder's revoke, an admin's
//! bulk revoke, and the orphan sweep.
//!
//! Its rules, which the tests hold it to:
//! - per database, one batch where possible; when a batch fails for a
//!   reason other than the database being away, one by one, so one bad
//!   lease cannot hold back the others;
//! - a lease leaves the live set only after its drop succeeded (invariant
//!   2), or, when forced, after the database confirmed the account can no
//!   longer log in and has no session left;
//! - what a leased user owns goes to its role's `owner` (or the admin
//!   account), never dropped with it (invariant 7); the audit record says
//!   how many objects and to whom;
//! - failures are recorded with attempts, error and next retry; after
//!   `failing_after_attempts` the lease shows as `failing`.

pub mod drain;

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;

use std::sync::Arc;

use crate::audit::{AuditLog, Event, Outcome};
use crate::backend::{Backend, Backends, Reassigned, Revokee, UserRef};
use crate::clock::Clock;
use crate::config::{Config, ConfigHandle};
use crate::error::{Error, Result};
use crate::lease::{Lease, LeaseId, Reason};
use crate::metrics::Metrics;
use crate::steps;
use crate::store::{FailureRecord, Store};

/// Identity recorded in the audit log for the reaper's own actions.
pub const REAPER_IDENTITY: &str = "credbroker:reaper";

/// The outcome of a (bulk) revocation. A failure is the typed error, so
/// each door shows its caller text (`Error::for_caller`), not its detail.
#[derive(Debug, Default)]
pub struct BulkOutcome {
    pub revoked: Vec<LeaseId>,
    pub failed: Vec<(LeaseId, Error)>,
}

/// Whether a failed drop may still end the lease's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Retry until the drop succeeds (the normal case).
    UntilDropped,
    /// An admin's `--force`: when the drop keeps failing, forget the lease
    /// once the database confirms the account is disabled (login refused,
    /// sessions ended) — never an account that might still work.
    Forced,
}

/// Longest wait between attempts on a database that is unreachable.
pub(crate) const UNREACHABLE_RETRY_CAP: Duration = Duration::from_secs(2);

/// Our claim ran out mid-revocation and another broker replica took the
/// lease over: it records and audits the revocation, not us.
const CLAIM_LOST: &str =
    "claim taken over by another broker replica, which completes the revocation";

fn claim_lost() -> Error {
    Error::FailedPrecondition(CLAIM_LOST.into())
}

/// Exponential backoff with full jitter: 1 s, 2 s, 4 s … capped.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(16).saturating_sub(1)).min(max);
    let ms = base.as_millis().max(1) as u64;
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

/// One lease to revoke, who asked, and through which front end (for its
/// audit record, which a shared round writes in a task of its own).
struct Job {
    lease: Lease,
    actor: Arc<str>,
    via: Option<&'static str>,
}

/// Per database: the holder revocations waiting for the next round, and
/// the rounds running now.
#[derive(Default)]
struct Lanes(std::sync::Mutex<std::collections::HashMap<String, Arc<Lane>>>);

/// A queued job and where its outcome goes.
type Waiter = (Job, tokio::sync::oneshot::Sender<Result<()>>);

struct Lane {
    queue: std::sync::Mutex<Vec<Waiter>>,
    /// Two rounds at a time: while one waits on the database (or marks
    /// its leases in the store), the next is already on its way.
    running: Arc<tokio::sync::Semaphore>,
}

/// Rounds of one database in flight at once.
const ROUNDS_IN_FLIGHT: usize = 2;

impl Default for Lane {
    fn default() -> Self {
        Lane {
            queue: Default::default(),
            running: Arc::new(tokio::sync::Semaphore::new(ROUNDS_IN_FLIGHT)),
        }
    }
}

impl Lane {
    /// A round of its own for a revocation that finds no round running and
    /// none queued: nothing to share, so it runs on its caller's task
    /// instead of hopping to a round's. Held for the whole revocation, so
    /// a request that arrives meanwhile queues as behind any round.
    fn alone(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.running.clone().try_acquire_owned().ok()?;
        let idle = self.running.available_permits() == ROUNDS_IN_FLIGHT - 1
            && self
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
        idle.then_some(permit)
    }
}

/// A future run on its caller's task that, should the caller go away
/// before it ends (a client that hangs up), is finished in a task of its
/// own instead of being dropped midway: a revocation that began is never
/// cut off between the drop and its mark and audit record.
struct FinishedEvenIfDropped<F: std::future::Future + Send + 'static>(
    Option<std::pin::Pin<Box<F>>>,
)
where
    F::Output: Send + 'static;

impl<F: std::future::Future + Send + 'static> std::future::Future for FinishedEvenIfDropped<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let f = self.0.as_mut().expect("polled after it finished");
        let out = std::task::ready!(f.as_mut().poll(cx));
        self.0 = None;
        std::task::Poll::Ready(out)
    }
}

impl<F: std::future::Future + Send + 'static> Drop for FinishedEvenIfDropped<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let (Some(f), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(f);
        }
    }
}

impl Lanes {
    fn get(&self, database: &str) -> Arc<Lane> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(database.to_string()).or_default().clone()
    }
}

/// What the broker's engines that act on their own — this one, and the
/// static roles' rotator — are built from: the live config, the store,
/// the databases, the audit log, the metrics, and this process's name as
/// the owner of its claims in a shared store.
#[derive(Clone)]
pub struct Parts {
    pub config: ConfigHandle,
    pub store: Arc<dyn Store>,
    pub backends: Backends,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    /// This process, for claims (revocation, rotation) in a shared store.
    pub owner: String,
}

/// The engine. It holds what revocation needs and nothing of the request
/// path, so the broker, the reaper and the sweep share it without any of
/// them depending on the others.
pub struct Revoker {
    parts: Parts,
    /// Where revocations are announced (`WatchLeases`).
    watch: Arc<crate::watch::WatchHub>,
    lanes: Lanes,
    /// Revocation and retry times (`Clock::System` but in the fast tier).
    clock: Clock,
}

impl Revoker {
    /// Announces revocations on `watch` (the broker's hub) instead of a
    /// hub of its own that nobody listens to.
    pub fn with_watch(mut self, watch: Arc<crate::watch::WatchHub>) -> Self {
        self.watch = watch;
        self
    }

    /// Reads time from `clock` (the broker's) instead of the system's.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn watch(&self) -> &crate::watch::WatchHub {
        &self.watch
    }

    pub fn new(parts: Parts) -> Self {
        Revoker {
            parts,
            watch: Arc::new(crate::watch::WatchHub::new()),
            lanes: Lanes::default(),
            clock: Clock::System,
        }
    }

    fn config(&self) -> Arc<Config> {
        self.parts.config.get()
    }

    fn store(&self) -> &Arc<dyn Store> {
        &self.parts.store
    }

    fn backends(&self) -> &Backends {
        &self.parts.backends
    }

    fn audit(&self) -> &Arc<AuditLog> {
        &self.parts.audit
    }

    fn metrics(&self) -> &Arc<Metrics> {
        &self.parts.metrics
    }

    fn owner(&self) -> &str {
        &self.parts.owner
    }

    /// Who inherits what a lease's user owns: its role's `owner`, or the
    /// admin account when the role has none (or is no longer configured).
    pub(crate) fn revokee(&self, lease: &Lease) -> Revokee {
        let owner = self
            .config()
            .role(&lease.role)
            .filter(|r| r.database == lease.database)
            .and_then(|r| r.owner.clone());
        Revokee::new(
            UserRef {
                username: lease.username.clone(),
                host: lease.user_host.clone(),
            },
            owner,
        )
    }

    /// Revokes leases this broker has claimed.
    pub async fn revoke_claimed(
        &self,
        leases: Vec<Lease>,
        actor: &str,
        reason: Reason,
        mode: Mode,
    ) -> BulkOutcome {
        let actor: Arc<str> = Arc::from(actor);
        let jobs = leases
            .into_iter()
            .map(|lease| Job {
                lease,
                actor: actor.clone(),
                via: crate::audit::current_via(),
            })
            .collect();
        self.revoke_jobs(jobs, reason, mode).await
    }

    /// A holder's revocation of one claimed lease. Those of one database
    /// that arrive while an earlier round is running share the next one —
    /// one backend call, one store write — the way the store group-commits:
    /// under load a round costs the database a few statements for many
    /// roles instead of a few per role. Each round runs in a task of its
    /// own, so a caller that goes away cannot cancel the others'. One that
    /// finds no round running and none queued has nothing to share: it
    /// runs on the caller's task (no hop), and is finished in a task of
    /// its own if the caller goes away midway.
    pub async fn revoke_requested(self: &Arc<Self>, lease: Lease, actor: &str) -> Result<()> {
        let lane = self.lanes.get(&lease.database);
        let id = lease.id.clone();
        let job = Job {
            lease,
            actor: Arc::from(actor),
            via: crate::audit::current_via(),
        };
        // Nobody else is revoking on this database: no round to share, so
        // no hop to one (as `create_leased` does for creations).
        if let Some(round) = lane.alone() {
            let this = self.clone();
            let alone = FinishedEvenIfDropped(Some(Box::pin(async move {
                let _round = round;
                this.revoke_jobs(vec![job], Reason::Requested, Mode::UntilDropped)
                    .await
            })));
            let mut out = steps::timed("database: revoke alone (no round to share)", alone).await;
            return match out.failed.pop() {
                Some((_, e)) => Err(e),
                None => Ok(()),
            };
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        lane.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((job, tx));
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(_round) = lane.running.acquire().await else {
                return;
            };
            let batch = std::mem::take(&mut *lane.queue.lock().unwrap_or_else(|p| p.into_inner()));
            // Empty: a round that started after we queued took ours too.
            if batch.is_empty() {
                return;
            }
            let (jobs, waiters): (Vec<Job>, Vec<_>) = batch.into_iter().unzip();
            let ids: Vec<LeaseId> = jobs.iter().map(|j| j.lease.id.clone()).collect();
            let mut out = this
                .revoke_jobs(jobs, Reason::Requested, Mode::UntilDropped)
                .await;
            for (id, tx) in ids.into_iter().zip(waiters) {
                let failed = out.failed.iter().position(|(f, _)| *f == id);
                let _ = tx.send(match failed {
                    Some(i) => Err(out.failed.swap_remove(i).1),
                    None => Ok(()),
                });
            }
        });
        steps::timed("database: revoke in a shared round (waiting included)", rx)
            .await
            .unwrap_or_else(|_| {
                Err(Error::unavailable(format!(
                    "the revocation round of lease {id} was interrupted; the reaper retries it"
                )))
            })
    }

    #[cfg(test)]
    fn queued(&self, database: &str) -> usize {
        let lane = self.lanes.get(database);
        let n = lane.queue.lock().unwrap().len();
        n
    }

    async fn revoke_jobs(&self, jobs: Vec<Job>, reason: Reason, mode: Mode) -> BulkOutcome {
        let mut by_db: BTreeMap<String, Vec<Job>> = BTreeMap::new();
        for j in jobs {
            by_db.entry(j.lease.database.clone()).or_default().push(j);
        }
        let mut out = BulkOutcome::default();
        for (db, jobs) in by_db {
            let backend = match self.backends().get(&db) {
                Some(b) => b.clone(),
                None => {
                    let e = Error::FailedPrecondition(format!(
                        "database {db:?} is not configured on this broker"
                    ));
                    self.record_failures(&jobs, &e, reason, &mut out).await;
                    continue;
                }
            };
            let revokees: Vec<Revokee> = jobs.iter().map(|j| self.revokee(&j.lease)).collect();
            match steps::timed("round: database revoke", backend.revoke(&revokees)).await {
                Ok(reassigned) => {
                    self.finish_batch(&jobs, &reassigned, reason, &mut out)
                        .await
                }
                // A database that is down fails every lease the same way:
                // splitting the batch would only multiply connection attempts.
                Err(e) if jobs.len() > 1 && !matches!(e, Error::Unavailable(_)) => {
                    tracing::warn!(database = %db, error = %crate::error::chain(&e), "batch revocation failed; revoking one by one");
                    for (job, revokee) in jobs.iter().zip(&revokees) {
                        let one = std::slice::from_ref(job);
                        match backend.revoke(std::slice::from_ref(revokee)).await {
                            Ok(reassigned) => {
                                self.finish_batch(one, &reassigned, reason, &mut out).await
                            }
                            Err(e) => {
                                self.failed(backend.as_ref(), job, e, reason, mode, &mut out)
                                    .await
                            }
                        }
                    }
                }
                Err(e) if mode == Mode::UntilDropped => {
                    self.record_failures(&jobs, &e, reason, &mut out).await
                }
                Err(e) => {
                    for job in &jobs {
                        self.failed(backend.as_ref(), job, e.clone(), reason, mode, &mut out)
                            .await;
                    }
                }
            }
        }
        out
    }

    /// The users are gone: the leases leave the live set, if our claim on
    /// them still holds.
    async fn finish_batch(
        &self,
        jobs: &[Job],
        reassigned: &[Reassigned],
        reason: Reason,
        out: &mut BulkOutcome,
    ) {
        let ids: Vec<LeaseId> = jobs.iter().map(|j| j.lease.id.clone()).collect();
        let mark = self
            .store()
            .mark_revoked_claimed(&ids, self.owner(), self.clock.now());
        let marked = match steps::timed("round: store mark revoked", mark).await {
            Ok(m) => m,
            Err(e) => {
                // The users are gone; the next pass finds nothing to drop
                // and marks them then.
                tracing::error!(error = %crate::error::chain(&e), "cannot mark leases revoked");
                for j in jobs {
                    out.failed.push((j.lease.id.clone(), e.clone()));
                }
                return;
            }
        };
        for Job {
            lease: l,
            actor,
            via,
        } in jobs
        {
            if marked.contains(&l.id) {
                let moved = reassigned.iter().find(|r| r.username == l.username);
                self.audit_revocation(l, actor, *via, reason, Ok(moved));
                self.metrics().revoked(&l.role, &l.database, reason);
                self.watch()
                    .publish(crate::watch::LeaseEvent::revoked(l, actor, reason));
                out.revoked.push(l.id.clone());
            } else {
                out.failed.push((l.id.clone(), claim_lost()));
            }
        }
    }

    /// One lease's drop failed. Forced: forget it only once the database
    /// confirms the account is disabled; otherwise record the failure.
    async fn failed(
        &self,
        backend: &dyn Backend,
        job: &Job,
        error: Error,
        reason: Reason,
        mode: Mode,
        out: &mut BulkOutcome,
    ) {
        let Job { lease, actor, via } = job;
        if mode == Mode::UntilDropped {
            return self
                .record_failures(std::slice::from_ref(job), &error, reason, out)
                .await;
        }
        let user = self.revokee(lease).user;
        if let Err(disable) = backend.disable(std::slice::from_ref(&user)).await {
            let refused = Error::FailedPrecondition(format!(
                "forced revoke refused: the drop failed ({error}) and the account could not be verified as disabled ({disable}); the lease stays tracked"
            ));
            return self
                .record_failures(std::slice::from_ref(job), &refused, reason, out)
                .await;
        }
        tracing::warn!(lease_id = %lease.id, error = %error, "revocation failed; account disabled and forced off by an admin");
        if let Err(e) = self
            .store()
            .mark_revoked(std::slice::from_ref(&lease.id), self.clock.now())
            .await
        {
            out.failed.push((lease.id.clone(), e));
            return;
        }
        self.audit_revocation(
            lease,
            actor,
            *via,
            reason,
            Err(&format!(
                "forced; drop failed ({error}); login disabled and sessions ended, the account is left in the database"
            )),
        );
        self.metrics().revoked(&lease.role, &lease.database, reason);
        self.watch()
            .publish(crate::watch::LeaseEvent::revoked(lease, actor, reason));
        out.revoked.push(lease.id.clone());
    }

    /// Records one failed attempt for each lease, in one store transaction,
    /// with the next retry time. A database that is merely unreachable is
    /// retried within seconds (a refused connection is cheap), so due leases
    /// are caught up right after it returns; other errors back off further.
    async fn record_failures(
        &self,
        jobs: &[Job],
        error: &Error,
        reason: Reason,
        out: &mut BulkOutcome,
    ) {
        let cfg = self.config();
        let msg = error.to_string();
        let cap = match error {
            Error::Unavailable(_) => cfg.reaper.max_backoff.min(UNREACHABLE_RETRY_CAP),
            _ => cfg.reaper.max_backoff,
        };
        let failures: Vec<FailureRecord> = jobs
            .iter()
            .map(|Job { lease: l, .. }| {
                let attempts = l.revoke_attempts + 1;
                let delay = backoff(attempts, cap);
                FailureRecord {
                    id: l.id.clone(),
                    error: msg.clone(),
                    next_due: self.clock.now()
                        + chrono::Duration::from_std(delay).unwrap_or_default(),
                    failing: attempts >= cfg.reaper.failing_after_attempts,
                }
            })
            .collect();
        if let Err(se) = self.store().record_failures(&failures).await {
            tracing::error!(error = %crate::error::chain(&se), "cannot record revocation failures");
        }
        tracing::warn!(count = jobs.len(), error = %msg, "revocation failed; will retry");
        for Job {
            lease: l,
            actor,
            via,
        } in jobs
        {
            self.audit_revocation(l, actor, *via, reason, Err(&msg));
            self.metrics().revocation_failed(&l.database);
            out.failed.push((l.id.clone(), error.clone()));
        }
    }

    fn audit_revocation(
        &self,
        lease: &Lease,
        actor: &str,
        via: Option<&'static str>,
        reason: Reason,
        result: std::result::Result<Option<&Reassigned>, &str>,
    ) {
        let mut e = Event::new(actor, reason.action());
        e.role = Some(lease.role.clone());
        e.database = Some(lease.database.clone());
        e.lease_id = Some(lease.id.to_string());
        e.username = Some(lease.username.to_string());
        // A lease under an access grant: its end is linked to the grant.
        e.request_id = lease.grant_id.clone();
        match result {
            Ok(moved) => {
                e.outcome = Some(Outcome::Ok);
                if let Some(m) = moved {
                    e.objects_reassigned = Some(m.objects);
                    e.reassigned_to = Some(m.to.clone());
                }
            }
            Err(msg) => {
                e.outcome = Some(Outcome::Error);
                e.detail = Some(msg.to_string());
            }
        }
        let _step = steps::span("audit: append").entered();
        if let Err(err) = crate::audit::in_via(via, || self.audit().append(e)) {
            tracing::error!(error = %crate::error::chain(&err), "audit write failed");
        }
    }

    /// Drops users of `database` that no live lease accounts for (the
    /// orphan sweep's confirmed suspects). What they own goes to the admin
    /// account, like any revocation's.
    pub async fn revoke_orphans(&self, database: &str, users: Vec<UserRef>) -> Result<()> {
        let Some(backend) = self.backends().get(database).cloned() else {
            return Ok(());
        };
        let revokees: Vec<Revokee> = users.into_iter().map(|u| Revokee::new(u, None)).collect();
        let reassigned = backend.revoke(&revokees).await?;
        for r in &revokees {
            let u = &r.user;
            tracing::warn!(database = %database, username = %u.username, "dropped orphaned broker user");
            let mut e = Event::new(REAPER_IDENTITY, "drop_orphan");
            e.database = Some(database.to_string());
            e.username = Some(u.username.to_string());
            e.outcome = Some(Outcome::Ok);
            if let Some(m) = reassigned.iter().find(|m| m.username == u.username) {
                e.objects_reassigned = Some(m.objects);
                e.reassigned_to = Some(m.to.clone());
            }
            let _ = self.audit().append(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
