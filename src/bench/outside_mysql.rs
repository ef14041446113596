//! `credbroker bench outside --mysql`: the outside bench's table on a
//! throwaway MariaDB — `credbroker serve` in its own process (SQLite store
//! on disk, durable defaults) driven by `credbroker bench-client` over the
//! network, and the same work sent straight from that client process:
//!
//! - (a) plaintext `CREATE USER … IDENTIFIED BY '…'` + `GRANT SELECT ON
//!   bench.orders`, then `DROP USER`, as root (`bench::mysql::direct_cycle`);
//! - (b′) credbroker's own `MysqlBackend` called straight (failsafe event,
//!   user with its hash, grant; then `ACCOUNT LOCK`, `KILL`, definers,
//!   `DROP USER`, event dropped): the statements credbroker sends;
//! - (c) credbroker over mTLS gRPC; (c-v) over its Vault API.
//!
//! MariaDB is made durable for the run (`innodb_flush_log_at_trx_commit =
//! 1`, as PostgreSQL runs with fsync on in `bench outside`); the
//! throwaway's default (0) is for the test suite's speed. No OpenBao
//! column here, and no WAL counter: CPU per lease is `mariadbd`'s.

use std::path::Path;

use mysql_async::prelude::Queryable;

use crate::bench::client::{Job, Work};
use crate::bench::cpu::{Apart, ApartPerLease};
use crate::bench::mysql::{my_err, SCHEMA};
use crate::bench::outside::{self, ClientProcess, Column, Options, Report, Run};
use crate::bench::setup::{self, BrokerSettings};
use crate::bench::{io_err, loadavg, Machine};
use credbroker::error::{Error, Result};
use credbroker_testkit::throwaway::{MariadbOptions, ThrowawayMariadb};

/// The columns this bench has: OpenBao's engine is not set up on MariaDB.
const COLUMNS: [Column; 4] = [
    Column::Plaintext,
    Column::SameSql,
    Column::Grpc,
    Column::VaultApi,
];

pub async fn run(opts: &Options) -> Result<Report> {
    let db = ThrowawayMariadb::start(MariadbOptions::default())
        .await
        .map_err(io_err("throwaway MariaDB"))?;
    let mut root = mysql_async::Conn::new(db.opts())
        .await
        .map_err(my_err("root login"))?;
    root.query_drop(format!(
        "SET GLOBAL innodb_flush_log_at_trx_commit = 1; \
         CREATE DATABASE `{SCHEMA}`; CREATE TABLE `{SCHEMA}`.orders (id INT PRIMARY KEY, item TEXT)"
    ))
    .await
    .map_err(my_err("durable settings and schema"))?;
    let version: Option<String> = root
        .query_first("SELECT VERSION()")
        .await
        .map_err(my_err("version"))?;
    drop(root);
    let mut machine = Machine::sample(format!(
        "MariaDB {} (throwaway, innodb_flush_log_at_trx_commit = 1, same host)",
        version.unwrap_or_default()
    ));
    let db_pid = db
        .server_pid()
        .ok_or_else(|| Error::internal("the throwaway MariaDB is not running"))?;
    let dir = setup::bench_dir("outside-mysql")?;
    let (grpc_port, vault_port) = (setup::free_port()?, setup::free_port()?);
    let env = setup::write_env_with(
        dir.path(),
        &format!("127.0.0.1:{grpc_port}"),
        &BrokerSettings::default(),
        |env| env.mysql_database(setup::DB, db.port(), SCHEMA, Some(db.root_password())),
        &format!("GRANT SELECT ON `{SCHEMA}`.orders TO {{{{name}}}}"),
    )?;
    let mut config = std::fs::read_to_string(&env.config_path).map_err(io_err("read config"))?;
    config.push_str(&outside::vault_api_section(
        vault_port,
        opts.vault_token_cache,
    ));
    std::fs::write(&env.config_path, config).map_err(io_err("write config"))?;
    let columns: Vec<Column> = COLUMNS
        .into_iter()
        .filter(|c| opts.columns.contains(c))
        .collect();
    let mut broker = if columns.contains(&Column::Grpc) || columns.contains(&Column::VaultApi) {
        Some(setup::Spawned::start(&env, &format!("https://127.0.0.1:{grpc_port}")).await?)
    } else {
        None
    };
    let work = |c: Column| match c {
        Column::Plaintext => Work::MysqlPlaintext {
            port: db.port(),
            user: "root".into(),
            password: db.root_password().into(),
        },
        Column::SameSql => Work::Sql {
            config: env.config_path.clone(),
        },
        Column::Grpc => Work::Grpc {
            port: grpc_port,
            pki: env.pki.clone(),
        },
        // Only the columns above get here.
        Column::VaultApi | Column::OpenBao => Work::Vault {
            port: vault_port,
            pki: env.pki.clone(),
            mount: crate::bench::openbao::MOUNT.into(),
            role: setup::ROLE.into(),
        },
    };
    let mut runs = Vec::new();
    for &callers in &opts.callers {
        for &column in &columns {
            let server = match column {
                Column::Grpc | Column::VaultApi => broker.as_ref().map(|b| b.pid()),
                _ => None,
            };
            let mut best: Option<Run> = None;
            for _ in 0..opts.rounds.max(1) {
                let job = Job {
                    work: work(column),
                    callers,
                    duration_ms: opts.duration.as_millis() as u64,
                    leases: opts.leases,
                };
                let r = measure(column, job, server, db_pid, dir.path()).await?;
                if best
                    .as_ref()
                    .is_none_or(|b| r.leases_per_s > b.leases_per_s)
                {
                    best = Some(r);
                }
            }
            if let Some(r) = best {
                outside::print_run(&r);
                runs.push(r);
            }
        }
    }
    if let Some(b) = broker.as_mut() {
        b.stop().await?;
    }
    machine.finish();
    Ok(Report {
        machine,
        duration_s: opts.duration.as_secs_f64(),
        fixed_leases: opts.leases,
        rounds: opts.rounds.max(1),
        openbao: "not set up on MariaDB".into(),
        runs,
    })
}

/// One run, as `outside::measure` does it, with `mariadbd`'s CPU.
async fn measure(
    column: Column,
    job: Job,
    server: Option<u32>,
    db_pid: u32,
    dir: &Path,
) -> Result<Run> {
    let callers = job.callers;
    let mut client = ClientProcess::start(&job, dir).await?;
    let load = loadavg();
    let before = Apart::pids(server, client.pid, db_pid);
    let outcome = client.run().await?;
    let after = Apart::pids(server, client.pid, db_pid);
    client.finish().await?;
    Ok(Run {
        column,
        callers,
        leases: outcome.leases,
        errors: outcome.errors,
        seconds: outcome.seconds,
        leases_per_s: outcome.leases as f64 / outcome.seconds.max(1e-9),
        cycle: outcome.cycle,
        cost: ApartPerLease::between(&before, &after, outcome.leases),
        load,
        first_error: outcome.first_error,
    })
}

/// The report, titled for MariaDB.
pub fn markdown(r: &Report) -> String {
    r.markdown().replacen(
        "# credbroker bench outside:",
        "# credbroker bench outside --mysql (MariaDB):",
        1,
    )
}
