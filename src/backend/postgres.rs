//! PostgreSQL backend: roles with a broker-computed SCRAM verifier and
//! `VALID UNTIL`, revoked in the order that leaves no session behind.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::backend::finding::Finding;
use crate::backend::{
    read_admin_password, render_grant, stage_admin_password, store_admin_password, Backend,
    Endpoint, NewUser, PoolState, Reassigned, Revokee, StaticLogin, StaticUsers, UserRef,
};
use crate::config::DatabaseConfig;
use crate::dbtls::{self, Dialect, TlsParams};
use crate::error::{Error, Result};
use crate::lease::{BackendKind, Password, Username};
use crate::scram;

pub struct PostgresBackend {
    config: DatabaseConfig,
    endpoint: Endpoint,
    /// Replaced whole by rotate-root; sessions already open keep working.
    pool: RwLock<Pool>,
    /// tokio-postgres config without password, for one-off connections to
    /// other databases of the cluster (DROP OWNED acts per database).
    base: tokio_postgres::Config,
    /// rustls (ring) as `admin_url`'s `sslmode`/`sslrootcert`/`sslcert`/
    /// `sslkey` ask; shared by the pool and one-off connections.
    tls: MakeRustlsConnect,
    tls_params: TlsParams,
    /// `host:port` of the admin URL, for TLS error messages.
    admin_addr: String,
    /// Whether the admin role is a superuser, asked once. A role with only
    /// CREATEROLE must make itself a member of a leased role before
    /// `REASSIGN OWNED`/`DROP OWNED` may touch what that role owns.
    superuser: tokio::sync::OnceCell<bool>,
    /// Role creations waiting for a shared round.
    creates: Arc<CreateRounds>,
    /// Off only for the bench's (b′), which sends one lease's statements.
    share_creates: bool,
}

/// Most creations one shared round sends.
const MAX_CREATE_ROUND: usize = 64;

/// Role creations that arrive while another is running share the next
/// round: one simple-query message, so one implicit transaction and one
/// commit for all of them, as the lease store group-commits its writes.
/// A round that fails (one refused grant, a lost catalog race) commits
/// nothing, and each of its creations is then run alone, so one lease's
/// failure stays its own and keeps its diagnostics. A broker role whose
/// last creation failed is kept out of shared rounds until one of its
/// creations succeeds again, so a misconfigured grant does not make every
/// other lease pay for two rounds.
#[derive(Default)]
struct CreateRounds {
    /// Broker roles whose last creation failed.
    suspect: std::sync::Mutex<std::collections::HashSet<String>>,
    queue: std::sync::Mutex<Vec<(String, tokio::sync::oneshot::Sender<bool>)>>,
    running: tokio::sync::Mutex<()>,
    /// Rounds that committed, and the creations they carried.
    committed: std::sync::atomic::AtomicU64,
    carried: std::sync::atomic::AtomicU64,
}

