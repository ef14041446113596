//! Acknowledged ⇒ durable, seen in the system calls. The crash loop's
//! SIGKILL leaves the kernel's page cache intact, so it cannot tell a
//! store write that was synced before its answer from one that was not;
//! only a power cut could. Here `credbroker serve` runs under `strace`,
//! and no answer to an issue may leave the broker while a write to the
//! lease store's WAL is not yet covered by an fsync begun after it
//! (ARCHITECTURE.md, "What each answer of the lease path waits for").
//! The same trace shows the check can fail: a holder's revoke is answered
//! after writes committed without a sync, by design.

use std::ffi::OsStr;
use std::process::{Child, Command};

use super::*;

/// `strace` and its options: every thread, file and socket names on each
/// fd, and only the calls the check reads; the trace file follows.
const STRACE: [&str; 6] = [
    "strace",
    "-f",
    "-yy",
    "-e",
    "trace=pwrite64,write,writev,sendto,sendmsg,fsync,fdatasync",
    "-o",
];

/// The traced broker and its tracer; both end with the test, even a
/// failed one (killing `strace` alone would leave the broker running).
struct Traced {
    strace: Child,
}

impl Traced {
    fn broker_pid(&self) -> Option<u32> {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.strace.id()))
                .ok()?;
        children.split_whitespace().next()?.parse().ok()
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(pid) = self.broker_pid() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.strace.wait();
    }
}

/// What the trace says, read in its own order (strace writes a call
/// that other threads interrupted as `<unfinished ...>`, then
/// `<... resumed>` when it returns: a call counts when it returns).
#[derive(Debug, Default, PartialEq)]
struct Order {
    wal_writes: usize,
    wal_syncs: usize,
    answers: usize,
    /// Answers written while a WAL write had returned that no fsync
    /// begun after it had covered yet.
    before_sync: usize,
}

fn read_order(trace: &str, port: u16) -> Order {
    let wal = |s: &str| s.contains("leases.db-wal>");
    let is_sync = |s: &str| s.starts_with("fsync(") || s.starts_with("fdatasync(");
    let answer = |s: &str| s.contains(&format!("TCP:[127.0.0.1:{port}->"));
    let mut open: std::collections::HashMap<&str, &str> = Default::default();
    // Returned WAL writes; a sync covers the count returned when it began.
    let (mut returned, mut covered) = (0usize, 0usize);
    let mut sync_began: std::collections::HashMap<&str, usize> = Default::default();
    let mut o = Order::default();
    for line in trace.lines() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let whole = if call.starts_with("<...") {
            match open.remove(pid) {
                Some(begun) => begun,
                None => continue,
            }
        } else {
            if is_sync(call) && wal(call) {
                sync_began.insert(pid, returned);
            }
            if call.ends_with("<unfinished ...>") {
                open.insert(pid, call);
                continue;
            }
            call
        };
        if whole.starts_with("pwrite64(") && wal(whole) {
            returned += 1;
            o.wal_writes += 1;
        } else if is_sync(whole) && wal(whole) {
            o.wal_syncs += 1;
            covered = covered.max(sync_began.remove(pid).unwrap_or(0));
        } else if answer(whole) {
            o.answers += 1;
            if returned > covered {
                o.before_sync += 1;
            }
        }
    }
    o
}

#[test]
fn the_order_reader_counts_an_answer_before_the_sync_that_covers_a_write() {
    let wal = "<TMP/leases.db-wal>";
    let sock = "<TCP:[127.0.0.1:7000->127.0.0.1:5000]>";
    let trace = format!(
        "1 pwrite64(5{wal}, \"\", 4096, 0) = 4096\n\
         2 fsync(5{wal} <unfinished ...>\n\
         1 pwrite64(5{wal}, \"\", 4096, 4096) = 4096\n\
         2 <... fsync resumed>) = 0\n\
         3 writev(9{sock}, [], 1) = 10\n\
         2 fsync(5{wal}) = 0\n\
         3 writev(9{sock}, [], 1) = 10\n"
    );
    // The first answer follows a sync begun before the second write.
    assert_eq!(
        read_order(&trace, 7000),
        Order {
            wal_writes: 2,
            wal_syncs: 2,
            answers: 2,
            before_sync: 1
        }
    );
    assert_eq!(read_order(&trace, 7001).answers, 0);
}

#[tokio::test]
async fn every_issue_is_answered_only_after_its_store_writes_are_synced() {
    assert!(
        Command::new("strace").arg("-V").output().is_ok(),
        "this test needs strace (scripts/test.sh installs it: apt-get install strace)"
    );
    let mut b = TestBroker::prepare(&roles()).await;
    b.release_port();
    let trace_path = b.env.dir.join("serve.strace");
    let mut wrapper: Vec<&OsStr> = STRACE.iter().map(OsStr::new).collect();
    wrapper.push(trace_path.as_os_str());
    let strace = b.serve_command("info", &wrapper).spawn().unwrap();
    let traced = Traced { strace };
    wait_port(b.port).await;

    // Issues alone: each waits for its intent's and its activation's sync.
    let mut leases = Vec::new();
    for _ in 0..10 {
        leases.push(issue(&b, "app", "ro", 0).await.unwrap());
    }
    let issued = read_order(&std::fs::read_to_string(&trace_path).unwrap(), b.port);
    assert!(
        issued.wal_writes >= 20 && issued.wal_syncs >= 20 && issued.answers >= 10,
        "the trace saw too little to judge: {issued:?}"
    );
    assert_eq!(
        issued.before_sync, 0,
        "an answer left the broker before the store's writes were synced: {issued:?}"
    );

    // A holder's revoke: its claim and its revoked mark commit without a
    // sync (ARCHITECTURE.md says why that is safe), and its answer does
    // not wait for one — so the check sees it.
    b.revoke_as("app", &leases[0].lease_id).await.unwrap();
    let after = read_order(&std::fs::read_to_string(&trace_path).unwrap(), b.port);
    assert!(
        after.before_sync > 0,
        "a revoke's answer after its unsynced writes went unseen: {after:?}"
    );
    eprintln!("issues alone: {issued:?}; with a revoke after them: {after:?}");
    drop(traced);
}
