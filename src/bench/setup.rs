//! What every benchmark starts from: a throwaway PostgreSQL with a database
//! to grant on, dev certificates, and a broker config pointing at both.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::bench::cpu::Meter;
use crate::bench::{io_err, pg_err};
use credbroker::broker::Broker;
use credbroker::config::Config;
use credbroker::daemon::{Daemon, Listeners};
use credbroker::error::{Error, Result};
use credbroker::pb;
use credbroker_testkit::devenv::DevEnv;
use credbroker_testkit::throwaway::{
    postgres_binaries_present, PostgresOptions, ThrowawayPostgres,
};

/// The database every scenario grants on, and the broker role leasing it.
pub const DB: &str = "bench";
pub const ROLE: &str = "bench";
/// The group role every leased role joins.
pub const GRANT_ROLE: &str = "bench_reader";

/// A throwaway PostgreSQL with database [`DB`] and a table to grant on.
pub struct BenchPostgres {
    pub pg: ThrowawayPostgres,
    pub version: String,
}

impl BenchPostgres {
    /// `durable`: fsync and synchronous commit on, as a production server
    /// runs; otherwise off, as the throwaway default.
    pub async fn start(durable: bool) -> Result<Self> {
        if !postgres_binaries_present() {
            return Err(Error::Config(
                "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin); \
                 install them with `apt-get install -y postgresql`"
                    .into(),
            ));
        }
        let pg = ThrowawayPostgres::start(PostgresOptions {
            timezone: None,
            // Logging every statement would cost the server as much as some
            // of the statements we time.
            log_statement_all: false,
            // Later lines of postgresql.conf win over the throwaway's
            // fsync = off.
            extra_conf: if durable {
                vec![
                    ("fsync".into(), "on".into()),
                    ("synchronous_commit".into(), "on".into()),
                ]
            } else {
                vec![]
            },
            ..PostgresOptions::default()
        })
        .await
        .map_err(io_err("throwaway PostgreSQL"))?;
        pg.create_database(DB)
            .await
            .map_err(io_err("create database"))?;
        let c = pg.connect(DB).await.map_err(io_err("connect"))?;
        // Leased roles get their privileges through membership of a group
        // role: concurrent `GRANT … ON orders` to many new roles would
        // race on the table's ACL ("tuple concurrently updated").
        c.batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, item text);
             CREATE ROLE bench_reader NOLOGIN;
             GRANT SELECT ON orders TO bench_reader;",
        )
        .await
        .map_err(pg_err("create table"))?;
        let version: String = c
            .query_one("SELECT version()", &[])
            .await
            .map_err(pg_err("version"))?
            .get(0);
        let version = version.split(" on ").next().unwrap_or(&version).to_string();
        Ok(BenchPostgres {
            pg,
            version: format!(
                "{version} (throwaway, fsync {}, same host)",
                if durable { "on" } else { "off" }
            ),
        })
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        self.pg.connect(DB).await.map_err(io_err("connect"))
    }

    /// Where a run's costs on this server are read.
    pub async fn meter(&self) -> Result<Meter> {
        Ok(Meter::Postgres {
            data_dir: self.pg.data_dir().to_path_buf(),
            client: self.connect().await?,
        })
    }

    /// How many roles with `prefix` exist.
    pub async fn count_roles(&self, client: &tokio_postgres::Client, prefix: &str) -> Result<i64> {
        let pattern = format!("{}%", prefix.replace('_', "\\_"));
        Ok(client
            .query_one(
                "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1",
                &[&pattern],
            )
            .await
            .map_err(pg_err("count roles"))?
            .get(0))
    }
}

/// A temporary directory for one bench's files (`credbroker-bench-TAG-…`),
/// removed when dropped.
pub fn bench_dir(tag: &str) -> Result<tempfile::TempDir> {
    let prefix = format!("credbroker-bench-{tag}-");
    let mut b = tempfile::Builder::new();
    let b = b.prefix(&prefix);
    // `CREDBROKER_BENCH_DIR` puts the broker's files (config, certificates,
    // lease store, audit log) apart from the throwaway databases, which
    // stay in the temp dir: on another disk, the store's syncs no longer
    // share a journal with the database's, as when the database runs on
    // its own host (BENCHMARKS.md, "Quiet re-measure").
    match std::env::var_os("CREDBROKER_BENCH_DIR") {
        Some(dir) => b.tempdir_in(dir),
        None => b.tempdir(),
    }
    .map_err(Error::internal)
}

