//! Static roles' users (`static_roles`): accounts the broker creates if
//! missing (locked, behind a password nobody knows) and whose passwords it
//! sets, each password behind a failsafe of its own that locks the account
//! at `valid_until`. Never dropped: a DBA's user, not a lease's.

use mysql_async::prelude::Queryable;

use super::failsafe::{schedule_at, static_event_name, static_failsafe_body};
use super::quote::{account, ident};
use super::{Flavor, MysqlBackend};
use crate::backend::{in_static_role, render_grant, StaticLogin, StaticUsers};
use crate::error::Result;
use crate::lease::Password;

impl MysqlBackend {
    pub(super) async fn create_static_users(&self, spec: &StaticUsers<'_>) -> Result<()> {
        let server = self.server().await?.clone();
        let mut conn = self.conn().await?;
        for u in spec.users {
            let acct = account(u, spec.host);
            // Locked, with a password nobody knows, until its first rotation.
            let unknown = server.identified_clause(&Password::generate());
            let mut sql = format!("CREATE USER IF NOT EXISTS {acct} {unknown}");
            if server.can_lock() {
                sql.push_str(" ACCOUNT LOCK");
            }
            // `owner` is a role (MariaDB 10.0.5+, MySQL 8.0) the users act
            // as by default; the statement forms differ.
            sql.push_str(&format!(";\nGRANT {} TO {acct}", ident(spec.owner)));
            sql.push_str(&match server.flavor {
                Flavor::Mariadb => format!(";\nSET DEFAULT ROLE {} FOR {acct}", ident(spec.owner)),
                Flavor::Mysql => format!(";\nSET DEFAULT ROLE {} TO {acct}", ident(spec.owner)),
            });
            for g in spec.grants {
                sql.push_str(";\n");
                sql.push_str(&render_grant(g, &acct));
            }
            self.timed("create static users", conn.query_drop(sql))
                .await
                .map_err(|e| in_static_role(spec.role, e))?;
        }
        Ok(())
    }

    pub(super) async fn set_static_password(&self, login: &StaticLogin<'_>) -> Result<()> {
        let server = self.server().await?.clone();
        let host = if login.host.is_empty() {
            "%"
        } else {
            login.host
        };
        let acct = account(login.user, host);
        let mut conn = self.conn().await?;
        // The failsafe first, as for leases: the password is never valid
        // without the database-side expiry behind it. MySQL has no CREATE
        // OR REPLACE EVENT, so drop and create (MariaDB takes both).
        if server.failsafe.is_ok() {
            let unknown = server.identified_clause(&Password::generate());
            let sql = format!(
                "DROP EVENT IF EXISTS {ev};\nCREATE EVENT {ev} ON SCHEDULE AT {} ON COMPLETION NOT PRESERVE \
                 COMMENT 'credbroker failsafe: locks the static user when its password expires' DO {}",
                schedule_at(login.valid_until),
                static_failsafe_body(login.user, host, &unknown, server.can_lock()),
                ev = static_event_name(login.user),
            );
            self.timed("create static failsafe event", conn.query_drop(sql))
                .await?;
        }
        // MariaDB has no dual passwords: alternating users are its only
        // overlap. MySQL 8 would take RETAIN CURRENT PASSWORD, which
        // single-user mode deliberately does not use (Vault's behaviour).
        let unlock = if server.can_lock() {
            " ACCOUNT UNLOCK"
        } else {
            ""
        };
        let sql = format!(
            "ALTER USER {acct} {}{unlock}",
            server.identified_clause(login.password)
        );
        self.timed("set static password", conn.query_drop(sql))
            .await
            .map_err(|e| in_static_role(login.role, e))
    }

    pub(super) async fn retire_static_user(
        &self,
        user: &str,
        host: &str,
        end_sessions: bool,
    ) -> Result<()> {
        let server = self.server().await?.clone();
        let host = if host.is_empty() { "%" } else { host };
        let acct = account(user, host);
        let mut conn = self.conn().await?;
        let lock = if server.can_lock() {
            " ACCOUNT LOCK"
        } else {
            ""
        };
        let unknown = server.identified_clause(&Password::generate());
        self.timed(
            "retire static user",
            conn.query_drop(format!("ALTER USER {acct} {unknown}{lock}")),
        )
        .await?;
        if end_sessions {
            self.kill_sessions(&mut conn, &[user]).await?;
        }
        if server.failsafe.is_ok() {
            if let Err(e) = self
                .timed(
                    "drop static failsafe event",
                    conn.query_drop(format!("DROP EVENT IF EXISTS {}", static_event_name(user))),
                )
                .await
            {
                tracing::warn!(database = %self.config.name, error = %crate::error::chain(&e),
                    "static failsafe event not dropped; it will fire harmlessly");
            }
        }
        Ok(())
    }
}
