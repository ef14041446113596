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
    /// The trace's line (from 0) of the first such answer, to show it.
    first_flagged: Option<usize>,
}

fn read_order(trace: &str, port: u16) -> Order {
    let wal = |s: &str| s.contains("leases.db-wal>");
    let is_sync = |s: &str| s.starts_with("fsync(") || s.starts_with("fdatasync(");
    let client_socket = format!("TCP:[127.0.0.1:{port}->");
    let answer = |s: &str| s.contains(&client_socket) && is_reply(s);
    let mut open: std::collections::HashMap<&str, &str> = Default::default();
    // Returned WAL writes; a sync covers the count returned when it began.
    let (mut returned, mut covered) = (0usize, 0usize);
    let mut sync_began: std::collections::HashMap<&str, usize> = Default::default();
    let mut o = Order::default();
    for (n, line) in trace.lines().enumerate() {
        let Some((pid, call)) = pid_and_call(line) else {
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
                o.first_flagged.get_or_insert(n);
            }
        }
    }
    o
}

/// A trace line's thread id and its call. strace pads the id to five
/// columns (`%-5u `): a machine that has just booted runs the broker
/// under four-digit ids, whose calls would otherwise start with a space.
fn pid_and_call(line: &str) -> Option<(&str, &str)> {
    line.split_once(' ')
        .map(|(pid, call)| (pid, call.trim_start()))
}

/// Whether a write on a client's connection carries a reply: its first
/// TLS record is application data of 64 bytes or more. What else the
/// broker writes there comes at any time and answers nothing: handshake
/// records, and records too small for a gRPC reply — the close_notify
/// alert (19 bytes) when a client hangs up, HTTP/2 SETTINGS, PING and
/// WINDOW_UPDATE frames (26–34). A reply to an issue is ~430 bytes, to a
/// revoke ~130.
fn is_reply(call: &str) -> bool {
    let Some((_, quoted)) = call.split_once('"') else {
        return false;
    };
    let head = unescape_prefix(quoted, 5);
    head.len() == 5
        && head[0] == 0x17
        && head[1] == 3
        && usize::from(u16::from_be_bytes([head[3], head[4]])) >= 64
}

/// The first `n` bytes of a string as strace quotes it (C escapes,
/// octal for the rest), from just after its opening quote.
fn unescape_prefix(quoted: &str, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = quoted.chars().peekable();
    while out.len() < n {
        match chars.next() {
            None | Some('"') => break,
            Some('\\') => match chars.next() {
                Some(d @ '0'..='7') => {
                    let mut v = d.to_digit(8).unwrap();
                    for _ in 0..2 {
                        match chars.peek().and_then(|c| c.to_digit(8)) {
                            Some(more) => {
                                v = v * 8 + more;
                                chars.next();
                            }
                            None => break,
                        }
                    }
                    out.push(v as u8);
                }
                Some('n') => out.push(b'\n'),
                Some('t') => out.push(b'\t'),
                Some('r') => out.push(b'\r'),
                Some('v') => out.push(0x0b),
                Some('f') => out.push(0x0c),
                Some(c) => out.push(c as u8),
                None => break,
            },
            Some(c) => out.push(c as u8),
        }
    }
    out
}

/// For a trace that saw too little: its calls by name, and its first
/// lines that name a WAL or write at an offset (what the reader looks for).
fn what_it_saw(trace: &str) -> String {
    let mut calls: std::collections::BTreeMap<&str, usize> = Default::default();
    for line in trace.lines() {
        let call = pid_and_call(line).map_or("", |(_, c)| c);
        let name = call.split(['(', ' ']).next().unwrap_or("");
        *calls.entry(name).or_default() += 1;
    }
    let samples: Vec<String> = trace
        .lines()
        .filter(|l| l.contains("-wal") || l.contains("pwrite") || l.contains("sync"))
        .take(8)
        .map(|l| l.chars().take(160).collect())
        .collect();
    format!(
        "{} lines, calls {calls:?}; first WAL/pwrite/sync lines:\n{}",
        trace.lines().count(),
        samples.join("\n")
    )
}

