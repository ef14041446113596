//! PostgreSQL backend: roles with a broker-computed SCRAM verifier and
//! `VALID UNTIL`, revoked in the order that leaves no session behind.
//!
//! One file per concern, each an `impl PostgresBackend` block over the
//! fields here, as in `mysql/`: `connection` (the admin URL's location,
//! one-off connections to other databases, retried batches, rotate-root,
//! TLS check, preflight, pool state), `password_probe` (does the server
//! check passwords at all; `check` and preflight share it), `errors` (driver errors → `Error`,
//! `Cause`), `sql` (statement pieces several concerns share: the ACL
//! lock, `VALID UNTIL` literals, NOLOGIN), `create` (role creation and its
//! shared rounds, `CreateRounds`), `users` (extend, the users with the
//! prefix), `revoke` (revoke and disable), `static_users`, `dry_run`
//! (statements replayed in a rolled-back transaction). A trait impl is one
//! block: `impl Backend` is the delegation table
//! `backend::database_backend!` writes for both real backends, invoked
//! here. `check` (`credbroker check`) is a free function.

mod check;
mod connection;
mod create;
mod drain;
mod dry_run;
mod errors;
mod password_probe;
mod revoke;
mod sql;
mod static_users;
mod users;

use std::sync::{Arc, RwLock};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::backend::{read_admin_password, Endpoint};
use crate::config::DatabaseConfig;
use crate::dbtls::{self, Dialect, TlsParams};
use crate::error::{Error, Result};
use crate::lease::{Password, Username};
use create::CreateRounds;

pub use check::check;
pub use connection::location;
pub use dry_run::{DryRun, DryRunFailure, DryRunStep};
pub use errors::{lost_catalog_race, Cause, CauseKind};

pub struct PostgresBackend {
    config: DatabaseConfig,
    endpoint: Endpoint,
    /// Replaced whole by rotate-root; sessions already open keep working.
    pool: RwLock<Pool>,
    /// tokio-postgres config without password, for one-off connections to
    /// other databases of the cluster (DROP OWNED acts per database).
    base: tokio_postgres::Config,
    /// rustls (ring) as `admin_url`'s `sslmode`/`sslrootcert`/`sslcert`/
    /// `sslkey` ask; shared by the pool and one-off connections.
    tls: MakeRustlsConnect,
    tls_params: TlsParams,
    /// `host:port` of the admin URL (each host, when it names several),
    /// for TLS error messages.
    admin_addr: String,
    /// Every host of a multi-host `admin_url` and its
    /// `target_session_attrs`, for leased DSNs (`h1:p1,h2:p2`, `read-write`):
    /// an application then follows the database's failover as the broker
    /// does. `None` for one host, or when `client_host` says where clients go.
    dsn_hosts: Option<(String, Option<String>)>,
    /// Whether the admin role is a superuser, asked once. A role with only
    /// CREATEROLE must make itself a member of a leased role before
    /// `REASSIGN OWNED`/`DROP OWNED` may touch what that role owns.
    superuser: tokio::sync::OnceCell<bool>,
    /// Role creations waiting for a shared round.
    creates: Arc<CreateRounds>,
    /// Off only for the bench's (b′), which sends one lease's statements.
    share_creates: bool,
    /// Revocations that took one commit (`revoke_in_one_commit`), for the
    /// tests.
    one_commit_revocations: std::sync::atomic::AtomicU64,
    /// Whether the server refuses a wrong password (`trust` in
    /// pg_hba.conf does not), probed by preflight at most every
    /// [`password_probe::REPROBE_AFTER`].
    password_check: Arc<password_probe::CachedCheck>,
}

