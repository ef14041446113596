//! The MySQL/MariaDB backend against real servers: a shared throwaway
//! MariaDB (it checks passwords) for logins, grants, host pinning, expiry
//! and revocation; a throwaway `mariadbd` of its own where a test must stop
//! or kill the database or needs the event scheduler on. Missing MariaDB
//! binaries fail the tests with instructions; nothing skips.
//!
//! This file is the harness every test here shares (the server, a broker
//! on a fresh schema, logins, what root sees); the tests are by concern:
//! `lease_path` (issue, expiry, revoke, failsafe, outages), `definers`
//! (what leased users define outlives them; lock when the drop cannot
//! run), `shared_server` (several databases and brokers on one server),
//! `drain` (handover).

mod definers;
mod drain;
mod lease_path;
mod shared_server;

use std::time::Duration;

use credbroker::pb;
use credbroker_testkit::devenv::DevEnv;
use credbroker_testkit::throwaway::{MariadbOptions, ThrowawayMariadb};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};

use crate::support::{maria_opts_on, unique, MainDatabase, TestBroker, APP};

/// A MariaDB/MySQL server the tests talk to as root over TCP.
#[derive(Clone)]
pub(crate) struct Target {
    port: u16,
    password: String,
}

static SHARED: std::sync::OnceLock<ThrowawayMariadb> = std::sync::OnceLock::new();

/// One throwaway server (event scheduler OFF, which exercises the warning
/// path) shared by the tests of this module; the machine's own MariaDB is
/// never used, so a fresh machine passes and the machine's server's state
/// cannot change a result. No MariaDB binaries: a failure with instructions.
pub(crate) async fn local() -> Target {
    let shared = SHARED.get_or_init(|| {
        // On its own runtime so it is not tied to any one test's.
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(ThrowawayMariadb::start(MariadbOptions::default()))
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start a throwaway MariaDB: {e}; \
                 install the server (`apt-get install -y mariadb-server`)"
            )
        })
    });
    target_of(shared)
}

/// A throwaway server (event scheduler ON). Missing binaries fail the test.
async fn throwaway() -> ThrowawayMariadb {
    ThrowawayMariadb::start(MariadbOptions {
        event_scheduler: true,
        ..MariadbOptions::default()
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "cannot start a throwaway MariaDB: {e} \
             (needs /usr/sbin/mariadbd and mariadb-install-db: `apt-get install -y mariadb-server`)"
        )
    })
}

fn target_of(db: &ThrowawayMariadb) -> Target {
    Target {
        port: db.port(),
        password: db.root_password().to_string(),
    }
}

impl Target {
    fn opts(&self, db: Option<&str>) -> OptsBuilder {
        maria_opts_on(self.port, ("root", &self.password), db)
    }

    async fn root(&self) -> Conn {
        Conn::new(self.opts(None))
            .await
            .unwrap_or_else(|e| panic!("root login to 127.0.0.1:{}: {e}", self.port))
    }

    /// The account root logs in as (`root@127.0.0.1`): who inherits what a
    /// leased user defined when its role names no owner.
    async fn current_user(&self) -> String {
        let admin: Option<String> = self
            .root()
            .await
            .query_first("SELECT CURRENT_USER()")
            .await
            .unwrap();
        admin.unwrap()
    }

    /// A fresh schema with a granted and a forbidden table.
    async fn fresh_schema(&self) -> String {
        let name = unique("cbt");
        let mut c = self.root().await;
        c.query_drop(format!(
            "CREATE DATABASE `{name}`;
             CREATE TABLE `{name}`.orders (id INT PRIMARY KEY, item TEXT);
             INSERT INTO `{name}`.orders VALUES (1, 'coffee');
             CREATE TABLE `{name}`.payroll (name TEXT, salary INT);"
        ))
        .await
        .unwrap();
        name
    }

    async fn user_hosts(&self, username: &str) -> Vec<String> {
        let mut c = self.root().await;
        c.exec("SELECT Host FROM mysql.user WHERE User = ?", (username,))
            .await
            .unwrap()
    }

    /// Whether `user` is gone from the server within `within`.
    async fn dropped_within(&self, user: &str, within: Duration) -> bool {
        crate::support::eventually(within, || async { self.user_hosts(user).await.is_empty() })
            .await
    }

