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
mod tests {
    use super::*;
    use crate::lease::LeaseState;
    use crate::store::LeaseStore;
    use crate::testkit::{admin, app, role, Kit};
    use chrono::Utc;

    async fn claimed(kit: &Kit, n: usize, role: &str) -> Vec<Lease> {
        let mut out = Vec::new();
        for _ in 0..n {
            let issued = kit.broker.issue(&app(), role, None).await.unwrap();
            let l = kit
                .store
                .claim_one(&issued.lease.id, &kit.broker.claim())
                .await
                .unwrap()
                .unwrap();
            out.push(l);
        }
        out
    }

    async fn state(kit: &Kit, id: &LeaseId) -> Lease {
        kit.store.get(id).await.unwrap().unwrap()
    }

    /// The engine revokes `leases` (claimed) for actor `t`.
    async fn revoke(kit: &Kit, leases: Vec<Lease>, reason: Reason, mode: Mode) -> BulkOutcome {
        kit.broker
            .revoker()
            .revoke_claimed(leases, "t", reason, mode)
            .await
    }

    /// The revoke calls the fake database has seen so far.
    fn revoke_calls_now(kit: &Kit) -> Vec<String> {
        kit.server
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("revoke"))
            .collect()
    }

    #[tokio::test]
    async fn a_batch_is_one_call_and_reports_what_was_reassigned() {
        let kit = Kit::new("", &role("ro", "main"));
        let leases = claimed(&kit, 3, "ro").await;
        kit.server.give_objects(leases[1].username.as_str(), 4);
        let out = revoke(&kit, leases.clone(), Reason::Admin, Mode::UntilDropped).await;
        assert_eq!(out.revoked.len(), 3);
        assert!(out.failed.is_empty());
        let revokes = revoke_calls_now(&kit);
        assert_eq!(revokes.len(), 1, "{revokes:?}");
        for l in &leases {
            assert_eq!(state(&kit, &l.id).await.state, LeaseState::Revoked);
            assert!(kit.server.user(l.username.as_str()).is_none());
        }
        let moved: Vec<_> = kit
            .audit()
            .into_iter()
            .filter(|r| r.action == "admin_revoke")
            .map(|r| (r.username.unwrap(), r.objects_reassigned, r.reassigned_to))
            .collect();
        assert_eq!(moved.len(), 3);
        assert!(moved.contains(&(
            leases[1].username.to_string(),
            Some(4),
            Some("fake_admin".into())
        )));
    }

    #[tokio::test]
    async fn the_role_owner_inherits_objects() {
        let kit = Kit::new(
            "",
            &(role("mig", "main").replace("allowed", "owner = \"app_owner\"\nallowed")),
        );
        let leases = claimed(&kit, 1, "mig").await;
        kit.server.give_objects(leases[0].username.as_str(), 2);
        revoke(&kit, leases, Reason::Expired, Mode::UntilDropped).await;
        let rec = kit
            .audit()
            .into_iter()
            .find(|r| r.action == "reap")
            .unwrap();
        assert_eq!(rec.objects_reassigned, Some(2));
        assert_eq!(rec.reassigned_to.as_deref(), Some("app_owner"));
    }

    #[tokio::test]
    async fn one_bad_lease_does_not_hold_back_the_batch() {
        let kit = Kit::new("", &role("ro", "main"));
        let leases = claimed(&kit, 3, "ro").await;
        kit.server.refuse_revoke(leases[0].username.as_str());
        let out = revoke(&kit, leases.clone(), Reason::Expired, Mode::UntilDropped).await;
        assert_eq!(out.revoked.len(), 2);
        assert_eq!(out.failed.len(), 1);
        assert_eq!(out.failed[0].0, leases[0].id);
        let bad = state(&kit, &leases[0].id).await;
        assert_eq!(
            bad.state,
            LeaseState::Active,
            "one failure is not failing yet"
        );
        assert_eq!(bad.revoke_attempts, 1);
        assert!(bad.last_error.unwrap().contains("refuses to drop"));
        assert!(bad.due_at > Utc::now(), "retry is scheduled later");
        assert_eq!(kit.store.claim_owner(&bad.id), None, "claim released");
        // Batch first, then one call per lease.
        let revokes = revoke_calls_now(&kit).len();
        assert_eq!(revokes, 4);
    }

    #[tokio::test]
    async fn an_unreachable_database_is_not_split_and_retried_within_seconds() {
        let kit = Kit::new("", &role("ro", "main"));
        let leases = claimed(&kit, 4, "ro").await;
        kit.server.set_unavailable(true);
        let out = revoke(&kit, leases.clone(), Reason::Expired, Mode::UntilDropped).await;
        assert_eq!(out.failed.len(), 4);
        let revokes = revoke_calls_now(&kit).len();
        assert_eq!(revokes, 1, "a database that is away is asked once");
        for l in &leases {
            let s = state(&kit, &l.id).await;
            assert!(s.due_at <= Utc::now() + chrono::Duration::seconds(2));
        }
    }

    #[tokio::test]
    async fn failing_after_n_attempts_and_still_retried() {
        let kit = Kit::new(
            "[reaper]\nfailing_after_attempts = 3\n",
            &role("ro", "main"),
        );
        let leases = claimed(&kit, 1, "ro").await;
        kit.server.refuse_revoke(leases[0].username.as_str());
        for attempt in 1..=3u32 {
            let l = kit
                .store
                .claim_one(&leases[0].id, &kit.broker.claim())
                .await
                .unwrap()
                .unwrap();
            revoke(&kit, vec![l], Reason::Expired, Mode::UntilDropped).await;
            let s = state(&kit, &leases[0].id).await;
            assert_eq!(s.revoke_attempts, attempt);
            let want = if attempt < 3 {
                LeaseState::Active
            } else {
                LeaseState::Failing
            };
            assert_eq!(s.state, want, "after attempt {attempt}");
        }
        // Its login is gone whatever the drop did.
        assert!(!kit.server.user(leases[0].username.as_str()).unwrap().login);
    }

    #[tokio::test]
    async fn forced_forgets_only_an_account_the_database_confirms_disabled() {
        let kit = Kit::new("", &role("ro", "main"));
        let leases = claimed(&kit, 2, "ro").await;
        for l in &leases {
            kit.server.refuse_revoke(l.username.as_str());
        }
        let out = revoke(&kit, vec![leases[0].clone()], Reason::Admin, Mode::Forced).await;
        assert_eq!(out.revoked, vec![leases[0].id.clone()]);
        assert_eq!(state(&kit, &leases[0].id).await.state, LeaseState::Revoked);
        let rec = kit
            .audit()
            .into_iter()
            .find(|r| {
                r.lease_id.as_deref() == Some(leases[0].id.as_str()) && r.action == "admin_revoke"
            })
            .unwrap();
        assert!(rec.detail.unwrap().contains("forced"));

        kit.server.refuse_disable(true);
        let out = revoke(&kit, vec![leases[1].clone()], Reason::Admin, Mode::Forced).await;
        assert!(out.revoked.is_empty());
        assert!(
            out.failed[0]
                .1
                .to_string()
                .contains("forced revoke refused"),
            "{:?}",
            out.failed
        );
        let kept = state(&kit, &leases[1].id).await;
        assert_ne!(
            kept.state,
            LeaseState::Revoked,
            "an unverified account stays tracked"
        );
        assert_eq!(kept.revoke_attempts, 1);
    }

    #[tokio::test]
    async fn a_claim_lost_mid_revocation_is_neither_marked_nor_audited_by_us() {
        let kit = Kit::new("", &role("ro", "main"));
        let leases = claimed(&kit, 1, "ro").await;
        let (store, id) = (kit.store.clone(), leases[0].id.clone());
        kit.server
            .before_next_revoke(move || store.steal_claim(&id, "another-replica"));
        let out = revoke(&kit, leases.clone(), Reason::Expired, Mode::UntilDropped).await;
        assert!(out.revoked.is_empty());
        assert!(
            matches!(&out.failed[0].1, Error::FailedPrecondition(m) if m == CLAIM_LOST),
            "{:?}",
            out.failed
        );
        assert_ne!(state(&kit, &leases[0].id).await.state, LeaseState::Revoked);
        assert!(!kit.audit().iter().any(|r| r.action == "reap"));
    }

    #[tokio::test]
    async fn a_store_that_is_away_when_marking_leaves_the_lease_live() {
        let kit = Kit::new("", &role("ro", "main"));
        let leases = claimed(&kit, 1, "ro").await;
        let store = kit.store.clone();
        kit.server.before_next_revoke(move || store.fail_next(1));
        let out = revoke(&kit, leases.clone(), Reason::Expired, Mode::UntilDropped).await;
        assert!(out.revoked.is_empty());
        let e = &out.failed[0].1;
        // The store's own error, which names the store to every caller.
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(e.caller_message().starts_with("lease store"), "{e}");
        // Invariant 2: still live, so the next pass finds the user gone and
        // marks it then.
        assert_ne!(state(&kit, &leases[0].id).await.state, LeaseState::Revoked);
    }

    #[tokio::test]
    async fn admin_revoke_by_database_touches_only_that_database() {
        let kit = Kit::new("", &(role("a", "main") + &role("b", "second")));
        let a = claimed(&kit, 2, "a").await;
        let b = kit.broker.issue(&app(), "b", None).await.unwrap();
        for l in &a {
            kit.store.release(&l.id).await.unwrap();
        }
        let out = kit
            .broker
            .admin_revoke(
                &admin(),
                &crate::broker::Selector::Database("main".into()),
                Mode::UntilDropped,
            )
            .await
            .unwrap();
        assert_eq!(out.revoked.len(), 2);
        assert!(kit.server.user(b.lease.username.as_str()).is_some());
        assert_eq!(state(&kit, &b.lease.id).await.state, LeaseState::Active);
    }

    /// Waits until the fake database has seen `n` revoke calls.
    async fn revoke_calls(kit: &Kit, n: usize) -> Vec<String> {
        for _ in 0..2000 {
            let calls = revoke_calls_now(kit);
            if calls.len() >= n {
                return calls;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("fewer than {n} revoke calls: {:?}", kit.server.calls());
    }

    /// Issues `n` leases and starts a holder revoke of each: the first
    /// [`ROUNDS_IN_FLIGHT`] one by one (each holds its round at the gate),
    /// the rest while they wait.
    async fn revokes_behind_a_slow_round(
        kit: &Kit,
        n: usize,
        who: impl Fn(usize) -> crate::identity::Identity,
    ) -> (
        Vec<Lease>,
        Vec<tokio::task::JoinHandle<Result<Lease>>>,
        Arc<tokio::sync::Semaphore>,
    ) {
        let mut leases = Vec::new();
        for _ in 0..n {
            leases.push(kit.broker.issue(&app(), "ro", None).await.unwrap().lease);
        }
        let gate = kit.server.gate_revokes();
        let mut tasks = Vec::new();
        for (i, l) in leases.iter().enumerate() {
            let (broker, id, who) = (kit.broker.clone(), l.id.clone(), who(i));
            tasks.push(tokio::spawn(async move { broker.revoke(&who, &id).await }));
            if i < ROUNDS_IN_FLIGHT {
                revoke_calls(kit, i + 1).await;
            }
        }
        // Every later revoke has claimed its lease and queued behind the
        // first round, which waits at the gate.
        for _ in 0..2000 {
            if kit.broker.revoker().queued("main") == n - ROUNDS_IN_FLIGHT {
                return (leases, tasks, gate);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the revokes did not queue");
    }

    #[tokio::test]
    async fn holder_revokes_that_arrive_together_share_one_round() {
        let kit = Kit::new("", &role("ro", "main"));
        let (leases, tasks, gate) =
            revokes_behind_a_slow_round(&kit, 5, |i| if i == 4 { admin() } else { app() }).await;
        gate.add_permits(3);
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().state, LeaseState::Revoked);
        }
        let calls = revoke_calls(&kit, 3).await;
        let names: Vec<String> = leases[2..].iter().map(|l| l.username.to_string()).collect();
        assert_eq!(
            calls,
            vec![
                format!("revoke {}", leases[0].username),
                format!("revoke {}", leases[1].username),
                format!("revoke {}", names.join(","))
            ],
            "the first two alone, the three that queued behind them in one call"
        );
        for l in &leases {
            assert_eq!(state(&kit, &l.id).await.state, LeaseState::Revoked);
            assert!(kit.server.user(l.username.as_str()).is_none());
        }
        // Each record names its own actor, though one round served them.
        let actors: Vec<(String, String)> = kit
            .audit()
            .into_iter()
            .filter(|r| r.action == "revoke")
            .map(|r| (r.lease_id.unwrap(), r.identity))
            .collect();
        assert_eq!(actors.len(), 5, "{actors:?}");
        for (i, l) in leases.iter().enumerate() {
            let who = if i == 4 { admin() } else { app() };
            assert!(
                actors.contains(&(l.id.to_string(), who.as_str().to_string())),
                "{actors:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_refused_lease_in_a_shared_round_fails_alone() {
        let kit = Kit::new("", &role("ro", "main"));
        let (leases, tasks, gate) = revokes_behind_a_slow_round(&kit, 5, |_| app()).await;
        kit.server.refuse_revoke(leases[3].username.as_str());
        // The first two rounds, the shared one, then one call per lease of it.
        gate.add_permits(6);
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        for (i, r) in results.iter().enumerate() {
            match (i, r) {
                (3, Err(Error::Unavailable(m))) => assert!(m.contains("will be retried"), "{m}"),
                (3, other) => panic!("the refused lease: {other:?}"),
                (_, r) => assert_eq!(r.as_ref().unwrap().state, LeaseState::Revoked),
            }
        }
        let bad = state(&kit, &leases[3].id).await;
        assert_eq!(bad.state, LeaseState::Active);
        assert_eq!(bad.revoke_attempts, 1);
        assert!(kit.server.user(leases[3].username.as_str()).is_some());
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_does_not_cancel_the_round() {
        let kit = Kit::new("", &role("ro", "main"));
        let (leases, tasks, gate) = revokes_behind_a_slow_round(&kit, 4, |_| app()).await;
        // The first caller, whose request started a round, hangs up; so
        // does one of those waiting behind it.
        tasks[0].abort();
        tasks[2].abort();
        gate.add_permits(3);
        tasks.into_iter().nth(3).unwrap().await.unwrap().unwrap();
        for l in &leases {
            for _ in 0..2000 {
                if state(&kit, &l.id).await.state == LeaseState::Revoked {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(state(&kit, &l.id).await.state, LeaseState::Revoked);
            assert!(kit.server.user(l.username.as_str()).is_none());
        }
    }

    /// A revoke with no round to share runs on its caller's task; a
    /// caller that hangs up at the database still gets its lease dropped,
    /// marked and audited.
    #[tokio::test]
    async fn a_lone_revoke_whose_caller_goes_away_is_finished_and_audited() {
        let kit = Kit::new("", &role("ro", "main"));
        let lease = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
        let gate = kit.server.gate_revokes();
        let (broker, id) = (kit.broker.clone(), lease.id.clone());
        let task = tokio::spawn(async move { broker.revoke(&app(), &id).await });
        revoke_calls(&kit, 1).await;
        assert_eq!(kit.broker.revoker().queued("main"), 0, "it ran alone");
        task.abort();
        gate.add_permits(1);
        for _ in 0..2000 {
            if state(&kit, &lease.id).await.state == LeaseState::Revoked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(state(&kit, &lease.id).await.state, LeaseState::Revoked);
        assert!(kit.server.user(lease.username.as_str()).is_none());
        let audited = kit
            .audit()
            .into_iter()
            .any(|r| r.action == "revoke" && r.lease_id.as_deref() == Some(lease.id.as_str()));
        assert!(audited, "{:?}", kit.audit());
    }

    /// The round writes its records in a task of its own: each still says
    /// which front end its request came through.
    #[tokio::test]
    async fn a_shared_round_keeps_each_request_s_front_end_in_its_record() {
        let kit = Kit::new("", &role("ro", "main"));
        let a = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
        let b = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
        crate::audit::via("vault_api", kit.broker.revoke(&app(), &a.id))
            .await
            .unwrap();
        kit.broker.revoke(&app(), &b.id).await.unwrap();
        let via = |id: &LeaseId| {
            kit.audit()
                .into_iter()
                .find(|r| r.action == "revoke" && r.lease_id.as_deref() == Some(id.as_str()))
                .unwrap()
                .via
        };
        assert_eq!(via(&a.id).as_deref(), Some("vault_api"));
        assert_eq!(via(&b.id), None);
    }
}
