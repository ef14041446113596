//! The SQLite store's executor, which knows nothing of leases: one thread
//! owns the connection and **group-commits** — writes queued while a
//! commit syncs share the next transaction (a savepoint each) and are
//! answered after its one fsync (acknowledged ⇒ durable). Reads are
//! answered at once from committed rows.

use std::sync::{mpsc, Arc};

use rusqlite::Connection;

use crate::error::{Detail, Error, Result};

/// The worker thread's name (the bench counts its CPU as the broker's).
pub const THREAD_NAME: &str = "lease-store";

/// The worker thread and the queue to it; dropping it ends the thread and
/// closes the connection before `drop` returns (a restarted broker in the
/// same process can reopen the file).
pub struct GroupCommit {
    requests: Option<mpsc::Sender<Request>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl GroupCommit {
    pub fn start(conn: Connection) -> Result<Self> {
        // Room for the store's own cached statements and the group
        // commit's control statements ([`control`]) without evictions
        // (rusqlite's default keeps 16).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let (tx, rx) = mpsc::channel();
        let worker = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || worker(conn, rx))
            .map_err(|e| Error::internal(format!("lease store thread: {e}")))?;
        Ok(GroupCommit {
            requests: Some(tx),
            worker: Some(worker),
        })
    }

    pub async fn submit<T, F>(&self, kind: Kind, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T>>();
        let job = Box::new(Op {
            f: Some(f),
            result: None,
            reply: tx,
        });
        self.requests
            .as_ref()
            .ok_or_else(|| Error::internal("lease store is closed"))?
            .send(Request { kind, job })
            .map_err(|_| Error::internal("lease store worker has stopped"))?;
        rx.await
            .map_err(|_| Error::internal("lease store worker has stopped"))?
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Most requests one group commit takes; more wait for the next.
const MAX_BATCH: usize = 512;

/// Prepared statements the connection keeps (see [`GroupCommit::start`]).
const STATEMENT_CACHE: usize = 64;

/// Runs one of the group commit's control statements (`BEGIN IMMEDIATE`,
/// `SAVEPOINT`, `RELEASE`, `ROLLBACK TO`, `COMMIT`, `ROLLBACK`), prepared
/// once and kept in the connection's statement cache instead of parsed
/// on every batch and request. Each does its work when stepped, so a
/// kept statement behaves as a fresh one. Not for `PRAGMA synchronous`:
/// SQLite applies that pragma when it compiles it, so a kept statement
/// would change nothing when run again.
fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// How durable a write must be before its caller hears back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk (fsync of the WAL) before the reply: intents, activations,
    /// expiries, forced revocations.
    Full,
    /// Committed with its batch (so a process crash keeps it) but on disk
    /// only with the next full commit. For revocation claims, which start-up
    /// turns into due revocations (`recover_after_start`), and the mark of
    /// a revocation whose users are already gone from their database
    /// (`mark_revoked_claimed`: losing it to a power loss only repeats a
    /// drop that finds nothing).
    Lazy,
}

pub enum Kind {
    Read,
    Write(Durability),
}

/// One queued request: run on the worker's connection, answered once the
/// outcome of its batch's commit is known.
trait Job: Send {
    /// Runs the request; true when it succeeded.
    fn run(&mut self, conn: &mut Connection) -> bool;
    /// Answers the caller. `commit` is the batch's outcome (Ok for reads).
    fn finish(self: Box<Self>, commit: std::result::Result<(), Arc<rusqlite::Error>>);
}

struct Op<T, F> {
    f: Option<F>,
    result: Option<rusqlite::Result<T>>,
    reply: tokio::sync::oneshot::Sender<Result<T>>,
}

impl<T, F> Job for Op<T, F>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
{
    fn run(&mut self, conn: &mut Connection) -> bool {
        let Some(f) = self.f.take() else {
            return false;
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(conn)))
            .unwrap_or_else(|_| {
                Err(rusqlite::Error::InvalidParameterName(
                    "lease store operation panicked".into(),
                ))
            });
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, commit: std::result::Result<(), Arc<rusqlite::Error>>) {
        let out = match (self.result, commit) {
            (Some(Err(e)), _) => Err(db_err(e)),
            (Some(Ok(v)), Ok(())) => Ok(v),
            // A failed COMMIT is the disk's doing (full, read-only, I/O),
            // not a bug: the caller may retry once it is fixed.
            // Every writer of the batch shares the one driver error.
            (_, Err(e)) => Err(Error::Unavailable(Detail::with_shared_source(
                format!("lease store: commit failed: {e}"),
                e,
            ))),
            (None, Ok(())) => Err(Error::internal("lease store: request was not run")),
        };
        let _ = self.reply.send(out);
    }
}

