//! Vault-API tokens and their lease links in SQLite.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};

use super::leases::ACTIVATE;
use super::{from_ms, ms, SqliteStore};
use crate::error::Result;
use crate::lease::LeaseId;
use crate::store::{Linked, TokenStore, VaultToken};

const VAULT_TOKEN_COLUMNS: &str = "hash, accessor, identity, cert_sha256, issued_at, expires_at";

/// A row of `VAULT_TOKEN_COLUMNS`.
fn row_to_token(r: &rusqlite::Row) -> rusqlite::Result<VaultToken> {
    Ok(VaultToken {
        hash: r.get(0)?,
        accessor: r.get(1)?,
        identity: r.get(2)?,
        cert_sha256: r.get(3)?,
        issued_at: from_ms(r.get(4)?),
        expires_at: from_ms(r.get(5)?),
    })
}

#[async_trait]
impl TokenStore for SqliteStore {
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
            .query_row(params![hash], row_to_token)
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

    async fn activate_linked(&self, id: &LeaseId, accessor: &str) -> Result<()> {
        let (id, accessor) = (id.as_str().to_string(), accessor.to_string());
        // One job on the one writer, in its own savepoint: nothing evicts
        // the token between the check and the writes, and the activation
        // and the link commit together. Full durability, as `activate`'s:
        // the link rides the same commit, so it costs no fsync of its own.
        self.with(move |c| {
            let held: bool = c
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM vault_tokens WHERE accessor = ?1)")?
                .query_row(params![accessor], |r| r.get(0))?;
            if !held {
                return Ok(Linked::TokenGone);
            }
            if c.prepare_cached(ACTIVATE)?.execute(params![id])? != 1 {
                return Ok(Linked::NotPending);
            }
            c.prepare_cached(
                "INSERT OR IGNORE INTO vault_token_leases (accessor, lease_id) VALUES (?1, ?2)",
            )?
            .execute(params![accessor, id])?;
            Ok(Linked::Done)
        })
        .await?
        .into_result()
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

    async fn token_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<VaultToken>> {
        let after = after.unwrap_or("").to_string();
        self.with_read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {VAULT_TOKEN_COLUMNS} FROM vault_tokens WHERE hash > ?1 \
                 ORDER BY hash LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after, limit as i64], row_to_token)?;
            rows.collect()
        })
        .await
    }

    async fn token_link_page(
        &self,
        after: Option<&(String, LeaseId)>,
        limit: usize,
    ) -> Result<Vec<(String, LeaseId)>> {
        let (a, l) = after.map_or((String::new(), String::new()), |(a, l)| {
            (a.clone(), l.as_str().to_string())
        });
        self.with_read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT accessor, lease_id FROM vault_token_leases \
                 WHERE (accessor, lease_id) > (?1, ?2) ORDER BY accessor, lease_id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![a, l, limit as i64], |r| {
                Ok((r.get(0)?, LeaseId::from_store(r.get(1)?)))
            })?;
            rows.collect()
        })
        .await
    }

    async fn import_token_links(&self, links: &[(String, LeaseId)]) -> Result<()> {
        let links = links.to_vec();
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "INSERT INTO vault_token_leases (accessor, lease_id) VALUES (?1, ?2)",
            )?;
            for (a, l) in &links {
                stmt.execute(params![a, l.as_str()])?;
            }
            Ok(())
        })
        .await
    }
}
