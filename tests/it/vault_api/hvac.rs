//! Leases through hvac, HashiCorp's Python client: dynamic creds on
//! PostgreSQL and MariaDB, static creds, renew and revoke in every form
//! Vault serves.

use super::*;

/// The whole life of one lease through hvac: cert login, creds, a real
/// login as the user, lookup, renew, renew capped at the hard limit with
/// Vault's warning, revoke ending an open session. The lease is the one
/// `admin leases` lists, and its audit records say `via vault_api`;
/// neither token nor password is in the audit log.
#[tokio::test]
async fn vault_hvac_login_creds_renew_cap_lookup_revoke() {
    let mut b = vault_broker(&role("ro", "{db}", "10m", "20m", APP), "").await;
    let app = Cert::dev(&b, "app");

    let r = ok(hvac(&b, &app, "login", &[]).await);
    assert_eq!(r["is_authenticated"], true);
    let auth = &r["login"]["auth"];
    let token = auth["client_token"].as_str().unwrap().to_string();
    assert!(token.starts_with("hvs."), "{auth}");
    assert_eq!(auth["lease_duration"], 3600, "token_ttl default");
    assert_eq!(auth["renewable"], true);
    assert_eq!(auth["metadata"]["identity"], APP);
    assert_eq!(auth["policies"], serde_json::json!(["default"]));
    assert!(r["login"]["request_id"].as_str().unwrap().len() == 36);

    // Bounds below allow for the time hvac takes on a loaded machine.
    let issued = std::time::Instant::now();
    let creds = ok(hvac(&b, &app, "creds", &[&token, "ro"]).await);
    let (lease_id, user, password) = lease_of(&creds);
    assert!(lease_id.starts_with("database/creds/ro/l_"), "{creds}");
    assert_eq!(creds["renewable"], true);
    let d = creds["lease_duration"].as_u64().unwrap();
    assert!((598..=600).contains(&d), "role default_ttl 10m: {d}");
    for key in ["wrap_info", "warnings", "auth"] {
        assert!(creds[key].is_null(), "{key} is null as in Vault: {creds}");
    }
    let session = login(&b.db, &user, &password)
        .await
        .expect("issued user logs in");
    let row = session
        .query_one("SELECT item FROM orders", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "coffee");

    let looked = ok(hvac(&b, &app, "lookup", &[&token, &lease_id]).await);
    assert_eq!(looked["data"]["id"], lease_id.as_str());
    assert_eq!(looked["data"]["renewable"], true);
    assert!(looked["data"]["ttl"].as_u64().unwrap() <= 600);
    assert!(looked["data"]["expire_time"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    let renewed = ok(hvac(&b, &app, "renew", &[&token, &lease_id, "300"]).await);
    assert_eq!(renewed["lease_id"], lease_id.as_str());
    let d = renewed["lease_duration"].as_u64().unwrap();
    assert!((298..=300).contains(&d), "{renewed}");
    assert!(renewed["warnings"].is_null(), "{renewed}");

    // 1h asked, the hard limit (20m after issue) allows less: capped.
    let capped = ok(hvac(&b, &app, "renew", &[&token, &lease_id, "3600"]).await);
    let d = capped["lease_duration"].as_u64().unwrap();
    let low = 1199 - issued.elapsed().as_secs();
    assert!((low..=1200).contains(&d), "{capped}");
    let warning = capped["warnings"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        warning.starts_with("TTL of \"1h0m0s\" exceeded the effective max_ttl of \"19m")
            && warning.ends_with("\"; TTL value is capped accordingly"),
        "{capped}"
    );
    assert_eq!(capped["renewable"], false, "at the hard limit");
    // The database's own expiry moved with it (VALID UNTIL).
    let su = b.superuser().await;
    let until: chrono::DateTime<chrono::Utc> = one_value(
        &su,
        "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1",
        &[&user],
    )
    .await;
    let left = (until - chrono::Utc::now()).num_seconds();
    let low = 1198 - issued.elapsed().as_secs() as i64;
    assert!((low..=1201).contains(&left), "VALID UNTIL in {left}s");

    // The same lease in the admin view.
    let id = lease_id.rsplit('/').next().unwrap().to_string();
    let listed = b.admin_leases().await;
    let row = listed
        .iter()
        .find(|l| l.lease_id == id)
        .expect("admin leases lists it");
    assert_eq!(
        (row.identity.as_str(), row.username.as_str()),
        (APP, user.as_str())
    );

    let revoked = ok(hvac(&b, &app, "revoke", &[&token, &lease_id]).await);
    assert_eq!(revoked["status_code"], 204, "{revoked}");
    assert!(!b.role_exists(&user).await, "role dropped");
    assert!(
        session.query_one("SELECT 1", &[]).await.is_err(),
        "the open session was ended"
    );
    assert!(login(&b.db, &user, &password).await.is_err());
    let (class, _) = err(&hvac(&b, &app, "lookup", &[&token, &lease_id]).await);
    assert_eq!(class, "InvalidPath", "a revoked lease is not found");

    let records: Vec<_> = b
        .audit_records()
        .into_iter()
        .filter(|r| r.lease_id.as_deref() == Some(id.as_str()))
        .collect();
    let actions: Vec<&str> = records.iter().map(|r| r.action.as_str()).collect();
    for a in ["issue", "renew", "revoke"] {
        assert!(actions.contains(&a), "{actions:?}");
    }
    assert!(
        records
            .iter()
            .all(|r| r.via.as_deref() == Some("vault_api")),
        "every record of the lease says via vault_api"
    );
    let audit = std::fs::read_to_string(&b.env.audit_path).unwrap();
    assert!(audit.contains("\"action\":\"vault_login\""));
    assert!(
        !audit.contains(&token) && !audit.contains(&token[4..]),
        "no token in the audit log"
    );
    assert!(!audit.contains(&password), "no password in the audit log");
    // Nor in the store: a copy of it logs no one in.
    b.stop().await;
    let store = std::fs::read(&b.env.store_path).unwrap();
    let hay = String::from_utf8_lossy(&store);
    assert!(!hay.contains(&token[4..]) && !hay.contains(&password));
}

/// Revoking a token revokes the leases it created (and only those), and
/// the token stops working; renew-self is capped at token_max_ttl with
/// Vault's warning; an expired token is refused.
#[tokio::test]
async fn vault_hvac_revoke_self_ends_the_tokens_leases_and_tokens_expire() {
    let b = vault_broker(
        &role("ro", "{db}", "10m", "20m", APP),
        "token_ttl = \"1h\"\ntoken_max_ttl = \"90m\"",
    )
    .await;
    let app = Cert::dev(&b, "app");
    let logged_in = std::time::Instant::now();
    let token = login_token(&b, &app).await;
    let keeper = login_token(&b, &app).await;
    let (_, u1, p1) = lease_of(&ok(hvac(&b, &app, "creds", &[&token, "ro"]).await));
    let (_, u2, _) = lease_of(&ok(hvac(&b, &app, "creds", &[&token, "ro"]).await));
    let (_, kept, kept_pw) = lease_of(&ok(hvac(&b, &app, "creds", &[&keeper, "ro"]).await));
    let s1 = login(&b.db, &u1, &p1).await.unwrap();
    // One of the token's leases revoked on its own before.
    let (early, _, _) = lease_of(&ok(hvac(&b, &app, "creds", &[&token, "ro"]).await));
    ok(hvac(&b, &app, "revoke", &[&token, &early]).await);

    let renewed = ok(hvac(&b, &app, "renew_self", &[&token, "2h"]).await);
    let d = renewed["auth"]["lease_duration"].as_u64().unwrap();
    assert!(
        (5399 - logged_in.elapsed().as_secs()..=5400).contains(&d),
        "capped at token_max_ttl 90m: {renewed}"
    );
    let w = renewed["warnings"][0].as_str().unwrap_or_default();
    assert!(
        w.starts_with("TTL of \"2h0m0s\" exceeded the effective max_ttl of \"1h29m"),
        "{renewed}"
    );

    let gone = ok(hvac(&b, &app, "revoke_self", &[&token]).await);
    assert_eq!(gone["status_code"], 204, "{gone}");
    assert!(!b.role_exists(&u1).await && !b.role_exists(&u2).await);
    assert!(
        s1.query_one("SELECT 1", &[]).await.is_err(),
        "session ended"
    );
    assert!(
        b.role_exists(&kept).await,
        "another token's lease is untouched"
    );
    assert!(login(&b.db, &kept, &kept_pw).await.is_ok());
    assert_eq!(
        ok(hvac(&b, &app, "is_authenticated", &[&token]).await),
        false
    );
    let (class, errors) = err(&hvac(&b, &app, "creds", &[&token, "ro"]).await);
    assert_eq!(class, "Forbidden", "{errors}");
    assert_eq!(
        ok(hvac(&b, &app, "is_authenticated", &[&keeper]).await),
        true
    );

    // A broker with 1 s tokens: expired is refused, with a reason.
    let short = vault_broker(&role("ro", "{db}", "10m", "20m", APP), "token_ttl = \"1s\"").await;
    let app2 = Cert::dev(&short, "app");
    let t = ok(hvac(&short, &app2, "login", &[]).await)["login"]["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (class, errors) = err(&hvac(&short, &app2, "creds", &[&t, "ro"]).await);
    assert_eq!(class, "Forbidden");
    assert!(errors.contains("token expired"), "{errors}");
    assert_eq!(short.broker_role_count().await, 0, "nothing issued");
}

/// The same through hvac on a MariaDB role: the user logs in, revocation
/// kills its open connection and drops it.
#[tokio::test]
async fn vault_hvac_mariadb_creds_login_and_revoke() {
    let mut b = TestBroker::prepare("").await;
    let schema = unique("vlt");
    let mut root = maria_root().await;
    root.query_drop(format!(
        "CREATE DATABASE `{schema}`; CREATE TABLE `{schema}`.orders (id INT PRIMARY KEY); \
         INSERT INTO `{schema}`.orders VALUES (7)"
    ))
    .await
    .unwrap();
    let section = b.maria_section("maria", &schema);
    let maria_role = format!(
        "[roles.mro]\ndatabase = \"maria\"\ndefault_ttl = \"5m\"\nmax_ttl = \"10m\"\n\
         allowed = [\"{APP}\"]\ngrants = [\"GRANT SELECT ON `{schema}`.orders TO {{{{name}}}}\"]\n\n"
    );
    b.edit_config(|t| t + &section + &maria_role);
    b.enable_vault_api("mount = \"db\"").await;
    b.start_in_process().await;
    let app = Cert::dev(&b, "app");
    let token = login_token(&b, &app).await;
    let creds = ok(hvac_mount(&b, &app, &token, "mro").await);
    let (lease_id, user, password) = lease_of(&creds);
    assert!(lease_id.starts_with("db/creds/mro/"), "{creds}");
    let mut conn = mysql_async::Conn::new(maria_opts(Some((&user, &password)), Some(&schema)))
        .await
        .expect("issued MariaDB user logs in");
    let n: Option<i32> = conn.query_first("SELECT id FROM orders").await.unwrap();
    assert_eq!(n, Some(7));

    let renewed = ok(hvac(&b, &app, "renew", &[&token, &lease_id, "-"]).await);
    assert!(
        renewed["lease_duration"].as_u64().unwrap() >= 298,
        "role default: {renewed}"
    );
    let revoked = ok(hvac(&b, &app, "revoke", &[&token, &lease_id]).await);
    assert_eq!(revoked["status_code"], 204);
    assert!(
        conn.query_drop("SELECT 1").await.is_err(),
        "the open connection was killed"
    );
    assert!(
        mysql_async::Conn::new(maria_opts(Some((&user, &password)), Some(&schema)))
            .await
            .is_err(),
        "the user is gone"
    );
    let mut root = maria_root().await;
    let left: Option<i64> = root
        .exec_first("SELECT COUNT(*) FROM mysql.user WHERE User = ?", (&user,))
        .await
        .unwrap();
    assert_eq!(left, Some(0));
    let _ = root.query_drop(format!("DROP DATABASE `{schema}`")).await;
}

/// `creds` on a mount other than hvac's default `database`.
async fn hvac_mount(b: &TestBroker, cert: &Cert, token: &str, role: &str) -> Value {
    // hvac's generate_credentials takes mount_point; the flow script uses
    // the adapter for that, exactly the GET hvac would send.
    hvac(b, cert, "get", &[token, &format!("/v1/db/creds/{role}")]).await
}

/// The older and path forms Vault still serves: `sys/renew/<id>`,
/// `sys/leases/renew/<id>`, `sys/revoke/<id>`, `sys/leases/revoke/<id>`.
#[tokio::test]
async fn vault_lease_ids_in_the_path_renew_and_revoke() {
    let b = vault_broker(&role("ro", "{db}", "10m", "20m", APP), "").await;
    let app = Cert::dev(&b, "app");
    let token = login_token(&b, &app).await;
    for (renew, revoke) in [
        ("sys/renew", "sys/revoke"),
        ("sys/leases/renew", "sys/leases/revoke"),
    ] {
        let (lease_id, user, password) =
            lease_of(&ok(hvac(&b, &app, "creds", &[&token, "ro"]).await));
        let path = format!("/v1/{renew}/{lease_id}");
        let r = ok(hvac(
            &b,
            &app,
            "raw",
            &[&token, "PUT", &path, "{\"increment\": 120}"],
        )
        .await);
        assert_eq!(r["lease_id"], lease_id.as_str(), "{path}: {r}");
        let d = r["lease_duration"].as_u64().unwrap();
        assert!((118..=120).contains(&d), "{path}: {r}");
        let session = login(&b.db, &user, &password).await.unwrap();
        let path = format!("/v1/{revoke}/{lease_id}");
        let r = ok(hvac(&b, &app, "raw", &[&token, "PUT", &path, ""]).await);
        assert_eq!(r["status_code"], 204, "{path}: {r}");
        assert!(!b.role_exists(&user).await, "{path}");
        assert!(
            session.query_one("SELECT 1", &[]).await.is_err(),
            "{path}: session ended"
        );
    }
}

/// `static-creds` through hvac's own call: the static role's current user
/// and password in Vault's shape, which log in; an identity the static
/// role does not allow gets 403 and is audited.
#[tokio::test]
async fn vault_hvac_static_creds_log_in_and_are_refused_to_others() {
    let (mut b, users) = crate::static_roles::pg_static(2, "1h", "").await;
    b.enable_vault_api("").await;
    b.start_in_process().await;
    let app = Cert::dev(&b, "app");
    let token = login_token(&b, &app).await;
    let r = ok(hvac(&b, &app, "static_creds", &[&token, "st"]).await);
    let user = r["data"]["username"].as_str().unwrap().to_string();
    let password = r["data"]["password"].as_str().unwrap().to_string();
    assert!(users.contains(&user), "{r}");
    assert_eq!(r["data"]["rotation_period"], 3600, "{r}");
    let ttl = r["data"]["ttl"].as_i64().unwrap();
    assert!(ttl > 3000 && ttl <= 3600, "{r}");
    assert!(r["data"]["last_vault_rotation"].is_string(), "{r}");
    assert_eq!(r["lease_id"], "", "static credentials have no lease: {r}");
    let c = login(&b.db, &user, &password)
        .await
        .expect("the static credential logs in");
    c.simple_query("SELECT 1").await.unwrap();

    let other = Cert::dev(&b, "other");
    let token = login_token(&b, &other).await;
    let (class, _) = err(&hvac(&b, &other, "static_creds", &[&token, "st"]).await);
    assert_eq!(class, "Forbidden");
    assert!(
        b.audit_records().iter().any(|r| r.action == "static_read"
            && r.outcome == credbroker::audit::Outcome::Denied
            && r.identity.ends_with("/other")),
        "the refusal is not audited"
    );
    b.stop().await;
}
