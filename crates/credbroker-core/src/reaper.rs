//! The reaper: sleeps until the next lease is due (woken early when a new
//! one may be due sooner), revokes what is due in batches, and sweeps the
//! databases for broker-named users that no live lease accounts for.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::UserRef;
use crate::broker::{Broker, Mode};
use crate::error::Result;
use crate::lease::{LeaseState, Reason};
use crate::revocation::backoff;

pub use crate::revocation::REAPER_IDENTITY;

/// Longest sleep even when nothing is due: bounds the damage of a missed
/// wake-up (another replica's lease, a clock step).
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Runs until `shutdown` completes.
pub async fn run(broker: Arc<Broker>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let wake = broker.reaper_wake();
    if let Err(e) = broker
        .store()
        .recover_after_start(broker.clock().now())
        .await
    {
        tracing::error!(error = %crate::error::chain(&e), "start-up recovery of pending intents failed; will retry as they fall due");
    }
    // Drains a previous run left: resumed, so idle sessions need not wait
    // for the deadline, at which the reaper revokes them regardless.
    match broker.resume_drains().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(drains = n, "resumed handover drains left by a previous run"),
        Err(e) => {
            tracing::warn!(error = %crate::error::chain(&e), "cannot resume handover drains; the reaper revokes them at their deadlines")
        }
    }
    let mut sweeper = OrphanSweeper::default();
    let mut next_sweep = Instant::now()
        + broker
            .config()
            .reaper
            .orphan_sweep_interval
            .min(Duration::from_secs(10));
    let mut store_failures = 0u32;
    loop {
        wake.awake();
        let sleep_for = match pass(&broker).await {
            Ok(next) => {
                store_failures = 0;
                next
            }
            Err(e) => {
                store_failures += 1;
                let d = backoff(store_failures, Duration::from_secs(30));
                tracing::warn!(error = %crate::error::chain(&e), retry_in = ?d, "reaper pass failed");
                d
            }
        };
        if Instant::now() >= next_sweep {
            sweeper.sweep(&broker).await;
            next_sweep = Instant::now() + broker.config().reaper.orphan_sweep_interval;
        }
        let deadline = (Instant::now() + sleep_for).min(next_sweep);
        // An upper bound of the wake below (the sweep only makes it sooner).
        wake.sleeping_until(
            broker.clock().now() + chrono::Duration::from_std(sleep_for).unwrap_or_default(),
        );
        tokio::select! {
            _ = &mut shutdown => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Revokes everything due now; returns how long to sleep until the next due
/// lease.
pub async fn pass(broker: &Broker) -> Result<Duration> {
    let batch = broker.config().reaper.batch_size;
    // The instant of the last look for due leases.
    let mut looked;
    loop {
        looked = broker.clock().now();
        let due = broker
            .store()
            .claim_due(looked, batch, &broker.claim())
            .await?;
        if due.is_empty() {
            break;
        }
        let full = due.len() == batch;
        // One batch per class, each under its reason, in this order: an
        // intent abandoned mid-issue; a handover's drain that reached its
        // deadline without its task (the broker died meanwhile), revoked in
        // full now, as one; an expiry.
        let mut classes = [
            (Reason::AbandonedIntent, Vec::new()),
            (Reason::Handover, Vec::new()),
            (Reason::Expired, Vec::new()),
        ];
        for l in due {
            let class = match l.state {
                LeaseState::Pending => 0,
                LeaseState::Draining => 1,
                _ => 2,
            };
            classes[class].1.push(l);
        }
        for (reason, leases) in classes {
            if !leases.is_empty() {
                broker
                    .revoker()
                    .revoke_claimed(leases, REAPER_IDENTITY, reason, Mode::UntilDropped)
                    .await;
            }
        }
        if !full {
            break;
        }
    }
    let next = broker.store().next_due().await?;
    let now = broker.clock().now();
    Ok(match next {
        // Due when we looked, yet not ours to claim (a claim held by another
        // replica or task): look again soon.
        Some(t) if t <= looked => Duration::from_millis(500),
        // Fell due while this pass revoked what was due before it: now.
        Some(t) if t <= now => Duration::ZERO,
        Some(t) => (t - now).to_std().unwrap_or_default().min(MAX_SLEEP) + Duration::from_millis(5),
        None => MAX_SLEEP,
    })
}

/// Drops broker-named users that no live lease accounts for. A name must
/// be seen orphaned in two sweeps in a row before it is dropped, and only
/// names in the broker's exact format are ever candidates.
///
/// `pg_roles` and `mysql.user` list the users of the whole *server*, and
/// several `[databases.*]` may reach one server (under one host name or
/// several): a user is an orphan only if no live lease of this broker, on
/// *any* of its databases, accounts for it. Other brokers on the server
/// are told apart by their `name_prefix` (see `Username::is_broker_made`).
#[derive(Default)]
pub struct OrphanSweeper {
    suspects: HashMap<String, HashSet<String>>,
}

impl OrphanSweeper {
    pub async fn sweep(&mut self, broker: &Broker) {
        let started = Instant::now();
        let (mut listed, mut suspected) = (0usize, 0usize);
        let prefix = broker.config().server.name_prefix.clone();
        for (db, backend) in broker.backends() {
            // Database first, store second: an intent is written before its
            // user is created, so any user we list has its lease visible by
            // the time we read the store.
            let users = match backend.list_broker_users(&prefix).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(database = %db, error = %crate::error::chain(&e), "orphan sweep skipped");
                    continue;
                }
            };
            listed += users.len();
            // The store is asked a slice at a time and only the orphans are
            // kept: over a million roles, a set of every live name would
            // cost the sweep as much memory again as the list itself.
            let mut orphans: Vec<UserRef> = Vec::new();
            for slice in users.chunks(SWEEP_SLICE) {
                let names: Vec<String> = slice
                    .iter()
                    .map(|u| u.username.as_str().to_string())
                    .collect();
                let live = match broker.store().live_among(&names).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %crate::error::chain(&e), "orphan sweep: store unreadable");
                        return;
                    }
                };
                orphans.extend(
                    slice
                        .iter()
                        .filter(|u| !live.contains(u.username.as_str()))
                        .cloned(),
                );
            }
            drop(users);
            suspected += orphans.len();
            let previous = self.suspects.remove(db).unwrap_or_default();
            let (confirmed, fresh): (Vec<UserRef>, Vec<UserRef>) = orphans
                .into_iter()
                .partition(|u| previous.contains(u.username.as_str()));
            self.suspects.insert(
                db.clone(),
                fresh
                    .iter()
                    .map(|u| u.username.as_str().to_string())
                    .collect(),
            );
            if confirmed.is_empty() {
                continue;
            }
            match broker.revoker().revoke_orphans(db, confirmed.clone()).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(database = %db, error = %crate::error::chain(&e), "orphan drop failed; retrying next sweep");
                    let entry = self.suspects.entry(db.clone()).or_default();
                    entry.extend(confirmed.iter().map(|u| u.username.as_str().to_string()));
                }
            }
        }
        tracing::debug!(
            users = listed,
            orphans = suspected,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "orphan sweep finished"
        );
    }
}

