//! The shared lease store: one PostgreSQL database behind several broker
//! replicas, so any replica can serve any request and the reaper work is
//! split between them by claims, not by electing a leader.
//!
//! - The broker creates and migrates its own schema: numbered migrations,
//!   recorded in `credbroker_schema_migrations`, applied in one transaction
//!   under an advisory lock so replicas starting together do not race.
//! - Reapers claim due rows with `FOR UPDATE SKIP LOCKED`: two replicas
//!   asking at once get disjoint batches instead of waiting on each other.
//! - A claim carries an expiry on the *database's* clock, so clock skew
//!   between replicas cannot make one take over another's claim early; a
//!   replica that dies mid-revocation leaves its claims to the others once
//!   they run out.
//! - Start-up touches nothing: other replicas may be creating the users of
//!   pending intents right now, and their claims are theirs.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::config::SecretSource;
use crate::dbtls::{self, Dialect};
use crate::error::{Error, Result};
use crate::lease::{BackendKind, Lease, LeaseId, LeaseState, Username};
use crate::lock::{Lock, LockId, LockTarget, NewLock};
use crate::store::StaticState;
use crate::store::{cap_reached, Claim, FailureRecord, LeaseFilter, LeaseStore, VaultToken};

/// The WHERE condition of a [`LeaseFilter`] and its arguments, shared by
/// `list` and `count` so a page and its total never disagree.
fn filter_sql(f: &LeaseFilter) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
    let mut sql = String::from("true");
    let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut push = |sql: &mut String, cond: &str, v: Box<dyn ToSql + Sync + Send>| {
        args.push(v);
        sql.push_str(&format!(" AND {cond} ${}", args.len()));
    };
    if let Some(r) = &f.role {
        push(&mut sql, "role =", Box::new(r.clone()));
    }
    if let Some(d) = &f.database {
        push(&mut sql, "database =", Box::new(d.clone()));
    }
    if let Some(i) = &f.identity {
        push(&mut sql, "identity =", Box::new(i.clone()));
    }
    if let Some(t) = f.expiring_before {
        push(&mut sql, "expires_at <=", Box::new(t));
    }
    if f.states.is_empty() {
        sql.push_str(" AND state <> 'revoked'");
    } else {
        let states: Vec<String> = f.states.iter().map(|s| s.as_str().to_string()).collect();
        push(&mut sql, "state = ANY(", Box::new(states));
        sql.push(')');
        // Implied, but spelled out so the partial indexes on live rows apply.
        if !f.states.contains(&LeaseState::Revoked) {
            sql.push_str(" AND state <> 'revoked'");
        }
    }
    (sql, args)
}

/// `pg_advisory_xact_lock` key held while migrating ("credbrkr").
const MIGRATION_LOCK: i64 = 0x6372_6564_6272_6b72;

