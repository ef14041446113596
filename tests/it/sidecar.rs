//! `credbroker sidecar` as a user runs it: the real binary next to a real
//! broker binary and a password-checking PostgreSQL, with a reader playing
//! the application (re-read the file, connect, every 100 ms).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use credbroker::pb;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");

/// The issue's short role: renewals every ~2 s, a new lease every ~5 s.
fn short_role(name: &str) -> String {
    role(name, "{db}", "3s", "8s", APP)
}

/// The real broker serving `roles`, and a directory for a sidecar's files.
async fn serving(roles: &str) -> (TestBroker, tempfile::TempDir) {
    let mut b = TestBroker::prepare(roles).await;
    b.spawn_binary().await;
    (b, tempfile::tempdir().unwrap())
}

/// One sidecar process and its files (the pool tests run it too).
pub(crate) struct Sidecar {
    child: Option<Child>,
    pub(crate) out: PathBuf,
    log: PathBuf,
}

impl Sidecar {
    pub(crate) fn spawn(b: &TestBroker, dir: &Path, role: &str, extra: &[&str]) -> Sidecar {
        let out = dir.join("db.conn");
        let log = dir.join("sidecar.log");
        let args = [&["--role", role][..], extra].concat();
        let child = spawn_sidecar(b, &args, &out, &log);
        Sidecar {
            child: Some(child),
            out,
            log,
        }
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        assert!(Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success());
    }

    /// Waits for the exit; the exit code.
    async fn wait(&mut self, within: Duration) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        exit_within(&mut child, within).await.unwrap_or_else(|| {
            panic!(
                "sidecar did not exit within {within:?}:\n{}",
                self.log_text()
            )
        })
    }

    /// Timeline lines (issue, renew, rotate, revoke) for the closing note.
    pub(crate) fn timeline(&self) -> Vec<String> {
        const EVENTS: &[&str] = &[
            "lease issued",
            "lease renewed",
            "issuing a replacement",
            "credential rotated",
            "old lease kept valid",
            "old lease revoked",
            "old lease handed over",
            "old lease expired before",
            "cannot revoke the old lease yet",
            "lease revoked",
            "broker call failed",
            "file removed",
        ];
        self.log_text()
            .lines()
            .filter(|l| EVENTS.iter().any(|e| l.contains(e)))
            .map(strip_ansi)
            .collect()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) async fn wait_for_file(sidecar: &mut Sidecar) {
    let path = sidecar.out.clone();
    let ok = eventually(Duration::from_secs(20), || async { path.exists() }).await;
    assert!(
        ok && sidecar.running(),
        "the sidecar wrote no file:\n{}",
        sidecar.log_text()
    );
}

/// A credential as the reader parsed it from the file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    dsn: String,
    user: String,
    password: String,
    expires_at: Option<DateTime<Utc>>,
}

/// Parses the whole file or fails: a partial file fails here. `dsn` format
/// is one URI line; the template used below adds an `expires=` line.
fn parse_file(text: &str, b: &Names) -> Result<Seen, String> {
    let mut lines = text.split_inclusive('\n');
    let first = lines.next().ok_or("empty file")?;
    let dsn = first
        .strip_suffix('\n')
        .ok_or_else(|| format!("unterminated line {first:?}"))?;
    let expires_at = match lines.next() {
        None => None,
        Some(l) => {
            let v = l
                .strip_prefix("expires=")
                .and_then(|v| v.strip_suffix('\n'))
                .ok_or_else(|| format!("bad second line {l:?}"))?;
            Some(
                DateTime::parse_from_rfc3339(v)
                    .map_err(|e| format!("{v:?}: {e}"))?
                    .with_timezone(&Utc),
            )
        }
    };
    if lines.next().is_some() {
        return Err("trailing data".into());
    }
    let rest = dsn
        .strip_prefix("postgresql://")
        .ok_or_else(|| format!("not a URI: {dsn:?}"))?;
    let (userinfo, hostpart) = rest.split_once('@').ok_or("no @")?;
    let (user, password) = userinfo.split_once(':').ok_or("no password")?;
    let want_tail = format!(":{}/{}", cluster().port(), b.db);
    if !user.starts_with(&b.prefix)
        || password.len() != 40
        || !password.bytes().all(|c| c.is_ascii_alphanumeric())
        || !hostpart.ends_with(&want_tail)
    {
        return Err(format!("malformed credential line (user {user:?})"));
    }
    Ok(Seen {
        dsn: dsn.to_string(),
        user: user.to_string(),
        password: password.to_string(),
        expires_at,
    })
}

