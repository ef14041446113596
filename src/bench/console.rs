//! The web console's pages over a store of many live leases (100,000 by
//! default): milliseconds per page request, measured through the console's
//! own router (page handlers, store queries, templates) without the TLS
//! handshake, which a browser pays once per connection, not per page.
//!
//! The store is the default SQLite file (or, with `--store postgres`, a
//! PostgreSQL store on the bench server), filled with synthetic live rows;
//! every listing is filtered, counted and paged in the store, so a page
//! costs the same whether it is the first or the thousandth.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde::Serialize;
use tower::ServiceExt;

use crate::bench::scale::{env_for, write_synthetic};
use crate::bench::setup::{bench_dir, BenchPostgres};
use crate::bench::{Latency, Machine};
use credbroker::config::Config;
use credbroker::console::{router, Console};
use credbroker::daemon::Daemon;
use credbroker::error::{Error, Result};
use credbroker::identity::Identity;
use credbroker::server::https::Peer;

/// Which lease store the pages read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sqlite" => Some(StoreKind::Sqlite),
            "postgres" => Some(StoreKind::Postgres),
            _ => None,
        }
    }
}

pub struct Options {
    /// Synthetic live leases in the store.
    pub leases: u64,
    pub store: StoreKind,
    /// Timed requests per page (after two untimed ones).
    pub requests: usize,
    pub out_dir: PathBuf,
}

#[derive(Serialize)]
pub struct PageFigures {
    pub page: &'static str,
    pub path: &'static str,
    pub requests: usize,
    pub latency: Latency,
    pub mean_ms: f64,
    pub bytes: usize,
}

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    pub leases: u64,
    pub store: StoreKind,
    pub setup_seconds: f64,
    pub pages: Vec<PageFigures>,
}

/// The pages measured: what an on-call clicks during an incident.
const PAGES: &[(&str, &str)] = &[
    ("leases, first page", "/leases"),
    ("leases, page 1,000 (offset 49,950)", "/leases?page=1000"),
    ("leases, latest expiry first", "/leases?sort=-expires"),
    (
        "leases of one identity (1 in 500)",
        "/leases?identity=spiffe%3A%2F%2Fcredbroker.dev%2Fns%2Fsynthetic%2Fsvc7",
    ),
    ("leases expiring within 90m", "/leases?within=90m"),
    (
        "revoke-all confirmation (counts the role)",
        "/leases/revoke-matching?role=bench",
    ),
    ("overview", "/"),
];

pub async fn run(opts: &Options) -> Result<Report> {
    let pg = BenchPostgres::start(false).await?;
    let mut machine = Machine::sample(pg.version.clone());
    let dir = bench_dir("console")?;
    let (env, _) = env_for(dir.path(), &pg, "bc_")?;
    let t = Instant::now();
    match opts.store {
        StoreKind::Sqlite => write_synthetic(&env.store_path, opts.leases).await?,
        StoreKind::Postgres => postgres_store(&pg, &env, opts.leases).await?,
    }
    let setup_seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "  wrote {} synthetic live leases in {setup_seconds:.1} s",
        opts.leases
    );
    // Opened, not run: no reaper or sweep touches the synthetic rows.
    let daemon = Daemon::open(Config::load(&env.config_path)?).await?;
    let admin = Identity::parse(credbroker_testkit::pki::DEV_ADMIN_ID)?;
    let peer = Peer {
        addr: "127.0.0.1:1".parse().map_err(Error::internal)?,
        identity: Ok(admin),
        cert_sha256: [0; 32],
    };
    let app = router(Arc::new(Console::new(daemon.broker.clone()))).layer(axum::Extension(peer));
    let mut pages = Vec::new();
    for &(page, path) in PAGES {
        let mut samples = Vec::with_capacity(opts.requests);
        let mut bytes = 0;
        for i in 0..opts.requests + 2 {
            let req = Request::get(path)
                .body(Body::empty())
                .map_err(Error::internal)?;
            let t = Instant::now();
            let resp = app.clone().oneshot(req).await.map_err(Error::internal)?;
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .map_err(Error::internal)?;
            let took = t.elapsed();
            if status != StatusCode::OK {
                return Err(Error::internal(format!("{path}: status {status}")));
            }
            bytes = body.len();
            // The first two warm caches (SQLite pages, the probe).
            if i >= 2 {
                samples.push(took);
            }
        }
        let mean_ms =
            samples.iter().sum::<Duration>().as_secs_f64() * 1000.0 / samples.len().max(1) as f64;
        let latency = Latency::of(&mut samples);
        eprintln!(
            "  {page}: p50 {:.1} ms, p99 {:.1} ms",
            latency.p50_ms, latency.p99_ms
        );
        pages.push(PageFigures {
            page,
            path,
            requests: opts.requests,
            latency,
            mean_ms,
            bytes,
        });
    }
    machine.finish();
    Ok(Report {
        machine,
        leases: opts.leases,
        store: opts.store,
        setup_seconds,
        pages,
    })
}

