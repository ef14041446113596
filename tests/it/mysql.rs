//! The MySQL/MariaDB backend against real servers: a shared throwaway
//! MariaDB (it checks passwords) for logins, grants, host pinning, expiry
//! and revocation; a throwaway `mariadbd` of its own where a test must stop
//! or kill the database or needs the event scheduler on. Missing MariaDB
//! binaries fail the tests with instructions; nothing skips.

use std::time::{Duration, Instant};

use credbroker::pb;
use credbroker_testkit::devenv::DevEnv;
use credbroker_testkit::throwaway::{MariadbOptions, ThrowawayMariadb};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};

use crate::support::{eventually, unique, MainDatabase, TestBroker, APP};

/// A MariaDB/MySQL server the tests talk to as root over TCP.
#[derive(Clone)]
pub(crate) struct Target {
    port: u16,
    password: Option<String>,
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
        password: Some(db.root_password().to_string()),
    }
}

impl Target {
    fn opts(&self, db: Option<&str>) -> OptsBuilder {
        OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(self.port)
            .user(Some("root"))
            .pass(self.password.clone())
            .db_name(db)
            .prefer_socket(false)
    }

    async fn root(&self) -> Conn {
        Conn::new(self.opts(None))
            .await
            .unwrap_or_else(|e| panic!("root login to 127.0.0.1:{}: {e}", self.port))
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
}

/// Logs in as a leased user; the server's error text on refusal.
pub(crate) async fn login(
    t: &Target,
    db: &str,
    user: &str,
    password: &str,
) -> Result<Conn, String> {
    let opts = OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(t.port)
        .user(Some(user))
        .pass(Some(password))
        .db_name(Some(db))
        .prefer_socket(false);
    match tokio::time::timeout(Duration::from_secs(5), Conn::new(opts)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("login timed out".into()),
    }
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
            .mysql_database("main", target.port, &schema, target.password.as_deref())
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

    async fn client(&self) -> pb::broker_client::BrokerClient<tonic::transport::Channel> {
        self.env.client(&self.addr, "app").broker().unwrap()
    }

    async fn admin(&self) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
        self.env.client(&self.addr, "admin").admin().unwrap()
    }

    async fn issue(&self, role: &str, ttl: i64) -> Result<pb::Lease, tonic::Status> {
        self.client()
            .await
            .issue_lease(pb::IssueLeaseRequest {
                role: role.into(),
                ttl_seconds: ttl,
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn revoke(&self, lease: &pb::Lease) {
        self.client()
            .await
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: lease.lease_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
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

/// Point 1: issue → login works, grants hold, other tables are refused, a
/// host-pinned role cannot log in from elsewhere; the password reaches the
/// server only as a hash; start-up warns when the failsafe cannot run.
#[tokio::test]
async fn mysql_issue_login_grants_and_host_pinning() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| {
        role("reader", s, "5m", "1h", None)
            + &role("pinned", s, "5m", "1h", Some("10.255.255.%"))
            + &role("loopback", s, "5m", "1h", Some("127.0.0.1"))
    })
    .await;
    let warnings = b.start_in_process().await;
    let mut root = t.root().await;
    let scheduler: Option<String> = root
        .query_first("SELECT @@global.event_scheduler")
        .await
        .unwrap();
    if scheduler.as_deref() != Some("ON") {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("NO DATABASE-SIDE EXPIRY") && w.contains("event_scheduler")),
            "scheduler {scheduler:?} but no loud warning: {warnings:?}"
        );
    }

    let lease = b.issue("reader", 120).await.unwrap();
    assert_eq!(lease.kind, "mysql");
    assert!(lease.username.starts_with(&b.prefix) && lease.username.len() <= 32);
    assert!(lease
        .dsn
        .starts_with(&format!("mysql://{}:", lease.username)));
    assert_eq!(t.user_hosts(&lease.username).await, vec!["%".to_string()]);
    let (plugin, stored): (String, String) = root
        .exec_first(
            "SELECT plugin, authentication_string FROM mysql.user WHERE User = ?",
            (&lease.username,),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(plugin, "mysql_native_password");
    assert!(stored.starts_with('*') && !stored.contains(&lease.password));
    assert!(
        t.failsafe_at(&lease.username).await.is_some(),
        "no failsafe event for {}",
        lease.username
    );

    let mut conn = b.login(&lease).await.expect("leased login");
    let item: Option<String> = conn
        .query_first("SELECT item FROM orders WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(item.as_deref(), Some("coffee"));
    let e = conn.query_drop("SELECT * FROM payroll").await.unwrap_err();
    assert_eq!(server_code(&e), Some(1142), "{e}");
    let e = conn
        .query_drop("INSERT INTO orders VALUES (2, 'tea')")
        .await
        .unwrap_err();
    assert_eq!(server_code(&e), Some(1142), "{e}");
    let e = conn.query_drop("CREATE USER 'evil'@'%'").await.unwrap_err();
    assert!(server_code(&e).is_some(), "{e}");
    drop(conn);

    let pinned = b.issue("pinned", 120).await.unwrap();
    assert_eq!(
        t.user_hosts(&pinned.username).await,
        vec!["10.255.255.%".to_string()]
    );
    let refused = b.login(&pinned).await.map(|_| ()).unwrap_err();
    assert!(access_denied(&refused), "{refused}");

    let loopback = b.issue("loopback", 120).await.unwrap();
    b.login(&loopback)
        .await
        .expect("pinned to 127.0.0.1 logs in from it");

    for l in [&lease, &pinned, &loopback] {
        b.revoke(l).await;
        assert!(t.user_hosts(&l.username).await.is_empty());
        assert!(t.failsafe_at(&l.username).await.is_none());
    }
    b.stop().await;
    b.drop_schema().await;
}

/// Point 2a: the reaper drops an expired user; renew moves the failsafe.
#[tokio::test]
async fn mysql_expiry_reaper_drops_user_and_renew_moves_failsafe() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| role("reader", s, "2s", "10m", None)).await;
    b.start_in_process().await;

    let kept = b.issue("reader", 5).await.unwrap();
    let before = t.failsafe_at(&kept.username).await.expect("failsafe event");
    let renewed = b
        .client()
        .await
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: kept.lease_id.clone(),
            ttl_seconds: 300,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(crate::support::ts(&renewed.expires_at) > crate::support::ts(&kept.expires_at));
    let after = t.failsafe_at(&kept.username).await.expect("failsafe event");
    assert!(after > before, "failsafe not moved: {before} -> {after}");

    let short = b.issue("reader", 2).await.unwrap();
    b.login(&short).await.expect("leased login");
    let gone = eventually(Duration::from_secs(20), || async {
        t.user_hosts(&short.username).await.is_empty()
            && b.state(&short).await == pb::LeaseState::Revoked
    })
    .await;
    assert!(gone, "expired user {} still exists", short.username);
    assert!(t.failsafe_at(&short.username).await.is_none());
    assert!(b.login(&short).await.is_err());
    // The renewed lease is untouched by the reaper.
    assert_eq!(b.state(&kept).await, pb::LeaseState::Active);
    b.login(&kept).await.expect("renewed lease still logs in");

    b.revoke(&kept).await;
    b.stop().await;
    b.drop_schema().await;
}

/// Point 2b: revoke cuts a live connection (mid-query) within 1 s, and the
/// login is refused afterwards.
#[tokio::test]
async fn mysql_revoke_cuts_live_connection_within_a_second() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| role("reader", s, "5m", "1h", None)).await;
    b.start_in_process().await;
    let lease = b.issue("reader", 120).await.unwrap();
    let mut idle = b.login(&lease).await.expect("leased login");
    let mut busy = b.login(&lease).await.expect("leased login");
    let busy_query = tokio::spawn(async move {
        let r = busy.query_drop("SELECT SLEEP(30)").await;
        (r, Instant::now())
    });
    // Wait until the query is running, so the revocation meets it mid-way.
    let mut root = t.root().await;
    let mut running = false;
    for _ in 0..50 {
        let n: Option<u64> = root
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = ? AND INFO LIKE 'SELECT SLEEP%'",
                (&lease.username,),
            )
            .await
            .unwrap();
        if n == Some(1) {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running);

    let started = Instant::now();
    b.revoke(&lease).await;
    let (result, ended) = tokio::time::timeout(Duration::from_secs(5), busy_query)
        .await
        .expect("the running query was not cut")
        .unwrap();
    // SLEEP() killed from outside returns 1 instead of 0 on MariaDB when only
    // the query is killed; a killed connection makes the call fail.
    assert!(result.is_err(), "the live session survived revocation");
    let cut = ended.duration_since(started);
    assert!(cut < Duration::from_secs(1), "cut after {cut:?}");
    assert!(idle.query_drop("SELECT 1").await.is_err());
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(access_denied(&refused), "{refused}");
    println!("revoke → live session cut in {cut:?}");
    b.stop().await;
    b.drop_schema().await;
}