impl PostgresBackend {
    pub fn new(config: &DatabaseConfig) -> Result<Self> {
        let url_err = |e: &dyn std::fmt::Display| {
            Error::config(format!("databases.{}.admin_url: {e}", config.name))
        };
        // One host or several, URL or key=value (`connstr`); the TLS
        // parameters are ours to read, and the rest is tokio-postgres's.
        let parsed = crate::connstr::parse(&config.admin_url).map_err(|e| url_err(&e))?;
        let admin_addr = parsed.hosts_label();
        let dsn_hosts = dsn_hosts(config, &parsed);
        let (mut base, tls_params) = (parsed.config, parsed.tls);
        let (tls, ssl_mode) = dbtls::postgres_connector(&tls_params).map_err(|e| url_err(&e))?;
        base.ssl_mode(ssl_mode);
        base.connect_timeout(config.connect_timeout);
        base.application_name("credbroker");
        // A primary that vanished without a word (a partition, a dead
        // machine) fails our statements within this, not after the
        // kernel's retransmissions: a multi-host admin_url then moves on.
        base.keepalives_idle(std::time::Duration::from_secs(10))
            .tcp_user_timeout(config.statement_timeout + config.connect_timeout);
        // plan_cache_mode: our prepared catalog queries are planned once per
        // connection, not on every execution (PostgreSQL 12+).
        base.options(format!(
            "-c statement_timeout={} -c lock_timeout={} -c plan_cache_mode=force_generic_plan",
            config.statement_timeout.as_millis(),
            config.statement_timeout.as_millis()
        ));
        let host = match base.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "localhost".to_string(),
        };
        let port = base.get_ports().first().copied().unwrap_or(5432);
        let database = base
            .get_dbname()
            .map(str::to_string)
            .or_else(|| base.get_user().map(str::to_string))
            .unwrap_or_else(|| "postgres".to_string());
        let endpoint = Endpoint {
            host: config.client_host.clone().unwrap_or(host),
            port: config.client_port.unwrap_or(port),
            database,
        };
        let pool = Self::build_pool(config, &base, &tls, read_admin_password(config)?)?;
        Ok(PostgresBackend {
            config: config.clone(),
            endpoint,
            pool: RwLock::new(pool),
            base,
            tls,
            tls_params,
            admin_addr,
            dsn_hosts,
            superuser: tokio::sync::OnceCell::new(),
            creates: Arc::default(),
            share_creates: true,
            one_commit_revocations: Default::default(),
            password_check: Arc::default(),
        })
    }

    fn build_pool(
        config: &DatabaseConfig,
        base: &tokio_postgres::Config,
        tls: &MakeRustlsConnect,
        password: Option<Password>,
    ) -> Result<Pool> {
        let mut pg = base.clone();
        if let Some(p) = &password {
            pg.password(p.expose());
        }
        let manager = Manager::from_config(
            pg,
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let wait = config.connect_timeout + config.statement_timeout;
        Pool::builder(manager)
            .max_size(config.max_connections)
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(wait),
                create: Some(config.connect_timeout),
                recycle: Some(config.connect_timeout),
            })
            .build()
            .map_err(|e| Error::config(format!("databases.{}: {e}", config.name)))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner()).clone();
        pool.get().await.map_err(|e| self.unavailable(e))
    }
}

crate::backend::database_backend!(PostgresBackend, Postgres);

impl PostgresBackend {
    /// `Backend::dsn`: a `postgresql://` URL with the client TLS parameters
    /// (and every host of a multi-host `admin_url`).
    fn leased_dsn(&self, username: &Username, password: Option<&Password>) -> String {
        let e = &self.endpoint;
        let host = e.url_host();
        let mut tls = dbtls::client_query(
            Dialect::Postgres,
            self.config.client_sslmode,
            self.config.client_sslrootcert.as_deref(),
        );
        if let Some((hosts, attrs)) = &self.dsn_hosts {
            if let Some(attrs) = attrs {
                let join = if tls.is_empty() { '?' } else { '&' };
                tls.push_str(&format!("{join}target_session_attrs={attrs}"));
            }
            return match password {
                Some(p) => format!(
                    "postgresql://{username}:{}@{hosts}/{}{tls}",
                    p.expose(),
                    e.database
                ),
                None => format!("postgresql://{username}@{hosts}/{}{tls}", e.database),
            };
        }
        match password {
            Some(p) => format!(
                "postgresql://{username}:{}@{host}:{}/{}{tls}",
                p.expose(),
                e.port,
                e.database
            ),
            None => format!(
                "postgresql://{username}@{host}:{}/{}{tls}",
                e.port, e.database
            ),
        }
    }
}

/// The hosts a leased DSN names when `admin_url` names several (TCP hosts
/// only; a socket directory has no place in a URL's host list).
fn dsn_hosts(
    config: &DatabaseConfig,
    parsed: &crate::connstr::PgConnStr,
) -> Option<(String, Option<String>)> {
    if config.client_host.is_some()
        || parsed.hosts.len() < 2
        || parsed.hosts.iter().any(|h| h.host.starts_with('/'))
    {
        return None;
    }
    let hosts = parsed
        .hosts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let attrs = (parsed.target_session_attrs != "any").then(|| parsed.target_session_attrs.clone());
    Some((hosts, attrs))
}
