//! What the Vault API refuses, and how: replayed tokens, policy, bad and
//! malformed input, certificates without an identity — each a Vault-shaped
//! error, audited once, never cached.

use super::*;

/// A token works only over the certificate that logged in: replayed by
/// another client — another identity, or the same identity with another
/// certificate — it is refused (403) and the refusal audited.
#[tokio::test]
async fn vault_token_replayed_with_another_certificate_is_refused() {
    let b = vault_broker(&demo_role("ro", "10m", "20m"), "").await;
    let app = Cert::dev(&b, "app");
    let token = login_token(&b, &app).await;
    let twin = Cert::fresh(&b, APP);
    let other = Cert::dev(&b, "other");
    for (who, cert) in [
        ("same identity, new certificate", &twin),
        ("other identity", &other),
    ] {
        let (class, errors) = err(&hvac(&b, cert, "creds", &[&token, "ro"]).await);
        assert_eq!(class, "Forbidden", "{who}: {errors}");
        assert!(
            errors.contains("another client certificate"),
            "{who}: {errors}"
        );
        assert_eq!(
            ok(hvac(&b, cert, "is_authenticated", &[&token]).await),
            false,
            "{who}"
        );
    }
    assert_eq!(
        b.broker_role_count().await,
        0,
        "nothing issued to a replayed token"
    );
    let refusals = b
        .audit_records()
        .into_iter()
        .filter(|r| {
            r.action == "issue"
                && matches!(r.outcome, Outcome::Denied)
                && r.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("another client certificate"))
                && r.via.as_deref() == Some("vault_api")
        })
        .count();
    assert_eq!(refusals, 2, "each replay audited");
    // Its own certificate still works.
    ok(hvac(&b, &app, "creds", &[&token, "ro"]).await);
}

/// Policy, bad input and unknown paths: each a Vault-shaped JSON error
/// with Vault's code, nothing created, refusals audited.
#[tokio::test]
async fn vault_refusals_and_bad_input_are_vault_errors_and_lose_nothing() {
    let down_port = crate::support::free_port();
    let roles = role("ro", "{db}", "10m", "20m", APP)
        + &role("theirs", "{db}", "10m", "20m", OTHER)
        + role("capped", "{db}", "10m", "20m", APP).trim_end()
        + "\nmax_leases_per_identity = 1\n\n"
        + &role("away", "down", "10m", "20m", APP)
        + &format!(
            "[databases.down]\nkind = \"postgres\"\n\
             admin_url = \"postgres://nobody@127.0.0.1:{down_port}/nothing\"\nconnect_timeout = \"1s\"\n\n"
        );
    let b = vault_broker(&roles, "").await;
    let app = Cert::dev(&b, "app");
    let token = login_token(&b, &app).await;

    let (class, errors) = err(&hvac(&b, &app, "creds", &[&token, "theirs"]).await);
    assert_eq!(class, "Forbidden", "{errors}");
    assert!(errors.contains("permission denied"), "{errors}");
    let denied = b.audit_records().into_iter().any(|r| {
        r.identity == APP
            && r.action == "issue"
            && r.role.as_deref() == Some("theirs")
            && matches!(r.outcome, Outcome::Denied)
            && r.via.as_deref() == Some("vault_api")
    });
    assert!(denied, "the refusal is audited, via vault_api");

    let (class, _) = err(&hvac(&b, &app, "creds", &[&token, "nope"]).await);
    assert_eq!(class, "InvalidPath", "unknown role: 404");
    ok(hvac(&b, &app, "creds", &[&token, "capped"]).await);
    let (class, errors) = err(&hvac(&b, &app, "creds", &[&token, "capped"]).await);
    assert_eq!(
        class, "RateLimitExceeded",
        "over max_leases_per_identity: 429 ({errors})"
    );
    let (class, errors) = err(&hvac(&b, &app, "creds", &[&token, "away"]).await);
    assert_eq!(class, "VaultDown", "database unreachable: 503 ({errors})");
    assert!(
        errors.contains("database \\\"down\\\" is unreachable")
            && !errors.contains(&down_port.to_string()),
        "names the database, not its address: {errors}"
    );
    let (class, _) = err(&hvac(&b, &app, "creds", &["-", "ro"]).await);
    assert_eq!(class, "Forbidden", "no token: 403");
    let (class, _) = err(&hvac(&b, &app, "creds", &["hvs.not-a-token", "ro"]).await);
    assert_eq!(class, "Forbidden", "a made-up token: 403");

    let (lease_id, user, password) = lease_of(&ok(hvac(&b, &app, "creds", &[&token, "ro"]).await));
    for (args, want) in [
        (vec!["nonsense", "60"], "InvalidRequest"),
        (vec!["database/creds/ro/l_short", "60"], "InvalidRequest"),
        (
            vec!["database/creds/ro/l_aaaaaaaaaaaaaaaaaaaaaaaaaa", "60"],
            "InvalidPath",
        ),
        (vec!["database/creds/theirs/ID", "60"], "InvalidPath"),
        (vec!["LEASE", "-5"], "InvalidRequest"),
    ] {
        let id = lease_id.rsplit('/').next().unwrap();
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("LEASE", &lease_id).replace("ID", id))
            .collect();
        let mut full = vec![token.as_str()];
        full.extend(args.iter().map(String::as_str));
        let (class, errors) = err(&hvac(&b, &app, "renew", &full).await);
        assert_eq!(class, want, "renew {args:?}: {errors}");
    }
    let (class, errors) = err(&hvac(&b, &app, "renew_self", &[&token, "soon"]).await);
    assert_eq!(class, "InvalidRequest", "{errors}");

    // A lease of one identity is not another's to revoke.
    let other = Cert::dev(&b, "other");
    let their_token = login_token(&b, &other).await;
    let (class, _) = err(&hvac(&b, &other, "revoke", &[&their_token, &lease_id]).await);
    assert_eq!(class, "Forbidden");
    assert!(
        login(&b.db, &user, &password).await.is_ok(),
        "bad input lost nothing"
    );
    assert_eq!(b.broker_role_count().await, 2, "ro and one capped");

    for path in [
        "/v1/secret/data/app",
        "/v1/database/roles/ro",
        "/v1/sys/mounts",
        "/v2/x",
    ] {
        let (class, errors) = err(&hvac(&b, &app, "get", &[&token, path]).await);
        assert_eq!(class, "InvalidPath", "{path}: {errors}");
    }
    let (class, errors) =
        err(&hvac(&b, &app, "get", &[&token, "/v1/database/static-creds/ro"]).await);
    assert_eq!(class, "InvalidPath");
    assert!(errors.contains("no static role"), "{errors}");

    // No token needed: load balancers call it.
    let health = ok(hvac(&b, &app, "get", &["-", "/v1/sys/health"]).await);
    assert_eq!(health["initialized"], true, "{health}");
    assert_eq!(health["sealed"], false, "{health}");
    assert_eq!(health["standby"], false, "{health}");
    let mount = ok(hvac(
        &b,
        &app,
        "get",
        &[&token, "/v1/sys/internal/ui/mounts/database/creds/ro"],
    )
    .await);
    assert_eq!(mount["data"]["type"], "database", "{mount}");
    assert_eq!(mount["data"]["path"], "database/");
    let (class, _) = err(&hvac(
        &b,
        &app,
        "get",
        &[&token, "/v1/sys/internal/ui/mounts/secret/app"],
    )
    .await);
    assert_eq!(class, "InvalidPath");
}

