//! MySQL and MariaDB backend: users with a broker-computed password hash,
//! pinned to the role's host pattern, each with a failsafe event that drops
//! it at its expiry even if the broker never comes back.
//!
//! MySQL has no `VALID UNTIL`. The database-side expiry is a one-shot
//! `EVENT … ON SCHEDULE AT` in the broker's schema ([`FAILSAFE_SCHEMA`]),
//! named like the user, that drops the user and kills its sessions. It is
//! created *before* the user (so no user ever exists without one), moved by
//! renew and dropped by revoke. Where the server cannot run it (event
//! scheduler off, no `EVENT` privilege) preflight says so loudly and the
//! broker keeps working on its reaper alone.

use std::future::Future;
use std::sync::RwLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Pool, PoolConstraints, PoolOpts};
use tokio::sync::OnceCell;

use crate::backend::mysql_auth::{caching_sha2_hash, native_password_hash};
use crate::backend::{
    read_admin_password, render_grant, stage_admin_password, store_admin_password, Backend,
    Endpoint, NewUser, PoolState, Reassigned, Revokee, UserRef,
};
use crate::config::DatabaseConfig;
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
}

impl MysqlBackend {
    pub fn new(config: &DatabaseConfig) -> Result<Self> {
        let bad_url = |e: &dyn std::fmt::Display| {
            Error::Config(format!("databases.{}.admin_url: {e}", config.name))
        };
        let url = url::Url::parse(&config.admin_url).map_err(|e| bad_url(&e))?;
        // mysql_async only knows the mysql:// scheme; the config also takes
        // mariadb:// for readability.
        let mysql_url = match config.admin_url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => config.admin_url.clone(),
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
        what: &str,
        f: impl Future<Output = std::result::Result<T, mysql_async::Error>>,
    ) -> Result<std::result::Result<T, mysql_async::Error>> {
        tokio::time::timeout(self.config.statement_timeout, f)
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "database {:?}: {what} timed out after {:?}",
                    self.config.name, self.config.statement_timeout
                ))
            })
    }

    async fn timed<T>(
        &self,
        what: &str,
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
        let failsafe = self.probe_failsafe(&mut conn).await?;
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
    async fn probe_failsafe(&self, conn: &mut Conn) -> Result<std::result::Result<(), String>> {
        let schema = ident(FAILSAFE_SCHEMA);
        let made = self
            .timed_raw(
                "create failsafe schema",
                conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS {schema}")),
            )
            .await?;
        let probe = format!(
            "{schema}.{}",
            ident(&format!("probe_{:016x}", rand::random::<u64>()))
        );
        let created = self
            .timed_raw(
                "create failsafe probe event",
                conn.query_drop(format!(
                    "CREATE EVENT {probe} ON SCHEDULE AT CURRENT_TIMESTAMP + INTERVAL 1 DAY \
                     ON COMPLETION NOT PRESERVE DO DO 0"
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
             COMMENT 'credbroker failsafe: drops the leased user at its expiry' DO {}",
            event_name(username),
            schedule_at(at),
            failsafe_body(username, host)
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
}

/// A single-quoted string literal. Backslashes are doubled for the default
/// SQL mode; every value we quote is a broker-made name, a validated host
/// pattern or a hash without quotes or backslashes, so
/// `NO_BACKSLASH_ESCAPES` cannot change its meaning.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A back-quoted identifier.
fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
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

/// The failsafe: drop the account first (no new login can start after it),
/// then kill every session the user still has. Runs as the broker's admin
/// account (the event's definer). Works on MySQL 5.7+/8 and MariaDB 10.1+.
fn failsafe_body(username: &str, host: &str) -> String {
    format!(
        "BEGIN \
           DECLARE done INT DEFAULT 0; \
           DECLARE cid BIGINT UNSIGNED; \
           DECLARE c CURSOR FOR SELECT ID FROM information_schema.PROCESSLIST WHERE USER = {user}; \
           DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1; \
           DECLARE CONTINUE HANDLER FOR {no_thread} BEGIN END; \
           DROP USER IF EXISTS {acct}; \
           OPEN c; \
           sessions: LOOP \
             FETCH c INTO cid; \
             IF done THEN LEAVE sessions; END IF; \
             KILL CONNECTION cid; \
           END LOOP; \
           CLOSE c; \
         END",
        user = lit(username),
        acct = account(username, host),
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
        let users: Vec<&UserRef> = revokees.iter().map(|r| &r.user).collect();
        let mut conn = self.conn().await?;
        let accounts = users
            .iter()
            .map(|u| account(u.username.as_str(), host_of(u)))
            .collect::<Vec<_>>()
            .join(", ");
        // Drop first: after it no new login can start, so killing what is
        // left afterwards leaves nothing behind (the other order races with
        // a login in between). A dropped user's open session would
        // otherwise keep running queries.
        self.timed(
            "drop user",
            conn.query_drop(format!("DROP USER IF EXISTS {accounts}")),
        )
        .await?;
        let names = users
            .iter()
            .map(|u| lit(u.username.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let sessions: Vec<u64> = self
            .timed(
                "list sessions",
                conn.query(format!(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE USER IN ({names})"
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
        // A failsafe left behind only drops a user that no longer exists
        // (names are never reused) and then deletes itself: not worth
        // failing a revocation over.
        let drops: String = users
            .iter()
            .map(|u| format!("DROP EVENT IF EXISTS {};", event_name(u.username.as_str())))
            .collect();
        if let Err(e) = self
            .timed("drop failsafe event", conn.query_drop(drops))
            .await
        {
            tracing::warn!(database = %self.config.name, error = %e,
                "failsafe events not dropped; they will fire harmlessly");
        }
        Ok(Vec::new())
    }

    async fn disable(&self, users: &[UserRef]) -> Result<()> {
        let mut conn = self.conn().await?;
        for u in users {
            if !self.user_exists(&mut conn, u).await? {
                continue;
            }
            let acct = account(u.username.as_str(), host_of(u));
            self.timed(
                "lock account",
                conn.query_drop(format!("ALTER USER {acct} ACCOUNT LOCK")),
            )
            .await?;
            let sessions: Vec<u64> = self
                .timed(
                    "list sessions",
                    conn.query(format!(
                        "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = {}",
                        lit(u.username.as_str())
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
        }
        Ok(())
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

    fn dsn(&self, username: &Username, password: Option<&Password>) -> String {
        let e = &self.endpoint;
        let host = if e.host.contains(':') {
            format!("[{}]", e.host)
        } else {
            e.host.clone()
        };
        match password {
            Some(p) => format!(
                "mysql://{username}:{}@{host}:{}/{}",
                p.expose(),
                e.port,
                e.database
            ),
            None => format!("mysql://{username}@{host}:{}/{}", e.port, e.database),
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
        let body = failsafe_body("cb_x", "%");
        assert!(body.contains("DROP USER IF EXISTS 'cb_x'@'%'"));
        assert!(body.contains("KILL CONNECTION cid"));
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
