//! A throwaway PostgreSQL server: `initdb` into a temporary directory, then
//! `postgres` under the supervisor (see the module docs).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{
    free_port, run_setup, wait_until_ready, write_private_file, RunAs, ServerCommand,
    ServerProcess, ServerTls, Supervised,
};

pub(super) const SUPERUSER: &str = "postgres";
pub(super) const HOST: &str = "127.0.0.1";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How to configure a [`ThrowawayPostgres`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `timezone` and `log_timezone`; the server default when `None`.
    pub timezone: Option<String>,
    /// `log_statement = 'all'`, so tests can grep the log for what was sent.
    pub log_statement_all: bool,
    /// More `postgresql.conf` settings. Values are quoted for you.
    pub extra_conf: Vec<(String, String)>,
    /// `ssl = on` with this certificate and key (`ssl_cert_file`,
    /// `ssl_key_file`), and `ssl_ca_file` when it has a client CA.
    pub tls: Option<ServerTls>,
    /// `pg_hba.conf` lines for TCP (`hostssl …`, `hostnossl … reject`)
    /// instead of initdb's. A `local all all scram-sha-256` line always
    /// comes first, and the harness's own connections
    /// ([`config`](ThrowawayPostgres::config), readiness) then go over the
    /// Unix socket, so they work whatever these lines refuse.
    pub hba: Option<Vec<String>>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            timezone: None,
            log_statement_all: true,
            extra_conf: Vec::new(),
            tls: None,
            hba: None,
        }
    }
}

/// A PostgreSQL server on 127.0.0.1 that lives as long as this value (and never
/// longer than this process).
/// (Fields are the module's and `standby.rs`'s, which builds a standby.)
pub struct ThrowawayPostgres {
    pub(super) process: ServerProcess,
    pub(super) bin_dir: PathBuf,
    /// The harness connects over the Unix socket (custom `pg_hba.conf`).
    pub(super) via_socket: bool,
}

super::deref_to_process!(ThrowawayPostgres);

/// Whether PostgreSQL server binaries (`initdb`, `postgres`) are installed, so
/// `demo`, the bench and the tests can fail up front saying how to install
/// them (tests never skip).
pub fn postgres_binaries_present() -> bool {
    find_bin_dir().is_ok()
}

/// `CREDBROKER_PG_BINDIR` if set, else the highest version under
/// /usr/lib/postgresql (Debian/Ubuntu), else /usr/bin (Fedora, Arch).
fn find_bin_dir() -> io::Result<PathBuf> {
    let has_bins = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("CREDBROKER_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_bins(&dir) {
            Ok(dir)
        } else {
            Err(io::Error::other(format!(
                "CREDBROKER_PG_BINDIR={} holds no `initdb` and `postgres`",
                dir.display()
            )))
        };
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            // "15", "9.6": compare numerically, so 15 beats 9.6.
            let version = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            has_bins(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let usr_bin = Path::new("/usr/bin");
    if has_bins(usr_bin) {
        return Ok(usr_bin.to_path_buf());
    }
    Err(io::Error::other(
        "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin or /usr/bin: install \
         them with `apt-get install postgresql`, or point CREDBROKER_PG_BINDIR at the directory \
         holding `initdb` and `postgres`",
    ))
}

/// A `postgresql.conf` value: quoting is valid for every setting type.
fn conf_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

pub(super) fn conf_line(key: &str, value: &str) -> io::Result<String> {
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        return Err(io::Error::other(format!(
            "invalid postgresql.conf setting name {key:?}"
        )));
    }
    Ok(format!("{key} = {}\n", conf_value(value)))
}

