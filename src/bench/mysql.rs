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

use crate::bench::lease::{self, Meter, Options, Report, Run, Scenario};
use crate::bench::setup::{self, BrokerSettings, InProcess};
use crate::bench::{io_err, Machine};
use credbroker::error::{Error, Result};
use credbroker::lease::Password;
use credbroker_testkit::throwaway::{MariadbOptions, ThrowawayMariadb};

pub(crate) const SCHEMA: &str = "bench";

pub async fn run(opts: &Options) -> Result<Report> {
    let db = ThrowawayMariadb::start(MariadbOptions::default())
        .await
        .map_err(io_err("throwaway MariaDB"))?;
    let mut root = root(&db).await?;
    root.query_drop(format!(
        "CREATE DATABASE `{SCHEMA}`; CREATE TABLE `{SCHEMA}`.orders (id INT PRIMARY KEY, item TEXT)"
    ))
    .await
    .map_err(my_err("create schema"))?;
    let version: Option<String> = root
        .query_first("SELECT VERSION()")
        .await
        .map_err(my_err("version"))?;
    let mut machine = Machine::sample(format!(
        "MariaDB {} (throwaway, innodb_flush_log_at_trx_commit = 0, same host)",
        version.unwrap_or_default()
    ));
    let dir = setup::bench_dir("mysql")?;
    let settings = BrokerSettings {
        max_connections: opts.pool,
        ..Default::default()
    };
    let env = setup::write_env_with(
        dir.path(),
        "127.0.0.1:0",
        &settings,
        |env| env.mysql_database(setup::DB, db.port(), SCHEMA, Some(db.root_password())),
        &format!("GRANT SELECT ON `{SCHEMA}`.orders TO {{{{name}}}}"),
    )?;
    let broker = if opts.scenarios.contains(&Scenario::Credbroker) {
        Some(InProcess::start(&env).await?)
    } else {
        None
    };
    let pid = db
        .server_pid()
        .ok_or_else(|| Error::internal("the throwaway MariaDB is not running"))?;
    let meter = Meter::Process(pid);
    let mut runs = Vec::new();
    for &callers in &opts.callers {
        for &scenario in &opts.scenarios {
            let r = match scenario {
                Scenario::Plaintext | Scenario::Verifier => {
                    measure_direct(&db, &meter, scenario, callers, opts).await?
                }
                Scenario::BackendSql => lease::measure_backend(&env, &meter, callers, opts).await?,
                Scenario::Credbroker => {
                    let b = broker.as_ref().expect("started above");
                    lease::measure_broker(&env, &meter, &b.addr, callers, opts).await?
                }
            };
            lease::print_run(&r);
            runs.push(r);
        }
    }
    if let Some(b) = broker {
        b.stop().await?;
    }
    machine.finish();
    Ok(Report {
        file: "mysql",
        baselines: "(a) CREATE USER … IDENTIFIED BY 'plaintext'; (b) the same with IDENTIFIED BY PASSWORD '*<hash>'",
        grant_sql: format!("GRANT SELECT ON `{SCHEMA}`.orders TO <user>"),
        machine,
        duration_s: opts.duration.as_secs_f64(),
        fixed_leases: opts.leases,
        broker_pool: opts.pool,
        grant: opts.grant,
        issue_only: false,
        runs,
    })
}

pub(crate) fn my_err(what: &'static str) -> impl Fn(mysql_async::Error) -> Error {
    move |e| Error::internal(format!("{what}: {e}"))
}

async fn root(db: &ThrowawayMariadb) -> Result<mysql_async::Conn> {
    mysql_async::Conn::new(db.opts())
        .await
        .map_err(my_err("root login"))
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
        move |mut conn: mysql_async::Conn| async move {
            let r = direct_cycle(&mut conn, hashed).await;
            (conn, r)
        },
    )
    .await
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
