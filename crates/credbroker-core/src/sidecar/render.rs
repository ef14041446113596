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

use std::fmt::Write as _;
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

/// Placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "username",
    "password",
    "host",
    "port",
    "database",
    "dsn",
    "expires_at",
    "lease_id",
    "sslmode",
    "sslrootcert",
    "hosts",
    "ports",
    "target_session_attrs",
];

/// A user template, checked when loaded: an unknown `{{name}}` is a config
/// error at start-up, not a surprise in the file later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
}

impl Template {
    pub fn parse(text: String) -> Result<Self> {
        let mut rest = text.as_str();
        while let Some(open) = rest.find("{{") {
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| Error::config("template: unclosed {{"))?;
            let name = after[..close].trim();
            if !PLACEHOLDERS.contains(&name) {
                return Err(Error::config(format!(
                    "template: unknown placeholder {{{{{name}}}}} (known: {})",
                    PLACEHOLDERS.join(", ")
                )));
            }
            rest = &after[close + 2..];
        }
        Ok(Template { text })
    }

    fn render(&self, c: &Credential) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(self.text.len() + 64));
        let mut rest = self.text.as_str();
        while let Some(open) = rest.find("{{") {
            out.push_str(&rest[..open]);
            let after = &rest[open + 2..];
            // parse() saw every placeholder closed.
            let close = after.find("}}").unwrap_or(after.len());
            match after[..close].trim() {
                "username" => out.push_str(&c.username),
                "password" => out.push_str(c.password.expose()),
                "host" => out.push_str(&c.host),
                "port" => {
                    let _ = write!(out, "{}", c.port);
                }
                "database" => out.push_str(&c.database),
                "dsn" => out.push_str(&c.dsn),
                "expires_at" => out.push_str(&rfc3339(c)),
                "lease_id" => out.push_str(&c.lease_id),
                "sslmode" => out.push_str(client_tls(c).mode.as_deref().unwrap_or("")),
                "sslrootcert" => out.push_str(client_tls(c).rootcert.as_deref().unwrap_or("")),
                "hosts" => out.push_str(&servers(c).hosts()),
                "ports" => out.push_str(&servers(c).ports()),
                "target_session_attrs" => {
                    out.push_str(servers(c).target_session_attrs.as_deref().unwrap_or(""))
                }
                _ => {}
            }
            rest = after.get(close + 2..).unwrap_or("");
        }
        out.push_str(rest);
        out
    }
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
            Format::Kv => kv(c),
            Format::Jdbc => jdbc(c),
            Format::Env => env(c),
            Format::Json => json(c),
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

/// The TLS clients should use, as the broker put it into the DSN's query
/// (`[databases.X] client_sslmode`, `client_sslrootcert`): libpq's
/// `sslmode`/`sslrootcert`, or MySQL's `ssl-mode`/`ssl-ca`. Neither is
/// secret; every format carries them, so no client falls back to
/// plaintext because its format had no room for them.
struct ClientTls {
    mode: Option<String>,
    rootcert: Option<String>,
}

fn client_tls(c: &Credential) -> ClientTls {
    let (mode_key, root_key) = if is_mysql(c) {
        ("ssl-mode", "ssl-ca")
    } else {
        ("sslmode", "sslrootcert")
    };
    let mut tls = ClientTls {
        mode: None,
        rootcert: None,
    };
    let query = c.dsn.split_once('?').map(|(_, q)| q).unwrap_or("");
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned();
        if k == mode_key {
            tls.mode = Some(v);
        } else if k == root_key {
            tls.rootcert = Some(v);
        }
    }
    tls
}

