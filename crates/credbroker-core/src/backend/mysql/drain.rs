//! A routine handover's drain (`revocation::drain`): lock the account,
//! then kill its sessions once idle (for the settle time the pass asks
//! for), leaving a session in a statement or an open transaction to
//! finish.

use std::time::Duration;

use mysql_async::prelude::Queryable;

use super::errors::code;
use super::quote::{account, host_of, lits};
use super::server::Flavor;
use super::MysqlBackend;
use crate::backend::{Sessions, UserRef};
use crate::error::{Error, Result};

impl MysqlBackend {
    pub(super) async fn drain_begin_user(
        &self,
        user: &UserRef,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<()> {
        let server = self.server().await?.clone();
        if !server.can_lock() {
            return Err(Error::FailedPrecondition(format!(
                "database {:?}: MariaDB {}.{} has no ACCOUNT LOCK, so logins cannot be refused \
                 while sessions drain",
                self.config.name, server.version.0, server.version.1
            )));
        }
        {
            let mut conn = self.conn().await?;
            self.timed(
                "lock account (drain)",
                conn.query_drop(format!(
                    "ALTER USER IF EXISTS {} ACCOUNT LOCK",
                    account(user.username.as_str(), host_of(user))
                )),
            )
            .await?;
        }
        // The failsafe event (lock, kill, drop) now fires at the deadline:
        // the database ends the drain itself should the broker be gone.
        self.extend_leased(user, until).await
    }

    pub(super) async fn end_idle(&self, user: &str, settled: Duration) -> Result<Sessions> {
        let mut conn = self.conn().await?;
        // Idle: asleep between statements for `settled` (a pooled
        // connection between two queries sleeps too, and killing it then
        // races the query its pool already sent; `revocation::drain::settle`)
        // and holding no InnoDB transaction (`innodb_trx` lists a
        // transaction from its first statement on; a bare BEGIN with
        // nothing run yet holds nothing).
        let flavor = self.server().await?.flavor;
        let asleep = asleep_for(flavor, settled);
        let rows: Vec<(i64, i64)> = self
            .timed(
                "list sessions (drain)",
                conn.query(format!(
                    "SELECT p.ID, (p.COMMAND = 'Sleep' AND {asleep} AND NOT EXISTS \
                     (SELECT 1 FROM information_schema.INNODB_TRX t \
                     WHERE t.trx_mysql_thread_id = p.ID)) \
                     FROM information_schema.PROCESSLIST p \
                     WHERE p.USER = {} AND p.COMMAND <> 'Killed'",
                    lits(&[user])
                )),
            )
            .await?;
        let mut out = Sessions::default();
        for (id, idle) in rows {
            if idle == 0 {
                out.busy += 1;
                continue;
            }
            match self
                .timed_raw(
                    "kill idle session",
                    conn.query_drop(format!("KILL CONNECTION {id}")),
                )
                .await?
            {
                Ok(()) => out.ended_idle.push(id),
                Err(mysql_async::Error::Server(s)) if s.code == code::NO_SUCH_THREAD => {}
                Err(e) => return Err(self.db_error("kill idle session", e)),
            }
        }
        Ok(out)
    }
}

/// The PROCESSLIST condition "asleep for at least `settled`". MariaDB's
/// `TIME_MS` is exact; MySQL has only `TIME`, whole seconds between two
/// second stamps (so one more than asked: `TIME >= 2` is a second or more).
fn asleep_for(flavor: Flavor, settled: Duration) -> String {
    if settled.is_zero() {
        return "TRUE".into();
    }
    match flavor {
        Flavor::Mariadb => format!("p.TIME_MS >= {}", settled.as_millis()),
        Flavor::Mysql => {
            let secs = settled.as_secs() + u64::from(settled.subsec_nanos() > 0);
            format!("p.TIME >= {}", secs + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asleep_for_never_ends_a_session_asleep_for_less_than_asked() {
        let s = Duration::from_secs(1);
        assert_eq!(asleep_for(Flavor::Mariadb, s), "p.TIME_MS >= 1000");
        assert_eq!(asleep_for(Flavor::Mysql, s), "p.TIME >= 2");
        let ms = Duration::from_millis(1500);
        assert_eq!(asleep_for(Flavor::Mysql, ms), "p.TIME >= 3");
        assert_eq!(asleep_for(Flavor::Mariadb, Duration::ZERO), "TRUE");
        assert_eq!(asleep_for(Flavor::Mysql, Duration::ZERO), "TRUE");
    }
}
