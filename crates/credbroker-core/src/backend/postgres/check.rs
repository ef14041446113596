//! `credbroker check` for one PostgreSQL database.

use postgres_protocol::escape::escape_identifier;

use super::connection::host_port;
use super::password_probe::{password_check, PasswordCheck};
use super::{location, Cause, CauseKind, DryRun, DryRunStep};
use crate::backend::finding::{admin_password, bad_admin_url, stopped, Finding};
use crate::backend::render_grant;
use crate::config::DatabaseConfig;
use crate::dbtls;

/// What `credbroker check` learns from one PostgreSQL database: findings,
/// and the users that carry the broker's prefix (the caller asks the
/// store which of them it knows).
pub async fn check(
    db: &DatabaseConfig,
    roles: &[&crate::config::RoleConfig],
    prefix: &str,
) -> (Vec<Finding>, Option<Vec<String>>) {
    let scope = format!("database {}", db.name);
    let mut out = Vec::new();
    // TLS parameters as the broker reads them (tokio-postgres rejects most).
    let parsed = crate::connstr::parse(&db.admin_url)
        .map_err(|e| e.to_string())
        .and_then(|c| {
            let connector = dbtls::postgres_connector(&c.tls).map_err(String::from)?;
            Ok((c.config, connector, c.tls))
        });
    let (mut cfg, (tls, ssl_mode), tls_params) = match parsed {
        Ok(c) => c,
        Err(e) => return stopped(out, bad_admin_url(&scope, e)),
    };
    cfg.ssl_mode(ssl_mode);
    cfg.connect_timeout(db.connect_timeout);
    cfg.application_name("credbroker check");
    let at = location(&cfg);
    let admin = cfg.get_user().unwrap_or("?").to_string();
    match admin_password(db, &scope) {
        Ok(Some(p)) => {
            cfg.password(p.expose());
        }
        Ok(None) => {}
        Err(f) => return stopped(out, f),
    }
    let probe_tls = tls.clone();
    let client = match cfg.connect(tls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client
        }
        Err(e) if dbtls::tls_failure(&e).is_some() => {
            let why = dbtls::tls_failure(&e).unwrap_or_default();
            return stopped(out, Finding::error(
                &scope,
                format!("TLS to {at} failed ({tls_params}): {why}"),
                "point sslrootcert at the CA that signed the server's certificate, and use the \
                 host name in it (admin_url)",
            ));
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
                // No ALTER ROLE for a role that is not there.
                CauseKind::Authentication if cause.detail.contains("does not exist") => format!(
                    "create role {admin:?} (CREATE ROLE {} LOGIN CREATEROLE PASSWORD '…', as the \
                     README's step 2 does), or put the right user in admin_url",
                    escape_identifier(&admin)
                ),
                CauseKind::Authentication => format!(
                    "make the password in admin_password_file/env the one of role {admin:?} \
                     (ALTER ROLE {admin} PASSWORD '…') and let pg_hba.conf admit it"
                ),
                _ => "check admin_url and the server's log".to_string(),
            };
            return stopped(
                out,
                Finding::error(
                    &scope,
                    format!(
                        "cannot connect: {} as {at}: {}",
                        cause.kind.as_str(),
                        cause.detail
                    ),
                    fix,
                ),
            );
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
            return stopped(out, Finding::error(&scope, format!("cannot read the admin's privileges: {}", Cause::of(&e).detail), "check the server's log"));
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
    if superuser || createrole {
        if let Some(f) = password_probe(&client, &cfg, probe_tls, &scope).await {
            out.push(f);
        }
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
        let probe = format!("credbroker_check_{:016x}", rand::random::<u64>());
        let ident = escape_identifier(&probe);
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
        let held = match (&result, role.grants.is_empty()) {
            (Ok(()), false) => privileges_held(&client, &probe, role.owner.as_deref()).await,
            _ => None,
        };
        let _ = client.batch_execute("ROLLBACK").await;
        match result {
            Ok(()) if held == Some(0) => out.push(Finding::warning(
                &rscope,
                format!(
                    "dry run of CREATE ROLE and {} grant(s) passed, but they gave the role no \
                     privilege at all: no table matched (`ON ALL TABLES IN SCHEMA …` grants only \
                     the tables that exist when a lease is issued)",
                    role.grants.len()
                ),
                "create the tables before issuing leases (a lease issued before a table exists \
                 never gets it: renew does not grant again; issue a new one), or fix the \
                 schema/table names in the role's grants",
            )),
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
    let prefixed = match super::users::prefixed_roles(&client, prefix).await {
        Ok(names) => Some(names),
        Err(e) => {
            out.push(Finding::error(
                &scope,
                format!("cannot list roles: {}", Cause::of(&e).detail),
                "check the server's log",
            ));
            None
        }
    };
    (out, prefixed)
}

/// [`password_check`] as a finding: `None` when the server refused a
/// wrong password, as it should.
async fn password_probe(
    client: &tokio_postgres::Client,
    cfg: &tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    scope: &str,
) -> Option<Finding> {
    let at = host_port(cfg);
    match password_check(client, cfg, tls).await {
        PasswordCheck::Enforced => None,
        PasswordCheck::Unknown(why) => Some(Finding::warning(
            scope,
            format!(
                "could not test whether the server checks passwords (creating a probe role failed: {why})"
            ),
            "make sure pg_hba.conf asks for scram-sha-256 from where clients connect",
        )),
        PasswordCheck::NotEnforced => Some(Finding::error(
            scope,
            format!(
                "the server at {at} let a login in with a wrong password (pg_hba.conf `trust` for \
                 this address): leased passwords and their expiry are not enforced there"
            ),
            "use scram-sha-256 (not trust) in pg_hba.conf for every address clients and the broker \
             connect from, then reload PostgreSQL",
        )),
    }
}

/// How many privileges the dry run's role holds, inside its transaction:
/// ACL entries naming it on relations, columns, schemas, functions and
/// databases, memberships (but in its `owner`) and per-role settings. 0
/// means the role's grants matched nothing — `GRANT … ON ALL TABLES IN
/// SCHEMA public` on a schema with no tables yet. `None` if the catalog
/// could not be read (then nothing is claimed).
async fn privileges_held(
    client: &tokio_postgres::Client,
    role: &str,
    owner: Option<&str>,
) -> Option<i64> {
    let owner = owner.unwrap_or("");
    client
        .query_one(
            "WITH r AS (SELECT oid FROM pg_roles WHERE rolname = $1) SELECT \
               (SELECT count(*) FROM pg_class c, aclexplode(c.relacl) a, r WHERE a.grantee = r.oid) \
             + (SELECT count(*) FROM pg_attribute t, aclexplode(t.attacl) a, r WHERE a.grantee = r.oid) \
             + (SELECT count(*) FROM pg_namespace n, aclexplode(n.nspacl) a, r WHERE a.grantee = r.oid) \
             + (SELECT count(*) FROM pg_proc p, aclexplode(p.proacl) a, r WHERE a.grantee = r.oid) \
             + (SELECT count(*) FROM pg_database d, aclexplode(d.datacl) a, r WHERE a.grantee = r.oid) \
             + (SELECT count(*) FROM pg_auth_members m, r WHERE m.member = r.oid \
                  AND m.roleid NOT IN (SELECT oid FROM pg_roles WHERE rolname = $2)) \
             + (SELECT count(*) FROM pg_db_role_setting s, r WHERE s.setrole = r.oid)",
            &[&role, &owner],
        )
        .await
        .ok()
        .and_then(|row| row.try_get::<_, i64>(0).ok())
}