impl PostgresBackend {
    pub fn new(config: &DatabaseConfig) -> Result<Self> {
        let url_err = |e: &dyn std::fmt::Display| {
            Error::config(format!("databases.{}.admin_url: {e}", config.name))
        };
        // tokio-postgres refuses verify-ca/verify-full and every path
        // parameter: they are ours to read, and the rest is its.
        let (url, tls_params) =
            dbtls::split_url(&config.admin_url, Dialect::Postgres).map_err(|e| url_err(&e))?;
        let mut base: tokio_postgres::Config = url.parse().map_err(|e| url_err(&e))?;
        let (tls, ssl_mode) = dbtls::postgres_connector(&tls_params).map_err(|e| url_err(&e))?;
        base.ssl_mode(ssl_mode);
        base.connect_timeout(config.connect_timeout);
        base.application_name("credbroker");
        // plan_cache_mode: our prepared catalog queries are planned once per
        // connection, not on every execution (PostgreSQL 12+).
        base.options(format!(
            "-c statement_timeout={} -c lock_timeout={} -c plan_cache_mode=force_generic_plan",
            config.statement_timeout.as_millis(),
            config.statement_timeout.as_millis()
        ));
        let host = match base.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "localhost".to_string(),
        };
        let port = base.get_ports().first().copied().unwrap_or(5432);
        let admin_addr = format!("{host}:{port}");
        let database = base
            .get_dbname()
            .map(str::to_string)
            .or_else(|| base.get_user().map(str::to_string))
            .unwrap_or_else(|| "postgres".to_string());
        let endpoint = Endpoint {
            host: config.client_host.clone().unwrap_or(host),
            port: config.client_port.unwrap_or(port),
            database,
        };
        let pool = Self::build_pool(config, &base, &tls, read_admin_password(config)?)?;
        Ok(PostgresBackend {
            config: config.clone(),
            endpoint,
            pool: RwLock::new(pool),
            base,
            tls,
            tls_params,
            admin_addr,
            superuser: tokio::sync::OnceCell::new(),
            creates: Arc::default(),
            share_creates: true,
        })
    }

    fn build_pool(
        config: &DatabaseConfig,
        base: &tokio_postgres::Config,
        tls: &MakeRustlsConnect,
        password: Option<Password>,
    ) -> Result<Pool> {
        let mut pg = base.clone();
        if let Some(p) = &password {
            pg.password(p.expose());
        }
        let manager = Manager::from_config(
            pg,
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let wait = config.connect_timeout + config.statement_timeout;
        Pool::builder(manager)
            .max_size(config.max_connections)
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(wait),
                create: Some(config.connect_timeout),
                recycle: Some(config.connect_timeout),
            })
            .build()
            .map_err(|e| Error::config(format!("databases.{}: {e}", config.name)))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner()).clone();
        pool.get().await.map_err(|e| self.unavailable(e))
    }

    /// `user@host:port/db` of the admin connection: where a failure
    /// happened, for the operator (no password: the URL carries none).
    pub fn admin_location(&self) -> String {
        location(&self.base)
    }

    /// Connection trouble as `Unavailable`, with its cause found by
    /// walking the error's `source()` chain: deadpool and tokio-postgres
    /// print only "db error" or "error connecting to server" on top. The
    /// text before the first ": " is what a caller sees (`server::status`);
    /// the rest, for the log and `check`, says where and why.
    /// The driver's (or the pool's) error is kept as the source: failing
    /// to connect quotes no statement.
    fn unavailable<E>(&self, e: E) -> Error
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let cause = Cause::of(&e);
        let m = format!(
            "database {:?} is unreachable: {} as {}: {}",
            self.config.name,
            cause.kind.as_str(),
            self.admin_location(),
            cause.detail
        );
        Error::unavailable_from(m, e)
    }

    /// Maps a driver error: connection trouble is `Unavailable` (retry),
    /// a database refusal is `Internal` with the server's message and
    /// SQLSTATE, which never hold our password (we never send one).
    ///
    /// The driver's error is kept as the source (its text adds the
    /// server's DETAIL and HINT), except for a syntax error (42601): our
    /// statements can hold a SCRAM verifier (`CREATE ROLE … PASSWORD`,
    /// `ALTER ROLE … PASSWORD`), and a syntax error's DETAIL/position may
    /// quote the statement around it — so that source is dropped and only
    /// the message below is kept.
    fn db_error(&self, what: &str, e: tokio_postgres::Error) -> Error {
        match e.as_db_error() {
            Some(db) if db.code() == &tokio_postgres::error::SqlState::QUERY_CANCELED => {
                let m = format!(
                    "database {:?}: {what} timed out: {} (SQLSTATE {}) at {}",
                    self.config.name,
                    db.message(),
                    db.code().code(),
                    self.admin_location()
                );
                Error::unavailable_from(m, e)
            }
            Some(db) => {
                let m = format!(
                    "database {:?}: {what}: {} (SQLSTATE {}) as {}",
                    self.config.name,
                    db.message(),
                    db.code().code(),
                    self.admin_location()
                );
                if may_quote_statement(db.code()) {
                    Error::internal(m)
                } else {
                    Error::internal_from(m, e)
                }
            }
            None => {
                let cause = Cause::of(&e);
                let m = format!(
                    "database {:?} is unreachable: {what}: {} as {}: {}",
                    self.config.name,
                    cause.kind.as_str(),
                    self.admin_location(),
                    cause.detail
                );
                Error::unavailable_from(m, e)
            }
        }
    }

    /// After a failed `create_user`: which of its statements the database
    /// refused, found by running them again one by one in a transaction
    /// that is rolled back, so an operator reads "GRANT 2 of role R"
    /// rather than a bare "permission denied for table orders". `None`
    /// when every statement passes this time (a race).
    async fn failing_statement(
        &self,
        client: &tokio_postgres::Client,
        user: &NewUser<'_>,
    ) -> Option<String> {
        let ident = escape_identifier(user.username.as_str());
        let plan = DryRun {
            create: format!("CREATE ROLE {ident} NOLOGIN"),
            owner: user
                .owner
                .map(|o| format!("GRANT {} TO {ident}", escape_identifier(o))),
            grants: user
                .grants
                .iter()
                .map(|g| render_grant(g, &ident))
                .collect(),
        };
        let found = plan.run(client).await.err();
        let _ = client.batch_execute("ROLLBACK").await;
        found.map(|f| f.describe(user.grants))
    }
    /// Whether the admin role is a superuser (asked once per backend).
    async fn is_superuser(&self, client: &deadpool_postgres::Object) -> Result<bool> {
        self.superuser
            .get_or_try_init(|| async {
                let row = client
                    .query_one(
                        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                        &[],
                    )
                    .await
                    .map_err(|e| self.db_error("check privileges", e))?;
                Ok::<bool, Error>(row.get(0))
            })
            .await
            .copied()
    }

    /// `REASSIGN OWNED` for each owner among `revokees`, preceded, for an
    /// admin that is not a superuser, by the membership it needs to act on
    /// what the roles own. Objects survive their lease (invariant 7).
    async fn reassign_sql(
        &self,
        client: &deadpool_postgres::Object,
        revokees: &[&Revokee],
    ) -> Result<String> {
        let mut sql = String::new();
        if !self.is_superuser(client).await? {
            let names: Vec<&str> = revokees.iter().map(|r| r.user.username.as_str()).collect();
            sql.push_str(&format!("GRANT {} TO CURRENT_USER; ", idents(&names)));
        }
        for (owner, names) in by_owner(revokees) {
            let to = match owner {
                Some(o) => escape_identifier(o),
                None => "CURRENT_USER".to_string(),
            };
            sql.push_str(&format!("REASSIGN OWNED BY {} TO {to}; ", idents(&names)));
        }
        Ok(sql)
    }

    /// What each revokee owns, cluster-wide, and who it goes to.
    fn reassigned(&self, revokees: &[&Revokee], counts: &[tokio_postgres::Row]) -> Vec<Reassigned> {
        let admin = self.base.get_user().unwrap_or("postgres").to_string();
        counts
            .iter()
            .filter_map(|row| {
                let name: String = row.get(0);
                let objects: i64 = row.get(1);
                let r = revokees.iter().find(|r| r.user.username.as_str() == name)?;
                (objects > 0).then(|| Reassigned {
                    username: r.user.username.clone(),
                    objects: objects as u64,
                    to: r.owner.clone().unwrap_or_else(|| admin.clone()),
                })
            })
            .collect()
    }

    /// Revocation for the common case — every role exists and owns nothing
    /// in another database — in one round trip: six messages sent back to
    /// back, which the server runs in order. NOLOGIN commits on its own
    /// first, so no login can slip in after the sessions are ended; then
    /// one transaction refuses to go on unless every role has lost LOGIN,
    /// counts what they own, ends their sessions, hands what they own to
    /// their owner and drops them. Anything unexpected fails that
    /// transaction whole, and the caller takes the careful path.
    async fn revoke_fast(
        &self,
        client: &deadpool_postgres::Object,
        revokees: &[&Revokee],
    ) -> Result<Vec<Reassigned>> {
        let names: Vec<&str> = revokees.iter().map(|r| r.user.username.as_str()).collect();
        // Prepared once per connection: parsing and rewriting the
        // pg_stat_activity and pg_roles views costs the server more than
        // the DDL itself.
        let guard = client
            .prepare_cached(
                "SELECT 1 / (NOT rolcanlogin)::int FROM pg_roles WHERE rolname = ANY($1)",
            )
            .await
            .map_err(|e| self.db_error("prepare", e))?;
        // Not the pg_stat_activity view: it joins every role (pg_authid,
        // which churn bloats) to every backend. Roles by name (an index
        // lookup), then their backends.
        let terminate = client
            .prepare_cached(
                "SELECT pg_terminate_backend(a.pid) FROM pg_stat_get_activity(NULL) a \
                 WHERE a.usesysid IN (SELECT oid FROM pg_roles WHERE rolname = ANY($1))",
            )
            .await
            .map_err(|e| self.db_error("prepare", e))?;
        let count = client
            .prepare_cached(OWNED_COUNT)
            .await
            .map_err(|e| self.db_error("prepare", e))?;
        let list = idents(&names);
        let nologin = nologin_sql(&names);
        let reassign = self.reassign_sql(client, revokees).await?;
        // DROP OWNED rewrites the ACLs the roles appear in: under the same
        // lock as grants, or a concurrent issue's GRANT makes one of them
        // fail. After REASSIGN OWNED, it drops privileges only, never an
        // object. Roles that appear in no ACL and own nothing (membership
        // grants only) skip the lock, so their revocations run side by side.
        let lock = acl_lock_if_needed(&names);
        let drop = format!("{lock}; {reassign}DROP OWNED BY {list}; DROP ROLE {list}; COMMIT;");
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&names];
        let (disabled, began, guarded, counted, terminated, dropped) = tokio::join!(
            client.batch_execute(&nologin),
            client.batch_execute("BEGIN"),
            // `1 / 0` aborts the transaction for a role that can still log in.
            client.query(&guard, &params),
            client.query(&count, &params),
            client.query(&terminate, &params),
            client.batch_execute(&drop),
        );
        let result = disabled
            .map_err(|e| self.db_error("disable login", e))
            .and(began.map_err(|e| self.db_error("begin", e)))
            .and(guarded.map_err(|e| self.db_error("check login disabled", e)))
            .and(terminated.map_err(|e| self.db_error("terminate sessions", e)))
            .and(dropped.map_err(|e| self.db_error("reassign owned objects and drop role", e)))
            .and(counted.map_err(|e| self.db_error("count owned objects", e)));
        match result {
            Ok(counts) => Ok(self.reassigned(revokees, &counts)),
            Err(e) => {
                // Leaves the pooled connection outside any transaction.
                client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(|e| self.db_error("rollback", e))?;
                Err(e)
            }
        }
    }

    /// Revocation that looks before it acts: which roles still exist, and
    /// where they own something.
    async fn revoke_checked(
        &self,
        client: &deadpool_postgres::Object,
        revokees: &[&Revokee],
    ) -> Result<Vec<Reassigned>> {
        let names: Vec<&str> = revokees.iter().map(|r| r.user.username.as_str()).collect();
        // One round trip (prepared once per pooled connection): which roles
        // still exist, and which other databases hold something they own
        // or were granted. Should a live session create an object elsewhere
        // after this, DROP ROLE below fails and the retry finds it.
        let lookup = client
            .prepare_cached(
                "SELECT r.rolname::text, ARRAY(SELECT DISTINCT d.datname::text FROM pg_shdepend s \
                 JOIN pg_database d ON d.oid = s.dbid \
                 WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = r.oid \
                 AND d.datname <> current_database()) \
                 FROM pg_roles r WHERE r.rolname = ANY($1)",
            )
            .await
            .map_err(|e| self.db_error("look up roles", e))?;
        let rows = client
            .query(&lookup, &[&names])
            .await
            .map_err(|e| self.db_error("look up roles", e))?;
        let existing: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if existing.is_empty() {
            return Ok(Vec::new());
        }
        let mut other_dbs: Vec<String> = rows
            .iter()
            .flat_map(|r| r.get::<_, Vec<String>>(1))
            .collect();
        other_dbs.sort();
        other_dbs.dedup();
        let present: Vec<&Revokee> = revokees
            .iter()
            .copied()
            .filter(|r| existing.iter().any(|e| e == r.user.username.as_str()))
            .collect();
        let existing: Vec<&str> = existing.iter().map(String::as_str).collect();
        let list = idents(&existing);
        // 1. No new logins — committed on its own, before step 2, so no
        // login can slip in after it. 2. End live sessions (a dropped role's
        // open session would otherwise keep running queries). 3. Hand what
        // the roles own to their owner and drop what they were granted, in
        // every database. 4. Drop the roles.
        let nologin = nologin_sql(&existing);
        // Prepared once per connection: parsing and rewriting the
        // pg_stat_activity view costs the server more than the DDL itself.
        let terminate = client
            .prepare_cached(TERMINATE_BY_NAME)
            .await
            .map_err(|e| self.db_error("terminate sessions", e))?;
        // Sent back to back in one round trip; the server runs them in order.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&existing];
        let (disabled, terminated) = tokio::join!(
            client.batch_execute(&nologin),
            client.query(&terminate, &params)
        );
        disabled.map_err(|e| self.db_error("disable login", e))?;
        terminated.map_err(|e| self.db_error("terminate sessions", e))?;
        let counts = client
            .query(OWNED_COUNT, &params)
            .await
            .map_err(|e| self.db_error("count owned objects", e))?;
        let reassigned = self.reassigned(&present, &counts);
        let reassign = self.reassign_sql(client, &present).await?;
        let per_db = format!("{reassign}DROP OWNED BY {list}");
        for db in &other_dbs {
            self.in_database(db, &per_db).await?;
        }
        let drop = format!("{ACL_LOCK}; {per_db}; DROP ROLE IF EXISTS {list};");
        self.batch_retrying(client, &drop, "reassign owned objects and drop role")
            .await?;
        Ok(reassigned)
    }

    /// Runs one implicit transaction, again when it lost a race on a shared
    /// catalog row: concurrent `GRANT … ON t` / `DROP OWNED` for different
    /// roles all rewrite `t`'s ACL, and all but one fail with "tuple
    /// concurrently updated" (XX000). The loser was rolled back whole, so
    /// running it again is safe; under load (many leases of one role at
    /// once) this is the normal case, not an error.
    async fn batch_retrying(
        &self,
        client: &tokio_postgres::Client,
        sql: &str,
        what: &str,
    ) -> Result<()> {
        const ATTEMPTS: u32 = 8;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match client.batch_execute(sql).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < ATTEMPTS && lost_catalog_race(&e) => {
                    let ms = rand::Rng::random_range(&mut rand::rng(), 1..=2u64 << attempt.min(5));
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(self.db_error(what, e)),
            }
        }
    }

    /// Runs `sql` (under the ACL lock) in another database of the cluster:
    /// `REASSIGN OWNED` and `DROP OWNED` act on the connected database only.
    async fn in_database(&self, dbname: &str, sql: &str) -> Result<()> {
        let mut cfg = self.base.clone();
        cfg.dbname(dbname);
        if let Some(p) = read_admin_password(&self.config)? {
            cfg.password(p.expose());
        }
        let (client, conn) = cfg
            .connect(self.tls.clone())
            .await
            .map_err(|e| self.unavailable(e))?;
        let task = tokio::spawn(conn);
        let result = client
            .batch_execute(&format!("{ACL_LOCK}; {sql}"))
            .await
            .map_err(|e| self.db_error(&format!("reassign owned objects in {dbname:?}"), e));
        drop(client);
        let _ = task.await;
        result
    }
}

