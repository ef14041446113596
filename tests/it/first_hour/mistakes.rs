//! A new operator's likely first mistakes with a running broker: a wrong admin
//! password, the database or the broker down, TLS material mixed up, a grant
//! the admin cannot give; and those that need no database at all.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_wrong_admin_password_names_database_address_user_and_cause() {
    let s = setup(Changes::default()).await;
    std::fs::write(s.path().join("secrets/orders-admin"), "not-the-password").unwrap();

    let out = s.check().await;
    assert_eq!(out.code, 1, "{out:?}");
    let cause = format!("password authentication failed for user \"{}\"", s.admin);
    assert_names(
        &out,
        &[
            "database orders",
            "authentication failed as",
            &s.location(),
            &cause,
            "SQLSTATE 28P01",
            "fix: make the password in admin_password_file",
        ],
    );

    let (serve, out) = s.serve_and_issue().await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("Unavailable: database \"orders\" is unreachable"),
        "{out:?}"
    );
    // The caller learns which database, not the server's words.
    assert!(!out.stderr.contains("password authentication"), "{out:?}");
    let log = serve.log();
    assert!(
        log.contains(&cause) && log.contains(&s.location()) && log.contains("28P01"),
        "the broker's log names the cause: {log}"
    );
    println!("broker log:\n{log}");
    assert!(!log.contains("not-the-password") && !out.stderr.contains("not-the-password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_database_down_says_connection_refused_and_where() {
    let down = free_port();
    let s = setup(Changes {
        config: vec![(
            format!("127.0.0.1:{}/", cluster().port()),
            format!("127.0.0.1:{down}/"),
        )],
        ..Changes::default()
    })
    .await;
    let out = s.check().await;
    assert_eq!(out.code, 1, "{out:?}");
    let at = format!("{}@127.0.0.1:{down}/{}", s.admin, s.db);
    assert!(
        out.stdout.contains("cannot connect: connection refused as") && out.stdout.contains(&at),
        "{out:?}"
    );
    assert!(
        out.stdout.contains(&format!(
            "is PostgreSQL running and listening at 127.0.0.1:{down}?"
        )),
        "{out:?}"
    );
    // Nothing it could not ask is called ok (it used to say "no users
    // with it yet").
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("database orders")),
        "{out:?}"
    );

    let (serve, out) = s.serve_and_issue().await;
    assert!(
        out.stderr.contains("database \"orders\" is unreachable"),
        "{out:?}"
    );
    let log = serve.log();
    assert!(
        log.contains(&format!("connection refused as {at}")),
        "the broker's log says refused and where: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_broker_down_says_address_and_connection_refused() {
    let dir = pki_dir(None).await;
    let addr = format!("https://127.0.0.1:{}", free_port());
    let out = credbroker(
        dir.path(),
        &["lease", "issue", "--role", "orders-readonly"],
        &[
            ("CREDBROKER_ADDR", &addr),
            ("CREDBROKER_CA", "pki/ca.pem"),
            ("CREDBROKER_CERT", "pki/app.pem"),
            ("CREDBROKER_KEY", "pki/app-key.pem"),
        ],
    )
    .await;
    println!("{out:?}");
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!(
            "cannot reach the broker at {addr}: connection refused"
        )),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_tls_failures_name_the_likely_causes() {
    let s = setup(Changes::default()).await;
    let _serve = Serve::start(&s).await;
    // A second dev PKI: another CA and its own client certificates.
    let out = s.cli(&["pki", "dev", "--out", "elsewhere"], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");

    // A client certificate from another CA than the broker's client_ca.
    let env = s.client_env_with(
        "app",
        &[
            ("CREDBROKER_CERT", "elsewhere/app.pem".into()),
            ("CREDBROKER_KEY", "elsewhere/app-key.pem".into()),
        ],
    );
    let out = s.issue(&[], &env).await;
    println!("{out:?}");
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!("127.0.0.1:{}", s.port))
            && out
                .stderr
                .contains("refused our client certificate --cert elsewhere/app.pem")
            && out
                .stderr
                .contains("another CA than the broker's tls.client_ca"),
        "{out:?}"
    );

    // The wrong CA for the broker's own certificate.
    let env = s.client_env_with("app", &[("CREDBROKER_CA", "elsewhere/ca.pem".into())]);
    let out = s.issue(&[], &env).await;
    println!("{out:?}");
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("the broker's certificate was rejected")
            && out.stderr.contains("--ca elsewhere/ca.pem"),
        "{out:?}"
    );

    // A key that is not the certificate's (it used to be "client TLS:
    // transport error").
    let env = s.client_env_with("app", &[("CREDBROKER_KEY", "pki/other-key.pem".into())]);
    let out = s.issue(&[], &env).await;
    println!("{out:?}");
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr
            .starts_with("error: --key pki/other-key.pem does not belong to --cert pki/app.pem"),
        "{out:?}"
    );

    // Plain HTTP to the TLS port (it used to be "frame with invalid size").
    let env = s.client_env_with(
        "app",
        &[("CREDBROKER_ADDR", format!("http://127.0.0.1:{}", s.port))],
    );
    let out = s.issue(&[], &env).await;
    println!("{out:?}");
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "the broker speaks only TLS: use https://127.0.0.1:{}",
            s.port
        )),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_grant_the_admin_cannot_give_names_the_statement_and_role() {
    // The admin may grant SELECT on orders only (no default privileges
    // either); the role grants payroll, a table the README does not make.
    let s = setup(Changes {
        sql: vec![("ALL TABLES IN SCHEMA public", "TABLE orders")],
        skip_sql: vec!["ALTER DEFAULT PRIVILEGES"],
        config: vec![(
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {{name}}".into(),
            "GRANT SELECT ON payroll TO {{name}}".into(),
        )],
    })
    .await;
    s.superuser_sql("CREATE TABLE payroll (name text, salary int)")
        .await;
    let out = s.check().await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_names(
        &out,
        &[
            "role orders-readonly",
            "GRANT statement 1 of 1 (\"GRANT SELECT ON payroll TO {{name}}\")",
            "permission denied for table payroll (SQLSTATE 42501)",
            "WITH GRANT OPTION",
        ],
    );

    let (serve, out) = s.serve_and_issue().await;
    assert_eq!(out.code, 1);
    // Not an admin: no internals over gRPC.
    assert!(
        out.stderr
            .contains("Internal: internal error; see the broker's log"),
        "{out:?}"
    );
    let log = serve.log();
    assert!(
        log.contains(
            "create role for role \"orders-readonly\": GRANT statement 1 of 1 \
             (\"GRANT SELECT ON payroll TO {{name}}\"): permission denied for table payroll \
             (SQLSTATE 42501)"
        ) && log.contains(&s.location()),
        "the broker's log names the statement and role: {log}"
    );
    println!("broker log:\n{log}");
}

