//! `credbroker check` for a MySQL/MariaDB database: the admin's global and
//! schema privileges, the event scheduler the failsafe needs, and users
//! with the broker's prefix. Grants are not dry-run here: MySQL DDL is not
//! transactional, so a "dry run" would really create a user.

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};

use crate::backend::finding::{admin_password, bad_admin_url, stopped, Finding};
use crate::backend::mysql::definer::{self, GRANT_TABLES};
use crate::backend::mysql::{ServerInfo, FAILSAFE_SCHEMA};
use crate::config::{DatabaseConfig, RoleConfig};

pub async fn check(
    db: &DatabaseConfig,
    roles: &[&RoleConfig],
    prefix: &str,
) -> (Vec<Finding>, Option<Vec<String>>) {
    let scope = format!("database {}", db.name);
    let mut out = Vec::new();
    // TLS parameters as the broker reads them (mysql_async rejects them).
    let parsed = crate::dbtls::split_url(&db.admin_url, crate::dbtls::Dialect::Mysql).and_then(
        |(url, params)| {
            let url = url
                .strip_prefix("mariadb://")
                .map(|r| format!("mysql://{r}"))
                .unwrap_or(url);
            let opts = mysql_async::Opts::from_url(&url).map_err(|e| e.to_string())?;
            Ok((opts, crate::dbtls::mysql_ssl_opts(&params)?))
        },
    );
    let (opts, ssl) = match parsed {
        Ok(o) => o,
        Err(e) => return stopped(out, bad_admin_url(&scope, e)),
    };
    let at = format!(
        "{}@{}:{}",
        opts.user().unwrap_or("?"),
        opts.ip_or_hostname(),
        opts.tcp_port()
    );
    let admin = opts.user().unwrap_or("?").to_string();
    let mut builder = OptsBuilder::from_opts(opts)
        .prefer_socket(false)
        .ssl_opts(ssl);
    match admin_password(db, &scope) {
        Ok(Some(p)) => builder = builder.pass(Some(p.expose().to_string())),
        Ok(None) => {}
        Err(f) => return stopped(out, f),
    }
    let mut conn = match tokio::time::timeout(db.connect_timeout, Conn::new(builder)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let (what, fix) = match &e {
                mysql_async::Error::Server(s) if [1044, 1045, 1698].contains(&s.code) => (
                    "authentication failed",
                    format!("make the password in admin_password_file/env the one of {admin:?}"),
                ),
                mysql_async::Error::Io(_) if crate::dbtls::tls_failure(&e).is_some() => (
                    "TLS failed",
                    "point ssl-ca at the CA that signed the server's certificate, and use the \
                     host name in it (admin_url)"
                        .to_string(),
                ),
                mysql_async::Error::Io(_) => (
                    "connection failed",
                    format!("is the server running and listening at {at}? (admin_url)"),
                ),
                _ => (
                    "connection failed",
                    "check admin_url and the server's log".to_string(),
                ),
            };
            return stopped(
                out,
                Finding::error(
                    &scope,
                    format!("cannot connect: {what} as {at}: {}", cause_text(&e)),
                    fix,
                ),
            );
        }
        Err(_) => {
            return stopped(
                out,
                Finding::error(
                    &scope,
                    format!("cannot connect: connection timed out as {at}"),
                    "check admin_url's host and port, and any firewall",
                ),
            );
        }
    };
    let version: String = conn
        .query_first("SELECT VERSION()")
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    out.push(Finding::ok(
        &scope,
        format!("connected as {at} ({version})"),
    ));

    // Global privileges of the account we are (CURRENT_USER, not USER():
    // the matched account, host pattern included).
    let global: Vec<String> = conn
        .query(
            "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = \
             CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), '''@''', \
             SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''')",
        )
        .await
        .unwrap_or_default();
    let schema: Vec<String> = conn
        .exec(
            "SELECT PRIVILEGE_TYPE FROM information_schema.SCHEMA_PRIVILEGES WHERE GRANTEE = \
             CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), '''@''', \
             SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''') AND TABLE_SCHEMA = ?",
            (FAILSAFE_SCHEMA,),
        )
        .await
        .unwrap_or_default();
    // MySQL 8 keeps dynamic privileges (CONNECTION_ADMIN) in
    // mysql.global_grants, not in USER_PRIVILEGES; MariaDB has no such
    // table (the query fails and adds nothing).
    let dynamic: Vec<String> = conn
        .query(
            "SELECT PRIV FROM mysql.global_grants WHERE CONCAT(USER, '@', HOST) = CURRENT_USER()",
        )
        .await
        .unwrap_or_default();
    let has = |p: &str| {
        global
            .iter()
            .chain(&dynamic)
            .any(|g| g.eq_ignore_ascii_case(p) || g.replace('_', " ").eq_ignore_ascii_case(p))
    };
    let has_schema = |p: &str| has(p) || schema.iter().any(|g| g.eq_ignore_ascii_case(p));
    let account = "'<admin>'@'<host>'";
    for (privilege, why) in [
        ("CREATE USER", "issuing creates users"),
        (
            "PROCESS",
            "revocation finds a user's sessions, and a handover's drain which of them are idle",
        ),
    ] {
        if !has(privilege) {
            out.push(Finding::error(
                &scope,
                format!("admin {admin:?} lacks {privilege}: {why}"),
                format!("GRANT {privilege} ON *.* TO {account}"),
            ));
        }
    }
    if !has("CONNECTION ADMIN") && !has("SUPER") {
        out.push(Finding::error(
            &scope,
            format!("admin {admin:?} lacks CONNECTION ADMIN (or SUPER): revocation cannot kill a user's sessions"),
            format!("GRANT CONNECTION ADMIN ON *.* TO {account}"),
        ));
    }
    for privilege in ["CREATE", "EVENT"] {
        if !has_schema(privilege) {
            out.push(Finding::error(
                &scope,
                format!("admin {admin:?} lacks {privilege} on {FAILSAFE_SCHEMA}.*: no failsafe event, no database-side expiry"),
                format!("GRANT CREATE, EVENT ON {FAILSAFE_SCHEMA}.* TO {account}"),
            ));
        }
    }
    // Where the look-up is scoped at all (MariaDB 10.4+), say whether it can be.
    if let Ok((flavor, v)) = ServerInfo::from_version(&version) {
        if definer::scopes_lookups(flavor, v) {
            out.push(definer_scope(&mut conn, &scope, &admin, account).await);
        }
    }
    let scheduler: Option<String> = conn
        .query_first("SELECT @@GLOBAL.event_scheduler")
        .await
        .ok()
        .flatten();
    match scheduler.as_deref() {
        Some(s) if s.eq_ignore_ascii_case("ON") => {
            out.push(Finding::ok(&scope, "event_scheduler is ON: failsafe events will run"))
        }
        other => out.push(Finding::error(
            &scope,
            format!(
                "event_scheduler is {}: failsafe events never run, so a leased user outlives a dead broker",
                other.unwrap_or("unknown")
            ),
            "SET GLOBAL event_scheduler = ON, and event_scheduler = ON under [mysqld] in the server's config",
        )),
    }
    if !roles.is_empty() {
        out.push(Finding::ok(
            &scope,
            format!(
                "{} role(s); their grants are not dry-run (MySQL DDL is not transactional)",
                roles.len()
            ),
        ));
    }
    let prefixed: Option<Vec<String>> = match conn
        .exec(
            "SELECT DISTINCT User FROM mysql.user WHERE User LIKE ?",
            (crate::backend::prefix_pattern(prefix),),
        )
        .await
    {
        Ok(v) => Some(v),
        Err(e) => {
            out.push(Finding::error(
                &scope,
                format!("cannot list users: {}", cause_text(&e)),
                format!("GRANT SELECT ON mysql.user TO {account}"),
            ));
            None
        }
    };
    let _ = conn.disconnect().await;
    (out, prefixed)
}