/// What the application saw.
#[derive(Default, Debug)]
struct ReaderReport {
    reads: usize,
    connects_ok: usize,
    /// Failures while the credential read was still valid (or its expiry
    /// unknown): must stay empty.
    failures: Vec<String>,
    /// Failures once the credential had expired (broker outage): allowed.
    expired_failures: usize,
    /// The file was absent (removed after expiry during an outage).
    missing: usize,
    changes: usize,
    users: Vec<String>,
    passwords: BTreeSet<String>,
    last_ok: Option<tokio::time::Instant>,
}

/// The application: every 100 ms re-read the file, check it is whole and
/// 0600, connect with exactly what it says and run a query.
async fn reader(b: Arc<Names>, path: PathBuf, run_for: Duration, report: Arc<Mutex<ReaderReport>>) {
    let end = tokio::time::Instant::now() + run_for;
    let mut last: Option<Seen> = None;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut r = report.lock().unwrap();
                let expired = last
                    .as_ref()
                    .and_then(|s| s.expires_at)
                    .is_some_and(|t| Utc::now() >= t);
                if expired {
                    r.missing += 1;
                } else {
                    r.failures
                        .push("file missing while the credential was valid".into());
                }
                continue;
            }
            Err(e) => panic!("read {}: {e}", path.display()),
        };
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0o600);
        let seen = match parse_file(&text, &b) {
            Ok(s) => s,
            Err(e) => {
                report
                    .lock()
                    .unwrap()
                    .failures
                    .push(format!("partial or malformed file: {e}"));
                continue;
            }
        };
        {
            let mut r = report.lock().unwrap();
            r.reads += 1;
            if mode != 0o600 {
                r.failures.push(format!("file mode {mode:o}"));
            }
            if last.as_ref().map(|l| &l.dsn) != Some(&seen.dsn) {
                if last.is_some() {
                    r.changes += 1;
                }
                r.users.push(seen.user.clone());
                r.passwords.insert(seen.password.clone());
            }
        }
        let result = connect(&seen.dsn).await;
        let mut r = report.lock().unwrap();
        match result {
            Ok(()) => {
                r.connects_ok += 1;
                r.last_ok = Some(tokio::time::Instant::now());
            }
            Err(e) => {
                // Only an expired credential may fail, and only with the
                // broker away (the tests that allow it check the outage).
                let expired = seen.expires_at.is_some_and(|t| Utc::now() >= t);
                if expired {
                    r.expired_failures += 1;
                } else {
                    r.failures
                        .push(format!("{} at {}: {e}", seen.user, Utc::now().to_rfc3339()));
                }
            }
        }
        last = Some(seen);
    }
}

async fn connect(dsn: &str) -> Result<(), String> {
    let mut cfg = tokio_postgres::Config::from_str(dsn).map_err(|e| e.to_string())?;
    cfg.connect_timeout(Duration::from_secs(5));
    let (client, conn) =
        cfg.connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| match e.as_db_error() {
                Some(d) => d.message().to_string(),
                None => e.to_string(),
            })?;
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT item FROM orders WHERE id = 1", &[])
        .await
        .map_err(|e| e.to_string())?;
    let item: String = row.get(0);
    if item == "coffee" {
        Ok(())
    } else {
        Err(format!("unexpected row {item:?}"))
    }
}

fn assert_no_password_in(log: &str, passwords: &BTreeSet<String>) {
    assert!(!passwords.is_empty());
    for p in passwords {
        assert!(
            !log.contains(p.as_str()),
            "a password is in the sidecar log"
        );
    }
}