    async fn users_with_prefix(&self, prefix: &str) -> std::collections::BTreeSet<String> {
        let mut c = self.root().await;
        let rows: Vec<String> = c
            .exec(
                "SELECT User FROM mysql.user WHERE User LIKE CONCAT(?, '%') ESCAPE '!'",
                (prefix.replace('_', "!_"),),
            )
            .await
            .unwrap();
        rows.into_iter().collect()
    }

    async fn failsafe_at(&self, username: &str) -> Option<String> {
        let mut c = self.root().await;
        c.exec_first(
            "SELECT CAST(EXECUTE_AT AS CHAR) FROM information_schema.EVENTS \
             WHERE EVENT_SCHEMA = 'credbroker' AND EVENT_NAME = ?",
            (username,),
        )
        .await
        .unwrap()
    }

    /// Whether the server has `user` locked (MariaDB keeps it in global_priv).
    async fn is_locked(&self, user: &str) -> bool {
        let v: Option<Option<String>> = self
            .root()
            .await
            .exec_first(
                "SELECT JSON_VALUE(Priv, '$.account_locked') FROM mysql.global_priv WHERE User = ?",
                (user,),
            )
            .await
            .unwrap();
        matches!(v.flatten().as_deref(), Some("1") | Some("true"))
    }

    /// Waits until `user` runs a statement starting with `prefix`.
    async fn wait_running(&self, user: &str, prefix: &str) {
        let mut root = self.root().await;
        for _ in 0..50 {
            let n: Option<u64> = root
                .exec_first(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = ? AND INFO LIKE ?",
                    (user, format!("{prefix}%")),
                )
                .await
                .unwrap();
            if n == Some(1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{prefix}… never started");
    }
}

/// Logs in as a leased user; the server's error text on refusal.
pub(crate) async fn login(
    t: &Target,
    db: &str,
    user: &str,
    password: &str,
) -> Result<Conn, String> {
    let opts = maria_opts_on(t.port, (user, password), Some(db));
    match tokio::time::timeout(Duration::from_secs(5), Conn::new(opts)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("login timed out".into()),
    }
}

/// Whether the session is cut within three seconds (its next statement
/// fails).
async fn cut(c: &mut Conn) -> bool {
    for _ in 0..30 {
        if c.query_drop("SELECT 1").await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A role section; `host` `None` keeps the default `%`.
pub(crate) fn role(name: &str, schema: &str, ttl: &str, max: &str, host: Option<&str>) -> String {
    let host = host
        .map(|h| format!("host = \"{h}\"\n"))
        .unwrap_or_default();
    format!(
        "[roles.{name}]\ndatabase = \"main\"\ndefault_ttl = \"{ttl}\"\nmax_ttl = \"{max}\"\n\
         allowed = [\"{APP}\"]\n{host}grants = [\"GRANT SELECT ON `{schema}`.orders TO {{{{name}}}}\"]\n\n"
    )
}

/// The role most tests lease: `reader`, five minutes, any host.
fn reader(schema: &str) -> String {
    role("reader", schema, "5m", "1h", None)
}

/// One broker on a MySQL-kind database: the harness's `TestBroker` with
/// the MariaDB target and schema, and calls as `app`/`admin`.
pub(crate) struct MyBroker {
    b: TestBroker,
    target: Target,
    pub(crate) schema: String,
}

impl std::ops::Deref for MyBroker {
    type Target = TestBroker;
    fn deref(&self) -> &TestBroker {
        &self.b
    }
}

impl std::ops::DerefMut for MyBroker {
    fn deref_mut(&mut self) -> &mut TestBroker {
        &mut self.b
    }
}

impl MyBroker {
    /// Writes the config; `roles(schema)` gives the role sections.
    pub(crate) async fn prepare(target: &Target, roles: impl FnOnce(&str) -> String) -> MyBroker {
        let schema = target.fresh_schema().await;
        let dir = tempfile::tempdir().unwrap();
        let env = DevEnv::create(dir.path()).unwrap();
        let section = env
            .mysql_database("main", target.port, &schema, Some(&target.password))
            .unwrap()
            .replace(
                "kind = \"mysql\"\n",
                "kind = \"mysql\"\nconnect_timeout = \"2s\"\nstatement_timeout = \"3s\"\n",
            );
        let main = MainDatabase {
            section,
            name: schema.clone(),
            pg_config: tokio_postgres::Config::new(),
        };
        let b = TestBroker::prepare_with_main(
            dir,
            env,
            main,
            &roles(&schema),
            "orphan_sweep_interval = \"1s\"\nintent_grace = \"2s\"\nmax_backoff = \"1s\"\n",
            'm',
        )
        .await;
        MyBroker {
            b,
            target: target.clone(),
            schema,
        }
    }

    /// `prepare`, then started in process.
    async fn start(target: &Target, roles: impl FnOnce(&str) -> String) -> MyBroker {
        let mut b = Self::prepare(target, roles).await;
        b.start_in_process().await;
        b
    }

    async fn client(&self) -> pb::broker_client::BrokerClient<tonic::transport::Channel> {
        self.b.client("app").await
    }

    async fn admin(&self) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
        self.b.admin("admin").await
    }

    async fn issue(&self, role: &str, ttl: i64) -> Result<pb::Lease, tonic::Status> {
        crate::support::issue(&self.b, "app", role, ttl).await
    }

    async fn revoke(&self, lease: &pb::Lease) {
        self.b.revoke_as("app", &lease.lease_id).await.unwrap();
    }

    async fn state(&self, lease: &pb::Lease) -> pb::LeaseState {
        let l = self
            .client()
            .await
            .lookup_lease(pb::LookupLeaseRequest {
                lease_id: lease.lease_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pb::LeaseState::try_from(l.state).unwrap()
    }

    async fn login(&self, lease: &pb::Lease) -> Result<Conn, String> {
        login(&self.target, &self.schema, &lease.username, &lease.password).await
    }

    /// Whether `lease`'s user is gone and the lease revoked within `within`.
    async fn reaped_within(&self, lease: &pb::Lease, within: Duration) -> bool {
        crate::support::eventually(within, || async {
            self.target.user_hosts(&lease.username).await.is_empty()
                && self.state(lease).await == pb::LeaseState::Revoked
        })
        .await
    }

    /// Makes the broker's admin a new account with no `EVENT` privilege
    /// (and, by default, no read of `mysql.global_priv`), logging in from
    /// `host`; returns its name.
    async fn limited_admin(&self, host: &str) -> String {
        let admin = unique("cbadm")[..18].to_string();
        let password = credbroker::lease::Password::generate();
        self.target
            .root()
            .await
            .query_drop(format!(
                "CREATE USER '{admin}'@'{host}' IDENTIFIED BY '{pw}';
                 GRANT CREATE USER, PROCESS, CONNECTION ADMIN ON *.* TO '{admin}'@'{host}';
                 GRANT SELECT ON mysql.user TO '{admin}'@'{host}';
                 GRANT ALL ON `{schema}`.* TO '{admin}'@'{host}' WITH GRANT OPTION;",
                pw = password.expose(),
                schema = self.schema
            ))
            .await
            .unwrap();
        let secret = self.env.dir.join("secrets/limited-admin");
        std::fs::write(&secret, password.expose()).unwrap();
        self.edit_config(|text| {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("admin_password_file"))
                .collect();
            (kept.join("\n") + "\n")
                .replace("mysql://root@", &format!("mysql://{admin}@"))
                .replace(
                    "kind = \"mysql\"\n",
                    &format!(
                        "kind = \"mysql\"\nadmin_password_file = \"{}\"\n",
                        secret.display()
                    ),
                )
        });
        admin
    }

    /// Stops the broker (when it runs in process) and drops its schema.
    async fn finish(mut self) {
        self.b.stop().await;
        self.drop_schema().await;
    }

    pub(crate) async fn drop_schema(&self) {
        let mut c = self.target.root().await;
        let _ = c
            .query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.schema))
            .await;
    }
}

fn server_code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

/// MariaDB answers a login to a dropped account with 1045 and, seen under
/// load, sometimes 1698 (ER_ACCESS_DENIED_NO_PASSWORD_ERROR): both refuse.
fn access_denied(err: &str) -> bool {
    err.contains("1045") || err.contains("1698")
}

/// MariaDB's answer to a locked account: ER_ACCOUNT_HAS_BEEN_LOCKED.
fn locked_out(err: &str) -> bool {
    err.contains("4151") || err.contains("locked")
}

fn audit_of(b: &MyBroker, lease: &pb::Lease) -> Option<credbroker::audit::Record> {
    b.audit_records().into_iter().find(|r| {
        r.lease_id.as_deref() == Some(lease.lease_id.as_str())
            && matches!(r.action.as_str(), "revoke" | "reap" | "admin_revoke")
            && r.outcome == credbroker::audit::Outcome::Ok
    })
}
