//! One store suite, run against every store, a file per concern (leases,
//! locks, tokens, static roles) and one for where the stores differ on
//! purpose (`start_up`). Each `case_*` function takes an `Arc<dyn Store>`
//! (or, for the concurrency cases, a way to open a second handle on the
//! same store; or, for cases that reopen or write around the store, its
//! home), and `store_suite!` instantiates it for SQLite, PostgreSQL and —
//! all but the home cases — the fast tier's memory store.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as CDuration, Utc};
use credbroker::config::SecretSource;
use credbroker::lease::{BackendKind, Lease, LeaseId, LeaseState, Username};
use credbroker::metrics::Metrics;
use credbroker::pruner::Pruner;
use credbroker::store::postgres::PostgresStore;
use credbroker::store::{Claim, FailureRecord, LeaseFilter, LeaseOrder};

use crate::support::*;

type Store = Arc<dyn credbroker::store::Store>;
type Opener = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Store> + Send>> + Send + Sync>;

/// Where a store under test lives; dropped after the test.
pub struct StoreHome {
    _dir: tempfile::TempDir,
    pub open: Opener,
    /// The PostgreSQL database name, for direct checks.
    pub pg_database: Option<String>,
    /// The SQLite file, for direct (test-only) writes while it is closed.
    pub sqlite_path: Option<PathBuf>,
}

pub async fn sqlite_home() -> StoreHome {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let url = format!("sqlite://{}", path.display());
    StoreHome {
        _dir: dir,
        open: Arc::new(move || {
            let url = url.clone();
            Box::pin(async move { credbroker::store::open(&url).await.unwrap() })
        }),
        pg_database: None,
        sqlite_path: Some(path),
    }
}

/// A fresh database in the shared throwaway cluster, reached with the
/// superuser password from a file, as a deployment would.
pub async fn postgres_home() -> StoreHome {
    let dir = tempfile::tempdir().unwrap();
    let db = unique("store");
    cluster().create_database(&db).await.unwrap();
    let secret = dir.path().join("store-password");
    std::fs::write(&secret, cluster().superuser_password()).unwrap();
    let url = cluster().url(&db);
    StoreHome {
        _dir: dir,
        open: Arc::new(move || {
            let (url, secret) = (url.clone(), secret.clone());
            Box::pin(async move {
                let s = PostgresStore::open(&url, &SecretSource::File(secret))
                    .await
                    .unwrap();
                Arc::new(s) as Store
            })
        }),
        pg_database: Some(db),
        sqlite_path: None,
    }
}

fn t(base: DateTime<Utc>, secs: i64) -> DateTime<Utc> {
    base + CDuration::seconds(secs)
}

/// Whole milliseconds: both stores keep at least that precision.
fn ms(d: DateTime<Utc>) -> i64 {
    d.timestamp_millis()
}

fn lease(n: usize, role: &str, identity: &str, now: DateTime<Utc>, ttl: i64) -> Lease {
    Lease {
        id: LeaseId::generate(),
        role: role.into(),
        database: "main".into(),
        kind: BackendKind::Postgres,
        username: Username::from_store(format!("u_{n}_{}", &unique("")[1..9])),
        user_host: String::new(),
        identity: identity.into(),
        state: LeaseState::Pending,
        issued_at: now,
        expires_at: t(now, ttl),
        max_expires_at: t(now, ttl * 4),
        due_at: t(now, 60),
        revoked_at: None,
        revoke_attempts: 0,
        last_error: None,
        grant_id: None,
    }
}

fn claim(owner: &str, secs: i64) -> Claim {
    Claim {
        owner: owner.into(),
        until: Utc::now() + CDuration::seconds(secs),
    }
}

/// An intent, written and read back (pending).
async fn pending(s: &Store, n: usize, role: &str, who: &str, ttl: i64) -> Lease {
    let l = lease(n, role, who, Utc::now(), ttl);
    s.insert_intent(&l, None).await.unwrap();
    s.get(&l.id).await.unwrap().unwrap()
}

async fn active(s: &Store, n: usize, role: &str, who: &str, ttl: i64) -> Lease {
    let now = Utc::now();
    let l = lease(n, role, who, now, ttl);
    s.insert_intent(&l, None).await.unwrap();
    s.activate(&l.id).await.unwrap();
    s.get(&l.id).await.unwrap().unwrap()
}

/// The fast tier's memory store: one store, so every opener returns it
/// (two handles on it are two replicas on one shared store).
pub fn memory_opener() -> Opener {
    let s: Store = Arc::new(credbroker::store::memory::MemoryStore::new());
    Arc::new(move || {
        let s = s.clone();
        Box::pin(async move { s })
    })
}

/// Instantiates a concern's cases per store. `stores` take a store,
/// `openers` a way to open a second handle (and whether the store is
/// shared: SQLite's is not), `homes` the store's home (they reopen it or
/// write around it, so the memory store, which keeps nothing and has no
/// tables, does not run them).
macro_rules! store_suite {
    (
        stores: [$($case:ident),* $(,)?],
        openers: [$($ocase:ident),* $(,)?],
        homes: [$($hcase:ident),* $(,)?] $(,)?
    ) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let home = crate::store_suite::sqlite_home().await;
                    super::$case((home.open)().await).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $ocase() {
                    let home = crate::store_suite::sqlite_home().await;
                    super::$ocase(home.open.clone(), false).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $hcase() {
                    super::$hcase(crate::store_suite::sqlite_home().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let home = crate::store_suite::postgres_home().await;
                    super::$case((home.open)().await).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $ocase() {
                    let home = crate::store_suite::postgres_home().await;
                    super::$ocase(home.open.clone(), true).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $hcase() {
                    super::$hcase(crate::store_suite::postgres_home().await).await;
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case((crate::store_suite::memory_opener())().await).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $ocase() {
                    super::$ocase(crate::store_suite::memory_opener(), true).await;
                }
            )*
        }
    };
}

mod access;
mod leases;
mod locks;
mod migration;
mod pruning;
mod start_up;
mod statics;
mod tokens;
