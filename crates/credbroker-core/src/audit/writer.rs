//! The writer, `AuditLog`: each append hashes its line and links it to the
//! one before, and the chain runs on across files (`reopen` after
//! logrotate, our own `rotate_size` rotation, a start on an empty log).
//! Apart from the readers: this is the only code that writes the log.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{SecondsFormat, Utc};
use sha2::{Digest, Sha256};

use super::record::VIA;
use super::{siblings, split_hash, Event, Outcome, Record, GENESIS, HASH_MARK};
use crate::error::{Error, Result};

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
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
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