/// Points 1, 2 (--exec), 4 and 5 of issue 5: 30 s of a reader connecting
/// every 100 ms through renewals and rotations, then SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecar_keeps_every_connection_working_through_rotations() {
    let role_name = "sc_rot";
    let (b, dir) = serving(&short_role(role_name)).await;
    let exec_log = dir.path().join("exec.log");
    let hook = format!("echo \"$CREDBROKER_USERNAME\" >> {}", exec_log.display());
    let mut sc = Sidecar::spawn(
        &b,
        dir.path(),
        role_name,
        &["--grace", "2s", "--exec", &hook],
    );
    wait_for_file(&mut sc).await;

    // Besides the application, a reader that only re-reads and parses the
    // file as fast as it can (1 ms apart), so "never a partial file" is
    // tested against every write, not sampled every 100 ms.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let (names, path, stop) = (Names::of(&b), sc.out.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut reads, mut distinct, mut last) = (0u64, 0u64, String::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = std::fs::read_to_string(&path).unwrap();
                if let Err(e) = parse_file(&text, &names) {
                    panic!("partial or malformed file seen: {e}");
                }
                if text != last {
                    distinct += 1;
                    last = text;
                }
                reads += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (reads, distinct)
        })
    };
    let report = Arc::new(Mutex::new(ReaderReport::default()));
    reader(
        Arc::new(Names::of(&b)),
        sc.out.clone(),
        Duration::from_secs(30),
        report.clone(),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (fast_reads, fast_distinct) = hammer.join().expect("the fast reader failed");
    assert!(sc.running(), "sidecar died:\n{}", sc.log_text());

    let r = std::mem::take(&mut *report.lock().unwrap());
    assert!(r.failures.is_empty(), "reader failures: {:#?}", r.failures);
    assert_eq!(r.expired_failures + r.missing, 0, "{r:?}");
    assert!(r.connects_ok >= 100, "{} connections", r.connects_ok);
    assert!(r.changes >= 3, "the file changed only {} times", r.changes);
    assert!(fast_distinct >= 4, "{fast_distinct} versions seen");

    // Point 4: SIGTERM revokes every lease (current and draining) and
    // removes the file.
    sc.signal("TERM");
    assert_eq!(sc.wait(Duration::from_secs(30)).await, Some(0));
    assert!(!sc.out.exists(), "file left behind after SIGTERM");
    assert_eq!(
        b.broker_role_count().await,
        0,
        "roles left: {:?}",
        b.broker_roles().await
    );

    // Point 2: the hook ran once per new credential, in order.
    let hooked: Vec<String> = std::fs::read_to_string(&exec_log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(hooked, r.users, "--exec runs vs credentials seen");
    let log = sc.log_text();
    assert_eq!(log.matches("lease issued").count(), hooked.len(), "{log}");

    // Point 5: the password is nowhere in the sidecar's output.
    assert_no_password_in(&log, &r.passwords);
    println!(
        "reader: {} reads, {} connections, {} file changes, {} credentials; \
         fast reader: {fast_reads} whole reads of {fast_distinct} versions",
        r.reads,
        r.connects_ok,
        r.changes,
        r.users.len()
    );
    println!("timeline:\n{}", sc.timeline().join("\n"));
}

/// Points 2 (--signal) and 3: the broker is killed for 5 s mid-run; the
/// sidecar keeps the file while it is valid, survives, and recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecar_survives_a_broker_outage_and_signals_the_app() {
    let role_name = "sc_out";
    let (b, dir) = serving(&short_role(role_name)).await;

    // The "application": writes its pidfile once its trap is set, and
    // counts the signals it gets.
    let pidfile = dir.path().join("app.pid");
    let sigs = dir.path().join("signals");
    let script = format!(
        "trap 'echo usr1 >> {sigs}' USR1; echo $$ > {pid}.tmp; mv {pid}.tmp {pid}; \
         while :; do sleep 0.1; done",
        sigs = sigs.display(),
        pid = pidfile.display()
    );
    let mut app = Command::new("sh").arg("-c").arg(&script).spawn().unwrap();
    assert!(eventually(Duration::from_secs(10), || async { pidfile.exists() }).await);

    let template = dir.path().join("tpl");
    std::fs::write(&template, "{{dsn}}\nexpires={{expires_at}}\n").unwrap();
    let signal = format!("{}:USR1", pidfile.display());
    let format = format!("template:{}", template.display());
    let mut sc = Sidecar::spawn(
        &b,
        dir.path(),
        role_name,
        &["--grace", "2s", "--signal", &signal, "--format", &format],
    );
    wait_for_file(&mut sc).await;

    let report = Arc::new(Mutex::new(ReaderReport::default()));
    let reading = tokio::spawn(reader(
        Arc::new(Names::of(&b)),
        sc.out.clone(),
        Duration::from_secs(24),
        report.clone(),
    ));

    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut broker = b;
    broker.kill_binary();
    let killed_at = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        sc.running(),
        "sidecar died in the outage:\n{}",
        sc.log_text()
    );
    broker.spawn_binary().await;
    let restarted_at = tokio::time::Instant::now();
    reading.await.unwrap();

    assert!(sc.running(), "sidecar died:\n{}", sc.log_text());
    let r = std::mem::take(&mut *report.lock().unwrap());
    assert!(r.failures.is_empty(), "reader failures: {:#?}", r.failures);
    let last_ok = r.last_ok.expect("no connection at all");
    assert!(
        last_ok > restarted_at + Duration::from_secs(2),
        "no working credential after the broker came back"
    );
    let log = sc.log_text();
    assert!(
        log.contains("broker call failed"),
        "the outage went unnoticed:\n{log}"
    );
    println!(
        "outage: broker down {:?}; reader: {} connections, {} failures on expired credentials, {} reads without a file",
        restarted_at - killed_at,
        r.connects_ok,
        r.expired_failures,
        r.missing
    );

    sc.signal("INT");
    assert_eq!(sc.wait(Duration::from_secs(30)).await, Some(0));
    assert!(!sc.out.exists());
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.broker_role_count().await == 0
        })
        .await,
        "roles left: {:?}",
        broker.broker_roles().await
    );

    // Point 2: one signal per new credential.
    let _ = app.kill();
    let _ = app.wait();
    let got = std::fs::read_to_string(&sigs)
        .unwrap_or_default()
        .lines()
        .count();
    // Counted after the sidecar exited: a rotation between the read above
    // and SIGINT writes (and signals) once more.
    let log = sc.log_text();
    let written = log.matches("credential written").count();
    assert!(got >= 2, "the app got {got} signals");
    assert_eq!(got, written, "signals vs credentials written");
    assert_no_password_in(&log, &r.passwords);
    println!("timeline:\n{}", sc.timeline().join("\n"));
}

