//! Leases in PostgreSQL: intents, activation, claims, listings.

use std::collections::HashSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{corrupt, pg_err, PostgresStore};
use crate::error::Result;
use crate::lease::{BackendKind, Lease, LeaseId, LeaseState, Username};
use crate::store::{cap_reached, Claim, FailureRecord, LeaseFilter, LeaseStore};

const COLUMNS: &str = "id, role, database, kind, username, user_host, identity, state, issued_at, \
                       expires_at, max_expires_at, due_at, revoked_at, revoke_attempts, last_error, \
                       grant_id";

const INSERT_INTENT: &str =
    "INSERT INTO credbroker_leases (id, role, database, kind, username, user_host, identity, \
     state, issued_at, expires_at, max_expires_at, due_at, grant_id) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

const RECORD_FAILURE: &str = "UPDATE credbroker_leases SET revoke_attempts = revoke_attempts + 1, \
     last_error = $2, due_at = $3, \
     state = CASE WHEN $4 AND state <> 'revoked' THEN 'failing' ELSE state END, \
     claimed_by = NULL, claim_until = NULL WHERE id = $1";

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
    if let Some(g) = &f.grant {
        push(&mut sql, "grant_id =", Box::new(g.clone()));
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
        grant_id: row.get(15),
    })
}

fn rows_to_leases(rows: &[Row]) -> Result<Vec<Lease>> {
    rows.iter().map(row_to_lease).collect()
}

/// Milliseconds a claim has left, for `clock_timestamp() + …` on the server.
pub(super) fn claim_ms(claim: &Claim) -> f64 {
    (claim.until - Utc::now()).num_milliseconds().max(0) as f64
}

#[async_trait]
impl LeaseStore for PostgresStore {
    async fn insert_intent(&self, l: &Lease, cap: Option<u32>) -> Result<()> {
        let params: [&(dyn ToSql + Sync); 13] = [
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
            &l.grant_id,
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
            Err(crate::store::not_activated())
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
        let rows = self.query_built("list", &sql, &args).await?;
        rows_to_leases(&rows)
    }

    async fn count(&self, f: &LeaseFilter) -> Result<u64> {
        let (cond, args) = filter_sql(f);
        let sql = format!("SELECT count(*) FROM credbroker_leases WHERE {cond}");
        let rows = self.query_built("count", &sql, &args).await?;
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

    async fn busiest_identity(&self) -> Result<Vec<(String, u64)>> {
        let rows = self
            .query(
                "busiest identity",
                "SELECT role, max(n) FROM (SELECT role, identity, count(*) AS n \
                 FROM credbroker_leases WHERE state <> 'revoked' GROUP BY role, identity) per \
                 GROUP BY role",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
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

    async fn live_page(&self, after: Option<&LeaseId>, limit: usize) -> Result<Vec<Lease>> {
        // Ids are never empty, so "" sorts before the first.
        let after = after.map_or("", |a| a.as_str());
        let rows = self
            .query(
                "live page",
                &format!(
                    "SELECT {COLUMNS} FROM credbroker_leases WHERE state <> 'revoked' AND id > $1 \
                     ORDER BY id LIMIT $2"
                ),
                &[&after, &(limit as i64)],
            )
            .await?;
        rows_to_leases(&rows)
    }

    async fn import_leases(&self, leases: &[Lease]) -> Result<()> {
        // The text forms first: the parameters below borrow them.
        let parts: Vec<(&str, &str, &str, &str, i32)> = leases
            .iter()
            .map(|l| {
                (
                    l.id.as_str(),
                    l.kind.as_str(),
                    l.username.as_str(),
                    l.state.as_str(),
                    i32::try_from(l.revoke_attempts).unwrap_or(i32::MAX),
                )
            })
            .collect();
        let rows: Vec<Vec<&(dyn ToSql + Sync)>> = leases
            .iter()
            .zip(&parts)
            .map(|(l, (id, kind, user, state, attempts))| {
                vec![
                    id as &(dyn ToSql + Sync),
                    &l.role,
                    &l.database,
                    kind,
                    user,
                    &l.user_host,
                    &l.identity,
                    state,
                    &l.issued_at,
                    &l.expires_at,
                    &l.max_expires_at,
                    &l.due_at,
                    &l.revoked_at,
                    attempts,
                    &l.last_error,
                    &l.grant_id,
                ]
            })
            .collect();
        self.execute_many(
            "import leases",
            &format!(
                "INSERT INTO credbroker_leases ({COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
            ),
            &rows,
        )
        .await
    }
}
