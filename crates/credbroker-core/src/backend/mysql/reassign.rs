//! Finding what the users being revoked are the DEFINER of, and giving it
//! to the role's owner before the drop (invariant 7). The statements are
//! built in `definer` (pure, unit-tested); here they run, on the server
//! and in the order each object kind needs.

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::definer::{self, Defined, ObjectKind, Scope};
use super::quote::{account, host_of, ident, lit};
use super::{Flavor, MysqlBackend, ServerInfo, FAILSAFE_SCHEMA};
use crate::backend::{Reassigned, Revokee, UserRef};
use crate::error::{Error, Result};

/// The definer lookup reads table definitions and routine signatures (on
/// MariaDB within the schemas the users can reach, see `definer`;
/// elsewhere in every schema), a cost that grows with what it scans more
/// than with the number of users asked about, and the scans serialise on
/// the server. So revocations that arrive while one lookup runs queue up
/// and the next lookup answers them all: one lane, a queue, each caller
/// its share of the rows. A caller always joins the queue *after* it
/// locked its users, so the lookup that answers it (its grants read
/// included) starts after the lock — nothing it reports can be created
/// after it ran.
#[derive(Default)]
pub(super) struct DefinerLookups {
    queue: std::sync::Mutex<Vec<LookupWaiter>>,
    lane: tokio::sync::Mutex<()>,
}

/// The callers' accounts (user, host) and where their share goes.
type LookupWaiter = (
    Vec<(String, String)>,
    tokio::sync::oneshot::Sender<Result<Vec<Defined>>>,
);

