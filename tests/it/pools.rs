//! Real connection pools through the sidecar (issue 27): the broker binary,
//! `credbroker sidecar --format json`, and an application on a real pool —
//! SQLAlchemy + psycopg 3, HikariCP + PostgreSQL JDBC, node-postgres's
//! Pool, SQLAlchemy + PyMySQL on MariaDB — whose connection factory
//! re-reads the sidecar's file. Each client (tests/pools/) runs queries on
//! several workers every 20 ms across at least three handovers, plus one
//! long query, on a connection of the replaced credential, that is still
//! running when that lease is handed over. With the liveness check each pool's docs
//! advise, no query may fail. The same pool with its defaults runs beside
//! it on the same file; its numbers are printed, not judged.
//! What the clients need is installed by scripts/ensure-pool-deps.sh; a
//! missing piece fails the test saying so.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use credbroker_testkit::devenv::DevEnv;
use mysql_async::prelude::Queryable;

use crate::sidecar::{wait_for_file, Sidecar};
use crate::support::*;

/// Leases of 10 s renewed up to 20 s: the sidecar hands over every ~13 s
/// (`schedule::rotate_at`: a third of the life before the hard limit).
const DEFAULT_TTL: &str = "10s";
const MAX_TTL: &str = "20s";
/// The sidecar's `--grace`: how long the replaced lease stays valid.
const GRACE_S: u64 = 3;
/// The long query: started at a handover on a connection of the replaced
/// credential, it spans the handover's revoke `GRACE_S` later (the drain
/// starts) and ends before the replaced lease's hard limit (~6.7 s after).
const LONG_S: u64 = 5;

/// What every client is told (the same keys in all three languages).
fn run_config() -> String {
    serde_json::json!({
        "workers": 4,
        "interval_ms": 20,
        "handovers": 3,
        // Past the last handover's revoke, so three revokes happen in the run.
        "tail_s": GRACE_S + 3,
        "max_s": 80,
        "long_s": LONG_S,
        // A pool's maximum connection lifetime: below the lease's TTL and
        // below the grace plus two thirds of the drain (3 s + 2/3 of the
        // ~3.7 s a replaced lease has left after it, ~5.4 s), so the pool
        // retires its old connections itself before the drain's final
        // third, where any idle session is ended at once
        // (`revocation::drain::settle`). HikariCP cannot go below 30 s:
        // its connections are ended between queries in that third.
        "max_lifetime_s": 5,
    })
    .to_string()
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

const ENSURE: &str = "run scripts/ensure-pool-deps.sh (scripts/test.sh does)";

fn need(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{what} is missing ({}): {ENSURE}",
        path.display()
    );
}

fn python() -> PathBuf {
    let p = repo("target/pool-venv/bin/python");
    need(
        &p,
        "the pool tests' Python venv with SQLAlchemy, psycopg, PyMySQL",
    );
    p
}

fn on_path(tool: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("`{tool}` is not on the PATH: {ENSURE}"))
}

const JARS: &[&str] = &[
    "/usr/share/java/HikariCP.jar",
    "/usr/share/java/postgresql.jar",
    "/usr/share/java/slf4j-api.jar",
    "/usr/share/java/slf4j-nop.jar",
];

