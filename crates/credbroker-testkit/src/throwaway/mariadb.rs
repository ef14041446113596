//! A throwaway MariaDB server: `mariadb-install-db` into a temporary
//! directory, then `mariadbd` under the supervisor (see the module docs).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mysql_async::prelude::Queryable;

use super::{
    free_port, run_setup, wait_until_ready, write_private_file, RunAs, ServerCommand,
    ServerProcess, ServerTls, Supervised,
};

const MARIADBD: &str = "/usr/sbin/mariadbd";
const INSTALL_DB: &str = "/usr/bin/mariadb-install-db";
const HOST: &str = "127.0.0.1";
const ROOT: &str = "root";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How to configure a [`ThrowawayMariadb`].
#[derive(Debug, Clone)]
pub struct MariadbOptions {
    /// `event_scheduler`; MariaDB's own default is OFF, the broker's expiry
    /// failsafe events need it ON.
    pub event_scheduler: bool,
    /// `ssl_cert`, `ssl_key` (and `ssl_ca` when it has a client CA).
    pub tls: Option<ServerTls>,
    /// `require_secure_transport = ON`: TCP without TLS is refused (the
    /// Unix socket counts as secure). The harness's own TCP connections
    /// then use TLS, accepting the server's certificate unverified: it is
    /// the server it just started, on loopback.
    pub require_secure_transport: bool,
}

impl Default for MariadbOptions {
    fn default() -> Self {
        MariadbOptions {
            event_scheduler: true,
            tls: None,
            require_secure_transport: false,
        }
    }
}

/// A MariaDB server on 127.0.0.1 that lives as long as this value (and never
/// longer than this process).
pub struct ThrowawayMariadb {
    process: ServerProcess,
    socket: PathBuf,
    opts: MariadbOptions,
}

super::deref_to_process!(ThrowawayMariadb);

/// Whether the MariaDB server binaries are installed. `demo` runs without a
/// MariaDB where they are not; `start` (and so every test that needs one)
/// fails saying how to install them (tests never skip).
pub fn mariadb_binaries_present() -> bool {
    Path::new(MARIADBD).is_file() && Path::new(INSTALL_DB).is_file()
}

fn missing_binaries() -> io::Error {
    io::Error::other(format!(
        "MariaDB server binaries not found ({MARIADBD}, {INSTALL_DB}): install them with \
         `apt-get install mariadb-server`"
    ))
}

/// A single-quoted SQL string literal (MariaDB treats backslash as an escape).
fn sql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

impl ThrowawayMariadb {
    /// Creates a data directory, starts the server, and gives `root` a random
    /// password for TCP logins; returns once it accepts connections.
    pub async fn start(opts: MariadbOptions) -> io::Result<Self> {
        if !mariadb_binaries_present() {
            return Err(missing_binaries());
        }
        let mut process =
            ServerProcess::prepare("mariadb", "mariadb.log", RunAs::choose("mysql")?)?;
        let (dir, run_as) = (process.dir.path(), process.run_as.as_ref());

        let mut install = Command::new(INSTALL_DB);
        install
            // Must come first; keeps the machine's /etc/mysql out of the way.
            .arg("--no-defaults")
            .arg(format!("--datadir={}", process.data_dir.display()))
            // Its own temp dir: the bootstrap server names temp tables by
            // pid and counter, and two installs in a shared /tmp (tests run
            // in parallel) can delete each other's.
            .arg(format!("--tmpdir={}", dir.display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ])
            .args(tuning_args())
            .current_dir(dir)
            .env("LC_ALL", "C");
        // Run as the server's user directly rather than with `--user`, so the
        // same code works when we are not root.
        if let Some(user) = run_as {
            user.apply(&mut install);
        }
        run_setup(install, "mariadb-install-db", &process.log_path).await?;

        if let Some(tls) = &opts.tls {
            // Owned by the server's user, 0600: only it reads the key.
            write_private_file(&dir.join("server.crt"), &tls.cert_pem, run_as)?;
            write_private_file(&dir.join("server.key"), &tls.key_pem, run_as)?;
            if let Some(ca) = &tls.client_ca_pem {
                write_private_file(&dir.join("client-ca.crt"), ca, run_as)?;
            }
        }
        let socket = dir.join("mariadb.sock");
        process.port = free_port()?;
        let mut db = ThrowawayMariadb {
            socket,
            process,
            opts,
        };
        db.spawn_and_wait(true).await?;
        db.set_root_password().await?;
        Ok(db)
    }

    /// The server's Unix socket: a login there comes from `localhost`, not
    /// from 127.0.0.1 (tests of host-pinned accounts use it as "elsewhere").
    pub fn socket_path(&self) -> &std::path::Path {
        &self.socket
    }

    fn socket_opts(&self) -> mysql_async::OptsBuilder {
        mysql_async::OptsBuilder::default()
            .socket(Some(self.socket.to_string_lossy()))
            .user(Some(ROOT))
    }

    /// Options for a root connection over TCP, password included.
    ///
    /// `prefer_socket` is off: mysql_async otherwise silently reconnects a
    /// loopback TCP connection over the server's Unix socket, where accounts
    /// match as `'user'@'localhost'` instead of `'user'@'127.0.0.1'`.
    pub fn opts(&self) -> mysql_async::OptsBuilder {
        let ssl = self.opts.tls.is_some().then(|| {
            mysql_async::SslOpts::default()
                .with_danger_accept_invalid_certs(true)
                .with_danger_skip_domain_validation(true)
        });
        mysql_async::OptsBuilder::default()
            .ip_or_hostname(HOST)
            .tcp_port(self.port)
            .user(Some(ROOT))
            .pass(Some(self.password.clone()))
            .prefer_socket(false)
            .ssl_opts(ssl)
    }