impl MysqlBackend {
    /// What the users are the DEFINER of, where they can reach (see
    /// `definer`), sharing the lookup with the revocations running at the
    /// same time (see [`DefinerLookups`]).
    pub(super) async fn defined_by_shared(
        &self,
        conn: &mut Conn,
        users: &[&UserRef],
    ) -> Result<Vec<Defined>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.lookups
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((accounts(users), tx));
        {
            let _lane = self.lookups.lane.lock().await;
            let batch =
                std::mem::take(&mut *self.lookups.queue.lock().unwrap_or_else(|p| p.into_inner()));
            // Empty: an earlier lookup, started after we queued, answered us.
            if !batch.is_empty() {
                let all: Vec<(String, String)> =
                    batch.iter().flat_map(|(a, _)| a.iter().cloned()).collect();
                let found = match self.scope(conn, &all).await {
                    Ok(scope) => self.defined_by_keys(conn, &keys_of(&all), &scope).await,
                    Err(e) => Err(e),
                };
                for (accounts, tx) in batch {
                    let keys = keys_of(&accounts);
                    let share = found.as_ref().map_err(Clone::clone).map(|rows| {
                        rows.iter()
                            .filter(|d| keys.iter().any(|k| d.definer.eq_ignore_ascii_case(k)))
                            .cloned()
                            .collect()
                    });
                    let _ = tx.send(share);
                }
            }
        }
        rx.await.map_err(|_| {
            Error::unavailable(format!(
                "database {:?}: the shared definer lookup was interrupted; retried",
                self.config.name
            ))
        })?
    }

    /// What the users are the DEFINER of in every schema the admin can
    /// see: the full scan, for the error path of a refused drop.
    pub(super) async fn defined_by(
        &self,
        conn: &mut Conn,
        users: &[&UserRef],
    ) -> Result<Vec<Defined>> {
        let keys = keys_of(&accounts(users));
        self.defined_by_keys(conn, &keys, &Scope::Everywhere).await
    }

    /// Where the accounts' views, triggers and routines can be: the
    /// schemas their grants reach on MariaDB, everywhere when that cannot
    /// be told (see `definer`). Grant tables the admin may not read are no
    /// error, only the slower full scan.
    async fn scope(&self, conn: &mut Conn, accounts: &[(String, String)]) -> Result<Scope> {
        let server = self.server().await?;
        if !definer::scopes_lookups(server.flavor, server.version) {
            return Ok(Scope::Everywhere);
        }
        let mut names: Vec<&str> = accounts.iter().map(|(u, _)| u.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        match self
            .timed_raw("read grants", conn.query(definer::reach_sql(&names)))
            .await?
        {
            Ok(rows) => Ok(definer::scope_of(&rows)),
            Err(mysql_async::Error::Server(e)) => {
                tracing::debug!(database = %self.config.name, error = %e.message,
                    "grants unreadable; the definer lookup scans every schema");
                Ok(Scope::Everywhere)
            }
            Err(e) => Err(self.db_error("read grants", e)),
        }
    }

    async fn defined_by_keys(
        &self,
        conn: &mut Conn,
        keys: &[String],
        scope: &Scope,
    ) -> Result<Vec<Defined>> {
        let rows: Vec<(String, String, String, String, String, String)> = self
            .timed(
                "list defined objects",
                conn.query(definer::defined_objects_sql(keys, scope, FAILSAFE_SCHEMA)),
            )
            .await?;
        rows.into_iter()
            .map(|(kind, schema, name, definer, extra, security)| {
                let kind = ObjectKind::parse(&kind).ok_or_else(|| {
                    Error::internal(format!(
                        "database {:?}: unknown object kind {kind:?} defined by {definer}",
                        self.config.name
                    ))
                })?;
                Ok(Defined {
                    kind,
                    schema,
                    name,
                    definer,
                    extra,
                    security,
                })
            })
            .collect()
    }

    /// Gives each revokee's objects to its owner (or the admin account).
    /// Runs on a connection of its own, closed afterwards: re-creating a
    /// routine changes the session's `sql_mode` and default schema.
    pub(super) async fn move_definers(
        &self,
        server: &ServerInfo,
        revokees: &[Revokee],
        defined: &[Defined],
    ) -> Result<Vec<Reassigned>> {
        let mut conn = self.conn().await?;
        let result = self
            .move_definers_on(&mut conn, server, revokees, defined)
            .await;
        let _ = conn.disconnect().await;
        result
    }

    async fn move_definers_on(
        &self,
        conn: &mut Conn,
        server: &ServerInfo,
        revokees: &[Revokee],
        defined: &[Defined],
    ) -> Result<Vec<Reassigned>> {
        let mut out = Vec::new();
        let mut admin: Option<(String, String)> = None;
        for r in revokees {
            let user = r.user.username.as_str();
            let host = host_of(&r.user);
            let key = definer::definer_key(user, host);
            let objects: Vec<&Defined> = defined
                .iter()
                .filter(|d| d.definer.eq_ignore_ascii_case(&key))
                .collect();
            if objects.is_empty() {
                continue;
            }
            let what = definer::summary(&objects);
            let (to_user, to_host) = match &r.owner {
                Some(owner) => {
                    let (u, h) = definer::owner_account(owner);
                    (u.to_string(), h.to_string())
                }
                None => match &admin {
                    Some(a) => a.clone(),
                    None => {
                        let me = self.current_user(conn).await?;
                        admin = Some(me.clone());
                        me
                    }
                },
            };
            let to = account(&to_user, &to_host);
            if r.owner.is_some() {
                // MariaDB accepts a DEFINER that does not exist (with a
                // warning) and the objects then fail as if the definer
                // were dropped: check first.
                let n: Option<u64> = self
                    .timed(
                        "look up owner",
                        conn.query_first(format!(
                            "SELECT COUNT(*) FROM mysql.user WHERE User = {} AND Host = {}",
                            lit(&to_user),
                            lit(&to_host)
                        )),
                    )
                    .await?;
                if n.unwrap_or(0) == 0 {
                    return Err(Error::FailedPrecondition(format!(
                        "user {user} is the DEFINER of {what}; the role's owner account {to} does not exist: \
                         create it or set the role's owner to an existing account (the user stays locked)"
                    )));
                }
            }
            for o in &objects {
                self.move_one(conn, server, o, user, host, &to)
                    .await
                    .map_err(|e| {
                        Error::FailedPrecondition(format!(
                            "user {user} is the DEFINER of {what}; moving {} {} to {to} failed: {e}; \
                             set the role's owner or grant the admin SET USER (MariaDB) / SET_USER_ID \
                             (MySQL 8; SET_ANY_DEFINER from 8.2) (the user stays locked)",
                            o.kind.keyword().to_ascii_lowercase(),
                            o.qualified()
                        ))
                    })?;
            }
            out.push(Reassigned {
                username: r.user.username.clone(),
                objects: objects.len() as u64,
                to: definer::definer_key(&to_user, &to_host),
            });
        }
        Ok(out)
    }

    /// Gives one object the definer `to` (an [`account`]).
    async fn move_one(
        &self,
        conn: &mut Conn,
        server: &ServerInfo,
        o: &Defined,
        user: &str,
        host: &str,
        to: &str,
    ) -> Result<()> {
        let show = format!("SHOW CREATE {} {}", o.kind.keyword(), o.qualified());
        match o.kind {
            ObjectKind::Event => {
                let sql = definer::alter_event_sql(o, to)?;
                self.timed("move event definer", conn.query_drop(sql)).await
            }
            ObjectKind::View => {
                // MySQL prints the view's name unqualified.
                self.timed(
                    "use schema",
                    conn.query_drop(format!("USE {}", ident(&o.schema))),
                )
                .await?;
                let row: Option<mysql_async::Row> =
                    self.timed("show view", conn.query_first(show)).await?;
                let shown = row
                    .and_then(|r| r.get_opt::<Option<String>, usize>(1))
                    .and_then(|v| v.ok())
                    .flatten()
                    .ok_or_else(|| self.not_shown(o))?;
                let sql = definer::alter_view_sql(&shown, o, user, host, to)?;
                self.timed("move view definer", conn.query_drop(sql)).await
            }
            ObjectKind::Procedure | ObjectKind::Function | ObjectKind::Trigger => {
                // Columns: name, sql_mode, statement, …; the statement is
                // NULL when the admin may not read the body.
                let row: Option<mysql_async::Row> =
                    self.timed("show routine", conn.query_first(show)).await?;
                let col = |r: &mysql_async::Row, i: usize| {
                    r.get_opt::<Option<String>, usize>(i)
                        .and_then(|v| v.ok())
                        .flatten()
                };
                let (mode, shown) = match &row {
                    Some(r) => (col(r, 1).unwrap_or_default(), col(r, 2)),
                    None => (String::new(), None),
                };
                let shown = shown.ok_or_else(|| self.not_shown(o))?;
                let sql = definer::recreate_sql(&shown, o, user, host, to, server.flavor)?;
                // The text is parsed again as it was at first: same
                // sql_mode, same default schema (it names objects
                // unqualified).
                self.timed(
                    "set sql_mode",
                    conn.query_drop(format!("SET SESSION sql_mode = {}", lit(&mode))),
                )
                .await?;
                self.timed(
                    "use schema",
                    conn.query_drop(format!("USE {}", ident(&o.schema))),
                )
                .await?;
                if server.flavor == Flavor::Mariadb {
                    return self
                        .timed("re-create with new definer", conn.query_drop(sql))
                        .await;
                }
                // MySQL 8 (written from its manual, not run here): no
                // CREATE OR REPLACE for routines and triggers, so drop and
                // create; a failed create puts the original back (its
                // definer still exists: the user is dropped only later).
                self.timed(
                    "drop for re-create",
                    conn.query_drop(format!("DROP {} {}", o.kind.keyword(), o.qualified())),
                )
                .await?;
                match self
                    .timed("re-create with new definer", conn.query_drop(sql))
                    .await
                {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        if let Err(undo) = self
                            .timed("restore original", conn.query_drop(shown.as_str()))
                            .await
                        {
                            tracing::error!(database = %self.config.name, object = %o.qualified(),
                                error = %crate::error::chain(&undo), "could not restore an object after a failed definer move");
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    fn not_shown(&self, o: &Defined) -> Error {
        Error::internal(format!(
            "database {:?}: SHOW CREATE {} {} gave no statement; the admin account needs SELECT (views) or \
             the right to read routine bodies (SHOW_ROUTINE on MySQL, SELECT on mysql.proc on MariaDB)",
            self.config.name,
            o.kind.keyword(),
            o.qualified()
        ))
    }

    /// The admin account, which inherits what a role without owner defined.
    pub(super) async fn current_user(&self, conn: &mut Conn) -> Result<(String, String)> {
        let me: Option<String> = self
            .timed(
                "read current user",
                conn.query_first("SELECT CURRENT_USER()"),
            )
            .await?;
        let me = me.unwrap_or_default();
        me.rsplit_once('@')
            .map(|(u, h)| (u.to_string(), h.to_string()))
            .ok_or_else(|| {
                Error::internal(format!(
                    "database {:?}: unexpected CURRENT_USER() {me:?}",
                    self.config.name
                ))
            })
    }
}

fn accounts(users: &[&UserRef]) -> Vec<(String, String)> {
    users
        .iter()
        .map(|u| (u.username.as_str().to_string(), host_of(u).to_string()))
        .collect()
}

/// `user@host` of each account, as the DEFINER columns spell it.
fn keys_of(accounts: &[(String, String)]) -> Vec<String> {
    accounts
        .iter()
        .map(|(u, h)| definer::definer_key(u, h))
        .collect()
}
