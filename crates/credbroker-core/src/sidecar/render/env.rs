//! The `env` format: `KEY=value` lines a shell can source (the database
//! clients' own variables and `DATABASE_URL`). `client_env_keys` and
//! `env_line` are public: `credbroker lease`'s env output writes its
//! lines with them too.

use zeroize::Zeroizing;

use super::dsn::{client_tls, servers};
use super::{is_mysql, Credential};

/// The environment variables a database's own command-line clients read,
/// in order: host, port, user, password, database (`mysql`, or `psql`).
pub fn client_env_keys(mysql: bool) -> [&'static str; 5] {
    if mysql {
        [
            "MYSQL_HOST",
            "MYSQL_TCP_PORT",
            "MYSQL_USER",
            "MYSQL_PWD",
            "MYSQL_DATABASE",
        ]
    } else {
        ["PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"]
    }
}

/// One `KEY=value` line of an env file, the value as [`env_value`] writes it.
pub fn env_line(out: &mut String, key: &str, v: &str) {
    out.push_str(key);
    out.push('=');
    env_value(out, v);
    out.push('\n');
}

/// Shell-style env values, so `. FILE` and `set -a; . FILE` work: bare
/// when no character means anything to a shell (a URI's `&`, `?` or `[`
/// would), else single-quoted.
fn env_value(out: &mut String, v: &str) {
    let bare = !v.is_empty()
        && v.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.' | b'_' | b'/' | b':' | b'@' | b'%' | b'+' | b',' | b'='
                )
        });
    if bare {
        out.push_str(v);
    } else {
        out.push('\'');
        out.push_str(&v.replace('\'', r"'\''"));
        out.push('\'');
    }
}

pub(super) fn env(c: &Credential) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    let servers = servers(c);
    let (host, port) = (servers.hosts(), servers.ports());
    let keys = client_env_keys(is_mysql(c));
    let values: [&str; 5] = [&host, &port, &c.username, c.password.expose(), &c.database];
    for (k, v) in keys.iter().zip(values) {
        env_line(&mut out, k, v);
    }
    if !is_mysql(c) {
        // libpq reads these; MySQL clients have no such variables, and
        // DATABASE_URL below carries `ssl-mode` for them.
        let tls = client_tls(c);
        for (k, v) in [
            ("PGSSLMODE", &tls.mode),
            ("PGSSLROOTCERT", &tls.rootcert),
            ("PGTARGETSESSIONATTRS", &servers.target_session_attrs),
        ] {
            if let Some(v) = v {
                env_line(&mut out, k, v);
            }
        }
    }
    env_line(&mut out, "DATABASE_URL", &c.dsn);
    out
}
