//! The shared lease store: one PostgreSQL database behind several broker
//! replicas, so any replica can serve any request and the reaper work is
//! split between them by claims, not by electing a leader.
//!
//! - The broker creates and migrates its own schema: numbered migrations,
//!   recorded in `credbroker_schema_migrations`, applied in one transaction
//!   under an advisory lock so replicas starting together do not race.
//! - Reapers claim due rows with `FOR UPDATE SKIP LOCKED`: two replicas
//!   asking at once get disjoint batches instead of waiting on each other.
//! - A claim carries an expiry on the *database's* clock, so clock skew
//!   between replicas cannot make one take over another's claim early; a
//!   replica that dies mid-revocation leaves its claims to the others once
//!   they run out.
//! - Start-up touches nothing: other replicas may be creating the users of
//!   pending intents right now, and their claims are theirs.

mod access;
mod leases;
mod locks;
mod migrations;
mod statics;
mod tokens;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::config::SecretSource;
use crate::dbtls;
use crate::error::{Error, Result};
use crate::store::Store;
pub use migrations::{migration_versions, SCHEMA_VERSION};

/// Longest a single store statement may run: past it the request fails as
/// `Unavailable` rather than hanging a caller on a sick store.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_SIZE: usize = 16;
/// What a broker's store sessions call themselves (`pg_stat_activity`).
pub const APPLICATION_NAME: &str = "credbroker-store";

pub struct PostgresStore {
    pool: Pool,
}

