//! The formats' tests: each format rendered from the same credentials,
//! so one file shows that all of them carry the same facts.

use super::jdbc::pgjdbc_target_server_type;
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
        "mysql://cb_app_x1:S3cr3t@db.internal:3306/orders?ssl-mode=VERIFY_IDENTITY&ssl-ca=/ca.pem"
            .into(),
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
        env.starts_with("PGHOST=db1.internal,db2.internal\nPGPORT=5432,5433\nPGUSER=cb_app_x1\n"),
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
        "host={{hosts}} port={{ports}} tsa={{target_session_attrs}} first={{host}}:{{port}}".into(),
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
    let from_env: tokio_postgres::Config = format!("host={} port={}", var("PGHOST"), var("PGPORT"))
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
