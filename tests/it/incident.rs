//! Incident response against real servers: locks (the incident button) on
//! PostgreSQL and MariaDB, on two replicas sharing a PostgreSQL store, by
//! the real CLI.

use std::time::{Duration, Instant};

use credbroker::audit::{Outcome, Record};
use credbroker::pb;
use mysql_async::prelude::Queryable;
use tonic::Code;

use crate::support::*;

const OTHER: &str = "spiffe://credbroker.dev/ns/demo/other";
const REASON: &str = "INC-4711 certificate leaked";

fn stdout(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "CLI failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Points `b` at a fresh PostgreSQL lease store in the shared cluster, so
/// `b.replica()` shares it.
async fn use_pg_store(b: &TestBroker) {
    let db = unique("leases");
    cluster().create_database(&db).await.unwrap();
    let secret = b.env.dir.join("secrets").join("store-password");
    credbroker::fsutil::write_secret_file(&secret, cluster().superuser_password().as_bytes())
        .unwrap();
    let old = format!(
        "[store]\nurl = \"sqlite://{}\"\n",
        b.env.store_path.display()
    );
    let new = format!(
        "[store]\nurl = \"{}\"\npassword_file = \"{}\"\n",
        cluster().url(&db),
        secret.display()
    );
    b.edit_config(|t| {
        assert!(t.contains(&old), "unexpected config head");
        t.replace(&old, &new)
    });
}

/// Adds database `maria` (a fresh schema on the shared throwaway MariaDB)
/// and role `my` on it; returns the schema.
async fn add_mariadb(b: &TestBroker) -> String {
    b.add_mariadb("inc", "my", "spiffe://credbroker.dev/ns/demo/*")
        .await
}

async fn drop_schema(schema: &str) {
    maria_root()
        .await
        .query_drop(format!("DROP DATABASE `{schema}`"))
        .await
        .unwrap();
}

fn assert_locked(r: Result<pb::Lease, tonic::Status>, what: &str) {
    let e = r
        .err()
        .unwrap_or_else(|| panic!("{what}: a locked call succeeded"));
    assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
    assert!(e.message().contains(REASON), "{what}: {}", e.message());
}

async fn renew(b: &TestBroker, who: &str, id: &str) -> Result<pb::Lease, tonic::Status> {
    b.client(who)
        .await
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: id.into(),
            ttl_seconds: 0,
        })
        .await
        .map(|r| r.into_inner())
}

fn records(b: &TestBroker, action: &str, outcome: Outcome) -> Vec<Record> {
    b.audit_records()
        .into_iter()
        .filter(|r| r.action == action && r.outcome == outcome)
        .collect()
}

