//! Leases in SQLite: intents, activation, claims, listings.

use std::collections::HashSet;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{from_ms, ms, SqliteStore};
use crate::error::{Error, Result};
use crate::lease::{BackendKind, Lease, LeaseId, LeaseState, Username};
use crate::store::{cap_reached, Claim, FailureRecord, HolderClaim, LeaseFilter, LeaseStore};

/// One lease by id: the gate's read and every guarded update's read-back,
/// kept prepared (built once: `COLUMNS` is shared with the listings).
static BY_ID: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {COLUMNS} FROM leases WHERE id = ?1"));

const RECORD_FAILURE: &str =
    "UPDATE leases SET revoke_attempts = revoke_attempts + 1, last_error = ?2, \
     due_at = ?3, state = CASE WHEN ?4 AND state <> 'revoked' THEN 'failing' ELSE state END, \
     claimed_by = NULL, claim_until = NULL WHERE id = ?1";

const COLUMNS: &str = "id, role, database, kind, username, user_host, identity, state, issued_at, \
                       expires_at, max_expires_at, due_at, revoked_at, revoke_attempts, last_error, \
                       grant_id";

/// Pending → active, unless a revoker claimed the intent (`activate`).
pub(super) const ACTIVATE: &str = "UPDATE leases SET state = 'active', due_at = expires_at \
     WHERE id = ?1 AND state = 'pending' AND claimed_by IS NULL";

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
        grant_id: row.get(15)?,
    })
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
    if let Some(g) = &f.grant {
        push(&mut sql, "grant_id =", g.clone().into());
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

/// Runs a guarded `UPDATE` of lease `id` and reads the row back when it
/// matched (the guard held): one step of the writer. No savepoint of its
/// own: every write job already runs inside the group commit's
/// `SAVEPOINT req`, rolled back when the job fails half-way
/// (`store/group_commit.rs`). Statements are kept prepared: each lease
/// passes here on its hot path (with the savepoints gone, 17 % fewer
/// instructions per lease; BENCHMARKS.md).
fn update_one(
    c: &mut Connection,
    sql: &str,
    params: impl rusqlite::Params,
    id: &str,
) -> rusqlite::Result<Option<Lease>> {
    if c.prepare_cached(sql)?.execute(params)? == 1 {
        c.prepare_cached(&BY_ID)?
            .query_row(params![id], row_to_lease)
            .optional()
    } else {
        Ok(None)
    }
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
                    let live: i64 = c
                        .prepare_cached(
                            "SELECT COUNT(*) FROM leases \
                             WHERE identity = ?1 AND role = ?2 AND state <> 'revoked'",
                        )?
                        .query_row(params![l.identity, l.role], |r| r.get(0))?;
                    if live >= i64::from(cap) {
                        return Ok(Some(live as u64));
                    }
                }
                c.prepare_cached(
                    "INSERT INTO leases (id, role, database, kind, username, user_host, identity, state, \
                     issued_at, expires_at, max_expires_at, due_at, grant_id) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )?
                .execute(params![
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
                        ms(l.due_at),
                        l.grant_id
                    ])?;
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
            .with(move |c| c.prepare_cached(ACTIVATE)?.execute(params![id]))
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(crate::store::not_activated())
        }
    }

    async fn get(&self, id: &LeaseId) -> Result<Option<Lease>> {
        let id = id.as_str().to_string();
        self.with_read(move |c| {
            c.prepare_cached(&BY_ID)?
                .query_row(params![id], row_to_lease)
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
            // No savepoint of its own: the group commit's (see `update_one`).
            let n = c
                .prepare_cached(
                    "UPDATE leases SET claimed_by = ?2, claim_until = ?3, due_at = MIN(due_at, ?4) \
                     WHERE id = ?1 AND state <> 'revoked' AND (?5 IS NULL OR identity = ?5) \
                     AND (claimed_by IS NULL OR claimed_by = ?2 OR claim_until < ?4)",
                )?
                .execute(params![id, claim.owner, ms(claim.until), now, holder])?;
            let lease = c
                .prepare_cached(&BY_ID)?
                .query_row(params![id], row_to_lease)
                .optional()?;
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
            // All or none by the group commit's savepoint (see `update_one`).
            let leases = {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM leases WHERE state <> 'revoked' AND due_at <= ?1 \
                     AND (claimed_by IS NULL OR claim_until < ?1) ORDER BY due_at LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![ms(now), limit as i64], row_to_lease)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            let mut upd = c.prepare_cached(
                "UPDATE leases SET claimed_by = ?2, claim_until = ?3 WHERE id = ?1",
            )?;
            for l in &leases {
                upd.execute(params![l.id.as_str(), claim.owner, ms(claim.until)])?;
            }
            Ok(leases)
        })
        .await
    }

    async fn mark_revoked(&self, ids: &[LeaseId], at: DateTime<Utc>) -> Result<()> {
        let ids: Vec<String> = ids.iter().map(|i| i.as_str().to_string()).collect();
        self.with(move |c| {
            // All or none by the group commit's savepoint (see `update_one`).
            let mut upd = c.prepare_cached(
                "UPDATE leases SET state = 'revoked', revoked_at = ?2, claimed_by = NULL, claim_until = NULL \
                 WHERE id = ?1",
            )?;
            for id in &ids {
                upd.execute(params![id, ms(at)])?;
            }
            Ok(())
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
        // Lazy: the users are already gone, durably, in their database.
        // A power loss that takes this mark with it leaves a live row
        // whose user does not exist — the harmless direction (invariant 1
        // is about users without a row): start-up finishes a claimed row
        // at once, an unclaimed one is revoked again at expiry, and both
        // find nothing to drop and mark it then. A process crash keeps it.
        // (ARCHITECTURE.md, "What a revocation's answer waits for".)
        self.with_lazy(move |c| {
            // All or none by the group commit's savepoint (see `update_one`).
            let mut marked = Vec::new();
            let mut upd = c.prepare_cached(
                "UPDATE leases SET state = 'revoked', revoked_at = ?2, claimed_by = NULL, claim_until = NULL \
                 WHERE id = ?1 AND claimed_by = ?3 AND state <> 'revoked'",
            )?;
            for id in ids {
                if upd.execute(params![id.as_str(), ms(at), owner])? == 1 {
                    marked.push(id);
                }
            }
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
            // All or none by the group commit's savepoint (see `update_one`).
            let mut upd = c.prepare_cached(RECORD_FAILURE)?;
            for f in &failures {
                upd.execute(params![f.id.as_str(), f.error, ms(f.next_due), f.failing])?;
            }
            Ok(())
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

    async fn busiest_identity(&self) -> Result<Vec<(String, u64)>> {
        self.with_read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT role, MAX(n) FROM (SELECT role, identity, COUNT(*) AS n FROM leases \
                 WHERE state <> 'revoked' GROUP BY role, identity) GROUP BY role",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            rows.collect()
        })
        .await
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

    async fn live_page(&self, after: Option<&LeaseId>, limit: usize) -> Result<Vec<Lease>> {
        // Ids are never empty, so "" sorts before the first.
        let after = after.map_or(String::new(), |a| a.as_str().to_string());
        self.with_read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM leases WHERE state <> 'revoked' AND id > ?1 \
                 ORDER BY id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after, limit as i64], row_to_lease)?;
            rows.collect()
        })
        .await
    }

    async fn import_leases(&self, leases: &[Lease]) -> Result<()> {
        let leases = leases.to_vec();
        // One job: its savepoint makes the page all or nothing.
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "INSERT INTO leases ({COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
            ))?;
            for l in &leases {
                stmt.execute(params![
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
                    ms(l.due_at),
                    l.revoked_at.map(ms),
                    i64::from(l.revoke_attempts),
                    l.last_error,
                    l.grant_id
                ])?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LeaseOrder;
    use rusqlite::Connection;

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

    /// A page of one role's or database's leases walks an index in expiry
    /// order (no sort of every lease they hold); a listing by identity
    /// keeps to the identity's index; the sweep's lookup by name uses one.
    #[test]
    fn listings_and_the_sweep_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let c = SqliteStore::open_blocking(&dir.path().join("s.db")).unwrap();
        let s = |v: &str| Some(v.to_string());
        // A page by role, by database (newest expiry first), by both with
        // an expiry bound: each walks its index, with no sort.
        for (filter, index) in [
            (
                LeaseFilter {
                    role: s("r"),
                    ..Default::default()
                },
                "leases_live_role_expiry",
            ),
            (
                LeaseFilter {
                    database: s("d"),
                    order: LeaseOrder::ExpiresLast,
                    ..Default::default()
                },
                "leases_live_database_expiry",
            ),
            (
                LeaseFilter {
                    role: s("r"),
                    database: s("d"),
                    expiring_before: Some(Utc::now()),
                    ..Default::default()
                },
                "leases_live_role_expiry",
            ),
        ] {
            let p = plan(&c, &filter);
            assert!(p.contains(index) && !p.contains("B-TREE"), "{p}");
        }
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