/// A PostgreSQL lease store on the bench server (database `store`),
/// migrated by the broker's own code and filled with `n` live leases like
/// the SQLite ones; the config is pointed at it.
async fn postgres_store(
    pg: &BenchPostgres,
    env: &credbroker_testkit::devenv::DevEnv,
    n: u64,
) -> Result<()> {
    pg.pg
        .create_database("store")
        .await
        .map_err(Error::internal)?;
    let secret = env.dir.join("secrets").join("store");
    credbroker::fsutil::write_secret_file(&secret, pg.pg.superuser_password().as_bytes())
        .map_err(Error::internal)?;
    let url = pg.pg.url("store");
    let password = credbroker::config::SecretSource::File(secret.clone());
    drop(credbroker::store::postgres::PostgresStore::open(&url, &password).await?);
    let client = pg.pg.connect("store").await.map_err(Error::internal)?;
    client
        .execute(
            "INSERT INTO credbroker_leases (id, role, database, kind, username, user_host, identity, state, \
             issued_at, expires_at, max_expires_at, due_at) \
             SELECT 'lease_' || lpad(i::text, 26, '0'), $1, $2, 'postgres', \
                    'sy_bench_' || lpad(to_hex(i), 16, '0'), '', \
                    'spiffe://credbroker.dev/ns/synthetic/svc' || (i % 500), 'active', now(), \
                    now() + interval '1 hour' + ((i * 7) % 3600000) * interval '1 millisecond', \
                    now() + interval '2 hours' + ((i * 7) % 3600000) * interval '1 millisecond', \
                    now() + interval '1 hour' + ((i * 7) % 3600000) * interval '1 millisecond' \
             FROM generate_series(0::bigint, $3::bigint - 1) AS i",
            &[&crate::bench::setup::ROLE, &crate::bench::setup::DB, &(n as i64)],
        )
        .await
        .map_err(|e| Error::internal(format!("synthetic rows: {e}")))?;
    // What autovacuum does to a store in steady state: statistics, and the
    // visibility map that lets counts read the index alone.
    client
        .batch_execute("VACUUM ANALYZE credbroker_leases")
        .await
        .map_err(Error::internal)?;
    let config = std::fs::read_to_string(&env.config_path).map_err(Error::internal)?;
    let sqlite = format!("url = \"sqlite://{}\"", env.store_path.display());
    if !config.contains(&sqlite) {
        return Err(Error::internal("bench config has no sqlite store line"));
    }
    let config = config.replace(
        &sqlite,
        &format!("url = \"{url}\"\npassword_file = \"{}\"", secret.display()),
    );
    std::fs::write(&env.config_path, config).map_err(Error::internal)
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "## Console pages over {} live leases ({} store)\n\n{}\n\
             | page | p50 ms | p99 ms | mean ms | max ms | KiB |\n|---|---:|---:|---:|---:|---:|\n",
            self.leases,
            match self.store {
                StoreKind::Sqlite => "SQLite",
                StoreKind::Postgres => "PostgreSQL",
            },
            self.machine.markdown()
        );
        for p in &self.pages {
            md.push_str(&format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
                p.page,
                p.latency.p50_ms,
                p.latency.p99_ms,
                p.mean_ms,
                p.latency.max_ms,
                p.bytes as f64 / 1024.0
            ));
        }
        md.push_str(&format!(
            "\n{} requests per page after two untimed ones; through the console's router, without TLS.\n",
            self.pages.first().map(|p| p.requests).unwrap_or(0)
        ));
        md
    }
}
