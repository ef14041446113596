//! The audit log's tests: the writer, rotation and the verifier together,
//! since each check of the chain needs a log written first.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::writer::rename_noreplace;
use super::*;
use crate::error::Error;

#[test]
fn io_errors_keep_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    // The audit log's directory is a file: the open fails.
    let e = AuditLog::open(&file.join("audit.log"), false)
        .err()
        .unwrap();
    assert!(matches!(e, Error::Config(_)), "{e}");
    let src = std::error::Error::source(&e).expect("source");
    assert!(src.downcast_ref::<std::io::Error>().is_some());
}

#[test]
fn read_tail_reads_only_the_last_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, false).unwrap();
    for _ in 0..50 {
        log.append(Event::new("spiffe://x/y", "issue")).unwrap();
    }
    let all = read_records(&path).unwrap();
    assert_eq!(all.len(), 50);
    let line = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .len() as u64
        + 1;
    // Three and a half lines: the cut one is skipped, three remain.
    let tail = read_tail(&path, line * 7 / 2).unwrap();
    assert_eq!(
        tail.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![48, 49, 50]
    );
    assert_eq!(read_tail(&path, 1 << 20).unwrap().len(), 50);
}

#[test]
fn a_new_audit_log_is_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    AuditLog::open(&path, false).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn records_written_in_a_via_scope_say_so_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, false).unwrap();
    via("vault_api", async {
        log.append(Event::new("a", "issue")).unwrap()
    })
    .await;
    log.append(Event::new("b", "issue")).unwrap();
    let records = read_records(&path).unwrap();
    let via_of = |who: &str| {
        records
            .iter()
            .find(|r| r.identity == who)
            .unwrap()
            .via
            .clone()
    };
    assert_eq!(via_of("a").as_deref(), Some("vault_api"));
    assert_eq!(via_of("b"), None);
    assert!(verify(&path).is_ok());
}

fn write_sample(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("audit.log");
    let log = AuditLog::open(&path, false).unwrap();
    for i in 0..n {
        let mut e = Event::new(format!("spiffe://t/{i}"), "issue");
        e.lease_id = Some(format!("l_{i}"));
        log.append(e).unwrap();
    }
    path
}

#[test]
fn untouched_file_verifies_and_reopening_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path(), 3);
    let log = AuditLog::open(&path, false).unwrap();
    log.append(Event::new("x", "revoke")).unwrap();
    match verify(&path).unwrap() {
        Verdict::Intact { records, .. } => assert_eq!(records, 4),
        v => panic!("{v:?}"),
    }
}

#[test]
fn flipped_byte_deleted_line_and_swap_are_each_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path(), 5);
    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = original.lines().collect();

    let flipped = original.replacen("spiffe://t/2", "spiffe://t/3", 1);
    std::fs::write(&path, flipped).unwrap();
    assert!(matches!(
        verify(&path).unwrap(),
        Verdict::Broken { line: 3, .. }
    ));

    let mut deleted = lines.clone();
    deleted.remove(1);
    std::fs::write(&path, deleted.join("\n") + "\n").unwrap();
    assert!(matches!(
        verify(&path).unwrap(),
        Verdict::Broken { line: 2, .. }
    ));

    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    std::fs::write(&path, swapped.join("\n") + "\n").unwrap();
    assert!(matches!(
        verify(&path).unwrap(),
        Verdict::Broken { line: 4, .. }
    ));
}

fn records_in(v: Verdict) -> u64 {
    match v {
        Verdict::Intact { records, .. } => records,
        v => panic!("{v:?}"),
    }
}

#[test]
fn rotation_by_size_keeps_one_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, false)
        .unwrap()
        .with_rotation(Some(4096));
    for i in 0..100 {
        log.append(Event::new(format!("spiffe://t/{i}"), "issue"))
            .unwrap();
    }
    let files = rotated_files(&path).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    // 100 records plus one `audit_rotate` opening each new file.
    assert_eq!(
        records_in(verify_files(&files).unwrap()),
        100 + files.len() as u64 - 1
    );
    // Each rotated file alone holds together and says where it starts.
    match verify(&files[1]).unwrap() {
        Verdict::Intact { first_seq, .. } => assert!(first_seq > 1),
        v => panic!("{v:?}"),
    }
    // A missing file in the middle is found at the start of the next.
    let gap = [files[0].clone(), files[2].clone()];
    match verify_files(&gap).unwrap() {
        Verdict::Broken { file, line, .. } => assert_eq!((file, line), (files[2].clone(), 1)),
        v => panic!("{v:?}"),
    }
    // A restart continues the current file's chain.
    drop(log);
    let log = AuditLog::open(&path, false).unwrap();
    log.append(Event::new("x", "revoke")).unwrap();
    assert!(matches!(
        verify_files(&rotated_files(&path).unwrap()).unwrap(),
        Verdict::Intact { .. }
    ));
}

