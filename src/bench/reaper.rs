//! Many leases due at once: how long until every role is gone?
//!
//! Issues `leases` leases through the broker, stops it, moves every expiry
//! to the same instant a few seconds ahead (straight in the SQLite file),
//! starts the broker again and waits, as a running broker would, for the
//! moment they fall due. Measured: from that instant until PostgreSQL has
//! no role of this broker left, and until the store has no live lease.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::setup::{self, BenchPostgres, BrokerSettings, InProcess};
use crate::bench::Machine;
use credbroker::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Options {
    pub leases: u64,
    /// Concurrent callers while issuing (setup, not measured as the result).
    pub callers: usize,
    pub batch_size: Option<usize>,
    pub pool: Option<usize>,
    pub out_dir: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub leases: u64,
    pub batch_size: usize,
    pub issue_seconds: f64,
    pub issue_leases_per_s: f64,
    /// From the common due instant until the last role was dropped.
    pub roles_gone_s: f64,
    /// From the due instant until the store held no live lease.
    pub store_clear_s: f64,
    pub revoked_per_s: f64,
}

/// How far ahead of the restart the leases fall due: the broker must be up
/// and asleep by then, as it would be in production.
const DUE_IN: Duration = Duration::from_secs(3);
const PREFIX: &str = "br_";

pub async fn run(opts: &Options) -> Result<Report> {
    let pg = BenchPostgres::start(false).await?;
    let mut machine = Machine::sample(pg.version.clone());
    let dir = setup::bench_dir("reaper")?;
    let settings = BrokerSettings {
        name_prefix: PREFIX.into(),
        max_connections: opts.pool,
        reaper_batch: opts.batch_size,
        ..Default::default()
    };
    let env = setup::write_env(dir.path(), &pg, "127.0.0.1:0", &settings)?;

    let broker = InProcess::start(&env).await?;
    let batch_size = broker.broker.config().reaper.batch_size;
    let started = Instant::now();
    issue_many(&env, &broker.addr, opts.leases, opts.callers, 7200).await?;
    let issue_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "  issued {} leases in {issue_seconds:.1} s ({:.0}/s)",
        opts.leases,
        opts.leases as f64 / issue_seconds
    );
    broker.stop().await?;

    let admin = pg.connect().await?;
    let present = pg.count_roles(&admin, PREFIX).await?;
    if present as u64 != opts.leases {
        return Err(Error::internal(format!(
            "{present} roles exist after issuing {} leases",
            opts.leases
        )));
    }
    let due_wall = chrono::Utc::now() + chrono::Duration::from_std(DUE_IN).unwrap_or_default();
    let due = Instant::now() + DUE_IN;
    let store = env.store_path.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let c = rusqlite::Connection::open(&store).map_err(Error::internal)?;
        let t = due_wall.timestamp_millis();
        c.execute(
            "UPDATE leases SET expires_at = ?1, due_at = ?1 WHERE state = 'active'",
            [t],
        )
        .map_err(Error::internal)?;
        Ok(())
    })
    .await
    .map_err(Error::internal)??;

    let broker = InProcess::start(&env).await?;
    let mut roles_gone = None;
    let mut store_clear = None;
    let limit = due + Duration::from_secs(600);
    while roles_gone.is_none() || store_clear.is_none() {
        if Instant::now() > limit {
            return Err(Error::internal("leases still live 10 minutes after due"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if Instant::now() < due {
            continue;
        }
        if roles_gone.is_none() && pg.count_roles(&admin, PREFIX).await? == 0 {
            roles_gone = Some(due.elapsed());
        }
        if store_clear.is_none() && broker.broker.store().next_due().await?.is_none() {
            store_clear = Some(due.elapsed());
        }
    }
    broker.stop().await?;
    machine.finish();
    let roles_gone_s = roles_gone.unwrap_or_default().as_secs_f64();
    Ok(Report {
        machine,
        leases: opts.leases,
        batch_size,
        issue_seconds,
        issue_leases_per_s: opts.leases as f64 / issue_seconds,
        roles_gone_s,
        store_clear_s: store_clear.unwrap_or_default().as_secs_f64(),
        revoked_per_s: opts.leases as f64 / roles_gone_s.max(1e-9),
    })
}

/// Issues `n` leases with `callers` concurrent clients; keeps none of them.
pub async fn issue_many(
    env: &credbroker_testkit::devenv::DevEnv,
    addr: &str,
    n: u64,
    callers: usize,
    ttl_seconds: i64,
) -> Result<()> {
    let left = Arc::new(std::sync::atomic::AtomicU64::new(n));
    let mut tasks = Vec::new();
    for _ in 0..callers.max(1) {
        let mut client = setup::connected_client(env, addr).await?;
        let left = left.clone();
        tasks.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                setup::issue(&mut client, ttl_seconds).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(Error::internal)??;
    }
    Ok(())
}

impl Report {
    pub fn markdown(&self) -> String {
        format!(
            "# credbroker bench reaper\n\n{}- leases due at the same instant: {}\n- reaper batch size: {}\n\n\
             | figure | value |\n|---|---:|\n\
             | due → every role dropped | {:.2} s |\n\
             | due → no live lease in the store | {:.2} s |\n\
             | revocations per second | {:.0} |\n\
             | (setup) issue rate, {} leases | {:.0}/s |\n",
            self.machine.markdown(),
            self.leases,
            self.batch_size,
            self.roles_gone_s,
            self.store_clear_s,
            self.revoked_per_s,
            self.leases,
            self.issue_leases_per_s,
        )
    }
}