/// Shell completions and the man page come from the same clap definition
/// as the real flags.
#[test]
fn completions_and_man_page_are_generated_from_the_cli() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        assert!(script.contains("credbroker"), "{shell}");
        assert!(
            script.contains("sidecar") && script.contains("give-up-after"),
            "{shell}: {script}"
        );
    }
    let man = run(&["man"]);
    assert!(man.contains(".TH credbroker"), "{man}");
    assert!(man.contains("sidecar"), "{man}");
    // One page: its commands are named as commands of it, not as pages
    // (`credbroker-serve(1)`) that do not exist.
    assert!(!man.contains("credbroker-serve"), "{man}");
    assert!(man.contains("credbroker serve"), "{man}");
    // --log-json where it means something, not where nothing logs.
    for (cmd, shown) in [("completions", false), ("man", false), ("serve", true)] {
        let help = run(&[cmd, "--help"]);
        assert_eq!(help.contains("--log-json"), shown, "{cmd} --help: {help}");
    }
    let help = run(&["admin", "--help"]);
    assert!(
        help.contains("lock") && help.contains("static roles"),
        "{help}"
    );
    let help = run(&["admin", "lock", "--help"]);
    for said in [
        "Lock a role",
        "Lock a database",
        "Lock a static role",
        "Lock an identity",
    ] {
        assert!(help.contains(said), "{said}: {help}");
    }
}

/// Mistakes that need no database: a port already taken, a missing audit
/// file, `admin lock` without a target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_port_in_use_missing_audit_file_and_lock_without_target() {
    let dir = pki_dir(Some("x")).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = readme_config().replace("127.0.0.1:7443", &format!("127.0.0.1:{port}"));
    std::fs::write(dir.path().join("broker.toml"), config).unwrap();
    let out = credbroker(dir.path(), &["serve", "--config", "broker.toml"], &[]).await;
    println!("{out:?}");
    // The machine's state, not the file's mistake: not `config:`, not 64.
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "error: unavailable: server.listen 127.0.0.1:{port}: "
        )) && out.stderr.contains("is another broker"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("config:"), "{out:?}");

    let out = credbroker(dir.path(), &["audit", "verify", "missing.log"], &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("cannot read missing.log: "), "{out:?}");

    let out = credbroker(dir.path(), &["admin", "lock", "--reason", "x"], &[]).await;
    assert_eq!(out.code, 2, "{out:?}");
    for flag in ["--identity", "--role", "--static-role", "--database"] {
        assert!(out.stderr.contains(flag), "names {flag}: {out:?}");
    }
}
