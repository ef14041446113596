//! Failover of what the broker stands on, with real servers: the lease
//! store's primary, and a target database's primary, each stopped the way
//! a crash stops it (PostgreSQL's immediate stop) while its synchronous
//! standby (`pg_basebackup -R`) is promoted. The broker is given both
//! hosts (`target_session_attrs=read-write`) and finds the new primary by
//! itself, without a restart. Each test prints what the failover cost:
//! seconds until the broker issued again, and the requests refused
//! meanwhile (every one `Unavailable`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credbroker::pb;
use credbroker_testkit::devenv::DevEnv;
use credbroker_testkit::throwaway::{PostgresOptions, ThrowawayPostgres};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::support::*;

/// A primary and its synchronous streaming standby.
async fn primary_and_standby() -> (ThrowawayPostgres, ThrowawayPostgres) {
    let primary = ThrowawayPostgres::start(PostgresOptions {
        log_statement_all: false,
        ..PostgresOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL primary: {e}"));
    let standby = primary.start_sync_standby().await.unwrap_or_else(|e| {
        panic!(
            "cannot start a synchronous standby (pg_basebackup -R; PostgreSQL's client tools): {e}"
        )
    });
    (primary, standby)
}

/// libpq's multi-host form: the primary first, then the standby.
fn both_hosts(primary: &ThrowawayPostgres, standby: &ThrowawayPostgres, db: &str) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    )
}

/// What one call answered, and when it started and ended.
struct Call {
    started: Instant,
    ended: Instant,
    result: Result<pb::Lease, (Code, String)>,
}

/// `callers` tasks issuing `role` leases as `app`, one call every 50 ms
/// each, until `stop` is set; each returns its calls.
async fn load(
    b: &TestBroker,
    role: &str,
    callers: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<Vec<Call>>> {
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let mut client = b.client("app").await;
        let stop = stop.clone();
        let role = role.to_string();
        tasks.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = client
                    .issue_lease(pb::IssueLeaseRequest {
                        role: role.clone(),
                        ttl_seconds: 0,
                    })
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| (s.code(), s.message().to_string()));
                calls.push(Call {
                    started,
                    ended: Instant::now(),
                    result,
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            calls
        }));
    }
    tasks
}

/// Two callers start issuing on `b`; half a second later the primary is
/// stopped immediately and the standby promoted. Returns the callers and
/// their stop flag, when the stop began, and how long promotion took.
async fn fail_over_under_load(
    b: &TestBroker,
    primary: &mut ThrowawayPostgres,
    standby: &ThrowawayPostgres,
) -> (
    Vec<JoinHandle<Vec<Call>>>,
    Arc<AtomicBool>,
    Instant,
    Duration,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(b, "ro", 2, &stop).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = Instant::now();
    primary.stop_immediately();
    standby.promote().await.unwrap();
    (tasks, stop, stopped, stopped.elapsed())
}

/// What a failover cost the callers: seconds from the primary's stop to
/// the first lease issued by a call begun after it, and the calls refused
/// in between. Panics on any refusal that is not `Unavailable`.
struct Cost {
    first_issue_after: Duration,
    refused: usize,
    issued: Vec<pb::Lease>,
}

async fn cost(tasks: Vec<JoinHandle<Vec<Call>>>, stopped: Instant) -> Cost {
    let mut calls = Vec::new();
    for t in tasks {
        calls.extend(t.await.unwrap());
    }
    let first_ok = calls
        .iter()
        .filter(|c| c.started >= stopped && c.result.is_ok())
        .map(|c| c.ended)
        .min()
        .expect("no lease was issued after the failover");
    let mut refused = 0;
    let mut issued = Vec::new();
    for c in calls {
        match c.result {
            Ok(l) => issued.push(l),
            Err((code, message)) => {
                assert_eq!(
                    code,
                    Code::Unavailable,
                    "a call during the failover was refused otherwise: {message}"
                );
                assert!(
                    c.ended >= stopped,
                    "a call failed before the failover: {message}"
                );
                refused += 1;
            }
        }
    }
    Cost {
        first_issue_after: first_ok - stopped,
        refused,
        issued,
    }
}

