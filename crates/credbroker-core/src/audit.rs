//! Append-only, hash-chained JSON lines: one record per request (allowed or
//! denied) and per reaper action.
//!
//! Each line is `{…,"prev":"<hash of the line before>","hash":"<sha256>"}`
//! where `hash` covers the exact bytes of the line up to `,"hash":`. Hashing
//! bytes rather than re-serialised JSON means verification never depends on
//! field order or number formatting. A changed byte, a deleted line or two
//! swapped lines all break the chain at a precise record; `seq` names it.
//! (Cutting lines off the end is only visible against a copy shipped
//! elsewhere, which is what `seq`/`hash` of the last line are for.)
//!
//! The chain runs on across files: `reopen` (SIGHUP, after logrotate moved
//! the file) and `rotate_size` (our own rotation, to `<path>.<last seq>`)
//! start a new file whose first record links to the last of the old one,
//! and `verify_files` checks a sequence of files as one chain. A new file
//! is never left empty — its first record says where the chain came from —
//! so a broker restarted after a rotation continues the chain too.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// `prev` of the first record in a file.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_MARK: &str = ",\"hash\":\"";

/// What happened, as the caller or reaper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Denied,
    Error,
}

/// One audit event. Never holds a password: there is no field for one.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub identity: String,
    pub action: &'static str,
    pub role: Option<String>,
    pub database: Option<String>,
    pub lease_id: Option<String>,
    pub username: Option<String>,
    pub outcome: Option<Outcome>,
    /// Error kind or a short explanation; never a secret.
    pub detail: Option<String>,
    /// Objects the revoked user owned, handed to `reassigned_to`.
    pub objects_reassigned: Option<u64>,
    pub reassigned_to: Option<String>,
    /// The just-in-time access request (and grant) this record belongs
    /// to: its request, approvals, denial, grant start and end, and every
    /// lease under the grant carry it (`access`).
    pub request_id: Option<String>,
}

tokio::task_local! {
    static VIA: &'static str;
}

/// Runs `fut` with every audit record it writes marked `"via": api`.
/// A scope rather than a parameter: the records of one request are
/// written deep in the broker and the revocation engine, which need not
/// know which front end called them.
pub async fn via<F: std::future::Future>(api: &'static str, fut: F) -> F::Output {
    VIA.scope(api, fut).await
}

/// The front end of the request this task serves, if any: to be carried
/// by work handed to another task (a shared revocation round).
pub fn current_via() -> Option<&'static str> {
    VIA.try_with(|v| *v).ok()
}

/// Runs `f` with the records it writes marked `via` (none: as they are).
pub fn in_via<R>(via: Option<&'static str>, f: impl FnOnce() -> R) -> R {
    match via {
        Some(v) => VIA.sync_scope(v, f),
        None => f(),
    }
}

impl Event {
    pub fn new(identity: impl Into<String>, action: &'static str) -> Self {
        Event {
            identity: identity.into(),
            action,
            ..Default::default()
        }
    }
}

/// A record as written (and as read back by `verify`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub ts: String,
    pub identity: String,
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lease_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub username: Option<String>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub objects_reassigned: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reassigned_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_id: Option<String>,
    /// The API a request came through, when not gRPC (`vault_api`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub via: Option<String>,
    pub prev: String,
}

struct Chain {
    file: File,
    seq: u64,
    prev: String,
    /// Bytes in the current file, for `rotate_size`.
    len: u64,
}

/// The audit log writer. Each `append` is one `write` on an `O_APPEND` file
/// before the caller replies, so a record is with the kernel even if the
/// broker is killed right after; `sync` adds an fsync for power loss.
pub struct AuditLog {
    path: PathBuf,
    chain: Mutex<Chain>,
    sync: bool,
    /// Rotate to `<path>.<last seq>` once the file is this large.
    rotate_size: Option<u64>,
    /// Records that could not be written (each failed what it recorded):
    /// registered by the metrics as `credbroker_audit_write_failures`, so
    /// a full disk pages someone before every request fails with it.
    write_failures: prometheus_client::metrics::counter::Counter,
    /// Tests: every write fails, as on a full disk ([`AuditLog::fail_writes`]).
    #[cfg(test)]
    failing: std::sync::atomic::AtomicBool,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    // 0600 when created: the log names every identity and user, which is
    // nobody else's business on this machine.
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
}

