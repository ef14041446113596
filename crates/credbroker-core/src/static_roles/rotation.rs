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

use crate::audit::{Event, Outcome};
use crate::backend::{Backend, StaticLogin, StaticUsers};
use crate::error::{Error, Result};
use crate::lease::Password;
use crate::revocation::Parts;
use crate::store::{Claim, DEFAULT_CLAIM};

use super::{
    CurrentUser, Pending, PendingKind, PreviousUser, Sealer, StaticRoleConfig, StaticState,
};

mod overlap;
#[cfg(test)]
mod tests;

pub use overlap::is_due;
use overlap::retired;

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
    parts: Parts,
    sealer: Option<Arc<Sealer>>,
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
    pub fn new(parts: Parts, sealer: Option<Arc<Sealer>>) -> Self {
        Rotator {
            parts,
            sealer,
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
        self.parts.backends.get(database).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "database {database:?} is not configured on this broker"
            ))
        })
    }

    fn claim(&self) -> Claim {
        let timeout = chrono::Duration::from_std(self.parts.config.get().store.claim_timeout)
            .unwrap_or_else(|_| chrono::Duration::from_std(DEFAULT_CLAIM).unwrap_or_default());
        Claim {
            owner: self.parts.owner.clone(),
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
            let st = self.parts.store.static_get(&role.name).await?;
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
        let Some(mut st) = self
            .parts
            .store
            .static_claim(&role.name, &self.claim())
            .await?
        else {
            return Ok(None);
        };
        let result = self.step_claimed(role, &mut st, force, actor).await;
        if let Err(e) = &result {
            self.parts.metrics.static_failed(&role.name);
            st.last_error = Some(e.to_string());
            let _ = self.parts.store.static_save(&st, &self.parts.owner).await;
            let mut ev = event(actor, force_action(force), role, None, e.to_string());
            ev.outcome = Some(Outcome::Error);
            let _ = self.parts.audit.append_relaxed(ev);
        }
        let _ = self
            .parts
            .store
            .static_release(&role.name, &self.parts.owner)
            .await;
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
        let detail = format!(
            "abandoned the pending {} of generation {} ({why}; this broker's key id {}); rotating afresh",
            p.kind.as_str(),
            p.generation,
            self.sealer()?.key_id()
        );
        let ev = event(actor, "static_abandon", role, Some(&p.user), detail);
        self.parts.audit.append(ev)?;
        st.pending = None;
        self.save(st).await
    }

    async fn save(&self, st: &StaticState) -> Result<()> {
        if self.parts.store.static_save(st, &self.parts.owner).await? {
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
        let action = match p.kind {
            PendingKind::Rotate => "static_rotate",
            PendingKind::Revoke => "static_revoke",
        };
        let detail = format!(
            "{detail}; generation={} valid_until={}{}",
            p.generation,
            p.valid_until.to_rfc3339(),
            previous
                .as_ref()
                .map(|pr| format!(" previous={} until={}", pr.user, pr.retire_at.to_rfc3339()))
                .unwrap_or_default()
        );
        self.parts
            .audit
            .append(event(actor, action, role, Some(&p.user), detail))
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
        self.parts
            .metrics
            .static_rotated(&role.name, p.kind.as_str());
        self.backoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&role.name);
        tracing::info!(static_role = %role.name, user = %p.user, generation = p.generation, "static role rotated");
        Ok(())
    }

    /// Wakes the loop (an admin changed something).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs every due step once; returns when something is next due.
    pub async fn tick(&self) -> DateTime<Utc> {
        let config = self.parts.config.get();
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
            let st = match self.parts.store.static_get(&role.name).await {
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
        if self.parts.config.get().static_roles.is_empty() {
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

/// A successful step's audit record for `role`: what `actor` did
/// (`action`), to which user, and `detail`.
fn event(
    actor: &str,
    action: &'static str,
    role: &StaticRoleConfig,
    user: Option<&str>,
    detail: String,
) -> Event {
    let mut ev = Event::new(actor, action);
    ev.role = Some(role.name.clone());
    ev.database = Some(role.database.clone());
    ev.username = user.map(str::to_string);
    ev.outcome = Some(Outcome::Ok);
    ev.detail = Some(detail);
    ev
}

fn force_action(force: Force) -> &'static str {
    match force {
        Force::Revoke => "static_revoke",
        Force::Abandon => "static_abandon",
        Force::None | Force::Rotate => "static_rotate",
    }
}
