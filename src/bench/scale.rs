//! Scale: what many leases cost the broker process.
//!
//! - live: `live` leases with real PostgreSQL roles, issued through the real
//!   `credbroker serve` binary: issue rate and resident memory as the count
//!   grows (10 %, 50 %, 100 %); restart to ready and to a first lease; the
//!   first orphan sweep over every role (duration, memory); `admin leases`
//!   with filters through the Admin API the CLI calls; the reaper's order
//!   over a slice made due at staggered instants while every other lease
//!   stays live; and teardown, every lease due at once.
//! - rows: `rows` synthetic lease rows written straight into a store file
//!   (their roles need not exist); restart-to-ready, memory, wake-up cost.
//!
//! The broker runs as its own process so its memory is its own. "Ready"
//! is a served gRPC health check; "first lease" is a successful issue.
//! Store rows are edited only while that process is stopped (the SQLite
//! file is locked by the broker that has it open).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use crate::bench::reaper::issue_many;
use crate::bench::setup::{self, bench_dir, BenchPostgres, BrokerSettings};
use crate::bench::{hwm_mb, pg_err, rss_mb, Latency, Machine};
use credbroker::error::{Error, Result};
use credbroker::pb;
use credbroker::store::{Claim, LeaseStore};
use credbroker_testkit::devenv::DevEnv;

#[derive(Debug, Clone)]
pub struct Options {
    /// Live leases with real roles (0: skip).
    pub live: u64,
    /// Synthetic store rows (0: skip).
    pub rows: u64,
    pub callers: usize,
    pub out_dir: PathBuf,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: Option<Machine>,
    pub live: Option<Figures>,
    /// What only the live part measures.
    pub live_scale: Option<LiveScale>,
    pub rows: Option<Figures>,
    /// Dropping the throwaway PostgreSQL (every role with it).
    pub throwaway_teardown_s: f64,
}

/// The live part's own figures.
#[derive(Debug, Default, Serialize)]
pub struct LiveScale {
    /// Issue rate and broker RSS at 10 %, 50 % and 100 % of the leases.
    pub growth: Vec<Growth>,
    /// `pg_authid` + `pg_auth_members` (tables and indexes) once all are live.
    pub pg_catalog_mb: f64,
    /// `admin leases` calls over every live lease, through the Admin API.
    pub listings: Vec<Listing>,
    pub reaper: Option<ReaperOrder>,
    pub teardown: Option<Teardown>,
}

#[derive(Debug, Default, Serialize)]
pub struct Growth {
    pub live: u64,
    pub elapsed_s: f64,
    /// Leases per second since the previous sample.
    pub rate_per_s: f64,
    pub rss_mb: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Listing {
    pub filter: String,
    pub rows: usize,
    pub p50_ms: f64,
    pub max_ms: f64,
}

/// A slice of the leases made due at staggered instants, the rest live.
#[derive(Debug, Default, Serialize)]
pub struct ReaperOrder {
    pub leases: u64,
    /// Their due instants are spread evenly over this long.
    pub span_s: f64,
    pub batch_size: usize,
    /// Pairs revoked in the opposite order to their due instants (a later
    /// `revoked_at` for the one due first). Leases revoked in one batch
    /// share a `revoked_at`: ties are not inversions.
    pub inversions: u64,
    /// Distinct `revoked_at` instants: about the number of batches.
    pub revocation_instants: u64,
    /// `revoked_at − due_at` per lease.
    pub due_to_revoked: Latency,
    /// From the first due instant until PostgreSQL had none of their roles.
    pub all_gone_s: f64,
}

/// Every remaining live lease made due at one instant.
#[derive(Debug, Default, Serialize)]
pub struct Teardown {
    pub leases: u64,
    /// Due instant → no role of this broker left in PostgreSQL.
    pub roles_gone_s: f64,
    pub revoked_per_s: f64,
    /// Live rows left in the store once the roles were gone and the
    /// broker stopped (0 expected).
    pub store_live_left: u64,
}

/// Figures for one store size.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub leases: u64,
    /// Setup: how fast they were issued (live) or written (rows).
    pub setup_seconds: f64,
    pub store_file_mb: f64,
    /// RSS right after the first start, before any lease (live only).
    pub rss_empty_mb: Option<f64>,
    /// RSS with every lease live, in the process that issued them.
    pub rss_loaded_mb: Option<f64>,
    /// Peak RSS of that process (`VmHWM`).
    pub rss_peak_mb: Option<f64>,
    /// A restart over the full store: spawn → health check served.
    pub restart_ready_s: f64,
    /// Spawn → first lease issued.
    pub restart_first_lease_s: f64,
    /// RSS of the restarted process once ready, and after its first
    /// orphan sweep (which runs 10 s after start).
    pub restart_rss_mb: f64,
    pub restart_rss_after_sweep_mb: f64,
    /// Peak RSS from the restart to the first sweep.
    pub restart_rss_peak_mb: f64,
    /// The first orphan sweep after the restart (10 s after start): the
    /// roles it listed, how long it took, and the peak RSS while it ran.
    pub sweep_users: u64,
    pub sweep_s: f64,
    pub sweep_rss_peak_mb: f64,
    /// One reaper wake with nothing due: claim what is due + next due time.
    pub reaper_wake_us: f64,
}