/// The 30 lines of a trace that end at line `n`, each cut to 200 bytes
/// (strace shows at most 32 bytes of a buffer; answers are TLS records).
fn around(trace: &str, n: Option<usize>) -> String {
    let Some(n) = n else {
        return String::new();
    };
    let lines: Vec<&str> = trace.lines().collect();
    lines[n.saturating_sub(29)..=n.min(lines.len() - 1)]
        .iter()
        .map(|l| l.chars().take(200).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The trace once its size has held for 300 ms (under the suite's load,
/// strace can trail the broker by more than a scheduler tick).
async fn settled(path: &std::path::Path) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = std::fs::read_to_string(path).unwrap();
        if now.len() == last.len() {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn the_order_reader_counts_an_answer_before_the_sync_that_covers_a_write() {
    let wal = "<TMP/leases.db-wal>";
    let sock = "<TCP:[127.0.0.1:7000->127.0.0.1:5000]>";
    // As strace writes them: pids padded to five columns, a reply
    // (application data, 429 bytes), and a client's hang-up answered by
    // close_notify (19 bytes).
    let reply = r#"[{iov_base="\27\3\3\1\255\275N}", iov_len=434}]"#;
    let bye = r#"[{iov_base="\27\3\3\0\23\253\204o", iov_len=24}]"#;
    let trace = format!(
        "1    pwrite64(5{wal}, \"\", 4096, 0) = 4096\n\
         2    fsync(5{wal} <unfinished ...>\n\
         1 pwrite64(5{wal}, \"\", 4096, 4096) = 4096\n\
         2 <... fsync resumed>) = 0\n\
         3 writev(8{sock}, {bye}, 1) = 24\n\
         3 writev(9{sock}, {reply}, 1) = 434\n\
         2 fsync(5{wal}) = 0\n\
         3 writev(9{sock}, {reply}, 1) = 434\n"
    );
    // The first reply follows a sync begun before the second write; the
    // hang-up before it answers nothing.
    assert_eq!(
        read_order(&trace, 7000),
        Order {
            wal_writes: 2,
            wal_syncs: 2,
            answers: 2,
            before_sync: 1,
            first_flagged: Some(5),
        }
    );
    assert_eq!(read_order(&trace, 7001).answers, 0);
    assert_eq!(unescape_prefix(r#"\27\3\3\0&x""#, 5), b"\x17\x03\x03\x00&");
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
    // Every system call stops the broker for strace: under the suite's
    // load it starts several times slower than alone.
    wait_port_within(b.port, Duration::from_secs(60)).await;

    // Issues alone: each waits for its intent's and its activation's sync.
    let mut leases = Vec::new();
    for _ in 0..10 {
        leases.push(issue(&b, "app", "ro", 0).await.unwrap());
    }
    // strace writes a call's line when the call returns, after the bytes
    // have left: the client can hold its answer before the line exists.
    // Read the trace once it stops growing.
    let issued_trace = settled(&trace_path).await;
    let issued = read_order(&issued_trace, b.port);
    assert!(
        issued.wal_writes >= 20 && issued.wal_syncs >= 20 && issued.answers >= 10,
        "the trace saw too little to judge: {issued:?}; {}",
        what_it_saw(&issued_trace)
    );
    assert_eq!(
        issued.before_sync,
        0,
        "an answer left the broker before the store's writes were synced: {issued:?}; \
         the trace up to the first:\n{}",
        around(&issued_trace, issued.first_flagged)
    );

    // A holder's revoke: its claim and its revoked mark commit without a
    // sync (ARCHITECTURE.md says why that is safe), and its answer does
    // not wait for one — so the check sees it.
    b.revoke_as("app", &leases[0].lease_id).await.unwrap();
    // Waits for the revoke's answer lines to be written (see above); a
    // check that cannot see them fails here.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let after = read_order(&settled(&trace_path).await, b.port);
        if after.before_sync > 0 || Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        after.before_sync > 0,
        "a revoke's answer after its unsynced writes went unseen: {after:?}"
    );
    eprintln!("issues alone: {issued:?}; with a revoke after them: {after:?}");
    drop(traced);
}
