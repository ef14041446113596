//! `credbroker check` on a set-up with one thing wrong: each finding names
//! its cause and the fix.

use super::*;

/// Each grant of the README's admin setup left out: `check` fails naming
/// it and the statement that fixes it — `pg_signal_backend` (revocation
/// ends sessions) and `pg_read_all_stats` (a handover sees which sessions
/// are idle, to drain them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_names_a_missing_pg_signal_backend_or_pg_read_all_stats() {
    for (grant, finding) in [
        ("pg_signal_backend", "is not a member of pg_signal_backend"),
        ("pg_read_all_stats", "cannot see other sessions' state"),
    ] {
        let s = setup(Changes {
            skip_sql: vec![grant],
            ..Changes::default()
        })
        .await;
        let out = s.check().await;
        assert_eq!(out.code, 1, "{out:?}");
        assert!(
            out.stdout
                .contains(&format!("admin role {:?} {finding}", s.admin))
                && out.stdout.contains(&format!("fix: GRANT {grant} TO")),
            "{out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_names_an_expired_certificate() {
    let s = setup(Changes::default()).await;
    let pki = s.path().join("pki");
    let ca = credbroker_testkit::pki::DevCa::load(
        &std::fs::read_to_string(pki.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(pki.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let expired = ca
        .client_cert(&credbroker_testkit::pki::ClientSpec::expired(
            "spiffe://credbroker.dev/ns/demo/server",
        ))
        .unwrap();
    std::fs::write(pki.join("server.pem"), &expired.cert_pem).unwrap();
    std::fs::write(pki.join("server-key.pem"), &expired.key_pem).unwrap();
    let out = s.check().await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("error") && l.contains("tls.cert") && l.contains("expired at")),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_names_a_prefix_collision() {
    let s = setup(Changes::default()).await;
    // A broker-shaped user with our prefix that our store never leased:
    // another deployment's, which our orphan sweep would drop.
    let stranger = format!("{}ro_{}", s.prefix, "abcdefghijklmnop");
    let c = cluster().connect(&s.db).await.unwrap();
    c.batch_execute(&format!("CREATE ROLE \"{stranger}\" LOGIN"))
        .await
        .unwrap();
    let out = s.check().await;
    c.batch_execute(&format!("DROP ROLE \"{stranger}\""))
        .await
        .unwrap();
    println!("{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("name prefix {:?} collides", s.prefix))
            && out.stdout.contains(&stranger)
            && out.stdout.contains("server.name_prefix"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_exit_64_for_an_unreadable_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = credbroker(dir.path(), &["check", "--config", "missing.toml"], &[]).await;
    assert_eq!(out.code, 64, "{out:?}");
    assert!(out.stderr.contains("missing.toml"), "{out:?}");
}

/// The README's MySQL/MariaDB admin, made on a throwaway MariaDB whose
/// event scheduler is off (MariaDB's default), the line that turns it on
/// skipped: `check` passes every privilege and names the scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_names_mariadb_event_scheduler_off() {
    use mysql_async::prelude::Queryable;
    let maria = credbroker_testkit::throwaway::ThrowawayMariadb::start(
        credbroker_testkit::throwaway::MariadbOptions {
            event_scheduler: false,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "cannot start a throwaway MariaDB: {e} (needs /usr/sbin/mariadbd and \
             mariadb-install-db: `apt-get install -y mariadb-server`)"
        )
    });
    let mut root = maria.connect().await.unwrap();
    let password = unique("pw");
    let sql = &readme_blocks("sql")[1];
    assert!(
        sql.contains("CREATE USER 'broker_admin'"),
        "the MySQL block: {sql}"
    );
    for line in sql.lines().filter(|l| !l.trim().is_empty()) {
        if line.contains("event_scheduler") {
            continue; // the mistake under test
        }
        let stmt = line.replace("a-long-random-password", &password);
        root.query_drop(&stmt)
            .await
            .unwrap_or_else(|e| panic!("README SQL {stmt:?}: {e}"));
    }
    root.query_drop("CREATE DATABASE orders").await.unwrap();

    let dir = pki_dir(Some(&password)).await;
    let config = readme_config()
        .replace("kind = \"postgres\"", "kind = \"mysql\"")
        .replace(
            "postgres://broker_admin@127.0.0.1:5432/orders",
            &format!("mysql://broker_admin@127.0.0.1:{}/orders", maria.port()),
        )
        .replace(
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {{name}}",
            "GRANT SELECT ON orders.* TO {{name}}",
        )
        .replace("127.0.0.1:7443", &format!("127.0.0.1:{}", free_port()));
    std::fs::write(dir.path().join("broker.toml"), config).unwrap();

    let out = credbroker(dir.path(), &["check", "--config", "broker.toml"], &[]).await;
    println!("{out:?}");
    assert_eq!(out.code, 1, "{out:?}");
    let errors = error_lines(&out);
    assert_eq!(errors.len(), 1, "only the scheduler is wrong: {out:?}");
    assert!(
        errors[0].contains("database orders") && errors[0].contains("event_scheduler is OFF"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("fix: SET GLOBAL event_scheduler = ON"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("connected as broker_admin@127.0.0.1:"),
        "{out:?}"
    );
    // The README's grants let revocations scope their DEFINER look-up ...
    assert!(
        out.stdout.contains("admin reads the grant tables"),
        "{out:?}"
    );
    // ... and without the grant tables `check` says what each revocation
    // will do instead, as a warning: still only the scheduler is an error.
    root.query_drop(
        "REVOKE SELECT ON mysql.* FROM 'broker_admin'@'%'; \
         GRANT SELECT ON mysql.user TO 'broker_admin'@'%'",
    )
    .await
    .unwrap();
    let out = credbroker(dir.path(), &["check", "--config", "broker.toml"], &[]).await;
    assert_eq!((out.code, error_lines(&out).len()), (1, 1), "{out:?}");
    let warning = out
        .stdout
        .lines()
        .find(|l| l.starts_with("warning") && l.contains("cannot read"))
        .unwrap_or_else(|| panic!("no warning about the grant tables: {out:?}"));
    assert!(
        warning.contains(
            "mysql.global_priv, mysql.roles_mapping, mysql.db, mysql.tables_priv, \
             mysql.columns_priv, mysql.procs_priv"
        ) && warning.contains("in every schema"),
        "{warning}"
    );
    assert!(
        out.stdout.contains("fix: GRANT SELECT ON mysql.* TO"),
        "{out:?}"
    );
}

/// A database that checks no passwords (`trust` in pg_hba.conf, common in
/// containers): `check` logs in as a throwaway role with a wrong password,
/// is let in, and says that leased passwords and expiry mean nothing
/// there. The probe role does not outlive the check. With `trust`, a
/// misspelt admin is "role … does not exist": the fix creates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_flags_a_database_that_checks_no_passwords() {
    let pg = credbroker_testkit::throwaway::ThrowawayPostgres::start(
        credbroker_testkit::throwaway::PostgresOptions {
            hba: Some(vec!["host all all 127.0.0.1/32 trust".into()]),
            ..Default::default()
        },
    )
    .await
    .expect("a throwaway PostgreSQL (scripts/ensure-db-binaries.sh installs the binaries)");
    let s = setup_on(&pg, Changes::default()).await;
    let out = s.check().await;
    assert_eq!(out.code, 1, "{out:?}");
    let errors = error_lines(&out);
    assert_eq!(errors.len(), 1, "{out:?}");
    assert!(
        errors[0].contains("database orders")
            && errors[0].contains("let a login in with a wrong password")
            && errors[0].contains("trust"),
        "{out:?}"
    );
    assert!(out.stdout.contains("fix: use scram-sha-256"), "{out:?}");
    assert_eq!(
        probe_roles_left(&pg, &s.db).await,
        0,
        "the probe role is dropped"
    );

    // A misspelt admin: its fix creates the role, not ALTER ROLE.
    let config = std::fs::read_to_string(s.path().join("broker.toml")).unwrap();
    std::fs::write(
        s.path().join("broker.toml"),
        config.replace(
            &format!("postgres://{}@", s.admin),
            "postgres://no_such_admin@",
        ),
    )
    .unwrap();
    let out = s.check().await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.contains("role \"no_such_admin\" does not exist")
            && out.stdout.contains("fix: create role \"no_such_admin\"")
            && !out.stdout.contains("ALTER ROLE"),
        "{out:?}"
    );
}

/// README step 2 without its table: the role's `GRANT … ON ALL TABLES`
/// grants nothing. `check` warns (it used to pass it as ok), and the trap
/// the README describes is real: a lease issued before the table exists
/// is refused it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_check_warns_when_a_role_grants_no_table() {
    let s = setup(Changes {
        skip_sql: vec![" orders"],
        ..Changes::default()
    })
    .await;
    let out = s.check().await;
    assert_eq!(out.code, 0, "a warning, not an error: {out:?}");
    assert!(
        out.stdout.lines().any(|l| l.starts_with("warning")
            && l.contains("role orders-readonly")
            && l.contains("gave the role no privilege at all")),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains("create the tables before issuing leases"),
        "{out:?}"
    );

    let _serve = Serve::start(&s).await;
    let out = s.issue(&["--format", "env"], &s.client_env("app")).await;
    assert_eq!(out.code, 0, "{out:?}");
    let (user, pw) = (
        env_value(&out.stdout, "PGUSER"),
        env_value(&out.stdout, "PGPASSWORD"),
    );
    s.superuser_sql("CREATE TABLE orders (id int PRIMARY KEY, item text)")
        .await;
    let c = login(&s.db, user, pw).await.expect("the lease logs in");
    let e = c
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{e:?}"
    );
}
