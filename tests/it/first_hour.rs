//! A new operator's first hour: the README's "Getting started from
//! nothing" followed as written (its SQL, shell and config blocks are read
//! from README.md, with only names, ports and passwords made unique), and
//! each likely first mistake — wrong admin password, database down, broker
//! down, a client certificate from another CA, a grant the admin cannot
//! give, a missing `pg_signal_backend` or `pg_read_all_stats`, an expired certificate, a prefix
//! collision — shown to name its cause and where, on the real binary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::support::{cluster, free_port, login, probe_roles_left, unique, wait_port};

const README: &str = include_str!("../../README.md");
const SECTION: &str = "## Getting started from nothing";

/// The fenced blocks of one language in the README's getting-started
/// section, in order.
fn readme_blocks(lang: &str) -> Vec<String> {
    let start = README
        .find(SECTION)
        .expect("README has the getting-started section");
    let section = &README[start + SECTION.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = section;
    while let Some(i) = rest.find(&fence) {
        let body = &rest[i + fence.len()..];
        let end = body.find("```").expect("closed fence");
        out.push(body[..end].to_string());
        rest = &body[end..];
    }
    out
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs the real binary in `dir` (the README's relative paths hold there).
async fn credbroker(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("CREDBROKER_CONFIG")
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("credbroker finished within 60 s")
        .expect("credbroker binary runs");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One operator's set-up from the README, on the shared throwaway cluster.
struct Setup {
    dir: tempfile::TempDir,
    db: String,
    admin: String,
    password: String,
    /// The broker's gRPC port.
    port: u16,
    prefix: String,
    /// The PostgreSQL server's port.
    pg_port: u16,
}

/// How a test departs from the README (the mistake it makes).
#[derive(Default)]
struct Changes {
    /// Drop README SQL lines containing any of these.
    skip_sql: Vec<&'static str>,
    /// (from, to) replacements in the README SQL.
    sql: Vec<(&'static str, &'static str)>,
    /// (from, to) replacements in the README config.
    config: Vec<(String, String)>,
}

impl Setup {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn client_env(&self, who: &str) -> Vec<(&'static str, String)> {
        vec![
            (
                "CREDBROKER_ADDR",
                format!("https://127.0.0.1:{}", self.port),
            ),
            ("CREDBROKER_CA", "pki/ca.pem".into()),
            ("CREDBROKER_CERT", format!("pki/{who}.pem")),
            ("CREDBROKER_KEY", format!("pki/{who}-key.pem")),
        ]
    }

    async fn cli(&self, args: &[&str], env: &[(&'static str, String)]) -> Out {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        credbroker(self.path(), args, &env).await
    }

    /// `lease issue --role orders-readonly` and `more`, as `env` says.
    async fn issue(&self, more: &[&str], env: &[(&'static str, String)]) -> Out {
        let mut args = vec!["lease", "issue", "--role", "orders-readonly"];
        args.extend_from_slice(more);
        self.cli(&args, env).await
    }

    async fn check(&self) -> Out {
        self.cli(&["check", "--config", "broker.toml"], &[]).await
    }

    fn location(&self) -> String {
        format!("{}@127.0.0.1:{}/{}", self.admin, self.pg_port, self.db)
    }

    /// A README shell block as written, in the set-up's directory, with
    /// this build's `credbroker` and PostgreSQL's `psql` on the PATH and
    /// the broker's address (the README's is the default port).
    async fn sh(&self, script: &str) -> Out {
        let bin = Path::new(env!("CARGO_BIN_EXE_credbroker"))
            .parent()
            .unwrap();
        let mut path = vec![bin.to_path_buf()];
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        // Debian keeps psql beside the server binaries too.
        if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
            path.extend(dirs.flatten().map(|d| d.path().join("bin")));
        }
        assert!(
            path.iter().any(|d| d.join("psql").is_file()),
            "psql is needed to follow the README: apt-get install -y postgresql-client \
             (scripts/ensure-db-binaries.sh installs postgresql, which brings it)"
        );
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .current_dir(self.path())
            .env("PATH", std::env::join_paths(path).unwrap())
            .env(
                "CREDBROKER_ADDR",
                format!("https://127.0.0.1:{}", self.port),
            )
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG");
        for (k, _) in std::env::vars() {
            if k.starts_with("PG") || (k.starts_with("CREDBROKER_") && k != "CREDBROKER_ADDR") {
                cmd.env_remove(k);
            }
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("README block finished within 60 s")
            .expect("sh runs");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A README shell block: the one that contains `marker`.
fn readme_sh(marker: &str) -> String {
    readme_blocks("sh")
        .into_iter()
        .find(|b| b.contains(marker))
        .unwrap_or_else(|| panic!("README shows a shell block with {marker:?}"))
}

/// What `check` concluded, line by line: (status, check), without the
/// details that differ between runs.
fn verdict(out: &Out) -> Vec<(String, String)> {
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap_or_default();
    let detail = header.find("DETAIL").expect("check's table header");
    lines
        .filter(|l| l.len() > detail && !l.starts_with(' '))
        .map(|l| (l[..7].trim().to_string(), l[9..detail].trim().to_string()))
        .collect()
}

/// Steps 2–5 of the README: the admin role (its SQL), the password file
/// (its shell line), `pki dev`, the minimal config.
async fn setup(changes: Changes) -> Setup {
    setup_on(cluster(), changes).await
}

/// [`setup`] on a given server. The database is created empty, as
/// `createdb` would: everything in it comes from the README's SQL.
async fn setup_on(
    pg: &credbroker_testkit::throwaway::ThrowawayPostgres,
    changes: Changes,
) -> Setup {
    let db = unique("t");
    pg.create_database(&db).await.unwrap();
    let admin = unique("adm");
    let password = unique("pw");
    let prefix = format!("f{}_", &unique("")[1..4]);
    let port = free_port();

    // 2. The admin role, as the README's PostgreSQL block says.
    let sql = &readme_blocks("sql")[0];
    let superuser = pg.connect(&db).await.unwrap();
    for line in sql.lines().filter(|l| !l.trim().is_empty()) {
        if changes.skip_sql.iter().any(|s| line.contains(s)) {
            continue;
        }
        let mut stmt = line
            .replace("broker_admin", &admin)
            .replace("a-long-random-password", &password);
        for (from, to) in &changes.sql {
            stmt = stmt.replace(from, to);
        }
        superuser
            .batch_execute(&stmt)
            .await
            .unwrap_or_else(|e| panic!("README SQL {stmt:?}: {e:?}"));
    }

    let dir = tempfile::tempdir().unwrap();
    // 3. The password file, with the README's own shell line.
    let sh = readme_blocks("sh");
    let secret_line = sh
        .iter()
        .find(|b| b.contains("secrets/orders-admin"))
        .expect("README shows the password file");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(secret_line.replace("a-long-random-password", &password))
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("secrets/orders-admin"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the password file is 0600");

    // 4. Certificates; `pki dev` says what each identity is for.
    let out = credbroker(dir.path(), &["pki", "dev", "--out", "pki"], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    for id in [
        "spiffe://credbroker.dev/ns/demo/app",
        "spiffe://credbroker.dev/ns/demo/other",
        "spiffe://credbroker.dev/dba/oncall",
    ] {
        assert!(out.stdout.contains(id), "pki dev names {id}: {out:?}");
    }
    assert!(out.stdout.contains("to see a refusal"), "{out:?}");

    // 5. The minimal config, with this test's ports, database and names. A
    // prefix of its own: brokers on one cluster sweep each other's users
    // otherwise.
    let mut config = readme_blocks("toml")
        .into_iter()
        .find(|b| b.contains("[roles.orders-readonly]"))
        .expect("README shows the minimal config")
        .replace("127.0.0.1:7443", &format!("127.0.0.1:{port}"))
        .replace(
            "127.0.0.1:5432/orders",
            &format!("127.0.0.1:{}/{db}", pg.port()),
        )
        .replace("broker_admin", &admin)
        .replace(
            "[server]\n",
            &format!("[server]\nname_prefix = \"{prefix}\"\n"),
        );
    for (from, to) in &changes.config {
        assert!(config.contains(from.as_str()), "config has {from:?}");
        config = config.replace(from.as_str(), to);
    }
    std::fs::write(dir.path().join("broker.toml"), config).unwrap();
    Setup {
        dir,
        db,
        admin,
        password,
        port,
        prefix,
        pg_port: pg.port(),
    }
}

/// `credbroker serve` in the set-up's directory, killed on drop.
struct Serve {
    child: std::process::Child,
    log: PathBuf,
}

impl Serve {
    async fn start(s: &Setup) -> Serve {
        let log = s.path().join("broker.log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["serve", "--config", "broker.toml"])
            .current_dir(s.path())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_port(s.port).await;
        Serve { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as an operator's Ctrl-C or systemd stops it; its log then.
    async fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "serve did not stop within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.log()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_getting_started_works_as_written() {
    let s = setup(Changes::default()).await;

    // 6. check, then serve.
    let out = s.check().await;
    println!("{out:?}");
    assert_eq!(out.code, 0, "check on the README's set-up: {out:?}");
    assert!(out.stdout.contains("0 error(s)"), "{out:?}");
    for expected in [
        "tls.cert",
        "tls.client_ca",
        "store",
        &format!("connected as {}", s.location()),
        "role orders-readonly",
        "dry run of CREATE ROLE and 1 grant(s) passed",
    ] {
        assert!(
            out.stdout.contains(expected),
            "check shows {expected:?}: {out:?}"
        );
    }
    assert!(
        !out.stdout.contains(&s.password),
        "no password in check's output"
    );

    // `check` opens the store read-only and creates nothing: `serve` makes it.
    assert!(
        out.stdout.contains("does not exist yet"),
        "check says there is no store yet: {out:?}"
    );
    assert!(
        !s.path().join("credbroker.db").exists(),
        "check created no store file"
    );
    // The warning `serve` logs at start (no CRL) is one `check` counts.
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("warning") && l.contains("tls.crl") && l.contains("not set")),
        "{out:?}"
    );
    let stopped = verdict(&out);

    let serve = Serve::start(&s).await;

    // 7. A first lease, and a login with it: the README's block as written.
    let out = s.sh(&readme_sh("--format env > lease.env")).await;
    println!("{out:?}");
    assert_eq!(out.code, 0, "README step 7: {out:?}");
    assert!(
        out.stdout.lines().any(|l| l.trim() == "1") && out.stdout.contains("(1 row)"),
        "psql as the lease counts one order: {out:?}"
    );
    let env = std::fs::read_to_string(s.path().join("lease.env")).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(s.path().join("lease.env"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "lease.env holds a password: 0600");
    let user = env_value(&env, "PGUSER");
    let pw = env_value(&env, "PGPASSWORD");
    assert_eq!(env_value(&env, "PGDATABASE"), s.db);
    assert!(user.starts_with(&s.prefix), "{user}");
    let lease_id = env_value(&env, "CREDBROKER_LEASE_ID").to_string();
    assert!(lease_id.starts_with("l_"), "{env}");
    let expires = env_value(&env, "CREDBROKER_LEASE_EXPIRES_AT");
    assert!(
        chrono::DateTime::parse_from_rfc3339(expires).is_ok(),
        "{expires}"
    );
    let c = login(&s.db, user, pw)
        .await
        .expect("the leased credential logs in");
    let n: i64 = c
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    drop(c);

    // `check` with the broker serving the store (a lease live) gives the
    // verdict it gave with the broker stopped.
    let out = s.check().await;
    println!("{out:?}");
    assert_eq!(out.code, 0, "check beside a running broker: {out:?}");
    assert!(out.stdout.contains("(read-only)"), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "name prefix {:?}: 1 user(s) with it, all leased",
            s.prefix
        )),
        "{out:?}"
    );
    assert_eq!(verdict(&out), stopped, "{out:?}");

    // The README's renew and revoke, from the shell, with lease.env.
    // In the same shell as step 7: its `export` still holds.
    let exports: String = readme_sh("--format env > lease.env")
        .lines()
        .filter(|l| l.starts_with("export "))
        .map(|l| format!("{l}\n"))
        .collect();
    let renew = readme_sh("lease renew \"$CREDBROKER_LEASE_ID\"");
    let out = s.sh(&format!("{exports}{renew}")).await;
    println!("{out:?}");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains(&format!("revoked {lease_id}")),
        "{out:?}"
    );
    assert!(
        login(&s.db, user, pw).await.is_err(),
        "the revoked credential no longer logs in"
    );

    // Renew and lookup carry no password, so they print none (not `""`);
    // times are RFC 3339 UTC to the second.
    let out = s
        .cli(
            &["lease", "issue", "--role", "orders-readonly"],
            &s.client_env("app"),
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let issued: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(!issued["password"].as_str().unwrap().is_empty());
    let id = issued["lease_id"].as_str().unwrap().to_string();
    for args in [
        vec!["lease", "lookup", id.as_str()],
        vec!["lease", "renew", id.as_str(), "--ttl", "5m"],
    ] {
        let out = s.cli(&args, &s.client_env("app")).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(
            v.get("password").is_none(),
            "{args:?} prints no password: {out:?}"
        );
        let expires = v["expires_at"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(expires).is_ok()
                && expires.ends_with('Z')
                && !expires.contains('.'),
            "{expires}"
        );
    }

    // Over the role's max_ttl (1h) a renewal is capped, with a warning,
    // as the Vault API does; 0s is refused, not read as the default.
    let out = s
        .cli(
            &["lease", "renew", id.as_str(), "--ttl", "2h"],
            &s.client_env("app"),
        )
        .await;
    println!("{out:?}");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.starts_with("warning: renewed until ")
            && out
                .stderr
                .contains("not the 2h asked for: capped by the role's max_ttl"),
        "{out:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let until = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    let left = until.signed_duration_since(chrono::Utc::now());
    assert!(
        left <= chrono::Duration::hours(1) && left > chrono::Duration::minutes(55),
        "{left}"
    );
    for args in [
        vec!["lease", "renew", id.as_str(), "--ttl", "0s"],
        vec!["lease", "issue", "--role", "orders-readonly", "--ttl", "0s"],
    ] {
        let out = s.cli(&args, &s.client_env("app")).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(
            out.stderr
                .contains("a lease lives at least 1s; leave --ttl out"),
            "{args:?}: {out:?}"
        );
    }

    // An argument error is not called a config error.
    let out = s
        .issue(&["--ca", "pki/nope.pem"], &s.client_env("app"))
        .await;
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.starts_with("error: --ca pki/nope.pem: "),
        "{out:?}"
    );

    // 8. The deliberate refusal, word for word as the README shows it.
    let mut env = s.client_env("other");
    env.retain(|(k, _)| *k == "CREDBROKER_ADDR" || *k == "CREDBROKER_CA");
    env.push(("CREDBROKER_CERT", "pki/other.pem".into()));
    env.push(("CREDBROKER_KEY", "pki/other-key.pem".into()));
    let out = s
        .cli(&["lease", "issue", "--role", "orders-readonly"], &env)
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    let line = out.stderr.trim();
    assert_eq!(
        line,
        "error: issue: PermissionDenied: identity \"spiffe://credbroker.dev/ns/demo/other\" may not lease role \"orders-readonly\""
    );
    assert!(
        README.contains(&format!("# {line}")),
        "README shows {line:?}"
    );

    // The start-up summary names what was loaded.
    let log = serve.log();
    assert!(
        log.contains("credbroker serving")
            && log.contains("orders (postgres)")
            && log.contains("orders-readonly on orders"),
        "{log}"
    );
    assert!(!log.contains("\x1b["), "no colours in a log file: {log}");
    // The no-CRL warning once, not a second bare copy.
    assert_eq!(log.matches("tls.crl is not set").count(), 1, "{log}");

    // A clean shutdown ends with a line that says so.
    let log = serve.stop().await;
    assert!(
        log.lines()
            .last()
            .is_some_and(|l| l.contains("credbroker stopped")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_wrong_admin_password_names_database_address_user_and_cause() {
    let s = setup(Changes::default()).await;
    std::fs::write(s.path().join("secrets/orders-admin"), "not-the-password").unwrap();

    let out = s.check().await;
    println!("{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    let cause = format!("password authentication failed for user \"{}\"", s.admin);
    for expected in [
        "database orders",
        "authentication failed as",
        &s.location(),
        &cause,
        "SQLSTATE 28P01",
        "fix: make the password in admin_password_file",
    ] {
        assert!(
            out.stdout.contains(expected),
            "check names {expected:?}: {out:?}"
        );
    }

    let serve = Serve::start(&s).await;
    let out = s
        .cli(
            &["lease", "issue", "--role", "orders-readonly"],
            &s.client_env("app"),
        )
        .await;
    println!("{out:?}");
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("Unavailable: database \"orders\" is unreachable"),
        "{out:?}"
    );
    // The caller learns which database, not the server's words.
    assert!(!out.stderr.contains("password authentication"), "{out:?}");
    let log = serve.log();
    assert!(
        log.contains(&cause) && log.contains(&s.location()) && log.contains("28P01"),
        "the broker's log names the cause: {log}"
    );
    println!("broker log:\n{log}");
    assert!(!log.contains("not-the-password") && !out.stderr.contains("not-the-password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_database_down_says_connection_refused_and_where() {
    let down = free_port();
    let s = setup(Changes {
        config: vec![(
            format!("127.0.0.1:{}/", cluster().port()),
            format!("127.0.0.1:{down}/"),
        )],
        ..Changes::default()
    })
    .await;
    let out = s.check().await;
    println!("{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    let at = format!("{}@127.0.0.1:{down}/{}", s.admin, s.db);
    assert!(
        out.stdout.contains("cannot connect: connection refused as") && out.stdout.contains(&at),
        "{out:?}"
    );
    assert!(
        out.stdout.contains(&format!(
            "is PostgreSQL running and listening at 127.0.0.1:{down}?"
        )),
        "{out:?}"
    );
    // Nothing it could not ask is called ok (it used to say "no users
    // with it yet").
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("database orders")),
        "{out:?}"
    );

    let serve = Serve::start(&s).await;
    let out = s
        .cli(
            &["lease", "issue", "--role", "orders-readonly"],
            &s.client_env("app"),
        )
        .await;
    println!("{out:?}");
    assert!(
        out.stderr.contains("database \"orders\" is unreachable"),
        "{out:?}"
    );
    let log = serve.log();
    assert!(
        log.contains(&format!("connection refused as {at}")),
        "the broker's log says refused and where: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_broker_down_says_address_and_connection_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = credbroker(dir.path(), &["pki", "dev", "--out", "pki"], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let addr = format!("https://127.0.0.1:{}", free_port());
    let out = credbroker(
        dir.path(),
        &["lease", "issue", "--role", "orders-readonly"],
        &[
            ("CREDBROKER_ADDR", &addr),
            ("CREDBROKER_CA", "pki/ca.pem"),
            ("CREDBROKER_CERT", "pki/app.pem"),
            ("CREDBROKER_KEY", "pki/app-key.pem"),
        ],
    )
    .await;
    println!("{out:?}");
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!(
            "cannot reach the broker at {addr}: connection refused"
        )),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_tls_failures_name_the_likely_causes() {
    let s = setup(Changes::default()).await;
    let _serve = Serve::start(&s).await;
    // A second dev PKI: another CA and its own client certificates.
    let out = s.cli(&["pki", "dev", "--out", "elsewhere"], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");

    // A client certificate from another CA than the broker's client_ca.
    let mut env = s.client_env("app");
    env.retain(|(k, _)| *k == "CREDBROKER_ADDR" || *k == "CREDBROKER_CA");
    env.push(("CREDBROKER_CERT", "elsewhere/app.pem".into()));
    env.push(("CREDBROKER_KEY", "elsewhere/app-key.pem".into()));
    let out = s
        .cli(&["lease", "issue", "--role", "orders-readonly"], &env)
        .await;
    println!("{out:?}");
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!("127.0.0.1:{}", s.port))
            && out
                .stderr
                .contains("refused our client certificate --cert elsewhere/app.pem")
            && out
                .stderr
                .contains("another CA than the broker's tls.client_ca"),
        "{out:?}"
    );

    // The wrong CA for the broker's own certificate.
    let mut env = s.client_env("app");
    env.retain(|(k, _)| *k != "CREDBROKER_CA");
    env.push(("CREDBROKER_CA", "elsewhere/ca.pem".into()));
    let out = s
        .cli(&["lease", "issue", "--role", "orders-readonly"], &env)
        .await;
    println!("{out:?}");
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("the broker's certificate was rejected")
            && out.stderr.contains("--ca elsewhere/ca.pem"),
        "{out:?}"
    );

    // A key that is not the certificate's (it used to be "client TLS:
    // transport error").
    let mut env = s.client_env("app");
    env.retain(|(k, _)| *k != "CREDBROKER_KEY");
    env.push(("CREDBROKER_KEY", "pki/other-key.pem".into()));
    let out = s
        .cli(&["lease", "issue", "--role", "orders-readonly"], &env)
        .await;
    println!("{out:?}");
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr
            .starts_with("error: --key pki/other-key.pem does not belong to --cert pki/app.pem"),
        "{out:?}"
    );

    // Plain HTTP to the TLS port (it used to be "frame with invalid size").
    let mut env = s.client_env("app");
    env.retain(|(k, _)| *k != "CREDBROKER_ADDR");
    env.push(("CREDBROKER_ADDR", format!("http://127.0.0.1:{}", s.port)));
    let out = s
        .cli(&["lease", "issue", "--role", "orders-readonly"], &env)
        .await;
    println!("{out:?}");
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "the broker speaks only TLS: use https://127.0.0.1:{}",
            s.port
        )),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_grant_the_admin_cannot_give_names_the_statement_and_role() {
    // The admin may grant SELECT on orders only (no default privileges
    // either); the role grants payroll, a table the README does not make.
    let s = setup(Changes {
        sql: vec![("ALL TABLES IN SCHEMA public", "TABLE orders")],
        skip_sql: vec!["ALTER DEFAULT PRIVILEGES"],
        config: vec![(
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {{name}}".into(),
            "GRANT SELECT ON payroll TO {{name}}".into(),
        )],
    })
    .await;
    cluster()
        .connect(&s.db)
        .await
        .unwrap()
        .batch_execute("CREATE TABLE payroll (name text, salary int)")
        .await
        .unwrap();
    let out = s.check().await;
    println!("{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    for expected in [
        "role orders-readonly",
        "GRANT statement 1 of 1 (\"GRANT SELECT ON payroll TO {{name}}\")",
        "permission denied for table payroll (SQLSTATE 42501)",
        "WITH GRANT OPTION",
    ] {
        assert!(
            out.stdout.contains(expected),
            "check names {expected:?}: {out:?}"
        );
    }

    let serve = Serve::start(&s).await;
    let out = s
        .cli(
            &["lease", "issue", "--role", "orders-readonly"],
            &s.client_env("app"),
        )
        .await;
    println!("{out:?}");
    assert_eq!(out.code, 1);
    // Not an admin: no internals over gRPC.
    assert!(
        out.stderr
            .contains("Internal: internal error; see the broker's log"),
        "{out:?}"
    );
    let log = serve.log();
    assert!(
        log.contains(
            "create role for role \"orders-readonly\": GRANT statement 1 of 1 \
             (\"GRANT SELECT ON payroll TO {{name}}\"): permission denied for table payroll \
             (SQLSTATE 42501)"
        ) && log.contains(&s.location()),
        "the broker's log names the statement and role: {log}"
    );
    println!("broker log:\n{log}");
}

/// Each grant of the README's admin setup left out: `check` fails naming
/// it and the statement that fixes it — `pg_signal_backend` (revocation
/// ends sessions) and `pg_read_all_stats` (a handover sees which sessions
/// are idle, to drain them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_names_a_missing_pg_signal_backend_or_pg_read_all_stats() {
    for (grant, finding) in [
        ("pg_signal_backend", "is not a member of pg_signal_backend"),
        ("pg_read_all_stats", "cannot see other sessions' state"),
    ] {
        let s = setup(Changes {
            skip_sql: vec![grant],
            ..Changes::default()
        })
        .await;
        let out = s.check().await;
        println!("{out:?}");
        assert_eq!(out.code, 1, "{out:?}");
        assert!(
            out.stdout
                .contains(&format!("admin role {:?} {finding}", s.admin))
                && out.stdout.contains(&format!("fix: GRANT {grant} TO")),
            "{out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_names_an_expired_certificate() {
    let s = setup(Changes::default()).await;
    let pki = s.path().join("pki");
    let ca = credbroker_testkit::pki::DevCa::load(
        &std::fs::read_to_string(pki.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(pki.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let expired = ca
        .client_cert(&credbroker_testkit::pki::ClientSpec::expired(
            "spiffe://credbroker.dev/ns/demo/server",
        ))
        .unwrap();
    std::fs::write(pki.join("server.pem"), &expired.cert_pem).unwrap();
    std::fs::write(pki.join("server-key.pem"), &expired.key_pem).unwrap();
    let out = s.check().await;
    println!("{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("error") && l.contains("tls.cert") && l.contains("expired at")),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_names_a_prefix_collision() {
    let s = setup(Changes::default()).await;
    // A broker-shaped user with our prefix that our store never leased:
    // another deployment's, which our orphan sweep would drop.
    let stranger = format!("{}ro_{}", s.prefix, "abcdefghijklmnop");
    let c = cluster().connect(&s.db).await.unwrap();
    c.batch_execute(&format!("CREATE ROLE \"{stranger}\" LOGIN"))
        .await
        .unwrap();
    let out = s.check().await;
    c.batch_execute(&format!("DROP ROLE \"{stranger}\""))
        .await
        .unwrap();
    println!("{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("name prefix {:?} collides", s.prefix))
            && out.stdout.contains(&stranger)
            && out.stdout.contains("server.name_prefix"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_exit_64_for_an_unreadable_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = credbroker(dir.path(), &["check", "--config", "missing.toml"], &[]).await;
    assert_eq!(out.code, 64, "{out:?}");
    assert!(out.stderr.contains("missing.toml"), "{out:?}");
}

/// The README's MySQL/MariaDB admin, made on a throwaway MariaDB whose
/// event scheduler is off (MariaDB's default), the line that turns it on
/// skipped: `check` passes every privilege and names the scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_names_mariadb_event_scheduler_off() {
    use mysql_async::prelude::Queryable;
    let maria = credbroker_testkit::throwaway::ThrowawayMariadb::start(
        credbroker_testkit::throwaway::MariadbOptions {
            event_scheduler: false,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "cannot start a throwaway MariaDB: {e} (needs /usr/sbin/mariadbd and \
             mariadb-install-db: `apt-get install -y mariadb-server`)"
        )
    });
    let mut root = maria.connect().await.unwrap();
    let password = unique("pw");
    let sql = &readme_blocks("sql")[1];
    assert!(
        sql.contains("CREATE USER 'broker_admin'"),
        "the MySQL block: {sql}"
    );
    for line in sql.lines().filter(|l| !l.trim().is_empty()) {
        if line.contains("event_scheduler") {
            continue; // the mistake under test
        }
        let stmt = line.replace("a-long-random-password", &password);
        root.query_drop(&stmt)
            .await
            .unwrap_or_else(|e| panic!("README SQL {stmt:?}: {e}"));
    }
    root.query_drop("CREATE DATABASE orders").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = credbroker(dir.path(), &["pki", "dev", "--out", "pki"], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/orders-admin"), &password).unwrap();
    let config = readme_blocks("toml")
        .into_iter()
        .find(|b| b.contains("[roles.orders-readonly]"))
        .unwrap()
        .replace("kind = \"postgres\"", "kind = \"mysql\"")
        .replace(
            "postgres://broker_admin@127.0.0.1:5432/orders",
            &format!("mysql://broker_admin@127.0.0.1:{}/orders", maria.port()),
        )
        .replace(
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {{name}}",
            "GRANT SELECT ON orders.* TO {{name}}",
        )
        .replace("127.0.0.1:7443", &format!("127.0.0.1:{}", free_port()));
    std::fs::write(dir.path().join("broker.toml"), config).unwrap();

    let out = credbroker(dir.path(), &["check", "--config", "broker.toml"], &[]).await;
    println!("{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    let errors: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("error"))
        .collect();
    assert_eq!(errors.len(), 1, "only the scheduler is wrong: {out:?}");
    assert!(
        errors[0].contains("database orders") && errors[0].contains("event_scheduler is OFF"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("fix: SET GLOBAL event_scheduler = ON"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("connected as broker_admin@127.0.0.1:"),
        "{out:?}"
    );
}

/// Shell completions and the man page come from the same clap definition
/// as the real flags.
#[test]
fn completions_and_man_page_are_generated_from_the_cli() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        assert!(script.contains("credbroker"), "{shell}");
        assert!(
            script.contains("sidecar") && script.contains("give-up-after"),
            "{shell}: {script}"
        );
    }
    let man = run(&["man"]);
    assert!(man.contains(".TH credbroker"), "{man}");
    assert!(man.contains("sidecar"), "{man}");
    // One page: its commands are named as commands of it, not as pages
    // (`credbroker-serve(1)`) that do not exist.
    assert!(!man.contains("credbroker-serve"), "{man}");
    assert!(man.contains("credbroker serve"), "{man}");
    // --log-json where it means something, not where nothing logs.
    for (cmd, shown) in [("completions", false), ("man", false), ("serve", true)] {
        let help = run(&[cmd, "--help"]);
        assert_eq!(help.contains("--log-json"), shown, "{cmd} --help: {help}");
    }
    let help = run(&["admin", "--help"]);
    assert!(
        help.contains("lock") && help.contains("static roles"),
        "{help}"
    );
    let help = run(&["admin", "lock", "--help"]);
    for said in [
        "Lock a role",
        "Lock a database",
        "Lock a static role",
        "Lock an identity",
    ] {
        assert!(help.contains(said), "{said}: {help}");
    }
}

/// A database that checks no passwords (`trust` in pg_hba.conf, common in
/// containers): `check` logs in as a throwaway role with a wrong password,
/// is let in, and says that leased passwords and expiry mean nothing
/// there. The probe role does not outlive the check. With `trust`, a
/// misspelt admin is "role … does not exist": the fix creates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_flags_a_database_that_checks_no_passwords() {
    let pg = credbroker_testkit::throwaway::ThrowawayPostgres::start(
        credbroker_testkit::throwaway::PostgresOptions {
            hba: Some(vec!["host all all 127.0.0.1/32 trust".into()]),
            ..Default::default()
        },
    )
    .await
    .expect("a throwaway PostgreSQL (scripts/ensure-db-binaries.sh installs the binaries)");
    let s = setup_on(&pg, Changes::default()).await;
    let out = s.check().await;
    println!("{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    let errors: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("error"))
        .collect();
    assert_eq!(errors.len(), 1, "{out:?}");
    assert!(
        errors[0].contains("database orders")
            && errors[0].contains("let a login in with a wrong password")
            && errors[0].contains("trust"),
        "{out:?}"
    );
    assert!(out.stdout.contains("fix: use scram-sha-256"), "{out:?}");
    assert_eq!(
        probe_roles_left(&pg, &s.db).await,
        0,
        "the probe role is dropped"
    );

    // A misspelt admin: its fix creates the role, not ALTER ROLE.
    let config = std::fs::read_to_string(s.path().join("broker.toml")).unwrap();
    std::fs::write(
        s.path().join("broker.toml"),
        config.replace(
            &format!("postgres://{}@", s.admin),
            "postgres://no_such_admin@",
        ),
    )
    .unwrap();
    let out = s.check().await;
    println!("{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.contains("role \"no_such_admin\" does not exist")
            && out.stdout.contains("fix: create role \"no_such_admin\"")
            && !out.stdout.contains("ALTER ROLE"),
        "{out:?}"
    );
}

/// README step 2 without its table: the role's `GRANT … ON ALL TABLES`
/// grants nothing. `check` warns (it used to pass it as ok), and the trap
/// the README describes is real: a lease issued before the table exists
/// is refused it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_warns_when_a_role_grants_no_table() {
    let s = setup(Changes {
        skip_sql: vec![" orders"],
        ..Changes::default()
    })
    .await;
    let out = s.check().await;
    println!("{out:?}");
    assert_eq!(out.code, 0, "a warning, not an error: {out:?}");
    assert!(
        out.stdout.lines().any(|l| l.starts_with("warning")
            && l.contains("role orders-readonly")
            && l.contains("gave the role no privilege at all")),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains("create the tables before issuing leases"),
        "{out:?}"
    );

    let _serve = Serve::start(&s).await;
    let out = s.issue(&["--format", "env"], &s.client_env("app")).await;
    assert_eq!(out.code, 0, "{out:?}");
    let (user, pw) = (
        env_value(&out.stdout, "PGUSER"),
        env_value(&out.stdout, "PGPASSWORD"),
    );
    cluster()
        .connect(&s.db)
        .await
        .unwrap()
        .batch_execute("CREATE TABLE orders (id int PRIMARY KEY, item text)")
        .await
        .unwrap();
    let c = login(&s.db, user, pw).await.expect("the lease logs in");
    let e = c
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{e:?}"
    );
}

/// Mistakes that need no database: a port already taken, a missing audit
/// file, `admin lock` without a target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_port_in_use_missing_audit_file_and_lock_without_target() {
    let dir = tempfile::tempdir().unwrap();
    let out = credbroker(dir.path(), &["pki", "dev", "--out", "pki"], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/orders-admin"), "x").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = readme_blocks("toml")
        .into_iter()
        .find(|b| b.contains("[roles.orders-readonly]"))
        .unwrap()
        .replace("127.0.0.1:7443", &format!("127.0.0.1:{port}"));
    std::fs::write(dir.path().join("broker.toml"), config).unwrap();
    let out = credbroker(dir.path(), &["serve", "--config", "broker.toml"], &[]).await;
    println!("{out:?}");
    // The machine's state, not the file's mistake: not `config:`, not 64.
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "error: unavailable: server.listen 127.0.0.1:{port}: "
        )) && out.stderr.contains("is another broker"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("config:"), "{out:?}");

    let out = credbroker(dir.path(), &["audit", "verify", "missing.log"], &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("cannot read missing.log: "), "{out:?}");

    let out = credbroker(dir.path(), &["admin", "lock", "--reason", "x"], &[]).await;
    assert_eq!(out.code, 2, "{out:?}");
    for flag in ["--identity", "--role", "--static-role", "--database"] {
        assert!(out.stderr.contains(flag), "names {flag}: {out:?}");
    }
}