/// Serializes the broker's privilege changes within one database, across
/// all replicas: PostgreSQL updates an object's ACL in place without a row
/// lock, so two concurrent `GRANT`s on the same table (or a grant racing a
/// `DROP OWNED`) fail with "tuple concurrently updated". A transaction-scoped
/// advisory lock is released at commit or rollback, so it cannot leak.
const ACL_LOCK: &str = "SELECT pg_advisory_xact_lock(27950820906314347)";

/// [`ACL_LOCK`], taken only when one of the roles has a row in
/// `pg_shdepend` (owns something, or holds a privilege on an object): a
/// lease whose grants are role memberships has no ACL for `DROP OWNED` to
/// rewrite, and taking the lock anyway made every revocation of a database
/// wait for the one before it. Should a privilege be granted to the role
/// between this check and `DROP OWNED`, the race fails the transaction
/// ("tuple concurrently updated") and the careful path, which always
/// locks, runs instead: never a wrong result, only a slower one.
fn acl_lock_if_needed(names: &[&str]) -> String {
    let literals = names
        .iter()
        .map(|n| escape_literal(n))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{ACL_LOCK} WHERE EXISTS (SELECT 1 FROM pg_shdepend s \
         WHERE s.refclassid = 'pg_authid'::regclass \
         AND s.refobjid IN (SELECT oid FROM pg_roles WHERE rolname IN ({literals})))"
    )
}

