//! A routine handover's drain (`revocation::drain`): refuse new logins,
//! then end the role's sessions once idle (for the settle time the pass
//! asks for), leaving a session in a query or an open transaction to
//! finish.

use std::time::Duration;

use super::sql::pg_timestamp;
use super::PostgresBackend;
use crate::backend::{Sessions, UserRef};
use crate::error::Result;

/// Ends the sessions of role `$1` idle for at least `$2` seconds and
/// counts the others. Idle since `state_change`: a pooled connection
/// between two queries is `idle` too, and ending it the instant it is
/// races the query its pool already sent (`revocation::drain::settle`).
/// `CASE` fixes the order: `pg_terminate_backend` runs only for a session
/// seen idle (an `AND` would let the planner call it first). `idle in
/// transaction` is busy: its transaction may still commit. A state the
/// admin may not see (NULL: no `pg_read_all_stats`) counts as busy, never
/// as idle.
const END_IDLE: &str = "WITH s AS MATERIALIZED ( \
       SELECT a.pid, \
              a.state = 'idle' \
                AND a.state_change <= clock_timestamp() - make_interval(secs => $2) AS idle \
       FROM pg_stat_get_activity(NULL) a \
       WHERE a.usesysid = (SELECT oid FROM pg_roles WHERE rolname = $1)) \
     SELECT \
       ARRAY(SELECT pid::int8 FROM s \
             WHERE CASE WHEN s.idle THEN pg_terminate_backend(s.pid) ELSE false END), \
       (SELECT count(*) FROM s WHERE s.idle IS NOT TRUE)";

impl PostgresBackend {
    pub(super) async fn drain_begin_user(
        &self,
        user: &UserRef,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<()> {
        // One statement, committed on its own: no login from here on, and
        // the role's expiry is the drain deadline.
        let options = format!("NOLOGIN VALID UNTIL {}", pg_timestamp(until));
        self.alter_role(user.username.as_str(), &options, "refuse logins (drain)")
            .await
    }

    pub(super) async fn end_idle(&self, user: &str, settled: Duration) -> Result<Sessions> {
        let client = self.client().await?;
        let stmt = self.prepare(&client, END_IDLE).await?;
        let row = client
            .query_one(&stmt, &[&user, &settled.as_secs_f64()])
            .await
            .map_err(|e| self.db_error("end idle sessions", e))?;
        let busy: i64 = row.get(1);
        Ok(Sessions {
            ended_idle: row.get(0),
            busy: busy.max(0) as u32,
        })
    }
}