/// User names per store question in a sweep.
const SWEEP_SLICE: usize = 10_000;

#[cfg(test)]
mod timeline;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LeaseStore;
    use crate::testkit::{app, role, Kit};

    /// Two `[databases.*]` on one server: each database's sweep sees the
    /// other's users, and must leave them alone.
    #[tokio::test]
    async fn the_sweep_spares_users_of_every_database_on_the_server() {
        let kit = Kit::new("", &(role("a", "main") + &role("b", "second")));
        let a = kit.broker.issue(&app(), "a", None).await.unwrap();
        let b = kit.broker.issue(&app(), "b", None).await.unwrap();
        kit.server.add_user("k_a_0123456789abcdef", 3);
        // Another broker's prefix that starts with ours, and a DBA's user.
        kit.server.add_user("k_x_a_0123456789abcdef", 0);
        kit.server.add_user("k_dba", 0);
        let mut sweeper = OrphanSweeper::default();
        sweeper.sweep(&kit.broker).await;
        assert!(
            kit.server.user("k_a_0123456789abcdef").is_some(),
            "dropped on first sight"
        );
        sweeper.sweep(&kit.broker).await;
        assert!(
            kit.server.user("k_a_0123456789abcdef").is_none(),
            "orphan kept"
        );
        for kept in [
            a.lease.username.as_str(),
            b.lease.username.as_str(),
            "k_x_a_0123456789abcdef",
            "k_dba",
        ] {
            assert!(kit.server.user(kept).is_some(), "{kept} dropped");
        }
        let swept: Vec<_> = kit
            .audit()
            .into_iter()
            .filter(|r| r.action == "drop_orphan")
            .map(|r| (r.username.unwrap(), r.objects_reassigned))
            .collect();
        assert_eq!(swept, vec![("k_a_0123456789abcdef".to_string(), Some(3))]);
    }

    /// A name seen once whose intent appears before the second sweep (an
    /// issue in flight when the sweep listed users) is not dropped.
    #[tokio::test]
    async fn a_suspect_that_gains_a_lease_is_forgiven() {
        let kit = Kit::new("", &role("a", "main"));
        let name = "k_a_fedcba9876543210";
        kit.server.add_user(name, 0);
        let mut sweeper = OrphanSweeper::default();
        sweeper.sweep(&kit.broker).await;
        let lease = crate::testkit::pending_lease(name);
        kit.store.insert_intent(&lease, None).await.unwrap();
        sweeper.sweep(&kit.broker).await;
        sweeper.sweep(&kit.broker).await;
        assert!(
            kit.server.user(name).is_some(),
            "a user with a pending intent was swept"
        );
    }
}
