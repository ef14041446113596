//! `credbroker check` for one PostgreSQL database.

use postgres_protocol::escape::escape_identifier;

use super::connection::host_port;
use super::{location, Cause, CauseKind, DryRun, DryRunStep};
use crate::backend::finding::Finding;
use crate::backend::{read_admin_password, render_grant};
use crate::config::DatabaseConfig;
use crate::dbtls::{self, Dialect};

/// What `credbroker check` learns from one PostgreSQL database: findings,
/// and the users that carry the broker's prefix (the caller asks the
/// store which of them it knows).
pub async fn check(
    db: &DatabaseConfig,
    roles: &[&crate::config::RoleConfig],
    prefix: &str,
) -> (Vec<Finding>, Vec<String>) {
    let scope = format!("database {}", db.name);
    let mut out = Vec::new();
    // TLS parameters as the broker reads them (tokio-postgres rejects most).
    let parsed = dbtls::split_url(&db.admin_url, Dialect::Postgres).and_then(|(url, params)| {
        let cfg: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
        Ok((cfg, dbtls::postgres_connector(&params)?, params))
    });
    let (mut cfg, (tls, ssl_mode), tls_params) = match parsed {
        Ok(c) => c,
        Err(e) => {
            out.push(Finding::error(
                &scope,
                format!("admin_url: {e}"),
                "fix admin_url",
            ));
            return (out, Vec::new());
        }
    };
    cfg.ssl_mode(ssl_mode);
    cfg.connect_timeout(db.connect_timeout);
    cfg.application_name("credbroker check");
    let at = location(&cfg);
    let admin = cfg.get_user().unwrap_or("?").to_string();
    match read_admin_password(db) {
        Ok(Some(p)) => {
            cfg.password(p.expose());
        }
        Ok(None) => {}
        Err(e) => {
            out.push(Finding::error(
                &scope,
                e.to_string(),
                "create the password file (mode 0600) or set the variable the config names",
            ));
            return (out, Vec::new());
        }
    }
    let client = match cfg.connect(tls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client
        }
        Err(e) if dbtls::tls_failure(&e).is_some() => {
            let why = dbtls::tls_failure(&e).unwrap_or_default();
            out.push(Finding::error(
                &scope,
                format!("TLS to {at} failed ({tls_params}): {why}"),
                "point sslrootcert at the CA that signed the server's certificate, and use the \
                 host name in it (admin_url)",
            ));
            return (out, Vec::new());
        }
        Err(e) => {
            let cause = Cause::of(&e);
            let fix = match cause.kind {
                CauseKind::Refused => {
                    format!(
                        "is PostgreSQL running and listening at {}? (admin_url)",
                        host_port(&cfg)
                    )
                }
                CauseKind::TimedOut => {
                    "the host does not answer: check admin_url's host and port, and any firewall"
                        .to_string()
                }
                CauseKind::Authentication => format!(
                    "make the password in admin_password_file/env the one of role {admin:?} \
                     (ALTER ROLE {admin} PASSWORD '…') and let pg_hba.conf admit it"
                ),
                _ => "check admin_url and the server's log".to_string(),
            };
            out.push(Finding::error(
                &scope,
                format!(
                    "cannot connect: {} as {at}: {}",
                    cause.kind.as_str(),
                    cause.detail
                ),
                fix,
            ));
            return (out, Vec::new());
        }
    };
    let row = match client
        .query_one(
            "SELECT rolsuper, rolcreaterole, pg_has_role(current_user, 'pg_signal_backend', 'MEMBER'), \
             current_setting('server_version'), pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            out.push(Finding::error(&scope, format!("cannot read the admin's privileges: {}", Cause::of(&e).detail), "check the server's log"));
            return (out, Vec::new());
        }
    };
    let (superuser, createrole, signal, version): (bool, bool, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    out.push(Finding::ok(
        &scope,
        format!(
            "connected as {at} (PostgreSQL {version}{})",
            if superuser { ", superuser" } else { "" }
        ),
    ));
    if !superuser && !createrole {
        out.push(Finding::error(
            &scope,
            format!("admin role {admin:?} lacks CREATEROLE: every issue will fail"),
            format!("ALTER ROLE {} CREATEROLE", escape_identifier(&admin)),
        ));
    }
    let read_stats: bool = row.get(4);
    if !superuser && !read_stats {
        // pg_stat_activity hides other roles' `state` from an admin without
        // it: every session of a draining credential then looks busy, and
        // handovers end them all at the drain deadline instead of as they
        // go idle (`revocation::drain`).
        out.push(Finding::error(
            &scope,
            format!("admin role {admin:?} cannot see other sessions' state (pg_stat_activity): handovers cannot drain leased sessions as they go idle"),
            format!("GRANT pg_read_all_stats TO {}", escape_identifier(&admin)),
        ));
    }
    if !superuser && !signal {
        out.push(Finding::error(
            &scope,
            format!("admin role {admin:?} is not a member of pg_signal_backend: revocation cannot end live sessions"),
            format!("GRANT pg_signal_backend TO {}", escape_identifier(&admin)),
        ));
    }
    for role in roles {
        let rscope = format!("role {}", role.name);
        if let Some(owner) = &role.owner {
            let found = client
                .query_opt(
                    "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = $1",
                    &[owner],
                )
                .await;
            match found {
                Ok(None) => out.push(Finding::error(
                    &rscope,
                    format!("owner {owner:?} does not exist on database {}", db.name),
                    format!("CREATE ROLE {} NOLOGIN", escape_identifier(owner)),
                )),
                Ok(Some(r)) if !superuser && !r.get::<_, bool>(0) => out.push(Finding::error(
                    &rscope,
                    format!("admin role {admin:?} is not a member of owner {owner:?}: revocation cannot hand over what a lease created"),
                    format!("GRANT {} TO {} WITH ADMIN OPTION", escape_identifier(owner), escape_identifier(&admin)),
                )),
                Ok(Some(_)) => {}
                Err(e) => out.push(Finding::error(&rscope, format!("cannot look up owner {owner:?}: {}", Cause::of(&e).detail), "check the server's log")),
            }
        }
        // A name that is not broker-shaped, so no sweep could ever take it
        // for a lease; it never outlives the rolled-back transaction.
        let ident = escape_identifier(&format!("credbroker_check_{:016x}", rand::random::<u64>()));
        let plan = DryRun {
            create: format!("CREATE ROLE {ident} NOLOGIN"),
            owner: role
                .owner
                .as_ref()
                .map(|o| format!("GRANT {} TO {ident}", escape_identifier(o))),
            grants: role
                .grants
                .iter()
                .map(|g| render_grant(g, &ident))
                .collect(),
        };
        let result = plan.run(&client).await;
        let _ = client.batch_execute("ROLLBACK").await;
        match result {
            Ok(()) => out.push(Finding::ok(
                &rscope,
                format!(
                    "dry run of CREATE ROLE and {} grant(s) passed (rolled back)",
                    role.grants.len()
                ),
            )),
            Err(f) => {
                let fix = match f.step {
                    DryRunStep::Grant(_) if f.sqlstate == "42501" => format!(
                        "the admin can only grant what it holds WITH GRANT OPTION (or owns): grant it to {admin:?} \
                         WITH GRANT OPTION, or change the role's grants"
                    ),
                    DryRunStep::Create => format!("ALTER ROLE {} CREATEROLE", escape_identifier(&admin)),
                    _ => "fix the statement in the role's grants".to_string(),
                };
                out.push(Finding::error(
                    &rscope,
                    format!("dry run failed at {}", f.describe(&role.grants)),
                    fix,
                ));
            }
        }
    }
    let pattern = format!(
        "{}%",
        prefix
            .replace('\\', "\\\\")
            .replace('_', "\\_")
            .replace('%', "\\%")
    );
    let prefixed = match client
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1",
            &[&pattern],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get::<_, String>(0)).collect(),
        Err(e) => {
            out.push(Finding::error(
                &scope,
                format!("cannot list roles: {}", Cause::of(&e).detail),
                "check the server's log",
            ));
            Vec::new()
        }
    };
    (out, prefixed)
}
