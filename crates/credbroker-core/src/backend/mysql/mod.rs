//! MySQL and MariaDB backend: users with a broker-computed password hash,
//! pinned to the role's host pattern, each with a failsafe event that
//! locks it at its expiry even if the broker never comes back.
//!
//! MySQL has no `VALID UNTIL`. The database-side expiry is a one-shot
//! `EVENT … ON SCHEDULE AT` in the broker's schema ([`FAILSAFE_SCHEMA`]),
//! named like the user, that locks the account, kills its sessions and
//! drops it unless it is the DEFINER of something. It is created *before*
//! the user (so no user ever exists without one), moved by renew and
//! dropped by revoke. Where the server cannot run it (event scheduler off,
//! no `EVENT` privilege) preflight says so loudly and the broker keeps
//! working on its reaper alone.
//!
//! Revocation: `ACCOUNT LOCK` (refuses new logins at once) → `KILL
//! CONNECTION` for each session → DEFINERs moved to the role's owner
//! (`reassign`, `definer`) → `DROP USER` → the failsafe event dropped.
//! Whatever fails after the lock leaves a locked account without sessions
//! and the lease `failing`: never a usable credential, never a broken view.
//! MariaDB 10.11 is what the tests run; the MySQL 8 branches (lock state
//! in `mysql.user.account_locked`, drop-and-create of routines, `DROP
//! USER` refused for a definer from 8.0.22) follow MySQL's manual.
//!
//! One file per concern, each an `impl MysqlBackend` block over the fields
//! here: `connection` (pool, options, timeouts, rotate-root), `errors`,
//! `server` (flavour, version, preflight), `failsafe`, `users` (create,
//! extend, list), `revoke`, `reassign` (DEFINER moves), `static_users`.
//! A trait impl is one block: `impl Backend` is the delegation table
//! `backend::database_backend!` writes for both real backends, invoked
//! here. Free functions: `quote`, `auth` (password hashes), `definer`
//! (the DEFINER-move SQL, pure) and `check` (`credbroker check`).

pub mod auth;
pub mod check;
mod connection;
mod definer;
mod drain;
mod errors;
mod failsafe;
mod quote;
mod reassign;
mod revoke;
mod server;
mod static_users;
mod users;

use std::sync::RwLock;

use mysql_async::{OptsBuilder, Pool};
use tokio::sync::OnceCell;

use crate::backend::Endpoint;
use crate::config::DatabaseConfig;
use crate::dbtls::TlsParams;
use crate::lease::{Password, Username};
use reassign::DefinerLookups;

pub use failsafe::FAILSAFE_SCHEMA;
pub use quote::account;
pub use server::{Flavor, ServerInfo};

pub struct MysqlBackend {
    config: DatabaseConfig,
    endpoint: Endpoint,
    /// Connection options without the password.
    base: OptsBuilder,
    /// Replaced whole by rotate-root.
    pool: RwLock<Pool>,
    /// Learnt on the first successful connection, which may be long after
    /// start-up when the database was down then.
    server: OnceCell<ServerInfo>,
    /// `ssl-mode`, `ssl-ca`, `ssl-cert`, `ssl-key` from `admin_url`.
    tls_params: TlsParams,
    /// Concurrent revocations share one definer lookup.
    lookups: DefinerLookups,
}

crate::backend::database_backend!(MysqlBackend, Mysql);

impl MysqlBackend {
    /// `Backend::dsn`: a `mysql://` URL with the client TLS parameters.
    fn leased_dsn(&self, username: &Username, password: Option<&Password>) -> String {
        let e = &self.endpoint;
        let host = e.url_host();
        let tls = crate::dbtls::client_query(
            crate::dbtls::Dialect::Mysql,
            self.config.client_sslmode,
            self.config.client_sslrootcert.as_deref(),
        );
        match password {
            Some(p) => format!(
                "mysql://{username}:{}@{host}:{}/{}{tls}",
                p.expose(),
                e.port,
                e.database
            ),
            None => format!("mysql://{username}@{host}:{}/{}{tls}", e.port, e.database),
        }
    }
}
