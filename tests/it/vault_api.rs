//! The Vault-compatible API driven by real, unmodified Vault clients:
//! hvac (HashiCorp's Python client, from a venv `scripts/test.sh` makes)
//! through `tests/vault/hvac_flow.py`, and vaultrs (Rust). Credentials are
//! proved by logging in as the issued user, and proved dead after.

use std::path::{Path, PathBuf};
use std::time::Duration;

use credbroker::audit::Outcome;
use credbroker::pb;
use credbroker_testkit::pki::{ClientSpec, DevCa};
use mysql_async::prelude::Queryable;
use serde_json::Value;

use crate::support::{demo_role, login, maria_opts, maria_root, role, unique, TestBroker, APP};

const OTHER: &str = "spiffe://credbroker.dev/ns/demo/other";

/// The venv's python; missing, the test fails saying how to make it.
fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/vault-venv/bin/python");
    assert!(
        p.exists(),
        "the hvac venv is missing ({}): run scripts/ensure-vault-venv.sh (scripts/test.sh runs it)",
        p.display()
    );
    p
}

/// A client certificate and key on disk, as a Vault client is given them.
struct Cert {
    cert: PathBuf,
    key: PathBuf,
}

impl Cert {
    /// One of the dev PKI's client certificates (`app`, `other`, `admin`).
    fn dev(b: &TestBroker, who: &str) -> Cert {
        Cert {
            cert: b.env.pki.join(format!("{who}.pem")),
            key: b.env.pki.join(format!("{who}-key.pem")),
        }
    }

    /// A fresh certificate from the broker's CA for `identity`.
    fn fresh(b: &TestBroker, identity: &str) -> Cert {
        Self::from_spec(b, &ClientSpec::spiffe(identity))
    }

    /// A fresh certificate from the broker's CA as `spec` says.
    fn from_spec(b: &TestBroker, spec: &ClientSpec) -> Cert {
        let ca = DevCa::load(
            &std::fs::read_to_string(b.env.pki.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(b.env.pki.join("ca-key.pem")).unwrap(),
        )
        .unwrap();
        let pair = ca.client_cert(spec).unwrap();
        let name = unique("cert");
        let cert = b.env.dir.join(format!("{name}.pem"));
        let key = b.env.dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, pair.cert_pem).unwrap();
        std::fs::write(&key, pair.key_pem).unwrap();
        Cert { cert, key }
    }
}

/// Runs one hvac step (see hvac_flow.py) as `cert`; its JSON result.
async fn hvac(b: &TestBroker, cert: &Cert, step: &str, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vault/hvac_flow.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(vault_url(b))
        .arg(&cert.cert)
        .arg(&cert.key)
        .arg(b.env.pki.join("ca.pem"))
        .arg(step)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hvac {step} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("hvac {step} printed no JSON ({e}): {stdout}"))
}

/// `ok` of a step that must succeed.
fn ok(v: Value) -> Value {
    match v.get("ok") {
        Some(o) => o.clone(),
        None => panic!("expected success, got {v}"),
    }
}

/// The hvac exception class of a step that must fail, and its errors.
fn err(v: &Value) -> (String, String) {
    let class = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {v}"));
    (class.to_string(), v["errors"].to_string())
}

fn vault_url(b: &TestBroker) -> String {
    format!(
        "https://127.0.0.1:{}",
        b.vault_port.expect("vault api enabled")
    )
}

async fn vault_broker(roles: &str, extra: &str) -> TestBroker {
    let mut b = TestBroker::prepare(roles).await;
    b.enable_vault_api(extra).await;
    b.start_in_process().await;
    b
}