/// Objects each role owns in the whole cluster (`pg_shdepend` has a row per
/// owned object in any database, plus shared objects).
const OWNED_COUNT: &str = "SELECT r.rolname::text, (SELECT count(*) FROM pg_shdepend s \
     WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = r.oid AND s.deptype = 'o') \
     FROM pg_roles r WHERE r.rolname = ANY($1)";

/// Revokees grouped by who inherits what they own (`None`: the admin).
fn by_owner<'r>(revokees: &[&'r Revokee]) -> BTreeMap<Option<&'r str>, Vec<&'r str>> {
    let mut out: BTreeMap<Option<&str>, Vec<&str>> = BTreeMap::new();
    for r in revokees {
        out.entry(r.owner.as_deref())
            .or_default()
            .push(r.user.username.as_str());
    }
    out
}

/// Whether a grant statement may rewrite an object's ACL: anything but a
/// plain role membership (`GRANT role[, …] TO …`, no `ON`).
fn rewrites_an_acl(grant: &str) -> bool {
    let words: Vec<String> = grant
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    words.first().map(String::as_str) != Some("GRANT") || words.iter().any(|w| w == "ON")
}

/// Whether `e` is PostgreSQL's "tuple concurrently updated": a statement
/// lost a race on a shared catalog row and was rolled back whole.
pub fn lost_catalog_race(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::INTERNAL_ERROR
            && db.message() == "tuple concurrently updated"
    })
}

/// `VALID UNTIL` literal: an explicit UTC timestamp, so the server's
/// `timezone` setting cannot shift a credential's expiry.
fn pg_timestamp(t: DateTime<Utc>) -> String {
    escape_literal(&t.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string())
}

/// `ALTER ROLE … NOLOGIN` for each role, sent as one batch.
fn nologin_sql<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .map(|u| format!("ALTER ROLE {} NOLOGIN;", escape_identifier(u.as_ref())))
        .collect()
}

/// Ends every session of the named roles (the careful paths; the fast one
/// looks roles up by name first, see `revoke_fast`).
const TERMINATE_BY_NAME: &str =
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1)";

fn idents(users: &[&str]) -> String {
    users
        .iter()
        .map(|u| escape_identifier(u))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `user@host:port/db` of a connection config (it never holds a password
/// we print: `Config`'s password is not part of this).
pub fn location(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) if h.contains(':') => format!("[{h}]"),
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("?");
    let db = cfg.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{db}")
}

/// Whether a server error's text (DETAIL, position) may quote the statement
/// around it — and with it a SCRAM verifier: such an error is not kept as
/// a source (`PostgresBackend::db_error`).
fn may_quote_statement(code: &tokio_postgres::error::SqlState) -> bool {
    code == &tokio_postgres::error::SqlState::SYNTAX_ERROR
}

/// `host:port` of a connection config.
fn host_port(cfg: &tokio_postgres::Config) -> String {
    let at = location(cfg);
    let at = at.split_once('@').map_or(at.as_str(), |(_, rest)| rest);
    at.rsplit_once('/').map_or(at, |(hp, _)| hp).to_string()
}

/// Why a connection failed, in the words an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CauseKind {
    Refused,
    TimedOut,
    Authentication,
    Tls,
    /// The server answered with an error that is not about logging in
    /// (no such database, too many connections, shutting down…).
    Server,
    Other,
}

impl CauseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CauseKind::Refused => "connection refused",
            CauseKind::TimedOut => "connection timed out",
            CauseKind::Authentication => "authentication failed",
            CauseKind::Tls => "TLS failed",
            CauseKind::Server => "refused by the server",
            CauseKind::Other => "connection failed",
        }
    }
}

/// The deepest cause of a driver error, found through `source()`.
#[derive(Debug, Clone)]
pub struct Cause {
    pub kind: CauseKind,
    /// The server's own message and SQLSTATE, or the OS error.
    pub detail: String,
    pub sqlstate: Option<String>,
}

impl Cause {
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Cause {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        let mut last = e.to_string();
        while let Some(err) = cur {
            if let Some(db) = err.downcast_ref::<tokio_postgres::error::DbError>() {
                let code = db.code().code();
                // Class 28: invalid authorization (wrong password, no
                // pg_hba.conf entry, role cannot log in).
                let kind = if code.starts_with("28") {
                    CauseKind::Authentication
                } else {
                    CauseKind::Server
                };
                return Cause {
                    kind,
                    detail: format!("{} (SQLSTATE {code})", db.message()),
                    sqlstate: Some(code.to_string()),
                };
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                let kind = match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => CauseKind::Refused,
                    std::io::ErrorKind::TimedOut => CauseKind::TimedOut,
                    _ => CauseKind::Other,
                };
                return Cause {
                    kind,
                    detail: io.to_string(),
                    sqlstate: None,
                };
            }
            if let Some(deadpool_postgres::PoolError::Timeout(t)) =
                err.downcast_ref::<deadpool_postgres::PoolError>()
            {
                return Cause {
                    kind: CauseKind::TimedOut,
                    detail: format!("no connection within the timeout ({t:?})"),
                    sqlstate: None,
                };
            }
            last = err.to_string();
            cur = err.source();
        }
        let kind = if last.contains("TLS") || last.contains("tls") || last.contains("certificate") {
            CauseKind::Tls
        } else if last.contains("timeout") || last.contains("timed out") {
            CauseKind::TimedOut
        } else {
            CauseKind::Other
        };
        Cause {
            kind,
            detail: last,
            sqlstate: None,
        }
    }
}

