//! Static roles' rotation state in PostgreSQL.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::Row;

use super::leases::claim_ms;
use super::PostgresStore;
use crate::error::{Error, Result};
use crate::store::{Claim, StaticState, StaticStore};

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

#[async_trait]
impl StaticStore for PostgresStore {
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
