//! Revocation in the order that leaves no session behind, in one round
//! trip when nothing is unusual and looking first when something is;
//! `disable` for a forced forget.

use std::collections::BTreeMap;

use postgres_protocol::escape::{escape_identifier, escape_literal};

use super::sql::{idents, nologin_sql, ACL_LOCK, TERMINATE_BY_NAME};
use super::PostgresBackend;
use crate::backend::{Reassigned, Revokee, UserRef};
use crate::error::{Error, Result};

impl PostgresBackend {
    /// Revocation batches that took one commit (no session to end).
    pub fn one_commit_revocations(&self) -> u64 {
        self.one_commit_revocations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) async fn revoke_users(&self, revokees: &[Revokee]) -> Result<Vec<Reassigned>> {
        if revokees.is_empty() {
            return Ok(Vec::new());
        }
        let revokees: Vec<&Revokee> = revokees.iter().collect();
        let client = self.client().await?;
        // The usual case, roles with no session: one transaction, one
        // commit (ARCHITECTURE.md, "What each answer of the lease path
        // waits for"). A superuser admin only: the session sweep after
        // the commit must be able to end a session of a role that no
        // longer exists.
        if self.is_superuser(&client).await? {
            let one = self.revoke_in_one_commit(&client, &revokees);
            match crate::steps::timed("statement: revoke in one commit", one).await {
                Ok(OneCommit::Done(r)) => {
                    self.one_commit_revocations
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(r);
                }
                // Sessions to end: NOLOGIN must be committed first.
                Ok(OneCommit::HasSessions) => {}
                Err(e) => {
                    tracing::debug!(error = %crate::error::chain(&e), "one-commit revocation declined; checking first");
                    let checked = self.revoke_checked(&client, &revokees);
                    return crate::steps::timed("statement: revoke, looking first", checked).await;
                }
            }
        }
        let fast = self.revoke_fast(&client, &revokees);
        match crate::steps::timed("statement: revoke in one round trip", fast).await {
            Ok(r) => Ok(r),
            // A role already gone, something owned in another database, a
            // lost catalog race: nothing was dropped; look, then act.
            Err(e) => {
                tracing::debug!(error = %crate::error::chain(&e), "one-round-trip revocation declined; checking first");
                let checked = self.revoke_checked(&client, &revokees);
                crate::steps::timed("statement: revoke, looking first", checked).await
            }
        }
    }

