//! Test harness: one throwaway PostgreSQL per test binary (password-checking,
//! far-off time zone, every statement logged), a fresh database per test,
//! and a broker per test — in-process on port 0, or the real binary.

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use credbroker::config::Config;
use credbroker::daemon::{Daemon, Listeners};
use credbroker::pb;
use credbroker::pb::revoke_leases_request::Selector;
use credbroker_testkit::devenv::DevEnv;
use credbroker_testkit::throwaway::{
    postgres_binaries_present, MariadbOptions, PostgresOptions, ThrowawayMariadb, ThrowawayPostgres,
};
use tokio::net::TcpListener;
use tonic::transport::Channel;

mod calls;
mod net;
mod sql;

pub use calls::*;
pub use net::*;
pub use sql::*;

/// UTC+14: a server time zone far from the broker's, so any expiry computed
/// in local time instead of UTC shows up as a 14-hour error.
pub const FAR_TIMEZONE: &str = "Pacific/Kiritimati";

static CLUSTER: OnceLock<ThrowawayPostgres> = OnceLock::new();

/// The shared throwaway cluster. Missing PostgreSQL binaries fail the test
/// with instructions; they never skip it.
pub fn cluster() -> &'static ThrowawayPostgres {
    CLUSTER.get_or_init(|| {
        assert!(
            postgres_binaries_present(),
            "PostgreSQL server binaries are missing: install them with `apt-get install -y postgresql` \
             (tests need initdb/postgres from /usr/lib/postgresql/*/bin)"
        );
        // Started on its own runtime so it is not tied to any one test's.
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(ThrowawayPostgres::start(PostgresOptions {
                timezone: Some(FAR_TIMEZONE.into()),
                log_statement_all: true,
                extra_conf: vec![],
                ..PostgresOptions::default()
            }))
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start the throwaway PostgreSQL: {e}"))
    })
}

static MARIADB: OnceLock<ThrowawayMariadb> = OnceLock::new();

/// The shared throwaway MariaDB (event scheduler ON) for tests that need a
/// MySQL-kind database beside PostgreSQL; nothing has to run on :3306.
/// Missing binaries fail the test with instructions.
pub fn mariadb() -> &'static ThrowawayMariadb {
    MARIADB.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(ThrowawayMariadb::start(MariadbOptions {
                event_scheduler: true,
                ..MariadbOptions::default()
            }))
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start the throwaway MariaDB: {e} \
                 (needs /usr/sbin/mariadbd and mariadb-install-db: `apt-get install -y mariadb-server`)"
            )
        })
    })
}

/// Connection options for a throwaway MariaDB on 127.0.0.1:`port` over
/// TCP (never the socket: accounts are pinned to hosts), as `user` with
/// its password.
pub fn maria_opts_on(
    port: u16,
    (user, password): (&str, &str),
    db: Option<&str>,
) -> mysql_async::OptsBuilder {
    mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some(user))
        .pass(Some(password))
        .db_name(db)
        .prefer_socket(false)
}

/// Connection options for the shared MariaDB: root, or `user` with its
/// password.
pub fn maria_opts(user: Option<(&str, &str)>, db: Option<&str>) -> mysql_async::OptsBuilder {
    let m = mariadb();
    maria_opts_on(m.port(), user.unwrap_or(("root", m.root_password())), db)
}

/// Root on the shared throwaway MariaDB.
pub async fn maria_root() -> mysql_async::Conn {
    mysql_async::Conn::new(maria_opts(None, None))
        .await
        .unwrap_or_else(|e| panic!("root login to the throwaway MariaDB: {e}"))
}

pub fn unique(prefix: &str) -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{prefix}_{n:016x}")
}

