//! The embedded lease store: one SQLite file, nothing to run.
//!
//! WAL journal with `synchronous = FULL`: a commit is on disk before the
//! broker acknowledges a lease, so power loss cannot lose one. One thread
//! owns the connection and group-commits: writes that arrive while a
//! commit is being synced share the next transaction and its one fsync,
//! and each is answered only after that commit. A broker holds an
//! advisory lock on `<file>.lock` while it runs, because a second broker
//! on the same file would resolve the first one's pending intents as dead;
//! SQLite's own locking stays in its normal mode so that `credbroker
//! check` can read the file while the broker serves (WAL readers never
//! block the writer).

mod access;
mod leases;
mod locks;
mod migrations;
mod statics;
mod tokens;

use std::path::Path;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

use crate::error::{Error, Result};
use crate::lock::Lock;
use crate::store::group_commit::{Durability, GroupCommit, Kind};
use crate::store::Store;
use locks::load_locks;
use migrations::SCHEMA_VERSION;

pub struct SqliteStore {
    /// The one thread that owns the connection, and its group commit.
    exec: GroupCommit,
    /// Every lock in the file, kept in step with it. Exact, because this
    /// process is the file's only writer (the `.lock` file): so the
    /// check on every issue and renew is a memory read, never a wait
    /// behind a group commit. Updated after the write is durable.
    locks: std::sync::RwLock<Vec<Lock>>,
    /// The advisory lock that keeps a second broker off this file, held
    /// for as long as the store is open (`None` for `open_to_inspect`).
    _owner: Option<std::fs::File>,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let (conn, locks, owner) = tokio::task::spawn_blocking(move || {
            let owner = Self::take_ownership(&path)?;
            let conn = Self::open_blocking(&path)?;
            let locks = load_locks(&conn)
                .map_err(|e| Error::config(format!("lease store {}: {e}", path.display())))?;
            Ok::<_, Error>((conn, locks, owner))
        })
        .await
        .map_err(Error::internal)??;
        Ok(SqliteStore {
            exec: GroupCommit::start(conn)?,
            locks: std::sync::RwLock::new(locks),
            _owner: Some(owner),
        })
    }

    /// `credbroker check`'s view of a store that a broker may be serving:
    /// nothing created (no file, schema or lock), no write possible
    /// (`query_only`), and a busy timeout that waits out the broker's
    /// checkpoints instead of failing on them. `None` when the file does
    /// not exist yet (`serve` creates it).
    pub async fn open_to_inspect(path: &Path) -> Result<Option<Self>> {
        let path = path.to_path_buf();
        let opened = tokio::task::spawn_blocking(move || {
            if !path.exists() {
                return Ok(None);
            }
            let ctx = |what: &str, e: rusqlite::Error| {
                Error::config(format!("lease store {}: {what}: {e}", path.display()))
            };
            let conn = Connection::open_with_flags(
                &path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| ctx("cannot open", e))?;
            conn.busy_timeout(std::time::Duration::from_secs(10))
                .map_err(|e| ctx("busy timeout", e))?;
            conn.execute_batch("PRAGMA query_only = ON;")
                .map_err(|e| ctx("cannot open read-only", e))?;
            let version: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(|e| ctx("not a readable SQLite database", e))?;
            if version != SCHEMA_VERSION {
                return Err(Error::config(format!(
                    "lease store {} has schema version {version}, this binary's is {SCHEMA_VERSION} \
                     (`serve` migrates an older one at start)",
                    path.display()
                )));
            }
            let locks = load_locks(&conn)
                .map_err(|e| Error::config(format!("lease store {}: {e}", path.display())))?;
            Ok::<_, Error>(Some((conn, locks)))
        })
        .await
        .map_err(Error::internal)??;
        let Some((conn, locks)) = opened else {
            return Ok(None);
        };
        Ok(Some(SqliteStore {
            exec: GroupCommit::start(conn)?,
            locks: std::sync::RwLock::new(locks),
            _owner: None,
        }))
    }

    /// The advisory lock on `<file>.lock` (made 0600) that one broker holds
    /// while it serves the file: a second one is refused at start, not left
    /// to resolve the first one's pending intents as dead.
    fn take_ownership(path: &Path) -> Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::config(format!("lease store directory {}: {e}", dir.display()))
            })?;
        }
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = std::path::PathBuf::from(lock_path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| {
                Error::config(format!(
                    "lease store lock {}: cannot create: {e}",
                    lock_path.display()
                ))
            })?;
        // rustix's flock (std's File::try_lock is newer than our MSRV).
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(file),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(Error::config(format!(
                "lease store {} is in use by another broker (it holds {}); stop it first",
                path.display(),
                lock_path.display()
            ))),
            Err(e) => Err(Error::config(format!(
                "lease store lock {}: {e}",
                lock_path.display()
            ))),
        }
    }

    pub(super) fn open_blocking(path: &Path) -> Result<Connection> {
        let ctx = |what: &str, e: rusqlite::Error| {
            Error::config(format!("lease store {}: {what}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::config(format!("lease store directory {}: {e}", dir.display()))
            })?;
        }
        // Created 0600 before SQLite sees it (SQLite would use 0644 less
        // the umask), and its -wal/-shm files copy the database's mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    Error::config(format!(
                        "lease store {}: cannot create: {e}",
                        path.display()
                    ))
                })?;
        }
        let conn = Connection::open(path).map_err(|e| ctx("cannot open", e))?;
        conn.busy_timeout(std::time::Duration::from_secs(2))
            .map_err(|e| ctx("busy timeout", e))?;
        // Reading the header first turns a corrupt or foreign file into a
        // clear start-up error instead of an empty store.
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| ctx("not a readable SQLite database", e))?;
        if check != "ok" {
            return Err(Error::config(format!(
                "lease store {} is corrupt ({check}); restore it from a backup",
                path.display()
            )));
        }
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;",
        )
        .map_err(|e| ctx("cannot set up (is another broker using this file?)", e))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| ctx("schema version", e))?;
        if version > SCHEMA_VERSION {
            return Err(Error::config(format!(
                "lease store {} has schema version {version}, newer than this broker ({SCHEMA_VERSION})",
                path.display()
            )));
        }
        migrations::apply(&conn, version, &ctx)?;
        Ok(conn)
    }

    /// Runs a write in the next group commit; answers once it is durable.
    pub(super) async fn with<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.exec.submit(Kind::Write(Durability::Full), f).await
    }

    /// A write that need not survive a crash (see [`Durability::Lazy`]).
    pub(super) async fn with_lazy<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.exec.submit(Kind::Write(Durability::Lazy), f).await
    }

    /// A read: sees only committed rows, answers without waiting for a commit.
    pub(super) async fn with_read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.exec.submit(Kind::Read, f).await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn recover_after_start(&self, now: DateTime<Utc>) -> Result<u64> {
        self.with(move |c| {
            c.execute(
                "UPDATE leases SET due_at = MIN(due_at, ?1), claimed_by = NULL, claim_until = NULL \
                 WHERE state = 'pending'",
                params![ms(now)],
            )?;
            // This file has one owner: claims on static roles are ours,
            // from before the restart (a rotation's intent stays pending).
            c.execute(
                "UPDATE static_roles SET claimed_by = NULL, claim_until = NULL",
                [],
            )?;
            // A claim of our own previous life is a revocation that was under
            // way when we died: the drop may have happened without the store
            // hearing of it. Finish it now (drops are idempotent) rather than
            // at expiry, and free the claim — this file has one owner.
            c.execute(
                "UPDATE leases SET due_at = MIN(due_at, ?1), claimed_by = NULL, claim_until = NULL \
                 WHERE claimed_by IS NOT NULL AND state <> 'revoked'",
                params![ms(now)],
            )
            .map(|n| n as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseState;
    use crate::store::LeaseStore;

    /// One broker per file (its `.lock`), while `check`'s read-only view
    /// reads beside it — the live lease, the broker's writes after it
    /// opened — writes nothing, and creates no file where there is none.
    #[tokio::test]
    async fn one_broker_per_file_and_check_reads_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        assert!(SqliteStore::open_to_inspect(&path).await.unwrap().is_none());
        assert!(!path.exists(), "inspecting created the file");

        let broker = SqliteStore::open(&path).await.unwrap();
        let second = SqliteStore::open(&path).await.err().unwrap().to_string();
        assert!(second.contains("in use by another broker"), "{second}");

        let inspect = SqliteStore::open_to_inspect(&path).await.unwrap().unwrap();
        let now = Utc::now();
        let lease = crate::testkit::pending_lease("k_r_0123456789abcdef");
        broker.insert_intent(&lease, None).await.unwrap();
        let names = vec![lease.username.to_string(), "k_r_other".to_string()];
        let live = inspect.live_among(&names).await.unwrap();
        assert_eq!(live.len(), 1, "{live:?}");
        assert!(live.contains(&lease.username.to_string()));
        assert!(
            inspect
                .mark_revoked(std::slice::from_ref(&lease.id), now)
                .await
                .is_err(),
            "the inspecting view writes nothing"
        );
        assert_eq!(
            broker.get(&lease.id).await.unwrap().unwrap().state,
            LeaseState::Pending
        );
        drop(inspect);
        drop(broker);
        // Released with the store: the next broker opens it.
        SqliteStore::open(&path).await.unwrap();
    }
}