/// The first lease the broker issues within 60 s, asking every 100 ms.
async fn issue_again(b: &TestBroker, whose: &str) -> pb::Lease {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(l) = issue(b, "app", "ro", 0).await {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not issue again within 60 s of {whose} failover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Revokes `lease` through the broker, as its holder.
async fn revoke(b: &TestBroker, lease: &pb::Lease) {
    b.client("app")
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("revoking {} after the failover: {e}", lease.lease_id));
}

/// Issue 28: the store's primary dies and its synchronous standby is
/// promoted. A request waiting on the store gets `Unavailable` and leaves
/// nothing; the broker issues again by itself; every lease acknowledged
/// before is in the new primary and revoked through the broker afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failover_to_a_synchronous_standby_loses_no_lease_and_heals_by_itself() {
    let (mut primary, standby) = primary_and_standby().await;
    let store_db = unique("leases");
    primary.create_database(&store_db).await.unwrap();
    let roles = role("ro", "{db}", "1m", "10m", APP)
        + &role("capped", "{db}", "1m", "10m", APP)
        + "max_leases_per_identity = 1000\n\n";
    let mut b = TestBroker::prepare(&roles).await;
    let secret = b.env.dir.join("secrets").join("store-password");
    credbroker::fsutil::write_secret_file(&secret, primary.superuser_password().as_bytes())
        .unwrap();
    let url = both_hosts(&primary, &standby, &store_db);
    b.edit_config(|t| {
        let old = format!(
            "[store]\nurl = \"sqlite://{}\"\n",
            b.env.store_path.display()
        );
        assert!(t.contains(&old), "unexpected config head");
        t.replace(
            &old,
            &format!(
                "[store]\nurl = \"{url}\"\npassword_file = \"{}\"\nclaim_timeout = \"10s\"\n",
                secret.display()
            ),
        )
        // Intents of issues cut short are resolved soon, so the test can
        // see that nothing was left.
        .replace("[reaper]\n", "[reaper]\nintent_grace = \"3s\"\n")
    });
    b.spawn_binary().await;

    let mut before = Vec::new();
    for _ in 0..10 {
        before.push(issue(&b, "app", "ro", 0).await.unwrap());
    }

    // A request in flight at the failover: its intent insert waits on the
    // store for the per-identity cap's lock, which the test holds.
    let holder = primary.connect(&store_db).await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext($1), hashtext('capped'))",
            &[&APP],
        )
        .await
        .unwrap();
    let in_flight = {
        let mut c = b.client("app").await;
        tokio::spawn(async move {
            c.issue_lease(pb::IssueLeaseRequest {
                role: "capped".into(),
                ttl_seconds: 0,
            })
            .await
            .map(|r| r.into_inner())
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            holder
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = $1 \
                     AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                    &[&store_db],
                )
                .await
                .unwrap()
                .is_some()
        })
        .await,
        "the capped issue never waited on the store"
    );

    let (tasks, stop, stopped, promoted) = fail_over_under_load(&b, &mut primary, &standby).await;

    let in_flight = in_flight.await.unwrap();
    let in_flight_code = in_flight.as_ref().map(|_| ()).map_err(|s| s.code());
    assert_eq!(
        in_flight_code,
        Err(Code::Unavailable),
        "the request in flight at the failover: {in_flight:?}"
    );

    // Callers keep going until issuing has worked for a while again.
    let again = issue_again(&b, "the store's").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let cost = cost(tasks, stopped).await;

    // Every lease acknowledged before is on the new primary.
    let store = standby.connect(&store_db).await.unwrap();
    let ids: Vec<String> = before.iter().map(|l| l.lease_id.clone()).collect();
    let known: i64 = one_value(
        &store,
        "SELECT count(*) FROM credbroker_leases WHERE id = ANY($1) AND state = 'active'",
        &[&ids],
    )
    .await;
    assert_eq!(
        known as usize,
        ids.len(),
        "a lease acknowledged before the failover is gone"
    );

    // …and is revoked through the broker, its role gone from the database.
    for l in before.iter().chain(&cost.issued).chain([&again]) {
        revoke(&b, l).await;
        assert!(!b.role_exists(&l.username).await, "{} survived", l.username);
    }
    // Nothing half-made: the cut-short issues leave no role and no live row.
    let clean = eventually(Duration::from_secs(30), || async {
        live_lease_rows(&store).await == 0 && b.broker_roles().await.is_empty()
    })
    .await;
    assert!(
        clean,
        "left after the failover: roles {:?}",
        b.broker_roles().await
    );
    eprintln!(
        "STORE FAILOVER (primary stopped immediately at 0 s, 2 callers issuing every 50 ms):\n\
         \x20 standby promoted after {:.2} s\n\
         \x20 first lease issued again after {:.2} s (no restart: the pool reconnected to the new primary)\n\
         \x20 {} requests refused meanwhile, all Unavailable; the request in flight: Unavailable\n\
         \x20 {} leases issued before the failover: all on the new primary, all revoked through the broker",
        promoted.as_secs_f64(),
        cost.first_issue_after.as_secs_f64(),
        cost.refused,
        ids.len(),
    );
}