/// Append-only: a released migration is never edited, only followed.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "lease table",
        "CREATE TABLE credbroker_leases (
        id              text PRIMARY KEY,
        role            text NOT NULL,
        database        text NOT NULL,
        kind            text NOT NULL,
        username        text NOT NULL,
        user_host       text NOT NULL DEFAULT '',
        identity        text NOT NULL,
        state           text NOT NULL CHECK (state IN ('pending', 'active', 'failing', 'revoked')),
        issued_at       timestamptz NOT NULL,
        expires_at      timestamptz NOT NULL,
        max_expires_at  timestamptz NOT NULL,
        due_at          timestamptz NOT NULL,
        revoked_at      timestamptz,
        revoke_attempts integer NOT NULL DEFAULT 0,
        last_error      text,
        claimed_by      text,
        claim_until     timestamptz
    );
    CREATE UNIQUE INDEX credbroker_leases_username ON credbroker_leases (database, username);
    -- The reaper's question, 'what is due next', reads only live rows.
    CREATE INDEX credbroker_leases_live_due ON credbroker_leases (due_at) WHERE state <> 'revoked';
    CREATE INDEX credbroker_leases_live_identity ON credbroker_leases (identity, role)
        WHERE state <> 'revoked';",
    ),
    // The pruner's question, 'which revoked rows are old', without reading
    // the live ones or the whole table. A plain (not CONCURRENTLY) build:
    // migrations run in one transaction; it holds up writes for as long as
    // reading the table once takes.
    (
        2,
        "revoked_at index for pruning",
        "CREATE INDEX credbroker_leases_revoked_at ON credbroker_leases (revoked_at)
            WHERE state = 'revoked';",
    ),
    // Admin locks, read by every replica on every issue and renew; a small
    // table. Times are the store's (clock_timestamp()), so replicas agree
    // on when a lock ends whatever their own clocks say.
    (
        3,
        "admin locks",
        "CREATE TABLE credbroker_locks (
            id         text PRIMARY KEY,
            kind       text NOT NULL CHECK (kind IN ('identity', 'role', 'database')),
            value      text NOT NULL,
            reason     text NOT NULL,
            created_by text NOT NULL,
            created_at timestamptz NOT NULL,
            expires_at timestamptz
        );",
    ),
    // Static roles: one row per role with its current user and sealed
    // password, the previous user until its overlap ends, and the pending
    // rotation written before the database hears of it. Claimed like
    // leases (store clock), so one replica rotates a role per period.
    (
        4,
        "static roles",
        "CREATE TABLE credbroker_static_roles (
            role                text PRIMARY KEY,
            generation          bigint NOT NULL DEFAULT 0,
            current_name        text,
            current_sealed      text,
            rotated_at          timestamptz,
            valid_until         timestamptz,
            next_rotation_at    timestamptz,
            previous_name       text,
            retire_at           timestamptz,
            pending_kind        text CHECK (pending_kind IN ('rotate', 'revoke')),
            pending_name        text,
            pending_sealed      text,
            pending_generation  bigint,
            pending_valid_until timestamptz,
            last_error          text,
            claimed_by          text,
            claim_until         timestamptz
        );",
    ),
    // Tokens of the Vault-compatible API, by the SHA-256 of the token
    // (never the token), shared by replicas like the leases; and which
    // leases each token created, so revoking a token revokes them. No
    // foreign key to the lease table: pruning leases must not touch links.
    (
        5,
        "vault api tokens",
        "CREATE TABLE credbroker_vault_tokens (
            hash        text PRIMARY KEY,
            accessor    text NOT NULL UNIQUE,
            identity    text NOT NULL,
            cert_sha256 text NOT NULL,
            issued_at   timestamptz NOT NULL,
            expires_at  timestamptz NOT NULL
        );
        CREATE INDEX credbroker_vault_tokens_expires_at ON credbroker_vault_tokens (expires_at);
        CREATE TABLE credbroker_vault_token_leases (
            accessor text NOT NULL,
            lease_id text NOT NULL,
            PRIMARY KEY (accessor, lease_id)
        );",
    ),
    // The console's questions: 'the live leases by expiry, one page at a
    // time' walks the first index instead of sorting every live row; 'how
    // many per database and state' (the overview, /metrics) the second.
    (
        6,
        "live leases by expiry and by (role, database, state), for the console",
        "CREATE INDEX credbroker_leases_live_expiry ON credbroker_leases (expires_at, id)
            WHERE state <> 'revoked';
        CREATE INDEX credbroker_leases_live_counts ON credbroker_leases (role, database, state)
            WHERE state <> 'revoked';",
    ),
    // At a million live leases. The orphan sweep's question, 'which of
    // these users has a live lease', by user name across every database:
    // the unique index leads with the database, so `username = ANY($1)`
    // read every live row. And a role's or a database's live leases
    // by expiry (`admin leases --role/--database`), one page without
    // sorting all of them.
    (
        7,
        "live leases by user name (orphan sweep) and by role and database in expiry order",
        "CREATE INDEX credbroker_leases_live_username ON credbroker_leases (username)
            WHERE state <> 'revoked';
        CREATE INDEX credbroker_leases_live_role_expiry ON credbroker_leases (role, expires_at, id)
            WHERE state <> 'revoked';
        CREATE INDEX credbroker_leases_live_database_expiry
            ON credbroker_leases (database, expires_at, id) WHERE state <> 'revoked';",
    ),
    // A login's question, 'which tokens does this identity hold' (the
    // cap, `max_tokens_per_identity`), without reading every identity's.
    (
        8,
        "vault api tokens by identity",
        "CREATE INDEX credbroker_vault_tokens_identity
            ON credbroker_vault_tokens (identity, expires_at);",
    ),
    (
        9,
        "locks on static roles",
        "ALTER TABLE credbroker_locks DROP CONSTRAINT IF EXISTS credbroker_locks_kind_check;
         ALTER TABLE credbroker_locks ADD CONSTRAINT credbroker_locks_kind_check
            CHECK (kind IN ('identity', 'role', 'static_role', 'database'));",
    ),
    // A routine handover's lease drains before it is revoked
    // (`revocation::drain`): a live state of its own, so listings, metrics
    // and the reaper see it.
    (
        10,
        "draining leases",
        "ALTER TABLE credbroker_leases DROP CONSTRAINT IF EXISTS credbroker_leases_state_check;
         ALTER TABLE credbroker_leases ADD CONSTRAINT credbroker_leases_state_check
            CHECK (state IN ('pending', 'active', 'draining', 'failing', 'revoked'));",
    ),
];

const STATIC_COLUMNS: &str =
    "role, generation, current_name, current_sealed, rotated_at, valid_until, \
     next_rotation_at, previous_name, retire_at, pending_kind, pending_name, pending_sealed, \
     pending_generation, pending_valid_until, last_error";

fn row_to_static(row: &Row) -> Result<StaticState> {
    use crate::store::static_state::{CurrentUser, Pending, PendingKind, PreviousUser};
    let bad = |e: tokio_postgres::Error| Error::internal(format!("static role row: {e}"));
    let text = |i: usize| row.try_get::<_, Option<String>>(i).map_err(bad);
    let time = |i: usize| row.try_get::<_, Option<DateTime<Utc>>>(i).map_err(bad);
    let current = match (text(2)?, text(3)?) {
        (Some(user), Some(sealed)) => Some(CurrentUser {
            user,
            sealed,
            rotated_at: time(4)?.unwrap_or_default(),
            valid_until: time(5)?.unwrap_or_default(),
        }),
        _ => None,
    };
    let previous = match (text(7)?, time(8)?) {
        (Some(user), Some(retire_at)) => Some(PreviousUser { user, retire_at }),
        _ => None,
    };
    let pending = match (
        text(9)?.as_deref().and_then(PendingKind::parse),
        text(10)?,
        text(11)?,
    ) {
        (Some(kind), Some(user), Some(sealed)) => Some(Pending {
            kind,
            user,
            sealed,
            generation: row.try_get::<_, Option<i64>>(12).map_err(bad)?.unwrap_or(0) as u64,
            valid_until: time(13)?.unwrap_or_default(),
        }),
        _ => None,
    };
    Ok(StaticState {
        role: row.try_get(0).map_err(bad)?,
        generation: row.try_get::<_, i64>(1).map_err(bad)? as u64,
        current,
        next_rotation_at: time(6)?,
        previous,
        pending,
        last_error: text(14)?,
    })
}

const VAULT_TOKEN_COLUMNS: &str = "hash, accessor, identity, cert_sha256, issued_at, expires_at";

/// First key of the `pg_advisory_xact_lock(int4, int4)` a login holds
/// per identity ("vtok"; the second key is the identity's hash).
const VAULT_TOKEN_LOCK: i32 = 0x7674_6f6b;

/// The newest schema this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

const COLUMNS: &str = "id, role, database, kind, username, user_host, identity, state, issued_at, \
                       expires_at, max_expires_at, due_at, revoked_at, revoke_attempts, last_error";

const INSERT_INTENT: &str =
    "INSERT INTO credbroker_leases (id, role, database, kind, username, user_host, identity, \
     state, issued_at, expires_at, max_expires_at, due_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

