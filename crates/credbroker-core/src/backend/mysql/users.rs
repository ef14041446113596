//! Leased users: created after their failsafe event (MySQL DDL is not
//! transactional, so a failed create drops what it made), extended by
//! moving the event, and listed by prefix for the orphan sweep.

use chrono::{DateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::errors::code;
use super::failsafe::{event_name, schedule_at};
use super::quote::{account, host_of, lit};
use super::MysqlBackend;
use crate::backend::{render_grant, Backend, NewUser, Revokee, UserRef};
use crate::error::{Error, Result};
use crate::lease::Username;

impl MysqlBackend {
    pub(super) async fn create_leased(&self, user: &NewUser<'_>) -> Result<()> {
        let server = self.server().await?;
        let name = user.username.as_str();
        if name.len() > server.max_user_len {
            return Err(Error::internal(format!(
                "database {:?}: user name of {} characters exceeds the server's limit of {}",
                self.config.name,
                name.len(),
                server.max_user_len
            )));
        }
        let host = if user.host.is_empty() { "%" } else { user.host };
        let acct = account(name, host);
        let mut conn = self.conn().await?;
        // MySQL DDL commits on its own: there is no transaction to roll
        // back. The failsafe comes first, so no user ever exists without
        // one; on any later failure everything made is dropped again.
        if server.failsafe.is_ok() {
            self.create_event(&mut conn, name, host, user.valid_until)
                .await?;
        }
        let mut sql = format!(
            "CREATE USER {acct} {}",
            server.identified_clause(user.password)
        );
        for g in user.grants {
            sql.push_str(";\n");
            sql.push_str(&render_grant(g, &acct));
        }
        let result = self.timed("create user", conn.query_drop(sql)).await;
        if result.is_err() {
            drop(conn);
            let undo = Revokee::new(
                UserRef {
                    username: user.username.clone(),
                    host: host.to_string(),
                },
                None,
            );
            if let Err(e) = self.revoke(std::slice::from_ref(&undo)).await {
                tracing::warn!(database = %self.config.name, username = %name, error = %crate::error::chain(&e),
                    "could not undo a failed create; the reaper will");
            }
        }
        result
    }

    pub(super) async fn extend_leased(
        &self,
        user: &UserRef,
        valid_until: DateTime<Utc>,
    ) -> Result<()> {
        let server = self.server().await?;
        let mut conn = self.conn().await?;
        let name = user.username.as_str();
        if server.failsafe.is_ok() {
            let sql = format!(
                "ALTER EVENT {} ON SCHEDULE AT {}",
                event_name(name),
                schedule_at(valid_until)
            );
            match self
                .timed_raw("move failsafe event", conn.query_drop(sql))
                .await?
            {
                Ok(()) => return Ok(()),
                Err(mysql_async::Error::Server(s)) if s.code == code::EVENT_DOES_NOT_EXIST => {}
                Err(e) => return Err(self.db_error("move failsafe event", e)),
            }
        }
        // No event: it fired (the user is gone) or was never made (the
        // failsafe was unavailable at issue).
        if !self.user_exists(&mut conn, user).await? {
            return Err(Error::FailedPrecondition(format!(
                "user {name} no longer exists in database {:?}; issue a new lease",
                self.config.name
            )));
        }
        if server.failsafe.is_ok() {
            self.create_event(&mut conn, name, host_of(user), valid_until)
                .await?;
        }
        Ok(())
    }

    async fn user_exists(&self, conn: &mut Conn, user: &UserRef) -> Result<bool> {
        let n: Option<u64> = self
            .timed(
                "look up user",
                conn.query_first(format!(
                    "SELECT COUNT(*) FROM mysql.user WHERE User = {} AND Host = {}",
                    lit(user.username.as_str()),
                    lit(host_of(user))
                )),
            )
            .await?;
        Ok(n.unwrap_or(0) > 0)
    }

    pub(super) async fn list_prefixed(&self, prefix: &str) -> Result<Vec<UserRef>> {
        let mut conn = self.conn().await?;
        let pattern = format!(
            "{}%",
            prefix
                .replace('!', "!!")
                .replace('_', "!_")
                .replace('%', "!%")
        );
        let rows: Vec<(String, String)> = self
            .timed(
                "list users",
                conn.query(format!(
                    "SELECT User, Host FROM mysql.user WHERE User LIKE {} ESCAPE '!'",
                    lit(&pattern)
                )),
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter(|(u, _)| Username::is_broker_made(prefix, u))
            .map(|(u, host)| UserRef {
                username: Username::from_store(u),
                host,
            })
            .collect())
    }
}
