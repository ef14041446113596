//! The loop that keeps time for access: undecided requests expire at
//! their deadline, grants end at theirs (every lease under them revoked),
//! and an ended grant whose leases were not all handed to the revocation
//! engine (its ender died or failed midway) is finished. Every replica
//! runs it; each step is a compare-and-set on the stored request, so the
//! replica that sees a request due first acts and the others find it
//! decided. Leases never depend on this loop for their end: their expiry
//! is clamped to the grant's, so the reaper and the database itself end
//! them at the latest then.

use std::sync::Arc;
use std::time::Duration;

use super::{rules, Access, Kind, SYSTEM};
use crate::audit::Event;
use crate::error::Result;
use crate::identity::Identity;
use crate::store::AccessState;

/// How often the loop looks for due requests: an indexed read of a small
/// table, so a grant ends within about this long of its time.
pub const TICK: Duration = Duration::from_secs(1);

/// Most requests one pass handles; the rest wait for the next tick.
const BATCH: usize = 100;

impl Access {
    /// One pass: everything due now. Returns how many requests it moved.
    pub async fn run_due(&self) -> Result<usize> {
        let now = self.broker.clock().now();
        let due = self.broker.store().access_due(now, BATCH).await?;
        let system = Identity::from_trusted(SYSTEM.to_string());
        let mut moved = 0;
        for r in due {
            if r.state == AccessState::Ended {
                // Its end is stored; its leases are not all done.
                self.end_grant(r, &system).await?;
                moved += 1;
                continue;
            }
            let Some(next) = rules::expire(&r, now) else {
                continue;
            };
            if !self.broker.store().update_access(&next).await? {
                // Another replica (or an approval) came first.
                continue;
            }
            let mut next = next;
            next.version += 1;
            moved += 1;
            match next.state {
                AccessState::Expired => {
                    let mut e = Event::new(SYSTEM, "access_expire");
                    e.request_id = Some(next.id.clone());
                    e.role = next.roles.first().cloned();
                    self.audit_ok(
                        e,
                        format!(
                            "undecided at its deadline ({}/{} approvals)",
                            next.approvals.len(),
                            next.approvals_needed
                        ),
                    )?;
                    self.notify(Kind::RequestExpired, &next, SYSTEM, &next.reason);
                }
                _ => {
                    self.end_grant(next, &system).await?;
                }
            }
        }
        Ok(moved)
    }
}

/// Runs [`Access::run_due`] every [`TICK`] until `shutdown`.
pub async fn run(access: Arc<Access>, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        if let Err(e) = access.run_due().await {
            tracing::warn!(error = %crate::error::chain(&e), "access expiry pass failed; retrying");
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}
