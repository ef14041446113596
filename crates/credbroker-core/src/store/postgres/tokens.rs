//! Vault-API tokens and their lease links in PostgreSQL.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use tokio_postgres::types::ToSql;

use super::{pg_err, PostgresStore};
use crate::error::Result;
use crate::lease::LeaseId;
use crate::store::{Linked, TokenStore, VaultToken};

const VAULT_TOKEN_COLUMNS: &str = "hash, accessor, identity, cert_sha256, issued_at, expires_at";

/// First key of the `pg_advisory_xact_lock(int4, int4)` a login holds
/// per identity ("vtok"; the second key is the identity's hash).
const VAULT_TOKEN_LOCK: i32 = 0x7674_6f6b;

/// A row of `VAULT_TOKEN_COLUMNS`.
fn row_to_token(r: &tokio_postgres::Row) -> VaultToken {
    VaultToken {
        hash: r.get(0),
        accessor: r.get(1),
        identity: r.get(2),
        cert_sha256: r.get(3),
        issued_at: r.get(4),
        expires_at: r.get(5),
    }
}

#[async_trait]
impl TokenStore for PostgresStore {
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
            // token's row (`activate_linked`), so the token delete waits
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
        Ok(rows.first().map(row_to_token))
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

    async fn activate_linked(&self, id: &LeaseId, accessor: &str) -> Result<()> {
        // One statement, so one atomic step: the token row is share-locked
        // (an eviction or a revoke-self deleting it waits, then deletes
        // this link too), the intent activated only while the token is
        // held, and the link written only with the activation.
        let rows = self
            .query(
                "activate linked lease",
                "WITH t AS (SELECT accessor FROM credbroker_vault_tokens WHERE accessor = $1 FOR SHARE), \
                 a AS (UPDATE credbroker_leases SET state = 'active', due_at = expires_at \
                       WHERE id = $2 AND state = 'pending' AND claimed_by IS NULL \
                       AND EXISTS (SELECT 1 FROM t) RETURNING id), \
                 i AS (INSERT INTO credbroker_vault_token_leases (accessor, lease_id) \
                       SELECT t.accessor, a.id FROM t, a ON CONFLICT DO NOTHING) \
                 SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM a)",
                &[&accessor, &id.as_str()],
            )
            .await?;
        let count = |i: usize| rows.first().map(|r| r.get::<_, i64>(i)).unwrap_or(0);
        Linked::of(count(0) > 0, count(1) > 0).into_result()
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

    async fn token_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<VaultToken>> {
        let rows = self
            .query(
                "vault token page",
                &format!(
                    "SELECT {VAULT_TOKEN_COLUMNS} FROM credbroker_vault_tokens WHERE hash > $1 \
                     ORDER BY hash LIMIT $2"
                ),
                &[&after.unwrap_or(""), &(limit as i64)],
            )
            .await?;
        Ok(rows.iter().map(row_to_token).collect())
    }

    async fn token_link_page(
        &self,
        after: Option<&(String, LeaseId)>,
        limit: usize,
    ) -> Result<Vec<(String, LeaseId)>> {
        let (a, l) = after.map_or(("", ""), |(a, l)| (a.as_str(), l.as_str()));
        let rows = self
            .query(
                "vault token link page",
                "SELECT accessor, lease_id FROM credbroker_vault_token_leases \
                 WHERE (accessor, lease_id) > ($1, $2) ORDER BY accessor, lease_id LIMIT $3",
                &[&a, &l, &(limit as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), LeaseId::from_store(r.get(1))))
            .collect())
    }

    async fn import_token_links(&self, links: &[(String, LeaseId)]) -> Result<()> {
        let ids: Vec<&str> = links.iter().map(|(_, l)| l.as_str()).collect();
        let rows: Vec<Vec<&(dyn ToSql + Sync)>> = links
            .iter()
            .zip(&ids)
            .map(|((a, _), id)| vec![a as &(dyn ToSql + Sync), id])
            .collect();
        self.execute_many(
            "import vault token links",
            "INSERT INTO credbroker_vault_token_leases (accessor, lease_id) VALUES ($1, $2)",
            &rows,
        )
        .await
    }
}
