//! The formats against real clients: the env file on a MariaDB role, and
//! every host of a multi-host PostgreSQL database in each format.

use super::*;

/// The env format on a MySQL-kind role: MYSQL_* variables and a mysql://
/// DATABASE_URL that log in to the throwaway MariaDB as the leased user.
#[tokio::test]
async fn sidecar_env_file_for_a_mariadb_role_logs_in() {
    use mysql_async::prelude::Queryable;
    let maria = maria_opts;

    let mut root = mysql_async::Conn::new(maria(None, None))
        .await
        .unwrap_or_else(|e| panic!("root login to the throwaway MariaDB: {e}"));
    let schema = unique("sc");
    root.query_drop(format!(
        "CREATE DATABASE `{schema}`; CREATE TABLE `{schema}`.orders (id INT PRIMARY KEY); \
         INSERT INTO `{schema}`.orders VALUES (1)"
    ))
    .await
    .unwrap();

    let mut b = TestBroker::prepare("").await;
    let section = b.maria_section("maria", &schema);
    b.edit_config(|t| {
        t + &section
            + &format!(
                "[roles.sc_maria]\ndatabase = \"maria\"\ndefault_ttl = \"1m\"\nmax_ttl = \"5m\"\n\
                 allowed = [\"{APP}\"]\ngrants = [\"GRANT SELECT ON `{schema}`.orders TO {{{{name}}}}\"]\n"
            )
    });
    b.start_in_process().await;
    let dir = tempfile::tempdir().unwrap();
    let mut sc = Sidecar::spawn(&b, dir.path(), "sc_maria", &["--once", "--format", "env"]);
    assert_eq!(
        sc.wait(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        sc.log_text()
    );
    let text = std::fs::read_to_string(&sc.out).unwrap();
    let var = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| {
                panic!(
                    "{k} missing in:\n{}",
                    text.lines()
                        .map(|l| l.split('=').next().unwrap_or(""))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            })
            .trim_matches('\'')
            .to_string()
    };
    assert_eq!(var("MYSQL_TCP_PORT"), mariadb().port().to_string());
    assert_eq!(var("MYSQL_DATABASE"), schema);
    assert!(var("DATABASE_URL").starts_with("mysql://"));
    let (user, password) = (var("MYSQL_USER"), var("MYSQL_PWD"));
    let mut conn = mysql_async::Conn::new(maria(Some((&user, &password)), Some(&schema)))
        .await
        .expect("the sidecar's MariaDB credential logs in");
    let n: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM orders")
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    assert!(!sc.log_text().contains(&password));
    drop(conn);

    let out = admin_revoke_by(&b, pb::revoke_leases_request::Selector::All(true), false).await;
    assert_eq!(out.revoked, 1);
    b.stop().await;
    root.query_drop(format!("DROP DATABASE `{schema}`"))
        .await
        .unwrap();
}

/// Issue 28: a database whose `admin_url` names several hosts. Every
/// sidecar format names them all, in its clients' form; libpq (psql)
/// given the `env` or the `kv` file skips the first host, which is down,
/// and logs in on the second, as it would after a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_formats_name_every_host_of_a_multi_host_database() {
    let role_name = "sc_hosts";
    let mut b = TestBroker::prepare(&role(role_name, "{db}", "1m", "5m", APP)).await;
    // A port nobody listens on: the "failed primary" listed first.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let live = cluster().port();
    let one_host = cluster().url(&b.db);
    let at = format!("@127.0.0.1:{live}/");
    assert!(one_host.contains(&at), "{one_host}");
    let both = one_host.replace(&at, &format!("@127.0.0.1:{dead},127.0.0.1:{live}/"))
        + "?target_session_attrs=read-write";
    b.edit_config(|t| {
        assert!(t.contains(&format!("\"{one_host}\"")), "{t}");
        t.replace(&format!("\"{one_host}\""), &format!("\"{both}\""))
    });
    b.start_in_process().await;
    let hosts = "127.0.0.1,127.0.0.1";
    let ports = format!("{dead},{live}");
    let dir = tempfile::tempdir().unwrap();
    let run = |format: &'static str| {
        let sub = dir.path().join(format);
        std::fs::create_dir(&sub).unwrap();
        let b = &b;
        async move {
            let mut sc = Sidecar::spawn(b, &sub, role_name, &["--once", "--format", format]);
            assert_eq!(
                sc.wait(Duration::from_secs(30)).await,
                Some(0),
                "{}",
                sc.log_text()
            );
            (sc.out.clone(), std::fs::read_to_string(&sc.out).unwrap())
        }
    };
    let psql = |cmd: &mut Command, password: &str| {
        let out = cmd
            .env_remove("PGSSLMODE")
            .env_remove("PGHOSTADDR")
            .env_remove("PGSERVICE")
            .output()
            .expect("psql (PostgreSQL's client) is needed: `apt-get install -y postgresql-client`");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr).replace(password, "<password>")
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "coffee");
    };
    let query = "SELECT item FROM orders WHERE id = 1";

    let (env_file, env) = run("env").await;
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing"))
            .to_string()
    };
    assert_eq!(var("PGHOST"), hosts);
    assert_eq!(var("PGPORT"), ports);
    assert_eq!(var("PGTARGETSESSIONATTRS"), "read-write");
    psql(
        Command::new("sh")
            .arg("-c")
            .arg(format!(r#"set -a; . "$1"; exec psql -Atc "{query}""#))
            .arg("sh")
            .arg(&env_file),
        &var("PGPASSWORD"),
    );

    let (_, kv) = run("kv").await;
    let kv = kv.trim().to_string();
    assert!(
        kv.starts_with(&format!("host={hosts} port={ports} user=")),
        "{}",
        kv.split(" password=").next().unwrap()
    );
    assert!(kv.ends_with(" target_session_attrs=read-write"));
    let password = kv
        .split(' ')
        .find_map(|w| w.strip_prefix("password="))
        .unwrap()
        .to_string();
    psql(
        Command::new("psql").args(["-Atc", query]).arg(&kv),
        &password,
    );

    let (_, jdbc) = run("jdbc").await;
    assert!(
        jdbc.starts_with(&format!(
            "jdbc:postgresql://127.0.0.1:{dead},127.0.0.1:{live}/{}?user=",
            b.db
        )),
        "{}",
        jdbc.split("&password=").next().unwrap()
    );
    assert!(jdbc.trim_end().ends_with("&targetServerType=primary"));

    let (_, json) = run("json").await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["hosts"],
        serde_json::json!([
            {"host": "127.0.0.1", "port": dead},
            {"host": "127.0.0.1", "port": live}
        ])
    );
}
