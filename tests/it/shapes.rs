//! Deployment shapes the rest of the suite does not have: several
//! databases on one server, two brokers on one server, roles that run DDL,
//! an admin that is not a superuser, a policy that shrinks under a live
//! lease. Each of these once killed credentials or dropped data.

use std::time::Duration;

use credbroker::pb;
use tonic::Code;

use crate::support::*;

/// A role that may create objects in `public`, as a migration job would.
fn ddl_role(name: &str, db: &str, owner: Option<&str>) -> String {
    let owner = owner
        .map(|o| format!("owner = \"{o}\"\n"))
        .unwrap_or_default();
    format!(
        "[roles.{name}]\ndatabase = \"{db}\"\ndefault_ttl = \"1m\"\nmax_ttl = \"10m\"\n\
         allowed = [\"{APP}\"]\n{owner}\
         grants = [\"GRANT CREATE, USAGE ON SCHEMA public TO {{{{name}}}}\"]\n\n"
    )
}

/// A short prefix, so a second broker's prefix can start with it and still
/// fit the six characters `name_prefix` allows.
fn short_prefix() -> String {
    format!("x{}_", &unique("")[1..3])
}

fn set_prefix(b: &mut TestBroker, prefix: &str) {
    let old = b.prefix.clone();
    b.edit_config(|t| {
        t.replace(
            &format!("name_prefix = \"{old}\""),
            &format!("name_prefix = \"{prefix}\""),
        )
    });
    b.prefix = prefix.to_string();
}

async fn logs_in(db: &str, lease: &pb::Lease) -> bool {
    login(db, &lease.username, &lease.password).await.is_ok()
}

fn drop_orphan_records(b: &TestBroker) -> Vec<String> {
    b.audit_records()
        .into_iter()
        .filter(|r| r.action == "drop_orphan")
        .filter_map(|r| r.username)
        .collect()
}

/// Three databases of one cluster under one broker (one of them reached
/// under another host name), and a second broker on the same cluster whose
/// prefix starts with the first one's. With a 1 s sweep, every credential
/// still logs in after several sweeps; a real orphan is still dropped.
#[tokio::test]
async fn several_databases_and_two_brokers_on_one_server_keep_every_credential() {
    let pg = cluster();
    let mut a = TestBroker::prepare(&role("r1", "{db}", "1m", "10m", APP)).await;
    let prefix_a = short_prefix();
    set_prefix(&mut a, &prefix_a);
    let db2 = fresh_database_on(pg).await;
    let db3 = fresh_database_on(pg).await;
    let second = a.env.pg_database("second", pg, &db2).unwrap();
    // The same server under another name: the sweep must not think it is
    // a different one.
    let second = second.replace("@127.0.0.1:", "@localhost:");
    assert!(second.contains("@localhost:"), "{second}");
    let third = a.env.pg_database("third", pg, &db3).unwrap();
    a.edit_config(|t| {
        format!(
            "{t}{second}{third}{}{}",
            role("r2", "second", "1m", "10m", APP),
            role("r3", "third", "1m", "10m", APP)
        )
    });
    a.start_in_process().await;

    let mut b = TestBroker::prepare(&role("r1", "{db}", "1m", "10m", APP)).await;
    let prefix_b = format!("{prefix_a}b_");
    set_prefix(&mut b, &prefix_b);
    b.start_in_process().await;

    let mut leases = Vec::new();
    for (role, db) in [("r1", &a.db), ("r2", &db2), ("r3", &db3)] {
        for _ in 0..2 {
            leases.push((db.clone(), issue(&a, "app", role, 0).await.unwrap()));
        }
    }
    for _ in 0..2 {
        leases.push((b.db.clone(), issue(&b, "app", "r1", 0).await.unwrap()));
    }
    assert!(leases
        .iter()
        .any(|(_, l)| l.username.starts_with(&prefix_b)));

    // Sweeps run every second; a suspect is dropped on its second sighting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for (db, lease) in &leases {
        assert!(
            logs_in(db, lease).await,
            "{} on {db} was dropped by a sweep",
            lease.username
        );
    }
    assert_eq!(drop_orphan_records(&a), Vec::<String>::new());
    assert_eq!(drop_orphan_records(&b), Vec::<String>::new());

    // A user in broker A's exact name shape that no lease accounts for is
    // still an orphan, whichever database it was made in.
    let orphan = format!("{prefix_a}r2_{}", &unique("")[1..17]);
    let su = pg.connect(&db3).await.unwrap();
    su.batch_execute(&format!("CREATE ROLE \"{orphan}\" LOGIN"))
        .await
        .unwrap();
    let dropped = eventually(Duration::from_secs(15), || async {
        !a.role_exists(&orphan).await
    })
    .await;
    assert!(dropped, "orphan {orphan} not dropped");
    assert_eq!(drop_orphan_records(&a), vec![orphan]);
    assert_eq!(drop_orphan_records(&b), Vec::<String>::new());
    for (db, lease) in &leases {
        assert!(logs_in(db, lease).await, "{} lost", lease.username);
    }
    a.stop().await;
    b.stop().await;
}

