//! The pruner: keeps the lease store bounded. Revoked rows are kept for
//! `store.retention` (so `admin leases` and look-ups can still show a
//! recent past lease), then deleted — in small batches with a pause
//! between them, off the lease path, so issuing is never starved by a
//! large backlog. Live rows (pending, active, draining, failing) are never
//! deleted: they are the broker's memory of users that may still exist.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::broker::Broker;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::Store;

/// Rows deleted per statement: small enough that one batch holds the
/// SQLite writer (or PostgreSQL row locks) for milliseconds, not seconds.
pub const BATCH: usize = 1_000;

/// Pause between two batches, so requests queued behind one get their turn.
pub const PAUSE: Duration = Duration::from_millis(25);

/// Longest wait for the first run after start: a broker restarted more
/// often than `prune_interval` must still prune.
const FIRST_RUN_AFTER: Duration = Duration::from_secs(60);

/// Deletes old revoked rows from one store, batch by batch.
pub struct Pruner {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    batch: usize,
    pause: Duration,
}

impl Pruner {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Pruner {
            store,
            metrics,
            batch: BATCH,
            pause: PAUSE,
        }
    }

    /// Deletes revoked rows with `revoked_at` before `before` until a batch
    /// comes back short; returns how many went. Counted in metrics batch by
    /// batch, so a run cut short by shutdown is counted too.
    pub async fn prune(&self, before: DateTime<Utc>) -> Result<u64> {
        // A lock that ran out refuses nothing; its row goes after the same
        // retention as a revoked lease's. Few rows: one statement.
        let locks = self.store.prune_locks(before).await?;
        if locks > 0 {
            tracing::info!(locks, "pruned expired locks past retention");
        }
        // Vault-API tokens are no use once expired (a token cannot be
        // renewed after); they go at once, not after `retention`.
        let tokens = self.store.prune_vault_tokens(Utc::now()).await?;
        if tokens > 0 {
            tracing::info!(tokens, "pruned expired vault api tokens");
        }
        let mut total = 0;
        loop {
            let n = self.store.prune_revoked(before, self.batch).await?;
            self.metrics.pruned.inc_by(n);
            total += n;
            // Short: nothing older is left, or (PostgreSQL) the rest is
            // locked by someone else and waits for the next run.
            if (n as usize) < self.batch {
                return Ok(total);
            }
            tokio::time::sleep(self.pause).await;
        }
    }
}

/// Runs until `shutdown` completes: one pruning run every
/// `store.prune_interval` (re-read each time, so SIGHUP applies).
pub async fn run(broker: Arc<Broker>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let pruner = Pruner::new(broker.store().clone(), broker.metrics().clone());
    let mut wait = broker.config().store.prune_interval.min(FIRST_RUN_AFTER);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let store = broker.config().store.clone();
        wait = store.prune_interval;
        let Ok(retention) = chrono::Duration::from_std(store.retention) else {
            continue;
        };
        let before = Utc::now() - retention;
        let started = Instant::now();
        // Cancelling between or during batches is safe: each batch is one
        // statement of its own, and the next run carries on.
        let result = tokio::select! {
            _ = &mut shutdown => return,
            r = pruner.prune(before) => r,
        };
        match result {
            Ok(0) => tracing::debug!("pruner: no revoked rows past retention"),
            Ok(n) => tracing::info!(
                rows = n,
                took = ?started.elapsed(),
                "pruned revoked leases past retention from the store"
            ),
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), retry_in = ?wait, "pruning the lease store failed")
            }
        }
    }
}