struct Request {
    kind: Kind,
    job: Box<dyn Job>,
}

/// SQLite's answer as the broker's: the file's surroundings (busy, locked,
/// full, read-only, I/O) are `Unavailable`; everything else — a constraint,
/// a syntax error, a row we cannot read, a corrupt file — is our bug or the
/// file's, `Internal`. The driver's error is kept as the source: it can
/// quote our SQL (`SqlInputError`), which holds no secret — values are
/// bound parameters, never spliced in.
pub fn db_err(e: rusqlite::Error) -> Error {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            Error::unavailable_from("lease store is busy", e)
        }
        // The file's surroundings, not our SQL: retry once they are fixed.
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::ReadOnly
                    | rusqlite::ErrorCode::CannotOpen
            ) =>
        {
            Error::unavailable_from(format!("lease store: {e}"), e)
        }
        _ => Error::internal_from(format!("lease store: {e}"), e),
    }
}

/// The connection's owner. Group commit: everything queued while the last
/// commit was being synced goes into the next transaction, each request in
/// its own savepoint (a failing one rolls back alone), and every writer is
/// answered after the one `COMMIT` — so an acknowledged write is on disk,
/// at one fsync per batch instead of one per request.
fn worker(mut conn: Connection, requests: mpsc::Receiver<Request>) {
    let mut synchronous_full = true;
    while let Ok(first) = requests.recv() {
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        let mut next = Some(first);
        while let Some(r) = next.take() {
            match r.kind {
                Kind::Read => reads.push(r.job),
                Kind::Write(d) => writes.push((d, r.job)),
            }
            if reads.len() + writes.len() < MAX_BATCH {
                next = requests.try_recv().ok();
            }
        }
        // Reads go first: they see only committed rows and need no commit.
        for mut job in reads {
            job.run(&mut conn);
            job.finish(Ok(()));
        }
        if writes.is_empty() {
            continue;
        }
        let full = writes.iter().any(|(d, _)| *d == Durability::Full);
        if full != synchronous_full {
            let level = if full { "FULL" } else { "NORMAL" };
            // On failure we stay at FULL: slower, never less safe.
            if conn.pragma_update(None, "synchronous", level).is_ok() {
                synchronous_full = full;
            }
        }
        if let Err(e) = control(&conn, "BEGIN IMMEDIATE") {
            tracing::error!(error = %crate::error::chain(&e), "lease store: cannot begin a transaction");
            let e = Arc::new(e);
            for (_, job) in writes {
                job.finish(Err(e.clone()));
            }
            continue;
        }
        let mut done: Vec<Box<dyn Job>> = Vec::with_capacity(writes.len());
        for (_, mut job) in writes {
            // Every write runs inside its own savepoint, or not at all: the
            // store's writes take none of their own (store/sqlite/), so a
            // write run without one could leave half its work committed.
            if let Err(e) = control(&conn, "SAVEPOINT req") {
                job.finish(Err(Arc::new(e)));
                continue;
            }
            // A request that failed half-way leaves no trace.
            if !job.run(&mut conn) {
                let _ = control(&conn, "ROLLBACK TO req");
            }
            let _ = control(&conn, "RELEASE req");
            // Every write, claims included, is answered only after COMMIT:
            // a claim answered earlier let a revocation drop its role while
            // the claim was not yet in the file, and a crash then left a
            // live lease that no start-up could know was half revoked.
            done.push(job);
        }
        let commit = control(&conn, "COMMIT").map_err(Arc::new);
        if commit.is_err() {
            let _ = control(&conn, "ROLLBACK");
        }
        for job in done {
            job.finish(commit.clone());
        }
    }
}

#[cfg(test)]
mod error_tests {
    use super::db_err;
    use crate::error::Error;
    use rusqlite::Connection;