/// Everything a migration-style lease creates, and the rows in it.
async fn create_objects(client: &tokio_postgres::Client, tag: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE t_{tag} (id int); INSERT INTO t_{tag} VALUES (1), (2), (3);
             CREATE VIEW v_{tag} AS SELECT count(*) AS n FROM t_{tag};
             CREATE SEQUENCE s_{tag};
             CREATE FUNCTION f_{tag}() RETURNS int LANGUAGE sql AS 'SELECT 42';"
        ))
        .await
        .unwrap();
}

/// The objects are all there, with their rows, owned by `owner`.
async fn assert_objects(b: &TestBroker, tag: &str, owner: &str) {
    let su = b.superuser().await;
    let rows: i64 = su
        .query_one(&format!("SELECT n FROM v_{tag}"), &[])
        .await
        .unwrap_or_else(|e| panic!("view v_{tag} gone: {e}"))
        .get(0);
    assert_eq!(rows, 3, "rows of t_{tag}");
    let f: i32 = su
        .query_one(&format!("SELECT f_{tag}()"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(f, 42);
    let owners: Vec<(String, String)> = su
        .query(
            "SELECT c.relname::text, pg_get_userbyid(c.relowner)::text FROM pg_class c \
             WHERE c.relname = ANY($1) \
             UNION ALL SELECT p.proname::text, pg_get_userbyid(p.proowner)::text FROM pg_proc p \
             WHERE p.proname = $2 ORDER BY 1",
            &[
                &vec![format!("t_{tag}"), format!("v_{tag}"), format!("s_{tag}")],
                &format!("f_{tag}"),
            ],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(owners.len(), 4, "{owners:?}");
    for (object, by) in owners {
        assert_eq!(by, owner, "owner of {object}");
    }
}

async fn revoked_record(b: &TestBroker, lease_id: &str) -> credbroker::audit::Record {
    let mut found = None;
    let ok = eventually(Duration::from_secs(15), || {
        found = b.audit_records().into_iter().find(|r| {
            r.lease_id.as_deref() == Some(lease_id)
                && matches!(r.action.as_str(), "revoke" | "reap" | "admin_revoke")
                && r.outcome == credbroker::audit::Outcome::Ok
        });
        let done = found.is_some();
        async move { done }
    })
    .await;
    assert!(ok, "no revocation record for {lease_id}");
    found.unwrap()
}

/// A role that runs DDL: what its lease created survives revoke, expiry
/// and the orphan sweep, with its rows, owned by the configured owner —
/// or, with none configured, by the broker's admin role. Never dropped.
#[tokio::test]
async fn objects_a_leased_role_creates_outlive_revoke_expiry_and_sweep() {
    let owner = unique("app_owner");
    let mut b = TestBroker::prepare(
        &(ddl_role("migrate", "{db}", Some(&owner)) + &ddl_role("adhoc", "{db}", None)),
    )
    .await;
    {
        let su = b.superuser().await;
        su.batch_execute(&format!(
            "CREATE ROLE \"{owner}\" NOLOGIN; GRANT CREATE, USAGE ON SCHEMA public TO \"{owner}\""
        ))
        .await
        .unwrap();
    }
    b.start_in_process().await;
    let admin = cluster().superuser().to_string();

    // Revoked by its holder.
    let lease = issue(&b, "app", "migrate", 0).await.unwrap();
    let c = login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap();
    create_objects(&c, "rev").await;
    // The owner pattern: SET ROLE works, and objects made so are the
    // owner's from the start.
    c.batch_execute(&format!(
        "SET ROLE \"{owner}\"; CREATE TABLE t_setrole (id int); RESET ROLE"
    ))
    .await
    .unwrap();
    b.revoke_as("app", &lease.lease_id).await.unwrap();
    assert!(!b.role_exists(&lease.username).await);
    assert_objects(&b, "rev", &owner).await;
    let rec = revoked_record(&b, &lease.lease_id).await;
    assert_eq!(rec.objects_reassigned, Some(4), "{rec:?}");
    assert_eq!(rec.reassigned_to.as_deref(), Some(owner.as_str()));

    // Expired and reaped.
    let lease = issue(&b, "app", "migrate", 2).await.unwrap();
    let c = login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap();
    create_objects(&c, "exp").await;
    drop(c);
    let rec = revoked_record(&b, &lease.lease_id).await;
    assert_eq!(rec.action, "reap");
    assert_objects(&b, "exp", &owner).await;

    // No owner configured: the admin role inherits.
    let lease = issue(&b, "app", "adhoc", 0).await.unwrap();
    let c = login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap();
    create_objects(&c, "adm").await;
    admin_revoke_by(
        &b,
        pb::revoke_leases_request::Selector::LeaseId(lease.lease_id.clone()),
        false,
    )
    .await;
    assert_objects(&b, "adm", &admin).await;
    let rec = revoked_record(&b, &lease.lease_id).await;
    assert_eq!(rec.reassigned_to.as_deref(), Some(admin.as_str()));

    // Swept: a broker-shaped user no lease accounts for, that made objects.
    let orphan = format!("{}adhoc_{}", b.prefix, &unique("")[1..17]);
    {
        let su = b.superuser().await;
        su.batch_execute(&format!(
            "CREATE ROLE \"{orphan}\" LOGIN PASSWORD 'orphan-pw'; \
             GRANT CREATE, USAGE ON SCHEMA public TO \"{orphan}\""
        ))
        .await
        .unwrap();
    }
    let c = login(&b.db, &orphan, "orphan-pw").await.unwrap();
    create_objects(&c, "orph").await;
    drop(c);
    let swept = eventually(Duration::from_secs(15), || async {
        !b.role_exists(&orphan).await
    })
    .await;
    assert!(swept, "orphan not swept");
    assert_objects(&b, "orph", &admin).await;
    let rec = b
        .audit_records()
        .into_iter()
        .find(|r| r.action == "drop_orphan" && r.username.as_deref() == Some(orphan.as_str()))
        .expect("drop_orphan record");
    assert_eq!(rec.objects_reassigned, Some(4), "{rec:?}");
    b.stop().await;
}

/// Objects a lease made in *another* database of the cluster survive too
/// (REASSIGN OWNED acts per database), a database it owns survives, and
/// its open session in the other database ends.
#[tokio::test]
async fn objects_in_another_database_of_the_cluster_are_reassigned_there() {
    let pg = cluster();
    let mut b = TestBroker::prepare(&ddl_role("migrate", "{db}", None)).await;
    let other = fresh_database_on(pg).await;
    pg.connect(&other)
        .await
        .unwrap()
        .batch_execute("GRANT CREATE, USAGE ON SCHEMA public TO PUBLIC")
        .await
        .unwrap();
    b.start_in_process().await;
    let lease = issue(&b, "app", "migrate", 0).await.unwrap();
    // A whole database the lease came to own (shared objects count too).
    let owned_db = unique("owned");
    pg.connect(&b.db)
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE DATABASE {owned_db} OWNER \"{}\"",
            lease.username
        ))
        .await
        .unwrap();
    let elsewhere = login(&other, &lease.username, &lease.password)
        .await
        .unwrap();
    elsewhere
        .batch_execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)")
        .await
        .unwrap();
    b.revoke_as("app", &lease.lease_id).await.unwrap();
    assert!(!b.role_exists(&lease.username).await);
    assert!(
        elsewhere.simple_query("SELECT 1").await.is_err(),
        "the session in the other database survived"
    );
    let su = pg.connect(&other).await.unwrap();
    let row = su
        .query_one(
            "SELECT (SELECT id FROM kept), pg_get_userbyid(relowner)::text FROM pg_class WHERE relname = 'kept'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    assert_eq!(row.get::<_, String>(1), pg.superuser());
    let db_owner: String = one_value(
        &su,
        "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1",
        &[&owned_db],
    )
    .await;
    assert_eq!(
        db_owner,
        pg.superuser(),
        "the owned database survives, reassigned"
    );
    b.stop().await;
}

/// An admin role with CREATEROLE, pg_signal_backend and pg_read_all_stats
/// (the README's setup), not a superuser:
/// issue, end a live session, keep the objects (owner set up as the
/// README says: the admin is a member of the owner); and a handover
/// drains (it sees which sessions are idle).
#[tokio::test]
async fn a_non_superuser_admin_revokes_and_keeps_objects() {
    let pg = cluster();
    let admin = unique("broker_admin");
    let owner = unique("app_owner");
    let mut b = TestBroker::prepare(&ddl_role("migrate", "{db}", Some(&owner))).await;
    {
        let su = b.superuser().await;
        su.batch_execute(&format!(
            "CREATE ROLE \"{admin}\" LOGIN CREATEROLE PASSWORD 'admin-pw-{admin}';
             GRANT pg_signal_backend TO \"{admin}\";
             GRANT pg_read_all_stats TO \"{admin}\";
             CREATE ROLE \"{owner}\" NOLOGIN;
             GRANT \"{owner}\" TO \"{admin}\";
             GRANT CREATE, USAGE ON SCHEMA public TO \"{owner}\";
             GRANT CREATE, USAGE ON SCHEMA public TO \"{admin}\" WITH GRANT OPTION;
             GRANT SELECT ON orders TO \"{admin}\" WITH GRANT OPTION;"
        ))
        .await
        .unwrap();
    }
    let secret = b.env.dir.join("secrets").join("nonsuper-admin");
    credbroker::fsutil::write_secret_file(&secret, format!("admin-pw-{admin}").as_bytes()).unwrap();
    let su_url = pg.url(&b.db);
    let admin_url = su_url.replacen(&format!("//{}@", pg.superuser()), &format!("//{admin}@"), 1);
    assert_ne!(admin_url, su_url);
    b.edit_config(|t| {
        let mut out = String::new();
        let mut in_main = false;
        for line in t.lines() {
            if line.starts_with('[') {
                in_main = line == "[databases.main]";
            }
            if in_main && line.starts_with("admin_url") {
                out.push_str(&format!("admin_url = \"{admin_url}\"\n"));
            } else if in_main && line.starts_with("admin_password_file") {
                out.push_str(&format!("admin_password_file = \"{}\"\n", secret.display()));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    });
    b.start_in_process().await;
    let lease = issue(&b, "app", "migrate", 0).await.unwrap();
    let c = login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap();
    create_objects(&c, "ns").await;
    b.revoke_as("app", &lease.lease_id)
        .await
        .expect("a non-superuser admin revokes");
    assert!(
        c.simple_query("SELECT 1").await.is_err(),
        "session survived"
    );
    assert!(!b.role_exists(&lease.username).await);
    assert!(login(&b.db, &lease.username, &lease.password)
        .await
        .is_err());
    assert_objects(&b, "ns", &owner).await;

    // A handover drains with this admin too: pg_read_all_stats lets it
    // tell the idle session (ended) from the one in a transaction (left).
    let lease = issue(&b, "app", "migrate", 0).await.unwrap();
    let idle = login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap();
    let tx = login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap();
    tx.batch_execute("BEGIN; SELECT 1").await.unwrap();
    b.client("app")
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.lease_id.clone(),
            handover: true,
        })
        .await
        .expect("a non-superuser admin drains");
    assert!(
        // Watched with `is_closed`: a probing query would make the session
        // busy again, and a drain ends a session only once it has been
        // idle for its settle time (`revocation::drain`).
        eventually(Duration::from_secs(5), || async { idle.is_closed() }).await,
        "the idle session is seen idle and ended"
    );
    tx.batch_execute("COMMIT")
        .await
        .expect("the transaction was left to finish");
    assert!(
        eventually(Duration::from_secs(6), || async {
            !b.role_exists(&lease.username).await
        })
        .await,
        "dropped once drained"
    );
    b.stop().await;
}

async fn renew(b: &TestBroker, id: &str) -> Result<pb::Lease, tonic::Status> {
    b.client("app")
        .await
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: id.to_string(),
            ttl_seconds: 30,
        })
        .await
        .map(|r| r.into_inner())
}

/// Policy is checked on every call that extends a credential's life: an
/// identity removed from `allowed` (SIGHUP) can no longer renew; the lease
/// is still revoked on time.
#[tokio::test]
async fn renew_is_refused_once_the_identity_is_no_longer_allowed() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "1m", "10m", APP)).await;
    b.spawn_binary().await;
    let lease = issue(&b, "app", "ro", 0).await.unwrap();
    renew(&b, &lease.lease_id)
        .await
        .expect("renew while allowed");
    b.edit_config(|t| {
        t.replace(
            &format!("allowed = [\"{APP}\"]"),
            "allowed = [\"spiffe://credbroker.dev/ns/other/*\"]",
        )
    });
    b.signal_binary("HUP");
    let refused = eventually(Duration::from_secs(5), || async {
        matches!(renew(&b, &lease.lease_id).await, Err(s) if s.code() == Code::PermissionDenied)
    })
    .await;
    assert!(
        refused,
        "renew still allowed after the identity was removed"
    );
    let denied = b
        .audit_records()
        .into_iter()
        .any(|r| r.action == "renew" && r.outcome == credbroker::audit::Outcome::Denied);
    assert!(denied, "refused renew not audited");
    b.kill_binary();
}
