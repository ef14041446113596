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

use crate::support::{cluster, free_port, login, one_value, probe_roles_left, unique, wait_port};

mod check;
mod getting_started;
mod mistakes;

const README: &str = include_str!("../../../README.md");
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

impl From<std::process::Output> for Out {
    fn from(out: std::process::Output) -> Out {
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
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
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("credbroker finished within 60 s")
        .expect("credbroker binary runs")
        .into()
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

    /// `client_env(who)` with the keys of `over` set to its values.
    fn client_env_with(
        &self,
        who: &str,
        over: &[(&'static str, String)],
    ) -> Vec<(&'static str, String)> {
        let mut env = self.client_env(who);
        env.retain(|(k, _)| over.iter().all(|(o, _)| o != k));
        env.extend_from_slice(over);
        env
    }

    /// Runs `sql` as the superuser in the set-up's database (on the
    /// shared cluster).
    async fn superuser_sql(&self, sql: &str) {
        cluster()
            .connect(&self.db)
            .await
            .unwrap()
            .batch_execute(sql)
            .await
            .unwrap();
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

    /// `check --config broker.toml`, its output printed.
    async fn check(&self) -> Out {
        let out = self.cli(&["check", "--config", "broker.toml"], &[]).await;
        println!("{out:?}");
        out
    }

    /// Starts `serve` and issues as `app`; the broker and the (printed)
    /// answer.
    async fn serve_and_issue(&self) -> (Serve, Out) {
        let serve = Serve::start(self).await;
        let out = self.issue(&[], &self.client_env("app")).await;
        println!("{out:?}");
        (serve, out)
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
        tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("README block finished within 60 s")
            .expect("sh runs")
            .into()
    }
}

/// The README's minimal config, as written.
fn readme_config() -> String {
    readme_blocks("toml")
        .into_iter()
        .find(|b| b.contains("[roles.orders-readonly]"))
        .expect("README shows the minimal config")
}

/// A new directory with `pki dev`'s certificates in `pki/` and, with
/// `password`, the admin password file: a set-up without a database.
async fn pki_dir(password: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = credbroker(dir.path(), &["pki", "dev", "--out", "pki"], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    if let Some(password) = password {
        std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
        std::fs::write(dir.path().join("secrets/orders-admin"), password).unwrap();
    }
    dir
}

/// Asserts that `out`'s stdout names each of `expected`.
fn assert_names(out: &Out, expected: &[&str]) {
    for expected in expected {
        assert!(
            out.stdout.contains(expected),
            "check names {expected:?}: {out:?}"
        );
    }
}

/// The `error` lines of `check`'s table.
fn error_lines(out: &Out) -> Vec<&str> {
    out.stdout
        .lines()
        .filter(|l| l.starts_with("error"))
        .collect()
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
    let mut config = readme_config()
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
