//! Where the stores differ on purpose: start-up recovery, migrations,
//! a store that is down.

use super::*;

/// A store a broker left mid-work at `now`: an intent (pending) and an
/// active lease whose revocation `holder` claimed.
async fn interrupted(home: &StoreHome, now: DateTime<Utc>, holder: &str) -> (Store, Lease, Lease) {
    let s = (home.open)().await;
    let p = lease(1, "ro", APP, now, 600);
    s.insert_intent(&p, None).await.unwrap();
    let a = active(&s, 2, "ro", APP, 600).await;
    s.claim_one(&a.id, &claim(holder, 60))
        .await
        .unwrap()
        .unwrap();
    (s, p, a)
}

#[tokio::test]
async fn sqlite_start_up_makes_pending_intents_due_and_voids_old_claims() {
    let home = sqlite_home().await;
    let now = Utc::now();
    let (s, p, a) = interrupted(&home, now, "previous-life").await;
    s.recover_after_start(now).await.unwrap();
    assert_eq!(ms(s.get(&p.id).await.unwrap().unwrap().due_at), ms(now));
    // The interrupted revocation is due at once, to be finished.
    assert_eq!(ms(s.get(&a.id).await.unwrap().unwrap().due_at), ms(now));
    assert!(s
        .claim_one(&a.id, &claim("me", 60))
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn sqlite_file_of_schema_1_is_migrated_and_pruned() {
    let home = sqlite_home().await;
    let s = (home.open)().await;
    let gone = active(&s, 1, "ro", APP, 600).await;
    s.mark_revoked(std::slice::from_ref(&gone.id), t(Utc::now(), -7200))
        .await
        .unwrap();
    let live = active(&s, 2, "ro", APP, 600).await;
    drop(s);
    // Back to what a broker of schema 1 left behind.
    let path = home.sqlite_path.clone().unwrap();
    tokio::task::spawn_blocking(move || {
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(
                "DROP INDEX leases_revoked_at; DROP TABLE locks; DROP TABLE static_roles; \
                 DROP TABLE vault_tokens; DROP TABLE vault_token_leases; \
                 DROP INDEX leases_grant; ALTER TABLE leases DROP COLUMN grant_id; \
                 DROP TABLE access_requests; PRAGMA user_version = 1;",
            )
            .unwrap();
    })
    .await
    .unwrap();
    let s = (home.open)().await;
    assert_eq!(s.prune_revoked(t(Utc::now(), -3600), 100).await.unwrap(), 1);
    assert!(s.get(&live.id).await.unwrap().is_some());
    drop(s);
    let path = home.sqlite_path.clone().unwrap();
    let (version, indexed) = tokio::task::spawn_blocking(move || {
        let c = rusqlite::Connection::open(path).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'leases_revoked_at'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (v, n)
    })
    .await
    .unwrap();
    assert_eq!((version, indexed), (10, 1));
}

#[tokio::test]
async fn postgres_start_up_leaves_other_replicas_intents_and_claims_alone() {
    let home = postgres_home().await;
    let (_s, p, a) = interrupted(&home, Utc::now(), "replica-a").await;
    // Replica B starts while A is creating p's user and revoking a.
    let b = (home.open)().await;
    b.recover_after_start(Utc::now()).await.unwrap();
    assert_eq!(
        ms(b.get(&p.id).await.unwrap().unwrap().due_at),
        ms(p.due_at),
        "a pending intent keeps its grace deadline"
    );
    assert!(
        b.claim_one(&a.id, &claim("replica-b", 60))
            .await
            .unwrap()
            .is_none(),
        "a live claim of another replica survives a start-up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_starting_together_migrate_once() {
    let home = postgres_home().await;
    let opens: Vec<_> = (0..6).map(|_| tokio::spawn((home.open)())).collect();
    for o in opens {
        o.await.unwrap();
    }
    let c = cluster()
        .connect(home.pg_database.as_deref().unwrap())
        .await
        .unwrap();
    let versions = schema_versions(&c).await;
    assert_eq!(versions, credbroker::store::postgres::migration_versions());
    let secret_columns: i64 = one_value(&c, "SELECT count(*) FROM information_schema.columns \
             WHERE table_name LIKE 'credbroker%' \
             AND (column_name LIKE '%pass%' OR column_name LIKE '%secret%' OR column_name LIKE '%verifier%')", &[]).await;
    assert_eq!(secret_columns, 0, "the store has no column for a secret");

    // A database migrated by a newer broker is refused, not misread.
    c.batch_execute(
        "INSERT INTO credbroker_schema_migrations (version, description) VALUES (9999, 'future')",
    )
    .await
    .unwrap();
    let secret = home._dir.path().join("store-password");
    let err = PostgresStore::open(
        &cluster().url(home.pg_database.as_deref().unwrap()),
        &SecretSource::File(secret),
    )
    .await
    .err()
    .expect("a newer schema must be refused");
    assert!(err.to_string().contains("newer than this broker"), "{err}");
}

#[tokio::test]
async fn postgres_store_down_is_unavailable_and_names_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pw");
    std::fs::write(&secret, "s3cret-store-pw").unwrap();
    let port = free_port();
    let err = PostgresStore::open(
        &format!("postgres://broker@127.0.0.1:{port}/leases"),
        &SecretSource::File(secret),
    )
    .await
    .err()
    .expect("nothing listens there");
    assert!(matches!(err, credbroker::Error::Unavailable(_)), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("s3cret-store-pw"));
}

/// Store migration 11 on a store whose relay made the event table itself
/// (brokers before it ran `CREATE TABLE IF NOT EXISTS` at start): the
/// migration's own `IF NOT EXISTS` finds the table, keeps its rows, and
/// the store reaches the newest schema. The console's key is made once
/// and read back the same by every store on the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_with_the_old_relays_event_table_migrates_to_11() {
    let home = postgres_home().await;
    (home.open)().await;
    let db = home.pg_database.as_deref().unwrap();
    let c = cluster().connect(db).await.unwrap();
    // Back to what a broker of schema 10 left: its relay's table (the old
    // code's statements, verbatim) holding an event, and no key table.
    c.batch_execute(
        "DELETE FROM credbroker_schema_migrations WHERE version >= 11;
         DROP TABLE credbroker_keys;
         DROP TABLE credbroker_lease_events;
         BEGIN;
         SELECT pg_advisory_xact_lock(7161397916654793843);
         CREATE TABLE IF NOT EXISTS credbroker_lease_events (
             seq     bigserial PRIMARY KEY,
             origin  text NOT NULL,
             at      timestamptz NOT NULL DEFAULT clock_timestamp(),
             event   jsonb NOT NULL
         );
         CREATE INDEX IF NOT EXISTS credbroker_lease_events_at ON credbroker_lease_events (at);
         COMMIT;
         INSERT INTO credbroker_lease_events (origin, event) VALUES ('old', '{\"kind\":\"renewed\"}');",
    )
    .await
    .unwrap();
    assert_eq!(schema_versions(&c).await, (1..=10).collect::<Vec<_>>());
    // Two stores opening at once: one migrates, neither fails.
    let (s1, s2) = tokio::join!((home.open)(), (home.open)());
    const { assert!(credbroker::store::postgres::SCHEMA_VERSION >= 11) };
    assert_eq!(
        schema_versions(&c).await,
        (1..=credbroker::store::postgres::SCHEMA_VERSION).collect::<Vec<_>>()
    );
    let kept: i64 = one_value(
        &c,
        "SELECT count(*) FROM credbroker_lease_events WHERE origin = 'old'",
        &[],
    )
    .await;
    assert_eq!(kept, 1, "the old relay's events are kept");
    let (k1, k2) = tokio::join!(s1.console_key(), s2.console_key());
    let (k1, k2) = (k1.unwrap().unwrap(), k2.unwrap().unwrap());
    assert_eq!(k1, k2, "one console key for every replica");
    assert_ne!(k1, [0u8; 32]);
    assert_eq!(s1.console_key().await.unwrap().unwrap(), k1, "made once");
    let keys: i64 = one_value(&c, "SELECT count(*) FROM credbroker_keys", &[]).await;
    assert_eq!(keys, 1);
}

async fn schema_versions(c: &tokio_postgres::Client) -> Vec<i32> {
    column::<i32, _>(
        c,
        "SELECT version FROM credbroker_schema_migrations ORDER BY version",
        &[],
    )
    .await
}
