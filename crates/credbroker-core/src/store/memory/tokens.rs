//! Vault-API tokens and their lease links in memory.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{activate_row, MemoryStore};
use crate::error::{Error, Result};
use crate::lease::LeaseId;
use crate::store::{Linked, TokenStore, VaultToken};

#[async_trait]
impl TokenStore for MemoryStore {
    async fn insert_vault_token(&self, token: &VaultToken, cap: u32) -> Result<Vec<String>> {
        self.check()?;
        // One lock over the count, the evictions and the insert: atomic.
        let mut tokens = self.vault_tokens.lock().unwrap();
        if tokens.contains_key(&token.hash) || tokens.values().any(|t| t.accessor == token.accessor)
        {
            return Err(Error::internal("vault token already stored"));
        }
        let held = tokens
            .values()
            .filter(|t| t.identity == token.identity)
            .map(|t| (t.accessor.clone(), t.expires_at, t.issued_at))
            .collect();
        let gone = crate::store::evictions(held, cap);
        if !gone.is_empty() {
            tokens.retain(|_, t| !gone.contains(&t.accessor));
            self.vault_links
                .lock()
                .unwrap()
                .retain(|(a, _)| !gone.contains(a));
        }
        tokens.insert(token.hash.clone(), token.clone());
        Ok(gone)
    }

    async fn vault_token(&self, hash: &str) -> Result<Option<VaultToken>> {
        self.check()?;
        Ok(self.vault_tokens.lock().unwrap().get(hash).cloned())
    }

    async fn set_vault_token_expiry(&self, hash: &str, expires_at: DateTime<Utc>) -> Result<bool> {
        self.check()?;
        Ok(match self.vault_tokens.lock().unwrap().get_mut(hash) {
            Some(t) => {
                t.expires_at = expires_at;
                true
            }
            None => false,
        })
    }

    async fn delete_vault_token(&self, hash: &str) -> Result<bool> {
        self.check()?;
        let removed = self.vault_tokens.lock().unwrap().remove(hash);
        if let Some(t) = &removed {
            self.vault_links
                .lock()
                .unwrap()
                .retain(|(a, _)| a != &t.accessor);
        }
        Ok(removed.is_some())
    }

    async fn activate_linked(&self, id: &LeaseId, accessor: &str) -> Result<()> {
        self.check()?;
        // The tokens are held over both writes: an eviction cannot slip in.
        let tokens = self.vault_tokens.lock().unwrap();
        let held = tokens.values().any(|t| t.accessor == accessor);
        let activated = held && activate_row(&mut self.rows.lock().unwrap(), id);
        if activated {
            self.vault_links
                .lock()
                .unwrap()
                .insert((accessor.to_string(), id.clone()));
        }
        Linked::of(held, activated).into_result()
    }

    async fn vault_token_leases(&self, accessor: &str) -> Result<Vec<LeaseId>> {
        self.check()?;
        Ok(self
            .vault_links
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| a == accessor)
            .map(|(_, l)| l.clone())
            .collect())
    }

    async fn prune_vault_tokens(&self, before: DateTime<Utc>) -> Result<u64> {
        self.check()?;
        let mut tokens = self.vault_tokens.lock().unwrap();
        let gone: Vec<String> = tokens
            .values()
            .filter(|t| t.expires_at < before)
            .map(|t| t.hash.clone())
            .collect();
        let mut links = self.vault_links.lock().unwrap();
        for h in &gone {
            if let Some(t) = tokens.remove(h) {
                links.retain(|(a, _)| a != &t.accessor);
            }
        }
        Ok(gone.len() as u64)
    }

    async fn token_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<VaultToken>> {
        use std::ops::Bound;
        self.check()?;
        let from = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_string()));
        Ok(self
            .vault_tokens
            .lock()
            .unwrap()
            .range((from, Bound::Unbounded))
            .take(limit)
            .map(|(_, t)| t.clone())
            .collect())
    }

    async fn token_link_page(
        &self,
        after: Option<&(String, LeaseId)>,
        limit: usize,
    ) -> Result<Vec<(String, LeaseId)>> {
        use std::ops::Bound;
        self.check()?;
        let from = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.clone()));
        Ok(self
            .vault_links
            .lock()
            .unwrap()
            .range((from, Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn import_token_links(&self, links: &[(String, LeaseId)]) -> Result<()> {
        self.check()?;
        self.vault_links
            .lock()
            .unwrap()
            .extend(links.iter().cloned());
        Ok(())
    }
}