/// MariaDB answers a login to a dropped account with 1045 and, seen under
/// load, sometimes 1698 (ER_ACCESS_DENIED_NO_PASSWORD_ERROR): both refuse.
fn access_denied(err: &str) -> bool {
    err.contains("1045") || err.contains("1698")
}

/// Statements in `mysql.general_log` containing `needle`.
async fn general_log_count(root: &mut Conn, needle: &str) -> u64 {
    let n: Option<u64> = root
        .exec_first(
            "SELECT COUNT(*) FROM mysql.general_log \
             WHERE CONVERT(argument USING utf8mb4) LIKE CONCAT('%', ?, '%')",
            (needle,),
        )
        .await
        .unwrap();
    n.unwrap_or(0)
}

/// Point 3: the broker is SIGKILLed and never restarted; the failsafe event
/// drops the user and ends its session by the hard limit anyway.
#[tokio::test]
async fn mysql_failsafe_removes_user_after_broker_sigkill() {
    let db = throwaway().await;
    let t = target_of(&db);
    let mut b = MyBroker::prepare(&t, |s| role("reader", s, "4s", "8s", None)).await;
    // Every statement the server receives goes to mysql.general_log.
    let mut root = t.root().await;
    root.query_drop("SET GLOBAL log_output = 'TABLE'; SET GLOBAL general_log = 'ON'")
        .await
        .unwrap();
    b.spawn_binary().await;
    let lease = b.issue("reader", 4).await.unwrap();
    let mut session = b.login(&lease).await.expect("leased login");
    session.query_drop("SELECT 1").await.unwrap();
    b.kill_binary();
    // Off before searching, or the search itself is logged.
    root.query_drop("SET GLOBAL general_log = 'OFF'")
        .await
        .unwrap();
    let create = format!("CREATE USER '{}'", lease.username);
    assert!(
        general_log_count(&mut root, &create).await >= 1,
        "the general log missed CREATE USER"
    );
    assert_eq!(
        general_log_count(&mut root, &lease.password).await,
        0,
        "the password is in the server's general log"
    );
    let log = std::fs::read_to_string(b.env.dir.join("broker.log")).unwrap();
    assert!(
        !log.contains("NO DATABASE-SIDE EXPIRY"),
        "the throwaway runs the event scheduler, yet the broker warned: {log}"
    );

    let hard_limit = crate::support::ts(&lease.max_expires_at);
    // The scheduler has one-second resolution; allow it a few.
    let slack = chrono::Duration::seconds(3);
    let within = (hard_limit + slack - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    let gone = eventually(within, || async {
        t.user_hosts(&lease.username).await.is_empty()
    })
    .await;
    assert!(
        gone,
        "user {} still exists after its hard limit {hard_limit} with no broker",
        lease.username
    );
    let mut cut = false;
    for _ in 0..30 {
        if session.query_drop("SELECT 1").await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cut,
        "the failsafe dropped the user but left its session running"
    );
    assert!(b.login(&lease).await.is_err());
    assert!(t.failsafe_at(&lease.username).await.is_none());
    b.drop_schema().await;
}

/// Point 4: names fit the server and many issues in a row never repeat
/// one. (The unit test in backend::mysql checks 20,000 generated names.)
async fn issue_many(n: usize) {
    let t = local().await;
    let mut b =
        MyBroker::prepare(&t, |s| role("reader-with-a-long-name", s, "5m", "1h", None)).await;
    b.start_in_process().await;
    let mut client = b.client().await;
    let mut names = std::collections::BTreeSet::new();
    let started = Instant::now();
    for _ in 0..n {
        let l = client
            .issue_lease(pb::IssueLeaseRequest {
                role: "reader-with-a-long-name".into(),
                ttl_seconds: 300,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(l.username.len() <= 32, "{}", l.username);
        assert!(names.insert(l.username), "duplicate user name");
    }
    let took = started.elapsed();
    let on_server = t.users_with_prefix(&b.prefix).await;
    assert_eq!(on_server, names);
    println!(
        "{n} MySQL issues in {took:?} ({:.0}/s), {} distinct names",
        n as f64 / took.as_secs_f64(),
        names.len()
    );
    let r = b
        .admin()
        .await
        .revoke_leases(pb::RevokeLeasesRequest {
            selector: Some(pb::revoke_leases_request::Selector::All(true)),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked as usize, n);
    assert!(t.users_with_prefix(&b.prefix).await.is_empty());
    b.stop().await;
    b.drop_schema().await;
}

/// ~11 s alone on this machine (2,000 issues at ~180/s).
#[tokio::test]
async fn mysql_two_thousand_issues_give_distinct_names_within_the_limit() {
    issue_many(2000).await;
}

/// Point 5: a database that is down gives `Unavailable` quickly, and once it
/// is back no intent is left unresolved and no user is left behind.
#[tokio::test]
async fn mysql_down_database_is_unavailable_quickly_and_leaves_no_intent() {
    let mut db = throwaway().await;
    let t = target_of(&db);
    let mut b = MyBroker::prepare(&t, |s| role("reader", s, "5m", "1h", None)).await;
    b.start_in_process().await;
    let warm = b.issue("reader", 120).await.unwrap();

    db.stop().await.unwrap();
    for _ in 0..2 {
        // The first attempt meets the dead pooled connection, the second a
        // refused new one: both must fail fast.
        let started = Instant::now();
        let err = b.issue("reader", 120).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        // connect_timeout is 2 s in this config.
        assert!(took < Duration::from_secs(3), "Unavailable after {took:?}");
        println!("database down → Unavailable in {took:?}");
    }

    db.restart().await.unwrap();
    let settled = eventually(Duration::from_secs(30), || async {
        let pending = b
            .admin()
            .await
            .list_leases(pb::ListLeasesRequest {
                states: vec![
                    pb::LeaseState::Pending as i32,
                    pb::LeaseState::Failing as i32,
                ],
                ..Default::default()
            })
            .await;
        matches!(pending, Ok(r) if r.get_ref().leases.is_empty())
    })
    .await;
    assert!(
        settled,
        "intents still unresolved after the database came back"
    );
    let users = t.users_with_prefix(&b.prefix).await;
    assert_eq!(
        users,
        std::iter::once(warm.username.clone()).collect(),
        "only the lease issued before the outage may have a user"
    );
    b.issue("reader", 120).await.expect("issuing works again");

    // rotate-root: the broker's admin password changes, the broker keeps
    // working with the new one, the old one stops working.
    b.admin()
        .await
        .rotate_root(pb::RotateRootRequest {
            database: "main".into(),
        })
        .await
        .unwrap();
    b.issue("reader", 120)
        .await
        .expect("issuing works after rotate-root");
    let new_password = std::fs::read_to_string(b.env.dir.join("secrets/main-admin")).unwrap();
    assert_ne!(Some(new_password.trim()), t.password.as_deref());
    let old = Conn::new(t.opts(None)).await.map(|_| ()).unwrap_err();
    assert_eq!(server_code(&old), Some(1045), "{old}");
    let rotated = Target {
        port: t.port,
        password: Some(new_password.trim().to_string()),
    };
    rotated.root().await;
    b.stop().await;
}

/// The orphan sweep drops broker-shaped users no lease accounts for, and
/// never a name the broker could not have made, even with its prefix.
#[tokio::test]
async fn mysql_orphan_sweep_drops_only_broker_made_names() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| role("reader", s, "5m", "1h", None)).await;
    let orphan = format!("{}reader_{}", b.prefix, "0123456789abcdef");
    let lookalike = format!("{}app", b.prefix);
    let mut root = t.root().await;
    for u in [&orphan, &lookalike] {
        root.query_drop(format!("CREATE USER '{u}'@'%'"))
            .await
            .unwrap();
    }
    b.start_in_process().await;
    let kept = b.issue("reader", 120).await.unwrap();
    let swept = eventually(Duration::from_secs(20), || async {
        t.user_hosts(&orphan).await.is_empty()
    })
    .await;
    assert!(swept, "orphan {orphan} was not swept");
    assert_eq!(t.user_hosts(&lookalike).await, vec!["%".to_string()]);
    assert_eq!(t.user_hosts(&kept.username).await, vec!["%".to_string()]);
    root.query_drop(format!("DROP USER '{lookalike}'@'%'"))
        .await
        .unwrap();
    b.revoke(&kept).await;
    b.stop().await;
    b.drop_schema().await;
}

/// Without the privileges the failsafe needs, start-up says so loudly and
/// everything else works: issue, login, renew, revoke. Also shows the least
/// privileges the broker's admin account needs for that.
#[tokio::test]
async fn mysql_without_event_privilege_warns_and_keeps_working() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| role("reader", s, "5m", "1h", None)).await;
    let admin = unique("cbadm");
    let admin = &admin[..admin.len().min(30)];
    let password = credbroker::lease::Password::generate();
    let mut root = t.root().await;
    root.query_drop(format!(
        "CREATE USER '{admin}'@'127.0.0.1' IDENTIFIED BY '{pw}';
         GRANT CREATE USER, PROCESS, CONNECTION ADMIN ON *.* TO '{admin}'@'127.0.0.1';
         GRANT SELECT ON mysql.user TO '{admin}'@'127.0.0.1';
         GRANT ALL ON `{schema}`.* TO '{admin}'@'127.0.0.1' WITH GRANT OPTION;",
        pw = password.expose(),
        schema = b.schema
    ))
    .await
    .unwrap();
    let secret = b.env.dir.join("secrets/limited-admin");
    std::fs::write(&secret, password.expose()).unwrap();
    b.edit_config(|text| {
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

    let warnings = b.start_in_process().await;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("NO DATABASE-SIDE EXPIRY") && w.contains("EVENT")),
        "no loud warning about the missing failsafe: {warnings:?}"
    );
    println!("start-up warnings: {warnings:#?}");
    let lease = b.issue("reader", 120).await.unwrap();
    assert!(t.failsafe_at(&lease.username).await.is_none());
    let mut conn = b.login(&lease).await.expect("leased login");
    conn.query_drop("SELECT * FROM orders").await.unwrap();
    b.client()
        .await
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.lease_id.clone(),
            ttl_seconds: 300,
        })
        .await
        .expect("renew without a failsafe");
    b.revoke(&lease).await;
    assert!(conn.query_drop("SELECT 1").await.is_err());
    assert!(t.user_hosts(&lease.username).await.is_empty());
    b.stop().await;
    root.query_drop(format!("DROP USER '{admin}'@'127.0.0.1'"))
        .await
        .unwrap();
    b.drop_schema().await;
}