/// libpq quoting: bare when safe, else single quotes with `\'` and `\\`.
fn kv_value(out: &mut String, v: &str) {
    let bare = !v.is_empty()
        && !v
            .chars()
            .any(|ch| ch.is_whitespace() || ch == '\'' || ch == '\\');
    if bare {
        out.push_str(v);
    } else {
        out.push('\'');
        for ch in v.chars() {
            if ch == '\'' || ch == '\\' {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('\'');
    }
}

fn kv(c: &Credential) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    let db_key = if is_mysql(c) { "database" } else { "dbname" };
    let servers = servers(c);
    let (host, port) = (servers.hosts(), servers.ports());
    let pairs: [(&str, &str); 5] = [
        ("host", &host),
        ("port", &port),
        ("user", &c.username),
        ("password", c.password.expose()),
        (db_key, &c.database),
    ];
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(k);
        out.push('=');
        kv_value(&mut out, v);
    }
    let tls = client_tls(c);
    let (mode_key, root_key) = if is_mysql(c) {
        ("ssl-mode", "ssl-ca")
    } else {
        ("sslmode", "sslrootcert")
    };
    for (k, v) in [
        (mode_key, &tls.mode),
        (root_key, &tls.rootcert),
        ("target_session_attrs", &servers.target_session_attrs),
    ] {
        if let Some(v) = v {
            out.push(' ');
            out.push_str(k);
            out.push('=');
            kv_value(&mut out, v);
        }
    }
    out.push('\n');
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn pct(out: &mut String, v: &str) {
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn jdbc(c: &Credential) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    let scheme = if is_mysql(c) { "mysql" } else { "postgresql" };
    let servers = servers(c);
    let _ = write!(out, "jdbc:{scheme}://{}/", servers.host_ports());
    pct(&mut out, &c.database);
    out.push_str("?user=");
    pct(&mut out, &c.username);
    out.push_str("&password=");
    pct(&mut out, c.password.expose());
    let tls = client_tls(c);
    if let Some(mode) = &tls.mode {
        if is_mysql(c) {
            // Connector/J 8's name and values; it takes a CA only as a
            // trust store, not a PEM file, so ssl-ca has no place here.
            out.push_str("&sslMode=");
            pct(&mut out, mode);
        } else {
            // pgjdbc: `ssl=true` alone would mean verify-full; sslmode
            // says which.
            if mode != "disable" {
                out.push_str("&ssl=true");
            }
            out.push_str("&sslmode=");
            pct(&mut out, mode);
            if let Some(root) = &tls.rootcert {
                out.push_str("&sslrootcert=");
                pct(&mut out, root);
            }
        }
    }
    if let Some(server_type) = servers
        .target_session_attrs
        .as_deref()
        .and_then(pgjdbc_target_server_type)
    {
        out.push_str("&targetServerType=");
        out.push_str(server_type);
    }
    out.push('\n');
    out
}

/// libpq's `target_session_attrs` as PgJDBC's `targetServerType`. Both
/// decide by the same test (`transaction_read_only`, or
/// `pg_is_in_recovery()` for primary/standby): `read-write` ↔ `primary`,
/// `read-only`/`standby` ↔ `secondary`, `prefer-standby` ↔
/// `preferSecondary`; `any` is PgJDBC's default, so nothing is written.
fn pgjdbc_target_server_type(attrs: &str) -> Option<&'static str> {
    match attrs {
        "read-write" | "primary" => Some("primary"),
        "read-only" | "standby" => Some("secondary"),
        "prefer-standby" => Some("preferSecondary"),
        _ => None,
    }
}

/// The servers a credential reaches, in the order clients try them.
struct Servers {
    list: Vec<(String, u32)>,
    target_session_attrs: Option<String>,
}

impl Servers {
    /// libpq's host list: `h1,h2`.
    fn hosts(&self) -> String {
        let hosts: Vec<&str> = self.list.iter().map(|(h, _)| h.as_str()).collect();
        hosts.join(",")
    }

    /// libpq's port list, one per host: `5432,5433`.
    fn ports(&self) -> String {
        let ports: Vec<String> = self.list.iter().map(|(_, p)| p.to_string()).collect();
        ports.join(",")
    }

    /// A URL authority's list: `h1:5432,[::1]:5433`.
    fn host_ports(&self) -> String {
        let list: Vec<String> = self
            .list
            .iter()
            .map(|(h, p)| {
                if h.contains(':') {
                    format!("[{h}]:{p}")
                } else {
                    format!("{h}:{p}")
                }
            })
            .collect();
        list.join(",")
    }
}

