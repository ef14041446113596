//! `credbroker store migrate`: a broker's SQLite store moved to an empty
//! PostgreSQL store, with the real binary, then a broker on the new store
//! serving what the old one held — leases renewed and revoked, a lock
//! still refusing, a Vault-API token still working (and reaching its
//! lease), a static credential still readable — and the audit chain
//! intact across the move. And its refusals, which write nothing. And
//! issue 28's case: 100 short-lived leases, two locks, two tokens and a
//! static role moved, then left alone — the new store's reaper revokes
//! every lease at its expiry and the static role rotates on schedule.

use std::process::Output;
use std::time::Duration;

use credbroker::pb;
use vaultrs::client::{Client, Identity, VaultClient, VaultClientSettingsBuilder};

use crate::static_roles::pg_static;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");

async fn migrate(b: &TestBroker, args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(["store", "migrate", "--config"])
        .arg(&b.env.config_path)
        .args(args)
        .output()
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether `db` holds the store's lease table (the target's schema is
/// made by the same `open` a broker uses, only once a copy may start).
async fn has_store_tables(db: &str) -> bool {
    let c = cluster().connect(db).await.unwrap();
    c.query_one("SELECT to_regclass('credbroker_leases') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0)
}

/// A Vault-API client logged in with `app`'s certificate (a new token per
/// call), and the login's reply.
async fn vault_login(b: &TestBroker) -> (VaultClient, vaultrs::api::AuthInfo) {
    let vault_url = format!("https://127.0.0.1:{}", b.vault_port.unwrap());
    let mut pem = std::fs::read(b.env.pki.join("app.pem")).unwrap();
    pem.extend(std::fs::read(b.env.pki.join("app-key.pem")).unwrap());
    let settings = VaultClientSettingsBuilder::default()
        .address(&vault_url)
        .ca_certs(vec![b.env.pki.join("ca.pem").display().to_string()])
        .identity(Some(Identity::from_pem(&pem).unwrap()))
        .build()
        .unwrap();
    let mut vault = VaultClient::new(settings).unwrap();
    let auth = vaultrs::auth::cert::login(&vault, "cert", "")
        .await
        .unwrap();
    vault.set_token(&auth.client_token);
    (vault, auth)
}

/// An empty target database and the password file `store.password_file`
/// will name afterwards: (database, `--to` URL, `--to-password-file`).
async fn target_store(b: &TestBroker) -> (String, String, String) {
    let target_db = unique("moved");
    cluster().create_database(&target_db).await.unwrap();
    let secret = b.env.dir.join("secrets").join("target-store");
    credbroker::fsutil::write_secret_file(&secret, cluster().superuser_password().as_bytes())
        .unwrap();
    let to = cluster().url(&target_db);
    (target_db, to, secret.display().to_string())
}

/// What the operator is told to do after a move: `store.url` at the
/// target; the old file set aside, so nothing can still be reading it.
fn point_at(b: &TestBroker, to: &str, pw: &str) {
    let old = format!(
        "[store]\nurl = \"sqlite://{}\"\n",
        b.env.store_path.display()
    );
    b.edit_config(|t| {
        t.replace(
            &old,
            &format!("[store]\nurl = \"{to}\"\npassword_file = \"{pw}\"\n"),
        )
    });
    std::fs::rename(&b.env.store_path, b.env.dir.join("store.db.migrated")).unwrap();
}

#[tokio::test]
async fn store_migrate_moves_a_live_sqlite_store_to_postgres() {
    let _ = rustls::crypto::ring::default_provider().install_default();

    let (mut b, _users) = pg_static(1, "1h", "").await;
    b.edit_config(|t| {
        t + &role("ro", "main", "10m", "20m", APP) + &role("held", "main", "10m", "20m", APP)
    });
    b.enable_vault_api("").await;
    b.start_in_process().await;

    // Leases, a lock, a token with a lease linked to it, a static role.
    let mut leases = Vec::new();
    for _ in 0..5 {
        leases.push(issue(&b, "app", "ro", 600).await.unwrap());
    }
    admin_lock(
        &b,
        pb::lock_request::Target::Role("held".into()),
        "moving day",
    )
    .await;
    assert!(issue(&b, "app", "held", 600).await.is_err(), "locked");
    let (vault, auth) = vault_login(&b).await;
    let linked = vaultrs::database::role::creds(&vault, "database", "ro")
        .await
        .unwrap();
    let st = static_read(&b, "app", "st").await.unwrap();

    // A target database, and the password file `store.password_file`
    // will name afterwards.
    let (target_db, to, pw) = target_store(&b).await;

    // Refused while the broker runs on the file: nothing written, the
    // target not even opened.
    let out = migrate(&b, &["--to", &to, "--to-password-file", &pw]).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("in use by another broker"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("nothing was written"), "{}", text(&out));
    assert!(!has_store_tables(&target_db).await);

    // Bad targets: a clear error each, nothing written.
    let out = migrate(&b, &["--to", "not a url"]).await;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("--to"), "{}", text(&out));
    let with_pw = to.replace("://", "://someone:hunter2@");
    let out = migrate(&b, &["--to", &with_pw]).await;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("must not contain a password"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("hunter2"), "{}", text(&out));
    let sqlite_to = format!("sqlite://{}", b.env.dir.join("other.db").display());
    let out = migrate(&b, &["--to", &sqlite_to]).await;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("must be a PostgreSQL store"),
        "{}",
        text(&out)
    );

    b.stop().await;
    // Unreachable: a clear error, the source left as it was.
    let port = free_port();
    let out = migrate(
        &b,
        &[
            "--to",
            &format!("postgres://x@127.0.0.1:{port}/nowhere?connect_timeout=2"),
        ],
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("cannot open the target store"),
        "{}",
        text(&out)
    );

    let out = migrate(&b, &["--to", &to, "--to-password-file", &pw]).await;
    assert!(out.status.success(), "{}", text(&out));
    let report = text(&out);
    for want in [
        "leases",
        "locks",
        "vault_tokens",
        "vault_token_links",
        "static_roles",
        &format!("url = {to:?}"),
        "password_file",
    ] {
        assert!(report.contains(want), "{want} missing from:\n{report}");
    }
    let moved = b
        .audit_records()
        .into_iter()
        .find(|r| r.action == "store_migrated")
        .expect("a store_migrated record");
    let detail = moved.detail.unwrap();
    assert!(
        detail.contains("from sqlite") && detail.contains(&target_db),
        "{detail}"
    );
    // 5 + the Vault one; 1 lock, 1 token, 1 link, 1 static role.
    assert!(detail.contains("leases=6 locks=1 vault_tokens=1 vault_token_links=1 static_roles=1"));

    // Again onto the same target: refused, not empty.
    let out = migrate(&b, &["--to", &to, "--to-password-file", &pw]).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not empty"), "{}", text(&out));

    // What the operator is told: store.url at the target.
    point_at(&b, &to, &pw);
    b.start_in_process().await;

    // The leases: known, renewable, revocable (the user then gone).
    let mut client = b.client("app").await;
    for l in &leases {
        let got = client
            .lookup_lease(pb::LookupLeaseRequest {
                lease_id: l.lease_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.username, l.username);
    }
    client
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: leases[0].lease_id.clone(),
            ttl_seconds: 900,
        })
        .await
        .unwrap();
    for l in &leases {
        assert!(b.role_exists(&l.username).await);
        b.revoke_as("app", &l.lease_id).await.unwrap();
        assert!(
            !b.role_exists(&l.username).await,
            "{} still exists",
            l.username
        );
    }
    // The lock still refuses, with its reason.
    let e = issue(&b, "app", "held", 600).await.unwrap_err();
    assert!(e.message().contains("moving day"), "{e:?}");
    // The token works, and revoking it reaches the lease it made.
    let me = vaultrs::token::lookup_self(&vault).await.unwrap();
    assert_eq!(me.accessor, auth.accessor);
    assert!(b.role_exists(&linked.username).await);
    vaultrs::token::revoke_self(&vault).await.unwrap();
    assert!(
        !b.role_exists(&linked.username).await,
        "the token's link moved with it"
    );
    // The static credential: the same one, sealed in the new store with
    // the same key, and it logs in.
    let again = static_read(&b, "app", "st").await.unwrap();
    assert_eq!(
        (
            again.username.as_str(),
            again.password.as_str(),
            again.generation
        ),
        (st.username.as_str(), st.password.as_str(), st.generation)
    );
    login(&b.db, &again.username, &again.password)
        .await
        .expect("the static credential logs in after the move");
    b.stop().await;

    // One chain across the move.
    let out = tokio::process::Command::new(BIN)
        .args(["audit", "verify"])
        .arg(&b.env.audit_path)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("chain intact"), "{}", text(&out));
}