/// A fresh database with a granted and a forbidden table, in `pg`: the
/// shared `cluster()` or one of the test's own (one it may stop).
pub async fn fresh_database_on(pg: &ThrowawayPostgres) -> String {
    let name = unique("t");
    pg.create_database(&name).await.unwrap();
    let c = pg.connect(&name).await.unwrap();
    c.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, item text);
         INSERT INTO orders VALUES (1, 'coffee');
         CREATE TABLE payroll (name text, salary int);",
    )
    .await
    .unwrap();
    name
}

/// A role section for the test database.
pub fn role(name: &str, db: &str, default_ttl: &str, max_ttl: &str, allowed: &str) -> String {
    format!(
        "[roles.{name}]\ndatabase = \"{db}\"\ndefault_ttl = \"{default_ttl}\"\nmax_ttl = \"{max_ttl}\"\n\
         allowed = [\"{allowed}\"]\ngrants = [\"GRANT SELECT ON orders TO {{{{name}}}}\"]\n\n"
    )
}

pub const APP: &str = "spiffe://credbroker.dev/ns/demo/app";

/// `role` on the test database for every identity of the dev PKI's demo
/// namespace (`app`, `other`, …).
pub fn demo_role(name: &str, default_ttl: &str, max_ttl: &str) -> String {
    role(
        name,
        "{db}",
        default_ttl,
        max_ttl,
        "spiffe://credbroker.dev/ns/demo/*",
    )
}

/// The `[databases.main]` of a test broker.
pub struct MainDatabase {
    /// The config section, `[databases.main]` and its keys.
    pub section: String,
    /// The database (PostgreSQL) or schema (MySQL) it holds.
    pub name: String,
    /// Superuser access for PostgreSQL; for MySQL an unused default.
    pub pg_config: tokio_postgres::Config,
}

/// One broker under test with its own directory, database and config.
pub struct TestBroker {
    pub env: DevEnv,
    /// The main database's name (a PostgreSQL database, or a MySQL schema).
    pub db: String,
    /// Superuser access to this broker's database, when it is PostgreSQL.
    pub pg_config: tokio_postgres::Config,
    pub addr: String,
    pub port: u16,
    /// This broker's user-name prefix. Unique per test: brokers sweep every
    /// user with their prefix that their own store does not know, so two
    /// brokers with separate stores must never share one on a cluster.
    pub prefix: String,
    _dir: tempfile::TempDir,
    /// Bound when the port is chosen and held until the broker starts in
    /// process, so no parallel test can take the port in between.
    listener: Option<TcpListener>,
    /// The Vault API's port, once `enable_vault_api` bound it; held like
    /// `listener` until the broker starts.
    pub vault_port: Option<u16>,
    vault_listener: Option<TcpListener>,
    /// The web console's listener, from `enable_console` until the start.
    console: Option<TcpListener>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<credbroker::Result<()>>>,
    pub child: Option<Child>,
}

impl TestBroker {
    /// Writes a config for a fresh database with `roles` (built by `role`,
    /// with `{db}` standing for the database name) but starts nothing.
    pub async fn prepare(roles: &str) -> TestBroker {
        Self::prepare_on(cluster(), roles).await
    }

    /// Like `prepare`, on a cluster of the test's own.
    pub async fn prepare_on(pg: &ThrowawayPostgres, roles: &str) -> TestBroker {
        let db = fresh_database_on(pg).await;
        let dir = tempfile::tempdir().unwrap();
        let env = DevEnv::create(dir.path()).unwrap();
        let main = MainDatabase {
            section: env.pg_database("main", pg, &db).unwrap(),
            pg_config: pg.config(&db),
            name: db,
        };
        Self::prepare_with_main(
            dir,
            env,
            main,
            &roles.replace("{db}", "main"),
            "orphan_sweep_interval = \"1s\"\n",
            't',
        )
        .await
    }