/// The names a reader checks a file against, without holding the broker
/// (which the outage test kills and restarts).
struct Names {
    prefix: String,
    db: String,
}

impl Names {
    fn of(b: &TestBroker) -> Self {
        Names {
            prefix: b.prefix.clone(),
            db: b.db.clone(),
        }
    }
}

/// `--once` (init containers): one credential, written in the asked
/// format, the process exits 0 and the lease stays alive for the app.
/// A role the broker refuses ends the sidecar at once with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_once_writes_one_credential_and_refusals_exit_at_once() {
    let role_name = "sc_once";
    let b = TestBroker::start(&role(role_name, "{db}", "1m", "5m", APP)).await;
    let dir = tempfile::tempdir().unwrap();

    let mut sc = Sidecar::spawn(&b, dir.path(), role_name, &["--once", "--format", "env"]);
    assert_eq!(
        sc.wait(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        sc.log_text()
    );
    let text = std::fs::read_to_string(&sc.out).unwrap();
    let mode = std::fs::metadata(&sc.out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let var = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing"))
            .to_string()
    };
    assert_eq!(var("PGPORT"), cluster().port().to_string());
    assert_eq!(var("PGDATABASE"), b.db);
    assert!(var("DATABASE_URL").starts_with("postgresql://"));
    let (user, password) = (var("PGUSER"), var("PGPASSWORD"));
    assert!(
        b.role_exists(&user).await,
        "--once must leave the lease alive"
    );
    login(&b.db, &user, &password).await.unwrap();
    connect(&var("DATABASE_URL")).await.unwrap();
    let log = sc.log_text();
    assert!(log.contains("lease issued"), "{log}");
    assert!(!log.contains(&password), "a password is in the sidecar log");

    let other = dir.path().join("refused");
    std::fs::create_dir(&other).unwrap();
    let mut refused = Sidecar::spawn(&b, &other, "no_such_role", &[]);
    assert_eq!(refused.wait(Duration::from_secs(30)).await, Some(1));
    let log = refused.log_text();
    assert!(
        log.contains(
            "error: failed precondition: the broker refused a lease for role \"no_such_role\""
        ),
        "{log}"
    );
    assert!(!refused.out.exists());
    println!("{}", log.lines().last().unwrap_or_default());
}