/// A certificate the CA signed but that names no usable identity (two
/// SPIFFE IDs) gets no token: 403, audited under its address, as the gRPC
/// layer does.
#[tokio::test]
async fn vault_certificate_without_identity_gets_no_token_and_is_audited() {
    let b = vault_broker(&role("ro", "{db}", "10m", "20m", APP), "").await;
    let mut spec = ClientSpec::spiffe(APP);
    spec.extra_uris = vec!["spiffe://credbroker.dev/ns/demo/other".into()];
    let two = Cert::from_spec(&b, &spec);
    let (class, errors) = err(&hvac(&b, &two, "login", &[]).await);
    assert_eq!(class, "Forbidden", "{errors}");
    assert!(errors.contains("unauthenticated"), "{errors}");
    // Said once, at login and on a token request alike: the reason travels
    // typed, not as a text with its class that a reader wraps again.
    let token = login_token(&b, &Cert::dev(&b, "app")).await;
    let (_, with_token) = err(&hvac(&b, &two, "creds", &[&token, "ro"]).await);
    for said in [&errors, &with_token] {
        assert!(
            said.contains("unauthenticated: client certificate has 2 SPIFFE URI SANs")
                && !said.contains("unauthenticated: unauthenticated"),
            "{said}"
        );
    }
    let audited = b.audit_records().into_iter().any(|r| {
        r.identity == "unauthenticated:127.0.0.1"
            && r.action == "vault_login"
            && matches!(r.outcome, Outcome::Denied)
            && r.via.as_deref() == Some("vault_api")
    });
    assert!(audited, "the refusal is audited under the peer address");
    assert_eq!(b.broker_role_count().await, 0);
}