/// The last record's (seq, hash) of a file, if its last line is one.
fn tail_of(file: &mut File) -> std::io::Result<Option<(u64, String)>> {
    Ok(last_line(file)?.and_then(|line| {
        split_hash(&line).and_then(|(body, hash)| {
            serde_json::from_str::<Record>(&format!("{body}}}"))
                .ok()
                .map(|r| (r.seq, hash.to_string()))
        })
    }))
}

/// The newest readable sibling of `path` that logrotate or our own
/// rotation left (`audit.log.1`, `audit.log-20261201`, `audit.log.5000`;
/// compressed ones cannot be read and are skipped), for continuing the
/// chain when the log itself starts empty.
fn newest_rotated(path: &Path) -> Option<PathBuf> {
    let compressed = [".gz", ".xz", ".zst", ".bz2", ".lz4"];
    siblings(path)
        .ok()?
        .into_iter()
        .filter(|(suffix, _)| {
            suffix.len() > 1
                && matches!(suffix.as_bytes()[0], b'.' | b'-')
                && !compressed.iter().any(|c| suffix.ends_with(c))
        })
        .filter_map(|(_, p)| Some((std::fs::symlink_metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
}

/// The files beside `path` whose names start with its name, each with the
/// rest of its name (`.5000`, `.1`, `-20261201`): where rotated logs are.
fn siblings(path: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let (dir, name) = crate::fsutil::dir_and_name(path);
    let name = name.ok_or_else(|| std::io::Error::other("not a file name"))?;
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let suffix = n.strip_prefix(name)?.to_string();
            Some((suffix, e.path()))
        })
        .collect())
}

