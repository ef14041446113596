//! The SQLite store's executor, which knows nothing of leases: one thread
//! owns the connection and **group-commits** — writes queued while a
//! commit syncs share the next transaction (a savepoint each) and are
//! answered after its one fsync (acknowledged ⇒ durable). Reads are
//! answered at once from committed rows.

use std::sync::mpsc;

use rusqlite::Connection;

use crate::error::{Error, Result};

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

/// How durable a write must be before its caller hears back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk (fsync of the WAL) before the reply: intents, activations,
    /// revocations, expiries.
    Full,
    /// Committed with its batch (so a process crash keeps it) but on disk
    /// only with the next full commit. For revocation claims, which start-up
    /// turns into due revocations (`recover_after_start`).
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
    fn finish(self: Box<Self>, commit: std::result::Result<(), String>);
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

    fn finish(self: Box<Self>, commit: std::result::Result<(), String>) {
        let out = match (self.result, commit) {
            (Some(Err(e)), _) => Err(db_err(e)),
            (Some(Ok(v)), Ok(())) => Ok(v),
            // A failed COMMIT is the disk's doing (full, read-only, I/O),
            // not a bug: the caller may retry once it is fixed.
            (_, Err(msg)) => Err(Error::Unavailable(format!(
                "lease store: commit failed: {msg}"
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

pub fn db_err(e: rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            Error::Unavailable("lease store is busy".into())
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
            Error::Unavailable(format!("lease store: {e}"))
        }
        other => Error::Internal(format!("lease store: {other}")),
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
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            tracing::error!(error = %msg, "lease store: cannot begin a transaction");
            for (_, job) in writes {
                job.finish(Err(msg.clone()));
            }
            continue;
        }
        let mut done: Vec<Box<dyn Job>> = Vec::with_capacity(writes.len());
        for (_, mut job) in writes {
            let sp = conn.execute_batch("SAVEPOINT req");
            let ok = job.run(&mut conn);
            if sp.is_ok() {
                // A request that failed half-way leaves no trace.
                if !ok {
                    let _ = conn.execute_batch("ROLLBACK TO req");
                }
                let _ = conn.execute_batch("RELEASE req");
            }
            // Every write, claims included, is answered only after COMMIT:
            // a claim answered earlier let a revocation drop its role while
            // the claim was not yet in the file, and a crash then left a
            // live lease that no start-up could know was half revoked.
            done.push(job);
        }
        let commit = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for job in done {
            job.finish(commit.clone());
        }
    }
}