/// Connection trouble (the store is down, failing over, restarting) is
/// `Unavailable`; a refusal by a working server, or our own mistake on the
/// client side (a parameter or column of the wrong type, a row count we did
/// not expect), is `Internal`: a store bug is not worth a retry. Neither can
/// hold the password: we send it only in the authentication exchange, and
/// the store's statements carry no secret (no password column; sealed
/// static passwords and token hashes are parameters, which driver errors
/// never quote) — so the driver's error is kept as the source.
fn pg_err(what: &str, e: tokio_postgres::Error) -> Error {
    let (class, msg) = match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            (
                store_class(Some(code), ""),
                format!("lease store: {what}: {} ({code})", db.message()),
            )
        }
        None => {
            let text = e.to_string();
            match store_class(None, &text) {
                StoreClass::Unavailable => (
                    StoreClass::Unavailable,
                    format!("lease store unreachable: {what}: {e}"),
                ),
                StoreClass::Internal => (StoreClass::Internal, format!("lease store: {what}: {e}")),
            }
        }
    };
    match class {
        StoreClass::Unavailable => Error::unavailable_from(msg, e),
        StoreClass::Internal => Error::internal_from(msg, e),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreClass {
    Unavailable,
    Internal,
}

/// The class of a store error, from its SQLSTATE when the server answered,
/// else from the driver's kind (tokio-postgres keeps it private; its
/// `Display` names it).
fn store_class(sqlstate: Option<&str>, driver_text: &str) -> StoreClass {
    match sqlstate {
        // 08: connection exception, 57: operator intervention (shutdown,
        // cannot connect now), 40: serialization failure or deadlock,
        // 25006: read-only transaction (a standby after failover).
        Some(code) => {
            if code.starts_with("08")
                || code.starts_with("57")
                || code.starts_with("40")
                || code == "25006"
            {
                StoreClass::Unavailable
            } else {
                StoreClass::Internal
            }
        }
        // Our side of a statement: serialising a parameter, reading a
        // column, the number of columns, parameters or rows.
        None if [
            "error serializing parameter",
            "error deserializing column",
            "invalid column",
            "query returned an unexpected number",
            "expected ",
        ]
        .iter()
        .any(|p| driver_text.starts_with(p)) =>
        {
            StoreClass::Internal
        }
        // Connecting, TLS, I/O, a closed connection, a timeout.
        None => StoreClass::Unavailable,
    }
}

/// Every pool failure (no connection within the timeout, a connection
/// that could not be opened or logged into) is `Unavailable`, as before;
/// the pool's error, which holds the driver's, is the source.
fn pool_err(e: deadpool_postgres::PoolError) -> Error {
    Error::unavailable_from(format!("lease store unreachable: {e}"), e)
}

/// A stored value we cannot read back is a corrupt row — a store bug, so
/// `Internal` (not the `InvalidArgument` or `Config` the parser says about
/// a caller's or a config's text); the parser's error is the source.
fn corrupt(e: Error) -> Error {
    Error::internal_from(format!("lease store: corrupt row: {e}"), e)
}

impl PostgresStore {
    /// Connects, then creates or migrates the schema. `url` holds no
    /// password (the config refuses one); `password` is where it is kept.
    /// libpq's TLS parameters in `url` are read here (tokio-postgres
    /// knows only some of them); a refused certificate is a `Config` error.
    pub async fn open(url: &str, password: &SecretSource) -> Result<Self> {
        Self::open_as(url, password, APPLICATION_NAME).await
    }

    /// `open` with the `application_name` its sessions show in
    /// `pg_stat_activity`: `store migrate` names its own, so the brokers'
    /// sessions ([`Self::broker_sessions`]) are told from it.
    pub async fn open_as(
        url: &str,
        password: &SecretSource,
        application_name: &str,
    ) -> Result<Self> {
        let url_err = |e: &dyn std::fmt::Display| Error::config(format!("store.url: {e}"));
        // One host or several (`target_session_attrs=read-write` finds the
        // primary on every new connection, so a pool refilled after a
        // failover lands on the promoted standby), URL or key=value.
        let parsed = crate::connstr::parse(url).map_err(|e| url_err(&e))?;
        let addr = parsed.hosts_label();
        let (mut cfg, tls_params) = (parsed.config, parsed.tls);
        let (tls, ssl_mode) = dbtls::postgres_connector(&tls_params).map_err(|e| url_err(&e))?;
        cfg.ssl_mode(ssl_mode);
        if let Some(p) = password.read("store.password")? {
            cfg.password(p.expose());
        }
        cfg.application_name(application_name)
            .connect_timeout(CONNECT_TIMEOUT)
            // A store that vanished behind a failover must be noticed in
            // seconds, not after the kernel's two-hour keepalive default.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(3))
            .keepalives_retries(3)
            // A statement sent to a primary that vanished without a word
            // (a network partition) fails within this, not the kernel's
            // fifteen minutes of retransmissions.
            .tcp_user_timeout(STATEMENT_TIMEOUT + CONNECT_TIMEOUT)
            .options(format!(
                "-c statement_timeout={} -c lock_timeout={}",
                STATEMENT_TIMEOUT.as_millis(),
                STATEMENT_TIMEOUT.as_millis()
            ));
        let manager = Manager::from_config(
            cfg,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(CONNECT_TIMEOUT + STATEMENT_TIMEOUT),
                create: Some(CONNECT_TIMEOUT),
                recycle: Some(CONNECT_TIMEOUT),
            })
            .build()
            .map_err(|e| Error::config(format!("store.url: {e}")))?;
        if let Err(deadpool_postgres::PoolError::Backend(e)) = pool.get().await {
            if let Some(why) = dbtls::tls_failure(&e) {
                return Err(Error::config(format!(
                    "store.url: TLS to {addr} failed ({tls_params}): {why}"
                )));
            }
        }
        let store = PostgresStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations this database lacks; returns the version.
    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }

    pub(super) async fn execute(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(|e| pg_err(what, e))?;
        c.execute(&stmt, params).await.map_err(|e| pg_err(what, e))
    }

    /// `sql` once per row of `rows`, in one transaction: all or nothing
    /// (`store migrate`'s imports).
    pub(super) async fn execute_many(
        &self,
        what: &str,
        sql: &str,
        rows: &[Vec<&(dyn ToSql + Sync)>],
    ) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| pg_err(what, e))?;
        let stmt = tx.prepare_cached(sql).await.map_err(|e| pg_err(what, e))?;
        for params in rows {
            tx.execute(&stmt, params)
                .await
                .map_err(|e| pg_err(what, e))?;
        }
        tx.commit().await.map_err(|e| pg_err(what, e))
    }

    /// Other sessions on this database whose `application_name` starts
    /// with `credbroker` (a broker's pool, its event relay, a `check`),
    /// as `"name from address"`: `store migrate` refuses to copy a store
    /// that a broker may be writing to. A replica cut off from the store
    /// has no session and is not seen; the operator stops those.
    pub async fn broker_sessions(&self, except: &str) -> Result<Vec<String>> {
        let rows = self
            .query(
                "list broker sessions",
                "SELECT application_name || ' from ' || coalesce(host(client_addr), 'local socket') \
                 FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND application_name LIKE 'credbroker%' AND application_name <> $1 \
                 ORDER BY 1",
                &[&except],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub(super) async fn query(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let c = self.client().await?;
        let stmt = c.prepare_cached(sql).await.map_err(|e| pg_err(what, e))?;
        c.query(&stmt, params).await.map_err(|e| pg_err(what, e))
    }

    /// `query` with the parameters a filter built alongside its SQL.
    pub(super) async fn query_built(
        &self,
        what: &str,
        sql: &str,
        args: &[Box<dyn ToSql + Sync + Send>],
    ) -> Result<Vec<Row>> {
        let params: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        self.query(what, sql, &params).await
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn recover_after_start(&self, _now: DateTime<Utc>) -> Result<u64> {
        Ok(0)
    }

    /// The first replica to ask stores a fresh random key; `ON CONFLICT DO
    /// NOTHING` makes replicas asking at once agree on the first one
    /// committed, which every one then reads back.
    async fn console_key(&self) -> Result<Option<[u8; 32]>> {
        let fresh: [u8; 32] = rand::random();
        self.execute(
            "store console key",
            "INSERT INTO credbroker_keys (name, key) VALUES ('console_csrf', $1) \
             ON CONFLICT (name) DO NOTHING",
            &[&fresh.as_slice()],
        )
        .await?;
        let rows = self
            .query(
                "read console key",
                "SELECT key FROM credbroker_keys WHERE name = 'console_csrf'",
                &[],
            )
            .await?;
        let key: Vec<u8> = rows
            .first()
            .ok_or_else(|| Error::internal("the console key is not in the store"))?
            .get(0);
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| Error::internal("the stored console key is not 32 bytes"))?;
        Ok(Some(key))
    }
}

#[cfg(test)]
mod error_tests {
    use super::{corrupt, pg_err, pool_err, store_class, StoreClass};
    use crate::error::Error;

    #[test]
    fn a_corrupt_row_is_internal() {
        let e = corrupt(crate::lease::LeaseState::parse("bogus").unwrap_err());
        assert!(matches!(e, Error::Internal(_)), "{e}");
        let src = std::error::Error::source(&e).expect("source");
        assert!(matches!(
            src.downcast_ref::<Error>(),
            Some(Error::InvalidArgument(_))
        ));
    }

    /// A store bug (constraint, syntax, a value or row we cannot read) is
    /// `Internal`; the store going away, shutting down or asking for a
    /// retry is `Unavailable`.
    #[test]
    fn a_store_bug_is_internal_not_unavailable() {
        for code in [
            "23505", "23503", "23502", "42601", "42P01", "42703", "22P02", "XX001",
        ] {
            assert_eq!(store_class(Some(code), ""), StoreClass::Internal, "{code}");
        }
        for code in [
            "08006", "08001", "57P01", "57P03", "40001", "40P01", "25006",
        ] {
            assert_eq!(
                store_class(Some(code), ""),
                StoreClass::Unavailable,
                "{code}"
            );
        }
        for text in [
            "error deserializing column 3",
            "error serializing parameter 0",
            "invalid column `state`",
            "query returned an unexpected number of rows",
            "expected 2 parameters but got 1",
        ] {
            assert_eq!(store_class(None, text), StoreClass::Internal, "{text}");
        }
        for text in [
            "error connecting to server",
            "connection closed",
            "error communicating with the server",
            "timeout waiting for server",
            "error performing TLS handshake",
        ] {
            assert_eq!(store_class(None, text), StoreClass::Unavailable, "{text}");
        }
    }

    fn refused_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_refused_connection_is_unavailable_and_keeps_its_source() {
        let port = refused_port();
        let url = format!("host=127.0.0.1 port={port} user=a connect_timeout=2");
        let e = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        let e = pg_err("connect", e);
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "unavailable: lease store unreachable: connect: error connecting to server"
        );
        let src = std::error::Error::source(&e).expect("source");
        assert!(src.downcast_ref::<tokio_postgres::Error>().is_some());
        let line = crate::error::chain(&e).to_string();
        assert!(line.contains("Connection refused"), "{line}");

        let cfg: tokio_postgres::Config = url.parse().unwrap();
        let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
        let pool = deadpool_postgres::Pool::builder(mgr)
            .max_size(1)
            .build()
            .unwrap();
        let e = pool_err(pool.get().await.expect_err("refused"));
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        let src = std::error::Error::source(&e).expect("source");
        assert!(src.downcast_ref::<deadpool_postgres::PoolError>().is_some());
    }
}