/// The incident button, end to end: an identity holding leases on
/// PostgreSQL and MariaDB with open sessions is locked with `--revoke` by
/// the CLI → its sessions end, its logins fail, issue is refused with the
/// reason on this replica and on a second one sharing the PostgreSQL store;
/// other identities go on; unlock restores service; a `--for 3s` lock
/// refuses issue and renew on both replicas, then runs out on its own.
/// Every step is in the audit logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_lock_with_revoke_cuts_sessions_and_every_replica_refuses() {
    let mut a = TestBroker::prepare(&demo_role("ro", "5m", "10m")).await;
    use_pg_store(&a).await;
    let schema = add_mariadb(&a).await;
    let mut b = a.replica();
    a.start_in_process().await;
    b.start_in_process().await;
    wait_port(b.port).await;

    let pg = issue(&a, "app", "ro", 0).await.unwrap();
    let my = issue(&b, "app", "my", 0).await.unwrap();
    let theirs = issue(&a, "other", "ro", 0).await.unwrap();
    let open_pg = login(&a.db, &pg.username, &pg.password)
        .await
        .expect("leased PostgreSQL login");
    open_pg.simple_query("SELECT 1").await.unwrap();
    let mut open_my = mysql_async::Conn::new(maria_opts(
        Some((&my.username, &my.password)),
        Some(&schema),
    ))
    .await
    .expect("leased MariaDB login");
    open_my.query_drop("SELECT 1").await.unwrap();

    // Without --yes and without a terminal, --revoke refuses to act.
    let unconfirmed = cli(
        &a,
        "admin",
        &[
            "admin",
            "lock",
            "--identity",
            APP,
            "--revoke",
            "--reason",
            REASON,
        ],
    )
    .await;
    assert!(!unconfirmed.status.success());
    assert!(
        issue(&a, "app", "ro", 0).await.is_ok(),
        "nothing locked unconfirmed"
    );

    let t0 = Instant::now();
    let out = stdout(
        &cli(
            &a,
            "admin",
            &[
                "admin",
                "lock",
                "--identity",
                APP,
                "--revoke",
                "--yes",
                "--reason",
                REASON,
            ],
        )
        .await,
    );
    let took = t0.elapsed();
    // The unconfirmed attempt above left one more lease: three in all.
    assert!(out.contains("revoked 3 lease(s)"), "{out}");
    let lock_id = out
        .split_whitespace()
        .find(|w| w.starts_with("k_"))
        .unwrap_or_else(|| panic!("no lock id in {out}"))
        .to_string();
    let pg_err = open_pg
        .simple_query("SELECT 1")
        .await
        .expect_err("the open PostgreSQL session must be cut");
    let my_err = open_my
        .query_drop("SELECT 1")
        .await
        .expect_err("the open MariaDB session must be cut");
    println!("lock --revoke (CLI, 3 leases, PostgreSQL + MariaDB): {took:?}; sessions cut ({pg_err}; {my_err})");
    assert!(login(&a.db, &pg.username, &pg.password).await.is_err());
    assert!(
        mysql_async::Conn::new(maria_opts(
            Some((&my.username, &my.password)),
            Some(&schema)
        ))
        .await
        .is_err(),
        "the revoked MariaDB login is refused"
    );
    assert!(!a.role_exists(&pg.username).await);

    // Refused with the reason, on both replicas, on both databases.
    assert_locked(issue(&a, "app", "ro", 0).await, "issue on A");
    assert_locked(issue(&b, "app", "ro", 0).await, "issue on B");
    assert_locked(issue(&b, "app", "my", 0).await, "issue on B (MariaDB)");
    // Another identity is untouched and goes on.
    assert!(login(&a.db, &theirs.username, &theirs.password)
        .await
        .is_ok());
    issue(&b, "other", "ro", 0).await.unwrap();

    let listed = stdout(&cli(&b, "admin", &["admin", "locks"]).await);
    assert!(
        listed.contains(&lock_id) && listed.contains(REASON),
        "{listed}"
    );
    let leases = stdout(&cli(&a, "admin", &["admin", "leases", "--identity", APP]).await);
    assert!(leases.contains("0 lease(s)"), "{leases}");

    // Unlock (on the other replica) restores service everywhere.
    let unlocked = stdout(&cli(&b, "admin", &["admin", "unlock", &lock_id]).await);
    assert!(unlocked.contains(&lock_id), "{unlocked}");
    let held = issue(&a, "app", "ro", 0)
        .await
        .expect("unlocked: issue on A");
    issue(&b, "app", "my", 0)
        .await
        .expect("unlocked: issue on B");

    // A lock for 3 s without --revoke: the held lease keeps working but
    // cannot be renewed; both end when the lock runs out on its own.
    let out = stdout(
        &cli(
            &b,
            "admin",
            &[
                "admin",
                "lock",
                "--identity",
                "spiffe://credbroker.dev/ns/demo/a*",
                "--for",
                "3s",
                "--reason",
                REASON,
            ],
        )
        .await,
    );
    let locked_at = Instant::now();
    assert!(out.contains("until 20"), "{out}");
    assert_locked(issue(&a, "app", "ro", 0).await, "issue on A (3 s lock)");
    assert_locked(
        renew(&a, "app", &held.lease_id).await,
        "renew on A (3 s lock)",
    );
    assert_locked(
        renew(&b, "app", &held.lease_id).await,
        "renew on B (3 s lock)",
    );
    assert!(login(&a.db, &held.username, &held.password).await.is_ok());
    let refused_for = loop {
        if issue(&b, "app", "ro", 0).await.is_ok() {
            break locked_at.elapsed();
        }
        assert!(
            locked_at.elapsed() < Duration::from_secs(8),
            "the 3 s lock never ran out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        refused_for >= Duration::from_millis(2500),
        "ran out after {refused_for:?}"
    );
    renew(&a, "app", &held.lease_id)
        .await
        .expect("renew after expiry of the lock");
    println!("a --for 3s lock refused until {refused_for:?}");

    // Every step in the audit logs.
    let lock = records(&a, "lock", Outcome::Ok);
    assert_eq!(lock.len(), 1, "{lock:?}");
    assert!(lock[0].detail.as_deref().unwrap().contains(REASON));
    assert_eq!(lock[0].identity, credbroker_testkit::devenv::ADMIN_IDENTITY);
    let revoked: Vec<String> = records(&a, "lock_revoke", Outcome::Ok)
        .into_iter()
        .filter_map(|r| r.lease_id)
        .collect();
    assert!(
        revoked.contains(&pg.lease_id) && revoked.contains(&my.lease_id),
        "{revoked:?}"
    );
    for (broker, name) in [(&a, "A"), (&b, "B")] {
        let denied: Vec<Record> = broker
            .audit_records()
            .into_iter()
            .filter(|r| r.identity == APP && r.outcome == Outcome::Denied)
            .collect();
        assert!(
            denied.iter().any(|r| r.action == "issue")
                && denied
                    .iter()
                    .all(|r| r.detail.as_deref().unwrap_or("").contains(REASON)),
            "{name}: {denied:?}"
        );
    }
    assert!(records(&b, "renew", Outcome::Denied).len() == 1);
    assert_eq!(records(&b, "unlock", Outcome::Ok).len(), 1);
    assert_eq!(records(&b, "lock", Outcome::Ok).len(), 1);

    a.stop().await;
    b.stop().await;
    drop_schema(&schema).await;
}