/// Issue 28: a target database reached through a multi-host `admin_url`
/// fails over (primary stopped, synchronous standby promoted); the broker
/// keeps issuing on the new primary, and what it issued before is revoked
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_database_behind_a_multi_host_admin_url_keeps_issuing_after_its_failover() {
    let (mut primary, standby) = primary_and_standby().await;
    let db = fresh_database_on(&primary).await;
    let dir = tempfile::tempdir().unwrap();
    let env = DevEnv::create(dir.path()).unwrap();
    let secret = env.write_pg_password("main", &primary).unwrap();
    let section = format!(
        "[databases.main]\nkind = \"postgres\"\nadmin_url = \"{}\"\nadmin_password_file = \"{}\"\n\n",
        both_hosts(&primary, &standby, &db),
        secret.display()
    );
    // The test's own superuser view follows the primary too.
    let mut pg_config = primary.config(&db);
    pg_config
        .host("127.0.0.1")
        .port(standby.port())
        .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    let main = MainDatabase {
        section,
        name: db.clone(),
        pg_config: pg_config.clone(),
    };
    let mut b = TestBroker::prepare_with_main(
        dir,
        env,
        main,
        &role("ro", "main", "1m", "10m", APP),
        "orphan_sweep_interval = \"1s\"\nintent_grace = \"3s\"\n",
        'f',
    )
    .await;
    b.spawn_binary().await;

    // As an application would: with the leased DSN, which names both
    // hosts and target_session_attrs, so it follows the failover too.
    let login = |l: &pb::Lease| {
        let cfg: tokio_postgres::Config = l.dsn.parse().expect("a leased DSN parses");
        async move {
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client.query_one("SELECT item FROM orders", &[]).await
        }
    };
    let mut before = Vec::new();
    for _ in 0..5 {
        let l = issue(&b, "app", "ro", 0).await.unwrap();
        let hosts = format!("127.0.0.1:{},127.0.0.1:{}", primary.port(), standby.port());
        assert!(
            l.dsn.contains(&hosts) && l.dsn.ends_with("?target_session_attrs=read-write"),
            "the leased DSN does not follow the failover: {}",
            l.dsn.replace(&l.password, "<password>")
        );
        login(&l)
            .await
            .expect("a leased credential works on the primary");
        before.push(l);
    }

    let (tasks, stop, stopped, promoted) = fail_over_under_load(&b, &mut primary, &standby).await;

    let after = issue_again(&b, "the target database's").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let cost = cost(tasks, stopped).await;
    login(&after)
        .await
        .expect("a credential issued after the failover works on the new primary");
    // Users made before the failover came over with it (synchronous
    // replication) and still log in; revoked through the broker, they
    // are gone from the new primary.
    for l in &before {
        login(l)
            .await
            .expect("a credential issued before the failover works on the new primary");
    }
    for l in before.iter().chain(&cost.issued).chain([&after]) {
        revoke(&b, l).await;
        assert!(!b.role_exists(&l.username).await, "{} survived", l.username);
        assert!(login(l).await.is_err(), "{} still logs in", l.username);
    }
    let clean = eventually(Duration::from_secs(30), || async {
        b.broker_roles().await.is_empty()
    })
    .await;
    assert!(
        clean,
        "left on the new primary: {:?}",
        b.broker_roles().await
    );
    eprintln!(
        "TARGET DATABASE FAILOVER (primary stopped immediately at 0 s, 2 callers issuing every 50 ms):\n\
         \x20 standby promoted after {:.2} s\n\
         \x20 first lease issued again after {:.2} s (no restart)\n\
         \x20 {} requests refused meanwhile, all Unavailable\n\
         \x20 {} users made before the failover: log in on the new primary, revoked through the broker",
        promoted.as_secs_f64(),
        cost.first_issue_after.as_secs_f64(),
        cost.refused,
        before.len(),
    );
}
