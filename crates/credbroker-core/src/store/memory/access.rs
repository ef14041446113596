//! Access requests in memory: the same compare-and-set as the real stores.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::MemoryStore;
use crate::error::{Error, Result};
use crate::store::access::MAX_ACCESS_LIST;
use crate::store::{AccessFilter, AccessRequest, AccessStore};

impl MemoryStore {
    /// The requests `keep` keeps, in no order.
    fn select(&self, keep: impl Fn(&AccessRequest) -> bool) -> Result<Vec<AccessRequest>> {
        self.check()?;
        let all = self.access.lock().unwrap();
        Ok(all.values().filter(|r| keep(r)).cloned().collect())
    }
}

#[async_trait]
impl AccessStore for MemoryStore {
    async fn insert_access(&self, r: &AccessRequest) -> Result<()> {
        self.check()?;
        let mut all = self.access.lock().unwrap();
        if all.contains_key(&r.id) {
            return Err(Error::internal(format!("access request {} exists", r.id)));
        }
        all.insert(r.id.clone(), r.clone());
        Ok(())
    }

    async fn get_access(&self, id: &str) -> Result<Option<AccessRequest>> {
        self.check()?;
        Ok(self.access.lock().unwrap().get(id).cloned())
    }

    async fn update_access(&self, r: &AccessRequest) -> Result<bool> {
        self.check()?;
        let mut all = self.access.lock().unwrap();
        match all.get_mut(&r.id) {
            Some(stored) if stored.version == r.version => {
                *stored = r.clone();
                stored.version = r.version + 1;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list_access(&self, filter: &AccessFilter) -> Result<Vec<AccessRequest>> {
        let mut out = self.select(|r| filter.matches(r))?;
        out.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        out.truncate(filter.limit.unwrap_or(MAX_ACCESS_LIST).min(MAX_ACCESS_LIST));
        Ok(out)
    }

    async fn access_due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<AccessRequest>> {
        let mut out = self.select(|r| r.due_at().is_some_and(|d| d <= now))?;
        out.sort_by_key(|r| (r.due_at(), r.id.clone()));
        out.truncate(limit);
        Ok(out)
    }
}
