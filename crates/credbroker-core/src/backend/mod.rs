//! Database backends: the only code that speaks SQL to the databases whose
//! users we lease. One trait; PostgreSQL and MySQL/MariaDB implement it.
//!
//! Architecture invariant: every identifier a backend puts into SQL is a
//! broker-made [`Username`] or a value from the operator's config, always
//! quoted; caller text never reaches a statement.

// Test doubles: core's unit tests, and the integration tests through the
// `fakes` feature; not in the shipped binary.
#[cfg(any(test, feature = "fakes"))]
pub mod fake;
pub mod finding;
pub mod mysql;
pub mod postgres;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::config::{Config, DatabaseConfig, SecretSource};
use crate::error::{Error, Result};
use crate::lease::{BackendKind, Password, Username};

/// Where clients connect to use a leased credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub database: String,
}

/// A user to create.
pub struct NewUser<'a> {
    /// The broker role (`[roles.NAME]`) leased: named in errors, so an
    /// operator knows whose `grants` the database refused.
    pub role: &'a str,
    pub username: &'a Username,
    pub password: &'a Password,
    /// Logins stop at this time (PostgreSQL `VALID UNTIL`); MySQL's
    /// failsafe event locks the user then (and drops it unless it is a
    /// DEFINER), even if the broker never comes back. Renew moves both, never past `hard_limit`.
    pub valid_until: DateTime<Utc>,
    /// The lease's hard limit: by then the database itself has removed or
    /// locked the user, whatever happened to the broker.
    pub hard_limit: DateTime<Utc>,
    /// Operator-written statements with `{{name}}` to fill in.
    pub grants: &'a [String],
    /// MySQL account host part; ignored by PostgreSQL.
    pub host: &'a str,
    /// The role's `owner`: on PostgreSQL the new user becomes a member, so
    /// `SET ROLE owner` works (what migration tools do).
    pub owner: Option<&'a str>,
}

/// A static role's user getting a new password (`static_roles`).
pub struct StaticLogin<'a> {
    /// The static role, named in errors.
    pub role: &'a str,
    /// An existing user (a DBA's, or made by [`Backend::static_create`]);
    /// from the operator's config, always quoted.
    pub user: &'a str,
    /// MySQL account host part; ignored by PostgreSQL.
    pub host: &'a str,
    pub password: &'a Password,
    /// PostgreSQL `VALID UNTIL`; MySQL's failsafe event locks the account
    /// then. Either way the database refuses the password afterwards,
    /// whatever happened to the broker.
    pub valid_until: DateTime<Utc>,
}

/// The users a static role with `create = true` needs.
pub struct StaticUsers<'a> {
    pub role: &'a str,
    pub users: &'a [String],
    pub host: &'a str,
    /// Both users become members of it: on PostgreSQL `SET ROLE owner`
    /// makes what they create belong to it; on MySQL/MariaDB it is their
    /// default role.
    pub owner: &'a str,
    pub grants: &'a [String],
}

/// A user to extend or revoke, as the store remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRef {
    pub username: Username,
    pub host: String,
}

/// A user to revoke, and who inherits what it owns (invariant 7:
/// revocation never destroys data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revokee {
    pub user: UserRef,
    /// The role's `owner`; `None` means the broker's own admin account (a
    /// removed role, an orphan, a role without one).
    pub owner: Option<String>,
}

impl Revokee {
    pub fn new(user: UserRef, owner: Option<String>) -> Self {
        Revokee { user, owner }
    }
}

/// Objects a revoked user owned that now belong to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reassigned {
    pub username: Username,
    pub objects: u64,
    pub to: String,
}

/// What one pass over a draining user's sessions did
/// ([`Backend::end_idle_sessions`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sessions {
    /// The server's ids of the idle sessions ended by this pass (a
    /// PostgreSQL pid, a MySQL thread id): the drain counts each once,
    /// though a session being terminated may still be listed next pass.
    pub ended_idle: Vec<i64>,
    /// Sessions left: in a query, inside an open transaction, or idle for
    /// less than the pass asked.
    pub busy: u32,
}

/// Connection pool figures for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolState {
    pub size: usize,
    pub available: usize,
    pub max_size: usize,
}

