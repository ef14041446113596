//! The lease path on MariaDB, side by side on one throwaway `mariadbd`
//! (event scheduler on, as the failsafe needs), the same columns as the
//! PostgreSQL bench:
//!
//! - (a) what most brokers send: `CREATE USER … IDENTIFIED BY 'plaintext'`
//!   and a grant, then `DROP USER`;
//! - (b) the same with a broker-computed hash (`IDENTIFIED BY PASSWORD
//!   '*…'`): the server's own limit for this work;
//! - (b′) credbroker's `MysqlBackend` called straight: hash, failsafe event
//!   first, user and grants; then `ACCOUNT LOCK`, `KILL` of sessions,
//!   definers moved, `DROP USER`, event dropped;
//! - (c) credbroker end to end over mTLS gRPC.
//!
//! Only MariaDB runs here; MySQL 8 (caching_sha2_password) is not measured.

use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use rand::Rng;

use crate::bench::cpu::Meter;
use crate::bench::lease::{self, Kept, Options, Report, Run, Scenario};
use crate::bench::setup::{self, BrokerSettings};
use crate::bench::{io_err, Machine};
use credbroker::error::{Error, Result};
use credbroker::lease::Password;
use credbroker_testkit::devenv::DevEnv;
use credbroker_testkit::throwaway::{MariadbOptions, ThrowawayMariadb};

pub(crate) const SCHEMA: &str = "bench";

pub async fn run(opts: &Options) -> Result<Report> {
    let db = BenchMariadb::start(false).await?;
    let machine = Machine::sample(db.version.clone());
    let dir = setup::bench_dir("mysql")?;
    let settings = BrokerSettings {
        max_connections: opts.pool,
        ..Default::default()
    };
    let env = db.write_env(dir.path(), "127.0.0.1:0", &settings)?;
    let meter = Meter::Process(db.pid);
    let runs = lease::runs(opts, &env, &meter, |scenario, callers| {
        measure_direct(&db.db, &meter, scenario, callers, opts)
    })
    .await?;
    Ok(Report {
        file: "mysql",
        baselines: "(a) CREATE USER … IDENTIFIED BY 'plaintext'; (b) the same with IDENTIFIED BY PASSWORD '*<hash>'",
        grant_sql: format!("GRANT SELECT ON `{SCHEMA}`.orders TO <user>"),
        ..Report::new(opts, machine, runs)
    })
}

/// A throwaway MariaDB with schema [`SCHEMA`] and a table to grant on.
pub(crate) struct BenchMariadb {
    pub db: ThrowawayMariadb,
    /// `mariadbd`'s pid, for its CPU time.
    pub pid: u32,
    /// What the report says of it.
    pub version: String,
}

impl BenchMariadb {
    /// `durable`: every commit flushed (`innodb_flush_log_at_trx_commit =
    /// 1`), as PostgreSQL runs with fsync on; otherwise the throwaway's 0.
    pub async fn start(durable: bool) -> Result<BenchMariadb> {
        let db = ThrowawayMariadb::start(MariadbOptions::default())
            .await
            .map_err(io_err("throwaway MariaDB"))?;
        let mut root = mysql_async::Conn::new(db.opts())
            .await
            .map_err(my_err("root login"))?;
        let (set, what) = if durable {
            (
                "SET GLOBAL innodb_flush_log_at_trx_commit = 1; ",
                "durable settings and schema",
            )
        } else {
            ("", "create schema")
        };
        root.query_drop(format!(
            "{set}CREATE DATABASE `{SCHEMA}`; CREATE TABLE `{SCHEMA}`.orders (id INT PRIMARY KEY, item TEXT)"
        ))
        .await
        .map_err(my_err(what))?;
        let version: Option<String> = root
            .query_first("SELECT VERSION()")
            .await
            .map_err(my_err("version"))?;
        let pid = db
            .server_pid()
            .ok_or_else(|| Error::internal("the throwaway MariaDB is not running"))?;
        Ok(BenchMariadb {
            version: format!(
                "MariaDB {} (throwaway, innodb_flush_log_at_trx_commit = {}, same host)",
                version.unwrap_or_default(),
                u8::from(durable)
            ),
            db,
            pid,
        })
    }

    /// The bench config (see [`setup::write_env_with`]) on this server's
    /// schema, its role granted `SELECT` on the table.
    pub fn write_env(
        &self,
        dir: &std::path::Path,
        listen: &str,
        settings: &BrokerSettings,
    ) -> Result<DevEnv> {
        setup::write_env_with(
            dir,
            listen,
            settings,
            |env| {
                env.mysql_database(
                    setup::DB,
                    self.db.port(),
                    SCHEMA,
                    Some(self.db.root_password()),
                )
            },
            &format!("GRANT SELECT ON `{SCHEMA}`.orders TO {{{{name}}}}"),
        )
    }
}

pub(crate) fn my_err(what: &'static str) -> impl Fn(mysql_async::Error) -> Error {
    move |e| Error::internal(format!("{what}: {e}"))
}

async fn measure_direct(
    db: &ThrowawayMariadb,
    meter: &Meter,
    scenario: Scenario,
    callers: usize,
    opts: &Options,
) -> Result<Run> {
    let hashed = scenario == Scenario::Verifier;
    let opts_db = db.opts();
    lease::drive(
        scenario,
        meter,
        callers,
        opts,
        || {
            let o = opts_db.clone();
            async move { mysql_async::Conn::new(o).await.map_err(my_err("connect")) }
        },
        // No `--issue-only` here: nothing is kept.
        move |mut conn: mysql_async::Conn, _: Kept<()>| async move {
            let r = direct_cycle(&mut conn, hashed).await;
            (conn, r)
        },
    )
    .await
    .map(|(run, _)| run)
}

/// One user created with a grant and dropped, as a broker that talks to
/// MariaDB directly does it; one round trip each way.
pub(crate) async fn direct_cycle(conn: &mut mysql_async::Conn, hashed: bool) -> Result<Duration> {
    let t = Instant::now();
    let n: u64 = rand::rng().random();
    let name = format!("'bd_{n:016x}'@'%'");
    let password = Password::generate();
    // Broker-made passwords are alphanumeric: no quoting to get wrong.
    let secret = if hashed {
        format!(
            "PASSWORD '{}'",
            credbroker::backend::mysql::auth::native_password_hash(&password)
        )
    } else {
        format!("'{}'", password.expose())
    };
    conn.query_drop(format!(
        "CREATE USER {name} IDENTIFIED BY {secret}; GRANT SELECT ON `{SCHEMA}`.orders TO {name}"
    ))
    .await
    .map_err(my_err("create user"))?;
    let issued = t.elapsed();
    conn.query_drop(format!("DROP USER {name}"))
        .await
        .map_err(my_err("drop user"))?;
    Ok(issued)
}
