//! A routine handover's drain: how a replaced credential ends without
//! failing the application that pooled its connections.
//!
//! When a lease ends because it was replaced (the sidecar's revoke of the
//! lease it handed over, `RevokeLeaseRequest.handover`), cutting every
//! session at once kills connections a pool holds, idle or in a query,
//! under the application (`AdminShutdown`). A drain instead:
//! 1. durably marks the lease `draining`, due at the drain deadline
//!    (`LeaseStore::start_drain`, before the database is touched), so the
//!    reaper revokes it in full then even if this task dies with its
//!    broker;
//! 2. refuses new logins and moves the database's own end of the
//!    credential to the deadline (`Backend::drain_begin`);
//! 3. every [`POLL`], ends the sessions that are idle — a pool's pre-ping
//!    or validation then opens a new connection with the new credential —
//!    and leaves a session in a query or an open transaction to finish
//!    (`Backend::end_idle_sessions`);
//! 4. revokes the lease in full (`Reason::Handover`) as soon as no session
//!    is left, or at the deadline, ending whatever is left as any
//!    revocation does.
//!
//! An admin revoke, a lock, expiry and the orphan sweep never drain; they
//! may cut a drain short (the claim settles who revokes). Each drain is
//! counted (`credbroker_drains_total`, `credbroker_drain_sessions_ended_total`)
//! and audited (`drain`), so an operator sees a pool that never lets go.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Mode, Revoker};
use crate::audit::{Event, Outcome};
use crate::backend::{Backend, UserRef};
use crate::clock::Clock;
use crate::lease::{Lease, LeaseState, Reason};
use crate::store::Claim;

/// How often a drain looks for sessions that went idle: a pooled
/// connection returned to its pool is ended within this.
pub const POLL: Duration = Duration::from_millis(250);

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The last session went before the deadline.
    Drained,
    /// Sessions were still busy at the deadline; they are ended with the
    /// credential.
    Deadline,
    /// Revoked at once meanwhile (an admin revoke, a lock), or taken over
    /// by another revoker.
    Cut,
}

impl Ended {
    pub fn label(self) -> &'static str {
        match self {
            Ended::Drained => "drained",
            Ended::Deadline => "deadline",
            Ended::Cut => "cut",
        }
    }
}

/// What the passes of one drain saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub ended: Ended,
    /// Sessions ended once idle.
    pub ended_idle: u64,
    /// Sessions still busy when the drain stopped waiting (the deadline).
    pub left_busy: u32,
}

/// Drains one database user's sessions: a pass every [`POLL`] until none
/// is left or `deadline` passes. (A static role's drain runs one pass per
/// rotation step instead, its state in the store: `static_roles`.) A pass
/// that fails (the database away) is logged and retried; the deadline
/// holds regardless.
pub async fn pass_until(
    backend: &dyn Backend,
    user: &str,
    host: &str,
    deadline: DateTime<Utc>,
    clock: &Clock,
) -> Tally {
    let mut ended: HashSet<i64> = HashSet::new();
    let mut busy = 0;
    loop {
        match backend.end_idle_sessions(user, host).await {
            Ok(s) => {
                ended.extend(s.ended_idle);
                busy = s.busy;
                if busy == 0 {
                    return Tally {
                        ended: Ended::Drained,
                        ended_idle: ended.len() as u64,
                        left_busy: 0,
                    };
                }
            }
            Err(e) => tracing::warn!(
                database = backend.name(),
                user,
                error = %crate::error::chain(&e),
                "drain pass failed; retrying until the deadline"
            ),
        }
        let left = clock.until(deadline);
        if left.is_zero() {
            return Tally {
                ended: Ended::Deadline,
                ended_idle: ended.len() as u64,
                left_busy: busy,
            };
        }
        tokio::time::sleep(left.min(POLL)).await;
    }
}

impl Revoker {
    fn drain_claim(&self) -> Claim {
        let timeout = chrono::Duration::from_std(self.config().store.claim_timeout)
            .unwrap_or_else(|_| chrono::Duration::seconds(60));
        Claim {
            owner: self.owner().to_string(),
            until: self.clock.now() + timeout,
        }
    }