/// With no broker at all the sidecar retries with backoff, then exits
/// non-zero saying it has no valid credential.
#[tokio::test]
async fn sidecar_without_a_broker_gives_up_with_a_clear_message() {
    let mut b = TestBroker::prepare(&short_role("sc_none")).await;
    // Nothing listens: connections are refused, as with no broker at all.
    b.release_port();
    let dir = tempfile::tempdir().unwrap();
    let mut sc = Sidecar::spawn(&b, dir.path(), "sc_none", &["--give-up-after", "2s"]);
    assert_eq!(sc.wait(Duration::from_secs(30)).await, Some(1));
    let log = sc.log_text();
    assert!(
        log.contains("cannot issue the first lease; retrying"),
        "{log}"
    );
    assert!(
        log.contains("no valid credential for role \"sc_none\": the broker has been unreachable"),
        "{log}"
    );
    assert!(!sc.out.exists());
}

/// The broker goes away for good: the file stays while its credential is
/// valid, goes when it expires, and the sidecar exits non-zero once it has
/// had no valid credential for `--give-up-after`.
#[tokio::test]
async fn sidecar_exits_non_zero_once_no_valid_credential_can_be_kept() {
    let (mut b, dir) = serving(&short_role("sc_gone")).await;
    let mut sc = Sidecar::spawn(&b, dir.path(), "sc_gone", &["--give-up-after", "1s"]);
    wait_for_file(&mut sc).await;
    b.kill_binary();
    assert_eq!(sc.wait(Duration::from_secs(30)).await, Some(1));
    assert!(
        !sc.out.exists(),
        "an expired credential was left in the file"
    );
    let log = sc.log_text();
    assert!(
        log.contains(
            "the credential expired and no replacement could be obtained; removing the file"
        ),
        "{log}"
    );
    assert!(
        log.contains("error: unavailable: no valid credential for role \"sc_gone\" since"),
        "{log}"
    );
}

/// A DBA revokes the role's leases: the next renewal is refused, and the
/// sidecar issues and writes a new credential instead of giving up. With
/// `--keep`, SIGTERM still revokes but leaves the file.
#[tokio::test]
async fn sidecar_replaces_a_lease_an_admin_revoked() {
    let role_name = "sc_adm";
    let (b, dir) = serving(&role(role_name, "{db}", "3s", "1m", APP)).await;
    let mut sc = Sidecar::spawn(&b, dir.path(), role_name, &["--keep"]);
    wait_for_file(&mut sc).await;
    let names = Names::of(&b);
    let first = parse_file(&std::fs::read_to_string(&sc.out).unwrap(), &names).unwrap();
    let r = admin_revoke_by(
        &b,
        pb::revoke_leases_request::Selector::Role(role_name.into()),
        false,
    )
    .await;
    assert_eq!(r.revoked, 1);
    assert!(!b.role_exists(&first.user).await);
    let replaced = eventually(Duration::from_secs(15), || async {
        std::fs::read_to_string(&sc.out)
            .ok()
            .and_then(|t| parse_file(&t, &names).ok())
            .is_some_and(|s| s.user != first.user)
    })
    .await;
    assert!(
        replaced,
        "no new credential after revocation:\n{}",
        sc.log_text()
    );
    let now = parse_file(&std::fs::read_to_string(&sc.out).unwrap(), &names).unwrap();
    connect(&now.dsn).await.unwrap();
    // The broker's event stream tells the sidecar at once (issue 16);
    // without it, the refused renewal would.
    let log = sc.log_text();
    assert!(
        log.contains("the current lease was revoked; replacing it now")
            || log.contains("renewal refused; issuing a new lease"),
        "{log}"
    );
    sc.signal("TERM");
    assert_eq!(sc.wait(Duration::from_secs(30)).await, Some(0));
    assert_eq!(b.broker_role_count().await, 0);
    assert!(sc.out.exists(), "--keep leaves the file");
}

