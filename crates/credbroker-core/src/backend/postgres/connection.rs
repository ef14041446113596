//! The admin connection: where it points, one-off connections to other
//! databases of the cluster, batches retried after a lost catalog race,
//! rotate-root, the TLS check, preflight's warnings and the pool's state.

use postgres_protocol::escape::escape_literal;

use super::errors::lost_catalog_race;
use super::password_probe::PasswordCheck;
use super::sql::ACL_LOCK;
use super::PostgresBackend;
use crate::backend::{read_admin_password, stage_admin_password, store_admin_password, PoolState};
use crate::dbtls;
use crate::error::{Error, Result};
use crate::lease::Password;
use crate::scram;

impl PostgresBackend {
    /// `user@host:port/db` of the admin connection: where a failure
    /// happened, for the operator (no password: the URL carries none).
    pub fn admin_location(&self) -> String {
        location(&self.base)
    }

    /// Runs one implicit transaction, again when it lost a race on a shared
    /// catalog row: concurrent `GRANT … ON t` / `DROP OWNED` for different
    /// roles all rewrite `t`'s ACL, and all but one fail with "tuple
    /// concurrently updated" (XX000). The loser was rolled back whole, so
    /// running it again is safe; under load (many leases of one role at
    /// once) this is the normal case, not an error.
    pub(super) async fn batch_retrying(
        &self,
        client: &tokio_postgres::Client,
        sql: &str,
        what: &str,
    ) -> Result<()> {
        const ATTEMPTS: u32 = 8;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match client.batch_execute(sql).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < ATTEMPTS && lost_catalog_race(&e) => {
                    let ms = rand::Rng::random_range(&mut rand::rng(), 1..=2u64 << attempt.min(5));
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(self.db_error(what, e)),
            }
        }
    }

    /// `sql` prepared once per pooled connection (deadpool's statement
    /// cache): parsing and rewriting the catalog views the revocation and
    /// drain statements read costs the server more than running them.
    pub(super) async fn prepare(
        &self,
        client: &deadpool_postgres::Object,
        sql: &str,
    ) -> Result<tokio_postgres::Statement> {
        client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.db_error("prepare", e))
    }

    /// Runs `sql` (under the ACL lock) in another database of the cluster:
    /// `REASSIGN OWNED` and `DROP OWNED` act on the connected database only.
    pub(super) async fn in_database(&self, dbname: &str, sql: &str) -> Result<()> {
        let mut cfg = self.base.clone();
        cfg.dbname(dbname);
        if let Some(p) = read_admin_password(&self.config)? {
            cfg.password(p.expose());
        }
        let (client, conn) = cfg
            .connect(self.tls.clone())
            .await
            .map_err(|e| self.unavailable(e))?;
        let task = tokio::spawn(conn);
        let result = client
            .batch_execute(&format!("{ACL_LOCK}; {sql}"))
            .await
            .map_err(|e| self.db_error(&format!("reassign owned objects in {dbname:?}"), e));
        drop(client);
        let _ = task.await;
        result
    }

    pub(super) async fn rotate_admin_password(&self) -> Result<()> {
        let password = Password::generate();
        let verifier = scram::verifier(&password, self.config.scram_iterations.max(4096));
        stage_admin_password(&self.config, &password)?;
        let client = self.client().await?;
        client
            .batch_execute(&format!(
                "ALTER ROLE CURRENT_USER PASSWORD {}",
                escape_literal(&verifier)
            ))
            .await
            .map_err(|e| self.db_error("rotate admin password", e))?;
        drop(client);
        // The database has the new password now: keep it before anything
        // else can fail, or nobody would know it.
        store_admin_password(&self.config, &password)?;
        let pool = Self::build_pool(&self.config, &self.base, &self.tls, Some(password))?;
        *self.pool.write().unwrap_or_else(|p| p.into_inner()) = pool;
        Ok(())
    }

    pub(super) async fn check_tls_handshake(&self) -> Result<()> {
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner()).clone();
        match pool.get().await {
            Err(deadpool_postgres::PoolError::Backend(e)) => match dbtls::tls_failure(&e) {
                Some(why) => Err(Error::config(format!(
                    "database {:?}: TLS to {} failed ({}): {why}",
                    self.config.name, self.admin_addr, self.tls_params
                ))),
                None => Ok(()),
            },
            // Connected (the connection stays pooled for preflight), or a
            // failure that is not about TLS.
            _ => Ok(()),
        }
    }

    pub(super) async fn preflight_warnings(&self) -> Result<Vec<String>> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT rolsuper, rolcreaterole, pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') \
                 FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| self.db_error("check privileges", e))?;
        let (superuser, createrole, signal): (bool, bool, bool) =
            (row.get(0), row.get(1), row.get(2));
        let mut warnings = Vec::new();
        if !superuser && !createrole {
            warnings.push(format!(
                "database {:?}: the admin role lacks CREATEROLE: issuing will fail",
                self.config.name
            ));
        }
        if !superuser && !signal {
            warnings.push(format!(
                "database {:?}: the admin role is not in pg_signal_backend: revocation cannot end live sessions",
                self.config.name
            ));
        }
        // Without CREATEROLE there is no probe role; `check` says so.
        if superuser || createrole {
            let verdict = self
                .password_check
                .get(client, self.base.clone(), self.tls.clone())
                .await;
            if verdict == Some(PasswordCheck::NotEnforced) {
                warnings.push(format!(
                    "database {:?}: NO DATABASE-SIDE EXPIRY: the server at {} let a login in with a \
                     wrong password (pg_hba.conf trust for this address): leased passwords and their \
                     VALID UNTIL are not enforced there; use scram-sha-256 in pg_hba.conf",
                    self.config.name,
                    host_port(&self.base)
                ));
            }
        }
        Ok(warnings)
    }

    /// `SELECT 1` on a pooled connection, bounded by the connect and
    /// statement timeouts: whether the database answers now.
    pub(super) async fn answers(&self) -> Result<()> {
        let wait = self.config.connect_timeout + self.config.statement_timeout;
        let asked = async {
            let client = self.client().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| self.db_error("ping", e))
        };
        match tokio::time::timeout(wait, asked).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(Error::unavailable(format!(
                "database {:?}: no answer to SELECT 1 within {wait:?}",
                self.config.name
            ))),
        }
    }

    pub(super) fn pool_metrics(&self) -> PoolState {
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner());
        let s = pool.status();
        PoolState {
            size: s.size,
            available: s.available,
            max_size: s.max_size,
        }
    }
}

/// `user@host:port/db` of a connection config (it never holds a password
/// we print: `Config`'s password is not part of this).
pub fn location(cfg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = cfg.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    // Every host of a multi-host admin_url, in the order they are tried.
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| match h {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", port(i)),
            Host::Tcp(h) => format!("{h}:{}", port(i)),
            Host::Unix(p) => format!("{}:{}", p.display(), port(i)),
        })
        .collect();
    let hosts = if hosts.is_empty() {
        format!("localhost:{}", port(0))
    } else {
        hosts.join(",")
    };
    let user = cfg.get_user().unwrap_or("?");
    let db = cfg.get_dbname().unwrap_or(user);
    format!("{user}@{hosts}/{db}")
}

/// `host:port` of a connection config.
pub(super) fn host_port(cfg: &tokio_postgres::Config) -> String {
    let at = location(cfg);
    let at = at.split_once('@').map_or(at.as_str(), |(_, rest)| rest);
    at.rsplit_once('/').map_or(at, |(hp, _)| hp).to_string()
}