/// Statements of one leased user, replayed in a transaction the caller
/// rolls back: how `check` proves the admin may grant what a role grants,
/// and how a failed issue finds the statement the database refused.
pub struct DryRun {
    pub create: String,
    pub owner: Option<String>,
    pub grants: Vec<String>,
}

/// Which statement of a [`DryRun`] failed, with the server's words.
#[derive(Debug, Clone)]
pub struct DryRunFailure {
    pub step: DryRunStep,
    pub message: String,
    pub sqlstate: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DryRunStep {
    Begin,
    Create,
    Owner,
    /// The n-th (0-based) of the role's `grants`.
    Grant(usize),
}

impl DryRun {
    /// Runs BEGIN and every statement; stops at the first refusal. Leaves
    /// the transaction open either way: the caller rolls it back.
    pub async fn run(&self, client: &tokio_postgres::Client) -> Result<(), DryRunFailure> {
        let fail = |step: DryRunStep, e: tokio_postgres::Error| {
            let (message, sqlstate) = match e.as_db_error() {
                Some(db) => (db.message().to_string(), db.code().code().to_string()),
                None => (Cause::of(&e).detail, String::new()),
            };
            DryRunFailure {
                step,
                message,
                sqlstate,
            }
        };
        // The ACL lock too: a throwaway GRANT rewrites the same ACL rows a
        // live broker's GRANT does.
        client
            .batch_execute(&format!("BEGIN; {ACL_LOCK}"))
            .await
            .map_err(|e| fail(DryRunStep::Begin, e))?;
        client
            .batch_execute(&self.create)
            .await
            .map_err(|e| fail(DryRunStep::Create, e))?;
        if let Some(owner) = &self.owner {
            client
                .batch_execute(owner)
                .await
                .map_err(|e| fail(DryRunStep::Owner, e))?;
        }
        for (i, g) in self.grants.iter().enumerate() {
            client
                .batch_execute(g)
                .await
                .map_err(|e| fail(DryRunStep::Grant(i), e))?;
        }
        Ok(())
    }
}

impl DryRunFailure {
    /// "GRANT statement 1 of 2 (\"GRANT SELECT …\"): permission denied …".
    /// Quotes the operator's template, never a rendered statement.
    pub fn describe(&self, templates: &[String]) -> String {
        let code = if self.sqlstate.is_empty() {
            String::new()
        } else {
            format!(" (SQLSTATE {})", self.sqlstate)
        };
        let what = match self.step {
            DryRunStep::Begin => "begin".to_string(),
            DryRunStep::Create => "CREATE ROLE".to_string(),
            DryRunStep::Owner => "GRANT of the role's owner".to_string(),
            DryRunStep::Grant(i) => format!(
                "GRANT statement {} of {} ({:?})",
                i + 1,
                templates.len(),
                templates.get(i).map(String::as_str).unwrap_or("")
            ),
        };
        format!("{what}: {}{code}", self.message)
    }
}

/// What `credbroker check` learns from one PostgreSQL database: findings,
/// and the users that carry the broker's prefix (the caller asks the
/// store which of them it knows).
pub async fn check(
    db: &DatabaseConfig,
    roles: &[&crate::config::RoleConfig],
    prefix: &str,
) -> (Vec<Finding>, Vec<String>) {
    let scope = format!("database {}", db.name);
    let mut out = Vec::new();
    // TLS parameters as the broker reads them (tokio-postgres rejects most).
    let parsed = dbtls::split_url(&db.admin_url, Dialect::Postgres).and_then(|(url, params)| {
        let cfg: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
        Ok((cfg, dbtls::postgres_connector(&params)?, params))
    });
    let (mut cfg, (tls, ssl_mode), tls_params) = match parsed {
        Ok(c) => c,
        Err(e) => {
            out.push(Finding::error(
                &scope,
                format!("admin_url: {e}"),
                "fix admin_url",
            ));
            return (out, Vec::new());
        }
    };
    cfg.ssl_mode(ssl_mode);
    cfg.connect_timeout(db.connect_timeout);
    cfg.application_name("credbroker check");
    let at = location(&cfg);
    let admin = cfg.get_user().unwrap_or("?").to_string();
    match read_admin_password(db) {
        Ok(Some(p)) => {
            cfg.password(p.expose());
        }
        Ok(None) => {}
        Err(e) => {
            out.push(Finding::error(
                &scope,
                e.to_string(),
                "create the password file (mode 0600) or set the variable the config names",
            ));
            return (out, Vec::new());
        }
    }
    let client = match cfg.connect(tls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client
        }
        Err(e) if dbtls::tls_failure(&e).is_some() => {
            let why = dbtls::tls_failure(&e).unwrap_or_default();
            out.push(Finding::error(
                &scope,
                format!("TLS to {at} failed ({tls_params}): {why}"),
                "point sslrootcert at the CA that signed the server's certificate, and use the \
                 host name in it (admin_url)",
            ));
            return (out, Vec::new());
        }
        Err(e) => {
            let cause = Cause::of(&e);
            let fix = match cause.kind {
                CauseKind::Refused => {
                    format!(
                        "is PostgreSQL running and listening at {}? (admin_url)",
                        host_port(&cfg)
                    )
                }
                CauseKind::TimedOut => {
                    "the host does not answer: check admin_url's host and port, and any firewall"
                        .to_string()
                }
                CauseKind::Authentication => format!(
                    "make the password in admin_password_file/env the one of role {admin:?} \
                     (ALTER ROLE {admin} PASSWORD '…') and let pg_hba.conf admit it"
                ),
                _ => "check admin_url and the server's log".to_string(),
            };
            out.push(Finding::error(
                &scope,
                format!(
                    "cannot connect: {} as {at}: {}",
                    cause.kind.as_str(),
                    cause.detail
                ),
                fix,
            ));
            return (out, Vec::new());
        }
    };
    let row = match client
        .query_one(
            "SELECT rolsuper, rolcreaterole, pg_has_role(current_user, 'pg_signal_backend', 'MEMBER'), \
             current_setting('server_version') FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            out.push(Finding::error(&scope, format!("cannot read the admin's privileges: {}", Cause::of(&e).detail), "check the server's log"));
            return (out, Vec::new());
        }
    };
    let (superuser, createrole, signal, version): (bool, bool, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    out.push(Finding::ok(
        &scope,
        format!(
            "connected as {at} (PostgreSQL {version}{})",
            if superuser { ", superuser" } else { "" }
        ),
    ));
    if !superuser && !createrole {
        out.push(Finding::error(
            &scope,
            format!("admin role {admin:?} lacks CREATEROLE: every issue will fail"),
            format!("ALTER ROLE {} CREATEROLE", escape_identifier(&admin)),
        ));
    }
    if !superuser && !signal {
        out.push(Finding::error(
            &scope,
            format!("admin role {admin:?} is not a member of pg_signal_backend: revocation cannot end live sessions"),
            format!("GRANT pg_signal_backend TO {}", escape_identifier(&admin)),
        ));
    }
    for role in roles {
        let rscope = format!("role {}", role.name);
        if let Some(owner) = &role.owner {
            let found = client
                .query_opt(
                    "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = $1",
                    &[owner],
                )
                .await;
            match found {
                Ok(None) => out.push(Finding::error(
                    &rscope,
                    format!("owner {owner:?} does not exist on database {}", db.name),
                    format!("CREATE ROLE {} NOLOGIN", escape_identifier(owner)),
                )),
                Ok(Some(r)) if !superuser && !r.get::<_, bool>(0) => out.push(Finding::error(
                    &rscope,
                    format!("admin role {admin:?} is not a member of owner {owner:?}: revocation cannot hand over what a lease created"),
                    format!("GRANT {} TO {} WITH ADMIN OPTION", escape_identifier(owner), escape_identifier(&admin)),
                )),
                Ok(Some(_)) => {}
                Err(e) => out.push(Finding::error(&rscope, format!("cannot look up owner {owner:?}: {}", Cause::of(&e).detail), "check the server's log")),
            }
        }
        // A name that is not broker-shaped, so no sweep could ever take it
        // for a lease; it never outlives the rolled-back transaction.
        let ident = escape_identifier(&format!("credbroker_check_{:016x}", rand::random::<u64>()));
        let plan = DryRun {
            create: format!("CREATE ROLE {ident} NOLOGIN"),
            owner: role
                .owner
                .as_ref()
                .map(|o| format!("GRANT {} TO {ident}", escape_identifier(o))),
            grants: role
                .grants
                .iter()
                .map(|g| render_grant(g, &ident))
                .collect(),
        };
        let result = plan.run(&client).await;
        let _ = client.batch_execute("ROLLBACK").await;
        match result {
            Ok(()) => out.push(Finding::ok(
                &rscope,
                format!(
                    "dry run of CREATE ROLE and {} grant(s) passed (rolled back)",
                    role.grants.len()
                ),
            )),
            Err(f) => {
                let fix = match f.step {
                    DryRunStep::Grant(_) if f.sqlstate == "42501" => format!(
                        "the admin can only grant what it holds WITH GRANT OPTION (or owns): grant it to {admin:?} \
                         WITH GRANT OPTION, or change the role's grants"
                    ),
                    DryRunStep::Create => format!("ALTER ROLE {} CREATEROLE", escape_identifier(&admin)),
                    _ => "fix the statement in the role's grants".to_string(),
                };
                out.push(Finding::error(
                    &rscope,
                    format!("dry run failed at {}", f.describe(&role.grants)),
                    fix,
                ));
            }
        }
    }
    let pattern = format!(
        "{}%",
        prefix
            .replace('\\', "\\\\")
            .replace('_', "\\_")
            .replace('%', "\\%")
    );
    let prefixed = match client
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1",
            &[&pattern],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get::<_, String>(0)).collect(),
        Err(e) => {
            out.push(Finding::error(
                &scope,
                format!("cannot list roles: {}", Cause::of(&e).detail),
                "check the server's log",
            ));
            Vec::new()
        }
    };
    (out, prefixed)
}