/// A sidecar started before its certificate is valid (here: an expired
/// one) keeps retrying, and picks up the renewed certificate from disk
/// without a restart.
#[tokio::test]
async fn sidecar_reloads_its_client_certificate_from_disk() {
    use credbroker_testkit::pki::{ClientSpec, DevCa};
    let (b, dir) = serving(&short_role("sc_cert")).await;
    let pki = &b.env.pki;
    let ca = DevCa::load(
        &std::fs::read_to_string(pki.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(pki.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let (cert, key) = (dir.path().join("mine.pem"), dir.path().join("mine-key.pem"));
    let expired = ca.client_cert(&ClientSpec::expired(APP)).unwrap();
    std::fs::write(&cert, &expired.cert_pem).unwrap();
    std::fs::write(&key, &expired.key_pem).unwrap();

    let out = dir.path().join("db.conn");
    let log = dir.path().join("sidecar.log");
    let mut sc = Sidecar {
        child: Some(
            Command::new(BIN)
                .arg("sidecar")
                .args(["--role", "sc_cert", "--out"])
                .arg(&out)
                .args(["--addr", &b.addr, "--ca"])
                .arg(pki.join("ca.pem"))
                .arg("--cert")
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .env("RUST_LOG", "info")
                .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
                .spawn()
                .unwrap(),
        ),
        out,
        log,
    };
    let refused = eventually(Duration::from_secs(15), || async {
        sc.log_text()
            .contains("cannot issue the first lease; retrying")
    })
    .await;
    assert!(refused, "{}", sc.log_text());
    assert!(!sc.out.exists());

    let fresh = ca.client_cert(&ClientSpec::spiffe(APP)).unwrap();
    std::fs::write(&key, &fresh.key_pem).unwrap();
    std::fs::write(&cert, &fresh.cert_pem).unwrap();
    wait_for_file(&mut sc).await;
    assert!(sc.log_text().contains("client certificate reloaded"));
    sc.signal("TERM");
    assert_eq!(sc.wait(Duration::from_secs(30)).await, Some(0));
    assert_eq!(b.broker_role_count().await, 0);
}

/// The env format on a MySQL-kind role: MYSQL_* variables and a mysql://
/// DATABASE_URL that log in to the throwaway MariaDB as the leased user.
#[tokio::test]
async fn sidecar_env_file_for_a_mariadb_role_logs_in() {
    use mysql_async::prelude::Queryable;
    let maria = maria_opts;

    let mut root = mysql_async::Conn::new(maria(None, None))
        .await
        .unwrap_or_else(|e| panic!("root login to the throwaway MariaDB: {e}"));
    let schema = unique("sc");
    root.query_drop(format!(
        "CREATE DATABASE `{schema}`; CREATE TABLE `{schema}`.orders (id INT PRIMARY KEY); \
         INSERT INTO `{schema}`.orders VALUES (1)"
    ))
    .await
    .unwrap();

    let mut b = TestBroker::prepare("").await;
    let section = b.maria_section("maria", &schema);
    b.edit_config(|t| {
        t + &section
            + &format!(
                "[roles.sc_maria]\ndatabase = \"maria\"\ndefault_ttl = \"1m\"\nmax_ttl = \"5m\"\n\
                 allowed = [\"{APP}\"]\ngrants = [\"GRANT SELECT ON `{schema}`.orders TO {{{{name}}}}\"]\n"
            )
    });
    b.start_in_process().await;
    let dir = tempfile::tempdir().unwrap();
    let mut sc = Sidecar::spawn(&b, dir.path(), "sc_maria", &["--once", "--format", "env"]);
    assert_eq!(
        sc.wait(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        sc.log_text()
    );
    let text = std::fs::read_to_string(&sc.out).unwrap();
    let var = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| {
                panic!(
                    "{k} missing in:\n{}",
                    text.lines()
                        .map(|l| l.split('=').next().unwrap_or(""))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            })
            .trim_matches('\'')
            .to_string()
    };
    assert_eq!(var("MYSQL_TCP_PORT"), mariadb().port().to_string());
    assert_eq!(var("MYSQL_DATABASE"), schema);
    assert!(var("DATABASE_URL").starts_with("mysql://"));
    let (user, password) = (var("MYSQL_USER"), var("MYSQL_PWD"));
    let mut conn = mysql_async::Conn::new(maria(Some((&user, &password)), Some(&schema)))
        .await
        .expect("the sidecar's MariaDB credential logs in");
    let n: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM orders")
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    assert!(!sc.log_text().contains(&password));
    drop(conn);

    let out = admin_revoke_by(&b, pb::revoke_leases_request::Selector::All(true), false).await;
    assert_eq!(out.revoked, 1);
    b.stop().await;
    root.query_drop(format!("DROP DATABASE `{schema}`"))
        .await
        .unwrap();
}

/// Issue 28: a database whose `admin_url` names several hosts. Every
/// sidecar format names them all, in its clients' form; libpq (psql)
/// given the `env` or the `kv` file skips the first host, which is down,
/// and logs in on the second, as it would after a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_formats_name_every_host_of_a_multi_host_database() {
    let role_name = "sc_hosts";
    let mut b = TestBroker::prepare(&role(role_name, "{db}", "1m", "5m", APP)).await;
    // A port nobody listens on: the "failed primary" listed first.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let live = cluster().port();
    let one_host = cluster().url(&b.db);
    let at = format!("@127.0.0.1:{live}/");
    assert!(one_host.contains(&at), "{one_host}");
    let both = one_host.replace(&at, &format!("@127.0.0.1:{dead},127.0.0.1:{live}/"))
        + "?target_session_attrs=read-write";
    b.edit_config(|t| {
        assert!(t.contains(&format!("\"{one_host}\"")), "{t}");
        t.replace(&format!("\"{one_host}\""), &format!("\"{both}\""))
    });
    b.start_in_process().await;
    let hosts = "127.0.0.1,127.0.0.1";
    let ports = format!("{dead},{live}");
    let dir = tempfile::tempdir().unwrap();
    let run = |format: &'static str| {
        let sub = dir.path().join(format);
        std::fs::create_dir(&sub).unwrap();
        let b = &b;
        async move {
            let mut sc = Sidecar::spawn(b, &sub, role_name, &["--once", "--format", format]);
            assert_eq!(
                sc.wait(Duration::from_secs(30)).await,
                Some(0),
                "{}",
                sc.log_text()
            );
            (sc.out.clone(), std::fs::read_to_string(&sc.out).unwrap())
        }
    };
    let psql = |cmd: &mut Command, password: &str| {
        let out = cmd
            .env_remove("PGSSLMODE")
            .env_remove("PGHOSTADDR")
            .env_remove("PGSERVICE")
            .output()
            .expect("psql (PostgreSQL's client) is needed: `apt-get install -y postgresql-client`");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr).replace(password, "<password>")
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "coffee");
    };
    let query = "SELECT item FROM orders WHERE id = 1";

    let (env_file, env) = run("env").await;
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing"))
            .to_string()
    };
    assert_eq!(var("PGHOST"), hosts);
    assert_eq!(var("PGPORT"), ports);
    assert_eq!(var("PGTARGETSESSIONATTRS"), "read-write");
    psql(
        Command::new("sh")
            .arg("-c")
            .arg(format!(r#"set -a; . "$1"; exec psql -Atc "{query}""#))
            .arg("sh")
            .arg(&env_file),
        &var("PGPASSWORD"),
    );

    let (_, kv) = run("kv").await;
    let kv = kv.trim().to_string();
    assert!(
        kv.starts_with(&format!("host={hosts} port={ports} user=")),
        "{}",
        kv.split(" password=").next().unwrap()
    );
    assert!(kv.ends_with(" target_session_attrs=read-write"));
    let password = kv
        .split(' ')
        .find_map(|w| w.strip_prefix("password="))
        .unwrap()
        .to_string();
    psql(
        Command::new("psql").args(["-Atc", query]).arg(&kv),
        &password,
    );

    let (_, jdbc) = run("jdbc").await;
    assert!(
        jdbc.starts_with(&format!(
            "jdbc:postgresql://127.0.0.1:{dead},127.0.0.1:{live}/{}?user=",
            b.db
        )),
        "{}",
        jdbc.split("&password=").next().unwrap()
    );
    assert!(jdbc.trim_end().ends_with("&targetServerType=primary"));

    let (_, json) = run("json").await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["hosts"],
        serde_json::json!([
            {"host": "127.0.0.1", "port": dead},
            {"host": "127.0.0.1", "port": live}
        ])
    );
}
