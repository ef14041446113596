//! The rotation state machine of static roles, and the loop that runs it.
//!
//! One step, under the role's claim in the store (so one replica at a
//! time, like revocation claims):
//! 1. a **pending** rotation (an intent left by a broker that died) is
//!    re-applied — setting the same password again is idempotent — and
//!    committed;
//! 2. a **previous** user whose overlap has ended is retired: sessions
//!    ended (`end_sessions`), password replaced by one nobody knows,
//!    logins refused;
//! 3. when the period is up (or an admin asks), a **rotation**: a fresh
//!    password for the user not in use, sealed into an intent that is
//!    durable *before* the database hears of it, and audited before it
//!    too; then the database (`VALID UNTIL` / failsafe at now + period +
//!    overlap); then commit: that user is current, the old one is previous
//!    until the overlap ends.
//!
//! An audit log that cannot be written stops a step before the database
//! changes (the intent stays pending, the database keeps the served
//! password): nothing is rotated, retired or committed unaudited.
//!
//! A broker killed anywhere in between leaves either the old state (the
//! database may or may not have the new password on the *other* user,
//! which nobody has been told) or a pending intent whose password is
//! sealed in it: the next step finishes it. The served user's password is
//! always the one the database has.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::audit::{AuditLog, Event, Outcome};
use crate::backend::{Backend, Backends, StaticLogin, StaticUsers};
use crate::config::ConfigHandle;
use crate::error::{Error, Result};
use crate::lease::Password;
use crate::metrics::Metrics;
use crate::store::{Claim, Store, DEFAULT_CLAIM};

use super::{
    CurrentUser, Pending, PendingKind, PreviousUser, Sealer, StaticRoleConfig, StaticState,
};

/// Who the audit log names for the broker's own rotations.
pub const SYSTEM: &str = "credbroker:system";

/// Longest the loop sleeps without looking: another replica may have
/// rotated, or died holding a claim.
const POLL: Duration = Duration::from_secs(1);

/// Longest a reader waits for another replica's first rotation.
const READ_WAIT: Duration = Duration::from_secs(10);

/// What a step is asked to do beyond what is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Force {
    /// Only what is due.
    None,
    /// Rotate now (`admin rotate --static-role`).
    Rotate,
    /// Incident: retire both users, then rotate (`admin revoke --static-role`).
    Revoke,
    /// Recovery (`admin rotate --static-role --abandon-pending`): drop a
    /// pending rotation without finishing it — e.g. one sealed under a
    /// sealing key this broker does not have, which no step could ever
    /// finish — and rotate afresh under this broker's key (an abandoned
    /// incident is redone as an incident).
    Abandon,
}

pub struct Rotator {
    config: ConfigHandle,
    store: Arc<dyn Store>,
    backends: Backends,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    sealer: Option<Arc<Sealer>>,
    owner: String,
    wake: Notify,
    /// One step at a time in this process; the store's claim does the
    /// same across replicas.
    steps: tokio::sync::Mutex<()>,
    /// Per role: failures in a row and when to try again.
    backoff: Mutex<BTreeMap<String, (u32, DateTime<Utc>)>>,
    /// Per role: the sessions its running drain has ended idle, for the
    /// drain's audit record and metrics (this process's share only).
    drained: Mutex<BTreeMap<String, std::collections::HashSet<i64>>>,
}

impl Rotator {
    pub fn new(
        config: ConfigHandle,
        store: Arc<dyn Store>,
        backends: Backends,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        sealer: Option<Arc<Sealer>>,
        owner: String,
    ) -> Self {
        Rotator {
            config,
            store,
            backends,
            audit,
            metrics,
            sealer,
            owner,
            wake: Notify::new(),
            steps: tokio::sync::Mutex::new(()),
            backoff: Mutex::new(BTreeMap::new()),
            drained: Mutex::new(BTreeMap::new()),
        }
    }

    fn sealer(&self) -> Result<&Sealer> {
        self.sealer.as_deref().ok_or_else(|| {
            Error::FailedPrecondition(
                "static roles need a readable sealing key (sealing_key_file / sealing_key_env)"
                    .into(),
            )
        })
    }

