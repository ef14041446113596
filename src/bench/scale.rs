//! Scale: what many leases cost the broker process.
//!
//! - live: `live` leases with real PostgreSQL roles, issued through the real
//!   `credbroker serve` binary; its resident memory, its restart-to-ready
//!   time, and the reaper's wake-up cost over that store.
//! - rows: `rows` synthetic lease rows written straight into a store file
//!   (their roles need not exist); restart-to-ready, memory, wake-up cost.
//!
//! The broker runs as its own process so its memory is its own. "Ready"
//! is a served gRPC health check; "first lease" is a successful issue.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use crate::bench::reaper::issue_many;
use crate::bench::setup::{self, BenchPostgres, BrokerSettings};
use crate::bench::{io_err, rss_mb, write_report, Machine};
use crate::devenv::DevEnv;
use crate::error::{Error, Result};
use crate::store::{Claim, LeaseStore};

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
    pub rows: Option<Figures>,
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
    pub restart_rss_peak_mb: f64,
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
        report.live = Some(live(&pg, opts).await?);
    }
    if opts.rows > 0 {
        report.rows = Some(rows(&pg, opts).await?);
    }
    if let Some(m) = report.machine.as_mut() {
        m.finish();
    }
    Ok(report)
}

pub(crate) fn bench_dir(tag: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("credbroker-bench-{tag}-"))
        .tempdir()
        .map_err(Error::internal)
}

/// Each part gets its own user-name prefix: a broker sweeps every user with
/// its prefix that its store does not know, and both parts share a server.
pub(crate) fn env_for(dir: &Path, pg: &BenchPostgres, prefix: &str) -> Result<(DevEnv, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io_err("free port"))?
        .port();
    let settings = BrokerSettings {
        name_prefix: prefix.into(),
        ..Default::default()
    };
    let env = setup::write_env(dir, pg, &format!("127.0.0.1:{port}"), &settings)?;
    Ok((env, port))
}

async fn live(pg: &BenchPostgres, opts: &Options) -> Result<Figures> {
    let dir = bench_dir("live")?;
    let (env, port) = env_for(dir.path(), pg, "bs_")?;
    let addr = format!("https://127.0.0.1:{port}");
    let mut broker = Spawned::start(&env, &addr).await?;
    let mut f = Figures {
        leases: opts.live,
        rss_empty_mb: rss_mb(broker.pid()),
        ..Default::default()
    };
    let t = Instant::now();
    issue_many(&env, &addr, opts.live, opts.callers, 7200).await?;
    f.setup_seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "  issued {} live leases in {:.1} s ({:.0}/s)",
        opts.live,
        f.setup_seconds,
        opts.live as f64 / f.setup_seconds
    );
    f.rss_loaded_mb = rss_mb(broker.pid());
    f.rss_peak_mb = hwm_mb(broker.pid());
    broker.stop().await?;
    restart(&env, &addr, &mut f).await?;
    f.store_file_mb = file_mb(&env.store_path);
    Ok(f)
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
    restart(&env, &addr, &mut f).await?;
    Ok(f)
}

/// Starts the broker over an existing store and measures it, then the
/// reaper's wake-up cost on that store.
async fn restart(env: &DevEnv, addr: &str, f: &mut Figures) -> Result<()> {
    let t = Instant::now();
    let mut broker = Spawned::start(env, addr).await?;
    f.restart_ready_s = t.elapsed().as_secs_f64();
    f.restart_rss_mb = rss_mb(broker.pid()).unwrap_or_default();
    let mut client = setup::connected_client(env, addr).await?;
    setup::issue(&mut client, 600).await?;
    f.restart_first_lease_s = t.elapsed().as_secs_f64();
    // The first orphan sweep runs 10 s after start.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(t.elapsed())).await;
    f.restart_rss_after_sweep_mb = rss_mb(broker.pid()).unwrap_or_default();
    f.restart_rss_peak_mb = hwm_mb(broker.pid()).unwrap_or_default();
    broker.stop().await?;
    f.reaper_wake_us = wake_cost(&env.store_path).await?;
    eprintln!(
        "  restart: ready in {:.2} s, first lease at {:.2} s, RSS {:.0} MB ({:.0} MB after the first sweep, peak {:.0} MB), reaper wake {:.0} µs",
        f.restart_ready_s,
        f.restart_first_lease_s,
        f.restart_rss_mb,
        f.restart_rss_after_sweep_mb,
        f.restart_rss_peak_mb,
        f.reaper_wake_us
    );
    Ok(())
}