    /// Connects as root over TCP.
    pub async fn connect(&self) -> io::Result<mysql_async::Conn> {
        mysql_async::Conn::new(self.opts()).await.map_err(|e| {
            io::Error::other(format!(
                "cannot connect to throwaway MariaDB {}: {e}",
                self.url()
            ))
        })
    }

    async fn set_root_password(&self) -> io::Result<()> {
        let fail = |e: mysql_async::Error| {
            io::Error::other(format!(
                "cannot set the throwaway MariaDB root password: {e}"
            ))
        };
        let mut conn = mysql_async::Conn::new(self.socket_opts())
            .await
            .map_err(fail)?;
        let password = sql_literal(&self.password);
        // mariadb-install-db makes password-less root accounts for localhost,
        // 127.0.0.1, ::1 and the host name: give them all the password, and
        // drop anonymous accounts, which would shadow users from localhost.
        // `IF EXISTS` because --skip-name-resolve leaves the host-name account
        // unloaded (and unusable), so a plain ALTER would fail on it.
        let accounts: Vec<(String, String)> = conn
            .query("SELECT User, Host FROM mysql.user WHERE User IN ('root', '')")
            .await
            .map_err(fail)?;
        let mut sql = String::new();
        for (user, host) in &accounts {
            let account = format!("{}@{}", sql_literal(user), sql_literal(host));
            if user.is_empty() {
                sql.push_str(&format!("DROP USER IF EXISTS {account};"));
            } else {
                sql.push_str(&format!(
                    "ALTER USER IF EXISTS {account} IDENTIFIED BY {password};"
                ));
            }
        }
        for host in [HOST, "%"] {
            sql.push_str(&format!(
                "CREATE USER IF NOT EXISTS 'root'@'{host}' IDENTIFIED BY {password};\
                 GRANT ALL PRIVILEGES ON *.* TO 'root'@'{host}' WITH GRANT OPTION;"
            ));
        }
        conn.query_drop(sql).await.map_err(fail)?;
        conn.disconnect().await.map_err(fail)?;
        // Prove TCP logins work before anyone relies on them.
        self.connect().await?.disconnect().await.map_err(fail)
    }

    async fn spawn_and_wait(&mut self, fresh: bool) -> io::Result<()> {
        let mut args = vec![
            // Must come first; keeps the machine's /etc/mysql out of the way.
            "--no-defaults".to_string(),
            format!("--datadir={}", self.data_dir.display()),
            format!("--socket={}", self.socket.display()),
            format!("--port={}", self.port),
            format!("--bind-address={HOST}"),
            format!(
                "--pid-file={}",
                self.dir.path().join("mariadbd.pid").display()
            ),
            format!("--tmpdir={}", self.dir.path().display()),
            format!(
                "--event-scheduler={}",
                if self.opts.event_scheduler {
                    "ON"
                } else {
                    "OFF"
                }
            ),
            "--skip-log-bin".into(),
            "--skip-name-resolve".into(),
            "--max-connections=200".into(),
        ];
        if let Some(tls) = &self.opts.tls {
            let file = |name: &str| self.dir.path().join(name).display().to_string();
            args.push(format!("--ssl-cert={}", file("server.crt")));
            args.push(format!("--ssl-key={}", file("server.key")));
            if tls.client_ca_pem.is_some() {
                args.push(format!("--ssl-ca={}", file("client-ca.crt")));
            }
        }
        if self.opts.require_secure_transport {
            args.push("--require-secure-transport=ON".into());
        }
        args.extend(tuning_args().iter().map(|s| s.to_string()));
        let server = Supervised::spawn(&ServerCommand {
            program: Path::new(MARIADBD),
            args,
            log: &self.log_path,
            dir: self.dir.path(),
            run_as: self.run_as.as_ref(),
            // Nothing to preserve on drop: SIGKILL is fastest, InnoDB recovers.
            immediate_signal: "KILL",
            fast_signal: "TERM",
        })?;
        // Until the root password is set only the socket login works.
        let opts: mysql_async::Opts = if fresh {
            self.socket_opts().into()
        } else {
            self.opts().into()
        };
        let ready = wait_until_ready("MariaDB", &server, &self.log_path, READY_TIMEOUT, || {
            let opts = opts.clone();
            async move {
                let conn = mysql_async::Conn::new(opts)
                    .await
                    .map_err(|e| e.to_string())?;
                conn.disconnect().await.map_err(|e| e.to_string())
            }
        })
        .await;
        self.started(server, ready)
    }

    pub fn root_password(&self) -> &str {
        &self.password
    }

    /// `mysql://root@127.0.0.1:PORT/`, without the password. mysql_async reads
    /// it with `prefer_socket` on; see [`opts`](Self::opts).
    pub fn url(&self) -> String {
        format!("mysql://{ROOT}@{HOST}:{}/", self.port)
    }

    /// Starts the server again on the same port, stopping it first if it
    /// runs, and waits until root can log in over TCP.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.stop().await?;
        self.spawn_and_wait(false).await
    }
}

/// Small and unsafe-on-crash settings: a test server holds little data and is
/// never recovered after a power cut.
fn tuning_args() -> [&'static str; 4] {
    [
        "--innodb-buffer-pool-size=32M",
        "--innodb-log-file-size=16M",
        "--innodb-flush-log-at-trx-commit=0",
        "--innodb-doublewrite=0",
    ]
}
