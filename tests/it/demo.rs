//! README command 1: `credbroker demo` runs end to end on this machine.

use std::time::Duration;

/// The demo exits 0 having logged in as the lease, cut its session,
/// verified the audit chain and found the password nowhere in the log.
#[tokio::test]
async fn the_demo_runs_end_to_end() {
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .arg("demo")
            .output(),
    )
    .await
    .expect("demo finished within 4 minutes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for step in [
        "connecting to PostgreSQL AS the leased credential",
        "the open session's next query -> connection closed",
        "hash chain intact",
        "the password appears 0 times",
        "done: throwaway databases stopped",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
    assert!(
        !stdout.contains("Input/output error: Input/output error"),
        "{stdout}"
    );
}