impl AuditLog {
    pub fn open(path: &Path, sync: bool) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::config_from(format!("audit directory {}: {e}", dir.display()), e)
            })?;
        }
        let mut file = open_append(path).map_err(|e| {
            Error::config_from(format!("cannot open audit log {}: {e}", path.display()), e)
        })?;
        let cannot_read = |e: std::io::Error| {
            Error::config_from(format!("cannot read audit log {}: {e}", path.display()), e)
        };
        let len = file.seek(SeekFrom::End(0)).map_err(cannot_read)?;
        let mut continued_from = None;
        let (seq, prev) = if len == 0 {
            // Empty: the file was rotated away while we were down. Chain on
            // from the newest rotated file we can read, if any.
            match newest_rotated(path).and_then(|p| {
                let tail = File::open(&p)
                    .ok()
                    .and_then(|mut f| tail_of(&mut f).ok().flatten());
                tail.map(|t| (p, t))
            }) {
                Some((p, tail)) => {
                    continued_from = Some(p);
                    tail
                }
                None => (0, GENESIS.to_string()),
            }
        } else {
            match tail_of(&mut file).map_err(cannot_read)? {
                Some(tail) => tail,
                // A torn last line (killed mid-write) would otherwise glue
                // itself to our next record. End it, and chain on from its
                // hash of nothing: `verify` will point at exactly this spot.
                None => {
                    file.write_all(b"\n")
                        .map_err(|e| Error::internal_from(format!("audit log: {e}"), e))?;
                    (0, GENESIS.to_string())
                }
            }
        };
        let log = AuditLog {
            path: path.to_path_buf(),
            chain: Mutex::new(Chain {
                file,
                seq,
                prev,
                len,
            }),
            sync,
            rotate_size: None,
            write_failures: Default::default(),
            #[cfg(test)]
            failing: Default::default(),
        };
        if let Some(p) = continued_from {
            let mut e = Event::new("credbroker:system", "audit_continue");
            e.detail = Some(format!("chain continues from {}", p.display()));
            log.append(e)?;
        }
        Ok(log)
    }

    /// Rotates the file to `<path>.<last seq>` whenever it reaches `bytes`.
    pub fn with_rotation(mut self, bytes: Option<u64>) -> Self {
        self.rotate_size = bytes;
        self
    }

    /// Opens `path` again if it is no longer the file we write (logrotate
    /// moved it away; SIGHUP calls this), continuing the chain into the new
    /// file. Returns whether a new file was opened.
    pub fn reopen(&self) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        let ours = chain.file.metadata().map(|m| (m.dev(), m.ino())).ok();
        let there = std::fs::metadata(&self.path)
            .map(|m| (m.dev(), m.ino()))
            .ok();
        if ours.is_some() && ours == there {
            return Ok(false);
        }
        self.start_file(
            &mut chain,
            "audit_reopen",
            "reopened after the file was moved",
        )?;
        Ok(true)
    }

    /// Switches to a fresh file at `path` and writes its first record, which
    /// links to the last one of the file before.
    fn start_file(&self, chain: &mut Chain, action: &'static str, why: &str) -> Result<()> {
        let mut file = open_append(&self.path).map_err(|e| {
            Error::unavailable_from(
                format!("cannot open audit log {}: {e}", self.path.display()),
                e,
            )
        })?;
        chain.len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::unavailable_from(format!("audit log: {e}"), e))?;
        chain.file = file;
        let mut e = Event::new("credbroker:system", action);
        e.outcome = Some(Outcome::Ok);
        e.detail = Some(format!("{why}; chain continues from seq {}", chain.seq));
        self.write_locked(chain, e, true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one record. An error here fails the request that caused it:
    /// an action we cannot audit is an action we do not take silently.
    pub fn append(&self, event: Event) -> Result<()> {
        self.write(event, self.sync)
    }

    /// Writes one record without waiting for the disk: for refusals, which
    /// change nothing and can come by the thousand from one flooding
    /// client. The next durable record's sync carries it to disk too, and
    /// the chain is the same either way.
    pub fn append_relaxed(&self, event: Event) -> Result<()> {
        self.write(event, false)
    }

    /// Tests: makes every write fail (or work again), as a full disk would.
    #[cfg(test)]
    pub(crate) fn fail_writes(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// The counter of records that could not be written (shared: the
    /// metrics registry holds a clone).
    pub fn write_failures(&self) -> prometheus_client::metrics::counter::Counter {
        self.write_failures.clone()
    }

    fn write(&self, event: Event, sync: bool) -> Result<()> {
        let written = self.write_one(event, sync);
        if written.is_err() {
            self.write_failures.inc();
        }
        written
    }

    fn write_one(&self, event: Event, sync: bool) -> Result<()> {
        #[cfg(test)]
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::unavailable(
                "audit log write failed: No space left on device (injected)",
            ));
        }
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        self.write_locked(&mut chain, event, sync)?;
        if self.rotate_size.is_some_and(|max| chain.len >= max) {
            let rotated = rotate_away(&self.path, chain.seq)?;
            let why = format!("rotated; the previous file is {}", rotated.display());
            self.start_file(&mut chain, "audit_rotate", &why)?;
        }
        Ok(())
    }

    fn write_locked(&self, chain: &mut Chain, event: Event, sync: bool) -> Result<()> {
        let record = Record {
            seq: chain.seq + 1,
            ts: Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
            identity: event.identity,
            action: event.action.to_string(),
            role: event.role,
            database: event.database,
            lease_id: event.lease_id,
            username: event.username,
            outcome: event.outcome.unwrap_or(Outcome::Ok),
            detail: event.detail,
            objects_reassigned: event.objects_reassigned,
            reassigned_to: event.reassigned_to,
            request_id: event.request_id,
            via: VIA.try_with(|v| v.to_string()).ok(),
            prev: chain.prev.clone(),
        };
        let json = serde_json::to_string(&record).map_err(Error::internal)?;
        let body = &json[..json.len() - 1]; // without the closing brace
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        let line = format!("{body}{HASH_MARK}{hash}\"}}\n");
        chain
            .file
            .write_all(line.as_bytes())
            .map_err(|e| Error::unavailable_from(format!("audit log write failed: {e}"), e))?;
        if sync {
            chain
                .file
                .sync_data()
                .map_err(|e| Error::unavailable_from(format!("audit log sync failed: {e}"), e))?;
        }
        chain.seq = record.seq;
        chain.prev = hash;
        chain.len += line.len() as u64;
        Ok(())
    }
}

