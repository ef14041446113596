//! Revocation and `disable`, in the order that keeps a failure safe: lock
//! the account first (no new login), kill its sessions, move its DEFINERs
//! (`reassign`), then drop it and its failsafe event. What fails after the
//! lock leaves a locked account with no session, never a usable one.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::definer::{self, Defined};
use super::errors::code;
use super::failsafe::event_name;
use super::quote::{account, host_of, lits};
use super::{Flavor, MysqlBackend};
use crate::backend::{Reassigned, Revokee, UserRef};
use crate::error::{Error, Result};

impl MysqlBackend {
    pub(super) async fn revoke_users(&self, revokees: &[Revokee]) -> Result<Vec<Reassigned>> {
        if revokees.is_empty() {
            return Ok(Vec::new());
        }
        let server = self.server().await?.clone();
        let users: Vec<&UserRef> = revokees.iter().map(|r| &r.user).collect();
        let names: Vec<&str> = users.iter().map(|u| u.username.as_str()).collect();
        let mut conn = self.conn().await?;
        // Lock first: from here on no new login starts (at once, on both
        // MySQL and MariaDB), so the sessions killed next are all there
        // are, and should anything below fail — a definer that cannot be
        // moved, a DROP USER that MySQL refuses — the credential is dead
        // all the same and the lease shows `failing` (invariant 7).
        if server.can_lock() {
            self.lock(&mut conn, &users).await?;
            self.kill_sessions(&mut conn, &names).await?;
        }
        // Always looked up (the costliest step of a MySQL revocation): a
        // role's grants prove nothing, since a DBA can widen a lease by
        // hand. On MariaDB views, triggers and routines are looked for
        // only where the user's grants, read now, reach; what that leaves
        // out is in `definer`'s doc.
        let defined = self.defined_by_shared(&mut conn, &users).await?;
        let mut reassigned = Vec::new();
        if !defined.is_empty() {
            reassigned = self.move_definers(&server, revokees, &defined).await?;
        }
        let accounts = users
            .iter()
            .map(|u| account(u.username.as_str(), host_of(u)))
            .collect::<Vec<_>>()
            .join(", ");
        match self
            .timed_raw(
                "drop user",
                conn.query_drop(format!("DROP USER IF EXISTS {accounts}")),
            )
            .await?
        {
            Ok(()) => {}
            Err(e) => return Err(self.drop_refused(&mut conn, &users, e).await),
        }
        // Without a lock this is the only kill; with one it catches a
        // login that was already past its checks when the lock came.
        self.kill_sessions(&mut conn, &names).await?;
        // A failsafe left behind only locks or drops a user that no longer
        // exists (names are never reused) and then deletes itself: not
        // worth failing a revocation over.
        let drops: String = names
            .iter()
            .map(|u| format!("DROP EVENT IF EXISTS {};", event_name(u)))
            .collect();
        if let Err(e) = self
            .timed("drop failsafe event", conn.query_drop(drops))
            .await
        {
            tracing::warn!(database = %self.config.name, error = %crate::error::chain(&e),
                "failsafe events not dropped; they will fire harmlessly");
        }
        Ok(reassigned)
    }