const RECORD_FAILURE: &str = "UPDATE credbroker_leases SET revoke_attempts = revoke_attempts + 1, \
     last_error = $2, due_at = $3, \
     state = CASE WHEN $4 AND state <> 'revoked' THEN 'failing' ELSE state END, \
     claimed_by = NULL, claim_until = NULL WHERE id = $1";

/// Longest a single store statement may run: past it the request fails as
/// `Unavailable` rather than hanging a caller on a sick store.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_SIZE: usize = 16;

pub struct PostgresStore {
    pool: Pool,
}

/// Connection trouble (the store is down, failing over, restarting) is
/// `Unavailable`; a refusal by a working server, or our own mistake on the
/// client side (a parameter or column of the wrong type, a row count we did
/// not expect), is `Internal`: a store bug is not worth a retry. Neither can
/// hold the password: we send it only in the authentication exchange, and
/// the store's statements carry no secret (no password column; sealed
/// static passwords and token hashes are parameters, which driver errors
/// never quote) — so the driver's error is kept as the source.
fn pg_err(what: &str, e: tokio_postgres::Error) -> Error {
    let (class, msg) = match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            (
                store_class(Some(code), ""),
                format!("lease store: {what}: {} ({code})", db.message()),
            )
        }
        None => {
            let text = e.to_string();
            match store_class(None, &text) {
                StoreClass::Unavailable => (
                    StoreClass::Unavailable,
                    format!("lease store unreachable: {what}: {e}"),
                ),
                StoreClass::Internal => (StoreClass::Internal, format!("lease store: {what}: {e}")),
            }
        }
    };
    match class {
        StoreClass::Unavailable => Error::unavailable_from(msg, e),
        StoreClass::Internal => Error::internal_from(msg, e),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreClass {
    Unavailable,
    Internal,
}

/// The class of a store error, from its SQLSTATE when the server answered,
/// else from the driver's kind (tokio-postgres keeps it private; its
/// `Display` names it).
fn store_class(sqlstate: Option<&str>, driver_text: &str) -> StoreClass {
    match sqlstate {
        // 08: connection exception, 57: operator intervention (shutdown,
        // cannot connect now), 40: serialization failure or deadlock,
        // 25006: read-only transaction (a standby after failover).
        Some(code) => {
            if code.starts_with("08")
                || code.starts_with("57")
                || code.starts_with("40")
                || code == "25006"
            {
                StoreClass::Unavailable
            } else {
                StoreClass::Internal
            }
        }
        // Our side of a statement: serialising a parameter, reading a
        // column, the number of columns, parameters or rows.
        None if [
            "error serializing parameter",
            "error deserializing column",
            "invalid column",
            "query returned an unexpected number",
            "expected ",
        ]
        .iter()
        .any(|p| driver_text.starts_with(p)) =>
        {
            StoreClass::Internal
        }
        // Connecting, TLS, I/O, a closed connection, a timeout.
        None => StoreClass::Unavailable,
    }
}

/// Every pool failure (no connection within the timeout, a connection
/// that could not be opened or logged into) is `Unavailable`, as before;
/// the pool's error, which holds the driver's, is the source.
fn pool_err(e: deadpool_postgres::PoolError) -> Error {
    Error::unavailable_from(format!("lease store unreachable: {e}"), e)
}

/// A stored value we cannot read back is a corrupt row — a store bug, so
/// `Internal` (not the `InvalidArgument` or `Config` the parser says about
/// a caller's or a config's text); the parser's error is the source.
fn corrupt(e: Error) -> Error {
    Error::internal_from(format!("lease store: corrupt row: {e}"), e)
}

fn row_to_lease(row: &Row) -> Result<Lease> {
    let kind: String = row.get(3);
    let state: String = row.get(7);
    Ok(Lease {
        id: LeaseId::from_store(row.get(0)),
        role: row.get(1),
        database: row.get(2),
        kind: BackendKind::parse(&kind).map_err(corrupt)?,
        username: Username::from_store(row.get(4)),
        user_host: row.get(5),
        identity: row.get(6),
        state: LeaseState::parse(&state).map_err(corrupt)?,
        issued_at: row.get(8),
        expires_at: row.get(9),
        max_expires_at: row.get(10),
        due_at: row.get(11),
        revoked_at: row.get(12),
        revoke_attempts: row.get::<_, i32>(13).max(0) as u32,
        last_error: row.get(14),
    })
}

const LOCK_COLUMNS: &str = "id, kind, value, reason, created_by, created_at, expires_at";

/// A stored lock this build cannot read fails the request (`Internal`)
/// rather than being skipped: skipping would lift a refusal silently.
fn row_to_lock(row: &Row) -> Result<Lock> {
    let id: String = row.get(0);
    let kind: String = row.get(1);
    let value: String = row.get(2);
    let target = LockTarget::from_parts(&kind, &value)
        .map_err(|e| Error::internal(format!("lock {id} cannot be read by this broker: {e}")))?;
    Ok(Lock {
        id: LockId::from_store(id),
        target,
        reason: row.get(3),
        created_by: row.get(4),
        created_at: row.get(5),
        expires_at: row.get(6),
    })
}

fn rows_to_leases(rows: &[Row]) -> Result<Vec<Lease>> {
    rows.iter().map(row_to_lease).collect()
}

/// Milliseconds a claim has left, for `clock_timestamp() + …` on the server.
fn claim_ms(claim: &Claim) -> f64 {
    (claim.until - Utc::now()).num_milliseconds().max(0) as f64
}

impl PostgresStore {
    /// Connects, then creates or migrates the schema. `url` holds no
    /// password (the config refuses one); `password` is where it is kept.
    /// libpq's TLS parameters in `url` are read here (tokio-postgres
    /// knows only some of them); a refused certificate is a `Config` error.
    pub async fn open(url: &str, password: &SecretSource) -> Result<Self> {
        let url_err = |e: &dyn std::fmt::Display| Error::config(format!("store.url: {e}"));
        let (url, tls_params) =
            dbtls::split_url(url, Dialect::Postgres).map_err(|e| url_err(&e))?;
        let mut cfg: tokio_postgres::Config = url.parse().map_err(|e| url_err(&e))?;
        let (tls, ssl_mode) = dbtls::postgres_connector(&tls_params).map_err(|e| url_err(&e))?;
        cfg.ssl_mode(ssl_mode);
        let addr = format!(
            "{}:{}",
            match cfg.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.as_str(),
                _ => "localhost",
            },
            cfg.get_ports().first().copied().unwrap_or(5432)
        );
        if let Some(p) = password.read("store.password")? {
            cfg.password(p.expose());
        }
        cfg.application_name("credbroker-store")
            .connect_timeout(CONNECT_TIMEOUT)
            // A store that vanished behind a failover must be noticed in
            // seconds, not after the kernel's two-hour keepalive default.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .options(format!(
                "-c statement_timeout={} -c lock_timeout={}",
                STATEMENT_TIMEOUT.as_millis(),
                STATEMENT_TIMEOUT.as_millis()
            ));
        let manager = Manager::from_config(
            cfg,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(CONNECT_TIMEOUT + STATEMENT_TIMEOUT),
                create: Some(CONNECT_TIMEOUT),
                recycle: Some(CONNECT_TIMEOUT),
            })
            .build()
            .map_err(|e| Error::config(format!("store.url: {e}")))?;
        if let Err(deadpool_postgres::PoolError::Backend(e)) = pool.get().await {
            if let Some(why) = dbtls::tls_failure(&e) {
                return Err(Error::config(format!(
                    "store.url: TLS to {addr} failed ({tls_params}): {why}"
                )));
            }
        }
        let store = PostgresStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations this database lacks; returns the version.
    pub async fn migrate(&self) -> Result<i32> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_err("begin migration", e))?;
        // Transaction-scoped: released by COMMIT or by the connection dying,
        // so a replica killed mid-migration cannot wedge the others.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| pg_err("migration lock", e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS credbroker_schema_migrations (
                version     integer PRIMARY KEY,
                description text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(|e| pg_err("create migrations table", e))?;
        let current: i32 = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM credbroker_schema_migrations",
                &[],
            )
            .await
            .map_err(|e| pg_err("read schema version", e))?
            .get(0);
        if current > SCHEMA_VERSION {
            return Err(Error::config(format!(
                "lease store has schema version {current}, newer than this broker ({SCHEMA_VERSION}); \
                 upgrade this replica"
            )));
        }
        for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql)
                .await
                .map_err(|e| pg_err(&format!("migration {version}"), e))?;
            tx.execute(
                "INSERT INTO credbroker_schema_migrations (version, description) VALUES ($1, $2)",
                &[version, description],
            )
            .await
            .map_err(|e| pg_err("record migration", e))?;
            tracing::info!(version, description, "lease store migrated");
        }
        tx.commit()
            .await
            .map_err(|e| pg_err("commit migration", e))?;
        Ok(SCHEMA_VERSION)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }

    async fn execute(&self, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(|e| pg_err(what, e))?;
        c.execute(&stmt, params).await.map_err(|e| pg_err(what, e))
    }

    async fn query(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(|e| pg_err(what, e))?;
        c.query(&stmt, params).await.map_err(|e| pg_err(what, e))
    }
}