/// Requests no client library would send still get Vault's JSON errors,
/// with Vault's codes, and change nothing.
#[tokio::test]
async fn vault_malformed_requests_are_json_errors() {
    let b = vault_broker(&role("ro", "{db}", "10m", "20m", APP), "").await;
    let app = Cert::dev(&b, "app");
    let token = login_token(&b, &app).await;
    for (method, path, body, status) in [
        ("PUT", "/v1/sys/leases/renew", "[1", 400),
        ("PUT", "/v1/sys/leases/renew", "[1]", 400),
        ("PUT", "/v1/sys/leases/renew", "{}", 400),
        ("PUT", "/v1/sys/leases/renew", "@100000", 413),
        ("DELETE", "/v1/sys/leases/renew", "", 405),
        ("POST", "/v1/database/creds/ro", "", 405),
        ("PUT", "/v1/auth/cert/login", "{\"name\": 3}", 400),
        (
            "PUT",
            "/v1/auth/token/renew-self",
            "{\"increment\": \"-1h\"}",
            400,
        ),
        ("GET", "/", "", 404),
        ("GET", "/v1/", "", 404),
        ("GET", "/v1/database/creds/ro/extra", "", 404),
    ] {
        let r = ok(hvac(&b, &app, "raw", &[&token, method, path, body]).await);
        assert_eq!(r["status_code"], status, "{method} {path} {body:.20}: {r}");
        let errors = r["body"]["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{r}"));
        assert!(
            errors.len() == 1 && errors[0].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path}: {r}"
        );
    }
    assert_eq!(b.broker_role_count().await, 0, "nothing was issued");
}

/// Every Vault API answer says `Cache-Control: no-store` and `Pragma:
/// no-cache` — a login (its token), `creds` and `static-creds` (their
/// passwords), a refusal and an unknown path — asked over hvac's own
/// HTTP session.
#[tokio::test]
async fn vault_answers_are_never_cached() {
    let (mut b, _) = crate::static_roles::pg_static(1, "1h", "").await;
    b.edit_config(|t| t + &role("ro", "main", "10m", "20m", APP));
    b.enable_vault_api("").await;
    b.start_in_process().await;
    let app = Cert::dev(&b, "app");
    let token = login_token(&b, &app).await;
    for (token, method, path, body, status) in [
        ("-", "PUT", "/v1/auth/cert/login", "{}", 200),
        (token.as_str(), "GET", "/v1/database/creds/ro", "", 200),
        (
            token.as_str(),
            "GET",
            "/v1/database/static-creds/st",
            "",
            200,
        ),
        ("-", "GET", "/v1/database/creds/ro", "", 403),
        (
            "hvs.made-up",
            "GET",
            "/v1/database/static-creds/st",
            "",
            403,
        ),
        ("-", "PUT", "/v1/auth/cert/login", "[1", 400),
        (token.as_str(), "GET", "/v1/secret/data/app", "", 404),
        ("-", "GET", "/v1/sys/health", "", 200),
    ] {
        let r = ok(hvac(&b, &app, "headers", &[token, method, path, body]).await);
        assert_eq!(r["status_code"], status, "{method} {path}: {r}");
        assert_eq!(
            r["headers"]["cache-control"], "no-store",
            "{method} {path}: {r}"
        );
        assert_eq!(r["headers"]["pragma"], "no-cache", "{method} {path}: {r}");
    }
}

/// Every refusal of `auth/cert/login` and of a token check is exactly
/// one audit record, under the caller's identity, via vault_api: a body
/// that is not JSON, a `name` of the wrong type or too long; no token, a
/// made-up one.
#[tokio::test]
async fn vault_login_and_token_refusals_are_audited_once_each() {
    let b = vault_broker(&role("ro", "{db}", "10m", "20m", APP), "").await;
    let app = Cert::dev(&b, "app");
    let count = |action: &str| {
        b.audit_records()
            .into_iter()
            .filter(|r| {
                r.identity == APP
                    && r.action == action
                    && r.outcome != Outcome::Ok
                    && r.via.as_deref() == Some("vault_api")
            })
            .count()
    };
    let long = format!("{{\"name\": \"{}\"}}", "n".repeat(65));
    for (i, body) in ["[1", "{\"name\": 3}", long.as_str()].iter().enumerate() {
        let r = ok(hvac(&b, &app, "raw", &["-", "PUT", "/v1/auth/cert/login", body]).await);
        assert_eq!(r["status_code"], 400, "{body:.20}: {r}");
        assert_eq!(count("vault_login"), i + 1, "{body:.20}: one record");
    }
    for (i, token) in ["-", "hvs.made-up"].iter().enumerate() {
        let r = ok(hvac(
            &b,
            &app,
            "raw",
            &[token, "GET", "/v1/auth/token/lookup-self", ""],
        )
        .await);
        assert_eq!(r["status_code"], 403, "{token}: {r}");
        assert_eq!(count("vault_token_lookup"), i + 1, "{token}: one record");
    }
    assert_eq!(
        b.audit_records()
            .iter()
            .filter(|r| r.action == "vault_login" && r.outcome == Outcome::Ok)
            .count(),
        0,
        "no token was made"
    );
}