    pub(super) async fn disable_users(&self, users: &[UserRef]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        let server = self.server().await?.clone();
        if !server.can_lock() {
            return Err(Error::FailedPrecondition(format!(
                "database {:?}: MariaDB {}.{} has no ACCOUNT LOCK, so an account can only be disabled by dropping it",
                self.config.name, server.version.0, server.version.1
            )));
        }
        let refs: Vec<&UserRef> = users.iter().collect();
        let names: Vec<&str> = users.iter().map(|u| u.username.as_str()).collect();
        let mut conn = self.conn().await?;
        self.lock(&mut conn, &refs).await?;
        self.kill_sessions(&mut conn, &names).await?;
        // The last word on a lease the broker is about to forget: only the
        // server's own record of the lock counts, not the ALTER's success.
        let rows: Vec<(String, String, Option<String>)> = self
            .timed(
                "verify account lock",
                conn.query(lock_state_sql(server.flavor, &names)),
            )
            .await
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "cannot confirm the accounts are locked ({e}); the admin account needs SELECT on {}",
                    lock_state_table(server.flavor)
                ))
            })?;
        for u in users {
            let state = rows
                .iter()
                .find(|(n, h, _)| n == u.username.as_str() && h.eq_ignore_ascii_case(host_of(u)));
            // No row: the account is gone, which is as disabled as it gets.
            if let Some((_, _, value)) = state {
                if !is_locked(server.flavor, value.as_deref()) {
                    return Err(Error::FailedPrecondition(format!(
                        "user {} is not locked after ACCOUNT LOCK (the server reports {value:?})",
                        u.username
                    )));
                }
            }
        }
        // KILL only flags a session; it is gone once its thread notices.
        let count = format!(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER IN ({}) AND COMMAND <> 'Killed'",
            lits(&names)
        );
        for attempt in 0..20 {
            let left: Option<u64> = self
                .timed("count sessions", conn.query_first(count.as_str()))
                .await?;
            if left.unwrap_or(0) == 0 {
                return Ok(());
            }
            if attempt % 5 == 4 {
                self.kill_sessions(&mut conn, &names).await?;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(Error::FailedPrecondition(format!(
            "database {:?}: sessions of a locked user are still running after KILL",
            self.config.name
        )))
    }

    /// `ALTER USER … ACCOUNT LOCK` for every user that still exists.
    pub(super) async fn lock(&self, conn: &mut Conn, users: &[&UserRef]) -> Result<()> {
        let accounts = users
            .iter()
            .map(|u| account(u.username.as_str(), host_of(u)))
            .collect::<Vec<_>>()
            .join(", ");
        self.timed(
            "lock account",
            conn.query_drop(format!("ALTER USER IF EXISTS {accounts} ACCOUNT LOCK")),
        )
        .await
    }

    /// `KILL CONNECTION` for every session of `names`; one that ends on
    /// its own in between is no error.
    pub(super) async fn kill_sessions(&self, conn: &mut Conn, names: &[&str]) -> Result<()> {
        let sessions: Vec<u64> = self
            .timed(
                "list sessions",
                conn.query(format!(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE USER IN ({})",
                    lits(names)
                )),
            )
            .await?;
        for id in sessions {
            match self
                .timed_raw(
                    "kill session",
                    conn.query_drop(format!("KILL CONNECTION {id}")),
                )
                .await?
            {
                Ok(()) => {}
                Err(mysql_async::Error::Server(s)) if s.code == code::NO_SUCH_THREAD => {}
                Err(e) => return Err(self.db_error("kill session", e)),
            }
        }
        Ok(())
    }

    /// A refused `DROP USER`, named by its reason when it is a definer the
    /// move did not reach (MySQL 8.0.22+: an object the admin cannot see),
    /// looked for in every schema.
    async fn drop_refused(
        &self,
        conn: &mut Conn,
        users: &[&UserRef],
        e: mysql_async::Error,
    ) -> Error {
        let as_definer =
            matches!(&e, mysql_async::Error::Server(s) if s.code == code::REFERENCED_AS_DEFINER);
        let err = self.db_error("drop user", e);
        if matches!(err, Error::Unavailable(_)) {
            return err;
        }
        let left = self.defined_by(conn, users).await.unwrap_or_default();
        for u in users {
            let key = definer::definer_key(u.username.as_str(), host_of(u));
            let objects: Vec<&Defined> = left
                .iter()
                .filter(|d| d.definer.eq_ignore_ascii_case(&key))
                .collect();
            if !objects.is_empty() {
                return Error::FailedPrecondition(format!(
                    "user {} is the DEFINER of {}; set the role's owner or grant the admin SET_USER_ID \
                     (the user stays locked, its sessions ended): {err}",
                    u.username,
                    definer::summary(&objects)
                ));
            }
        }
        if as_definer {
            return Error::FailedPrecondition(format!(
                "the server refuses to drop a user that is still a DEFINER of objects the admin account cannot \
                 see; grant it SELECT, SHOW VIEW, TRIGGER, EVENT and SHOW_ROUTINE where leased users create \
                 objects (the user stays locked, its sessions ended): {err}"
            ));
        }
        err
    }
}

/// Where the server keeps whether an account is locked: MariaDB 10.4+ in
/// the `mysql.global_priv` JSON (`account_locked`), MySQL 5.7.6+ in
/// `mysql.user.account_locked` (`'Y'`/`'N'`).
fn lock_state_table(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Mariadb => "mysql.global_priv",
        Flavor::Mysql => "mysql.user",
    }
}

/// User, Host and the lock state of `names`, as text.
fn lock_state_sql(flavor: Flavor, names: &[&str]) -> String {
    let state = match flavor {
        Flavor::Mariadb => "JSON_VALUE(Priv, '$.account_locked')",
        Flavor::Mysql => "CAST(account_locked AS CHAR)",
    };
    format!(
        "SELECT User, Host, {state} FROM {} WHERE User IN ({})",
        lock_state_table(flavor),
        lits(names)
    )
}

fn is_locked(flavor: Flavor, state: Option<&str>) -> bool {
    match (flavor, state) {
        (Flavor::Mariadb, Some(v)) => v == "1" || v.eq_ignore_ascii_case("true"),
        (Flavor::Mysql, Some(v)) => v.eq_ignore_ascii_case("Y"),
        (_, None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mysql::ServerInfo;

    #[test]
    fn lock_state_is_read_where_each_server_keeps_it() {
        assert_eq!(
            lock_state_sql(Flavor::Mariadb, &["cb_a", "cb_b"]),
            "SELECT User, Host, JSON_VALUE(Priv, '$.account_locked') FROM mysql.global_priv \
             WHERE User IN ('cb_a', 'cb_b')"
        );
        assert!(lock_state_sql(Flavor::Mysql, &["cb_a"])
            .contains("account_locked AS CHAR) FROM mysql.user"));
        assert!(is_locked(Flavor::Mariadb, Some("1")));
        assert!(is_locked(Flavor::Mariadb, Some("true")));
        assert!(!is_locked(Flavor::Mariadb, Some("0")));
        // No value (an account never locked, an unreadable table) is no proof.
        assert!(!is_locked(Flavor::Mariadb, None));
        assert!(is_locked(Flavor::Mysql, Some("Y")));
        assert!(!is_locked(Flavor::Mysql, Some("N")));
        let s = |flavor, version| ServerInfo {
            flavor,
            version,
            max_user_len: 32,
            failsafe: Ok(()),
        };
        assert!(s(Flavor::Mariadb, (10, 4, 0)).can_lock());
        assert!(!s(Flavor::Mariadb, (10, 3, 39)).can_lock());
        assert!(s(Flavor::Mysql, (5, 7, 44)).can_lock());
    }
}
