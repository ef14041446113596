//! Static roles' rotation state in memory.

use async_trait::async_trait;
use chrono::Utc;

use super::MemoryStore;
use crate::error::Result;
use crate::store::{Claim, StaticState, StaticStore};

#[async_trait]
impl StaticStore for MemoryStore {
    async fn static_get(&self, role: &str) -> Result<Option<StaticState>> {
        self.check()?;
        Ok(self
            .statics
            .lock()
            .unwrap()
            .get(role)
            .map(|(s, _)| s.clone()))
    }

    async fn static_list(&self) -> Result<Vec<StaticState>> {
        self.check()?;
        Ok(self
            .statics
            .lock()
            .unwrap()
            .values()
            .map(|(s, _)| s.clone())
            .collect())
    }

    async fn static_claim(&self, role: &str, claim: &Claim) -> Result<Option<StaticState>> {
        self.check()?;
        let now = Utc::now();
        let mut all = self.statics.lock().unwrap();
        let entry = all.entry(role.to_string()).or_insert_with(|| {
            (
                StaticState {
                    role: role.to_string(),
                    ..Default::default()
                },
                None,
            )
        });
        if entry
            .1
            .as_ref()
            .is_some_and(|c| c.owner != claim.owner && c.until > now)
        {
            return Ok(None);
        }
        entry.1 = Some(claim.clone());
        Ok(Some(entry.0.clone()))
    }

    async fn static_save(&self, state: &StaticState, owner: &str) -> Result<bool> {
        self.check()?;
        let now = Utc::now();
        let mut all = self.statics.lock().unwrap();
        match all.get_mut(&state.role) {
            Some((s, Some(c))) if c.owner == owner && c.until > now => {
                *s = state.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn static_release(&self, role: &str, owner: &str) -> Result<()> {
        self.check()?;
        if let Some((_, c)) = self.statics.lock().unwrap().get_mut(role) {
            if c.as_ref().is_some_and(|c| c.owner == owner) {
                *c = None;
            }
        }
        Ok(())
    }
}