/// A PostgreSQL source: refused while a broker has sessions on it (named
/// in the refusal, the target untouched); once it is stopped, the same
/// command moves it to another PostgreSQL database.
#[tokio::test]
async fn store_migrate_refuses_a_served_postgres_source_then_moves_it() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "10m", "20m", APP)).await;
    crate::ha::use_pg_store(&b, cluster(), "60s").await;
    b.start_in_process().await;
    let lease = issue(&b, "app", "ro", 600).await.unwrap();

    let target_db = unique("moved");
    cluster().create_database(&target_db).await.unwrap();
    let secret = b.env.dir.join("secrets").join("store-password");
    let to = cluster().url(&target_db);
    let pw = secret.display().to_string();
    let out = migrate(&b, &["--to", &to, "--to-password-file", &pw]).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("brokers are connected to the source store")
            && text(&out).contains("credbroker-store"),
        "{}",
        text(&out)
    );
    assert!(!has_store_tables(&target_db).await, "nothing written");

    b.stop().await;
    // The stopped broker's pooled sessions close as its store is dropped.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let last = loop {
        let out = migrate(&b, &["--to", &to, "--to-password-file", &pw]).await;
        if out.status.success() {
            break text(&out);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still refused 30 s after the stop: {}",
            text(&out)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        last.contains("leases") && last.contains(&target_db),
        "{last}"
    );
    let c = cluster().connect(&target_db).await.unwrap();
    let n: i64 = one_value(
        &c,
        "SELECT count(*) FROM credbroker_leases WHERE id = $1 AND state = 'active'",
        &[&lease.lease_id],
    )
    .await;
    assert_eq!(n, 1);
}