    pub(super) async fn disable_users(&self, users: &[UserRef]) -> Result<()> {
        let names: Vec<&str> = users.iter().map(|u| u.username.as_str()).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)",
                &[&names],
            )
            .await
            .map_err(|e| self.db_error("look up roles", e))?;
        let existing: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if existing.is_empty() {
            return Ok(());
        }
        let nologin = nologin_sql(&existing);
        client
            .batch_execute(&nologin)
            .await
            .map_err(|e| self.db_error("disable login", e))?;
        client
            .query(TERMINATE_BY_NAME, &[&existing])
            .await
            .map_err(|e| self.db_error("terminate sessions", e))?;
        let still: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1) AND rolcanlogin",
                &[&existing],
            )
            .await
            .map_err(|e| self.db_error("check login disabled", e))?
            .get(0);
        if still > 0 {
            return Err(Error::internal(format!(
                "database {:?}: {still} role(s) can still log in after NOLOGIN",
                self.config.name
            )));
        }
        Ok(())
    }

    /// Whether the admin role is a superuser (asked once per backend).
    async fn is_superuser(&self, client: &deadpool_postgres::Object) -> Result<bool> {
        self.superuser
            .get_or_try_init(|| async {
                let row = client
                    .query_one(
                        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                        &[],
                    )
                    .await
                    .map_err(|e| self.db_error("check privileges", e))?;
                Ok::<bool, Error>(row.get(0))
            })
            .await
            .copied()
    }

    /// `REASSIGN OWNED` for each owner among `revokees`, preceded, for an
    /// admin that is not a superuser, by the membership it needs to act on
    /// what the roles own. Objects survive their lease (invariant 7).
    async fn reassign_sql(
        &self,
        client: &deadpool_postgres::Object,
        revokees: &[&Revokee],
    ) -> Result<String> {
        let mut sql = String::new();
        if !self.is_superuser(client).await? {
            let names: Vec<&str> = revokees.iter().map(|r| r.user.username.as_str()).collect();
            sql.push_str(&format!("GRANT {} TO CURRENT_USER; ", idents(&names)));
        }
        for (owner, names) in by_owner(revokees) {
            let to = match owner {
                Some(o) => escape_identifier(o),
                None => "CURRENT_USER".to_string(),
            };
            sql.push_str(&format!("REASSIGN OWNED BY {} TO {to}; ", idents(&names)));
        }
        Ok(sql)
    }

    /// Leaves the pooled connection outside any transaction after a
    /// one-round-trip revocation failed part way.
    async fn rollback(&self, client: &deadpool_postgres::Object) -> Result<()> {
        client
            .batch_execute("ROLLBACK")
            .await
            .map_err(|e| self.db_error("rollback", e))
    }

    /// What each revokee owns, cluster-wide, and who it goes to.
    fn reassigned(&self, revokees: &[&Revokee], counts: &[tokio_postgres::Row]) -> Vec<Reassigned> {
        let admin = self.base.get_user().unwrap_or("postgres").to_string();
        counts
            .iter()
            .filter_map(|row| {
                let name: String = row.get(0);
                let objects: i64 = row.get(1);
                let r = revokees.iter().find(|r| r.user.username.as_str() == name)?;
                (objects > 0).then(|| Reassigned {
                    username: r.user.username.clone(),
                    objects: objects as u64,
                    to: r.owner.clone().unwrap_or_else(|| admin.clone()),
                })
            })
            .collect()
    }

    /// Revocation of roles that have no session — every role exists, owns
    /// nothing in another database, and nobody is logged in as it — in one
    /// round trip and **one commit**: NOLOGIN, a guard that aborts if any
    /// of the roles has a session, the count of what they own, the drop,
    /// `COMMIT`, then a sweep that ends any session of the dropped roles'
    /// OIDs, which the transaction left in a session setting. With no
    /// session there is nothing to end before the drop, so NOLOGIN need
    /// not be committed on its own; a login that slips in while the
    /// transaction runs (its role still has LOGIN until the commit) is
    /// ended by the sweep right after it, as the two-commit path's
    /// terminate ends one that slipped in before its NOLOGIN commit. Why
    /// the window is no wider than that path's: ARCHITECTURE.md. A role
    /// with a session aborts the transaction whole (`HasSessions`), and
    /// the two-commit path runs; anything else unexpected fails it, and
    /// the caller looks first.
    async fn revoke_in_one_commit(
        &self,
        client: &deadpool_postgres::Object,
        revokees: &[&Revokee],
    ) -> Result<OneCommit> {
        let names: Vec<&str> = revokees.iter().map(|r| r.user.username.as_str()).collect();
        let no_session = self
            .prepare(
                client,
                "SELECT 1 / (count(*) = 0)::int FROM pg_stat_get_activity(NULL) a \
                 WHERE a.usesysid IN (SELECT oid FROM pg_roles WHERE rolname = ANY($1))",
            )
            .await?;
        // Session-level (`false`): kept after COMMIT for the sweep below,
        // undone with the transaction if it aborts.
        let remember = self
            .prepare(
                client,
                "SELECT set_config('credbroker.revoked_oids', \
                 coalesce(string_agg(oid::text, ','), ''), false) \
                 FROM pg_roles WHERE rolname = ANY($1)",
            )
            .await?;
        let count = self.prepare(client, OWNED_COUNT).await?;
        let sweep = self
            .prepare(
                client,
                "SELECT pg_terminate_backend(a.pid) FROM pg_stat_get_activity(NULL) a \
                 WHERE a.usesysid = ANY(string_to_array(\
                 nullif(current_setting('credbroker.revoked_oids', true), ''), ',')::oid[])",
            )
            .await?;
        let begin = format!("BEGIN; {}", nologin_sql(&names));
        let drop = drop_sql(&names, &self.reassign_sql(client, revokees).await?);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&names];
        let (began, guarded, remembered, counted, dropped, swept) = tokio::join!(
            client.batch_execute(&begin),
            // `1 / 0` aborts the transaction when a role has a session.
            client.query(&no_session, &params),
            client.query(&remember, &params),
            client.query(&count, &params),
            client.batch_execute(&drop),
            client.query(&sweep, &[]),
        );
        let has_sessions = guarded.as_ref().err().and_then(|e| e.code())
            == Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO);
        let result = began
            .map_err(|e| self.db_error("disable login", e))
            .and(guarded.map_err(|e| self.db_error("check for sessions", e)))
            .and(remembered.map_err(|e| self.db_error("remember the roles", e)))
            .and(dropped.map_err(|e| self.db_error("reassign owned objects and drop role", e)))
            .and(swept.map_err(|e| self.db_error("end sessions of dropped roles", e)))
            .and(counted.map_err(|e| self.db_error("count owned objects", e)));
        match result {
            Ok(counts) => Ok(OneCommit::Done(self.reassigned(revokees, &counts))),
            Err(e) => {
                // Leaves the pooled connection outside any transaction (a
                // warning only, if the commit went through and the sweep
                // failed).
                self.rollback(client).await?;
                if has_sessions {
                    Ok(OneCommit::HasSessions)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Revocation for the common case — every role exists and owns nothing
    /// in another database — in one round trip: six messages sent back to
    /// back, which the server runs in order. NOLOGIN commits on its own
    /// first, so no login can slip in after the sessions are ended; then
    /// one transaction refuses to go on unless every role has lost LOGIN,
    /// counts what they own, ends their sessions, hands what they own to
    /// their owner and drops them. Anything unexpected fails that
    /// transaction whole, and the caller takes the careful path.
    async fn revoke_fast(
        &self,
        client: &deadpool_postgres::Object,
        revokees: &[&Revokee],
    ) -> Result<Vec<Reassigned>> {
        let names: Vec<&str> = revokees.iter().map(|r| r.user.username.as_str()).collect();
        // Prepared once per connection: parsing and rewriting the
        // pg_stat_activity and pg_roles views costs the server more than
        // the DDL itself.
        let guard = self
            .prepare(
                client,
                "SELECT 1 / (NOT rolcanlogin)::int FROM pg_roles WHERE rolname = ANY($1)",
            )
            .await?;
        // Not the pg_stat_activity view: it joins every role (pg_authid,
        // which churn bloats) to every backend. Roles by name (an index
        // lookup), then their backends.
        let terminate = self
            .prepare(
                client,
                "SELECT pg_terminate_backend(a.pid) FROM pg_stat_get_activity(NULL) a \
                 WHERE a.usesysid IN (SELECT oid FROM pg_roles WHERE rolname = ANY($1))",
            )
            .await?;
        let count = self.prepare(client, OWNED_COUNT).await?;
        let nologin = nologin_sql(&names);
        let drop = drop_sql(&names, &self.reassign_sql(client, revokees).await?);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&names];
        let (disabled, began, guarded, counted, terminated, dropped) = tokio::join!(
            client.batch_execute(&nologin),
            client.batch_execute("BEGIN"),
            // `1 / 0` aborts the transaction for a role that can still log in.
            client.query(&guard, &params),
            client.query(&count, &params),
            client.query(&terminate, &params),
            client.batch_execute(&drop),
        );
        let result = disabled
            .map_err(|e| self.db_error("disable login", e))
            .and(began.map_err(|e| self.db_error("begin", e)))
            .and(guarded.map_err(|e| self.db_error("check login disabled", e)))
            .and(terminated.map_err(|e| self.db_error("terminate sessions", e)))
            .and(dropped.map_err(|e| self.db_error("reassign owned objects and drop role", e)))
            .and(counted.map_err(|e| self.db_error("count owned objects", e)));
        match result {
            Ok(counts) => Ok(self.reassigned(revokees, &counts)),
            Err(e) => {
                // Leaves the pooled connection outside any transaction.
                self.rollback(client).await?;
                Err(e)
            }
        }
    }

    /// Revocation that looks before it acts: which roles still exist, and
    /// where they own something.
    async fn revoke_checked(
        &self,
        client: &deadpool_postgres::Object,
        revokees: &[&Revokee],
    ) -> Result<Vec<Reassigned>> {
        let names: Vec<&str> = revokees.iter().map(|r| r.user.username.as_str()).collect();
        // One round trip (prepared once per pooled connection): which roles
        // still exist, and which other databases hold something they own
        // or were granted. Should a live session create an object elsewhere
        // after this, DROP ROLE below fails and the retry finds it.
        let lookup = client
            .prepare_cached(
                "SELECT r.rolname::text, ARRAY(SELECT DISTINCT d.datname::text FROM pg_shdepend s \
                 JOIN pg_database d ON d.oid = s.dbid \
                 WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = r.oid \
                 AND d.datname <> current_database()) \
                 FROM pg_roles r WHERE r.rolname = ANY($1)",
            )
            .await
            .map_err(|e| self.db_error("look up roles", e))?;
        let rows = client
            .query(&lookup, &[&names])
            .await
            .map_err(|e| self.db_error("look up roles", e))?;
        let existing: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if existing.is_empty() {
            return Ok(Vec::new());
        }
        let mut other_dbs: Vec<String> = rows
            .iter()
            .flat_map(|r| r.get::<_, Vec<String>>(1))
            .collect();
        other_dbs.sort();
        other_dbs.dedup();
        let present: Vec<&Revokee> = revokees
            .iter()
            .copied()
            .filter(|r| existing.iter().any(|e| e == r.user.username.as_str()))
            .collect();
        let existing: Vec<&str> = existing.iter().map(String::as_str).collect();
        let list = idents(&existing);
        // 1. No new logins — committed on its own, before step 2, so no
        // login can slip in after it. 2. End live sessions (a dropped role's
        // open session would otherwise keep running queries). 3. Hand what
        // the roles own to their owner and drop what they were granted, in
        // every database. 4. Drop the roles.
        let nologin = nologin_sql(&existing);
        // Prepared once per connection: parsing and rewriting the
        // pg_stat_activity view costs the server more than the DDL itself.
        let terminate = client
            .prepare_cached(TERMINATE_BY_NAME)
            .await
            .map_err(|e| self.db_error("terminate sessions", e))?;
        // Sent back to back in one round trip; the server runs them in order.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&existing];
        let (disabled, terminated) = tokio::join!(
            client.batch_execute(&nologin),
            client.query(&terminate, &params)
        );
        disabled.map_err(|e| self.db_error("disable login", e))?;
        terminated.map_err(|e| self.db_error("terminate sessions", e))?;
        let counts = client
            .query(OWNED_COUNT, &params)
            .await
            .map_err(|e| self.db_error("count owned objects", e))?;
        let reassigned = self.reassigned(&present, &counts);
        let reassign = self.reassign_sql(client, &present).await?;
        let per_db = format!("{reassign}DROP OWNED BY {list}");
        for db in &other_dbs {
            self.in_database(db, &per_db).await?;
        }
        let drop = format!("{ACL_LOCK}; {per_db}; DROP ROLE IF EXISTS {list};");
        self.batch_retrying(client, &drop, "reassign owned objects and drop role")
            .await?;
        Ok(reassigned)
    }
}

/// The end of a one-round-trip revocation: `reassign` (what the roles own
/// to its owner), then their privileges and the roles dropped, and the
/// transaction committed. DROP OWNED rewrites the ACLs the roles appear
/// in: under the same lock as grants, or a concurrent issue's GRANT makes
/// one of them fail. After REASSIGN OWNED, it drops privileges only, never
/// an object. Roles that appear in no ACL and own nothing (membership
/// grants only) skip the lock, so their revocations run side by side.
fn drop_sql(names: &[&str], reassign: &str) -> String {
    let lock = acl_lock_if_needed(names);
    let list = idents(names);
    format!("{lock}; {reassign}DROP OWNED BY {list}; DROP ROLE {list}; COMMIT;")
}

/// How the one-commit revocation ended when nothing went wrong.
enum OneCommit {
    /// The roles are gone; what they owned went to these owners.
    Done(Vec<Reassigned>),
    /// A role has a session: nothing was done, and NOLOGIN must be
    /// committed before the sessions are ended (`revoke_fast`).
    HasSessions,
}

/// [`ACL_LOCK`], taken only when one of the roles has a row in
/// `pg_shdepend` (owns something, or holds a privilege on an object): a
/// lease whose grants are role memberships has no ACL for `DROP OWNED` to
/// rewrite, and taking the lock anyway made every revocation of a database
/// wait for the one before it. Should a privilege be granted to the role
/// between this check and `DROP OWNED`, the race fails the transaction
/// ("tuple concurrently updated") and the careful path, which always
/// locks, runs instead: never a wrong result, only a slower one.
fn acl_lock_if_needed(names: &[&str]) -> String {
    let literals = names
        .iter()
        .map(|n| escape_literal(n))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{ACL_LOCK} WHERE EXISTS (SELECT 1 FROM pg_shdepend s \
         WHERE s.refclassid = 'pg_authid'::regclass \
         AND s.refobjid IN (SELECT oid FROM pg_roles WHERE rolname IN ({literals})))"
    )
}

/// Objects each role owns in the whole cluster (`pg_shdepend` has a row per
/// owned object in any database, plus shared objects).
const OWNED_COUNT: &str = "SELECT r.rolname::text, (SELECT count(*) FROM pg_shdepend s \
     WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = r.oid AND s.deptype = 'o') \
     FROM pg_roles r WHERE r.rolname = ANY($1)";

/// Revokees grouped by who inherits what they own (`None`: the admin).
fn by_owner<'r>(revokees: &[&'r Revokee]) -> BTreeMap<Option<&'r str>, Vec<&'r str>> {
    let mut out: BTreeMap<Option<&str>, Vec<&str>> = BTreeMap::new();
    for r in revokees {
        out.entry(r.owner.as_deref())
            .or_default()
            .push(r.user.username.as_str());
    }
    out
}
