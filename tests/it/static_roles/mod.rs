//! Static roles against real servers: alternating users through rotations
//! with a reader logging in every 100 ms through the sidecar's file, a
//! broker SIGKILLed mid-rotation, a broker away for longer than two
//! periods, policy, single-user mode, two replicas on one PostgreSQL
//! store; the same main cases on MariaDB are in `mariadb.rs`.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use credbroker::audit::Outcome;
use credbroker::pb;

use crate::support::*;

mod mariadb;

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");
const KEY_HEX: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

/// Users `{base}_a`, `{base}_b` (or one) made by the "DBA" on the test's
/// PostgreSQL database, and a broker config with `[static_roles.st]`.
pub(crate) async fn pg_static(
    users: usize,
    period: &str,
    extra: &str,
) -> (TestBroker, Vec<String>) {
    let b = TestBroker::prepare("").await;
    let base = unique("st");
    let names: Vec<String> = ["a", "b"][..users]
        .iter()
        .map(|s| format!("{base}_{s}"))
        .collect();
    let su = b.superuser().await;
    for u in &names {
        su.batch_execute(&format!(
            "CREATE ROLE \"{u}\" NOLOGIN; GRANT SELECT ON orders TO \"{u}\";"
        ))
        .await
        .unwrap();
    }
    configure(&b, "main", &names, period, extra);
    (b, names)
}

/// `pg_static`, started in process.
async fn pg_started(users: usize, period: &str, extra: &str) -> (TestBroker, Vec<String>) {
    let (mut b, names) = pg_static(users, period, extra).await;
    b.start_in_process().await;
    (b, names)
}

/// Adds the sealing key and `[static_roles.st]` to `b`'s config.
fn configure(b: &TestBroker, database: &str, users: &[String], period: &str, extra: &str) {
    let key = b.env.dir.join("static.key");
    credbroker::fsutil::write_secret_file(&key, KEY_HEX.as_bytes()).unwrap();
    let list = users
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    b.edit_config(|t| {
        format!("sealing_key_file = \"{}\"\n{t}", key.display())
            + &format!(
                "[static_roles.st]\ndatabase = \"{database}\"\nallowed = [\"{APP}\"]\n\
                 rotation_period = \"{period}\"\nusers = [{list}]\n{extra}\n"
            )
    });
}

async fn read(b: &TestBroker, who: &str) -> Result<pb::StaticCredential, tonic::Status> {
    static_read(b, who, "st").await
}

/// The first credential `app` reads, and the next generation's (within
/// six seconds: periods here are two).
async fn two_generations(b: &TestBroker) -> (pb::StaticCredential, pb::StaticCredential) {
    let first = read(b, "app").await.unwrap();
    let second = read_after(b, first.generation, Duration::from_secs(6)).await;
    (first, second)
}