/// The two locks of the 100-lease test, each refusing with its reason.
async fn both_locks_refuse(b: &TestBroker) {
    let role = issue(b, "app", "held", 600).await.unwrap_err();
    let identity = issue(b, "other", "any", 600).await.unwrap_err();
    assert!(role.message().contains("moving day"), "{role:?}");
    assert!(identity.message().contains("quarantined"), "{identity:?}");
}

/// How many of `ids` the store still holds unrevoked.
async fn live(store: &tokio_postgres::Client, ids: &[String]) -> i64 {
    store
        .query_one(
            "SELECT count(*) FROM credbroker_leases WHERE id = ANY($1) AND state <> 'revoked'",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0)
}

/// How many of `names` still exist in `b`'s PostgreSQL.
async fn roles_left(b: &TestBroker, names: &[String]) -> i64 {
    b.superuser()
        .await
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)",
            &[&names],
        )
        .await
        .unwrap()
        .get(0)
}

/// Issue 28's case: 100 live leases, 2 locks, a static role and Vault
/// tokens moved; afterwards nobody revokes anything, and the new store's
/// reaper revokes every lease at its expiry while the static role rotates
/// on its schedule. The leases expire and the role rotates well after the
/// new broker starts, so what happens then is the new store's doing (the
/// old broker is stopped, its file set aside).
#[tokio::test]
async fn store_migrate_then_the_new_stores_reaper_expires_100_leases_and_rotates_static() {
    const LEASES: usize = 100;
    // Long enough for issuing, the stop, the move and the start on a loaded
    // machine; short enough that expiry falls soon after the start.
    const TTL: i64 = 30;
    let _ = rustls::crypto::ring::default_provider().install_default();

    // Two users alternating: a rotation is visible as a new user and
    // generation, and the previous password's end after its overlap.
    let (mut b, users) = pg_static(2, "20s", "overlap = \"5s\"").await;
    b.edit_config(|t| {
        t + &role("ro", "main", "10m", "20m", APP)
            + &role("held", "main", "10m", "20m", APP)
            + &demo_role("any", "10m", "20m").replace("{db}", "main")
    });
    b.enable_vault_api("").await;
    b.start_in_process().await;

    // 100 leases at once, on one connection.
    let client = b.client("app").await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..LEASES {
        let mut c = client.clone();
        set.spawn(async move {
            c.issue_lease(pb::IssueLeaseRequest {
                role: "ro".into(),
                ttl_seconds: TTL,
            })
            .await
            .map(|r| r.into_inner())
        });
    }
    let mut leases = Vec::new();
    while let Some(r) = set.join_next().await {
        leases.push(r.unwrap().unwrap());
    }
    let ids: Vec<String> = leases.iter().map(|l| l.lease_id.clone()).collect();
    let names: Vec<String> = leases.iter().map(|l| l.username.clone()).collect();
    let first_expiry = leases.iter().map(|l| ts(&l.expires_at)).min().unwrap();
    let last_expiry = leases.iter().map(|l| ts(&l.expires_at)).max().unwrap();

    // Two locks: a role, and an identity that holds none of these leases
    // (`other` may use `any`; the lock is what refuses it).
    let mut admin = b.admin("admin").await;
    for (target, reason) in [
        (pb::lock_request::Target::Role("held".into()), "moving day"),
        (
            pb::lock_request::Target::Identity("spiffe://credbroker.dev/ns/demo/other".into()),
            "quarantined",
        ),
    ] {
        admin
            .lock(pb::LockRequest {
                target: Some(target),
                reason: reason.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    both_locks_refuse(&b).await;

    // Two Vault tokens: one with a lease linked to it, one without.
    let (linked_vault, linked_auth) = vault_login(&b).await;
    let linked = vaultrs::database::role::creds(&linked_vault, "database", "ro")
        .await
        .unwrap();
    let (plain_vault, plain_auth) = vault_login(&b).await;
    let before = static_read(&b, "app", "st").await.unwrap();
    b.stop().await;
    // The generation the old store holds at the stop (a rotation may have
    // slipped in between the read and the stop on a slow machine).
    let (target_db, to, pw) = target_store(&b).await;
    let out = migrate(&b, &["--to", &to, "--to-password-file", &pw]).await;
    assert!(out.status.success(), "{}", text(&out));
    let moved = b
        .audit_records()
        .into_iter()
        .find(|r| r.action == "store_migrated")
        .expect("a store_migrated record")
        .detail
        .unwrap();
    assert!(
        moved.contains(&format!(
            "leases={} locks=2 vault_tokens=2 vault_token_links=1 static_roles=1",
            LEASES + 1
        )),
        "{moved}"
    );
    point_at(&b, &to, &pw);
    b.start_in_process().await;
    let started = chrono::Utc::now();
    let store = cluster().connect(&target_db).await.unwrap();
    // Live at the start (unless the machine took longer than the TTL to
    // get here, which the margin printed below would show).
    if chrono::Utc::now() < first_expiry {
        assert_eq!(live(&store, &ids).await, LEASES as i64);
        assert_eq!(roles_left(&b, &names).await, LEASES as i64);
    }

    // Both locks still refuse, with their reasons.
    both_locks_refuse(&b).await;
    // Both tokens still work.
    let me = vaultrs::token::lookup_self(&linked_vault).await.unwrap();
    assert_eq!(me.accessor, linked_auth.accessor);
    let me = vaultrs::token::lookup_self(&plain_vault).await.unwrap();
    assert_eq!(me.accessor, plain_auth.accessor);
    // The static credential logs in: the one the old store held, unless
    // the new broker already rotated an overdue role.
    let after = static_read(&b, "app", "st").await.unwrap();
    assert!(after.generation >= before.generation);
    if after.generation == before.generation {
        assert_eq!(
            (after.username.as_str(), after.password.as_str()),
            (before.username.as_str(), before.password.as_str())
        );
    }
    login(&b.db, &after.username, &after.password)
        .await
        .expect("the static credential logs in after the move");

    // The static role rotates on the new store: a new generation and
    // user, whose password logs in; the previous one is refused once its
    // overlap is over.
    let rotated = loop {
        let c = static_read(&b, "app", "st").await.unwrap();
        if c.generation > after.generation {
            break c;
        }
        assert!(
            chrono::Utc::now() < started + chrono::Duration::seconds(180),
            "no rotation past generation {} within 180 s of the start",
            after.generation
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rotated_in = chrono::Utc::now() - started;
    assert_ne!(rotated.username, after.username);
    assert!(users.contains(&rotated.username));
    login(&b.db, &rotated.username, &rotated.password)
        .await
        .expect("the rotated credential logs in");
    assert!(
        eventually(Duration::from_secs(60), || async {
            login(&b.db, &after.username, &after.password)
                .await
                .is_err()
        })
        .await,
        "the previous static password still logs in 60 s after the rotation"
    );

    // Nobody revokes: the reaper does, each lease at its expiry.
    let bound = (last_expiry - chrono::Utc::now()).num_seconds().max(0) as u64 + 180;
    assert!(
        eventually(Duration::from_secs(bound), || async {
            live(&store, &ids).await == 0
        })
        .await,
        "{} of {LEASES} leases still live 180 s after the last expiry",
        live(&store, &ids).await
    );
    let all_revoked = chrono::Utc::now();
    assert!(
        eventually(Duration::from_secs(60), || async {
            roles_left(&b, &names).await == 0
        })
        .await,
        "{} of {LEASES} users still in pg_roles",
        roles_left(&b, &names).await
    );
    // None before its expiry: the reaper's work, not anyone's revoke.
    let early: i64 = one_value(
        &store,
        "SELECT count(*) FROM credbroker_leases
             WHERE id = ANY($1) AND (revoked_at IS NULL OR revoked_at < expires_at)",
        &[&ids],
    )
    .await;
    assert_eq!(early, 0, "leases revoked before their expiry");
    // The linked lease (10 minutes) is still there; its token's revoke
    // reaches it.
    assert!(b.role_exists(&linked.username).await);
    vaultrs::token::revoke_self(&linked_vault).await.unwrap();
    assert!(!b.role_exists(&linked.username).await);
    b.stop().await;

    let ms = |d: chrono::Duration| d.num_milliseconds() as f64 / 1000.0;
    println!(
        "store migrate, reaper after the move: {LEASES} leases (ttl {TTL} s) expiring \
         {:.1}..{:.1} s after the new broker's start; all revoked {:.1} s after the last \
         expiry ({:.1} s after the first); static role rotated {:.1} s after the start \
         ({:.1} s after its scheduled time; generation {} -> {})",
        ms(first_expiry - started),
        ms(last_expiry - started),
        ms(all_revoked - last_expiry),
        ms(all_revoked - first_expiry),
        ms(rotated_in),
        ms(ts(&rotated.rotated_at) - ts(&after.next_rotation_at)),
        after.generation,
        rotated.generation
    );
}