/// Most names `rotate_away` tries for one sequence number.
const ROTATE_TRIES: u32 = 1000;

/// Moves `path` to `<path>.<seq>`, or, when that name is taken, to the
/// first free `<path>.<seq>-<n>` — never over an existing file. A name is
/// taken again after a restart on a torn tail, where the chain (and `seq`)
/// starts over: the older rotated file of that number is evidence and
/// stays. The move itself refuses to replace (`RENAME_NOREPLACE`), so even
/// a file that appears between the look and the move is kept.
fn rotate_away(path: &Path, seq: u64) -> Result<PathBuf> {
    let mut last = None;
    for n in 0..ROTATE_TRIES {
        let to = if n == 0 {
            PathBuf::from(format!("{}.{seq}", path.display()))
        } else {
            PathBuf::from(format!("{}.{seq}-{n}", path.display()))
        };
        match rename_noreplace(path, &to) {
            Ok(()) => {
                if n > 0 {
                    tracing::warn!(
                        rotated = %to.display(),
                        "audit log rotation: {}.{seq} exists already (the chain restarted after a torn tail); kept it and used the next free name",
                        path.display()
                    );
                }
                return Ok(to);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(to),
            Err(e) => {
                return Err(Error::unavailable_from(
                    format!("audit log rotation to {}: {e}", to.display()),
                    e,
                ))
            }
        }
    }
    Err(Error::unavailable(format!(
        "audit log rotation: {ROTATE_TRIES} names up to {} exist already; move old rotated files away",
        last.map(|p| p.display().to_string()).unwrap_or_default()
    )))
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(()),
            // A file system (or kernel) without the flag: look, then
            // move, under the log's lock.
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {}
            Err(e) => return Err(e.into()),
        }
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "exists already",
        ));
    }
    std::fs::rename(from, to)
}

fn split_hash(line: &str) -> Option<(&str, &str)> {
    let at = line.rfind(HASH_MARK)?;
    let hash = line[at + HASH_MARK.len()..].strip_suffix("\"}")?;
    (hash.len() == 64).then_some((&line[..at], hash))
}

fn last_line(file: &mut File) -> std::io::Result<Option<String>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    // Records are well under 8 KiB; read a tail large enough for one.
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    file.seek(SeekFrom::End(0))?;
    let text = String::from_utf8_lossy(&tail);
    if !text.ends_with('\n') {
        return Ok(Some(String::new()));
    }
    Ok(text
        .trim_end_matches('\n')
        .rsplit('\n')
        .next()
        .map(str::to_string))
}

/// The result of checking one file or a sequence of files.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every record is intact and chained; `records` counted. `first_seq`
    /// above 1 means the first file continues an earlier one that was not
    /// given (`first_prev` is the hash it links to).
    Intact {
        records: u64,
        last_hash: String,
        first_seq: u64,
        first_prev: String,
    },
    /// The first record that does not hold: its file and 1-based line.
    Broken {
        file: PathBuf,
        line: u64,
        reason: String,
    },
}

/// Checks every line of one file: its own hash, its link to the line
/// before, and that sequence numbers run on without a gap. A file that
/// starts mid-chain (rotated) is intact if it holds together; `first_seq`
/// says where it starts.
pub fn verify(path: &Path) -> std::io::Result<Verdict> {
    verify_files(&[path.to_path_buf()])
}

