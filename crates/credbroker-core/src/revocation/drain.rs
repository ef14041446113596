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
//!    (`Backend::end_idle_sessions`). "Idle" is idle for [`SETTLE`] at
//!    first and merely idle in the drain's final third ([`settle`] says
//!    why);
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

/// How long a session must have been idle before a pass ends it, until
/// the drain's final third ([`settle`]). A pool hands a connection out and
/// sends its query within milliseconds, and the server shows the session
/// idle until it has read that query: a session ended the instant it is
/// idle races the pool's next query, which then fails (node-postgres,
/// which does not check a connection at checkout, lost 2–4 queries in 2 of
/// 3 runs; SQLAlchemy's pre-ping passes and the query after it dies). A
/// session idle for a whole second is one the pool is not using.
pub const SETTLE: Duration = Duration::from_secs(1);

/// The idle time a pass at `now` asks of a session, in a drain from
/// `start` to `deadline`: [`SETTLE`] for its first two thirds, then none —
/// every idle session is ended at each pass, as soon as it is seen.
///
/// The drain has two jobs. First, let a pool retire the old credential's
/// connections itself (its maximum lifetime, its idle eviction) and end
/// only what it has stopped using: that can fail nothing. Then end, between
/// two of its queries, a connection a pool keeps busy and would never let
/// go, rather than cut it at the deadline mid-query: a pool that validates
/// at checkout (pre-ping, HikariCP's `isValid` with `aliveBypassWindowMs =
/// 0`) replaces it at its next checkout. That brings the race back, but
/// only for connections the pool would otherwise lose at the deadline.
///
/// A third, rather than a fixed last few seconds, because both jobs scale
/// with the deadline the operator chose: the final third of the default
/// 30 s is 40 passes to catch every busy connection between two queries,
/// and a pool whose maximum lifetime is below the handover's grace plus
/// two thirds of the drain never sees an instant kill; a fixed window
/// would be most of a short drain (the sidecar's ~4 s ones in the pool
/// tests) or a handful of passes in a long one. The start is not stored: a
/// drain resumed after a crash counts from its resumption, so its final
/// third is a third of what was left — shorter, and the stored deadline
/// holds regardless.
pub fn settle(start: DateTime<Utc>, deadline: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    if (deadline - now) * 3 <= deadline - start {
        Duration::ZERO
    } else {
        SETTLE
    }
}

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

/// Drains one database user's sessions, from `start`: a pass every
/// [`POLL`] (asking the idle time [`settle`] says) until none is left or
/// `deadline` passes. (A static role's drain runs one pass per rotation
/// step instead, its state in the store: `static_roles`.) A pass that
/// fails (the database away) is logged and retried; the deadline holds
/// regardless.
pub async fn pass_until(
    backend: &dyn Backend,
    user: &str,
    host: &str,
    start: DateTime<Utc>,
    deadline: DateTime<Utc>,
    clock: &Clock,
) -> Tally {
    let mut ended: HashSet<i64> = HashSet::new();
    let mut busy = 0;
    loop {
        let settled = settle(start, deadline, clock.now());
        match backend.end_idle_sessions(user, host, settled).await {
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
            self.clock.now(),
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
            kit.server.session_ids(name).len(),
            2,
            "idle for less than SETTLE: not yet"
        );
        tokio::time::sleep(super::SETTLE).await;
        assert_eq!(
            kit.server.session_ids(name),
            [busy],
            "the idle one is ended once settled"
        );
        // Replaced by immediate termination, the busy session would be gone.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(kit.server.session_ids(name), [busy], "the busy one is left");
        assert!(kit.server.user(name).is_some());
        assert_eq!(state(&kit, &l.id).await, LeaseState::Draining);

        kit.server.set_session_busy(busy, false);
        tokio::time::sleep(super::POLL + Duration::from_millis(1)).await;
        assert_eq!(kit.server.session_ids(name), [busy], "just idle: not yet");
        tokio::time::sleep(super::SETTLE).await;
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

    #[test]
    fn the_final_third_of_a_drain_ends_any_idle_session_before_it_only_settled_ones() {
        let start = chrono::DateTime::from_timestamp(1_000_000, 0).unwrap();
        let at = |ms: i64| start + chrono::Duration::milliseconds(ms);
        let deadline = at(30_000);
        assert_eq!(super::settle(start, deadline, start), super::SETTLE);
        assert_eq!(super::settle(start, deadline, at(19_999)), super::SETTLE);
        assert_eq!(super::settle(start, deadline, at(20_000)), Duration::ZERO);
        assert_eq!(super::settle(start, deadline, deadline), Duration::ZERO);
        assert_eq!(super::settle(start, deadline, at(31_000)), Duration::ZERO);
        // No room at all: nothing to wait for.
        assert_eq!(super::settle(start, start, start), Duration::ZERO);
    }

    /// A pooled connection in constant use: busy 20 ms every 100 ms, so
    /// idle most of the time but never for SETTLE. It is left alone for
    /// the drain's first two thirds (ending it there would race the pool's
    /// next query), then ended between two queries in the final third —
    /// not cut at the deadline. Replaced by instant idle kills, it would be
    /// gone at the first pass; by settled kills alone, cut at the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_connection_a_pool_keeps_busy_is_ended_between_queries_in_the_final_third() {
        let kit = Kit::paused("", &draining_role("6s"));
        let l = kit.broker.issue(&app(), "ro", None).await.unwrap().lease;
        let name = l.username.to_string();
        let conn = kit.server.open_session(&name, true);
        let server = kit.server.clone();
        let pool = tokio::spawn(async move {
            loop {
                server.set_session_busy(conn, true);
                tokio::time::sleep(Duration::from_millis(20)).await;
                server.set_session_busy(conn, false);
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
        });
        let d = kit.broker.revoke_handover(&app(), &l.id).await.unwrap();
        let final_third = d.due_at - chrono::Duration::seconds(2);
        tokio::time::sleep(kit.broker.clock().until(final_third) - Duration::from_millis(50)).await;
        assert_eq!(
            kit.server.session_ids(&name),
            [conn],
            "left alone for two thirds"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(kit.server.session_ids(&name).is_empty(), "ended when idle");
        assert!(kit.server.user(&name).is_none(), "then dropped");
        assert!(kit.broker.clock().now() < d.due_at, "before the deadline");
        assert_eq!(
            audit_detail(&kit, &l.id, "drain").as_deref(),
            Some("drained: sessions ended idle=1 at_deadline=0")
        );
        pool.abort();
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
    /// (logins refused, the idle session ended) and revokes the
    /// lease in full at the deadline, the busy session with it. (The idle
    /// session is ended once settled: the resumed drain's final third is a
    /// third of what was left.)
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
        tokio::time::sleep(super::SETTLE).await;
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
