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

use crate::bench::client::Work;
use crate::bench::cpu::Meter;
use crate::bench::mysql::BenchMariadb;
use crate::bench::outside::{self, Column, Options, Report};
use crate::bench::setup::{self, BrokerSettings};
use crate::bench::Machine;
use credbroker::error::Result;

/// The columns this bench has: OpenBao's engine is not set up on MariaDB.
const COLUMNS: [Column; 4] = [
    Column::Plaintext,
    Column::SameSql,
    Column::Grpc,
    Column::VaultApi,
];

pub async fn run(opts: &Options) -> Result<Report> {
    let db = BenchMariadb::start(true).await?;
    let machine = Machine::sample(db.version.clone());
    let dir = setup::bench_dir("outside-mysql")?;
    let (grpc_port, vault_port) = (setup::free_port()?, setup::free_port()?);
    let env = db.write_env(
        dir.path(),
        &format!("127.0.0.1:{grpc_port}"),
        &BrokerSettings::default(),
    )?;
    let mut broker = outside::serve(opts, &env, grpc_port, vault_port).await?;
    let columns: Vec<Column> = COLUMNS
        .into_iter()
        .filter(|c| opts.columns.contains(c))
        .collect();
    let work = |c: Column| match c {
        Column::Plaintext => Work::MysqlPlaintext {
            port: db.db.port(),
            user: "root".into(),
            password: db.db.root_password().into(),
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
    let runs = outside::runs(
        opts,
        &columns,
        |c| Some(work(c)),
        |c| match c {
            Column::Grpc | Column::VaultApi => broker.as_ref().map(|b| b.pid()),
            _ => None,
        },
        &Meter::Process(db.pid),
        dir.path(),
    )
    .await?;
    if let Some(b) = broker.as_mut() {
        b.stop().await?;
    }
    Ok(Report::new(
        opts,
        machine,
        "not set up on MariaDB".into(),
        runs,
    ))
}

/// The report, titled for MariaDB.
pub fn markdown(r: &Report) -> String {
    r.markdown().replacen(
        "# credbroker bench outside:",
        "# credbroker bench outside --mysql (MariaDB):",
        1,
    )
}
