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

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, SecondsFormat, Utc};
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
    pub prev: String,
}

struct Chain {
    file: File,
    seq: u64,
    prev: String,
}

/// The audit log writer. Each `append` is one `write` on an `O_APPEND` file
/// before the caller replies, so a record is with the kernel even if the
/// broker is killed right after; `sync` adds an fsync for power loss.
pub struct AuditLog {
    path: PathBuf,
    chain: Mutex<Chain>,
    sync: bool,
}

impl AuditLog {
    pub fn open(path: &Path, sync: bool) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Config(format!("audit directory {}: {e}", dir.display())))?;
        }
        // 0600 when created: the log names every identity and user, which
        // is nobody else's business on this machine.
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::Config(format!("cannot open audit log {}: {e}", path.display())))?;
        let (seq, prev) = match last_line(&mut file)
            .map_err(|e| Error::Config(format!("cannot read audit log {}: {e}", path.display())))?
        {
            None => (0, GENESIS.to_string()),
            Some(line) => match split_hash(&line).and_then(|(body, hash)| {
                serde_json::from_str::<Record>(&format!("{body}}}"))
                    .ok()
                    .map(|r| (r.seq, hash.to_string()))
            }) {
                Some(tail) => tail,
                // A torn last line (killed mid-write) would otherwise glue
                // itself to our next record. End it, and chain on from its
                // hash of nothing: `verify` will point at exactly this spot.
                None => {
                    file.write_all(b"\n")
                        .map_err(|e| Error::internal(format!("audit log: {e}")))?;
                    (0, GENESIS.to_string())
                }
            },
        };
        Ok(AuditLog {
            path: path.to_path_buf(),
            chain: Mutex::new(Chain { file, seq, prev }),
            sync,
        })
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

    fn write(&self, event: Event, sync: bool) -> Result<()> {
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
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
            prev: chain.prev.clone(),
        };
        let json = serde_json::to_string(&record).map_err(Error::internal)?;
        let body = &json[..json.len() - 1]; // without the closing brace
        let hash = hex::encode(Sha256::digest(body.as_bytes()));
        let line = format!("{body}{HASH_MARK}{hash}\"}}\n");
        chain
            .file
            .write_all(line.as_bytes())
            .map_err(|e| Error::unavailable(format!("audit log write failed: {e}")))?;
        if sync {
            chain
                .file
                .sync_data()
                .map_err(|e| Error::unavailable(format!("audit log sync failed: {e}")))?;
        }
        chain.seq = record.seq;
        chain.prev = hash;
        Ok(())
    }
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

/// The result of checking a file.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every record is intact and chained; `records` counted.
    Intact { records: u64, last_hash: String },
    /// The first record that does not hold, with the 1-based line number.
    Broken { line: u64, reason: String },
}

/// Checks every line: its own hash, its link to the line before, and that
/// sequence numbers run on without a gap.
pub fn verify(path: &Path) -> std::io::Result<Verdict> {
    let reader = BufReader::new(File::open(path)?);
    let mut prev = GENESIS.to_string();
    let mut records = 0u64;
    for (line_no, line) in (1u64..).zip(reader.split(b'\n')) {
        let expect_seq = line_no;
        let broken = |reason: String| {
            Ok(Verdict::Broken {
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
        if record.prev != prev {
            return broken(format!(
                "chain broken: record {} does not follow the one before it (a record was removed, inserted or moved)",
                record.seq
            ));
        }
        if record.seq != expect_seq {
            return broken(format!(
                "sequence jumps from {} to {}",
                expect_seq - 1,
                record.seq
            ));
        }
        prev = hash.to_string();
        records += 1;
    }
    Ok(Verdict::Intact {
        records,
        last_hash: prev,
    })
}

/// Parses an RFC 3339 `ts` of a record (used by tests and tooling).
pub fn record_time(r: &Record) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&r.ts)
        .ok()
        .map(|t| t.with_timezone(&Utc))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_audit_log_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        AuditLog::open(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
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
}
