//! The Vault API's verified-token cache (`token_cache.rs`, issue 29)
//! through vaultrs, an unmodified Vault client: a token answered from
//! memory is refused as soon as it is revoked, evicted or its identity
//! locked — on the replica that did it, and across two replicas of one
//! PostgreSQL store (the relay's `token_gone` events; locks read from the
//! store on every request).

use std::time::{Duration, Instant};

use credbroker::pb;
use vaultrs::client::{Client, Identity, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use crate::ha::use_pg_store;
use crate::support::*;

/// A vaultrs client for the Vault API on `port`, as `who` (a dev
/// certificate: `app`, `admin`, …).
fn vault(b: &TestBroker, port: u16, who: &str) -> VaultClient {
    // The tree has one crypto provider; vaultrs uses the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut pem = std::fs::read(b.env.pki.join(format!("{who}.pem"))).unwrap();
    pem.extend(std::fs::read(b.env.pki.join(format!("{who}-key.pem"))).unwrap());
    let settings = VaultClientSettingsBuilder::default()
        .address(format!("https://127.0.0.1:{port}"))
        .ca_certs(vec![b.env.pki.join("ca.pem").display().to_string()])
        .identity(Some(Identity::from_pem(&pem).unwrap()))
        .build()
        .unwrap();
    VaultClient::new(settings).unwrap()
}

/// A cert login through `client`; the token is set on it and returned.
async fn log_in(client: &mut VaultClient) -> String {
    let auth = vaultrs::auth::cert::login(client, "cert", "")
        .await
        .expect("vaultrs cert login");
    client.set_token(&auth.client_token);
    auth.client_token
}

/// The status of a request Vault's way refused; panics on success or on
/// anything but Vault's JSON error.
fn status<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::APIError { code, errors }) => (code, errors.join("; ")),
        other => panic!("expected Vault's refusal, got {other:?}"),
    }
}

/// Two lookups (a miss, then a hit) and a lease: the token is in the
/// replica's cache after this.
async fn warm(
    client: &VaultClient,
) -> vaultrs::api::database::responses::GenerateCredentialsResponse {
    for _ in 0..2 {
        vaultrs::token::lookup_self(client)
            .await
            .expect("lookup-self");
    }
    vaultrs::database::role::creds(client, "database", "ro")
        .await
        .expect("creds")
}

/// One broker (SQLite store): a token answered from the cache is refused
/// at the very next request once it is evicted by a login over the cap,
/// once it is revoked, and once its identity is locked — no window.
#[tokio::test]
async fn a_cached_token_is_refused_at_once_when_evicted_revoked_or_locked() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "10m", "20m", APP)).await;
    b.enable_vault_api("max_tokens_per_identity = 1").await;
    b.start_in_process().await;
    let port = b.vault_port.unwrap();

    // Evicted: a second login of the same identity over a cap of one.
    let mut first = vault(&b, port, "app");
    log_in(&mut first).await;
    let lease = warm(&first).await;
    let mut second = vault(&b, port, "app");
    log_in(&mut second).await;
    let (code, why) = status(vaultrs::token::lookup_self(&first).await);
    assert_eq!(code, 403, "an evicted token, cached a moment ago: {why}");
    let (code, _) = status(vaultrs::database::role::creds(&first, "database", "ro").await);
    assert_eq!(code, 403);
    assert!(b.role_exists(&lease.username).await, "its lease stays live");

    // Revoked: revoke-self, then the very next request.
    let lease = warm(&second).await;
    vaultrs::token::revoke_self(&second)
        .await
        .expect("revoke-self");
    assert!(!b.role_exists(&lease.username).await);
    let (code, why) = status(vaultrs::token::lookup_self(&second).await);
    assert_eq!(code, 403, "a revoked token, cached a moment ago: {why}");

    // Locked: an admin locks the identity; its cached token obtains
    // nothing from the next request on (reads stay allowed, as ever).
    let mut third = vault(&b, port, "app");
    log_in(&mut third).await;
    warm(&third).await;
    admin_lock(
        &b,
        pb::lock_request::Target::Identity(APP.into()),
        "INC-29 cached token",
    )
    .await;
    let (code, why) = status(vaultrs::database::role::creds(&third, "database", "ro").await);
    assert_eq!(code, 403, "{why}");
    assert!(why.contains("INC-29 cached token"), "{why}");
    let (code, _) = status(vaultrs::token::renew_self(&third, None).await);
    assert_eq!(code, 403);
}

