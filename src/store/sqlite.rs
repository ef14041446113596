//! The embedded lease store: one SQLite file, nothing to run.
//!
//! WAL journal with `synchronous = FULL`: a commit is on disk before the
//! broker acknowledges a lease, so power loss cannot lose one. One thread
//! owns the connection and group-commits: writes that arrive while a
//! commit is being synced share the next transaction and its one fsync,
//! and each is answered only after that commit. The file is
//! opened in exclusive locking mode, because a second broker on the same
//! file would resolve the first one's pending intents as dead.

use std::collections::HashSet;
use std::path::Path;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::error::{Error, Result};
use crate::lease::{BackendKind, Lease, LeaseId, LeaseState, Username};
use crate::lock::{Lock, LockId, LockTarget, NewLock};
use crate::store::group_commit::{db_err, Durability, GroupCommit, Kind};
use crate::store::StaticState;
use crate::store::{
    cap_reached, stamp_lock, Claim, FailureRecord, HolderClaim, LeaseFilter, LeaseStore, VaultToken,
};

const SCHEMA_VERSION: i64 = 9;

const MIGRATION_1: &str = "
CREATE TABLE leases (
    id              TEXT PRIMARY KEY,
    role            TEXT NOT NULL,
    database        TEXT NOT NULL,
    kind            TEXT NOT NULL,
    username        TEXT NOT NULL,
    user_host       TEXT NOT NULL DEFAULT '',
    identity        TEXT NOT NULL,
    state           TEXT NOT NULL,
    issued_at       INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    max_expires_at  INTEGER NOT NULL,
    due_at          INTEGER NOT NULL,
    revoked_at      INTEGER,
    revoke_attempts INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    claimed_by      TEXT,
    claim_until     INTEGER
);
CREATE UNIQUE INDEX leases_username ON leases(database, username);
-- The reaper's question, 'what is due next', reads only live rows.
CREATE INDEX leases_live_due ON leases(due_at) WHERE state <> 'revoked';
CREATE INDEX leases_live_identity ON leases(identity, role) WHERE state <> 'revoked';
";

/// The pruner's question, 'which revoked rows are old', without reading
/// the live ones or the whole table.
const MIGRATION_2: &str = "
CREATE INDEX leases_revoked_at ON leases(revoked_at) WHERE state = 'revoked';
";

/// Admin locks (`credbroker admin lock`). `expires_at` NULL: until
/// unlocked.
const MIGRATION_3: &str = "
CREATE TABLE locks (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('identity', 'role', 'database')),
    value      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
";

/// Static roles (`static_roles`): one row per role, its current user and
/// sealed password, the previous user until its overlap ends, and a
/// pending rotation (the intent, written before the database hears of
/// it). Claimed like leases, so one rotation runs at a time.
const MIGRATION_4: &str = "
CREATE TABLE static_roles (
    role                TEXT PRIMARY KEY,
    generation          INTEGER NOT NULL DEFAULT 0,
    current_name        TEXT,
    current_sealed      TEXT,
    rotated_at          INTEGER,
    valid_until         INTEGER,
    next_rotation_at    INTEGER,
    previous_name       TEXT,
    retire_at           INTEGER,
    pending_kind        TEXT,
    pending_name        TEXT,
    pending_sealed      TEXT,
    pending_generation  INTEGER,
    pending_valid_until INTEGER,
    last_error          TEXT,
    claimed_by          TEXT,
    claim_until         INTEGER
);
";