/// Whether revocations can keep their DEFINER look-up to what a lease's
/// grants reach (`definer.rs`): on MariaDB that needs the grant tables
/// [`GRANT_TABLES`] to be readable; without them each revocation reads
/// every table of every schema, which works but is slow on a server with
/// many schemas.
async fn definer_scope(conn: &mut Conn, scope: &str, admin: &str, account: &str) -> Finding {
    let mut unreadable = Vec::new();
    for table in GRANT_TABLES {
        let probe = format!("SELECT 1 FROM mysql.{table} LIMIT 0");
        if conn.query_drop(probe).await.is_err() {
            unreadable.push(format!("mysql.{table}"));
        }
    }
    if unreadable.is_empty() {
        return Finding::ok(
            scope,
            "admin reads the grant tables: a revocation looks for objects the user defined only \
             in the schemas its grants reach",
        );
    }
    Finding::warning(
        scope,
        format!(
            "admin {admin:?} cannot read {}: each revocation looks for objects the user defined \
             in every schema, reading every table's definition (slow on a server with many schemas)",
            unreadable.join(", ")
        ),
        format!("GRANT SELECT ON mysql.* TO {account} (or SELECT on each of those tables)"),
    )
}

/// The server's message and code, or the deepest cause of a driver error.
fn cause_text(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => {
            format!("{} (error {}, SQLSTATE {})", s.message, s.code, s.state)
        }
        other => {
            let mut cur: &dyn std::error::Error = other;
            while let Some(next) = cur.source() {
                cur = next;
            }
            cur.to_string()
        }
    }
}