pub async fn run(opts: &Options) -> Result<Report> {
    let pg = BenchPostgres::start(false).await?;
    let mut report = Report {
        machine: Some(Machine::sample(pg.version.clone())),
        ..Default::default()
    };
    if opts.live > 0 {
        let (f, s) = live(&pg, opts).await?;
        report.live = Some(f);
        report.live_scale = Some(s);
    }
    if opts.rows > 0 {
        report.rows = Some(rows(&pg, opts).await?);
    }
    let t = Instant::now();
    drop(pg);
    report.throwaway_teardown_s = t.elapsed().as_secs_f64();
    if let Some(m) = report.machine.as_mut() {
        m.finish();
    }
    Ok(report)
}

/// Each part gets its own user-name prefix: a broker sweeps every user with
/// its prefix that its store does not know, and both parts share a server.
pub(crate) fn env_for(dir: &Path, pg: &BenchPostgres, prefix: &str) -> Result<(DevEnv, u16)> {
    let port = setup::free_port()?;
    let settings = BrokerSettings {
        name_prefix: prefix.into(),
        ..Default::default()
    };
    let env = setup::write_env(dir, pg, &format!("127.0.0.1:{port}"), &settings)?;
    Ok((env, port))
}

const PREFIX_LIVE: &str = "bs_";
/// TTL of the live leases: the longest the bench role allows, so none falls
/// due on its own during the run.
const LIVE_TTL_S: i64 = 7200;

async fn live(pg: &BenchPostgres, opts: &Options) -> Result<(Figures, LiveScale)> {
    let dir = bench_dir("live")?;
    let (env, port) = env_for(dir.path(), pg, PREFIX_LIVE)?;
    let addr = format!("https://127.0.0.1:{port}");
    let mut broker = setup::Spawned::start(&env, &addr).await?;
    let mut f = Figures {
        leases: opts.live,
        rss_empty_mb: rss_mb(broker.pid()),
        ..Default::default()
    };
    let mut s = LiveScale::default();
    let issue_start = Utc::now();
    let t = Instant::now();
    let (mut done, mut last) = (0u64, Duration::ZERO);
    for mark in [opts.live / 10, opts.live / 2, opts.live] {
        if mark <= done {
            continue;
        }
        issue_many(&env, &addr, mark - done, opts.callers, LIVE_TTL_S).await?;
        let now = t.elapsed();
        let g = Growth {
            live: mark,
            elapsed_s: now.as_secs_f64(),
            rate_per_s: (mark - done) as f64 / (now - last).as_secs_f64().max(1e-9),
            rss_mb: rss_mb(broker.pid()).unwrap_or_default(),
        };
        eprintln!(
            "  {} live leases at {:.1} s ({:.0}/s since the last sample), broker RSS {:.1} MB",
            g.live, g.elapsed_s, g.rate_per_s, g.rss_mb
        );
        s.growth.push(g);
        (done, last) = (mark, now);
    }
    f.setup_seconds = t.elapsed().as_secs_f64();
    let issue_end = Utc::now();
    f.rss_loaded_mb = rss_mb(broker.pid());
    f.rss_peak_mb = hwm_mb(broker.pid());
    s.pg_catalog_mb = catalog_mb(pg).await?;
    broker.stop().await?;

    // Many callers, not one: 500 identities, as the synthetic rows have.
    spread_identities(&env.store_path).await?;
    let mut broker = restart(&env, &addr, &mut f).await?;
    s.listings = listings(&env, &addr, issue_start, issue_end).await?;
    broker.stop().await?;
    f.reaper_wake_us = wake_cost(&env.store_path).await?;
    f.store_file_mb = file_mb(&env.store_path);

    s.reaper = Some(reaper_order(pg, &env, &addr, opts.live).await?);
    s.teardown = Some(teardown(pg, &env, &addr).await?);
    Ok((f, s))
}