/// Tokens of the Vault-compatible API (`vault_api`), by the SHA-256 of the
/// token — never the token — and the leases each token created. No
/// foreign key to `leases`: pruned lease rows must not take links along
/// (nor block on them); a link to a pruned lease is simply skipped.
const MIGRATION_5: &str = "
CREATE TABLE vault_tokens (
    hash        TEXT PRIMARY KEY,
    accessor    TEXT NOT NULL UNIQUE,
    identity    TEXT NOT NULL,
    cert_sha256 TEXT NOT NULL,
    issued_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX vault_tokens_expires_at ON vault_tokens(expires_at);
CREATE TABLE vault_token_leases (
    accessor TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    PRIMARY KEY (accessor, lease_id)
);
";

/// The console's questions. 'The live leases by expiry, one page at a
/// time': a page (first, thousandth, or newest first) walks an index
/// instead of sorting every live row. 'How many per database and state'
/// (the overview, `/metrics`): a walk of a small covering index in group
/// order instead of a sort of the table.
const MIGRATION_6: &str = "
CREATE INDEX IF NOT EXISTS leases_live_expiry ON leases(expires_at, id) WHERE state <> 'revoked';
CREATE INDEX IF NOT EXISTS leases_live_counts ON leases(role, database, state) WHERE state <> 'revoked';
";

/// At a million live leases. The orphan sweep's question, 'which of these
/// users has a live lease', asked per user name across every database:
/// `leases_username` leads with the database, so each name was a scan of
/// every live row (a sweep over 100,000 roles never finished). And `admin
/// leases --role` / `--database`, soonest expiry first: a role or a
/// database often holds most live leases, and without an index in that
/// order each listing read and sorted all of them to return one page
/// (`filter_sql` keeps them off a listing by identity, which its own index
/// narrows better).
const MIGRATION_7: &str = "
CREATE INDEX IF NOT EXISTS leases_live_username ON leases(username) WHERE state <> 'revoked';
CREATE INDEX IF NOT EXISTS leases_live_role_expiry ON leases(role, expires_at, id) WHERE state <> 'revoked';
CREATE INDEX IF NOT EXISTS leases_live_database_expiry ON leases(database, expires_at, id) WHERE state <> 'revoked';
";

/// A login's question, 'which tokens does this identity hold' (the cap,
/// `max_tokens_per_identity`), without reading every identity's.
const MIGRATION_8: &str = "
CREATE INDEX IF NOT EXISTS vault_tokens_identity ON vault_tokens(identity, expires_at);
";

/// Locks on static roles (`admin lock --static-role`). SQLite cannot
/// alter a CHECK constraint: the table is copied into one that allows the
/// new kind.
const MIGRATION_9: &str = "
CREATE TABLE locks_9 (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('identity', 'role', 'static_role', 'database')),
    value      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
INSERT INTO locks_9 SELECT id, kind, value, reason, created_by, created_at, expires_at FROM locks;
DROP TABLE locks;
ALTER TABLE locks_9 RENAME TO locks;
";

pub struct SqliteStore {
    /// The one thread that owns the connection, and its group commit.
    exec: GroupCommit,
    /// Every lock in the file, kept in step with it. Exact, because this
    /// process is the file's only user (exclusive locking mode): so the
    /// check on every issue and renew is a memory read, never a wait
    /// behind a group commit. Updated after the write is durable.
    locks: std::sync::RwLock<Vec<Lock>>,
}

const STATIC_COLUMNS: &str =
    "role, generation, current_name, current_sealed, rotated_at, valid_until, \
     next_rotation_at, previous_name, retire_at, pending_kind, pending_name, pending_sealed, \
     pending_generation, pending_valid_until, last_error";

fn row_to_static(row: &Row<'_>) -> rusqlite::Result<StaticState> {
    use crate::store::static_state::{CurrentUser, Pending, PendingKind, PreviousUser};
    let t = |i: usize| -> rusqlite::Result<Option<DateTime<Utc>>> {
        Ok(row.get::<_, Option<i64>>(i)?.map(from_ms))
    };
    let current = match (
        row.get::<_, Option<String>>(2)?,
        row.get::<_, Option<String>>(3)?,
    ) {
        (Some(user), Some(sealed)) => Some(CurrentUser {
            user,
            sealed,
            rotated_at: t(4)?.unwrap_or_default(),
            valid_until: t(5)?.unwrap_or_default(),
        }),
        _ => None,
    };
    let previous = match (row.get::<_, Option<String>>(7)?, t(8)?) {
        (Some(user), Some(retire_at)) => Some(PreviousUser { user, retire_at }),
        _ => None,
    };
    let pending = match (
        row.get::<_, Option<String>>(9)?
            .as_deref()
            .and_then(PendingKind::parse),
        row.get::<_, Option<String>>(10)?,
        row.get::<_, Option<String>>(11)?,
    ) {
        (Some(kind), Some(user), Some(sealed)) => Some(Pending {
            kind,
            user,
            sealed,
            generation: row.get::<_, Option<i64>>(12)?.unwrap_or(0) as u64,
            valid_until: t(13)?.unwrap_or_default(),
        }),
        _ => None,
    };
    Ok(StaticState {
        role: row.get(0)?,
        generation: row.get::<_, i64>(1)? as u64,
        current,
        next_rotation_at: t(6)?,
        previous,
        pending,
        last_error: row.get(14)?,
    })
}

const VAULT_TOKEN_COLUMNS: &str = "hash, accessor, identity, cert_sha256, issued_at, expires_at";

const RECORD_FAILURE: &str =
    "UPDATE leases SET revoke_attempts = revoke_attempts + 1, last_error = ?2, \
     due_at = ?3, state = CASE WHEN ?4 AND state <> 'revoked' THEN 'failing' ELSE state END, \
     claimed_by = NULL, claim_until = NULL WHERE id = ?1";

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

/// Runs a guarded `UPDATE` of lease `id` in a savepoint and reads the row
/// back when it matched (the guard held): one step of the writer.
fn update_one(
    c: &mut Connection,
    sql: &str,
    params: impl rusqlite::Params,
    id: &str,
) -> rusqlite::Result<Option<Lease>> {
    let tx = c.savepoint()?;
    let lease = if tx.execute(sql, params)? == 1 {
        tx.query_row(
            &format!("SELECT {COLUMNS} FROM leases WHERE id = ?1"),
            params![id],
            row_to_lease,
        )
        .optional()?
    } else {
        None
    };
    tx.commit()?;
    Ok(lease)
}

const COLUMNS: &str = "id, role, database, kind, username, user_host, identity, state, issued_at, \
                       expires_at, max_expires_at, due_at, revoked_at, revoke_attempts, last_error";

fn row_to_lease(row: &Row<'_>) -> rusqlite::Result<Lease> {
    let kind: String = row.get(3)?;
    let state: String = row.get(7)?;
    let conv = |e: Error| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    };
    Ok(Lease {
        id: LeaseId::from_store(row.get(0)?),
        role: row.get(1)?,
        database: row.get(2)?,
        kind: BackendKind::parse(&kind).map_err(conv)?,
        username: Username::from_store(row.get(4)?),
        user_host: row.get(5)?,
        identity: row.get(6)?,
        state: LeaseState::parse(&state).map_err(conv)?,
        issued_at: from_ms(row.get(8)?),
        expires_at: from_ms(row.get(9)?),
        max_expires_at: from_ms(row.get(10)?),
        due_at: from_ms(row.get(11)?),
        revoked_at: row.get::<_, Option<i64>>(12)?.map(from_ms),
        revoke_attempts: row.get::<_, i64>(13)? as u32,
        last_error: row.get(14)?,
    })
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let (conn, locks) = tokio::task::spawn_blocking(move || {
            let conn = Self::open_blocking(&path)?;
            let locks = load_locks(&conn)
                .map_err(|e| Error::config(format!("lease store {}: {e}", path.display())))?;
            Ok::<_, Error>((conn, locks))
        })
        .await
        .map_err(Error::internal)??;
        Ok(SqliteStore {
            exec: GroupCommit::start(conn)?,
            locks: std::sync::RwLock::new(locks),
        })
    }

    fn open_blocking(path: &Path) -> Result<Connection> {
        let ctx = |what: &str, e: rusqlite::Error| {
            Error::config(format!("lease store {}: {what}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::config(format!("lease store directory {}: {e}", dir.display()))
            })?;
        }
        // Created 0600 before SQLite sees it (SQLite would use 0644 less
        // the umask), and its -wal/-shm files copy the database's mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    Error::config(format!(
                        "lease store {}: cannot create: {e}",
                        path.display()
                    ))
                })?;
        }
        let conn = Connection::open(path).map_err(|e| ctx("cannot open", e))?;
        conn.busy_timeout(std::time::Duration::from_secs(2))
            .map_err(|e| ctx("busy timeout", e))?;
        // Reading the header first turns a corrupt or foreign file into a
        // clear start-up error instead of an empty store.
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| ctx("not a readable SQLite database", e))?;
        if check != "ok" {
            return Err(Error::config(format!(
                "lease store {} is corrupt ({check}); restore it from a backup",
                path.display()
            )));
        }
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA locking_mode = EXCLUSIVE;
             PRAGMA foreign_keys = ON;",
        )
        .map_err(|e| ctx("cannot set up (is another broker using this file?)", e))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| ctx("schema version", e))?;
        if version > SCHEMA_VERSION {
            return Err(Error::config(format!(
                "lease store {} has schema version {version}, newer than this broker ({SCHEMA_VERSION})",
                path.display()
            )));
        }
        if version < 1 {
            let tx_sql = format!("BEGIN IMMEDIATE; {MIGRATION_1} PRAGMA user_version = 1; COMMIT;");
            conn.execute_batch(&tx_sql).map_err(|e| {
                ctx(
                    "cannot create schema (is another broker using this file?)",
                    e,
                )
            })?;
        }
        if version < 2 {
            let tx_sql = format!("BEGIN IMMEDIATE; {MIGRATION_2} PRAGMA user_version = 2; COMMIT;");
            conn.execute_batch(&tx_sql)
                .map_err(|e| ctx("cannot migrate schema to version 2", e))?;
        }
        if version < 3 {
            let tx_sql = format!("BEGIN IMMEDIATE; {MIGRATION_3} PRAGMA user_version = 3; COMMIT;");
            conn.execute_batch(&tx_sql)
                .map_err(|e| ctx("cannot migrate schema to version 3", e))?;
        }
        if version < 4 {
            let tx_sql = format!("BEGIN IMMEDIATE; {MIGRATION_4} PRAGMA user_version = 4; COMMIT;");
            conn.execute_batch(&tx_sql)
                .map_err(|e| ctx("cannot migrate schema to version 4", e))?;
        }
        if version < 5 {
            let tx_sql = format!("BEGIN IMMEDIATE; {MIGRATION_5} PRAGMA user_version = 5; COMMIT;");
            conn.execute_batch(&tx_sql)
                .map_err(|e| ctx("cannot migrate schema to version 5", e))?;
        }
        if version < 6 {
            let tx_sql = format!("BEGIN IMMEDIATE; {MIGRATION_6} PRAGMA user_version = 6; COMMIT;");
            conn.execute_batch(&tx_sql)
                .map_err(|e| ctx("cannot migrate schema to version 6", e))?;
        }
        if version < 7 {
            let tx_sql = format!("BEGIN IMMEDIATE; {MIGRATION_7} PRAGMA user_version = 7; COMMIT;");
            conn.execute_batch(&tx_sql)
                .map_err(|e| ctx("cannot migrate schema to version 7", e))?;
        }
        if version < 8 {
            let tx_sql = format!("BEGIN IMMEDIATE; {MIGRATION_8} PRAGMA user_version = 8; COMMIT;");
            conn.execute_batch(&tx_sql)
                .map_err(|e| ctx("cannot migrate schema to version 8", e))?;
        }
        if version < 9 {
            let tx_sql = format!("BEGIN IMMEDIATE; {MIGRATION_9} PRAGMA user_version = 9; COMMIT;");
            conn.execute_batch(&tx_sql)
                .map_err(|e| ctx("cannot migrate schema to version 9", e))?;
        }
        Ok(conn)
    }

    /// Runs a write in the next group commit; answers once it is durable.
    async fn with<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.exec.submit(Kind::Write(Durability::Full), f).await
    }

    /// A write that need not survive a crash (see [`Durability::Lazy`]).
    async fn with_lazy<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.exec.submit(Kind::Write(Durability::Lazy), f).await
    }

    /// A read: sees only committed rows, answers without waiting for a commit.
    async fn with_read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.exec.submit(Kind::Read, f).await
    }
}