/// A port free on 127.0.0.1 now, for a child process to bind (the
/// bench's own processes are the only ones racing for it).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("bind"))?;
    Ok(l.local_addr().map_err(io_err("bind"))?.port())
}

/// Broker settings a scenario varies.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub name_prefix: String,
    /// Backend pool size; None keeps the broker's default.
    pub max_connections: Option<usize>,
    pub reaper_batch: Option<usize>,
    pub grant: Grant,
}

/// How a leased role gets its privileges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// `GRANT bench_reader TO role`: a row in pg_auth_members per role.
    Member,
    /// `GRANT SELECT ON orders TO role`: every lease rewrites the table's
    /// ACL, and concurrent ones race on it.
    Table,
}

impl Grant {
    pub fn parse(s: &str) -> Option<Grant> {
        match s {
            "member" => Some(Grant::Member),
            "table" => Some(Grant::Table),
            _ => None,
        }
    }

    /// The grant for `quoted` (an escaped identifier or `{{name}}`).
    pub fn statement(self, quoted: &str) -> String {
        match self {
            Grant::Member => format!("GRANT {GRANT_ROLE} TO {quoted}"),
            Grant::Table => format!("GRANT SELECT ON orders TO {quoted}"),
        }
    }
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            name_prefix: "bn_".into(),
            max_connections: None,
            reaper_batch: None,
            grant: Grant::Member,
        }
    }
}

/// Writes dev certificates and a config for `pg` into `dir`.
pub fn write_env(
    dir: &Path,
    pg: &BenchPostgres,
    listen: &str,
    settings: &BrokerSettings,
) -> Result<DevEnv> {
    write_env_with(
        dir,
        listen,
        settings,
        |env| env.pg_database(DB, &pg.pg, DB),
        &settings.grant.statement("{{name}}"),
    )
}

/// The one bench config: dev certificates, `settings`, the `[databases.DB]`
/// section `database` writes (of any kind), and role [`ROLE`] with `grant`.
pub fn write_env_with(
    dir: &Path,
    listen: &str,
    settings: &BrokerSettings,
    database: impl FnOnce(&DevEnv) -> std::io::Result<String>,
    grant: &str,
) -> Result<DevEnv> {
    let env = DevEnv::create(dir).map_err(io_err("dev certificates"))?;
    let mut text = env.config_head(listen, None).replace(
        "[server]\n",
        &format!("[server]\nname_prefix = \"{}\"\n", settings.name_prefix),
    );
    if let Some(b) = settings.reaper_batch {
        text.push_str(&format!("[reaper]\nbatch_size = {b}\n\n"));
    }
    let mut db = database(&env).map_err(io_err("admin password file"))?;
    if let Some(n) = settings.max_connections {
        db = db.trim_end().to_string() + &format!("\nmax_connections = {n}\n\n");
    }
    text.push_str(&db);
    text.push_str(&format!(
        "[roles.{ROLE}]\ndatabase = \"{DB}\"\ndefault_ttl = \"10m\"\nmax_ttl = \"2h\"\n\
         allowed = [\"spiffe://credbroker.dev/ns/demo/*\"]\n\
         grants = [\"{grant}\"]\n"
    ));
    std::fs::write(&env.config_path, text).map_err(io_err("write config"))?;
    Ok(env)
}

