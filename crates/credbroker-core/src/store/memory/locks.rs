//! Admin locks in memory.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::MemoryStore;
use crate::error::{Error, Result};
use crate::lock::{Lock, LockId, NewLock};
use crate::store::{stamp_lock, LockStore};

#[async_trait]
impl LockStore for MemoryStore {
    async fn insert_lock(&self, new: &NewLock) -> Result<Lock> {
        self.check()?;
        let lock = stamp_lock(new, self.clock.now());
        self.locks.lock().unwrap().push(lock.clone());
        Ok(lock)
    }

    async fn delete_lock(&self, id: &LockId) -> Result<Option<Lock>> {
        self.check()?;
        let mut locks = self.locks.lock().unwrap();
        Ok(locks
            .iter()
            .position(|l| &l.id == id)
            .map(|i| locks.remove(i)))
    }

    async fn active_locks(&self) -> Result<Vec<Lock>> {
        self.check()?;
        let now = self.clock.now();
        Ok(self
            .locks
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.is_active(now))
            .cloned()
            .collect())
    }

    async fn prune_locks(&self, before: DateTime<Utc>) -> Result<u64> {
        self.check()?;
        let mut locks = self.locks.lock().unwrap();
        let n = locks.len();
        locks.retain(|l| l.expires_at.is_none_or(|e| e >= before));
        Ok((n - locks.len()) as u64)
    }

    async fn import_locks(&self, new: &[Lock]) -> Result<()> {
        self.check()?;
        let mut locks = self.locks.lock().unwrap();
        if let Some(l) = new.iter().find(|n| locks.iter().any(|l| l.id == n.id)) {
            return Err(Error::internal(format!(
                "import: lock {} is already stored",
                l.id
            )));
        }
        locks.extend(new.iter().cloned());
        Ok(())
    }
}