/// A lock by role and one by database refuse only what they name, survive a
/// restart of the broker (SQLite store), and a non-admin cannot set one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_locks_by_role_and_by_database_survive_a_restart() {
    let roles = demo_role("ro", "5m", "10m") + &demo_role("rw", "5m", "10m");
    let mut b = TestBroker::prepare(&roles).await;
    let schema = add_mariadb(&b).await;
    b.start_in_process().await;

    let ro = issue(&b, "app", "ro", 0).await.unwrap();
    let open = login(&b.db, &ro.username, &ro.password).await.unwrap();
    let mut admin = b.admin("admin").await;
    let by_role = admin
        .lock(pb::LockRequest {
            target: Some(pb::lock_request::Target::Role("ro".into())),
            duration_seconds: 0,
            reason: REASON.into(),
            revoke: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_role.revoked, 1);
    assert!(open.simple_query("SELECT 1").await.is_err(), "session cut");
    for who in ["app", "other"] {
        assert_locked(issue(&b, who, "ro", 0).await, "role lock");
        issue(&b, who, "rw", 0).await.expect("another role goes on");
        issue(&b, who, "my", 0)
            .await
            .expect("another database goes on");
    }
    let by_db = admin
        .lock(pb::LockRequest {
            target: Some(pb::lock_request::Target::Database("maria".into())),
            duration_seconds: 3600,
            reason: REASON.into(),
            revoke: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_db.revoked, 2, "both identities' MariaDB leases");
    assert_locked(issue(&b, "other", "my", 0).await, "database lock");
    issue(&b, "other", "rw", 0).await.unwrap();

    // Non-admins cannot lock, list or unlock.
    let mut app = b.admin("app").await;
    let e = app
        .lock(pb::LockRequest {
            target: Some(pb::lock_request::Target::Identity(OTHER.into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        app.list_locks(pb::ListLocksRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let lock_id = by_role.lock.unwrap().lock_id;
    assert_eq!(
        app.unlock(pb::UnlockRequest {
            lock_id: lock_id.clone()
        })
        .await
        .unwrap_err()
        .code(),
        Code::PermissionDenied
    );

    // A restart keeps both locks.
    b.stop().await;
    b.start_in_process().await;
    wait_port(b.port).await;
    assert_locked(issue(&b, "app", "ro", 0).await, "role lock after restart");
    assert_locked(
        issue(&b, "app", "my", 0).await,
        "database lock after restart",
    );
    let json = stdout(&cli(&b, "admin", &["admin", "locks", "--format", "json"]).await);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let kinds: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["role", "database"], "{json}");

    let mut admin = b.admin("admin").await;
    admin.unlock(pb::UnlockRequest { lock_id }).await.unwrap();
    issue(&b, "app", "ro", 0).await.expect("unlocked");
    assert_locked(issue(&b, "app", "my", 0).await, "the other lock holds");
    b.stop().await;
    drop_schema(&schema).await;
}

async fn next_event(
    s: &mut tonic::Streaming<pb::LeaseEvent>,
    within: Duration,
) -> Option<pb::LeaseEvent> {
    tokio::time::timeout(within, s.message())
        .await
        .expect("no lease event in time")
        .expect("the stream failed")
}

async fn watch(
    b: &TestBroker,
    who: &str,
    req: pb::WatchLeasesRequest,
) -> Result<tonic::Streaming<pb::LeaseEvent>, tonic::Status> {
    b.client(who)
        .await
        .watch_leases(req)
        .await
        .map(|r| r.into_inner())
}

/// Watches every lease, as `who`.
async fn watch_all(
    b: &TestBroker,
    who: &str,
) -> Result<tonic::Streaming<pb::LeaseEvent>, tonic::Status> {
    let all = pb::WatchLeasesRequest {
        all: true,
        ..Default::default()
    };
    watch(b, who, all).await
}

/// WatchLeases: a caller sees renewals and revocations of its own leases
/// (who and why) within a second and nobody else's; an admin watches a
/// selector; a non-admin may not; shutdown ends the streams cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_watch_streams_own_lease_events_and_ends_on_shutdown() {
    let mut b = TestBroker::start(&demo_role("ro", "5m", "10m")).await;
    let mut mine = watch(&b, "app", Default::default()).await.unwrap();
    let mut all = watch(
        &b,
        "admin",
        pb::WatchLeasesRequest {
            role: "ro".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let refused = watch_all(&b, "app").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    let theirs = issue(&b, "other", "ro", 0).await.unwrap();
    renew(&b, "other", &theirs.lease_id).await.unwrap();
    let l = issue(&b, "app", "ro", 0).await.unwrap();
    renew(&b, "app", &l.lease_id).await.unwrap();
    let e = next_event(&mut mine, Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        (e.kind, e.lease_id.as_str()),
        (pb::LeaseEventKind::Renewed as i32, l.lease_id.as_str()),
        "only our own lease: {e:?}"
    );
    assert!(e.expires_at.is_some());
    let t0 = Instant::now();
    admin_revoke_by(
        &b,
        pb::revoke_leases_request::Selector::LeaseId(l.lease_id.clone()),
        false,
    )
    .await;
    let e = next_event(&mut mine, Duration::from_secs(1)).await.unwrap();
    println!("admin revoke → event at the watcher: {:?}", t0.elapsed());
    assert_eq!(e.kind, pb::LeaseEventKind::Revoked as i32);
    assert_eq!(e.lease_id, l.lease_id);
    assert_eq!(e.actor, credbroker_testkit::devenv::ADMIN_IDENTITY);
    assert_eq!(e.reason, "admin");
    // The admin's selector sees both identities' events.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = next_event(&mut all, Duration::from_secs(1)).await.unwrap();
        seen.push((e.identity, e.kind));
    }
    assert!(seen.iter().any(|(i, _)| i == OTHER), "{seen:?}");
    assert!(seen.iter().any(|(i, _)| i == APP), "{seen:?}");

    // A lock without --revoke: the holder hears at once that its lease can
    // no longer be renewed, with the lock and its reason.
    let held = issue(&b, "app", "ro", 0).await.unwrap();
    let lock = b
        .admin("admin")
        .await
        .lock(pb::LockRequest {
            target: Some(pb::lock_request::Target::Role("ro".into())),
            duration_seconds: 60,
            reason: REASON.into(),
            revoke: false,
        })
        .await
        .unwrap()
        .into_inner();
    let e = next_event(&mut mine, Duration::from_secs(1)).await.unwrap();
    assert_eq!(e.kind, pb::LeaseEventKind::Locked as i32, "{e:?}");
    assert_eq!(e.lease_id, held.lease_id);
    assert_eq!(e.reason, REASON);
    assert_eq!(e.lock_id, lock.lock.unwrap().lock_id);

    let stopping = Instant::now();
    b.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "watch streams held up shutdown for {:?}",
        stopping.elapsed()
    );
    for s in [&mut mine, &mut all] {
        // Events still buffered are delivered first, then the clean end.
        loop {
            let end = tokio::time::timeout(Duration::from_secs(5), s.message())
                .await
                .expect("stream still open after shutdown");
            match end {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) => panic!("the stream failed instead of ending: {e:?}"),
            }
        }
    }
}

struct SidecarProc {
    child: std::process::Child,
    out: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl SidecarProc {
    fn spawn(b: &TestBroker, dir: &std::path::Path, role: &str) -> SidecarProc {
        let out = dir.join("db.json");
        let log = dir.join("sidecar.log");
        let child = spawn_sidecar(
            b,
            &[
                "--role",
                role,
                "--format",
                "json",
                "--give-up-after",
                "120s",
            ],
            &out,
            &log,
        );
        SidecarProc { child, out, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (lease id, username, password) in the file, if it is there.
    fn current(&self) -> Option<(String, String, String)> {
        let text = std::fs::read_to_string(&self.out).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some((
            v["lease_id"].as_str()?.to_string(),
            v["username"].as_str()?.to_string(),
            v["password"].as_str()?.to_string(),
        ))
    }

    async fn wait_log(&self, needle: &str, count: usize, within: Duration) {
        let ok = eventually(within, || async {
            self.log_text().matches(needle).count() >= count
        })
        .await;
        assert!(
            ok,
            "no {needle:?} (x{count}) in the sidecar log:\n{}",
            self.log_text()
        );
    }

    /// Polls the file every 5 ms until it names a lease other than `old`.
    async fn wait_replaced(&self, old: &str, within: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            if let Some((id, ..)) = self.current() {
                if id != old {
                    return t0.elapsed();
                }
            }
            assert!(
                t0.elapsed() < within,
                "no fresh file within {within:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for SidecarProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sidecar subscribes to its lease events: an admin revocation is
/// replaced by a fresh, working credential in the file at once (measured
/// from the admin call to the new file; goal under 1 s), again after the
/// broker restarted (the stream was lost and reopened; the schedule kept
/// the file meanwhile). Under a lock the file goes and the sidecar keeps
/// retrying; after unlock it writes a credential again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_watch_sidecar_replaces_a_revoked_lease_within_a_second() {
    // A long TTL: nothing in the schedule would replace the lease for
    // minutes, so only the event can explain a fast replacement.
    let mut b = TestBroker::start(&role("wr", "{db}", "5m", "10m", APP)).await;
    let dir = tempfile::tempdir().unwrap();
    let sc = SidecarProc::spawn(&b, dir.path(), "wr");
    sc.wait_log("watching lease events", 1, Duration::from_secs(20))
        .await;
    let (first, ..) = sc.current().expect("the first credential");

    let t0 = Instant::now();
    admin_revoke(&b, &first).await;
    let call = t0.elapsed();
    let fresh = sc.wait_replaced(&first, Duration::from_secs(5)).await + call;
    let (second, user, password) = sc.current().unwrap();
    println!("admin revoke → fresh file: {fresh:?} (the admin call itself {call:?})");
    assert!(fresh < Duration::from_secs(1), "took {fresh:?}");
    login(&b.db, &user, &password)
        .await
        .expect("the fresh credential works");
    assert!(sc
        .log_text()
        .contains("the current lease was revoked; replacing it now"));

    // The broker restarts: the stream is lost, the file stays, the stream
    // comes back, and a revocation is again replaced at once.
    b.stop().await;
    sc.wait_log("lease event stream lost", 1, Duration::from_secs(5))
        .await;
    assert_eq!(
        sc.current().unwrap().0,
        second,
        "the file stays while the broker is away"
    );
    b.start_in_process().await;
    sc.wait_log("watching lease events", 2, Duration::from_secs(30))
        .await;
    let t0 = Instant::now();
    admin_revoke(&b, &second).await;
    let again = sc.wait_replaced(&second, Duration::from_secs(5)).await + t0.elapsed();
    println!("after a broker restart: admin revoke → fresh file: {again:?}");
    assert!(again < Duration::from_secs(1), "took {again:?}");

    // Locked: the revoked credential's file goes, the sidecar keeps trying.
    let mut admin = b.admin("admin").await;
    let lock = admin
        .lock(pb::LockRequest {
            target: Some(pb::lock_request::Target::Identity(APP.into())),
            duration_seconds: 0,
            reason: REASON.into(),
            revoke: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lock.revoked, 1);
    assert!(
        eventually(Duration::from_secs(3), || async { !sc.out.exists() }).await,
        "the file of a revoked, locked credential must go:\n{}",
        sc.log_text()
    );
    admin
        .unlock(pb::UnlockRequest {
            lock_id: lock.lock.unwrap().lock_id,
        })
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async { sc.current().is_some() }).await,
        "no credential after unlock:\n{}",
        sc.log_text()
    );
    let (_, user, password) = sc.current().unwrap();
    login(&b.db, &user, &password)
        .await
        .expect("works after unlock");
    b.stop().await;
}

/// `allowed_networks` is checked against the caller's TCP peer address
/// (loopback here): a role whose networks include 127.0.0.0/8 issues and
/// renews, one whose networks do not is refused, with the address in the
/// refusal and in the audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_allowed_networks_refuse_callers_outside_them() {
    let inside = role("lo", "{db}", "5m", "10m", APP).replace(
        "grants = ",
        "allowed_networks = [\"10.0.0.0/8\", \"127.0.0.0/8\"]\ngrants = ",
    );
    let outside = role("far", "{db}", "5m", "10m", APP).replace(
        "grants = ",
        "allowed_networks = [\"10.0.0.0/8\", \"192.168.4.0/24\", \"::1/128\"]\ngrants = ",
    );
    let mut b = TestBroker::start(&(inside + &outside)).await;
    let l = issue(&b, "app", "lo", 0)
        .await
        .expect("inside the networks");
    renew(&b, "app", &l.lease_id).await.expect("renew inside");
    login(&b.db, &l.username, &l.password).await.unwrap();
    let e = issue(&b, "app", "far", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("127.0.0.1"), "{}", e.message());
    let denied = records(&b, "issue", Outcome::Denied);
    assert_eq!(denied.len(), 1);
    assert!(
        denied[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("caller address 127.0.0.1"),
        "{denied:?}"
    );
    assert_eq!(
        b.broker_role_count().await,
        1,
        "no user made for the refusal"
    );
    b.stop().await;
}

/// MariaDB `host = "caller"`: the leased account is `'user'@'127.0.0.1'`
/// (the leasing caller's address); it logs in from there and is refused
/// from anywhere else (here: the server's Unix socket, i.e. `localhost`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_mariadb_caller_host_pins_the_account_to_the_leasing_address() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "5m", "10m", APP)).await;
    let schema = add_mariadb(&b).await;
    b.edit_config(|t| t.replace("[roles.my]\n", "[roles.my]\nhost = \"caller\"\n"));
    b.start_in_process().await;
    let l = issue(&b, "app", "my", 0).await.unwrap();
    let mut root = maria_root().await;
    let hosts: Vec<String> = root
        .exec("SELECT Host FROM mysql.user WHERE User = ?", (&l.username,))
        .await
        .unwrap();
    assert_eq!(hosts, ["127.0.0.1"]);
    let mut from_caller =
        mysql_async::Conn::new(maria_opts(Some((&l.username, &l.password)), Some(&schema)))
            .await
            .expect("logs in from the leasing address");
    from_caller
        .query_drop("SELECT * FROM orders")
        .await
        .unwrap();
    let elsewhere = mysql_async::OptsBuilder::default()
        .socket(Some(mariadb().socket_path().to_string_lossy()))
        .user(Some(l.username.clone()))
        .pass(Some(l.password.clone()))
        .db_name(Some(schema.clone()));
    let refused = mysql_async::Conn::new(elsewhere)
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(refused.to_string().contains("1045"), "{refused}");
    // Revocation finds the pinned account.
    admin_revoke_by(
        &b,
        pb::revoke_leases_request::Selector::LeaseId(l.lease_id.clone()),
        false,
    )
    .await;
    assert!(
        from_caller.query_drop("SELECT 1").await.is_err(),
        "session cut"
    );
    b.stop().await;
    drop_schema(&schema).await;
}

/// `admin_networks`: an admin calling from outside them is refused on
/// every Admin method and on watching others' leases, audited with the
/// address; service calls are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_admin_networks_refuse_admins_outside_them() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "5m", "10m", APP)).await;
    b.edit_config(|t| format!("admin_networks = [\"10.0.0.0/8\"]\n{t}"));
    b.start_in_process().await;
    issue(&b, "app", "ro", 0)
        .await
        .expect("services are not pinned");
    let mut admin = b.admin("admin").await;
    let e = admin
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("127.0.0.1"), "{}", e.message());
    let e = admin
        .lock(pb::LockRequest {
            target: Some(pb::lock_request::Target::Role("ro".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = watch_all(&b, "admin").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let denied = b
        .audit_records()
        .into_iter()
        .filter(|r| {
            r.outcome == Outcome::Denied && r.identity == credbroker_testkit::devenv::ADMIN_IDENTITY
        })
        .count();
    assert_eq!(denied, 3);
    issue(&b, "app", "ro", 0).await.expect("nothing was locked");
    b.stop().await;
}
