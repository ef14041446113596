//! Static roles' users: created once (idempotently), their password set
//! at each rotation, retired when the static role goes.

use chrono::Utc;
use postgres_protocol::escape::{escape_identifier, escape_literal};

use super::sql::{pg_timestamp, rewrites_an_acl, ACL_LOCK, TERMINATE_BY_NAME};
use super::PostgresBackend;
use crate::backend::{in_static_role, render_grant, StaticLogin, StaticUsers};
use crate::error::Result;
use crate::lease::Password;
use crate::scram;

impl PostgresBackend {
    pub(super) async fn create_static_users(&self, spec: &StaticUsers<'_>) -> Result<()> {
        let owner = escape_identifier(spec.owner);
        let mut sql = String::new();
        for u in spec.users {
            let ident = escape_identifier(u);
            // Names are validated (letters, digits, _) and quoted; the DO
            // block makes CREATE ROLE idempotent. Membership of the owner,
            // as for a role's leased users: `SET ROLE owner` makes what
            // the session creates belong to the owner (migration tools).
            sql.push_str(&format!(
                "DO $credbroker$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) \
                 THEN CREATE ROLE {ident} NOLOGIN; END IF; END $credbroker$;\n\
                 GRANT {owner} TO {ident};\n",
                escape_literal(u),
            ));
            for g in spec.grants {
                sql.push_str(&render_grant(g, &ident));
                sql.push_str(";\n");
            }
        }
        let lock = if spec.grants.iter().any(|g| rewrites_an_acl(g)) {
            format!("{ACL_LOCK};\n")
        } else {
            String::new()
        };
        let client = self.client().await?;
        self.batch_retrying(&client, &format!("{lock}{sql}"), "create static users")
            .await
            .map_err(|e| in_static_role(spec.role, e))
    }

    pub(super) async fn set_static_password(&self, login: &StaticLogin<'_>) -> Result<()> {
        let verifier = scram::verifier(login.password, self.config.scram_iterations);
        let options = format!(
            "WITH LOGIN PASSWORD {} VALID UNTIL {}",
            escape_literal(&verifier),
            pg_timestamp(login.valid_until)
        );
        self.alter_role(login.user, &options, "set static password")
            .await
            .map_err(|e| in_static_role(login.role, e))
    }

    pub(super) async fn retire_static_user(
        &self,
        user: &str,
        _host: &str,
        end_sessions: bool,
    ) -> Result<()> {
        // A verifier of a random password that is dropped at once: nobody
        // can ever know it, and NOLOGIN refuses even that.
        let unknown = scram::verifier(&Password::generate(), 1);
        let sql = format!(
            "ALTER ROLE {} WITH NOLOGIN PASSWORD {} VALID UNTIL {}",
            escape_identifier(user),
            escape_literal(&unknown),
            pg_timestamp(Utc::now())
        );
        let client = self.client().await?;
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| self.db_error("retire static user", e))?;
        if end_sessions {
            let names = vec![user.to_string()];
            client
                .query(TERMINATE_BY_NAME, &[&names])
                .await
                .map_err(|e| self.db_error("terminate sessions", e))?;
        }
        Ok(())
    }
}
