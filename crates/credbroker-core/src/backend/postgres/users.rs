//! Leased users after creation: a later `VALID UNTIL`, and the roles that
//! carry the broker's prefix.

use chrono::{DateTime, Utc};
use postgres_protocol::escape::escape_identifier;

use super::sql::pg_timestamp;
use super::PostgresBackend;
use crate::backend::{prefix_pattern, UserRef};
use crate::error::Result;
use crate::lease::Username;

impl PostgresBackend {
    pub(super) async fn extend_leased(
        &self,
        user: &UserRef,
        valid_until: DateTime<Utc>,
    ) -> Result<()> {
        let options = format!("VALID UNTIL {}", pg_timestamp(valid_until));
        self.alter_role(user.username.as_str(), &options, "extend role")
            .await
    }

    /// `ALTER ROLE user options`: one statement on a pooled admin
    /// connection, committed on its own; `what` names it in an error.
    pub(super) async fn alter_role(&self, user: &str, options: &str, what: &str) -> Result<()> {
        let client = self.client().await?;
        let sql = format!("ALTER ROLE {} {options}", escape_identifier(user));
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| self.db_error(what, e))
    }

    pub(super) async fn list_prefixed(&self, prefix: &str) -> Result<Vec<UserRef>> {
        let client = self.client().await?;
        let names = prefixed_roles(&client, prefix)
            .await
            .map_err(|e| self.db_error("list roles", e))?;
        Ok(names
            .into_iter()
            .filter(|n| Username::is_broker_made(prefix, n))
            .map(|n| UserRef {
                username: Username::from_store(n),
                host: String::new(),
            })
            .collect())
    }
}

/// The roles whose names start with `prefix`: what the reaper's orphan
/// sweep and `check` look among for the broker's users.
pub(super) async fn prefixed_roles(
    client: &tokio_postgres::Client,
    prefix: &str,
) -> std::result::Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1",
            &[&prefix_pattern(prefix)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}
