//! The credential file's formats. Everything rendered here holds the
//! password, so it comes back in a zeroizing buffer.
//!
//! Several hosts: when a PostgreSQL database's `admin_url` names several
//! (libpq's multi-host form, see [`crate::connstr`]), the broker's DSN
//! names them all, and so does every format here, each in the form its
//! consumers take: `kv` as libpq's `host=h1,h2 port=p1,p2
//! target_session_attrs=…`, `env` as `PGHOST=h1,h2 PGPORT=p1,p2
//! PGTARGETSESSIONATTRS=…`, `jdbc` as PgJDBC's `//h1:p1,h2:p2/db` with
//! `targetServerType`, `json` as a `hosts` array. The reply's `host` and
//! `port` fields (and `{{host}}`/`{{port}}`) stay the first host; a client
//! given only those would not follow a failover, which is why the list is
//! read from the DSN.
//!
//! One file per output format: `kv.rs`, `jdbc.rs`, `env.rs`, `json.rs`,
//! `template.rs` (the `dsn` format is the broker's DSN as it came, here).
//! `dsn.rs` reads what every format needs back from the broker's DSN: the
//! client TLS settings and the host list.

mod dsn;
mod env;
mod jdbc;
mod json;
mod kv;
mod template;
#[cfg(test)]
mod tests;

pub use env::{client_env_keys, env_line};
pub use template::{Template, PLACEHOLDERS};

use std::path::Path;

use zeroize::Zeroizing;

use super::Credential;
use crate::error::{Error, Result};

/// What the sidecar writes to `--out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// The broker's connection URI (libpq `postgresql://…`, or `mysql://…`).
    Dsn,
    /// libpq `key=value` pairs (the same keys for MySQL).
    Kv,
    /// A JDBC URL with user and password as parameters.
    Jdbc,
    /// `KEY=value` lines: PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE (or the
    /// MYSQL_* equivalents) and DATABASE_URL.
    Env,
    Json,
    Template(Template),
}

impl Format {
    /// Parses `--format`: `dsn`, `kv`, `jdbc`, `env`, `json` or
    /// `template:FILE` (the file is read and checked now).
    pub fn parse(s: &str) -> Result<Format> {
        Ok(match s {
            "dsn" | "uri" => Format::Dsn,
            "kv" => Format::Kv,
            "jdbc" => Format::Jdbc,
            "env" => Format::Env,
            "json" => Format::Json,
            _ => match s.strip_prefix("template:") {
                Some(path) => {
                    let text = std::fs::read_to_string(Path::new(path))
                        .map_err(|e| Error::config(format!("--format template {path}: {e}")))?;
                    Format::Template(Template::parse(text)?)
                }
                None => {
                    return Err(Error::config(format!(
                        "--format {s:?}: expected dsn, kv, jdbc, env, json or template:FILE"
                    )))
                }
            },
        })
    }

    pub fn render(&self, c: &Credential) -> Zeroizing<String> {
        match self {
            Format::Dsn => Zeroizing::new(format!("{}\n", c.dsn.as_str())),
            Format::Kv => kv::kv(c),
            Format::Jdbc => jdbc::jdbc(c),
            Format::Env => env::env(c),
            Format::Json => json::json(c),
            Format::Template(t) => t.render(c),
        }
    }
}

fn rfc3339(c: &Credential) -> String {
    c.expires_at
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn is_mysql(c: &Credential) -> bool {
    c.kind == "mysql"
}
