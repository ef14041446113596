//! Shared database rounds: creations (and holder revocations) that arrive
//! together go to PostgreSQL as one round, and one that the database
//! refuses fails alone.

use std::sync::Arc;

use chrono::Utc;
use credbroker::backend::postgres::PostgresBackend;
use credbroker::backend::{Backend, NewUser, Revokee, UserRef};
use credbroker::lease::{Password, Username};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_that_arrive_together_share_rounds_and_a_refused_one_fails_alone() {
    let b = TestBroker::prepare(&role("ro", "{db}", "5m", "10m", APP)).await;
    let config = credbroker::config::Config::load(&b.env.config_path).unwrap();
    let backend = Arc::new(PostgresBackend::new(&config.databases["main"]).unwrap());
    let good = vec!["GRANT SELECT ON orders TO {{name}}".to_string()];
    let bad = vec!["GRANT SELECT ON no_such_table TO {{name}}".to_string()];

    // Twenty at once: the first runs alone, the rest queue behind it and
    // share rounds.
    create_together(&b, &backend, 20, &good, &bad, usize::MAX).await;
    let (rounds, carried) = backend.shared_creates();
    assert!(
        rounds >= 1 && carried > rounds,
        "creations queued behind the first shared rounds: {rounds} rounds carried {carried}"
    );

    // One creation in six refused: each refused one fails alone, every
    // other one is created — also the ones that shared its round.
    create_together(&b, &backend, 30, &good, &bad, 6).await;
    // Now the refused role is known: it stays out of shared rounds, which
    // commit for the others.
    let before = backend.shared_creates();
    create_together(&b, &backend, 30, &good, &bad, 6).await;
    let after = backend.shared_creates();
    assert!(
        after.0 > before.0 && after.1 - before.1 > after.0 - before.0,
        "rounds commit again with the refused role kept out: {before:?} → {after:?}"
    );
}

/// Creates a user of broker role `role` with `grants`, valid for five
/// minutes, on `backend`: its name and password, and the outcome.
async fn create_user(
    backend: &PostgresBackend,
    prefix: &str,
    role: &str,
    grants: &[String],
) -> (Username, Password, credbroker::Result<()>) {
    let username = Username::generate(prefix, role);
    let password = Password::generate();
    let until = Utc::now() + chrono::Duration::minutes(5);
    let r = backend
        .create_user(&NewUser {
            role,
            username: &username,
            password: &password,
            valid_until: until,
            hard_limit: until,
            grants,
            host: "",
            owner: None,
        })
        .await;
    (username, password, r)
}

/// Creates `n` users at once, every `bad_every`-th with the `bad` grant
/// under another broker role; checks each outcome as that user.
async fn create_together(
    b: &TestBroker,
    backend: &Arc<PostgresBackend>,
    n: usize,
    good: &[String],
    bad: &[String],
    bad_every: usize,
) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let backend = backend.clone();
        let refused = i % bad_every == bad_every - 1;
        let grants = if refused { bad.to_vec() } else { good.to_vec() };
        let role = if refused { "misconfigured" } else { "ro" };
        let prefix = b.prefix.clone();
        tasks.push(tokio::spawn(async move {
            let (username, password, r) = create_user(&backend, &prefix, role, &grants).await;
            (i, refused, username, password, r)
        }));
    }
    for t in tasks {
        let (i, refused, username, password, r) = t.await.unwrap();
        let exists = b.role_exists(username.as_str()).await;
        if refused {
            let e = r
                .expect_err("a grant on a missing table is refused")
                .to_string();
            assert!(
                e.contains("no_such_table") && e.contains("GRANT SELECT"),
                "names the refused statement: {e}"
            );
            assert!(!exists, "a refused creation leaves no role behind");
        } else {
            r.unwrap_or_else(|e| panic!("creation {i} failed: {e}"));
            assert!(exists);
            // The credential works, and reads what it was granted.
            let c = login(&b.db, username.as_str(), password.expose())
                .await
                .unwrap_or_else(|e| panic!("login as creation {i}: {e}"));
            c.query("SELECT count(*) FROM orders", &[]).await.unwrap();
        }
    }
}

/// A revocation of roles nobody is logged in as takes one commit (NOLOGIN
/// and the drop in one transaction); a role with a session still loses it,
/// through the path that commits NOLOGIN first; both leave no role and no
/// login behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_without_sessions_takes_one_commit_and_one_with_a_session_ends_it() {
    let b = TestBroker::prepare(&role("ro", "{db}", "5m", "10m", APP)).await;
    let config = credbroker::config::Config::load(&b.env.config_path).unwrap();
    let backend = PostgresBackend::new(&config.databases["main"]).unwrap();
    let grants = vec!["GRANT SELECT ON orders TO {{name}}".to_string()];
    let backend = &backend;
    let (grants, prefix) = (&grants, &b.prefix);
    let make = || async move {
        let (username, password, r) = create_user(backend, prefix, "ro", grants).await;
        r.unwrap();
        (username, password)
    };
    let revokee = |u: &Username| {
        Revokee::new(
            UserRef {
                username: u.clone(),
                host: String::new(),
            },
            None,
        )
    };

    // Nobody logged in: one commit.
    let (quiet, quiet_pw) = make().await;
    let before = backend.one_commit_revocations();
    backend.revoke(&[revokee(&quiet)]).await.unwrap();
    assert_eq!(backend.one_commit_revocations(), before + 1);
    assert!(!b.role_exists(quiet.as_str()).await);
    assert!(login(&b.db, quiet.as_str(), quiet_pw.expose())
        .await
        .is_err());

    // Logged in: the session is ended, and not in one commit. A quiet role
    // in the same batch goes with it.
    let (busy, busy_pw) = make().await;
    let (other, _) = make().await;
    let session = login(&b.db, busy.as_str(), busy_pw.expose()).await.unwrap();
    session
        .query("SELECT count(*) FROM orders", &[])
        .await
        .unwrap();
    backend
        .revoke(&[revokee(&busy), revokee(&other)])
        .await
        .unwrap();
    assert_eq!(
        backend.one_commit_revocations(),
        before + 1,
        "a role with a session took the one-commit path"
    );
    assert!(!b.role_exists(busy.as_str()).await);
    assert!(!b.role_exists(other.as_str()).await);
    assert!(
        session.query("SELECT 1", &[]).await.is_err(),
        "the revoked role's session is still open"
    );
    assert!(login(&b.db, busy.as_str(), busy_pw.expose()).await.is_err());

    // A role already gone: nothing to do, no error (the careful path).
    backend.revoke(&[revokee(&quiet)]).await.unwrap();
}
