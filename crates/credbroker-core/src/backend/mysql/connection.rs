//! The admin's connection: options from `admin_url` (TLS parameters taken
//! out, since mysql_async refuses them), one pool replaced whole by
//! rotate-root, and every statement under `statement_timeout`, so a
//! database that hangs fails a request instead of holding it.

use std::future::Future;
use std::sync::RwLock;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Pool, PoolConstraints, PoolOpts};
use tokio::sync::OnceCell;

use super::quote::account;
use super::reassign::DefinerLookups;
use super::{MysqlBackend, ServerInfo};
use crate::backend::{
    read_admin_password, stage_admin_password, store_admin_password, Endpoint, PoolState,
};
use crate::config::DatabaseConfig;
use crate::dbtls::{self, Dialect};
use crate::error::{Error, Result};
use crate::lease::Password;

impl MysqlBackend {
    pub fn new(config: &DatabaseConfig) -> Result<Self> {
        let bad_url = |e: &dyn std::fmt::Display| {
            Error::config(format!("databases.{}.admin_url: {e}", config.name))
        };
        // The `mysql` client's TLS names are ours to read: mysql_async
        // refuses parameters it does not know.
        let (admin_url, tls_params) =
            dbtls::split_url(&config.admin_url, Dialect::Mysql).map_err(|e| bad_url(&e))?;
        let ssl = dbtls::mysql_ssl_opts(&tls_params).map_err(|e| bad_url(&e))?;
        let url = url::Url::parse(&admin_url).map_err(|e| bad_url(&e))?;
        // mysql_async only knows the mysql:// scheme; the config also takes
        // mariadb:// for readability.
        let mysql_url = match admin_url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => admin_url.clone(),
        };
        let opts = mysql_async::Opts::from_url(&mysql_url).map_err(|e| bad_url(&e))?;
        let host = url.host_str().unwrap_or("localhost").to_string();
        let port = url.port().unwrap_or(3306);
        let database = url.path().trim_start_matches('/').to_string();
        let endpoint = Endpoint {
            host: config.client_host.clone().unwrap_or(host),
            port: config.client_port.unwrap_or(port),
            database,
        };
        let max = config.max_connections.max(1);
        let constraints = PoolConstraints::new(0, max)
            .ok_or_else(|| Error::config(format!("databases.{}: bad pool size", config.name)))?;
        let base = OptsBuilder::from_opts(opts)
            // Otherwise a loopback admin URL is silently switched to the Unix
            // socket, where accounts match as 'user'@'localhost'.
            .prefer_socket(false)
            .ssl_opts(ssl)
            .pool_opts(
                PoolOpts::new()
                    .with_constraints(constraints)
                    // Our sessions change no session state worth resetting.
                    .with_reset_connection(false),
            );
        let pool = Pool::new(Self::opts_with(&base, read_admin_password(config)?));
        Ok(MysqlBackend {
            config: config.clone(),
            endpoint,
            base,
            pool: RwLock::new(pool),
            server: OnceCell::new(),
            tls_params,
            lookups: DefinerLookups::default(),
        })
    }

    fn opts_with(base: &OptsBuilder, password: Option<Password>) -> OptsBuilder {
        match password {
            Some(p) => base.clone().pass(Some(p.expose().to_string())),
            None => base.clone(),
        }
    }

    /// A pooled connection, or `Unavailable` within the connect timeout
    /// (plus the statement timeout when the pool is busy).
    pub(super) async fn conn(&self) -> Result<Conn> {
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner()).clone();
        let wait = self.config.connect_timeout + self.config.statement_timeout;
        match tokio::time::timeout(wait, pool.get_conn()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.unavailable_from(e)),
            Err(_) => Err(self.unavailable(&format!("no connection within {wait:?}"))),
        }
    }

    /// Runs one database call under the statement timeout; the outer error
    /// is the timeout, the inner one the driver's, for callers that act on
    /// particular server codes.
    pub(super) async fn timed_raw<T>(
        &self,
        what: &'static str,
        f: impl Future<Output = std::result::Result<T, mysql_async::Error>>,
    ) -> Result<std::result::Result<T, mysql_async::Error>> {
        let r =
            crate::steps::timed(what, tokio::time::timeout(self.config.statement_timeout, f)).await;
        r.map_err(|_| {
            Error::unavailable(format!(
                "database {:?}: {what} timed out after {:?}",
                self.config.name, self.config.statement_timeout
            ))
        })
    }

    pub(super) async fn timed<T>(
        &self,
        what: &'static str,
        f: impl Future<Output = std::result::Result<T, mysql_async::Error>>,
    ) -> Result<T> {
        self.timed_raw(what, f)
            .await?
            .map_err(|e| self.db_error(what, e))
    }

    async fn logs_in_with(&self, password: &Password) -> bool {
        let opts = Self::opts_with(&self.base, Some(password.clone()));
        match tokio::time::timeout(self.config.connect_timeout, Conn::new(opts)).await {
            Ok(Ok(c)) => {
                let _ = c.disconnect().await;
                true
            }
            _ => false,
        }
    }

    pub(super) async fn rotate_admin_password(&self) -> Result<()> {
        let server = self.server().await?;
        let password = Password::generate();
        let hash = server.stored_hash(&password);
        stage_admin_password(&self.config, &password)?;
        let mut conn = self.conn().await?;
        // The account by name: MariaDB 10.11 accepts `ALTER USER
        // CURRENT_USER() IDENTIFIED BY PASSWORD …` and silently changes
        // nothing, which would lock the broker out once it kept the new
        // password.
        let (user, host) = self.current_user(&mut conn).await?;
        let (user, host) = (user.as_str(), host.as_str());
        self.timed(
            "rotate admin password",
            conn.query_drop(format!(
                "ALTER USER {} {}",
                account(user, host),
                ServerInfo::identified_with(server.flavor, server.version, &hash)
            )),
        )
        .await?;
        // Only a server that reports back the hash we sent surely has it;
        // one that cannot be asked most likely has it too (the ALTER
        // succeeded), and then losing the password would be worse.
        let stored: std::result::Result<Option<String>, Error> = self
            .timed(
                "check admin password",
                conn.exec_first(
                    "SELECT authentication_string FROM mysql.user WHERE User = ? AND Host = ?",
                    (user, host),
                ),
            )
            .await;
        drop(conn);
        if let Ok(stored) = stored {
            // A server that stores the hash in another form (untested
            // MySQL versions) gets the proof that matters: a login.
            let applied =
                stored.as_deref() == Some(hash.as_str()) || self.logs_in_with(&password).await;
            if !applied {
                return Err(Error::internal(format!(
                    "database {:?}: the server did not apply the new admin password; the old one stays",
                    self.config.name
                )));
            }
        }
        // The database has the new password now: keep it before anything
        // else can fail, or nobody would know it.
        store_admin_password(&self.config, &password)?;
        let pool = Pool::new(Self::opts_with(&self.base, Some(password)));
        let old = std::mem::replace(
            &mut *self.pool.write().unwrap_or_else(|p| p.into_inner()),
            pool,
        );
        tokio::spawn(async move {
            let _ = old.disconnect().await;
        });
        Ok(())
    }

    pub(super) async fn check_tls_handshake(&self) -> Result<()> {
        if self.tls_params.mode == dbtls::SslMode::Disable {
            return Ok(());
        }
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner()).clone();
        let result = tokio::time::timeout(self.config.connect_timeout, pool.get_conn()).await;
        match result {
            Ok(Err(e)) => match dbtls::tls_failure(&e) {
                Some(why) => {
                    let opts = self.base.clone();
                    let opts = mysql_async::Opts::from(opts);
                    Err(Error::config(format!(
                        "database {:?}: TLS to {}:{} failed ({}): {why}",
                        self.config.name,
                        opts.ip_or_hostname(),
                        opts.tcp_port(),
                        self.tls_params
                    )))
                }
                None => Ok(()),
            },
            // Connected (back to the pool for preflight), or timed out.
            _ => Ok(()),
        }
    }

    /// A MySQL ping on a pooled connection, under the statement timeout:
    /// whether the database answers now.
    pub(super) async fn answers(&self) -> Result<()> {
        let mut c = self.conn().await?;
        self.timed("ping", c.ping()).await
    }

    pub(super) fn pool_metrics(&self) -> PoolState {
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner());
        let m = pool.metrics();
        use std::sync::atomic::Ordering::Relaxed;
        PoolState {
            size: m.connection_count.load(Relaxed),
            available: m.connections_in_pool.load(Relaxed),
            max_size: self.config.max_connections,
        }
    }
}