/// Every host of the credential: read from the broker's DSN when it names
/// several (`postgresql://user:pw@h1:p1,h2:p2/db?target_session_attrs=…`,
/// as `backend/postgres` writes it), else the reply's `host` and `port`.
/// The user and password are known, so they are stripped as the exact
/// prefix they are, not by looking for an `@` a password could hold.
fn servers(c: &Credential) -> Servers {
    let target_session_attrs = if is_mysql(c) {
        None
    } else {
        query_param(c, "target_session_attrs")
    };
    let single = || Servers {
        list: vec![(c.host.clone(), c.port)],
        target_session_attrs: target_session_attrs.clone(),
    };
    if is_mysql(c) {
        return single();
    }
    let Some(rest) = ["postgresql://", "postgres://"]
        .iter()
        .find_map(|scheme| c.dsn.strip_prefix(scheme))
    else {
        return single();
    };
    let with_password = format!("{}:{}@", c.username, c.password.expose());
    let Some(rest) = rest
        .strip_prefix(with_password.as_str())
        .or_else(|| rest.strip_prefix(&format!("{}@", c.username)))
    else {
        return single();
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if !authority.contains(',') {
        return single();
    }
    let mut list = Vec::new();
    for part in authority.split(',') {
        let (host, port) = match part.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((h, p)) => (h, p.strip_prefix(':')),
                None => return single(),
            },
            None => match part.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (part, None),
            },
        };
        // libpq's default for a host without its own port.
        let port = match port.map(str::parse::<u32>) {
            None => 5432,
            Some(Ok(p)) => p,
            Some(Err(_)) => return single(),
        };
        if host.is_empty() {
            return single();
        }
        let host = percent_encoding::percent_decode_str(host)
            .decode_utf8_lossy()
            .into_owned();
        list.push((host, port));
    }
    Servers {
        list,
        target_session_attrs,
    }
}

