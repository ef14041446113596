//! The end of a previous user's overlap: a drain of its sessions (the
//! routine handover of `revocation::drain`) or retirement at once, and
//! when a step is due for it. Apart from the rotation itself
//! (`rotation.rs`): this is what happens to the user rotated *away* from.

use chrono::{DateTime, Utc};

use crate::backend::Backend;
use crate::error::Result;

use super::super::{PreviousUser, StaticRoleConfig, StaticState};
use super::Rotator;

impl Rotator {
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
    pub(super) async fn end_overlap(
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
        let room = self.parts.config.get().static_drain_deadline(role);
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
                    self.parts.metrics.drain_sessions_ended(
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
            self.parts.metrics.drain_sessions_ended(
                &role.name,
                &role.database,
                "deadline",
                at_deadline,
            );
            self.parts
                .metrics
                .drain_finished(&role.name, &role.database, how);
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
        let ev = super::event(actor, "static_retire", role, Some(user), detail.to_string());
        self.parts.audit.append(ev)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn retire(
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
}

/// The audit detail of a retirement without a drain.
pub(super) fn retired(end_sessions: bool) -> &'static str {
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