/// Compiles HikariPool.java into `dir`; the classpath to run it with.
async fn compile_hikari(dir: &Path) -> String {
    for jar in JARS {
        need(Path::new(jar), jar);
    }
    let cp = JARS.join(":");
    let out = tokio::process::Command::new(on_path("javac"))
        .arg("-d")
        .arg(dir)
        .args(["-cp", &cp])
        .arg(repo("tests/pools/HikariPool.java"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "javac failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{}:{cp}", dir.display())
}

/// One pool client's numbers, from its JSON report line.
#[derive(Debug)]
struct Report {
    pool: String,
    queries: u64,
    failed: u64,
    handovers: u64,
    long_ok: bool,
    long_user: Option<String>,
    long_old_user: Option<String>,
    long_seconds: f64,
    raw: serde_json::Value,
}

impl Report {
    fn parse(pool: &str, stdout: &str, stderr: &str) -> Report {
        let line = stdout.lines().last().unwrap_or_default();
        let raw: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("{pool}: no report ({e}); stdout:\n{stdout}\nstderr:\n{stderr}")
        });
        let n = |k: &str| {
            raw[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{pool}: no {k} in {raw}"))
        };
        let long = &raw["long_query"];
        let text = |k: &str| long[k].as_str().map(str::to_string);
        Report {
            pool: pool.to_string(),
            queries: n("queries"),
            failed: n("failed"),
            handovers: n("handovers"),
            long_ok: long["ok"].as_bool().unwrap_or(false),
            long_user: text("user"),
            long_old_user: text("old_user"),
            long_seconds: long["seconds"].as_f64().unwrap_or(0.0),
            raw,
        }
    }

    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | long query {} ({:.1} s) | errors {} |",
            self.pool,
            self.queries,
            self.failed,
            self.handovers,
            if self.long_ok { "completed" } else { "FAILED" },
            self.long_seconds,
            self.raw["errors"]
        )
    }
}