/// Checks files as one chain, in the order given (oldest first): each
/// file's first record must link to the last record of the file before.
pub fn verify_files(paths: &[PathBuf]) -> std::io::Result<Verdict> {
    let mut prev: Option<String> = None;
    let mut seq = 0u64;
    let mut first = None;
    let mut records = 0u64;
    for path in paths {
        let reader = BufReader::new(File::open(path)?);
        for (line_no, line) in (1u64..).zip(reader.split(b'\n')) {
            let broken = |reason: String| {
                Ok(Verdict::Broken {
                    file: path.clone(),
                    line: line_no,
                    reason,
                })
            };
            let bytes = line?;
            let Ok(line) = String::from_utf8(bytes) else {
                return broken("not UTF-8".into());
            };
            let Some((body, hash)) = split_hash(&line) else {
                return broken("no hash field: the record was altered or cut".into());
            };
            if hex::encode(Sha256::digest(body.as_bytes())) != hash {
                return broken("hash does not match the record's content: it was altered".into());
            }
            let record: Record = match serde_json::from_str(&format!("{body}}}")) {
                Ok(r) => r,
                Err(e) => return broken(format!("not a valid record: {e}")),
            };
            match &prev {
                // The very first record: the start of the chain, or where
                // the given files pick it up.
                None => {
                    if record.seq == 1 && record.prev != GENESIS {
                        return broken("the first record does not start a chain".into());
                    }
                    first = Some((record.seq, record.prev.clone()));
                }
                Some(p) => {
                    if &record.prev != p {
                        let what = if line_no == 1 {
                            "this file does not continue the file before it (a file is missing, \
                             out of order, or was cut)"
                                .to_string()
                        } else {
                            format!(
                                "chain broken: record {} does not follow the one before it (a record \
                                 was removed, inserted or moved)",
                                record.seq
                            )
                        };
                        return broken(what);
                    }
                    if record.seq != seq + 1 {
                        return broken(format!("sequence jumps from {seq} to {}", record.seq));
                    }
                }
            }
            prev = Some(hash.to_string());
            seq = record.seq;
            records += 1;
        }
    }
    let (first_seq, first_prev) = first.unwrap_or((1, GENESIS.to_string()));
    Ok(Verdict::Intact {
        records,
        last_hash: prev.unwrap_or_else(|| GENESIS.to_string()),
        first_seq,
        first_prev,
    })
}

/// The files of a log in chain order: our own rotations `<path>.<seq>`
/// (and `<path>.<seq>-<n>`, a name `<path>.<seq>` had taken already) by
/// sequence number, then `path` itself.
pub fn rotated_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut rotated: Vec<((u64, u32), PathBuf)> = siblings(path)?
        .into_iter()
        .filter_map(|(suffix, p)| {
            let rest = suffix.strip_prefix('.')?;
            // `<seq>`, or `<seq>-<n>` when `<seq>` was taken (`rotate_away`).
            let (seq, n) = match rest.split_once('-') {
                Some((seq, n)) => (seq.parse().ok()?, n.parse().ok()?),
                None => (rest.parse().ok()?, 0),
            };
            Some(((seq, n), p))
        })
        .collect();
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// Reads every record of a file, for tests and `admin` tooling.
pub fn read_records(path: &Path) -> std::io::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            split_hash(l).and_then(|(body, _)| serde_json::from_str(&format!("{body}}}")).ok())
        })
        .collect())
}

/// The records in the last `max_bytes` of a file, oldest first: what a
/// listing of the latest records reads, so a large log costs no more than
/// its tail. A line cut by the start of the window is skipped.
pub fn read_tail(path: &Path, max_bytes: u64) -> std::io::Result<Vec<Record>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text.lines();
    if start > 0 {
        lines.next();
    }
    Ok(lines
        .filter_map(|l| {
            split_hash(l).and_then(|(body, _)| serde_json::from_str(&format!("{body}}}")).ok())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