// ---------------------------------------------------------------------------
// Revocation never destroys data; the credential dies even when the drop
// cannot run; several databases and brokers on one server.
// ---------------------------------------------------------------------------

/// A role whose users may create tables, views, routines, triggers and
/// events in `schema`; `owner` inherits them.
fn ddl_role(name: &str, schema: &str, ttl: &str, owner: Option<&str>) -> String {
    let owner = owner
        .map(|o| format!("owner = \"{o}\"\n"))
        .unwrap_or_default();
    format!(
        "[roles.{name}]\ndatabase = \"main\"\ndefault_ttl = \"{ttl}\"\nmax_ttl = \"1h\"\n\
         allowed = [\"{APP}\"]\n{owner}grants = [\"GRANT SELECT, INSERT, CREATE, CREATE VIEW, SHOW VIEW, \
         CREATE ROUTINE, ALTER ROUTINE, EXECUTE, TRIGGER, EVENT ON `{schema}`.* TO {{{{name}}}}\"]\n\n"
    )
}

/// What a migration leaves behind: a table with rows and, all defined by
/// the leased user, a view, a function, a procedure, a trigger and an
/// event (5 objects with a DEFINER).
async fn create_objects(c: &mut Conn, tag: &str) {
    for sql in [
        format!("CREATE TABLE {tag}_t (id INT PRIMARY KEY, v TEXT)"),
        format!("INSERT INTO {tag}_t VALUES (1, 'one'), (2, 'two')"),
        format!("CREATE TABLE {tag}_log (id INT)"),
        format!("CREATE VIEW {tag}_v AS SELECT id, v FROM {tag}_t WHERE id > 0"),
        format!(
            "CREATE FUNCTION {tag}_n() RETURNS INT READS SQL DATA RETURN (SELECT COUNT(*) FROM {tag}_t)"
        ),
        format!(
            "CREATE PROCEDURE {tag}_add(IN x INT) MODIFIES SQL DATA \
             BEGIN INSERT INTO {tag}_t VALUES (x, 'proc'); END"
        ),
        format!(
            "CREATE TRIGGER {tag}_tr AFTER INSERT ON {tag}_t FOR EACH ROW INSERT INTO {tag}_log VALUES (NEW.id)"
        ),
        format!(
            "CREATE EVENT {tag}_ev ON SCHEDULE EVERY 1 DAY STARTS CURRENT_TIMESTAMP + INTERVAL 1 DAY \
             DO DELETE FROM {tag}_log WHERE id < 0"
        ),
    ] {
        c.query_drop(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Definers of the objects `create_objects(tag)` made, as `user@host`.
async fn definers(root: &mut Conn, schema: &str, tag: &str) -> Vec<String> {
    let like = format!("{tag}!_%");
    root.exec(
        "SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ? AND TABLE_NAME LIKE ? ESCAPE '!' \
         UNION ALL SELECT DEFINER FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = ? AND ROUTINE_NAME LIKE ? ESCAPE '!' \
         UNION ALL SELECT DEFINER FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = ? AND TRIGGER_NAME LIKE ? ESCAPE '!' \
         UNION ALL SELECT DEFINER FROM information_schema.EVENTS WHERE EVENT_SCHEMA = ? AND EVENT_NAME LIKE ? ESCAPE '!'",
        (schema, &like, schema, &like, schema, &like, schema, &like),
    )
    .await
    .unwrap()
}

/// The objects of `tag` work after their definer is gone, for root and for
/// `reader` (another account), and each is defined by `definer`.
async fn assert_objects_work(t: &Target, schema: &str, tag: &str, definer: &str, reader: &Target2) {
    let mut root = t.root().await;
    let found = definers(&mut root, schema, tag).await;
    assert_eq!(found.len(), 5, "objects of {tag}: {found:?}");
    for d in &found {
        assert!(
            d.eq_ignore_ascii_case(definer),
            "{tag}: definer {d}, wanted {definer}"
        );
    }
    let rows: Option<u64> = root
        .query_first(format!("SELECT COUNT(*) FROM `{schema}`.{tag}_v"))
        .await
        .unwrap_or_else(|e| panic!("view {tag}_v as root: {e}"));
    assert!(rows.unwrap_or(0) >= 2);
    // The procedure runs, its insert fires the trigger.
    let id = 100 + rand::random::<u16>() as i64;
    root.query_drop(format!("CALL `{schema}`.{tag}_add({id})"))
        .await
        .unwrap_or_else(|e| panic!("procedure {tag}_add: {e}"));
    let logged: Option<u64> = root
        .query_first(format!(
            "SELECT COUNT(*) FROM `{schema}`.{tag}_log WHERE id = {id}"
        ))
        .await
        .unwrap();
    assert_eq!(logged, Some(1), "trigger {tag}_tr did not fire");
    let mut other = login(&reader.target, schema, &reader.user, &reader.password)
        .await
        .expect("reader login");
    let via_view: Vec<(i64, String)> = other
        .query(format!("SELECT id, v FROM {tag}_v ORDER BY id"))
        .await
        .unwrap_or_else(|e| panic!("view {tag}_v as another user: {e}"));
    assert!(via_view.iter().any(|(i, _)| *i == id), "{via_view:?}");
    let n: Option<i64> = other
        .query_first(format!("SELECT {tag}_n()"))
        .await
        .unwrap_or_else(|e| panic!("function {tag}_n as another user: {e}"));
    assert_eq!(n, Some(via_view.len() as i64));
}

/// Another account on the server, to use objects as someone else.
struct Target2 {
    target: Target,
    user: String,
    password: String,
}

async fn reader_account(t: &Target, schema: &str) -> Target2 {
    let user = unique("rd")[..18].to_string();
    let password = credbroker::lease::Password::generate().expose().to_string();
    t.root()
        .await
        .query_drop(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'; \
             GRANT SELECT, EXECUTE ON `{schema}`.* TO '{user}'@'%'"
        ))
        .await
        .unwrap();
    Target2 {
        target: t.clone(),
        user,
        password,
    }
}

/// An account that owns nothing but inherits what leased users define:
/// locked (nobody logs in as it), with the rights its objects need.
async fn owner_account(t: &Target, schema: &str, owner: &str) {
    t.root()
        .await
        .query_drop(format!(
            "CREATE USER '{owner}'@'%' ACCOUNT LOCK; \
             GRANT SELECT, INSERT, EXECUTE, TRIGGER ON `{schema}`.* TO '{owner}'@'%'"
        ))
        .await
        .unwrap();
}

fn audit_of(b: &MyBroker, lease: &pb::Lease) -> Option<credbroker::audit::Record> {
    credbroker::audit::read_records(&b.env.audit_path)
        .unwrap_or_default()
        .into_iter()
        .find(|r| {
            r.lease_id.as_deref() == Some(lease.lease_id.as_str())
                && matches!(r.action.as_str(), "revoke" | "reap" | "admin_revoke")
                && r.outcome == credbroker::audit::Outcome::Ok
        })
}

/// What a leased user defined outlives it: revoked (objects to the role's
/// owner) and expired (objects to the admin, the role having no owner),
/// the view answers for root and for another account, the routines run,
/// the trigger fires; the login is refused, the open session is gone, and
/// the audit record says how many objects moved to whom.
#[tokio::test]
async fn mysql_objects_a_leased_user_defines_outlive_revoke_and_expiry() {
    let t = local().await;
    let owner = unique("own")[..18].to_string();
    let mut b = MyBroker::prepare(&t, |s| {
        ddl_role("maker", s, "5m", Some(&owner)) + &ddl_role("adhoc", s, "2s", None)
    })
    .await;
    owner_account(&t, &b.schema, &owner).await;
    let reader = reader_account(&t, &b.schema).await;
    b.start_in_process().await;
    let mut root = t.root().await;
    let admin: Option<String> = root.query_first("SELECT CURRENT_USER()").await.unwrap();
    let admin = admin.unwrap();

    // Revoked by its holder: everything goes to the owner.
    let lease = b.issue("maker", 300).await.unwrap();
    let mut c = b.login(&lease).await.expect("leased login");
    create_objects(&mut c, "rev").await;
    let mut idle = b.login(&lease).await.expect("second session");
    b.revoke(&lease).await;
    assert!(
        t.user_hosts(&lease.username).await.is_empty(),
        "user not dropped"
    );
    assert!(
        idle.query_drop("SELECT 1").await.is_err(),
        "session survived"
    );
    assert!(c.query_drop("SELECT 1").await.is_err(), "session survived");
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(access_denied(&refused), "{refused}");
    assert_objects_work(&t, &b.schema, "rev", &format!("{owner}@%"), &reader).await;
    let rec = audit_of(&b, &lease).expect("revocation record");
    assert_eq!(rec.objects_reassigned, Some(5), "{rec:?}");
    assert_eq!(
        rec.reassigned_to.as_deref(),
        Some(format!("{owner}@%").as_str())
    );

    // Expired and reaped; the role has no owner, so the admin inherits.
    let lease = b.issue("adhoc", 2).await.unwrap();
    let mut c = b.login(&lease).await.expect("leased login");
    create_objects(&mut c, "exp").await;
    let gone = eventually(Duration::from_secs(20), || async {
        t.user_hosts(&lease.username).await.is_empty()
            && b.state(&lease).await == pb::LeaseState::Revoked
    })
    .await;
    assert!(gone, "expired user {} still exists", lease.username);
    assert!(
        c.query_drop("SELECT 1").await.is_err(),
        "session survived expiry"
    );
    assert_objects_work(&t, &b.schema, "exp", &admin, &reader).await;
    let rec = audit_of(&b, &lease).expect("reap record");
    assert_eq!(rec.action, "reap");
    assert_eq!(rec.objects_reassigned, Some(5), "{rec:?}");
    assert_eq!(rec.reassigned_to.as_deref(), Some(admin.as_str()));

    b.stop().await;
    root.query_drop(format!(
        "DROP USER '{owner}'@'%'; DROP USER '{}'@'%'",
        reader.user
    ))
    .await
    .unwrap();
    b.drop_schema().await;
}

/// Revocations that run at once share one definer lookup: each still
/// hands exactly its own objects to the admin, and says so in its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_concurrent_revocations_each_move_their_own_definers() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| ddl_role("maker", s, "5m", None)).await;
    b.start_in_process().await;
    let mut root = t.root().await;
    let admin: Option<String> = root.query_first("SELECT CURRENT_USER()").await.unwrap();
    let admin = admin.unwrap();
    let mut leases = Vec::new();
    for i in 0..6 {
        let lease = b.issue("maker", 300).await.unwrap();
        let mut c = b.login(&lease).await.expect("leased login");
        // Lease i defines i + 1 views.
        for v in 0..=i {
            c.query_drop(format!("CREATE VIEW cc_{i}_{v} AS SELECT id FROM orders"))
                .await
                .unwrap();
        }
        leases.push(lease);
    }
    let revokes = leases.iter().map(|l| b.revoke(l));
    futures::future::join_all(revokes).await;
    for (i, lease) in leases.iter().enumerate() {
        assert!(
            t.user_hosts(&lease.username).await.is_empty(),
            "user {i} not dropped"
        );
        let rec = audit_of(&b, lease).expect("revocation record");
        assert_eq!(
            rec.objects_reassigned,
            Some(i as u64 + 1),
            "lease {i}: {rec:?}"
        );
        let definers: Vec<String> = root
            .exec(
                "SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ? AND TABLE_NAME LIKE ?",
                (&b.schema, format!("cc\\_{i}\\_%")),
            )
            .await
            .unwrap();
        assert_eq!(definers.len(), i + 1, "lease {i}'s views");
        assert!(
            definers.iter().all(|d| d == &admin),
            "lease {i}: {definers:?}"
        );
    }
    b.stop().await;
    b.drop_schema().await;
}

/// A DBA widens one lease by hand after issue (outside the broker) and the
/// user makes a view with it: the revocation still hands the view to the
/// admin, so it keeps working. (The broker never decides from the role's
/// grants that a user defines nothing.)
#[tokio::test]
async fn mysql_a_privilege_granted_by_hand_after_issue_still_gets_its_objects_moved() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| role("reader", s, "5m", "1h", None)).await;
    let reader = reader_account(&t, &b.schema).await;
    b.start_in_process().await;
    let mut root = t.root().await;
    let admin: Option<String> = root.query_first("SELECT CURRENT_USER()").await.unwrap();
    let admin = admin.unwrap();

    // A DBA widens one lease by hand; the user makes a view with it.
    let widened = b.issue("reader", 0).await.unwrap();
    root.query_drop(format!(
        "GRANT CREATE VIEW, SHOW VIEW ON `{}`.* TO '{}'@'%'",
        b.schema, widened.username
    ))
    .await
    .unwrap();
    let mut c = b.login(&widened).await.expect("leased login");
    c.query_drop("CREATE VIEW hand_v AS SELECT id FROM orders")
        .await
        .expect("the hand-granted privilege works");
    drop(c);
    b.revoke(&widened).await;
    assert!(
        t.user_hosts(&widened.username).await.is_empty(),
        "user not dropped"
    );
    let definer: Option<String> = root
        .exec_first(
            "SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = 'hand_v'",
            (&b.schema,),
        )
        .await
        .unwrap();
    assert_eq!(
        definer.as_deref(),
        Some(admin.as_str()),
        "the view's definer was not moved"
    );
    let mut other = login(&t.clone(), &b.schema, &reader.user, &reader.password)
        .await
        .expect("reader login");
    let n: Vec<i64> = other
        .query("SELECT id FROM hand_v")
        .await
        .expect("the view works after its definer's lease was revoked");
    assert_eq!(n, vec![1]);
    let rec = audit_of(&b, &widened).expect("revocation record");
    assert_eq!(rec.objects_reassigned, Some(1), "{rec:?}");
    b.stop().await;
}

