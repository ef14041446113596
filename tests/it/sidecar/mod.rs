//! `credbroker sidecar` as a user runs it: the real binary next to a real
//! broker binary and a password-checking PostgreSQL, with a reader playing
//! the application (re-read the file, connect, every 100 ms).
//!
//! This file is the harness every sidecar test shares (the process, the
//! file's parser, the reader); the tests are one file per concern:
//! `rotations.rs` (a reader through renewals, rotations and a broker
//! outage), `exits.rs` (`--once`, no broker, giving up), `recovery.rs` (a
//! revoked lease, a renewed client certificate), `formats.rs` (the env
//! file on MariaDB, every host of a multi-host database).

mod exits;
mod formats;
mod recovery;
mod rotations;

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

/// The short role: renewals every ~2 s, a new lease every ~5 s.
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
