//! When the sidecar exits: `--once` after one credential, and non-zero
//! when it cannot get or keep a valid credential.

use super::*;

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