impl PostgresBackend {
    /// Shared creation rounds that committed, and how many creations they
    /// carried between them (what the tests and the bench read).
    /// Every creation alone, as one lease would send it without a broker
    /// in front (the bench's (b′)).
    pub fn without_shared_rounds(mut self) -> Self {
        self.share_creates = false;
        self
    }

    pub fn shared_creates(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.creates.committed.load(Relaxed),
            self.creates.carried.load(Relaxed),
        )
    }

    /// Queues `sql` for the next shared round; true once it committed with
    /// it, false when the caller must run it alone. The round runs in a
    /// task of its own: a caller that goes away cannot cancel the others'.
    async fn create_in_shared_round(&self, sql: String) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.creates
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((sql, tx));
        let rounds = self.creates.clone();
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner()).clone();
        tokio::spawn(async move {
            let _round = rounds.running.lock().await;
            let batch: Vec<_> = {
                let mut q = rounds.queue.lock().unwrap_or_else(|p| p.into_inner());
                let n = q.len().min(MAX_CREATE_ROUND);
                q.drain(..n).collect()
            };
            // Empty: a round that started after we queued took ours too.
            if batch.is_empty() {
                return;
            }
            let (sqls, waiters): (Vec<String>, Vec<_>) = batch.into_iter().unzip();
            let committed = match pool.get().await {
                Ok(client) => {
                    let all = crate::steps::timed(
                        "statement: shared create round",
                        client.batch_execute(&sqls.join("\n")),
                    )
                    .await;
                    all.is_ok()
                }
                Err(_) => false,
            };
            if committed {
                use std::sync::atomic::Ordering::Relaxed;
                rounds.committed.fetch_add(1, Relaxed);
                rounds.carried.fetch_add(waiters.len() as u64, Relaxed);
            }
            for tx in waiters {
                let _ = tx.send(committed);
            }
        });
        rx.await.unwrap_or(false)
    }

    async fn create_alone(&self, sql: &str, user: &NewUser<'_>) -> Result<()> {
        let client = self.client().await?;
        // One simple-query message without BEGIN runs as one implicit
        // transaction: any failing grant rolls the role back with it, and the
        // pooled connection is left clean.
        match self.batch_retrying(&client, sql, "create role").await {
            // A refusal: say which statement, not only the server's words.
            // The batch's error stays the source (`db_error` dropped it if
            // it could quote the verifier).
            Err(Error::Internal(m)) => match self.failing_statement(&client, user).await {
                Some(stmt) => Err(Error::Internal(m.map_message(|_| {
                    format!(
                        "database {:?}: create role for role {:?}: {stmt} as {}",
                        self.config.name,
                        user.role,
                        self.admin_location()
                    )
                }))),
                None => Err(Error::Internal(m)),
            },
            other => other,
        }
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Postgres
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn create_user(&self, user: &NewUser<'_>) -> Result<()> {
        let ident = escape_identifier(user.username.as_str());
        let verifier = scram::verifier(user.password, self.config.scram_iterations);
        // Membership grants (`GRANT reader TO …`) add rows and never
        // collide; only privileges on objects rewrite a shared ACL.
        let lock = if user.grants.iter().any(|g| rewrites_an_acl(g)) {
            format!("{ACL_LOCK};\n")
        } else {
            String::new()
        };
        let mut sql = format!(
            "{lock}CREATE ROLE {ident} LOGIN PASSWORD {} VALID UNTIL {};",
            escape_literal(&verifier),
            pg_timestamp(user.valid_until)
        );
        if let Some(owner) = user.owner {
            // Membership, so the lease can `SET ROLE owner` and create
            // objects that belong to the owner from the start.
            sql.push_str(&format!("\nGRANT {} TO {ident};", escape_identifier(owner)));
        }
        for g in user.grants {
            sql.push('\n');
            sql.push_str(&render_grant(g, &ident));
            sql.push(';');
        }
        if !self.share_creates {
            return self.create_alone(&sql, user).await;
        }
        // Nobody else is creating: no round to share, so no hop to one.
        let alone = self.creates.running.try_lock().ok().filter(|_| {
            self.creates
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        });
        let suspect = || {
            self.creates
                .suspect
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(user.role)
        };
        let result = match alone {
            Some(_lane) => self.create_alone(&sql, user).await,
            None if suspect() => self.create_alone(&sql, user).await,
            None if self.create_in_shared_round(sql.clone()).await => return Ok(()),
            None => self.create_alone(&sql, user).await,
        };
        let mut suspects = self
            .creates
            .suspect
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match &result {
            Err(Error::Unavailable(_)) => {}
            Err(_) => {
                suspects.insert(user.role.to_string());
            }
            Ok(()) => {
                suspects.remove(user.role);
            }
        }
        result
    }

    async fn extend(&self, user: &UserRef, valid_until: DateTime<Utc>) -> Result<()> {
        let client = self.client().await?;
        let sql = format!(
            "ALTER ROLE {} VALID UNTIL {}",
            escape_identifier(user.username.as_str()),
            pg_timestamp(valid_until)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| self.db_error("extend role", e))
    }

    async fn revoke(&self, revokees: &[Revokee]) -> Result<Vec<Reassigned>> {
        if revokees.is_empty() {
            return Ok(Vec::new());
        }
        let revokees: Vec<&Revokee> = revokees.iter().collect();
        let client = self.client().await?;
        let fast = self.revoke_fast(&client, &revokees);
        match crate::steps::timed("statement: revoke in one round trip", fast).await {
            Ok(r) => Ok(r),
            // A role already gone, something owned in another database, a
            // lost catalog race: nothing was dropped; look, then act.
            Err(e) => {
                tracing::debug!(error = %crate::error::chain(&e), "one-round-trip revocation declined; checking first");
                let checked = self.revoke_checked(&client, &revokees);
                crate::steps::timed("statement: revoke, looking first", checked).await
            }
        }
    }

    async fn disable(&self, users: &[UserRef]) -> Result<()> {
        let names: Vec<&str> = users.iter().map(|u| u.username.as_str()).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)",
                &[&names],
            )
            .await
            .map_err(|e| self.db_error("look up roles", e))?;
        let existing: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if existing.is_empty() {
            return Ok(());
        }
        let nologin = nologin_sql(&existing);
        client
            .batch_execute(&nologin)
            .await
            .map_err(|e| self.db_error("disable login", e))?;
        client
            .query(TERMINATE_BY_NAME, &[&existing])
            .await
            .map_err(|e| self.db_error("terminate sessions", e))?;
        let still: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1) AND rolcanlogin",
                &[&existing],
            )
            .await
            .map_err(|e| self.db_error("check login disabled", e))?
            .get(0);
        if still > 0 {
            return Err(Error::internal(format!(
                "database {:?}: {still} role(s) can still log in after NOLOGIN",
                self.config.name
            )));
        }
        Ok(())
    }

    async fn list_broker_users(&self, prefix: &str) -> Result<Vec<UserRef>> {
        let client = self.client().await?;
        let pattern = format!(
            "{}%",
            prefix
                .replace('\\', "\\\\")
                .replace('_', "\\_")
                .replace('%', "\\%")
        );
        let rows = client
            .query(
                "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1",
                &[&pattern],
            )
            .await
            .map_err(|e| self.db_error("list roles", e))?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|n| Username::is_broker_made(prefix, n))
            .map(|n| UserRef {
                username: Username::from_store(n),
                host: String::new(),
            })
            .collect())
    }

    async fn rotate_root(&self) -> Result<()> {
        let password = Password::generate();
        let verifier = scram::verifier(&password, self.config.scram_iterations.max(4096));
        stage_admin_password(&self.config, &password)?;
        let client = self.client().await?;
        client
            .batch_execute(&format!(
                "ALTER ROLE CURRENT_USER PASSWORD {}",
                escape_literal(&verifier)
            ))
            .await
            .map_err(|e| self.db_error("rotate admin password", e))?;
        drop(client);
        // The database has the new password now: keep it before anything
        // else can fail, or nobody would know it.
        store_admin_password(&self.config, &password)?;
        let pool = Self::build_pool(&self.config, &self.base, &self.tls, Some(password))?;
        *self.pool.write().unwrap_or_else(|p| p.into_inner()) = pool;
        Ok(())
    }

    async fn check_tls(&self) -> Result<()> {
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner()).clone();
        match pool.get().await {
            Err(deadpool_postgres::PoolError::Backend(e)) => match dbtls::tls_failure(&e) {
                Some(why) => Err(Error::config(format!(
                    "database {:?}: TLS to {} failed ({}): {why}",
                    self.config.name, self.admin_addr, self.tls_params
                ))),
                None => Ok(()),
            },
            // Connected (the connection stays pooled for preflight), or a
            // failure that is not about TLS.
            _ => Ok(()),
        }
    }

    async fn preflight(&self) -> Result<Vec<String>> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT rolsuper, rolcreaterole, pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') \
                 FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| self.db_error("check privileges", e))?;
        let (superuser, createrole, signal): (bool, bool, bool) =
            (row.get(0), row.get(1), row.get(2));
        let mut warnings = Vec::new();
        if !superuser && !createrole {
            warnings.push(format!(
                "database {:?}: the admin role lacks CREATEROLE: issuing will fail",
                self.config.name
            ));
        }
        if !superuser && !signal {
            warnings.push(format!(
                "database {:?}: the admin role is not in pg_signal_backend: revocation cannot end live sessions",
                self.config.name
            ));
        }
        Ok(warnings)
    }

    fn pool_state(&self) -> PoolState {
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner());
        let s = pool.status();
        PoolState {
            size: s.size,
            available: s.available,
            max_size: s.max_size,
        }
    }

    async fn static_create(&self, spec: &StaticUsers<'_>) -> Result<()> {
        let owner = escape_identifier(spec.owner);
        let mut sql = String::new();
        for u in spec.users {
            let ident = escape_identifier(u);
            // Names are validated (letters, digits, _) and quoted; the DO
            // block makes CREATE ROLE idempotent. Membership of the owner,
            // as for a role's leased users: `SET ROLE owner` makes what
            // the session creates belong to the owner (migration tools).
            sql.push_str(&format!(
                "DO $credbroker$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) \
                 THEN CREATE ROLE {ident} NOLOGIN; END IF; END $credbroker$;\n\
                 GRANT {owner} TO {ident};\n",
                escape_literal(u),
            ));
            for g in spec.grants {
                sql.push_str(&render_grant(g, &ident));
                sql.push_str(";\n");
            }
        }
        let lock = if spec.grants.iter().any(|g| rewrites_an_acl(g)) {
            format!("{ACL_LOCK};\n")
        } else {
            String::new()
        };
        let client = self.client().await?;
        self.batch_retrying(&client, &format!("{lock}{sql}"), "create static users")
            .await
            .map_err(|e| match e {
                Error::Internal(m) => {
                    Error::Internal(m.map_message(|m| format!("static role {:?}: {m}", spec.role)))
                }
                other => other,
            })
    }

    async fn static_set_password(&self, login: &StaticLogin<'_>) -> Result<()> {
        let verifier = scram::verifier(login.password, self.config.scram_iterations);
        let sql = format!(
            "ALTER ROLE {} WITH LOGIN PASSWORD {} VALID UNTIL {}",
            escape_identifier(login.user),
            escape_literal(&verifier),
            pg_timestamp(login.valid_until)
        );
        let client = self.client().await?;
        client.batch_execute(&sql).await.map_err(|e| {
            match self.db_error("set static password", e) {
                Error::Internal(m) => {
                    Error::Internal(m.map_message(|m| format!("static role {:?}: {m}", login.role)))
                }
                other => other,
            }
        })
    }

    async fn static_retire(&self, user: &str, _host: &str, end_sessions: bool) -> Result<()> {
        // A verifier of a random password that is dropped at once: nobody
        // can ever know it, and NOLOGIN refuses even that.
        let unknown = scram::verifier(&Password::generate(), 1);
        let sql = format!(
            "ALTER ROLE {} WITH NOLOGIN PASSWORD {} VALID UNTIL {}",
            escape_identifier(user),
            escape_literal(&unknown),
            pg_timestamp(Utc::now())
        );
        let client = self.client().await?;
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| self.db_error("retire static user", e))?;
        if end_sessions {
            let names = vec![user.to_string()];
            client
                .query(TERMINATE_BY_NAME, &[&names])
                .await
                .map_err(|e| self.db_error("terminate sessions", e))?;
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
        let tls = dbtls::client_query(
            Dialect::Postgres,
            self.config.client_sslmode,
            self.config.client_sslrootcert.as_deref(),
        );
        match password {
            Some(p) => format!(
                "postgresql://{username}:{}@{host}:{}/{}{tls}",
                p.expose(),
                e.port,
                e.database
            ),
            None => format!(
                "postgresql://{username}@{host}:{}/{}{tls}",
                e.port, e.database
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rewrites_an_acl;
    use crate::config::{DatabaseConfig, SecretSource};
    use crate::error::Error;
    use std::time::Duration;

    fn refused_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn backend(port: u16) -> super::PostgresBackend {
        super::PostgresBackend::new(&DatabaseConfig {
            name: "orders".into(),
            kind: crate::lease::BackendKind::Postgres,
            admin_url: format!("postgres://admin@127.0.0.1:{port}/orders"),
            admin_password: SecretSource::None,
            client_host: None,
            client_port: None,
            client_sslmode: None,
            client_sslrootcert: None,
            max_connections: 1,
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(2),
            scram_iterations: 1,
        })
        .unwrap()
    }

    /// Both boundaries of the backend keep the driver's error: the pool's
    /// (`client`) and tokio-postgres's (`db_error` without a server answer).
    #[tokio::test]
    async fn connection_errors_keep_their_source() {
        let port = refused_port();
        let b = backend(port);
        let e = b.client().await.expect_err("refused");
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("connection refused"), "{e}");
        let src = std::error::Error::source(&e).expect("source");
        assert!(
            src.downcast_ref::<deadpool_postgres::PoolError>().is_some(),
            "{src:?}"
        );

        let pg = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=a connect_timeout=2"),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("refused");
        let e = b.db_error("create role", pg);
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        let src = std::error::Error::source(&e).expect("source");
        assert!(src.downcast_ref::<tokio_postgres::Error>().is_some());
        // The log line says why, once.
        let line = crate::error::chain(&e).to_string();
        assert_eq!(line.matches("Connection refused").count(), 1, "{line}");
    }

    #[test]
    fn a_syntax_error_is_not_kept_as_a_source() {
        use tokio_postgres::error::SqlState;
        assert!(super::may_quote_statement(&SqlState::SYNTAX_ERROR));
        assert!(!super::may_quote_statement(&SqlState::DUPLICATE_OBJECT));
        assert!(!super::may_quote_statement(
            &SqlState::INSUFFICIENT_PRIVILEGE
        ));
    }

    #[test]
    fn only_object_privileges_take_the_acl_lock() {
        assert!(rewrites_an_acl("GRANT SELECT ON orders TO {{name}}"));
        assert!(rewrites_an_acl("grant usage\non schema app to {{name}}"));
        assert!(rewrites_an_acl("ALTER ROLE {{name}} SET search_path = app"));
        assert!(!rewrites_an_acl("GRANT app_reader TO {{name}}"));
        assert!(!rewrites_an_acl("grant a, b to {{name}}"));
    }
}
