//! MySQL and MariaDB backend: users with a broker-computed password hash,
//! pinned to the role's host pattern, each with a failsafe event that
//! locks it at its expiry even if the broker never comes back.
//!
//! MySQL has no `VALID UNTIL`. The database-side expiry is a one-shot
//! `EVENT … ON SCHEDULE AT` in the broker's schema ([`FAILSAFE_SCHEMA`]),
//! named like the user, that locks the account, kills its sessions and
//! drops it unless it is the DEFINER of something. It is created *before*
//! the user (so no user ever exists without one), moved by renew and
//! dropped by revoke. Where the server cannot run it (event scheduler off,
//! no `EVENT` privilege) preflight says so loudly and the broker keeps
//! working on its reaper alone.
//!
//! Revocation: `ACCOUNT LOCK` (refuses new logins at once) → `KILL
//! CONNECTION` for each session → DEFINERs moved to the role's owner
//! (`mysql_definer`) → `DROP USER` → the failsafe event dropped. Whatever
//! fails after the lock leaves a locked account without sessions and the
//! lease `failing`: never a usable credential, never a broken view.
//! MariaDB 10.11 is what the tests run; the MySQL 8 branches (lock state
//! in `mysql.user.account_locked`, drop-and-create of routines, `DROP
//! USER` refused for a definer from 8.0.22) follow MySQL's manual.

use std::future::Future;
use std::sync::RwLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Pool, PoolConstraints, PoolOpts};
use tokio::sync::OnceCell;

use crate::backend::mysql_auth::{caching_sha2_hash, native_password_hash};
use crate::backend::mysql_definer::{self as definer, Defined, ObjectKind};
use crate::backend::{
    read_admin_password, render_grant, stage_admin_password, store_admin_password, Backend,
    Endpoint, NewUser, PoolState, Reassigned, Revokee, StaticLogin, StaticUsers, UserRef,
};
use crate::config::DatabaseConfig;
use crate::dbtls::{self, Dialect, TlsParams};
use crate::error::{Error, Result};
use crate::lease::{BackendKind, Password, Username};

/// The schema that holds the failsafe events. One per server, shared by
/// every broker using it: event names are the (unique, random) user names.
pub const FAILSAFE_SCHEMA: &str = "credbroker";

/// MySQL error codes we act on.
mod code {
    /// `ER_NO_SUCH_THREAD`: the session ended before we could kill it.
    pub const NO_SUCH_THREAD: u16 = 1094;
    /// `ER_EVENT_DOES_NOT_EXIST`: the failsafe already fired or was never made.
    pub const EVENT_DOES_NOT_EXIST: u16 = 1539;
    /// `ER_PARSE_ERROR`: its message quotes our statement, hash included.
    pub const PARSE_ERROR: u16 = 1064;
    /// `ER_CANNOT_USER_REFERENCED_AS_DEFINER` (MySQL 8.0.22+): `DROP USER`
    /// of an account that is still some object's DEFINER.
    pub const REFERENCED_AS_DEFINER: u16 = 4006;
    /// Server going away or refusing sessions: worth a retry, not a bug.
    pub const UNAVAILABLE: [u16; 6] = [1040, 1053, 1203, 1205, 1927, 3024];
}

/// Which server family we talk to; they differ in name limits, password
/// plugins and statement forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Mariadb,
    Mysql,
}

/// What we learnt about the server on the first connection.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub flavor: Flavor,
    pub version: (u32, u32, u32),
    /// Longest account user name the server accepts.
    pub max_user_len: usize,
    /// Whether failsafe events can be created here, or why not.
    pub failsafe: std::result::Result<(), String>,
}

impl ServerInfo {
    /// Reads `SELECT VERSION()`: `10.11.19-MariaDB-0+deb12u1`, `8.0.36`, …
    pub fn from_version(version: &str) -> Result<(Flavor, (u32, u32, u32))> {
        let flavor = if version.to_ascii_lowercase().contains("mariadb") {
            Flavor::Mariadb
        } else {
            Flavor::Mysql
        };
        // Old MariaDB handshakes prefix a fake "5.5.5-".
        let v = version.strip_prefix("5.5.5-").unwrap_or(version);
        let mut parts = v
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u32>().unwrap_or(0));
        let triple = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        if triple.0 == 0 {
            return Err(Error::Internal(format!(
                "cannot read the server version {version:?}"
            )));
        }
        Ok((flavor, triple))
    }

    /// User name limits: MySQL 5.7.8+ 32 characters (16 before), MariaDB
    /// 10.0+ 80 (16 before).
    pub fn max_user_len(flavor: Flavor, v: (u32, u32, u32)) -> usize {
        match flavor {
            Flavor::Mariadb if v.0 >= 10 => 80,
            Flavor::Mysql if v >= (5, 7, 8) => 32,
            _ => 16,
        }
    }

    /// Whether `ALTER USER … ACCOUNT LOCK` exists: MySQL 5.7.6+ (the oldest
    /// we accept) and MariaDB 10.4+.
    pub fn can_lock(&self) -> bool {
        Self::lockable(self.flavor, self.version)
    }

    fn lockable(flavor: Flavor, version: (u32, u32, u32)) -> bool {
        match flavor {
            Flavor::Mysql => true,
            Flavor::Mariadb => version >= (10, 4, 0),
        }
    }

    /// The `IDENTIFIED …` clause carrying a hash, never the plaintext:
    /// MariaDB takes `BY PASSWORD '*…'` (mysql_native_password); MySQL 8
    /// gets its default plugin, caching_sha2_password, with a SHA-256 crypt
    /// hash we compute (`BY PASSWORD` is gone there, and
    /// mysql_native_password is off by default from 8.4 and removed in 9);
    /// MySQL 5.7 takes the native hash with `AS`.
    pub fn identified_clause(&self, password: &Password) -> String {
        Self::identified_with(self.flavor, self.version, &self.stored_hash(password))
    }

    /// The hash as the server will store it (`mysql.user.authentication_string`).
    pub fn stored_hash(&self, password: &Password) -> String {
        match self.flavor {
            Flavor::Mysql if self.version.0 >= 8 => caching_sha2_hash(password),
            _ => native_password_hash(password),
        }
    }

    fn identified_with(flavor: Flavor, version: (u32, u32, u32), hash: &str) -> String {
        match flavor {
            Flavor::Mariadb => format!("IDENTIFIED BY PASSWORD {}", lit(hash)),
            Flavor::Mysql if version.0 >= 8 => {
                format!("IDENTIFIED WITH caching_sha2_password AS {}", lit(hash))
            }
            Flavor::Mysql => format!("IDENTIFIED WITH mysql_native_password AS {}", lit(hash)),
        }
    }
}

pub struct MysqlBackend {
    config: DatabaseConfig,
    endpoint: Endpoint,
    /// Connection options without the password.
    base: OptsBuilder,
    /// Replaced whole by rotate-root.
    pool: RwLock<Pool>,
    /// Learnt on the first successful connection, which may be long after
    /// start-up when the database was down then.
    server: OnceCell<ServerInfo>,
    /// `ssl-mode`, `ssl-ca`, `ssl-cert`, `ssl-key` from `admin_url`.
    tls_params: TlsParams,
    /// Concurrent revocations share one definer lookup.
    lookups: DefinerLookups,
}

/// The definer lookup scans every schema's views, routines and triggers
/// (three quarters of a MySQL revocation, and the scans serialise on the
/// server), whatever the number of users it asks about. So revocations
/// that arrive while one lookup runs queue up and the next lookup answers
/// them all: one lane, a queue, each caller its share of the rows. A
/// caller always joins the queue *after* it locked its users, so the
/// lookup that answers it starts after the lock — nothing it reports can
/// be created after it ran.
#[derive(Default)]
struct DefinerLookups {
    queue: std::sync::Mutex<Vec<LookupWaiter>>,
    lane: tokio::sync::Mutex<()>,
}

type LookupWaiter = (
    Vec<String>,
    tokio::sync::oneshot::Sender<Result<Vec<Defined>>>,
);