async fn login_token(b: &TestBroker, cert: &Cert) -> String {
    let r = ok(hvac(b, cert, "login", &[]).await);
    assert_eq!(r["is_authenticated"], true, "{r}");
    r["login"]["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string()
}

fn lease_of(v: &Value) -> (String, String, String) {
    (
        v["lease_id"].as_str().unwrap().to_string(),
        v["data"]["username"].as_str().unwrap().to_string(),
        v["data"]["password"].as_str().unwrap().to_string(),
    )
}

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
    let until: chrono::DateTime<chrono::Utc> = su
        .query_one(
            "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    let left = (until - chrono::Utc::now()).num_seconds();
    let low = 1198 - issued.elapsed().as_secs() as i64;
    assert!((low..=1201).contains(&left), "VALID UNTIL in {left}s");

    // The same lease in the admin view.
    let id = lease_id.rsplit('/').next().unwrap().to_string();
    let listed = b
        .admin("admin")
        .await
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases;
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

/// vaultrs, unmodified, on the ring provider: cert login, lookup-self, a
/// creds read that logs in, an unknown role (404), renew-self and
/// revoke-self (its lease dropped, the token refused after).
#[tokio::test]
async fn vault_vaultrs_cert_login_and_creds() {
    use vaultrs::client::{Client, Identity, VaultClient, VaultClientSettingsBuilder};
    // The tree has one crypto provider; vaultrs (rustls-no-provider)
    // uses the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let b = vault_broker(&role("ro", "{db}", "10m", "20m", APP), "").await;
    let mut pem = std::fs::read(b.env.pki.join("app.pem")).unwrap();
    pem.extend(std::fs::read(b.env.pki.join("app-key.pem")).unwrap());
    let settings = VaultClientSettingsBuilder::default()
        .address(vault_url(&b))
        .ca_certs(vec![b.env.pki.join("ca.pem").display().to_string()])
        .identity(Some(Identity::from_pem(&pem).unwrap()))
        .build()
        .unwrap();
    let mut client = VaultClient::new(settings).unwrap();
    let auth = vaultrs::auth::cert::login(&client, "cert", "")
        .await
        .expect("vaultrs cert login");
    assert_eq!(auth.lease_duration, 3600);
    assert_eq!(auth.metadata.unwrap()["identity"], APP);
    client.set_token(&auth.client_token);
    let me = vaultrs::token::lookup_self(&client)
        .await
        .expect("lookup-self");
    assert_eq!(me.accessor, auth.accessor);
    let creds = vaultrs::database::role::creds(&client, "database", "ro")
        .await
        .expect("vaultrs creds");
    let c = login(&b.db, &creds.username, &creds.password)
        .await
        .expect("vaultrs creds log in");
    c.query_one("SELECT 1 FROM orders", &[]).await.unwrap();
    let e = vaultrs::database::role::creds(&client, "database", "nope")
        .await
        .unwrap_err();
    match e {
        vaultrs::error::ClientError::APIError { code, errors } => {
            assert_eq!(code, 404, "{errors:?}");
            assert!(errors[0].contains("no role \"nope\""), "{errors:?}");
        }
        other => panic!("expected Vault's 404, got {other:?}"),
    }
    let renewed = vaultrs::token::renew_self(&client, Some("30m"))
        .await
        .expect("vaultrs renew-self");
    assert!(
        (1795..=1800).contains(&renewed.lease_duration),
        "{}",
        renewed.lease_duration
    );
    vaultrs::token::revoke_self(&client)
        .await
        .expect("vaultrs revoke-self");
    assert!(
        !b.role_exists(&creds.username).await,
        "the token's lease went with it"
    );
    let e = vaultrs::database::role::creds(&client, "database", "ro")
        .await
        .unwrap_err();
    assert!(
        matches!(e, vaultrs::error::ClientError::APIError { code: 403, .. }),
        "{e:?}"
    );
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

/// `credbroker serve` binds `[vault_api] listen` itself and serves it:
/// the daemon wiring, not only the in-process harness. A lease issued
/// there moves the same metrics as any other; neither the token nor the
/// password reaches the broker's log; SIGTERM stops the listener.
#[tokio::test]
async fn vault_api_served_by_the_binary() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "10m", "20m", APP)).await;
    let mport = crate::support::free_port();
    b.edit_config(|t| {
        t.replace(
            "[server]\n",
            &format!("[server]\nmetrics_listen = \"127.0.0.1:{mport}\"\n"),
        )
    });
    b.enable_vault_api("").await;
    b.spawn_binary().await;
    crate::support::wait_port(b.vault_port.unwrap()).await;
    let app = Cert::dev(&b, "app");
    let token = login_token(&b, &app).await;
    let (lease_id, user, password) = lease_of(&ok(hvac(&b, &app, "creds", &[&token, "ro"]).await));
    assert!(login(&b.db, &user, &password).await.is_ok());
    ok(hvac(&b, &app, "renew", &[&token, &lease_id, "60"]).await);
    let metrics = crate::support::http_get(mport, "/metrics").await;
    let sample = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("role=\"ro\""))
            .unwrap_or_else(|| panic!("no {name} for role ro in:\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(sample("credbroker_leases_issued_total"), "1");
    assert_eq!(sample("credbroker_leases_renewed_total"), "1");
    b.signal_binary("TERM");
    assert_eq!(b.wait_binary(Duration::from_secs(20)).await, Some(0));
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", b.vault_port.unwrap()))
            .await
            .is_err(),
        "the vault api stopped with the broker"
    );
    let log = b.broker_log();
    assert!(log.contains("vault api listening"), "{log}");
    assert!(
        !log.contains(&token[4..]) && !log.contains(&password),
        "no secret in the log"
    );
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

/// Replicas on one PostgreSQL store share tokens and their lease links: a
/// token from one replica issues on another, and revoke-self on the first
/// ends the lease the second issued.
#[tokio::test]
async fn vault_tokens_are_shared_by_replicas_on_a_postgres_store() {
    let mut a = TestBroker::prepare(&role("ro", "{db}", "10m", "20m", APP)).await;
    crate::ha::use_pg_store(&a, crate::support::cluster(), "60s").await;
    a.enable_vault_api("").await;
    a.start_in_process().await;
    let mut r = a.replica();
    // The replica's own Vault port, not a copy of the first one's.
    r.edit_config(|t| t[..t.find("\n[vault_api]").unwrap()].to_string());
    r.enable_vault_api("").await;
    r.start_in_process().await;

    let app = Cert::dev(&a, "app");
    let token = login_token(&a, &app).await;
    let (_, user, password) = lease_of(&ok(hvac(&r, &app, "creds", &[&token, "ro"]).await));
    assert!(login(&r.db, &user, &password).await.is_ok());
    let gone = ok(hvac(&a, &app, "revoke_self", &[&token]).await);
    assert_eq!(gone["status_code"], 204);
    assert!(
        !a.role_exists(&user).await,
        "the replica's lease ended with the token"
    );
    let (class, _) = err(&hvac(&r, &app, "creds", &[&token, "ro"]).await);
    assert_eq!(class, "Forbidden", "revoked on every replica");
    r.stop().await;
    a.stop().await;
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

/// `[vault_api] max_tokens_per_identity` against the real binary: 300
/// logins with one certificate (16 at a time, through vaultrs) leave at
/// most the cap (the default, 32) of token rows in the store, not 300;
/// the oldest token is refused afterwards like an unknown one, the newest
/// works; each login is one audit record, and every evicted accessor is
/// named by exactly one of them.
#[tokio::test]
async fn vault_login_flood_keeps_at_most_the_cap_of_tokens() {
    use futures::StreamExt;
    use vaultrs::client::{Client, Identity, VaultClient, VaultClientSettingsBuilder};
    const LOGINS: usize = 300;
    const CAP: usize = 32; // the default
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = TestBroker::prepare(&role("ro", "{db}", "10m", "20m", APP)).await;
    b.enable_vault_api("").await;
    b.spawn_binary().await;
    crate::support::wait_port(b.vault_port.unwrap()).await;
    let mut pem = std::fs::read(b.env.pki.join("app.pem")).unwrap();
    pem.extend(std::fs::read(b.env.pki.join("app-key.pem")).unwrap());
    let client = |token: Option<&str>| {
        let mut c = VaultClient::new(
            VaultClientSettingsBuilder::default()
                .address(vault_url(&b))
                .ca_certs(vec![b.env.pki.join("ca.pem").display().to_string()])
                .identity(Some(Identity::from_pem(&pem).unwrap()))
                .build()
                .unwrap(),
        )
        .unwrap();
        if let Some(t) = token {
            c.set_token(t);
        }
        c
    };
    let anon = client(None);
    let login = || async {
        vaultrs::auth::cert::login(&anon, "cert", "")
            .await
            .expect("a login within the cap's reach is never refused")
    };
    let oldest = login().await;
    let as_oldest = client(Some(&oldest.client_token));
    vaultrs::token::lookup_self(&as_oldest)
        .await
        .expect("the first token works at first");
    let middle: Vec<_> = futures::stream::iter(0..LOGINS - 2)
        .map(|_| login())
        .buffer_unordered(16)
        .collect()
        .await;
    assert_eq!(middle.len(), LOGINS - 2);
    let newest = login().await;

    // Asked now, checked once the rows are counted (so a run without the
    // cap still reports its numbers).
    let oldest_now = vaultrs::token::lookup_self(&as_oldest).await;
    let as_newest = client(Some(&newest.client_token));
    let me = vaultrs::token::lookup_self(&as_newest)
        .await
        .expect("the newest token works");
    assert_eq!(me.accessor, newest.accessor);
    let creds = vaultrs::database::role::creds(&as_newest, "database", "ro")
        .await
        .expect("the newest token issues");
    assert!(login_db(&b, &creds.username, &creds.password).await);

    b.signal_binary("TERM");
    assert_eq!(b.wait_binary(Duration::from_secs(20)).await, Some(0));
    let path = b.env.store_path.clone();
    let rows: i64 = rusqlite::Connection::open(path)
        .unwrap()
        .query_row("SELECT count(*) FROM vault_tokens", [], |r| r.get(0))
        .unwrap();
    eprintln!("token rows after {LOGINS} logins of one certificate: {rows} (cap {CAP})");
    assert_eq!(rows as usize, CAP, "at most the cap of token rows");
    // The oldest was evicted: refused as an unknown token is.
    match oldest_now {
        Err(vaultrs::error::ClientError::APIError { code: 403, errors }) => {
            assert!(errors[0].contains("invalid token"), "{errors:?}")
        }
        other => panic!("an evicted token must be refused: {other:?}"),
    }

    let records = b.audit_records();
    let logins: Vec<_> = records
        .iter()
        .filter(|r| r.action == "vault_login" && r.identity == APP)
        .collect();
    assert_eq!(logins.len(), LOGINS, "one record per login");
    assert!(logins.iter().all(|r| r.outcome == Outcome::Ok));
    let mut evicted: Vec<String> = logins
        .iter()
        .filter_map(|r| r.detail.as_deref()?.split("; evicted=").nth(1))
        .flat_map(|d| {
            assert!(d.ends_with(" (max_tokens_per_identity=32)"), "{d}");
            d.split(' ').next().unwrap().split(',').map(str::to_string)
        })
        .collect();
    let named = evicted.len();
    evicted.sort();
    evicted.dedup();
    assert_eq!(
        (named, evicted.len()),
        (LOGINS - CAP, LOGINS - CAP),
        "each eviction named once"
    );
    assert!(evicted.contains(&oldest.accessor));
    assert!(!evicted.contains(&newest.accessor));
    let refused = records
        .iter()
        .filter(|r| {
            r.action == "vault_token_lookup"
                && r.outcome == Outcome::Denied
                && r.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("invalid token"))
        })
        .count();
    assert_eq!(refused, 1, "the evicted token's refusal is audited once");
}

async fn login_db(b: &TestBroker, user: &str, password: &str) -> bool {
    login(&b.db, user, password).await.is_ok()
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
