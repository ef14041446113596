//! A routine handover's drain (`revocation::drain`): refuse new logins,
//! then end the role's sessions as they become idle, leaving a session in a
//! query or an open transaction to finish.

use postgres_protocol::escape::escape_identifier;

use super::sql::pg_timestamp;
use super::PostgresBackend;
use crate::backend::{Sessions, UserRef};
use crate::error::Result;

/// Ends the idle sessions of role `$1` and counts the others. `CASE` fixes
/// the order: `pg_terminate_backend` runs only for a session seen idle
/// (an `AND` would let the planner call it first). `idle in transaction`
/// is busy: its transaction may still commit. A state the admin may not
/// see (NULL: no `pg_read_all_stats`) counts as busy, never as idle.
const END_IDLE: &str = "WITH s AS MATERIALIZED ( \
       SELECT a.pid, a.state FROM pg_stat_get_activity(NULL) a \
       WHERE a.usesysid = (SELECT oid FROM pg_roles WHERE rolname = $1)) \
     SELECT \
       ARRAY(SELECT pid::int8 FROM s \
             WHERE CASE WHEN s.state = 'idle' THEN pg_terminate_backend(s.pid) ELSE false END), \
       (SELECT count(*) FROM s WHERE s.state IS DISTINCT FROM 'idle')";

impl PostgresBackend {
    pub(super) async fn drain_begin_user(
        &self,
        user: &UserRef,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<()> {
        let client = self.client().await?;
        // One statement, committed on its own: no login from here on, and
        // the role's expiry is the drain deadline.
        let sql = format!(
            "ALTER ROLE {} NOLOGIN VALID UNTIL {}",
            escape_identifier(user.username.as_str()),
            pg_timestamp(until)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| self.db_error("refuse logins (drain)", e))
    }

    pub(super) async fn end_idle(&self, user: &str) -> Result<Sessions> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(END_IDLE)
            .await
            .map_err(|e| self.db_error("prepare", e))?;
        let row = client
            .query_one(&stmt, &[&user])
            .await
            .map_err(|e| self.db_error("end idle sessions", e))?;
        let busy: i64 = row.get(1);
        Ok(Sessions {
            ended_idle: row.get(0),
            busy: busy.max(0) as u32,
        })
    }
}