/// Whether the server has `user` locked (MariaDB keeps it in global_priv).
async fn is_locked(t: &Target, user: &str) -> bool {
    let v: Option<Option<String>> = t
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

/// MariaDB's answer to a locked account: ER_ACCOUNT_HAS_BEEN_LOCKED.
fn locked_out(err: &str) -> bool {
    err.contains("4151") || err.contains("locked")
}

/// The drop cannot run (the role's owner account does not exist, so the
/// view's definer cannot move): the account is locked and its sessions
/// gone all the same, the lease is `failing` with the reason, the view
/// is untouched; `admin revoke --force` then forgets the lease because
/// the lock is verified, leaving the locked account in place.
#[tokio::test]
async fn mysql_lock_and_kill_hold_when_the_drop_cannot_run() {
    let t = local().await;
    let ghost = unique("ghost")[..18].to_string();
    let mut b = MyBroker::prepare(&t, |s| ddl_role("maker", s, "5m", Some(&ghost))).await;
    b.edit_config(|c| {
        c.replace(
            "max_backoff = \"1s\"\n",
            "max_backoff = \"1s\"\nfailing_after_attempts = 1\n",
        )
    });
    b.start_in_process().await;
    let lease = b.issue("maker", 300).await.unwrap();
    let mut c = b.login(&lease).await.expect("leased login");
    create_objects(&mut c, "lk").await;
    let mut idle = b.login(&lease).await.expect("second session");

    let err = b
        .client()
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // The caller learns it will be retried; the reason is the operator's
    // (admin leases, the log), not the caller's.
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("will be retried"), "{err:?}");
    let listed = b
        .admin()
        .await
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases;
    let why = &listed
        .iter()
        .find(|l| l.lease_id == lease.lease_id)
        .expect("still listed")
        .last_error;
    assert!(
        why.contains("DEFINER") && why.contains("does not exist"),
        "{why:?}"
    );
    assert!(
        idle.query_drop("SELECT 1").await.is_err(),
        "session survived"
    );
    assert!(c.query_drop("SELECT 1").await.is_err(), "session survived");
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(locked_out(&refused), "{refused}");
    assert!(is_locked(&t, &lease.username).await);
    assert_eq!(t.user_hosts(&lease.username).await, vec!["%".to_string()]);
    let failing = eventually(Duration::from_secs(10), || async {
        b.state(&lease).await == pb::LeaseState::Failing
    })
    .await;
    assert!(failing, "lease not failing");
    // Nothing was half-moved or broken: the view still answers.
    let mut root = t.root().await;
    let rows: Option<u64> = root
        .query_first(format!("SELECT COUNT(*) FROM `{}`.lk_v", b.schema))
        .await
        .unwrap();
    assert_eq!(rows, Some(2));

    let r = b
        .admin()
        .await
        .revoke_leases(pb::RevokeLeasesRequest {
            selector: Some(pb::revoke_leases_request::Selector::LeaseId(
                lease.lease_id.clone(),
            )),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked, 1, "{r:?}");
    assert_eq!(b.state(&lease).await, pb::LeaseState::Revoked);
    // Forgotten by the broker, dead in the database.
    assert!(is_locked(&t, &lease.username).await);
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(locked_out(&refused), "{refused}");

    b.stop().await;
    root.query_drop(format!("DROP USER '{}'@'%'", lease.username))
        .await
        .unwrap();
    b.drop_schema().await;
}

/// `--force` refuses when the lock cannot be verified: here the admin
/// account may not read mysql.global_priv. The lease stays tracked (and
/// the account locked anyway).
#[tokio::test]
async fn mysql_force_refuses_without_a_verified_lock() {
    let t = local().await;
    let ghost = unique("ghost")[..18].to_string();
    let mut b = MyBroker::prepare(&t, |s| ddl_role("maker", s, "5m", Some(&ghost))).await;
    let admin = unique("cbadm")[..18].to_string();
    let password = credbroker::lease::Password::generate();
    let mut root = t.root().await;
    root.query_drop(format!(
        "CREATE USER '{admin}'@'%' IDENTIFIED BY '{pw}';
         GRANT CREATE USER, PROCESS, CONNECTION ADMIN ON *.* TO '{admin}'@'%';
         GRANT SELECT ON mysql.user TO '{admin}'@'%';
         GRANT ALL ON `{schema}`.* TO '{admin}'@'%' WITH GRANT OPTION;",
        pw = password.expose(),
        schema = b.schema
    ))
    .await
    .unwrap();
    let secret = b.env.dir.join("secrets/limited-admin");
    std::fs::write(&secret, password.expose()).unwrap();
    b.edit_config(|text| {
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
    b.start_in_process().await;
    let lease = b.issue("maker", 300).await.unwrap();
    let mut c = b.login(&lease).await.expect("leased login");
    c.query_drop("CREATE VIEW fr_v AS SELECT 1 AS one")
        .await
        .unwrap();
    let r = b
        .admin()
        .await
        .revoke_leases(pb::RevokeLeasesRequest {
            selector: Some(pb::revoke_leases_request::Selector::LeaseId(
                lease.lease_id.clone(),
            )),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked, 0, "{r:?}");
    assert!(
        r.failures
            .iter()
            .any(|f| f.error.contains("could not be verified") && f.error.contains("global_priv")),
        "{r:?}"
    );
    assert_ne!(b.state(&lease).await, pb::LeaseState::Revoked);
    assert!(c.query_drop("SELECT 1").await.is_err(), "session survived");
    assert!(is_locked(&t, &lease.username).await);
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(locked_out(&refused), "{refused}");

    b.stop().await;
    root.query_drop(format!(
        "DROP USER '{}'@'%'; DROP USER '{admin}'@'%'",
        lease.username
    ))
    .await
    .unwrap();
    b.drop_schema().await;
}

/// The failsafe with no broker: at expiry a user that defined a view is
/// locked and its session killed (dropping it would break the view); one
/// that defined nothing is dropped. When the broker returns, its reaper
/// moves the view's definer and drops the first one too.
#[tokio::test]
async fn mysql_failsafe_locks_a_definer_and_drops_the_rest_after_broker_sigkill() {
    let db = throwaway().await;
    let t = target_of(&db);
    let mut b = MyBroker::prepare(&t, |s| ddl_role("maker", s, "4s", None)).await;
    b.spawn_binary().await;
    let definer = b.issue("maker", 4).await.unwrap();
    let plain = b.issue("maker", 4).await.unwrap();
    let mut d = b.login(&definer).await.expect("leased login");
    d.query_drop("CREATE TABLE fs_t (id INT); INSERT INTO fs_t VALUES (1), (2)")
        .await
        .unwrap();
    d.query_drop("CREATE VIEW fs_v AS SELECT id FROM fs_t")
        .await
        .unwrap();
    let mut p = b.login(&plain).await.expect("leased login");
    p.query_drop("SELECT 1").await.unwrap();
    b.kill_binary();

    let expiry = crate::support::ts(&definer.expires_at);
    let within = (expiry + chrono::Duration::seconds(4) - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    let fired = eventually(within, || async {
        t.user_hosts(&plain.username).await.is_empty() && is_locked(&t, &definer.username).await
    })
    .await;
    assert!(fired, "the failsafe did not lock/drop by the expiry");
    assert_eq!(
        t.user_hosts(&definer.username).await,
        vec!["%".to_string()],
        "a definer must stay (locked) until its objects have a new definer"
    );
    let refused = b.login(&definer).await.map(|_| ()).unwrap_err();
    assert!(locked_out(&refused), "{refused}");
    assert!(b.login(&plain).await.is_err());
    for s in [&mut d, &mut p] {
        let mut cut = false;
        for _ in 0..30 {
            if s.query_drop("SELECT 1").await.is_err() {
                cut = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(cut, "the failsafe left a session running");
    }
    let mut root = t.root().await;
    let view = format!("SELECT COUNT(*) FROM `{}`.fs_v", b.schema);
    let rows: Option<u64> = root.query_first(view.as_str()).await.unwrap();
    assert_eq!(rows, Some(2), "the view broke");

    // The broker returns: the reaper moves the definer and drops the user.
    b.spawn_binary().await;
    let done = eventually(Duration::from_secs(20), || async {
        t.user_hosts(&definer.username).await.is_empty()
    })
    .await;
    assert!(done, "the reaper did not finish the revocation");
    let rows: Option<u64> = root.query_first(view.as_str()).await.unwrap();
    assert_eq!(rows, Some(2), "the view broke after the reaper");
    b.kill_binary();
    b.drop_schema().await;
}

/// Several `[databases.*]` on one server and two brokers whose prefixes
/// nest (`qNN_` and `qNN_b_`): user lists are per server, so each sweep
/// sees every one of these users, and must drop none that a lease of
/// *any* of its databases accounts for, nor any the other broker made.
/// Fast sweeps; after several of them every lease still logs in and no
/// `drop_orphan` record exists. Then a user in the first broker's exact
/// shape that no lease accounts for is dropped.
#[tokio::test]
async fn mysql_two_databases_and_two_brokers_on_one_server_keep_their_users() {
    let t = local().await;
    let base = format!("q{:02x}_", rand::random::<u8>());
    let nested = format!("{base}b_");
    let second_schema = t.fresh_schema().await;

    // Broker A: `main` over 127.0.0.1 and `second` over `localhost`, one
    // server, two schemas.
    let mut a = MyBroker::prepare(&t, |s| role("reader", s, "5m", "1h", None)).await;
    let second = a
        .env
        .mysql_database("second", t.port, &second_schema, t.password.as_deref())
        .unwrap()
        .replace("@127.0.0.1:", "@localhost:");
    let old = a.prefix.clone();
    a.edit_config(|c| {
        c.replace(
            &format!("name_prefix = \"{old}\""),
            &format!("name_prefix = \"{base}\""),
        ) + &second
            + &format!(
                "[roles.other]\ndatabase = \"second\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\n\
                 allowed = [\"{APP}\"]\ngrants = [\"GRANT SELECT ON `{second_schema}`.orders TO {{{{name}}}}\"]\n"
            )
    });
    a.prefix = base.clone();
    // Broker B: its own store, a prefix that starts with A's.
    let mut b = MyBroker::prepare(&t, |s| role("reader", s, "5m", "1h", None)).await;
    let old = b.prefix.clone();
    b.edit_config(|c| {
        c.replace(
            &format!("name_prefix = \"{old}\""),
            &format!("name_prefix = \"{nested}\""),
        )
    });
    b.prefix = nested.clone();
    a.start_in_process().await;
    b.start_in_process().await;

    let mut leases = Vec::new();
    for _ in 0..2 {
        let l = a.issue("reader", 300).await.unwrap();
        assert!(l.username.starts_with(&base) && !l.username.starts_with(&nested));
        leases.push((&a, a.schema.clone(), l));
        let l = a.issue("other", 300).await.unwrap();
        assert_eq!(l.database, "second");
        leases.push((&a, second_schema.clone(), l));
        let l = b.issue("reader", 300).await.unwrap();
        assert!(l.username.starts_with(&nested), "{}", l.username);
        leases.push((&b, b.schema.clone(), l));
    }
    // Sweeps run every second; a suspect is dropped on its second sighting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for (broker, schema, l) in &leases {
        let mut c = login(&t, schema, &l.username, &l.password)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "lease {} of {} no longer logs in: {e}",
                    l.username, broker.prefix
                )
            });
        c.query_drop("SELECT item FROM orders").await.unwrap();
        assert_eq!(broker.state(l).await, pb::LeaseState::Active);
    }
    for broker in [&a, &b] {
        let swept: Vec<_> = credbroker::audit::read_records(&broker.env.audit_path)
            .unwrap()
            .into_iter()
            .filter(|r| r.action == "drop_orphan")
            .collect();
        assert!(swept.is_empty(), "{} swept {swept:?}", broker.prefix);
    }

    // A user in A's exact shape that no lease accounts for goes; the view
    // it defined stays, now defined by the admin account.
    let orphan = format!("{base}reader_{}", &unique("")[1..17]);
    let mut root = t.root().await;
    root.query_drop(format!(
        "CREATE USER '{orphan}'@'%'; GRANT SELECT ON `{s}`.* TO '{orphan}'@'%'; \
         CREATE DEFINER = '{orphan}'@'%' VIEW `{s}`.orphan_v AS SELECT item FROM `{s}`.orders",
        s = a.schema
    ))
    .await
    .unwrap();
    let admin: Option<String> = root.query_first("SELECT CURRENT_USER()").await.unwrap();
    let swept = eventually(Duration::from_secs(15), || async {
        t.user_hosts(&orphan).await.is_empty()
    })
    .await;
    assert!(swept, "orphan {orphan} was not swept");
    // The record follows the drop: wait for it too.
    let record = || {
        credbroker::audit::read_records(&a.env.audit_path)
            .unwrap()
            .into_iter()
            .find(|r| r.action == "drop_orphan" && r.username.as_deref() == Some(orphan.as_str()))
    };
    eventually(Duration::from_secs(5), || async { record().is_some() }).await;
    let rec = record();
    let rec = rec.unwrap_or_else(|| panic!("no drop_orphan record for {orphan}"));
    assert_eq!(rec.objects_reassigned, Some(1), "{rec:?}");
    assert_eq!(rec.reassigned_to, admin);
    let item: Option<String> = root
        .query_first(format!("SELECT item FROM `{}`.orphan_v", a.schema))
        .await
        .expect("the swept user's view still answers");
    assert_eq!(item.as_deref(), Some("coffee"));
    for (_, schema, l) in &leases {
        login(&t, schema, &l.username, &l.password)
            .await
            .expect("a lease's user went with the orphan");
    }

    let all = || pb::RevokeLeasesRequest {
        selector: Some(pb::revoke_leases_request::Selector::All(true)),
        force: false,
    };
    assert_eq!(
        a.admin()
            .await
            .revoke_leases(all())
            .await
            .unwrap()
            .into_inner()
            .revoked,
        4
    );
    assert_eq!(
        b.admin()
            .await
            .revoke_leases(all())
            .await
            .unwrap()
            .into_inner()
            .revoked,
        2
    );
    a.stop().await;
    b.stop().await;
    a.drop_schema().await;
    b.drop_schema().await;
    let _ = t
        .root()
        .await
        .query_drop(format!("DROP DATABASE IF EXISTS `{second_schema}`"))
        .await;
}

/// Issue 25 item 6 on real MariaDB: 50 issues racing `lock --revoke`.
/// Afterwards no broker-made user exists whose lease is not live (the
/// lock revoked all it found and refuses the rest: none at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_fifty_issues_racing_lock_revoke_leave_no_user_behind_a_dead_lease() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| role("ro", s, "5m", "10m", None)).await;
    b.start_in_process().await;
    let issued = crate::gate::race_issues_against_lock_revoke(&b, "ro", 50).await;
    let mut settled = false;
    let mut last = Default::default();
    for _ in 0..300 {
        let users = t.users_with_prefix(&b.prefix).await;
        let live = crate::gate::live_usernames(&b).await;
        settled = users.is_subset(&live) && live.is_empty();
        last = (users, live);
        if settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        settled,
        "{issued} of 50 issued; users in the database {:?}, live leases {:?}",
        last.0, last.1
    );
    b.stop().await;
    b.drop_schema().await;
}

/// A role whose leases may insert (to prove a transaction commits) and
/// drain for `deadline` on a handover.
fn drain_role(schema: &str, deadline: &str) -> String {
    format!(
        "[roles.app]\ndatabase = \"main\"\ndefault_ttl = \"5m\"\nmax_ttl = \"10m\"\n\
         allowed = [\"{APP}\"]\ndrain_deadline = \"{deadline}\"\n\
         grants = [\"GRANT SELECT, INSERT ON `{schema}`.orders TO {{{{name}}}}\"]\n\n"
    )
}

impl MyBroker {
    /// The sidecar's revoke of a lease it replaced: a handover, drained.
    async fn hand_over(&self, lease: &pb::Lease) -> pb::LeaseState {
        let r = self
            .client()
            .await
            .revoke_lease(pb::RevokeLeaseRequest {
                lease_id: lease.lease_id.clone(),
                handover: true,
            })
            .await
            .unwrap()
            .into_inner();
        pb::LeaseState::try_from(r.state).unwrap()
    }

    /// Waits until `user` runs a statement starting with `prefix`.
    async fn wait_running(&self, user: &str, prefix: &str) {
        let mut root = self.target.root().await;
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

/// Whether the server ends the session within `within`: watched from
/// root's PROCESSLIST every 100 ms, not by querying it (a query wakes it,
/// and a drain kills only a session asleep for a second, `drain::SETTLE`,
/// until its final third); then it no longer answers.
async fn gone_within(t: &Target, c: &mut Conn, within: Duration) -> bool {
    let id = c.id();
    let mut root = t.root().await;
    let until = Instant::now() + within;
    loop {
        let n: Option<u64> = root
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?",
                (id,),
            )
            .await
            .unwrap();
        if n == Some(0) {
            return !answers(c).await;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn answers(c: &mut Conn) -> bool {
    tokio::time::timeout(Duration::from_secs(2), c.query_drop("SELECT 1"))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// A handover on MariaDB: the account is locked at once, an idle session
/// (`Sleep` for a second, no InnoDB transaction) is killed within about a
/// second (it slept since before the handover), a
/// `SLEEP(3)` in flight completes and an open transaction commits — then
/// their sessions end too, and the user is dropped before the deadline.
/// Immediate termination would fail the query and the transaction.
#[tokio::test]
async fn mysql_handover_drains_idle_sessions_and_lets_a_query_and_a_transaction_finish() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| drain_role(s, "30s")).await;
    b.start_in_process().await;
    let lease = b.issue("app", 0).await.unwrap();
    let user = lease.username.clone();
    let mut idle = b.login(&lease).await.unwrap();
    let mut busy = b.login(&lease).await.unwrap();
    let mut tx = b.login(&lease).await.unwrap();
    tx.query_drop("START TRANSACTION").await.unwrap();
    tx.query_drop("INSERT INTO orders VALUES (1000, 'tea')")
        .await
        .unwrap();
    let query = tokio::spawn(async move {
        let r: Result<Option<(i64, i64)>, _> = busy.query_first("SELECT SLEEP(3), 42").await;
        (r, busy)
    });
    b.wait_running(&user, "SELECT SLEEP").await;

    let started = Instant::now();
    assert_eq!(b.hand_over(&lease).await, pb::LeaseState::Draining);
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(
        locked_out(&refused),
        "a new login is refused at once: {refused}"
    );
    assert!(is_locked(&t, &user).await);
    assert!(
        gone_within(&t, &mut idle, Duration::from_secs(3)).await,
        "the idle session is killed within about a second"
    );
    let idle_gone = started.elapsed();
    let (result, mut busy) = query.await.unwrap();
    assert_eq!(
        result.expect("the query in flight completes").map(|r| r.1),
        Some(42)
    );
    let done = Instant::now();
    assert!(
        gone_within(&t, &mut busy, Duration::from_secs(4)).await,
        "the finished query's session ends once asleep for the settle time"
    );
    let settled = done.elapsed();
    assert!(
        settled >= Duration::from_millis(900),
        "not the instant it went idle ({settled:?}): that races a pool's next query"
    );
    assert!(
        answers(&mut tx).await,
        "a session inside a transaction is left alone"
    );
    tx.query_drop("COMMIT")
        .await
        .expect("the open transaction commits");
    let mut root = t.root().await;
    let n: Option<u64> = root
        .query_first(format!(
            "SELECT COUNT(*) FROM `{}`.orders WHERE id = 1000",
            b.schema
        ))
        .await
        .unwrap();
    assert_eq!(n, Some(1), "what the transaction wrote is there");
    let mut dropped = false;
    for _ in 0..50 {
        if t.user_hosts(&user).await.is_empty() {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dropped, "the user is dropped once its last session is gone");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "before the 30 s deadline"
    );
    assert_eq!(b.state(&lease).await, pb::LeaseState::Revoked);
    println!("handover → idle MariaDB session killed in {idle_gone:?}");
    b.stop().await;
    b.drop_schema().await;
}

/// At the deadline, a session that never goes idle — here one idle *inside*
/// an open transaction, which must not be taken for idle — is killed and
/// the user dropped.
#[tokio::test]
async fn mysql_handover_drain_deadline_ends_an_open_transaction() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, |s| drain_role(s, "3s")).await;
    b.start_in_process().await;
    let lease = b.issue("app", 0).await.unwrap();
    let mut tx = b.login(&lease).await.unwrap();
    tx.query_drop("START TRANSACTION").await.unwrap();
    tx.query_drop("INSERT INTO orders VALUES (1001, 'tea')")
        .await
        .unwrap();
    let started = Instant::now();
    b.hand_over(&lease).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        answers(&mut tx).await,
        "asleep inside a transaction is not idle: left alone until the deadline"
    );
    let mut ended = None;
    for _ in 0..100 {
        if !answers(&mut tx).await {
            ended = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = ended.expect("ended at the deadline");
    assert!(
        ended >= Duration::from_millis(2500),
        "not before the deadline: {ended:?}"
    );
    let mut dropped = false;
    for _ in 0..50 {
        if t.user_hosts(&lease.username).await.is_empty() {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dropped, "the user is dropped at the deadline");
    // The drain task and the reaper are both due at the deadline; when the
    // reaper claims first, the drain's own record follows the drop by a
    // pass, so wait for it rather than race it.
    let drain_rec = || {
        b.audit_records()
            .into_iter()
            .find(|r| r.action == "drain" && r.lease_id.as_deref() == Some(&lease.lease_id))
    };
    let mut rec = drain_rec();
    for _ in 0..50 {
        if rec.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        rec = drain_rec();
    }
    let rec = rec.expect("the drain is audited");
    assert_eq!(
        rec.detail.as_deref(),
        Some("deadline: sessions ended idle=0 at_deadline=1")
    );
    b.stop().await;
    b.drop_schema().await;
}