/// A query parameter of the DSN, decoded.
fn query_param(c: &Credential, key: &str) -> Option<String> {
    let query = c.dsn.split_once('?').map(|(_, q)| q).unwrap_or("");
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

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

fn env(c: &Credential) -> Zeroizing<String> {
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

fn json(c: &Credential) -> Zeroizing<String> {
    let tls = client_tls(c);
    let servers = servers(c);
    let hosts: Vec<serde_json::Value> = servers
        .list
        .iter()
        .map(|(host, port)| serde_json::json!({ "host": host, "port": port }))
        .collect();
    let v = serde_json::json!({
        "hosts": hosts,
        "target_session_attrs": servers.target_session_attrs,
        "sslmode": tls.mode,
        "sslrootcert": tls.rootcert,
        "lease_id": c.lease_id,
        "kind": c.kind,
        "username": c.username,
        "password": c.password.expose(),
        "host": c.host,
        "port": c.port,
        "database": c.database,
        "dsn": c.dsn.as_str(),
        "expires_at": rfc3339(c),
        "max_expires_at": c.max_expires_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    // The Value's own strings are dropped unwiped: serde_json has no
    // zeroizing mode; the copy we keep is.
    Zeroizing::new(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Password;

    fn cred(kind: &str) -> Credential {
        let t = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        Credential {
            lease_id: "l_abc".into(),
            kind: kind.into(),
            username: "cb_app_x1".into(),
            password: Password::from_secret("S3cr3t".into()),
            dsn: Zeroizing::new(format!("{kind}://cb_app_x1:S3cr3t@db.internal:5432/orders")),
            host: "db.internal".into(),
            port: 5432,
            database: "orders".into(),
            issued_at: t,
            expires_at: t,
            max_expires_at: t,
            renewable: true,
            clock_offset: chrono::TimeDelta::zero(),
        }
    }

    #[test]
    fn postgres_formats() {
        let c = cred("postgres");
        assert_eq!(
            Format::Dsn.render(&c).as_str(),
            "postgres://cb_app_x1:S3cr3t@db.internal:5432/orders\n"
        );
        assert_eq!(
            Format::Kv.render(&c).as_str(),
            "host=db.internal port=5432 user=cb_app_x1 password=S3cr3t dbname=orders\n"
        );
        assert_eq!(
            Format::Jdbc.render(&c).as_str(),
            "jdbc:postgresql://db.internal:5432/orders?user=cb_app_x1&password=S3cr3t\n"
        );
        assert_eq!(
            Format::Env.render(&c).as_str(),
            "PGHOST=db.internal\nPGPORT=5432\nPGUSER=cb_app_x1\nPGPASSWORD=S3cr3t\nPGDATABASE=orders\n\
             DATABASE_URL=postgres://cb_app_x1:S3cr3t@db.internal:5432/orders\n"
        );
        let v: serde_json::Value = serde_json::from_str(&Format::Json.render(&c)).unwrap();
        assert_eq!(v["password"], "S3cr3t");
        assert_eq!(v["port"], 5432);
        assert_eq!(v["expires_at"], "2027-01-15T08:00:00.000Z");
    }

    #[test]
    fn mysql_formats_use_mysql_names() {
        let c = cred("mysql");
        let env = Format::Env.render(&c);
        assert!(env.starts_with("MYSQL_HOST=db.internal\nMYSQL_TCP_PORT=5432\nMYSQL_USER=cb_app_x1\nMYSQL_PWD=S3cr3t\nMYSQL_DATABASE=orders\nDATABASE_URL=mysql://"), "{}", env.as_str());
        assert!(Format::Jdbc
            .render(&c)
            .starts_with("jdbc:mysql://db.internal:5432/orders?"));
        assert!(Format::Kv.render(&c).ends_with("database=orders\n"));
    }

    #[test]
    fn odd_characters_are_quoted_or_escaped() {
        let mut c = cred("postgres");
        c.password = Password::from_secret("a b'c\\d&e".into());
        c.database = "my db".into();
        c.host = "::1".into();
        assert_eq!(
            Format::Kv.render(&c).as_str(),
            "host=::1 port=5432 user=cb_app_x1 password='a b\\'c\\\\d&e' dbname='my db'\n"
        );
        assert_eq!(
            Format::Jdbc.render(&c).as_str(),
            "jdbc:postgresql://[::1]:5432/my%20db?user=cb_app_x1&password=a%20b%27c%5Cd%26e\n"
        );
        assert!(Format::Env
            .render(&c)
            .contains("PGPASSWORD='a b'\\''c\\d&e'\n"));
        c.dsn = Zeroizing::new("postgresql://u:p@[::1]:5432/db?sslmode=require&x=1".into());
        assert!(Format::Env
            .render(&c)
            .ends_with("DATABASE_URL='postgresql://u:p@[::1]:5432/db?sslmode=require&x=1'\n"));
    }

    #[test]
    fn a_shell_reads_back_exactly_what_the_env_file_holds() {
        let mut c = cred("postgres");
        c.password = Password::from_secret("a b'c\\d&e$(x)`y`".into());
        c.database = "my db".into();
        c.dsn = Zeroizing::new("postgresql://u:p@[::1]:5432/db?sslmode=require&x=1".into());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db.env");
        std::fs::write(&file, Format::Env.render(&c).as_bytes()).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"set -a; . "$1"; printf '%s\n%s\n%s' "$PGPASSWORD" "$PGDATABASE" "$DATABASE_URL""#)
            .arg("sh")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("{}\nmy db\n{}", c.password.expose(), c.dsn.as_str())
        );
    }

    #[test]
    fn templates_fill_every_placeholder_and_reject_unknown_ones() {
        let t = Template::parse(
            "u={{username}} p={{ password }} h={{host}}:{{port}} d={{database}}\n\
             url={{dsn}} until={{expires_at}} id={{lease_id}} {single} }}\n"
                .into(),
        )
        .unwrap();
        assert_eq!(
            Format::Template(t).render(&cred("postgres")).as_str(),
            "u=cb_app_x1 p=S3cr3t h=db.internal:5432 d=orders\n\
             url=postgres://cb_app_x1:S3cr3t@db.internal:5432/orders until=2027-01-15T08:00:00.000Z id=l_abc {single} }}\n"
        );
        let e = Template::parse("{{user}}".into()).unwrap_err().to_string();
        assert!(e.contains("unknown placeholder {{user}}"), "{e}");
        assert!(Template::parse("x {{password".into()).is_err());
    }

    #[test]
    fn every_format_carries_the_client_tls_settings() {
        let mut c = cred("postgres");
        c.dsn = Zeroizing::new(
            "postgresql://cb_app_x1:S3cr3t@db.internal:5432/orders?sslmode=verify-full&sslrootcert=/etc/ssl/db%20ca.pem"
                .into(),
        );
        assert_eq!(
            Format::Kv.render(&c).as_str(),
            "host=db.internal port=5432 user=cb_app_x1 password=S3cr3t dbname=orders \
             sslmode=verify-full sslrootcert='/etc/ssl/db ca.pem'\n"
        );
        assert_eq!(
            Format::Jdbc.render(&c).as_str(),
            "jdbc:postgresql://db.internal:5432/orders?user=cb_app_x1&password=S3cr3t\
             &ssl=true&sslmode=verify-full&sslrootcert=%2Fetc%2Fssl%2Fdb%20ca.pem\n"
        );
        let env = Format::Env.render(&c);
        assert!(
            env.contains("PGSSLMODE=verify-full\nPGSSLROOTCERT='/etc/ssl/db ca.pem'\n"),
            "{}",
            env.as_str()
        );
        let v: serde_json::Value = serde_json::from_str(&Format::Json.render(&c)).unwrap();
        assert_eq!(v["sslmode"], "verify-full");
        assert_eq!(v["sslrootcert"], "/etc/ssl/db ca.pem");
        let t = Template::parse("{{sslmode}}|{{sslrootcert}}".into()).unwrap();
        assert_eq!(
            Format::Template(t).render(&c).as_str(),
            "verify-full|/etc/ssl/db ca.pem"
        );

        let mut m = cred("mysql");
        m.dsn = Zeroizing::new(
            "mysql://cb_app_x1:S3cr3t@db.internal:3306/orders?ssl-mode=VERIFY_IDENTITY&ssl-ca=/ca.pem".into(),
        );
        assert!(Format::Kv
            .render(&m)
            .ends_with(" ssl-mode=VERIFY_IDENTITY ssl-ca=/ca.pem\n"));
        assert!(Format::Jdbc
            .render(&m)
            .ends_with("&password=S3cr3t&sslMode=VERIFY_IDENTITY\n"));
        assert!(Format::Env.render(&m).contains("?ssl-mode=VERIFY_IDENTITY"));
        // Without client_sslmode nothing is added: the client's defaults.
        let plain = cred("postgres");
        assert!(!Format::Env.render(&plain).contains("PGSSLMODE"));
        let v: serde_json::Value = serde_json::from_str(&Format::Json.render(&plain)).unwrap();
        assert!(v["sslmode"].is_null());
    }

    fn multi_host(dsn: &str) -> Credential {
        let mut c = cred("postgres");
        c.dsn = Zeroizing::new(dsn.into());
        c.host = "db1.internal".into();
        c.port = 5432;
        c
    }

    #[test]
    fn every_format_carries_every_host_in_its_consumers_form() {
        let c = multi_host(
            "postgresql://cb_app_x1:S3cr3t@db1.internal:5432,db2.internal:5433/orders\
             ?sslmode=verify-full&target_session_attrs=read-write",
        );
        assert_eq!(
            Format::Kv.render(&c).as_str(),
            "host=db1.internal,db2.internal port=5432,5433 user=cb_app_x1 password=S3cr3t \
             dbname=orders sslmode=verify-full target_session_attrs=read-write\n"
        );
        assert_eq!(
            Format::Jdbc.render(&c).as_str(),
            "jdbc:postgresql://db1.internal:5432,db2.internal:5433/orders?user=cb_app_x1\
             &password=S3cr3t&ssl=true&sslmode=verify-full&targetServerType=primary\n"
        );
        let env = Format::Env.render(&c);
        assert!(
            env.starts_with(
                "PGHOST=db1.internal,db2.internal\nPGPORT=5432,5433\nPGUSER=cb_app_x1\n"
            ),
            "{}",
            env.as_str()
        );
        assert!(
            env.contains("PGSSLMODE=verify-full\nPGTARGETSESSIONATTRS=read-write\n"),
            "{}",
            env.as_str()
        );
        let v: serde_json::Value = serde_json::from_str(&Format::Json.render(&c)).unwrap();
        assert_eq!(
            v["hosts"],
            serde_json::json!([
                {"host": "db1.internal", "port": 5432},
                {"host": "db2.internal", "port": 5433}
            ])
        );
        assert_eq!(v["target_session_attrs"], "read-write");
        assert_eq!(
            v["host"], "db1.internal",
            "the reply's fields stay as they were"
        );
        let t = Template::parse(
            "host={{hosts}} port={{ports}} tsa={{target_session_attrs}} first={{host}}:{{port}}"
                .into(),
        )
        .unwrap();
        assert_eq!(
            Format::Template(t).render(&c).as_str(),
            "host=db1.internal,db2.internal port=5432,5433 tsa=read-write first=db1.internal:5432"
        );
        // A real libpq-syntax reader takes the kv and env forms as lists
        // (tokio-postgres knows no verify-full, so that word is left out).
        let kv = Format::Kv.render(&c);
        let words: Vec<&str> = kv
            .split_whitespace()
            .filter(|w| !w.starts_with("sslmode="))
            .collect();
        let kv: tokio_postgres::Config = words.join(" ").parse().unwrap();
        assert_eq!(kv.get_hosts().len(), 2);
        assert_eq!(kv.get_ports(), [5432, 5433]);
        assert_eq!(
            kv.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        // libpq reads PGHOST/PGPORT as it reads host=/port=.
        let var = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap()
                .to_string()
        };
        let from_env: tokio_postgres::Config =
            format!("host={} port={}", var("PGHOST"), var("PGPORT"))
                .parse()
                .unwrap();
        assert_eq!(from_env.get_hosts().len(), 2);
        assert_eq!(from_env.get_ports(), [5432, 5433]);
        // The DSN itself already carried them all.
        assert!(Format::Dsn
            .render(&c)
            .contains("@db1.internal:5432,db2.internal:5433/"));
    }

    #[test]
    fn host_lists_with_ipv6_default_ports_and_no_session_attrs() {
        let c = multi_host("postgresql://cb_app_x1:S3cr3t@[::1]:6432,db2,10.0.0.3:5433/orders");
        assert_eq!(
            Format::Kv.render(&c).as_str(),
            "host=::1,db2,10.0.0.3 port=6432,5432,5433 user=cb_app_x1 password=S3cr3t dbname=orders\n"
        );
        assert_eq!(
            Format::Jdbc.render(&c).as_str(),
            "jdbc:postgresql://[::1]:6432,db2:5432,10.0.0.3:5433/orders?user=cb_app_x1&password=S3cr3t\n"
        );
        assert!(!Format::Env.render(&c).contains("PGTARGETSESSIONATTRS"));
        // A password holding `@` and `,` is stripped as the known prefix,
        // not mistaken for the host list.
        let mut odd = multi_host("postgresql://cb_app_x1:p@ss,w/rd@h1:1,h2:2/orders");
        odd.password = Password::from_secret("p@ss,w/rd".into());
        assert!(Format::Kv
            .render(&odd)
            .starts_with("host=h1,h2 port=1,2 user=cb_app_x1 password=p@ss,w/rd "));
        // What cannot be read as a host list falls back to the reply's host.
        let bad = multi_host("postgresql://cb_app_x1:S3cr3t@h1:x,h2:2/orders");
        assert!(Format::Kv
            .render(&bad)
            .starts_with("host=db1.internal port=5432 "));
    }

    #[test]
    fn libpq_session_attrs_map_to_pgjdbc_server_types() {
        for (libpq, jdbc) in [
            ("read-write", Some("primary")),
            ("primary", Some("primary")),
            ("read-only", Some("secondary")),
            ("standby", Some("secondary")),
            ("prefer-standby", Some("preferSecondary")),
            ("any", None),
        ] {
            assert_eq!(pgjdbc_target_server_type(libpq), jdbc, "{libpq}");
        }
    }

    #[test]
    fn format_names() {
        assert_eq!(Format::parse("json").unwrap(), Format::Json);
        assert!(matches!(Format::parse("yaml"), Err(Error::Config(_))));
        assert!(matches!(
            Format::parse("template:/nonexistent/tpl"),
            Err(Error::Config(_))
        ));
    }
}