/// `pg_authid` and `pg_auth_members`, indexes included, in MB.
async fn catalog_mb(pg: &BenchPostgres) -> Result<f64> {
    let c = pg.connect().await?;
    let bytes: i64 = c
        .query_one(
            "SELECT (pg_total_relation_size('pg_authid') + pg_total_relation_size('pg_auth_members'))::int8",
            &[],
        )
        .await
        .map_err(pg_err("catalog size"))?
        .get(0);
    Ok(bytes as f64 / 1_048_576.0)
}

/// Gives the live leases 500 holder identities instead of the one dev
/// client that issued them, so "by identity" selects 1 in 500.
async fn spread_identities(store: &Path) -> Result<()> {
    let store = store.to_path_buf();
    blocking_sql(move || {
        let c = rusqlite::Connection::open(&store)?;
        c.execute(
            "UPDATE leases SET identity = 'spiffe://credbroker.dev/ns/demo/svc' || (rowid % 500)              WHERE state <> 'revoked'",
            [],
        )?;
        Ok(())
    })
    .await
}

async fn blocking_sql<T: Send + 'static>(
    f: impl FnOnce() -> rusqlite::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(Error::internal)?
        .map_err(|e| Error::internal(format!("bench store edit: {e}")))
}

/// Timed `admin leases` calls, each as the CLI makes it (`Admin.ListLeases`
/// over mTLS as the dev admin): one untimed, then [`LIST_RUNS`] timed.
const LIST_RUNS: usize = 5;

async fn listings(
    env: &DevEnv,
    addr: &str,
    issue_start: chrono::DateTime<Utc>,
    issue_end: chrono::DateTime<Utc>,
) -> Result<Vec<Listing>> {
    let mut admin = env.client(addr, "admin").admin()?;
    // The first tenth of the leases by expiry.
    let tenth =
        issue_start + (issue_end - issue_start) / 10 + chrono::Duration::seconds(LIVE_TTL_S);
    let within = (tenth - Utc::now()).num_seconds().max(1);
    let req = |f: &dyn Fn(&mut pb::ListLeasesRequest)| {
        let mut r = pb::ListLeasesRequest::default();
        f(&mut r);
        r
    };
    let cases: Vec<(String, pb::ListLeasesRequest)> = vec![
        (
            "--identity (1 of 500 identities)".into(),
            req(&|r| r.identity = "spiffe://credbroker.dev/ns/demo/svc7".into()),
        ),
        (
            "--role (every lease; server's default limit)".into(),
            req(&|r| r.role = setup::ROLE.into()),
        ),
        (
            "--database (every lease; server's default limit)".into(),
            req(&|r| r.database = setup::DB.into()),
        ),
        (
            format!("--expiring-within {within}s (the first tenth)"),
            req(&|r| r.expiring_within_seconds = within),
        ),
        (
            "--identity + --expiring-within".into(),
            req(&|r| {
                r.identity = "spiffe://credbroker.dev/ns/demo/svc7".into();
                r.expiring_within_seconds = within;
            }),
        ),
        (
            "--role --database, limit 100 (API field)".into(),
            req(&|r| {
                r.role = setup::ROLE.into();
                r.database = setup::DB.into();
                r.limit = 100;
            }),
        ),
        (
            "no filter, limit 100 (API field)".into(),
            req(&|r| r.limit = 100),
        ),
    ];
    let mut out = Vec::new();
    for (filter, request) in cases {
        let mut rows = 0;
        let mut times = Vec::new();
        for run in 0..=LIST_RUNS {
            let t = Instant::now();
            let reply = admin
                .list_leases(request.clone())
                .await
                .map_err(|s| {
                    Error::internal(format!(
                        "admin leases {filter}: {}",
                        credbroker::client::describe(&s)
                    ))
                })?
                .into_inner();
            if run > 0 {
                times.push(t.elapsed());
            }
            rows = reply.leases.len();
        }
        let l = Latency::of(&mut times);
        eprintln!(
            "  admin leases {filter}: {rows} rows, p50 {:.1} ms, max {:.1} ms",
            l.p50_ms, l.max_ms
        );
        out.push(Listing {
            filter,
            rows,
            p50_ms: l.p50_ms,
            max_ms: l.max_ms,
        });
    }
    Ok(out)
}