/// The WHERE condition of a [`LeaseFilter`] and its arguments, shared by
/// `list` and `count` so a page and its total never disagree.
fn filter_sql(f: &LeaseFilter) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = String::from("1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let mut push = |sql: &mut String, cond: &str, v: rusqlite::types::Value| {
        args.push(v);
        sql.push_str(&format!(" AND {cond} ?{}", args.len()));
    };
    // SQLite plans without statistics: given an identity, it would rather
    // walk a whole role's or database's leases in expiry order than sort
    // the identity's few. A unary `+` keeps a column off index choice. A
    // role belongs to one database, so with both the role's index serves.
    let narrower = |by: bool| if by { "+" } else { "" };
    if let Some(r) = &f.role {
        let cond = format!("{}role =", narrower(f.identity.is_some()));
        push(&mut sql, &cond, r.clone().into());
    }
    if let Some(d) = &f.database {
        let cond = format!(
            "{}database =",
            narrower(f.identity.is_some() || f.role.is_some())
        );
        push(&mut sql, &cond, d.clone().into());
    }
    if let Some(i) = &f.identity {
        push(&mut sql, "identity =", i.clone().into());
    }
    if let Some(t) = f.expiring_before {
        push(&mut sql, "expires_at <=", ms(t).into());
    }
    if f.states.is_empty() {
        sql.push_str(" AND state <> 'revoked'");
    } else {
        // `as_str` is one of a fixed set of words, never caller text.
        let states: Vec<String> = f
            .states
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        sql.push_str(&format!(" AND state IN ({})", states.join(",")));
        // Implied, but spelled out so the partial indexes on live rows apply.
        if !f.states.contains(&LeaseState::Revoked) {
            sql.push_str(" AND state <> 'revoked'");
        }
    }
    (sql, args)
}