/// A broker running in this process on a free port, on a runtime of its
/// own whose threads are named [`crate::bench::cpu::BROKER_THREAD`]: its
/// CPU time is then told apart from the load generator's.
pub struct InProcess {
    pub addr: String,
    pub broker: Arc<Broker>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl InProcess {
    pub async fn start(env: &DevEnv) -> Result<Self> {
        let config = Config::load(&env.config_path)?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(crate::bench::cpu::BROKER_THREAD.into())
            .spawn(move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name(crate::bench::cpu::BROKER_THREAD)
                    .enable_all()
                    .build()
                    .map_err(io_err("broker runtime"))?;
                rt.block_on(async move {
                    // Opened on this runtime: the pools' connection tasks
                    // run on its threads too.
                    let opened = async {
                        let grpc = TcpListener::bind("127.0.0.1:0")
                            .await
                            .map_err(io_err("bind"))?;
                        let port = grpc.local_addr().map_err(io_err("bind"))?.port();
                        let daemon = Daemon::open(config).await?;
                        Ok::<_, Error>((grpc, port, daemon))
                    }
                    .await;
                    let (grpc, port, daemon) = match opened {
                        Ok(o) => o,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.clone()));
                            return Err(e);
                        }
                    };
                    let _ = ready_tx.send(Ok((port, daemon.broker.clone())));
                    daemon
                        .run(Listeners::grpc_only(grpc), async {
                            let _ = stop_rx.await;
                        })
                        .await
                })
            })
            .map_err(io_err("broker thread"))?;
        let (port, broker) = ready_rx
            .await
            .map_err(|_| Error::internal("the broker thread ended before it was ready"))??;
        Ok(InProcess {
            addr: format!("https://127.0.0.1:{port}"),
            broker,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || t.join());
            tokio::time::timeout(Duration::from_secs(30), joined)
                .await
                .map_err(|_| Error::internal("broker did not stop within 30 s"))?
                .map_err(Error::internal)?
                .map_err(|_| Error::internal("the broker thread panicked"))??;
        }
        Ok(())
    }
}

/// A connected mTLS client as the dev `app` identity; the handshake is done
/// here, so timed calls reuse an open connection as a long-lived service
/// would.
pub async fn connected_client(
    env: &DevEnv,
    addr: &str,
) -> Result<pb::broker_client::BrokerClient<Channel>> {
    let opts = env.client(addr, "app");
    let channel = opts.channel()?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| Error::internal(format!("broker health check: {s}")))?;
    Ok(pb::broker_client::BrokerClient::new(channel))
}

/// Issues one lease; its id and user name.
pub async fn issue(
    client: &mut pb::broker_client::BrokerClient<Channel>,
    ttl_seconds: i64,
) -> Result<(String, String)> {
    let lease = client
        .issue_lease(pb::IssueLeaseRequest {
            role: ROLE.into(),
            ttl_seconds,
        })
        .await
        .map_err(|s| Error::internal(format!("issue: {}", credbroker::client::describe(&s))))?
        .into_inner();
    Ok((lease.lease_id, lease.username))
}

pub async fn revoke(
    client: &mut pb::broker_client::BrokerClient<Channel>,
    id: String,
) -> Result<()> {
    client
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: id,
            ..Default::default()
        })
        .await
        .map_err(|s| Error::internal(format!("revoke: {}", credbroker::client::describe(&s))))?;
    Ok(())
}

/// `credbroker serve` as a child process.
pub struct Spawned {
    child: Child,
}

impl Spawned {
    /// Spawns it and returns once it answers a gRPC health check.
    pub async fn start(env: &DevEnv, addr: &str) -> Result<Self> {
        let exe = std::env::current_exe().map_err(io_err("own executable"))?;
        let log = std::fs::File::create(env.dir.join("broker.log")).map_err(io_err("log"))?;
        let child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(&env.config_path)
            // The reaper's debug lines say when a sweep finished.
            .env("RUST_LOG", "warn,credbroker::reaper=debug")
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
            if connected_client(env, addr).await.is_ok() {
                return Ok(me);
            }
            if Instant::now() > limit {
                return Err(Error::internal("credbroker serve not ready within 120 s"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn stop(&mut self) -> Result<()> {
        terminate(&mut self.child, "credbroker serve", Duration::from_secs(60)).await
    }
}

/// SIGTERM to a child server, then SIGKILL if it has not exited within
/// `grace` (which is an error: a clean stop is part of what we measure).
pub async fn terminate(child: &mut Child, what: &str, grace: Duration) -> Result<()> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let limit = Instant::now() + grace;
    while child.try_wait().map_err(io_err("wait"))?.is_none() {
        if Instant::now() > limit {
            let _ = child.kill();
            return Err(Error::internal(format!("{what} did not stop on SIGTERM")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
