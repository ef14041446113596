//! Admin locks in SQLite, mirrored in memory (see `SqliteStore::locks`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

use super::{from_ms, ms, SqliteStore};
use crate::error::{Error, Result};
use crate::lock::{Lock, LockId, LockTarget, NewLock};
use crate::store::group_commit::db_err;
use crate::store::{stamp_lock, LockStore};

const LOCK_COLUMNS: &str = "id, kind, value, reason, created_by, created_at, expires_at";

/// Every stored lock. One that this build cannot read (a pattern syntax it
/// does not know) fails the start rather than be skipped: a lock skipped is
/// a refusal silently lifted.
pub(super) fn load_locks(conn: &Connection) -> Result<Vec<Lock>> {
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

/// Writes lock `l` as it is.
fn insert_row(c: &Connection, l: &Lock) -> rusqlite::Result<()> {
    c.prepare_cached(&format!(
        "INSERT INTO locks ({LOCK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    ))?
    .execute(params![
        l.id.as_str(),
        l.target.kind(),
        l.target.value(),
        l.reason,
        l.created_by,
        ms(l.created_at),
        l.expires_at.map(ms)
    ])
    .map(|_| ())
}

#[async_trait]
impl LockStore for SqliteStore {
    async fn insert_lock(&self, new: &NewLock) -> Result<Lock> {
        let lock = stamp_lock(new, Utc::now());
        let l = lock.clone();
        self.with(move |c| insert_row(c, &l)).await?;
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

    async fn import_locks(&self, locks: &[Lock]) -> Result<()> {
        let new = locks.to_vec();
        self.with(move |c| new.iter().try_for_each(|l| insert_row(c, l)))
            .await?;
        // After the write is durable, as `insert_lock`.
        self.locks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(locks.iter().cloned());
        Ok(())
    }
}
