//! The Vault API as deployed: vaultrs (Rust), the real binary serving
//! `[vault_api]`, replicas sharing tokens, a login flood held to the cap.

use super::*;

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

/// `credbroker serve` binds `[vault_api] listen` itself and serves it:
/// the daemon wiring, not only the in-process harness. A lease issued
/// there moves the same metrics as any other; neither the token nor the
/// password reaches the broker's log; SIGTERM stops the listener.
#[tokio::test]
async fn vault_api_served_by_the_binary() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "10m", "20m", APP)).await;
    let mport = b.listen_metrics();
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
