//! The SQLite store's schema, one migration per version, declared and
//! applied in order. Released migrations are never edited, only followed:
//! `PRAGMA user_version` says which ones a file already has.

use rusqlite::Connection;

use crate::error::Result;

pub(super) const SCHEMA_VERSION: i64 = 10;

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

/// Just-in-time access (`access`): requests and grants (a compare-and-set
/// `version`, the expiry loop's `due_at`, the rest a JSON body), and the
/// grant each lease was issued under, so ending a grant finds its leases.
const MIGRATION_10: &str = "
ALTER TABLE leases ADD COLUMN grant_id TEXT;
CREATE INDEX IF NOT EXISTS leases_grant ON leases(grant_id) WHERE grant_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS access_requests (
    id         TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    requester  TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    due_at     INTEGER,
    version    INTEGER NOT NULL,
    body       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS access_requests_due ON access_requests(due_at) WHERE due_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS access_requests_created ON access_requests(created_at, id);
CREATE INDEX IF NOT EXISTS access_requests_requester ON access_requests(requester, state);
";

/// `MIGRATION_1` … `MIGRATION_{SCHEMA_VERSION}`: the one at index `i`
/// reaches version `i + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    MIGRATION_1,
    MIGRATION_2,
    MIGRATION_3,
    MIGRATION_4,
    MIGRATION_5,
    MIGRATION_6,
    MIGRATION_7,
    MIGRATION_8,
    MIGRATION_9,
    MIGRATION_10,
];

/// Applies the migrations a file at schema `version` lacks, each in its
/// own transaction with the version it reaches.
pub(super) fn apply(
    conn: &Connection,
    version: i64,
    ctx: &dyn Fn(&str, rusqlite::Error) -> crate::error::Error,
) -> Result<()> {
    for (reached, sql) in (1..).zip(MIGRATIONS).skip(version.max(0) as usize) {
        let tx_sql = format!("BEGIN IMMEDIATE; {sql} PRAGMA user_version = {reached}; COMMIT;");
        conn.execute_batch(&tx_sql).map_err(|e| match reached {
            1 => ctx(
                "cannot create schema (is another broker using this file?)",
                e,
            ),
            _ => ctx(&format!("cannot migrate schema to version {reached}"), e),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema reads top-down: `MIGRATION_1` … `MIGRATION_{SCHEMA_VERSION}`
    /// declared in that order, each once, none missing.
    #[test]
    fn migrations_are_declared_in_order() {
        let declared: Vec<i64> = include_str!("migrations.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("const MIGRATION_"))
            .filter_map(|rest| rest.split(':').next()?.parse().ok())
            .collect();
        let want: Vec<i64> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(declared, want);
    }
}
