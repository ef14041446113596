//! Admin locks in PostgreSQL, stamped on the database's clock.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::PostgresStore;
use crate::error::{Error, Result};
use crate::lock::{Lock, LockId, LockTarget, NewLock};
use crate::store::LockStore;

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

#[async_trait]
impl LockStore for PostgresStore {
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

    async fn import_locks(&self, locks: &[Lock]) -> Result<()> {
        let parts: Vec<(&str, &str, &str)> = locks
            .iter()
            .map(|l| (l.id.as_str(), l.target.kind(), l.target.value()))
            .collect();
        let rows: Vec<Vec<&(dyn ToSql + Sync)>> = locks
            .iter()
            .zip(&parts)
            .map(|(l, (id, kind, value))| {
                vec![
                    id as &(dyn ToSql + Sync),
                    kind,
                    value,
                    &l.reason,
                    &l.created_by,
                    &l.created_at,
                    &l.expires_at,
                ]
            })
            .collect();
        self.execute_many(
            "import locks",
            &format!(
                "INSERT INTO credbroker_locks ({LOCK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ),
            &rows,
        )
        .await
    }
}
