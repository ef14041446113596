//! Static roles' rotation state in SQLite.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension, Row};

use super::{from_ms, ms, SqliteStore};
use crate::error::Result;
use crate::store::{Claim, StaticState, StaticStore};

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

#[async_trait]
impl StaticStore for SqliteStore {
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