#[test]
fn reopen_after_logrotate_moved_the_file_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, false).unwrap();
    log.append(Event::new("a", "issue")).unwrap();
    assert!(!log.reopen().unwrap(), "nothing moved: same file");
    let moved = dir.path().join("audit.log.1");
    std::fs::rename(&path, &moved).unwrap();
    // Until SIGHUP, records still go to the moved file (logrotate's way).
    log.append(Event::new("b", "issue")).unwrap();
    assert!(log.reopen().unwrap());
    log.append(Event::new("c", "issue")).unwrap();
    assert_eq!(
        records_in(verify_files(&[moved.clone(), path.clone()]).unwrap()),
        4
    );
    assert_eq!(read_records(&path).unwrap()[0].action, "audit_reopen");
    // Given in the wrong order, the link does not hold.
    assert!(matches!(
        verify_files(&[path.clone(), moved.clone()]).unwrap(),
        Verdict::Broken { line: 1, .. }
    ));
}

#[test]
fn a_broker_started_on_an_empty_log_continues_the_rotated_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, false).unwrap();
    log.append(Event::new("a", "issue")).unwrap();
    drop(log);
    // logrotate moved it while the broker was down; `create` left an
    // empty file in its place.
    let moved = dir.path().join("audit.log-20261201");
    std::fs::rename(&path, &moved).unwrap();
    std::fs::write(&path, b"").unwrap();
    let log = AuditLog::open(&path, false).unwrap();
    log.append(Event::new("b", "issue")).unwrap();
    assert_eq!(read_records(&path).unwrap()[0].action, "audit_continue");
    assert_eq!(records_in(verify_files(&[moved, path]).unwrap()), 3);
}

#[test]
fn rotation_after_a_torn_tail_restart_never_overwrites_an_older_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    // Every append rotates: records 1, 3, 5 go to `.1`, `.3`, `.5`.
    let log = AuditLog::open(&path, false).unwrap().with_rotation(Some(1));
    for i in 0..3 {
        log.append(Event::new(format!("spiffe://t/{i}"), "issue"))
            .unwrap();
    }
    drop(log);
    let one = path.with_file_name("audit.log.1");
    let evidence = std::fs::read(&one).unwrap();
    assert!(String::from_utf8_lossy(&evidence).contains("spiffe://t/0"));
    // Killed mid-write: the restart ends the torn line and starts the
    // chain over, so its seq runs through 1 again.
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"seq\":7,\"ts\":\"2026").unwrap();
    drop(f);
    let log = AuditLog::open(&path, false).unwrap().with_rotation(Some(1));
    log.append(Event::new("spiffe://t/after", "issue")).unwrap();
    log.append(Event::new("spiffe://t/later", "issue")).unwrap();
    assert_eq!(
        std::fs::read(&one).unwrap(),
        evidence,
        "the older audit.log.1 was overwritten"
    );
    let moved = path.with_file_name("audit.log.1-1");
    let text = std::fs::read_to_string(&moved).unwrap();
    assert!(text.contains("spiffe://t/after"), "{text}");
    let names: Vec<String> = rotated_files(&path)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "audit.log.1",
            "audit.log.1-1",
            "audit.log.3",
            "audit.log.3-1",
            "audit.log.5",
            "audit.log"
        ]
    );
    // The move itself refuses to replace a file.
    let e = rename_noreplace(&path, &one).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&one).unwrap(), evidence);
}

#[test]
fn the_first_record_of_a_chain_must_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path(), 3);
    let original = std::fs::read_to_string(&path).unwrap();
    // Removing the first line leaves a file that starts at seq 2: it is
    // intact, and says so, rather than pass as a whole chain.
    let rest: Vec<&str> = original.lines().skip(1).collect();
    std::fs::write(&path, rest.join("\n") + "\n").unwrap();
    match verify(&path).unwrap() {
        Verdict::Intact { first_seq, .. } => assert_eq!(first_seq, 2),
        v => panic!("{v:?}"),
    }
}