impl ThrowawayPostgres {
    /// Creates a cluster and starts it; returns once it accepts connections.
    pub async fn start(opts: PostgresOptions) -> io::Result<Self> {
        let bin_dir = find_bin_dir()?;
        let mut process = ServerProcess::prepare("pg", "postgres.log", RunAs::choose("postgres")?)?;
        // Owned copies: `process.port` is set below, after initdb.
        let dir = process.dir.path().to_path_buf();
        let data_dir = process.data_dir.clone();
        let run_as = process.run_as.clone();

        let pwfile = dir.as_path().join("pwfile");
        write_private_file(&pwfile, &format!("{}\n", process.password), run_as.as_ref())?;
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("--pgdata")
            .arg(&data_dir)
            .args(["--username", SUPERUSER])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                // A throwaway cluster need not survive a power cut.
                "--no-sync",
            ])
            .current_dir(dir.as_path())
            .env("LC_ALL", "C");
        if let Some(user) = &run_as {
            user.apply(&mut initdb);
        }
        let initdb_result = run_setup(initdb, "initdb", &process.log_path).await;
        let _ = std::fs::remove_file(&pwfile);
        initdb_result?;

        let mut conf = String::from("\n# credbroker throwaway server\n");
        let socket_dir = dir.as_path().to_string_lossy().into_owned();
        let port = free_port()?;
        process.port = port;
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), HOST.into()),
            ("port".into(), port.to_string()),
            ("unix_socket_directories".into(), socket_dir),
            ("logging_collector".into(), "off".into()),
            ("log_destination".into(), "stderr".into()),
            ("log_line_prefix".into(), "%m [%p] %q%u@%d ".into()),
            ("fsync".into(), "off".into()),
            ("synchronous_commit".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
            ("max_connections".into(), "200".into()),
        ];
        if opts.log_statement_all {
            settings.push(("log_statement".into(), "all".into()));
        }
        if let Some(tz) = &opts.timezone {
            settings.push(("timezone".into(), tz.clone()));
            settings.push(("log_timezone".into(), tz.clone()));
        }
        if let Some(tls) = &opts.tls {
            // In the data directory, owned by the server's user and 0600:
            // PostgreSQL refuses a key file anyone else can read.
            let cert = data_dir.join("server.crt");
            let key = data_dir.join("server.key");
            write_private_file(&cert, &tls.cert_pem, run_as.as_ref())?;
            write_private_file(&key, &tls.key_pem, run_as.as_ref())?;
            settings.push(("ssl".into(), "on".into()));
            settings.push(("ssl_cert_file".into(), cert.to_string_lossy().into_owned()));
            settings.push(("ssl_key_file".into(), key.to_string_lossy().into_owned()));
            if let Some(ca) = &tls.client_ca_pem {
                let ca_path = data_dir.join("client-ca.crt");
                write_private_file(&ca_path, ca, run_as.as_ref())?;
                settings.push(("ssl_ca_file".into(), ca_path.to_string_lossy().into_owned()));
            }
        }
        if let Some(lines) = &opts.hba {
            let mut hba = String::from("local all all scram-sha-256\n");
            for line in lines {
                if line.contains('\n') {
                    return Err(io::Error::other(format!(
                        "pg_hba.conf line {line:?} holds a line break"
                    )));
                }
                hba.push_str(line);
                hba.push('\n');
            }
            std::fs::write(data_dir.join("pg_hba.conf"), hba)?;
        }
        settings.extend(opts.extra_conf.iter().cloned());
        for (key, value) in &settings {
            conf.push_str(&conf_line(key, value)?);
        }
        let conf_path = data_dir.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path)
            .map_err(|e| io::Error::other(format!("cannot read {}: {e}", conf_path.display())))?;
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing)?;

        let mut pg = ThrowawayPostgres {
            process,
            bin_dir,
            via_socket: opts.hba.is_some(),
        };
        pg.start_server().await?;
        Ok(pg)
    }

    pub(super) async fn start_server(&mut self) -> io::Result<()> {
        let program = self.bin_dir.join("postgres");
        let server = Supervised::spawn(&ServerCommand {
            program: &program,
            args: vec!["-D".into(), self.data_dir.to_string_lossy().into_owned()],
            log: &self.log_path,
            dir: self.dir.path(),
            run_as: self.run_as.as_ref(),
            // SIGQUIT is PostgreSQL's immediate shutdown, SIGINT its fast one.
            immediate_signal: "QUIT",
            fast_signal: "INT",
        })?;
        let config = self.config("postgres");
        let ready = wait_until_ready("PostgreSQL", &server, &self.log_path, READY_TIMEOUT, || {
            let config = config.clone();
            async move {
                let (client, connection) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                drop(client);
                // Let the session end cleanly instead of leaving a log line
                // about an unexpected EOF.
                let _ = connection.await;
                Ok(())
            }
        })
        .await;
        self.started(server, ready)
    }

    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    pub fn superuser_password(&self) -> &str {
        &self.password
    }

    /// `postgres://postgres@127.0.0.1:PORT/dbname`, without the password.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://{SUPERUSER}@{HOST}:{}/{dbname}", self.port)
    }

    /// A superuser connection config, password included: over TCP, or over
    /// the Unix socket when the options replaced `pg_hba.conf`.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        if self.via_socket {
            config.host_path(self.dir.path());
        } else {
            config.host(HOST);
        }
        config
            .port(self.port)
            .user(SUPERUSER)
            .password(&self.password)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(5));
        config
    }

    /// Connects as the superuser; the connection runs on a spawned task.
    pub async fn connect(&self, dbname: &str) -> io::Result<tokio_postgres::Client> {
        let (client, connection) = self
            .config(dbname)
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| {
                io::Error::other(format!(
                    "cannot connect to throwaway PostgreSQL {}: {e}",
                    self.url(dbname)
                ))
            })?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    pub async fn create_database(&self, name: &str) -> io::Result<()> {
        let client = self.connect("postgres").await?;
        let sql = format!(
            "CREATE DATABASE {}",
            postgres_protocol::escape::escape_identifier(name)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| io::Error::other(format!("cannot create database {name:?}: {e}")))
    }

    /// Starts the server again on the same port, stopping it first if it
    /// runs, and waits until it accepts connections.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.stop().await?;
        self.start_server().await
    }
}