    /// The one constructor: a broker in `dir` whose `[databases.main]` is
    /// `main` (of any kind), with `roles`, extra `[reaper]` keys and a
    /// unique name prefix starting with `letter`. The gRPC port is bound
    /// here (port 0) and held until the broker starts.
    pub async fn prepare_with_main(
        dir: tempfile::TempDir,
        env: DevEnv,
        main: MainDatabase,
        roles: &str,
        reaper: &str,
        letter: char,
    ) -> TestBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let prefix = format!("{letter}{}_", &unique("")[1..5]);
        let mut text = env.config_head(&format!("127.0.0.1:{port}"), None).replace(
            "[server]\n",
            &format!("[server]\nname_prefix = \"{prefix}\"\n"),
        );
        text.push_str(&format!("[reaper]\n{reaper}\n"));
        text.push_str(&main.section);
        text.push_str(roles);
        std::fs::write(&env.config_path, text).unwrap();
        TestBroker::new(
            dir,
            env,
            (main.name, main.pg_config),
            port,
            prefix,
            Some(listener),
        )
    }

    /// A broker not started, its config written: `db` its main database
    /// and superuser access to it, the gRPC port and, when bound already,
    /// its listener.
    fn new(
        dir: tempfile::TempDir,
        env: DevEnv,
        (db, pg_config): (String, tokio_postgres::Config),
        port: u16,
        prefix: String,
        listener: Option<TcpListener>,
    ) -> TestBroker {
        TestBroker {
            env,
            db,
            pg_config,
            addr: format!("https://127.0.0.1:{port}"),
            port,
            prefix,
            _dir: dir,
            listener,
            vault_port: None,
            vault_listener: None,
            console: None,
            stop: None,
            task: None,
            child: None,
        }
    }

    /// Prepares and starts in-process.
    pub async fn start(roles: &str) -> TestBroker {
        let mut b = Self::prepare(roles).await;
        b.start_in_process().await;
        b
    }

    /// Starts in-process; returns the start-up warnings.
    pub async fn start_in_process(&mut self) -> Vec<String> {
        let config = Config::load(&self.env.config_path).unwrap();
        let listener = match self.listener.take() {
            Some(l) => l,
            // Restarted after a stop: the port was ours a moment ago.
            None => TcpListener::bind(("127.0.0.1", self.port)).await.unwrap(),
        };
        let daemon = Daemon::open(config).await.unwrap();
        let warnings = daemon.warnings.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.task = Some(tokio::spawn(daemon.run(
            Listeners {
                grpc: listener,
                metrics: None,
                vault_api: match (self.vault_listener.take(), self.vault_port) {
                    // Restarted after a stop: its port was ours a moment ago.
                    (None, Some(port)) => {
                        Some(TcpListener::bind(("127.0.0.1", port)).await.unwrap())
                    }
                    (l, _) => l,
                },
                console: self.console.take(),
            },
            async {
                let _ = rx.await;
            },
        )));
        self.stop = Some(tx);
        warnings
    }

    /// Adds a `[vault_api]` section (on a port of its own, bound now) to a
    /// prepared broker's config; `extra` holds more of its keys.
    pub async fn enable_vault_api(&mut self, extra: &str) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        self.edit_config(|t| format!("{t}\n[vault_api]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n"));
        self.vault_port = Some(port);
        self.vault_listener = Some(l);
    }

    /// Sets `metrics_listen` to a free port (the binary binds it);
    /// returns the port.
    pub fn listen_metrics(&mut self) -> u16 {
        let port = free_port();
        self.server_keys(&format!("metrics_listen = \"127.0.0.1:{port}\""));
        port
    }

    /// Adds a `[console]` section on a port of its own, held until the
    /// in-process start; returns the port.
    pub async fn enable_console(&mut self) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        self.edit_config(|t| format!("{t}\n[console]\nlisten = \"127.0.0.1:{port}\"\n"));
        self.console = Some(l);
        port
    }

    /// Stops an in-process broker gracefully.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    /// A `[databases.NAME]` section for `schema` on the shared MariaDB.
    pub fn maria_section(&self, name: &str, schema: &str) -> String {
        self.env
            .mysql_database(
                name,
                mariadb().port(),
                schema,
                Some(mariadb().root_password()),
            )
            .unwrap()
    }

    /// Adds database `maria` — a fresh schema named from `prefix`, with an
    /// `orders` table, on the shared throwaway MariaDB — and role `role` on
    /// it for `allowed`; returns the schema.
    pub async fn add_mariadb(&self, prefix: &str, role: &str, allowed: &str) -> String {
        use mysql_async::prelude::Queryable;
        let schema = unique(prefix);
        maria_root()
            .await
            .query_drop(format!(
                "CREATE DATABASE `{schema}`; CREATE TABLE `{schema}`.orders (id INT PRIMARY KEY)"
            ))
            .await
            .unwrap();
        let maria = self.maria_section("maria", &schema);
        let maria_role = format!(
            "[roles.{role}]\ndatabase = \"maria\"\ndefault_ttl = \"5m\"\nmax_ttl = \"10m\"\n\
             allowed = [\"{allowed}\"]\n\
             grants = [\"GRANT SELECT ON `{schema}`.orders TO {{{{name}}}}\"]\n\n"
        );
        self.edit_config(|t| t + &maria + &maria_role);
        schema
    }

    /// Revokes a lease as its holder `who`.
    pub async fn revoke_as(
        &self,
        who: &str,
        lease_id: &str,
    ) -> Result<pb::RevokeLeaseResponse, tonic::Status> {
        self.client(who)
            .await
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: lease_id.to_string(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Lets go of the port reserved at `prepare`: for a test that runs the
    /// binary itself, or needs nothing listening there.
    pub fn release_port(&mut self) {
        drop(self.listener.take());
        drop(self.vault_listener.take());
        drop(self.console.take());
    }

    /// Runs the real `credbroker serve` binary on this config.
    pub async fn spawn_binary(&mut self) {
        self.spawn_binary_with_log_level("info").await
    }

    /// `spawn_binary` with `RUST_LOG` set to `level`.
    pub async fn spawn_binary_with_log_level(&mut self, level: &str) {
        // The binary binds the port itself.
        self.release_port();
        let child = self.serve_command(level, &[]).spawn().unwrap();
        self.child = Some(child);
        wait_port(self.port).await;
    }

    /// `credbroker serve` on this config, `RUST_LOG` at `level`, its
    /// stderr in `broker.log`; run by `wrapper` (a program and its
    /// arguments, e.g. a tracer) when that is not empty.
    pub fn serve_command(&self, level: &str, wrapper: &[&std::ffi::OsStr]) -> Command {
        let binary = std::ffi::OsStr::new(env!("CARGO_BIN_EXE_credbroker"));
        let (program, before) = match wrapper {
            [program, args @ ..] => (*program, [args, &[binary]].concat()),
            [] => (binary, Vec::new()),
        };
        let mut c = Command::new(program);
        c.args(before)
            .args(["serve", "--config"])
            .arg(&self.env.config_path)
            .env("RUST_LOG", level)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.env.dir.join("broker.log")).unwrap(),
            ));
        c
    }

    /// What the broker binary wrote to stderr so far.
    pub fn broker_log(&self) -> String {
        std::fs::read_to_string(self.env.dir.join("broker.log")).unwrap_or_default()
    }

    /// A replica of this broker: the same config (PKI, databases, roles,
    /// name prefix, store) with its own port, audit log and directory.
    /// Only meaningful on a shared (postgres://) store.
    pub fn replica(&self) -> TestBroker {
        let dir = tempfile::tempdir().unwrap();
        let env = DevEnv {
            dir: dir.path().to_path_buf(),
            pki: self.env.pki.clone(),
            config_path: dir.path().join("broker.toml"),
            audit_path: dir.path().join("audit.log"),
            store_path: self.env.store_path.clone(),
        };
        let port = free_port();
        let text = std::fs::read_to_string(&self.env.config_path)
            .unwrap()
            .replace(
                &format!("listen = \"127.0.0.1:{}\"", self.port),
                &format!("listen = \"127.0.0.1:{port}\""),
            )
            .replace(
                &format!("path = \"{}\"", self.env.audit_path.display()),
                &format!("path = \"{}\"", env.audit_path.display()),
            );
        std::fs::write(&env.config_path, text).unwrap();
        TestBroker::new(
            dir,
            env,
            (self.db.clone(), self.pg_config.clone()),
            port,
            self.prefix.clone(),
            None,
        )
    }

    /// Rewrites the config file (e.g. to drop a role or add a CRL).
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.env.config_path).unwrap();
        std::fs::write(&self.env.config_path, f(text)).unwrap();
    }

    /// Sends a signal (e.g. "HUP", "TERM") to the broker binary.
    pub fn signal_binary(&self, sig: &str) {
        let pid = self.child.as_ref().expect("binary running").id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} {pid} failed");
    }

    /// Waits for the broker binary to exit; its exit code.
    pub async fn wait_binary(&mut self, within: Duration) -> Option<i32> {
        let mut child = self.child.take().expect("binary running");
        exit_within(&mut child, within)
            .await
            .unwrap_or_else(|| panic!("broker did not exit within {within:?}"))
    }

    /// Opens this broker's SQLite store (the broker must be stopped: one
    /// broker per store file, by its `.lock` file).
    pub async fn open_store(&self) -> std::sync::Arc<dyn credbroker::store::Store> {
        credbroker::store::open(&format!("sqlite://{}", self.env.store_path.display()))
            .await
            .unwrap()
    }

    /// Broker-made role names with this broker's prefix in the cluster.
    pub async fn broker_roles(&self) -> std::collections::BTreeSet<String> {
        let c = self.superuser().await;
        let pattern = format!("{}%", self.prefix.replace('_', "\\_"));
        column::<String, _>(
            &c,
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1",
            &[&pattern],
        )
        .await
    }

    pub fn kill_binary(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub async fn client(&self, who: &str) -> pb::broker_client::BrokerClient<Channel> {
        self.env.client(&self.addr, who).broker().unwrap()
    }

    pub async fn admin(&self, who: &str) -> pb::admin_client::AdminClient<Channel> {
        self.env.client(&self.addr, who).admin().unwrap()
    }

    /// The leases `req` selects, as `who` lists them (`admin leases`).
    pub async fn list_as(
        &self,
        who: &str,
        req: pb::ListLeasesRequest,
    ) -> Result<Vec<pb::LeaseSummary>, tonic::Status> {
        self.admin(who)
            .await
            .list_leases(req)
            .await
            .map(|r| r.into_inner().leases)
    }

    /// Every lease, as `admin leases` lists them (as `admin`).
    pub async fn admin_leases(&self) -> Vec<pb::LeaseSummary> {
        self.list_as("admin", pb::ListLeasesRequest::default())
            .await
            .unwrap()
    }

    /// The leases in `state`, as `admin` lists them.
    pub async fn admin_leases_in(&self, state: pb::LeaseState) -> Vec<pb::LeaseSummary> {
        self.list_as(
            "admin",
            pb::ListLeasesRequest {
                states: vec![state as i32],
                ..Default::default()
            },
        )
        .await
        .unwrap()
    }

    /// Adds `keys` (TOML lines) to the config's `[server]` section.
    pub fn server_keys(&self, keys: &str) {
        self.edit_config(|t| t.replacen("[server]\n", &format!("[server]\n{keys}\n"), 1));
    }

    pub fn audit_records(&self) -> Vec<credbroker::audit::Record> {
        credbroker::audit::read_records(&self.env.audit_path).unwrap_or_default()
    }

    /// A superuser connection to this test's database.
    pub async fn superuser(&self) -> tokio_postgres::Client {
        let (client, conn) = self
            .pg_config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("superuser connection to the test database");
        tokio::spawn(conn);
        client
    }

    /// Broker-made roles that exist in the cluster for this test (by prefix
    /// is not enough: tests share the cluster, so we ask by the names we saw).
    pub async fn broker_role_count(&self) -> i64 {
        self.broker_roles().await.len() as i64
    }

    pub async fn role_exists(&self, username: &str) -> bool {
        let c = self.superuser().await;
        c.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&username])
            .await
            .unwrap()
            .is_some()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill_binary();
    }
}

