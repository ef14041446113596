//! The database-side expiry (invariant 4): a one-shot event per leased or
//! static user, on the server's own clock, that ends the login even if the
//! broker never comes back. The SQL lives here so the two failsafes and
//! the probe that proves the server can run them are read side by side.

use chrono::{DateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::definer;
use super::errors::code;
use super::quote::{account, ident, lit};
use super::MysqlBackend;
use crate::error::Result;

/// The schema that holds the failsafe events. One per server, shared by
/// every broker using it: event names are the (unique, random) user names.
pub const FAILSAFE_SCHEMA: &str = "credbroker";

impl MysqlBackend {
    /// Tries what every issue will do: create (and drop) an event in the
    /// failsafe schema, making the schema first if it is missing.
    ///
    /// The probe carries a real failsafe body (for a user that does not
    /// exist; it is dropped at once and would do nothing if left): a
    /// server that refuses some statement in it says so here, as a
    /// warning, instead of failing every issue later.
    pub(super) async fn probe_failsafe(
        &self,
        conn: &mut Conn,
        can_lock: bool,
    ) -> Result<std::result::Result<(), String>> {
        let schema = ident(FAILSAFE_SCHEMA);
        let made = self
            .timed_raw(
                "create failsafe schema",
                conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS {schema}")),
            )
            .await?;
        let probe_name = format!("probe_{:016x}", rand::random::<u64>());
        let probe = format!("{schema}.{}", ident(&probe_name));
        let created = self
            .timed_raw(
                "create failsafe probe event",
                conn.query_drop(format!(
                    "CREATE EVENT {probe} ON SCHEDULE AT CURRENT_TIMESTAMP + INTERVAL 1 DAY \
                     ON COMPLETION NOT PRESERVE DO {}",
                    failsafe_body(&probe_name, "%", can_lock)
                )),
            )
            .await?;
        Ok(match created {
            Ok(()) => {
                let _ = self
                    .timed_raw(
                        "drop failsafe probe event",
                        conn.query_drop(format!("DROP EVENT IF EXISTS {probe}")),
                    )
                    .await;
                Ok(())
            }
            Err(e) => {
                let why = |e: &mysql_async::Error| match e {
                    mysql_async::Error::Server(s) => format!("{} ({})", s.message, s.code),
                    other => other.to_string(),
                };
                Err(match made {
                    Err(m) => format!(
                        "cannot create schema `{FAILSAFE_SCHEMA}` ({}) nor events in it ({}); \
                         grant the admin account CREATE and EVENT on `{FAILSAFE_SCHEMA}`.*",
                        why(&m),
                        why(&e)
                    ),
                    Ok(()) => format!(
                        "cannot create events in `{FAILSAFE_SCHEMA}` ({}); grant the admin account EVENT on `{FAILSAFE_SCHEMA}`.*",
                        why(&e)
                    ),
                })
            }
        })
    }

    pub(super) async fn create_event(
        &self,
        conn: &mut Conn,
        username: &str,
        host: &str,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let sql = format!(
            "CREATE EVENT {} ON SCHEDULE AT {} ON COMPLETION NOT PRESERVE \
             COMMENT 'credbroker failsafe: locks, then drops the leased user at expiry' DO {}",
            event_name(username),
            schedule_at(at),
            failsafe_body(username, host, self.server().await?.can_lock())
        );
        self.timed("create failsafe event", conn.query_drop(sql))
            .await
    }
}

pub(super) fn event_name(username: &str) -> String {
    format!("{}.{}", ident(FAILSAFE_SCHEMA), ident(username))
}

/// `AT` clause on the server's own clock, so a skew between broker and
/// database clocks cannot move it. `CURRENT_TIMESTAMP` has whole seconds:
/// one extra second means the event never fires before the lease expires.
pub(super) fn schedule_at(at: DateTime<Utc>) -> String {
    let ms = (at - Utc::now()).num_milliseconds().max(0);
    let secs = (ms + 999) / 1000 + 1;
    format!("CURRENT_TIMESTAMP + INTERVAL {secs} SECOND")
}

/// The failsafe, run at expiry by the server as the broker's admin (the
/// event's definer) when the broker could not revoke in time. Same order
/// as a revocation: lock the account (no new login from here on), kill
/// every session it still has, then drop it — but only when it is the
/// DEFINER of nothing. Its views and routines need a new definer first,
/// which takes the broker (see `reassign`); dropping it here would
/// break them on MariaDB (MySQL 8.0.22+ would refuse). A locked account
/// with no session is no usable credential; the broker's reaper finishes
/// the revocation when it returns. Without `ACCOUNT LOCK` (MariaDB before
/// 10.4) the drop itself is the only way to refuse logins, so it drops.
fn failsafe_body(username: &str, host: &str, can_lock: bool) -> String {
    let acct = account(username, host);
    let (lock, drop) = if can_lock {
        (
            format!("ALTER USER IF EXISTS {acct} ACCOUNT LOCK;"),
            format!(
                "SELECT {} INTO defines; \
                 IF defines = 0 THEN DROP USER IF EXISTS {acct}; END IF;",
                definer::defined_count_expr(&definer::definer_key(username, host), FAILSAFE_SCHEMA)
            ),
        )
    } else {
        (format!("DROP USER IF EXISTS {acct};"), String::new())
    };
    sessions_killed_between(username, "DECLARE defines BIGINT DEFAULT 0; ", &lock, &drop)
}

/// An event body that runs `first`, kills every session of `user` (on any
/// host: `PROCESSLIST` has no host part to match), then runs `last`; the
/// two failsafes (a lease's, a static user's) differ only in those.
/// `vars` declares their variables: MySQL wants every variable declared
/// before the cursor and the handlers.
fn sessions_killed_between(user: &str, vars: &str, first: &str, last: &str) -> String {
    format!(
        "BEGIN \
           DECLARE done INT DEFAULT 0; \
           {vars}\
           DECLARE cid BIGINT UNSIGNED; \
           DECLARE c CURSOR FOR SELECT ID FROM information_schema.PROCESSLIST WHERE USER = {user}; \
           DECLARE CONTINUE HANDLER FOR NOT FOUND SET done = 1; \
           DECLARE CONTINUE HANDLER FOR {no_thread} BEGIN END; \
           {first} \
           OPEN c; \
           sessions: LOOP \
             FETCH c INTO cid; \
             IF done THEN LEAVE sessions; END IF; \
             KILL CONNECTION cid; \
           END LOOP; \
           CLOSE c; \
           {last} \
         END",
        user = lit(user),
        no_thread = code::NO_SUCH_THREAD,
    )
}

/// The failsafe event of a static user: `static_` + the user, beside the
/// leases' events (a lease's user starts with a `name_prefix` of at most
/// six characters, so never with `static_`).
pub(super) fn static_event_name(user: &str) -> String {
    format!(
        "{}.{}",
        ident(FAILSAFE_SCHEMA),
        ident(&format!("static_{user}"))
    )
}

/// What a static user's failsafe does at its password's `valid_until`:
/// the password becomes a random hash nobody knows (`unknown`), the
/// account is locked where the server can, and its sessions are killed.
/// Never a drop: the user belongs to a DBA (or owns the static role's
/// objects).
pub(super) fn static_failsafe_body(
    user: &str,
    host: &str,
    unknown: &str,
    can_lock: bool,
) -> String {
    let acct = account(user, host);
    let lock = if can_lock { " ACCOUNT LOCK" } else { "" };
    sessions_killed_between(
        user,
        "",
        &format!("ALTER USER IF EXISTS {acct} {unknown}{lock};"),
        "",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_and_events_are_quoted() {
        assert_eq!(account("cb_x_1", "10.0.0.%"), "'cb_x_1'@'10.0.0.%'");
        assert_eq!(lit("a'b\\c"), "'a''b\\\\c'");
        assert_eq!(event_name("cb_x"), "`credbroker`.`cb_x`");
        let body = failsafe_body("cb_x", "%", false);
        assert!(body.contains("DROP USER IF EXISTS 'cb_x'@'%'"));
        assert!(body.contains("KILL CONNECTION cid"));
        assert!(!body.contains("ACCOUNT LOCK"));
    }

    #[test]
    fn failsafe_locks_kills_and_drops_only_a_user_that_defines_nothing() {
        let body = failsafe_body("cb_x_1", "10.0.%", true);
        let at = |needle: &str| {
            body.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in {body}"))
        };
        let lock = at("ALTER USER IF EXISTS 'cb_x_1'@'10.0.%' ACCOUNT LOCK;");
        let kill = at("KILL CONNECTION cid");
        let count = at("information_schema.VIEWS WHERE DEFINER = 'cb_x_1@10.0.%'");
        let drop = at("IF defines = 0 THEN DROP USER IF EXISTS 'cb_x_1'@'10.0.%'; END IF;");
        assert!(lock < kill && kill < count && count < drop, "{body}");
        assert!(body.contains("EVENT_SCHEMA <> 'credbroker'"));
    }

    #[test]
    fn failsafe_never_fires_before_the_expiry() {
        let at = Utc::now() + chrono::Duration::milliseconds(10_500);
        // 10.5 s away: 11 s rounded up, plus the whole-second slack.
        assert_eq!(schedule_at(at), "CURRENT_TIMESTAMP + INTERVAL 12 SECOND");
        assert_eq!(
            schedule_at(Utc::now() - chrono::Duration::seconds(5)),
            "CURRENT_TIMESTAMP + INTERVAL 1 SECOND"
        );
    }
}