/// How far ahead of the restart the staggered slice begins, and how long
/// its due instants span: the broker is up and asleep first, and the slice
/// is over before the first orphan sweep (10 s after start).
const ORDER_LEAD: Duration = Duration::from_secs(3);
const ORDER_SPAN: Duration = Duration::from_secs(5);

/// Makes a slice of the live leases (10,000, or a tenth of fewer) due at
/// evenly staggered instants in random order, restarts the broker and checks
/// that the reaper revoked them in due order.
async fn reaper_order(
    pg: &BenchPostgres,
    env: &DevEnv,
    addr: &str,
    live: u64,
) -> Result<ReaperOrder> {
    let k = (live / 10).clamp(1, 10_000);
    let first_due = Utc::now() + chrono::Duration::from_std(ORDER_LEAD).unwrap_or_default();
    let first_due_at = Instant::now() + ORDER_LEAD;
    let store = env.store_path.clone();
    let start_ms = first_due.timestamp_millis();
    let span_ms = ORDER_SPAN.as_millis() as i64;
    let slice: Vec<(String, String, i64)> = blocking_sql(move || {
        let mut c = rusqlite::Connection::open(&store)?;
        let tx = c.transaction()?;
        let picked: Vec<(String, String)> = {
            let mut q = tx.prepare(
                "SELECT id, username FROM leases WHERE state = 'active' ORDER BY random() LIMIT ?1",
            )?;
            let rows = q.query_map([k as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let n = picked.len().max(1) as i64;
        let mut out = Vec::new();
        {
            let mut upd =
                tx.prepare("UPDATE leases SET due_at = ?2, expires_at = ?2 WHERE id = ?1")?;
            for (i, (id, user)) in picked.into_iter().enumerate() {
                let due = start_ms + i as i64 * span_ms / n;
                upd.execute(rusqlite::params![id, due])?;
                out.push((id, user, due));
            }
        }
        tx.commit()?;
        Ok(out)
    })
    .await?;
    let broker = setup::Spawned::start(env, addr).await?;
    let batch_size = credbroker::config::Config::load(&env.config_path)?
        .reaper
        .batch_size;
    tokio::time::sleep_until((first_due_at + ORDER_SPAN).into()).await;
    let admin = pg.connect().await?;
    let names: Vec<String> = slice.iter().map(|s| s.1.clone()).collect();
    let limit = Instant::now() + Duration::from_secs(600);
    loop {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)",
                &[&names],
            )
            .await
            .map_err(pg_err("count slice roles"))?
            .get(0);
        if left == 0 {
            break;
        }
        if Instant::now() > limit {
            return Err(Error::internal(format!(
                "{left} of the staggered slice still exist 10 minutes after due"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_gone_s = first_due_at.elapsed().as_secs_f64();
    let mut broker = broker;
    broker.stop().await?;

    let store = env.store_path.clone();
    let ids: Vec<String> = slice.iter().map(|s| s.0.clone()).collect();
    let revoked: Vec<Option<i64>> = blocking_sql(move || {
        let c = rusqlite::Connection::open(&store)?;
        let mut q = c.prepare("SELECT revoked_at FROM leases WHERE id = ?1")?;
        ids.iter()
            .map(|id| q.query_row([id], |r| r.get::<_, Option<i64>>(0)))
            .collect()
    })
    .await?;
    // The slice is in due order already.
    let mut at = Vec::with_capacity(revoked.len());
    let mut lateness = Vec::with_capacity(revoked.len());
    for ((_, _, due), r) in slice.iter().zip(&revoked) {
        let r = r.ok_or_else(|| Error::internal("a lease of the slice has no revoked_at"))?;
        at.push(r);
        lateness.push(Duration::from_millis((r - due).max(0) as u64));
    }
    let mut distinct = at.clone();
    distinct.dedup();
    let order = ReaperOrder {
        leases: slice.len() as u64,
        span_s: ORDER_SPAN.as_secs_f64(),
        batch_size,
        inversions: inversions(&mut at.clone()),
        revocation_instants: distinct.len() as u64,
        due_to_revoked: Latency::of(&mut lateness),
        all_gone_s,
    };
    eprintln!(
        "  reaper order: {} leases due over {:.0} s, {} inversions, {} revocation instants, due → revoked p50 {:.1} ms p99 {:.1} ms, all gone {:.2} s after the first due",
        order.leases,
        order.span_s,
        order.inversions,
        order.revocation_instants,
        order.due_to_revoked.p50_ms,
        order.due_to_revoked.p99_ms,
        order.all_gone_s
    );
    Ok(order)
}

/// Pairs `i < j` with `v[i] > v[j]` (ties are not counted); sorts `v`.
fn inversions(v: &mut [i64]) -> u64 {
    if v.len() < 2 {
        return 0;
    }
    let mid = v.len() / 2;
    let mut n = inversions(&mut v[..mid]) + inversions(&mut v[mid..]);
    let mut merged = Vec::with_capacity(v.len());
    let (mut i, mut j) = (0, mid);
    while i < mid && j < v.len() {
        if v[i] <= v[j] {
            merged.push(v[i]);
            i += 1;
        } else {
            n += (mid - i) as u64;
            merged.push(v[j]);
            j += 1;
        }
    }
    merged.extend_from_slice(&v[i..mid]);
    merged.extend_from_slice(&v[j..]);
    v.copy_from_slice(&merged);
    n
}

/// Every live lease due at one instant; time until no role is left.
async fn teardown(pg: &BenchPostgres, env: &DevEnv, addr: &str) -> Result<Teardown> {
    let due_wall = Utc::now() + chrono::Duration::from_std(ORDER_LEAD).unwrap_or_default();
    let due = Instant::now() + ORDER_LEAD;
    let store = env.store_path.clone();
    let at = due_wall.timestamp_millis();
    let leases = blocking_sql(move || {
        let c = rusqlite::Connection::open(&store)?;
        c.execute(
            "UPDATE leases SET due_at = ?1, expires_at = ?1 WHERE state <> 'revoked'",
            [at],
        )
    })
    .await? as u64;
    let broker = setup::Spawned::start(env, addr).await?;
    tokio::time::sleep_until(due.into()).await;
    let admin = pg.connect().await?;
    let pattern = format!("{}%", PREFIX_LIVE.replace('_', "\\_"));
    let limit = Instant::now() + Duration::from_secs(1800);
    loop {
        let any: bool = admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname LIKE $1)",
                &[&pattern],
            )
            .await
            .map_err(pg_err("roles left"))?
            .get(0);
        if !any {
            break;
        }
        if Instant::now() > limit {
            return Err(Error::internal(
                "roles still exist 30 minutes after teardown",
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let roles_gone_s = due.elapsed().as_secs_f64();
    let mut broker = broker;
    broker.stop().await?;
    let store = env.store_path.clone();
    let store_live_left = blocking_sql(move || {
        rusqlite::Connection::open(&store)?.query_row(
            "SELECT count(*) FROM leases WHERE state <> 'revoked'",
            [],
            |r| r.get::<_, i64>(0),
        )
    })
    .await? as u64;
    let t = Teardown {
        leases,
        roles_gone_s,
        revoked_per_s: leases as f64 / roles_gone_s.max(1e-9),
        store_live_left,
    };
    eprintln!(
        "  teardown: {} leases due at once, every role gone {:.1} s later ({:.0}/s), {} live rows left",
        t.leases, t.roles_gone_s, t.revoked_per_s, t.store_live_left
    );
    Ok(t)
}

async fn rows(pg: &BenchPostgres, opts: &Options) -> Result<Figures> {
    let dir = bench_dir("rows")?;
    let (env, port) = env_for(dir.path(), pg, "bz_")?;
    let addr = format!("https://127.0.0.1:{port}");
    let t = Instant::now();
    write_synthetic(&env.store_path, opts.rows).await?;
    let mut f = Figures {
        leases: opts.rows,
        setup_seconds: t.elapsed().as_secs_f64(),
        store_file_mb: file_mb(&env.store_path),
        ..Default::default()
    };
    eprintln!(
        "  wrote {} synthetic lease rows in {:.1} s ({:.0} MB)",
        opts.rows, f.setup_seconds, f.store_file_mb
    );
    restart(&env, &addr, &mut f).await?.stop().await?;
    f.reaper_wake_us = wake_cost(&env.store_path).await?;
    Ok(f)
}

/// Starts the broker over an existing store and measures it until its
/// first orphan sweep has finished; returns it still running.
async fn restart(env: &DevEnv, addr: &str, f: &mut Figures) -> Result<setup::Spawned> {
    let t = Instant::now();
    let broker = setup::Spawned::start(env, addr).await?;
    f.restart_ready_s = t.elapsed().as_secs_f64();
    f.restart_rss_mb = rss_mb(broker.pid()).unwrap_or_default();
    let mut client = setup::connected_client(env, addr).await?;
    setup::issue(&mut client, 600).await?;
    f.restart_first_lease_s = t.elapsed().as_secs_f64();
    f.restart_rss_peak_mb = hwm_mb(broker.pid()).unwrap_or_default();
    // The sweep's own peak: VmHWM starts again from the current RSS.
    let _ = std::fs::write(format!("/proc/{}/clear_refs", broker.pid()), "5");
    let (users, sweep_ms) = first_sweep(env).await?;
    f.sweep_users = users;
    f.sweep_s = sweep_ms as f64 / 1000.0;
    f.sweep_rss_peak_mb = hwm_mb(broker.pid()).unwrap_or_default();
    f.restart_rss_after_sweep_mb = rss_mb(broker.pid()).unwrap_or_default();
    eprintln!(
        "  restart: ready in {:.2} s, first lease at {:.2} s, RSS {:.0} MB (peak {:.0} MB); first sweep over {} roles {:.2} s, peak {:.0} MB, {:.0} MB after",
        f.restart_ready_s,
        f.restart_first_lease_s,
        f.restart_rss_mb,
        f.restart_rss_peak_mb,
        f.sweep_users,
        f.sweep_s,
        f.sweep_rss_peak_mb,
        f.restart_rss_after_sweep_mb,
    );
    Ok(broker)
}

/// The work of one reaper wake-up with nothing due, averaged.
async fn wake_cost(store: &Path) -> Result<f64> {
    let store = credbroker::store::sqlite::SqliteStore::open(store).await?;
    let claim = Claim {
        owner: "bench".into(),
        until: Utc::now() + chrono::Duration::seconds(60),
    };
    const WAKES: u32 = 200;
    let t = Instant::now();
    for _ in 0..WAKES {
        let due = store.claim_due(Utc::now(), 500, &claim).await?;
        if !due.is_empty() {
            return Err(Error::internal("bench store has leases due"));
        }
        store.next_due().await?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / f64::from(WAKES))
}

/// Fills a fresh store with `n` live leases due over the next hours.
pub(crate) async fn write_synthetic(path: &Path, n: u64) -> Result<()> {
    // The broker's own code creates the schema.
    drop(credbroker::store::sqlite::SqliteStore::open(path).await?);
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
        let mut c = rusqlite::Connection::open(&path)?;
        c.execute_batch("PRAGMA synchronous = OFF")?;
        let tx = c.transaction()?;
        {
            let mut ins = tx.prepare(
                "INSERT INTO leases (id, role, database, kind, username, user_host, identity, state, \
                 issued_at, expires_at, max_expires_at, due_at) \
                 VALUES (?1, ?2, ?3, 'postgres', ?4, '', ?5, 'active', ?6, ?7, ?8, ?7)",
            )?;
            let now = Utc::now().timestamp_millis();
            for i in 0..n {
                let expires = now + 3_600_000 + (i as i64 * 7) % 3_600_000;
                ins.execute(rusqlite::params![
                    format!("lease_{i:026}"),
                    setup::ROLE,
                    setup::DB,
                    format!("sy_bench_{i:016x}"),
                    format!("spiffe://credbroker.dev/ns/synthetic/svc{}", i % 500),
                    now,
                    expires,
                    expires + 3_600_000,
                ])?;
            }
        }
        tx.commit()
    })
    .await
    .map_err(Error::internal)?
    .map_err(|e| Error::internal(format!("synthetic rows: {e}")))
}

fn file_mb(p: &Path) -> f64 {
    let wal = PathBuf::from(format!("{}-wal", p.display()));
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    (size(p) + size(&wal)) as f64 / 1_048_576.0
}

/// Waits for the first "orphan sweep finished" line in the broker's
/// log (the sweep runs 10 s after start); the roles it listed and how
/// long it took, in ms.
async fn first_sweep(env: &DevEnv) -> Result<(u64, u64)> {
    let log = env.dir.join("broker.log");
    let limit = Instant::now() + Duration::from_secs(1800);
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("orphan sweep finished")) {
            return Ok((
                field(line, "users=").unwrap_or_default(),
                field(line, "elapsed_ms=").unwrap_or_default(),
            ));
        }
        if Instant::now() > limit {
            return Err(Error::internal(
                "no orphan sweep finished within 30 minutes",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::from("# credbroker bench scale\n\n");
        if let Some(m) = &self.machine {
            out.push_str(&m.markdown());
        }
        out.push_str(
            "\n| figure | live leases, real roles | synthetic store rows |\n|---|---:|---:|\n",
        );
        type Get = fn(&Figures) -> Option<f64>;
        let cell = |f: &Option<Figures>, get: Get, unit: &str| {
            f.as_ref()
                .and_then(get)
                .map(|v| match unit {
                    "" => format!("{v:.0}"),
                    _ => format!("{v:.2} {unit}"),
                })
                .unwrap_or_else(|| "–".into())
        };
        let rows: [(&str, Get, &str); 15] = [
            ("leases", |f| Some(f.leases as f64), ""),
            ("setup (issue / write)", |f| Some(f.setup_seconds), "s"),
            ("store file", |f| Some(f.store_file_mb), "MB"),
            ("RSS, empty", |f| f.rss_empty_mb, "MB"),
            ("RSS, all leases live", |f| f.rss_loaded_mb, "MB"),
            ("RSS peak while issuing", |f| f.rss_peak_mb, "MB"),
            ("restart → ready (health)", |f| Some(f.restart_ready_s), "s"),
            (
                "restart → first lease",
                |f| Some(f.restart_first_lease_s),
                "s",
            ),
            ("RSS after restart", |f| Some(f.restart_rss_mb), "MB"),
            (
                "RSS peak, restart → first lease",
                |f| Some(f.restart_rss_peak_mb),
                "MB",
            ),
            (
                "first orphan sweep: roles listed",
                |f| Some(f.sweep_users as f64),
                "",
            ),
            ("first orphan sweep: duration", |f| Some(f.sweep_s), "s"),
            (
                "RSS peak during the sweep",
                |f| Some(f.sweep_rss_peak_mb),
                "MB",
            ),
            (
                "RSS after first orphan sweep",
                |f| Some(f.restart_rss_after_sweep_mb),
                "MB",
            ),
            (
                "reaper wake-up, nothing due",
                |f| Some(f.reaper_wake_us),
                "µs",
            ),
        ];
        for (label, get, unit) in rows {
            out.push_str(&format!(
                "| {label} | {} | {} |\n",
                cell(&self.live, get, unit),
                cell(&self.rows, get, unit)
            ));
        }
        if let Some(s) = &self.live_scale {
            out.push_str(&s.markdown());
        }
        out.push_str(&format!(
            "\nthrowaway PostgreSQL stopped and removed in {:.2} s\n",
            self.throwaway_teardown_s
        ));
        out
    }
}

impl LiveScale {
    fn markdown(&self) -> String {
        let mut out = String::from(
            "\n## Live leases as they grow\n\n| live | elapsed s | issued/s since last | broker RSS MB |\n|---:|---:|---:|---:|\n",
        );
        for g in &self.growth {
            out.push_str(&format!(
                "| {} | {:.1} | {:.0} | {:.1} |\n",
                g.live, g.elapsed_s, g.rate_per_s, g.rss_mb
            ));
        }
        out.push_str(&format!(
            "\npg_authid + pg_auth_members with every lease live: {:.0} MB\n",
            self.pg_catalog_mb
        ));
        out.push_str(&format!(
            "\n## `admin leases` over every live lease (Admin.ListLeases, p50 of {LIST_RUNS})\n\n\
             | filter | rows | p50 ms | max ms |\n|---|---:|---:|---:|\n"
        ));
        for l in &self.listings {
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} |\n",
                l.filter, l.rows, l.p50_ms, l.max_ms
            ));
        }
        if let Some(r) = &self.reaper {
            out.push_str(&format!(
                "\n## Reaper order, the other leases live\n\n\
                 | figure | value |\n|---|---:|\n\
                 | leases due at staggered instants (random order of ids) | {} over {:.0} s |\n\
                 | reaper batch size | {} |\n\
                 | inversions (pairs revoked against due order; ties not counted) | {} |\n\
                 | distinct revocation instants (≈ batches) | {} |\n\
                 | due → revoked p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |\n\
                 | first due → last role gone | {:.2} s |\n",
                r.leases,
                r.span_s,
                r.batch_size,
                r.inversions,
                r.revocation_instants,
                r.due_to_revoked.p50_ms,
                r.due_to_revoked.p99_ms,
                r.due_to_revoked.max_ms,
                r.all_gone_s
            ));
        }
        if let Some(t) = &self.teardown {
            out.push_str(&format!(
                "\n## Teardown: every remaining lease due at once\n\n\
                 | figure | value |\n|---|---:|\n\
                 | leases | {} |\n\
                 | due → every role dropped | {:.1} s |\n\
                 | revocations per second | {:.0} |\n\
                 | live rows left in the store | {} |\n",
                t.leases, t.roles_gone_s, t.revoked_per_s, t.store_live_left
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::inversions;

    #[test]
    fn inversions_count_pairs_out_of_order_not_ties() {
        assert_eq!(inversions(&mut []), 0);
        assert_eq!(inversions(&mut [1, 2, 2, 3]), 0);
        assert_eq!(inversions(&mut [3, 2, 1]), 3);
        assert_eq!(inversions(&mut [1, 3, 2, 2, 4]), 2);
        let mut v: Vec<i64> = (0..200).rev().collect();
        assert_eq!(inversions(&mut v), 200 * 199 / 2);
    }
}
