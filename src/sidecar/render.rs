//! The credential file's formats. Everything rendered here holds the
//! password, so it comes back in a zeroizing buffer.

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
    let port = c.port.to_string();
    let pairs: [(&str, &str); 5] = [
        ("host", &c.host),
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
    for (k, v) in [(mode_key, &tls.mode), (root_key, &tls.rootcert)] {
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
    let host = if c.host.contains(':') {
        format!("[{}]", c.host)
    } else {
        c.host.clone()
    };
    let _ = write!(out, "jdbc:{scheme}://{host}:{}/", c.port);
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
    out.push('\n');
    out
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
    let port = c.port.to_string();
    let keys = client_env_keys(is_mysql(c));
    let values: [&str; 5] = [
        &c.host,
        &port,
        &c.username,
        c.password.expose(),
        &c.database,
    ];
    for (k, v) in keys.iter().zip(values) {
        env_line(&mut out, k, v);
    }
    if !is_mysql(c) {
        // libpq reads these; MySQL clients have no such variables, and
        // DATABASE_URL below carries `ssl-mode` for them.
        let tls = client_tls(c);
        for (k, v) in [("PGSSLMODE", &tls.mode), ("PGSSLROOTCERT", &tls.rootcert)] {
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
    let v = serde_json::json!({
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