/// Runs one client to its end; its report.
async fn run_client(pool: &str, mut cmd: tokio::process::Command) -> Report {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{pool}: cannot start the client: {e}"));
    let out = tokio::time::timeout(Duration::from_secs(150), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{pool}: the client ran past 150 s"))
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{pool}: the client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    Report::parse(pool, &stdout, &stderr)
}

/// The checked pool and the defaults pool, side by side on one sidecar's
/// file: `program` with `args`, then the file, `checked` or `defaults`, and
/// the run's config (the same arguments for every client).
async fn run_pools(name: &str, b: &TestBroker, role: &str, program: &Path, args: &[&OsStr]) {
    let config = run_config();
    let client = |file: &Path, mode: &str| {
        let mut c = tokio::process::Command::new(program);
        c.args(args).arg(file).args([mode, &config]);
        c
    };
    let dir = tempfile::tempdir().unwrap();
    let grace = format!("{GRACE_S}s");
    let mut sc = Sidecar::spawn(
        b,
        dir.path(),
        role,
        &["--grace", &grace, "--format", "json"],
    );
    wait_for_file(&mut sc).await;
    let (checked_name, defaults_name) = (
        format!("{name}, liveness check"),
        format!("{name}, defaults"),
    );
    let (checked, defaults) = tokio::join!(
        run_client(&checked_name, client(&sc.out, "checked")),
        run_client(&defaults_name, client(&sc.out, "defaults")),
    );
    let log = sc.log_text();
    assert!(sc.running(), "the sidecar died:\n{log}");
    println!("| pool | queries | failed | handovers seen | long query | errors |");
    println!("| --- | --- | --- | --- | --- | --- |");
    println!("{}\n{}", checked.row(), defaults.row());
    println!("sidecar timeline:\n{}", sc.timeline().join("\n"));

    // Three replaced leases were handed over (their revoke asked to drain)
    // while the clients ran.
    let handed = log.matches("old lease handed over").count();
    assert!(
        handed >= 3,
        "{handed} handovers in the sidecar's log:\n{log}"
    );
    for r in [&checked, &defaults] {
        assert!(
            r.handovers >= 3,
            "{}: saw {} handovers",
            r.pool,
            r.handovers
        );
        assert!(r.queries >= 1000, "{}: only {} queries", r.pool, r.queries);
    }
    // The long query ran on a connection of the replaced credential, so it
    // was in flight when that lease was handed over.
    assert!(
        checked.long_ok,
        "{}: the long query failed: {}",
        checked.pool, checked.raw["long_query"]
    );
    assert_eq!(
        checked.long_user, checked.long_old_user,
        "{}: the long query did not run as the replaced credential",
        checked.pool
    );
    assert!(checked.long_seconds >= LONG_S as f64, "{:?}", checked.raw);
    assert_eq!(
        checked.failed, 0,
        "{}: {} of {} queries failed: {}",
        checked.pool, checked.failed, checked.queries, checked.raw["errors"]
    );
}

fn pg_role(name: &str) -> String {
    role(name, "{db}", DEFAULT_TTL, MAX_TTL, APP)
}

/// A broker binary on a fresh PostgreSQL database; `database_keys` are
/// added to its `[databases.main]`.
async fn pg_broker(role_name: &str, database_keys: &str) -> TestBroker {
    let mut b = TestBroker::prepare(&pg_role(role_name)).await;
    b.edit_config(|t| {
        t.replacen(
            "[databases.main]\n",
            &format!("[databases.main]\n{database_keys}"),
            1,
        )
    });
    b.spawn_binary().await;
    b
}

fn sqlalchemy_args(kind: &str) -> [std::ffi::OsString; 2] {
    [repo("tests/pools/sqlalchemy_pool.py").into(), kind.into()]
}

fn os(args: &[std::ffi::OsString]) -> Vec<&OsStr> {
    args.iter().map(|a| a.as_os_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_psycopg_pool_sees_no_failed_query_across_handovers() {
    let python = python();
    let b = pg_broker("pool_sa", "").await;
    let args = sqlalchemy_args("postgresql");
    run_pools("SQLAlchemy + psycopg 3", &b, "pool_sa", &python, &os(&args)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hikaricp_pool_sees_no_failed_query_across_handovers() {
    let classes = tempfile::tempdir().unwrap();
    let cp = compile_hikari(classes.path()).await;
    let java = on_path("java");
    // PgJDBC's SCRAM client refuses a verifier of fewer than 4096
    // iterations ("iteration must be >= 4096"); the broker's default is 1.
    let b = pg_broker("pool_hk", "scram_iterations = 4096\n").await;
    let args = ["-Xmx128m", "-cp", &cp, "HikariPool"].map(OsStr::new);
    run_pools("HikariCP + PostgreSQL JDBC", &b, "pool_hk", &java, &args).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pg_pool_sees_no_failed_query_across_handovers() {
    let node = on_path("node");
    need(
        &repo("tests/pools/node_modules/pg/package.json"),
        "node-postgres (tests/pools/node_modules)",
    );
    let b = pg_broker("pool_nd", "").await;
    let script = repo("tests/pools/pg_pool.js");
    run_pools(
        "node-postgres Pool",
        &b,
        "pool_nd",
        &node,
        &[script.as_os_str()],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlalchemy_pymysql_pool_on_mariadb_sees_no_failed_query_across_handovers() {
    let python = python();
    let m = mariadb();
    let schema = unique("pool");
    let mut root = mysql_async::Conn::new(maria_opts(None, None))
        .await
        .expect("root login to the throwaway MariaDB");
    root.query_drop(format!(
        "CREATE DATABASE `{schema}`;
         CREATE TABLE `{schema}`.orders (id INT PRIMARY KEY, item TEXT);
         INSERT INTO `{schema}`.orders VALUES (1, 'coffee');"
    ))
    .await
    .unwrap();
    drop(root);
    let dir = tempfile::tempdir().unwrap();
    let env = DevEnv::create(dir.path()).unwrap();
    let main = MainDatabase {
        section: env
            .mysql_database("main", m.port(), &schema, Some(m.root_password()))
            .unwrap(),
        name: schema.clone(),
        pg_config: tokio_postgres::Config::new(),
    };
    let roles = format!(
        "[roles.pool_my]\ndatabase = \"main\"\ndefault_ttl = \"{DEFAULT_TTL}\"\nmax_ttl = \"{MAX_TTL}\"\n\
         allowed = [\"{APP}\"]\ngrants = [\"GRANT SELECT ON `{schema}`.orders TO {{{{name}}}}\"]\n"
    );
    let mut b = TestBroker::prepare_with_main(
        dir,
        env,
        main,
        &roles,
        "orphan_sweep_interval = \"1s\"\n",
        'p',
    )
    .await;
    b.spawn_binary().await;
    let args = sqlalchemy_args("mariadb");
    let name = "SQLAlchemy + PyMySQL (MariaDB)";
    run_pools(name, &b, "pool_my", &python, &os(&args)).await;
}