/// Waits up to `within` for `child` to exit: `Some` of its exit code; or
/// `None`, the child killed, when it did not.
pub async fn exit_within(child: &mut Child, within: Duration) -> Option<Option<i32>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code());
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the real CLI against `b` as `who` (a dev certificate's name),
/// without blocking the runtime the in-process brokers run on.
pub async fn cli(b: &TestBroker, who: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(args)
        .args(["--addr", &b.addr])
        .arg("--ca")
        .arg(b.env.pki.join("ca.pem"))
        .arg("--cert")
        .arg(b.env.pki.join(format!("{who}.pem")))
        .arg("--key")
        .arg(b.env.pki.join(format!("{who}-key.pem")))
        .output()
        .await
        .unwrap()
}

/// Polls `f` every 100 ms until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The broker's dev CA (from its pki directory), to sign more certificates.
pub fn dev_ca(b: &TestBroker) -> credbroker_testkit::pki::DevCa {
    let cert = std::fs::read_to_string(b.env.pki.join("ca.pem")).unwrap();
    let key = std::fs::read_to_string(b.env.pki.join("ca-key.pem")).unwrap();
    credbroker_testkit::pki::DevCa::load(&cert, &key).unwrap()
}

/// Writes a client certificate signed by the dev CA as `<name>.pem` and
/// `<name>-key.pem` in the broker's pki directory (what `client(name)` reads).
pub fn write_client(b: &TestBroker, name: &str, spec: &credbroker_testkit::pki::ClientSpec) {
    let pair = dev_ca(b).client_cert(spec).unwrap();
    std::fs::write(b.env.pki.join(format!("{name}.pem")), pair.cert_pem).unwrap();
    std::fs::write(b.env.pki.join(format!("{name}-key.pem")), pair.key_pem).unwrap();
}

/// Writes client certificate `name` naming two SPIFFE IDs (`app`'s and
/// the on-call's): signed by the CA, but no usable identity.
pub fn write_two_id_client(b: &TestBroker, name: &str) {
    write_client(
        b,
        name,
        &credbroker_testkit::pki::ClientSpec {
            extra_uris: vec!["spiffe://credbroker.dev/dba/oncall".into()],
            ..credbroker_testkit::pki::ClientSpec::spiffe(APP)
        },
    );
}

/// Starts the real `credbroker sidecar` as the dev identity `app` against
/// `b`: `args`, then `--out OUT`; its log (`RUST_LOG=info`) goes to `log`.
pub fn spawn_sidecar(
    b: &TestBroker,
    args: &[&str],
    out: &std::path::Path,
    log: &std::path::Path,
) -> Child {
    let pki = &b.env.pki;
    Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .arg("sidecar")
        .args(args)
        .arg("--out")
        .arg(out)
        .args(["--addr", &b.addr, "--ca"])
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("app.pem"))
        .arg("--key")
        .arg(pki.join("app-key.pem"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap()
}

/// The refusals audit `records` stand for: one each, or `N` for a record
/// whose detail reads "N refused: …" (refusals audited in aggregate).
pub fn refusals_counted(records: &[credbroker::audit::Record]) -> u64 {
    records
        .iter()
        .map(|r| {
            let d = r.detail.as_deref().unwrap_or("");
            d.split_once(" refused: ")
                .and_then(|(n, _)| n.parse::<u64>().ok())
                .unwrap_or(1)
        })
        .sum()
}