const LOCK_COLUMNS: &str = "id, kind, value, reason, created_by, created_at, expires_at";

/// Every stored lock. One that this build cannot read (a pattern syntax it
/// does not know) fails the start rather than be skipped: a lock skipped is
/// a refusal silently lifted.
fn load_locks(conn: &Connection) -> Result<Vec<Lock>> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {LOCK_COLUMNS} FROM locks ORDER BY created_at, id"
        ))
        .map_err(db_err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<i64>>(6)?,
            ))
        })
        .map_err(db_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, kind, value, reason, created_by, created_at, expires_at) = row.map_err(db_err)?;
        let target = LockTarget::from_parts(&kind, &value)
            .map_err(|e| Error::config(format!("lock {id} cannot be read by this broker: {e}")))?;
        out.push(Lock {
            id: LockId::from_store(id),
            target,
            reason,
            created_by,
            created_at: from_ms(created_at),
            expires_at: expires_at.map(from_ms),
        });
    }
    Ok(out)
}

#[async_trait]
impl LeaseStore for SqliteStore {
    async fn insert_intent(&self, lease: &Lease, cap: Option<u32>) -> Result<()> {
        let l = lease.clone();
        let outcome = self
            .with(move |c| {
                // Atomic because one thread owns the connection and runs the
                // batch's writes one after another: the count sees every
                // intent inserted before it in this batch (same transaction)
                // and every earlier batch (committed). A batch whose COMMIT
                // fails fails all its intents, so a refusal counted on them
                // errs on the side of fewer leases, never more.
                if let Some(cap) = cap {
                    let live: i64 = c.query_row(
                        "SELECT COUNT(*) FROM leases \
                         WHERE identity = ?1 AND role = ?2 AND state <> 'revoked'",
                        params![l.identity, l.role],
                        |r| r.get(0),
                    )?;
                    if live >= i64::from(cap) {
                        return Ok(Some(live as u64));
                    }
                }
                c.execute(
                    "INSERT INTO leases (id, role, database, kind, username, user_host, identity, state, \
                     issued_at, expires_at, max_expires_at, due_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    params![
                        l.id.as_str(),
                        l.role,
                        l.database,
                        l.kind.as_str(),
                        l.username.as_str(),
                        l.user_host,
                        l.identity,
                        l.state.as_str(),
                        ms(l.issued_at),
                        ms(l.expires_at),
                        ms(l.max_expires_at),
                        ms(l.due_at)
                    ],
                )?;
                Ok(None)
            })
            .await?;
        match outcome {
            Some(live) => Err(cap_reached(live, &lease.role)),
            None => Ok(()),
        }
    }

    async fn activate(&self, id: &LeaseId) -> Result<()> {
        let id = id.as_str().to_string();
        let n = self
            .with(move |c| {
                c.execute(
                    "UPDATE leases SET state = 'active', due_at = expires_at WHERE id = ?1 AND state = 'pending' AND claimed_by IS NULL",
                    params![id],
                )
            })
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
        let id = id.as_str().to_string();
        self.with_read(move |c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM leases WHERE id = ?1"),
                params![id],
                row_to_lease,
            )
            .optional()
        })
        .await
    }

    async fn set_expiry(&self, id: &LeaseId, expires_at: DateTime<Utc>) -> Result<bool> {
        let id = id.as_str().to_string();
        let n = self
            .with(move |c| {
                c.execute(
                    "UPDATE leases SET expires_at = ?2, due_at = ?2 \
                     WHERE id = ?1 AND state = 'active' AND claimed_by IS NULL",
                    params![id, ms(expires_at)],
                )
            })
            .await?;
        Ok(n == 1)
    }

    async fn start_drain(
        &self,
        id: &LeaseId,
        holder: &str,
        until: DateTime<Utc>,
    ) -> Result<Option<Lease>> {
        let id = id.as_str().to_string();
        let holder = holder.to_string();
        self.with(move |c| {
            update_one(
                c,
                "UPDATE leases SET state = 'draining', expires_at = ?3, due_at = ?3 \
                 WHERE id = ?1 AND identity = ?2 AND state = 'active' AND claimed_by IS NULL",
                params![id, holder, ms(until)],
                &id,
            )
        })
        .await
    }

    async fn claim_one(&self, id: &LeaseId, claim: &Claim) -> Result<Option<Lease>> {
        let id = id.as_str().to_string();
        let claim = claim.clone();
        self.with_lazy(move |c| {
            let now = ms(Utc::now());
            update_one(
                c,
                "UPDATE leases SET claimed_by = ?2, claim_until = ?3, due_at = MIN(due_at, ?4) \
                 WHERE id = ?1 AND state <> 'revoked' \
                 AND (claimed_by IS NULL OR claimed_by = ?2 OR claim_until < ?4)",
                params![id, claim.owner, ms(claim.until), now],
                &id,
            )
        })
        .await
    }

    async fn claim_for(
        &self,
        id: &LeaseId,
        claim: &Claim,
        holder: Option<&str>,
    ) -> Result<HolderClaim> {
        let id = id.as_str().to_string();
        let claim = claim.clone();
        let holder = holder.map(str::to_string);
        // One job on the worker: the claim and, when it was refused, the
        // read that says why.
        self.with_lazy(move |c| {
            let now = ms(Utc::now());
            let tx = c.savepoint()?;
            let n = tx.execute(
                "UPDATE leases SET claimed_by = ?2, claim_until = ?3, due_at = MIN(due_at, ?4) \
                 WHERE id = ?1 AND state <> 'revoked' AND (?5 IS NULL OR identity = ?5) \
                 AND (claimed_by IS NULL OR claimed_by = ?2 OR claim_until < ?4)",
                params![id, claim.owner, ms(claim.until), now, holder],
            )?;
            let lease = tx
                .query_row(
                    &format!("SELECT {COLUMNS} FROM leases WHERE id = ?1"),
                    params![id],
                    row_to_lease,
                )
                .optional()?;
            tx.commit()?;
            Ok(match lease {
                Some(l) if n == 1 => HolderClaim::Claimed(l),
                Some(l) => HolderClaim::Refused(l),
                None => HolderClaim::Missing,
            })
        })
        .await
    }

    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        claim: &Claim,
    ) -> Result<Vec<Lease>> {
        let claim = claim.clone();
        self.with_lazy(move |c| {
            let tx = c.savepoint()?;
            let leases = {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM leases WHERE state <> 'revoked' AND due_at <= ?1 \
                     AND (claimed_by IS NULL OR claim_until < ?1) ORDER BY due_at LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![ms(now), limit as i64], row_to_lease)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            {
                let mut upd = tx.prepare_cached(
                    "UPDATE leases SET claimed_by = ?2, claim_until = ?3 WHERE id = ?1",
                )?;
                for l in &leases {
                    upd.execute(params![l.id.as_str(), claim.owner, ms(claim.until)])?;
                }
            }
            tx.commit()?;
            Ok(leases)
        })
        .await
    }

    async fn mark_revoked(&self, ids: &[LeaseId], at: DateTime<Utc>) -> Result<()> {
        let ids: Vec<String> = ids.iter().map(|i| i.as_str().to_string()).collect();
        self.with(move |c| {
            let tx = c.savepoint()?;
            {
                let mut upd = tx.prepare_cached(
                    "UPDATE leases SET state = 'revoked', revoked_at = ?2, claimed_by = NULL, claim_until = NULL \
                     WHERE id = ?1",
                )?;
                for id in &ids {
                    upd.execute(params![id, ms(at)])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn mark_revoked_claimed(
        &self,
        ids: &[LeaseId],
        owner: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<LeaseId>> {
        let ids: Vec<LeaseId> = ids.to_vec();
        let owner = owner.to_string();
        self.with(move |c| {
            let tx = c.savepoint()?;
            let mut marked = Vec::new();
            {
                let mut upd = tx.prepare_cached(
                    "UPDATE leases SET state = 'revoked', revoked_at = ?2, claimed_by = NULL, claim_until = NULL \
                     WHERE id = ?1 AND claimed_by = ?3 AND state <> 'revoked'",
                )?;
                for id in ids {
                    if upd.execute(params![id.as_str(), ms(at), owner])? == 1 {
                        marked.push(id);
                    }
                }
            }
            tx.commit()?;
            Ok(marked)
        })
        .await
    }

    async fn record_failure(
        &self,
        id: &LeaseId,
        error: &str,
        next_due: DateTime<Utc>,
        failing: bool,
    ) -> Result<()> {
        let id = id.as_str().to_string();
        let error = error.to_string();
        self.with(move |c| {
            c.execute(RECORD_FAILURE, params![id, error, ms(next_due), failing])
                .map(|_| ())
        })
        .await
    }

    async fn record_failures(&self, failures: &[FailureRecord]) -> Result<()> {
        let failures = failures.to_vec();
        self.with(move |c| {
            let tx = c.savepoint()?;
            {
                let mut upd = tx.prepare_cached(RECORD_FAILURE)?;
                for f in &failures {
                    upd.execute(params![f.id.as_str(), f.error, ms(f.next_due), f.failing])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn release(&self, id: &LeaseId) -> Result<()> {
        let id = id.as_str().to_string();
        self.with_lazy(move |c| {
            c.execute(
                "UPDATE leases SET claimed_by = NULL, claim_until = NULL WHERE id = ?1",
                params![id],
            )
            .map(|_| ())
        })
        .await
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        self.with_read(|c| {
            c.query_row(
                "SELECT MIN(due_at) FROM leases WHERE state <> 'revoked'",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
        })
        .await
        .map(|v| v.map(from_ms))
    }

    async fn list(&self, filter: &LeaseFilter) -> Result<Vec<Lease>> {
        let f = filter.clone();
        self.with_read(move |c| {
            let (cond, args) = filter_sql(&f);
            let mut sql = format!("SELECT {COLUMNS} FROM leases WHERE {cond}");
            sql.push_str(f.order.sql());
            // SQLite wants a LIMIT before an OFFSET; -1 is "no limit".
            if f.limit.is_some() || f.offset.is_some() {
                let limit = f.limit.map(|l| l as i64).unwrap_or(-1);
                sql.push_str(&format!(" LIMIT {limit} OFFSET {}", f.offset.unwrap_or(0)));
            }
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args), row_to_lease)?;
            rows.collect()
        })
        .await
    }

    async fn count(&self, filter: &LeaseFilter) -> Result<u64> {
        let f = filter.clone();
        self.with_read(move |c| {
            let (cond, args) = filter_sql(&f);
            let sql = format!("SELECT COUNT(*) FROM leases WHERE {cond}");
            c.query_row(&sql, rusqlite::params_from_iter(args), |r| {
                r.get::<_, i64>(0)
            })
        })
        .await
        .map(|n| n as u64)
    }

    async fn count_live(&self, identity: &str, role: &str) -> Result<u64> {
        let (identity, role) = (identity.to_string(), role.to_string());
        self.with_read(move |c| {
            c.query_row(
                "SELECT COUNT(*) FROM leases WHERE identity = ?1 AND role = ?2 AND state <> 'revoked'",
                params![identity, role],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as u64)
    }

    async fn live_usernames(&self, database: &str) -> Result<HashSet<String>> {
        let database = database.to_string();
        self.with_read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT username FROM leases WHERE database = ?1 AND state <> 'revoked'",
            )?;
            let rows = stmt.query_map(params![database], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
        .await
    }

    async fn live_among(&self, names: &[String]) -> Result<HashSet<String>> {
        let mut live = HashSet::new();
        // In slices, so a sweep over many roles never holds up the lease
        // path's writes for long.
        for chunk in names.chunks(1000) {
            let chunk = chunk.to_vec();
            let found = self
                .with_read(move |c| {
                    let mut stmt = c.prepare_cached(
                        "SELECT 1 FROM leases WHERE username = ?1 AND state <> 'revoked'",
                    )?;
                    let mut found = Vec::new();
                    for n in chunk {
                        if stmt.exists(params![n])? {
                            found.push(n);
                        }
                    }
                    Ok(found)
                })
                .await?;
            live.extend(found);
        }
        Ok(live)
    }

    async fn live_counts(&self) -> Result<Vec<(String, String, LeaseState, u64)>> {
        self.with_read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT role, database, state, COUNT(*) FROM leases WHERE state <> 'revoked' \
                 GROUP BY role, database, state",
            )?;
            let rows = stmt.query_map([], |r| {
                let state: String = r.get(2)?;
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    LeaseState::parse(&state).unwrap_or(LeaseState::Active),
                    r.get::<_, i64>(3)? as u64,
                ))
            })?;
            rows.collect()
        })
        .await
    }

    async fn prune_revoked(&self, before: DateTime<Utc>, limit: usize) -> Result<u64> {
        // Lazy: a prune lost in a crash is simply done again, so it need not
        // force an fsync on the batch it shares with the lease path.
        self.with_lazy(move |c| {
            c.execute(
                "DELETE FROM leases WHERE id IN (\
                   SELECT id FROM leases WHERE state = 'revoked' AND revoked_at < ?1 \
                   ORDER BY revoked_at LIMIT ?2) \
                 AND state = 'revoked'",
                params![ms(before), limit as i64],
            )
            .map(|n| n as u64)
        })
        .await
    }

    async fn insert_lock(&self, new: &NewLock) -> Result<Lock> {
        let lock = stamp_lock(new, Utc::now());
        let l = lock.clone();
        self.with(move |c| {
            c.execute(
                &format!("INSERT INTO locks ({LOCK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
                params![
                    l.id.as_str(),
                    l.target.kind(),
                    l.target.value(),
                    l.reason,
                    l.created_by,
                    ms(l.created_at),
                    l.expires_at.map(ms)
                ],
            )
            .map(|_| ())
        })
        .await?;
        self.locks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(lock.clone());
        Ok(lock)
    }

    async fn delete_lock(&self, id: &LockId) -> Result<Option<Lock>> {
        let key = id.as_str().to_string();
        let n = self
            .with(move |c| c.execute("DELETE FROM locks WHERE id = ?1", params![key]))
            .await?;
        let mut locks = self.locks.write().unwrap_or_else(|p| p.into_inner());
        let removed = locks
            .iter()
            .position(|l| &l.id == id)
            .map(|i| locks.remove(i));
        Ok(if n == 0 { None } else { removed })
    }

    async fn active_locks(&self) -> Result<Vec<Lock>> {
        let now = Utc::now();
        Ok(self
            .locks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| l.is_active(now))
            .cloned()
            .collect())
    }

    async fn prune_locks(&self, before: DateTime<Utc>) -> Result<u64> {
        let n = self
            .with_lazy(move |c| {
                c.execute(
                    "DELETE FROM locks WHERE expires_at IS NOT NULL AND expires_at < ?1",
                    params![ms(before)],
                )
            })
            .await?;
        self.locks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|l| l.expires_at.is_none_or(|e| e >= before));
        Ok(n as u64)
    }

    async fn insert_vault_token(&self, token: &VaultToken, cap: u32) -> Result<Vec<String>> {
        let t = token.clone();
        self.with(move |c| {
            // Atomic as `insert_intent`'s cap is: one thread runs the
            // batch's writes one after another, and this job's savepoint
            // rolls the evictions back if the insert fails.
            let held = c
                .prepare_cached(
                    "SELECT accessor, expires_at, issued_at FROM vault_tokens WHERE identity = ?1",
                )?
                .query_map(params![t.identity], |r| {
                    Ok((r.get(0)?, from_ms(r.get(1)?), from_ms(r.get(2)?)))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let gone = crate::store::evictions(held, cap);
            for accessor in &gone {
                c.prepare_cached("DELETE FROM vault_token_leases WHERE accessor = ?1")?
                    .execute(params![accessor])?;
                c.prepare_cached("DELETE FROM vault_tokens WHERE accessor = ?1")?
                    .execute(params![accessor])?;
            }
            c.execute(
                &format!(
                    "INSERT INTO vault_tokens ({VAULT_TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                ),
                params![
                    t.hash,
                    t.accessor,
                    t.identity,
                    t.cert_sha256,
                    ms(t.issued_at),
                    ms(t.expires_at)
                ],
            )?;
            Ok(gone)
        })
        .await
    }

    async fn vault_token(&self, hash: &str) -> Result<Option<VaultToken>> {
        let hash = hash.to_string();
        self.with_read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {VAULT_TOKEN_COLUMNS} FROM vault_tokens WHERE hash = ?1"
            ))?
            .query_row(params![hash], |r| {
                Ok(VaultToken {
                    hash: r.get(0)?,
                    accessor: r.get(1)?,
                    identity: r.get(2)?,
                    cert_sha256: r.get(3)?,
                    issued_at: from_ms(r.get(4)?),
                    expires_at: from_ms(r.get(5)?),
                })
            })
            .optional()
        })
        .await
    }

    async fn set_vault_token_expiry(&self, hash: &str, expires_at: DateTime<Utc>) -> Result<bool> {
        let hash = hash.to_string();
        self.with(move |c| {
            c.execute(
                "UPDATE vault_tokens SET expires_at = ?2 WHERE hash = ?1",
                params![hash, ms(expires_at)],
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn delete_vault_token(&self, hash: &str) -> Result<bool> {
        let hash = hash.to_string();
        self.with(move |c| {
            c.execute(
                "DELETE FROM vault_token_leases WHERE accessor = \
                 (SELECT accessor FROM vault_tokens WHERE hash = ?1)",
                params![hash],
            )?;
            c.execute("DELETE FROM vault_tokens WHERE hash = ?1", params![hash])
                .map(|n| n > 0)
        })
        .await
    }

    async fn link_vault_lease(&self, accessor: &str, lease: &LeaseId) -> Result<()> {
        let (accessor, lease) = (accessor.to_string(), lease.as_str().to_string());
        // Lazy: a fsync of its own tripled the cost of a Vault `creds`
        // call (11.9 ms → 3.8 ms measured, gRPC issue 3.5 ms). A process
        // crash keeps it; only a power loss before the next full commit
        // can lose it, and then revoke-self misses a lease that still
        // ends at its own expiry and stays in the store (invariant 1 is
        // the lease row's, written durably before the user exists).
        // One writer: nothing evicts the token between the check and the
        // insert.
        let linked = self
            .with_lazy(move |c| {
                let held: bool = c
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM vault_tokens WHERE accessor = ?1)")?
                    .query_row(params![accessor], |r| r.get(0))?;
                if held {
                    c.prepare_cached(
                        "INSERT OR IGNORE INTO vault_token_leases (accessor, lease_id) VALUES (?1, ?2)",
                    )?
                    .execute(params![accessor, lease])?;
                }
                Ok(held)
            })
            .await?;
        if linked {
            Ok(())
        } else {
            Err(crate::store::gone_token())
        }
    }

    async fn vault_token_leases(&self, accessor: &str) -> Result<Vec<LeaseId>> {
        let accessor = accessor.to_string();
        self.with_read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT lease_id FROM vault_token_leases WHERE accessor = ?1 ORDER BY lease_id",
            )?;
            let rows = stmt.query_map(params![accessor], |r| {
                r.get::<_, String>(0).map(LeaseId::from_store)
            })?;
            rows.collect()
        })
        .await
    }

    async fn prune_vault_tokens(&self, before: DateTime<Utc>) -> Result<u64> {
        self.with_lazy(move |c| {
            c.execute(
                "DELETE FROM vault_token_leases WHERE accessor IN \
                 (SELECT accessor FROM vault_tokens WHERE expires_at < ?1)",
                params![ms(before)],
            )?;
            c.execute(
                "DELETE FROM vault_tokens WHERE expires_at < ?1",
                params![ms(before)],
            )
            .map(|n| n as u64)
        })
        .await
    }

    async fn live_identities(&self) -> Result<Vec<String>> {
        self.with_read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT DISTINCT identity FROM leases WHERE state <> 'revoked' ORDER BY identity",
            )?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
        .await
    }

    async fn recover_after_start(&self, now: DateTime<Utc>) -> Result<u64> {
        self.with(move |c| {
            c.execute(
                "UPDATE leases SET due_at = MIN(due_at, ?1), claimed_by = NULL, claim_until = NULL \
                 WHERE state = 'pending'",
                params![ms(now)],
            )?;
            // This file has one owner: claims on static roles are ours,
            // from before the restart (a rotation's intent stays pending).
            c.execute(
                "UPDATE static_roles SET claimed_by = NULL, claim_until = NULL",
                [],
            )?;
            // A claim of our own previous life is a revocation that was under
            // way when we died: the drop may have happened without the store
            // hearing of it. Finish it now (drops are idempotent) rather than
            // at expiry, and free the claim — this file has one owner.
            c.execute(
                "UPDATE leases SET due_at = MIN(due_at, ?1), claimed_by = NULL, claim_until = NULL \
                 WHERE claimed_by IS NOT NULL AND state <> 'revoked'",
                params![ms(now)],
            )
            .map(|n| n as u64)
        })
        .await
    }

    async fn static_get(&self, role: &str) -> Result<Option<StaticState>> {
        let role = role.to_string();
        self.with_read(move |c| {
            c.query_row(
                &format!("SELECT {STATIC_COLUMNS} FROM static_roles WHERE role = ?1"),
                params![role],
                row_to_static,
            )
            .optional()
        })
        .await
    }

    async fn static_list(&self) -> Result<Vec<StaticState>> {
        self.with_read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {STATIC_COLUMNS} FROM static_roles ORDER BY role"
            ))?;
            let rows = stmt.query_map([], row_to_static)?;
            rows.collect()
        })
        .await
    }

    async fn static_claim(&self, role: &str, claim: &Claim) -> Result<Option<StaticState>> {
        let (role, owner, until, now) = (
            role.to_string(),
            claim.owner.clone(),
            ms(claim.until),
            ms(Utc::now()),
        );
        // Lazy like revocation claims: a restart voids claims anyway.
        self.with_lazy(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO static_roles (role) VALUES (?1)",
                params![role],
            )?;
            let n = c.execute(
                "UPDATE static_roles SET claimed_by = ?2, claim_until = ?3 WHERE role = ?1 \
                 AND (claimed_by IS NULL OR claimed_by = ?2 OR claim_until < ?4)",
                params![role, owner, until, now],
            )?;
            if n == 0 {
                return Ok(None);
            }
            c.query_row(
                &format!("SELECT {STATIC_COLUMNS} FROM static_roles WHERE role = ?1"),
                params![role],
                row_to_static,
            )
            .map(Some)
        })
        .await
    }

    async fn static_save(&self, state: &StaticState, owner: &str) -> Result<bool> {
        let s = state.clone();
        let owner = owner.to_string();
        let now = ms(Utc::now());
        // Full durability: a pending rotation must be on disk before the
        // database hears of it.
        self.with(move |c| {
            let cur = s.current.as_ref();
            let prev = s.previous.as_ref();
            let pend = s.pending.as_ref();
            c.execute(
                "UPDATE static_roles SET generation = ?2, current_name = ?3, current_sealed = ?4, \
                 rotated_at = ?5, valid_until = ?6, next_rotation_at = ?7, previous_name = ?8, \
                 retire_at = ?9, pending_kind = ?10, pending_name = ?11, pending_sealed = ?12, \
                 pending_generation = ?13, pending_valid_until = ?14, last_error = ?15 \
                 WHERE role = ?1 AND claimed_by = ?16 AND claim_until >= ?17",
                params![
                    s.role,
                    s.generation as i64,
                    cur.map(|c| c.user.clone()),
                    cur.map(|c| c.sealed.clone()),
                    cur.map(|c| ms(c.rotated_at)),
                    cur.map(|c| ms(c.valid_until)),
                    s.next_rotation_at.map(ms),
                    prev.map(|p| p.user.clone()),
                    prev.map(|p| ms(p.retire_at)),
                    pend.map(|p| p.kind.as_str()),
                    pend.map(|p| p.user.clone()),
                    pend.map(|p| p.sealed.clone()),
                    pend.map(|p| p.generation as i64),
                    pend.map(|p| ms(p.valid_until)),
                    s.last_error,
                    owner,
                    now
                ],
            )
            .map(|n| n == 1)
        })
        .await
    }

    async fn static_release(&self, role: &str, owner: &str) -> Result<()> {
        let (role, owner) = (role.to_string(), owner.to_string());
        self.with_lazy(move |c| {
            c.execute(
                "UPDATE static_roles SET claimed_by = NULL, claim_until = NULL \
                 WHERE role = ?1 AND claimed_by = ?2",
                params![role, owner],
            )
            .map(|_| ())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LeaseOrder;

    /// SQLite's plan for a listing with `f` (no statistics, as in a broker).
    fn plan(c: &Connection, f: &LeaseFilter) -> String {
        let (cond, args) = filter_sql(f);
        let sql = format!(
            "EXPLAIN QUERY PLAN SELECT {COLUMNS} FROM leases WHERE {cond}{} LIMIT 100",
            f.order.sql()
        );
        let mut stmt = c.prepare(&sql).unwrap();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap();
        rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("; ")
    }

    /// The schema reads top-down: `MIGRATION_1` … `MIGRATION_{SCHEMA_VERSION}`
    /// declared in that order, each once, none missing.
    #[test]
    fn migrations_are_declared_in_order() {
        let declared: Vec<i64> = include_str!("sqlite.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("const MIGRATION_"))
            .filter_map(|rest| rest.split(':').next()?.parse().ok())
            .collect();
        let want: Vec<i64> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(declared, want);
    }

    /// A page of one role's or database's leases walks an index in expiry
    /// order (no sort of every lease they hold); a listing by identity
    /// keeps to the identity's index; the sweep's lookup by name uses one.
    #[test]
    fn listings_and_the_sweep_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let c = SqliteStore::open_blocking(&dir.path().join("s.db")).unwrap();
        let s = |v: &str| Some(v.to_string());
        let role = LeaseFilter {
            role: s("r"),
            ..Default::default()
        };
        let p = plan(&c, &role);
        assert!(
            p.contains("leases_live_role_expiry") && !p.contains("B-TREE"),
            "{p}"
        );
        let db = LeaseFilter {
            database: s("d"),
            order: LeaseOrder::ExpiresLast,
            ..Default::default()
        };
        let p = plan(&c, &db);
        assert!(
            p.contains("leases_live_database_expiry") && !p.contains("B-TREE"),
            "{p}"
        );
        let both = LeaseFilter {
            role: s("r"),
            database: s("d"),
            expiring_before: Some(Utc::now()),
            ..Default::default()
        };
        let p = plan(&c, &both);
        assert!(
            p.contains("leases_live_role_expiry") && !p.contains("B-TREE"),
            "{p}"
        );
        let who = LeaseFilter {
            identity: s("spiffe://td/a"),
            role: s("r"),
            database: s("d"),
            ..Default::default()
        };
        assert!(plan(&c, &who).contains("leases_live_identity"));
        let detail: String = c
            .query_row(
                "EXPLAIN QUERY PLAN SELECT 1 FROM leases WHERE username = ?1 AND state <> 'revoked'",
                ["u"],
                |r| r.get(3),
            )
            .unwrap();
        assert!(detail.contains("leases_live_username"), "{detail}");
    }
}