    /// Drains a lease the store already holds as `draining` (due at its
    /// drain deadline) and whose logins the database refuses, in a task of
    /// its own; then revokes it (`Reason::Handover`, audited as
    /// `handover_revoke` like any revocation) and writes the drain's own
    /// audit record (`drain`: sessions ended idle and at the deadline).
    pub fn drain(self: &Arc<Self>, lease: Lease, actor: &str) {
        let this = self.clone();
        let actor = actor.to_string();
        let via = crate::audit::current_via();
        tokio::spawn(async move { this.drain_lease(lease, &actor, via).await });
    }

    async fn drain_lease(&self, lease: Lease, actor: &str, via: Option<&'static str>) -> Tally {
        let Some(backend) = self.backends().get(&lease.database).cloned() else {
            // No backend: the reaper's revocation at the deadline reports it.
            return Tally {
                ended: Ended::Cut,
                ended_idle: 0,
                left_busy: 0,
            };
        };
        let deadline = lease.due_at;
        let mut tally = pass_until(
            backend.as_ref(),
            lease.username.as_str(),
            &lease.user_host,
            deadline,
            &self.clock,
        )
        .await;
        // The claim settles it with the reaper (due at the same deadline)
        // and with an admin's revoke: whoever claims revokes.
        match self.store().claim_one(&lease.id, &self.drain_claim()).await {
            Ok(Some(claimed)) if claimed.state == LeaseState::Draining => {
                self.revoke_claimed(vec![claimed], actor, Reason::Handover, Mode::UntilDropped)
                    .await;
            }
            Ok(Some(other)) => {
                // Not ours to end as a handover (failing meanwhile): let go.
                let _ = self.store().release(&other.id).await;
                if tally.ended == Ended::Drained {
                    tally.ended = Ended::Cut;
                }
            }
            Ok(None) => {
                if tally.ended == Ended::Drained {
                    tally.ended = Ended::Cut;
                }
            }
            Err(e) => tracing::warn!(
                lease_id = %lease.id,
                error = %crate::error::chain(&e),
                "cannot claim the drained lease; the reaper revokes it at its deadline"
            ),
        }
        self.record_drain(&lease, actor, via, &tally);
        tally
    }

    fn record_drain(&self, lease: &Lease, actor: &str, via: Option<&'static str>, t: &Tally) {
        let at_deadline = if t.ended == Ended::Deadline {
            u64::from(t.left_busy)
        } else {
            0
        };
        self.metrics()
            .drain_sessions_ended(&lease.role, &lease.database, "idle", t.ended_idle);
        self.metrics()
            .drain_sessions_ended(&lease.role, &lease.database, "deadline", at_deadline);
        self.metrics()
            .drain_finished(&lease.role, &lease.database, t.ended.label());
        let mut e = Event::new(actor, "drain");
        e.role = Some(lease.role.clone());
        e.database = Some(lease.database.clone());
        e.lease_id = Some(lease.id.to_string());
        e.username = Some(lease.username.to_string());
        e.outcome = Some(Outcome::Ok);
        e.detail = Some(format!(
            "{}: sessions ended idle={} at_deadline={at_deadline}",
            t.ended.label(),
            t.ended_idle
        ));
        if let Err(err) = crate::audit::in_via(via, || self.audit().append(e)) {
            tracing::error!(error = %crate::error::chain(&err), "audit write failed");
        }
        tracing::info!(
            lease_id = %lease.id,
            ended = t.ended.label(),
            ended_idle = t.ended_idle,
            at_deadline,
            "handover drain finished"
        );
    }

    /// Resumes the drains a previous run of this broker left (state
    /// `draining`): logins refused again (idempotent; the broker may have
    /// died between the store and the database) and the passes resumed to
    /// the same deadline. Without this the reaper still revokes each at its
    /// deadline; with it, idle sessions do not wait that long.
    pub async fn resume_drains(self: &Arc<Self>) -> crate::error::Result<usize> {
        let filter = crate::store::LeaseFilter {
            states: vec![LeaseState::Draining],
            limit: Some(10_000),
            ..Default::default()
        };
        let leases = self.store().list(&filter).await?;
        let n = leases.len();
        for lease in leases {
            let Some(backend) = self.backends().get(&lease.database).cloned() else {
                continue;
            };
            let user = UserRef {
                username: lease.username.clone(),
                host: lease.user_host.clone(),
            };
            if let Err(e) = backend.drain_begin(&user, lease.due_at).await {
                tracing::warn!(lease_id = %lease.id, error = %crate::error::chain(&e),
                    "cannot resume a drain; the reaper revokes the lease at its deadline");
                continue;
            }
            self.drain(lease, crate::revocation::REAPER_IDENTITY);
        }
        Ok(n)
    }
}