    fn source_is_rusqlite(e: &Error) -> bool {
        std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<rusqlite::Error>())
            .is_some()
    }

    /// A store bug — a constraint, a syntax error, a row we cannot read, a
    /// file that is not a database — is `Internal`, with SQLite's error as
    /// the source; only the file's surroundings are `Unavailable`.
    #[test]
    fn a_store_bug_is_internal_not_unavailable() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL)")
            .unwrap();
        c.execute("INSERT INTO t VALUES ('a', 1)", []).unwrap();

        let dup = db_err(c.execute("INSERT INTO t VALUES ('a', 2)", []).unwrap_err());
        let syntax = db_err(c.execute_batch("SELEC id FROM t").unwrap_err());
        let row = db_err(
            c.query_row("SELECT id FROM t", [], |r| r.get::<_, i64>(0))
                .unwrap_err(),
        );
        let conversion = db_err(rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            Box::new(crate::lease::LeaseState::parse("bogus").unwrap_err()),
        ));
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        let not_a_db = db_err(
            Connection::open(&junk)
                .and_then(|c| c.execute_batch("SELECT * FROM sqlite_master"))
                .unwrap_err(),
        );
        for e in [&dup, &syntax, &row, &conversion, &not_a_db] {
            assert!(matches!(e, Error::Internal(_)), "{e}");
            assert!(source_is_rusqlite(e), "{e:?}");
        }
        assert!(
            dup.to_string().contains("UNIQUE constraint failed"),
            "{dup}"
        );
        assert!(
            conversion.to_string().contains("unknown lease state"),
            "{conversion}"
        );
    }

    #[test]
    fn a_busy_store_is_unavailable_and_keeps_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let a = Connection::open(&path).unwrap();
        a.execute_batch("CREATE TABLE t (n INTEGER); BEGIN EXCLUSIVE")
            .unwrap();
        let b = Connection::open(&path).unwrap();
        b.busy_timeout(std::time::Duration::ZERO).unwrap();
        let e = db_err(b.execute("INSERT INTO t VALUES (1)", []).unwrap_err());
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert_eq!(e.to_string(), "unavailable: lease store is busy");
        assert!(source_is_rusqlite(&e));
        // The log says why; the message does not change.
        let line = crate::error::chain(&e).to_string();
        assert!(
            line.starts_with("unavailable: lease store is busy: "),
            "{line}"
        );
    }
}

#[cfg(test)]
mod worker_tests {
    use super::{Durability, GroupCommit, Kind};
    use rusqlite::Connection;

    fn store(dir: &tempfile::TempDir) -> GroupCommit {
        let conn = Connection::open(dir.path().join("g.db")).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE t (n INTEGER PRIMARY KEY)",
        )
        .unwrap();
        GroupCommit::start(conn).unwrap()
    }

    fn synchronous(c: &mut Connection) -> rusqlite::Result<i64> {
        c.query_row("PRAGMA synchronous", [], |r| r.get(0))
    }

    /// Batch after batch on the kept control statements: a request that
    /// fails half-way leaves no trace and the others of its batch commit;
    /// each batch runs at the durability it asks for (a lazy-only batch at
    /// NORMAL, any full write at FULL), switch after switch.
    #[tokio::test]
    async fn batches_commit_alone_failures_roll_back_and_durability_follows() {
        let dir = tempfile::tempdir().unwrap();
        let g = std::sync::Arc::new(store(&dir));
        for round in 0..3i64 {
            let mut calls = Vec::new();
            for i in 0..20i64 {
                let g = g.clone();
                let n = round * 100 + i;
                calls.push(tokio::spawn(async move {
                    g.submit(Kind::Write(Durability::Full), move |c| {
                        c.execute("INSERT INTO t VALUES (?1)", [n])?;
                        if n % 3 == 0 {
                            // Fails after its write: the write must go.
                            c.execute("INSERT INTO t VALUES (?1)", [n])?;
                        }
                        Ok(n)
                    })
                    .await
                }));
            }
            for (i, call) in (0..20i64).zip(calls) {
                let n = round * 100 + i;
                let out = call.await.unwrap();
                assert_eq!(out.is_err(), n % 3 == 0, "{n}: {out:?}");
            }
            let lazy = g
                .submit(Kind::Write(Durability::Lazy), synchronous)
                .await
                .unwrap();
            assert_eq!(lazy, 1, "a lazy-only batch runs at NORMAL");
            let full = g
                .submit(Kind::Write(Durability::Full), synchronous)
                .await
                .unwrap();
            assert_eq!(full, 2, "a full batch runs at FULL");
        }
        let rows: Vec<i64> = g
            .submit(Kind::Read, |c| {
                let mut s = c.prepare("SELECT n FROM t ORDER BY n")?;
                let rows = s.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .await
            .unwrap();
        let expected: Vec<i64> = (0..3i64)
            .flat_map(|r| (0..20i64).map(move |i| r * 100 + i))
            .filter(|n| n % 3 != 0)
            .collect();
        assert_eq!(rows, expected);
        drop(g);
        // Committed, not just cached in this connection: a fresh one reads them.
        let again = Connection::open(dir.path().join("g.db")).unwrap();
        let n: i64 = again
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, expected.len() as i64);
    }
}
