//! The README's getting-started section followed as written.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_getting_started_works_as_written() {
    let s = setup(Changes::default()).await;

    // 6. check, then serve.
    let out = s.check().await;
    assert_eq!(out.code, 0, "check on the README's set-up: {out:?}");
    assert!(out.stdout.contains("0 error(s)"), "{out:?}");
    for expected in [
        "tls.cert",
        "tls.client_ca",
        "store",
        &format!("connected as {}", s.location()),
        "role orders-readonly",
        "dry run of CREATE ROLE and 1 grant(s) passed",
    ] {
        assert!(
            out.stdout.contains(expected),
            "check shows {expected:?}: {out:?}"
        );
    }
    assert!(
        !out.stdout.contains(&s.password),
        "no password in check's output"
    );

    // `check` opens the store read-only and creates nothing: `serve` makes it.
    assert!(
        out.stdout.contains("does not exist yet"),
        "check says there is no store yet: {out:?}"
    );
    assert!(
        !s.path().join("credbroker.db").exists(),
        "check created no store file"
    );
    // The warning `serve` logs at start (no CRL) is one `check` counts.
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("warning") && l.contains("tls.crl") && l.contains("not set")),
        "{out:?}"
    );
    let stopped = verdict(&out);

    let serve = Serve::start(&s).await;

    // 7. A first lease, and a login with it: the README's block as written.
    let out = s.sh(&readme_sh("--format env > lease.env")).await;
    println!("{out:?}");
    assert_eq!(out.code, 0, "README step 7: {out:?}");
    assert!(
        out.stdout.lines().any(|l| l.trim() == "1") && out.stdout.contains("(1 row)"),
        "psql as the lease counts one order: {out:?}"
    );
    let env = std::fs::read_to_string(s.path().join("lease.env")).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(s.path().join("lease.env"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "lease.env holds a password: 0600");
    let user = env_value(&env, "PGUSER");
    let pw = env_value(&env, "PGPASSWORD");
    assert_eq!(env_value(&env, "PGDATABASE"), s.db);
    assert!(user.starts_with(&s.prefix), "{user}");
    let lease_id = env_value(&env, "CREDBROKER_LEASE_ID").to_string();
    assert!(lease_id.starts_with("l_"), "{env}");
    let expires = env_value(&env, "CREDBROKER_LEASE_EXPIRES_AT");
    assert!(
        chrono::DateTime::parse_from_rfc3339(expires).is_ok(),
        "{expires}"
    );
    let c = login(&s.db, user, pw)
        .await
        .expect("the leased credential logs in");
    let n: i64 = one_value(&c, "SELECT count(*) FROM orders", &[]).await;
    assert_eq!(n, 1);
    drop(c);

    // `check` with the broker serving the store (a lease live) gives the
    // verdict it gave with the broker stopped.
    let out = s.check().await;
    assert_eq!(out.code, 0, "check beside a running broker: {out:?}");
    assert!(out.stdout.contains("(read-only)"), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "name prefix {:?}: 1 user(s) with it, all leased",
            s.prefix
        )),
        "{out:?}"
    );
    assert_eq!(verdict(&out), stopped, "{out:?}");

    // The README's renew and revoke, from the shell, with lease.env.
    // In the same shell as step 7: its `export` still holds.
    let exports: String = readme_sh("--format env > lease.env")
        .lines()
        .filter(|l| l.starts_with("export "))
        .map(|l| format!("{l}\n"))
        .collect();
    let renew = readme_sh("lease renew \"$CREDBROKER_LEASE_ID\"");
    let out = s.sh(&format!("{exports}{renew}")).await;
    println!("{out:?}");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains(&format!("revoked {lease_id}")),
        "{out:?}"
    );
    assert!(
        login(&s.db, user, pw).await.is_err(),
        "the revoked credential no longer logs in"
    );

    // Renew and lookup carry no password, so they print none (not `""`);
    // times are RFC 3339 UTC to the second.
    let out = s.issue(&[], &s.client_env("app")).await;
    assert_eq!(out.code, 0, "{out:?}");
    let issued: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(!issued["password"].as_str().unwrap().is_empty());
    let id = issued["lease_id"].as_str().unwrap().to_string();
    for args in [
        vec!["lease", "lookup", id.as_str()],
        vec!["lease", "renew", id.as_str(), "--ttl", "5m"],
    ] {
        let out = s.cli(&args, &s.client_env("app")).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(
            v.get("password").is_none(),
            "{args:?} prints no password: {out:?}"
        );
        let expires = v["expires_at"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(expires).is_ok()
                && expires.ends_with('Z')
                && !expires.contains('.'),
            "{expires}"
        );
    }

    // Over the role's max_ttl (1h) a renewal is capped, with a warning,
    // as the Vault API does; 0s is refused, not read as the default.
    let out = s
        .cli(
            &["lease", "renew", id.as_str(), "--ttl", "2h"],
            &s.client_env("app"),
        )
        .await;
    println!("{out:?}");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.starts_with("warning: renewed until ")
            && out
                .stderr
                .contains("not the 2h asked for: capped by the role's max_ttl"),
        "{out:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let until = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    let left = until.signed_duration_since(chrono::Utc::now());
    assert!(
        left <= chrono::Duration::hours(1) && left > chrono::Duration::minutes(55),
        "{left}"
    );
    for args in [
        vec!["lease", "renew", id.as_str(), "--ttl", "0s"],
        vec!["lease", "issue", "--role", "orders-readonly", "--ttl", "0s"],
    ] {
        let out = s.cli(&args, &s.client_env("app")).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(
            out.stderr
                .contains("a lease lives at least 1s; leave --ttl out"),
            "{args:?}: {out:?}"
        );
    }

    // An argument error is not called a config error.
    let out = s
        .issue(&["--ca", "pki/nope.pem"], &s.client_env("app"))
        .await;
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.starts_with("error: --ca pki/nope.pem: "),
        "{out:?}"
    );

    // 8. The deliberate refusal, word for word as the README shows it.
    let out = s.issue(&[], &s.client_env("other")).await;
    assert_eq!(out.code, 1, "{out:?}");
    let line = out.stderr.trim();
    assert_eq!(
        line,
        "error: issue: PermissionDenied: identity \"spiffe://credbroker.dev/ns/demo/other\" may not lease role \"orders-readonly\""
    );
    assert!(
        README.contains(&format!("# {line}")),
        "README shows {line:?}"
    );

    // The start-up summary names what was loaded.
    let log = serve.log();
    assert!(
        log.contains("credbroker serving")
            && log.contains("orders (postgres)")
            && log.contains("orders-readonly on orders"),
        "{log}"
    );
    assert!(!log.contains("\x1b["), "no colours in a log file: {log}");
    // The no-CRL warning once, not a second bare copy.
    assert_eq!(log.matches("tls.crl is not set").count(), 1, "{log}");

    // A clean shutdown ends with a line that says so.
    let log = serve.stop().await;
    assert!(
        log.lines()
            .last()
            .is_some_and(|l| l.contains("credbroker stopped")),
        "{log}"
    );
}
