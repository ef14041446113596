//! A leased user's statements replayed in a transaction the caller rolls
//! back (`check`, and a failed issue looking for the refused statement).

use super::sql::ACL_LOCK;
use super::Cause;

/// Statements of one leased user, replayed in a transaction the caller
/// rolls back: how `check` proves the admin may grant what a role grants,
/// and how a failed issue finds the statement the database refused.
pub struct DryRun {
    pub create: String,
    pub owner: Option<String>,
    pub grants: Vec<String>,
}

/// Which statement of a [`DryRun`] failed, with the server's words.
#[derive(Debug, Clone)]
pub struct DryRunFailure {
    pub step: DryRunStep,
    pub message: String,
    pub sqlstate: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DryRunStep {
    Begin,
    Create,
    Owner,
    /// The n-th (0-based) of the role's `grants`.
    Grant(usize),
}

impl DryRun {
    /// Runs BEGIN and every statement; stops at the first refusal. Leaves
    /// the transaction open either way: the caller rolls it back.
    pub async fn run(&self, client: &tokio_postgres::Client) -> Result<(), DryRunFailure> {
        let fail = |step: DryRunStep, e: tokio_postgres::Error| {
            let (message, sqlstate) = match e.as_db_error() {
                Some(db) => (db.message().to_string(), db.code().code().to_string()),
                None => (Cause::of(&e).detail, String::new()),
            };
            DryRunFailure {
                step,
                message,
                sqlstate,
            }
        };
        // The ACL lock too: a throwaway GRANT rewrites the same ACL rows a
        // live broker's GRANT does.
        client
            .batch_execute(&format!("BEGIN; {ACL_LOCK}"))
            .await
            .map_err(|e| fail(DryRunStep::Begin, e))?;
        client
            .batch_execute(&self.create)
            .await
            .map_err(|e| fail(DryRunStep::Create, e))?;
        if let Some(owner) = &self.owner {
            client
                .batch_execute(owner)
                .await
                .map_err(|e| fail(DryRunStep::Owner, e))?;
        }
        for (i, g) in self.grants.iter().enumerate() {
            client
                .batch_execute(g)
                .await
                .map_err(|e| fail(DryRunStep::Grant(i), e))?;
        }
        Ok(())
    }
}

impl DryRunFailure {
    /// "GRANT statement 1 of 2 (\"GRANT SELECT …\"): permission denied …".
    /// Quotes the operator's template, never a rendered statement.
    pub fn describe(&self, templates: &[String]) -> String {
        let code = if self.sqlstate.is_empty() {
            String::new()
        } else {
            format!(" (SQLSTATE {})", self.sqlstate)
        };
        let what = match self.step {
            DryRunStep::Begin => "begin".to_string(),
            DryRunStep::Create => "CREATE ROLE".to_string(),
            DryRunStep::Owner => "GRANT of the role's owner".to_string(),
            DryRunStep::Grant(i) => format!(
                "GRANT statement {} of {} ({:?})",
                i + 1,
                templates.len(),
                templates.get(i).map(String::as_str).unwrap_or("")
            ),
        };
        format!("{what}: {}{code}", self.message)
    }
}