#[async_trait]
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// The broker's name for this database (`[databases.NAME]`).
    fn name(&self) -> &str;

    fn endpoint(&self) -> &Endpoint;

    /// Creates the user with its password, expiry and grants, all or nothing.
    async fn create_user(&self, user: &NewUser<'_>) -> Result<()>;

    /// Moves the user's expiry (and its failsafe) to `valid_until`.
    async fn extend(&self, user: &UserRef, valid_until: DateTime<Utc>) -> Result<()>;

    /// Refuses the users' logins, ends their sessions, hands what they own
    /// to their owner and drops them. Succeeds for users that are already
    /// gone. Returns what was reassigned (users that owned nothing are not
    /// listed). On error, the batch may be partly done: callers retry
    /// (every step is idempotent) or split the batch; nothing a user owned
    /// is ever dropped with it.
    async fn revoke(&self, users: &[Revokee]) -> Result<Vec<Reassigned>>;

    /// Leaves the users unable to log in and without sessions, without
    /// dropping them: the last word of a forced revoke. Succeeds for users
    /// that are gone; fails unless the database confirms it.
    async fn disable(&self, users: &[UserRef]) -> Result<()>;

    /// Starts a routine handover's drain of a leased user: from now on no
    /// new login (PostgreSQL NOLOGIN, MySQL/MariaDB ACCOUNT LOCK), and the
    /// database's own end of the credential (`VALID UNTIL`, the failsafe
    /// event) moved to `until`, the drain deadline — so a broker that dies
    /// mid-drain still leaves nothing usable past it. Sessions are left
    /// alone. `FailedPrecondition` where logins cannot be refused without
    /// dropping the user (MariaDB before 10.4): the caller revokes at once.
    async fn drain_begin(&self, user: &UserRef, until: DateTime<Utc>) -> Result<()>;

    /// One pass of a drain: ends `user`'s sessions that have been idle for
    /// at least `settled` — not in a query, not inside an open transaction
    /// (PostgreSQL `state = 'idle'` since `state_change`; MySQL/MariaDB
    /// `Command = 'Sleep'` for `TIME` seconds, with no InnoDB transaction)
    /// — and counts the others left (busy, or idle for less). `settled`
    /// zero ends every idle session; `revocation::drain::settle` says which
    /// a pass asks for. Needs the admin to see other sessions' state
    /// (`pg_read_all_stats`; `PROCESS`), which `credbroker check` requires;
    /// without it every session looks busy and lasts until the drain
    /// deadline.
    async fn end_idle_sessions(
        &self,
        user: &str,
        host: &str,
        settled: std::time::Duration,
    ) -> Result<Sessions>;

    /// Users on the server whose names this broker could have made.
    async fn list_broker_users(&self, prefix: &str) -> Result<Vec<UserRef>>;

    /// Replaces the broker's own admin password with a random one and
    /// stores it where the config says.
    async fn rotate_root(&self) -> Result<()>;

    /// Warnings about this database that an operator must see (e.g. no
    /// database-side failsafe possible). Checked at start-up.
    async fn preflight(&self) -> Result<Vec<String>>;

    /// Connects once and fails with a `Config` error naming the database
    /// and the reason when TLS does (certificate not trusted, wrong host
    /// name, no TLS on the server though the URL insists). Anything else,
    /// an unreachable database included, is `Ok`: preflight reports it.
    async fn check_tls(&self) -> Result<()> {
        Ok(())
    }

    fn pool_state(&self) -> PoolState;

    /// One trivial round trip (`SELECT 1`, a MySQL ping) on a pooled
    /// connection: whether the database answers now. Asked by the
    /// `/metrics` scrape for `credbroker_database_up`, so an outage shows
    /// before any lease falls due on it.
    async fn ping(&self) -> Result<()>;

    /// Creates the static role's users that do not exist yet, unable to
    /// log in until their first rotation, members of the owner, with the
    /// grants. Idempotent.
    async fn static_create(&self, spec: &StaticUsers<'_>) -> Result<()>;

    /// Sets a static user's password — a broker-computed verifier or hash,
    /// never the plaintext — valid until `valid_until`, and lets it log in.
    /// Setting it again is harmless (how a crashed rotation is resumed).
    async fn static_set_password(&self, login: &StaticLogin<'_>) -> Result<()>;

    /// Refuses a static user's logins (a random password nobody knows,
    /// NOLOGIN / ACCOUNT LOCK) and, with `end_sessions`, ends its sessions.
    /// Idempotent.
    async fn static_retire(&self, user: &str, host: &str, end_sessions: bool) -> Result<()>;

    /// A connection string for `username`; with the password only when given.
    fn dsn(&self, username: &Username, password: Option<&Password>) -> String;
}

/// `impl Backend` for a real backend (`postgres`, `mysql`): both keep
/// `config` and `endpoint` fields and answer every method with an inherent
/// method of the same concern, one file each (`create_leased` in
/// `create.rs`/`users.rs`, `revoke_users` in `revoke.rs`, …), so the trait
/// impl is only this table, written once. Each backend keeps what differs:
/// its kind (a `BackendKind` variant) and how its leased DSN reads
/// (`leased_dsn`).
macro_rules! database_backend {
    ($ty:ty, $kind:ident) => {
        // In a block of its own, so the impl names the trait's types plainly.
        const _: () = {
            use chrono::{DateTime, Utc};
            use std::time::Duration;
            use $crate::backend::{
                Backend, Endpoint, NewUser, PoolState, Reassigned, Revokee, Sessions, StaticLogin,
                StaticUsers, UserRef,
            };
            use $crate::error::Result;
            use $crate::lease::{BackendKind, Password, Username};

            #[async_trait::async_trait]
            impl Backend for $ty {
                fn kind(&self) -> BackendKind {
                    BackendKind::$kind
                }

                fn name(&self) -> &str {
                    &self.config.name
                }

                fn endpoint(&self) -> &Endpoint {
                    &self.endpoint
                }

                async fn create_user(&self, user: &NewUser<'_>) -> Result<()> {
                    self.create_leased(user).await
                }

                async fn extend(&self, user: &UserRef, valid_until: DateTime<Utc>) -> Result<()> {
                    self.extend_leased(user, valid_until).await
                }

                async fn revoke(&self, revokees: &[Revokee]) -> Result<Vec<Reassigned>> {
                    self.revoke_users(revokees).await
                }

                async fn disable(&self, users: &[UserRef]) -> Result<()> {
                    self.disable_users(users).await
                }

                async fn drain_begin(&self, user: &UserRef, until: DateTime<Utc>) -> Result<()> {
                    self.drain_begin_user(user, until).await
                }

                async fn end_idle_sessions(
                    &self,
                    user: &str,
                    _host: &str,
                    settled: Duration,
                ) -> Result<Sessions> {
                    self.end_idle(user, settled).await
                }

                async fn list_broker_users(&self, prefix: &str) -> Result<Vec<UserRef>> {
                    self.list_prefixed(prefix).await
                }

                async fn rotate_root(&self) -> Result<()> {
                    self.rotate_admin_password().await
                }

                async fn check_tls(&self) -> Result<()> {
                    self.check_tls_handshake().await
                }

                async fn preflight(&self) -> Result<Vec<String>> {
                    self.preflight_warnings().await
                }

                async fn ping(&self) -> Result<()> {
                    self.answers().await
                }

                fn pool_state(&self) -> PoolState {
                    self.pool_metrics()
                }

                async fn static_create(&self, spec: &StaticUsers<'_>) -> Result<()> {
                    self.create_static_users(spec).await
                }

                async fn static_set_password(&self, login: &StaticLogin<'_>) -> Result<()> {
                    self.set_static_password(login).await
                }

                async fn static_retire(&self, user: &str, host: &str, end: bool) -> Result<()> {
                    self.retire_static_user(user, host, end).await
                }

                fn dsn(&self, username: &Username, password: Option<&Password>) -> String {
                    self.leased_dsn(username, password)
                }
            }
        };
    };
}
pub(crate) use database_backend;

impl Endpoint {
    /// The host as a URL writes it: an IPv6 address in brackets.
    pub fn url_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// A static role's failed statement: an internal error's message names
/// the role (the `grants` or user an operator must look at); other
/// classes stay as they are.
pub(crate) fn in_static_role(role: &str, e: Error) -> Error {
    match e {
        Error::Internal(m) => {
            Error::Internal(m.map_message(|m| format!("static role {role:?}: {m}")))
        }
        other => other,
    }
}

/// A `LIKE` pattern for the names that start with `prefix` (its `\`, `_`
/// and `%` escaped): how both backends find the users the broker made.
pub fn prefix_pattern(prefix: &str) -> String {
    format!(
        "{}%",
        prefix
            .replace('\\', "\\\\")
            .replace('_', "\\_")
            .replace('%', "\\%")
    )
}

/// Fills `{{name}}` in an operator's grant statement with the quoted user.
pub fn render_grant(template: &str, quoted_user: &str) -> String {
    template.replace("{{name}}", quoted_user)
}

/// Reads the admin password named by the config. The value is only ever
/// held in a zeroizing [`Password`].
pub fn read_admin_password(db: &DatabaseConfig) -> Result<Option<Password>> {
    db.admin_password
        .read(&format!("databases.{}.admin_password", db.name))
}

/// Writes a new admin password where the config keeps it: a new file beside
/// the old one, mode 0600, renamed over it, so a crash leaves either the old
/// or the new password, never half of one.
pub fn store_admin_password(db: &DatabaseConfig, password: &Password) -> Result<()> {
    let path = admin_password_file(db)?;
    crate::fsutil::write_secret_file(path, password.expose().as_bytes())
        .map_err(|e| Error::internal(format!("cannot write {}: {e}", path.display())))?;
    let _ = std::fs::remove_file(staged_path(path));
    Ok(())
}

/// Writes a new admin password beside the current one *before* the
/// database is told: should the broker die between the database's change
/// and `store_admin_password`, the next start finds it there
/// (`resolve_interrupted_rotation`) instead of nobody knowing it.
pub fn stage_admin_password(db: &DatabaseConfig, password: &Password) -> Result<()> {
    let staged = staged_path(admin_password_file(db)?);
    crate::fsutil::write_secret_file(&staged, password.expose().as_bytes())
        .map_err(|e| Error::internal(format!("cannot write {}: {e}", staged.display())))
}

fn admin_password_file(db: &DatabaseConfig) -> Result<&std::path::Path> {
    match &db.admin_password {
        SecretSource::File(path) => Ok(path),
        _ => Err(Error::FailedPrecondition(format!(
            "databases.{}: rotate-root needs admin_password_file, where the broker can keep the new password",
            db.name
        ))),
    }
}

fn staged_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    name.into()
}

/// The backend for one database's config, not yet checked or connected.
pub fn build(db: &DatabaseConfig) -> Result<Arc<dyn Backend>> {
    Ok(match db.kind {
        BackendKind::Postgres => Arc::new(postgres::PostgresBackend::new(db)?),
        BackendKind::Mysql => Arc::new(mysql::MysqlBackend::new(db)?),
    })
}

/// A staged admin password left by an interrupted rotate-root: whichever
/// of the two the database accepts becomes the kept one.
async fn resolve_interrupted_rotation(
    db: &DatabaseConfig,
    current: Arc<dyn Backend>,
) -> Result<Arc<dyn Backend>> {
    let SecretSource::File(path) = &db.admin_password else {
        return Ok(current);
    };
    let staged = staged_path(path);
    if !staged.exists() {
        return Ok(current);
    }
    if current.preflight().await.is_ok() {
        tracing::warn!(database = %db.name, "an interrupted rotate-root never reached the database; the current admin password stays");
        let _ = std::fs::remove_file(&staged);
        return Ok(current);
    }
    let io = |e: std::io::Error| Error::internal(format!("{}: {e}", path.display()));
    let old = zeroize::Zeroizing::new(std::fs::read(path).map_err(io)?);
    std::fs::rename(&staged, path).map_err(io)?;
    let candidate = build(db)?;
    if candidate.preflight().await.is_ok() {
        tracing::warn!(database = %db.name, "completed an interrupted rotate-root: the staged admin password is now the kept one");
        return Ok(candidate);
    }
    // Neither logs in (the database may be down): leave both as they were.
    let new = zeroize::Zeroizing::new(std::fs::read(path).map_err(io)?);
    crate::fsutil::write_secret_file(&staged, &new).map_err(io)?;
    crate::fsutil::write_secret_file(path, &old).map_err(io)?;
    tracing::warn!(database = %db.name, "an interrupted rotate-root is unresolved (the database did not accept either password); restart when it is reachable");
    Ok(current)
}

pub type Backends = BTreeMap<String, Arc<dyn Backend>>;

/// Connects a backend for every configured database. A database that is
/// down does not stop the broker: pools connect lazily and requests for it
/// get `Unavailable`.
pub async fn connect_all(config: &Config) -> Result<Backends> {
    let mut out: Backends = BTreeMap::new();
    for (name, db) in &config.databases {
        let backend = resolve_interrupted_rotation(db, build(db)?).await?;
        out.insert(name.clone(), backend);
    }
    Ok(out)
}
