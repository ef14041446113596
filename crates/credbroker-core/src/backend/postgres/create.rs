//! Creating a leased role: one implicit transaction per lease, shared
//! with the creations that arrive while another runs (`CreateRounds`),
//! and on a refusal the statement the database refused.

use postgres_protocol::escape::{escape_identifier, escape_literal};

use super::sql::{pg_timestamp, rewrites_an_acl, ACL_LOCK};
use super::{DryRun, PostgresBackend};
use crate::backend::{render_grant, NewUser};
use crate::error::{Error, Result};
use crate::scram;

/// Most creations one shared round sends.
const MAX_CREATE_ROUND: usize = 64;

/// Role creations that arrive while another is running share the next
/// round: one simple-query message, so one implicit transaction and one
/// commit for all of them, as the lease store group-commits its writes.
/// A round that fails (one refused grant, a lost catalog race) commits
/// nothing, and each of its creations is then run alone, so one lease's
/// failure stays its own and keeps its diagnostics. A broker role whose
/// last creation failed is kept out of shared rounds until one of its
/// creations succeeds again, so a misconfigured grant does not make every
/// other lease pay for two rounds.
#[derive(Default)]
pub(super) struct CreateRounds {
    /// Broker roles whose last creation failed.
    suspect: std::sync::Mutex<std::collections::HashSet<String>>,
    queue: std::sync::Mutex<Vec<(String, tokio::sync::oneshot::Sender<bool>)>>,
    running: tokio::sync::Mutex<()>,
    /// Rounds that committed, and the creations they carried.
    committed: std::sync::atomic::AtomicU64,
    carried: std::sync::atomic::AtomicU64,
}

impl PostgresBackend {
    /// Shared creation rounds that committed, and how many creations they
    /// carried between them (what the tests and the bench read).
    /// Every creation alone, as one lease would send it without a broker
    /// in front (the bench's (b′)).
    pub fn without_shared_rounds(mut self) -> Self {
        self.share_creates = false;
        self
    }

    pub fn shared_creates(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.creates.committed.load(Relaxed),
            self.creates.carried.load(Relaxed),
        )
    }

    /// Queues `sql` for the next shared round; true once it committed with
    /// it, false when the caller must run it alone. The round runs in a
    /// task of its own: a caller that goes away cannot cancel the others'.
    async fn create_in_shared_round(&self, sql: String) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.creates
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((sql, tx));
        let rounds = self.creates.clone();
        let pool = self.pool.read().unwrap_or_else(|p| p.into_inner()).clone();
        tokio::spawn(async move {
            let _round = rounds.running.lock().await;
            let batch: Vec<_> = {
                let mut q = rounds.queue.lock().unwrap_or_else(|p| p.into_inner());
                let n = q.len().min(MAX_CREATE_ROUND);
                q.drain(..n).collect()
            };
            // Empty: a round that started after we queued took ours too.
            if batch.is_empty() {
                return;
            }
            let (sqls, waiters): (Vec<String>, Vec<_>) = batch.into_iter().unzip();
            let committed = match pool.get().await {
                Ok(client) => {
                    let all = crate::steps::timed(
                        "statement: shared create round",
                        client.batch_execute(&sqls.join("\n")),
                    )
                    .await;
                    all.is_ok()
                }
                Err(_) => false,
            };
            if committed {
                use std::sync::atomic::Ordering::Relaxed;
                rounds.committed.fetch_add(1, Relaxed);
                rounds.carried.fetch_add(waiters.len() as u64, Relaxed);
            }
            for tx in waiters {
                let _ = tx.send(committed);
            }
        });
        rx.await.unwrap_or(false)
    }

    pub(super) async fn create_leased(&self, user: &NewUser<'_>) -> Result<()> {
        let ident = escape_identifier(user.username.as_str());
        let verifier = scram::verifier(user.password, self.config.scram_iterations);
        // Membership grants (`GRANT reader TO …`) add rows and never
        // collide; only privileges on objects rewrite a shared ACL.
        let lock = if user.grants.iter().any(|g| rewrites_an_acl(g)) {
            format!("{ACL_LOCK};\n")
        } else {
            String::new()
        };
        let mut sql = format!(
            "{lock}CREATE ROLE {ident} LOGIN PASSWORD {} VALID UNTIL {};",
            escape_literal(&verifier),
            pg_timestamp(user.valid_until)
        );
        if let Some(owner) = user.owner {
            // Membership, so the lease can `SET ROLE owner` and create
            // objects that belong to the owner from the start.
            sql.push_str(&format!("\nGRANT {} TO {ident};", escape_identifier(owner)));
        }
        for g in user.grants {
            sql.push('\n');
            sql.push_str(&render_grant(g, &ident));
            sql.push(';');
        }
        if !self.share_creates {
            return self.create_alone(&sql, user).await;
        }
        // Nobody else is creating: no round to share, so no hop to one.
        let alone = self.creates.running.try_lock().ok().filter(|_| {
            self.creates
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        });
        let suspect = || {
            self.creates
                .suspect
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(user.role)
        };
        let result = match alone {
            Some(_lane) => self.create_alone(&sql, user).await,
            None if suspect() => self.create_alone(&sql, user).await,
            None if self.create_in_shared_round(sql.clone()).await => return Ok(()),
            None => self.create_alone(&sql, user).await,
        };
        let mut suspects = self
            .creates
            .suspect
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match &result {
            Err(Error::Unavailable(_)) => {}
            Err(_) => {
                suspects.insert(user.role.to_string());
            }
            Ok(()) => {
                suspects.remove(user.role);
            }
        }
        result
    }

    async fn create_alone(&self, sql: &str, user: &NewUser<'_>) -> Result<()> {
        let client = self.client().await?;
        // One simple-query message without BEGIN runs as one implicit
        // transaction: any failing grant rolls the role back with it, and the
        // pooled connection is left clean.
        match self.batch_retrying(&client, sql, "create role").await {
            // A refusal: say which statement, not only the server's words.
            // The batch's error stays the source (`db_error` dropped it if
            // it could quote the verifier).
            Err(Error::Internal(m)) => match self.failing_statement(&client, user).await {
                Some(stmt) => Err(Error::Internal(m.map_message(|_| {
                    format!(
                        "database {:?}: create role for role {:?}: {stmt} as {}",
                        self.config.name,
                        user.role,
                        self.admin_location()
                    )
                }))),
                None => Err(Error::Internal(m)),
            },
            other => other,
        }
    }

    /// After a failed `create_user`: which of its statements the database
    /// refused, found by running them again one by one in a transaction
    /// that is rolled back, so an operator reads "GRANT 2 of role R"
    /// rather than a bare "permission denied for table orders". `None`
    /// when every statement passes this time (a race).
    async fn failing_statement(
        &self,
        client: &tokio_postgres::Client,
        user: &NewUser<'_>,
    ) -> Option<String> {
        let ident = escape_identifier(user.username.as_str());
        let plan = DryRun {
            create: format!("CREATE ROLE {ident} NOLOGIN"),
            owner: user
                .owner
                .map(|o| format!("GRANT {} TO {ident}", escape_identifier(o))),
            grants: user
                .grants
                .iter()
                .map(|g| render_grant(g, &ident))
                .collect(),
        };
        let found = plan.run(client).await.err();
        let _ = client.batch_execute("ROLLBACK").await;
        found.map(|f| f.describe(user.grants))
    }
}
