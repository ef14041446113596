//! The PostgreSQL store's schema: numbered migrations, declared and
//! applied in order, recorded in `credbroker_schema_migrations`.

use super::{pg_err, PostgresStore};
use crate::error::{Error, Result};

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
    // Lease and lock events across replicas (`relay.rs`): each row is one
    // event a replica published, announced with NOTIFY; the others read the
    // rows after the last they saw. `IF NOT EXISTS` on purpose: brokers
    // before this migration created the same table (same columns, same
    // index) themselves at start, so a store they ran on has it already
    // and must migrate without error — the statement then does nothing
    // and keeps the rows, which other replicas may still be reading.
    //
    // And named keys shared by the replicas: the console's CSRF key
    // (`console_csrf`), made by the first broker that asks (`console_key`)
    // so a form served by one replica is accepted by another.
    (
        11,
        "event table of the relay across replicas, and shared keys",
        "CREATE TABLE IF NOT EXISTS credbroker_lease_events (
            seq     bigserial PRIMARY KEY,
            origin  text NOT NULL,
            at      timestamptz NOT NULL DEFAULT clock_timestamp(),
            event   jsonb NOT NULL
        );
        CREATE INDEX IF NOT EXISTS credbroker_lease_events_at ON credbroker_lease_events (at);
        CREATE TABLE credbroker_keys (
            name       text PRIMARY KEY,
            key        bytea NOT NULL CHECK (length(key) = 32),
            created_at timestamptz NOT NULL DEFAULT clock_timestamp()
        );",
    ),
    // Just-in-time access (`access`): requests and grants, shared by every
    // replica (a compare-and-set `version`; `due_at` for the expiry loop;
    // the rest a JSON body), and the grant each lease was issued under.
    (
        12,
        "access requests and lease grants",
        "ALTER TABLE credbroker_leases ADD COLUMN IF NOT EXISTS grant_id text;
         CREATE INDEX IF NOT EXISTS credbroker_leases_grant
            ON credbroker_leases (grant_id) WHERE grant_id IS NOT NULL;
         CREATE TABLE IF NOT EXISTS credbroker_access_requests (
            id         text PRIMARY KEY,
            state      text NOT NULL
                CHECK (state IN ('pending', 'granted', 'denied', 'expired', 'ended')),
            requester  text NOT NULL,
            created_at timestamptz NOT NULL,
            due_at     timestamptz,
            version    bigint NOT NULL,
            body       text NOT NULL
         );
         CREATE INDEX IF NOT EXISTS credbroker_access_requests_due
            ON credbroker_access_requests (due_at) WHERE due_at IS NOT NULL;
         CREATE INDEX IF NOT EXISTS credbroker_access_requests_created
            ON credbroker_access_requests (created_at, id);
         CREATE INDEX IF NOT EXISTS credbroker_access_requests_requester
            ON credbroker_access_requests (requester, state);",
    ),
];

/// Every migration this build knows, in order (numbers may be reserved
/// by work in progress elsewhere, so not necessarily 1..=N).
pub fn migration_versions() -> Vec<i32> {
    MIGRATIONS.iter().map(|m| m.0).collect()
}

/// The newest schema this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

impl PostgresStore {
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
}