#[async_trait]
impl LeaseStore for PostgresStore {
    async fn insert_intent(&self, l: &Lease, cap: Option<u32>) -> Result<()> {
        let params: [&(dyn ToSql + Sync); 12] = [
            &l.id.as_str(),
            &l.role,
            &l.database,
            &l.kind.as_str(),
            &l.username.as_str(),
            &l.user_host,
            &l.identity,
            &l.state.as_str(),
            &l.issued_at,
            &l.expires_at,
            &l.max_expires_at,
            &l.due_at,
        ];
        let Some(cap) = cap else {
            return self
                .execute("insert intent", INSERT_INTENT, &params)
                .await
                .map(|_| ());
        };
        let mut c = self.client().await?;
        let tx = c
            .transaction()
            .await
            .map_err(|e| pg_err("insert intent", e))?;
        // Replicas share the table, so the count-then-insert is serialized
        // on the store itself: one transaction-scoped lock per (identity,
        // role), released by COMMIT or by a dead connection. The count is a
        // statement of its own, after the lock: under READ COMMITTED it then
        // sees the previous holder's committed insert.
        let lock = tx
            .prepare_cached("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
            .await
            .map_err(|e| pg_err("intent cap lock", e))?;
        tx.execute(&lock, &[&l.identity, &l.role])
            .await
            .map_err(|e| pg_err("intent cap lock", e))?;
        let count = tx
            .prepare_cached(
                "SELECT count(*) FROM credbroker_leases \
                 WHERE identity = $1 AND role = $2 AND state <> 'revoked'",
            )
            .await
            .map_err(|e| pg_err("count live", e))?;
        let live: i64 = tx
            .query_one(&count, &[&l.identity, &l.role])
            .await
            .map_err(|e| pg_err("count live", e))?
            .get(0);
        if live >= i64::from(cap) {
            // Nothing written: dropping the transaction rolls it back.
            return Err(cap_reached(live as u64, &l.role));
        }
        let insert = tx
            .prepare_cached(INSERT_INTENT)
            .await
            .map_err(|e| pg_err("insert intent", e))?;
        tx.execute(&insert, &params)
            .await
            .map_err(|e| pg_err("insert intent", e))?;
        tx.commit().await.map_err(|e| pg_err("insert intent", e))
    }

    async fn activate(&self, id: &LeaseId) -> Result<()> {
        let n = self
            .execute(
                "activate",
                "UPDATE credbroker_leases SET state = 'active', due_at = expires_at \
                 WHERE id = $1 AND state = 'pending' AND claimed_by IS NULL",
                &[&id.as_str()],
            )
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(
                "the lease was revoked while it was being issued (a lock or an admin revoke claimed it); nothing was handed out".into(),
            ))
        }
    }

    async fn get(&self, id: &LeaseId) -> Result<Option<Lease>> {
        let rows = self
            .query(
                "get",
                &format!("SELECT {COLUMNS} FROM credbroker_leases WHERE id = $1"),
                &[&id.as_str()],
            )
            .await?;
        rows.first().map(row_to_lease).transpose()
    }

    async fn set_expiry(&self, id: &LeaseId, expires_at: DateTime<Utc>) -> Result<bool> {
        let n = self
            .execute(
                "set expiry",
                "UPDATE credbroker_leases SET expires_at = $2, due_at = $2 \
                 WHERE id = $1 AND state = 'active' AND claimed_by IS NULL",
                &[&id.as_str(), &expires_at],
            )
            .await?;
        Ok(n == 1)
    }

    async fn start_drain(
        &self,
        id: &LeaseId,
        holder: &str,
        until: DateTime<Utc>,
    ) -> Result<Option<Lease>> {
        let rows = self
            .query(
                "start drain",
                &format!(
                    "UPDATE credbroker_leases SET state = 'draining', expires_at = $3, due_at = $3 \
                     WHERE id = $1 AND identity = $2 AND state = 'active' AND claimed_by IS NULL \
                     RETURNING {COLUMNS}"
                ),
                &[&id.as_str(), &holder, &until],
            )
            .await?;
        rows.first().map(row_to_lease).transpose()
    }

    async fn claim_one(&self, id: &LeaseId, claim: &Claim) -> Result<Option<Lease>> {
        // A concurrent claimer blocks on the row lock, then re-checks the
        // WHERE clause against the committed row and finds it taken.
        let rows = self
            .query(
                "claim",
                &format!(
                    "UPDATE credbroker_leases SET claimed_by = $2, \
                     claim_until = clock_timestamp() + $3::float8 * interval '1 millisecond', \
                     due_at = LEAST(due_at, $4) \
                     WHERE id = $1 AND state <> 'revoked' \
                     AND (claimed_by IS NULL OR claimed_by = $2 OR claim_until < clock_timestamp()) \
                     RETURNING {COLUMNS}"
                ),
                &[&id.as_str(), &claim.owner, &claim_ms(claim), &Utc::now()],
            )
            .await?;
        rows.first().map(row_to_lease).transpose()
    }

    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        claim: &Claim,
    ) -> Result<Vec<Lease>> {
        let rows = self
            .query(
                "claim due",
                &format!(
                    "WITH due AS (
                        SELECT id FROM credbroker_leases
                        WHERE state <> 'revoked' AND due_at <= $1
                          AND (claimed_by IS NULL OR claim_until < clock_timestamp())
                        ORDER BY due_at LIMIT $2
                        FOR UPDATE SKIP LOCKED)
                     UPDATE credbroker_leases l SET claimed_by = $3,
                        claim_until = clock_timestamp() + $4::float8 * interval '1 millisecond'
                     FROM due WHERE l.id = due.id
                     RETURNING {}",
                    COLUMNS
                        .split(", ")
                        .map(|c| format!("l.{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                &[&now, &(limit as i64), &claim.owner, &claim_ms(claim)],
            )
            .await?;
        let mut leases = rows_to_leases(&rows)?;
        leases.sort_by(|a, b| a.due_at.cmp(&b.due_at).then_with(|| a.id.cmp(&b.id)));
        Ok(leases)
    }

    async fn mark_revoked(&self, ids: &[LeaseId], at: DateTime<Utc>) -> Result<()> {
        let ids: Vec<&str> = ids.iter().map(LeaseId::as_str).collect();
        self.execute(
            "mark revoked",
            "UPDATE credbroker_leases SET state = 'revoked', revoked_at = $2, \
             claimed_by = NULL, claim_until = NULL WHERE id = ANY($1)",
            &[&ids, &at],
        )
        .await
        .map(|_| ())
    }

    async fn mark_revoked_claimed(
        &self,
        ids: &[LeaseId],
        owner: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<LeaseId>> {
        let ids: Vec<&str> = ids.iter().map(LeaseId::as_str).collect();
        let rows = self
            .query(
                "mark revoked",
                "UPDATE credbroker_leases SET state = 'revoked', revoked_at = $2, \
                 claimed_by = NULL, claim_until = NULL \
                 WHERE id = ANY($1) AND claimed_by = $3 AND state <> 'revoked' RETURNING id",
                &[&ids, &at, &owner],
            )
            .await?;
        Ok(rows.iter().map(|r| LeaseId::from_store(r.get(0))).collect())
    }

    async fn record_failure(
        &self,
        id: &LeaseId,
        error: &str,
        next_due: DateTime<Utc>,
        failing: bool,
    ) -> Result<()> {
        self.execute(
            "record failure",
            RECORD_FAILURE,
            &[&id.as_str(), &error, &next_due, &failing],
        )
        .await
        .map(|_| ())
    }

    async fn record_failures(&self, failures: &[FailureRecord]) -> Result<()> {
        if failures.is_empty() {
            return Ok(());
        }
        let mut c = self.client().await?;
        let tx = c
            .transaction()
            .await
            .map_err(|e| pg_err("record failures", e))?;
        let stmt = tx
            .prepare_cached(RECORD_FAILURE)
            .await
            .map_err(|e| pg_err("record failures", e))?;
        for f in failures {
            tx.execute(&stmt, &[&f.id.as_str(), &f.error, &f.next_due, &f.failing])
                .await
                .map_err(|e| pg_err("record failures", e))?;
        }
        tx.commit().await.map_err(|e| pg_err("record failures", e))
    }

    async fn release(&self, id: &LeaseId) -> Result<()> {
        self.execute(
            "release",
            "UPDATE credbroker_leases SET claimed_by = NULL, claim_until = NULL WHERE id = $1",
            &[&id.as_str()],
        )
        .await
        .map(|_| ())
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        let rows = self
            .query(
                "next due",
                "SELECT min(due_at) FROM credbroker_leases WHERE state <> 'revoked'",
                &[],
            )
            .await?;
        Ok(rows.first().and_then(|r| r.get(0)))
    }

    async fn list(&self, f: &LeaseFilter) -> Result<Vec<Lease>> {
        let (cond, args) = filter_sql(f);
        let mut sql = format!("SELECT {COLUMNS} FROM credbroker_leases WHERE {cond}");
        sql.push_str(f.order.sql());
        if let Some(limit) = f.limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        if let Some(offset) = f.offset {
            sql.push_str(&format!(" OFFSET {offset}"));
        }
        let params: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = self.query("list", &sql, &params).await?;
        rows_to_leases(&rows)
    }

    async fn count(&self, f: &LeaseFilter) -> Result<u64> {
        let (cond, args) = filter_sql(f);
        let sql = format!("SELECT count(*) FROM credbroker_leases WHERE {cond}");
        let params: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = self.query("count", &sql, &params).await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as u64)
    }

    async fn count_live(&self, identity: &str, role: &str) -> Result<u64> {
        let rows = self
            .query(
                "count live",
                "SELECT count(*) FROM credbroker_leases \
                 WHERE identity = $1 AND role = $2 AND state <> 'revoked'",
                &[&identity, &role],
            )
            .await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as u64)
    }

    async fn live_usernames(&self, database: &str) -> Result<HashSet<String>> {
        let rows = self
            .query(
                "live usernames",
                "SELECT username FROM credbroker_leases WHERE database = $1 AND state <> 'revoked'",
                &[&database],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn live_among(&self, names: &[String]) -> Result<HashSet<String>> {
        let mut live = HashSet::new();
        for chunk in names.chunks(1000) {
            let rows = self
                .query(
                    "live among",
                    "SELECT username FROM credbroker_leases \
                     WHERE username = ANY($1) AND state <> 'revoked'",
                    &[&chunk],
                )
                .await?;
            live.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
        Ok(live)
    }

    async fn live_counts(&self) -> Result<Vec<(String, String, LeaseState, u64)>> {
        let rows = self
            .query(
                "live counts",
                "SELECT role, database, state, count(*) FROM credbroker_leases \
                 WHERE state <> 'revoked' GROUP BY role, database, state",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let state: String = r.get(2);
                (
                    r.get(0),
                    r.get(1),
                    LeaseState::parse(&state).unwrap_or(LeaseState::Active),
                    r.get::<_, i64>(3) as u64,
                )
            })
            .collect())
    }

    async fn prune_revoked(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        // SKIP LOCKED: replicas pruning at once take disjoint batches, and a
        // row some request holds is left for the next run, not waited on.
        self.execute(
            "prune revoked",
            "DELETE FROM credbroker_leases WHERE id IN (
                SELECT id FROM credbroker_leases
                WHERE state = 'revoked' AND revoked_at < $1
                ORDER BY revoked_at LIMIT $2
                FOR UPDATE SKIP LOCKED)
             AND state = 'revoked'",
            &[&before, &(limit as i64)],
        )
        .await
    }

    /// Nothing to do: with several replicas, a pending intent may belong to
    /// a live replica that is creating its user right now, so it waits for
    /// its grace deadline like any other; and claims in the table may be
    /// other replicas' live claims, which run out on their own.
    async fn insert_lock(&self, new: &NewLock) -> Result<Lock> {
        // statement_timestamp(): one instant for both columns, so the
        // expiry is exactly created_at + duration.
        let ms: Option<f64> = new.duration.map(|d| d.as_millis() as f64);
        let rows = self
            .query(
                "insert lock",
                &format!(
                    "INSERT INTO credbroker_locks ({LOCK_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, date_trunc('milliseconds', statement_timestamp()), \
                     date_trunc('milliseconds', statement_timestamp()) + $6::float8 * interval '1 millisecond') \
                     RETURNING {LOCK_COLUMNS}"
                ),
                &[
                    &new.id.as_str(),
                    &new.target.kind(),
                    &new.target.value(),
                    &new.reason,
                    &new.created_by,
                    &ms,
                ],
            )
            .await?;
        rows.first()
            .map(row_to_lock)
            .transpose()?
            .ok_or_else(|| Error::internal("insert lock returned no row"))
    }

    async fn delete_lock(&self, id: &LockId) -> Result<Option<Lock>> {
        let rows = self
            .query(
                "delete lock",
                &format!("DELETE FROM credbroker_locks WHERE id = $1 RETURNING {LOCK_COLUMNS}"),
                &[&id.as_str()],
            )
            .await?;
        rows.first().map(row_to_lock).transpose()
    }

    async fn active_locks(&self) -> Result<Vec<Lock>> {
        let rows = self
            .query(
                "read locks",
                &format!(
                    "SELECT {LOCK_COLUMNS} FROM credbroker_locks \
                     WHERE expires_at IS NULL OR expires_at > clock_timestamp() \
                     ORDER BY created_at, id"
                ),
                &[],
            )
            .await?;
        rows.iter().map(row_to_lock).collect()
    }

    async fn prune_locks(&self, before: DateTime<Utc>) -> Result<u64> {
        self.execute(
            "prune locks",
            "DELETE FROM credbroker_locks WHERE expires_at < $1",
            &[&before],
        )
        .await
    }

    async fn insert_vault_token(&self, token: &VaultToken, cap: u32) -> Result<Vec<String>> {
        const WHAT: &str = "insert vault token";
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| pg_err(WHAT, e))?;
        // As `insert_intent`'s cap: replicas share the table, so the read
        // of the identity's tokens, the evictions and the insert are
        // serialized on the store itself by a transaction-scoped lock per
        // identity (released by COMMIT or a dead connection); the read
        // comes after the lock, so under READ COMMITTED it sees the
        // previous holder's committed insert.
        let lock = tx
            .prepare_cached("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .await
            .map_err(|e| pg_err("vault token cap lock", e))?;
        tx.execute(&lock, &[&VAULT_TOKEN_LOCK, &token.identity])
            .await
            .map_err(|e| pg_err("vault token cap lock", e))?;
        let held = tx
            .prepare_cached(
                "SELECT accessor, expires_at, issued_at FROM credbroker_vault_tokens \
                 WHERE identity = $1",
            )
            .await
            .map_err(|e| pg_err("read vault tokens", e))?;
        let held = tx
            .query(&held, &[&token.identity])
            .await
            .map_err(|e| pg_err("read vault tokens", e))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let gone = crate::store::evictions(held, cap);
        if !gone.is_empty() {
            // Two statements, tokens first: a link being written holds its
            // token's row (`link_vault_lease`), so the token delete waits
            // for it, and the link delete's fresh snapshot then sees it.
            for sql in [
                "DELETE FROM credbroker_vault_tokens WHERE accessor = ANY($1)",
                "DELETE FROM credbroker_vault_token_leases WHERE accessor = ANY($1)",
            ] {
                let evict = tx
                    .prepare_cached(sql)
                    .await
                    .map_err(|e| pg_err("evict vault tokens", e))?;
                tx.execute(&evict, &[&gone])
                    .await
                    .map_err(|e| pg_err("evict vault tokens", e))?;
            }
        }
        let insert = tx
            .prepare_cached(&format!(
                "INSERT INTO credbroker_vault_tokens ({VAULT_TOKEN_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6)"
            ))
            .await
            .map_err(|e| pg_err(WHAT, e))?;
        tx.execute(
            &insert,
            &[
                &token.hash,
                &token.accessor,
                &token.identity,
                &token.cert_sha256,
                &token.issued_at,
                &token.expires_at,
            ],
        )
        .await
        .map_err(|e| pg_err(WHAT, e))?;
        tx.commit().await.map_err(|e| pg_err(WHAT, e))?;
        Ok(gone)
    }

    async fn vault_token(&self, hash: &str) -> Result<Option<VaultToken>> {
        let rows = self
            .query(
                "read vault token",
                &format!(
                    "SELECT {VAULT_TOKEN_COLUMNS} FROM credbroker_vault_tokens WHERE hash = $1"
                ),
                &[&hash],
            )
            .await?;
        Ok(rows.first().map(|r| VaultToken {
            hash: r.get(0),
            accessor: r.get(1),
            identity: r.get(2),
            cert_sha256: r.get(3),
            issued_at: r.get(4),
            expires_at: r.get(5),
        }))
    }

    async fn set_vault_token_expiry(&self, hash: &str, expires_at: DateTime<Utc>) -> Result<bool> {
        self.execute(
            "renew vault token",
            "UPDATE credbroker_vault_tokens SET expires_at = $2 WHERE hash = $1",
            &[&hash, &expires_at],
        )
        .await
        .map(|n| n > 0)
    }

    async fn delete_vault_token(&self, hash: &str) -> Result<bool> {
        // One statement: the links and the token go together or not at all.
        let rows = self
            .query(
                "delete vault token",
                "WITH t AS (DELETE FROM credbroker_vault_tokens WHERE hash = $1 RETURNING accessor), \
                 l AS (DELETE FROM credbroker_vault_token_leases WHERE accessor IN (SELECT accessor FROM t)) \
                 SELECT count(*) FROM t",
                &[&hash],
            )
            .await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) > 0)
    }

    async fn link_vault_lease(&self, accessor: &str, lease: &LeaseId) -> Result<()> {
        // The token row is share-locked until this commits: an eviction or
        // a revoke-self deleting it waits, then deletes this link too (its
        // link delete is a statement of its own, after the token's).
        let rows = self
            .query(
                "link vault lease",
                "WITH t AS (SELECT accessor FROM credbroker_vault_tokens WHERE accessor = $1 FOR SHARE), \
                 i AS (INSERT INTO credbroker_vault_token_leases (accessor, lease_id) \
                       SELECT accessor, $2 FROM t ON CONFLICT DO NOTHING) \
                 SELECT count(*) FROM t",
                &[&accessor, &lease.as_str()],
            )
            .await?;
        if rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) > 0 {
            Ok(())
        } else {
            Err(crate::store::gone_token())
        }
    }

    async fn vault_token_leases(&self, accessor: &str) -> Result<Vec<LeaseId>> {
        let rows = self
            .query(
                "read vault token leases",
                "SELECT lease_id FROM credbroker_vault_token_leases WHERE accessor = $1 ORDER BY lease_id",
                &[&accessor],
            )
            .await?;
        Ok(rows.iter().map(|r| LeaseId::from_store(r.get(0))).collect())
    }

    async fn prune_vault_tokens(&self, before: DateTime<Utc>) -> Result<u64> {
        let rows = self
            .query(
                "prune vault tokens",
                "WITH t AS (DELETE FROM credbroker_vault_tokens WHERE expires_at < $1 RETURNING accessor), \
                 l AS (DELETE FROM credbroker_vault_token_leases WHERE accessor IN (SELECT accessor FROM t)) \
                 SELECT count(*) FROM t",
                &[&before],
            )
            .await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as u64)
    }

    async fn live_identities(&self) -> Result<Vec<String>> {
        let rows = self
            .query(
                "live identities",
                "SELECT DISTINCT identity FROM credbroker_leases WHERE state <> 'revoked' \
                 ORDER BY identity",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn recover_after_start(&self, _now: DateTime<Utc>) -> Result<u64> {
        Ok(0)
    }

    async fn static_get(&self, role: &str) -> Result<Option<StaticState>> {
        let rows = self
            .query(
                "read static role",
                &format!("SELECT {STATIC_COLUMNS} FROM credbroker_static_roles WHERE role = $1"),
                &[&role],
            )
            .await?;
        rows.first().map(row_to_static).transpose()
    }

    async fn static_list(&self) -> Result<Vec<StaticState>> {
        let rows = self
            .query(
                "list static roles",
                &format!("SELECT {STATIC_COLUMNS} FROM credbroker_static_roles ORDER BY role"),
                &[],
            )
            .await?;
        rows.iter().map(row_to_static).collect()
    }

    async fn static_claim(&self, role: &str, claim: &Claim) -> Result<Option<StaticState>> {
        self.execute(
            "create static role row",
            "INSERT INTO credbroker_static_roles (role) VALUES ($1) ON CONFLICT (role) DO NOTHING",
            &[&role],
        )
        .await?;
        // A concurrent claimer blocks on the row lock, then re-checks the
        // WHERE clause against the committed row and finds it taken.
        let rows = self
            .query(
                "claim static role",
                &format!(
                    "UPDATE credbroker_static_roles SET claimed_by = $2, \
                     claim_until = clock_timestamp() + $3::float8 * interval '1 millisecond' \
                     WHERE role = $1 \
                     AND (claimed_by IS NULL OR claimed_by = $2 OR claim_until < clock_timestamp()) \
                     RETURNING {STATIC_COLUMNS}"
                ),
                &[&role, &claim.owner, &claim_ms(claim)],
            )
            .await?;
        rows.first().map(row_to_static).transpose()
    }

    async fn static_save(&self, s: &StaticState, owner: &str) -> Result<bool> {
        let cur = s.current.as_ref();
        let prev = s.previous.as_ref();
        let pend = s.pending.as_ref();
        let generation = s.generation as i64;
        let current_name = cur.map(|c| c.user.clone());
        let current_sealed = cur.map(|c| c.sealed.clone());
        let rotated_at = cur.map(|c| c.rotated_at);
        let valid_until = cur.map(|c| c.valid_until);
        let previous_name = prev.map(|p| p.user.clone());
        let retire_at = prev.map(|p| p.retire_at);
        let pending_kind = pend.map(|p| p.kind.as_str());
        let pending_name = pend.map(|p| p.user.clone());
        let pending_sealed = pend.map(|p| p.sealed.clone());
        let pending_generation = pend.map(|p| p.generation as i64);
        let pending_valid_until = pend.map(|p| p.valid_until);
        let n = self
            .execute(
                "save static role",
                "UPDATE credbroker_static_roles SET generation = $2, current_name = $3, \
                 current_sealed = $4, rotated_at = $5, valid_until = $6, next_rotation_at = $7, \
                 previous_name = $8, retire_at = $9, pending_kind = $10, pending_name = $11, \
                 pending_sealed = $12, pending_generation = $13, pending_valid_until = $14, \
                 last_error = $15 \
                 WHERE role = $1 AND claimed_by = $16 AND claim_until >= clock_timestamp()",
                &[
                    &s.role,
                    &generation,
                    &current_name,
                    &current_sealed,
                    &rotated_at,
                    &valid_until,
                    &s.next_rotation_at,
                    &previous_name,
                    &retire_at,
                    &pending_kind,
                    &pending_name,
                    &pending_sealed,
                    &pending_generation,
                    &pending_valid_until,
                    &s.last_error,
                    &owner,
                ],
            )
            .await?;
        Ok(n == 1)
    }

    async fn static_release(&self, role: &str, owner: &str) -> Result<()> {
        self.execute(
            "release static role",
            "UPDATE credbroker_static_roles SET claimed_by = NULL, claim_until = NULL \
             WHERE role = $1 AND claimed_by = $2",
            &[&role, &owner],
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod error_tests {
    use super::{corrupt, pg_err, pool_err, store_class, StoreClass};
    use crate::error::Error;

    #[test]
    fn a_corrupt_row_is_internal() {
        let e = corrupt(crate::lease::LeaseState::parse("bogus").unwrap_err());
        assert!(matches!(e, Error::Internal(_)), "{e}");
        let src = std::error::Error::source(&e).expect("source");
        assert!(matches!(
            src.downcast_ref::<Error>(),
            Some(Error::InvalidArgument(_))
        ));
    }

    /// A store bug (constraint, syntax, a value or row we cannot read) is
    /// `Internal`; the store going away, shutting down or asking for a
    /// retry is `Unavailable`.
    #[test]
    fn a_store_bug_is_internal_not_unavailable() {
        for code in [
            "23505", "23503", "23502", "42601", "42P01", "42703", "22P02", "XX001",
        ] {
            assert_eq!(store_class(Some(code), ""), StoreClass::Internal, "{code}");
        }
        for code in [
            "08006", "08001", "57P01", "57P03", "40001", "40P01", "25006",
        ] {
            assert_eq!(
                store_class(Some(code), ""),
                StoreClass::Unavailable,
                "{code}"
            );
        }
        for text in [
            "error deserializing column 3",
            "error serializing parameter 0",
            "invalid column `state`",
            "query returned an unexpected number of rows",
            "expected 2 parameters but got 1",
        ] {
            assert_eq!(store_class(None, text), StoreClass::Internal, "{text}");
        }
        for text in [
            "error connecting to server",
            "connection closed",
            "error communicating with the server",
            "timeout waiting for server",
            "error performing TLS handshake",
        ] {
            assert_eq!(store_class(None, text), StoreClass::Unavailable, "{text}");
        }
    }

    fn refused_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_refused_connection_is_unavailable_and_keeps_its_source() {
        let port = refused_port();
        let url = format!("host=127.0.0.1 port={port} user=a connect_timeout=2");
        let e = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        let e = pg_err("connect", e);
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "unavailable: lease store unreachable: connect: error connecting to server"
        );
        let src = std::error::Error::source(&e).expect("source");
        assert!(src.downcast_ref::<tokio_postgres::Error>().is_some());
        let line = crate::error::chain(&e).to_string();
        assert!(line.contains("Connection refused"), "{line}");

        let cfg: tokio_postgres::Config = url.parse().unwrap();
        let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
        let pool = deadpool_postgres::Pool::builder(mgr)
            .max_size(1)
            .build()
            .unwrap();
        let e = pool_err(pool.get().await.expect_err("refused"));
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        let src = std::error::Error::source(&e).expect("source");
        assert!(src.downcast_ref::<deadpool_postgres::PoolError>().is_some());
    }
}