    fn backend(&self, database: &str) -> Result<&Arc<dyn Backend>> {
        self.backends.get(database).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "database {database:?} is not configured on this broker"
            ))
        })
    }

    fn claim(&self) -> Claim {
        let timeout = chrono::Duration::from_std(self.config.get().store.claim_timeout)
            .unwrap_or_else(|_| chrono::Duration::from_std(DEFAULT_CLAIM).unwrap_or_default());
        Claim {
            owner: self.owner.clone(),
            until: Utc::now() + timeout,
        }
    }

    /// Opens the sealed password of the state's current user.
    pub fn unseal_current(&self, st: &StaticState) -> Result<(CurrentUser, Password)> {
        let cur = st.current.clone().ok_or_else(|| {
            Error::unavailable(format!(
                "static role {:?} has not been rotated yet",
                st.role
            ))
        })?;
        let pw = self
            .sealer()?
            .open(&st.role, &cur.user, st.generation, &cur.sealed)?;
        Ok((cur, pw))
    }

    /// The state a reader is served: rotated first when it has never been,
    /// is overdue or has a pending rotation (another replica's claim is
    /// waited for, up to [`READ_WAIT`]).
    pub async fn readable(&self, role: &StaticRoleConfig) -> Result<StaticState> {
        let deadline = tokio::time::Instant::now() + READ_WAIT;
        loop {
            let st = self.store.static_get(&role.name).await?;
            let now = Utc::now();
            let fresh = st.as_ref().is_some_and(|s| {
                s.current.is_some()
                    && s.pending.is_none()
                    && s.next_rotation_at.is_some_and(|t| now < t)
            });
            if fresh {
                return Ok(st.unwrap_or_default());
            }
            match self.step(role, Force::None, SYSTEM).await {
                Ok(Some(st)) if st.current.is_some() => return Ok(st),
                // Another replica is at it: what is committed stays
                // usable while the database keeps it valid.
                Ok(_) => {
                    if let Some(s) =
                        st.filter(|s| s.current.as_ref().is_some_and(|c| now < c.valid_until))
                    {
                        return Ok(s);
                    }
                }
                // Still usable while the database keeps it valid.
                Err(e) => match st {
                    Some(s) if s.current.as_ref().is_some_and(|c| now < c.valid_until) => {
                        return Ok(s)
                    }
                    _ => return Err(e),
                },
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::unavailable(format!(
                    "static role {:?} is being rotated by another replica; try again",
                    role.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One step for `role` (see the module doc). `Ok(None)`: another
    /// replica holds the role's claim right now.
    pub async fn step(
        &self,
        role: &StaticRoleConfig,
        force: Force,
        actor: &str,
    ) -> Result<Option<StaticState>> {
        let _one_at_a_time = self.steps.lock().await;
        let Some(mut st) = self.store.static_claim(&role.name, &self.claim()).await? else {
            return Ok(None);
        };
        let result = self.step_claimed(role, &mut st, force, actor).await;
        if let Err(e) = &result {
            self.metrics.static_failed(&role.name);
            st.last_error = Some(e.to_string());
            let _ = self.store.static_save(&st, &self.owner).await;
            let mut ev = Event::new(actor, force_action(force));
            ev.role = Some(role.name.clone());
            ev.database = Some(role.database.clone());
            ev.outcome = Some(Outcome::Error);
            ev.detail = Some(e.to_string());
            let _ = self.audit.append_relaxed(ev);
        }
        let _ = self.store.static_release(&role.name, &self.owner).await;
        result.map(|()| Some(st))
    }

    async fn step_claimed(
        &self,
        role: &StaticRoleConfig,
        st: &mut StaticState,
        force: Force,
        actor: &str,
    ) -> Result<()> {
        let backend = self.backend(&role.database)?.clone();
        let mut force = force;
        if force == Force::Abandon {
            force = match st.pending.clone() {
                Some(p) => {
                    self.abandon(role, st, &p, actor).await?;
                    match p.kind {
                        PendingKind::Revoke => Force::Revoke,
                        PendingKind::Rotate => Force::Rotate,
                    }
                }
                None => Force::Rotate,
            };
        }
        if let Some(p) = st.pending.clone() {
            // A rotation a broker died in the middle of: finish it.
            let at = crate::lease::truncate_ms(Utc::now());
            self.audit_rotation(role, st, &p, SYSTEM, "resumed an interrupted rotation", at)?;
            self.apply(role, &*backend, st, &p).await?;
            self.commit(role, st, p, at).await?;
        }
        let now = Utc::now();
        if let Some(prev) = st.previous.clone() {
            self.end_overlap(role, &*backend, st, &prev, now, actor)
                .await?;
        }
        let due = force != Force::None
            || st.current.is_none()
            || st.next_rotation_at.is_none_or(|t| now >= t);
        if !due {
            return Ok(());
        }
        if st.current.is_none() && role.create {
            backend
                .static_create(&StaticUsers {
                    role: &role.name,
                    users: &role.users,
                    host: &role.host,
                    owner: role.owner.as_deref().unwrap_or_default(),
                    grants: &role.grants,
                })
                .await?;
        }
        let target = next_user(role, st);
        if let Some(prev) = st.previous.clone().filter(|p| p.user == target) {
            // An early (admin) rotation onto a user still in its overlap:
            // whoever holds that password loses it now, so say so.
            let detail = retired(role.end_sessions);
            self.retire(
                role,
                &*backend,
                st,
                &prev.user,
                role.end_sessions,
                actor,
                detail,
            )
            .await?;
        }
        let kind = match force {
            Force::Revoke => PendingKind::Revoke,
            _ => PendingKind::Rotate,
        };
        let generation = st.generation + 1;
        let password = Password::generate();
        let sealed = self
            .sealer()?
            .seal(&role.name, &target, generation, &password)?;
        drop(password);
        let valid_until = crate::lease::truncate_ms(now) + role.period() + role.overlap_delta();
        let p = Pending {
            kind,
            user: target,
            sealed,
            generation,
            valid_until,
        };
        st.pending = Some(p.clone());
        // The intent is durable before the database hears of it.
        self.save(st).await?;
        let detail = match kind {
            PendingKind::Rotate if actor == SYSTEM => "scheduled rotation",
            PendingKind::Rotate => "rotation asked by an admin",
            PendingKind::Revoke => {
                "both users' passwords replaced and sessions ended; new credential"
            }
        };
        // And audited before the database hears of it: an audit log that
        // cannot be written stops the rotation here, with the intent kept
        // and the database (so the served password) untouched.
        // Committed as of the instant `valid_until` was counted from.
        let at = crate::lease::truncate_ms(now);
        self.audit_rotation(role, st, &p, actor, detail, at)?;
        self.apply(role, &*backend, st, &p).await?;
        self.commit(role, st, p, at).await
    }

    /// Drops the pending rotation `p`, audited first. Its password is lost
    /// with it; the database may or may not have it on `p.user`, which
    /// nobody was ever told and the fresh rotation that follows replaces
    /// (it targets the same user: the current one is unchanged).
    async fn abandon(
        &self,
        role: &StaticRoleConfig,
        st: &mut StaticState,
        p: &Pending,
        actor: &str,
    ) -> Result<()> {
        let why = match self
            .sealer()?
            .open(&st.role, &p.user, p.generation, &p.sealed)
        {
            Ok(_) => "it opened with this broker's key".to_string(),
            Err(e) => match super::seal::key_id_of(&p.sealed) {
                Some(id) => format!("sealed under key id {id}"),
                None => format!("it does not open: {}", e.kind()),
            },
        };
        let mut ev = Event::new(actor, "static_abandon");
        ev.role = Some(role.name.clone());
        ev.database = Some(role.database.clone());
        ev.username = Some(p.user.clone());
        ev.outcome = Some(Outcome::Ok);
        ev.detail = Some(format!(
            "abandoned the pending {} of generation {} ({why}; this broker's key id {}); rotating afresh",
            p.kind.as_str(),
            p.generation,
            self.sealer()?.key_id()
        ));
        self.audit.append(ev)?;
        st.pending = None;
        self.save(st).await
    }

    async fn save(&self, st: &StaticState) -> Result<()> {
        if self.store.static_save(st, &self.owner).await? {
            Ok(())
        } else {
            Err(Error::unavailable(format!(
                "static role {:?}: the claim ran out mid-rotation; another replica finishes it",
                st.role
            )))
        }
    }

    /// Puts a pending rotation into the database (idempotent).
    async fn apply(
        &self,
        role: &StaticRoleConfig,
        backend: &dyn Backend,
        st: &StaticState,
        p: &Pending,
    ) -> Result<()> {
        if p.kind == PendingKind::Revoke {
            for u in &role.users {
                backend.static_retire(u, &role.host, true).await?;
            }
        }
        let password = self
            .sealer()?
            .open(&st.role, &p.user, p.generation, &p.sealed)?;
        backend
            .static_set_password(&StaticLogin {
                role: &role.name,
                user: &p.user,
                host: &role.host,
                password: &password,
                valid_until: p.valid_until,
            })
            .await
    }

    /// The record of a rotation, written (durably) once its intent is in
    /// the store and before the database is changed: every generation the
    /// database ever has — so every committed one — has its record first.
    /// A broker killed after it resumes the rotation and writes another
    /// ("resumed"). An error here is the step's error: nothing changed but
    /// the stored intent, which the next step takes up. `at` is the time
    /// the commit uses, so the record and the committed state agree.
    fn audit_rotation(
        &self,
        role: &StaticRoleConfig,
        st: &StaticState,
        p: &Pending,
        actor: &str,
        detail: &str,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let previous = previous_after(role, st, p, at);
        let mut ev = Event::new(
            actor,
            match p.kind {
                PendingKind::Rotate => "static_rotate",
                PendingKind::Revoke => "static_revoke",
            },
        );
        ev.role = Some(role.name.clone());
        ev.database = Some(role.database.clone());
        ev.username = Some(p.user.clone());
        ev.outcome = Some(Outcome::Ok);
        ev.detail = Some(format!(
            "{detail}; generation={} valid_until={}{}",
            p.generation,
            p.valid_until.to_rfc3339(),
            previous
                .as_ref()
                .map(|pr| format!(" previous={} until={}", pr.user, pr.retire_at.to_rfc3339()))
                .unwrap_or_default()
        ));
        self.audit.append(ev)
    }

    /// Makes an applied (and audited) rotation current.
    async fn commit(
        &self,
        role: &StaticRoleConfig,
        st: &mut StaticState,
        p: Pending,
        at: DateTime<Utc>,
    ) -> Result<()> {
        st.previous = previous_after(role, st, &p, at);
        st.current = Some(CurrentUser {
            user: p.user.clone(),
            sealed: p.sealed.clone(),
            rotated_at: at,
            valid_until: p.valid_until,
        });
        st.generation = p.generation;
        st.next_rotation_at = Some(at + role.period());
        st.pending = None;
        st.last_error = None;
        self.save(st).await?;
        self.metrics.static_rotated(&role.name, p.kind.as_str());
        self.backoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&role.name);
        tracing::info!(static_role = %role.name, user = %p.user, generation = p.generation, "static role rotated");
        Ok(())
    }

    /// The previous user's overlap, at `now`: nothing while it lasts;
    /// once over, a drain (routine handover, `revocation::drain`) when the
    /// role ends sessions and leaves room before the next rotation, else
    /// retired at once as before.
    ///
    /// The drain is held in the stored state, so it survives a broker
    /// crash and needs no task of its own: at the overlap's end logins are
    /// refused and `retire_at` moves to the drain deadline (a `retire_at`
    /// past the overlap's end *is* "draining"); every step until then (the
    /// loop runs one a second while a drain is on, `is_due`) ends the
    /// sessions that went idle; the user is retired in full — its
    /// remaining sessions ended — when none is left, or at the deadline.
    async fn end_overlap(
        &self,
        role: &StaticRoleConfig,
        backend: &dyn Backend,
        st: &mut StaticState,
        prev: &PreviousUser,
        now: DateTime<Utc>,
        actor: &str,
    ) -> Result<()> {
        let overlap_end = overlap_end(role, st);
        let draining = overlap_end.is_some_and(|e| prev.retire_at > e && now >= e);
        if !draining && now < prev.retire_at {
            return Ok(());
        }
        let room = self.config.get().static_drain_deadline(role);
        if !draining && !room.is_zero() {
            // The overlap just ended: refuse logins (password replaced by
            // one nobody knows, NOLOGIN / ACCOUNT LOCK), then drain.
            let deadline = crate::lease::truncate_ms(now)
                + chrono::Duration::from_std(room).unwrap_or_default();
            let deadline = match st.next_rotation_at {
                Some(next) => deadline.min(next),
                None => deadline,
            };
            let detail = format!(
                "overlap over: logins refused, sessions drain until {}",
                deadline.to_rfc3339()
            );
            self.audit_retire(role, &prev.user, actor, &detail)?;
            backend.static_retire(&prev.user, &role.host, false).await?;
            st.previous = Some(PreviousUser {
                user: prev.user.clone(),
                retire_at: deadline,
            });
            self.save(st).await?;
            tracing::info!(static_role = %role.name, user = %prev.user, until = %deadline.to_rfc3339(), "previous user's overlap over; draining its sessions");
        }
        if !room.is_zero() {
            let deadline = st.previous.as_ref().map_or(now, |p| p.retire_at);
            // The drain started at the overlap's end; the same settle rule
            // as a lease's drain (`revocation::drain::settle`).
            let start = overlap_end.unwrap_or(now).min(now);
            let settled = crate::revocation::drain::settle(start, deadline, now);
            let pass = backend
                .end_idle_sessions(&prev.user, &role.host, settled)
                .await;
            let busy = match pass {
                Ok(s) => {
                    self.metrics.drain_sessions_ended(
                        &role.name,
                        &role.database,
                        "idle",
                        s.ended_idle.len() as u64,
                    );
                    self.drained_ids(&role.name, s.ended_idle);
                    Some(s.busy)
                }
                Err(e) => {
                    tracing::warn!(static_role = %role.name, error = %crate::error::chain(&e), "drain pass failed; retrying until the deadline");
                    None
                }
            };
            if busy != Some(0) && now < deadline {
                return Ok(());
            }
            let idle = self.drained_ids(&role.name, Vec::new()).len() as u64;
            let (how, at_deadline) = match busy {
                Some(0) => ("drained", 0),
                Some(n) => ("deadline", u64::from(n)),
                None => ("deadline", 0),
            };
            let detail = format!(
                "drain over ({how}): sessions ended idle={idle} at_deadline={at_deadline}; retired"
            );
            self.retire(role, backend, st, &prev.user, true, actor, &detail)
                .await?;
            self.metrics
                .drain_sessions_ended(&role.name, &role.database, "deadline", at_deadline);
            self.metrics.drain_finished(&role.name, &role.database, how);
            self.drained
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&role.name);
            return Ok(());
        }
        let detail = retired(role.end_sessions);
        self.retire(
            role,
            backend,
            st,
            &prev.user,
            role.end_sessions,
            actor,
            detail,
        )
        .await
    }

    /// Adds `ids` to the sessions this process saw a static role's drain
    /// end (a session being terminated may be listed twice); returns them.
    fn drained_ids(&self, role: &str, ids: Vec<i64>) -> std::collections::HashSet<i64> {
        let mut m = self.drained.lock().unwrap_or_else(|e| e.into_inner());
        let set = m.entry(role.to_string()).or_default();
        set.extend(ids);
        set.clone()
    }

    fn audit_retire(
        &self,
        role: &StaticRoleConfig,
        user: &str,
        actor: &str,
        detail: &str,
    ) -> Result<()> {
        let mut ev = Event::new(actor, "static_retire");
        ev.role = Some(role.name.clone());
        ev.database = Some(role.database.clone());
        ev.username = Some(user.to_string());
        ev.outcome = Some(Outcome::Ok);
        ev.detail = Some(detail.to_string());
        self.audit.append(ev)
    }

    #[allow(clippy::too_many_arguments)]
    async fn retire(
        &self,
        role: &StaticRoleConfig,
        backend: &dyn Backend,
        st: &mut StaticState,
        user: &str,
        end_sessions: bool,
        actor: &str,
        detail: &str,
    ) -> Result<()> {
        // Audited before the database changes, like a rotation: an audit
        // log that cannot be written leaves the user as it was.
        self.audit_retire(role, user, actor, detail)?;
        backend
            .static_retire(user, &role.host, end_sessions)
            .await?;
        st.previous = None;
        self.save(st).await?;
        Ok(())
    }

    /// Wakes the loop (an admin changed something).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs every due step once; returns when something is next due.
    pub async fn tick(&self) -> DateTime<Utc> {
        let config = self.config.get();
        let now = Utc::now();
        let mut next = now + chrono::Duration::from_std(POLL).unwrap_or_default();
        for role in config.static_roles.values() {
            if self
                .backoff
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&role.name)
                .is_some_and(|(_, at)| now < *at)
            {
                continue;
            }
            let st = match self.store.static_get(&role.name).await {
                Ok(st) => st,
                Err(e) => {
                    tracing::warn!(static_role = %role.name, error = %crate::error::chain(&e), "cannot read static role state");
                    continue;
                }
            };
            let st = match st {
                Some(s) if !is_due(role, &s, now) => s,
                _ => match self.step(role, Force::None, SYSTEM).await {
                    Ok(Some(s)) => s,
                    Ok(None) => continue,
                    Err(e) => {
                        let mut b = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
                        let entry = b.entry(role.name.clone()).or_insert((0, now));
                        entry.0 += 1;
                        let secs = (1u64 << entry.0.min(5)).min(30);
                        entry.1 = now + chrono::Duration::seconds(secs as i64);
                        tracing::warn!(static_role = %role.name, error = %crate::error::chain(&e), retry_in_s = secs, "static role rotation failed");
                        continue;
                    }
                },
            };
            for t in [
                st.next_rotation_at,
                st.previous.as_ref().map(|p| p.retire_at),
            ]
            .into_iter()
            .flatten()
            {
                next = next.min(t);
            }
        }
        next
    }

    /// Runs until `shutdown` completes.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        if self.config.get().static_roles.is_empty() {
            return shutdown.await;
        }
        loop {
            let next = self.tick().await;
            let wait = (next - Utc::now()).to_std().unwrap_or_default().min(POLL);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// The previous user once `p` is committed at `at`: the user rotated away
/// from keeps its overlap; an incident (or single-user mode) keeps none.
fn previous_after(
    role: &StaticRoleConfig,
    st: &StaticState,
    p: &Pending,
    at: DateTime<Utc>,
) -> Option<PreviousUser> {
    match p.kind {
        PendingKind::Revoke => None,
        PendingKind::Rotate => {
            st.current
                .as_ref()
                .filter(|c| c.user != p.user)
                .map(|c| PreviousUser {
                    user: c.user.clone(),
                    retire_at: at + role.overlap_delta(),
                })
        }
    }
}

/// The audit detail of a retirement without a drain.
fn retired(end_sessions: bool) -> &'static str {
    if end_sessions {
        "overlap over: logins refused, sessions ended"
    } else {
        "overlap over: logins refused"
    }
}

/// Whether a step has anything to do for `st` at `now`: a drain of the
/// previous user (its overlap over, its `retire_at` moved to the drain
/// deadline) makes every step due, each one pass.
pub fn is_due(role: &StaticRoleConfig, st: &StaticState, now: DateTime<Utc>) -> bool {
    st.pending.is_some()
        || st.current.is_none()
        || st.next_rotation_at.is_none_or(|t| now >= t)
        || st
            .previous
            .as_ref()
            .is_some_and(|p| now >= p.retire_at || overlap_end(role, st).is_some_and(|e| now >= e))
}

/// When the current user's rotation ends the previous user's overlap.
fn overlap_end(role: &StaticRoleConfig, st: &StaticState) -> Option<DateTime<Utc>> {
    st.current
        .as_ref()
        .map(|c| c.rotated_at + role.overlap_delta())
}

/// The user a rotation changes: the one not in use (alternating), or the
/// only one.
pub fn next_user(role: &StaticRoleConfig, st: &StaticState) -> String {
    match (role.users.as_slice(), &st.current) {
        ([only], _) => only.clone(),
        ([a, b], Some(c)) if c.user == *a => b.clone(),
        ([a, _], _) => a.clone(),
        _ => role.users.first().cloned().unwrap_or_default(),
    }
}

fn force_action(force: Force) -> &'static str {
    match force {
        Force::Revoke => "static_revoke",
        Force::Abandon => "static_abandon",
        Force::None | Force::Rotate => "static_rotate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::store::memory::MemoryStore;
    use crate::store::StaticStore;
    use crate::testkit::{admin, app, Kit, APP};

    fn statics(users: &str) -> String {
        format!(
            "[static_roles.orders]\ndatabase = \"main\"\nallowed = [\"{APP}\"]\n\
             rotation_period = \"1h\"\nusers = {users}\n\n"
        )
    }

    fn kit(users: &str) -> Kit {
        let kit = Kit::with_statics(&statics(users));
        for u in ["app_a", "app_b", "app"] {
            kit.server.add_static_user(u);
        }
        kit
    }

    async fn read(kit: &Kit) -> crate::static_roles::StaticCredential {
        kit.broker
            .static_credential(&app(), "orders")
            .await
            .unwrap()
    }

    async fn due_step(kit: &Kit) {
        kit.store.make_static_due("orders");
        kit.broker.static_rotator().tick().await;
    }

    fn logs_in(kit: &Kit, c: &crate::static_roles::StaticCredential) -> bool {
        kit.server
            .static_logs_in(&c.username, c.password.expose(), Utc::now())
    }

    #[tokio::test]
    async fn alternating_users_keep_the_previous_password_for_the_overlap_then_retire_it() {
        let kit = kit("[\"app_a\", \"app_b\"]");
        let first = read(&kit).await;
        assert_eq!((first.username.as_str(), first.generation), ("app_a", 1));
        assert!(logs_in(&kit, &first));
        let hour = chrono::Duration::hours(1);
        assert_eq!(
            first.valid_until,
            first.rotated_at + hour + hour,
            "period + overlap"
        );

        due_step(&kit).await;
        let second = read(&kit).await;
        assert_eq!((second.username.as_str(), second.generation), ("app_b", 2));
        assert!(logs_in(&kit, &second));
        assert!(
            logs_in(&kit, &first),
            "the previous password works for the overlap"
        );
        let st = kit.store.static_get("orders").await.unwrap().unwrap();
        assert_eq!(st.previous.as_ref().unwrap().user, "app_a");

        // The overlap ends (and, overlap = period, the next rotation is due).
        due_step(&kit).await;
        assert!(!logs_in(&kit, &first), "retired: a password nobody knows");
        assert_eq!(kit.server.static_user("app_a").unwrap().sessions_ended, 1);
        let third = read(&kit).await;
        assert_eq!((third.username.as_str(), third.generation), ("app_a", 3));
        assert!(logs_in(&kit, &third) && logs_in(&kit, &second));
        assert_ne!(third.password.expose(), first.password.expose());

        let actions: Vec<String> = kit.audit().into_iter().map(|r| r.action).collect();
        assert_eq!(actions.iter().filter(|a| *a == "static_rotate").count(), 3);
        let metrics = kit.broker.metrics().encode();
        assert!(
            metrics.contains(
                "credbroker_static_rotations_total{static_role=\"orders\",kind=\"rotate\"} 3"
            ),
            "{metrics}"
        );
        assert_eq!(actions.iter().filter(|a| *a == "static_retire").count(), 1);
        assert_eq!(actions.iter().filter(|a| *a == "static_read").count(), 3);
        // No password anywhere in the audit log or the stored state.
        let log = std::fs::read_to_string(kit.audit_path()).unwrap();
        let stored = format!("{:?}", kit.store.static_list().await.unwrap());
        for c in [&first, &second, &third] {
            assert!(!log.contains(c.password.expose()) && !stored.contains(c.password.expose()));
            assert!(!format!("{c:?}").contains(c.password.expose()));
        }
    }

    #[tokio::test]
    async fn a_rotation_cut_off_after_the_database_changed_is_finished_by_the_next_step() {
        let kit = kit("[\"app_a\", \"app_b\"]");
        let first = read(&kit).await;
        // The broker "dies" right after the database took app_b's new
        // password: its claim is lost before the commit.
        let store = kit.store.clone();
        kit.server.after_next_static_set(move || {
            store.steal_static_claim(
                "orders",
                "another-replica",
                Utc::now() + chrono::Duration::seconds(60),
            );
        });
        kit.store.make_static_due("orders");
        let role = kit.broker.config().static_roles["orders"].clone();
        let e = kit
            .broker
            .static_rotator()
            .step(&role, Force::None, SYSTEM)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        let st = kit.store.static_get("orders").await.unwrap().unwrap();
        assert_eq!(
            st.pending.as_ref().unwrap().user,
            "app_b",
            "the intent is stored"
        );
        assert_eq!(st.current.as_ref().unwrap().user, "app_a", "not committed");
        // Readers meanwhile keep the committed credential, which works.
        let during = kit.broker.static_credential(&app(), "orders").await;
        assert!(during.is_ok_and(|c| c.username == "app_a" && logs_in(&kit, &c)));
        // The claim runs out; the next step resumes and commits.
        kit.store.steal_static_claim(
            "orders",
            "another-replica",
            Utc::now() - chrono::Duration::seconds(1),
        );
        kit.broker.static_rotator().tick().await;
        let after = read(&kit).await;
        assert_eq!((after.username.as_str(), after.generation), ("app_b", 2));
        assert!(
            logs_in(&kit, &after),
            "the served password is the database's"
        );
        assert!(logs_in(&kit, &first));
        let resumed = kit
            .audit()
            .into_iter()
            .filter(|r| r.detail.as_deref().is_some_and(|d| d.contains("resumed")))
            .count();
        assert_eq!(resumed, 1);
    }

    #[tokio::test]
    async fn a_database_away_leaves_the_intent_pending_and_the_old_credential_served() {
        let kit = kit("[\"app_a\", \"app_b\"]");
        let first = read(&kit).await;
        kit.server.set_unavailable(true);
        kit.store.make_static_due("orders");
        kit.broker.static_rotator().tick().await;
        let st = kit.store.static_get("orders").await.unwrap().unwrap();
        assert!(st.pending.is_some() && st.last_error.is_some(), "{st:?}");
        let still = read(&kit).await;
        assert_eq!(still.username, "app_a");
        assert_eq!(still.password.expose(), first.password.expose());
        kit.server.set_unavailable(false);
        let role = kit.broker.config().static_roles["orders"].clone();
        kit.broker
            .static_rotator()
            .step(&role, Force::None, SYSTEM)
            .await
            .unwrap();
        let after = read(&kit).await;
        assert_eq!(after.username, "app_b");
        assert!(logs_in(&kit, &after));
        assert_eq!(
            kit.broker
                .metrics()
                .static_failures
                .get_or_create(&crate::metrics::StaticLabels {
                    static_role: "orders".into(),
                    kind: "step".into()
                })
                .get(),
            2,
            "the tick's and the reader's"
        );
    }

    #[tokio::test]
    async fn a_rotation_whose_audit_record_cannot_be_written_is_neither_applied_nor_committed() {
        // Single-user mode: a database change without its commit would
        // leave readers with a password the database no longer has.
        let kit = kit("[\"app\"]");
        let first = read(&kit).await;
        let before = kit.store.static_get("orders").await.unwrap().unwrap();
        kit.broker.audit().fail_writes(true);
        due_step(&kit).await;
        let st = kit.store.static_get("orders").await.unwrap().unwrap();
        assert_eq!(
            (st.generation, &st.current),
            (1, &before.current),
            "committed without its audit record"
        );
        assert_eq!(st.pending.as_ref().map(|p| p.generation), Some(2));
        assert!(
            st.last_error
                .as_deref()
                .is_some_and(|e| e.contains("audit")),
            "{st:?}"
        );
        assert!(
            logs_in(&kit, &first),
            "the database changed: the served password is no longer the database's"
        );
        // The audit log works again: the next step finishes the rotation,
        // audited.
        kit.broker.audit().fail_writes(false);
        let role = kit.broker.config().static_roles["orders"].clone();
        kit.broker
            .static_rotator()
            .step(&role, Force::None, SYSTEM)
            .await
            .unwrap();
        let second = read(&kit).await;
        assert_eq!(second.generation, 2);
        assert!(logs_in(&kit, &second) && !logs_in(&kit, &first));
        assert!(kit.audit().iter().any(|r| r.action == "static_rotate"
            && r.outcome == Outcome::Ok
            && r.detail
                .as_deref()
                .is_some_and(|d| d.contains("generation=2 "))));
    }

    #[tokio::test]
    async fn a_pending_rotation_sealed_under_another_key_is_abandoned_and_rotated_afresh_by_an_admin(
    ) {
        let kit = kit("[\"app_a\", \"app_b\"]");
        let first = read(&kit).await;
        // A replica with another sealing key left an intent behind.
        let other = Sealer::from_bytes(&[9u8; 32]).unwrap();
        let claim = Claim {
            owner: "other-replica".into(),
            until: Utc::now() + chrono::Duration::seconds(60),
        };
        let mut st = kit
            .store
            .static_claim("orders", &claim)
            .await
            .unwrap()
            .unwrap();
        st.pending = Some(Pending {
            kind: PendingKind::Rotate,
            user: "app_b".into(),
            sealed: other
                .seal("orders", "app_b", 2, &Password::generate())
                .unwrap(),
            generation: 2,
            valid_until: Utc::now() + chrono::Duration::hours(2),
        });
        assert!(kit.store.static_save(&st, "other-replica").await.unwrap());
        kit.store
            .static_release("orders", "other-replica")
            .await
            .unwrap();
        // No step can finish it: each fails naming the key mismatch, while
        // readers keep the committed credential.
        let role = kit.broker.config().static_roles["orders"].clone();
        for _ in 0..2 {
            let e = kit
                .broker
                .static_rotator()
                .step(&role, Force::None, SYSTEM)
                .await
                .unwrap_err();
            assert!(
                matches!(&e, Error::FailedPrecondition(m) if m.contains(other.key_id())),
                "{e}"
            );
        }
        let still = read(&kit).await;
        assert_eq!(still.generation, 1);
        assert!(logs_in(&kit, &first));
        // Only an admin may abandon it.
        let e = kit
            .broker
            .recover_static(&app(), "orders")
            .await
            .unwrap_err();
        assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
        let status = kit.broker.recover_static(&admin(), "orders").await.unwrap();
        assert_eq!(
            (
                status.current_user.as_deref(),
                status.generation,
                status.pending
            ),
            (Some("app_b"), 2, false)
        );
        let after = read(&kit).await;
        assert!(
            logs_in(&kit, &after) && logs_in(&kit, &first),
            "overlap kept"
        );
        let audit = kit.audit();
        let abandoned = audit
            .iter()
            .find(|r| r.action == "static_abandon" && r.outcome == Outcome::Ok)
            .expect("the abandon is audited");
        assert_eq!(abandoned.identity, crate::testkit::ADMIN);
        assert!(abandoned
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("generation 2") && d.contains(other.key_id())));
        assert!(audit.iter().any(|r| r.action == "static_abandon"
            && r.outcome == Outcome::Denied
            && r.identity == crate::testkit::APP));
    }

    #[tokio::test]
    async fn single_user_mode_replaces_the_one_password_at_every_rotation() {
        let kit = kit("[\"app\"]");
        let first = read(&kit).await;
        due_step(&kit).await;
        let second = read(&kit).await;
        assert_eq!((second.username.as_str(), second.generation), ("app", 2));
        assert!(logs_in(&kit, &second));
        assert!(
            !logs_in(&kit, &first),
            "Vault's mode: the old password is gone at once"
        );
        assert_eq!(kit.server.static_user("app").unwrap().sessions_ended, 0);
    }

    #[tokio::test]
    async fn only_allowed_identities_read_and_only_admins_rotate_or_revoke() {
        let kit = kit("[\"app_a\", \"app_b\"]");
        let other = Identity::from_trusted("spiffe://credbroker.dev/ns/demo/other");
        let e = kit
            .broker
            .static_credential(&other, "orders")
            .await
            .unwrap_err();
        assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
        let e = kit
            .broker
            .static_credential(&app(), "nope")
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        let e = kit
            .broker
            .rotate_static(&app(), "orders")
            .await
            .unwrap_err();
        assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
        let denied = kit
            .audit()
            .into_iter()
            .filter(|r| r.outcome == Outcome::Denied)
            .count();
        assert_eq!(denied, 2);
        assert!(
            kit.server.static_user("app_a").unwrap().password.is_none(),
            "nothing rotated"
        );
    }

    #[tokio::test]
    async fn admin_revoke_retires_both_users_and_serves_a_new_credential() {
        let kit = kit("[\"app_a\", \"app_b\"]");
        let first = read(&kit).await;
        let status = kit.broker.rotate_static(&admin(), "orders").await.unwrap();
        assert_eq!(status.current_user.as_deref(), Some("app_b"));
        let second = read(&kit).await;
        let status = kit.broker.revoke_static(&admin(), "orders").await.unwrap();
        assert_eq!(status.previous_user, None);
        let third = read(&kit).await;
        assert_eq!(third.username, "app_a");
        assert!(logs_in(&kit, &third));
        assert!(!logs_in(&kit, &first) && !logs_in(&kit, &second));
        assert!(kit.server.static_user("app_b").unwrap().sessions_ended >= 1);
        let listed = kit.broker.admin_static_roles(&admin()).await.unwrap();
        assert_eq!(listed[0].generation, 3);
        assert!(kit
            .audit()
            .iter()
            .any(|r| r.action == "static_revoke" && r.identity == crate::testkit::ADMIN));
    }

    #[tokio::test]
    async fn two_replicas_rotate_once_per_period() {
        let store = Arc::new(MemoryStore::new());
        let server = crate::backend::fake::FakeServer::new();
        let a = Kit::with_statics_on(
            &statics("[\"app_a\", \"app_b\"]"),
            store.clone(),
            server.clone(),
        );
        let b = Kit::with_statics_on(
            &statics("[\"app_a\", \"app_b\"]"),
            store.clone(),
            server.clone(),
        );
        server.add_static_user("app_a");
        server.add_static_user("app_b");
        let who = app();
        let (x, y) = tokio::join!(
            a.broker.static_credential(&who, "orders"),
            b.broker.static_credential(&who, "orders")
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(
            (x.generation, x.password.expose()),
            (y.generation, y.password.expose())
        );
        store.make_static_due("orders");
        tokio::join!(
            a.broker.static_rotator().tick(),
            b.broker.static_rotator().tick()
        );
        a.broker.static_rotator().tick().await;
        b.broker.static_rotator().tick().await;
        let sets = server
            .calls()
            .iter()
            .filter(|c| c.starts_with("static_set"))
            .count();
        assert_eq!(sets, 2, "{:?}", server.calls());
        assert_eq!(
            store
                .static_get("orders")
                .await
                .unwrap()
                .unwrap()
                .generation,
            2
        );
    }
}