/// The drain's state machine on paused time, against the fake backend's
/// sessions and the memory store: idle sessions ended at the next pass,
/// busy ones left until they go idle or the deadline, then the lease
/// revoked; the reaper finishing a drain whose task died; who may drain.
/// The proof against real databases is `tests/it/drain.rs`.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::lease::{LeaseId, LeaseState};
    use crate::store::LeaseStore;
    use crate::testkit::{admin, app, role, Kit};

    fn draining_role(deadline: &str) -> String {
        format!("{}drain_deadline = \"{deadline}\"\n\n", role("ro", "main"))
    }

    async fn state(kit: &Kit, id: &LeaseId) -> LeaseState {
        kit.store.get(id).await.unwrap().unwrap().state
    }

    fn audit_detail(kit: &Kit, id: &LeaseId, action: &str) -> Option<String> {
        kit.audit()
            .into_iter()
            .find(|r| r.action == action && r.lease_id.as_deref() == Some(id.as_str()))
            .map(|r| r.detail.unwrap_or_default())
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_end_at_the_next_pass_busy_ones_when_idle_then_the_lease_goes() {
        let kit = Kit::paused("", &draining_role("10s"));
        let l = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
        let name = l.username.as_str();
        let idle = kit.server.open_session(name, false);
        let busy = kit.server.open_session(name, true);
        let t0 = kit.broker.clock().now();
        let d = kit.broker.revoke_handover(&app(), &l.id).await.unwrap();
        assert_eq!(d.state, LeaseState::Draining);
        assert_eq!(
            d.due_at,
            crate::lease::truncate_ms(t0 + chrono::Duration::seconds(10))
        );
        assert_eq!(d.expires_at, d.due_at, "the store's expiry is the deadline");
        let u = kit.server.user(name).expect("not dropped");
        assert!(!u.login, "logins refused at once");
        assert_eq!(u.valid_until, d.due_at, "the database's own end moves too");

        tokio::time::sleep(super::POLL + Duration::from_millis(1)).await;
        assert_eq!(
            kit.server.session_ids(name),
            [busy],
            "the idle one is ended"
        );
        // Replaced by immediate termination, the busy session would be gone.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(kit.server.session_ids(name), [busy], "the busy one is left");
        assert!(kit.server.user(name).is_some());
        assert_eq!(state(&kit, &l.id).await, LeaseState::Draining);

        kit.server.set_session_busy(busy, false);
        tokio::time::sleep(super::POLL + Duration::from_millis(1)).await;
        assert!(
            kit.server.user(name).is_none(),
            "dropped at the last session"
        );
        assert_eq!(state(&kit, &l.id).await, LeaseState::Revoked);
        assert!(kit.broker.clock().now() < d.due_at, "before the deadline");
        assert_eq!(
            audit_detail(&kit, &l.id, "drain").as_deref(),
            Some("drained: sessions ended idle=2 at_deadline=0")
        );
        assert!(audit_detail(&kit, &l.id, "handover_revoke").is_some());
        let m = kit.broker.metrics().encode();
        assert!(
            m.contains("credbroker_drains_total{role=\"ro\",database=\"main\",how=\"drained\"} 1"),
            "{m}"
        );
        assert!(m.contains(
            "credbroker_drain_sessions_ended_total{role=\"ro\",database=\"main\",how=\"idle\"} 2"
        ));
        let _ = idle;
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_busy_at_the_deadline_is_ended_then_and_not_before() {
        let kit = Kit::paused("", &draining_role("5s"));
        let l = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
        let name = l.username.as_str();
        kit.server.open_session(name, true);
        let d = kit.broker.revoke_handover(&app(), &l.id).await.unwrap();
        tokio::time::sleep(kit.broker.clock().until(d.due_at) - Duration::from_millis(1)).await;
        assert!(kit.server.user(name).is_some(), "not before the deadline");
        assert_eq!(kit.server.session_ids(name).len(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(kit.server.user(name).is_none(), "dropped at the deadline");
        assert!(kit.server.session_ids(name).is_empty());
        assert_eq!(state(&kit, &l.id).await, LeaseState::Revoked);
        assert_eq!(
            audit_detail(&kit, &l.id, "drain").as_deref(),
            Some("deadline: sessions ended idle=0 at_deadline=1")
        );
    }

    /// The broker died after the store marked the lease draining, before
    /// the database heard of it: the restarted reaper resumes the drain
    /// (logins refused, the idle session ended at once) and revokes the
    /// lease in full at the deadline, the busy session with it.
    #[tokio::test(start_paused = true)]
    async fn a_restart_resumes_a_drain_whose_task_died_and_ends_it_at_its_deadline() {
        let kit = Kit::paused("", &draining_role("5s"));
        let l = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
        let name = l.username.as_str();
        let idle = kit.server.open_session(name, false);
        let busy = kit.server.open_session(name, true);
        let until = kit.broker.clock().now() + chrono::Duration::seconds(5);
        let d = kit
            .store
            .start_drain(&l.id, crate::testkit::APP, until)
            .await
            .unwrap()
            .expect("active and the holder's");
        assert_eq!(d.state, LeaseState::Draining);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        assert!(kit.server.user(name).unwrap().login, "the crash came first");
        tokio::spawn(crate::reaper::run(kit.broker.clone(), async {
            let _ = rx.await;
        }));
        tokio::time::sleep(super::POLL).await;
        assert!(
            !kit.server.user(name).unwrap().login,
            "logins refused again"
        );
        assert_eq!(kit.server.session_ids(name), [busy], "idle {idle} ended");
        tokio::time::sleep(kit.broker.clock().until(until) - Duration::from_millis(1)).await;
        assert!(
            kit.server.user(name).is_some(),
            "due at the deadline, not before"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(kit.server.user(name).is_none());
        assert_eq!(state(&kit, &l.id).await, LeaseState::Revoked);
        let rec = kit
            .audit()
            .into_iter()
            .find(|r| r.action == "handover_revoke")
            .expect("revoked as a handover's end");
        assert_eq!(rec.identity, crate::revocation::REAPER_IDENTITY);
        let _ = tx.send(());
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_holder_drains_and_no_room_means_revoked_at_once() {
        let kit = Kit::paused(
            "",
            &format!(
                "{}{}drain_deadline = \"0s\"\n\n",
                draining_role("1m"),
                role("cut", "main")
            ),
        );
        let l = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
        let e = kit
            .broker
            .revoke_handover(&admin(), &l.id)
            .await
            .unwrap_err();
        assert!(
            matches!(e, crate::error::Error::PermissionDenied(_)),
            "{e:?}"
        );
        assert_eq!(state(&kit, &l.id).await, LeaseState::Active);

        let c = kit.broker.issue(&app(), "cut", None).await.unwrap().lease;
        kit.server.open_session(c.username.as_str(), true);
        let r = kit.broker.revoke_handover(&app(), &c.id).await.unwrap();
        assert_eq!(r.state, LeaseState::Revoked, "drain_deadline 0s: cut");
        assert!(kit.server.session_ids(c.username.as_str()).is_empty());

        // A holder's plain revoke of a draining lease cuts it.
        kit.server.open_session(l.username.as_str(), true);
        kit.broker.revoke_handover(&app(), &l.id).await.unwrap();
        kit.broker.revoke(&app(), &l.id).await.unwrap();
        assert!(kit.server.user(l.username.as_str()).is_none());
        assert_eq!(state(&kit, &l.id).await, LeaseState::Revoked);
    }

    #[test]
    fn a_drain_deadline_longer_than_max_ttl_is_clamped_and_said() {
        let kit = Kit::new("", &draining_role("1h"));
        let config = kit.broker.config();
        assert_eq!(config.drain_deadline("ro"), Duration::from_secs(600));
        let w = config.drain_clamps();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("roles.ro.drain_deadline (1h)") && w[0].contains("at most 10m"));
    }
}