impl MysqlBackend {
    pub fn new(config: &DatabaseConfig) -> Result<Self> {
        let bad_url = |e: &dyn std::fmt::Display| {
            Error::Config(format!("databases.{}.admin_url: {e}", config.name))
        };
        // The `mysql` client's TLS names are ours to read: mysql_async
        // refuses parameters it does not know.
        let (admin_url, tls_params) =
            dbtls::split_url(&config.admin_url, Dialect::Mysql).map_err(|e| bad_url(&e))?;
        let ssl = dbtls::mysql_ssl_opts(&tls_params).map_err(|e| bad_url(&e))?;
        let url = url::Url::parse(&admin_url).map_err(|e| bad_url(&e))?;
        // mysql_async only knows the mysql:// scheme; the config also takes
        // mariadb:// for readability.
        let mysql_url = match admin_url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => admin_url.clone(),
        };
        let opts = mysql_async::Opts::from_url(&mysql_url).map_err(|e| bad_url(&e))?;
        let host = url.host_str().unwrap_or("localhost").to_string();
        let port = url.port().unwrap_or(3306);
        let database = url.path().trim_start_matches('/').to_string();
        let endpoint = Endpoint {
            host: config.client_host.clone().unwrap_or(host),
            port: config.client_port.unwrap_or(port),
            database,
        };
        let max = config.max_connections.max(1);
        let constraints = PoolConstraints::new(0, max)
            .ok_or_else(|| Error::Config(format!("databases.{}: bad pool size", config.name)))?;
        let base = OptsBuilder::from_opts(opts)
            // Otherwise a loopback admin URL is silently switched to the Unix
            // socket, where accounts match as 'user'@'localhost'.
            .prefer_socket(false)
            .ssl_opts(ssl)
            .pool_opts(
                PoolOpts::new()
                    .with_constraints(constraints)
                    // Our sessions change no session state worth resetting.
                    .with_reset_connection(false),
            );
        let pool = Pool::new(Self::opts_with(&base, read_admin_password(config)?));
        Ok(MysqlBackend {
            config: config.clone(),
            endpoint,
            base,
            pool: RwLock::new(pool),
            server: OnceCell::new(),
            tls_params,
            lookups: DefinerLookups::default(),
        })
    }

    fn opts_with(base: &OptsBuilder, password: Option<Password>) -> OptsBuilder {
        match password {
            Some(p) => base.clone().pass(Some(p.expose().to_string())),
            None => base.clone(),
        }
    }

    /// A pooled connection, or `Unavailable` within the connect timeout
    /// (plus the statement timeout when the pool is busy).
    async fn conn(&self) -> Result<Conn> {
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner()).clone();
        let wait = self.config.connect_timeout + self.config.statement_timeout;
        match tokio::time::timeout(wait, pool.get_conn()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.unavailable(&e)),
            Err(_) => Err(self.unavailable(&format!("no connection within {wait:?}"))),
        }
    }

    /// Connection trouble as `Unavailable`, naming the database key, the
    /// admin's `user@host:port` and the cause found through `source()`
    /// (refused, timed out, TLS, authentication, or the server's words):
    /// mysql_async on its own prints "Input/output error: Input/output
    /// error". The text before the first ": " is all a caller sees.
    fn unavailable<E: std::fmt::Display + 'static>(&self, e: &E) -> Error {
        let at = url::Url::parse(&self.config.admin_url)
            .map(|u| {
                format!(
                    "{}@{}:{}",
                    u.username(),
                    u.host_str().unwrap_or("localhost"),
                    u.port().unwrap_or(3306)
                )
            })
            .unwrap_or_else(|_| "?".to_string());
        let (kind, detail) = match (e as &dyn std::any::Any).downcast_ref::<mysql_async::Error>() {
            Some(err) => {
                let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
                let mut found = ("connection failed", err.to_string());
                while let Some(c) = cur {
                    if let Some(s) = c.downcast_ref::<mysql_async::ServerError>() {
                        // 1045 ER_ACCESS_DENIED_ERROR, 1044 ER_DBACCESS_DENIED_ERROR,
                        // 1698 ER_ACCESS_DENIED_NO_PASSWORD_ERROR.
                        let kind = if [1044, 1045, 1698].contains(&s.code) {
                            "authentication failed"
                        } else {
                            "refused by the server"
                        };
                        found = (
                            kind,
                            format!("{} (error {}, SQLSTATE {})", s.message, s.code, s.state),
                        );
                        break;
                    }
                    if let Some(io) = c.downcast_ref::<std::io::Error>() {
                        let kind = match io.kind() {
                            std::io::ErrorKind::ConnectionRefused => "connection refused",
                            std::io::ErrorKind::TimedOut => "connection timed out",
                            _ => "connection failed",
                        };
                        found = (kind, io.to_string());
                        break;
                    }
                    if c.to_string().starts_with("TLS error") {
                        found = ("TLS failed", c.to_string());
                    }
                    cur = c.source();
                }
                found
            }
            None => ("connection failed", e.to_string()),
        };
        Error::Unavailable(format!(
            "database {:?} is unreachable: {kind} as {at}: {detail}",
            self.config.name
        ))
    }

    /// Maps a driver error: connection trouble is `Unavailable`; a refusal
    /// is `Internal` with the server's message. A syntax error's message
    /// quotes the statement (and so a password hash): that one is withheld.
    fn db_error(&self, what: &str, e: mysql_async::Error) -> Error {
        let name = &self.config.name;
        match e {
            mysql_async::Error::Server(s) if code::UNAVAILABLE.contains(&s.code) => {
                Error::Unavailable(format!(
                    "database {name:?} is unavailable: {what}: {} (error {})",
                    s.message, s.code
                ))
            }
            mysql_async::Error::Server(s) if s.code == code::PARSE_ERROR => Error::Internal(format!(
                "database {name:?}: {what}: syntax error ({}); the server's message is withheld because it quotes the statement",
                s.code
            )),
            mysql_async::Error::Server(s) => Error::Internal(format!(
                "database {name:?}: {what}: {} (error {}, SQLSTATE {})",
                s.message, s.code, s.state
            )),
            mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => {
                let what = what.to_string();
                match self.unavailable(&e) {
                    Error::Unavailable(m) => Error::Unavailable(m.replacen(
                        " is unreachable: ",
                        &format!(" is unreachable: {what}: "),
                        1,
                    )),
                    other => other,
                }
            }
            other => Error::Internal(format!("database {name:?}: {what}: {other}")),
        }
    }

    /// Runs one database call under the statement timeout; the outer error
    /// is the timeout, the inner one the driver's, for callers that act on
    /// particular server codes.
    async fn timed_raw<T>(
        &self,
        what: &'static str,
        f: impl Future<Output = std::result::Result<T, mysql_async::Error>>,
    ) -> Result<std::result::Result<T, mysql_async::Error>> {
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(self.config.statement_timeout, f).await;
        crate::backend::steps::record(what, started.elapsed());
        r.map_err(|_| {
            Error::Unavailable(format!(
                "database {:?}: {what} timed out after {:?}",
                self.config.name, self.config.statement_timeout
            ))
        })
    }

    async fn timed<T>(
        &self,
        what: &'static str,
        f: impl Future<Output = std::result::Result<T, mysql_async::Error>>,
    ) -> Result<T> {
        self.timed_raw(what, f)
            .await?
            .map_err(|e| self.db_error(what, e))
    }

    /// The server's flavour, limits and failsafe ability (cached).
    pub async fn server(&self) -> Result<&ServerInfo> {
        self.server.get_or_try_init(|| self.detect()).await
    }

    async fn detect(&self) -> Result<ServerInfo> {
        let mut conn = self.conn().await?;
        let version: Option<String> = self
            .timed("read version", conn.query_first("SELECT VERSION()"))
            .await?;
        let version = version.unwrap_or_default();
        let (flavor, v) = ServerInfo::from_version(&version)?;
        if flavor == Flavor::Mysql && v < (5, 7, 6) {
            return Err(Error::Config(format!(
                "databases.{}: MySQL {version} is too old (needs 5.7.6 or later for CREATE USER … AS)",
                self.config.name
            )));
        }
        let failsafe = self
            .probe_failsafe(&mut conn, ServerInfo::lockable(flavor, v))
            .await?;
        if let Err(why) = &failsafe {
            // Preflight repeats this at start-up; a database first reached
            // later must not go unmentioned.
            tracing::warn!(database = %self.config.name, "NO DATABASE-SIDE EXPIRY: {why}");
        }
        Ok(ServerInfo {
            flavor,
            version: v,
            max_user_len: ServerInfo::max_user_len(flavor, v),
            failsafe,
        })
    }

    /// Tries what every issue will do: create (and drop) an event in the
    /// failsafe schema, making the schema first if it is missing.
    ///
    /// The probe carries a real failsafe body (for a user that does not
    /// exist; it is dropped at once and would do nothing if left): a
    /// server that refuses some statement in it says so here, as a
    /// warning, instead of failing every issue later.
    async fn probe_failsafe(
        &self,
        conn: &mut Conn,
        can_lock: bool,
    ) -> Result<std::result::Result<(), String>> {
        let schema = ident(FAILSAFE_SCHEMA);
        let made = self
            .timed_raw(
                "create failsafe schema",
                conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS {schema}")),
            )
            .await?;
        let probe_name = format!("probe_{:016x}", rand::random::<u64>());
        let probe = format!("{schema}.{}", ident(&probe_name));
        let created = self
            .timed_raw(
                "create failsafe probe event",
                conn.query_drop(format!(
                    "CREATE EVENT {probe} ON SCHEDULE AT CURRENT_TIMESTAMP + INTERVAL 1 DAY \
                     ON COMPLETION NOT PRESERVE DO {}",
                    failsafe_body(&probe_name, "%", can_lock)
                )),
            )
            .await?;
        Ok(match created {
            Ok(()) => {
                let _ = self
                    .timed_raw(
                        "drop failsafe probe event",
                        conn.query_drop(format!("DROP EVENT IF EXISTS {probe}")),
                    )
                    .await;
                Ok(())
            }
            Err(e) => {
                let why = |e: &mysql_async::Error| match e {
                    mysql_async::Error::Server(s) => format!("{} ({})", s.message, s.code),
                    other => other.to_string(),
                };
                Err(match made {
                    Err(m) => format!(
                        "cannot create schema `{FAILSAFE_SCHEMA}` ({}) nor events in it ({}); \
                         grant the admin account CREATE and EVENT on `{FAILSAFE_SCHEMA}`.*",
                        why(&m),
                        why(&e)
                    ),
                    Ok(()) => format!(
                        "cannot create events in `{FAILSAFE_SCHEMA}` ({}); grant the admin account EVENT on `{FAILSAFE_SCHEMA}`.*",
                        why(&e)
                    ),
                })
            }
        })
    }

    async fn create_event(
        &self,
        conn: &mut Conn,
        username: &str,
        host: &str,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let sql = format!(
            "CREATE EVENT {} ON SCHEDULE AT {} ON COMPLETION NOT PRESERVE \
             COMMENT 'credbroker failsafe: locks, then drops the leased user at expiry' DO {}",
            event_name(username),
            schedule_at(at),
            failsafe_body(username, host, self.server().await?.can_lock())
        );
        self.timed("create failsafe event", conn.query_drop(sql))
            .await
    }

    async fn logs_in_with(&self, password: &Password) -> bool {
        let opts = Self::opts_with(&self.base, Some(password.clone()));
        match tokio::time::timeout(self.config.connect_timeout, Conn::new(opts)).await {
            Ok(Ok(c)) => {
                let _ = c.disconnect().await;
                true
            }
            _ => false,
        }
    }

    async fn user_exists(&self, conn: &mut Conn, user: &UserRef) -> Result<bool> {
        let n: Option<u64> = self
            .timed(
                "look up user",
                conn.query_first(format!(
                    "SELECT COUNT(*) FROM mysql.user WHERE User = {} AND Host = {}",
                    lit(user.username.as_str()),
                    lit(host_of(user))
                )),
            )
            .await?;
        Ok(n.unwrap_or(0) > 0)
    }

    /// `ALTER USER … ACCOUNT LOCK` for every user that still exists.
    async fn lock(&self, conn: &mut Conn, users: &[&UserRef]) -> Result<()> {
        let accounts = users
            .iter()
            .map(|u| account(u.username.as_str(), host_of(u)))
            .collect::<Vec<_>>()
            .join(", ");
        self.timed(
            "lock account",
            conn.query_drop(format!("ALTER USER IF EXISTS {accounts} ACCOUNT LOCK")),
        )
        .await
    }

    /// `KILL CONNECTION` for every session of `names`; one that ends on
    /// its own in between is no error.
    async fn kill_sessions(&self, conn: &mut Conn, names: &[&str]) -> Result<()> {
        let sessions: Vec<u64> = self
            .timed(
                "list sessions",
                conn.query(format!(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE USER IN ({})",
                    lits(names)
                )),
            )
            .await?;
        for id in sessions {
            match self
                .timed_raw(
                    "kill session",
                    conn.query_drop(format!("KILL CONNECTION {id}")),
                )
                .await?
            {
                Ok(()) => {}
                Err(mysql_async::Error::Server(s)) if s.code == code::NO_SUCH_THREAD => {}
                Err(e) => return Err(self.db_error("kill session", e)),
            }
        }
        Ok(())
    }

    /// What the users are the DEFINER of, in every schema the admin can see.
    /// `defined_by`, sharing the lookup with the revocations running at
    /// the same time (see [`DefinerLookups`]).
    async fn defined_by_shared(&self, conn: &mut Conn, users: &[&UserRef]) -> Result<Vec<Defined>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.lookups
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((definer_keys(users), tx));
        {
            let _lane = self.lookups.lane.lock().await;
            let batch =
                std::mem::take(&mut *self.lookups.queue.lock().unwrap_or_else(|p| p.into_inner()));
            // Empty: an earlier lookup, started after we queued, answered us.
            if !batch.is_empty() {
                let all: Vec<String> = batch.iter().flat_map(|(k, _)| k.iter().cloned()).collect();
                let found = self.defined_by_keys(conn, &all).await;
                for (keys, tx) in batch {
                    let share = found.as_ref().map_err(Clone::clone).map(|rows| {
                        rows.iter()
                            .filter(|d| keys.iter().any(|k| d.definer.eq_ignore_ascii_case(k)))
                            .cloned()
                            .collect()
                    });
                    let _ = tx.send(share);
                }
            }
        }
        rx.await.map_err(|_| {
            Error::unavailable(format!(
                "database {:?}: the shared definer lookup was interrupted; retried",
                self.config.name
            ))
        })?
    }

    async fn defined_by(&self, conn: &mut Conn, users: &[&UserRef]) -> Result<Vec<Defined>> {
        self.defined_by_keys(conn, &definer_keys(users)).await
    }

    async fn defined_by_keys(&self, conn: &mut Conn, keys: &[String]) -> Result<Vec<Defined>> {
        let rows: Vec<(String, String, String, String, String, String)> = self
            .timed(
                "list defined objects",
                conn.query(definer::defined_objects_sql(keys, FAILSAFE_SCHEMA)),
            )
            .await?;
        rows.into_iter()
            .map(|(kind, schema, name, definer, extra, security)| {
                let kind = ObjectKind::parse(&kind).ok_or_else(|| {
                    Error::Internal(format!(
                        "database {:?}: unknown object kind {kind:?} defined by {definer}",
                        self.config.name
                    ))
                })?;
                Ok(Defined {
                    kind,
                    schema,
                    name,
                    definer,
                    extra,
                    security,
                })
            })
            .collect()
    }

    /// Gives each revokee's objects to its owner (or the admin account).
    /// Runs on a connection of its own, closed afterwards: re-creating a
    /// routine changes the session's `sql_mode` and default schema.
    async fn move_definers(
        &self,
        server: &ServerInfo,
        revokees: &[Revokee],
        defined: &[Defined],
    ) -> Result<Vec<Reassigned>> {
        let mut conn = self.conn().await?;
        let result = self
            .move_definers_on(&mut conn, server, revokees, defined)
            .await;
        let _ = conn.disconnect().await;
        result
    }

    async fn move_definers_on(
        &self,
        conn: &mut Conn,
        server: &ServerInfo,
        revokees: &[Revokee],
        defined: &[Defined],
    ) -> Result<Vec<Reassigned>> {
        let mut out = Vec::new();
        let mut admin: Option<(String, String)> = None;
        for r in revokees {
            let user = r.user.username.as_str();
            let host = host_of(&r.user);
            let key = definer::definer_key(user, host);
            let objects: Vec<&Defined> = defined
                .iter()
                .filter(|d| d.definer.eq_ignore_ascii_case(&key))
                .collect();
            if objects.is_empty() {
                continue;
            }
            let what = definer::summary(&objects);
            let (to_user, to_host) = match &r.owner {
                Some(owner) => {
                    let (u, h) = definer::owner_account(owner);
                    (u.to_string(), h.to_string())
                }
                None => match &admin {
                    Some(a) => a.clone(),
                    None => {
                        let me = self.current_user(conn).await?;
                        admin = Some(me.clone());
                        me
                    }
                },
            };
            let to = account(&to_user, &to_host);
            if r.owner.is_some() {
                // MariaDB accepts a DEFINER that does not exist (with a
                // warning) and the objects then fail as if the definer
                // were dropped: check first.
                let n: Option<u64> = self
                    .timed(
                        "look up owner",
                        conn.query_first(format!(
                            "SELECT COUNT(*) FROM mysql.user WHERE User = {} AND Host = {}",
                            lit(&to_user),
                            lit(&to_host)
                        )),
                    )
                    .await?;
                if n.unwrap_or(0) == 0 {
                    return Err(Error::FailedPrecondition(format!(
                        "user {user} is the DEFINER of {what}; the role's owner account {to} does not exist: \
                         create it or set the role's owner to an existing account (the user stays locked)"
                    )));
                }
            }
            for o in &objects {
                self.move_one(conn, server, o, user, host, &to)
                    .await
                    .map_err(|e| {
                        Error::FailedPrecondition(format!(
                            "user {user} is the DEFINER of {what}; moving {} {} to {to} failed: {e}; \
                             set the role's owner or grant the admin SET USER (MariaDB) / SET_USER_ID \
                             (MySQL 8; SET_ANY_DEFINER from 8.2) (the user stays locked)",
                            o.kind.keyword().to_ascii_lowercase(),
                            o.qualified()
                        ))
                    })?;
            }
            out.push(Reassigned {
                username: r.user.username.clone(),
                objects: objects.len() as u64,
                to: definer::definer_key(&to_user, &to_host),
            });
        }
        Ok(out)
    }

    /// Gives one object the definer `to` (an [`account`]).
    async fn move_one(
        &self,
        conn: &mut Conn,
        server: &ServerInfo,
        o: &Defined,
        user: &str,
        host: &str,
        to: &str,
    ) -> Result<()> {
        let show = format!("SHOW CREATE {} {}", o.kind.keyword(), o.qualified());
        match o.kind {
            ObjectKind::Event => {
                let sql = definer::alter_event_sql(o, to)?;
                self.timed("move event definer", conn.query_drop(sql)).await
            }
            ObjectKind::View => {
                // MySQL prints the view's name unqualified.
                self.timed(
                    "use schema",
                    conn.query_drop(format!("USE {}", ident(&o.schema))),
                )
                .await?;
                let row: Option<mysql_async::Row> =
                    self.timed("show view", conn.query_first(show)).await?;
                let shown = row
                    .and_then(|r| r.get_opt::<Option<String>, usize>(1))
                    .and_then(|v| v.ok())
                    .flatten()
                    .ok_or_else(|| self.not_shown(o))?;
                let sql = definer::alter_view_sql(&shown, o, user, host, to)?;
                self.timed("move view definer", conn.query_drop(sql)).await
            }
            ObjectKind::Procedure | ObjectKind::Function | ObjectKind::Trigger => {
                // Columns: name, sql_mode, statement, …; the statement is
                // NULL when the admin may not read the body.
                let row: Option<mysql_async::Row> =
                    self.timed("show routine", conn.query_first(show)).await?;
                let col = |r: &mysql_async::Row, i: usize| {
                    r.get_opt::<Option<String>, usize>(i)
                        .and_then(|v| v.ok())
                        .flatten()
                };
                let (mode, shown) = match &row {
                    Some(r) => (col(r, 1).unwrap_or_default(), col(r, 2)),
                    None => (String::new(), None),
                };
                let shown = shown.ok_or_else(|| self.not_shown(o))?;
                let sql = definer::recreate_sql(&shown, o, user, host, to, server.flavor)?;
                // The text is parsed again as it was at first: same
                // sql_mode, same default schema (it names objects
                // unqualified).
                self.timed(
                    "set sql_mode",
                    conn.query_drop(format!("SET SESSION sql_mode = {}", lit(&mode))),
                )
                .await?;
                self.timed(
                    "use schema",
                    conn.query_drop(format!("USE {}", ident(&o.schema))),
                )
                .await?;
                if server.flavor == Flavor::Mariadb {
                    return self
                        .timed("re-create with new definer", conn.query_drop(sql))
                        .await;
                }
                // MySQL 8 (written from its manual, not run here): no
                // CREATE OR REPLACE for routines and triggers, so drop and
                // create; a failed create puts the original back (its
                // definer still exists: the user is dropped only later).
                self.timed(
                    "drop for re-create",
                    conn.query_drop(format!("DROP {} {}", o.kind.keyword(), o.qualified())),
                )
                .await?;
                match self
                    .timed("re-create with new definer", conn.query_drop(sql))
                    .await
                {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        if let Err(undo) = self
                            .timed("restore original", conn.query_drop(shown.as_str()))
                            .await
                        {
                            tracing::error!(database = %self.config.name, object = %o.qualified(),
                                error = %undo, "could not restore an object after a failed definer move");
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    fn not_shown(&self, o: &Defined) -> Error {
        Error::Internal(format!(
            "database {:?}: SHOW CREATE {} {} gave no statement; the admin account needs SELECT (views) or \
             the right to read routine bodies (SHOW_ROUTINE on MySQL, SELECT on mysql.proc on MariaDB)",
            self.config.name,
            o.kind.keyword(),
            o.qualified()
        ))
    }

    /// The admin account, which inherits what a role without owner defined.
    async fn current_user(&self, conn: &mut Conn) -> Result<(String, String)> {
        let me: Option<String> = self
            .timed(
                "read current user",
                conn.query_first("SELECT CURRENT_USER()"),
            )
            .await?;
        let me = me.unwrap_or_default();
        me.rsplit_once('@')
            .map(|(u, h)| (u.to_string(), h.to_string()))
            .ok_or_else(|| {
                Error::Internal(format!(
                    "database {:?}: unexpected CURRENT_USER() {me:?}",
                    self.config.name
                ))
            })
    }

    /// A refused `DROP USER`, named by its reason when it is a definer the
    /// move did not reach (MySQL 8.0.22+: an object the admin cannot see).
    async fn drop_refused(
        &self,
        conn: &mut Conn,
        users: &[&UserRef],
        e: mysql_async::Error,
    ) -> Error {
        let as_definer =
            matches!(&e, mysql_async::Error::Server(s) if s.code == code::REFERENCED_AS_DEFINER);
        let err = self.db_error("drop user", e);
        if matches!(err, Error::Unavailable(_)) {
            return err;
        }
        let left = self.defined_by(conn, users).await.unwrap_or_default();
        for u in users {
            let key = definer::definer_key(u.username.as_str(), host_of(u));
            let objects: Vec<&Defined> = left
                .iter()
                .filter(|d| d.definer.eq_ignore_ascii_case(&key))
                .collect();
            if !objects.is_empty() {
                return Error::FailedPrecondition(format!(
                    "user {} is the DEFINER of {}; set the role's owner or grant the admin SET_USER_ID \
                     (the user stays locked, its sessions ended): {err}",
                    u.username,
                    definer::summary(&objects)
                ));
            }
        }
        if as_definer {
            return Error::FailedPrecondition(format!(
                "the server refuses to drop a user that is still a DEFINER of objects the admin account cannot \
                 see; grant it SELECT, SHOW VIEW, TRIGGER, EVENT and SHOW_ROUTINE where leased users create \
                 objects (the user stays locked, its sessions ended): {err}"
            ));
        }
        err
    }
}

/// A single-quoted string literal. Backslashes are doubled for the default
/// SQL mode; every value we quote is a broker-made name, a validated host
/// pattern or a hash without quotes or backslashes, so
/// `NO_BACKSLASH_ESCAPES` cannot change its meaning.
pub(super) fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A back-quoted identifier.
pub(super) fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// Broker-made names as a quoted, comma-separated list.
fn lits(names: &[&str]) -> String {
    names.iter().map(|n| lit(n)).collect::<Vec<_>>().join(", ")
}

/// Where the server keeps whether an account is locked: MariaDB 10.4+ in
/// the `mysql.global_priv` JSON (`account_locked`), MySQL 5.7.6+ in
/// `mysql.user.account_locked` (`'Y'`/`'N'`).
fn lock_state_table(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Mariadb => "mysql.global_priv",
        Flavor::Mysql => "mysql.user",
    }
}

/// User, Host and the lock state of `names`, as text.
fn lock_state_sql(flavor: Flavor, names: &[&str]) -> String {
    let state = match flavor {
        Flavor::Mariadb => "JSON_VALUE(Priv, '$.account_locked')",
        Flavor::Mysql => "CAST(account_locked AS CHAR)",
    };
    format!(
        "SELECT User, Host, {state} FROM {} WHERE User IN ({})",
        lock_state_table(flavor),
        lits(names)
    )
}

fn is_locked(flavor: Flavor, state: Option<&str>) -> bool {
    match (flavor, state) {
        (Flavor::Mariadb, Some(v)) => v == "1" || v.eq_ignore_ascii_case("true"),
        (Flavor::Mysql, Some(v)) => v.eq_ignore_ascii_case("Y"),
        (_, None) => false,
    }
}

fn definer_keys(users: &[&UserRef]) -> Vec<String> {
    users
        .iter()
        .map(|u| definer::definer_key(u.username.as_str(), host_of(u)))
        .collect()
}

fn host_of(user: &UserRef) -> &str {
    if user.host.is_empty() {
        "%"
    } else {
        &user.host
    }
}

/// `'user'@'host'`: what `{{name}}` becomes in a grant.
pub fn account(username: &str, host: &str) -> String {
    format!("{}@{}", lit(username), lit(host))
}

fn event_name(username: &str) -> String {
    format!("{}.{}", ident(FAILSAFE_SCHEMA), ident(username))
}

/// `AT` clause on the server's own clock, so a skew between broker and
/// database clocks cannot move it. `CURRENT_TIMESTAMP` has whole seconds:
/// one extra second means the event never fires before the lease expires.
fn schedule_at(at: DateTime<Utc>) -> String {
    let ms = (at - Utc::now()).num_milliseconds().max(0);
    let secs = (ms + 999) / 1000 + 1;
    format!("CURRENT_TIMESTAMP + INTERVAL {secs} SECOND")
}

/// The failsafe, run at expiry by the server as the broker's admin (the
/// event's definer) when the broker could not revoke in time. Same order
/// as a revocation: lock the account (no new login from here on), kill
/// every session it still has, then drop it — but only when it is the
/// DEFINER of nothing. Its views and routines need a new definer first,
/// which takes the broker (see `mysql_definer`); dropping it here would
/// break them on MariaDB (MySQL 8.0.22+ would refuse). A locked account
/// with no session is no usable credential; the broker's reaper finishes
/// the revocation when it returns. Without `ACCOUNT LOCK` (MariaDB before
/// 10.4) the drop itself is the only way to refuse logins, so it drops.
fn failsafe_body(username: &str, host: &str, can_lock: bool) -> String {
    let acct = account(username, host);
    let (lock, drop) = if can_lock {
        (
            format!("ALTER USER IF EXISTS {acct} ACCOUNT LOCK;"),
            format!(
                "SELECT {} INTO defines; \
                 IF defines = 0 THEN DROP USER IF EXISTS {acct}; END IF;",
                definer::defined_count_expr(&definer::definer_key(username, host), FAILSAFE_SCHEMA)
            ),
        )
    } else {
        (format!("DROP USER IF EXISTS {acct};"), String::new())
    };
    format!(
        "BEGIN \
           DECLARE done INT DEFAULT 0; \
           DECLARE defines BIGINT DEFAULT 0; \
           DECLARE cid BIGINT UNSIGNED; \
           DECLARE c CURSOR FOR SELECT ID FROM information_schema.PROCESSLIST WHERE USER = {user}; \
           DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1; \
           DECLARE CONTINUE HANDLER FOR {no_thread} BEGIN END; \
           {lock} \
           OPEN c; \
           sessions: LOOP \
             FETCH c INTO cid; \
             IF done THEN LEAVE sessions; END IF; \
             KILL CONNECTION cid; \
           END LOOP; \
           CLOSE c; \
           {drop} \
         END",
        user = lit(username),
        no_thread = code::NO_SUCH_THREAD,
    )
}

/// The failsafe event of a static user: `static_` + the user, beside the
/// leases' events (a lease's user starts with a `name_prefix` of at most
/// six characters, so never with `static_`).
fn static_event_name(user: &str) -> String {
    format!(
        "{}.{}",
        ident(FAILSAFE_SCHEMA),
        ident(&format!("static_{user}"))
    )
}

/// What a static user's failsafe does at its password's `valid_until`:
/// the password becomes a random hash nobody knows (`unknown`), the
/// account is locked where the server can, and its sessions are killed.
/// Never a drop: the user belongs to a DBA (or owns the static role's
/// objects).
fn static_failsafe_body(user: &str, host: &str, unknown: &str, can_lock: bool) -> String {
    let acct = account(user, host);
    let lock = if can_lock { " ACCOUNT LOCK" } else { "" };
    format!(
        "BEGIN \
           DECLARE done INT DEFAULT 0; \
           DECLARE cid BIGINT UNSIGNED; \
           DECLARE c CURSOR FOR SELECT ID FROM information_schema.PROCESSLIST WHERE USER = {user_lit}; \
           DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1; \
           DECLARE CONTINUE HANDLER FOR {no_thread} BEGIN END; \
           ALTER USER IF EXISTS {acct} {unknown}{lock}; \
           OPEN c; \
           sessions: LOOP \
             FETCH c INTO cid; \
             IF done THEN LEAVE sessions; END IF; \
             KILL CONNECTION cid; \
           END LOOP; \
           CLOSE c; \
         END",
        user_lit = lit(user),
        no_thread = code::NO_SUCH_THREAD,
    )
}

#[async_trait]
impl Backend for MysqlBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Mysql
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn create_user(&self, user: &NewUser<'_>) -> Result<()> {
        let server = self.server().await?;
        let name = user.username.as_str();
        if name.len() > server.max_user_len {
            return Err(Error::Internal(format!(
                "database {:?}: user name of {} characters exceeds the server's limit of {}",
                self.config.name,
                name.len(),
                server.max_user_len
            )));
        }
        let host = if user.host.is_empty() { "%" } else { user.host };
        let acct = account(name, host);
        let mut conn = self.conn().await?;
        // MySQL DDL commits on its own: there is no transaction to roll
        // back. The failsafe comes first, so no user ever exists without
        // one; on any later failure everything made is dropped again.
        if server.failsafe.is_ok() {
            self.create_event(&mut conn, name, host, user.valid_until)
                .await?;
        }
        let mut sql = format!(
            "CREATE USER {acct} {}",
            server.identified_clause(user.password)
        );
        for g in user.grants {
            sql.push_str(";\n");
            sql.push_str(&render_grant(g, &acct));
        }
        let result = self.timed("create user", conn.query_drop(sql)).await;
        if result.is_err() {
            drop(conn);
            let undo = Revokee::new(
                UserRef {
                    username: user.username.clone(),
                    host: host.to_string(),
                },
                None,
            );
            if let Err(e) = self.revoke(std::slice::from_ref(&undo)).await {
                tracing::warn!(database = %self.config.name, username = %name, error = %e,
                    "could not undo a failed create; the reaper will");
            }
        }
        result
    }

    async fn extend(&self, user: &UserRef, valid_until: DateTime<Utc>) -> Result<()> {
        let server = self.server().await?;
        let mut conn = self.conn().await?;
        let name = user.username.as_str();
        if server.failsafe.is_ok() {
            let sql = format!(
                "ALTER EVENT {} ON SCHEDULE AT {}",
                event_name(name),
                schedule_at(valid_until)
            );
            match self
                .timed_raw("move failsafe event", conn.query_drop(sql))
                .await?
            {
                Ok(()) => return Ok(()),
                Err(mysql_async::Error::Server(s)) if s.code == code::EVENT_DOES_NOT_EXIST => {}
                Err(e) => return Err(self.db_error("move failsafe event", e)),
            }
        }
        // No event: it fired (the user is gone) or was never made (the
        // failsafe was unavailable at issue).
        if !self.user_exists(&mut conn, user).await? {
            return Err(Error::FailedPrecondition(format!(
                "user {name} no longer exists in database {:?}; issue a new lease",
                self.config.name
            )));
        }
        if server.failsafe.is_ok() {
            self.create_event(&mut conn, name, host_of(user), valid_until)
                .await?;
        }
        Ok(())
    }

    async fn revoke(&self, revokees: &[Revokee]) -> Result<Vec<Reassigned>> {
        if revokees.is_empty() {
            return Ok(Vec::new());
        }
        let server = self.server().await?.clone();
        let users: Vec<&UserRef> = revokees.iter().map(|r| &r.user).collect();
        let names: Vec<&str> = users.iter().map(|u| u.username.as_str()).collect();
        let mut conn = self.conn().await?;
        // Lock first: from here on no new login starts (at once, on both
        // MySQL and MariaDB), so the sessions killed next are all there
        // are, and should anything below fail — a definer that cannot be
        // moved, a DROP USER that MySQL refuses — the credential is dead
        // all the same and the lease shows `failing` (invariant 7).
        if server.can_lock() {
            self.lock(&mut conn, &users).await?;
            self.kill_sessions(&mut conn, &names).await?;
        }
        // Always looked up, though it scans every schema (the costliest
        // step of a MySQL revocation): the user's own grants prove nothing,
        // since an account with SET USER / SUPER — a DBA, a migration tool
        // — can create a view or routine with `DEFINER = <this user>`.
        let defined = self.defined_by_shared(&mut conn, &users).await?;
        let mut reassigned = Vec::new();
        if !defined.is_empty() {
            reassigned = self.move_definers(&server, revokees, &defined).await?;
        }
        let accounts = users
            .iter()
            .map(|u| account(u.username.as_str(), host_of(u)))
            .collect::<Vec<_>>()
            .join(", ");
        match self
            .timed_raw(
                "drop user",
                conn.query_drop(format!("DROP USER IF EXISTS {accounts}")),
            )
            .await?
        {
            Ok(()) => {}
            Err(e) => return Err(self.drop_refused(&mut conn, &users, e).await),
        }
        // Without a lock this is the only kill; with one it catches a
        // login that was already past its checks when the lock came.
        self.kill_sessions(&mut conn, &names).await?;
        // A failsafe left behind only locks or drops a user that no longer
        // exists (names are never reused) and then deletes itself: not
        // worth failing a revocation over.
        let drops: String = names
            .iter()
            .map(|u| format!("DROP EVENT IF EXISTS {};", event_name(u)))
            .collect();
        if let Err(e) = self
            .timed("drop failsafe event", conn.query_drop(drops))
            .await
        {
            tracing::warn!(database = %self.config.name, error = %e,
                "failsafe events not dropped; they will fire harmlessly");
        }
        Ok(reassigned)
    }

    async fn disable(&self, users: &[UserRef]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        let server = self.server().await?.clone();
        if !server.can_lock() {
            return Err(Error::FailedPrecondition(format!(
                "database {:?}: MariaDB {}.{} has no ACCOUNT LOCK, so an account can only be disabled by dropping it",
                self.config.name, server.version.0, server.version.1
            )));
        }
        let refs: Vec<&UserRef> = users.iter().collect();
        let names: Vec<&str> = users.iter().map(|u| u.username.as_str()).collect();
        let mut conn = self.conn().await?;
        self.lock(&mut conn, &refs).await?;
        self.kill_sessions(&mut conn, &names).await?;
        // The last word on a lease the broker is about to forget: only the
        // server's own record of the lock counts, not the ALTER's success.
        let rows: Vec<(String, String, Option<String>)> = self
            .timed(
                "verify account lock",
                conn.query(lock_state_sql(server.flavor, &names)),
            )
            .await
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "cannot confirm the accounts are locked ({e}); the admin account needs SELECT on {}",
                    lock_state_table(server.flavor)
                ))
            })?;
        for u in users {
            let state = rows
                .iter()
                .find(|(n, h, _)| n == u.username.as_str() && h.eq_ignore_ascii_case(host_of(u)));
            // No row: the account is gone, which is as disabled as it gets.
            if let Some((_, _, value)) = state {
                if !is_locked(server.flavor, value.as_deref()) {
                    return Err(Error::FailedPrecondition(format!(
                        "user {} is not locked after ACCOUNT LOCK (the server reports {value:?})",
                        u.username
                    )));
                }
            }
        }
        // KILL only flags a session; it is gone once its thread notices.
        let count = format!(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER IN ({}) AND COMMAND <> 'Killed'",
            lits(&names)
        );
        for attempt in 0..20 {
            let left: Option<u64> = self
                .timed("count sessions", conn.query_first(count.as_str()))
                .await?;
            if left.unwrap_or(0) == 0 {
                return Ok(());
            }
            if attempt % 5 == 4 {
                self.kill_sessions(&mut conn, &names).await?;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(Error::FailedPrecondition(format!(
            "database {:?}: sessions of a locked user are still running after KILL",
            self.config.name
        )))
    }

    async fn list_broker_users(&self, prefix: &str) -> Result<Vec<UserRef>> {
        let mut conn = self.conn().await?;
        let pattern = format!(
            "{}%",
            prefix
                .replace('!', "!!")
                .replace('_', "!_")
                .replace('%', "!%")
        );
        let rows: Vec<(String, String)> = self
            .timed(
                "list users",
                conn.query(format!(
                    "SELECT User, Host FROM mysql.user WHERE User LIKE {} ESCAPE '!'",
                    lit(&pattern)
                )),
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter(|(u, _)| Username::is_broker_made(prefix, u))
            .map(|(u, host)| UserRef {
                username: Username::from_store(u),
                host,
            })
            .collect())
    }

    async fn rotate_root(&self) -> Result<()> {
        let server = self.server().await?;
        let password = Password::generate();
        let hash = server.stored_hash(&password);
        stage_admin_password(&self.config, &password)?;
        let mut conn = self.conn().await?;
        // The account by name: MariaDB 10.11 accepts `ALTER USER
        // CURRENT_USER() IDENTIFIED BY PASSWORD …` and silently changes
        // nothing, which would lock the broker out once it kept the new
        // password.
        let me: Option<String> = self
            .timed(
                "read current user",
                conn.query_first("SELECT CURRENT_USER()"),
            )
            .await?;
        let me = me.unwrap_or_default();
        let (user, host) = me.rsplit_once('@').ok_or_else(|| {
            Error::Internal(format!(
                "database {:?}: unexpected CURRENT_USER() {me:?}",
                self.config.name
            ))
        })?;
        self.timed(
            "rotate admin password",
            conn.query_drop(format!(
                "ALTER USER {} {}",
                account(user, host),
                ServerInfo::identified_with(server.flavor, server.version, &hash)
            )),
        )
        .await?;
        // Only a server that reports back the hash we sent surely has it;
        // one that cannot be asked most likely has it too (the ALTER
        // succeeded), and then losing the password would be worse.
        let stored: std::result::Result<Option<String>, Error> = self
            .timed(
                "check admin password",
                conn.exec_first(
                    "SELECT authentication_string FROM mysql.user WHERE User = ? AND Host = ?",
                    (user, host),
                ),
            )
            .await;
        drop(conn);
        if let Ok(stored) = stored {
            // A server that stores the hash in another form (untested
            // MySQL versions) gets the proof that matters: a login.
            let applied =
                stored.as_deref() == Some(hash.as_str()) || self.logs_in_with(&password).await;
            if !applied {
                return Err(Error::Internal(format!(
                    "database {:?}: the server did not apply the new admin password; the old one stays",
                    self.config.name
                )));
            }
        }
        // The database has the new password now: keep it before anything
        // else can fail, or nobody would know it.
        store_admin_password(&self.config, &password)?;
        let pool = Pool::new(Self::opts_with(&self.base, Some(password)));
        let old = std::mem::replace(
            &mut *self.pool.write().unwrap_or_else(|p| p.into_inner()),
            pool,
        );
        tokio::spawn(async move {
            let _ = old.disconnect().await;
        });
        Ok(())
    }

    async fn check_tls(&self) -> Result<()> {
        if self.tls_params.mode == dbtls::SslMode::Disable {
            return Ok(());
        }
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner()).clone();
        let result = tokio::time::timeout(self.config.connect_timeout, pool.get_conn()).await;
        match result {
            Ok(Err(e)) => match dbtls::tls_failure(&e) {
                Some(why) => {
                    let opts = self.base.clone();
                    let opts = mysql_async::Opts::from(opts);
                    Err(Error::Config(format!(
                        "database {:?}: TLS to {}:{} failed ({}): {why}",
                        self.config.name,
                        opts.ip_or_hostname(),
                        opts.tcp_port(),
                        self.tls_params
                    )))
                }
                None => Ok(()),
            },
            // Connected (back to the pool for preflight), or timed out.
            _ => Ok(()),
        }
    }

    async fn preflight(&self) -> Result<Vec<String>> {
        let server = self.server().await?.clone();
        let db = &self.config.name;
        let mut warnings = Vec::new();
        let mut conn = self.conn().await?;
        match &server.failsafe {
            Err(why) => warnings.push(format!(
                "database {db:?}: NO DATABASE-SIDE EXPIRY: {why}; leased users outlive a dead broker until it returns"
            )),
            Ok(()) => {
                let state: Option<String> = self
                    .timed(
                        "read event_scheduler",
                        conn.query_first("SELECT @@global.event_scheduler"),
                    )
                    .await?;
                let state = state.unwrap_or_default();
                if !state.eq_ignore_ascii_case("ON") {
                    warnings.push(format!(
                        "database {db:?}: NO DATABASE-SIDE EXPIRY: event_scheduler is {state}, so the failsafe \
                         events that drop leased users at their expiry will not run and users outlive a dead \
                         broker; run SET GLOBAL event_scheduler = ON and set event_scheduler = ON in the server's \
                         configuration (events never run on replicas either)"
                    ));
                }
            }
        }
        let privileges: Vec<String> = self
            .timed(
                "check privileges",
                conn.query(
                    "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = \
                     CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), '''@''', \
                     SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''')",
                ),
            )
            .await?;
        let has = |p: &str| privileges.iter().any(|x| x.eq_ignore_ascii_case(p));
        if !has("CREATE USER") {
            warnings.push(format!(
                "database {db:?}: the admin account may lack the global CREATE USER privilege: issuing will fail"
            ));
        }
        if !has("PROCESS") {
            warnings.push(format!(
                "database {db:?}: the admin account may lack PROCESS: revocation cannot see, so cannot end, leased users' live sessions"
            ));
        }
        if !(has("SUPER") || has("CONNECTION ADMIN") || has("CONNECTION_ADMIN")) {
            warnings.push(format!(
                "database {db:?}: the admin account may lack CONNECTION_ADMIN (or SUPER): revocation cannot end leased users' live sessions"
            ));
        }
        if !(has("SUPER") || has("SET USER") || has("SET_USER_ID") || has("SET_ANY_DEFINER")) {
            warnings.push(format!(
                "database {db:?}: the admin account may lack SET USER (MariaDB 10.5.2+) / SET_USER_ID \
                 (MySQL 8.0; SET_ANY_DEFINER from 8.2) or SUPER: views, routines, triggers and events a leased \
                 user defines cannot be handed to the role's owner, so their revocation fails (the user stays locked)"
            ));
        }
        if server.flavor == Flavor::Mariadb {
            // With a password validation plugin active, this setting makes
            // MariaDB refuse every `IDENTIFIED BY PASSWORD '<hash>'`.
            let strict: Option<(u64, u64)> = self
                .timed(
                    "check password validation",
                    conn.query_first(
                        "SELECT @@global.strict_password_validation, (SELECT COUNT(*) FROM \
                         information_schema.PLUGINS WHERE PLUGIN_TYPE = 'PASSWORD VALIDATION' \
                         AND PLUGIN_STATUS = 'ACTIVE')",
                    ),
                )
                .await?;
            if let Some((1, plugins)) = strict {
                if plugins > 0 {
                    warnings.push(format!(
                        "database {db:?}: strict_password_validation is ON with a password validation plugin: \
                         MariaDB refuses password hashes, so issuing will fail; set strict_password_validation = OFF \
                         (the broker's passwords are 40 random characters)"
                    ));
                }
            }
        }
        if server.max_user_len < crate::lease::MAX_USERNAME_LEN {
            warnings.push(format!(
                "database {db:?}: the server allows user names of {} characters only: issuing will fail",
                server.max_user_len
            ));
        }
        Ok(warnings)
    }

    fn pool_state(&self) -> PoolState {
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner());
        let m = pool.metrics();
        use std::sync::atomic::Ordering::Relaxed;
        PoolState {
            size: m.connection_count.load(Relaxed),
            available: m.connections_in_pool.load(Relaxed),
            max_size: self.config.max_connections,
        }
    }

    async fn static_create(&self, spec: &StaticUsers<'_>) -> Result<()> {
        let server = self.server().await?.clone();
        let mut conn = self.conn().await?;
        for u in spec.users {
            let acct = account(u, spec.host);
            // Locked, with a password nobody knows, until its first rotation.
            let unknown = server.identified_clause(&Password::generate());
            let mut sql = format!("CREATE USER IF NOT EXISTS {acct} {unknown}");
            if server.can_lock() {
                sql.push_str(" ACCOUNT LOCK");
            }
            // `owner` is a role (MariaDB 10.0.5+, MySQL 8.0) the users act
            // as by default; the statement forms differ.
            sql.push_str(&format!(";\nGRANT {} TO {acct}", ident(spec.owner)));
            sql.push_str(&match server.flavor {
                Flavor::Mariadb => format!(";\nSET DEFAULT ROLE {} FOR {acct}", ident(spec.owner)),
                Flavor::Mysql => format!(";\nSET DEFAULT ROLE {} TO {acct}", ident(spec.owner)),
            });
            for g in spec.grants {
                sql.push_str(";\n");
                sql.push_str(&render_grant(g, &acct));
            }
            self.timed("create static users", conn.query_drop(sql))
                .await
                .map_err(|e| match e {
                    Error::Internal(m) => {
                        Error::Internal(format!("static role {:?}: {m}", spec.role))
                    }
                    other => other,
                })?;
        }
        Ok(())
    }

    async fn static_set_password(&self, login: &StaticLogin<'_>) -> Result<()> {
        let server = self.server().await?.clone();
        let host = if login.host.is_empty() {
            "%"
        } else {
            login.host
        };
        let acct = account(login.user, host);
        let mut conn = self.conn().await?;
        // The failsafe first, as for leases: the password is never valid
        // without the database-side expiry behind it. MySQL has no CREATE
        // OR REPLACE EVENT, so drop and create (MariaDB takes both).
        if server.failsafe.is_ok() {
            let unknown = server.identified_clause(&Password::generate());
            let sql = format!(
                "DROP EVENT IF EXISTS {ev};\nCREATE EVENT {ev} ON SCHEDULE AT {} ON COMPLETION NOT PRESERVE \
                 COMMENT 'credbroker failsafe: locks the static user when its password expires' DO {}",
                schedule_at(login.valid_until),
                static_failsafe_body(login.user, host, &unknown, server.can_lock()),
                ev = static_event_name(login.user),
            );
            self.timed("create static failsafe event", conn.query_drop(sql))
                .await?;
        }
        // MariaDB has no dual passwords: alternating users are its only
        // overlap. MySQL 8 would take RETAIN CURRENT PASSWORD, which
        // single-user mode deliberately does not use (Vault's behaviour).
        let unlock = if server.can_lock() {
            " ACCOUNT UNLOCK"
        } else {
            ""
        };
        let sql = format!(
            "ALTER USER {acct} {}{unlock}",
            server.identified_clause(login.password)
        );
        self.timed("set static password", conn.query_drop(sql))
            .await
            .map_err(|e| match e {
                Error::Internal(m) => Error::Internal(format!("static role {:?}: {m}", login.role)),
                other => other,
            })
    }

    async fn static_retire(&self, user: &str, host: &str, end_sessions: bool) -> Result<()> {
        let server = self.server().await?.clone();
        let host = if host.is_empty() { "%" } else { host };
        let acct = account(user, host);
        let mut conn = self.conn().await?;
        let lock = if server.can_lock() {
            " ACCOUNT LOCK"
        } else {
            ""
        };
        let unknown = server.identified_clause(&Password::generate());
        self.timed(
            "retire static user",
            conn.query_drop(format!("ALTER USER {acct} {unknown}{lock}")),
        )
        .await?;
        if end_sessions {
            self.kill_sessions(&mut conn, &[user]).await?;
        }
        if server.failsafe.is_ok() {
            if let Err(e) = self
                .timed(
                    "drop static failsafe event",
                    conn.query_drop(format!("DROP EVENT IF EXISTS {}", static_event_name(user))),
                )
                .await
            {
                tracing::warn!(database = %self.config.name, error = %e,
                    "static failsafe event not dropped; it will fire harmlessly");
            }
        }
        Ok(())
    }

    fn dsn(&self, username: &Username, password: Option<&Password>) -> String {
        let e = &self.endpoint;
        let host = if e.host.contains(':') {
            format!("[{}]", e.host)
        } else {
            e.host.clone()
        };
        let tls = crate::dbtls::client_query(
            crate::dbtls::Dialect::Mysql,
            self.config.client_sslmode,
            self.config.client_sslrootcert.as_deref(),
        );
        match password {
            Some(p) => format!(
                "mysql://{username}:{}@{host}:{}/{}{tls}",
                p.expose(),
                e.port,
                e.database
            ),
            None => format!("mysql://{username}@{host}:{}/{}{tls}", e.port, e.database),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavours_and_limits_come_from_the_version_string() {
        let (f, v) = ServerInfo::from_version("10.11.19-MariaDB-0+deb12u1").unwrap();
        assert_eq!((f, v), (Flavor::Mariadb, (10, 11, 19)));
        assert_eq!(ServerInfo::max_user_len(f, v), 80);
        let (f, v) = ServerInfo::from_version("5.5.5-10.6.12-MariaDB").unwrap();
        assert_eq!((f, v), (Flavor::Mariadb, (10, 6, 12)));
        let (f, v) = ServerInfo::from_version("8.0.36").unwrap();
        assert_eq!((f, v), (Flavor::Mysql, (8, 0, 36)));
        assert_eq!(ServerInfo::max_user_len(f, v), 32);
        let (f, v) = ServerInfo::from_version("8.4.3-commercial").unwrap();
        assert_eq!((f, v), (Flavor::Mysql, (8, 4, 3)));
        assert_eq!(ServerInfo::max_user_len(Flavor::Mysql, (5, 6, 40)), 16);
        assert!(ServerInfo::from_version("garbage").is_err());
    }

    #[test]
    fn password_clauses_carry_hashes_only() {
        let p = Password::generate();
        for (flavor, version, want) in [
            (Flavor::Mariadb, (10, 11, 0), "IDENTIFIED BY PASSWORD '*"),
            (
                Flavor::Mysql,
                (8, 0, 36),
                "IDENTIFIED WITH caching_sha2_password AS '$A$005$",
            ),
            (
                Flavor::Mysql,
                (5, 7, 44),
                "IDENTIFIED WITH mysql_native_password AS '*",
            ),
        ] {
            let s = ServerInfo {
                flavor,
                version,
                max_user_len: 32,
                failsafe: Ok(()),
            };
            let clause = s.identified_clause(&p);
            assert!(clause.starts_with(want), "{clause}");
            assert!(!clause.contains(p.expose()));
        }
    }

    #[test]
    fn names_fit_mysql_and_two_thousand_issues_never_repeat_one() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..20_000 {
            let role = ["orders-readonly", "x", "a_very_long_role_name_indeed"][i % 3];
            let u = Username::generate("cb_", role);
            assert!(u.as_str().len() <= ServerInfo::max_user_len(Flavor::Mysql, (8, 0, 0)));
            assert!(
                u.as_str().len() <= 64,
                "event names are at most 64 characters"
            );
            assert!(seen.insert(u.as_str().to_string()), "duplicate {u}");
        }
    }

    #[test]
    fn accounts_and_events_are_quoted() {
        assert_eq!(account("cb_x_1", "10.0.0.%"), "'cb_x_1'@'10.0.0.%'");
        assert_eq!(lit("a'b\\c"), "'a''b\\\\c'");
        assert_eq!(event_name("cb_x"), "`credbroker`.`cb_x`");
        let body = failsafe_body("cb_x", "%", false);
        assert!(body.contains("DROP USER IF EXISTS 'cb_x'@'%'"));
        assert!(body.contains("KILL CONNECTION cid"));
        assert!(!body.contains("ACCOUNT LOCK"));
    }

    #[test]
    fn failsafe_locks_kills_and_drops_only_a_user_that_defines_nothing() {
        let body = failsafe_body("cb_x_1", "10.0.%", true);
        let at = |needle: &str| {
            body.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in {body}"))
        };
        let lock = at("ALTER USER IF EXISTS 'cb_x_1'@'10.0.%' ACCOUNT LOCK;");
        let kill = at("KILL CONNECTION cid");
        let count = at("information_schema.VIEWS WHERE DEFINER = 'cb_x_1@10.0.%'");
        let drop = at("IF defines = 0 THEN DROP USER IF EXISTS 'cb_x_1'@'10.0.%'; END IF;");
        assert!(lock < kill && kill < count && count < drop, "{body}");
        assert!(body.contains("EVENT_SCHEMA <> 'credbroker'"));
    }

    #[test]
    fn lock_state_is_read_where_each_server_keeps_it() {
        assert_eq!(
            lock_state_sql(Flavor::Mariadb, &["cb_a", "cb_b"]),
            "SELECT User, Host, JSON_VALUE(Priv, '$.account_locked') FROM mysql.global_priv \
             WHERE User IN ('cb_a', 'cb_b')"
        );
        assert!(lock_state_sql(Flavor::Mysql, &["cb_a"])
            .contains("account_locked AS CHAR) FROM mysql.user"));
        assert!(is_locked(Flavor::Mariadb, Some("1")));
        assert!(is_locked(Flavor::Mariadb, Some("true")));
        assert!(!is_locked(Flavor::Mariadb, Some("0")));
        // No value (an account never locked, an unreadable table) is no proof.
        assert!(!is_locked(Flavor::Mariadb, None));
        assert!(is_locked(Flavor::Mysql, Some("Y")));
        assert!(!is_locked(Flavor::Mysql, Some("N")));
        let s = |flavor, version| ServerInfo {
            flavor,
            version,
            max_user_len: 32,
            failsafe: Ok(()),
        };
        assert!(s(Flavor::Mariadb, (10, 4, 0)).can_lock());
        assert!(!s(Flavor::Mariadb, (10, 3, 39)).can_lock());
        assert!(s(Flavor::Mysql, (5, 7, 44)).can_lock());
    }

    #[test]
    fn failsafe_never_fires_before_the_expiry() {
        let at = Utc::now() + chrono::Duration::milliseconds(10_500);
        // 10.5 s away: 11 s rounded up, plus the whole-second slack.
        assert_eq!(schedule_at(at), "CURRENT_TIMESTAMP + INTERVAL 12 SECOND");
        assert_eq!(
            schedule_at(Utc::now() - chrono::Duration::seconds(5)),
            "CURRENT_TIMESTAMP + INTERVAL 1 SECOND"
        );
    }
}