/// The work of one reaper wake-up with nothing due, averaged.
async fn wake_cost(store: &Path) -> Result<f64> {
    let store = crate::store::sqlite::SqliteStore::open(store).await?;
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
    drop(crate::store::sqlite::SqliteStore::open(path).await?);
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

fn hwm_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// `credbroker serve` as a child process.
struct Spawned {
    child: Child,
}

impl Spawned {
    /// Spawns it and returns once it answers a gRPC health check.
    async fn start(env: &DevEnv, addr: &str) -> Result<Self> {
        let exe = std::env::current_exe().map_err(io_err("own executable"))?;
        let log = std::fs::File::create(env.dir.join("broker.log")).map_err(io_err("log"))?;
        let child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(&env.config_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(io_err("spawn credbroker serve"))?;
        let mut me = Spawned { child };
        let limit = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = me.child.try_wait().map_err(io_err("wait"))? {
                return Err(Error::internal(format!(
                    "credbroker serve exited with {status}; see {}",
                    env.dir.join("broker.log").display()
                )));
            }
            if setup::connected_client(env, addr).await.is_ok() {
                return Ok(me);
            }
            if Instant::now() > limit {
                return Err(Error::internal("credbroker serve not ready within 120 s"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn stop(&mut self) -> Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let limit = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().map_err(io_err("wait"))?.is_none() {
            if Instant::now() > limit {
                let _ = self.child.kill();
                return Err(Error::internal("credbroker serve did not stop on SIGTERM"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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
        let cell = |f: &Option<Figures>, get: &dyn Fn(&Figures) -> Option<f64>, unit: &str| {
            f.as_ref()
                .and_then(get)
                .map(|v| match unit {
                    "" => format!("{v:.0}"),
                    _ => format!("{v:.2} {unit}"),
                })
                .unwrap_or_else(|| "–".into())
        };
        type Get = Box<dyn Fn(&Figures) -> Option<f64>>;
        let rows: Vec<(&str, Get, &str)> = vec![
            ("leases", Box::new(|f| Some(f.leases as f64)), ""),
            (
                "setup (issue / write)",
                Box::new(|f| Some(f.setup_seconds)),
                "s",
            ),
            ("store file", Box::new(|f| Some(f.store_file_mb)), "MB"),
            ("RSS, empty", Box::new(|f| f.rss_empty_mb), "MB"),
            ("RSS, all leases live", Box::new(|f| f.rss_loaded_mb), "MB"),
            ("RSS peak while issuing", Box::new(|f| f.rss_peak_mb), "MB"),
            (
                "restart → ready (health)",
                Box::new(|f| Some(f.restart_ready_s)),
                "s",
            ),
            (
                "restart → first lease",
                Box::new(|f| Some(f.restart_first_lease_s)),
                "s",
            ),
            (
                "RSS after restart",
                Box::new(|f| Some(f.restart_rss_mb)),
                "MB",
            ),
            (
                "RSS after first orphan sweep",
                Box::new(|f| Some(f.restart_rss_after_sweep_mb)),
                "MB",
            ),
            (
                "RSS peak after restart",
                Box::new(|f| Some(f.restart_rss_peak_mb)),
                "MB",
            ),
            (
                "reaper wake-up, nothing due",
                Box::new(|f| Some(f.reaper_wake_us)),
                "µs",
            ),
        ];
        for (label, get, unit) in rows {
            out.push_str(&format!(
                "| {label} | {} | {} |\n",
                cell(&self.live, &*get, unit),
                cell(&self.rows, &*get, unit)
            ));
        }
        out
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        write_report(dir, "scale", &self.markdown(), self)
    }
}