/// Two `credbroker serve` replicas on one throwaway PostgreSQL store,
/// each with its Vault API; the returned pair's ports.
async fn two_replicas() -> (TestBroker, u16, TestBroker, u16) {
    let mut a = TestBroker::prepare(&role("ro", "{db}", "10m", "20m", APP)).await;
    use_pg_store(&a, cluster(), "20s").await;
    a.enable_vault_api("").await;
    let a_port = a.vault_port.unwrap();
    a.spawn_binary().await;
    wait_port(a_port).await;
    let mut b = a.replica();
    let b_port = free_port();
    b.edit_config(|t| {
        let old = format!("listen = \"127.0.0.1:{a_port}\"");
        assert!(t.contains(&old), "the replica's config has A's Vault port");
        t.replace(&old, &format!("listen = \"127.0.0.1:{b_port}\""))
    });
    b.vault_port = Some(b_port);
    b.spawn_binary().await;
    wait_port(b_port).await;
    (a, a_port, b, b_port)
}

/// A token cached on replica A and revoked through replica B: A refuses
/// it for credentials from the very next request (the lease's activation
/// checks the token in the store, whatever A's memory says), and refuses
/// it altogether as soon as B's `token_gone` event reaches A — measured
/// and printed; no timer of the cache's is waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_through_replica_b_is_refused_on_replica_a() {
    let (a, a_port, b, b_port) = two_replicas().await;
    let mut on_a = vault(&a, a_port, "app");
    let token = log_in(&mut on_a).await;
    let lease = warm(&on_a).await;
    let mut on_b = vault(&b, b_port, "app");
    on_b.set_token(&token);
    vaultrs::token::lookup_self(&on_b)
        .await
        .expect("the token works on B too: the store is shared");

    vaultrs::token::revoke_self(&on_b)
        .await
        .expect("revoke-self through B");
    let revoked = Instant::now();
    assert!(!a.role_exists(&lease.username).await, "its lease went");
    let (code, why) = status(vaultrs::database::role::creds(&on_a, "database", "ro").await);
    assert_eq!(code, 403, "credentials through A right after: {why}");
    let mut refused = None;
    while revoked.elapsed() < Duration::from_secs(10) {
        if let Err(ClientError::APIError { code: 403, .. }) =
            vaultrs::token::lookup_self(&on_a).await
        {
            refused = Some(revoked.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = refused.unwrap_or_else(|| {
        panic!(
            "A still answers a token revoked through B 10 s later (the cache's age bound is 30 s: \
             the event never came):\n{}",
            a.broker_log()
        )
    });
    // Past the event, every action: renew-self too.
    let (code, _) = status(vaultrs::token::renew_self(&on_a, None).await);
    assert_eq!(code, 403);
    eprintln!(
        "TOKEN CACHE ACROSS REPLICAS: a token revoked through B was refused by A {:.1} ms after \
         B answered (credentials: at once)",
        took.as_secs_f64() * 1000.0
    );
}

/// An identity locked through replica B: its token, cached on replica A,
/// gets nothing on A from the very next request (A reads the locks from
/// the shared store on every request; the cache holds no lock decision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_locked_through_replica_b_is_refused_on_replica_a_at_once() {
    let (a, a_port, b, _) = two_replicas().await;
    let mut on_a = vault(&a, a_port, "app");
    log_in(&mut on_a).await;
    warm(&on_a).await;
    admin_lock(
        &b,
        pb::lock_request::Target::Identity(APP.into()),
        "INC-29 across replicas",
    )
    .await;
    let (code, why) = status(vaultrs::database::role::creds(&on_a, "database", "ro").await);
    assert_eq!(code, 403, "the first request after the lock: {why}");
    assert!(why.contains("INC-29 across replicas"), "{why}");
    let (code, _) = status(vaultrs::token::renew_self(&on_a, None).await);
    assert_eq!(code, 403);
}