/// Reads until the generation passes `after` (a rotation happened).
async fn read_after(b: &TestBroker, after: u64, within: Duration) -> pb::StaticCredential {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(c) = read(b, "app").await {
            if c.generation > after {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no rotation past generation {after}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Sidecar {
    child: Child,
    out: PathBuf,
    log: PathBuf,
}

impl Sidecar {
    fn spawn(b: &TestBroker, dir: &Path) -> Sidecar {
        let out = dir.join("db.json");
        let log = dir.join("sidecar.log");
        let child = spawn_sidecar(b, &["--static-role", "st", "--format", "json"], &out, &log);
        Sidecar { child, out, log }
    }

    /// `spawn`, once the file is there.
    async fn started(b: &TestBroker, dir: &Path) -> Arc<Sidecar> {
        let sidecar = Arc::new(Sidecar::spawn(b, dir));
        assert!(
            eventually(Duration::from_secs(10), || async {
                sidecar.credential().is_some()
            })
            .await,
            "no file: {}",
            std::fs::read_to_string(&sidecar.log).unwrap_or_default()
        );
        sidecar
    }

    /// (username, password) from the file, once it exists.
    fn credential(&self) -> Option<(String, String)> {
        let text = std::fs::read_to_string(&self.out).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some((
            v["username"].as_str()?.to_string(),
            v["password"].as_str()?.to_string(),
        ))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One reader's observations: each attempt's time, user and outcome.
#[derive(Default)]
struct Observed {
    logins: u32,
    failures: Vec<String>,
    /// (first seen, user) at every change of credential.
    switches: Vec<(DateTime<Utc>, String)>,
    passwords: Vec<String>,
}

/// Connects as the file's credential every 100 ms until `stop`.
fn reader<F, Fut>(
    sidecar: Arc<Sidecar>,
    login: F,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<Mutex<Observed>>, tokio::task::JoinHandle<()>)
where
    F: Fn(String, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let seen = Arc::new(Mutex::new(Observed::default()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some((user, password)) = sidecar.credential() {
                let result = login(user.clone(), password.clone()).await;
                let mut o = s.lock().unwrap();
                o.logins += 1;
                if let Err(e) = result {
                    o.failures
                        .push(format!("{} {user}: {e}", Utc::now().format("%T%.3f")));
                }
                if o.passwords.last() != Some(&password) {
                    o.switches.push((Utc::now(), user));
                    o.passwords.push(password);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (seen, task)
}

/// Runs `reader` with `login` until it has seen `switches` credentials or
/// `within` passed; whether it saw them, and what it saw (its timeline
/// printed under `label`).
async fn watch<F, Fut>(
    sidecar: &Arc<Sidecar>,
    login: F,
    switches: usize,
    within: Duration,
    label: &str,
) -> (bool, Observed)
where
    F: Fn(String, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, task) = reader(sidecar.clone(), login, stop.clone());
    let start = Instant::now();
    let rotated = eventually(within, || async {
        seen.lock().unwrap().switches.len() >= switches
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    task.await.unwrap();
    let o = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "{label} timeline ({} logins in {:?}):",
        o.logins,
        start.elapsed()
    );
    for (t, u) in &o.switches {
        eprintln!("  {} now {u}", t.format("%T%.3f"));
    }
    (rotated, o)
}

fn static_actions(records: &[credbroker::audit::Record], action: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.action == action && r.outcome == Outcome::Ok)
        .map(|r| r.detail.clone().unwrap_or_default())
        .collect()
}

/// The main case: a reader connecting every 100 ms through the
/// sidecar's file across five rotations sees no refused login, the user
/// alternates, and after the overlap the previous password is refused and
/// its open session ended.
#[tokio::test]
async fn static_alternating_users_through_five_rotations_via_the_sidecar() {
    let (mut b, users) = pg_started(2, "2s", "").await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::started(&b, dir.path()).await;
    let (first_user, first_password) = sidecar.credential().unwrap();
    let held = login(&b.db, &first_user, &first_password).await.unwrap();
    let db = b.db.clone();
    let pg_login = move |u: String, p: String| {
        let db = db.clone();
        async move { login(&db, &u, &p).await.map(|_| ()) }
    };
    let (rotated, o) = watch(&sidecar, pg_login, 6, Duration::from_secs(20), "static").await;
    assert!(rotated, "fewer than 5 rotations: {:?}", o.switches);
    assert!(o.failures.is_empty(), "refused logins: {:?}", o.failures);
    assert!(o.logins >= 50, "{} logins", o.logins);
    for (i, (_, u)) in o.switches.iter().enumerate() {
        assert_eq!(u, &users[i % 2], "users alternate: {:?}", o.switches);
    }
    // Long past its overlap: the first password is refused, and the
    // session opened with it was ended.
    let refused = login(&b.db, &first_user, &first_password).await;
    assert!(refused.is_err(), "the first password still logs in");
    assert!(
        held.simple_query("SELECT 1").await.is_err(),
        "the first user's session outlived its overlap"
    );
    let records = b.audit_records();
    let rotations = static_actions(&records, "static_rotate");
    assert!(rotations.len() >= 6, "{rotations:?}");
    assert!(!static_actions(&records, "static_retire").is_empty());
    // No password in the audit log or the sidecar's log.
    let audit = std::fs::read_to_string(&b.env.audit_path).unwrap();
    let log = std::fs::read_to_string(&sidecar.log).unwrap();
    for p in &o.passwords {
        assert!(!audit.contains(p.as_str()) && !log.contains(p.as_str()));
    }
    drop(o);
    b.stop().await;
}

/// SIGKILL of the real broker at random points of its rotations: after
/// every restart the served credential logs in, and at the end store,
/// database and audit agree on the current user and generation.
async fn sigkill_rounds(rounds: usize) {
    let (mut b, users) = pg_static(2, "2s", "overlap = \"2s\"").await;
    let mut served: Vec<pb::StaticCredential> = Vec::new();
    for round in 0..rounds {
        b.spawn_binary().await;
        let c = read(&b, "app")
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", b.broker_log()));
        login(&b.db, &c.username, &c.password)
            .await
            .unwrap_or_else(|e| panic!("round {round}: served {} refused: {e}", c.username));
        served.push(c);
        // Odd rounds: a kill anywhere in 0..2.4 s (periods are 2 s).
        // Even rounds: aimed into the rotation itself, which starts at
        // next_rotation_at and takes a few milliseconds (claim, intent
        // fsync, ALTER ROLE, audit, commit fsync).
        let next = ts(&served.last().unwrap().next_rotation_at);
        let wait = if round % 2 == 1 {
            Duration::from_millis(rand::random::<u64>() % 2400)
        } else {
            let aim = next + chrono::Duration::milliseconds((rand::random::<u64>() % 40) as i64);
            (aim - Utc::now()).to_std().unwrap_or_default()
        };
        tokio::time::sleep(wait).await;
        b.kill_binary();
    }
    b.spawn_binary().await;
    let last = read(&b, "app").await.unwrap();
    login(&b.db, &last.username, &last.password).await.unwrap();
    b.kill_binary();

    // Store: the current user's sealed password is the one served, and the
    // database has it (it logs in) with the stored expiry.
    let store = b.open_store().await;
    let st = store.static_get("st").await.unwrap().unwrap();
    assert!(st.pending.is_none(), "{st:?}");
    let cur = st.current.clone().unwrap();
    assert_eq!(
        (cur.user.as_str(), st.generation),
        (last.username.as_str(), last.generation)
    );
    let sealer =
        credbroker::static_roles::Sealer::from_bytes(&hex::decode(KEY_HEX).unwrap()).unwrap();
    let pw = sealer
        .open("st", &cur.user, st.generation, &cur.sealed)
        .unwrap();
    assert_eq!(pw.expose(), last.password);
    let su = b.superuser().await;
    let until: Option<DateTime<Utc>> = one_value(
        &su,
        "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1",
        &[&cur.user],
    )
    .await;
    assert_eq!(
        until,
        Some(cur.valid_until),
        "database and store disagree on the expiry"
    );
    assert!(users.contains(&cur.user));
    // Audit: every generation up to the current one has its rotation.
    let records = b.audit_records();
    let rotations = static_actions(&records, "static_rotate");
    for g in 1..=st.generation {
        let mark = format!("generation={g} ");
        assert!(
            rotations.iter().any(|d| d.contains(&mark)),
            "generation {g} not audited: {rotations:?}"
        );
    }
    // No password in the store file, the broker's log or the audit log.
    let mut files = vec![
        b.env.store_path.clone(),
        b.env.audit_path.clone(),
        b.env.dir.join("broker.log"),
    ];
    for suffix in ["-wal", "-shm"] {
        let mut p = b.env.store_path.clone().into_os_string();
        p.push(suffix);
        files.push(p.into());
    }
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for c in &served {
            assert!(
                !text.contains(c.password.as_str()),
                "a password in {}",
                f.display()
            );
        }
    }
    let resumed = rotations.iter().filter(|d| d.contains("resumed")).count();
    eprintln!(
        "static sigkill: {rounds} kills, generation {} at the end, {} rotation records \
         ({resumed} of them rotations resumed after a kill)",
        st.generation,
        rotations.len()
    );
}

/// The 20 kills (about 30 s).
#[tokio::test]
async fn static_sigkill_during_rotations_keeps_store_database_and_audit_in_agreement() {
    sigkill_rounds(20).await;
}

/// A broker away for longer than two periods leaves no static user able
/// to log in: the database's own VALID UNTIL ran out.
#[tokio::test]
async fn static_broker_stopped_for_two_periods_leaves_neither_user_able_to_log_in() {
    let (mut b, users) = pg_started(2, "2s", "overlap = \"1s\"").await;
    let (first, second) = two_generations(&b).await;
    assert_ne!(first.username, second.username);
    login(&b.db, &second.username, &second.password)
        .await
        .unwrap();
    b.stop().await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    for c in [&first, &second] {
        let e = login(&b.db, &c.username, &c.password).await.err();
        assert!(
            e.is_some(),
            "{} still logs in with the broker gone",
            c.username
        );
    }
    assert!(users.contains(&second.username));
}

#[tokio::test]
async fn static_identity_not_in_allowed_is_permission_denied_and_audited() {
    let (mut b, _) = pg_started(2, "1h", "").await;
    let e = read(&b, "other").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let e = static_read(&b, "app", "nope").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let denied = b
        .audit_records()
        .into_iter()
        .filter(|r| r.action == "static_read" && r.outcome == Outcome::Denied)
        .count();
    assert_eq!(denied, 1);
    b.stop().await;
}

/// Vault's mode: one user, its password replaced at each rotation (the old
/// one refused at once).
#[tokio::test]
async fn static_single_user_mode_replaces_the_password() {
    let (mut b, users) = pg_started(1, "2s", "").await;
    let (first, second) = two_generations(&b).await;
    assert_eq!(
        (first.username.as_str(), second.username.as_str()),
        (users[0].as_str(), users[0].as_str())
    );
    login(&b.db, &second.username, &second.password)
        .await
        .unwrap();
    assert!(login(&b.db, &first.username, &first.password)
        .await
        .is_err());
    b.stop().await;
}

/// `admin static-roles`, `admin rotate --static-role`, `admin revoke
/// --static-role` through the real CLI; revoke ends every session.
#[tokio::test]
async fn static_admin_commands_list_rotate_and_revoke() {
    let (mut b, users) = pg_started(2, "1h", "").await;
    let first = read(&b, "app").await.unwrap();
    let held = login(&b.db, &first.username, &first.password)
        .await
        .unwrap();
    let out = cli(&b, "admin", &["admin", "static-roles"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&users[0]), "{text}");
    let out = cli(&b, "admin", &["admin", "rotate", "--static-role", "st"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&users[1]),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = read(&b, "app").await.unwrap();
    assert_eq!(second.username, users[1]);
    login(&b.db, &first.username, &first.password)
        .await
        .expect("overlap kept");
    let out = cli(
        &b,
        "admin",
        &["admin", "revoke", "--static-role", "st", "--yes"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in [&first, &second] {
        assert!(login(&b.db, &c.username, &c.password).await.is_err());
    }
    assert!(
        held.simple_query("SELECT 1").await.is_err(),
        "revoke ends sessions"
    );
    let third = read(&b, "app").await.unwrap();
    login(&b.db, &third.username, &third.password)
        .await
        .unwrap();
    let out = cli(&b, "app", &["admin", "rotate", "--static-role", "st"]).await;
    assert!(!out.status.success(), "a non-admin rotated");
    let records = b.audit_records();
    assert!(records
        .iter()
        .any(|r| r.action == "static_revoke" && r.outcome == Outcome::Ok));
    assert!(records
        .iter()
        .any(|r| r.action == "static_rotate" && r.outcome == Outcome::Denied));
    b.stop().await;
    // `credbroker check` reports the static role from the store.
    let (_, text) = check(&b).await;
    assert!(
        text.contains("static_roles.st")
            && text.contains(&format!("current user {}", third.username)),
        "{text}"
    );
}

/// `credbroker check` on `b`'s config: (exit code, stdout).
async fn check(b: &TestBroker) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&b.env.config_path)
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A pending rotation sealed under key A, the broker restarted with key B:
/// start-up warns, reads fail with a clear FailedPrecondition (not a 500),
/// `check` names the mismatch and the fix, and `admin rotate
/// --abandon-pending` rotates afresh under B — audited — after which reads
/// work and the database has the served password.
#[tokio::test]
async fn static_sealing_key_changed_under_a_pending_rotation_is_named_and_recovered() {
    let (mut b, users) = pg_started(2, "1h", "").await;
    let first = read(&b, "app").await.unwrap();
    assert_eq!(
        (first.username.as_str(), first.generation),
        (users[0].as_str(), 1)
    );
    // The next rotation's target is refused by the database (its role is
    // gone): the intent, sealed under key A, stays pending.
    let su = b.superuser().await;
    su.batch_execute(&format!(
        "REVOKE SELECT ON orders FROM \"{u}\"; DROP ROLE \"{u}\"",
        u = users[1]
    ))
    .await
    .unwrap();
    let e = b
        .admin("admin")
        .await
        .rotate_static_role(pb::StaticRoleRequest {
            static_role: "st".into(),
        })
        .await
        .unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    b.stop().await;
    su.batch_execute(&format!(
        "CREATE ROLE \"{u}\" NOLOGIN; GRANT SELECT ON orders TO \"{u}\";",
        u = users[1]
    ))
    .await
    .unwrap();
    // The key file replaced (key B).
    std::fs::write(b.env.dir.join("static.key"), "a7".repeat(32)).unwrap();

    // Start-up: a warning naming the role, and leases still served.
    let warnings = b.start_in_process().await;
    assert!(
        warnings.iter().any(|w| w.contains("static_roles.st")
            && w.contains("pending")
            && w.contains("sealed under another sealing key")),
        "{warnings:?}"
    );
    // A read: a clear FailedPrecondition with both key ids and the fix.
    let e = read(&b, "app").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    for want in [
        "sealed under another sealing key",
        "key id",
        "--abandon-pending",
    ] {
        assert!(e.message().contains(want), "{e}");
    }
    b.stop().await;
    // `check`: an error with the fix (exit 1).
    let (code, text) = check(&b).await;
    assert_eq!(code, Some(1), "{text}");
    for want in [
        "static_roles.st",
        "sealed under another sealing key",
        "admin rotate --static-role st --abandon-pending",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }

    // Recovery through the broker.
    b.start_in_process().await;
    let out = cli(
        &b,
        "admin",
        &[
            "admin",
            "rotate",
            "--static-role",
            "st",
            "--abandon-pending",
        ],
    )
    .await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("afresh") && said.contains(&users[1]),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = read(&b, "app").await.unwrap();
    assert_eq!(
        (after.username.as_str(), after.generation),
        (users[1].as_str(), 2)
    );
    login(&b.db, &after.username, &after.password)
        .await
        .expect("the served password is the database's");
    login(&b.db, &first.username, &first.password)
        .await
        .expect("the previous user keeps its overlap");
    let records = b.audit_records();
    let admin_id = "spiffe://credbroker.dev/dba/";
    assert!(
        records.iter().any(|r| r.action == "static_abandon"
            && r.outcome == Outcome::Ok
            && r.identity.starts_with(admin_id)
            && r.detail
                .as_deref()
                .is_some_and(|d| d.contains("generation 2"))),
        "{records:?}"
    );
    assert!(records.iter().any(|r| r.action == "static_rotate"
        && r.outcome == Outcome::Ok
        && r.identity.starts_with(admin_id)
        && r.detail
            .as_deref()
            .is_some_and(|d| d.contains("generation=2 "))));
    b.stop().await;
    let (_, text) = check(&b).await;
    assert!(
        !text.contains("does not open") && text.contains(&format!("current user {}", users[1])),
        "{text}"
    );
}

/// `create = true`: the broker makes both users, members of the owner
/// with the grants; after `SET ROLE owner` what they create belongs to it.
#[tokio::test]
async fn static_created_users_are_members_of_their_owner() {
    let b0 = TestBroker::prepare("").await;
    let base = unique("sc");
    let owner = format!("{base}_owner");
    let su = b0.superuser().await;
    su.batch_execute(&format!(
        "CREATE ROLE \"{owner}\" NOLOGIN; GRANT CREATE ON SCHEMA public TO \"{owner}\";"
    ))
    .await
    .unwrap();
    let users = vec![format!("{base}_a"), format!("{base}_b")];
    configure(
        &b0,
        "main",
        &users,
        "1h",
        &format!("create = true\nowner = \"{owner}\"\ngrants = [\"GRANT SELECT ON orders TO {{{{name}}}}\"]"),
    );
    let mut b = b0;
    b.start_in_process().await;
    let c = read(&b, "app").await.unwrap();
    let client = login(&b.db, &c.username, &c.password).await.unwrap();
    client
        .batch_execute(&format!(
            "SELECT * FROM orders; SET ROLE \"{owner}\"; CREATE TABLE made_by_static (x int)"
        ))
        .await
        .unwrap();
    let row = su
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'made_by_static'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), owner);
    for u in &users {
        assert!(b.role_exists(u).await, "{u} not created");
    }
    b.stop().await;
}

/// Two replicas on one PostgreSQL store serve the same credential and
/// rotate once per period between them, never twice.
#[tokio::test]
async fn static_two_replicas_on_a_postgres_store_rotate_once_per_period() {
    let (mut a, _) = pg_static(2, "2s", "").await;
    let store_db = unique("leases");
    cluster().create_database(&store_db).await.unwrap();
    let secret = a.env.dir.join("store-password");
    credbroker::fsutil::write_secret_file(&secret, cluster().superuser_password().as_bytes())
        .unwrap();
    a.edit_config(|t| {
        let old = format!(
            "[store]\nurl = \"sqlite://{}\"\n",
            a.env.store_path.display()
        );
        assert!(t.contains(&old));
        t.replace(
            &old,
            &format!(
                "[store]\nurl = \"{}\"\npassword_file = \"{}\"\nclaim_timeout = \"10s\"\n",
                cluster().url(&store_db),
                secret.display()
            ),
        )
    });
    let mut r = a.replica();
    a.start_in_process().await;
    r.start_in_process().await;
    let started = Instant::now();
    // Both serve the same credential (re-read across a rotation boundary).
    let same = eventually(Duration::from_secs(5), || async {
        match (read(&a, "app").await, read(&r, "app").await) {
            (Ok(x), Ok(y)) => x.generation == y.generation && x.password == y.password,
            _ => false,
        }
    })
    .await;
    assert!(same, "replicas serve different credentials");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let elapsed = started.elapsed().as_secs_f64();
    a.stop().await;
    r.stop().await;
    let mut generations = Vec::new();
    for rec in a.audit_records().into_iter().chain(r.audit_records()) {
        if rec.action == "static_rotate" && rec.outcome == Outcome::Ok {
            let d = rec.detail.unwrap_or_default();
            let g = d
                .split("generation=")
                .nth(1)
                .and_then(|x| x.split(' ').next())
                .unwrap_or("")
                .to_string();
            generations.push(g);
        }
    }
    let unique_gens: std::collections::BTreeSet<_> = generations.iter().cloned().collect();
    assert_eq!(
        unique_gens.len(),
        generations.len(),
        "a generation rotated twice: {generations:?}"
    );
    let most = (elapsed / 2.0).ceil() as usize + 1;
    assert!(
        generations.len() <= most && generations.len() >= 3,
        "{} rotations in {elapsed:.1}s: {generations:?}",
        generations.len()
    );
}

/// The end of a static role's overlap drains like a lease's handover: the
/// previous user's password stops working at once, its idle session is
/// ended, while a query in flight completes and an open transaction
/// commits; then those sessions end too, before the next rotation.
/// Immediate termination (as before) would fail both.
#[tokio::test]
async fn static_overlap_end_drains_the_previous_user() {
    let (mut b, users) = pg_static(2, "10s", "overlap = \"3s\"").await;
    let warnings = b.start_in_process().await;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("static_roles.st") && w.contains("(7s)")),
        "the clamp to rotation_period - overlap is said at start-up: {warnings:?}"
    );
    let first = read(&b, "app").await.unwrap();
    let (user, pw) = (first.username.clone(), first.password.clone());
    let idle = login(&b.db, &user, &pw).await.unwrap();
    let busy = login(&b.db, &user, &pw).await.unwrap();
    let tx = login(&b.db, &user, &pw).await.unwrap();
    let second = read_after(&b, first.generation, Duration::from_secs(15)).await;
    let rotated = Instant::now();
    assert_ne!(second.username, user);
    assert!(users.contains(&second.username));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        login(&b.db, &user, &pw).await.is_ok(),
        "still within the overlap"
    );
    tx.batch_execute("BEGIN; SELECT count(*) FROM orders")
        .await
        .unwrap();
    let query = tokio::spawn(async move {
        let r = busy.simple_query("SELECT pg_sleep(4)").await;
        (r.is_ok(), busy)
    });
    // The overlap ends ~3 s after the rotation: logins stop, the idle
    // session (idle since its login, long settled) is ended within a pass
    // or two. Watched without a query: a probe would make it busy, and a
    // drain ends only a session idle for a second (`drain::SETTLE`) until
    // its final third.
    assert!(
        eventually(Duration::from_secs(5), || async { idle.is_closed() }).await,
        "the idle session is ended after the overlap"
    );
    assert!(idle.simple_query("SELECT 1").await.is_err());
    assert!(
        login(&b.db, &user, &pw).await.is_err(),
        "the previous password no longer logs in"
    );
    let (completed, busy) = query.await.unwrap();
    assert!(
        completed,
        "the query in flight at the overlap's end completes"
    );
    tx.batch_execute("COMMIT")
        .await
        .expect("the open transaction commits");
    assert!(
        rotated.elapsed() < Duration::from_secs(9),
        "still before the next rotation"
    );
    // Idle from here on: ended once settled, at the next pass (one a
    // second for a static role), well before the drain's final third.
    assert!(
        eventually(Duration::from_secs(4), || async {
            busy.is_closed() && tx.is_closed()
        })
        .await,
        "the drained sessions end once idle"
    );
    assert!(
        rotated.elapsed() < Duration::from_millis(7600),
        "ended as settled, before the drain's final third"
    );
    let records = b.audit_records();
    let retire: Vec<String> = records
        .iter()
        .filter(|r| r.action == "static_retire")
        .filter_map(|r| r.detail.clone())
        .collect();
    assert!(
        retire.iter().any(|d| d.contains("sessions drain until"))
            && retire.iter().any(|d| d.starts_with("drain over (drained)")),
        "{retire:?}"
    );
    b.stop().await;
}
